//! One data-parallel rank of an engine whose API server fronts several
//! (vLLM `--data-parallel-size`, SGLang `--dp-size`): each rank has its own
//! KV cache, its own event publisher and its own series in the shared
//! `/metrics`; the relay of that rank reads only its series
//! (docs/engines.md#data-parallel-ranks). Its events come from
//! [`kvmesh_config::data_parallel::offset_endpoint`].

use thiserror::Error;

use kvmesh_config::data_parallel::rank_label;
use kvmesh_config::EngineKind;

#[derive(Debug, Error, PartialEq, Eq)]
#[error("--data-parallel-rank is not supported for {0:?}: TensorRT-LLM's attention data parallelism publishes every rank from one server")]
pub struct UnrankedEngine(EngineKind);

/// Which series of the engine's `/metrics` are the rank's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RankSeries {
    label: &'static str,
    value: String,
}

impl RankSeries {
    pub fn new(engine: EngineKind, rank: u32) -> Result<Self, UnrankedEngine> {
        let label = rank_label(engine).ok_or(UnrankedEngine(engine))?;
        Ok(Self {
            label,
            value: rank.to_string(),
        })
    }

    /// Whether a sample with these labels (the text between its braces) is
    /// the rank's.
    pub fn selects(&self, labels: &str) -> bool {
        label_value(labels, self.label).is_some_and(|value| value == self.value)
    }
}

/// The value of label `name` in `a="x",b="y\"z"`, raw (escapes kept: a
/// rank's digits have none).
fn label_value<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    let mut rest = labels;
    loop {
        let (key, after) = rest.split_once('=')?;
        let after = after.strip_prefix('"')?;
        let end = closing_quote(after)?;
        if key.trim().trim_start_matches(',').trim() == name {
            return Some(&after[..end]);
        }
        rest = after.get(end + 1..)?;
    }
}

/// Index of the first `"` not escaped by a backslash.
fn closing_quote(text: &str) -> Option<usize> {
    let mut escaped = false;
    for (i, c) in text.char_indices() {
        match c {
            '\\' if !escaped => escaped = true,
            '"' if !escaped => return Some(i),
            _ => escaped = false,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rank_selects_its_own_series() {
        let vllm = RankSeries::new(EngineKind::Vllm, 1).unwrap();
        assert!(vllm.selects(r#"engine="1",model_name="m""#));
        assert!(vllm.selects(r#"model_name="a\",engine=\"0",engine="1""#));
        assert!(!vllm.selects(r#"engine="0",model_name="m""#));
        assert!(!vllm.selects(r#"engine="10",model_name="m""#));
        assert!(!vllm.selects(r#"model_name="engine=\"1\"""#));
        assert!(!vllm.selects(""));
        let sglang = RankSeries::new(EngineKind::Sglang, 0).unwrap();
        assert!(sglang.selects(r#"dp_rank="0",tp_rank="0""#));
        assert!(!sglang.selects(r#"engine="0""#));
        assert_eq!(
            RankSeries::new(EngineKind::Trtllm, 0),
            Err(UnrankedEngine(EngineKind::Trtllm))
        );
    }
}
