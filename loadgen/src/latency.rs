//! Latency histograms in microseconds and their JSON summary.

use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

/// The highest latency a histogram records exactly (larger values are clamped): 120 s.
const MAX_US: u64 = 120_000_000;

/// A latency histogram with 3 significant digits, in microseconds.
#[derive(Debug, Clone)]
pub struct Latencies(Histogram<u64>);

impl Default for Latencies {
    fn default() -> Self {
        Latencies::new()
    }
}

impl Latencies {
    /// An empty histogram from 1 µs to 120 s.
    #[must_use]
    pub fn new() -> Latencies {
        Latencies(Histogram::new_with_bounds(1, MAX_US, 3).expect("valid histogram bounds"))
    }

    /// Records one latency (clamped to 1 µs .. 120 s).
    pub fn record(&mut self, d: Duration) {
        let us = u64::try_from(d.as_micros())
            .unwrap_or(MAX_US)
            .clamp(1, MAX_US);
        self.0.record(us).expect("value within bounds");
    }

    /// Adds every value of `other`.
    pub fn merge(&mut self, other: &Latencies) {
        self.0.add(&other.0).expect("same bounds");
    }

    /// Number of recorded values.
    #[must_use]
    pub fn len(&self) -> u64 {
        self.0.len()
    }

    /// Whether nothing was recorded.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Percentiles and extremes.
    #[must_use]
    pub fn summary(&self) -> Summary {
        let h = &self.0;
        if h.is_empty() {
            return Summary::default();
        }
        Summary {
            count: h.len(),
            min: h.min(),
            mean: h.mean().round() as u64,
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        }
    }
}

/// A latency distribution's summary, every value in microseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    /// Values recorded.
    pub count: u64,
    /// Smallest value.
    pub min: u64,
    /// Mean, rounded.
    pub mean: u64,
    /// Median.
    pub p50: u64,
    /// 90th percentile.
    pub p90: u64,
    /// 99th percentile.
    pub p99: u64,
    /// 99.9th percentile.
    pub p999: u64,
    /// Largest value.
    pub max: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_a_uniform_spread() {
        let mut l = Latencies::new();
        for us in 1..=1000 {
            l.record(Duration::from_micros(us));
        }
        let s = l.summary();
        assert_eq!(s.count, 1000);
        assert_eq!(s.p50, 500);
        assert_eq!(s.p99, 990);
        assert_eq!(s.p999, 999);
        assert_eq!(s.max, 1000);
    }

    #[test]
    fn merge_and_clamp() {
        let mut a = Latencies::new();
        a.record(Duration::ZERO);
        let mut b = Latencies::new();
        b.record(Duration::from_secs(1000));
        a.merge(&b);
        let s = a.summary();
        assert_eq!((s.count, s.min), (2, 1));
        assert!(s.max >= MAX_US && s.max <= MAX_US + MAX_US / 1000, "{s:?}");
        assert_eq!(Latencies::new().summary(), Summary::default());
    }
}
