//! Runs the rollout engine ([`crate::rollout`]) against the store: a tick that evaluates every
//! active or paused rollout and persists the engine's decisions, the cache of rollouts and
//! retirements that check-ins read, and the facts the engine needs about each device (drift
//! summaries for the drift gate come from [`super::drift::gate`]).

use std::sync::Arc;

use anyhow::Context;
use outpost_protocol::device::DeviceId;
use outpost_protocol::name::selector_matches;
use outpost_protocol::trust::{
    AgentVersion, ManifestBody, ManifestRef, PlanBody, RetireBody, Signed,
};
use outpost_protocol::{sha256, Label, Sha256};

use super::SharedHub;
use crate::api::{self, ModelRef, RetirementInfo, RolloutInfo};
use crate::rollout::{
    self, Actor, Decision, DeviceFacts, InferenceStats, Outcome, Rollout, RolloutState,
};
use crate::store::{
    DecisionRecord, FigureRecord, OutcomeKind, RetirementRecord, RolloutRecord, RolloutStateRecord,
    StatsRecord,
};
use crate::{audit, unix_now};
use outpost_protocol::device::ShadowCounts;

/// A rollout as check-ins see it, with the exact signed bytes to hand devices.
#[derive(Debug, Clone)]
pub struct LiveRollout {
    pub sequence: u64,
    pub rollout: Rollout,
    pub signed_plan: Document,
    pub target_manifest: Document,
    pub fallback_manifest: Option<Document>,
    /// The target manifest's `min_agent_version`: an older agent is not offered the target.
    pub target_min_agent: AgentVersion,
}

/// A retirement as check-ins see it: the signed bytes to hand devices, and what it retires where.
#[derive(Debug, Clone)]
pub struct LiveRetirement {
    pub sequence: u64,
    pub model: String,
    pub selector: Vec<Label>,
    pub signed: Document,
}

impl LiveRetirement {
    /// True when a device with these labels is to retire the model.
    pub fn applies_to(&self, labels: &[Label]) -> bool {
        selector_matches(&self.selector, labels)
    }
}

/// What check-ins read, rebuilt whenever a rollout or retirement changes: every rollout and
/// every retirement, each oldest first.
#[derive(Debug, Clone, Default)]
pub struct Live {
    pub rollouts: Vec<LiveRollout>,
    pub retirements: Vec<LiveRetirement>,
}

/// Whether an agent that reported `agent_version` is older than `min`. A version the hub cannot
/// read is not judged here: the device judges the manifest itself.
pub fn agent_too_old(agent_version: &str, min: AgentVersion) -> bool {
    AgentVersion::parse(agent_version).is_some_and(|version| version < min)
}

/// The `min_agent_version` a stored, signed manifest names.
fn min_agent_of(document: &Document) -> anyhow::Result<AgentVersion> {
    let signed: Signed<ManifestBody> =
        outpost_protocol::decode(&document.bytes).context("decoding a stored manifest")?;
    Ok(signed
        .decode_unverified()
        .context("decoding a stored manifest's body")?
        .min_agent_version)
}

/// Signed bytes handed to devices, shared, with their SHA-256 worked out once: a device that
/// names what it holds is compared by digest on every check-in.
#[derive(Debug, Clone)]
pub struct Document {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: Sha256,
}

impl Document {
    fn new(bytes: Vec<u8>) -> Document {
        Document {
            sha256: sha256(&bytes),
            bytes: Arc::new(bytes),
        }
    }
}

impl LiveRollout {
    /// True when this plan is the one to hand a device with these labels.
    pub fn applies_to(&self, labels: &[Label]) -> bool {
        self.rollout.state != RolloutState::Superseded
            && selector_matches(&self.rollout.plan.selector, labels)
    }
}

/// The plan body of a stored rollout. Its signatures were verified when it was uploaded.
pub fn plan_of(record: &RolloutRecord) -> anyhow::Result<PlanBody> {
    let signed: Signed<PlanBody> = outpost_protocol::decode(&record.signed_plan)
        .with_context(|| format!("stored plan {} is unreadable", record.sequence))?;
    signed
        .decode_unverified()
        .with_context(|| format!("stored plan {} is unreadable", record.sequence))
}

/// The body of a stored retirement. Its signatures were verified when it was uploaded.
pub fn retire_of(record: &RetirementRecord) -> anyhow::Result<RetireBody> {
    let signed: Signed<RetireBody> = outpost_protocol::decode(&record.signed)
        .with_context(|| format!("stored retirement {} is unreadable", record.sequence))?;
    signed
        .decode_unverified()
        .with_context(|| format!("stored retirement {} is unreadable", record.sequence))
}

/// A stored retirement as the admin API shows it.
pub fn retirement_info(record: &RetirementRecord) -> anyhow::Result<RetirementInfo> {
    let body = retire_of(record)?;
    Ok(RetirementInfo {
        sequence: record.sequence,
        model: body.model,
        selector: body.selector.iter().map(ToString::to_string).collect(),
        created: body.created,
        expires: body.expires,
        stored_at: record.stored_at,
        by: record.by.clone(),
    })
}

/// A stored rollout state as the engine's.
pub fn state_of(stored: RolloutStateRecord) -> RolloutState {
    match stored {
        RolloutStateRecord::Active => RolloutState::Active,
        RolloutStateRecord::Paused => RolloutState::Paused,
        RolloutStateRecord::RolledBack => RolloutState::RolledBack,
        RolloutStateRecord::Completed => RolloutState::Completed,
        RolloutStateRecord::Superseded => RolloutState::Superseded,
    }
}

/// The engine's rollout state as stored.
pub fn state_record(state: RolloutState) -> RolloutStateRecord {
    match state {
        RolloutState::Active => RolloutStateRecord::Active,
        RolloutState::Paused => RolloutStateRecord::Paused,
        RolloutState::RolledBack => RolloutStateRecord::RolledBack,
        RolloutState::Completed => RolloutStateRecord::Completed,
        RolloutState::Superseded => RolloutStateRecord::Superseded,
    }
}

/// The engine's rollout state as the admin API shows it.
fn api_state(state: RolloutState) -> api::RolloutState {
    match state {
        RolloutState::Active => api::RolloutState::Active,
        RolloutState::Paused => api::RolloutState::Paused,
        RolloutState::RolledBack => api::RolloutState::RolledBack,
        RolloutState::Completed => api::RolloutState::Completed,
        RolloutState::Superseded => api::RolloutState::Superseded,
    }
}

pub fn to_rollout(record: &RolloutRecord) -> anyhow::Result<Rollout> {
    Ok(Rollout {
        plan: plan_of(record)?,
        state: state_of(record.state),
        stage_index: record.stage_index,
        stage_started: record.stage_started.clone(),
    })
}

pub fn target_digest(record: &RolloutRecord) -> Option<[u8; 32]> {
    plan_of(record)
        .ok()
        .map(|plan| plan.target.manifest_sha256.0)
}

pub fn stage_percent(record: &RolloutRecord) -> u8 {
    to_rollout(record)
        .map(|rollout| rollout.stage_percent(rollout.stage_index))
        .unwrap_or(0)
}

async fn manifest_bytes(hub: &SharedHub, reference: &ManifestRef) -> anyhow::Result<Document> {
    let record = hub
        .store
        .manifest(&reference.name, reference.version)
        .await?
        .with_context(|| {
            format!(
                "manifest {}@{} is missing",
                reference.name, reference.version
            )
        })?;
    Ok(Document::new(record.signed))
}

/// Rebuilds the check-in cache from the store: rollouts and retirements, oldest first.
pub async fn reload(hub: &SharedHub) -> anyhow::Result<()> {
    let mut rollouts = Vec::new();
    for record in hub.store.rollouts().await? {
        let rollout = to_rollout(&record)?;
        let target_manifest = manifest_bytes(hub, &rollout.plan.target).await?;
        let fallback_manifest = match &rollout.plan.fallback {
            Some(fallback) => Some(manifest_bytes(hub, fallback).await?),
            None => None,
        };
        rollouts.push(LiveRollout {
            sequence: record.sequence,
            rollout,
            signed_plan: Document::new(record.signed_plan),
            target_min_agent: min_agent_of(&target_manifest)?,
            target_manifest,
            fallback_manifest,
        });
    }
    let mut retirements = Vec::new();
    for record in hub.store.retirements().await? {
        let body = retire_of(&record)?;
        retirements.push(LiveRetirement {
            sequence: record.sequence,
            model: body.model,
            selector: body.selector,
            signed: Document::new(record.signed),
        });
    }
    *hub.live
        .write()
        .map_err(|_| anyhow::anyhow!("rollout cache lock poisoned"))? = Arc::new(Live {
        rollouts,
        retirements,
    });
    Ok(())
}

fn stats(record: StatsRecord) -> InferenceStats {
    InferenceStats {
        count: record.count,
        errors: record.errors,
        latency_buckets: record.latency_buckets,
    }
}

/// Each device's shadow comparisons of the plan's target with its fallback, over windows ending
/// since the rollout began. Comparisons beside any other model do not count: the signed gate is
/// about the target against the fallback.
async fn shadow_by_device(
    hub: &SharedHub,
    rollout: &Rollout,
) -> anyhow::Result<std::collections::HashMap<[u8; 16], ShadowCounts>> {
    let mut by_device = std::collections::HashMap::new();
    let (Some(_), Some(fallback)) = (&rollout.plan.shadow, &rollout.plan.fallback) else {
        return Ok(by_device);
    };
    let since = rollout.stage_started.first().copied().unwrap_or(0);
    let target = &rollout.plan.target.manifest_sha256.0;
    for stored in hub.store.shadow_reports(target, since).await? {
        if stored.active != (fallback.name.clone(), fallback.version) {
            continue;
        }
        by_device
            .entry(stored.device)
            .or_default()
            .add(&stored.record.counts());
    }
    Ok(by_device)
}

/// What the engine needs to know about every device, for one rollout.
pub async fn device_facts(
    hub: &SharedHub,
    sequence: u64,
    rollout: &Rollout,
) -> anyhow::Result<Vec<DeviceFacts>> {
    let plan = &rollout.plan;
    let outcomes: std::collections::HashMap<[u8; 16], _> =
        hub.store.outcomes(sequence).await?.into_iter().collect();
    let shadows = shadow_by_device(hub, rollout).await?;
    let min_agent = min_agent_of(&manifest_bytes(hub, &plan.target).await?)?;
    let mut facts = Vec::new();
    for device in hub.store.devices().await? {
        let labels = super::fleet::labels_of(&device);
        if device.revoked || !selector_matches(&plan.selector, &labels) {
            continue;
        }
        let outcome = outcomes.get(&device.id).map(|outcome| match outcome.kind {
            OutcomeKind::Committed => Outcome::Committed { at: outcome.at },
            OutcomeKind::Shadowing => Outcome::Shadowing { at: outcome.at },
            OutcomeKind::Failed => Outcome::Failed {
                at: outcome.at,
                reason: outcome.reason.clone(),
            },
        });
        let target_stats = stats(
            hub.store
                .stats(&device.id, &plan.target.name, plan.target.version)
                .await?,
        );
        let fallback_stats = match &plan.fallback {
            Some(fallback) => stats(
                hub.store
                    .stats(&device.id, &fallback.name, fallback.version)
                    .await?,
            ),
            None => InferenceStats::default(),
        };
        facts.push(DeviceFacts {
            id: DeviceId(device.id),
            labels,
            revoked: device.revoked,
            enrolled_at: device.enrolled_at,
            last_seen: device.last_checkin,
            outcome,
            target_stats,
            fallback_stats,
            shadow: shadows.get(&device.id).cloned().unwrap_or_default(),
            // An agent of one model that runs another is not offered this model: it keeps its
            // own (see `device::checkin::rollout_for_one_model`), so it counts as skipped, not pending.
            agent_too_old: agent_too_old(&device.agent_version, min_agent)
                || (!device.several_models
                    && device
                        .running()
                        .iter()
                        .any(|model| model.name != plan.target.name)),
        });
    }
    Ok(facts)
}

/// Removes the drift summaries and shadow comparisons of windows that ended before the telemetry
/// retention, captured samples received before it, and the hourly drift aggregates of hours that ended before theirs. A range scan
/// per published version over what expired: next to nothing on a tick with nothing to remove.
pub(super) async fn prune(hub: &SharedHub) -> anyhow::Result<()> {
    let cutoff = unix_now().saturating_sub(hub.config.retention.telemetry_secs);
    let pruned = hub.store.prune_telemetry(cutoff).await?;
    if pruned.drift + pruned.shadow > 0 {
        log::info!(
            "removed {} drift summaries and {} shadow comparisons of windows that ended over {} \
             ago",
            pruned.drift,
            pruned.shadow,
            humantime::format_duration(std::time::Duration::from_secs(
                hub.config.retention.telemetry_secs
            ))
        );
        super::Metrics::bump(&hub.metrics.pruned_records, pruned.drift + pruned.shadow);
    }
    // Captured samples are kept as long as the per-device drift summaries they sit beside.
    let samples = hub.store.prune_captures(cutoff).await?;
    if samples > 0 {
        log::info!(
            "removed {samples} captured samples received over {} ago",
            humantime::format_duration(std::time::Duration::from_secs(
                hub.config.retention.telemetry_secs
            ))
        );
        super::Metrics::bump(&hub.metrics.pruned_records, samples);
    }
    let kept = hub.config.retention.drift_aggregate_secs;
    let hourly = hub
        .store
        .prune_hourly(unix_now().saturating_sub(kept))
        .await?;
    if hourly.drift + hourly.stats > 0 {
        log::info!(
            "removed {} hourly drift aggregates and {} hourly inference counters of hours that \
             ended over {} ago",
            hourly.drift,
            hourly.stats,
            humantime::format_duration(std::time::Duration::from_secs(kept))
        );
        super::Metrics::bump(&hub.metrics.pruned_records, hourly.drift + hourly.stats);
    }
    if hub.store.shared() {
        hub.store.prune_nonces(unix_now()).await?;
    }
    Ok(())
}

/// One evaluation of every active rollout; decisions are stored, audited and flushed.
pub async fn tick(hub: &SharedHub) -> anyhow::Result<()> {
    let _guard = hub.store.lock_rollouts().await?;
    let now = unix_now();
    let mut changed = false;
    for mut record in hub.store.rollouts().await? {
        if record.state != RolloutStateRecord::Active {
            continue;
        }
        let mut rollout = to_rollout(&record)?;
        let facts = device_facts(hub, record.sequence, &rollout).await?;
        // A rollout whose drift evidence cannot be read is not evaluated at all this tick: it
        // must not advance past a gate nobody measured.
        let drift = match super::drift::gate(hub, &rollout).await {
            Ok(drift) => drift,
            Err(error) => {
                log::error!(
                    "rollout {}: reading drift summaries: {error:#}",
                    record.sequence
                );
                continue;
            }
        };
        let evaluation = rollout::evaluate(&rollout, &facts, now, drift.as_ref());
        if let Some(decision) = evaluation.decision {
            persist_decision(hub, &mut record, &mut rollout, decision).await?;
            changed = true;
        }
    }
    if changed {
        hub.store.flush().await?;
        reload(hub).await?;
    }
    Ok(())
}

/// Applies a decision to a rollout, stores it and writes it to the audit log.
pub async fn persist_decision(
    hub: &SharedHub,
    record: &mut RolloutRecord,
    rollout: &mut Rollout,
    decision: Decision,
) -> anyhow::Result<()> {
    rollout::apply(rollout, &decision);
    record.state = state_record(rollout.state);
    record.stage_index = rollout.stage_index;
    record.stage_started = rollout.stage_started.clone();
    let stopped = matches!(
        decision.action,
        rollout::Action::Pause | rollout::Action::Rollback
    );
    let level = if decision.by == Actor::Engine && stopped {
        log::Level::Warn
    } else {
        log::Level::Info
    };
    let action = decision.action.as_str();
    log::log!(
        level,
        "rollout {}: {action} by {}: {}",
        record.sequence,
        decision.by.name(),
        decision.reason
    );
    audit::append(
        &hub.store,
        decision.at,
        decision.by.name(),
        &format!("rollout {action}"),
        &format!("rollout {}", record.sequence),
        &decision.reason,
    )
    .await?;
    record.decisions.push(decision_record(&decision));
    hub.store.put_rollout(record).await?;
    Ok(())
}

/// A decision as the store keeps it: action, actor and gates by name.
fn decision_record(decision: &Decision) -> DecisionRecord {
    DecisionRecord {
        at: decision.at,
        action: decision.action.as_str().to_owned(),
        by: decision.by.name().to_owned(),
        stage_index: decision.stage_index,
        reason: decision.reason.clone(),
        figures: decision
            .figures
            .iter()
            .map(|figure| FigureRecord {
                gate: figure.gate.as_str().to_owned(),
                value: figure.value,
                limit: figure.limit,
                breached: figure.breached,
                detail: figure.detail.clone(),
            })
            .collect(),
    }
}

/// A gate figure as the admin API shows it.
fn api_figure(figure: &rollout::GateFigure) -> api::GateFigure {
    api::GateFigure {
        gate: figure.gate.as_str().to_owned(),
        value: figure.value,
        limit: figure.limit,
        breached: figure.breached,
        detail: figure.detail.clone(),
    }
}

/// A stored decision as the admin API shows it: the names the store keeps are the API's.
fn api_decision(record: &DecisionRecord) -> api::Decision {
    api::Decision {
        at: record.at,
        action: record.action.clone(),
        by: record.by.clone(),
        stage_index: record.stage_index,
        reason: record.reason.clone(),
        figures: record
            .figures
            .iter()
            .map(|figure| api::GateFigure {
                gate: figure.gate.clone(),
                value: figure.value,
                limit: figure.limit,
                breached: figure.breached,
                detail: figure.detail.clone(),
            })
            .collect(),
    }
}

/// A stage's progress as the admin API shows it.
fn api_stage(stage: &rollout::StageProgress) -> api::StageProgress {
    api::StageProgress {
        percent: stage.percent,
        shadow: stage.shadow,
        devices: stage.devices,
        succeeded: stage.succeeded,
        failed: stage.failed,
        silent: stage.silent,
        pending: stage.pending,
        skipped: stage.skipped,
    }
}

fn model_ref(reference: &ManifestRef) -> ModelRef {
    ModelRef {
        name: reference.name.clone(),
        version: reference.version,
    }
}

/// A rollout as the admin API shows it, with live progress and gate figures.
pub async fn info(hub: &SharedHub, record: &RolloutRecord) -> anyhow::Result<RolloutInfo> {
    let rollout = to_rollout(record)?;
    let facts = device_facts(hub, record.sequence, &rollout).await?;
    let drift = super::drift::gate(hub, &rollout).await?;
    let evaluation = rollout::evaluate(&rollout, &facts, unix_now(), drift.as_ref());
    Ok(RolloutInfo {
        sequence: record.sequence,
        target: model_ref(&rollout.plan.target),
        fallback: rollout.plan.fallback.as_ref().map(model_ref),
        selector: rollout
            .plan
            .selector
            .iter()
            .map(|label| label.to_string())
            .collect(),
        state: api_state(state_of(record.state)),
        stage_index: record.stage_index,
        stage_started_at: rollout.current_stage_started(),
        stages: evaluation.stages.iter().map(api_stage).collect(),
        gates: evaluation.gates.iter().map(api_figure).collect(),
        decisions: record.decisions.iter().map(api_decision).collect(),
        created: record.created,
    })
}
