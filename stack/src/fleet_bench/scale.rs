//! Workloads sized for a bigger fleet. Each workload's defaults are sized
//! for 4 GPUs; scaling by a factor multiplies its arrival rate and what
//! there is to route (requests, tenants, sessions, trace requests) so every
//! GPU sees the same load and cache pressure as in the 4-GPU run and the run
//! lasts as long in simulated time.

use std::fmt;
use std::str::FromStr;

/// GPUs the workloads' defaults are sized for.
pub const SIZED_FOR_WORKERS: usize = 4;

/// `--scale`: a factor, or `auto` for the fleet's size over
/// [`SIZED_FOR_WORKERS`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum LoadScale {
    Auto,
    Factor(f64),
}

impl LoadScale {
    /// The factor for a fleet of `workers` GPUs.
    pub fn factor(self, workers: usize) -> f64 {
        match self {
            Self::Auto => workers as f64 / SIZED_FOR_WORKERS as f64,
            Self::Factor(factor) => factor,
        }
    }
}

impl FromStr for LoadScale {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text == "auto" {
            return Ok(Self::Auto);
        }
        match text.parse::<f64>() {
            Ok(factor) if factor.is_finite() && factor > 0.0 => Ok(Self::Factor(factor)),
            _ => Err(format!("'{text}' is neither `auto` nor a positive factor")),
        }
    }
}

impl fmt::Display for LoadScale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Auto => f.write_str("auto"),
            Self::Factor(factor) => write!(f, "{factor}"),
        }
    }
}

/// `count` scaled by `factor`, at least 1.
pub fn scaled_count(count: u32, factor: f64) -> u32 {
    let scaled = (f64::from(count) * factor).round();
    if scaled >= f64::from(u32::MAX) {
        u32::MAX
    } else {
        (scaled as u32).max(1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_is_the_fleet_over_four_gpus() {
        let auto: LoadScale = "auto".parse().unwrap();
        assert_eq!(auto.factor(16), 4.0);
        assert_eq!(auto.factor(2), 0.5);
        assert_eq!("2.5".parse::<LoadScale>().unwrap().factor(64), 2.5);
        for bad in ["0", "-1", "x", "inf"] {
            assert!(bad.parse::<LoadScale>().is_err(), "{bad}");
        }
    }

    #[test]
    fn counts_round_and_stay_positive() {
        assert_eq!(scaled_count(16, 4.0), 64);
        assert_eq!(scaled_count(5, 0.5), 3);
        assert_eq!(scaled_count(1, 0.1), 1);
    }
}
