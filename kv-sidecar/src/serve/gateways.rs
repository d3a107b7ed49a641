//! Which gateways (filter VMs) have a state stream open on this sidecar. A
//! VM whose stream breaks while it lives opens another within its reconnect
//! backoff and resyncs its open requests; one that stays away past the
//! grace period is gone (Envoy died or dropped the VM), and so are its
//! requests, which would otherwise count as load until `inflight_ttl_ms`.

use std::collections::HashMap;
use std::time::{Duration, Instant};

enum Presence {
    /// Streams open under this gateway id: a VM's new stream can say hello
    /// before its broken one is seen to close.
    Open(u32),
    Closed {
        since: Instant,
    },
}

#[derive(Default)]
pub struct GatewayPresence {
    gateways: HashMap<String, Presence>,
}

impl GatewayPresence {
    /// A stream said hello as `gateway_id`.
    pub fn opened(&mut self, gateway_id: &str) {
        let presence = self
            .gateways
            .entry(gateway_id.to_owned())
            .or_insert(Presence::Open(0));
        *presence = match presence {
            Presence::Open(streams) => Presence::Open(streams.saturating_add(1)),
            Presence::Closed { .. } => Presence::Open(1),
        };
    }

    /// A stream that said hello as `gateway_id` ended.
    pub fn closed(&mut self, gateway_id: &str, now: Instant) {
        let Some(presence) = self.gateways.get_mut(gateway_id) else {
            return;
        };
        if let Presence::Open(streams) = presence {
            *streams = streams.saturating_sub(1);
            if *streams == 0 {
                *presence = Presence::Closed { since: now };
            }
        }
    }

    /// Whether a stream of `gateway_id` is open here.
    pub fn is_open(&self, gateway_id: &str) -> bool {
        matches!(self.gateways.get(gateway_id), Some(Presence::Open(_)))
    }

    /// Another sidecar shared a report of `gateway_id`: it lives, with its
    /// stream there. It is not gone, whatever its closed stream here says.
    pub fn heard_elsewhere(&mut self, gateway_id: &str) {
        if matches!(self.gateways.get(gateway_id), Some(Presence::Closed { .. })) {
            self.gateways.remove(gateway_id);
        }
    }

    /// Forgets and returns the gateways without a stream for longer than
    /// `grace` (sorted, so logs and shared messages come in a stable order).
    pub fn gone(&mut self, grace: Duration, now: Instant) -> Vec<String> {
        let mut gone: Vec<String> = self
            .gateways
            .iter()
            .filter(|(_, presence)| {
                matches!(presence, Presence::Closed { since } if now.duration_since(*since) > grace)
            })
            .map(|(id, _)| id.clone())
            .collect();
        for id in &gone {
            self.gateways.remove(id);
        }
        gone.sort_unstable();
        gone
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GRACE: Duration = Duration::from_secs(15);

    #[test]
    fn a_gateway_is_gone_only_after_a_whole_grace_without_a_stream() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut presence = GatewayPresence::default();
        presence.opened("a");
        presence.opened("b");
        presence.closed("a", at(1));
        presence.closed("b", at(1));
        // `b` reconnects in time; `a` does not.
        presence.opened("b");
        assert!(presence.gone(GRACE, at(16)).is_empty());
        assert_eq!(presence.gone(GRACE, at(17)), ["a"]);
        assert!(presence.gone(GRACE, at(100)).is_empty(), "said once");
        presence.closed("b", at(100));
        assert_eq!(presence.gone(GRACE, at(116)), ["b"]);
    }

    #[test]
    fn a_new_stream_that_said_hello_before_the_old_one_closed_keeps_it_present() {
        let start = Instant::now();
        let mut presence = GatewayPresence::default();
        presence.opened("a");
        presence.opened("a");
        presence.closed("a", start);
        assert!(presence.gone(GRACE, start + GRACE * 2).is_empty());
        presence.closed("a", start + GRACE);
        assert_eq!(presence.gone(GRACE, start + GRACE * 3), ["a"]);
    }

    #[test]
    fn a_gateway_heard_through_another_sidecar_is_not_gone() {
        let start = Instant::now();
        let mut presence = GatewayPresence::default();
        presence.opened("a");
        assert!(presence.is_open("a"));
        presence.closed("a", start);
        assert!(!presence.is_open("a"));
        // Its stream reopened on another sidecar, which shared a decision.
        presence.heard_elsewhere("a");
        assert!(presence.gone(GRACE, start + GRACE * 2).is_empty());
        presence.heard_elsewhere("never-here");
        assert!(!presence.is_open("never-here"));
    }

    #[test]
    fn a_stream_never_opened_is_not_tracked() {
        let start = Instant::now();
        let mut presence = GatewayPresence::default();
        presence.closed("stranger", start);
        assert!(presence.gone(GRACE, start + GRACE * 2).is_empty());
    }
}
