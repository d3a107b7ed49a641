//! NATS authentication and TLS options, shared by `relay` and `serve`.

use std::path::Path;

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
    use super::server_addrs;

    #[test]
    fn a_cluster_is_a_comma_separated_list() {
        let addrs = server_addrs("nats://127.0.0.1:4222, nats://127.0.0.1:4223,").unwrap();
        assert_eq!(addrs.len(), 2);
        assert_eq!(addrs[1].port(), 4223);
        assert!(server_addrs("").is_err());
        assert!(server_addrs(" , ").is_err());
        assert!(server_addrs("nats://127.0.0.1:4222,nats://[bad").is_err());
    }
}
