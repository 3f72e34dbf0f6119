//! The rollout engine's unit tests: buckets, stages, every gate and every decision.

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
        agent_too_old: false,
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

fn gate(evaluation: &Evaluation, name: Gate) -> &GateFigure {
    evaluation
        .gates
        .iter()
        .find(|figure| figure.gate == name)
        .unwrap()
}

fn alice() -> Actor {
    Actor::Operator("alice".to_owned())
}

fn bob() -> Actor {
    Actor::Operator("bob".to_owned())
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
        assert_eq!(decision.action.as_str(), expected);
        assert_eq!(decision.by, Actor::Engine);
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
    assert_eq!(gate(&evaluation, Gate::FailurePct).value, None);
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
    let figure = gate(&evaluation, Gate::FailurePct);
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
    assert_eq!(decision.action, Action::Pause);
    assert_eq!(decision.by, Actor::Engine);
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
        [
            Gate::FailurePct.as_str(),
            Gate::ErrorRate.as_str(),
            Gate::P95RegressionPct.as_str()
        ]
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
    assert_eq!(gate(&evaluation, Gate::FailurePct).value, Some(10.0));
    assert!(!gate(&evaluation, Gate::FailurePct).breached);
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
    assert_eq!(decision.action, Action::Rollback);
    apply(&mut rollout, &decision);
    assert_eq!(rollout.state, RolloutState::RolledBack);
    for device in &devices {
        assert_eq!(slot_for_device(&rollout, device), Some(Slot::Fallback));
    }
    // Figures are still computed for a rolled-back rollout, but it takes no more decisions.
    let after = evaluate(&rollout, &devices, T0 + 20, &NoDriftGate);
    assert!(gate(&after, Gate::FailurePct).breached);
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
    let figure = gate(&late, Gate::FailurePct);
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
    assert_eq!(gate(&evaluation, Gate::FailurePct).value, None);
}

#[test]
fn a_device_enrolled_mid_rollout_joins_the_current_stage_from_its_enrollment() {
    let mut rollout = Rollout::new(plan(&[10, 50, 100], true, BreachAction::Pause), T0);
    let advance = Decision {
        at: T0 + BAKE,
        action: Action::Advance,
        by: Actor::Engine,
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
    let figure = gate(&evaluation, Gate::ErrorRate);
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
    assert!(!gate(&evaluation, Gate::ErrorRate).breached);
    assert_eq!(action(&evaluation), None);

    let quiet = evaluate(&rollout, &fleet(40), T0 + 10, &NoDriftGate);
    assert_eq!(gate(&quiet, Gate::ErrorRate).value, None);
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
    let figure = gate(&evaluation, Gate::P95RegressionPct);
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
    assert_eq!(gate(&evaluation, Gate::P95RegressionPct).value, Some(0.0));

    // 19 target samples are too few to judge.
    let mut sparse = fleet(40);
    sparse[0].fallback_stats = latencies(6, 100);
    let on_target = (0..sparse.len())
        .find(|i| is_assigned(&rollout, &sparse[*i]))
        .unwrap();
    sparse[on_target].target_stats = latencies(12, 19);
    let evaluation = evaluate(&rollout, &sparse, T0 + 10, &NoDriftGate);
    let figure = gate(&evaluation, Gate::P95RegressionPct);
    assert_eq!(figure.value, None);
    assert!(!figure.breached);
    assert_eq!(action(&evaluation), None);
    sparse[on_target].target_stats = latencies(12, 20);
    let evaluation = evaluate(&rollout, &sparse, T0 + 10, &NoDriftGate);
    assert!(gate(&evaluation, Gate::P95RegressionPct).breached);
    // ... and so are 19 fallback samples.
    sparse[0].fallback_stats = latencies(6, 19);
    let evaluation = evaluate(&rollout, &sparse, T0 + 10, &NoDriftGate);
    assert_eq!(gate(&evaluation, Gate::P95RegressionPct).value, None);

    // Without a fallback there is nothing to compare against, but the figure is still listed.
    let first_release = Rollout::new(plan(&[50, 100], false, BreachAction::Pause), T0);
    let evaluation = evaluate(&first_release, &devices, T0 + 10, &NoDriftGate);
    let figure = gate(&evaluation, Gate::P95RegressionPct);
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
        operator_decision(rollout, action, &alice(), T0 + 5 * BAKE, &devices).is_ok()
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
    let decision = operator_decision(&rollout, Advance, &alice(), T0 + 99, &devices).unwrap();
    assert_eq!(decision.action, Action::Advance);
    assert_eq!(decision.by, alice());
    assert_eq!(decision.at, T0 + 99);
    assert_eq!(decision.stage_index, 0);
    assert_eq!(decision.reason, "advanced by alice from 10% to 50%");
    assert_eq!(decision.figures.len(), 3);

    let error = operator_decision(&at(Active, 0, true), Resume, &bob(), T0, &devices).unwrap_err();
    assert_eq!(
        error,
        OperatorRefusal::WrongState {
            action: Resume,
            sequence: 7,
            state: Active,
            allowed: "a paused rollout",
        }
    );
    assert_eq!(
        error.to_string(),
        "cannot resume rollout 7: it is active, and only a paused rollout can be"
    );
    let error = operator_decision(&at(Active, 2, true), Advance, &bob(), T0, &devices).unwrap_err();
    assert_eq!(
        error,
        OperatorRefusal::LastStage {
            sequence: 7,
            percent: 100
        }
    );
    assert_eq!(
        error.to_string(),
        "cannot advance rollout 7: it is at its last stage (100%)"
    );
}

#[test]
fn apply_moves_state_and_stages() {
    let mut rollout = Rollout::new(plan(&[10, 50, 100], true, BreachAction::Pause), T0);
    let decision = |action: Action, at, stage_index| Decision {
        at,
        action,
        by: alice(),
        stage_index,
        reason: String::new(),
        figures: Vec::new(),
    };
    apply(&mut rollout, &decision(Action::Pause, T0 + 1, 0));
    assert_eq!(rollout.state, RolloutState::Paused);
    // An operator may widen a paused rollout; it stays paused until resumed.
    apply(&mut rollout, &decision(Action::Advance, T0 + 2, 0));
    assert_eq!(rollout.state, RolloutState::Paused);
    assert_eq!(rollout.stage_index, 1);
    // Regression guard: the same advance applied twice (a retried write) must not skip a stage.
    apply(&mut rollout, &decision(Action::Advance, T0 + 3, 0));
    assert_eq!(rollout.stage_index, 1);
    assert_eq!(rollout.stage_started, [T0, T0 + 2]);
    apply(&mut rollout, &decision(Action::Resume, T0 + 4, 1));
    assert_eq!(rollout.state, RolloutState::Active);
    apply(&mut rollout, &decision(Action::Advance, T0 + 5, 1));
    assert_eq!(rollout.stage_index, 2);
    assert_eq!(rollout.current_stage_started(), T0 + 5);
    // There is no stage past the last.
    apply(&mut rollout, &decision(Action::Advance, T0 + 6, 2));
    assert_eq!(rollout.stage_index, 2);
    assert_eq!(rollout.stage_started.len(), 3);
    apply(&mut rollout, &decision(Action::Complete, T0 + 7, 2));
    assert_eq!(rollout.state, RolloutState::Completed);
    apply(&mut rollout, &decision(Action::Rollback, T0 + 9, 2));
    assert_eq!(rollout.state, RolloutState::RolledBack);
    apply(&mut rollout, &decision(Action::Superseded, T0 + 10, 2));
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
    assert!(gate(&evaluation, Gate::FailurePct).breached);
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

/// Devices whose agent is older than the target's `min_agent_version` are not offered the target
/// (they keep the fallback), count as skipped in their stage rather than pending or failed, and
/// do not hold the rollout back: it completes once the others have committed.
#[test]
fn devices_with_an_agent_too_old_are_skipped_not_failed() {
    let rollout = Rollout::new(plan(&[100], true, BreachAction::Pause), T0);
    let mut devices = fleet(10);
    for device in &mut devices[..4] {
        device.agent_too_old = true;
    }
    assert_eq!(slot_for_device(&rollout, &devices[0]), Some(Slot::Fallback));
    assert_eq!(slot_for_device(&rollout, &devices[5]), Some(Slot::Target));
    let without_fallback = Rollout::new(plan(&[100], false, BreachAction::Pause), T0);
    assert_eq!(slot_for_device(&without_fallback, &devices[0]), None);

    let evaluation = evaluate(&rollout, &devices, T0 + 1, &NoDriftGate);
    let stage = &evaluation.stages[0];
    assert_eq!(
        (stage.devices, stage.skipped, stage.pending, stage.failed),
        (10, 4, 6, 0),
        "{stage:?}"
    );
    for device in &mut devices[4..] {
        device.outcome = Some(Outcome::Committed { at: T0 + 1 });
    }
    // Long past the device timeout: the skipped devices are not silent either.
    let evaluation = evaluate(&rollout, &devices, T0 + TIMEOUT + BAKE + 10, &NoDriftGate);
    let failure = &evaluation.gates[0];
    assert_eq!(failure.value, Some(0.0), "{failure:?}");
    assert_eq!(failure.detail, "0 of 6 devices (0 failed, 0 silent)");
    assert_eq!(
        evaluation.decision.map(|decision| decision.action),
        Some(Action::Complete)
    );
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
            gate: Gate::DriftPsi,
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
        assert_eq!(figure.gate, Gate::DriftPsi);
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
            let summary = drift_summary(&profile, rows, seed, fallback_shift.0, fallback_shift.1);
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
    gate(evaluation, Gate::DriftPsi)
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
    let agreement = gate(&evaluation, Gate::ShadowTop1Agreement);
    assert_eq!(agreement.value, None);
    assert_eq!(agreement.limit, 0.9);
    assert_eq!(
        agreement.detail,
        "0 of 500 comparisons needed yet, on 0 devices"
    );
    assert_eq!(gate(&evaluation, Gate::ShadowMeanAbsDiff).limit, 0.05);
}

#[test]
fn the_shadow_stage_holds_until_enough_comparisons_then_advances() {
    let mut rollout = shadow_rollout(BreachAction::Pause);
    let mut devices = fleet(100);
    // Every shadowing device loaded the target, but too few comparisons came in yet.
    shadow_all(&rollout, &mut devices, 10, 10, 0.0);
    let evaluation = evaluate(&rollout, &devices, T0 + 10 * BAKE, &NoDriftGate);
    assert_eq!(evaluation.stages[0].succeeded, evaluation.stages[0].devices);
    assert_eq!(gate(&evaluation, Gate::ShadowMeanAbsDiff).value, None);
    assert_eq!(action(&evaluation), None, "{evaluation:#?}");

    shadow_all(&rollout, &mut devices, 100, 97, 0.01);
    let early = evaluate(&rollout, &devices, T0 + BAKE - 1, &NoDriftGate);
    assert_eq!(action(&early), None);
    let evaluation = evaluate(&rollout, &devices, T0 + BAKE, &NoDriftGate);
    let agreement = gate(&evaluation, Gate::ShadowTop1Agreement);
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
    let diff = gate(&evaluation, Gate::ShadowMeanAbsDiff);
    assert!((diff.value.unwrap() - 0.01).abs() < 1e-12, "{diff:?}");
    let decision = evaluation.decision.clone().unwrap();
    assert_eq!(decision.action, Action::Advance);
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
        .all(|figure| !figure.gate.is_shadow()));
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
        assert!(gate(&evaluation, Gate::ShadowTop1Agreement).breached);
        assert!(!gate(&evaluation, Gate::ShadowMeanAbsDiff).breached);
        assert_eq!(action(&evaluation), Some(expected));
        let reason = &evaluation.decision.as_ref().unwrap().reason;
        assert!(
            reason.starts_with("gate breached: shadow_top1_agreement 0.6 under limit 0.9 ("),
            "{reason}"
        );

        shadow_all(&rollout, &mut devices, 100, 100, 0.2);
        let evaluation = evaluate(&rollout, &devices, T0 + 10, &NoDriftGate);
        assert!(gate(&evaluation, Gate::ShadowMeanAbsDiff).breached);
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
        gate(&evaluation, Gate::FailurePct).breached,
        "{evaluation:#?}"
    );
    assert_eq!(evaluation.stages[0].failed, 2);
    assert_eq!(action(&evaluation), Some("rollback"));
}
