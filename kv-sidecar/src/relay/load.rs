//! Worker load from the engine's Prometheus metrics (docs/relay.md#input-formats-srcdecode), published
//! on `<prefix>.load.<model>.<worker_id>`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use prost::Message;
use router_core::protocol::WorkerLoad;
use tokio::sync::Notify;

use crate::relay::data_parallel::RankSeries;
use crate::relay::metrics::{unix_ms, RelayMetrics};
use kvmesh_config::EngineKind;

/// Metric names per engine: running, waiting, KV usage (0..1). vLLM renamed
/// its usage gauge; the older name is a fallback.
fn names(engine: EngineKind) -> (&'static str, &'static str, &'static [&'static str]) {
    match engine {
        EngineKind::Vllm => (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            &["vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"],
        ),
        EngineKind::Sglang => (
            "sglang:num_running_reqs",
            "sglang:num_queue_reqs",
            &["sglang:token_usage"],
        ),
        EngineKind::Trtllm => (
            "trtllm_num_requests_running",
            "trtllm_num_requests_waiting",
            &["trtllm_kv_cache_utilization"],
        ),
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Load {
    pub running: u32,
    pub waiting: u32,
    pub kv_usage: f64,
}

/// Reads the three load figures from Prometheus text exposition: of one
/// data-parallel rank's series when `rank` is given, else summing series
/// that differ only in labels (an engine's ranks, served as one worker).
/// `None` when none of the metrics is present: that is a misconfiguration,
/// not an idle engine.
pub fn parse(engine: EngineKind, text: &str, rank: Option<&RankSeries>) -> Option<Load> {
    let (running_name, waiting_name, usage_names) = names(engine);
    let (mut running, mut waiting) = (None::<f64>, None::<f64>);
    let mut usage: Vec<Option<f64>> = vec![None; usage_names.len()];
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((name, labels, value)) = sample(line) else {
            continue;
        };
        if rank.is_some_and(|rank| !rank.selects(labels)) {
            continue;
        }
        let add = |slot: &mut Option<f64>| *slot = Some(slot.unwrap_or(0.0) + value);
        if name == running_name {
            add(&mut running);
        } else if name == waiting_name {
            add(&mut waiting);
        } else if let Some(i) = usage_names.iter().position(|n| *n == name) {
            // A fraction per rank: the fullest rank bounds what still fits.
            usage[i] = Some(usage[i].map_or(value, |u: f64| u.max(value)));
        }
    }
    let kv_usage = usage.into_iter().flatten().next();
    if running.is_none() && waiting.is_none() && kv_usage.is_none() {
        return None;
    }
    let count = |v: Option<f64>| v.unwrap_or(0.0).clamp(0.0, f64::from(u32::MAX)) as u32;
    Some(Load {
        running: count(running),
        waiting: count(waiting),
        kv_usage: kv_usage.unwrap_or(0.0).clamp(0.0, 1.0),
    })
}

/// `name{labels} value [ts]` → (name, labels, value).
fn sample(line: &str) -> Option<(&str, &str, f64)> {
    let name_end = line.find(['{', ' ', '\t'])?;
    let name = &line[..name_end];
    let rest = &line[name_end..];
    let (labels, rest) = match rest.strip_prefix('{') {
        Some(labelled) => {
            let end = labelled.rfind('}')?;
            (&labelled[..end], &labelled[end + 1..])
        }
        None => ("", rest),
    };
    let value = rest.split_whitespace().next()?.parse::<f64>().ok()?;
    value.is_finite().then_some((name, labels, value))
}

/// Failed scrapes in a row after which the engine counts as unreachable:
/// one may be a hiccup, two at the load interval are a dead engine.
const UNREACHABLE_AFTER: u32 = 2;

pub struct LoadReporter {
    pub engine: EngineKind,
    /// The data-parallel rank whose series are this worker's load.
    pub rank: Option<RankSeries>,
    pub url: String,
    pub interval: Duration,
    pub subject: String,
    pub worker_id: String,
    pub model: String,
    pub client: async_nats::Client,
    pub metrics: RelayMetrics,
    /// Read by the heartbeat: the sidecar stops routing to an engine the
    /// relay cannot reach.
    pub engine_unreachable: Arc<AtomicBool>,
    /// Wakes the heartbeat when reachability changes.
    pub registration: Arc<Notify>,
}

impl LoadReporter {
    pub async fn run(self) {
        let http = reqwest::Client::new();
        let mut ticker = tokio::time::interval(self.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut failures = 0u32;
        loop {
            ticker.tick().await;
            let text = match self.scrape(&http).await {
                Ok(text) => {
                    failures = 0;
                    self.set_unreachable(false);
                    text
                }
                Err(error) => {
                    self.metrics.load_scrape_errors.inc();
                    failures = failures.saturating_add(1);
                    if failures >= UNREACHABLE_AFTER {
                        self.set_unreachable(true);
                    }
                    tracing::debug!(%error, url = %self.url, "scraping engine metrics failed");
                    continue;
                }
            };
            let Some(load) = parse(self.engine, &text, self.rank.as_ref()) else {
                self.metrics.load_scrape_errors.inc();
                tracing::warn!(url = %self.url, rank = ?self.rank, "engine metrics lack the load series of this engine kind (and rank)");
                continue;
            };
            let message = WorkerLoad {
                worker_id: self.worker_id.clone(),
                model: self.model.clone(),
                running: load.running,
                waiting: load.waiting,
                kv_usage: load.kv_usage,
                timestamp_ms: unix_ms(),
            };
            if let Err(error) = self
                .client
                .publish(self.subject.clone(), message.encode_to_vec().into())
                .await
            {
                self.metrics.publish_error("load");
                tracing::debug!(%error, "publishing load failed");
            }
        }
    }

    /// Records whether the engine answers, telling the sidecar at once (an
    /// immediate heartbeat) when that changes.
    fn set_unreachable(&self, unreachable: bool) {
        if self.engine_unreachable.swap(unreachable, Ordering::Relaxed) != unreachable {
            if unreachable {
                tracing::warn!(url = %self.url, "the engine stopped answering; reporting it unreachable");
            } else {
                tracing::info!(url = %self.url, "the engine answers again");
            }
            self.registration.notify_one();
        }
    }

    async fn scrape(&self, http: &reqwest::Client) -> Result<String, reqwest::Error> {
        http.get(&self.url)
            .timeout(Duration::from_secs(2))
            .send()
            .await?
            .error_for_status()?
            .text()
            .await
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vllm_metrics() {
        let text = "# HELP vllm:num_requests_running x\n\
            vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_waiting{model_name=\"m\"} 2\n\
            vllm:kv_cache_usage_perc{model_name=\"m\"} 0.25 1700000000\n\
            vllm:prefix_cache_hits_total{model_name=\"m\"} 10\n";
        assert_eq!(
            parse(EngineKind::Vllm, text, None),
            Some(Load {
                running: 3,
                waiting: 2,
                kv_usage: 0.25
            })
        );
    }

    #[test]
    fn sglang_and_trtllm_and_missing() {
        let sglang = "sglang:num_running_reqs 1\nsglang:num_queue_reqs 4\nsglang:token_usage 0.5\n";
        assert_eq!(
            parse(EngineKind::Sglang, sglang, None),
            Some(Load {
                running: 1,
                waiting: 4,
                kv_usage: 0.5
            })
        );
        let trt = "trtllm_num_requests_running 2\ntrtllm_num_requests_waiting 0\ntrtllm_kv_cache_utilization 0.9\n";
        assert_eq!(
            parse(EngineKind::Trtllm, trt, None).map(|l| l.running),
            Some(2)
        );
        assert_eq!(parse(EngineKind::Vllm, sglang, None), None);
        // Label values may contain braces and spaces.
        assert_eq!(
            sample("vllm:num_requests_running{model_name=\"a} b\"} 7"),
            Some(("vllm:num_requests_running", "model_name=\"a} b\"", 7.0))
        );
    }

    #[test]
    fn a_rank_reads_its_own_series_of_a_shared_endpoint() {
        // vLLM with --data-parallel-size 2: one /metrics, one series per
        // engine core.
        let text = "vllm:num_requests_running{engine=\"0\",model_name=\"m\"} 3.0\n\
            vllm:num_requests_running{engine=\"1\",model_name=\"m\"} 1.0\n\
            vllm:num_requests_waiting{engine=\"0\",model_name=\"m\"} 5\n\
            vllm:num_requests_waiting{engine=\"1\",model_name=\"m\"} 0\n\
            vllm:kv_cache_usage_perc{engine=\"0\",model_name=\"m\"} 0.75\n\
            vllm:kv_cache_usage_perc{engine=\"1\",model_name=\"m\"} 0.125\n";
        let rank = |r| RankSeries::new(EngineKind::Vllm, r).unwrap();
        let load = |r| parse(EngineKind::Vllm, text, Some(&rank(r)));
        assert_eq!(
            load(1),
            Some(Load {
                running: 1,
                waiting: 0,
                kv_usage: 0.125
            })
        );
        assert_eq!(load(0).map(|l| (l.running, l.waiting)), Some((3, 5)));
        assert_eq!(load(2), None, "a rank the engine does not have");
        let whole = parse(EngineKind::Vllm, text, None).unwrap();
        assert_eq!((whole.running, whole.waiting), (4, 5));
    }
}
