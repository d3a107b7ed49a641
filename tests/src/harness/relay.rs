//! A real `kv-sidecar relay` process, and a minimal NATS subscriber (the
//! plain-text NATS protocol over std TCP) to watch what it publishes.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::harness::{free_port, paths, readiness, ManagedProcess};

/// How to start one relay.
#[derive(Debug, Clone)]
pub struct RelayOptions {
    pub engine: String,
    pub nats_url: String,
    pub worker_id: String,
    pub model: String,
    pub address: String,
    pub block_size: u32,
    pub zmq_endpoint: Option<String>,
    pub zmq_replay_endpoint: Option<String>,
    pub metrics_url: Option<String>,
    pub extra_args: Vec<String>,
}

pub struct Relay {
    process: ManagedProcess,
    listen_port: u16,
}

impl Relay {
    /// Starts the relay and waits until `/healthz` says NATS is connected.
    pub fn start(options: &RelayOptions) -> anyhow::Result<Self> {
        let listen_port = free_port();
        let mut command = Command::new(paths::binary("kv-sidecar")?);
        command.env("RUST_LOG", "info").args([
            "relay",
            "--engine",
            &options.engine,
            "--nats-url",
            &options.nats_url,
            "--worker-id",
            &options.worker_id,
            "--model",
            &options.model,
            "--address",
            &options.address,
            "--block-size",
            &options.block_size.to_string(),
            "--listen",
            &format!("127.0.0.1:{listen_port}"),
        ]);
        if let Some(endpoint) = &options.zmq_endpoint {
            command.args(["--zmq-endpoint", endpoint]);
        }
        if let Some(endpoint) = &options.zmq_replay_endpoint {
            command.args(["--zmq-replay-endpoint", endpoint]);
        }
        if let Some(url) = &options.metrics_url {
            command.args(["--metrics-url", url]);
        }
        command.args(&options.extra_args);
        let mut process = ManagedProcess::spawn(&format!("relay-{}", options.worker_id), command)?;
        let health = format!("http://127.0.0.1:{listen_port}/healthz");
        readiness::wait_http_ok(&mut process, &health, Duration::from_secs(20))?;
        Ok(Self {
            process,
            listen_port,
        })
    }

    pub fn metrics_url(&self) -> String {
        format!("http://127.0.0.1:{}/metrics", self.listen_port)
    }

    /// Sum of all samples of `name` (any labels) whose label text contains `labels`.
    pub fn metric(&self, name: &str, labels: &str) -> f64 {
        let text = reqwest::blocking::get(self.metrics_url())
            .and_then(|r| r.text())
            .unwrap_or_default();
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
            .filter(|l| l.contains(labels))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    pub fn process(&mut self) -> &mut ManagedProcess {
        &mut self.process
    }
}

/// One message seen on NATS.
#[derive(Debug, Clone)]
pub struct NatsMessage {
    pub subject: String,
    pub payload: Vec<u8>,
}

/// Subscribes to `subject` (wildcards allowed) and keeps reconnecting, so a
/// test can restart nats-server under it. Stops when dropped.
pub struct NatsTap {
    messages: mpsc::Receiver<NatsMessage>,
    connects: Arc<std::sync::atomic::AtomicU64>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
    addr: String,
}

impl NatsTap {
    pub fn subscribe(nats_url: &str, subject: &str) -> anyhow::Result<Self> {
        let addr = nats_url.trim_start_matches("nats://").to_owned();
        let (tx, messages) = mpsc::channel();
        let stop = Arc::new(AtomicBool::new(false));
        let connects = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let (ready_tx, ready_rx) = mpsc::channel();
        let thread = {
            let (addr, subject, stop, connects) = (
                addr.clone(),
                subject.to_owned(),
                stop.clone(),
                connects.clone(),
            );
            std::thread::spawn(move || {
                let mut ready = Some(ready_tx);
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(stream) = Self::connect(&addr, &subject) {
                        connects.fetch_add(1, Ordering::Relaxed);
                        if let Some(ready) = ready.take() {
                            let _ = ready.send(());
                        }
                        Self::read_loop(stream, &tx, &stop);
                    }
                    std::thread::sleep(Duration::from_millis(100));
                }
            })
        };
        ready_rx
            .recv_timeout(Duration::from_secs(10))
            .map_err(|_| anyhow::anyhow!("cannot subscribe to NATS at {addr}"))?;
        Ok(Self {
            messages,
            connects,
            stop,
            thread: Some(thread),
            addr,
        })
    }

    fn connect(addr: &str, subject: &str) -> std::io::Result<TcpStream> {
        let mut stream = TcpStream::connect(addr)?;
        stream.set_read_timeout(Some(Duration::from_millis(200)))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let mut info = String::new();
        reader.read_line(&mut info)?;
        stream.write_all(b"CONNECT {\"verbose\":false,\"pedantic\":false}\r\n")?;
        stream.write_all(format!("SUB {subject} 1\r\nPING\r\n").as_bytes())?;
        // Wait for the PONG so the subscription is active before returning.
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let mut line = String::new();
            match reader.read_line(&mut line) {
                Ok(_) if line.starts_with("PONG") => return Ok(stream),
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                _ if Instant::now() > deadline => return Err(std::io::ErrorKind::TimedOut.into()),
                _ => {}
            }
        }
    }

    fn read_loop(stream: TcpStream, tx: &mpsc::Sender<NatsMessage>, stop: &AtomicBool) {
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        let mut line = String::new();
        while !stop.load(Ordering::Relaxed) {
            match reader.read_line(&mut line) {
                Ok(0) => return,
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    continue; // keep the partial line
                }
                Err(_) => return,
            }
            if !line.ends_with('\n') {
                continue;
            }
            let current = std::mem::take(&mut line);
            let parts: Vec<&str> = current.split_whitespace().collect();
            match parts.first().copied() {
                Some("PING") => {
                    if writer.write_all(b"PONG\r\n").is_err() {
                        return;
                    }
                }
                Some("MSG") if parts.len() >= 4 => {
                    let Some(size) = parts.last().and_then(|s| s.parse::<usize>().ok()) else {
                        return;
                    };
                    let mut payload = vec![0u8; size + 2];
                    if Self::read_exact_patiently(&mut reader, &mut payload, stop).is_err() {
                        return;
                    }
                    payload.truncate(size);
                    let _ = tx.send(NatsMessage {
                        subject: parts[1].to_owned(),
                        payload,
                    });
                }
                _ => {}
            }
        }
    }

    fn read_exact_patiently(
        reader: &mut impl Read,
        buf: &mut [u8],
        stop: &AtomicBool,
    ) -> std::io::Result<()> {
        let mut filled = 0;
        while filled < buf.len() {
            match reader.read(&mut buf[filled..]) {
                Ok(0) => return Err(std::io::ErrorKind::UnexpectedEof.into()),
                Ok(n) => filled += n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    if stop.load(Ordering::Relaxed) {
                        return Err(e);
                    }
                }
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Messages received so far, without waiting.
    pub fn drain(&self) -> Vec<NatsMessage> {
        self.messages.try_iter().collect()
    }

    /// Times the tap has (re)connected.
    pub fn connects(&self) -> u64 {
        self.connects.load(Ordering::Relaxed)
    }

    /// Publishes one message (a sync request, say) on a fresh connection.
    pub fn publish(&self, subject: &str, payload: &[u8]) -> anyhow::Result<()> {
        let mut stream = TcpStream::connect(&self.addr)?;
        let mut info = String::new();
        BufReader::new(stream.try_clone()?).read_line(&mut info)?;
        stream.write_all(b"CONNECT {\"verbose\":false}\r\n")?;
        stream.write_all(format!("PUB {subject} {}\r\n", payload.len()).as_bytes())?;
        stream.write_all(payload)?;
        stream.write_all(b"\r\nPING\r\n")?;
        let mut pong = String::new();
        BufReader::new(stream).read_line(&mut pong)?;
        Ok(())
    }
}

impl Drop for NatsTap {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}
