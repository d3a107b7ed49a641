//! State shared by the root context and every request of one VM (a VM runs on
//! one Envoy worker thread, so `Rc<RefCell<_>>` is enough).

use std::cell::RefCell;
use std::rc::Rc;

use crate::inflight::InFlight;
use crate::replica::FleetReplica;
use crate::routing::Scratch;

pub type SharedVmState = Rc<RefCell<VmState>>;

pub struct VmState {
    /// `None` when no sidecar is configured.
    pub replica: Option<FleetReplica>,
    pub inflight: InFlight,
    pub scratch: Scratch,
    rng: u64,
}

impl VmState {
    pub fn new(replica: Option<FleetReplica>, seed: u64) -> Self {
        Self {
            replica,
            inflight: InFlight::default(),
            scratch: Scratch::default(),
            // xorshift must not start at zero.
            rng: seed | 1,
        }
    }

    /// xorshift64*: fast, and good enough to break ties and sample choices.
    pub fn next_random(&mut self) -> u64 {
        self.rng ^= self.rng >> 12;
        self.rng ^= self.rng << 25;
        self.rng ^= self.rng >> 27;
        self.rng.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}
