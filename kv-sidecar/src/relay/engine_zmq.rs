//! vLLM / SGLang event source: a ZMQ SUB on the engine's PUB socket, with gap
//! repair from the engine's replay ROUTER (DESIGN §3.3).
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
//!   new engine already published.

use std::time::Duration;

use bytes::Bytes;
use futures_util::StreamExt;
use router_core::protocol::ResetReason;
use thiserror::Error;
use tokio::sync::mpsc;
use zeromq::{
    DealerSocket, Socket, SocketEvent, SocketOptions, SocketRecv, SocketSend, SubSocket, ZmqMessage,
};

use crate::decode::vllm::decode_batch;
use crate::decode::{DecodeError, EngineEvent, EventBatch};
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
    #[error("replay frame is malformed")]
    Malformed,
    #[error("replayed batch {seq} does not decode: {source}")]
    Undecodable { seq: u64, source: DecodeError },
}

pub struct ZmqSource {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
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
    /// the restart. So rebuild the worker's view from the engine's replay
    /// buffer right away. Returns false once the pipeline is gone.
    async fn catch_up(&self, state: &mut SeqState) -> bool {
        if self.replay_endpoint.is_none() {
            return true;
        }
        tokio::time::sleep(SUBSCRIBE_SETTLE).await;
        let batches = match self.replay(0, u64::MAX).await {
            Ok(batches) => batches,
            Err(error) => {
                // The live stream will show what happened (seq going back).
                self.metrics.replay("failed");
                tracing::warn!(%error, "catch-up replay after reconnect failed");
                return true;
            }
        };
        self.metrics.replay("ok");
        tracing::info!(
            batches = batches.len(),
            "rebuilding the worker's view after reconnecting"
        );
        if !self
            .send(SourceMsg::Reset(ResetReason::EngineRestarted))
            .await
        {
            return false;
        }
        if batches.first().is_some_and(|b| b.0 != 0) {
            tracing::info!(
                "engine's replay buffer no longer reaches seq 0; older blocks stay unknown"
            );
        }
        state.expected = batches.last().map(|b| b.0 + 1);
        state.peer_lost = state.expected.is_none();
        state.replayed = state.expected.is_some();
        for (_, batch) in batches {
            if !self.emit(batch).await {
                return false;
            }
        }
        true
    }

    /// Returns false once the pipeline is gone.
    async fn on_message(&self, message: ZmqMessage, state: &mut SeqState) -> bool {
        let Some((seq, payload)) = split_frames(message) else {
            self.metrics.decode_errors.inc();
            tracing::warn!("engine message without a valid sequence frame skipped");
            return true;
        };
        self.metrics.mark_event_received();
        let decoded = decode_batch(&payload);
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
                    Ok(batches)
                        if batches.first().map(|b| b.0) == Some(expected)
                            && complete(&batches, seq) =>
                    {
                        self.metrics.replay("ok");
                        for (_, batch) in batches {
                            if !self.emit(batch).await {
                                return false;
                            }
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
        state.peer_lost = false;
        state.replayed = false;
        match decoded {
            Ok(batch) => self.emit(batch).await,
            Err(error) => {
                // The batch's events are gone for good (a replay returns the
                // same bytes); a view missing removals would keep advertising
                // evicted blocks, so start over from an empty view.
                self.metrics.decode_errors.inc();
                tracing::warn!(%error, seq, "undecodable engine batch; resetting the worker's view");
                self.send(SourceMsg::Reset(ResetReason::EventsLost)).await
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
            Ok(batches) => {
                self.metrics.replay("ok");
                if batches.first().map(|b| b.0) != Some(0) {
                    tracing::info!(
                        "engine's replay buffer no longer reaches seq 0; older blocks stay unknown"
                    );
                }
                for (_, batch) in batches {
                    if !self.emit(batch).await {
                        return false;
                    }
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
    /// `until` that follow each other without a hole.
    async fn replay(&self, from: u64, until: u64) -> Result<Vec<(u64, EventBatch)>, ReplayError> {
        let endpoint = self
            .replay_endpoint
            .as_deref()
            .ok_or(ReplayError::NotConfigured)?;
        let mut options = SocketOptions::default();
        options.connect_timeout(REPLAY_FRAME_TIMEOUT);
        let mut dealer = DealerSocket::with_options(options);
        dealer.connect(endpoint).await?;
        let request: Vec<Bytes> = vec![Bytes::new(), Bytes::copy_from_slice(&from.to_be_bytes())];
        let request = ZmqMessage::try_from(request).map_err(|_| ReplayError::Malformed)?;
        dealer.send(request).await?;
        let mut batches: Vec<(u64, EventBatch)> = Vec::new();
        for _ in 0..MAX_REPLAY_BATCHES {
            let reply = tokio::time::timeout(REPLAY_FRAME_TIMEOUT, dealer.recv())
                .await
                .map_err(|_| ReplayError::Timeout)??;
            let mut frames = reply.into_vec();
            // The ROUTER's reply is ["", seq, payload]; tolerate a missing delimiter.
            if frames.first().is_some_and(|f| f.is_empty()) && frames.len() == 3 {
                frames.remove(0);
            }
            let [seq, payload] =
                <[Bytes; 2]>::try_from(frames).map_err(|_| ReplayError::Malformed)?;
            let seq = parse_seq(&seq).ok_or(ReplayError::Malformed)?;
            if seq < 0 {
                break;
            }
            let seq = seq as u64;
            if seq < from {
                continue;
            }
            if seq >= until {
                break;
            }
            if let Some((last, _)) = batches.last() {
                if seq != last + 1 {
                    // A hole inside the replay: only what follows it is usable.
                    batches.clear();
                }
            }
            let batch = decode_batch(&payload).map_err(|source| {
                self.metrics.decode_errors.inc();
                ReplayError::Undecodable { seq, source }
            })?;
            batches.push((seq, batch));
        }
        Ok(batches)
    }

    async fn emit(&self, batch: EventBatch) -> bool {
        self.metrics.engine_batches.inc();
        count_events(&self.metrics, &batch);
        self.send(SourceMsg::Batch(batch.events)).await
    }

    async fn send(&self, msg: SourceMsg) -> bool {
        self.tx.send(msg).await.is_ok()
    }
}

fn complete(batches: &[(u64, EventBatch)], until: u64) -> bool {
    batches.last().map(|b| b.0 + 1) == Some(until)
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
    let (mut stored, mut removed, mut cleared) = (0, 0, 0);
    for event in &batch.events {
        match event {
            EngineEvent::Stored(_) => stored += 1,
            EngineEvent::Removed(_) => removed += 1,
            EngineEvent::AllCleared => cleared += 1,
        }
    }
    for (kind, n) in [
        ("stored", stored),
        ("removed", removed),
        ("cleared", cleared),
        ("ignored", u64::from(batch.ignored_events)),
    ] {
        if n > 0 {
            metrics.engine_event(kind, n);
        }
    }
}
