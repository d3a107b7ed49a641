//! A NATS subscriber for tests (async-nats on its own runtime, blocking API):
//! watches what relays and sidecars publish, keeps its subscription across
//! nats-server restarts, and publishes test messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use anyhow::Context;
use futures_util::StreamExt;

pub struct NatsMessage {
    pub subject: String,
    pub payload: Vec<u8>,
}

pub struct NatsTap {
    runtime: tokio::runtime::Runtime,
    client: async_nats::Client,
    messages: mpsc::Receiver<NatsMessage>,
    connects: Arc<AtomicU64>,
}

impl NatsTap {
    /// Subscribes to `subject` (wildcards allowed).
    pub fn subscribe(nats_url: &str, subject: &str) -> anyhow::Result<Self> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .context("starting the NATS tap runtime")?;
        let connects = Arc::new(AtomicU64::new(0));
        let counter = Arc::clone(&connects);
        let client = runtime.block_on(
            async_nats::ConnectOptions::new()
                .event_callback(move |event| {
                    let counter = Arc::clone(&counter);
                    async move {
                        if matches!(event, async_nats::Event::Connected) {
                            counter.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                // Tests restart nats-server: come back quickly.
                .reconnect_delay_callback(|attempts| {
                    Duration::from_millis(50 * (attempts as u64).min(10))
                })
                .connect(nats_url),
        )?;
        let mut subscription = runtime.block_on(client.subscribe(subject.to_owned()))?;
        runtime.block_on(client.flush())?;
        let (tx, messages) = mpsc::channel();
        runtime.spawn(async move {
            while let Some(message) = subscription.next().await {
                let forwarded = NatsMessage {
                    subject: message.subject.to_string(),
                    payload: message.payload.to_vec(),
                };
                if tx.send(forwarded).is_err() {
                    return;
                }
            }
        });
        connects.fetch_max(1, Ordering::Relaxed);
        Ok(Self {
            runtime,
            client,
            messages,
            connects,
        })
    }

    /// Messages received so far, without waiting.
    pub fn drain(&self) -> Vec<NatsMessage> {
        self.messages.try_iter().collect()
    }

    /// Times the tap has connected (1 after subscribing, more after restarts).
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Publishes one message and waits until the server has it.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        self.runtime.block_on(async {
            self.client
                .publish(subject.to_owned(), payload.to_vec().into())
                .await?;
            self.client.flush().await?;
            anyhow::Ok(())
        })
    }
}
