//! Prometheus metrics under vLLM's names, labelled `model_name` and
//! `engine` (the data-parallel rank, `0` without data parallelism, as vLLM
//! labels them), so load scrapers written for vLLM work unchanged.
//! prometheus-client appends `_total` to counters itself, so counters are
//! registered without it.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::atomic::AtomicU64;
use std::sync::Mutex;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use crate::scheduler::SchedulerCounters;

/// vLLM's `vllm:time_to_first_token_seconds` buckets.
const TTFT_BUCKETS: [f64; 22] = [
    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
];

/// Load figures, also reported in ORCA `endpoint-load-metrics` headers.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadSnapshot {
    pub running: usize,
    pub waiting: usize,
    pub kv_cache_usage: f64,
}

pub struct EngineMetrics {
    registry: Registry,
    running: Gauge,
    waiting: Gauge,
    kv_cache_usage: Gauge<f64, AtomicU64>,
    prefix_cache_queries: Counter,
    prefix_cache_hits: Counter,
    prompt_tokens: Counter,
    generation_tokens: Counter,
    preemptions: Counter,
    time_to_first_token: Histogram,
    kv_blocks_received: Counter,
    kv_blocks_sent: Counter,
    remote_prefill_fallbacks: Counter,
    /// Counter values already exported, to add only the difference.
    exported: Mutex<SchedulerCounters>,
}

impl EngineMetrics {
    pub fn new(model: &str, rank: usize) -> Self {
        let mut registry = Registry::with_labels(
            [
                (Cow::Borrowed("engine"), Cow::Owned(rank.to_string())),
                (Cow::Borrowed("model_name"), Cow::Owned(model.to_owned())),
            ]
            .into_iter(),
        );
        let metrics = Self {
            running: Gauge::default(),
            waiting: Gauge::default(),
            kv_cache_usage: Gauge::default(),
            prefix_cache_queries: Counter::default(),
            prefix_cache_hits: Counter::default(),
            prompt_tokens: Counter::default(),
            generation_tokens: Counter::default(),
            preemptions: Counter::default(),
            time_to_first_token: Histogram::new(TTFT_BUCKETS),
            kv_blocks_received: Counter::default(),
            kv_blocks_sent: Counter::default(),
            remote_prefill_fallbacks: Counter::default(),
            exported: Mutex::new(SchedulerCounters::default()),
            registry: Registry::default(),
        };
        // prometheus-client ends help texts with a period itself.
        registry.register(
            "vllm:num_requests_running",
            "Number of requests in model execution batches",
            metrics.running.clone(),
        );
        registry.register(
            "vllm:num_requests_waiting",
            "Number of requests waiting to be processed",
            metrics.waiting.clone(),
        );
        registry.register(
            "vllm:kv_cache_usage_perc",
            "KV-cache usage. 1 means 100 percent usage",
            metrics.kv_cache_usage.clone(),
        );
        registry.register(
            "vllm:prefix_cache_queries",
            "Prefix cache queries, in terms of number of queried tokens",
            metrics.prefix_cache_queries.clone(),
        );
        registry.register(
            "vllm:prefix_cache_hits",
            "Prefix cache hits, in terms of number of cached tokens",
            metrics.prefix_cache_hits.clone(),
        );
        registry.register(
            "vllm:prompt_tokens",
            "Number of prefill tokens processed",
            metrics.prompt_tokens.clone(),
        );
        registry.register(
            "vllm:generation_tokens",
            "Number of generation tokens processed",
            metrics.generation_tokens.clone(),
        );
        registry.register(
            "vllm:num_preemptions",
            "Cumulative number of preemptions from the engine",
            metrics.preemptions.clone(),
        );
        registry.register(
            "vllm:time_to_first_token_seconds",
            "Histogram of time to first token in seconds (simulated time)",
            metrics.time_to_first_token.clone(),
        );
        registry.register(
            "sim:kv_transfer_blocks_received",
            "KV blocks pulled from prefill engines (remote prefill)",
            metrics.kv_blocks_received.clone(),
        );
        registry.register(
            "sim:kv_transfer_blocks_sent",
            "KV blocks handed to decode engines",
            metrics.kv_blocks_sent.clone(),
        );
        registry.register(
            "sim:remote_prefill_fallbacks",
            "Decode requests with kv_transfer_params that prefilled locally",
            metrics.remote_prefill_fallbacks.clone(),
        );
        Self {
            registry,
            ..metrics
        }
    }

    pub fn kv_blocks_received(&self, blocks: u64) {
        self.kv_blocks_received.inc_by(blocks);
    }

    pub fn kv_blocks_sent(&self, blocks: u64) {
        self.kv_blocks_sent.inc_by(blocks);
    }

    pub fn remote_prefill_fallback(&self) {
        self.remote_prefill_fallbacks.inc();
    }

    /// Publishes the scheduler's current state and new first-token times.
    pub fn record(&self, load: LoadSnapshot, counters: SchedulerCounters, first_tokens: &[f64]) {
        self.running
            .set(i64::try_from(load.running).unwrap_or(i64::MAX));
        self.waiting
            .set(i64::try_from(load.waiting).unwrap_or(i64::MAX));
        self.kv_cache_usage.set(load.kv_cache_usage);
        let mut exported = self.exported.lock().unwrap_or_else(|p| p.into_inner());
        let pairs = [
            (
                &self.prefix_cache_queries,
                counters.prefix_cache_queries,
                exported.prefix_cache_queries,
            ),
            (
                &self.prefix_cache_hits,
                counters.prefix_cache_hits,
                exported.prefix_cache_hits,
            ),
            (
                &self.prompt_tokens,
                counters.prompt_tokens,
                exported.prompt_tokens,
            ),
            (
                &self.generation_tokens,
                counters.generation_tokens,
                exported.generation_tokens,
            ),
            (
                &self.preemptions,
                counters.preemptions,
                exported.preemptions,
            ),
        ];
        for (counter, now, before) in pairs {
            counter.inc_by(now.saturating_sub(before));
        }
        *exported = counters;
        for ttft in first_tokens {
            self.time_to_first_token.observe(*ttft);
        }
    }

    /// The exposition in Prometheus text format 0.0.4, as vLLM serves it.
    pub fn render(&self) -> String {
        let mut open_metrics = String::new();
        if let Err(error) = encode(&mut open_metrics, &self.registry) {
            tracing::error!(%error, "encoding metrics failed");
        }
        to_text_format(&open_metrics)
    }
}

/// Several ranks' expositions as one, as one process serves them: each
/// family's `# HELP`/`# TYPE` once, then every rank's samples of it.
pub fn merge_expositions(texts: &[String]) -> String {
    let mut order: Vec<&str> = Vec::new();
    let mut families: HashMap<&str, (Vec<&str>, Vec<&str>)> = HashMap::new();
    for text in texts {
        let mut family = None;
        for line in text.lines() {
            let header = line
                .strip_prefix("# HELP ")
                .or_else(|| line.strip_prefix("# TYPE "));
            if let Some(rest) = header {
                let name = rest.split(' ').next().unwrap_or_default();
                let (headers, _) = families.entry(name).or_insert_with(|| {
                    order.push(name);
                    Default::default()
                });
                if !headers.contains(&line) {
                    headers.push(line);
                }
                family = Some(name);
            } else if let Some((_, samples)) = family.and_then(|name| families.get_mut(name)) {
                samples.push(line);
            }
        }
    }
    let mut merged = String::new();
    for name in order {
        let Some((headers, samples)) = families.get(name) else {
            continue;
        };
        for line in headers.iter().chain(samples) {
            merged.push_str(line);
            merged.push('\n');
        }
    }
    merged
}

/// prometheus-client writes OpenMetrics: counters' `# HELP`/`# TYPE` lines
/// name the family without `_total`, and a `# EOF` line ends the text.
/// Prometheus text 0.0.4 (what vLLM's Python client serves, with
/// `text/plain; version=0.0.4`) names them with `_total` and has no `# EOF`.
fn to_text_format(open_metrics: &str) -> String {
    let mut counters = std::collections::HashSet::new();
    for line in open_metrics.lines() {
        if let Some(name) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.strip_suffix(" counter"))
        {
            counters.insert(name.to_owned());
        }
    }
    let mut text = String::with_capacity(open_metrics.len() + 64);
    for line in open_metrics.lines() {
        if line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        text.push_str(renamed.as_deref().unwrap_or(line));
        text.push('\n');
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exposes_vllm_names_with_model_label() {
        let metrics = EngineMetrics::new("qwen3", 0);
        let counters = SchedulerCounters {
            prefix_cache_queries: 10,
            prefix_cache_hits: 4,
            ..SchedulerCounters::default()
        };
        let load = LoadSnapshot {
            running: 2,
            waiting: 1,
            kv_cache_usage: 0.25,
        };
        metrics.record(load, counters, &[0.05]);
        metrics.record(load, counters, &[]);
        let text = metrics.render();
        for line in [
            "vllm:num_requests_running{engine=\"0\",model_name=\"qwen3\"} 2",
            "vllm:num_requests_waiting{engine=\"0\",model_name=\"qwen3\"} 1",
            "vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"qwen3\"} 0.25",
            "vllm:prefix_cache_queries_total{engine=\"0\",model_name=\"qwen3\"} 10",
            "vllm:prefix_cache_hits_total{engine=\"0\",model_name=\"qwen3\"} 4",
            "vllm:time_to_first_token_seconds_count{engine=\"0\",model_name=\"qwen3\"} 1",
            "# TYPE vllm:prefix_cache_hits_total counter",
        ] {
            assert!(text.contains(line), "missing {line} in\n{text}");
        }
        assert!(!text.contains("# EOF"));
    }

    #[test]
    fn ranks_share_one_exposition() {
        let ranks: Vec<EngineMetrics> = (0..2).map(|r| EngineMetrics::new("m", r)).collect();
        let load = |running| LoadSnapshot {
            running,
            waiting: 0,
            kv_cache_usage: 0.0,
        };
        ranks[0].record(load(3), SchedulerCounters::default(), &[]);
        ranks[1].record(load(5), SchedulerCounters::default(), &[0.1]);
        let texts: Vec<String> = ranks.iter().map(EngineMetrics::render).collect();
        let merged = merge_expositions(&texts);
        let lines: Vec<&str> = merged.lines().collect();
        let at = |line: &str| lines.iter().position(|l| *l == line);
        let help = at("# TYPE vllm:num_requests_running gauge").unwrap();
        let rank0 = at("vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3").unwrap();
        let rank1 = at("vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 5").unwrap();
        assert!(help < rank0 && rank0 < rank1);
        // A counter renamed to `_total` and a histogram: one TYPE line and
        // every rank's samples right after it, a family's lines together.
        for (family, samples) in [
            (
                "vllm:prompt_tokens_total counter",
                "vllm:prompt_tokens_total{",
            ),
            (
                "vllm:time_to_first_token_seconds histogram",
                "vllm:time_to_first_token_seconds_",
            ),
        ] {
            let header = at(&format!("# TYPE {family}")).unwrap();
            let own: Vec<usize> = (0..lines.len())
                .filter(|i| lines[*i].starts_with(samples))
                .collect();
            let per_rank = texts[0].lines().filter(|l| l.starts_with(samples)).count();
            assert_eq!(own.len(), 2 * per_rank, "{family}");
            assert_eq!(own[0], header + 1, "{family}");
            assert_eq!(own[own.len() - 1], header + own.len(), "{family}");
            assert!(lines[own[per_rank]].contains("engine=\"1\""), "{family}");
        }
        assert_eq!(
            lines.iter().filter(|l| l.starts_with("# TYPE ")).count(),
            texts[0]
                .lines()
                .filter(|l| l.starts_with("# TYPE "))
                .count()
        );
        assert_eq!(
            merged.lines().count(),
            texts.iter().map(|t| t.lines().count()).sum::<usize>()
                - texts[1].lines().filter(|l| l.starts_with('#')).count()
        );
    }
}
