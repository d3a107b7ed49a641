//! Free loopback ports for the processes a test starts.
//!
//! Ports are picked below the kernel's ephemeral range when it leaves room.
//! A port the kernel hands out for `bind(0)` is also what it hands out for
//! any program's outgoing connections, so between our check and the
//! engine's own bind another process (vLLM's own sockets, a build's
//! downloads) could take it: a real vLLM once failed to bind its ZMQ event
//! port that way. Ports below the range are never handed out implicitly.

use rand::Rng;
use std::collections::HashSet;
use std::net::TcpListener;
use std::ops::Range;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// The lowest port picked: above the registered services a machine runs.
const LOWEST_PICKED: u16 = 10_000;
/// Below this many candidates the range is too crowded to pick from.
const FEWEST_CANDIDATES: u16 = 1_000;
/// Random tries before falling back to a kernel-chosen port.
const TRIES: usize = 1_000;

/// A loopback TCP port that is free now and not yet handed out by this process.
///
/// The port is released before the caller binds it, so another program could
/// take it in between; readiness checks catch that rare case loudly.
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let picked = below_ephemeral(ephemeral_range())
        .and_then(|candidates| pick_free_run(&candidates, 1, handed_out));
    if let Some(port) = picked {
        return port;
    }
    loop {
        let port = kernel_chosen_port();
        if handed_out.insert(port) {
            return port;
        }
    }
}

/// The first of `count` consecutive loopback ports that are free now and
/// not yet handed out, as an engine with data-parallel ranks binds its KV
/// event sockets at the configured port plus each rank.
pub fn free_consecutive_ports(count: u16) -> anyhow::Result<u16> {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    let candidates = below_ephemeral(ephemeral_range()).unwrap_or(LOWEST_PICKED..32_768);
    pick_free_run(&candidates, count, handed_out).ok_or_else(|| {
        anyhow::anyhow!("no {count} consecutive free loopback ports in {candidates:?}")
    })
}

/// A random run of `count` ports starting in `candidates`, each bindable and
/// none handed out yet; they are marked handed out.
fn pick_free_run(
    candidates: &Range<u16>,
    count: u16,
    handed_out: &mut HashSet<u16>,
) -> Option<u16> {
    let last_first = candidates.end.saturating_sub(count.saturating_sub(1));
    let firsts = candidates.start..last_first.max(candidates.start + 1);
    let mut rng = rand::rng();
    for _ in 0..TRIES {
        let first = rng.random_range(firsts.clone());
        let run = first..first.saturating_add(count);
        if run
            .clone()
            .all(|port| !handed_out.contains(&port) && bindable(port))
        {
            handed_out.extend(run);
            return Some(first);
        }
    }
    None
}

/// The kernel's ephemeral port range, if this is Linux and it can be read.
fn ephemeral_range() -> Option<(u16, u16)> {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|text| parse_port_range(&text))
}

/// `ip_local_port_range`'s two numbers (tab-separated in procfs).
fn parse_port_range(text: &str) -> Option<(u16, u16)> {
    let mut numbers = text.split_whitespace().map(str::parse::<u16>);
    match (numbers.next(), numbers.next(), numbers.next()) {
        (Some(Ok(low)), Some(Ok(high)), None) if low <= high => Some((low, high)),
        _ => None,
    }
}

/// The ports to pick from: from [`LOWEST_PICKED`] up to the ephemeral range,
/// if that leaves enough of them.
fn below_ephemeral(range: Option<(u16, u16)>) -> Option<Range<u16>> {
    let (ephemeral_low, _) = range?;
    (ephemeral_low.saturating_sub(LOWEST_PICKED) >= FEWEST_CANDIDATES)
        .then_some(LOWEST_PICKED..ephemeral_low)
}

fn bindable(port: u16) -> bool {
    TcpListener::bind(("127.0.0.1", port)).is_ok()
}

// Binding port 0 on loopback fails only when loopback is missing or out of
// ports, and then no test or tool can run at all: not worth a Result at
// every caller.
#[allow(clippy::expect_used)]
fn kernel_chosen_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("the kernel hands out an ephemeral loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_procfs_port_range() {
        assert_eq!(parse_port_range("32768\t60999\n"), Some((32768, 60999)));
        assert_eq!(parse_port_range("1024 65535"), Some((1024, 65535)));
        assert_eq!(parse_port_range("60999 32768"), None);
        assert_eq!(parse_port_range("32768"), None);
        assert_eq!(parse_port_range("32768 60999 1"), None);
        assert_eq!(parse_port_range("low high"), None);
    }

    #[test]
    fn picks_below_the_ephemeral_range_only_when_it_leaves_room() {
        assert_eq!(
            below_ephemeral(Some((32768, 60999))),
            Some(LOWEST_PICKED..32768)
        );
        assert_eq!(below_ephemeral(Some((10_999, 60999))), None);
        assert_eq!(below_ephemeral(Some((1024, 65535))), None);
        assert_eq!(below_ephemeral(None), None);
    }

    #[test]
    fn ports_are_distinct_free_and_outside_the_ephemeral_range() {
        let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
        let distinct: HashSet<u16> = ports.iter().copied().collect();
        assert_eq!(distinct.len(), ports.len());
        for &port in &ports {
            assert!(bindable(port), "port {port} was handed out but is taken");
        }
        if let Some(candidates) = below_ephemeral(ephemeral_range()) {
            for port in ports {
                assert!(candidates.contains(&port), "port {port} is ephemeral");
            }
        }
    }

    #[test]
    fn consecutive_ports_are_free_and_never_handed_out_again() {
        let first = free_consecutive_ports(4).unwrap();
        let run: HashSet<u16> = (first..first + 4).collect();
        assert!(run.iter().all(|port| bindable(*port)));
        let later: HashSet<u16> = (0..200).map(|_| free_port()).collect();
        assert!(later.is_disjoint(&run));
    }
}
