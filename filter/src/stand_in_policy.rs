//! Stand-in endpoint choice until KV-aware selection lands: rendezvous hashing
//! of the prompt's first full block over the configured endpoints.
//!
//! Prompts that share their first block land together (a crude prefix
//! affinity), different prompts spread evenly, and adding or removing one
//! endpoint only moves the prompts that hashed to it.

use router_core::SeqHash;
use xxhash_rust::xxh3::xxh3_64_with_seed;

/// The endpoint with the highest rendezvous weight for `first_block`.
pub fn pick(first_block: SeqHash, endpoints: &[String]) -> Option<&str> {
    endpoints
        .iter()
        .max_by_key(|endpoint| xxh3_64_with_seed(endpoint.as_bytes(), first_block.0))
        .map(String::as_str)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn endpoints(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("127.0.0.1:{}", 8000 + i)).collect()
    }

    #[test]
    fn stable_and_spread() {
        let eps = endpoints(4);
        let mut counts = [0usize; 4];
        for key in 0..4000u64 {
            let chosen = pick(SeqHash(key.wrapping_mul(0x9e37_79b9_7f4a_7c15)), &eps).unwrap();
            assert_eq!(
                Some(chosen),
                pick(SeqHash(key.wrapping_mul(0x9e37_79b9_7f4a_7c15)), &eps)
            );
            let index = eps.iter().position(|e| e == chosen).unwrap();
            counts[index] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    #[test]
    fn removing_an_endpoint_moves_only_its_keys() {
        let eps = endpoints(4);
        let fewer: Vec<String> = eps[..3].to_vec();
        for key in 0..1000u64 {
            let before = pick(SeqHash(key), &eps).unwrap();
            if before != eps[3] {
                assert_eq!(pick(SeqHash(key), &fewer), Some(before));
            }
        }
        assert_eq!(pick(SeqHash(1), &[]), None);
    }
}
