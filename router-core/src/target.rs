//! Where one worker's requests go: the engine's address as Envoy's pool
//! knows it, and its data-parallel rank when one API server fronts several
//! ranks, each with its own KV cache (vLLM `--data-parallel-size`, SGLang
//! `--dp-size`). Such ranks share an address, so a router tells them apart
//! by [`Target::key`] and steers a request to its rank with
//! [`DATA_PARALLEL_RANK_HEADER`], which both engines' OpenAI servers read.

/// Request header naming the data-parallel rank that serves the request.
/// Read by vLLM 0.23–0.33 and SGLang 0.5.19–0.5.23, the releases checked;
/// vLLM 0.9.2 and SGLang 0.4.10 ignore it.
pub const DATA_PARALLEL_RANK_HEADER: &str = "x-data-parallel-rank";

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Target {
    address: String,
    data_parallel_rank: Option<u32>,
    /// `address#rank`, kept for ranks only: a key per request would cost an
    /// allocation per candidate in the decision's loop.
    rank_key: Option<String>,
}

impl Target {
    pub fn new(address: impl Into<String>, data_parallel_rank: Option<u32>) -> Self {
        let address = address.into();
        let rank_key = data_parallel_rank.map(|rank| format!("{address}#{rank}"));
        Self {
            address,
            data_parallel_rank,
            rank_key,
        }
    }

    /// `ip:port` of the engine's API server: what Envoy connects to, and
    /// what is reachable or not (every rank behind it at once).
    pub fn address(&self) -> &str {
        &self.address
    }

    pub fn data_parallel_rank(&self) -> Option<u32> {
        self.data_parallel_rank
    }

    /// One string per KV cache: the address, or `address#rank` for a rank.
    /// Ledgers of what a router sent where are keyed by it.
    pub fn key(&self) -> &str {
        self.rank_key.as_deref().unwrap_or(&self.address)
    }

    /// Whether what a ledger recorded under `key` went here: to this
    /// worker, or, for a target without a rank (a configured endpoint), to
    /// any rank behind its address (`ip:port` holds no `#`).
    pub fn was_sent(&self, key: &str) -> bool {
        match self.data_parallel_rank {
            Some(_) => self.key() == key,
            None => key.split_once('#').map_or(key, |(address, _)| address) == self.address,
        }
    }
}

impl From<&str> for Target {
    fn from(address: &str) -> Self {
        Self::new(address, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_behind_one_address_have_their_own_keys() {
        let plain = Target::from("10.0.0.8:8000");
        let rank0 = Target::new("10.0.0.8:8000", Some(0));
        let rank1 = Target::new("10.0.0.8:8000", Some(1));
        assert_eq!(plain.key(), "10.0.0.8:8000");
        assert_eq!(rank0.key(), "10.0.0.8:8000#0");
        assert_eq!(rank1.key(), "10.0.0.8:8000#1");
        assert_eq!(rank1.address(), plain.address());
        assert_eq!(rank1.data_parallel_rank(), Some(1));
        assert_ne!(rank0, plain);
        assert!(plain.was_sent(rank1.key()) && plain.was_sent(plain.key()));
        assert!(rank1.was_sent(rank1.key()) && !rank1.was_sent(rank0.key()));
        assert!(!rank1.was_sent(plain.key()));
        assert!(Target::from("[::1]:8000").was_sent("[::1]:8000#2"));
    }
}
