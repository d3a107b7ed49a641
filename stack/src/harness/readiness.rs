//! Waiting for started processes to become ready.

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
