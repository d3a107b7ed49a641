//! How long one engine iteration takes, in simulated seconds.
//!
//! A roofline model of a dense transformer step. Defaults approximate an 8B
//! model (Llama-3-8B shape: 32 layers, hidden 4096, 8 KV heads, bf16) on one
//! H100 SXM (3.35 TB/s HBM, ~500 TFLOP/s sustained bf16):
//!
//! * weights: 16 GB streamed once per step → ≥ 4.8 ms even for one token;
//! * dense compute: 2 × 8e9 FLOP per token ÷ 500 TFLOP/s ≈ 32 µs per token;
//!   the step's linear part is `max(weights, tokens × 32 µs)`;
//! * prefill attention: 4 × layers × hidden FLOP per (query, key) pair
//!   ≈ 0.5 MFLOP → ~1 ns per pair; a chunk of `n` new tokens after `c` cached
//!   or earlier tokens has `n × (c + n/2)` pairs (causal);
//! * decode attention is memory-bound: 128 KiB of KV per context token
//!   ÷ 3.35 TB/s ≈ 39 ns per context token per decoding sequence;
//! * plus a fixed 1 ms of scheduling, launch and sampling overhead.
//!
//! Only scheduled (uncached) tokens cost prefill time, so prefix-cache hits
//! shorten time to first token as they do on a real engine.

use clap::Args;

#[derive(Debug, Clone, Args)]
pub struct TimingModel {
    /// Fixed cost of every iteration (scheduling, launches, sampling), ms.
    #[arg(long, default_value_t = 1.0)]
    pub timing_iteration_overhead_ms: f64,
    /// Time to stream the weights once: floor of any step, ms.
    #[arg(long, default_value_t = 4.8)]
    pub timing_weights_ms: f64,
    /// Dense (MLP + projections) compute per batched token, µs.
    #[arg(long, default_value_t = 32.0)]
    pub timing_compute_us_per_token: f64,
    /// Prefill attention per (query, key) token pair, ns.
    #[arg(long, default_value_t = 1.0)]
    pub timing_attention_ns_per_pair: f64,
    /// Decode attention per context token of each decoding sequence, ns.
    #[arg(long, default_value_t = 39.0)]
    pub timing_kv_read_ns_per_token: f64,
}

impl Default for TimingModel {
    fn default() -> Self {
        Self {
            timing_iteration_overhead_ms: 1.0,
            timing_weights_ms: 4.8,
            timing_compute_us_per_token: 32.0,
            timing_attention_ns_per_pair: 1.0,
            timing_kv_read_ns_per_token: 39.0,
        }
    }
}

/// What one iteration computes, accumulated while scheduling.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct BatchShape {
    /// Tokens whose KV is computed this step (prefill chunks + one per decode).
    pub tokens: usize,
    /// Causal (query, key) pairs of all prefill chunks.
    pub prefill_pairs: f64,
    /// Context tokens read by all decoding sequences.
    pub decode_context_tokens: usize,
}

impl BatchShape {
    /// A prefill chunk of `new_tokens` after `context_before` tokens already in KV.
    pub fn add_prefill(&mut self, new_tokens: usize, context_before: usize) {
        self.tokens += new_tokens;
        let n = new_tokens as f64;
        self.prefill_pairs += n * (context_before as f64 + n / 2.0);
    }

    /// One decode token of a sequence with `context` tokens in KV.
    pub fn add_decode(&mut self, context: usize) {
        self.tokens += 1;
        self.decode_context_tokens += context;
    }

    pub fn is_empty(&self) -> bool {
        self.tokens == 0
    }
}

impl TimingModel {
    pub fn validate(&self) -> anyhow::Result<()> {
        let all = [
            self.timing_iteration_overhead_ms,
            self.timing_weights_ms,
            self.timing_compute_us_per_token,
            self.timing_attention_ns_per_pair,
            self.timing_kv_read_ns_per_token,
        ];
        anyhow::ensure!(
            all.iter().all(|v| v.is_finite() && *v >= 0.0),
            "timing parameters must be finite and non-negative"
        );
        Ok(())
    }

    /// Simulated duration of one iteration in seconds (0 for an empty batch).
    pub fn iteration_seconds(&self, batch: &BatchShape) -> f64 {
        if batch.is_empty() {
            return 0.0;
        }
        let linear = (self.timing_weights_ms * 1e-3)
            .max(batch.tokens as f64 * self.timing_compute_us_per_token * 1e-6);
        let prefill_attention = batch.prefill_pairs * self.timing_attention_ns_per_pair * 1e-9;
        let decode_attention =
            batch.decode_context_tokens as f64 * self.timing_kv_read_ns_per_token * 1e-9;
        self.timing_iteration_overhead_ms * 1e-3 + linear + prefill_attention + decode_attention
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn prefill(new: usize, cached: usize) -> f64 {
        let mut b = BatchShape::default();
        b.add_prefill(new, cached);
        TimingModel::default().iteration_seconds(&b)
    }

    fn decode(batch: usize, context: usize) -> f64 {
        let mut b = BatchShape::default();
        for _ in 0..batch {
            b.add_decode(context);
        }
        TimingModel::default().iteration_seconds(&b)
    }

    #[test]
    fn empty_batch_costs_nothing() {
        assert_eq!(
            TimingModel::default().iteration_seconds(&BatchShape::default()),
            0.0
        );
    }

    #[test]
    fn cached_prefix_shortens_prefill() {
        // 8k prompt cold vs the same prompt with 7k tokens cached.
        let cold = prefill(8192, 0);
        let warm = prefill(1192, 7000);
        assert!(warm < cold / 3.0, "cold {cold} warm {warm}");
        // An 8k cold prefill of an 8B model on an H100 is a few hundred ms.
        assert!((0.2..0.6).contains(&cold), "cold prefill {cold}");
    }

    #[test]
    fn single_decode_step_is_weight_bound() {
        let step = decode(1, 100);
        assert!((0.0055..0.0065).contains(&step), "{step}");
    }

    #[test]
    fn decode_step_grows_with_batch_and_context() {
        assert!(decode(256, 1000) > decode(16, 1000));
        assert!(decode(16, 8000) > decode(16, 1000));
    }

    #[test]
    fn prefill_grows_superlinearly_with_length() {
        let short = prefill(1000, 0);
        let long = prefill(16000, 0);
        assert!(long > 16.0 * (short - 0.001));
    }
}
