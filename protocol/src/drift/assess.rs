//! Judging a summary against its profile: every metric per feature, a status, and the data-quality
//! issues that make a feature worth a look whatever its distribution does. The rules are
//! documented with the public module, [`super`].

use std::f64::consts::LN_2;

use serde::{Deserialize, Serialize};

use super::metrics::{
    chi_square, chi_square_quantile, hellinger, homogeneity, js_distance, ks_from_bins, psi,
};
use super::{
    ClassProfile, ClassSummary, DriftSummary, FeatureSummary, NumericProfile, Profile, Thresholds,
};

/// [`FeatureDrift::kind`] of a numeric feature.
pub const NUMERIC_KIND: &str = "numeric";
/// [`FeatureDrift::kind`] of a class output.
pub const CLASS_KIND: &str = "class";

/// How far a feature has drifted, least to most severe.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum DriftStatus {
    Ok,
    Warn,
    Alert,
}

/// Something wrong with the data itself rather than its distribution.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum QualityIssue {
    /// NaN values, where the reference had none.
    Nan { count: u64 },
    /// ±inf values, where the reference had none.
    Infinite { count: u64 },
    /// Values outside the reference's range, more than chance allows.
    OutOfRange { below: u64, above: u64 },
    /// Classes the reference never saw.
    Unseen { count: u64 },
    /// More values missing (null or NaN) than the reference allows.
    Missing { share: f64, reference_share: f64 },
}

/// The verdict on one numeric feature or class output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDrift {
    pub name: String,
    /// [`NUMERIC_KIND`] or [`CLASS_KIND`].
    pub kind: String,
    /// The metric the status is judged on: `"psi"` for numeric features, `"js"` for classes.
    pub metric: String,
    /// That metric's value.
    pub value: f64,
    pub psi: f64,
    pub js: f64,
    pub hellinger: f64,
    pub chi_square: f64,
    pub ks: f64,
    /// Current sample size: finite values, or class outputs counted.
    pub n: u64,
    /// The flag threshold that applied to `value`.
    pub threshold: f64,
    /// Whether the current counts differ from the reference's more than chance allows at the
    /// thresholds' confidence (Pearson's test of homogeneity over the bins below): a feature is
    /// flagged only when they do, whatever `value`.
    pub significant: bool,
    pub status: DriftStatus,
    pub quality: Vec<QualityIssue>,
    /// The histograms every metric is computed from, so anyone can recompute the figures: the
    /// reference's and the current counts per bin. For a numeric feature the bins are
    /// `[below, interior..., above]` of `edges` (below the first edge, each `[e_i, e_{i+1})`
    /// with the last one closed, above the last edge); for a class output they are
    /// `[each of classes..., unseen]`.
    pub reference_bins: Vec<u64>,
    pub current_bins: Vec<u64>,
    /// A numeric feature's bin edges; empty for a class output.
    pub edges: Vec<f64>,
    /// A class output's classes, in bin order; empty for a numeric feature.
    pub classes: Vec<i64>,
}

/// Every metric between two metric-bin histograms.
struct Metrics {
    psi: f64,
    js: f64,
    hellinger: f64,
    chi_square: f64,
    ks: f64,
}

impl Metrics {
    fn between(reference: &[u64], current: &[u64]) -> Metrics {
        Metrics {
            psi: psi(reference, current),
            js: js_distance(reference, current),
            hellinger: hellinger(reference, current),
            chi_square: chi_square(reference, current),
            ks: ks_from_bins(reference, current),
        }
    }
}

/// Judges a numeric feature's current summary against its profile (see the [module docs](super)).
pub fn assess_feature(
    profile: &NumericProfile,
    current: &FeatureSummary,
    thresholds: &Thresholds,
) -> FeatureDrift {
    let bins = current.metric_bins();
    let reference_bins = profile.reference.metric_bins();
    let metrics = Metrics::between(&reference_bins, &bins);
    let threshold = psi_threshold(bins.len(), current.n, thresholds);
    let significant = significant(
        &outside_folded(&reference_bins),
        &outside_folded(&bins),
        thresholds,
    );
    let status = if current.n == 0 || !significant {
        DriftStatus::Ok
    } else {
        judge(metrics.psi, threshold, thresholds.psi_alert)
    };
    let quality = numeric_quality(&profile.reference, current, thresholds);
    FeatureDrift {
        name: profile.name.clone(),
        kind: NUMERIC_KIND.to_owned(),
        metric: "psi".to_owned(),
        value: metrics.psi,
        psi: metrics.psi,
        js: metrics.js,
        hellinger: metrics.hellinger,
        chi_square: metrics.chi_square,
        ks: metrics.ks,
        n: current.n,
        threshold,
        significant,
        status: with_quality(status, &quality),
        quality,
        reference_bins,
        current_bins: bins,
        edges: profile.edges.clone(),
        classes: Vec::new(),
    }
}

/// Judges a class output's current summary against its profile (see the [module docs](super)).
pub fn assess_class(
    profile: &ClassProfile,
    current: &ClassSummary,
    thresholds: &Thresholds,
) -> FeatureDrift {
    let bins = current.metric_bins();
    let reference_bins = profile.reference.metric_bins();
    let metrics = Metrics::between(&reference_bins, &bins);
    let n = current.total();
    let threshold = js_threshold(bins.len(), n, thresholds);
    let significant = significant(&reference_bins, &bins, thresholds);
    let status = if n == 0 || !significant {
        DriftStatus::Ok
    } else {
        judge(metrics.js, threshold, 2.0 * thresholds.js_flag)
    };
    let mut quality = Vec::new();
    if current.unseen > 0 && profile.reference.unseen == 0 {
        quality.push(QualityIssue::Unseen {
            count: current.unseen,
        });
    }
    FeatureDrift {
        name: profile.name.clone(),
        kind: CLASS_KIND.to_owned(),
        metric: "js".to_owned(),
        value: metrics.js,
        psi: metrics.psi,
        js: metrics.js,
        hellinger: metrics.hellinger,
        chi_square: metrics.chi_square,
        ks: metrics.ks,
        n,
        threshold,
        significant,
        status: with_quality(status, &quality),
        quality,
        reference_bins,
        current_bins: bins,
        edges: Vec::new(),
        classes: profile.classes.clone(),
    }
}

/// Judges every feature and class output of `summary`, most severe first: by status, then by value,
/// largest first. `summary` should have passed [`DriftSummary::validate`] against `profile`; any
/// feature or class beyond the shorter of the two lists is left out.
pub fn assess(profile: &Profile, summary: &DriftSummary) -> Vec<FeatureDrift> {
    let thresholds = &profile.thresholds;
    let numeric = profile
        .features
        .iter()
        .zip(&summary.features)
        .map(|(feature, current)| assess_feature(feature, current, thresholds));
    let classes = profile
        .classes
        .iter()
        .zip(&summary.classes)
        .map(|(class, current)| assess_class(class, current, thresholds));
    let mut drifts: Vec<FeatureDrift> = numeric.chain(classes).collect();
    drifts.sort_by(|a, b| {
        b.status
            .cmp(&a.status)
            .then_with(|| b.value.total_cmp(&a.value))
    });
    drifts
}

/// Ok below `threshold` (or for NaN), Alert at or above `alert`, Warn between.
fn judge(value: f64, threshold: f64, alert: f64) -> DriftStatus {
    if value >= threshold && value >= alert {
        DriftStatus::Alert
    } else if value >= threshold {
        DriftStatus::Warn
    } else {
        DriftStatus::Ok
    }
}

/// Whether `current` differs from `reference` beyond chance at the thresholds' confidence, by
/// Pearson's test of homogeneity (see [`homogeneity`]). NaN (bins of different lengths) never is.
fn significant(reference: &[u64], current: &[u64], thresholds: &Thresholds) -> bool {
    let (statistic, dof) = homogeneity(reference, current);
    dof > 0 && statistic >= chi_square_quantile(dof, thresholds.confidence)
}

/// The smallest PSI at which a numeric feature's shift can differ from its reference beyond chance
/// at `confidence`, however many values are judged: the test of homogeneity counts the
/// reference's own sampling, so over `m` reference values in `B` bins a shift shows only from
/// about `chi_square_quantile(B - 1, confidence) / m` (for small shifts the statistic is about
/// `m · PSI` once the current sample dwarfs the reference). `None` for an empty reference.
pub fn least_significant_psi(profile: &NumericProfile, confidence: f64) -> Option<f64> {
    let bins = outside_folded(&profile.reference.metric_bins());
    let filled = bins.iter().filter(|count| **count > 0).count() as u64;
    let values: u64 = bins
        .iter()
        .fold(0u64, |sum, count| sum.saturating_add(*count));
    (values > 0).then(|| chi_square_quantile(filled.saturating_sub(1), confidence) / values as f64)
}

/// A numeric feature's metric bins with `below` counted in the first interior bin and `above` in
/// the last. The reference's edges are its own smallest and largest values, so it has nothing
/// outside them by construction, not by evidence: a test that read its zeros as such would take
/// every value past an edge for drift, where a sample of the reference falls outside with
/// probability `2 / (n_ref + 1)`. Values outside have their own rule (`unexpectedly_out_of_range`).
fn outside_folded(bins: &[u64]) -> Vec<u64> {
    let mut folded = bins.to_vec();
    if folded.len() >= 4 {
        let (below, above) = (folded.remove(0), folded.pop().unwrap_or(0));
        folded[0] = folded[0].saturating_add(below);
        if let Some(last) = folded.last_mut() {
            *last = last.saturating_add(above);
        }
    }
    folded
}

/// The chi-square quantile for `bins` metric bins at the thresholds' confidence.
fn chi_square_bound(bins: usize, thresholds: &Thresholds) -> f64 {
    chi_square_quantile((bins as u64).saturating_sub(1), thresholds.confidence)
}

fn psi_threshold(bins: usize, n: u64, thresholds: &Thresholds) -> f64 {
    if n == 0 {
        return thresholds.psi_warn;
    }
    let noise = chi_square_bound(bins, thresholds) / n as f64;
    thresholds.psi_warn.max(noise)
}

fn js_threshold(bins: usize, n: u64, thresholds: &Thresholds) -> f64 {
    if n == 0 {
        return thresholds.js_flag;
    }
    let noise = (chi_square_bound(bins, thresholds) / (8.0 * n as f64 * LN_2)).sqrt();
    thresholds.js_flag.max(noise)
}

/// A status raised to at least Warn when there is any quality issue.
fn with_quality(status: DriftStatus, quality: &[QualityIssue]) -> DriftStatus {
    if quality.is_empty() {
        status
    } else {
        status.max(DriftStatus::Warn)
    }
}

fn numeric_quality(
    reference: &FeatureSummary,
    current: &FeatureSummary,
    thresholds: &Thresholds,
) -> Vec<QualityIssue> {
    let mut issues = Vec::new();
    if current.nan > 0 && reference.nan == 0 {
        issues.push(QualityIssue::Nan { count: current.nan });
    }
    let infinite = current.pos_inf.saturating_add(current.neg_inf);
    if infinite > 0 && reference.pos_inf == 0 && reference.neg_inf == 0 {
        issues.push(QualityIssue::Infinite { count: infinite });
    }
    if unexpectedly_out_of_range(reference, current) {
        issues.push(QualityIssue::OutOfRange {
            below: current.below,
            above: current.above,
        });
    }
    let (share, reference_share) = (missing_share(current), missing_share(reference));
    if share > 0.0 && share > reference_share * thresholds.missing_factor {
        issues.push(QualityIssue::Missing {
            share,
            reference_share,
        });
    }
    issues
}

/// More values outside the reference's range than a sample of the reference distribution would
/// show, where the reference itself had none outside (see the [module docs](super)).
fn unexpectedly_out_of_range(reference: &FeatureSummary, current: &FeatureSummary) -> bool {
    if reference.below > 0 || reference.above > 0 {
        return false;
    }
    let outside = current.below as f64 + current.above as f64;
    let expected = 2.0 * current.n as f64 / (reference.n as f64 + 1.0);
    outside > expected + 3.0 * expected.sqrt()
}

/// `(null + nan) / (n + null + nan + inf)`, 0 for an empty summary.
fn missing_share(summary: &FeatureSummary) -> f64 {
    let missing = summary.null as f64 + summary.nan as f64;
    let total = summary.n as f64 + missing + summary.pos_inf as f64 + summary.neg_inf as f64;
    if total > 0.0 {
        missing / total
    } else {
        0.0
    }
}
