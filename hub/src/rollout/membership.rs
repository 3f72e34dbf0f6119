//! Who is in which stage: a device's bucket for a plan, its stage, and the slot it should run.

use super::*;

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

/// [`slot_for`] for a device the hub knows in full: a revoked device gets nothing, and one whose
/// agent is too old for the target is not offered it ([`offered`]).
pub fn slot_for_device(rollout: &Rollout, device: &DeviceFacts) -> Option<Slot> {
    if device.revoked {
        return None;
    }
    offered(
        rollout,
        slot_for(rollout, &device.id, &device.labels),
        device.agent_too_old,
    )
}

/// What the hub hands a device [`slot_for`] gives `slot`: the same, except that a device whose
/// agent is older than the target's `min_agent_version` (`agent_too_old`), which would refuse the
/// target, gets the fallback instead, or nothing when the plan has none.
pub fn offered(rollout: &Rollout, slot: Option<Slot>, agent_too_old: bool) -> Option<Slot> {
    match slot {
        Some(Slot::Target) if agent_too_old => {
            rollout.plan.fallback.as_ref().map(|_| Slot::Fallback)
        }
        slot => slot,
    }
}
