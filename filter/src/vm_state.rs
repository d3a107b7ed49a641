//! State shared by the root context and every request of one VM (a VM runs on
//! one Envoy worker thread, so `Rc<RefCell<_>>` is enough).

use std::cell::RefCell;
use std::rc::Rc;

use router_core::routing::learned::LearnedTable;
use router_core::routing::LocalState;

use crate::config::ApproximateConfig;
use crate::metrics::WorkerCounters;
use crate::replica::FleetReplica;
use crate::reporter::Reporter;
use router_core::routing::prompt_cache::PromptCache;

pub type SharedVmState = Rc<RefCell<VmState>>;

pub struct VmState {
    /// `None` when no sidecar is configured.
    pub replica: Option<FleetReplica>,
    /// What this VM observed itself: in-flight load, ORCA reports, workers
    /// that refused connections, where it sent which prefixes.
    pub router: LocalState,
    /// The sidecar's block hashes of recent chats, by message prefix.
    pub prompt_cache: PromptCache,
    /// Requests this VM routed to each worker.
    pub routed: WorkerCounters,
    /// Reports decisions back to the sidecar while the state stream is open.
    pub reporter: Reporter,
    rng: u64,
}

impl VmState {
    pub fn new(replica: Option<FleetReplica>, approximate: ApproximateConfig, seed: u64) -> Self {
        Self {
            replica,
            router: LocalState::new(LearnedTable::new(
                approximate.table_entries,
                approximate.entry_ttl_ms,
            )),
            prompt_cache: PromptCache::default(),
            routed: WorkerCounters::default(),
            reporter: Reporter::new(format!("envoy-vm-{seed:016x}")),
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// A sidecar is configured and its state stream has gone quiet past the
    /// staleness limit (or never delivered).
    pub fn replica_is_stale(&self, now_ms: u64) -> bool {
        self.replica.as_ref().is_some_and(|r| r.is_stale(now_ms))
    }

    /// xorshift64*: fast, and good enough to break ties and sample choices.
    pub fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
