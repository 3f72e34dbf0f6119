//! Where each device stands, and the health gates over them: failure %, error rate, p95 regression.

use super::*;

/// Where a device stands for the gates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Standing {
    Succeeded,
    Failed,
    Silent,
    Pending,
    /// Its agent is too old for the target: not offered it, and not judged.
    Skipped,
}

/// A participating device, placed in its stage.
pub(super) struct Placed<'a> {
    pub(super) facts: &'a DeviceFacts,
    pub(super) stage: usize,
    /// On the target, or, in the shadow stage, running it in shadow: what the gates judge.
    pub(super) assigned: bool,
    /// In the shadow stage's bucket, whichever stage the rollout is at.
    pub(super) shadow_bucket: bool,
    pub(super) standing: Standing,
}

pub(super) fn place<'a>(rollout: &Rollout, facts: &'a DeviceFacts, now: u64) -> Placed<'a> {
    let stage = rollout.stage_of_device(&facts.id);
    let shadow_bucket = rollout.in_shadow_bucket(&facts.id);
    if facts.agent_too_old {
        return Placed {
            facts,
            stage,
            assigned: false,
            shadow_bucket,
            standing: Standing::Skipped,
        };
    }
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

/// Device counts of stage `index`: the devices of its bucket and of every stage before it, or, for
/// the shadow stage, the devices of the shadow bucket.
pub(super) fn stage_progress(
    placed: &[Placed<'_>],
    index: usize,
    percent: u8,
    shadow: bool,
) -> StageProgress {
    let mut progress = StageProgress {
        percent,
        shadow,
        devices: 0,
        succeeded: 0,
        failed: 0,
        silent: 0,
        pending: 0,
        skipped: 0,
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
            Standing::Skipped => progress.skipped += 1,
        }
    }
    progress
}

/// Strictly over the limit; a figure without a value never breaches.
pub(super) fn is_breached(value: Option<f64>, limit: f64) -> bool {
    value.is_some_and(|value| value > limit)
}

pub(super) fn figure(gate: Gate, value: Option<f64>, limit: f64, detail: String) -> GateFigure {
    GateFigure {
        gate,
        value,
        limit,
        breached: is_breached(value, limit),
        detail,
    }
}

pub(super) fn failure_figure(plan: &PlanBody, assigned: &[&Placed<'_>]) -> GateFigure {
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
            Gate::FailurePct,
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
    figure(Gate::FailurePct, Some(value), limit, detail)
}

pub(super) fn error_figure(plan: &PlanBody, assigned: &[&Placed<'_>]) -> GateFigure {
    let limit = plan.gates.max_error_rate;
    let mut stats = InferenceStats::default();
    for device in assigned {
        stats.merge(&device.facts.target_stats);
    }
    if stats.count == 0 {
        return figure(
            Gate::ErrorRate,
            None,
            limit,
            "no inferences on the target yet".to_owned(),
        );
    }
    let value = stats.errors as f64 / stats.count as f64;
    let detail = format!("{} errors in {} inferences", stats.errors, stats.count);
    figure(Gate::ErrorRate, Some(value), limit, detail)
}

/// Target latency of the assigned devices against fallback latency of every participating device:
/// devices not yet moved are the control group, and assigned devices contribute what they measured
/// before they moved.
pub(super) fn p95_figure(
    plan: &PlanBody,
    assigned: &[&Placed<'_>],
    participating: &[Placed<'_>],
) -> GateFigure {
    let limit = plan.gates.max_p95_regression_pct;
    if plan.fallback.is_none() {
        return figure(
            Gate::P95RegressionPct,
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
        return figure(Gate::P95RegressionPct, None, limit, detail);
    };
    // Bucket bounds are at least 100us, so the divisor is never zero.
    let value = (target_p95 as f64 - fallback_p95 as f64) / fallback_p95.max(1) as f64 * 100.0;
    let detail = format!(
        "p95 {} vs {} ({target_samples} vs {fallback_samples} samples)",
        format_us(target_p95),
        format_us(fallback_p95)
    );
    figure(Gate::P95RegressionPct, Some(value), limit, detail)
}

/// A figure for humans: at most four decimals, without trailing zeros.
pub(super) fn format_number(value: f64) -> String {
    let text = format!("{value:.4}");
    if text.contains('.') {
        text.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        text
    }
}

/// A latency bucket bound for humans: `250us`, `2.5ms`, `10s`, `>10s`.
pub(super) fn format_us(us: u64) -> String {
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
