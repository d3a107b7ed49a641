//! Keeps a [`Stack`] running: a child that exits is reported on stderr and
//! started again, with exponential backoff, on the same ports and with the
//! same arguments, so Envoy's static clusters, the relays' NATS URL and the
//! sidecar's endpoints stay valid. Used by `scripts/quickstart`.
//!
//! Every child's log is linked into one directory, which also holds a `pids`
//! file (`<name> <pid>` per running child) rewritten whenever one starts or
//! exits.

use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::Context;

use crate::harness::relay::Relay;
use crate::harness::stack::Stack;
use crate::harness::ManagedProcess;

/// Delay before the first restart of a child.
const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// The delay doubles with every exit up to this.
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// A child that ran this long before exiting is restarted after
/// [`INITIAL_BACKOFF`] again: it was not crash-looping.
const STABLE_AFTER: Duration = Duration::from_secs(30);

/// The stack and what is known about each of its children.
pub struct Supervisor {
    // Dropped first: stopping every child before their log directory goes.
    stack: Stack,
    children: Vec<Child>,
    logs: LogDir,
}

impl Supervisor {
    /// Takes over `stack`, linking each child's log into a new directory.
    /// Refuses a stack whose sim workers share a process
    /// ([`SimHosting::OneProcess`](crate::harness::fleet::SimHosting)): it
    /// restarts engines one at a time.
    pub fn new(mut stack: Stack) -> anyhow::Result<Self> {
        let logs = LogDir::create()?;
        let mut components = vec![Component::Nats];
        let workers = stack.workers.len() + stack.prefill_workers.len() + stack.vllm_workers.len();
        components.extend((0..workers).map(Component::Engine));
        components.extend((0..workers).map(Component::Relay));
        components.extend([Component::Sidecar, Component::Envoy]);
        let now = Instant::now();
        let mut children = Vec::with_capacity(components.len());
        for component in components {
            let process = component.process(&mut stack)?;
            logs.link(process)?;
            children.push(Child {
                component,
                name: process.name().to_owned(),
                started: now,
                runs_ended: 0,
                backoff: INITIAL_BACKOFF,
                restart_at: None,
            });
        }
        let mut supervisor = Self {
            stack,
            children,
            logs,
        };
        supervisor.write_pids()?;
        Ok(supervisor)
    }

    pub fn stack(&self) -> &Stack {
        &self.stack
    }

    /// The directory holding every child's log and the `pids` file.
    pub fn log_dir(&self) -> &Path {
        self.logs.path()
    }

    /// Notices children that exited and restarts those whose backoff has
    /// passed, in dependency order (NATS first, Envoy last). Problems are
    /// reported on stderr: the supervisor itself never gives up.
    ///
    /// A restart blocks until the child is ready again (at most its
    /// readiness timeout), so signals are handled after it.
    pub fn poll(&mut self) {
        let mut changed = false;
        for child in &mut self.children {
            match child.restart_at {
                None => {
                    let process = child.component.process(&mut self.stack);
                    if let Some(status) = process.ok().and_then(ManagedProcess::exit_status) {
                        child.exited(status, &self.logs);
                        changed = true;
                    }
                }
                Some(at) if Instant::now() >= at => {
                    changed |= child.restart(&mut self.stack, &self.logs);
                }
                Some(_) => {}
            }
        }
        if changed {
            if let Err(error) = self.write_pids() {
                eprintln!("quickstart: {error:#}");
            }
        }
    }

    /// Lists the running children in the `pids` file.
    fn write_pids(&mut self) -> anyhow::Result<()> {
        let mut text = String::new();
        for child in &self.children {
            if child.restart_at.is_none() {
                let pid = child.component.process(&mut self.stack)?.pid();
                text.push_str(&format!("{} {pid}\n", child.name));
            }
        }
        self.logs.write_pids(&text)
    }
}

/// One supervised process of the stack.
#[derive(Debug, Clone, Copy)]
enum Component {
    Nats,
    /// The engine of worker `n`, counting simulated decode workers, then
    /// prefill, then vLLM workers.
    Engine(usize),
    /// The relay beside worker `n`.
    Relay(usize),
    Sidecar,
    Envoy,
}

impl Component {
    /// Its process; an error for a sim worker sharing its process with
    /// others, which this supervisor cannot restart alone.
    fn process(self, stack: &mut Stack) -> anyhow::Result<&mut ManagedProcess> {
        Ok(match self {
            Component::Nats => stack.nats.process(),
            Component::Engine(n) => match engine(stack, n) {
                Engine::Sim(sim) => sim.process()?,
                Engine::Vllm(vllm) => vllm.process(),
            },
            Component::Relay(n) => relay(stack, n).process(),
            Component::Sidecar => stack.sidecar.process(),
            Component::Envoy => stack.envoy.process(),
        })
    }

    /// Starts the (exited) process again on its ports and waits until it is
    /// ready.
    fn restart(self, stack: &mut Stack) -> anyhow::Result<()> {
        match self {
            Component::Nats => stack.nats.restart(),
            Component::Engine(n) => match engine(stack, n) {
                Engine::Sim(sim) => sim.restart(),
                Engine::Vllm(vllm) => vllm.restart(),
            },
            Component::Relay(n) => relay(stack, n).restart(),
            Component::Sidecar => stack.sidecar.restart(),
            Component::Envoy => stack.envoy.restart(),
        }
    }
}

enum Engine<'a> {
    Sim(&'a mut crate::harness::SimEngine),
    Vllm(&'a mut crate::harness::vllm::VllmEngine),
}

/// Worker `n`'s index among the sim decode workers, the prefill workers or
/// the vLLM workers.
enum Slot {
    Sim(usize),
    Prefill(usize),
    Vllm(usize),
}

fn slot(stack: &Stack, n: usize) -> Slot {
    let (decode, prefill) = (stack.workers.len(), stack.prefill_workers.len());
    if n < decode {
        Slot::Sim(n)
    } else if n < decode + prefill {
        Slot::Prefill(n - decode)
    } else {
        Slot::Vllm(n - decode - prefill)
    }
}

fn engine(stack: &mut Stack, n: usize) -> Engine<'_> {
    match slot(stack, n) {
        Slot::Sim(i) => Engine::Sim(&mut stack.workers[i].sim),
        Slot::Prefill(i) => Engine::Sim(&mut stack.prefill_workers[i].sim),
        Slot::Vllm(i) => Engine::Vllm(&mut stack.vllm_workers[i].engine),
    }
}

fn relay(stack: &mut Stack, n: usize) -> &mut Relay {
    match slot(stack, n) {
        Slot::Sim(i) => &mut stack.workers[i].relay,
        Slot::Prefill(i) => &mut stack.prefill_workers[i].relay,
        Slot::Vllm(i) => &mut stack.vllm_workers[i].relay,
    }
}

struct Child {
    component: Component,
    name: String,
    /// When the current run started.
    started: Instant,
    /// Runs that ended, numbering the logs kept of them.
    runs_ended: u32,
    /// Delay before the next restart.
    backoff: Duration,
    /// `Some` while the child is down: when to try starting it.
    restart_at: Option<Instant>,
}

impl Child {
    /// Reports the exit, keeps the run's log and schedules the restart.
    fn exited(&mut self, status: ExitStatus, logs: &LogDir) {
        self.runs_ended += 1;
        if self.started.elapsed() >= STABLE_AFTER {
            self.backoff = INITIAL_BACKOFF;
        }
        let delay = self.next_delay();
        let log = match logs.retire(&self.name, self.runs_ended) {
            Ok(path) => path.display().to_string(),
            Err(error) => format!("not kept: {error:#}"),
        };
        eprintln!(
            "quickstart: {} exited ({status}); restarting in {delay:?}; log: {log}",
            self.name
        );
    }

    /// Tries to start the child again; true if it is running.
    fn restart(&mut self, stack: &mut Stack, logs: &LogDir) -> bool {
        match self.component.restart(stack) {
            Ok(()) => {
                let linked = self.component.process(stack).and_then(|process| {
                    eprintln!(
                        "quickstart: {} restarted (pid {})",
                        self.name,
                        process.pid()
                    );
                    logs.link(process)
                });
                if let Err(error) = linked {
                    eprintln!("quickstart: {error:#}");
                }
                self.started = Instant::now();
                self.restart_at = None;
                true
            }
            Err(error) => {
                let delay = self.next_delay();
                eprintln!(
                    "quickstart: restarting {} failed; retrying in {delay:?}: {error:#}",
                    self.name
                );
                false
            }
        }
    }

    /// Schedules the next restart attempt and doubles the backoff.
    fn next_delay(&mut self) -> Duration {
        let delay = self.backoff;
        self.backoff = (delay * 2).min(MAX_BACKOFF);
        self.restart_at = Some(Instant::now() + delay);
        delay
    }
}

/// The directory every child's log is linked into, removed on drop.
///
/// Each [`ManagedProcess`] logs into a temporary directory of its own that
/// goes away with it, i.e. on restart, when its log is most wanted. A hard
/// link keeps the file; it lives in the same temporary directory as the
/// children's so the link cannot cross filesystems.
struct LogDir {
    dir: tempfile::TempDir,
}

impl LogDir {
    fn create() -> anyhow::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("kvmesh-quickstart-")
            .tempdir()
            .context("creating the log directory")?;
        Ok(Self { dir })
    }

    fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Links the log of `process`'s current run as `<name>.log`.
    fn link(&self, process: &ManagedProcess) -> anyhow::Result<()> {
        let link = self.current(process.name());
        fs::hard_link(process.log_path(), &link).with_context(|| {
            format!(
                "linking {} to {}",
                process.log_path().display(),
                link.display()
            )
        })
    }

    /// Renames `<name>.log`, the log of a run that ended, to
    /// `<name>.log.<run>` so the next run's log takes its name.
    fn retire(&self, name: &str, run: u32) -> anyhow::Result<PathBuf> {
        let kept = self.path().join(format!("{name}.log.{run}"));
        fs::rename(self.current(name), &kept)
            .with_context(|| format!("keeping the log of {name} as {}", kept.display()))?;
        Ok(kept)
    }

    fn current(&self, name: &str) -> PathBuf {
        self.path().join(format!("{name}.log"))
    }

    /// Replaces the `pids` file at once, so readers never see half of it.
    fn write_pids(&self, text: &str) -> anyhow::Result<()> {
        let path = self.path().join("pids");
        let partial = self.path().join("pids.partial");
        let mut file = fs::File::create(&partial).context("creating the pids file")?;
        file.write_all(text.as_bytes())
            .context("writing the pids file")?;
        fs::rename(&partial, &path).context("replacing the pids file")
    }
}
