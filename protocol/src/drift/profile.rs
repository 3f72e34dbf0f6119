//! The reference profile: made once when a model version is published, from data the model is
//! expected to see, and shipped as a signed artifact of the manifest. It fixes the bins every
//! device counts in and holds the reference counts drift is measured against.

use serde::{Deserialize, Serialize};

use super::{ClassSummary, DriftError, FeatureSummary, PROFILE_EDGES};

/// Where a feature's values come from in an inference request or response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum FeatureSource {
    /// Column `index` of the last axis of tensor `tensor` (tabular inputs `[N, F]`; every element
    /// of a batch row is one observation). Works for inputs and outputs.
    Column { tensor: String, index: u32 },
    /// Per-sample mean of channel `channel` (axis 1) of an image-like tensor `[N, C, ...]`.
    ChannelMean { tensor: String, channel: u32 },
    /// Per-sample population standard deviation of channel `channel`.
    ChannelStd { tensor: String, channel: u32 },
    /// Per-sample mean of the `len` elements from `start` of each sample, the sample's axes after
    /// the batch axis read in order: a span of a wide `[N, F]` tensor's columns, or of a
    /// `[N, C, ...]` tensor's channels. Wide tensors are summarised as a bounded number of spans.
    SpanMean {
        tensor: String,
        start: u32,
        len: u32,
    },
    /// Per-sample population standard deviation of the same span.
    SpanStd {
        tensor: String,
        start: u32,
        len: u32,
    },
}

/// Whether a feature is read from the model's inputs or its outputs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TensorSide {
    Input,
    Output,
}

/// A numeric feature: its bins and its reference counts in them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumericProfile {
    /// Display name, e.g. `"x[3]"`, `"image.mean[0]"`, `"y[1]"`, `"bytes.mean[512..640]"`.
    pub name: String,
    pub side: TensorSide,
    pub source: FeatureSource,
    /// Strictly increasing finite edges, 2 to [`PROFILE_EDGES`] of them (quantiles that repeat are
    /// removed). Interior bins are `[e0,e1), [e1,e2), ..., [e_{k-2}, e_{k-1}]`, the last one
    /// closed. Finite values below `e0` count as `below` and above the last edge as `above`: the
    /// ±inf end bins, never part of `bins`.
    pub edges: Vec<f64>,
    /// The reference data summarised with these same edges.
    pub reference: FeatureSummary,
}

impl NumericProfile {
    /// Builds a feature's profile from reference values: edges at the quantiles of the finite
    /// values ([`quantile_edges`]), and every value, NaN and ±inf included, counted against them.
    pub fn from_values(
        name: &str,
        side: TensorSide,
        source: FeatureSource,
        values: &[f64],
    ) -> Result<NumericProfile, DriftError> {
        let edges = quantile_edges(values);
        if edges.is_empty() {
            return Err(DriftError::NoFiniteReference {
                name: name.to_owned(),
            });
        }
        let mut reference = FeatureSummary::new(&edges);
        for value in values {
            reference.observe(*value, &edges);
        }
        Ok(NumericProfile {
            name: name.to_owned(),
            side,
            source,
            edges,
            reference,
        })
    }

    /// Checks the edges and the reference summarised with them.
    pub fn check(&self) -> Result<(), DriftError> {
        check_edges(&self.edges)?;
        self.reference.check(&self.edges)
    }
}

/// [`PROFILE_EDGES`] edges at the quantiles q = 0, 1/19, ..., 1 of the finite `values`, each the
/// order statistic of nearest rank, with repeats removed. Edges are always values the reference
/// holds, so a discrete feature gets an edge at each of its common values and no empty bins between
/// them; the first edge is the smallest value and the last the largest. A single distinct value `v`
/// gives the edges `[v, next float above v]`, so it still has a bin of its own; no finite values
/// give no edges.
pub fn quantile_edges(values: &[f64]) -> Vec<f64> {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    sorted.sort_unstable_by(f64::total_cmp);
    let last_rank = sorted.len().saturating_sub(1) as u128;
    let steps = (PROFILE_EDGES - 1) as u128;
    let mut edges: Vec<f64> = Vec::with_capacity(PROFILE_EDGES);
    for step in 0..=steps {
        // Rounds step * last_rank / steps to the nearest integer.
        let rank = (step * last_rank + steps / 2) / steps;
        let Some(&edge) = usize::try_from(rank).ok().and_then(|rank| sorted.get(rank)) else {
            return Vec::new();
        };
        if edges.last().is_none_or(|previous| edge > *previous) {
            edges.push(edge);
        }
    }
    if let [only] = edges[..] {
        edges = if only < f64::MAX {
            vec![only, only.next_up()]
        } else {
            vec![only.next_down(), only]
        };
    }
    edges
}

/// Checks edges are 2 to [`PROFILE_EDGES`] finite, strictly increasing values.
fn check_edges(edges: &[f64]) -> Result<(), DriftError> {
    if !(2..=PROFILE_EDGES).contains(&edges.len()) {
        return Err(DriftError::EdgeCount {
            found: edges.len(),
            max: PROFILE_EDGES,
        });
    }
    if let Some((index, value)) = edges.iter().enumerate().find(|(_, v)| !v.is_finite()) {
        return Err(DriftError::EdgeNotFinite {
            index,
            value: *value,
        });
    }
    match first_not_increasing(edges) {
        Some((index, value)) => Err(DriftError::EdgesNotIncreasing { index, value }),
        None => Ok(()),
    }
}

/// The index and value of the first item not above the one before it.
fn first_not_increasing<T: PartialOrd + Copy>(items: &[T]) -> Option<(usize, T)> {
    items
        .iter()
        .zip(items.iter().skip(1))
        .enumerate()
        .find(|(_, (before, item))| before >= item)
        .map(|(index, (_, item))| (index + 1, *item))
}

/// Where a class output comes from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ClassSource {
    /// Argmax over the last axis of a score or probability output `[N, K]`; the confidence is the
    /// maximum value, clamped to [0, 1].
    Argmax { tensor: String },
    /// An integer label output `[N]` or `[N, 1]`; the confidence histogram stays empty.
    Label { tensor: String },
}

/// A class output: its classes and its reference counts of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassProfile {
    pub name: String,
    pub source: ClassSource,
    /// The classes the reference saw (for Argmax, `0..K`), strictly increasing, in the order of
    /// `reference.counts`.
    pub classes: Vec<i64>,
    pub reference: ClassSummary,
}

impl ClassProfile {
    /// Checks the classes are strictly increasing and the reference is shaped for them.
    pub fn check(&self) -> Result<(), DriftError> {
        if let Some((index, value)) = first_not_increasing(&self.classes) {
            return Err(DriftError::ClassesNotIncreasing { index, value });
        }
        self.reference.check(self.classes.len())
    }
}

/// When a feature counts as drifted. Part of the signed profile, so a publisher sets them per
/// model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Thresholds {
    /// PSI at which a numeric feature is flagged (Warn), unless its sample is too small for it.
    pub psi_warn: f64,
    /// PSI at which a flagged numeric feature is an Alert.
    pub psi_alert: f64,
    /// Confidence of the chi-square term of the flag rules, e.g. 0.95.
    pub confidence: f64,
    /// Jensen–Shannon distance at which a class output is flagged; twice it is an Alert.
    pub js_flag: f64,
    /// A feature's missing share must exceed the reference's share times this to be reported.
    pub missing_factor: f64,
}

impl Default for Thresholds {
    /// The usual rules of thumb: PSI 0.1 worth a look, 0.25 a real shift.
    fn default() -> Thresholds {
        Thresholds {
            psi_warn: 0.1,
            psi_alert: 0.25,
            confidence: 0.95,
            js_flag: 0.1,
            missing_factor: 1.1,
        }
    }
}

impl Thresholds {
    /// Checks every threshold is finite and in its range: PSI thresholds positive with alert at or
    /// above warn, confidence strictly within (0, 1), the JS flag within (0, 1], the missing factor
    /// at least 1.
    pub fn check(&self) -> Result<(), DriftError> {
        let rules: [(&'static str, f64, &'static str, bool); 5] = [
            ("psi_warn", self.psi_warn, "> 0", self.psi_warn > 0.0),
            (
                "psi_alert",
                self.psi_alert,
                ">= psi_warn",
                self.psi_alert >= self.psi_warn,
            ),
            (
                "confidence",
                self.confidence,
                "within (0, 1)",
                self.confidence > 0.0 && self.confidence < 1.0,
            ),
            (
                "js_flag",
                self.js_flag,
                "within (0, 1]",
                self.js_flag > 0.0 && self.js_flag <= 1.0,
            ),
            (
                "missing_factor",
                self.missing_factor,
                ">= 1",
                self.missing_factor >= 1.0,
            ),
        ];
        match rules
            .into_iter()
            .find(|(_, value, _, holds)| !(value.is_finite() && *holds))
        {
            Some((name, value, rule, _)) => Err(DriftError::Threshold { name, value, rule }),
            None => Ok(()),
        }
    }
}

/// Everything the device needs to summarise a model version and the hub to judge the summaries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    /// Numeric input features and numeric outputs.
    pub features: Vec<NumericProfile>,
    /// Categorical (class) outputs.
    pub classes: Vec<ClassProfile>,
    pub thresholds: Thresholds,
}

impl Profile {
    /// Checks the whole profile: thresholds, then every feature and class output. A profile is
    /// checked once when it is published and once when a device or hub loads it; the summaries
    /// made and judged with it rely on it.
    pub fn check(&self) -> Result<(), DriftError> {
        self.thresholds.check()?;
        for (index, feature) in self.features.iter().enumerate() {
            feature
                .check()
                .map_err(|source| DriftError::in_feature(index, &feature.name, source))?;
        }
        for (index, class) in self.classes.iter().enumerate() {
            class
                .check()
                .map_err(|source| DriftError::in_class(index, &class.name, source))?;
        }
        Ok(())
    }
}
