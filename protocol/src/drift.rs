//! Drift summaries: what a model sees and says on a device, small enough to send every hour and
//! mergeable across hours and devices, compared on the hub with the reference profile made when the
//! model version was published.
//!
//! Raw inputs never leave a device. A device keeps one [`DriftSummary`] per model version and
//! window: for every numeric feature a [`FeatureSummary`] (counts in the bins of the reference's
//! quantile edges, out-of-range and non-finite counts, Welford moments) and for every class output
//! a [`ClassSummary`] (class counts and a confidence histogram). Summaries of the same profile merge
//! exactly in their counts, whatever the order, so the hub can combine hours and devices freely.
//!
//! The hub checks every summary it receives with [`DriftSummary::validate`] before storing it,
//! merges what it stores, and judges each feature against the profile's reference with [`assess`],
//! which computes [`psi`], [`js_distance`], [`hellinger`], [`chi_square`] and [`ks_from_bins`] and
//! applies the rules below.
//!
//! # Proportions
//!
//! Every metric works on *metric bins*: `[below, bins..., above]` for a numeric feature and
//! `[counts..., unseen]` for a class output. A histogram's proportions are `p_i = c_i / total`.
//! Where a metric takes a logarithm of a proportion or divides by one (PSI, Jensen–Shannon,
//! chi-square), each zero proportion is replaced by [`EPSILON`] = 1e-4 first, without
//! renormalising; Hellinger and KS need neither and use the plain proportions. A histogram with no
//! counts at all carries no evidence, and every metric against it is 0.
//!
//! # Flag rules
//!
//! A numeric feature is judged on PSI. Its flag threshold is
//! `max(psi_warn, chi_square_quantile(B - 1, confidence) / n)`, with `B` the number of metric bins
//! and `n` the current count of finite values: under no drift `n · PSI` is roughly chi-square with
//! `B - 1` degrees of freedom, so the second term keeps small samples from being flagged by noise
//! alone. A feature at or over its threshold is flagged only if its counts also differ from the
//! reference's more than chance allows at `confidence`, by Pearson's test of homogeneity
//! ([`homogeneity`]) over the interior bins, with values below and above the edges counted in the
//! bins beside them (the reference has none there by construction; they have their own rule
//! below). The test is needed for small samples: there the threshold's approximation fails,
//! since each bin a sample leaves empty adds `p ln(p / EPSILON)` to PSI (about 0.3 for a
//! nineteenth of the reference), and samples of 15 values drawn from the reference itself were
//! flagged nearly every time; with the test, about 5% are, at every size. A flagged feature is an
//! Alert at `psi >= psi_alert` and a Warn below. With `n == 0` there is nothing to measure: every
//! metric is 0 and the status Ok.
//!
//! A class output is judged on the Jensen–Shannon distance, by the same reasoning: under no drift
//! the JS divergence in bits is about `χ² / (8 n ln 2)`, so the flag threshold is
//! `max(js_flag, sqrt(chi_square_quantile(B - 1, confidence) / (8 n ln 2)))`, and the counts of
//! `[classes..., unseen]` must pass the same test of homogeneity. A flagged output is an Alert at
//! `js >= 2 · js_flag` and a Warn below.
//!
//! The test is one per feature: of a model's many features, some are flagged by chance in a
//! small window now and then (about 5% each). On larger samples `psi_warn` and `psi_alert` guard
//! against that, since chance alone then shows a PSI of about `χ²(B - 1) / n`.
//!
//! Data-quality issues make the status at least Warn:
//! - NaN, ±inf or unseen classes present where the reference had none;
//! - values outside the reference's range (below or above) more often than chance allows. The edges
//!   run from the reference's smallest to its largest value, so a value drawn from the reference
//!   distribution falls outside them with probability `2 / (n_ref + 1)`, whatever the
//!   distribution. The issue is raised when the reference had none outside and the current count
//!   outside exceeds `e + 3 √e`, `e = 2 n / (n_ref + 1)`: for small windows any value outside, for
//!   large ones only a real excess;
//! - a missing share `(null + nan) / (n + null + nan + inf)` above zero and above the reference's
//!   share times `missing_factor`.

mod assess;
mod metrics;
mod profile;
mod summary;

use serde::{Deserialize, Serialize};

use crate::keys::Sha256;
use crate::latency::LATENCY_BUCKETS_US;
use crate::name::{ModelName, NameError};
use crate::trust::message;
use crate::{Message, MessageKind};

pub use assess::{
    assess, assess_class, assess_feature, least_significant_psi, DriftStatus, FeatureDrift,
    QualityIssue, CLASS_KIND, NUMERIC_KIND,
};
pub use metrics::{
    chi_square, chi_square_quantile, hellinger, homogeneity, js_distance, ks_from_bins, psi,
    EPSILON,
};
pub use profile::{
    quantile_edges, ClassProfile, ClassSource, FeatureSource, NumericProfile, Profile, TensorSide,
    Thresholds,
};
pub use summary::{ClassSummary, FeatureSummary};

/// Quantile edges per numeric feature: the reference's quantiles at q = 0, 1/19, ..., 1.
pub const PROFILE_EDGES: usize = 20;
/// Bins of the top-1 confidence histogram: ten equal bins over [0, 1], with 1.0 in the last.
pub const CONFIDENCE_BINS: usize = 10;
/// Windows start and end on whole UTC hours.
pub const WINDOW_ALIGN_SECS: u64 = 3_600;
/// Longest window a device may summarise in one [`DriftSummary`]: 31 days.
pub const MAX_WINDOW_SECS: u64 = 31 * 86_400;

/// One device's (or, merged, many devices') summary of one model version over a window of aligned
/// UTC hours.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftSummary {
    pub model: String,
    pub version: u64,
    /// SHA-256 of the profile artifact's bytes: summaries of different profiles never mix.
    pub profile_sha256: Sha256,
    /// Unix seconds, a multiple of [`WINDOW_ALIGN_SECS`].
    pub window_start: u64,
    /// Unix seconds, a multiple of [`WINDOW_ALIGN_SECS`], after `window_start`.
    pub window_end: u64,
    /// One per [`Profile::features`], in the same order.
    pub features: Vec<FeatureSummary>,
    /// One per [`Profile::classes`], in the same order.
    pub classes: Vec<ClassSummary>,
    /// One count per [`LATENCY_BUCKETS_US`] bucket plus the overflow bucket.
    pub latency_us: Vec<u64>,
}

impl DriftSummary {
    /// An empty summary of `profile`'s features and classes over `window_start..window_end`.
    pub fn new(
        model: &str,
        version: u64,
        profile_sha256: Sha256,
        profile: &Profile,
        window_start: u64,
        window_end: u64,
    ) -> DriftSummary {
        DriftSummary {
            model: model.to_owned(),
            version,
            profile_sha256,
            window_start,
            window_end,
            features: profile
                .features
                .iter()
                .map(|feature| FeatureSummary::new(&feature.edges))
                .collect(),
            classes: profile
                .classes
                .iter()
                .map(|class| ClassSummary::new(class.classes.len()))
                .collect(),
            latency_us: vec![0; LATENCY_BUCKETS_US.len() + 1],
        }
    }

    /// Adds `other` into `self`. Only summaries of the same model, version and profile, with the
    /// same shape, merge; the window becomes the union of both (earliest start, latest end). On an
    /// error `self` is left unchanged.
    pub fn merge(&mut self, other: &DriftSummary) -> Result<(), DriftError> {
        self.check_merge(other)?;
        // Every count is known to add without overflow: add in place, with no copy of `self`
        // (the hub merges a stored 100-feature summary on every upload of a window's part).
        for (ours, theirs) in self.features.iter_mut().zip(&other.features) {
            ours.merge_checked(theirs);
        }
        for (ours, theirs) in self.classes.iter_mut().zip(&other.classes) {
            ours.merge_checked(theirs);
        }
        add_counts_checked(&mut self.latency_us, &other.latency_us);
        self.window_start = self.window_start.min(other.window_start);
        self.window_end = self.window_end.max(other.window_end);
        Ok(())
    }

    /// `Ok` when [`merge`](Self::merge) would succeed: same model, version, profile and shape,
    /// and no count that overflows.
    fn check_merge(&self, other: &DriftSummary) -> Result<(), DriftError> {
        self.check_mergeable(other)?;
        for (index, (ours, theirs)) in self.features.iter().zip(&other.features).enumerate() {
            ours.check_merge(theirs)
                .map_err(|source| DriftError::in_feature(index, "", source))?;
        }
        for (index, (ours, theirs)) in self.classes.iter().zip(&other.classes).enumerate() {
            ours.check_merge(theirs)
                .map_err(|source| DriftError::in_class(index, "", source))?;
        }
        check_counts_add(&self.latency_us, &other.latency_us)
    }

    fn check_mergeable(&self, other: &DriftSummary) -> Result<(), DriftError> {
        if self.profile_sha256 != other.profile_sha256 {
            return Err(DriftError::ProfileMismatch {
                expected: self.profile_sha256,
                found: other.profile_sha256,
            });
        }
        if self.model != other.model || self.version != other.version {
            return Err(DriftError::ModelMismatch {
                expected_model: self.model.clone(),
                expected_version: self.version,
                found_model: other.model.clone(),
                found_version: other.version,
            });
        }
        check_len(
            self.features.len(),
            other.features.len(),
            |expected, found| DriftError::FeatureCount { expected, found },
        )?;
        check_len(
            self.classes.len(),
            other.classes.len(),
            |expected, found| DriftError::ClassCount { expected, found },
        )?;
        check_len(
            self.latency_us.len(),
            other.latency_us.len(),
            |expected, found| DriftError::LatencyBuckets { expected, found },
        )
    }

    /// Everything a hub checks before storing a summary from a device: the profile hash is
    /// `profile_sha256`, the model name is valid, the window is aligned, non-empty and at most
    /// [`MAX_WINDOW_SECS`] long, there is one summary per profile feature and class output and each
    /// passes its own `check`, and the latency histogram has the right length.
    ///
    /// `profile` is trusted to have passed [`Profile::check`].
    pub fn validate(&self, profile: &Profile, profile_sha256: &Sha256) -> Result<(), DriftError> {
        if self.profile_sha256 != *profile_sha256 {
            return Err(DriftError::ProfileMismatch {
                expected: *profile_sha256,
                found: self.profile_sha256,
            });
        }
        ModelName::new(&self.model).map_err(|source| DriftError::ModelName {
            name: self.model.clone(),
            source,
        })?;
        self.check_window()?;
        check_len(
            profile.features.len(),
            self.features.len(),
            |expected, found| DriftError::FeatureCount { expected, found },
        )?;
        check_len(
            profile.classes.len(),
            self.classes.len(),
            |expected, found| DriftError::ClassCount { expected, found },
        )?;
        check_len(
            LATENCY_BUCKETS_US.len() + 1,
            self.latency_us.len(),
            |expected, found| DriftError::LatencyBuckets { expected, found },
        )?;
        for (index, (feature, summary)) in profile.features.iter().zip(&self.features).enumerate() {
            summary
                .check(&feature.edges)
                .map_err(|source| DriftError::in_feature(index, &feature.name, source))?;
        }
        for (index, (class, summary)) in profile.classes.iter().zip(&self.classes).enumerate() {
            summary
                .check(class.classes.len())
                .map_err(|source| DriftError::in_class(index, &class.name, source))?;
        }
        Ok(())
    }

    fn check_window(&self) -> Result<(), DriftError> {
        let (start, end) = (self.window_start, self.window_end);
        if start % WINDOW_ALIGN_SECS != 0 || end % WINDOW_ALIGN_SECS != 0 {
            return Err(DriftError::WindowUnaligned { start, end });
        }
        if end <= start {
            return Err(DriftError::WindowEmpty { start, end });
        }
        if end - start > MAX_WINDOW_SECS {
            return Err(DriftError::WindowTooLong {
                start,
                end,
                max: MAX_WINDOW_SECS,
            });
        }
        Ok(())
    }
}

/// `Ok` when the element-wise sum of two count vectors of equal length does not overflow.
pub(crate) fn check_counts_add(ours: &[u64], theirs: &[u64]) -> Result<(), DriftError> {
    if ours
        .iter()
        .zip(theirs)
        .all(|(a, b)| a.checked_add(*b).is_some())
    {
        Ok(())
    } else {
        Err(DriftError::CountOverflow)
    }
}

/// Adds `theirs` into `ours` element by element, once [`check_counts_add`] passed.
pub(crate) fn add_counts_checked(ours: &mut [u64], theirs: &[u64]) {
    for (a, b) in ours.iter_mut().zip(theirs) {
        *a = a.saturating_add(*b);
    }
}

/// `Ok` when `found == expected`, else the error `mismatch` builds from both.
pub(crate) fn check_len(
    expected: usize,
    found: usize,
    mismatch: impl FnOnce(usize, usize) -> DriftError,
) -> Result<(), DriftError> {
    if expected == found {
        Ok(())
    } else {
        Err(mismatch(expected, found))
    }
}

/// Why a summary or profile was refused, or why two summaries do not merge.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum DriftError {
    #[error("summary was made against profile {found}, expected {expected}")]
    ProfileMismatch { expected: Sha256, found: Sha256 },
    #[error(
        "summary is of {found_model:?} version {found_version}, \
         expected {expected_model:?} version {expected_version}"
    )]
    ModelMismatch {
        expected_model: String,
        expected_version: u64,
        found_model: String,
        found_version: u64,
    },
    #[error("model name {name:?} is invalid: {source}")]
    ModelName {
        name: String,
        #[source]
        source: NameError,
    },
    #[error("window {start}..{end} does not start and end on whole UTC hours")]
    WindowUnaligned { start: u64, end: u64 },
    #[error("window {start}..{end} does not end after it starts")]
    WindowEmpty { start: u64, end: u64 },
    #[error("window {start}..{end} is longer than the {max}-second limit")]
    WindowTooLong { start: u64, end: u64, max: u64 },
    #[error("{found} feature summaries, expected {expected}")]
    FeatureCount { expected: usize, found: usize },
    #[error("{found} class-output summaries, expected {expected}")]
    ClassCount { expected: usize, found: usize },
    #[error("latency histogram has {found} buckets, expected {expected}")]
    LatencyBuckets { expected: usize, found: usize },
    /// A problem in one numeric feature; `name` is empty where only the index is known (merging).
    #[error("feature {index}{}: {source}", display_name(name))]
    Feature {
        index: usize,
        name: String,
        #[source]
        source: Box<DriftError>,
    },
    /// A problem in one class output; `name` is empty where only the index is known (merging).
    #[error("class output {index}{}: {source}", display_name(name))]
    Class {
        index: usize,
        name: String,
        #[source]
        source: Box<DriftError>,
    },
    #[error("{found} bins, expected {expected}")]
    BinCount { expected: usize, found: usize },
    #[error("counts overflow a 64-bit integer")]
    CountOverflow,
    #[error("n is {n} but below + bins + above is {binned}")]
    CountMismatch { n: u64, binned: u64 },
    #[error("{moment} is {value}, not finite")]
    NonFinite { moment: &'static str, value: f64 },
    #[error("sum of squared deviations is negative ({m2})")]
    NegativeM2 { m2: f64 },
    #[error("min {min} is above max {max}")]
    MinAboveMax { min: f64, max: f64 },
    #[error("mean {mean} lies outside [{min}, {max}]")]
    MeanOutOfRange { mean: f64, min: f64, max: f64 },
    #[error(
        "min {min} and max {max} disagree with {below} values below and {above} above the edges"
    )]
    ExtentsMismatch {
        min: f64,
        max: f64,
        below: u64,
        above: u64,
    },
    #[error("no finite values counted, yet {moment} is {value}")]
    EmptyMoments { moment: &'static str, value: f64 },
    #[error("{found} class counts, expected {expected}")]
    ClassCounts { expected: usize, found: usize },
    #[error("{found} confidence bins, expected {expected}")]
    ConfidenceBins { expected: usize, found: usize },
    #[error("{binned} confidences binned, more than the {total} outputs counted")]
    ConfidenceExcess { binned: u64, total: u64 },
    #[error("{found} edges, expected 2 to {max}")]
    EdgeCount { found: usize, max: usize },
    #[error("edge {index} is {value}, not finite")]
    EdgeNotFinite { index: usize, value: f64 },
    #[error("edge {index} ({value}) is not above the edge before it")]
    EdgesNotIncreasing { index: usize, value: f64 },
    #[error("class {index} ({value}) is not above the class before it")]
    ClassesNotIncreasing { index: usize, value: i64 },
    #[error("threshold {name} is {value}, expected {rule}")]
    Threshold {
        name: &'static str,
        value: f64,
        rule: &'static str,
    },
    #[error("feature {name:?} has no finite reference values to take edges from")]
    NoFiniteReference { name: String },
}

impl DriftError {
    pub(crate) fn in_feature(index: usize, name: &str, source: DriftError) -> DriftError {
        DriftError::Feature {
            index,
            name: name.to_owned(),
            source: Box::new(source),
        }
    }

    pub(crate) fn in_class(index: usize, name: &str, source: DriftError) -> DriftError {
        DriftError::Class {
            index,
            name: name.to_owned(),
            source: Box::new(source),
        }
    }
}

/// ` ("name")`, or nothing for an empty name.
fn display_name(name: &str) -> String {
    if name.is_empty() {
        String::new()
    } else {
        format!(" ({name:?})")
    }
}

message!(Profile, Profile, "drift profile", 4 * 1024 * 1024);
message!(DriftSummary, DriftSummary, "drift summary", 256 * 1024);
