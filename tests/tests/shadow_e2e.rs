//! Shadow stages end to end: simulated devices over real HTTP, whose shadow reports the hub
//! checks, stores once and turns into a gate that holds, promotes and pauses; and real agents
//! that run a target in shadow beside the model they serve, promote one that agrees and roll back
//! one that does not, while every request is answered by the active model.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_hub::api::{Decision, GateFigure, RolloutInfo, RolloutState};
use outpost_model::example::normal_rows;
use outpost_protocol::device::{
    AgentState, InferenceWindow, ShadowCounts, ShadowReport, Status, TelemetryAck,
};
use outpost_protocol::trust::{ManifestRef, Slot};
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::device_sim::{unix_now, Behaviour, Reply, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;
use serde_json::json;

/// How long the engine gets to act on what it was sent.
const ENGINE_WAIT: Duration = Duration::from_secs(30);

/// `--shadow-*` flags for a shadow stage over the whole fleet.
fn shadow_flags<'a>(min_comparisons: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut flags = vec![
        "--shadow-pct",
        "100",
        "--shadow-min-comparisons",
        min_comparisons,
        "--shadow-min-top1-agreement",
        "0.9",
        "--shadow-max-mean-abs-diff",
        "0.05",
        "--stages",
        "50,100",
        "--bake",
        "1s",
        "--device-timeout",
        "1h",
        "--max-p95-regression-pct",
        "100000",
    ];
    flags.extend_from_slice(extra);
    flags
}

/// A shadow window beside demo@1: `compared` comparisons of `target`, `agreed` of them agreeing,
/// each of three values differing by `diff`.
fn shadow_window(target: &ManifestRef, compared: u64, agreed: u64, diff: f64) -> InferenceWindow {
    let start = unix_now() / 3600 * 3600;
    InferenceWindow {
        model: "demo".to_owned(),
        version: 1,
        start,
        end: start + 3600,
        count: 0,
        errors: 0,
        latency_buckets: Vec::new(),
        drift: None,
        shadow: Some(ShadowReport {
            target: target.clone(),
            counts: ShadowCounts {
                compared,
                top1_agreed: agreed,
                errors: 0,
                abs_diff_sum: diff * (compared * 3) as f64,
                abs_diff_values: compared * 3,
                dropped: 0,
            },
        }),
    }
}

fn send(device: &SimDevice, sequence: u64, windows: Vec<InferenceWindow>) -> Reply {
    device.send_telemetry(sequence, windows)
}

/// Checks in; asserts the hub hands over the fallback to serve and the target to shadow, both of
/// which verify under the plan; reports shadowing. Returns the target's reference.
fn start_shadowing(device: &mut SimDevice) -> ManifestRef {
    let response = device.check_in(AgentState::Steady);
    let offer = device.verify_offer(&response).unwrap();
    assert_eq!(offer.slot, Slot::Fallback);
    let reference = device
        .verify_shadow(&response)
        .expect("a shadow manifest")
        .reference();
    assert_eq!(
        reference.manifest_sha256,
        offer.plan.body().target.manifest_sha256
    );
    device.report(
        Some(offer.plan.sequence()),
        Some(reference.clone()),
        Status::Shadowing,
    );
    reference
}

fn figure<'a>(figures: &'a [GateFigure], gate: &str) -> &'a GateFigure {
    figures
        .iter()
        .find(|figure| figure.gate == gate)
        .unwrap_or_else(|| panic!("no figure {gate} in {figures:#?}"))
}

fn decision<'a>(rollout: &'a RolloutInfo, action: &str) -> &'a Decision {
    rollout
        .decisions
        .iter()
        .find(|decision| decision.action == action)
        .unwrap_or_else(|| panic!("no {action} decision in {rollout:#?}"))
}

#[test]
fn the_shadow_gate_holds_promotes_and_pauses_over_http() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    for version in 1..=3 {
        fleet.publish_example(&hub, "demo", version, version);
    }
    fleet.first_rollout(&hub, "demo", 1);
    let token = hub.enroll_token("site=lab", 4);
    let mut devices: Vec<SimDevice> = (0..4)
        .map(|_| SimDevice::enroll(&hub.url(), &token, &[], &fleet.root))
        .collect();
    for device in &mut devices {
        device.step(Behaviour::Commit).unwrap();
    }

    let created = fleet.create_rollout(&hub, "demo", 2, 1, &shadow_flags("200", &[]));
    assert_eq!(created.stage_index, 0);
    assert!(created.stages[0].shadow, "{created:#?}");
    let text = hub
        .cli(&["rollout", "status", &created.sequence.to_string()])
        .ok()
        .stdout;
    assert!(text.contains("1/3 (shadow 100%)"), "{text}");
    assert!(text.contains("shadow_top1_agreement"), "{text}");

    let target = devices.iter_mut().map(start_shadowing).last().unwrap();
    assert_eq!(target.version, 2);

    // Too few comparisons: the stage holds however long it has baked.
    for device in &devices {
        let ack: TelemetryAck = send(device, 1, vec![shadow_window(&target, 25, 25, 0.0)]).decode();
        assert!(!ack.duplicate);
        // A resent batch is stored once.
        let ack: TelemetryAck = send(device, 1, vec![shadow_window(&target, 25, 25, 0.0)]).decode();
        assert!(ack.duplicate);
    }
    std::thread::sleep(Duration::from_secs(2));
    let holding = hub.rollout(created.sequence);
    assert_eq!(
        (holding.state, holding.stage_index),
        (RolloutState::Active, 0)
    );
    assert_eq!(holding.stages[0].succeeded, 4, "{holding:#?}");
    let agreement = figure(&holding.gates, "shadow_top1_agreement");
    assert_eq!(agreement.value, None);
    assert_eq!(
        agreement.detail,
        "100 of 200 comparisons needed yet, on 4 devices"
    );

    // Hostile reports are refused whole and change nothing.
    let mut lying = shadow_window(&target, 10, 11, 0.0);
    let reply = send(
        &devices[0],
        2,
        vec![shadow_window(&target, 50, 50, 0.0), lying.clone()],
    );
    reply.refused(400, "window 1 (demo@1 from");
    reply.refused(400, "shadow report: 11 top-1 agreements in 10 comparisons");
    lying.shadow.as_mut().unwrap().counts.top1_agreed = 5;
    lying.shadow.as_mut().unwrap().counts.abs_diff_sum = f64::NAN;
    send(&devices[0], 2, vec![lying]).refused(400, "is not a finite non-negative number");
    let unchanged = hub.rollout(created.sequence);
    assert_eq!(
        figure(&unchanged.gates, "shadow_top1_agreement").detail,
        agreement.detail
    );

    // Enough comparisons, agreeing well enough: the rollout leaves its shadow stage.
    for device in &devices {
        let ack: TelemetryAck =
            send(device, 3, vec![shadow_window(&target, 30, 28, 0.01)]).decode();
        assert!(!ack.duplicate);
    }
    let promoted = wait_until(ENGINE_WAIT, "the shadow stage to be left", || {
        let rollout = hub.rollout(created.sequence);
        (rollout.stage_index == 1).then_some(rollout)
    });
    let advance = decision(&promoted, "advance");
    assert_eq!(advance.by, "engine");
    assert_eq!(advance.stage_index, 0);
    assert!(
        advance.reason.starts_with("shadow stage 100% baked"),
        "{advance:#?}"
    );
    let agreement = figure(&advance.figures, "shadow_top1_agreement");
    assert_eq!(agreement.value, Some(212.0 / 220.0));
    assert!(!agreement.breached);
    assert!(
        agreement
            .detail
            .starts_with("212 agreed of 220 comparisons"),
        "{agreement:#?}"
    );
    let diff = figure(&advance.figures, "shadow_mean_abs_diff");
    let expected = 0.01 * 360.0 / 660.0;
    assert!((diff.value.unwrap() - expected).abs() < 1e-12, "{diff:#?}");
    // No device shadows once the stage is over. Check-ins see the advance once the hub has
    // flushed it and reloaded its rollout cache, a moment after `rollout status` shows it.
    wait_until(ENGINE_WAIT, "check-ins without the shadow model", || {
        devices[0]
            .check_in(AgentState::Steady)
            .shadow
            .is_none()
            .then_some(())
    });

    // A target that disagrees: the next plan's shadow stage pauses the rollout, once every
    // device has reported (160 comparisons: the engine may evaluate between any two reports, and
    // three devices' 120 must not be enough to decide on).
    let breached = fleet.create_rollout(
        &hub,
        "demo",
        3,
        1,
        &shadow_flags("160", &["--on-breach", "pause"]),
    );
    let target = devices.iter_mut().map(start_shadowing).last().unwrap();
    assert_eq!(target.version, 3);
    for device in &devices {
        let ack: TelemetryAck = send(device, 4, vec![shadow_window(&target, 40, 20, 0.3)]).decode();
        assert!(!ack.duplicate);
    }
    let paused = wait_until(ENGINE_WAIT, "the shadow gate to pause the rollout", || {
        let rollout = hub.rollout(breached.sequence);
        (rollout.state == RolloutState::Paused).then_some(rollout)
    });
    assert_eq!(paused.stage_index, 0);
    let pause = decision(&paused, "pause");
    assert!(
        pause
            .reason
            .contains("shadow_top1_agreement 0.5 under limit 0.9 (80 agreed of 160 comparisons"),
        "{pause:#?}"
    );
    assert!(
        pause
            .reason
            .contains("shadow_mean_abs_diff 0.3 over limit 0.05"),
        "{pause:#?}"
    );
    assert!(figure(&pause.figures, "shadow_top1_agreement").breached);
    // A paused shadow stage still shadows: nothing is served by the target, and the figures
    // keep coming for the operator.
    assert!(devices[0].check_in(AgentState::Steady).shadow.is_some());
    let text = hub
        .cli(&["rollout", "status", &breached.sequence.to_string()])
        .ok()
        .stdout;
    assert!(text.contains("BREACHED"), "{text}");
    assert!(
        text.contains("shadow_top1_agreement 0.5 (limit 0.9, breached)"),
        "{text}"
    );
}

/// Sends `rows` standard normal rows to the agent; returns the versions that answered, in order.
fn feed(agent: &TestAgent, rows: usize, seed: u64) -> Vec<String> {
    let client = http();
    normal_rows(4, rows, seed, 0.0)
        .chunks(4)
        .map(|row| {
            let (status, body) = agent.infer(&client, [row[0], row[1], row[2], row[3]]);
            assert_eq!(status, 200, "{body}");
            body["model_version"].as_str().unwrap().to_owned()
        })
        .collect()
}

/// Feeds both agents until `decided` holds for the rollout, at most [`AGENT_WAIT`]. Every answer
/// must come from version `serving` until then: the shadow model never answers.
fn feed_until(
    hub: &TestHub,
    agents: &[TestAgent],
    sequence: u64,
    serving: u64,
    decided: &dyn Fn(&RolloutInfo) -> bool,
) -> RolloutInfo {
    let mut seed = 100;
    wait_until(AGENT_WAIT, "the shadow gate to decide", || {
        let mut others = Vec::new();
        for agent in agents {
            seed += 1;
            let versions = feed(agent, 10, seed);
            others.extend(versions.into_iter().filter(|v| *v != serving.to_string()));
        }
        let rollout = hub.rollout(sequence);
        // Another version may answer only once the rollout has moved on (a device then
        // activates the target).
        assert!(
            others.is_empty() || decided(&rollout),
            "answered by {others:?} while the rollout was {rollout:#?}"
        );
        decided(&rollout).then_some(rollout)
    })
}

/// A shadow stage over both agents that 40 comparisons decide, strict enough that only the very
/// same weights pass, followed by one stage of 100%; a breach rolls back.
const AGENT_ROLLOUT: &[&str] = &[
    "--shadow-pct",
    "100",
    "--shadow-min-comparisons",
    "40",
    "--shadow-min-top1-agreement",
    "0.95",
    "--shadow-max-mean-abs-diff",
    "0.001",
    "--stages",
    "100",
    "--bake",
    "1s",
    "--device-timeout",
    "1h",
    "--max-p95-regression-pct",
    "100000",
    "--on-breach",
    "rollback",
];

#[test]
fn real_agents_promote_a_target_that_agrees_and_roll_back_one_that_does_not() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    // Version 2 has version 1's weights, so it agrees exactly; version 3 has other weights.
    fleet.publish_example(&hub, "demo", 2, 1);
    fleet.publish_example(&hub, "demo", 3, 2);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agents: Vec<TestAgent> = (0..2)
        .map(|_| TestAgent::enroll(&hub, &fleet, "site=lab", ""))
        .collect();
    for agent in &mut agents {
        agent.start();
    }
    for agent in &agents {
        agent.wait_status("active", json!("demo@1"));
    }

    let agreeing = fleet.create_rollout(&hub, "demo", 2, 1, AGENT_ROLLOUT);
    for agent in &agents {
        agent.wait_status("shadow", json!("demo@2"));
        assert_eq!(agent.status()["active"], json!("demo@1"));
    }
    let promoted = feed_until(&hub, &agents, agreeing.sequence, 1, &|rollout| {
        rollout.stage_index == 1
    });
    let advance = decision(&promoted, "advance");
    let agreement = figure(&advance.figures, "shadow_top1_agreement");
    assert_eq!(agreement.value, Some(1.0), "{advance:#?}");
    let diff = figure(&advance.figures, "shadow_mean_abs_diff");
    assert!(diff.value.unwrap() < 1e-6, "{advance:#?}");
    for agent in &agents {
        agent.wait_status("active", json!("demo@2"));
        agent.wait_status("shadow", json!(null));
    }
    wait_until(ENGINE_WAIT, "the agreeing rollout to complete", || {
        (hub.rollout(agreeing.sequence).state == RolloutState::Completed).then_some(())
    });

    let disagreeing = fleet.create_rollout(&hub, "demo", 3, 2, AGENT_ROLLOUT);
    for agent in &agents {
        agent.wait_status("shadow", json!("demo@3"));
    }
    let rolled_back = feed_until(&hub, &agents, disagreeing.sequence, 2, &|rollout| {
        rollout.state == RolloutState::RolledBack
    });
    let rollback = decision(&rolled_back, "rollback");
    assert_eq!(rollback.by, "engine");
    assert_eq!(rollback.stage_index, 0);
    let diff = figure(&rollback.figures, "shadow_mean_abs_diff");
    assert!(diff.breached, "{rollback:#?}");
    assert!(diff.value.unwrap() > 0.001, "{rollback:#?}");
    assert!(
        rollback.reason.contains("shadow_mean_abs_diff"),
        "{rollback:#?}"
    );
    // The gate may have enough comparisons from one agent before the other's first batch lands,
    // so the figure names however many devices it counted, never none.
    let comparisons = figure(&rollback.figures, "shadow_top1_agreement");
    assert!(
        ["on 1 devices", "on 2 devices"]
            .iter()
            .any(|devices| comparisons.detail.contains(devices)),
        "{comparisons:#?}"
    );
    // The shadow model is gone, and version 2 served every request throughout and still does.
    for agent in &agents {
        agent.wait_status("shadow", json!(null));
        assert_eq!(agent.status()["active"], json!("demo@2"));
        assert_eq!(feed(agent, 5, 7), vec!["2"; 5]);
    }
}

/// Issue 21, finding 4: a shadow model that kills the agent (the kernel's OOM killer, an abort
/// in the runtime) must not hold it in a crash loop. The agent is killed with SIGKILL twice while
/// demo@2 runs in shadow, as a model that grows without bound would have it killed; after the
/// second time it reports demo@2 failed and never runs it in shadow again, while demo@1 serves.
#[test]
fn a_shadow_model_that_kills_the_agent_twice_in_a_row_fails_there() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.start();
    agent.wait_status("active", json!("demo@1"));

    let rollout = fleet.create_rollout(&hub, "demo", 2, 1, AGENT_ROLLOUT);
    agent.wait_status("shadow", json!("demo@2"));
    agent.kill9();
    // One unclean end may be a power cut: demo@2 is tried in shadow again.
    agent.start();
    agent.wait_fresh_status("shadow", json!("demo@2"));
    assert!(
        agent
            .log()
            .contains("ended uncleanly while running demo@2 in shadow"),
        "{}",
        agent.log()
    );
    agent.kill9();
    agent.start();

    let failed = wait_until(AGENT_WAIT, "the agent to report demo@2 failed", || {
        agent.hub_detail(&hub).events.into_iter().find(|event| {
            event.kind == "failed" && event.model.as_ref().map(|model| model.version) == Some(2)
        })
    });
    assert_eq!(failed.plan_sequence, Some(rollout.sequence));
    assert!(
        failed.detail.contains("uncleanly 2 times in a row"),
        "{failed:#?}"
    );
    // Two whole cycles later it still runs nothing in shadow, and demo@1 answers.
    for _ in 0..2 {
        let status = agent.next_status();
        assert_eq!(status["shadow"], json!(null), "{status:#}");
        assert_eq!(status["active"], json!("demo@1"), "{status:#}");
    }
    assert_eq!(
        agent
            .log()
            .matches("running demo@2 in shadow (plan")
            .count(),
        2,
        "{}",
        agent.log()
    );
    let (code, answer) = agent.infer(&http(), [0.1, 0.2, 0.3, 0.4]);
    assert_eq!(code, 200, "{answer}");
    assert_eq!(answer["model_version"], json!("1"), "{answer}");
}
