//! Inference counters summed over telemetry windows, and the p95 latency they give.

use super::*;

/// Inference counters summed over telemetry windows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InferenceStats {
    pub count: u64,
    pub errors: u64,
    /// One count per [`LATENCY_BUCKETS_US`] bound plus the overflow slot. Counts past the overflow
    /// slot (from a device sending a longer histogram) are folded into it when merged.
    pub latency_buckets: Vec<u64>,
}

impl InferenceStats {
    /// The counters of one telemetry window.
    pub fn from_window(window: &InferenceWindow) -> InferenceStats {
        let mut stats = InferenceStats::default();
        stats.add(window.count, window.errors, &window.latency_buckets);
        stats
    }

    /// Adds `other`'s counters to these. Counts saturate rather than wrap, so a device reporting
    /// absurd numbers can skew its own figures but never make the hub panic.
    pub fn merge(&mut self, other: &InferenceStats) {
        self.add(other.count, other.errors, &other.latency_buckets);
    }

    fn add(&mut self, count: u64, errors: u64, latency_buckets: &[u64]) {
        self.count = self.count.saturating_add(count);
        self.errors = self.errors.saturating_add(errors);
        // Keep the histogram exactly LATENCY_SLOTS long: the length comes from devices, and the
        // hub must not allocate whatever a device claims.
        if self.latency_buckets.len() > LATENCY_SLOTS {
            let extra: u64 = self.latency_buckets[LATENCY_SLOTS..]
                .iter()
                .fold(0, |sum, n| sum.saturating_add(*n));
            self.latency_buckets.truncate(LATENCY_SLOTS);
            self.latency_buckets[LATENCY_SLOTS - 1] =
                self.latency_buckets[LATENCY_SLOTS - 1].saturating_add(extra);
        }
        self.latency_buckets.resize(LATENCY_SLOTS, 0);
        for (index, n) in latency_buckets.iter().enumerate() {
            let slot = index.min(LATENCY_SLOTS - 1);
            self.latency_buckets[slot] = self.latency_buckets[slot].saturating_add(*n);
        }
    }

    /// How many latency samples the histogram holds (not necessarily `count`: a device may time
    /// only some inferences).
    pub fn latency_samples(&self) -> u64 {
        self.latency_buckets
            .iter()
            .fold(0, |sum, n| sum.saturating_add(*n))
    }

    /// The upper bound, in microseconds, of the histogram bucket holding the 95th percentile;
    /// [`UNBOUNDED_US`] when that is the overflow slot; `None` without latency samples.
    pub fn p95_us(&self) -> Option<u64> {
        let total: u128 = self.latency_buckets.iter().map(|n| u128::from(*n)).sum();
        if total == 0 {
            return None;
        }
        // The 1-based rank of the sample at the 95th percentile (nearest-rank method).
        let rank = (total * 95).div_ceil(100);
        let mut seen: u128 = 0;
        for (index, n) in self.latency_buckets.iter().enumerate() {
            seen += u128::from(*n);
            if seen >= rank {
                return Some(
                    LATENCY_BUCKETS_US
                        .get(index)
                        .copied()
                        .unwrap_or(UNBOUNDED_US),
                );
            }
        }
        Some(UNBOUNDED_US)
    }
}
