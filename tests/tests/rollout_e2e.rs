//! Staged rollouts with real agents: a good model reaches every device stage by stage, a model
//! that fails the devices' own validation is rolled back at its first stage before anyone else
//! gets it, and a device that goes silent mid-rollout times out and pauses it. (A drifting canary
//! group rolling its rollout back is in `drift_e2e.rs`; the same gates driven by simulated devices
//! are in `hub_rollout.rs`.)

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::process::Command;

use outpost_hub::api::{DeviceDetail, RolloutInfo, RolloutState};
use outpost_hub::rollout::bucket;
use outpost_protocol::device::DeviceId;
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;
use serde_json::json;

/// The sequence of the rollout each test creates after the first one.
const SEQUENCE: u64 = 2;

/// A hub with demo@1 rolled out to `n` real agents, all serving it.
fn fleet_on_v1(n: usize) -> (TestHub, Fleet, Vec<TestAgent>) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agents: Vec<TestAgent> = (0..n)
        .map(|_| TestAgent::enroll(&hub, &fleet, "site=lab", ""))
        .collect();
    for agent in &mut agents {
        agent.start();
    }
    for agent in &agents {
        agent.wait_status("active", json!("demo@1"));
    }
    (hub, fleet, agents)
}

fn device_id(agent: &TestAgent) -> String {
    agent.status()["device_id"].as_str().unwrap().to_owned()
}

/// The agent's bucket (0..10000) in the plan with [`SEQUENCE`].
fn agent_bucket(agent: &TestAgent) -> u32 {
    bucket(&DeviceId::from_hex(&device_id(agent)).unwrap(), SEQUENCE)
}

/// Waits until the rollout leaves the `active` state, and returns it.
fn settled(hub: &TestHub, what: &str) -> RolloutInfo {
    wait_until(AGENT_WAIT, what, || {
        let rollout = hub.rollout(SEQUENCE);
        (rollout.state != RolloutState::Active).then_some(rollout)
    })
}

/// Whether the device ever reported anything about demo@`version`.
fn touched(detail: &DeviceDetail, version: u64) -> bool {
    detail
        .events
        .iter()
        .any(|event| event.model.as_ref().is_some_and(|m| m.version == version))
}

fn serves(agent: &TestAgent, version: &str) {
    let (code, body) = agent.infer(&http(), [0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["model_version"], json!(version), "{body}");
}

#[test]
fn a_good_model_reaches_every_device_stage_by_stage() {
    let (hub, fleet, agents) = fleet_on_v1(3);
    fleet.publish_example(&hub, "demo", 2, 2);
    let created = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &["--stages", "34,67,100", "--bake", "1s"],
    );
    assert_eq!(created.sequence, SEQUENCE);

    let done = settled(&hub, "the rollout to finish");
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    // Every stage was reached in order, by the engine, and the last one holds the whole fleet.
    let advances: Vec<usize> = done
        .decisions
        .iter()
        .filter(|decision| decision.action == "advance")
        .map(|decision| decision.stage_index)
        .collect();
    assert_eq!(advances, [0, 1], "{done:#?}");
    assert!(done
        .decisions
        .iter()
        .all(|decision| decision.by == "engine"));
    let last = done.stages.last().unwrap();
    assert_eq!((last.devices, last.succeeded), (3, 3), "{done:#?}");
    for agent in &agents {
        let status = agent.wait_status("active", json!("demo@2"));
        assert_eq!(status["pending"], json!(null), "{status:#}");
        serves(agent, "2");
        assert!(agent
            .hub_detail(&hub)
            .events
            .iter()
            .any(|event| event.kind == "committed"
                && event.model.as_ref().is_some_and(|m| m.version == 2)));
    }
}

#[test]
fn a_model_failing_validation_rolls_back_at_the_first_stage() {
    let (hub, fleet, agents) = fleet_on_v1(3);
    // The first stage takes exactly the agent with the lowest bucket (and, rarely, one sharing
    // its percentile); the others wait for a later stage.
    let lowest = agents.iter().map(agent_bucket).min().unwrap();
    let first = (lowest / 100 + 1).min(98);
    let stages = format!("{first},99,100");
    fleet.publish_unvalidated(&hub, "demo", 2);
    fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            &stages,
            "--bake",
            "30s",
            "--max-failure-pct",
            "5",
            "--on-breach",
            "rollback",
        ],
    );

    let rolled_back = settled(&hub, "the rollout to roll back");
    assert_eq!(
        rolled_back.state,
        RolloutState::RolledBack,
        "{rolled_back:#?}"
    );
    assert_eq!(rolled_back.stage_index, 0, "{rolled_back:#?}");
    let decision = rolled_back.decisions.last().unwrap();
    assert_eq!(
        (decision.action.as_str(), decision.stage_index),
        ("rollback", 0),
        "{decision:#?}"
    );
    assert!(decision.reason.contains("failure_pct"), "{decision:#?}");

    let canaries: Vec<&TestAgent> = agents
        .iter()
        .filter(|agent| agent_bucket(agent) < first * 100)
        .collect();
    assert!(
        !canaries.is_empty() && canaries.len() < agents.len(),
        "stage 0 at {first}% holds {} of {} agents",
        canaries.len(),
        agents.len()
    );
    for agent in &agents {
        // Every device serves the old version, the canaries after refusing to commit the new one.
        let status = agent.wait_status("active", json!("demo@1"));
        assert_eq!(status["pending"], json!(null), "{status:#}");
        serves(agent, "1");
        let detail = agent.hub_detail(&hub);
        if canaries.iter().any(|canary| canary.pid() == agent.pid()) {
            let failed = detail
                .events
                .iter()
                .find(|event| event.kind == "failed")
                .unwrap_or_else(|| panic!("no failure reported: {detail:#?}"));
            assert!(failed.detail.contains("validation"), "{failed:#?}");
            assert_eq!(failed.model.as_ref().map(|m| m.version), Some(2));
        } else {
            // Outside the first stage, the bad model never reached the device at all.
            assert!(!touched(&detail, 2), "{detail:#?}");
            let installed = std::fs::read_dir(agent.data().join("versions"))
                .unwrap()
                .count();
            assert_eq!(installed, 1, "only demo@1 is installed");
        }
    }
}

/// Sends `signal` (`STOP`, `CONT`) to the agent's process.
fn signal(agent: &TestAgent, signal: &str) {
    let status = Command::new("kill")
        .args([&format!("-{signal}"), &agent.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal}");
}

#[test]
fn a_device_that_goes_silent_times_out_and_pauses_the_rollout() {
    let (hub, fleet, agents) = fleet_on_v1(3);
    fleet.publish_example(&hub, "demo", 2, 2);
    // One device freezes (alive, so its connections stay open, but it never answers or reports).
    let silent = &agents[0];
    signal(silent, "STOP");
    fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--stages",
            "100",
            "--bake",
            "1s",
            // The other devices must commit within the timeout too, or they count as silent
            // beside the frozen one when the engine pauses: long enough for that on a busy
            // machine, short enough for a test to wait out.
            "--device-timeout",
            "20s",
            "--max-failure-pct",
            "5",
        ],
    );

    let paused = settled(&hub, "the silent device to pause the rollout");
    assert_eq!(paused.state, RolloutState::Paused, "{paused:#?}");
    let stage = &paused.stages[0];
    assert_eq!(
        (stage.devices, stage.succeeded, stage.failed, stage.silent),
        (3, 2, 0, 1),
        "{paused:#?}"
    );
    let decision = paused.decisions.last().unwrap();
    assert_eq!(decision.action, "pause", "{decision:#?}");
    assert!(decision.reason.contains("silent"), "{decision:#?}");
    let figure = decision
        .figures
        .iter()
        .find(|figure| figure.gate == "failure_pct")
        .unwrap();
    let expected = 100.0 / 3.0;
    assert!(
        figure
            .value
            .is_some_and(|value| (value - expected).abs() < 0.1),
        "{figure:#?}"
    );
    for agent in &agents[1..] {
        agent.wait_status("active", json!("demo@2"));
        serves(agent, "2");
    }

    // Thawed, the device catches up with what the paused stage already handed it.
    signal(silent, "CONT");
    silent.wait_status("active", json!("demo@2"));
    serves(silent, "2");
}

/// A target whose manifest needs a newer agent than the fleet runs (issue 22): the hub does not
/// offer it, every device accepts the plan and keeps serving the fallback it already runs, and
/// the rollout counts them as skipped, not failed, and completes.
#[test]
fn devices_whose_agent_is_too_old_are_skipped_and_keep_their_model() {
    let (hub, fleet, agents) = fleet_on_v1(2);
    let dir = hub.dir().join("model-demo-2");
    hub.cli(&[
        "example-model",
        "--out",
        &dir.to_string_lossy(),
        "--seed",
        "2",
    ])
    .ok();
    let mut publish = fleet.publish_args(&dir, "demo", 2);
    publish.extend(["--min-agent-version".to_owned(), "99.0.0".to_owned()]);
    hub.cli(&publish.iter().map(String::as_str).collect::<Vec<_>>())
        .ok();
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    for agent in &agents {
        agent.wait_fresh_status("plan_sequence", json!(SEQUENCE));
    }
    let done = settled(&hub, "the rollout to finish");
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    let stage = &done.stages[0];
    assert_eq!(
        (stage.devices, stage.skipped, stage.failed, stage.pending),
        (2, 2, 0, 0),
        "{done:#?}"
    );
    let status = hub.cli(&["rollout", "status", "2"]).ok().stdout;
    assert!(status.contains("SKIPPED"), "{status}");
    // The devices the rollout skipped are the ones below the manifest's minimum.
    let listed = |filter: &str| -> usize {
        hub.cli_json::<Vec<outpost_hub::api::DeviceSummary>>(&["device", "list", "--agent", filter])
            .len()
    };
    assert_eq!(listed("<99"), 2);
    assert_eq!(listed(">=99.0.0"), 0);
    assert_eq!(listed(&format!("={}", env!("CARGO_PKG_VERSION"))), 2);
    hub.cli(&["device", "list", "--agent", "~1"])
        .fails_with("expected a comparison and a version");
    for agent in &agents {
        let status = agent.wait_fresh_status("active", json!("demo@1"));
        assert_eq!(status["plan_sequence"], json!(SEQUENCE), "{status:#}");
        serves(agent, "1");
        assert!(
            !touched(&agent.hub_detail(&hub), 2),
            "the device was never offered demo@2"
        );
    }
}
