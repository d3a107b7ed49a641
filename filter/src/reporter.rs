//! This VM's reports to its sidecar on the state stream: each routing
//! decision and its progress, so every sidecar (and through them every
//! gateway) counts this VM's requests as load; and, when a sidecar first
//! answers on a new stream and every minute after, the whole set of requests
//! still open (`GatewayResync`), so what a broken stream or a lost shared
//! report left wrong, or a restarted sidecar never heard, is made right
//! instead of counting wrong for minutes.

use std::collections::HashMap;

use prost::Message;
use router_core::gateway::{
    gateway_report, GatewayHello, GatewayReport, GatewayResync, OpenRequest, RequestPhase,
    RequestProgress, RoutingDecision,
};

use crate::host::Host;

/// Most requests one resync message carries. An entry takes 100–250 bytes
/// (ids, model and worker names), and sidecars share the message on NATS,
/// whose default payload limit is 1 MiB.
const RESYNC_CHUNK: usize = 1_024;

/// How often a connected stream is told the open requests again: what a
/// lost or late shared report left wrong on some sidecar lasts at most this.
pub const RESYNC_INTERVAL_MS: u64 = 60_000;

pub struct Reporter {
    gateway_id: String,
    /// The open state stream, if any.
    stream: Option<u32>,
    /// When the sidecar was last told the open requests on `stream`: none
    /// until it first answers there (Envoy opens a stream before it has a
    /// connection, and what is sent on one that never connects is lost).
    resynced_at_ms: Option<u64>,
    next_request: u64,
    /// Requests routed and not finished, by request id: what sidecars should
    /// count for this gateway. One per live request, so bounded by Envoy's
    /// streams.
    open: HashMap<String, OpenRequest>,
}

impl Reporter {
    pub fn new(gateway_id: String) -> Self {
        Self {
            gateway_id,
            stream: None,
            resynced_at_ms: None,
            next_request: 0,
            open: HashMap::new(),
        }
    }

    /// A new state stream: it names this gateway first.
    pub fn attach(&mut self, host: &impl Host, stream: u32) {
        self.stream = Some(stream);
        self.resynced_at_ms = None;
        let hello = GatewayReport {
            kind: Some(gateway_report::Kind::Hello(GatewayHello {
                gateway_id: self.gateway_id.clone(),
            })),
        };
        self.send(host, &hello);
    }

    pub fn detach(&mut self) {
        self.stream = None;
        self.resynced_at_ms = None;
    }

    /// The sidecar answered on the stream. The first time, and once
    /// `RESYNC_INTERVAL_MS` has passed since the last time, it is told every
    /// request still open, for each of `models` (an empty list too: it means
    /// none). Returns how many messages went out.
    pub fn connected<'m>(
        &mut self,
        host: &impl Host,
        models: impl IntoIterator<Item = &'m str>,
        now_ms: u64,
    ) -> usize {
        let due = self
            .resynced_at_ms
            .is_none_or(|last| now_ms.saturating_sub(last) >= RESYNC_INTERVAL_MS);
        if !due {
            return 0;
        }
        self.resynced_at_ms = Some(now_ms);
        let mut sent = 0;
        for model in models {
            for resync in self.resyncs(model) {
                let report = GatewayReport {
                    kind: Some(gateway_report::Kind::Resync(resync)),
                };
                if !self.send(host, &report) {
                    return sent;
                }
                sent += 1;
            }
        }
        sent
    }

    /// The open requests of `model`, in parts of at most `RESYNC_CHUNK`;
    /// always at least one.
    fn resyncs(&self, model: &str) -> Vec<GatewayResync> {
        let open: Vec<&OpenRequest> = self
            .open
            .values()
            .filter(|request| {
                request
                    .decision
                    .as_ref()
                    .is_some_and(|decision| decision.model == model)
            })
            .collect();
        let parts = open.len().div_ceil(RESYNC_CHUNK).max(1);
        let mut chunks = open.chunks(RESYNC_CHUNK);
        (0..parts)
            .map(|part| GatewayResync {
                model: model.to_owned(),
                requests: chunks
                    .next()
                    .unwrap_or_default()
                    .iter()
                    .map(|&request| request.clone())
                    .collect(),
                part: part as u32,
                parts: parts as u32,
            })
            .collect()
    }

    /// A request id unique within this gateway.
    pub fn next_request_id(&mut self) -> String {
        self.next_request += 1;
        format!("{}-{}", self.gateway_id, self.next_request)
    }

    /// A request was routed: it is open until [`progressed`](Self::progressed)
    /// says it is done. Returns whether the report went out now; if not, the
    /// next stream's resync carries it.
    pub fn decided(&mut self, host: &impl Host, mut decision: RoutingDecision) -> bool {
        // Kept without the prompt's strides: only the sidecars' load needs it.
        let computing = std::mem::take(&mut decision.computing);
        let open = decision.clone();
        decision.computing = computing;
        self.open.insert(
            decision.request_id.clone(),
            OpenRequest {
                decision: Some(open),
                first_token: false,
            },
        );
        self.send(
            host,
            &GatewayReport {
                kind: Some(gateway_report::Kind::Decision(decision)),
            },
        )
    }

    /// A routed request got its first token or ended. Returns whether the
    /// report went out now; if not, the next stream's resync says it.
    pub fn progressed(&mut self, host: &impl Host, progress: RequestProgress) -> bool {
        match progress.phase() {
            RequestPhase::FirstToken => {
                if let Some(open) = self.open.get_mut(&progress.request_id) {
                    open.first_token = true;
                }
            }
            RequestPhase::Done => {
                self.open.remove(&progress.request_id);
            }
            RequestPhase::Unspecified => {}
        }
        self.send(
            host,
            &GatewayReport {
                kind: Some(gateway_report::Kind::Progress(progress)),
            },
        )
    }

    /// Sends one report; false when no stream is open or the host refused it.
    fn send(&self, host: &impl Host, report: &GatewayReport) -> bool {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::host::mock::MockHost;

    fn decision(model: &str, id: &str) -> RoutingDecision {
        RoutingDecision {
            model: model.into(),
            request_id: id.into(),
            worker_id: "w".into(),
            prefill_worker_id: String::new(),
            prompt_blocks: 4,
            cached_blocks: 1,
            prefill_tokens: 48,
            computing: vec![7],
        }
    }

    fn progress(id: &str, phase: RequestPhase) -> RequestProgress {
        RequestProgress {
            model: "m".into(),
            request_id: id.into(),
            phase: phase as i32,
        }
    }

    fn sent(host: &MockHost) -> Vec<gateway_report::Kind> {
        host.recorded()
            .grpc_messages
            .iter()
            .filter_map(|(_, bytes)| GatewayReport::decode(bytes.as_slice()).ok()?.kind)
            .collect()
    }

    fn resyncs(host: &MockHost) -> Vec<GatewayResync> {
        sent(host)
            .into_iter()
            .filter_map(|kind| match kind {
                gateway_report::Kind::Resync(resync) => Some(resync),
                _ => None,
            })
            .collect()
    }

    fn ids(resync: &GatewayResync) -> Vec<(String, bool)> {
        let mut ids: Vec<(String, bool)> = resync
            .requests
            .iter()
            .map(|r| {
                let id = r.decision.as_ref().map(|d| d.request_id.clone());
                (id.unwrap_or_default(), r.first_token)
            })
            .collect();
        ids.sort();
        ids
    }

    #[test]
    fn a_connected_stream_is_told_every_open_request_of_every_model() {
        let host = MockHost::default();
        let mut reporter = Reporter::new("gw".into());
        // Routed while no stream was open: nothing goes out yet.
        assert!(!reporter.decided(&host, decision("m", "r1")));
        assert!(!reporter.decided(&host, decision("m", "r2")));
        assert!(!reporter.decided(&host, decision("m", "r3")));
        assert!(!reporter.progressed(&host, progress("r2", RequestPhase::FirstToken)));
        assert!(!reporter.progressed(&host, progress("r3", RequestPhase::Done)));
        assert!(sent(&host).is_empty());

        reporter.attach(&host, 4);
        assert!(
            matches!(sent(&host).as_slice(), [gateway_report::Kind::Hello(h)] if h.gateway_id == "gw")
        );
        // Not connected yet: the resync waits for the sidecar's answer.
        assert!(resyncs(&host).is_empty());
        assert_eq!(reporter.connected(&host, ["m", "other"], 1_000), 2);
        assert_eq!(reporter.connected(&host, ["m", "other"], 2_000), 0);
        let resyncs = resyncs(&host);
        let [mine, other] = resyncs.as_slice() else {
            panic!("{resyncs:?}");
        };
        assert_eq!((mine.model.as_str(), mine.part, mine.parts), ("m", 0, 1));
        assert_eq!(
            ids(mine),
            [("r1".to_owned(), false), ("r2".to_owned(), true)]
        );
        assert!(mine
            .requests
            .iter()
            .all(|r| r.decision.as_ref().is_some_and(|d| d.computing.is_empty())));
        // A model with nothing open is told so: its old requests ended.
        assert_eq!((other.model.as_str(), other.requests.len()), ("other", 0));

        // Connected: reports go out as they happen.
        assert!(reporter.progressed(&host, progress("r1", RequestPhase::Done)));
        reporter.detach();
        reporter.attach(&host, 5);
        reporter.connected(&host, ["m"], 3_000);
        let last = self::resyncs(&host).pop().unwrap();
        assert_eq!(ids(&last), [("r2".to_owned(), true)]);
        // The decision itself goes out whole, strides included.
        assert!(reporter.decided(&host, decision("m", "r4")));
        assert!(
            matches!(sent(&host).last(), Some(gateway_report::Kind::Decision(d)) if d.computing == [7])
        );
        // And the open requests again once a minute.
        let count = self::resyncs(&host).len();
        let later = 3_000 + RESYNC_INTERVAL_MS;
        assert_eq!(reporter.connected(&host, ["m"], later - 1), 0);
        assert_eq!(reporter.connected(&host, ["m"], later), 1);
        let again = self::resyncs(&host);
        assert_eq!(again.len(), count + 1);
        assert_eq!(again.last().map(ids).unwrap().len(), 2);
    }

    /// Sidecars share each part on NATS, whose default payload limit is
    /// 1 MiB: a full part with long names stays well under it.
    #[test]
    fn a_full_part_fits_a_nats_message() {
        let long = |prefix: &str| format!("{prefix}-{}", "x".repeat(60));
        let request = OpenRequest {
            decision: Some(RoutingDecision {
                model: long("model"),
                request_id: long("envoy-vm-0123456789abcdef-123456789"),
                worker_id: long("worker"),
                prefill_worker_id: long("prefill"),
                prompt_blocks: u32::MAX,
                cached_blocks: u32::MAX,
                prefill_tokens: u64::MAX,
                computing: Vec::new(),
            }),
            first_token: true,
        };
        let part = GatewayResync {
            model: long("model"),
            requests: vec![request; RESYNC_CHUNK],
            part: u32::MAX,
            parts: u32::MAX,
        };
        let report = GatewayReport {
            kind: Some(gateway_report::Kind::Resync(part)),
        };
        assert!(report.encoded_len() < 512 << 10, "{}", report.encoded_len());
    }

    #[test]
    fn a_long_resync_is_sent_in_chunks() {
        let host = MockHost::default();
        let mut reporter = Reporter::new("gw".into());
        let count = 2 * RESYNC_CHUNK + 1;
        for i in 0..count {
            reporter.decided(&host, decision("m", &format!("r{i}")));
        }
        reporter.attach(&host, 4);
        assert_eq!(reporter.connected(&host, ["m"], 0), 3);
        let resyncs = resyncs(&host);
        let shape: Vec<(usize, u32, u32)> = resyncs
            .iter()
            .map(|r| (r.requests.len(), r.part, r.parts))
            .collect();
        assert_eq!(
            shape,
            [(RESYNC_CHUNK, 0, 3), (RESYNC_CHUNK, 1, 3), (1, 2, 3)]
        );
        let all: std::collections::HashSet<String> =
            resyncs.iter().flat_map(ids).map(|(id, _)| id).collect();
        assert_eq!(all.len(), count);
    }
}
