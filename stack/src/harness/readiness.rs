//! Waiting for started processes, and for what they serve, to become ready.

use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::harness::ManagedProcess;

const POLL: Duration = Duration::from_millis(50);

/// Polls `probe` until it returns true, failing early if `process` exits.
pub fn wait_until(
    process: &mut ManagedProcess,
    what: &str,
    timeout: Duration,
    mut probe: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        process.ensure_running()?;
        if probe() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            anyhow::bail!(
                "{} not ready ({what}) after {timeout:?}; log tail:\n{}",
                process.name(),
                process.log_tail()
            );
        }
        std::thread::sleep(POLL);
    }
}

/// Polls `done` every 100 ms until it returns true; an error naming `what`
/// once `timeout` has passed. For state that settles after requests (events
/// reaching the sidecar, the filter's VMs), not for process start-up.
pub fn poll_until(
    what: &str,
    timeout: Duration,
    mut done: impl FnMut() -> bool,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        anyhow::ensure!(Instant::now() < deadline, "{what}: not within {timeout:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

/// True when `url` answers 2xx.
pub fn http_ok(client: &reqwest::blocking::Client, url: &str) -> bool {
    client
        .get(url)
        .timeout(Duration::from_secs(2))
        .send()
        .map(|r| r.status().is_success())
        .unwrap_or(false)
}

/// True when a TCP connection to `addr` succeeds.
pub fn tcp_open(addr: &str) -> bool {
    addr.parse()
        .ok()
        .and_then(|a| TcpStream::connect_timeout(&a, Duration::from_millis(200)).ok())
        .is_some()
}

/// Waits until `url` answers JSON that `ready` accepts: for a service that
/// is up before what it serves is.
pub fn wait_json<T: serde::de::DeserializeOwned>(
    process: &mut ManagedProcess,
    url: &str,
    what: &str,
    timeout: Duration,
    ready: impl Fn(&T) -> bool,
) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::new();
    wait_until(process, &format!("{what} at GET {url}"), timeout, || {
        client
            .get(url)
            .timeout(Duration::from_secs(2))
            .send()
            .and_then(|r| r.json::<T>())
            .is_ok_and(|answer| ready(&answer))
    })
}

/// Waits until `url` answers 2xx.
pub fn wait_http_ok(
    process: &mut ManagedProcess,
    url: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let client = reqwest::blocking::Client::new();
    wait_until(process, &format!("GET {url}"), timeout, || {
        http_ok(&client, url)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn polls_until_done_or_names_what_timed_out() {
        let mut polls = 0;
        poll_until("three polls", Duration::from_secs(5), || {
            polls += 1;
            polls == 3
        })
        .unwrap();
        assert_eq!(polls, 3);
        let err = poll_until("never", Duration::from_millis(150), || false).unwrap_err();
        assert!(err.to_string().starts_with("never: not within"), "{err}");
    }
}
