//! CPU time a process has used, from `/proc/<pid>/stat`.

use anyhow::Context;

/// User plus system CPU seconds `pid` has used so far (all its threads).
pub fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let path = format!("/proc/{pid}/stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let ticks = busy_ticks(&text).with_context(|| format!("{path} is not a stat line"))?;
    // SAFETY: sysconf only reads a configuration value.
    let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    anyhow::ensure!(per_second > 0, "sysconf(_SC_CLK_TCK) failed");
    Ok(ticks as f64 / per_second as f64)
}

/// `utime + stime` (fields 14 and 15) of a stat line. The command name
/// (field 2) is in parentheses and may hold spaces, so fields are counted
/// from its closing parenthesis.
fn busy_ticks(stat: &str) -> Option<u64> {
    let after_name = &stat[stat.rfind(')')? + 1..];
    let mut fields = after_name.split_whitespace().skip(11);
    let utime: u64 = fields.next()?.parse().ok()?;
    let stime: u64 = fields.next()?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fields_count_from_the_end_of_the_command_name() {
        let line = "4242 (kv side) car) S 1 4242 4242 0 -1 4194560 900 0 0 0 \
                    170 35 0 0 20 0 9 0 123 456 789";
        assert_eq!(busy_ticks(line), Some(205));
        assert_eq!(busy_ticks("garbage"), None);
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let spent = cpu_seconds(std::process::id()).unwrap();
        assert!(spent >= 0.0);
        assert!(cpu_seconds(u32::MAX).is_err());
    }
}
