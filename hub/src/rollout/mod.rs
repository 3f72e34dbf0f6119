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

mod decision;
mod drift_gate;
mod gates;
mod membership;
mod shadow_gate;
mod stats;
#[cfg(test)]
mod tests;

pub use decision::*;
pub use drift_gate::*;
use gates::*;
pub use membership::*;
pub use shadow_gate::*;
pub use stats::*;

/// Devices are hashed into this many buckets; a stage of `p` percent holds buckets below `p * 100`.
pub const BUCKETS: u32 = 10_000;
/// Prefix of the bucket hash, so the bucket cannot be steered by anything hashed elsewhere.
const BUCKET_CONTEXT: &[u8] = b"outpost rollout bucket\0";
/// The name [`Actor::Engine`] goes by in stored decisions, the audit log and the admin API.
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

/// The rollout's health gates, each named in the admin API and in stored decisions by
/// [`Gate::as_str`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    FailurePct,
    ErrorRate,
    P95RegressionPct,
    DriftPsi,
    /// The shadow stage's floor on top-1 agreement: the one gate breached *below* its limit.
    ShadowTop1Agreement,
    /// The shadow stage's ceiling on the mean absolute difference.
    ShadowMeanAbsDiff,
}

impl Gate {
    /// The gate's name in the admin API's JSON and in stored decisions.
    pub const fn as_str(self) -> &'static str {
        match self {
            Gate::FailurePct => "failure_pct",
            Gate::ErrorRate => "error_rate",
            Gate::P95RegressionPct => "p95_regression_pct",
            Gate::DriftPsi => "drift_psi",
            Gate::ShadowTop1Agreement => "shadow_top1_agreement",
            Gate::ShadowMeanAbsDiff => "shadow_mean_abs_diff",
        }
    }

    pub fn parse(text: &str) -> Option<Gate> {
        [
            Gate::FailurePct,
            Gate::ErrorRate,
            Gate::P95RegressionPct,
            Gate::DriftPsi,
            Gate::ShadowTop1Agreement,
            Gate::ShadowMeanAbsDiff,
        ]
        .into_iter()
        .find(|gate| gate.as_str() == text)
    }

    /// A gate of the shadow stage.
    pub const fn is_shadow(self) -> bool {
        matches!(self, Gate::ShadowTop1Agreement | Gate::ShadowMeanAbsDiff)
    }
}

/// One gate's measured figure against its signed limit.
#[derive(Debug, Clone, PartialEq)]
pub struct GateFigure {
    pub gate: Gate,
    /// None when there is not yet data to measure it.
    pub value: Option<f64>,
    pub limit: f64,
    pub breached: bool,
    /// What the figure was computed from, for humans: "3 of 40 devices", "p95 12ms vs 10ms".
    pub detail: String,
}

/// Device counts of one stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageProgress {
    pub percent: u8,
    /// The plan's shadow stage: its devices run the target beside the fallback, serving the
    /// fallback; `succeeded` counts those that loaded and validated it.
    pub shadow: bool,
    /// Selected devices whose bucket falls in this stage's cumulative percentage.
    pub devices: u64,
    /// Reported the target committed after probation.
    pub succeeded: u64,
    /// Reported a failure, a refusal or a rollback.
    pub failed: u64,
    /// Silent for longer than the device timeout without committing.
    pub silent: u64,
    pub pending: u64,
    /// Left where they are because their agent is older than the target's `min_agent_version`
    /// (see [`DeviceFacts::agent_too_old`]): neither pending nor failed.
    pub skipped: u64,
}

/// Who took a decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// The engine, by itself, on its tick.
    Engine,
    /// An operator, by the name of the admin token they acted with.
    Operator(String),
}

impl Actor {
    /// The name stored, audited and shown: [`ENGINE`] or the token's name.
    pub fn name(&self) -> &str {
        match self {
            Actor::Engine => ENGINE,
            Actor::Operator(name) => name,
        }
    }

    /// The actor a stored name stands for.
    pub fn from_name(name: &str) -> Actor {
        if name == ENGINE {
            Actor::Engine
        } else {
            Actor::Operator(name.to_owned())
        }
    }
}

/// A decision the rollout engine or an operator took, with the figures that caused it.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at: u64,
    pub action: Action,
    pub by: Actor,
    pub stage_index: usize,
    pub reason: String,
    pub figures: Vec<GateFigure>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutState {
    Active,
    Paused,
    RolledBack,
    Completed,
    /// A newer plan took over.
    Superseded,
}

impl RolloutState {
    /// The state's name in the admin API, the CLI and `/metrics`.
    pub const fn as_str(self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Completed => "completed",
            RolloutState::Superseded => "superseded",
        }
    }
}

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
    /// Its agent, as it last reported, is older than the target manifest's `min_agent_version`,
    /// so it would refuse the target: the hub does not offer it (the device keeps the fallback, or
    /// what it runs) and the rollout counts it as skipped, not as failed or pending.
    pub agent_too_old: bool,
}
