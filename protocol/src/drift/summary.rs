//! The counters a device keeps per numeric feature and per class output, and the structural checks
//! the hub runs on them.
//!
//! Counts are exact and merge by addition, so merged summaries agree to the last count whatever the
//! order. Moments merge with Chan's formula and agree to rounding.

use serde::{Deserialize, Serialize};

use super::{add_counts_checked, check_counts_add, check_len, DriftError, CONFIDENCE_BINS};

/// Values the batch path gathers before folding them into the moments. A chunk lives on the stack.
const CHUNK: usize = 512;

/// Relative slack allowed when checking that the mean lies within [min, max]: merged means are
/// computed, not observed, and may round just past an extreme.
const MEAN_SLACK: f64 = 1e-9;

/// One numeric feature summarised against its profile's edges.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureSummary {
    /// Finite values seen; they enter the moments, min/max and exactly one of below/bins/above.
    pub n: u64,
    /// Values that were absent (a missing column, a null), counted by the caller.
    pub null: u64,
    pub nan: u64,
    pub pos_inf: u64,
    pub neg_inf: u64,
    /// Finite values below the first edge.
    pub below: u64,
    /// Finite values above the last edge.
    pub above: u64,
    pub sum: f64,
    /// Welford running mean of the finite values.
    pub mean: f64,
    /// Sum of squared deviations from the mean (Welford's M2).
    pub m2: f64,
    /// Smallest finite value; +inf while `n == 0`.
    pub min: f64,
    /// Largest finite value; -inf while `n == 0`.
    pub max: f64,
    /// Counts of the interior bins `[e0,e1), ..., [e_{k-2}, e_{k-1}]`: one fewer than the edges.
    pub bins: Vec<u64>,
}

/// Where a finite value falls relative to a feature's edges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Below,
    Bin(usize),
    Above,
}

/// Finds `value`'s slot. With edges that pass [`Profile::check`](super::Profile::check) every
/// value within them finds an interior bin; with fewer than two edges, a value that finds none
/// counts as above, so the counts still add up.
fn locate(value: f64, edges: &[f64]) -> Slot {
    let (Some(&first), Some(&last)) = (edges.first(), edges.last()) else {
        return Slot::Above;
    };
    if value < first {
        return Slot::Below;
    }
    if value > last {
        return Slot::Above;
    }
    // At least the first edge is at or below the value. Counting, rather than a binary search,
    // has no branches to mispredict and the compiler vectorises it over the 20 edges.
    let mut at_or_below = 0;
    for edge in edges {
        at_or_below += usize::from(*edge <= value);
    }
    let last_bin = edges.len().saturating_sub(2);
    Slot::Bin(at_or_below.saturating_sub(1).min(last_bin))
}

/// The count, mean and M2 of some finite values.
#[derive(Debug, Clone, Copy)]
struct Moments {
    n: u64,
    mean: f64,
    m2: f64,
}

impl Moments {
    /// Chan et al.'s pairwise combination. The count saturates; callers that must not lose counts
    /// check for overflow first.
    fn combine(self, other: Moments) -> Moments {
        if other.n == 0 {
            return self;
        }
        if self.n == 0 {
            return other;
        }
        let n = self.n.saturating_add(other.n);
        let share = other.n as f64 / n as f64;
        let delta = other.mean - self.mean;
        Moments {
            n,
            mean: self.mean + delta * share,
            m2: self.m2 + other.m2 + delta * delta * self.n as f64 * share,
        }
    }

    /// The moments of a non-empty batch, by two passes: the mean first, then squared deviations
    /// from it. The mean is kept within the batch's extremes, so a batch of equal values has M2 0.
    fn of_batch(values: &[f64], min: f64, max: f64) -> Moments {
        let n = values.len() as u64;
        let mean = (values.iter().sum::<f64>() / n as f64).max(min).min(max);
        let m2 = values
            .iter()
            .map(|value| (value - mean) * (value - mean))
            .sum();
        Moments { n, mean, m2 }
    }
}

impl FeatureSummary {
    /// An empty summary for a feature with `edges`.
    pub fn new(edges: &[f64]) -> FeatureSummary {
        FeatureSummary {
            n: 0,
            null: 0,
            nan: 0,
            pos_inf: 0,
            neg_inf: 0,
            below: 0,
            above: 0,
            sum: 0.0,
            mean: 0.0,
            m2: 0.0,
            min: f64::INFINITY,
            max: f64::NEG_INFINITY,
            bins: vec![0; edges.len().saturating_sub(1)],
        }
    }

    /// Counts one value. NaN and ±inf are counted apart and enter nothing else. A finite value
    /// whose square overflows (|value| > ~1e154) makes the moments infinite, and `check` then
    /// refuses the summary: such values are not measurements.
    pub fn observe(&mut self, value: f64, edges: &[f64]) {
        if !value.is_finite() {
            self.observe_non_finite(value);
            return;
        }
        self.n = self.n.saturating_add(1);
        self.sum += value;
        let delta = value - self.mean;
        self.mean += delta / self.n as f64;
        self.m2 += delta * (value - self.mean);
        self.min = self.min.min(value);
        self.max = self.max.max(value);
        self.place(value, edges);
    }

    /// Counts one absent value.
    pub fn observe_null(&mut self) {
        self.null = self.null.saturating_add(1);
    }

    /// Counts many values at once: the hot path. Counts, bins, min, max and the sum come out
    /// exactly as from calling [`observe`](Self::observe) per value (the sum is accumulated in the
    /// same order); the mean and M2 are combined per chunk with Chan's formula and agree to
    /// rounding.
    pub fn observe_f32(&mut self, values: &[f32], edges: &[f64]) {
        let mut finite = [0.0f64; CHUNK];
        for chunk in values.chunks(CHUNK) {
            let mut len = 0;
            for &value in chunk {
                let value = f64::from(value);
                if !value.is_finite() {
                    self.observe_non_finite(value);
                } else if let Some(slot) = finite.get_mut(len) {
                    *slot = value;
                    len += 1;
                }
            }
            self.observe_finite(finite.get(..len).unwrap_or_default(), edges);
        }
    }

    /// Counts a batch of finite values.
    fn observe_finite(&mut self, values: &[f64], edges: &[f64]) {
        if values.is_empty() {
            return;
        }
        let (mut sum, mut batch_min, mut batch_max) = (self.sum, f64::INFINITY, f64::NEG_INFINITY);
        for &value in values {
            sum += value;
            batch_min = batch_min.min(value);
            batch_max = batch_max.max(value);
        }
        for &value in values {
            self.place(value, edges);
        }
        let batch = Moments::of_batch(values, batch_min, batch_max);
        self.sum = sum;
        self.min = self.min.min(batch_min);
        self.max = self.max.max(batch_max);
        self.set_moments(self.moments().combine(batch));
    }

    fn observe_non_finite(&mut self, value: f64) {
        let count = if value.is_nan() {
            &mut self.nan
        } else if value > 0.0 {
            &mut self.pos_inf
        } else {
            &mut self.neg_inf
        };
        *count = count.saturating_add(1);
    }

    /// Adds a finite value to below, its bin or above.
    fn place(&mut self, value: f64, edges: &[f64]) {
        let count = match locate(value, edges) {
            Slot::Below => &mut self.below,
            Slot::Bin(index) => match self.bins.get_mut(index) {
                Some(count) => count,
                None => &mut self.above,
            },
            Slot::Above => &mut self.above,
        };
        *count = count.saturating_add(1);
    }

    fn moments(&self) -> Moments {
        Moments {
            n: self.n,
            mean: self.mean,
            m2: self.m2,
        }
    }

    /// Takes combined moments, keeping the mean within [min, max] against rounding.
    fn set_moments(&mut self, moments: Moments) {
        self.n = moments.n;
        self.mean = if moments.n > 0 {
            moments.mean.max(self.min).min(self.max)
        } else {
            moments.mean
        };
        self.m2 = moments.m2;
    }

    /// Adds `other`, a summary over the same edges, into `self`: counts and bins add (an overflow
    /// is an error), the moments combine with Chan's formula, the sums add, min and max take the
    /// extremes. On an error `self` is left unchanged.
    pub fn merge(&mut self, other: &FeatureSummary) -> Result<(), DriftError> {
        self.check_merge(other)?;
        self.merge_checked(other);
        Ok(())
    }

    /// `Ok` when [`merge`](Self::merge) would succeed: as many bins, and no count that overflows.
    pub(crate) fn check_merge(&self, other: &FeatureSummary) -> Result<(), DriftError> {
        check_len(self.bins.len(), other.bins.len(), |expected, found| {
            DriftError::BinCount { expected, found }
        })?;
        check_counts_add(&self.scalar_counts(), &other.scalar_counts())?;
        check_counts_add(&self.bins, &other.bins)
    }

    /// [`merge`](Self::merge), in place, once [`check_merge`](Self::check_merge) passed.
    pub(crate) fn merge_checked(&mut self, other: &FeatureSummary) {
        let moments = self.moments().combine(other.moments());
        for (ours, theirs) in [
            (&mut self.n, other.n),
            (&mut self.null, other.null),
            (&mut self.nan, other.nan),
            (&mut self.pos_inf, other.pos_inf),
            (&mut self.neg_inf, other.neg_inf),
            (&mut self.below, other.below),
            (&mut self.above, other.above),
        ] {
            *ours = ours.saturating_add(theirs);
        }
        self.sum += other.sum;
        self.min = self.min.min(other.min);
        self.max = self.max.max(other.max);
        add_counts_checked(&mut self.bins, &other.bins);
        self.set_moments(moments);
    }

    /// The counts besides the bins, in a fixed order.
    fn scalar_counts(&self) -> [u64; 7] {
        [
            self.n,
            self.null,
            self.nan,
            self.pos_inf,
            self.neg_inf,
            self.below,
            self.above,
        ]
    }

    /// Population variance of the finite values; `None` before any.
    pub fn variance(&self) -> Option<f64> {
        (self.n > 0).then(|| (self.m2 / self.n as f64).max(0.0))
    }

    /// The bins metrics compare: `[below, bins..., above]`.
    pub fn metric_bins(&self) -> Vec<u64> {
        let mut bins = Vec::with_capacity(self.bins.len() + 2);
        bins.push(self.below);
        bins.extend_from_slice(&self.bins);
        bins.push(self.above);
        bins
    }

    /// Checks the summary is internally consistent and shaped for `edges`: one bin fewer than the
    /// edges; `n == below + sum(bins) + above` without overflow; min and max agree with below and
    /// above; moments finite when `n > 0`, with `m2 >= 0` and `min <= mean <= max` (to rounding);
    /// moments 0 and min/max ±inf when `n == 0`.
    pub fn check(&self, edges: &[f64]) -> Result<(), DriftError> {
        check_len(
            edges.len().saturating_sub(1),
            self.bins.len(),
            |expected, found| DriftError::BinCount { expected, found },
        )?;
        let binned = self
            .bins
            .iter()
            .try_fold(self.below, |total, count| total.checked_add(*count))
            .and_then(|total| total.checked_add(self.above))
            .ok_or(DriftError::CountOverflow)?;
        if binned != self.n {
            return Err(DriftError::CountMismatch { n: self.n, binned });
        }
        [self.null, self.nan, self.pos_inf, self.neg_inf]
            .into_iter()
            .try_fold(self.n, u64::checked_add)
            .ok_or(DriftError::CountOverflow)?;
        if self.n == 0 {
            self.check_empty_moments()
        } else {
            self.check_moments()?;
            self.check_extents(edges)
        }
    }

    fn check_empty_moments(&self) -> Result<(), DriftError> {
        let expected = [
            ("sum", self.sum, 0.0),
            ("mean", self.mean, 0.0),
            ("m2", self.m2, 0.0),
            ("min", self.min, f64::INFINITY),
            ("max", self.max, f64::NEG_INFINITY),
        ];
        match expected.into_iter().find(|(_, value, want)| value != want) {
            Some((moment, value, _)) => Err(DriftError::EmptyMoments { moment, value }),
            None => Ok(()),
        }
    }

    fn check_moments(&self) -> Result<(), DriftError> {
        let moments = [
            ("sum", self.sum),
            ("mean", self.mean),
            ("m2", self.m2),
            ("min", self.min),
            ("max", self.max),
        ];
        if let Some((moment, value)) = moments.into_iter().find(|(_, value)| !value.is_finite()) {
            return Err(DriftError::NonFinite { moment, value });
        }
        let (mean, min, max) = (self.mean, self.min, self.max);
        if self.m2 < 0.0 {
            return Err(DriftError::NegativeM2 { m2: self.m2 });
        }
        if min > max {
            return Err(DriftError::MinAboveMax { min, max });
        }
        let slack = MEAN_SLACK * min.abs().max(max.abs());
        if mean < min - slack || mean > max + slack {
            return Err(DriftError::MeanOutOfRange { mean, min, max });
        }
        Ok(())
    }

    /// A value is below exactly when it is under the first edge, so `below > 0` exactly when
    /// `min < first`; likewise for above and the last edge.
    fn check_extents(&self, edges: &[f64]) -> Result<(), DriftError> {
        let (Some(&first), Some(&last)) = (edges.first(), edges.last()) else {
            return Ok(());
        };
        if (self.below > 0) != (self.min < first) || (self.above > 0) != (self.max > last) {
            return Err(DriftError::ExtentsMismatch {
                min: self.min,
                max: self.max,
                below: self.below,
                above: self.above,
            });
        }
        Ok(())
    }
}

/// One class output summarised against its profile's classes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// One count per profile class, in the profile's order.
    pub counts: Vec<u64>,
    /// Outputs naming a class the profile does not list.
    pub unseen: u64,
    /// Top-1 confidence histogram, [`CONFIDENCE_BINS`] equal bins over [0, 1]; 1.0 goes in the
    /// last. Outputs without a confidence (labels) or with a NaN one are not binned.
    pub confidence: Vec<u64>,
}

impl ClassSummary {
    /// An empty summary for an output with `classes` classes.
    pub fn new(classes: usize) -> ClassSummary {
        ClassSummary {
            counts: vec![0; classes],
            unseen: 0,
            confidence: vec![0; CONFIDENCE_BINS],
        }
    }

    /// Counts one output: `class` among `classes` (the profile's, strictly increasing) or as
    /// unseen, and its confidence, clamped to [0, 1], when it has one.
    pub fn observe(&mut self, class: i64, confidence: Option<f32>, classes: &[i64]) {
        let count = match class_index(class, classes).and_then(|index| self.counts.get_mut(index)) {
            Some(count) => count,
            None => &mut self.unseen,
        };
        *count = count.saturating_add(1);
        let bin = confidence
            .and_then(confidence_bin)
            .and_then(|bin| self.confidence.get_mut(bin));
        if let Some(count) = bin {
            *count = count.saturating_add(1);
        }
    }

    /// Outputs counted: every class and the unseen ones.
    pub fn total(&self) -> u64 {
        self.counts
            .iter()
            .fold(self.unseen, |total, count| total.saturating_add(*count))
    }

    /// The bins metrics compare: `[counts..., unseen]`.
    pub fn metric_bins(&self) -> Vec<u64> {
        let mut bins = Vec::with_capacity(self.counts.len() + 1);
        bins.extend_from_slice(&self.counts);
        bins.push(self.unseen);
        bins
    }

    /// Adds `other`, a summary over the same classes, into `self`. On an error `self` is left
    /// unchanged.
    pub fn merge(&mut self, other: &ClassSummary) -> Result<(), DriftError> {
        self.check_merge(other)?;
        self.merge_checked(other);
        Ok(())
    }

    /// `Ok` when [`merge`](Self::merge) would succeed: the same shape, and no count that
    /// overflows.
    pub(crate) fn check_merge(&self, other: &ClassSummary) -> Result<(), DriftError> {
        check_len(self.counts.len(), other.counts.len(), |expected, found| {
            DriftError::ClassCounts { expected, found }
        })?;
        check_len(
            self.confidence.len(),
            other.confidence.len(),
            |expected, found| DriftError::ConfidenceBins { expected, found },
        )?;
        check_counts_add(&[self.unseen], &[other.unseen])?;
        check_counts_add(&self.counts, &other.counts)?;
        check_counts_add(&self.confidence, &other.confidence)
    }

    /// [`merge`](Self::merge), in place, once [`check_merge`](Self::check_merge) passed.
    pub(crate) fn merge_checked(&mut self, other: &ClassSummary) {
        self.unseen = self.unseen.saturating_add(other.unseen);
        add_counts_checked(&mut self.counts, &other.counts);
        add_counts_checked(&mut self.confidence, &other.confidence);
    }

    /// Checks the summary is shaped for `classes` classes, its counts add up without overflow and
    /// no more confidences were binned than outputs counted.
    pub fn check(&self, classes: usize) -> Result<(), DriftError> {
        check_len(classes, self.counts.len(), |expected, found| {
            DriftError::ClassCounts { expected, found }
        })?;
        check_len(CONFIDENCE_BINS, self.confidence.len(), |expected, found| {
            DriftError::ConfidenceBins { expected, found }
        })?;
        let total = self
            .counts
            .iter()
            .try_fold(self.unseen, |total, count| total.checked_add(*count))
            .ok_or(DriftError::CountOverflow)?;
        let binned = self
            .confidence
            .iter()
            .try_fold(0u64, |total, count| total.checked_add(*count))
            .ok_or(DriftError::CountOverflow)?;
        if binned > total {
            return Err(DriftError::ConfidenceExcess { binned, total });
        }
        Ok(())
    }
}

/// Index of `class` in the strictly increasing `classes`. Argmax classes are `0..K`, where a class
/// is its own index, so that is tried first.
fn class_index(class: i64, classes: &[i64]) -> Option<usize> {
    if let Ok(index) = usize::try_from(class) {
        if classes.get(index) == Some(&class) {
            return Some(index);
        }
    }
    classes.binary_search(&class).ok()
}

/// The confidence bin of `confidence`, clamped to [0, 1]; `None` for NaN.
fn confidence_bin(confidence: f32) -> Option<usize> {
    if confidence.is_nan() {
        return None;
    }
    let scaled = f64::from(confidence).clamp(0.0, 1.0) * CONFIDENCE_BINS as f64;
    // `as` saturates; the clamp above keeps `scaled` within 0..=CONFIDENCE_BINS anyway.
    Some((scaled as usize).min(CONFIDENCE_BINS - 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_on_edges_go_to_the_bin_they_open_and_the_last_edge_closes_the_last_bin() {
        let edges = [0.0, 1.0, 2.0];
        assert_eq!(locate(-0.5, &edges), Slot::Below);
        assert_eq!(locate(0.0, &edges), Slot::Bin(0));
        assert_eq!(locate(0.999, &edges), Slot::Bin(0));
        assert_eq!(locate(1.0, &edges), Slot::Bin(1));
        assert_eq!(locate(2.0, &edges), Slot::Bin(1));
        assert_eq!(locate(2.5, &edges), Slot::Above);
    }

    #[test]
    fn degenerate_edges_still_place_every_value() {
        assert_eq!(locate(1.0, &[]), Slot::Above);
        let mut summary = FeatureSummary::new(&[1.0]);
        summary.observe(1.0, &[1.0]);
        summary.observe(0.0, &[1.0]);
        assert_eq!((summary.n, summary.below, summary.above), (2, 1, 1));
    }

    #[test]
    fn confidence_bins_split_the_unit_interval_evenly() {
        assert_eq!(confidence_bin(0.0), Some(0));
        assert_eq!(confidence_bin(0.0999), Some(0));
        assert_eq!(confidence_bin(0.1), Some(1));
        assert_eq!(confidence_bin(0.95), Some(9));
        assert_eq!(confidence_bin(1.0), Some(9));
        assert_eq!(confidence_bin(7.0), Some(9));
        assert_eq!(confidence_bin(-1.0), Some(0));
        assert_eq!(confidence_bin(f32::NAN), None);
    }

    #[test]
    fn class_index_finds_argmax_and_label_classes() {
        assert_eq!(class_index(2, &[0, 1, 2, 3]), Some(2));
        assert_eq!(class_index(7, &[-3, 2, 7]), Some(2));
        assert_eq!(class_index(-3, &[-3, 2, 7]), Some(0));
        assert_eq!(class_index(4, &[0, 1, 2, 3]), None);
        assert_eq!(class_index(i64::MIN, &[]), None);
    }
}
