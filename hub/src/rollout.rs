//! The rollout engine: which devices run a plan's target, and when a rollout widens, stops or turns
//! back.
//!
//! A signed plan fixes *what* may run and the health limits; the hub decides only *when* a device
//! moves between the target and the fallback. That decision is the part of Outpost most worth
//! testing exhaustively, so it lives here as pure functions of the rollout, the facts known about
//! each device, and the time passed in as `now`: no storage, no clock, no network, no async. The
//! server loads the facts, calls [`evaluate`], records any [`Decision`] it returns and [`apply`]s
//! it; operator commands go through [`operator_decision`] and the same [`apply`].
//!
//! Devices are placed into stages by a hash of their id and the plan's sequence ([`bucket`]), so a
//! device keeps its place while a rollout widens, and each new plan reshuffles the fleet: the same
//! devices are not always the first to take the risk of a new model.
//!
//! A plan with a shadow stage starts with it as stage 0: the devices of its bucket keep serving the
//! fallback and run the target beside it ([`shadow_for`]); the plan's own stages follow from
//! index 1. The shadow stage is left only once its signed gate ([`shadow_figures`]) has enough
//! comparisons and holds.

use std::collections::HashMap;
use std::sync::Arc;

use outpost_protocol::device::{DeviceId, InferenceWindow, ShadowCounts, LATENCY_BUCKETS_US};
use outpost_protocol::drift::{chi_square_quantile, psi, DriftSummary, Profile, TensorSide};
use outpost_protocol::name::{selector_matches, Label};
use outpost_protocol::sha256;
use outpost_protocol::trust::{BreachAction, PlanBody, ShadowStage, Slot};

use crate::api::{Decision, GateFigure, RolloutState, StageProgress};

/// Devices are hashed into this many buckets; a stage of `p` percent holds buckets below `p * 100`.
pub const BUCKETS: u32 = 10_000;
/// Prefix of the bucket hash, so the bucket cannot be steered by anything hashed elsewhere.
const BUCKET_CONTEXT: &[u8] = b"outpost rollout bucket\0";
/// `Decision::by` for decisions the engine takes by itself.
pub const ENGINE: &str = "engine";
/// Fewest latency samples each side needs before p95 latencies are compared: with fewer, a single
/// slow inference moves the 95th percentile by whole buckets and would pause rollouts on noise.
pub const MIN_LATENCY_SAMPLES: u64 = 20;
/// Latency histogram slots: one per [`LATENCY_BUCKETS_US`] bound plus the overflow slot.
pub const LATENCY_SLOTS: usize = LATENCY_BUCKETS_US.len() + 1;
/// What [`InferenceStats::p95_us`] reports when the 95th percentile is in the overflow slot, which
/// has no upper bound: slower than every bounded bucket, so it always compares as a regression.
pub const UNBOUNDED_US: u64 = u64::MAX;

/// Fewest values a feature needs on the target before the drift gate judges it, and on the
/// fallback before the fallback, rather than the reference, is what the target is compared with.
/// Below about this many, PSI over twenty-odd bins is mostly noise.
pub const MIN_DRIFT_SAMPLES: u64 = 200;
/// Confidence of the drift gate's noise floor: a feature counts as drifted only when its PSI is
/// above what two samples of one distribution reach this often.
pub const DRIFT_NOISE_CONFIDENCE: f64 = 0.99;

/// Gate names, as they appear in [`GateFigure::gate`].
pub const GATE_FAILURE_PCT: &str = "failure_pct";
pub const GATE_ERROR_RATE: &str = "error_rate";
pub const GATE_P95_REGRESSION_PCT: &str = "p95_regression_pct";
pub const GATE_DRIFT_PSI: &str = "drift_psi";
/// The shadow stage's gates: a floor on top-1 agreement and a ceiling on the mean absolute
/// difference. The first is breached *below* its limit.
pub const GATE_SHADOW_TOP1_AGREEMENT: &str = "shadow_top1_agreement";
pub const GATE_SHADOW_MEAN_ABS_DIFF: &str = "shadow_mean_abs_diff";

/// A rollout as the engine sees it.
#[derive(Debug, Clone, PartialEq)]
pub struct Rollout {
    /// The verified plan body.
    pub plan: PlanBody,
    pub state: RolloutState,
    /// Index of the stage the rollout has reached: into `plan.stages`, or, when the plan has a
    /// shadow stage, into the shadow stage followed by `plan.stages`.
    pub stage_index: usize,
    /// When each stage up to `stage_index` began; `stage_index + 1` entries.
    pub stage_started: Vec<u64>,
}

impl Rollout {
    /// A rollout that starts now, active at its first stage.
    pub fn new(plan: PlanBody, now: u64) -> Rollout {
        Rollout {
            plan,
            state: RolloutState::Active,
            stage_index: 0,
            stage_started: vec![now],
        }
    }

    /// When the current stage began (for `RolloutInfo::stage_started_at`).
    pub fn current_stage_started(&self) -> u64 {
        self.stage_start(self.stage_index)
    }

    /// When stage `index` began. `stage_started` is kept one entry per reached stage; should a
    /// stored rollout ever hold fewer, the latest known start is used rather than panicking, which
    /// errs towards later (more lenient) timeouts and bake ends.
    fn stage_start(&self, index: usize) -> u64 {
        self.stage_started
            .get(index)
            .or(self.stage_started.last())
            .copied()
            .unwrap_or(self.plan.created)
    }

    /// Stages before the plan's own: 1 when the plan has a shadow stage, else 0.
    fn shadow_offset(&self) -> usize {
        usize::from(self.plan.shadow.is_some())
    }

    /// Every stage of the rollout: the shadow stage, if any, and the plan's stages.
    pub fn stage_count(&self) -> usize {
        self.shadow_offset() + self.plan.stages.len()
    }

    /// The plan's shadow stage while the rollout is in it.
    pub fn in_shadow_stage(&self) -> Option<&ShadowStage> {
        self.plan.shadow.as_ref().filter(|_| self.stage_index == 0)
    }

    /// Whether devices whose bucket falls in stage `stage` have been moved to the target. A stage
    /// index equal to `stage_count()` means the device is beyond the last stage and never moves.
    /// The shadow stage moves no one: [`Rollout::stage_of_device`] never places a device in it.
    fn reached(&self, stage: usize) -> bool {
        stage < self.stage_count() && stage <= self.stage_index
    }

    /// The first of the plan's stages whose percentage covers the device, counted after the
    /// shadow stage.
    fn stage_of_device(&self, device: &DeviceId) -> usize {
        self.shadow_offset() + stage_of(bucket(device, self.plan.sequence), &self.plan.stages)
    }

    /// Whether the device's bucket falls in the shadow stage's percentage, whichever stage the
    /// rollout is at.
    fn in_shadow_bucket(&self, device: &DeviceId) -> bool {
        self.plan.shadow.as_ref().is_some_and(|shadow| {
            u32::from(shadow.percent) * 100 > bucket(device, self.plan.sequence)
        })
    }

    /// The cumulative percentage of stage `index` (the shadow stage's own percentage for it).
    pub fn stage_percent(&self, index: usize) -> u8 {
        match (&self.plan.shadow, index.checked_sub(self.shadow_offset())) {
            (Some(shadow), None) => shadow.percent,
            (_, Some(index)) => self.plan.stages.get(index).copied().unwrap_or(0),
            (None, None) => 0,
        }
    }
}

/// The device's bucket for the plan with `plan_sequence`, in `0..BUCKETS`: the first 8 bytes
/// (little-endian) of `sha256("outpost rollout bucket\0" || device id || sequence LE)`, modulo
/// [`BUCKETS`]. Deterministic, so hub restarts and replicas agree on who is in which stage.
pub fn bucket(device: &DeviceId, plan_sequence: u64) -> u32 {
    let mut input = Vec::with_capacity(BUCKET_CONTEXT.len() + device.0.len() + 8);
    input.extend_from_slice(BUCKET_CONTEXT);
    input.extend_from_slice(&device.0);
    input.extend_from_slice(&plan_sequence.to_le_bytes());
    let digest = sha256(&input);
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest.0[..8]);
    // The remainder is below 10_000, so the narrowing cannot lose anything.
    (u64::from_le_bytes(first) % u64::from(BUCKETS)) as u32
}

/// Index of the first stage whose cumulative percentage covers `bucket` (`percent * 100 > bucket`).
/// Returns `stages.len()` when no stage does, i.e. the last stage is below 100% and the device is
/// never part of this rollout.
pub fn stage_of(bucket: u32, stages: &[u8]) -> usize {
    stages
        .iter()
        .position(|&percent| u32::from(percent) * 100 > bucket)
        .unwrap_or(stages.len())
}

/// Which manifest of the plan this device should run now, or `None` when the plan does not apply
/// to it (its labels miss the selector) or it is outside the reached stages and the plan has no
/// fallback. A rolled-back rollout sends every selected device to the fallback.
///
/// Revocation is not known here; [`slot_for_device`] checks it too.
pub fn slot_for(rollout: &Rollout, device: &DeviceId, labels: &[Label]) -> Option<Slot> {
    if !selector_matches(&rollout.plan.selector, labels) {
        return None;
    }
    let fallback = rollout.plan.fallback.as_ref().map(|_| Slot::Fallback);
    match rollout.state {
        RolloutState::RolledBack => fallback,
        // A paused, completed or superseded rollout keeps the devices it reached on the target:
        // pausing stops the rollout widening, it does not move anyone back.
        RolloutState::Active
        | RolloutState::Paused
        | RolloutState::Completed
        | RolloutState::Superseded => {
            if rollout.reached(rollout.stage_of_device(device)) {
                Some(Slot::Target)
            } else {
                fallback
            }
        }
    }
}

/// Whether the device runs the plan's target in shadow now: the rollout is active or paused in its
/// shadow stage, the device's labels match the selector and its bucket falls in the stage's
/// percentage. It keeps serving what [`slot_for`] says meanwhile (the fallback, as no stage is
/// reached yet). Revocation is not known here; the caller checks it.
pub fn shadow_for(rollout: &Rollout, device: &DeviceId, labels: &[Label]) -> bool {
    rollout.in_shadow_stage().is_some()
        && matches!(rollout.state, RolloutState::Active | RolloutState::Paused)
        && selector_matches(&rollout.plan.selector, labels)
        && rollout.in_shadow_bucket(device)
}

/// [`slot_for`] for a device the hub knows in full: a revoked device gets nothing.
pub fn slot_for_device(rollout: &Rollout, device: &DeviceFacts) -> Option<Slot> {
    if device.revoked {
        return None;
    }
    slot_for(rollout, &device.id, &device.labels)
}

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

/// What a device last reported about this plan's target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Committed the target after probation.
    Committed { at: u64 },
    /// Loaded the target, passed its validation set and runs it in shadow.
    Shadowing { at: u64 },
    /// Failed to activate, refused the target, or rolled back from it.
    Failed { at: u64, reason: String },
}

/// What the hub knows about one device, as far as one rollout is concerned.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceFacts {
    pub id: DeviceId,
    pub labels: Vec<Label>,
    pub revoked: bool,
    pub enrolled_at: u64,
    /// Last check-in. Not used to judge silence: a device that checks in but never commits the
    /// target must still count as failed after the timeout, or a boot-looping device that manages
    /// a check-in each cycle would hold the rollout forever.
    pub last_seen: Option<u64>,
    /// The latest status this device reported for this plan's target.
    pub outcome: Option<Outcome>,
    /// Inference counters on the target version since the rollout began.
    pub target_stats: InferenceStats,
    /// Inference counters on the fallback version since the rollout began.
    pub fallback_stats: InferenceStats,
    /// Shadow comparisons of the target with the fallback since the rollout began.
    pub shadow: ShadowCounts,
}

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
        Some(figure(GATE_DRIFT_PSI, None, limit, detail))
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
enum Baseline {
    Fallback,
    Reference,
}

/// One feature of the target compared with its baseline.
#[derive(Debug, Clone, PartialEq)]
struct Comparison {
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
fn merge_of(
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
            return Some(figure(GATE_DRIFT_PSI, None, limit, detail));
        };
        let Some(target) = merge_of(assigned, &self.target) else {
            let detail = "no drift summaries from devices on the target yet".to_owned();
            return Some(figure(GATE_DRIFT_PSI, None, limit, detail));
        };
        let fallback = merge_of(control, &self.fallback);
        let (mut comparisons, too_few) = self.compare(profile, &target, fallback.as_ref());
        if comparisons.is_empty() {
            let detail = format!(
                "{too_few} features with fewer than {MIN_DRIFT_SAMPLES} values on the target yet"
            );
            return Some(figure(GATE_DRIFT_PSI, None, limit, detail));
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
        Some(figure(GATE_DRIFT_PSI, Some(value), limit, detail))
    }
}

/// What [`evaluate`] found.
#[derive(Debug, Clone, PartialEq)]
pub struct Evaluation {
    /// One entry per stage of the plan, cumulative.
    pub stages: Vec<StageProgress>,
    /// `failure_pct`, `error_rate`, `p95_regression_pct`, then `drift_psi` when the seam has one.
    pub gates: Vec<GateFigure>,
    /// The engine's decision; only ever `Some` for an active rollout.
    pub decision: Option<Decision>,
}

/// What a decision does, as written in [`Decision::action`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    Advance,
    Pause,
    Resume,
    Rollback,
    Complete,
    Superseded,
}

impl Action {
    pub fn as_str(&self) -> &'static str {
        match self {
            Action::Advance => "advance",
            Action::Pause => "pause",
            Action::Resume => "resume",
            Action::Rollback => "rollback",
            Action::Complete => "complete",
            Action::Superseded => "superseded",
        }
    }

    pub fn parse(text: &str) -> Option<Action> {
        match text {
            "advance" => Some(Action::Advance),
            "pause" => Some(Action::Pause),
            "resume" => Some(Action::Resume),
            "rollback" => Some(Action::Rollback),
            "complete" => Some(Action::Complete),
            "superseded" => Some(Action::Superseded),
            _ => None,
        }
    }
}

/// What an operator may ask of a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OperatorAction {
    Pause,
    Resume,
    Advance,
    Rollback,
}

impl OperatorAction {
    pub fn as_str(&self) -> &'static str {
        self.action().as_str()
    }

    pub fn parse(text: &str) -> Option<OperatorAction> {
        match text {
            "pause" => Some(OperatorAction::Pause),
            "resume" => Some(OperatorAction::Resume),
            "advance" => Some(OperatorAction::Advance),
            "rollback" => Some(OperatorAction::Rollback),
            _ => None,
        }
    }

    fn action(&self) -> Action {
        match self {
            OperatorAction::Pause => Action::Pause,
            OperatorAction::Resume => Action::Resume,
            OperatorAction::Advance => Action::Advance,
            OperatorAction::Rollback => Action::Rollback,
        }
    }
}

/// Where a device stands for the gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Standing {
    Succeeded,
    Failed,
    Silent,
    Pending,
}

/// A participating device, placed in its stage.
struct Placed<'a> {
    facts: &'a DeviceFacts,
    stage: usize,
    /// On the target, or, in the shadow stage, running it in shadow: what the gates judge.
    assigned: bool,
    /// In the shadow stage's bucket, whichever stage the rollout is at.
    shadow_bucket: bool,
    standing: Standing,
}

fn place<'a>(rollout: &Rollout, facts: &'a DeviceFacts, now: u64) -> Placed<'a> {
    let stage = rollout.stage_of_device(&facts.id);
    let shadow_bucket = rollout.in_shadow_bucket(&facts.id);
    let shadowing = shadow_bucket && rollout.in_shadow_stage().is_some();
    let assigned = shadowing || rollout.reached(stage);
    let standing = match &facts.outcome {
        Some(Outcome::Committed { .. }) => Standing::Succeeded,
        Some(Outcome::Shadowing { .. }) if shadowing => Standing::Succeeded,
        Some(Outcome::Failed { .. }) => Standing::Failed,
        _ if assigned => {
            // A device that enrolled after its stage began was assigned when it enrolled.
            let stage_began = rollout.stage_start(if shadowing { 0 } else { stage });
            let assigned_at = stage_began.max(facts.enrolled_at);
            // saturating_sub: a clock that steps back makes devices pending, never silent.
            if now.saturating_sub(assigned_at) > rollout.plan.gates.device_timeout_secs {
                Standing::Silent
            } else {
                Standing::Pending
            }
        }
        _ => Standing::Pending,
    };
    Placed {
        facts,
        stage,
        assigned,
        shadow_bucket,
        standing,
    }
}

/// Computes each stage's progress and every gate figure; when the rollout is active, also the
/// engine's decision: the plan's breach action when any gate is breached, otherwise `advance` (or
/// `complete` at the last stage) once the current stage has baked with no device still pending and
/// the plan allows advancing by itself.
pub fn evaluate(
    rollout: &Rollout,
    devices: &[DeviceFacts],
    now: u64,
    drift: &dyn DriftGate,
) -> Evaluation {
    let plan = &rollout.plan;
    let placed: Vec<Placed<'_>> = devices
        .iter()
        .filter(|facts| !facts.revoked && selector_matches(&plan.selector, &facts.labels))
        .map(|facts| place(rollout, facts, now))
        .collect();

    let stages = (0..rollout.stage_count())
        .map(|index| {
            let shadow = plan.shadow.is_some() && index == 0;
            stage_progress(&placed, index, rollout.stage_percent(index), shadow)
        })
        .collect::<Vec<_>>();

    let assigned: Vec<&Placed<'_>> = placed.iter().filter(|device| device.assigned).collect();
    let mut gates = vec![
        failure_figure(plan, &assigned),
        error_figure(plan, &assigned),
        p95_figure(plan, &assigned, &placed),
    ];
    let assigned_facts: Vec<&DeviceFacts> = assigned.iter().map(|device| device.facts).collect();
    let control_facts: Vec<&DeviceFacts> = placed
        .iter()
        .filter(|device| !device.assigned)
        .map(|device| device.facts)
        .collect();
    if let Some(mut figure) = drift.figure(rollout, &assigned_facts, &control_facts, now) {
        figure.breached = is_breached(figure.value, figure.limit);
        gates.push(figure);
    }
    if let Some(shadow) = rollout.in_shadow_stage() {
        gates.extend(shadow_figures(shadow, &assigned_facts));
    }

    let decision = if rollout.state == RolloutState::Active {
        engine_decision(rollout, &stages, &gates, now)
    } else {
        None
    };
    Evaluation {
        stages,
        gates,
        decision,
    }
}

/// Device counts of stage `index`: the devices of its bucket and of every stage before it, or, for
/// the shadow stage, the devices of the shadow bucket.
fn stage_progress(placed: &[Placed<'_>], index: usize, percent: u8, shadow: bool) -> StageProgress {
    let mut progress = StageProgress {
        percent,
        shadow,
        devices: 0,
        succeeded: 0,
        failed: 0,
        silent: 0,
        pending: 0,
    };
    let in_stage = |device: &&Placed<'_>| {
        if shadow {
            device.shadow_bucket
        } else {
            device.stage <= index
        }
    };
    for device in placed.iter().filter(in_stage) {
        progress.devices += 1;
        match device.standing {
            Standing::Succeeded => progress.succeeded += 1,
            Standing::Failed => progress.failed += 1,
            Standing::Silent => progress.silent += 1,
            Standing::Pending => progress.pending += 1,
        }
    }
    progress
}

/// Strictly over the limit; a figure without a value never breaches.
fn is_breached(value: Option<f64>, limit: f64) -> bool {
    value.is_some_and(|value| value > limit)
}

fn figure(gate: &str, value: Option<f64>, limit: f64, detail: String) -> GateFigure {
    GateFigure {
        gate: gate.to_owned(),
        value,
        limit,
        breached: is_breached(value, limit),
        detail,
    }
}

fn failure_figure(plan: &PlanBody, assigned: &[&Placed<'_>]) -> GateFigure {
    let limit = plan.gates.max_failure_pct;
    let count = |standing| {
        assigned
            .iter()
            .filter(|device| device.standing == standing)
            .count()
    };
    let (failed, silent) = (count(Standing::Failed), count(Standing::Silent));
    if assigned.is_empty() {
        return figure(
            GATE_FAILURE_PCT,
            None,
            limit,
            "no devices on the target yet".to_owned(),
        );
    }
    let bad = failed + silent;
    let value = bad as f64 / assigned.len() as f64 * 100.0;
    let detail = format!(
        "{bad} of {} devices ({failed} failed, {silent} silent)",
        assigned.len()
    );
    figure(GATE_FAILURE_PCT, Some(value), limit, detail)
}

fn error_figure(plan: &PlanBody, assigned: &[&Placed<'_>]) -> GateFigure {
    let limit = plan.gates.max_error_rate;
    let mut stats = InferenceStats::default();
    for device in assigned {
        stats.merge(&device.facts.target_stats);
    }
    if stats.count == 0 {
        return figure(
            GATE_ERROR_RATE,
            None,
            limit,
            "no inferences on the target yet".to_owned(),
        );
    }
    let value = stats.errors as f64 / stats.count as f64;
    let detail = format!("{} errors in {} inferences", stats.errors, stats.count);
    figure(GATE_ERROR_RATE, Some(value), limit, detail)
}

/// Target latency of the assigned devices against fallback latency of every participating device:
/// devices not yet moved are the control group, and assigned devices contribute what they measured
/// before they moved.
fn p95_figure(
    plan: &PlanBody,
    assigned: &[&Placed<'_>],
    participating: &[Placed<'_>],
) -> GateFigure {
    let limit = plan.gates.max_p95_regression_pct;
    if plan.fallback.is_none() {
        return figure(
            GATE_P95_REGRESSION_PCT,
            None,
            limit,
            "no fallback to compare against".to_owned(),
        );
    }
    let mut target = InferenceStats::default();
    for device in assigned {
        target.merge(&device.facts.target_stats);
    }
    let mut fallback = InferenceStats::default();
    for device in participating {
        fallback.merge(&device.facts.fallback_stats);
    }
    let (target_samples, fallback_samples) = (target.latency_samples(), fallback.latency_samples());
    let p95s = (target_samples >= MIN_LATENCY_SAMPLES && fallback_samples >= MIN_LATENCY_SAMPLES)
        .then(|| target.p95_us().zip(fallback.p95_us()))
        .flatten();
    let Some((target_p95, fallback_p95)) = p95s else {
        let detail = format!(
            "{target_samples} target and {fallback_samples} fallback latency samples, \
             {MIN_LATENCY_SAMPLES} of each needed"
        );
        return figure(GATE_P95_REGRESSION_PCT, None, limit, detail);
    };
    // Bucket bounds are at least 100us, so the divisor is never zero.
    let value = (target_p95 as f64 - fallback_p95 as f64) / fallback_p95.max(1) as f64 * 100.0;
    let detail = format!(
        "p95 {} vs {} ({target_samples} vs {fallback_samples} samples)",
        format_us(target_p95),
        format_us(fallback_p95)
    );
    figure(GATE_P95_REGRESSION_PCT, Some(value), limit, detail)
}

/// The shadow stage's two gate figures over the shadowing devices' comparisons. Neither has a
/// value before `min_comparisons` comparisons were reported, so a handful of early inputs can
/// neither breach the gate nor let the stage be left.
pub fn shadow_figures(shadow: &ShadowStage, shadowing: &[&DeviceFacts]) -> [GateFigure; 2] {
    let mut stats = ShadowCounts::default();
    for device in shadowing {
        stats.add(&device.shadow);
    }
    let judged = stats.judged();
    let enough = judged >= shadow.min_comparisons;
    let reporting = shadowing
        .iter()
        .filter(|device| device.shadow.judged() > 0)
        .count();
    let detail = if enough {
        format!(
            "{} agreed of {judged} comparisons on {reporting} devices, {} failed on the target; \
             mean |diff| over {} values; {} inputs not shadowed (queue full)",
            stats.top1_agreed, stats.errors, stats.abs_diff_values, stats.dropped
        )
    } else {
        format!(
            "{judged} of {} comparisons needed yet, on {reporting} devices",
            shadow.min_comparisons
        )
    };
    let agreement = enough.then(|| stats.top1_agreed as f64 / judged as f64);
    let mean_diff = (enough && stats.abs_diff_values > 0)
        .then(|| stats.abs_diff_sum / stats.abs_diff_values as f64);
    [
        GateFigure {
            gate: GATE_SHADOW_TOP1_AGREEMENT.to_owned(),
            value: agreement,
            limit: shadow.min_top1_agreement,
            // A floor: breached below its limit.
            breached: agreement.is_some_and(|value| value < shadow.min_top1_agreement),
            detail: detail.clone(),
        },
        figure(
            GATE_SHADOW_MEAN_ABS_DIFF,
            mean_diff,
            shadow.max_mean_abs_diff,
            detail,
        ),
    ]
}

fn engine_decision(
    rollout: &Rollout,
    stages: &[StageProgress],
    gates: &[GateFigure],
    now: u64,
) -> Option<Decision> {
    let plan = &rollout.plan;
    let breaches: Vec<String> = gates
        .iter()
        .filter(|figure| figure.breached)
        .map(|figure| {
            let side = if figure.gate == GATE_SHADOW_TOP1_AGREEMENT {
                "under"
            } else {
                "over"
            };
            format!(
                "{} {} {side} limit {} ({})",
                figure.gate,
                figure.value.map_or_else(|| "-".to_owned(), format_number),
                format_number(figure.limit),
                figure.detail
            )
        })
        .collect();
    let decide = |action: Action, reason: String| Decision {
        at: now,
        action: action.as_str().to_owned(),
        by: ENGINE.to_owned(),
        stage_index: rollout.stage_index,
        reason,
        figures: gates.to_vec(),
    };
    if !breaches.is_empty() {
        let action = match plan.gates.on_breach {
            BreachAction::Pause => Action::Pause,
            BreachAction::Rollback => Action::Rollback,
        };
        return Some(decide(
            action,
            format!("gate breached: {}", breaches.join("; ")),
        ));
    }
    if !plan.gates.auto_advance {
        return None;
    }
    // A stage index past the plan (a corrupt record) has no progress entry: never advance from it.
    let current = stages.get(rollout.stage_index)?;
    let baked_for = now.saturating_sub(rollout.current_stage_started());
    if baked_for < plan.gates.bake_secs || current.pending > 0 {
        return None;
    }
    // The shadow stage is left only on enough comparisons, whatever else has baked.
    let shadow_measured = gates
        .iter()
        .filter(|figure| figure.gate.starts_with("shadow_"))
        .all(|figure| figure.value.is_some());
    if rollout.in_shadow_stage().is_some() && !shadow_measured {
        return None;
    }
    let held = format!(
        "baked {baked_for}s with every gate held: {} succeeded, {} failed, {} silent of {} devices",
        current.succeeded, current.failed, current.silent, current.devices
    );
    let next = rollout.stage_index + 1;
    let stage = if rollout.in_shadow_stage().is_some() {
        "shadow stage"
    } else {
        "stage"
    };
    Some(if next >= rollout.stage_count() {
        decide(
            Action::Complete,
            format!("last stage ({}%) {held}", current.percent),
        )
    } else {
        decide(
            Action::Advance,
            format!(
                "{stage} {}% {held}; advancing to {}%",
                current.percent,
                rollout.stage_percent(next)
            ),
        )
    })
}

/// Applies a decision, from the engine or an operator, to the rollout.
///
/// An `advance` applies only when `decision.stage_index` is the rollout's current stage and a next
/// stage exists, so applying the same decision twice (a retry after a storage error) never skips a
/// stage. Actions this module does not know change nothing.
pub fn apply(rollout: &mut Rollout, decision: &Decision) {
    let Some(action) = Action::parse(&decision.action) else {
        return;
    };
    match action {
        Action::Pause => rollout.state = RolloutState::Paused,
        Action::Resume => rollout.state = RolloutState::Active,
        Action::Rollback => rollout.state = RolloutState::RolledBack,
        Action::Complete => rollout.state = RolloutState::Completed,
        Action::Superseded => rollout.state = RolloutState::Superseded,
        Action::Advance => {
            let next = rollout.stage_index + 1;
            if decision.stage_index == rollout.stage_index && next < rollout.stage_count() {
                rollout.stage_started.truncate(next);
                rollout.stage_index = next;
                rollout.stage_started.push(decision.at);
            }
        }
    }
}

/// Turns an operator's command into a decision by `by`, carrying the current gate figures, or says
/// why the command is not allowed now.
///
/// Pause needs an active rollout, resume a paused one; advance needs an active or paused rollout
/// with a stage left (a paused rollout stays paused: advancing widens it, resuming hands it back to
/// the engine). Rollback is allowed on an active or paused rollout, and on a completed one when
/// there is a fallback to return to. A rolled-back or superseded rollout takes no commands.
///
/// The figures come without the drift gate's, which needs stored profiles the caller may not have
/// loaded; they document the state the operator acted in, they do not decide anything.
pub fn operator_decision(
    rollout: &Rollout,
    action: OperatorAction,
    by: &str,
    now: u64,
    devices: &[DeviceFacts],
) -> Result<Decision, String> {
    use RolloutState::{Active, Completed, Paused};
    let state = rollout.state;
    let refuse = |allowed: &str| {
        Err(format!(
            "cannot {} rollout {}: it is {}, and only {allowed} can be",
            action.as_str(),
            rollout.plan.sequence,
            state.as_str()
        ))
    };
    let percent = rollout.stage_percent(rollout.stage_index);
    let reason = match action {
        OperatorAction::Pause if state == Active => format!("paused by {by} at {percent}%"),
        OperatorAction::Pause => return refuse("an active rollout"),
        OperatorAction::Resume if state == Paused => format!("resumed by {by} at {percent}%"),
        OperatorAction::Resume => return refuse("a paused rollout"),
        OperatorAction::Advance if matches!(state, Active | Paused) => {
            let next = rollout.stage_index + 1;
            if next >= rollout.stage_count() {
                return Err(format!(
                    "cannot advance rollout {}: it is at its last stage ({percent}%)",
                    rollout.plan.sequence
                ));
            }
            format!(
                "advanced by {by} from {percent}% to {}%",
                rollout.stage_percent(next)
            )
        }
        OperatorAction::Advance => return refuse("an active or paused rollout"),
        OperatorAction::Rollback if matches!(state, Active | Paused) => {
            format!("rolled back by {by} at {percent}%")
        }
        OperatorAction::Rollback if state == Completed => {
            if rollout.plan.fallback.is_none() {
                return Err(format!(
                    "cannot roll back rollout {}: it is completed and its plan has no fallback",
                    rollout.plan.sequence
                ));
            }
            format!("rolled back by {by} after completion")
        }
        OperatorAction::Rollback => {
            return refuse("an active, paused or completed (with a fallback) rollout")
        }
    };
    Ok(Decision {
        at: now,
        action: action.as_str().to_owned(),
        by: by.to_owned(),
        stage_index: rollout.stage_index,
        reason,
        figures: evaluate(rollout, devices, now, &NoDriftGate).gates,
    })
}

/// A figure for humans: at most four decimals, without trailing zeros.
fn format_number(value: f64) -> String {
    let text = format!("{value:.4}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// A latency bucket bound for humans: `250us`, `2.5ms`, `10s`, `>10s`.
fn format_us(us: u64) -> String {
    if us == UNBOUNDED_US {
        let last = LATENCY_BUCKETS_US[LATENCY_BUCKETS_US.len() - 1];
        return format!(">{}", format_us(last));
    }
    if us >= 1_000_000 {
        format!("{}s", format_number(us as f64 / 1_000_000.0))
    } else if us >= 1_000 {
        format!("{}ms", format_number(us as f64 / 1_000.0))
    } else {
        format!("{us}us")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use outpost_protocol::trust::{GatePolicy, ManifestRef};
    use outpost_protocol::Sha256;

    const T0: u64 = 1_700_000_000;
    const BAKE: u64 = 3_600;
    const TIMEOUT: u64 = 600;

    fn gates(on_breach: BreachAction) -> GatePolicy {
        GatePolicy {
            bake_secs: BAKE,
            device_timeout_secs: TIMEOUT,
            max_failure_pct: 5.0,
            max_error_rate: 0.02,
            max_p95_regression_pct: 20.0,
            max_drift_psi: Some(0.2),
            on_breach,
            auto_advance: true,
        }
    }

    fn manifest(version: u64) -> ManifestRef {
        ManifestRef {
            name: "vad".to_owned(),
            version,
            manifest_sha256: Sha256([version as u8; 32]),
        }
    }

    fn plan(stages: &[u8], with_fallback: bool, on_breach: BreachAction) -> PlanBody {
        PlanBody {
            sequence: 7,
            created: T0 - 100,
            expires: T0 + 86_400 * 30,
            target: manifest(2),
            fallback: with_fallback.then(|| manifest(1)),
            stages: stages.to_vec(),
            selector: vec![berlin()],
            gates: gates(on_breach),
            shadow: None,
        }
    }

    fn berlin() -> Label {
        Label::new("site", "berlin").unwrap()
    }

    fn device_id(n: u32) -> DeviceId {
        let mut bytes = [0u8; 16];
        bytes[..4].copy_from_slice(&n.to_le_bytes());
        bytes[15] = 0xd5;
        DeviceId(bytes)
    }

    fn facts(id: DeviceId, enrolled_at: u64) -> DeviceFacts {
        DeviceFacts {
            id,
            labels: vec![berlin(), Label::new("hw", "pi4").unwrap()],
            revoked: false,
            enrolled_at,
            last_seen: Some(enrolled_at),
            outcome: None,
            target_stats: InferenceStats::default(),
            fallback_stats: InferenceStats::default(),
            shadow: ShadowCounts::default(),
        }
    }

    fn fleet(n: u32) -> Vec<DeviceFacts> {
        (0..n).map(|i| facts(device_id(i), T0 - 1_000)).collect()
    }

    /// The first device id (from `from` on) whose bucket lands in `stage` of `rollout`.
    fn id_in_stage(rollout: &Rollout, stage: usize, from: u32) -> DeviceId {
        (from..)
            .map(device_id)
            .find(|id| rollout.stage_of_device(id) == stage)
            .unwrap()
    }

    fn is_assigned(rollout: &Rollout, device: &DeviceFacts) -> bool {
        rollout.reached(rollout.stage_of_device(&device.id))
    }

    /// Every assigned device that has not reported yet commits the target at `at`.
    fn commit_assigned(rollout: &Rollout, devices: &mut [DeviceFacts], at: u64) {
        for device in devices.iter_mut() {
            if is_assigned(rollout, device) && device.outcome.is_none() {
                device.outcome = Some(Outcome::Committed { at });
            }
        }
    }

    fn failed(at: u64) -> Option<Outcome> {
        Some(Outcome::Failed {
            at,
            reason: "validation mismatch".to_owned(),
        })
    }

    /// A histogram with `n` samples in slot `slot`.
    fn latencies(slot: usize, n: u64) -> InferenceStats {
        let mut buckets = vec![0; LATENCY_SLOTS];
        buckets[slot] = n;
        InferenceStats {
            count: n,
            errors: 0,
            latency_buckets: buckets,
        }
    }

    fn gate<'a>(evaluation: &'a Evaluation, name: &str) -> &'a GateFigure {
        evaluation
            .gates
            .iter()
            .find(|figure| figure.gate == name)
            .unwrap()
    }

    fn action(evaluation: &Evaluation) -> Option<&str> {
        evaluation
            .decision
            .as_ref()
            .map(|decision| decision.action.as_str())
    }

    #[test]
    fn bucket_is_deterministic_and_depends_on_device_and_sequence() {
        let id = device_id(42);
        assert_eq!(bucket(&id, 7), bucket(&id, 7));
        assert!(bucket(&id, 7) < BUCKETS);
        // Pin the hash construction: the hub and any replica or later version must agree on it.
        let mut input = b"outpost rollout bucket\0".to_vec();
        input.extend_from_slice(&id.0);
        input.extend_from_slice(&7u64.to_le_bytes());
        let digest = sha256(&input);
        let expected = u64::from_le_bytes(digest.0[..8].try_into().unwrap()) % 10_000;
        assert_eq!(u64::from(bucket(&id, 7)), expected);

        let moved = (0..100)
            .filter(|i| bucket(&device_id(*i), 7) != bucket(&device_id(*i), 8))
            .count();
        assert!(
            moved > 90,
            "a new plan should reshuffle the fleet, {moved} of 100 moved"
        );
        let distinct: std::collections::HashSet<u32> =
            (0..100).map(|i| bucket(&device_id(i), 7)).collect();
        assert!(distinct.len() > 95);
    }

    #[test]
    fn buckets_are_roughly_uniform() {
        let mut deciles = [0u32; 10];
        for i in 0..10_000u32 {
            // Ids that differ in scattered bytes, like real random ids would.
            let mut bytes = [0u8; 16];
            bytes[..4].copy_from_slice(&i.wrapping_mul(2_654_435_761).to_be_bytes());
            bytes[8..12].copy_from_slice(&i.to_le_bytes());
            let b = bucket(&DeviceId(bytes), 3);
            deciles[(b / 1_000) as usize] += 1;
        }
        for (decile, n) in deciles.iter().enumerate() {
            assert!(
                (800..=1_200).contains(n),
                "decile {decile} holds {n} of 10000 devices: {deciles:?}"
            );
        }
    }

    #[test]
    fn stage_of_boundaries() {
        let stages = [1, 10, 50, 100];
        assert_eq!(stage_of(0, &stages), 0);
        assert_eq!(stage_of(99, &stages), 0);
        assert_eq!(stage_of(100, &stages), 1);
        assert_eq!(stage_of(999, &stages), 1);
        assert_eq!(stage_of(1_000, &stages), 2);
        assert_eq!(stage_of(4_999, &stages), 2);
        assert_eq!(stage_of(5_000, &stages), 3);
        assert_eq!(stage_of(9_999, &stages), 3);
        // A plan that stops at 50% never reaches the upper half of the fleet.
        assert_eq!(stage_of(4_999, &[10, 50]), 1);
        assert_eq!(stage_of(5_000, &[10, 50]), 2);
        assert_eq!(stage_of(0, &[]), 0);
    }

    #[test]
    fn slot_for_each_case() {
        let mut rollout = Rollout::new(plan(&[10, 50], true, BreachAction::Pause), T0);
        let labels = [berlin()];
        let inside = id_in_stage(&rollout, 0, 0);
        let later = id_in_stage(&rollout, 1, 0);
        let never = id_in_stage(&rollout, 2, 0);

        assert_eq!(slot_for(&rollout, &inside, &labels), Some(Slot::Target));
        assert_eq!(slot_for(&rollout, &later, &labels), Some(Slot::Fallback));
        assert_eq!(slot_for(&rollout, &never, &labels), Some(Slot::Fallback));
        // Labels missing the selector: the plan is not for this device at all.
        let munich = [Label::new("site", "munich").unwrap()];
        assert_eq!(slot_for(&rollout, &inside, &munich), None);
        assert_eq!(slot_for(&rollout, &inside, &[]), None);

        let mut revoked = facts(inside, T0);
        assert_eq!(slot_for_device(&rollout, &revoked), Some(Slot::Target));
        revoked.revoked = true;
        assert_eq!(slot_for_device(&rollout, &revoked), None);

        for state in [
            RolloutState::Paused,
            RolloutState::Completed,
            RolloutState::Superseded,
        ] {
            rollout.state = state;
            assert_eq!(slot_for(&rollout, &inside, &labels), Some(Slot::Target));
            assert_eq!(slot_for(&rollout, &later, &labels), Some(Slot::Fallback));
        }

        // Without a fallback, a device outside the reached stages has nothing to run from the plan.
        let mut first_release = Rollout::new(plan(&[10, 50], false, BreachAction::Pause), T0);
        assert_eq!(
            slot_for(&first_release, &inside, &labels),
            Some(Slot::Target)
        );
        assert_eq!(slot_for(&first_release, &later, &labels), None);
        first_release.state = RolloutState::RolledBack;
        assert_eq!(slot_for(&first_release, &inside, &labels), None);

        rollout.state = RolloutState::RolledBack;
        for id in [inside, later, never] {
            assert_eq!(slot_for(&rollout, &id, &labels), Some(Slot::Fallback));
        }
    }

    #[test]
    fn full_rollout_advances_after_each_bake_and_completes() {
        let mut rollout = Rollout::new(plan(&[1, 10, 50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(200);
        let mut expected_devices = Vec::new();
        for expected in ["advance", "advance", "advance", "complete"] {
            let started = rollout.current_stage_started();
            let early = evaluate(&rollout, &devices, started + 1, &NoDriftGate);
            assert_eq!(action(&early), None, "stage {}", rollout.stage_index);

            commit_assigned(&rollout, &mut devices, started + 60);
            let almost = evaluate(&rollout, &devices, started + BAKE - 1, &NoDriftGate);
            assert_eq!(
                action(&almost),
                None,
                "stage {} before bake",
                rollout.stage_index
            );

            let baked = evaluate(&rollout, &devices, started + BAKE, &NoDriftGate);
            let decision = baked.decision.clone().unwrap();
            assert_eq!(decision.action, expected);
            assert_eq!(decision.by, ENGINE);
            assert_eq!(decision.stage_index, rollout.stage_index);
            assert_eq!(decision.figures, baked.gates);
            let current = &baked.stages[rollout.stage_index];
            assert_eq!(current.succeeded, current.devices);
            assert_eq!(current.pending, 0);
            expected_devices.push(current.devices);
            assert!(baked.gates.iter().all(|figure| !figure.breached));

            apply(&mut rollout, &decision);
        }
        assert_eq!(rollout.state, RolloutState::Completed);
        assert_eq!(rollout.stage_index, 3);
        assert_eq!(rollout.stage_started.len(), 4);
        assert!(rollout
            .stage_started
            .windows(2)
            .all(|pair| pair[1] == pair[0] + BAKE));
        // Cumulative stages: each holds at least the one before, and the last holds everyone.
        assert!(expected_devices.windows(2).all(|pair| pair[0] <= pair[1]));
        assert_eq!(expected_devices[3], 200);
        assert!(
            (5..=40).contains(&expected_devices[1]),
            "{expected_devices:?}"
        );
        for device in &devices {
            assert_eq!(slot_for_device(&rollout, device), Some(Slot::Target));
        }
        let after = evaluate(&rollout, &devices, T0 + 10 * BAKE, &NoDriftGate);
        assert_eq!(action(&after), None);
    }

    #[test]
    fn pending_devices_hold_a_baked_stage_until_they_report() {
        let mut plan = plan(&[10, 100], true, BreachAction::Pause);
        plan.gates.device_timeout_secs = 2 * BAKE;
        let rollout = Rollout::new(plan, T0);
        let mut devices = fleet(100);
        let evaluation = evaluate(&rollout, &devices, T0 + BAKE, &NoDriftGate);
        assert!(evaluation.stages[0].pending > 0);
        assert_eq!(action(&evaluation), None);

        commit_assigned(&rollout, &mut devices, T0 + BAKE + 5);
        let evaluation = evaluate(&rollout, &devices, T0 + BAKE + 10, &NoDriftGate);
        assert_eq!(action(&evaluation), Some("advance"));
    }

    #[test]
    fn an_empty_stage_advances_after_its_bake() {
        let rollout = Rollout::new(plan(&[1, 100], true, BreachAction::Pause), T0);
        let devices = vec![facts(id_in_stage(&rollout, 1, 0), T0 - 10)];
        let evaluation = evaluate(&rollout, &devices, T0 + BAKE - 1, &NoDriftGate);
        assert_eq!(evaluation.stages[0].devices, 0);
        assert_eq!(gate(&evaluation, GATE_FAILURE_PCT).value, None);
        assert_eq!(action(&evaluation), None);
        let evaluation = evaluate(&rollout, &devices, T0 + BAKE, &NoDriftGate);
        assert_eq!(action(&evaluation), Some("advance"));
    }

    #[test]
    fn no_auto_advance_means_no_engine_advance() {
        let mut plan = plan(&[10, 100], true, BreachAction::Pause);
        plan.gates.auto_advance = false;
        let rollout = Rollout::new(plan, T0);
        let mut devices = fleet(50);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        let evaluation = evaluate(&rollout, &devices, T0 + 10 * BAKE, &NoDriftGate);
        assert_eq!(action(&evaluation), None);
        // Breaches are still acted on.
        for device in devices.iter_mut().filter(|d| is_assigned(&rollout, d)) {
            device.outcome = failed(T0 + 2);
        }
        let evaluation = evaluate(&rollout, &devices, T0 + 10 * BAKE, &NoDriftGate);
        assert_eq!(action(&evaluation), Some("pause"));
    }

    #[test]
    fn failure_breach_pauses() {
        let mut rollout = Rollout::new(plan(&[10, 50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(200);
        commit_assigned(&rollout, &mut devices, T0 + 30);
        let assigned: Vec<usize> = (0..devices.len())
            .filter(|i| is_assigned(&rollout, &devices[*i]))
            .collect();
        assert!(
            assigned.len() >= 5,
            "stage 0 holds {} devices",
            assigned.len()
        );
        devices[assigned[0]].outcome = failed(T0 + 40);
        devices[assigned[1]].outcome = failed(T0 + 41);

        let evaluation = evaluate(&rollout, &devices, T0 + 60, &NoDriftGate);
        let figure = gate(&evaluation, GATE_FAILURE_PCT);
        let expected = 2.0 / assigned.len() as f64 * 100.0;
        assert_eq!(figure.value, Some(expected));
        assert!(figure.breached);
        assert_eq!(
            figure.detail,
            format!("2 of {} devices (2 failed, 0 silent)", assigned.len())
        );
        assert_eq!(evaluation.stages[0].failed, 2);
        assert_eq!(evaluation.stages[2].failed, 2);
        let decision = evaluation.decision.clone().unwrap();
        assert_eq!(decision.action, "pause");
        assert_eq!(decision.by, "engine");
        assert_eq!(decision.stage_index, 0);
        assert!(
            decision.reason.contains("failure_pct"),
            "{}",
            decision.reason
        );
        assert!(decision.reason.contains("limit 5"), "{}", decision.reason);
        assert_eq!(
            decision
                .figures
                .iter()
                .map(|f| f.gate.as_str())
                .collect::<Vec<_>>(),
            [GATE_FAILURE_PCT, GATE_ERROR_RATE, GATE_P95_REGRESSION_PCT]
        );

        apply(&mut rollout, &decision);
        assert_eq!(rollout.state, RolloutState::Paused);
        // Paused devices keep the target; the rollout just stops widening.
        assert_eq!(
            slot_for_device(&rollout, &devices[assigned[2]]),
            Some(Slot::Target)
        );
    }

    #[test]
    fn failures_at_the_limit_do_not_breach() {
        let mut plan = plan(&[100], true, BreachAction::Pause);
        plan.gates.max_failure_pct = 10.0;
        let rollout = Rollout::new(plan, T0);
        let mut devices = fleet(20);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        devices[0].outcome = failed(T0 + 2);
        devices[1].outcome = failed(T0 + 2);
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        assert_eq!(gate(&evaluation, GATE_FAILURE_PCT).value, Some(10.0));
        assert!(!gate(&evaluation, GATE_FAILURE_PCT).breached);
        assert_eq!(action(&evaluation), None);
    }

    #[test]
    fn breach_with_rollback_policy_sends_everyone_to_the_fallback() {
        let mut rollout = Rollout::new(plan(&[10, 50, 100], true, BreachAction::Rollback), T0);
        let mut devices = fleet(200);
        for device in devices.iter_mut().filter(|d| is_assigned(&rollout, d)) {
            device.outcome = failed(T0 + 5);
        }
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        let decision = evaluation.decision.unwrap();
        assert_eq!(decision.action, "rollback");
        apply(&mut rollout, &decision);
        assert_eq!(rollout.state, RolloutState::RolledBack);
        for device in &devices {
            assert_eq!(slot_for_device(&rollout, device), Some(Slot::Fallback));
        }
        // Figures are still computed for a rolled-back rollout, but it takes no more decisions.
        let after = evaluate(&rollout, &devices, T0 + 20, &NoDriftGate);
        assert!(gate(&after, GATE_FAILURE_PCT).breached);
        assert_eq!(action(&after), None);
    }

    #[test]
    fn a_silent_device_fails_the_gate_after_the_timeout() {
        let mut plan = plan(&[10, 100], true, BreachAction::Pause);
        plan.gates.max_failure_pct = 2.0;
        let rollout = Rollout::new(plan, T0);
        let mut devices = fleet(200);
        let mute = (0..devices.len())
            .find(|i| is_assigned(&rollout, &devices[*i]))
            .unwrap();
        commit_assigned(&rollout, &mut devices, T0 + 10);
        devices[mute].outcome = None;
        devices[mute].last_seen = Some(T0 + TIMEOUT * 10);

        let in_time = evaluate(&rollout, &devices, T0 + TIMEOUT, &NoDriftGate);
        assert_eq!(in_time.stages[0].pending, 1);
        assert_eq!(in_time.stages[0].silent, 0);
        assert_eq!(action(&in_time), None);

        // Checking in does not help: only committing does.
        let late = evaluate(&rollout, &devices, T0 + TIMEOUT + 1, &NoDriftGate);
        assert_eq!(late.stages[0].pending, 0);
        assert_eq!(late.stages[0].silent, 1);
        assert_eq!(late.stages[1].silent, 1);
        let figure = gate(&late, GATE_FAILURE_PCT);
        assert!(figure.breached);
        assert!(
            figure.detail.contains("0 failed, 1 silent"),
            "{}",
            figure.detail
        );
        assert_eq!(action(&late), Some("pause"));
    }

    #[test]
    fn unassigned_devices_are_never_silent() {
        let rollout = Rollout::new(plan(&[10, 100], true, BreachAction::Pause), T0);
        let devices = vec![facts(id_in_stage(&rollout, 1, 0), T0 - 10)];
        let evaluation = evaluate(&rollout, &devices, T0 + 100 * TIMEOUT, &NoDriftGate);
        assert_eq!(evaluation.stages[1].pending, 1);
        assert_eq!(evaluation.stages[1].silent, 0);
        assert_eq!(gate(&evaluation, GATE_FAILURE_PCT).value, None);
    }

    #[test]
    fn a_device_enrolled_mid_rollout_joins_the_current_stage_from_its_enrollment() {
        let mut rollout = Rollout::new(plan(&[10, 50, 100], true, BreachAction::Pause), T0);
        let advance = Decision {
            at: T0 + BAKE,
            action: "advance".to_owned(),
            by: ENGINE.to_owned(),
            stage_index: 0,
            reason: String::new(),
            figures: Vec::new(),
        };
        apply(&mut rollout, &advance);
        assert_eq!(rollout.stage_index, 1);
        assert_eq!(rollout.stage_started, [T0, T0 + BAKE]);

        // Its bucket is in the first stage, which began long before it enrolled.
        let enrolled = T0 + BAKE + 500;
        let newcomer = facts(id_in_stage(&rollout, 0, 0), enrolled);
        assert_eq!(slot_for_device(&rollout, &newcomer), Some(Slot::Target));
        let devices = vec![newcomer];

        let in_time = evaluate(&rollout, &devices, enrolled + TIMEOUT, &NoDriftGate);
        assert_eq!(in_time.stages[1].devices, 1);
        assert_eq!(in_time.stages[1].pending, 1);
        assert_eq!(in_time.stages[1].silent, 0);

        let late = evaluate(&rollout, &devices, enrolled + TIMEOUT + 1, &NoDriftGate);
        assert_eq!(late.stages[1].silent, 1);
        assert_eq!(late.stages[1].pending, 0);

        // A device that enrolled before its stage began is timed from the stage's start.
        let old_timer = facts(id_in_stage(&rollout, 1, 0), T0 - 10);
        let evaluation = evaluate(
            &rollout,
            &[old_timer],
            T0 + BAKE + TIMEOUT + 1,
            &NoDriftGate,
        );
        assert_eq!(evaluation.stages[1].silent, 1);
    }

    #[test]
    fn error_rate_breach() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(40);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        let assigned: Vec<usize> = (0..devices.len())
            .filter(|i| is_assigned(&rollout, &devices[*i]))
            .collect();
        assert!(assigned.len() >= 2);
        devices[assigned[0]].target_stats = InferenceStats {
            count: 600,
            errors: 30,
            latency_buckets: Vec::new(),
        };
        devices[assigned[1]].target_stats = InferenceStats {
            count: 400,
            errors: 1,
            latency_buckets: Vec::new(),
        };
        // Errors on devices not yet on the target, or on the fallback, are not the target's.
        let outside = (0..devices.len())
            .find(|i| !is_assigned(&rollout, &devices[*i]))
            .unwrap();
        devices[outside].target_stats.count = 10;
        devices[outside].target_stats.errors = 10;
        devices[assigned[0]].fallback_stats.count = 10;
        devices[assigned[0]].fallback_stats.errors = 10;

        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        let figure = gate(&evaluation, GATE_ERROR_RATE);
        assert_eq!(figure.value, Some(0.031));
        assert!(figure.breached);
        assert_eq!(figure.detail, "31 errors in 1000 inferences");
        assert_eq!(action(&evaluation), Some("pause"));
        let reason = &evaluation.decision.as_ref().unwrap().reason;
        assert!(
            reason.contains("error_rate 0.031 over limit 0.02"),
            "{reason}"
        );

        devices[assigned[0]].target_stats.errors = 10;
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        assert!(!gate(&evaluation, GATE_ERROR_RATE).breached);
        assert_eq!(action(&evaluation), None);

        let quiet = evaluate(&rollout, &fleet(40), T0 + 10, &NoDriftGate);
        assert_eq!(gate(&quiet, GATE_ERROR_RATE).value, None);
    }

    #[test]
    fn p95_regression_breach_and_minimum_samples() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(40);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        // Every device measured the fallback at 10ms; assigned devices measure the target at 25ms.
        for device in devices.iter_mut() {
            device.fallback_stats = latencies(6, 5);
            if is_assigned(&rollout, device) {
                device.target_stats = latencies(7, 5);
            }
        }
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        let figure = gate(&evaluation, GATE_P95_REGRESSION_PCT);
        assert_eq!(figure.value, Some(150.0));
        assert!(figure.breached);
        assert!(
            figure.detail.starts_with("p95 25ms vs 10ms"),
            "{}",
            figure.detail
        );
        assert_eq!(action(&evaluation), Some("pause"));

        // Same latency on both: no regression.
        for device in devices.iter_mut().filter(|d| d.target_stats.count > 0) {
            device.target_stats = latencies(6, 5);
        }
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        assert_eq!(gate(&evaluation, GATE_P95_REGRESSION_PCT).value, Some(0.0));

        // 19 target samples are too few to judge.
        let mut sparse = fleet(40);
        sparse[0].fallback_stats = latencies(6, 100);
        let on_target = (0..sparse.len())
            .find(|i| is_assigned(&rollout, &sparse[*i]))
            .unwrap();
        sparse[on_target].target_stats = latencies(12, 19);
        let evaluation = evaluate(&rollout, &sparse, T0 + 10, &NoDriftGate);
        let figure = gate(&evaluation, GATE_P95_REGRESSION_PCT);
        assert_eq!(figure.value, None);
        assert!(!figure.breached);
        assert_eq!(action(&evaluation), None);
        sparse[on_target].target_stats = latencies(12, 20);
        let evaluation = evaluate(&rollout, &sparse, T0 + 10, &NoDriftGate);
        assert!(gate(&evaluation, GATE_P95_REGRESSION_PCT).breached);
        // ... and so are 19 fallback samples.
        sparse[0].fallback_stats = latencies(6, 19);
        let evaluation = evaluate(&rollout, &sparse, T0 + 10, &NoDriftGate);
        assert_eq!(gate(&evaluation, GATE_P95_REGRESSION_PCT).value, None);

        // Without a fallback there is nothing to compare against, but the figure is still listed.
        let first_release = Rollout::new(plan(&[50, 100], false, BreachAction::Pause), T0);
        let evaluation = evaluate(&first_release, &devices, T0 + 10, &NoDriftGate);
        let figure = gate(&evaluation, GATE_P95_REGRESSION_PCT);
        assert_eq!(figure.value, None);
        assert_eq!(figure.detail, "no fallback to compare against");
    }

    #[test]
    fn inference_stats_merge_and_p95() {
        let mut stats = InferenceStats::default();
        assert_eq!(stats.p95_us(), None);
        stats.merge(&latencies(0, 95));
        assert_eq!(stats.p95_us(), Some(100));
        stats.merge(&latencies(3, 5));
        assert_eq!(stats.count, 100);
        assert_eq!(stats.latency_samples(), 100);
        // The 95th of 100 samples is still in the first bucket; one more slow sample moves it.
        assert_eq!(stats.p95_us(), Some(100));
        stats.merge(&latencies(3, 1));
        assert_eq!(stats.p95_us(), Some(1_000));

        let overflow = latencies(LATENCY_SLOTS - 1, 30);
        assert_eq!(overflow.p95_us(), Some(UNBOUNDED_US));
        assert_eq!(format_us(UNBOUNDED_US), ">10s");

        // A histogram longer than the protocol's folds its excess into the overflow slot.
        let long = InferenceStats {
            count: 3,
            errors: 1,
            latency_buckets: vec![1; 40],
        };
        let mut merged = InferenceStats::default();
        merged.merge(&long);
        assert_eq!(merged.latency_buckets.len(), LATENCY_SLOTS);
        assert_eq!(merged.latency_buckets[LATENCY_SLOTS - 1], 40 - 16);
        assert_eq!(merged.latency_samples(), 40);
        assert_eq!(merged.errors, 1);

        let mut huge = InferenceStats {
            count: u64::MAX,
            errors: 0,
            latency_buckets: vec![u64::MAX; LATENCY_SLOTS],
        };
        huge.merge(&huge.clone());
        assert_eq!(huge.count, u64::MAX);
        assert_eq!(huge.p95_us(), Some(UNBOUNDED_US));

        let window = InferenceWindow {
            model: "vad".to_owned(),
            version: 2,
            start: T0,
            end: T0 + 60,
            count: 7,
            errors: 2,
            latency_buckets: vec![0, 7],
            drift: None,
            shadow: None,
        };
        let from_window = InferenceStats::from_window(&window);
        assert_eq!((from_window.count, from_window.errors), (7, 2));
        assert_eq!(from_window.p95_us(), Some(250));
    }

    #[test]
    fn operator_actions_per_state() {
        use OperatorAction::{Advance, Pause, Resume, Rollback};
        use RolloutState::{Active, Completed, Paused, RolledBack, Superseded};
        let devices = fleet(20);
        let at = |state, stage_index, with_fallback| {
            let mut rollout =
                Rollout::new(plan(&[10, 50, 100], with_fallback, BreachAction::Pause), T0);
            rollout.state = state;
            rollout.stage_index = stage_index;
            rollout.stage_started = (0..=stage_index as u64).map(|i| T0 + i * BAKE).collect();
            rollout
        };
        let allowed = |rollout: &Rollout, action| {
            operator_decision(rollout, action, "alice", T0 + 5 * BAKE, &devices).is_ok()
        };

        let cases = [
            // (state, stage, fallback, action, allowed)
            (Active, 0, true, Pause, true),
            (Active, 0, true, Resume, false),
            (Active, 0, true, Advance, true),
            (Active, 2, true, Advance, false),
            (Active, 0, true, Rollback, true),
            (Active, 0, false, Rollback, true),
            (Paused, 1, true, Pause, false),
            (Paused, 1, true, Resume, true),
            (Paused, 1, true, Advance, true),
            (Paused, 2, true, Advance, false),
            (Paused, 1, true, Rollback, true),
            (Completed, 2, true, Pause, false),
            (Completed, 2, true, Resume, false),
            (Completed, 2, true, Advance, false),
            (Completed, 2, true, Rollback, true),
            (Completed, 2, false, Rollback, false),
            (RolledBack, 1, true, Pause, false),
            (RolledBack, 1, true, Resume, false),
            (RolledBack, 1, true, Advance, false),
            (RolledBack, 1, true, Rollback, false),
            (Superseded, 1, true, Pause, false),
            (Superseded, 1, true, Resume, false),
            (Superseded, 1, true, Advance, false),
            (Superseded, 1, true, Rollback, false),
        ];
        for (state, stage, with_fallback, action, expected) in cases {
            let rollout = at(state, stage, with_fallback);
            assert_eq!(
                allowed(&rollout, action),
                expected,
                "{action:?} on {state:?} at stage {stage}, fallback {with_fallback}"
            );
        }

        let rollout = at(Active, 0, true);
        let decision = operator_decision(&rollout, Advance, "alice", T0 + 99, &devices).unwrap();
        assert_eq!(decision.action, "advance");
        assert_eq!(decision.by, "alice");
        assert_eq!(decision.at, T0 + 99);
        assert_eq!(decision.stage_index, 0);
        assert_eq!(decision.reason, "advanced by alice from 10% to 50%");
        assert_eq!(decision.figures.len(), 3);

        let error =
            operator_decision(&at(Active, 0, true), Resume, "bob", T0, &devices).unwrap_err();
        assert_eq!(
            error,
            "cannot resume rollout 7: it is active, and only a paused rollout can be"
        );
        let error =
            operator_decision(&at(Active, 2, true), Advance, "bob", T0, &devices).unwrap_err();
        assert_eq!(
            error,
            "cannot advance rollout 7: it is at its last stage (100%)"
        );
    }

    #[test]
    fn apply_moves_state_and_stages() {
        let mut rollout = Rollout::new(plan(&[10, 50, 100], true, BreachAction::Pause), T0);
        let decision = |action: &str, at, stage_index| Decision {
            at,
            action: action.to_owned(),
            by: "alice".to_owned(),
            stage_index,
            reason: String::new(),
            figures: Vec::new(),
        };
        apply(&mut rollout, &decision("pause", T0 + 1, 0));
        assert_eq!(rollout.state, RolloutState::Paused);
        // An operator may widen a paused rollout; it stays paused until resumed.
        apply(&mut rollout, &decision("advance", T0 + 2, 0));
        assert_eq!(rollout.state, RolloutState::Paused);
        assert_eq!(rollout.stage_index, 1);
        // Regression guard: the same advance applied twice (a retried write) must not skip a stage.
        apply(&mut rollout, &decision("advance", T0 + 3, 0));
        assert_eq!(rollout.stage_index, 1);
        assert_eq!(rollout.stage_started, [T0, T0 + 2]);
        apply(&mut rollout, &decision("resume", T0 + 4, 1));
        assert_eq!(rollout.state, RolloutState::Active);
        apply(&mut rollout, &decision("advance", T0 + 5, 1));
        assert_eq!(rollout.stage_index, 2);
        assert_eq!(rollout.current_stage_started(), T0 + 5);
        // There is no stage past the last.
        apply(&mut rollout, &decision("advance", T0 + 6, 2));
        assert_eq!(rollout.stage_index, 2);
        assert_eq!(rollout.stage_started.len(), 3);
        apply(&mut rollout, &decision("complete", T0 + 7, 2));
        assert_eq!(rollout.state, RolloutState::Completed);
        apply(&mut rollout, &decision("no-such-action", T0 + 8, 2));
        assert_eq!(rollout.state, RolloutState::Completed);
        apply(&mut rollout, &decision("rollback", T0 + 9, 2));
        assert_eq!(rollout.state, RolloutState::RolledBack);
        apply(&mut rollout, &decision("superseded", T0 + 10, 2));
        assert_eq!(rollout.state, RolloutState::Superseded);
    }

    #[test]
    fn a_paused_rollout_gets_no_engine_decision() {
        let mut rollout = Rollout::new(plan(&[10, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(100);
        for device in devices.iter_mut().filter(|d| is_assigned(&rollout, d)) {
            device.outcome = failed(T0 + 1);
        }
        rollout.state = RolloutState::Paused;
        let evaluation = evaluate(&rollout, &devices, T0 + 10 * BAKE, &NoDriftGate);
        assert!(gate(&evaluation, GATE_FAILURE_PCT).breached);
        assert_eq!(evaluation.decision, None);

        // Nor does a paused rollout whose stage has baked cleanly advance.
        let mut clean = fleet(100);
        commit_assigned(&rollout, &mut clean, T0 + 1);
        let evaluation = evaluate(&rollout, &clean, T0 + 10 * BAKE, &NoDriftGate);
        assert_eq!(evaluation.decision, None);
        rollout.state = RolloutState::Active;
        let evaluation = evaluate(&rollout, &clean, T0 + 10 * BAKE, &NoDriftGate);
        assert_eq!(action(&evaluation), Some("advance"));
    }

    #[test]
    fn progress_counts_only_participating_devices() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(100);
        devices[0].revoked = true;
        devices[1].labels = vec![Label::new("site", "munich").unwrap()];
        let evaluation = evaluate(&rollout, &devices, T0 + 1, &NoDriftGate);
        assert_eq!(evaluation.stages.len(), 2);
        assert_eq!(evaluation.stages[1].devices, 98);
        assert_eq!(evaluation.stages[0].percent, 50);
        assert_eq!(evaluation.stages[1].percent, 100);
        let in_first = devices[2..]
            .iter()
            .filter(|d| rollout.stage_of_device(&d.id) == 0)
            .count() as u64;
        assert_eq!(evaluation.stages[0].devices, in_first);
        assert_eq!(evaluation.stages[0].pending, in_first);
    }

    struct FixedDrift(f64);

    impl DriftGate for FixedDrift {
        fn figure(
            &self,
            rollout: &Rollout,
            assigned: &[&DeviceFacts],
            _: &[&DeviceFacts],
            _: u64,
        ) -> Option<GateFigure> {
            let limit = rollout.plan.gates.max_drift_psi?;
            Some(GateFigure {
                gate: GATE_DRIFT_PSI.to_owned(),
                value: Some(self.0),
                limit,
                // Deliberately wrong: the engine judges breaches itself.
                breached: false,
                detail: format!("feature 3 over {} devices", assigned.len()),
            })
        }
    }

    #[test]
    fn drift_seam_breach_takes_the_configured_action() {
        let mut devices = fleet(100);
        for (on_breach, expected) in [
            (BreachAction::Pause, "pause"),
            (BreachAction::Rollback, "rollback"),
        ] {
            let rollout = Rollout::new(plan(&[10, 100], true, on_breach), T0);
            commit_assigned(&rollout, &mut devices, T0 + 1);
            let evaluation = evaluate(&rollout, &devices, T0 + 10, &FixedDrift(0.41));
            assert_eq!(evaluation.gates.len(), 4);
            let figure = &evaluation.gates[3];
            assert_eq!(figure.gate, GATE_DRIFT_PSI);
            assert!(figure.breached);
            assert_eq!(action(&evaluation), Some(expected));
            let reason = &evaluation.decision.as_ref().unwrap().reason;
            assert!(reason.contains("drift_psi 0.41 over limit 0.2"), "{reason}");

            let calm = evaluate(&rollout, &devices, T0 + BAKE, &FixedDrift(0.1));
            assert!(!calm.gates[3].breached);
            assert_eq!(action(&calm), Some("advance"));
        }
    }

    /// A profile of features `x0..x3`, each from 2000 standard normal reference values.
    fn drift_profile() -> Profile {
        use outpost_protocol::drift::{FeatureSource, NumericProfile, Thresholds};
        let rows = outpost_model::example::normal_rows(4, 2000, 11, 0.0);
        let features = (0..4)
            .map(|column| {
                let values: Vec<f64> = rows
                    .iter()
                    .skip(column)
                    .step_by(4)
                    .map(|value| f64::from(*value))
                    .collect();
                NumericProfile::from_values(
                    &format!("x{column}"),
                    TensorSide::Input,
                    FeatureSource::Column {
                        tensor: "x".to_owned(),
                        index: column as u32,
                    },
                    &values,
                )
                .unwrap()
            })
            .collect();
        Profile {
            features,
            classes: Vec::new(),
            thresholds: Thresholds::default(),
        }
    }

    /// `rows` observations of standard normal inputs from `seed`, with `shift` added to the
    /// columns in `shifted`, summarised against `profile`.
    fn drift_summary(
        profile: &Profile,
        rows: usize,
        seed: u64,
        shifted: &[usize],
        shift: f64,
    ) -> DriftSummary {
        let mut summary = DriftSummary::new("vad", 2, Sha256([9; 32]), profile, 0, 3_600);
        let values = outpost_model::example::normal_rows(4, rows, seed, 0.0);
        for row in values.chunks(4) {
            for (column, (feature, value)) in profile.features.iter().zip(row).enumerate() {
                let offset = if shifted.contains(&column) {
                    shift
                } else {
                    0.0
                };
                summary.features[column].observe(f64::from(*value) + offset, &feature.edges);
            }
        }
        summary
    }

    /// A drift gate with `target` summaries from every assigned device and `fallback` summaries
    /// from every other one, each from its own seed.
    fn drift_gate(
        rollout: &Rollout,
        devices: &[DeviceFacts],
        rows: usize,
        target_shift: (&[usize], f64),
        fallback_shift: (&[usize], f64),
    ) -> SummaryDriftGate {
        let profile = Arc::new(drift_profile());
        let mut gate = SummaryDriftGate {
            target_profile: Some(profile.clone()),
            fallback_profile: Some(profile.clone()),
            ..SummaryDriftGate::default()
        };
        for (seed, device) in devices.iter().enumerate() {
            let seed = 1_000 + seed as u64;
            if is_assigned(rollout, device) {
                let summary = drift_summary(&profile, rows, seed, target_shift.0, target_shift.1);
                gate.target.insert(device.id, summary);
            } else {
                let summary =
                    drift_summary(&profile, rows, seed, fallback_shift.0, fallback_shift.1);
                gate.fallback.insert(device.id, summary);
            }
        }
        gate
    }

    #[test]
    fn drift_gate_names_the_shifted_features_and_rolls_back() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Rollback), T0);
        let mut devices = fleet(40);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        let gate = drift_gate(&rollout, &devices, 60, (&[1, 3], 1.5), (&[], 0.0));
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &gate);
        let figure = gate_figure(&evaluation);
        assert!(figure.breached, "{figure:?}");
        assert!(figure.value.unwrap() > 1.0, "{figure:?}");
        assert!(
            figure.detail.starts_with("2 over the limit: x"),
            "{}",
            figure.detail
        );
        for name in ["x1 psi", "x3 psi"] {
            assert!(figure.detail.contains(name), "{}", figure.detail);
        }
        for name in ["x0", "x2"] {
            assert!(!figure.detail.contains(name), "{}", figure.detail);
        }
        // The fallback devices were binned alike and have enough values: they are the baseline.
        assert!(figure.detail.contains("vs fallback n"), "{}", figure.detail);
        assert_eq!(action(&evaluation), Some("rollback"));
        let reason = &evaluation.decision.as_ref().unwrap().reason;
        assert!(
            reason.contains("drift_psi") && reason.contains("x1 psi"),
            "{reason}"
        );
    }

    #[test]
    fn drift_gate_holds_when_target_and_fallback_drift_alike() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Rollback), T0);
        let mut devices = fleet(40);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        // The whole fleet's inputs moved: not the new version's doing.
        let gate = drift_gate(&rollout, &devices, 60, (&[1], 1.5), (&[1], 1.5));
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &gate);
        let figure = gate_figure(&evaluation);
        assert!(!figure.breached, "{figure:?}");
        assert!(
            figure.detail.starts_with("4 features compared"),
            "{}",
            figure.detail
        );

        // Without a fallback profile binned alike, the reference is the baseline, and it shows.
        let mut against_reference = gate.clone();
        against_reference.fallback_profile = None;
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &against_reference);
        let figure = gate_figure(&evaluation);
        assert!(figure.breached, "{figure:?}");
        assert!(figure.detail.contains("x1 psi"), "{}", figure.detail);
        assert!(
            figure.detail.contains("vs reference n 2000"),
            "{}",
            figure.detail
        );
    }

    #[test]
    fn drift_gate_needs_samples_and_a_profile() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(40);
        commit_assigned(&rollout, &mut devices, T0 + 1);

        // Two rows a device: far below the minimum on the target, however shifted.
        let sparse = drift_gate(&rollout, &devices, 2, (&[0, 1, 2, 3], 5.0), (&[], 0.0));
        let figure = gate_figure(&evaluate(&rollout, &devices, T0 + 10, &sparse)).clone();
        assert_eq!(figure.value, None);
        assert!(!figure.breached);
        assert_eq!(
            figure.detail,
            "4 features with fewer than 200 values on the target yet"
        );

        let empty = SummaryDriftGate {
            target_profile: sparse.target_profile.clone(),
            ..SummaryDriftGate::default()
        };
        let figure = gate_figure(&evaluate(&rollout, &devices, T0 + 10, &empty)).clone();
        assert_eq!(figure.value, None);
        assert_eq!(
            figure.detail,
            "no drift summaries from devices on the target yet"
        );

        let figure = gate_figure(&evaluate(
            &rollout,
            &devices,
            T0 + 10,
            &SummaryDriftGate::default(),
        ))
        .clone();
        assert_eq!(figure.value, None);
        assert_eq!(figure.detail, "vad@2 has no drift profile");

        let mut ended = rollout.clone();
        ended.state = RolloutState::Completed;
        let figure = gate_figure(&evaluate(&ended, &devices, T0 + 10, &EndedDriftGate)).clone();
        assert_eq!(figure.value, None);
        assert_eq!(figure.detail, "not measured once a rollout is completed");

        // Without a drift limit in the plan there is no figure at all.
        let mut unlimited = plan(&[50, 100], true, BreachAction::Pause);
        unlimited.gates.max_drift_psi = None;
        let evaluation = evaluate(&Rollout::new(unlimited, T0), &devices, T0 + 10, &sparse);
        assert_eq!(evaluation.gates.len(), 3);
    }

    #[test]
    fn drift_noise_floor_keeps_unshifted_samples_quiet() {
        let rollout = Rollout::new(plan(&[50, 100], true, BreachAction::Pause), T0);
        let mut devices = fleet(40);
        commit_assigned(&rollout, &mut devices, T0 + 1);
        // About 200 values on each side: two samples of one distribution differ by PSI ~0.2 by
        // chance, which a limit of 0.2 must not take for drift.
        let gate = drift_gate(&rollout, &devices, 12, (&[], 0.0), (&[], 0.0));
        let figure = gate_figure(&evaluate(&rollout, &devices, T0 + 10, &gate)).clone();
        assert!(!figure.breached, "{figure:?}");
        assert_eq!(figure.value, Some(0.0), "{figure:?}");
    }

    fn gate_figure(evaluation: &Evaluation) -> &GateFigure {
        gate(evaluation, GATE_DRIFT_PSI)
    }

    /// A rollout whose plan starts with a 20% shadow stage needing 500 comparisons, 90% top-1
    /// agreement and a mean absolute difference of at most 0.05.
    fn shadow_rollout(on_breach: BreachAction) -> Rollout {
        let mut plan = plan(&[50, 100], true, on_breach);
        plan.shadow = Some(ShadowStage {
            percent: 20,
            min_comparisons: 500,
            min_top1_agreement: 0.9,
            max_mean_abs_diff: 0.05,
        });
        Rollout::new(plan, T0)
    }

    /// Every device in the shadow bucket reports shadowing, and `compared` comparisons of which
    /// `agreed` agree, with a mean absolute difference of `diff`.
    fn shadow_all(
        rollout: &Rollout,
        devices: &mut [DeviceFacts],
        compared: u64,
        agreed: u64,
        diff: f64,
    ) {
        for device in devices
            .iter_mut()
            .filter(|d| rollout.in_shadow_bucket(&d.id))
        {
            device.outcome = Some(Outcome::Shadowing { at: T0 + 1 });
            device.shadow = ShadowCounts {
                compared,
                top1_agreed: agreed,
                errors: 0,
                abs_diff_sum: diff * (compared * 3) as f64,
                abs_diff_values: compared * 3,
                dropped: 0,
            };
        }
    }

    #[test]
    fn the_shadow_stage_comes_first_and_moves_no_one_to_the_target() {
        let rollout = shadow_rollout(BreachAction::Pause);
        let devices = fleet(100);
        let labels = [berlin()];
        let shadowing: Vec<&DeviceFacts> = devices
            .iter()
            .filter(|d| shadow_for(&rollout, &d.id, &labels))
            .collect();
        assert!((8..=35).contains(&shadowing.len()), "{}", shadowing.len());
        for device in &devices {
            // Everyone serves the fallback while the target is only shadowed.
            assert_eq!(
                slot_for(&rollout, &device.id, &labels),
                Some(Slot::Fallback)
            );
        }
        // Not outside the selector, and not once the rollout ended.
        assert!(!shadow_for(&rollout, &shadowing[0].id, &[]));
        let mut ended = rollout.clone();
        ended.state = RolloutState::RolledBack;
        assert!(!shadow_for(&ended, &shadowing[0].id, &labels));

        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        assert_eq!(evaluation.stages.len(), 3);
        assert!(evaluation.stages[0].shadow);
        assert_eq!(evaluation.stages[0].percent, 20);
        assert_eq!(evaluation.stages[0].devices, shadowing.len() as u64);
        assert_eq!(evaluation.stages[0].pending, shadowing.len() as u64);
        assert!(!evaluation.stages[1].shadow);
        assert_eq!(evaluation.stages[2].devices, 100);
        let agreement = gate(&evaluation, GATE_SHADOW_TOP1_AGREEMENT);
        assert_eq!(agreement.value, None);
        assert_eq!(agreement.limit, 0.9);
        assert_eq!(
            agreement.detail,
            "0 of 500 comparisons needed yet, on 0 devices"
        );
        assert_eq!(gate(&evaluation, GATE_SHADOW_MEAN_ABS_DIFF).limit, 0.05);
    }

    #[test]
    fn the_shadow_stage_holds_until_enough_comparisons_then_advances() {
        let mut rollout = shadow_rollout(BreachAction::Pause);
        let mut devices = fleet(100);
        // Every shadowing device loaded the target, but too few comparisons came in yet.
        shadow_all(&rollout, &mut devices, 10, 10, 0.0);
        let evaluation = evaluate(&rollout, &devices, T0 + 10 * BAKE, &NoDriftGate);
        assert_eq!(evaluation.stages[0].succeeded, evaluation.stages[0].devices);
        assert_eq!(gate(&evaluation, GATE_SHADOW_MEAN_ABS_DIFF).value, None);
        assert_eq!(action(&evaluation), None, "{evaluation:#?}");

        shadow_all(&rollout, &mut devices, 100, 97, 0.01);
        let early = evaluate(&rollout, &devices, T0 + BAKE - 1, &NoDriftGate);
        assert_eq!(action(&early), None);
        let evaluation = evaluate(&rollout, &devices, T0 + BAKE, &NoDriftGate);
        let agreement = gate(&evaluation, GATE_SHADOW_TOP1_AGREEMENT);
        assert_eq!(agreement.value, Some(0.97));
        assert!(!agreement.breached);
        let shadowing = evaluation.stages[0].devices;
        let expected = format!(
            "{} agreed of {} comparisons on {shadowing} devices, 0 failed on the target; \
             mean |diff| over {} values; 0 inputs not shadowed (queue full)",
            97 * shadowing,
            100 * shadowing,
            300 * shadowing
        );
        assert_eq!(agreement.detail, expected);
        let diff = gate(&evaluation, GATE_SHADOW_MEAN_ABS_DIFF);
        assert!((diff.value.unwrap() - 0.01).abs() < 1e-12, "{diff:?}");
        let decision = evaluation.decision.clone().unwrap();
        assert_eq!(decision.action, "advance");
        assert!(
            decision.reason.starts_with("shadow stage 20% baked"),
            "{}",
            decision.reason
        );
        assert!(
            decision.reason.ends_with("advancing to 50%"),
            "{}",
            decision.reason
        );

        apply(&mut rollout, &decision);
        assert_eq!(rollout.stage_index, 1);
        assert_eq!(rollout.in_shadow_stage(), None);
        let labels = [berlin()];
        for device in &devices {
            assert!(!shadow_for(&rollout, &device.id, &labels));
            let expected = if is_assigned(&rollout, device) {
                Slot::Target
            } else {
                Slot::Fallback
            };
            assert_eq!(slot_for(&rollout, &device.id, &labels), Some(expected));
        }
        // The shadow gate is gone with its stage; shadowing is no success on the target.
        let evaluation = evaluate(&rollout, &devices, T0 + BAKE + 1, &NoDriftGate);
        assert!(evaluation
            .gates
            .iter()
            .all(|figure| !figure.gate.starts_with("shadow_")));
        assert_eq!(evaluation.stages[1].succeeded, 0);
    }

    #[test]
    fn a_shadow_gate_breach_takes_the_configured_action() {
        for (on_breach, expected) in [
            (BreachAction::Pause, "pause"),
            (BreachAction::Rollback, "rollback"),
        ] {
            let rollout = shadow_rollout(on_breach);
            let mut devices = fleet(100);
            shadow_all(&rollout, &mut devices, 100, 60, 0.01);
            let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
            assert!(gate(&evaluation, GATE_SHADOW_TOP1_AGREEMENT).breached);
            assert!(!gate(&evaluation, GATE_SHADOW_MEAN_ABS_DIFF).breached);
            assert_eq!(action(&evaluation), Some(expected));
            let reason = &evaluation.decision.as_ref().unwrap().reason;
            assert!(
                reason.starts_with("gate breached: shadow_top1_agreement 0.6 under limit 0.9 ("),
                "{reason}"
            );

            shadow_all(&rollout, &mut devices, 100, 100, 0.2);
            let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
            assert!(gate(&evaluation, GATE_SHADOW_MEAN_ABS_DIFF).breached);
            assert_eq!(action(&evaluation), Some(expected));
            let reason = &evaluation.decision.as_ref().unwrap().reason;
            assert!(
                reason.contains("shadow_mean_abs_diff 0.2 over limit 0.05"),
                "{reason}"
            );
        }
    }

    #[test]
    fn a_target_that_fails_on_shadow_devices_breaches_the_failure_gate() {
        let rollout = shadow_rollout(BreachAction::Rollback);
        let mut devices = fleet(100);
        shadow_all(&rollout, &mut devices, 100, 100, 0.0);
        // Two of them could not load or validate it.
        for device in devices
            .iter_mut()
            .filter(|d| rollout.in_shadow_bucket(&d.id))
            .take(2)
        {
            device.outcome = failed(T0 + 2);
        }
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        assert!(
            gate(&evaluation, GATE_FAILURE_PCT).breached,
            "{evaluation:#?}"
        );
        assert_eq!(evaluation.stages[0].failed, 2);
        assert_eq!(action(&evaluation), Some("rollback"));
    }
}
