//! An engine's own KV event publisher, taken from its released wheel and run
//! unchanged by `tests/conformance/engine_publisher.py` (which documents the
//! line protocol spoken here).

use std::io::{BufRead, BufReader, Write};
use std::process::{ChildStdin, ChildStdout, Command};

use anyhow::Context;
use kvmesh_config::EngineKind;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::harness::ports::free_consecutive_ports;
use crate::harness::{free_port, paths, ManagedProcess};

/// How the engine release puts block hashes on the wire.
#[derive(Debug, Clone, Copy)]
pub enum HashStyle {
    /// Signed i64 (SGLang; vLLM with Python's `hash()`).
    Signed,
    /// Unsigned u64 (vLLM's builtin hashes).
    Unsigned,
    /// 32-byte strings (vLLM's sha256 modes).
    Bytes,
}

impl HashStyle {
    fn flag(self) -> &'static str {
        match self {
            HashStyle::Signed => "signed",
            HashStyle::Unsigned => "unsigned",
            HashStyle::Bytes => "bytes",
        }
    }
}

/// One engine release under test.
#[derive(Debug, Clone, Copy)]
pub struct EngineRelease {
    /// vLLM or SGLang: the PyPI distribution and the relay's `--engine`.
    pub engine: EngineKind,
    pub version: &'static str,
    pub hash_style: HashStyle,
}

/// What the release's event classes can express.
#[derive(Debug, Clone, Copy, Deserialize)]
pub struct Capabilities {
    pub salt: bool,
    pub mm: bool,
    pub groups: bool,
}

#[derive(Deserialize)]
struct Ready {
    capabilities: Capabilities,
}

#[derive(Deserialize)]
struct Published {
    seq: u64,
}

pub struct EnginePublisher {
    release: EngineRelease,
    process: ManagedProcess,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    /// The ports the engine is configured with; a data-parallel rank binds
    /// them plus its rank.
    pub_port: u16,
    replay_port: u16,
    data_parallel_rank: u32,
    pub capabilities: Capabilities,
}

impl EnginePublisher {
    /// Starts the release's `ZmqEventPublisher` on free ports and waits until
    /// its sockets are bound.
    pub fn start(release: &EngineRelease) -> anyhow::Result<Self> {
        Self::start_rank(release, (free_port(), free_port()), 0)
    }

    /// Starts the publishers of `ranks` data-parallel ranks of one engine,
    /// configured with the same ports as the engine's ranks are.
    pub fn start_ranks(release: &EngineRelease, ranks: u16) -> anyhow::Result<Vec<Self>> {
        let ports = (
            free_consecutive_ports(ranks)?,
            free_consecutive_ports(ranks)?,
        );
        (0..u32::from(ranks))
            .map(|rank| Self::start_rank(release, ports, rank))
            .collect()
    }

    fn start_rank(
        release: &EngineRelease,
        (pub_port, replay_port): (u16, u16),
        data_parallel_rank: u32,
    ) -> anyhow::Result<Self> {
        let (process, stdin, stdout) =
            Self::spawn(release, pub_port, replay_port, data_parallel_rank)?;
        let mut publisher = Self {
            release: *release,
            process,
            stdin,
            stdout,
            pub_port,
            replay_port,
            data_parallel_rank,
            capabilities: Capabilities {
                salt: false,
                mm: false,
                groups: false,
            },
        };
        let ready: Ready = publisher.read_reply()?;
        publisher.capabilities = ready.capabilities;
        Ok(publisher)
    }

    /// Kills the engine (as a crash would) and starts a new one on the same
    /// ports: its sequence starts at 0 again with an empty buffer.
    pub fn restart(&mut self) -> anyhow::Result<()> {
        self.process.kill();
        let (process, stdin, stdout) = Self::spawn(
            &self.release,
            self.pub_port,
            self.replay_port,
            self.data_parallel_rank,
        )?;
        (self.process, self.stdin, self.stdout) = (process, stdin, stdout);
        let _: Ready = self.read_reply()?;
        Ok(())
    }

    fn spawn(
        release: &EngineRelease,
        pub_port: u16,
        replay_port: u16,
        data_parallel_rank: u32,
    ) -> anyhow::Result<(ManagedProcess, ChildStdin, BufReader<ChildStdout>)> {
        let wheel = paths::engine_wheel(release.engine.as_str(), release.version)?;
        let script = paths::repo_root()
            .join("tests")
            .join("conformance")
            .join("engine_publisher.py");
        let mut command = Command::new(paths::venv_python()?);
        command
            .arg(script)
            .arg("--wheel")
            .arg(&wheel)
            .args(["--engine", release.engine.as_str()])
            .args(["--pub-port", &pub_port.to_string()])
            .args(["--replay-port", &replay_port.to_string()])
            .args(["--hash-style", release.hash_style.flag()])
            .args(["--data-parallel-rank", &data_parallel_rank.to_string()]);
        let name = format!(
            "{}-{}-dp{data_parallel_rank}",
            release.engine, release.version
        );
        let mut process = ManagedProcess::spawn_piped(&name, command)?;
        let (stdin, stdout) = process
            .take_stdio()
            .context("the publisher's stdio pipes")?;
        Ok((process, stdin, BufReader::new(stdout)))
    }

    /// The PUB endpoint the engine is configured with (a rank's own is
    /// this port plus the rank).
    pub fn endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.pub_port)
    }

    pub fn replay_endpoint(&self) -> String {
        format!("tcp://127.0.0.1:{}", self.replay_port)
    }

    /// Publishes one batch; with `drop` the PUB frame never leaves (the
    /// engine still buffers it for replay). Returns its seq.
    pub fn publish(&mut self, events: &[Value], drop: bool) -> anyhow::Result<u64> {
        self.request(json!({"op": "publish", "drop": drop, "events": events}))
    }

    /// Publishes a batch the relay cannot decode: `event` holds one event
    /// with a malformed field, `batch` has no event list.
    pub fn publish_garbage(&mut self, level: &str, drop: bool) -> anyhow::Result<u64> {
        self.request(json!({"op": "publish_garbage", "level": level, "drop": drop}))
    }

    fn request(&mut self, command: Value) -> anyhow::Result<u64> {
        writeln!(self.stdin, "{command}").context("writing to the publisher")?;
        self.stdin.flush().context("writing to the publisher")?;
        let published: Published = self.read_reply()?;
        Ok(published.seq)
    }

    fn read_reply<T: serde::de::DeserializeOwned>(&mut self) -> anyhow::Result<T> {
        let mut line = String::new();
        let read = self
            .stdout
            .read_line(&mut line)
            .context("reading from the publisher")?;
        if read == 0 {
            self.process.ensure_running()?;
            anyhow::bail!(
                "the publisher closed its output; log tail:\n{}",
                self.process.log_tail()
            );
        }
        serde_json::from_str(&line).with_context(|| format!("publisher replied {line:?}"))
    }
}
