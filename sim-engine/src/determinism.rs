//! Small deterministic pseudo-randomness: outputs and fault draws must repeat
//! exactly for the same request, so tests and benchmarks are reproducible.

/// SplitMix64 finalizer: a well-mixed 64-bit hash of `x`.
pub fn mix64(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// Maps a hash to [0, 1) using its top 53 bits.
pub fn unit_interval(hash: u64) -> f64 {
    (hash >> 11) as f64 / (1u64 << 53) as f64
}

/// FNV-1a over bytes: a stable seed from a request id or prompt.
pub fn seed_from_bytes(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// An endless deterministic stream of hashes from a seed.
#[derive(Debug, Clone)]
pub struct HashStream {
    state: u64,
}

impl HashStream {
    pub fn new(seed: u64) -> Self {
        Self { state: seed }
    }

    pub fn next_hash(&mut self) -> u64 {
        self.state = self.state.wrapping_add(1);
        mix64(self.state)
    }

    /// Uniform index below `bound` (bound > 0).
    pub fn below(&mut self, bound: usize) -> usize {
        (self.next_hash() % bound.max(1) as u64) as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn streams_repeat_for_equal_seeds() {
        let a: Vec<u64> = {
            let mut s = HashStream::new(7);
            (0..5).map(|_| s.next_hash()).collect()
        };
        let mut s = HashStream::new(7);
        let b: Vec<u64> = (0..5).map(|_| s.next_hash()).collect();
        assert_eq!(a, b);
        assert_ne!(seed_from_bytes(b"a"), seed_from_bytes(b"b"));
        assert!((0.0..1.0).contains(&unit_interval(u64::MAX)));
    }
}
