//! How busy the machine's CPUs were over a run, and how much of that was the
//! bench (its client and the fleet processes it started), from Linux's
//! `/proc`. The fleet shares the cores with the client and, on a shared
//! machine, with others: near 100% busy, engines, gateways and client wait
//! for a core and the latencies measure the machine more than routing.

use std::path::Path;

/// Cumulative CPU time, in clock ticks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpuTimes {
    /// Busy time of all cores.
    busy: u64,
    /// All time of all cores.
    total: u64,
    /// Time this process and its children used.
    bench: u64,
}

/// Shares of all cores' time over a run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CpuShare {
    /// Busy, whoever used it.
    pub machine: f64,
    /// Used by the bench and the fleet it started.
    pub bench: f64,
}

impl CpuTimes {
    /// Now; `None` where `/proc` cannot be read.
    pub fn now() -> Option<Self> {
        let (busy, total) = machine_ticks(&std::fs::read_to_string("/proc/stat").ok()?)?;
        Some(Self {
            busy,
            total,
            bench: bench_ticks()?,
        })
    }

    /// Shares of the cores' time since `earlier`.
    pub fn share_since(&self, earlier: &Self) -> Option<CpuShare> {
        let total = self.total.checked_sub(earlier.total).filter(|&t| t > 0)? as f64;
        Some(CpuShare {
            machine: self.busy.checked_sub(earlier.busy)? as f64 / total,
            // Children that exited since take their time with them.
            bench: self.bench.saturating_sub(earlier.bench) as f64 / total,
        })
    }
}

/// (busy, total) of the aggregate `cpu` line of `/proc/stat`: user nice
/// system idle iowait irq softirq steal (guest time is already counted in
/// user). Idle and iowait are not busy.
fn machine_ticks(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let ticks: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .take(8)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    let idle = ticks.get(3)? + ticks.get(4).copied().unwrap_or(0);
    let total: u64 = ticks.iter().sum();
    Some((total.saturating_sub(idle), total))
}

/// CPU ticks of this process and of every process whose parent it is (the
/// harness starts each fleet process directly).
fn bench_ticks() -> Option<u64> {
    let me = std::process::id();
    let (_, mut ticks) = process_ticks(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
    for entry in std::fs::read_dir("/proc").ok()?.flatten() {
        let path = entry.path();
        if !is_pid_dir(&path) {
            continue;
        }
        // A process may exit between listing and reading.
        let Ok(stat) = std::fs::read_to_string(path.join("stat")) else {
            continue;
        };
        if let Some((parent, child)) = process_ticks(&stat) {
            if parent == me {
                ticks += child;
            }
        }
    }
    Some(ticks)
}

fn is_pid_dir(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
}

/// (parent pid, user + system ticks) from `/proc/<pid>/stat`. The command
/// name in parentheses may hold spaces, so fields count from its `)`.
fn process_ticks(stat: &str) -> Option<(u32, u64)> {
    let (_, rest) = stat.rsplit_once(')')?;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let parent = fields.get(1)?.parse().ok()?;
    let user: u64 = fields.get(11)?.parse().ok()?;
    let system: u64 = fields.get(12)?.parse().ok()?;
    Some((parent, user + system))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn machine_busy_share_between_two_readings() {
        let before = machine_ticks("cpu  100 0 50 800 50 0 0 0 0 0\ncpu0 1 2 3 4\n").unwrap();
        let after = machine_ticks("cpu  290 0 100 860 50 0 0 0 0 0\n").unwrap();
        assert_eq!(before, (150, 1_000));
        assert_eq!(after, (390, 1_300));
        assert_eq!(machine_ticks("intr 1 2 3"), None);
    }

    #[test]
    fn shares_over_all_cores() {
        let before = CpuTimes {
            busy: 150,
            total: 1_000,
            bench: 40,
        };
        let after = CpuTimes {
            busy: 390,
            total: 1_300,
            bench: 100,
        };
        let share = after.share_since(&before).unwrap();
        assert_eq!((share.machine, share.bench), (0.8, 0.2));
        assert_eq!(before.share_since(&before), None);
    }

    #[test]
    fn process_ticks_read_past_the_command_name() {
        let stat = "4242 (sim engine) S 17 4242 4242 0 -1 4194304 100 0 0 0 250 30 0 0 20 0 9 0";
        assert_eq!(process_ticks(stat), Some((17, 280)));
        assert_eq!(process_ticks("garbage"), None);
    }
}
