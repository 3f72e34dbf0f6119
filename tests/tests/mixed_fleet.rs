//! A mixed fleet over real processes (issue 22): the agent of the previous declared release,
//! built from its commit by `cargo xtask install`, runs beside today's agent against today's hub.
//! Both enroll, take one staged rollout, serve it, report their telemetry and drift summaries, and
//! show in `device list` with their agent versions.
//!
//! The previous release checks in on the paths of one model (`/device/v2/checkin`), today's on
//! `/device/v3/checkin`: the hub answers each on its own path, in wire version 1.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;

use outpost_hub::api::{DeviceSummary, DriftReport, RolloutState};
use outpost_tests::agent::{http, AgentProgram, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{wait_until, workspace_root};
use serde_json::json;

/// The previous declared release (see `PREVIOUS_RELEASE` in xtask/src/install.rs).
const PREVIOUS: &str = "0.1.0";

fn previous_agent() -> AgentProgram {
    let binary: PathBuf =
        workspace_root().join(format!("target/previous-agent/outpost-agent-{PREVIOUS}"));
    assert!(
        binary.is_file(),
        "{} is missing: `cargo xtask install` builds release {PREVIOUS}'s agent",
        binary.display()
    );
    AgentProgram::emulated(Vec::new(), binary, AGENT_WAIT)
}

/// Rows sent to each agent once it serves demo@2.
const ROWS: u64 = 40;

#[test]
fn the_previous_releases_agent_and_todays_take_one_rollout_and_report_drift() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    fleet.publish_example_with_profile(&hub, "demo", 2, 2);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agents = [
        TestAgent::enroll_program(previous_agent(), &hub.url(), &hub, &fleet, "site=lab", ""),
        TestAgent::enroll(&hub, &fleet, "site=lab", ""),
    ];
    for agent in &mut agents {
        agent.start();
    }
    for agent in &agents {
        agent.wait_status("active", json!("demo@1"));
    }

    // Each device reports the version it runs, and the hub lists them by it.
    let ids: Vec<String> = agents
        .iter()
        .map(|agent| agent.status()["device_id"].as_str().unwrap().to_owned())
        .collect();
    let devices: Vec<DeviceSummary> = hub.cli_json(&["device", "list"]);
    let version_of = |id: &str| {
        devices
            .iter()
            .find(|device| device.id == id)
            .unwrap()
            .agent_version
            .clone()
    };
    assert_eq!(version_of(&ids[0]), PREVIOUS);
    assert_eq!(version_of(&ids[1]), env!("CARGO_PKG_VERSION"));
    let older: Vec<DeviceSummary> = hub.cli_json(&["device", "list", "--agent", "<0.2"]);
    assert_eq!(
        older.iter().map(|device| &device.id).collect::<Vec<_>>(),
        [&ids[0]]
    );

    // One staged rollout takes both.
    let created = fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "50,100", "--bake", "1s"]);
    let done = wait_until(AGENT_WAIT, "the rollout to finish", || {
        let rollout = hub.rollout(created.sequence);
        (rollout.state != RolloutState::Active).then_some(rollout)
    });
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    let last = done.stages.last().unwrap();
    assert_eq!(
        (last.devices, last.succeeded, last.skipped),
        (2, 2, 0),
        "{done:#?}"
    );

    // Both serve it, and their telemetry and drift summaries reach the hub.
    let client = http();
    for agent in &agents {
        agent.wait_status("active", json!("demo@2"));
        for row in 0..ROWS {
            let x = row as f32 / ROWS as f32;
            let (code, body) = agent.infer(&client, [x, -x, 2.0 * x, 0.5]);
            assert_eq!(code, 200, "{body}");
            assert_eq!(body["model_version"], json!("2"), "{body}");
        }
    }
    for (agent, id) in agents.iter().zip(&ids) {
        wait_until(AGENT_WAIT, &format!("device {id}'s telemetry"), || {
            agent
                .hub_detail(&hub)
                .inferences
                .iter()
                .any(|counts| counts.model.version == 2 && counts.count == ROWS)
                .then_some(())
        });
        let report = wait_until(AGENT_WAIT, &format!("device {id}'s drift"), || {
            let report: DriftReport = hub.cli_json(&[
                "drift",
                "report",
                "--model",
                "demo",
                "--version",
                "2",
                "--device",
                id,
            ]);
            report
                .features
                .iter()
                .any(|feature| feature.name == "x0" && feature.n == ROWS)
                .then_some(report)
        });
        assert_eq!(report.device.as_deref(), Some(id.as_str()));
    }
}
