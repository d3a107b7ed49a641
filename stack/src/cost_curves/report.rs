//! The cost curves as a markdown table and a CSV.

use std::fmt::Write as _;

use crate::cost_curves::run::SizeResult;

const MIB: f64 = 1024.0 * 1024.0;

/// One line per fleet size, with the command that measured them above.
pub fn markdown(command: &str, rows: &[SizeResult]) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "Command: `{command}`\n");
    let _ = writeln!(
        out,
        "| workers | index entries | events/s | sidecar CPU per 1k events/s | stream per VM | filter memory per VM | fresh subscriber's snapshot | filter applies it | longest snapshot callback | delta callback p99 / max |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|---|");
    for row in rows {
        let _ = writeln!(
            out,
            "| {} | {} | {:.0} | {:.2}% of a core | {:.1} kB/s ({:.0} msg/s) | {:.1} MiB | {:.1} ms ({} chunks, {:.1} MiB) | {:.1} ms | {:.0} µs | {:.0} / {:.0} µs |",
            row.workers,
            row.index_entries,
            row.events_per_s,
            row.cpu_percent_per_1k_events(),
            row.stream_bytes_per_s / 1e3,
            row.stream_messages_per_s,
            row.vm_memory_bytes / MIB,
            row.snapshot.elapsed.as_secs_f64() * 1e3,
            row.snapshot.chunks,
            row.snapshot.bytes as f64 / MIB,
            row.filter_snapshot_ms,
            row.snapshot_callback_max_us,
            row.delta_callback_p99_us,
            row.delta_callback_max_us,
        );
    }
    growth(&mut out, rows);
    out
}

/// How each cost grew from the smallest fleet to the largest, beside how
/// the fleet grew: linear or better means no faster than the workers (or,
/// for per-event costs, not at all).
fn growth(out: &mut String, rows: &[SizeResult]) {
    let (Some(first), Some(last)) = (rows.first(), rows.last()) else {
        return;
    };
    if rows.len() < 2 {
        return;
    }
    let ratio = |f: fn(&SizeResult) -> f64| {
        let (from, to) = (f(first), f(last));
        if from > 0.0 {
            format!("×{:.2}", to / from)
        } else {
            "–".to_owned()
        }
    };
    let _ = writeln!(
        out,
        "
From {} to {} workers (×{:.0}; index entries {}): sidecar CPU per 1k events/s {}, stream bytes per VM {}, filter memory per VM {}, snapshot to a fresh subscriber {}, filter's snapshot apply {}, longest callback {}.",
        first.workers,
        last.workers,
        last.workers as f64 / first.workers.max(1) as f64,
        ratio(|r| r.index_entries as f64),
        ratio(SizeResult::cpu_percent_per_1k_events),
        ratio(|r| r.stream_bytes_per_s),
        ratio(|r| r.vm_memory_bytes),
        ratio(|r| r.snapshot.elapsed.as_secs_f64()),
        ratio(|r| r.filter_snapshot_ms),
        ratio(SizeResult::largest_callback_us),
    );
}

pub fn csv(rows: &[SizeResult]) -> String {
    let mut out = String::from(
        "workers,index_entries,events_per_s,sidecar_cores,sidecar_cpu_percent_per_1k_events,stream_bytes_per_s,stream_messages_per_s,vm_memory_bytes,vms,streams,snapshot_ms,snapshot_chunks,snapshot_blocks,snapshot_bytes,filter_snapshot_ms,snapshot_callback_max_us,delta_callback_p99_us,delta_callback_max_us\n",
    );
    for row in rows {
        let _ = writeln!(
            out,
            "{},{},{:.1},{:.4},{:.4},{:.0},{:.1},{:.0},{},{},{:.3},{},{},{},{:.3},{:.0},{:.0},{:.0}",
            row.workers,
            row.index_entries,
            row.events_per_s,
            row.sidecar_cores,
            row.cpu_percent_per_1k_events(),
            row.stream_bytes_per_s,
            row.stream_messages_per_s,
            row.vm_memory_bytes,
            row.vms,
            row.streams,
            row.snapshot.elapsed.as_secs_f64() * 1e3,
            row.snapshot.chunks,
            row.snapshot.blocks,
            row.snapshot.bytes,
            row.filter_snapshot_ms,
            row.snapshot_callback_max_us,
            row.delta_callback_p99_us,
            row.delta_callback_max_us,
        );
    }
    out
}
