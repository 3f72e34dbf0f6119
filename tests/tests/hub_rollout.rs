//! Staged rollouts end to end: a real hub process, the real CLI for the operator, and simulated
//! devices that verify, download and report over real HTTP.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::{Duration, Instant};

use outpost_hub::api::{RolloutInfo, RolloutState};
use outpost_hub::rollout::{bucket, stage_of};
use outpost_protocol::device::AgentState;
use outpost_protocol::trust::Slot;
use outpost_tests::device_sim::{Behaviour, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;

/// Bound on every rollout this file waits for.
const ROLLOUT_TIMEOUT: Duration = Duration::from_secs(60);

/// A hub with a root, `demo` versions 1 and 2 published, and `n_devices` enrolled devices.
fn fleet(n_devices: usize) -> (TestHub, Fleet, Vec<SimDevice>) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let token = hub.enroll_token("site=lab,kind=sim", 100);
    let devices = (0..n_devices)
        .map(|_| SimDevice::enroll(&hub.url(), &token, &["kind=sim"], &fleet.root))
        .collect();
    (hub, fleet, devices)
}

/// The stage index the hub places `device` in for the plan.
fn stage(device: &SimDevice, rollout: &RolloutInfo) -> usize {
    let stages: Vec<u8> = rollout.stages.iter().map(|stage| stage.percent).collect();
    stage_of(bucket(&device.id, rollout.sequence), &stages)
}

/// Runs rounds (every device steps with its behaviour) until `done` accepts the rollout's status.
/// Checks on every round that the hub hands the target exactly to devices of reached stages.
///
/// Check-ins read rollouts from a cache the hub reloads once the engine's decision is stored and
/// flushed, while `rollout status` reads the store: a check-in during that flush still sees the
/// stage before. So a device of the stage `before` shows may still be handed the fallback, though
/// never one of an earlier stage; and no device gets the target before its stage is reached.
fn drive(
    hub: &TestHub,
    devices: &mut [SimDevice],
    behaviour: Behaviour,
    sequence: u64,
    what: &str,
    done: impl Fn(&RolloutInfo) -> bool,
) -> RolloutInfo {
    let started = Instant::now();
    loop {
        let before = hub.rollout(sequence);
        if done(&before) {
            return before;
        }
        let mut offers = Vec::new();
        for device in devices.iter_mut() {
            let offer = device.step(behaviour);
            offers.push(offer.map(|offer| offer.slot));
        }
        let after = hub.rollout(sequence);
        // The engine may move on during the round, never back.
        assert!(after.stage_index >= before.stage_index);
        if before.state == RolloutState::Active && after.state == RolloutState::Active {
            for (device, slot) in devices.iter().zip(&offers) {
                let device_stage = stage(device, &before);
                match slot {
                    Some(Slot::Target) => assert!(
                        device_stage <= after.stage_index,
                        "device in stage {device_stage} got the target at stage {}",
                        after.stage_index
                    ),
                    Some(Slot::Fallback) => assert!(
                        device_stage >= before.stage_index,
                        "device in stage {device_stage} got the fallback at stage {}",
                        before.stage_index
                    ),
                    None => panic!("a selected device was offered no manifest"),
                }
            }
        }
        assert!(
            started.elapsed() < ROLLOUT_TIMEOUT,
            "timed out after {ROLLOUT_TIMEOUT:?} waiting for {what}; last status: {after:#?}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn actions(rollout: &RolloutInfo) -> Vec<&str> {
    rollout
        .decisions
        .iter()
        .map(|decision| decision.action.as_str())
        .collect()
}

#[test]
fn rollout_goes_through_every_stage_and_completes() {
    let (hub, fleet, mut devices) = fleet(30);
    let created = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            "1,10,50,100",
            "--bake",
            "1s",
            // Long: each stage's devices commit at the next round, however slowly rounds go on
            // a busy machine, and are never counted silent.
            "--device-timeout",
            "1h",
        ],
    );
    assert_eq!(created.state, RolloutState::Active);
    assert_eq!(created.stage_index, 0);
    let sequence = created.sequence;

    let done = drive(
        &hub,
        &mut devices,
        Behaviour::Commit,
        sequence,
        "the rollout to complete",
        |rollout| rollout.state != RolloutState::Active,
    );
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    assert_eq!(done.stage_index, 3);
    assert_eq!(
        actions(&done),
        ["advance", "advance", "advance", "complete"],
        "{:#?}",
        done.decisions
    );
    for (index, decision) in done.decisions.iter().enumerate() {
        assert_eq!(decision.stage_index, index, "{decision:#?}");
        assert_eq!(decision.by, "engine");
    }
    let percents: Vec<u8> = done.stages.iter().map(|stage| stage.percent).collect();
    assert_eq!(percents, [1, 10, 50, 100]);
    let last = done.stages.last().unwrap();
    assert_eq!((last.devices, last.succeeded, last.failed), (30, 30, 0));

    // Every device ends on the target, by its own account and by the hub's.
    let target = hub.cli_json::<outpost_hub::api::ModelVersionInfo>(&["model", "show", "demo@2"]);
    for device in &devices {
        let active = device.active.as_ref().expect("every device runs a model");
        assert_eq!((active.name.as_str(), active.version), ("demo", 2));
        assert_eq!(active.manifest_sha256.to_hex(), target.manifest_sha256);
    }
    let listed: Vec<outpost_hub::api::DeviceSummary> = hub.cli_json(&["device", "list"]);
    assert_eq!(listed.len(), 30);
    for device in listed {
        let active = device.active.expect("the hub knows what every device runs");
        assert_eq!((active.name.as_str(), active.version), ("demo", 2));
    }

    // The same picture in Prometheus form: devices by state, the rollout's stage, the device
    // requests by route, and the counters the handlers bump.
    let metrics = hub.fresh_metrics();
    let value = |series: &str| -> f64 {
        metrics
            .lines()
            .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in /metrics:\n{metrics}"))
            .parse()
            .unwrap()
    };
    assert_eq!(value("outpost_hub_devices{state=\"steady\"}"), 30.0);
    assert_eq!(
        value(&format!(
            "outpost_hub_rollout_stage{{sequence=\"{sequence}\",state=\"completed\"}}"
        )),
        100.0
    );
    assert_eq!(value("outpost_hub_enrollments_total"), 30.0);
    let check_ins = value("outpost_hub_check_ins_total");
    assert!(check_ins >= 30.0, "{check_ins} check-ins");
    assert_eq!(
        value("outpost_hub_http_requests_total{route=\"/device/v1/checkin\",status=\"200\"}"),
        check_ins
    );
    assert_eq!(
        value("outpost_hub_http_request_duration_seconds_count{route=\"/device/v1/checkin\"}"),
        check_ins
    );
    // Every device reported at least downloaded and committed.
    assert!(value("outpost_hub_status_reports_total") >= 60.0);
}

#[test]
fn failing_devices_breach_the_gate_and_pause() {
    let (hub, fleet, mut devices) = fleet(12);
    let sequence = fleet
        .create_rollout(
            &hub,
            "demo",
            2,
            1,
            &[
                "--stages",
                "50,100",
                "--bake",
                "1s",
                "--device-timeout",
                "30s",
                "--max-failure-pct",
                "5",
            ],
        )
        .sequence;
    let paused = drive(
        &hub,
        &mut devices,
        Behaviour::FailTarget,
        sequence,
        "the failure gate to pause the rollout",
        |rollout| rollout.state != RolloutState::Active,
    );
    assert_eq!(paused.state, RolloutState::Paused, "{paused:#?}");
    let decision = paused.decisions.last().unwrap();
    assert_eq!(decision.action, "pause");
    assert_eq!(decision.by, "engine");
    assert!(
        decision.reason.contains("gate breached: failure_pct"),
        "{decision:#?}"
    );
    let figure = decision
        .figures
        .iter()
        .find(|figure| figure.gate == "failure_pct")
        .unwrap();
    assert!(figure.breached);
    let value = figure.value.unwrap();
    assert!(value > 5.0, "{figure:#?}");
    assert!(figure.detail.contains("failed"), "{figure:#?}");
    // The reason quotes the figure it acted on.
    assert!(
        decision.reason.contains(&figure.detail),
        "{} does not quote {}",
        decision.reason,
        figure.detail
    );
    assert!(paused.stages[paused.stage_index].failed > 0);

    // Paused means paused: the engine takes no further decision while devices keep checking in.
    let decisions = paused.decisions.len();
    for _ in 0..3 {
        for device in &mut devices {
            device.step(Behaviour::FailTarget);
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    let later = hub.rollout(sequence);
    assert_eq!(later.state, RolloutState::Paused);
    assert_eq!(later.decisions.len(), decisions);
}

#[test]
fn breach_with_rollback_sends_every_device_to_the_fallback() {
    let (hub, fleet, mut devices) = fleet(12);
    let sequence = fleet
        .create_rollout(
            &hub,
            "demo",
            2,
            1,
            &[
                "--stages",
                "50,100",
                "--bake",
                "1s",
                "--device-timeout",
                "30s",
                "--on-breach",
                "rollback",
            ],
        )
        .sequence;
    let rolled_back = drive(
        &hub,
        &mut devices,
        Behaviour::FailTarget,
        sequence,
        "the failure gate to roll the rollout back",
        |rollout| rollout.state != RolloutState::Active,
    );
    assert_eq!(
        rolled_back.state,
        RolloutState::RolledBack,
        "{rolled_back:#?}"
    );
    let decision = rolled_back.decisions.last().unwrap();
    assert_eq!(decision.action, "rollback");
    assert!(decision.reason.contains("failure_pct"), "{decision:#?}");

    let fallback = hub.cli_json::<outpost_hub::api::ModelVersionInfo>(&["model", "show", "demo@1"]);
    // Check-ins see the rollback once the hub has flushed it and reloaded its rollout cache, a
    // moment after `rollout status` shows it (see `drive`): until then a device of the stage may
    // still be offered the target.
    wait_until(
        ROLLOUT_TIMEOUT,
        "check-ins to offer only the fallback",
        || {
            devices
                .iter()
                .all(|device| {
                    let response = device.check_in(AgentState::Steady);
                    device.verify_offer(&response).map(|offer| offer.slot) == Some(Slot::Fallback)
                })
                .then_some(())
        },
    );
    for device in &mut devices {
        let offer = device
            .step(Behaviour::Commit)
            .expect("a rolled-back plan still offers its fallback");
        assert_eq!(offer.slot, Slot::Fallback);
        assert_eq!(offer.manifest.version(), 1);
        assert_eq!(offer.manifest.digest().to_hex(), fallback.manifest_sha256);
        let active = device.active.as_ref().unwrap();
        assert_eq!(active.version, 1, "the device committed the fallback");
    }
}

#[test]
fn silent_devices_count_as_failures_after_the_timeout() {
    let (hub, fleet, mut devices) = fleet(8);
    let sequence = fleet
        .create_rollout(
            &hub,
            "demo",
            2,
            1,
            &[
                "--stages",
                "50,100",
                "--bake",
                "1s",
                "--device-timeout",
                "2s",
            ],
        )
        .sequence;
    // Mute devices check in and are handed the target, but never report on it.
    let paused = drive(
        &hub,
        &mut devices,
        Behaviour::Mute,
        sequence,
        "silent devices to pause the rollout",
        |rollout| rollout.state != RolloutState::Active,
    );
    assert_eq!(paused.state, RolloutState::Paused, "{paused:#?}");
    let progress = &paused.stages[paused.stage_index];
    assert!(progress.silent > 0, "{progress:#?}");
    assert_eq!((progress.succeeded, progress.failed), (0, 0));
    let decision = paused.decisions.last().unwrap();
    assert_eq!(decision.action, "pause");
    assert!(decision.reason.contains("failure_pct"), "{decision:#?}");
    assert!(
        decision
            .reason
            .contains(&format!("0 failed, {} silent", progress.silent))
            || decision.reason.contains("silent"),
        "{decision:#?}"
    );
    let figure = decision
        .figures
        .iter()
        .find(|figure| figure.gate == "failure_pct")
        .unwrap();
    assert_eq!(figure.value, Some(100.0), "{figure:#?}");
}

#[test]
fn devices_enrolling_mid_rollout_join_at_the_current_stage() {
    let (hub, fleet, _) = fleet(0);
    let created = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            "50,100",
            "--bake",
            "1s",
            "--device-timeout",
            "30s",
            "--manual-advance",
        ],
    );
    let sequence = created.sequence;
    let token = hub.enroll_token("", 100);

    // Enroll until there is a newcomer inside the 50% stage and one outside it.
    let mut newcomers: Vec<SimDevice> = Vec::new();
    while !(newcomers.iter().any(|d| stage(d, &created) == 0)
        && newcomers.iter().any(|d| stage(d, &created) == 1))
    {
        assert!(newcomers.len() < 40, "40 devices all fell in one stage");
        newcomers.push(SimDevice::enroll(&hub.url(), &token, &[], &fleet.root));
    }
    for device in &mut newcomers {
        let offer = device.step(Behaviour::Commit).unwrap();
        let expected = if stage(device, &created) == 0 {
            Slot::Target
        } else {
            Slot::Fallback
        };
        assert_eq!(offer.slot, expected);
    }

    let advanced: RolloutInfo = hub.cli_json(&["rollout", "advance", &sequence.to_string()]);
    assert_eq!(advanced.stage_index, 1);
    assert_eq!(advanced.decisions.last().unwrap().action, "advance");

    // At 100% every device is on the target: those that were waiting and one that enrolls now.
    newcomers.push(SimDevice::enroll(&hub.url(), &token, &[], &fleet.root));
    for device in &mut newcomers {
        let offer = device.step(Behaviour::Commit).unwrap();
        assert_eq!(offer.slot, Slot::Target);
        assert_eq!(device.active.as_ref().unwrap().version, 2);
    }
    let status = hub.rollout(sequence);
    let last = status.stages.last().unwrap();
    assert_eq!(last.devices, newcomers.len() as u64);
    assert_eq!(last.succeeded, newcomers.len() as u64, "{status:#?}");
}
