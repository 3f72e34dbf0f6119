//! The drift gate: whether the target's inputs and outputs have moved away from the baseline.

use super::*;

/// The drift gate's seam: the figure for gate `drift_psi`, or `None` when drift is not configured.
/// `assigned` are the participating devices on the target, `control` those still on the fallback.
/// The engine judges `breached` itself, as `value > limit`, like every gate.
pub trait DriftGate {
    fn figure(
        &self,
        rollout: &Rollout,
        assigned: &[&DeviceFacts],
        control: &[&DeviceFacts],
        now: u64,
    ) -> Option<GateFigure>;
}

/// A drift gate that never has a figure.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoDriftGate;

impl DriftGate for NoDriftGate {
    fn figure(
        &self,
        _: &Rollout,
        _: &[&DeviceFacts],
        _: &[&DeviceFacts],
        _: u64,
    ) -> Option<GateFigure> {
        None
    }
}

/// The drift gate of a rollout that has ended: its limit is still listed, nothing is measured.
#[derive(Debug, Clone, Copy, Default)]
pub struct EndedDriftGate;

impl DriftGate for EndedDriftGate {
    fn figure(
        &self,
        rollout: &Rollout,
        _: &[&DeviceFacts],
        _: &[&DeviceFacts],
        _: u64,
    ) -> Option<GateFigure> {
        let limit = rollout.plan.gates.max_drift_psi?;
        let detail = format!("not measured once a rollout is {}", rollout.state.as_str());
        Some(figure(Gate::DriftPsi, None, limit, detail))
    }
}

/// The drift gate over stored drift summaries, which the server loads into it.
///
/// The rule: the target devices' summaries of the target version since the current stage began
/// are merged, and so are the control devices' summaries of the fallback version. Each numeric
/// feature and class output of the target with at least [`MIN_DRIFT_SAMPLES`] values is compared
/// by PSI. An input is compared with the fallback's merged summary of the same input when that has
/// as many values and the same bins, so a shift of the whole fleet's inputs is not blamed on the
/// new version; otherwise, and for every output (a new version is meant to answer differently from
/// the old one), with the target profile's reference. A comparison counts only above its
/// noise floor, `χ²(B − 1, 0.99) · (1/n_target + 1/n_baseline)` for `B` bins, since two samples of
/// one distribution show about that much PSI by chance. The figure is the largest PSI that counts;
/// the detail names every feature over the limit with its PSI and sample sizes.
#[derive(Debug, Clone, Default)]
pub struct SummaryDriftGate {
    /// The target version's profile; `None` when its manifest signs none.
    pub target_profile: Option<Arc<Profile>>,
    /// The fallback version's profile, when there is a fallback with one.
    pub fallback_profile: Option<Arc<Profile>>,
    /// Each device's summaries of the target version since the current stage began, merged.
    pub target: HashMap<DeviceId, DriftSummary>,
    /// Each device's summaries of the fallback version since the current stage began, merged.
    pub fallback: HashMap<DeviceId, DriftSummary>,
}

/// Where a compared feature's baseline came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Baseline {
    Fallback,
    Reference,
}

/// One feature of the target compared with its baseline.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Comparison {
    name: String,
    psi: f64,
    n: u64,
    baseline: Baseline,
    baseline_n: u64,
    noise: f64,
}

impl Comparison {
    fn new(
        name: &str,
        baseline_bins: &[u64],
        target_bins: &[u64],
        baseline: Baseline,
    ) -> Comparison {
        let total = |bins: &[u64]| bins.iter().fold(0u64, |sum, n| sum.saturating_add(*n));
        let (n, baseline_n) = (total(target_bins), total(baseline_bins));
        let dof = (target_bins.len() as u64).saturating_sub(1);
        let spread = 1.0 / n.max(1) as f64 + 1.0 / baseline_n.max(1) as f64;
        Comparison {
            name: name.to_owned(),
            psi: psi(baseline_bins, target_bins),
            n,
            baseline,
            baseline_n,
            noise: chi_square_quantile(dof, DRIFT_NOISE_CONFIDENCE) * spread,
        }
    }

    /// Above the noise floor. NaN (bins of different lengths) never counts.
    fn counts(&self) -> bool {
        self.psi > self.noise
    }

    fn describe(&self) -> String {
        let baseline = match self.baseline {
            Baseline::Fallback => "fallback",
            Baseline::Reference => "reference",
        };
        format!(
            "{} psi {} (n {} vs {baseline} n {})",
            self.name,
            format_number(self.psi),
            self.n,
            self.baseline_n
        )
    }
}

/// Merges the summaries of `devices` found in `summaries`. Summaries that do not merge (counts
/// that would overflow) are left out and logged: one device must not blind the gate.
pub(super) fn merge_of(
    devices: &[&DeviceFacts],
    summaries: &HashMap<DeviceId, DriftSummary>,
) -> Option<DriftSummary> {
    let mut merged: Option<DriftSummary> = None;
    for summary in devices
        .iter()
        .filter_map(|device| summaries.get(&device.id))
    {
        match &mut merged {
            None => merged = Some(summary.clone()),
            Some(merged) => {
                if let Err(error) = merged.merge(summary) {
                    log::warn!("drift gate: leaving out a summary that does not merge: {error}");
                }
            }
        }
    }
    merged
}

impl SummaryDriftGate {
    /// Every feature and class output of `target` with enough values, compared with its baseline.
    fn compare(
        &self,
        profile: &Profile,
        target: &DriftSummary,
        fallback: Option<&DriftSummary>,
    ) -> (Vec<Comparison>, usize) {
        let fallback_profile = self.fallback_profile.as_deref();
        let mut comparisons = Vec::new();
        let mut too_few = 0;
        for (feature, current) in profile.features.iter().zip(&target.features) {
            if current.n < MIN_DRIFT_SAMPLES {
                too_few += 1;
                continue;
            }
            // The fallback's summary of the same input, when it was binned alike. Outputs are
            // the new version's own answers and are judged against its own reference.
            let input = feature.side == TensorSide::Input;
            let on_fallback =
                fallback_profile
                    .zip(fallback)
                    .filter(|_| input)
                    .and_then(|(other, summary)| {
                        let index = other.features.iter().position(|candidate| {
                            candidate.name == feature.name && candidate.edges == feature.edges
                        })?;
                        summary
                            .features
                            .get(index)
                            .filter(|summary| summary.n >= MIN_DRIFT_SAMPLES)
                    });
            comparisons.push(match on_fallback {
                Some(baseline) => Comparison::new(
                    &feature.name,
                    &baseline.metric_bins(),
                    &current.metric_bins(),
                    Baseline::Fallback,
                ),
                None => Comparison::new(
                    &feature.name,
                    &feature.reference.metric_bins(),
                    &current.metric_bins(),
                    Baseline::Reference,
                ),
            });
        }
        for (class, current) in profile.classes.iter().zip(&target.classes) {
            if current.total() < MIN_DRIFT_SAMPLES {
                too_few += 1;
                continue;
            }
            comparisons.push(Comparison::new(
                &class.name,
                &class.reference.metric_bins(),
                &current.metric_bins(),
                Baseline::Reference,
            ));
        }
        (comparisons, too_few)
    }
}

impl DriftGate for SummaryDriftGate {
    fn figure(
        &self,
        rollout: &Rollout,
        assigned: &[&DeviceFacts],
        control: &[&DeviceFacts],
        _now: u64,
    ) -> Option<GateFigure> {
        let limit = rollout.plan.gates.max_drift_psi?;
        let target_ref = &rollout.plan.target;
        let Some(profile) = self.target_profile.as_deref() else {
            let detail = format!(
                "{}@{} has no drift profile",
                target_ref.name, target_ref.version
            );
            return Some(figure(Gate::DriftPsi, None, limit, detail));
        };
        let Some(target) = merge_of(assigned, &self.target) else {
            let detail = "no drift summaries from devices on the target yet".to_owned();
            return Some(figure(Gate::DriftPsi, None, limit, detail));
        };
        let fallback = merge_of(control, &self.fallback);
        let (mut comparisons, too_few) = self.compare(profile, &target, fallback.as_ref());
        if comparisons.is_empty() {
            let detail = format!(
                "{too_few} features with fewer than {MIN_DRIFT_SAMPLES} values on the target yet"
            );
            return Some(figure(Gate::DriftPsi, None, limit, detail));
        }
        comparisons.sort_by(|a, b| b.psi.total_cmp(&a.psi));
        let value = comparisons
            .iter()
            .filter(|comparison| comparison.counts())
            .map(|comparison| comparison.psi)
            .fold(0.0, f64::max);
        let over: Vec<String> = comparisons
            .iter()
            .filter(|comparison| comparison.counts() && comparison.psi > limit)
            .map(Comparison::describe)
            .collect();
        let detail = if over.is_empty() {
            let largest = comparisons
                .first()
                .map(|comparison| {
                    format!(
                        "{}, noise floor {}",
                        comparison.describe(),
                        format_number(comparison.noise)
                    )
                })
                .unwrap_or_default();
            format!("{} features compared; largest {largest}", comparisons.len())
        } else {
            format!("{} over the limit: {}", over.len(), over.join("; "))
        };
        Some(figure(Gate::DriftPsi, Some(value), limit, detail))
    }
}
