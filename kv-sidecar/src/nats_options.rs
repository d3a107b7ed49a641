//! NATS connection options shared by `relay` and `serve`: servers,
//! authentication, TLS, and the reconnect schedule.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use async_nats::{ConnectOptions, ServerAddr};

/// The servers of a NATS URL list (`nats://a:4222,nats://b:4222`): several
/// members of one cluster, so the first connection does not depend on one
/// node (the client also learns the others from the cluster once connected).
pub fn server_addrs(urls: &str) -> anyhow::Result<Vec<ServerAddr>> {
    let addrs = urls
        .split(',')
        .map(str::trim)
        .filter(|url| !url.is_empty())
        .map(|url| {
            url.parse::<ServerAddr>()
                .with_context(|| format!("'{url}' is not a NATS server URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    anyhow::ensure!(!addrs.is_empty(), "no NATS server URL given");
    Ok(addrs)
}

/// A connection that never gives up: it retries the first connect in the
/// background and reconnects forever. Its server is pinged every 5 s (the
/// client's default is 60 s), so one that hangs or is cut off without a
/// reset (a node gone, a partition) is given up after about 10–15 s, and a
/// cluster's other members are tried, instead of after 2–3 minutes.
pub fn connect_options(name: String) -> ConnectOptions {
    ConnectOptions::new()
        .name(name)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .connection_timeout(Duration::from_secs(3))
        .ping_interval(Duration::from_secs(5))
        .reconnect_delay_callback(reconnect_delay)
}

/// How long to wait before reconnect attempt `attempts`: quickly at first,
/// then every 2 s (the NATS clients' usual wait), so a NATS that comes back
/// is found within 2 s. Routing is approximate until then; each attempt
/// costs the server one TCP connect.
fn reconnect_delay(attempts: usize) -> Duration {
    let exponent = u32::try_from(attempts.min(5)).unwrap_or(5);
    Duration::from_millis(100 * 2u64.pow(exponent)).min(Duration::from_secs(2))
}

/// Every way kvmesh can authenticate to NATS; unset fields are not used.
#[derive(Debug, Default, Clone, Copy)]
pub struct NatsCredentials<'a> {
    pub token: Option<&'a str>,
    pub user: Option<&'a str>,
    pub password: Option<&'a str>,
    pub creds_file: Option<&'a Path>,
    pub tls_ca: Option<&'a Path>,
    pub tls_cert: Option<&'a Path>,
    pub tls_key: Option<&'a Path>,
}

/// Adds the credentials and TLS settings to `options`.
pub async fn with_credentials(
    mut options: ConnectOptions,
    credentials: NatsCredentials<'_>,
) -> anyhow::Result<ConnectOptions> {
    if let Some(token) = credentials.token {
        options = options.token(token.to_owned());
    }
    if let (Some(user), Some(password)) = (credentials.user, credentials.password) {
        options = options.user_and_password(user.to_owned(), password.to_owned());
    }
    if let Some(creds) = credentials.creds_file {
        options = options
            .credentials_file(creds)
            .await
            .with_context(|| format!("reading NATS credentials {}", creds.display()))?;
    }
    if let Some(ca) = credentials.tls_ca {
        options = options
            .add_root_certificates(ca.to_path_buf())
            .require_tls(true);
    }
    if let (Some(cert), Some(key)) = (credentials.tls_cert, credentials.tls_key) {
        options = options
            .add_client_certificate(cert.to_path_buf(), key.to_path_buf())
            .require_tls(true);
    }
    Ok(options)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::{reconnect_delay, server_addrs};

    #[test]
    fn a_cluster_is_a_comma_separated_list() {
        let addrs = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,").unwrap();
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[1].port(), 4223);
        assert!(server_addrs("").is_err());
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("nats://127.0.0.1:4222,nats://[bad").is_err());
    }

    #[test]
    fn reconnects_start_fast_and_wait_at_most_two_seconds() {
        assert_eq!(reconnect_delay(1), Duration::from_millis(200));
        let delays: Vec<Duration> = (0..100).map(reconnect_delay).collect();
        assert!(delays.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(delays[99], Duration::from_secs(2));
    }
}
