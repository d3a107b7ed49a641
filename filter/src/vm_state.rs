//! State shared by the root context and every request of one VM (a VM runs on
//! one Envoy worker thread, so `Rc<RefCell<_>>` is enough).

use std::cell::RefCell;
use std::collections::VecDeque;
use std::rc::Rc;

use prost::Message;
use router_core::gateway::GatewayReport;

use router_core::routing::learned::LearnedTable;
use router_core::routing::LocalState;

use crate::config::ApproximateConfig;
use crate::host::Host;
use crate::metrics::WorkerCounters;
use crate::replica::FleetReplica;
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

/// Completions kept while no stream is open: beyond this the oldest are
/// dropped, and sidecars let those requests expire instead.
const MAX_UNSENT_COMPLETIONS: usize = 4_096;

/// Sends this VM's routing decisions and their progress on the state stream,
/// so the sidecar can share predicted load with every other gateway.
pub struct Reporter {
    gateway_id: String,
    /// The open state stream, if any.
    stream: Option<u32>,
    /// The sidecar answered on `stream`: Envoy opens a stream before it has
    /// a connection, and what is sent on one that never connects is lost.
    connected: bool,
    next_request: u64,
    /// Completions of reported requests that ended while no stream was
    /// connected.
    /// Every sidecar that heard of the decision (over NATS too) counts its
    /// load until it hears the completion or the request expires, minutes
    /// later; so they wait here for the next stream.
    unsent_completions: VecDeque<GatewayReport>,
}

impl Reporter {
    fn new(gateway_id: String) -> Self {
        Self {
            gateway_id,
            stream: None,
            connected: false,
            next_request: 0,
            unsent_completions: VecDeque::new(),
        }
    }

    pub fn gateway_id(&self) -> &str {
        &self.gateway_id
    }

    pub fn attach(&mut self, stream: u32) {
        self.stream = Some(stream);
        self.connected = false;
    }

    pub fn detach(&mut self) {
        self.stream = None;
        self.connected = false;
    }

    /// The sidecar answered on the stream: it is connected, and the
    /// completions kept meanwhile go out, oldest first. Returns how many.
    pub fn connected(&mut self, host: &impl Host) -> usize {
        if self.connected {
            return 0;
        }
        self.connected = true;
        let mut sent = 0;
        while let Some(report) = self.unsent_completions.front() {
            if !self.send(host, report) {
                break;
            }
            self.unsent_completions.pop_front();
            sent += 1;
        }
        sent
    }

    /// A request id unique within this gateway.
    pub fn next_request_id(&mut self) -> String {
        self.next_request += 1;
        format!("{}-{}", self.gateway_id, self.next_request)
    }

    /// Sends a request's completion on a connected stream, or keeps it
    /// until one is; false when it was kept.
    pub fn send_completion(&mut self, host: &impl Host, report: GatewayReport) -> bool {
        if self.connected && self.send(host, &report) {
            return true;
        }
        if self.unsent_completions.len() == MAX_UNSENT_COMPLETIONS {
            self.unsent_completions.pop_front();
        }
        self.unsent_completions.push_back(report);
        false
    }

    /// Sends one report; false when no stream is open or the host refused it.
    pub fn send(&self, host: &impl Host, report: &GatewayReport) -> bool {
        let Some(stream) = self.stream else {
            return false;
        };
        let bytes = report.encode_to_vec();
        match host.send_grpc_stream_message(stream, &bytes) {
            Ok(()) => true,
            Err(err) => {
                log::debug!("cannot send a gateway report: {err}");
                false
            }
        }
    }
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
