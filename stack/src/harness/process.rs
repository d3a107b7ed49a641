//! A child process that is killed, with its whole process group, when dropped.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;

/// Lines of a process's log shown when a test fails.
const LOG_TAIL_LINES: usize = 80;
/// Time between SIGTERM and SIGKILL when stopping a process.
const STOP_GRACE: Duration = Duration::from_secs(3);

/// A supervised child: output goes to a log file, and dropping it kills the
/// process group. If the current thread is panicking (a failed test), the tail
/// of the log is printed first so the failure can be diagnosed.
pub struct ManagedProcess {
    name: String,
    child: Child,
    log_path: PathBuf,
    // Keeps the log directory alive as long as the process.
    _log_dir: tempfile::TempDir,
}

impl ManagedProcess {
    /// Spawns `command` in its own process group with stdout and stderr logged.
    ///
    /// On Linux the child also gets `SIGKILL` when the spawning thread dies, so
    /// nothing outlives a crashed test runner; spawn from a thread that lives
    /// as long as the process should.
    pub fn spawn(name: &str, command: Command) -> anyhow::Result<Self> {
        Self::spawn_with(name, command, false)
    }

    /// Like [`spawn`](Self::spawn), but stdin and stdout are pipes the
    /// caller talks through (take them with [`take_stdio`](Self::take_stdio));
    /// stderr is logged.
    pub fn spawn_piped(name: &str, command: Command) -> anyhow::Result<Self> {
        Self::spawn_with(name, command, true)
    }

    /// The stdin and stdout pipes of a [`spawn_piped`](Self::spawn_piped)
    /// process (once).
    pub fn take_stdio(&mut self) -> Option<(std::process::ChildStdin, std::process::ChildStdout)> {
        Some((self.child.stdin.take()?, self.child.stdout.take()?))
    }

    fn spawn_with(name: &str, mut command: Command, piped: bool) -> anyhow::Result<Self> {
        let log_dir = tempfile::Builder::new()
            .prefix(&format!("kvmesh-{name}-"))
            .tempdir()
            .context("creating a log directory")?;
        let log_path = log_dir.path().join(format!("{name}.log"));
        let log = File::create(&log_path).context("creating the log file")?;
        let log_err = log.try_clone().context("cloning the log file handle")?;
        if piped {
            command.stdin(Stdio::piped()).stdout(Stdio::piped());
        } else {
            command.stdin(Stdio::null()).stdout(log);
        }
        command.stderr(log_err).process_group(0);
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            command.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = command
            .spawn()
            .with_context(|| format!("spawning {name}: {command:?}"))?;
        Ok(Self {
            name: name.to_owned(),
            child,
            log_path,
            _log_dir: log_dir,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// Everything the process has written so far.
    pub fn logs(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = File::open(&self.log_path) {
            let _ = file.seek(SeekFrom::Start(0));
            let mut bytes = Vec::new();
            let _ = file.read_to_end(&mut bytes);
            text = String::from_utf8_lossy(&bytes).into_owned();
        }
        text
    }

    /// `Some(status)` once the process has exited.
    pub fn exit_status(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// Fails with the log tail if the process has already exited.
    pub fn ensure_running(&mut self) -> anyhow::Result<()> {
        match self.exit_status() {
            None => Ok(()),
            Some(status) => anyhow::bail!(
                "{} exited early with {status}; log tail:\n{}",
                self.name,
                self.log_tail()
            ),
        }
    }

    /// Last lines of the log.
    pub fn log_tail(&self) -> String {
        let logs = self.logs();
        let lines: Vec<&str> = logs.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    /// Sends a signal to the whole process group.
    pub fn signal(&self, signal: libc::c_int) {
        let group = self.child.id() as libc::pid_t;
        // SAFETY: plain syscall on a process group this struct created.
        unsafe {
            libc::kill(-group, signal);
        }
    }

    /// Kills the process without grace (a crash, as far as peers can tell).
    pub fn kill(&mut self) {
        self.signal(libc::SIGKILL);
        let _ = self.child.wait();
    }

    /// SIGTERM, then SIGKILL after a grace period; waits for the exit.
    pub fn stop(&mut self) {
        if self.exit_status().is_some() {
            return;
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        while Instant::now() < deadline {
            if self.exit_status().is_some() {
                // Reap any grandchildren left in the group.
                self.signal(libc::SIGKILL);
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill();
    }
}

impl Drop for ManagedProcess {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "----- {} (pid {}) log tail: {} -----\n{}\n----- end of {} -----",
                self.name,
                self.child.id(),
                self.log_path.display(),
                self.log_tail(),
                self.name
            );
        }
        self.stop();
    }
}

/// Runs `command` to completion: (exit success, stdout followed by stderr).
pub fn run_to_completion(mut command: Command) -> anyhow::Result<(bool, String)> {
    let output = command
        .output()
        .with_context(|| format!("running {:?}", command.get_program()))?;
    let mut text = String::from_utf8_lossy(&output.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&output.stderr));
    Ok((output.status.success(), text))
}

/// Which memory figure of a process [`memory_bytes`] reads.
#[derive(Debug, Clone, Copy)]
pub enum Memory {
    /// `VmRSS`: resident now.
    Resident,
    /// `VmHWM`: the most ever resident.
    PeakResident,
}

/// A memory figure of process `pid`, from `/proc/<pid>/status`.
pub fn memory_bytes(pid: u32, memory: Memory) -> anyhow::Result<u64> {
    let field = match memory {
        Memory::Resident => "VmRSS:",
        Memory::PeakResident => "VmHWM:",
    };
    let path = format!("/proc/{pid}/status");
    let status = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let kib: u64 = status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .with_context(|| format!("no {field} in {path}"))?;
    Ok(kib * 1024)
}
