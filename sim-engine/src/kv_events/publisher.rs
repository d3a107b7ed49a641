//! Publishes KV event batches on a ZMQ PUB socket as vLLM does —
//! multipart `[topic, seq (u64 big-endian), payload]`, seq from 0 — and
//! answers replay requests on a ZMQ ROUTER socket from a bounded buffer:
//! `[identity, "", start_seq]` → `[identity, "", seq, payload]` for every
//! buffered batch with seq ≥ start_seq, then `[identity, "", -1 (i64 BE), ""]`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use thiserror::Error;
use tokio::sync::mpsc;
use zeromq::{PubSocket, RouterSocket, Socket, SocketRecv, SocketSend, ZmqMessage};

use crate::config::EventFormat;
use crate::faults::Faults;
use crate::kv_cache::CacheEvent;
use crate::kv_events::encoding::{encode_batch, BatchFormat};

/// How often held batches are re-checked while publishing is paused.
const PAUSE_POLL: Duration = Duration::from_millis(20);
/// Seq of the replay end marker.
const REPLAY_END_SEQ: i64 = -1;

#[derive(Debug, Error)]
pub enum PublisherError {
    #[error("binding ZMQ {kind} socket to {endpoint}: {source}")]
    Bind {
        kind: &'static str,
        endpoint: String,
        source: zeromq::ZmqError,
    },
}

#[derive(Debug, Clone)]
pub struct PublisherSettings {
    pub endpoint: String,
    pub replay_endpoint: Option<String>,
    pub topic: String,
    pub format: EventFormat,
    pub block_size: u32,
    pub replay_capacity: usize,
    /// The rank every batch is stamped with.
    pub data_parallel_rank: u32,
}

/// Handle the engine loop uses to publish one batch per changing iteration.
#[derive(Clone)]
pub struct EventSink {
    batches: mpsc::UnboundedSender<Vec<CacheEvent>>,
    next_seq: Arc<AtomicU64>,
}

impl EventSink {
    /// Queues a batch; an empty batch is not published (vLLM sends none for
    /// iterations that did not change the cache).
    pub fn publish(&self, events: Vec<CacheEvent>) {
        if events.is_empty() {
            return;
        }
        if self.batches.send(events).is_err() {
            tracing::warn!("KV event publisher stopped; dropping a batch");
        }
    }

    /// Seq the next batch will get (= number of batches numbered so far).
    pub fn next_seq(&self) -> u64 {
        self.next_seq.load(Ordering::Relaxed)
    }
}

/// Batches kept for replay, oldest first.
#[derive(Debug, Default)]
struct ReplayBuffer {
    batches: VecDeque<(u64, Bytes)>,
    capacity: usize,
}

impl ReplayBuffer {
    fn push(&mut self, seq: u64, payload: Bytes) {
        if self.capacity == 0 {
            return;
        }
        while self.batches.len() >= self.capacity {
            self.batches.pop_front();
        }
        self.batches.push_back((seq, payload));
    }

    fn since_seq(&self, start: u64) -> Vec<(u64, Bytes)> {
        self.batches
            .iter()
            .filter(|(seq, _)| *seq >= start)
            .cloned()
            .collect()
    }
}

/// Binds the sockets and starts the publishing (and replay) tasks.
pub async fn start(
    settings: PublisherSettings,
    faults: Arc<Faults>,
) -> Result<EventSink, PublisherError> {
    let mut publisher = PubSocket::new();
    publisher
        .bind(&bind_address(&settings.endpoint))
        .await
        .map_err(|source| PublisherError::Bind {
            kind: "PUB",
            endpoint: settings.endpoint.clone(),
            source,
        })?;
    let replay = Arc::new(Mutex::new(ReplayBuffer {
        batches: VecDeque::new(),
        capacity: settings.replay_capacity,
    }));
    if let Some(endpoint) = &settings.replay_endpoint {
        let mut router = RouterSocket::new();
        router
            .bind(&bind_address(endpoint))
            .await
            .map_err(|source| PublisherError::Bind {
                kind: "ROUTER",
                endpoint: endpoint.clone(),
                source,
            })?;
        tokio::spawn(serve_replay(router, Arc::clone(&replay)));
        tracing::info!(endpoint = %endpoint, "KV event replay bound");
    }
    tracing::info!(endpoint = %settings.endpoint, topic = %settings.topic, format = ?settings.format, "KV event publisher bound");

    let (tx, rx) = mpsc::unbounded_channel();
    let next_seq = Arc::new(AtomicU64::new(0));
    tokio::spawn(run_publisher(
        publisher,
        rx,
        settings,
        faults,
        replay,
        Arc::clone(&next_seq),
    ));
    Ok(EventSink {
        batches: tx,
        next_seq,
    })
}

/// vLLM configs say `tcp://*:5557`; the zeromq crate wants an address.
fn bind_address(endpoint: &str) -> String {
    endpoint.replacen("://*:", "://0.0.0.0:", 1)
}

async fn run_publisher(
    mut socket: PubSocket,
    mut batches: mpsc::UnboundedReceiver<Vec<CacheEvent>>,
    settings: PublisherSettings,
    faults: Arc<Faults>,
    replay: Arc<Mutex<ReplayBuffer>>,
    next_seq: Arc<AtomicU64>,
) {
    let topic = Bytes::from(settings.topic.clone().into_bytes());
    let batch_format = BatchFormat {
        format: settings.format,
        block_size: settings.block_size,
        data_parallel_rank: settings.data_parallel_rank,
    };
    // Batches held while publishing is paused, in seq order.
    let mut held: VecDeque<(u64, Bytes)> = VecDeque::new();
    loop {
        let received = if held.is_empty() {
            batches.recv().await
        } else {
            match tokio::time::timeout(PAUSE_POLL, batches.recv()).await {
                Ok(batch) => batch,
                Err(_) => {
                    flush_unless_paused(&mut socket, &topic, &faults, &mut held).await;
                    continue;
                }
            }
        };
        let Some(events) = received else {
            break;
        };
        let seq = next_seq.fetch_add(1, Ordering::Relaxed);
        let payload = Bytes::from(encode_batch(unix_seconds(), &events, batch_format));
        replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(seq, payload.clone());
        if faults.take_rebind() {
            socket = rebind(socket, &settings.endpoint).await;
        }
        if faults.drops_batch(seq) {
            tracing::debug!(seq, "fault injection: dropping KV event batch");
            continue;
        }
        held.push_back((seq, payload));
        flush_unless_paused(&mut socket, &topic, &faults, &mut held).await;
    }
}

/// Fault injection: closes the PUB socket, dropping every subscriber's
/// connection, and binds a new one on the same address.
async fn rebind(socket: PubSocket, endpoint: &str) -> PubSocket {
    drop(socket.close().await);
    let mut fresh = PubSocket::new();
    for _ in 0..50 {
        match fresh.bind(&bind_address(endpoint)).await {
            Ok(_) => {
                tracing::info!(endpoint, "fault injection: KV event PUB socket bound again");
                return fresh;
            }
            Err(error) => {
                tracing::debug!(%error, "binding the KV event PUB socket again");
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    tracing::warn!(
        endpoint,
        "fault injection: the KV event PUB socket could not be bound again"
    );
    fresh
}

async fn flush_unless_paused(
    socket: &mut PubSocket,
    topic: &Bytes,
    faults: &Faults,
    held: &mut VecDeque<(u64, Bytes)>,
) {
    if faults.events_paused() {
        return;
    }
    while let Some((seq, payload)) = held.pop_front() {
        let frames = vec![
            topic.clone(),
            Bytes::copy_from_slice(&seq.to_be_bytes()),
            payload,
        ];
        match ZmqMessage::try_from(frames) {
            Ok(message) => {
                if let Err(error) = socket.send(message).await {
                    tracing::warn!(%error, seq, "publishing a KV event batch failed");
                }
            }
            Err(error) => tracing::warn!(%error, "building a KV event message failed"),
        }
    }
}

async fn serve_replay(mut socket: RouterSocket, replay: Arc<Mutex<ReplayBuffer>>) {
    loop {
        let request = match socket.recv().await {
            Ok(request) => request.into_vec(),
            Err(error) => {
                tracing::warn!(%error, "KV event replay socket failed; replay stops");
                return;
            }
        };
        // `[identity, "", start]` from REQ/DEALER-with-delimiter clients;
        // `[identity, start]` from a bare DEALER. Answer in the same shape.
        let (identity, delimited, start) = match request.as_slice() {
            [identity, empty, start] if empty.is_empty() => (identity.clone(), true, start),
            [identity, start] => (identity.clone(), false, start),
            _ => {
                tracing::warn!(frames = request.len(), "malformed KV event replay request");
                continue;
            }
        };
        let Ok(start) = <[u8; 8]>::try_from(start.as_ref()) else {
            tracing::warn!(len = start.len(), "replay start seq is not 8 bytes");
            continue;
        };
        let start = u64::from_be_bytes(start);
        let batches = replay
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .since_seq(start);
        tracing::debug!(start, count = batches.len(), "replaying KV event batches");
        let end = (REPLAY_END_SEQ.to_be_bytes(), Bytes::new());
        let replies = batches
            .into_iter()
            .map(|(seq, payload)| (seq.to_be_bytes(), payload))
            .chain(std::iter::once(end));
        for (seq, payload) in replies {
            let mut frames = vec![identity.clone()];
            if delimited {
                frames.push(Bytes::new());
            }
            frames.push(Bytes::copy_from_slice(&seq));
            frames.push(payload);
            let Ok(message) = ZmqMessage::try_from(frames) else {
                continue;
            };
            if let Err(error) = socket.send(message).await {
                tracing::warn!(%error, "replay reply failed; the client may have left");
                break;
            }
        }
    }
}

fn unix_seconds() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs_f64())
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replay_buffer_is_bounded_and_filters_by_seq() {
        let mut buffer = ReplayBuffer {
            batches: VecDeque::new(),
            capacity: 3,
        };
        for seq in 0..5 {
            buffer.push(seq, Bytes::from(vec![seq as u8]));
        }
        let seqs: Vec<u64> = buffer.since_seq(0).iter().map(|b| b.0).collect();
        assert_eq!(seqs, vec![2, 3, 4]);
        assert_eq!(buffer.since_seq(4).len(), 1);
        assert!(buffer.since_seq(5).is_empty());
    }

    #[test]
    fn wildcard_bind_becomes_any_address() {
        assert_eq!(bind_address("tcp://*:5557"), "tcp://0.0.0.0:5557");
        assert_eq!(bind_address("tcp://127.0.0.1:5557"), "tcp://127.0.0.1:5557");
    }
}
