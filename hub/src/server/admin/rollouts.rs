//! Rollouts: creating one from a signed plan, listing and showing them, operator actions.

use super::*;
use crate::rollout::{Action, Actor, Decision};

pub(super) async fn list_rollouts(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<RolloutInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    let mut infos = Vec::new();
    for record in hub.store.rollouts().await? {
        infos.push(engine::info(&hub, &record).await?);
    }
    Ok(Json(infos))
}

pub(super) async fn find_rollout(
    hub: &SharedHub,
    sequence: u64,
) -> Result<RolloutRecord, AdminError> {
    hub.store
        .rollout(sequence)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no rollout {sequence}")))
}

pub(super) async fn show_rollout(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(sequence): Path<u64>,
) -> Reply<RolloutInfo> {
    require(&hub, &headers, Role::Viewer).await?;
    Ok(Json(
        engine::info(&hub, &find_rollout(&hub, sequence).await?).await?,
    ))
}

/// Checks that a signed `what` (a plan or a retirement) comes above every plan and retirement
/// stored: they share one sequence, which devices hold each model's documents to, so a sequence
/// is never used twice. Called under the rollout lock.
pub(super) async fn check_sequence_is_new(
    hub: &SharedHub,
    what: &str,
    sequence: u64,
) -> Result<(), AdminError> {
    let rollout = hub
        .store
        .rollouts()
        .await?
        .last()
        .map(|record| record.sequence);
    let retirement = hub
        .store
        .retirements()
        .await?
        .last()
        .map(|record| record.sequence);
    let latest = match (rollout, retirement) {
        (Some(rollout), Some(retirement)) if retirement > rollout => {
            Some(("retirement", retirement))
        }
        (Some(rollout), _) => Some(("rollout", rollout)),
        (None, Some(retirement)) => Some(("retirement", retirement)),
        (None, None) => None,
    };
    match latest {
        Some((kind, highest)) if sequence <= highest => Err(AdminError::conflict(format!(
            "{what} sequence {sequence} is not above the latest {kind} {highest}: plans and \
             retirements share one sequence"
        ))),
        _ => Ok(()),
    }
}

/// Checks that a plan's manifest reference names a manifest this hub holds, byte for byte.
pub(super) async fn check_published(
    hub: &SharedHub,
    what: &str,
    reference: &outpost_protocol::trust::ManifestRef,
) -> Result<(), AdminError> {
    let record = hub
        .store
        .manifest(&reference.name, reference.version)
        .await?
        .ok_or_else(|| {
            AdminError::conflict(format!(
                "the plan's {what} {}@{} is not published on this hub",
                reference.name, reference.version
            ))
        })?;
    if record.sha256 != reference.manifest_sha256.0 {
        return Err(AdminError::conflict(format!(
            "the plan's {what} {}@{} differs from the published manifest",
            reference.name, reference.version
        )));
    }
    Ok(())
}

pub(super) async fn create_rollout(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RolloutInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Operator).await?;
    let bytes = body?;
    if bytes.len() > Signed::<PlanBody>::MAX_FRAME {
        return Err(AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "plan is larger than any signed plan",
        ));
    }
    let root = require_root(&hub).await?;
    let _guard = hub.store.lock_rollouts().await?;
    let plan = root
        .verify_plan(&bytes, &floor(), None)
        .map_err(|error| AdminError::bad_request(format!("plan refused: {error}")))?;
    check_sequence_is_new(&hub, "plan", plan.sequence()).await?;
    let body = plan.body();
    check_published(&hub, "target", &body.target).await?;
    if let Some(fallback) = &body.fallback {
        check_published(&hub, "fallback", fallback).await?;
    }
    let now = unix_now();
    // A newer plan for the same model takes over from older ones.
    for mut older in hub.store.rollouts().await? {
        if older.state == RolloutStateRecord::Superseded {
            continue;
        }
        let mut rollout = engine::to_rollout(&older)?;
        if rollout.plan.target.name != body.target.name {
            continue;
        }
        let decision = Decision {
            at: now,
            action: Action::Superseded,
            by: Actor::Operator(actor.name.clone()),
            stage_index: older.stage_index,
            reason: format!("superseded by rollout {}", plan.sequence()),
            figures: Vec::new(),
        };
        engine::persist_decision(&hub, &mut older, &mut rollout, decision).await?;
    }
    let record = RolloutRecord {
        sequence: plan.sequence(),
        signed_plan: bytes.to_vec(),
        state: RolloutStateRecord::Active,
        stage_index: 0,
        stage_started: vec![now],
        decisions: Vec::new(),
        created: now,
    };
    hub.store.put_rollout(&record).await?;
    audit(
        &hub,
        &actor,
        "rollout create",
        &format!("rollout {}", record.sequence),
        &format!(
            "{}@{} stages {:?} selector {:?}",
            body.target.name,
            body.target.version,
            body.stages,
            body.selector
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        ),
    )
    .await?;
    hub.store.flush().await?;
    engine::reload(&hub).await?;
    log::info!(
        "rollout {} of {}@{} started",
        record.sequence,
        body.target.name,
        body.target.version
    );
    Ok((
        StatusCode::CREATED,
        Json(engine::info(&hub, &record).await?),
    ))
}

pub(super) async fn rollout_action(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path((sequence, action)): Path<(u64, String)>,
) -> Reply<RolloutInfo> {
    let actor = require(&hub, &headers, Role::Operator).await?;
    let action = crate::rollout::OperatorAction::parse(&action).ok_or_else(|| {
        AdminError::not_found(format!(
            "no rollout action {action:?} (pause, resume, advance, rollback)"
        ))
    })?;
    let _guard = hub.store.lock_rollouts().await?;
    let mut record = find_rollout(&hub, sequence).await?;
    let mut rollout = engine::to_rollout(&record)?;
    let facts = engine::device_facts(&hub, sequence, &rollout).await?;
    let decision = crate::rollout::operator_decision(
        &rollout,
        action,
        &Actor::Operator(actor.name.clone()),
        unix_now(),
        &facts,
    )
    .map_err(|refusal| AdminError::conflict(refusal.to_string()))?;
    engine::persist_decision(&hub, &mut record, &mut rollout, decision).await?;
    hub.store.flush().await?;
    engine::reload(&hub).await?;
    Ok(Json(engine::info(&hub, &record).await?))
}
