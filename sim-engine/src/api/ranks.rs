//! The data-parallel ranks behind one simulated API server
//! (`--data-parallel-size`), as vLLM runs them: each rank is an engine with
//! its own KV cache, scheduler, KV event publisher and metrics series
//! (labelled `engine="<rank>"`), and a request runs on the rank its
//! `X-Data-Parallel-Rank` header names, else on the least busy one.

use std::sync::Arc;

use axum::http::HeaderMap;
use router_core::target::DATA_PARALLEL_RANK_HEADER;

use super::error::ApiError;
use crate::engine::Engine;
use crate::metrics::{merge_expositions, EngineMetrics};

pub struct Rank {
    pub engine: Arc<Engine>,
    pub metrics: Arc<EngineMetrics>,
}

/// A rank of this server; only [`Ranks`] makes one, so it always exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RankId(usize);

impl RankId {
    pub fn index(self) -> usize {
        self.0
    }
}

pub struct Ranks(Vec<Rank>);

impl Ranks {
    /// `None` without a rank: a server runs at least one.
    pub fn new(ranks: Vec<Rank>) -> Option<Self> {
        (!ranks.is_empty()).then_some(Self(ranks))
    }

    pub fn get(&self, id: RankId) -> &Rank {
        &self.0[id.0]
    }

    pub fn first(&self) -> RankId {
        RankId(0)
    }

    /// The rank a request runs on: the one its header names (a 400 for a
    /// rank this server does not have, as vLLM refuses one), else the one
    /// with the fewest requests waiting, then running: a simpler rule than
    /// vLLM's own balancer (which also counts requests in flight to each
    /// engine and rotates its starting engine), as deterministic when idle.
    pub fn for_request(&self, headers: &HeaderMap) -> Result<RankId, ApiError> {
        let Some(value) = headers.get(DATA_PARALLEL_RANK_HEADER) else {
            return Ok(self.least_busy());
        };
        let rank = value
            .to_str()
            .ok()
            .and_then(|v| v.trim().parse::<usize>().ok())
            .filter(|rank| *rank < self.0.len())
            .ok_or_else(|| {
                ApiError::invalid(
                    format!(
                        "{DATA_PARALLEL_RANK_HEADER} must be a rank below {}",
                        self.0.len()
                    ),
                    None,
                )
            })?;
        Ok(RankId(rank))
    }

    fn least_busy(&self) -> RankId {
        let index = self
            .0
            .iter()
            .enumerate()
            .min_by_key(|(_, rank)| {
                let load = rank.engine.load();
                (load.waiting, load.running)
            })
            .map_or(0, |(index, _)| index);
        RankId(index)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Rank> {
        self.0.iter()
    }

    /// Every rank's metrics in one exposition, each family once.
    pub fn render_metrics(&self) -> String {
        let texts: Vec<String> = self.0.iter().map(|r| r.metrics.render()).collect();
        merge_expositions(&texts)
    }
}
