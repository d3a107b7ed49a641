//! Free loopback ports for the processes a test starts.

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::Mutex;

static HANDED_OUT: Mutex<Option<HashSet<u16>>> = Mutex::new(None);

/// A loopback TCP port that is free now and not yet handed out by this process.
///
/// The port is released before the caller binds it, so another program could
/// take it in between; readiness checks catch that rare case loudly.
// Binding port 0 on loopback fails only when loopback is missing or out of
// ports, and then no test or tool can run at all: not worth a Result at
// every caller.
#[allow(clippy::expect_used)]
pub fn free_port() -> u16 {
    let mut handed_out = HANDED_OUT.lock().unwrap_or_else(|e| e.into_inner());
    let handed_out = handed_out.get_or_insert_with(HashSet::new);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("the kernel hands out an ephemeral loopback port");
        if handed_out.insert(port) {
            return port;
        }
    }
}
