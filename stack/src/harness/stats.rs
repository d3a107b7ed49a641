//! Summaries of measured samples for the benchmarks.

/// The `q` quantile (0 ≤ q ≤ 1, nearest rank) of `samples`; 0 when empty.
pub fn quantile(samples: &mut [f64], q: f64) -> f64 {
    samples.sort_unstable_by(f64::total_cmp);
    let last = samples.len().saturating_sub(1);
    let index = ((last as f64) * q.clamp(0.0, 1.0)).round() as usize;
    samples.get(index).copied().unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut samples = vec![5.0, 1.0, 3.0, 2.0, 4.0];
        assert_eq!(quantile(&mut samples, 0.0), 1.0);
        assert_eq!(quantile(&mut samples, 0.5), 3.0);
        assert_eq!(quantile(&mut samples, 1.0), 5.0);
        assert_eq!(quantile(&mut [], 0.5), 0.0);
    }
}
