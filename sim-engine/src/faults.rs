//! Fault injection, set by flags at start and changed at runtime through
//! `POST /sim/faults`, so tests can make a worker misbehave on cue.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Mutex;

use clap::Args;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Default, PartialEq, Args, Serialize)]
pub struct FaultSettings {
    /// Fraction (0..=1) of requests answered with an OpenAI-shaped HTTP 500.
    #[arg(long = "fault-error-rate", default_value_t = 0.0)]
    pub error_rate: f64,
    /// Real milliseconds added before every API response.
    #[arg(long = "fault-added-latency-ms", default_value_t = 0)]
    pub added_latency_ms: u64,
    /// Exit the process (status 1) when request number N+1 arrives.
    #[arg(long = "fault-crash-after")]
    pub crash_after: Option<u64>,
    /// Hold KV event batches (still numbered and buffered for replay) and
    /// send them when publishing resumes.
    #[arg(long = "fault-pause-events")]
    pub pause_events: bool,
    /// Do not send every k-th event batch. Its seq is still used, so
    /// subscribers see a gap, and replay still serves it.
    #[arg(long = "fault-drop-every")]
    pub drop_every: Option<u64>,
}

/// A partial update from `POST /sim/faults`; absent fields keep their value,
/// `null` clears the optional ones.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FaultUpdate {
    pub error_rate: Option<f64>,
    pub added_latency_ms: Option<u64>,
    #[serde(default, with = "double_option")]
    pub crash_after: Option<Option<u64>>,
    pub pause_events: Option<bool>,
    #[serde(default, with = "double_option")]
    pub drop_every: Option<Option<u64>>,
    /// An action, not a setting: before its next batch the publisher closes
    /// its PUB socket and binds a new one on the same address, so
    /// subscribers lose their connection while the engine, its seq and its
    /// replay buffer go on.
    #[serde(default)]
    pub rebind_events: bool,
}

/// Distinguishes a missing field (no change) from an explicit `null` (clear).
mod double_option {
    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D, T>(deserializer: D) -> Result<Option<Option<T>>, D::Error>
    where
        D: Deserializer<'de>,
        T: Deserialize<'de>,
    {
        Option::<T>::deserialize(deserializer).map(Some)
    }
}

impl FaultSettings {
    pub fn validate(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            (0.0..=1.0).contains(&self.error_rate),
            "fault error rate must be within 0..=1"
        );
        anyhow::ensure!(
            self.drop_every != Some(0),
            "fault drop-every must be at least 1"
        );
        Ok(())
    }

    fn apply(&self, update: FaultUpdate) -> FaultSettings {
        let mut next = self.clone();
        if let Some(rate) = update.error_rate {
            next.error_rate = rate;
        }
        if let Some(ms) = update.added_latency_ms {
            next.added_latency_ms = ms;
        }
        if let Some(crash) = update.crash_after {
            next.crash_after = crash;
        }
        if let Some(pause) = update.pause_events {
            next.pause_events = pause;
        }
        if let Some(drop) = update.drop_every {
            next.drop_every = drop;
        }
        next
    }
}

/// What the API must do with one arriving request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RequestFault {
    None,
    /// Answer HTTP 500.
    Error,
    /// Exit the process now.
    Crash,
}

/// Live fault state shared by the API and the event publisher.
#[derive(Debug)]
pub struct Faults {
    settings: Mutex<FaultSettings>,
    requests_seen: AtomicU64,
    rebind_requested: AtomicBool,
}

impl Faults {
    pub fn new(settings: FaultSettings) -> Self {
        Self {
            settings: Mutex::new(settings),
            requests_seen: AtomicU64::new(0),
            rebind_requested: AtomicBool::new(false),
        }
    }

    pub fn settings(&self) -> FaultSettings {
        self.settings
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Applies a runtime update, rejecting invalid values without changing anything.
    pub fn update(&self, update: FaultUpdate) -> anyhow::Result<FaultSettings> {
        let mut settings = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let rebind = update.rebind_events;
        let next = settings.apply(update);
        next.validate()?;
        *settings = next.clone();
        if rebind {
            self.rebind_requested.store(true, Ordering::Relaxed);
        }
        Ok(next)
    }

    /// Counts an arriving API request and decides its fault. The error draw is
    /// a hash of the request number, so a run is reproducible.
    pub fn on_request(&self) -> RequestFault {
        let number = self.requests_seen.fetch_add(1, Ordering::Relaxed) + 1;
        let settings = self.settings();
        if settings.crash_after.is_some_and(|n| number > n) {
            return RequestFault::Crash;
        }
        let draw = crate::determinism::unit_interval(crate::determinism::mix64(number));
        if draw < settings.error_rate {
            return RequestFault::Error;
        }
        RequestFault::None
    }

    /// True when the event batch numbered `seq` must not be sent on PUB.
    pub fn drops_batch(&self, seq: u64) -> bool {
        self.settings()
            .drop_every
            .is_some_and(|k| (seq + 1).is_multiple_of(k))
    }

    pub fn events_paused(&self) -> bool {
        self.settings().pause_events
    }

    /// True once after each `rebind_events` request.
    pub fn take_rebind(&self) -> bool {
        self.rebind_requested.swap(false, Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn update_changes_only_given_fields_and_null_clears() {
        let faults = Faults::new(FaultSettings {
            drop_every: Some(3),
            added_latency_ms: 5,
            ..FaultSettings::default()
        });
        let update: FaultUpdate = serde_json::from_str(r#"{"error_rate":0.5}"#).unwrap();
        let s = faults.update(update).unwrap();
        assert_eq!(
            (s.error_rate, s.drop_every, s.added_latency_ms),
            (0.5, Some(3), 5)
        );
        let update: FaultUpdate = serde_json::from_str(r#"{"drop_every":null}"#).unwrap();
        assert_eq!(faults.update(update).unwrap().drop_every, None);
        let bad: FaultUpdate = serde_json::from_str(r#"{"error_rate":2}"#).unwrap();
        assert!(faults.update(bad).is_err());
        assert_eq!(faults.settings().error_rate, 0.5);
    }

    #[test]
    fn drops_every_kth_batch_counting_from_one() {
        let faults = Faults::new(FaultSettings {
            drop_every: Some(3),
            ..FaultSettings::default()
        });
        let dropped: Vec<u64> = (0..9).filter(|s| faults.drops_batch(*s)).collect();
        assert_eq!(dropped, vec![2, 5, 8]);
    }

    #[test]
    fn crash_after_n_requests() {
        let faults = Faults::new(FaultSettings {
            crash_after: Some(2),
            ..FaultSettings::default()
        });
        assert_eq!(faults.on_request(), RequestFault::None);
        assert_eq!(faults.on_request(), RequestFault::None);
        assert_eq!(faults.on_request(), RequestFault::Crash);
    }

    #[test]
    fn error_rate_is_roughly_honoured() {
        let faults = Faults::new(FaultSettings {
            error_rate: 0.25,
            ..FaultSettings::default()
        });
        let errors = (0..4000)
            .filter(|_| faults.on_request() == RequestFault::Error)
            .count();
        assert!((800..1200).contains(&errors), "{errors}");
    }
}
