//! The engine's step: evaluate a rollout, decide what it does next, and apply a decision.

use super::*;

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

/// What a decision does.
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

pub(super) fn engine_decision(
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
            let side = if figure.gate == Gate::ShadowTop1Agreement {
                "under"
            } else {
                "over"
            };
            format!(
                "{} {} {side} limit {} ({})",
                figure.gate.as_str(),
                figure.value.map_or_else(|| "-".to_owned(), format_number),
                format_number(figure.limit),
                figure.detail
            )
        })
        .collect();
    let decide = |action: Action, reason: String| Decision {
        at: now,
        action,
        by: Actor::Engine,
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
        .filter(|figure| figure.gate.is_shadow())
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
/// stage.
pub fn apply(rollout: &mut Rollout, decision: &Decision) {
    match decision.action {
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

/// Why [`operator_decision`] refused an operator's command; the admin API answers 409 with it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OperatorRefusal {
    /// The rollout's state does not take this command.
    #[error(
        "cannot {} rollout {sequence}: it is {}, and only {allowed} can be",
        .action.as_str(),
        .state.as_str()
    )]
    WrongState {
        action: OperatorAction,
        sequence: u64,
        state: RolloutState,
        /// The states that take the command, for the message.
        allowed: &'static str,
    },
    /// `advance` at the plan's last stage.
    #[error("cannot advance rollout {sequence}: it is at its last stage ({percent}%)")]
    LastStage { sequence: u64, percent: u8 },
    /// `rollback` of a completed rollout whose plan names no fallback.
    #[error("cannot roll back rollout {sequence}: it is completed and its plan has no fallback")]
    NoFallback { sequence: u64 },
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
    by: &Actor,
    now: u64,
    devices: &[DeviceFacts],
) -> Result<Decision, OperatorRefusal> {
    use RolloutState::{Active, Completed, Paused};
    let state = rollout.state;
    let refuse = |allowed: &'static str| {
        Err(OperatorRefusal::WrongState {
            action,
            sequence: rollout.plan.sequence,
            state,
            allowed,
        })
    };
    let percent = rollout.stage_percent(rollout.stage_index);
    let by_name = by.name();
    let reason = match action {
        OperatorAction::Pause if state == Active => format!("paused by {by_name} at {percent}%"),
        OperatorAction::Pause => return refuse("an active rollout"),
        OperatorAction::Resume if state == Paused => format!("resumed by {by_name} at {percent}%"),
        OperatorAction::Resume => return refuse("a paused rollout"),
        OperatorAction::Advance if matches!(state, Active | Paused) => {
            let next = rollout.stage_index + 1;
            if next >= rollout.stage_count() {
                return Err(OperatorRefusal::LastStage {
                    sequence: rollout.plan.sequence,
                    percent,
                });
            }
            format!(
                "advanced by {by_name} from {percent}% to {}%",
                rollout.stage_percent(next)
            )
        }
        OperatorAction::Advance => return refuse("an active or paused rollout"),
        OperatorAction::Rollback if matches!(state, Active | Paused) => {
            format!("rolled back by {by_name} at {percent}%")
        }
        OperatorAction::Rollback if state == Completed => {
            if rollout.plan.fallback.is_none() {
                return Err(OperatorRefusal::NoFallback {
                    sequence: rollout.plan.sequence,
                });
            }
            format!("rolled back by {by_name} after completion")
        }
        OperatorAction::Rollback => {
            return refuse("an active, paused or completed (with a fallback) rollout")
        }
    };
    Ok(Decision {
        at: now,
        action: action.action(),
        by: by.clone(),
        stage_index: rollout.stage_index,
        reason,
        figures: evaluate(rollout, devices, now, &NoDriftGate).gates,
    })
}
