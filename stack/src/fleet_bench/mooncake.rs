//! Mooncake trace replay (FAST'25): one JSON object per line,
//! `{timestamp (ms), input_length, output_length, hash_ids}`, where each hash
//! id stands for one 512-token block and equal id prefixes are shared
//! prefixes. Each id becomes a deterministic block of token ids.

use std::io::BufRead;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Deserialize;

use crate::fleet_bench::workload::{Arrival, Conversation, Prompt, Workload};

/// Tokens each trace hash id stands for.
pub const TRACE_BLOCK_TOKENS: usize = 512;
/// How to give the replay its trace, for messages about a missing one.
pub const TRACE_HINT: &str = "pass a Mooncake-format JSONL trace (one {timestamp, input_length, output_length, hash_ids} object per line, as in FAST'25) with --trace FILE or KVMESH_TRACE=FILE";
/// Token ids drawn from `[FIRST_TOKEN, FIRST_TOKEN + TOKEN_RANGE)`: ordinary
/// vocabulary of any real tokenizer, clear of special tokens.
const FIRST_TOKEN: u32 = 1_000;
const TOKEN_RANGE: u64 = 100_000;

/// A trace as results name it: its file name, since where it sits on the
/// machine that replayed it is no part of the result.
pub fn trace_name(path: &Path) -> String {
    path.file_name().map_or_else(
        || path.display().to_string(),
        |name| name.to_string_lossy().into_owned(),
    )
}

#[derive(Debug, Deserialize)]
struct TraceRow {
    timestamp: u64,
    input_length: usize,
    output_length: u32,
    hash_ids: Vec<u64>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct MooncakeReplay {
    /// The Mooncake-format JSONL trace to replay. The project ships none:
    /// without one the default workloads leave Mooncake out.
    #[arg(long = "trace", env = "KVMESH_TRACE", value_name = "FILE")]
    pub trace: Option<PathBuf>,
    /// Replay the first this many requests of the trace; past its end, the
    /// trace again with fresh hash ids.
    #[arg(long, default_value_t = 1_200)]
    pub trace_requests: usize,
    /// Arrival times are divided by this (2: twice the trace's load).
    #[arg(long, default_value_t = 3.0)]
    pub trace_load_scale: f64,
    /// Longer prompts keep their first blocks only, as a deployment with
    /// this context length would see them.
    #[arg(long, default_value_t = 65_536)]
    pub trace_max_model_len: u32,
    #[arg(long, default_value_t = 30_000)]
    pub trace_cache_blocks: u32,
    /// Dense compute per prompt token of the simulated GPUs, µs (the
    /// timing model's 32 is an 8B model on an H100; less is a smaller model
    /// or faster GPU, so a small fleet keeps up with the trace's load).
    #[arg(long, default_value_t = 8.0)]
    pub trace_compute_us_per_token: f64,
    /// Simulated time runs this many times faster than real time. Above 1
    /// the gateway's own real-time work (buffering, parsing, deciding,
    /// reporting, on the machine's shared cores) is multiplied into the
    /// simulated latencies: at 4, precise routing's extra ~1-2 ms per
    /// request showed up as a 4-8 ms higher short-prompt TTFT p50 than
    /// round robin's, which vanished at 1 (docs/benchmarks.md).
    #[arg(long, default_value_t = 1.0)]
    pub trace_speedup: f64,
}

impl MooncakeReplay {
    /// The same replay for a fleet `factor` times larger: the trace's
    /// arrival rate and the requests replayed both × `factor`, so the run
    /// spans as much simulated time as before.
    pub fn scaled(&self, factor: f64) -> Self {
        Self {
            trace_requests: (self.trace_requests as f64 * factor).round().max(1.0) as usize,
            trace_load_scale: self.trace_load_scale * factor,
            ..self.clone()
        }
    }

    pub fn workload(&self) -> anyhow::Result<Workload> {
        anyhow::ensure!(
            self.trace_load_scale > 0.0,
            "--trace-load-scale must be positive"
        );
        let trace = self
            .trace
            .as_deref()
            .with_context(|| format!("no Mooncake trace: {TRACE_HINT}"))?;
        let rows = self.read_rows(trace)?;
        let passes = TracePasses::of(&rows);
        let mut arrivals = Vec::with_capacity(self.trace_requests);
        let mut truncated = 0;
        for index in 0..self.trace_requests {
            let row = passes.row(&rows, index);
            let (tokens, was_truncated) = prompt_tokens(&row, self.trace_max_model_len as usize)
                .with_context(|| {
                    format!("{}: request {}", trace.display(), index % rows.len() + 1)
                })?;
            truncated += usize::from(was_truncated);
            arrivals.push(Arrival {
                at: row.timestamp as f64 / 1_000.0 / self.trace_load_scale,
                conversation: Conversation::Single {
                    prompt: Prompt::TokenIds(tokens),
                    max_tokens: row.output_length.max(1),
                },
            });
        }
        let span = arrivals.last().map_or(0.0, |a| a.at);
        let repeated = if self.trace_requests > rows.len() {
            format!(
                ", {} passes over the trace's {} requests, each later pass with fresh hash ids",
                self.trace_requests.div_ceil(rows.len()),
                rows.len()
            )
        } else {
            String::new()
        };
        Ok(Workload {
            name: "mooncake".to_owned(),
            description: format!(
                "Mooncake trace {}: first {} requests ({:.0} s of trace at {}× its load{repeated}), token-id prompts, {} truncated to {} tokens of context",
                trace_name(trace),
                arrivals.len(), span, self.trace_load_scale, truncated, self.trace_max_model_len
            ),
            arrivals,
            cache_blocks: self.trace_cache_blocks,
            max_model_len: self.trace_max_model_len,
            sim_args: vec![format!(
                "--timing-compute-us-per-token={}",
                self.trace_compute_us_per_token
            )],
            speedup: self.trace_speedup,
        })
    }

    /// The trace's rows, up to `--trace-requests`, each checked.
    fn read_rows(&self, trace: &Path) -> anyhow::Result<Vec<TraceRow>> {
        let file = std::fs::File::open(trace)
            .with_context(|| format!("opening the trace {}", trace.display()))?;
        let mut rows = Vec::with_capacity(self.trace_requests);
        for (number, line) in std::io::BufReader::new(file).lines().enumerate() {
            if rows.len() == self.trace_requests {
                break;
            }
            let line = line.with_context(|| format!("reading {}", trace.display()))?;
            if line.trim().is_empty() {
                continue;
            }
            let row: TraceRow = serde_json::from_str(&line)
                .with_context(|| format!("{}:{}", trace.display(), number + 1))?;
            rows.push(row);
        }
        anyhow::ensure!(!rows.is_empty(), "{} holds no request", trace.display());
        Ok(rows)
    }
}

/// Replaying more requests than the trace holds: the trace again after its
/// end, as often as needed. Each later pass starts one mean inter-arrival
/// gap after the previous one ends, with every hash id shifted past the
/// trace's largest, so a pass is a fresh population of users whose prompts
/// share prefixes among themselves as the trace's do, never with another
/// pass.
struct TracePasses {
    /// Trace milliseconds from one pass's start to the next's.
    period_ms: u64,
    /// Added to every hash id per pass.
    id_shift: u64,
}

impl TracePasses {
    fn of(rows: &[TraceRow]) -> Self {
        let first = rows.first().map_or(0, |r| r.timestamp);
        let last = rows.last().map_or(0, |r| r.timestamp);
        let span = last.saturating_sub(first);
        let gaps = (rows.len() as u64).saturating_sub(1).max(1);
        let max_id = rows
            .iter()
            .flat_map(|r| r.hash_ids.iter().copied())
            .max()
            .unwrap_or(0);
        Self {
            period_ms: span + (span / gaps).max(1),
            id_shift: max_id.saturating_add(1),
        }
    }

    /// Request `index` of the replay.
    fn row(&self, rows: &[TraceRow], index: usize) -> TraceRow {
        let pass = (index / rows.len()) as u64;
        let row = &rows[index % rows.len()];
        TraceRow {
            timestamp: row.timestamp + pass * self.period_ms,
            input_length: row.input_length,
            output_length: row.output_length,
            hash_ids: row
                .hash_ids
                .iter()
                .map(|id| id + pass * self.id_shift)
                .collect(),
        }
    }
}

/// The prompt's token ids: the trace's blocks, the last one cut to
/// `input_length`; cut again, with room for the output, if longer than
/// `max_model_len`.
fn prompt_tokens(row: &TraceRow, max_model_len: usize) -> anyhow::Result<(Vec<u32>, bool)> {
    let available = row.hash_ids.len() * TRACE_BLOCK_TOKENS;
    anyhow::ensure!(
        row.input_length > 0 && row.input_length <= available,
        "input_length {} does not fit its {} hash ids",
        row.input_length,
        row.hash_ids.len()
    );
    let limit = max_model_len.saturating_sub(row.output_length.max(1) as usize);
    let length = row.input_length.min(limit);
    let tokens = row
        .hash_ids
        .iter()
        .flat_map(|&id| (0..TRACE_BLOCK_TOKENS).map(move |i| block_token(id, i)))
        .take(length)
        .collect();
    Ok((tokens, length < row.input_length))
}

/// Token `i` of the block hash id `id` stands for (splitmix64 of both).
fn block_token(id: u64, i: usize) -> u32 {
    let mut z = id
        .wrapping_mul(TRACE_BLOCK_TOKENS as u64)
        .wrapping_add(i as u64)
        .wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^= z >> 31;
    FIRST_TOKEN + (z % TOKEN_RANGE) as u32
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(hash_ids: Vec<u64>, input_length: usize) -> TraceRow {
        TraceRow {
            timestamp: 0,
            input_length,
            output_length: 8,
            hash_ids,
        }
    }

    #[test]
    fn equal_hash_id_prefixes_give_equal_token_prefixes() {
        let (a, _) = prompt_tokens(&row(vec![1, 2, 3], 1_200), 1 << 20).unwrap();
        let (b, _) = prompt_tokens(&row(vec![1, 2, 9], 1_500), 1 << 20).unwrap();
        assert_eq!(a.len(), 1_200);
        assert_eq!(b.len(), 1_500);
        assert_eq!(a[..1_024], b[..1_024]);
        assert_ne!(a[1_024..1_200], b[1_024..1_200]);
    }

    #[test]
    fn long_prompts_are_cut_to_the_context_length() {
        let (tokens, cut) = prompt_tokens(&row(vec![1, 2, 3, 4], 2_000), 1_000).unwrap();
        assert!(cut);
        assert_eq!(tokens.len(), 992);
    }

    #[test]
    fn later_passes_follow_the_trace_with_fresh_hash_ids() {
        let rows = vec![
            TraceRow {
                timestamp: 100,
                ..row(vec![1, 2], 700)
            },
            TraceRow {
                timestamp: 400,
                ..row(vec![1, 5], 900)
            },
        ];
        let passes = TracePasses::of(&rows);
        let first = passes.row(&rows, 1);
        assert_eq!((first.timestamp, first.hash_ids), (400, vec![1, 5]));
        // One mean gap (300 ms) after the first pass's end; ids past 5.
        let again = passes.row(&rows, 2);
        assert_eq!((again.timestamp, again.hash_ids), (700, vec![7, 8]));
        let third = passes.row(&rows, 5);
        assert_eq!((third.timestamp, third.hash_ids), (1_600, vec![13, 17]));
    }

    #[test]
    fn scaling_keeps_the_replayed_trace_span() {
        let replay = MooncakeReplay {
            trace: Some(PathBuf::from("trace.jsonl")),
            trace_requests: 1_200,
            trace_load_scale: 3.0,
            trace_max_model_len: 65_536,
            trace_cache_blocks: 30_000,
            trace_compute_us_per_token: 8.0,
            trace_speedup: 4.0,
        };
        let scaled = replay.scaled(4.0);
        assert_eq!(scaled.trace_requests, 4_800);
        assert_eq!(scaled.trace_load_scale, 12.0);
        assert_eq!(scaled.trace_cache_blocks, 30_000);
    }

    #[test]
    fn rows_whose_length_exceeds_their_blocks_are_rejected() {
        assert!(prompt_tokens(&row(vec![1], 600), 1 << 20).is_err());
        assert!(prompt_tokens(&row(vec![], 0), 1 << 20).is_err());
    }
}
