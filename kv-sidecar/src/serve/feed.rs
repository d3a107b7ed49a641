//! Whether NATS delivers to this sidecar: the fleet is heard, or unheard
//! (its workers kept as last heard, every update marked `fleet_unheard`).
//! Pure, time passed in; the state task applies the transitions.
//!
//! The client's events alone are not trusted: a hung or cut-off server
//! drops no connection for seconds, and async-nats may drop an event when
//! its queue is full. So anything NATS delivers (a relay's message, our own
//! probe) proves the feed, and a silence of [`FEED_SILENCE`] while
//! connected loses it.

use std::time::{Duration, Instant};

/// Nothing heard this long (the probe comes every second) makes the fleet
/// unheard, so routers stop trusting a view that no longer changes.
pub const FEED_SILENCE: Duration = Duration::from_millis(2_000);

pub struct FeedHealth {
    connected: bool,
    /// When NATS was first reached.
    first_connected: Option<Instant>,
    /// Connected, but nothing arrived for [`FEED_SILENCE`].
    silent: bool,
    /// When NATS last delivered anything.
    last_heard: Instant,
}

/// What a registry must do after an input or a tick.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Unchanged,
    /// The fleet is unheard from now on.
    Lost,
    /// The fleet is heard again after `unheard_for` without it. `missed`:
    /// a (re)connect, after which what was published meanwhile is lost to
    /// us; after a mere silence the sequence numbers tell what is missing.
    Resumed {
        unheard_for: Duration,
        missed: bool,
    },
}

impl FeedHealth {
    /// Not connected yet: unheard.
    pub fn new(now: Instant) -> Self {
        Self {
            connected: false,
            first_connected: None,
            silent: false,
            last_heard: now,
        }
    }

    pub fn is_heard(&self) -> bool {
        self.connected && !self.silent
    }

    /// When NATS was first reached: until then nothing was heard at all.
    pub fn first_connected(&self) -> Option<Instant> {
        self.first_connected
    }

    /// When NATS last delivered anything; a worker's silence counts only
    /// up to then.
    pub fn last_heard(&self) -> Instant {
        self.last_heard
    }

    /// The client says it (re)connected.
    pub fn connected(&mut self, now: Instant) -> Transition {
        let unheard_for = if self.is_heard() {
            Duration::ZERO
        } else {
            now.saturating_duration_since(self.last_heard)
        };
        self.connected = true;
        self.first_connected.get_or_insert(now);
        self.silent = false;
        self.last_heard = now;
        // Even without a disconnect seen, a reconnect may have lost messages.
        Transition::Resumed {
            unheard_for,
            missed: true,
        }
    }

    /// The client says the connection dropped.
    pub fn disconnected(&mut self) -> Transition {
        let was_heard = self.is_heard();
        self.connected = false;
        if was_heard {
            Transition::Lost
        } else {
            Transition::Unchanged
        }
    }

    /// NATS delivered something.
    pub fn heard(&mut self, now: Instant) -> Transition {
        if !self.connected {
            // A delivery proves a connection whose event never came.
            return self.connected(now);
        }
        let unheard_for = now.saturating_duration_since(self.last_heard);
        self.last_heard = now;
        if self.silent {
            self.silent = false;
            return Transition::Resumed {
                unheard_for,
                missed: false,
            };
        }
        Transition::Unchanged
    }

    /// Looks for a silence.
    pub fn tick(&mut self, now: Instant) -> Transition {
        if self.is_heard() && now.saturating_duration_since(self.last_heard) > FEED_SILENCE {
            self.silent = true;
            return Transition::Lost;
        }
        Transition::Unchanged
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(start: Instant, ms: u64) -> Instant {
        start + Duration::from_millis(ms)
    }

    #[test]
    fn a_silence_while_connected_loses_the_fleet_and_a_delivery_resumes_it() {
        let start = Instant::now();
        let mut feed = FeedHealth::new(start);
        assert!(!feed.is_heard() && feed.first_connected().is_none());
        assert!(matches!(
            feed.connected(at(start, 100)),
            Transition::Resumed { missed: true, .. }
        ));
        assert_eq!(feed.heard(at(start, 1_000)), Transition::Unchanged);
        assert_eq!(feed.tick(at(start, 3_000)), Transition::Unchanged);
        assert_eq!(feed.tick(at(start, 3_001)), Transition::Lost);
        assert_eq!(feed.tick(at(start, 9_000)), Transition::Unchanged, "once");
        assert_eq!(feed.last_heard(), at(start, 1_000));
        assert_eq!(
            feed.heard(at(start, 10_000)),
            Transition::Resumed {
                unheard_for: Duration::from_secs(9),
                missed: false
            }
        );
        assert!(feed.is_heard());
    }

    #[test]
    fn a_delivery_proves_a_connection_whose_event_was_lost() {
        let start = Instant::now();
        let mut feed = FeedHealth::new(start);
        feed.connected(start);
        assert_eq!(feed.disconnected(), Transition::Lost);
        assert_eq!(feed.disconnected(), Transition::Unchanged);
        // The Connected event was dropped; our probe comes back.
        assert_eq!(
            feed.heard(at(start, 5_000)),
            Transition::Resumed {
                unheard_for: Duration::from_secs(5),
                missed: true
            }
        );
        assert!(feed.is_heard());
        // The late event changes nothing a registry would undo.
        assert_eq!(
            feed.connected(at(start, 5_100)),
            Transition::Resumed {
                unheard_for: Duration::ZERO,
                missed: true
            }
        );
    }

    #[test]
    fn a_disconnect_during_a_silence_is_already_lost() {
        let start = Instant::now();
        let mut feed = FeedHealth::new(start);
        feed.connected(start);
        assert_eq!(feed.tick(at(start, 2_500)), Transition::Lost);
        assert_eq!(feed.disconnected(), Transition::Unchanged);
        assert!(matches!(
            feed.connected(at(start, 4_000)),
            Transition::Resumed { missed: true, unheard_for } if unheard_for == Duration::from_secs(4)
        ));
    }
}
