//! vLLM / SGLang event source: a ZMQ SUB on the engine's PUB socket, with gap
//! repair from the engine's replay ROUTER (docs/relay.md#input-formats-srcdecode).
//!
//! Frames are `[topic, seq (8-byte big-endian), msgpack batch]`. Sequence
//! handling, with `expected` the seq after the last one applied:
//! - first batch this relay sees: replay `[0, seq)` so a relay started next
//!   to a running engine still learns what the engine's buffer remembers;
//! - `seq == expected`: apply;
//! - `seq > expected`: a gap; replay exactly `[expected, seq)`, or publish a
//!   reset when the replay cannot deliver all of it;
//! - `seq < expected`, or any jump right after the connection dropped: the
//!   engine restarted (its seq starts at 0 again); reset, then replay what the
//!   new engine already published;
//! - after a lost connection the replay buffer is asked at once: when it
//!   still holds the last batch applied, byte for byte, the same engine's
//!   stream goes on and only what was missed is applied, without a reset.
//!
//! A batch that does not decode (live or replayed) is skipped and counted in
//! `decode_errors_total`; the sequence goes on past it. Replaying it again
//! would return the same bytes, and a reset would throw away the whole view
//! to lose the same events.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use router_core::protocol::ResetReason;
use thiserror::Error;
use tokio::sync::mpsc;
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use crate::decode::vllm::{decode_batch, Dialect};
use crate::decode::{EngineEvent, EventBatch};
use crate::relay::backoff::Backoff;
use crate::relay::metrics::RelayMetrics;
use crate::relay::pipeline::SourceMsg;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for one replay frame; the engine answers from memory.
const REPLAY_FRAME_TIMEOUT: Duration = Duration::from_secs(2);
/// Time for a new subscription to reach the engine's PUB socket before the
/// relay catches up through replay (ZMQ drops what a PUB sends before then).
const SUBSCRIBE_SETTLE: Duration = Duration::from_millis(200);
/// Upper bound on batches taken from one replay, so a confused engine cannot
/// keep the relay replaying forever (vLLM buffers 10,000 by default).
const MAX_REPLAY_BATCHES: u64 = 100_000;

#[derive(Debug, Error)]
pub enum ReplayError {
    #[error("no --zmq-replay-endpoint configured")]
    NotConfigured,
    #[error("replay socket: {0}")]
    Zmq(#[from] zeromq::ZmqError),
    #[error("replay timed out")]
    Timeout,
    #[error("replay reply has {frames} frames; expected [\"\", topic, seq, payload], [\"\", seq, payload] or [seq, payload]")]
    FrameCount { frames: usize },
    #[error("replay reply's sequence frame is {len} bytes, not 8")]
    BadSeq { len: usize },
    #[error("replay request could not be built")]
    Request,
}

/// One reply of the engine's replay ROUTER, seen by a DEALER: vLLM < 0.26
/// and SGLang < 0.5.22 send `["", seq, payload]`, later versions
/// `["", topic, seq, payload]`; both end with seq −1. Seq and payload are the
/// last two frames.
fn replay_reply(mut frames: Vec<Bytes>) -> Result<(i64, Bytes), ReplayError> {
    let count = frames.len();
    if !(2..=4).contains(&count) {
        return Err(ReplayError::FrameCount { frames: count });
    }
    let payload = frames
        .pop()
        .ok_or(ReplayError::FrameCount { frames: count })?;
    let seq = frames
        .pop()
        .ok_or(ReplayError::FrameCount { frames: count })?;
    let seq = parse_seq(&seq).ok_or(ReplayError::BadSeq { len: seq.len() })?;
    Ok((seq, payload))
}

/// What a replay delivered: the decodable batches of the contiguous run of
/// seqs `first..=last` the engine still buffered, and every one's digest.
#[derive(Default)]
struct Replayed {
    batches: Vec<(u64, EventBatch)>,
    digests: Vec<u64>,
    first: Option<u64>,
    last: Option<u64>,
}

impl Replayed {
    /// True when it holds exactly `[from, until)`.
    fn covers(&self, from: u64, until: u64) -> bool {
        self.first == Some(from) && self.last.map(|l| l + 1) == Some(until)
    }

    /// The replayed batch `seq`, as its digest.
    fn applied_at(&self, seq: u64) -> Option<Applied> {
        let index = usize::try_from(seq.checked_sub(self.first?)?).ok()?;
        let digest = *self.digests.get(index)?;
        Some(Applied { seq, digest })
    }

    fn last_applied(&self) -> Option<Applied> {
        self.applied_at(self.last?)
    }

    /// The decodable batches after `seq` (all of them for `None`).
    fn batches_after(self, seq: Option<u64>) -> Vec<EventBatch> {
        self.batches
            .into_iter()
            .filter(|(s, _)| seq.is_none_or(|seq| *s > seq))
            .map(|(_, batch)| batch)
            .collect()
    }
}

/// The last batch applied: its seq and a digest of its payload, which tells
/// the same engine's stream, picked up again after a lost connection, from
/// a restarted engine's (whose batch of that seq is another one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Applied {
    seq: u64,
    digest: u64,
}

fn digest(payload: &[u8]) -> u64 {
    xxhash_rust::xxh3::xxh3_64(payload)
}

pub struct ZmqSource {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    /// The data-parallel rank whose batches are this worker's; a batch
    /// stamped with another rank is skipped and counted.
    pub data_parallel_rank: Option<u32>,
    pub topic: String,
    pub dialect: Dialect,
    pub metrics: RelayMetrics,
    pub tx: mpsc::Sender<SourceMsg>,
}

/// Sequence state across reconnects of the SUB socket.
#[derive(Default)]
struct SeqState {
    expected: Option<u64>,
    peer_lost: bool,
    /// Set after a catch-up replay: live messages the replay already covered
    /// (seq below `expected`) are duplicates, not a restart — a restart would
    /// have broken the connection first.
    replayed: bool,
    last_applied: Option<Applied>,
}

impl ZmqSource {
    /// Runs until the pipeline goes away.
    pub async fn run(self) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        let mut state = SeqState::default();
        loop {
            let mut options = SocketOptions::default();
            options.connect_timeout(CONNECT_TIMEOUT);
            let mut socket = SubSocket::with_options(options);
            let mut monitor = socket.monitor();
            if let Err(error) = socket.connect(&self.endpoint).await {
                self.metrics.engine_connected.set(0);
                let delay = backoff.next_delay();
                tracing::warn!(%error, endpoint = %self.endpoint, ?delay, "engine event socket unreachable");
                tokio::time::sleep(delay).await;
                continue;
            }
            if let Err(error) = socket.subscribe(&self.topic).await {
                tracing::warn!(%error, "subscribing to engine events failed");
                tokio::time::sleep(backoff.next_delay()).await;
                continue;
            }
            self.metrics.engine_connected.set(1);
            backoff.reset();
            tracing::info!(endpoint = %self.endpoint, "subscribed to engine KV events");
            if state.peer_lost && !self.catch_up(&mut state).await {
                return;
            }
            loop {
                tokio::select! {
                    Some(event) = monitor.next() => {
                        if let SocketEvent::Disconnected(_) = event {
                            // What comes next may be a restarted engine. A
                            // fresh socket, not zeromq's own reconnect: with
                            // zeromq 0.7 a reconnected SUB stayed silent.
                            state.peer_lost = true;
                            self.metrics.engine_connected.set(0);
                            tracing::warn!("engine event socket disconnected; reconnecting");
                            break;
                        }
                    }
                    received = socket.recv() => match received {
                        Ok(message) => {
                            if !self.on_message(message, &mut state).await {
                                return;
                            }
                        }
                        Err(error) => {
                            tracing::warn!(%error, "engine event socket failed; reconnecting");
                            state.peer_lost = true;
                            break;
                        }
                    },
                }
            }
        }
    }

    /// After losing the engine: whatever comes back may be a restarted engine
    /// whose first events were published before this subscription reached it
    /// and are lost to PUB/SUB; if it then goes idle nothing would ever reveal
    /// the restart. So ask the engine's replay buffer right away: if it still
    /// holds the last batch applied, unchanged, the same engine's stream goes
    /// on and only what was missed is applied; otherwise the view is rebuilt
    /// from the buffer (blocks stored before it stay unknown until stored
    /// again). Returns false once the pipeline is gone.
    async fn catch_up(&self, state: &mut SeqState) -> bool {
        if self.replay_endpoint.is_none() {
            return true;
        }
        tokio::time::sleep(SUBSCRIBE_SETTLE).await;
        let replayed = match self.replay(0, u64::MAX).await {
            Ok(replayed) => replayed,
            Err(error) => {
                // The live stream will show what happened (seq going back).
                self.metrics.replay("failed");
                tracing::warn!(%error, "catch-up replay after reconnect failed");
                return true;
            }
        };
        self.metrics.replay("ok");
        // The same stream, picked up again: everything up to this is applied.
        let resume_after = state
            .last_applied
            .filter(|last| replayed.applied_at(last.seq) == Some(*last))
            .map(|last| last.seq);
        match resume_after {
            Some(seq) => tracing::info!(
                missed = replayed.last.map_or(0, |l| l.saturating_sub(seq)),
                "reconnected to the same engine's event stream; applying what was missed"
            ),
            None => {
                tracing::info!(
                    batches = replayed.batches.len(),
                    "rebuilding the worker's view after reconnecting"
                );
                if !self
                    .send(SourceMsg::Reset(ResetReason::EngineRestarted))
                    .await
                {
                    return false;
                }
                if replayed.first.is_some_and(|first| first != 0) {
                    tracing::info!(
                        "engine's replay buffer no longer reaches seq 0; older blocks stay unknown"
                    );
                }
            }
        }
        state.expected = replayed.last.map(|last| last + 1);
        state.last_applied = replayed.last_applied();
        state.peer_lost = state.expected.is_none();
        state.replayed = state.expected.is_some();
        self.emit_all(replayed.batches_after(resume_after)).await
    }

    /// Returns false once the pipeline is gone.
    async fn on_message(&self, message: ZmqMessage, state: &mut SeqState) -> bool {
        let Some((seq, payload)) = split_frames(message) else {
            self.metrics.decode_errors.inc();
            tracing::warn!("engine message without a valid sequence frame skipped");
            return true;
        };
        self.metrics.mark_event_received();
        let decoded = decode_batch(&payload, self.dialect);
        match state.expected {
            None => {
                if seq > 0 && !self.fill_history(seq).await {
                    return false;
                }
            }
            Some(expected) if seq == expected => {}
            Some(expected) if seq < expected && state.replayed => {
                // Already applied through the catch-up replay.
                return true;
            }
            Some(expected) if seq > expected && !state.peer_lost => {
                self.metrics.gaps.inc();
                tracing::warn!(
                    expected,
                    got = seq,
                    "gap in engine event sequence; replaying"
                );
                match self.replay(expected, seq).await {
                    Ok(replayed) if replayed.covers(expected, seq) => {
                        self.metrics.replay("ok");
                        if !self.emit_all(replayed.batches_after(None)).await {
                            return false;
                        }
                    }
                    outcome => {
                        self.metrics.replay("failed");
                        match outcome {
                            Err(error) => {
                                tracing::warn!(%error, "replay failed; resetting the worker's view")
                            }
                            Ok(_) => {
                                tracing::warn!("replay incomplete; resetting the worker's view")
                            }
                        }
                        if !self.send(SourceMsg::Reset(ResetReason::EventsLost)).await {
                            return false;
                        }
                    }
                }
            }
            Some(expected) => {
                tracing::warn!(
                    expected,
                    got = seq,
                    peer_lost = state.peer_lost,
                    "engine restarted"
                );
                if !self
                    .send(SourceMsg::Reset(ResetReason::EngineRestarted))
                    .await
                {
                    return false;
                }
                if seq > 0 && !self.fill_history(seq).await {
                    return false;
                }
            }
        }
        state.expected = Some(seq.saturating_add(1));
        state.last_applied = Some(Applied {
            seq,
            digest: digest(&payload),
        });
        state.peer_lost = false;
        state.replayed = false;
        match decoded {
            Ok(batch) => self.emit(batch).await,
            Err(error) => {
                self.metrics.decode_errors.inc();
                tracing::warn!(%error, seq, "undecodable engine batch skipped");
                true
            }
        }
    }

    /// Replays `[0, until)` from the engine's buffer, applying whatever
    /// contiguous tail it still holds. Returns false once the pipeline is gone.
    async fn fill_history(&self, until: u64) -> bool {
        if self.replay_endpoint.is_none() {
            return true;
        }
        match self.replay(0, until).await {
            Ok(replayed) => {
                self.metrics.replay("ok");
                if replayed.first != Some(0) {
                    tracing::info!(
                        "engine's replay buffer no longer reaches seq 0; older blocks stay unknown"
                    );
                }
                if !self.emit_all(replayed.batches_after(None)).await {
                    return false;
                }
            }
            Err(error) => {
                self.metrics.replay("failed");
                tracing::warn!(%error, "history replay failed; older blocks stay unknown");
            }
        }
        true
    }

    /// Asks the replay ROUTER for batches from `from`, keeping those below
    /// `until` that follow each other without a hole. A batch that does not
    /// decode is skipped and counted; the ones after it are still kept.
    async fn replay(&self, from: u64, until: u64) -> Result<Replayed, ReplayError> {
        let endpoint = self
            .replay_endpoint
            .as_deref()
            .ok_or(ReplayError::NotConfigured)?;
        let mut options = SocketOptions::default();
        options.connect_timeout(REPLAY_FRAME_TIMEOUT);
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await?;
        let request: Vec<Bytes> = vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())];
        let request = ZmqMessage::try_from(request).map_err(|_| ReplayError::Request)?;
        dealer.send(request).await?;
        let mut replayed = Replayed::default();
        for _ in 0..MAX_REPLAY_BATCHES {
            let reply = tokio::time::timeout(REPLAY_FRAME_TIMEOUT, dealer.recv())
                .await
                .map_err(|_| ReplayError::Timeout)??;
            let (seq, payload) = replay_reply(reply.into_vec())?;
            let Ok(seq) = u64::try_from(seq) else {
                break; // the end marker
            };
            if seq < from {
                continue;
            }
            if seq >= until {
                break;
            }
            if replayed.last.is_some_and(|last| seq != last + 1) {
                // A hole inside the replay: only what follows it is usable.
                replayed = Replayed::default();
            }
            replayed.first.get_or_insert(seq);
            replayed.last = Some(seq);
            replayed.digests.push(digest(&payload));
            match decode_batch(&payload, self.dialect) {
                Ok(batch) => replayed.batches.push((seq, batch)),
                Err(error) => {
                    self.metrics.decode_errors.inc();
                    tracing::warn!(%error, seq, "undecodable replayed batch skipped");
                }
            }
        }
        Ok(replayed)
    }

    async fn emit_all(&self, batches: Vec<EventBatch>) -> bool {
        for batch in batches {
            if !self.emit(batch).await {
                return false;
            }
        }
        true
    }

    async fn emit(&self, batch: EventBatch) -> bool {
        self.metrics.engine_batches.inc();
        if let (Some(rank), Some(stamped)) = (self.data_parallel_rank, batch.dp_rank) {
            if i64::from(rank) != stamped {
                // Every batch on a wrong endpoint is foreign: say so once.
                if self.metrics.foreign_rank_batches.get() == 0 {
                    tracing::warn!(
                        rank,
                        stamped,
                        endpoint = %self.endpoint,
                        "engine batches of another data-parallel rank are skipped: is --zmq-endpoint the engine's configured one?"
                    );
                }
                self.metrics.foreign_rank_batches.inc();
                return true;
            }
        }
        count_events(&self.metrics, &batch);
        self.send(SourceMsg::Batch(batch.events)).await
    }

    async fn send(&self, msg: SourceMsg) -> bool {
        self.tx.send(msg).await.is_ok()
    }
}

/// `[topic, seq, payload]`, or `[seq, payload]` from a publisher without topic.
fn split_frames(message: ZmqMessage) -> Option<(u64, Bytes)> {
    let frames = message.into_vec();
    let (seq, payload) = match frames.len() {
        3 => (&frames[1], &frames[2]),
        2 => (&frames[0], &frames[1]),
        _ => return None,
    };
    let seq = parse_seq(seq)?;
    u64::try_from(seq).ok().map(|seq| (seq, payload.clone()))
}

fn parse_seq(frame: &[u8]) -> Option<i64> {
    <[u8; 8]>::try_from(frame).ok().map(i64::from_be_bytes)
}

pub fn count_events(metrics: &RelayMetrics, batch: &EventBatch) {
    let (mut stored, mut removed, mut moved, mut cleared) = (0, 0, 0, 0);
    for event in &batch.events {
        match event {
            EngineEvent::Stored(_) => stored += 1,
            EngineEvent::Removed(_) => removed += 1,
            EngineEvent::Moved(_) => moved += 1,
            EngineEvent::AllCleared => cleared += 1,
        }
    }
    if batch.undecodable_events > 0 {
        metrics
            .decode_errors
            .inc_by(u64::from(batch.undecodable_events));
        tracing::warn!(
            events = batch.undecodable_events,
            "undecodable engine events skipped"
        );
    }
    for (kind, n) in [
        ("stored", stored),
        ("removed", removed),
        ("moved", moved),
        ("cleared", cleared),
        ("ignored", u64::from(batch.ignored_events)),
        ("undecodable", u64::from(batch.undecodable_events)),
    ] {
        if n > 0 {
            metrics.engine_event(kind, n);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frames(parts: &[&[u8]]) -> Vec<Bytes> {
        parts.iter().map(|p| Bytes::copy_from_slice(p)).collect()
    }

    #[test]
    fn replay_replies_of_every_layout() {
        let seq = 7u64.to_be_bytes();
        let end = (-1i64).to_be_bytes();
        // vLLM < 0.26, SGLang < 0.5.22: ["", seq, payload].
        let old = replay_reply(frames(&[b"", &seq, b"batch"])).unwrap();
        // vLLM >= 0.26, SGLang >= 0.5.22: ["", topic, seq, payload].
        let new = replay_reply(frames(&[b"", b"kv-events", &seq, b"batch"])).unwrap();
        assert_eq!(old, (7, Bytes::from_static(b"batch")));
        assert_eq!(new, old);
        assert_eq!(replay_reply(frames(&[&seq, b"batch"])).unwrap(), old);
        let (end_seq, _) = replay_reply(frames(&[b"", b"", &end, b""])).unwrap();
        assert_eq!(end_seq, -1);
    }

    #[test]
    fn malformed_replay_replies_are_typed_errors() {
        assert!(matches!(
            replay_reply(frames(&[b"only"])),
            Err(ReplayError::FrameCount { frames: 1 })
        ));
        assert!(matches!(
            replay_reply(frames(&[b"", b"", b"", b"", b""])),
            Err(ReplayError::FrameCount { frames: 5 })
        ));
        assert!(matches!(
            replay_reply(frames(&[b"", b"short", b"x"])),
            Err(ReplayError::BadSeq { len: 5 })
        ));
    }
}
