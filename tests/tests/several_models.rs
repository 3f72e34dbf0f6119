//! One agent serving several models side by side, each under rollouts of its own (issue 20): a
//! second model's rollout adds it beside the first, one model rolls back while the other serves
//! every request, and a model past the device's budget is refused, naming the budget, while the
//! others keep serving. A hub that stops answering about a model does not take it away, and an
//! agent of one model keeps its model when another model rolls out. A model leaves by its signed
//! retirement, which the hub cannot undo by replaying the model's older plan.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use outpost_hub::api::{DeviceEvent, RolloutState};
use outpost_protocol::device::{ModelAnswer, ModelsCheckInResponse};
use outpost_protocol::trust::{is_retirement, PlanBody, RetireBody, Signed};
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::device_sim::{Behaviour, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Proxy, Verdict};
use outpost_tests::wait_until;
use serde_json::{json, Value};

/// The active version of model `name` in the agent's status, as `name@version`.
fn active_of(status: &Value, name: &str) -> Option<String> {
    status["models"]
        .as_array()?
        .iter()
        .find(|model| model["name"] == json!(name))?["active"]
        .as_str()
        .map(str::to_owned)
}

fn wait_active(agent: &TestAgent, name: &str, want: &str) -> Value {
    wait_until(AGENT_WAIT, &format!("the agent to serve {want}"), || {
        let status = agent.status();
        (active_of(&status, name).as_deref() == Some(want)).then_some(status)
    })
}

/// Asks `model` for one row and returns the version that answered.
fn answered_by(agent: &TestAgent, model: &str) -> String {
    let (code, body) = agent.infer_row(&http(), model, &[0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 200, "{model}: {body}");
    assert_eq!(body["model_name"], json!(model), "{body}");
    body["model_version"].as_str().unwrap().to_owned()
}

/// Waits for the first refusal the device reported to the hub, described by `what`.
fn first_refusal(agent: &TestAgent, hub: &TestHub, what: &str) -> DeviceEvent {
    wait_until(AGENT_WAIT, what, || {
        agent
            .hub_detail(hub)
            .events
            .into_iter()
            .find(|event| event.kind == "refused")
    })
}

/// How many versions the agent holds on disk.
fn installed(agent: &TestAgent) -> usize {
    std::fs::read_dir(agent.data().join("versions"))
        .unwrap()
        .count()
}

/// Signs and uploads the retirement of `model` from every device, once its rollout `sequence`
/// completed (the hub refuses to retire a model while a rollout of it is under way).
fn retire(hub: &TestHub, fleet: &Fleet, model: &str, sequence: u64) {
    wait_until(
        AGENT_WAIT,
        &format!("rollout {sequence} to complete"),
        || (hub.rollout(sequence).state == RolloutState::Completed).then_some(()),
    );
    let root = fleet.root_path.to_string_lossy().into_owned();
    hub.cli(&[
        "rollout",
        "retire",
        "--model",
        model,
        "--root",
        &root,
        "--key",
        &fleet.keys,
    ])
    .ok();
}

/// Waits until the agent's status lists `model` with no active version: retired.
fn wait_retired(agent: &TestAgent, model: &str) -> Value {
    wait_until(AGENT_WAIT, &format!("the agent to retire {model}"), || {
        let status = agent.status();
        let retired = status["models"]
            .as_array()?
            .iter()
            .any(|entry| entry["name"] == json!(model) && entry["active"].is_null());
        retired.then_some(status)
    })
}

/// A hub with `detector@1` rolled out (plan 1) to one agent, which serves it.
fn agent_serving_detector(agent_options: &[(&str, &str, &str)]) -> (TestHub, Fleet, TestAgent) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "detector", 1, 1);
    fleet.publish_example(&hub, "spotter", 1, 2);
    fleet.first_rollout(&hub, "detector", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    for (section, key, value) in agent_options {
        agent.set_option(section, key, value);
    }
    agent.start();
    wait_active(&agent, "detector", "detector@1");
    (hub, fleet, agent)
}

#[test]
fn two_models_roll_out_independently_and_one_rolls_back_while_the_other_serves() {
    let (hub, fleet, agent) = agent_serving_detector(&[]);

    // The second model's first rollout adds it beside the first: nothing takes detector away.
    fleet.first_rollout(&hub, "spotter", 1);
    let status = wait_active(&agent, "spotter", "spotter@1");
    assert_eq!(
        active_of(&status, "detector").as_deref(),
        Some("detector@1"),
        "{status:#}"
    );
    assert_eq!(answered_by(&agent, "detector"), "1");
    assert_eq!(answered_by(&agent, "spotter"), "1");

    // Clients of detector send requests without a pause from here to the end.
    let stop = Arc::new(AtomicBool::new(false));
    let client = {
        let stop = stop.clone();
        let agent_url = agent.listen.clone();
        std::thread::spawn(move || {
            let http = http();
            let (mut served, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                let body = json!({"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32",
                    "data": [0.5, -1.0, 2.0, 0.0]}]});
                let outcome = http
                    .post(format!("http://{agent_url}/v2/models/detector/infer"))
                    .header("Content-Type", "application/json")
                    .send(body.to_string());
                match outcome {
                    Ok(response) if response.status().as_u16() == 200 => served += 1,
                    Ok(response) => failed.push(format!("status {}", response.status())),
                    Err(error) => failed.push(error.to_string()),
                }
            }
            (served, failed)
        })
    };

    // spotter moves to version 2 under a rollout of its own (plan 3), and commits it...
    fleet.publish_example(&hub, "spotter", 2, 3);
    let rollout = fleet.create_rollout(&hub, "spotter", 2, 1, &["--stages", "100", "--bake", "1h"]);
    wait_active(&agent, "spotter", "spotter@2");
    assert_eq!(answered_by(&agent, "spotter"), "2");
    // ...then the operator rolls it back, and the device returns to spotter@1.
    hub.cli(&["rollout", "rollback", &rollout.sequence.to_string()])
        .ok();
    let status = wait_active(&agent, "spotter", "spotter@1");
    assert_eq!(answered_by(&agent, "spotter"), "1");
    assert_eq!(
        hub.rollout(rollout.sequence).state,
        RolloutState::RolledBack
    );

    stop.store(true, Ordering::SeqCst);
    let (served, failed) = client.join().unwrap();
    assert!(failed.is_empty(), "detector failed requests: {failed:?}");
    assert!(served > 0, "no request reached detector");
    // detector never moved: same version, never a pending one, no event about it since.
    assert_eq!(
        active_of(&status, "detector").as_deref(),
        Some("detector@1"),
        "{status:#}"
    );
    let detail = agent.hub_detail(&hub);
    assert!(
        !detail.events.iter().any(|event| event
            .model
            .as_ref()
            .is_some_and(|model| model.name == "detector" && model.version != 1)),
        "{detail:#?}"
    );

    // Every model shows: the hub's device record, the agent's model index, its status.
    let running: Vec<String> = detail
        .device
        .running()
        .iter()
        .map(|model| format!("{}@{}", model.name, model.version))
        .collect();
    assert_eq!(running, ["detector@1", "spotter@1"], "{detail:#?}");
    let shown = hub.cli(&["device", "show", &detail.device.id]).ok();
    assert!(
        shown.stdout.contains("detector@1") && shown.stdout.contains("spotter@1"),
        "{}",
        shown.stdout
    );
    let mut index = http()
        .get(format!("http://{}/v2/models", agent.listen))
        .call()
        .unwrap();
    let index: Value = serde_json::from_str(&index.body_mut().read_to_string().unwrap()).unwrap();
    let names: Vec<&str> = index["models"]
        .as_array()
        .unwrap()
        .iter()
        .map(|model| model["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["detector", "spotter"], "{index:#}");
    let human = agent.status_text();
    assert!(
        human.contains("model detector") && human.contains("model spotter"),
        "{human}"
    );
}

#[test]
fn a_model_past_the_device_budget_is_refused_and_the_others_keep_serving() {
    let (hub, fleet, agent) = agent_serving_detector(&[("models", "max_models", "1")]);

    fleet.first_rollout(&hub, "spotter", 1);
    let refused = first_refusal(&agent, &hub, "the device to refuse spotter@1");
    assert!(
        refused.detail.contains("models.max_models of 1"),
        "{refused:#?}"
    );
    assert_eq!(
        refused.model.as_ref().map(|model| model.name.as_str()),
        Some("spotter")
    );
    // Nothing changed: detector serves, spotter was never downloaded, and asking for it says
    // which models this agent serves.
    assert_eq!(answered_by(&agent, "detector"), "1");
    let (code, body) = agent.infer_row(&http(), "spotter", &[0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 404, "{body}");
    assert!(body.to_string().contains("detector"), "{body}");
    assert_eq!(installed(&agent), 1, "only detector@1 is installed");
    let status = agent.status();
    assert_eq!(active_of(&status, "spotter"), None, "{status:#}");
}

/// An agent of one model (the simulated device checks in as agents did before several models,
/// on `/device/v1/checkin`) keeps its model when another model rolls out: the hub does not offer
/// it the other model, and that rollout counts it as skipped and completes, while a real agent
/// beside it adds the model to the one it serves.
#[test]
fn an_agent_of_one_model_keeps_it_and_is_skipped_by_another_models_rollout() {
    let (hub, fleet, agent) = agent_serving_detector(&[]);
    let token = hub.enroll_token("site=lab", 1);
    let mut older = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    let offer = older.step(Behaviour::Commit).unwrap();
    assert_eq!(offer.manifest.name().as_str(), "detector");

    fleet.first_rollout(&hub, "spotter", 1);
    wait_active(&agent, "spotter", "spotter@1");
    let done = wait_until(AGENT_WAIT, "the spotter rollout to finish", || {
        // The older device keeps checking in, and is offered detector's plan only.
        let offer = older.step(Behaviour::Commit).unwrap();
        assert_eq!(offer.manifest.name().as_str(), "detector");
        let rollout = hub.rollout(2);
        (rollout.state != RolloutState::Active).then_some(rollout)
    });
    assert_eq!(done.state, RolloutState::Completed, "{done:#?}");
    let stage = &done.stages[0];
    assert_eq!(
        (stage.devices, stage.succeeded, stage.skipped, stage.pending),
        (2, 1, 1, 0),
        "{done:#?}"
    );
    assert_eq!(
        older.active.as_ref().map(|model| model.name.as_str()),
        Some("detector")
    );
}

/// A hub that stops answering about a model cannot take it off a device: only a signed plan of
/// that model could, and the hub has none that says so. The proxy drops every answer about
/// `detector` from the hub's check-in answers; the agent keeps serving it.
#[test]
fn a_hub_that_stops_answering_about_a_model_does_not_take_it_away() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "detector", 1, 1);
    fleet.publish_example(&hub, "spotter", 1, 2);
    fleet.first_rollout(&hub, "detector", 1);
    fleet.first_rollout(&hub, "spotter", 1);
    let proxy = Proxy::start(&hub.url());
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "site=lab", "");
    agent.start();
    wait_active(&agent, "detector", "detector@1");
    wait_active(&agent, "spotter", "spotter@1");

    let silenced = Arc::new(AtomicUsize::new(0));
    {
        let silenced = silenced.clone();
        proxy.set_hook(move |request, mut response| {
            if request.path == "/device/v3/checkin" && response.status == 200 {
                let mut answer: ModelsCheckInResponse =
                    outpost_protocol::decode(&response.body).unwrap();
                let before = answer.models.len();
                answer.models.retain(|model| match model {
                    ModelAnswer::Unchanged { name } => name != "detector",
                    ModelAnswer::Full { plan, .. } => {
                        outpost_protocol::decode::<Signed<PlanBody>>(plan)
                            .unwrap()
                            .decode_unverified()
                            .unwrap()
                            .target
                            .name
                            != "detector"
                    }
                });
                if answer.models.len() < before {
                    response.body = outpost_protocol::encode(&answer).unwrap();
                    silenced.fetch_add(1, Ordering::SeqCst);
                }
            }
            Verdict::Forward(response)
        });
    }
    // Three check-ins answered about spotter alone, and a status written after the last.
    wait_until(AGENT_WAIT, "three check-ins without detector", || {
        (silenced.load(Ordering::SeqCst) >= 3).then_some(())
    });
    let status = agent.next_status();
    assert_eq!(
        active_of(&status, "detector").as_deref(),
        Some("detector@1"),
        "{status:#}"
    );
    assert_eq!(answered_by(&agent, "detector"), "1");
    assert_eq!(answered_by(&agent, "spotter"), "1");
}

/// A model leaves a device by its signed retirement: the agent stops serving it and removes its
/// versions while the other model serves every request, the hub can no longer bring it back with
/// the model's older plans (the retirement is above them), and a later rollout of the model does.
#[test]
fn a_retired_model_leaves_the_device_and_only_a_later_rollout_brings_it_back() {
    let (hub, fleet, agent) = agent_serving_detector(&[]);
    fleet.first_rollout(&hub, "spotter", 1);
    wait_active(&agent, "spotter", "spotter@1");
    assert_eq!(installed(&agent), 2);

    retire(&hub, &fleet, "spotter", 2);
    let status = wait_retired(&agent, "spotter");
    assert_eq!(
        active_of(&status, "detector").as_deref(),
        Some("detector@1"),
        "{status:#}"
    );
    assert_eq!(answered_by(&agent, "detector"), "1");
    let (code, body) = agent.infer_row(&http(), "spotter", &[0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 404, "{body}");
    assert_eq!(installed(&agent), 1, "spotter's version is removed");
    let detail = wait_until(AGENT_WAIT, "the hub to see spotter gone", || {
        let detail = agent.hub_detail(&hub);
        (detail.device.running().len() == 1).then_some(detail)
    });
    assert_eq!(detail.device.running()[0].name, "detector");

    // A later rollout of the model brings it back.
    fleet.publish_example(&hub, "spotter", 2, 3);
    fleet.first_rollout(&hub, "spotter", 2);
    wait_active(&agent, "spotter", "spotter@2");
    assert_eq!(answered_by(&agent, "spotter"), "2");
    assert_eq!(answered_by(&agent, "detector"), "1");
}

/// The model's name in a check-in answer about it, and whether it is a retirement.
fn about(answer: &ModelAnswer) -> (String, bool) {
    match answer {
        ModelAnswer::Unchanged { name } => (name.clone(), false),
        ModelAnswer::Full { plan, .. } if is_retirement(plan) => (
            outpost_protocol::decode::<Signed<RetireBody>>(plan)
                .unwrap()
                .decode_unverified()
                .unwrap()
                .model,
            true,
        ),
        ModelAnswer::Full { plan, .. } => (
            outpost_protocol::decode::<Signed<PlanBody>>(plan)
                .unwrap()
                .decode_unverified()
                .unwrap()
                .target
                .name,
            false,
        ),
    }
}

/// A hub cannot bring a retired model back by sending its older plan again: the retirement
/// raised that model's plan floor, so the agent refuses the plan, reports why, and downloads
/// nothing.
#[test]
fn a_hub_cannot_bring_a_retired_model_back_with_its_older_plan() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "detector", 1, 1);
    fleet.publish_example(&hub, "spotter", 1, 2);
    fleet.first_rollout(&hub, "detector", 1);
    fleet.first_rollout(&hub, "spotter", 1);
    let proxy = Proxy::start(&hub.url());
    // The last full answer about spotter's plan, kept to be replayed.
    let kept: Arc<Mutex<Option<ModelAnswer>>> = Arc::default();
    {
        let kept = kept.clone();
        proxy.set_hook(move |request, response| {
            if request.path == "/device/v3/checkin" && response.status == 200 {
                let answer: ModelsCheckInResponse =
                    outpost_protocol::decode(&response.body).unwrap();
                for model in answer.models {
                    if matches!(model, ModelAnswer::Full { .. })
                        && about(&model) == ("spotter".to_owned(), false)
                    {
                        *kept.lock().unwrap() = Some(model);
                    }
                }
            }
            Verdict::Forward(response)
        });
    }
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "site=lab", "");
    agent.start();
    wait_active(&agent, "detector", "detector@1");
    wait_active(&agent, "spotter", "spotter@1");
    retire(&hub, &fleet, "spotter", 2);
    wait_retired(&agent, "spotter");

    // From now on the hub answers about spotter with its older plan, in full.
    let replay = kept
        .lock()
        .unwrap()
        .clone()
        .expect("spotter's plan was answered");
    proxy.set_hook(move |request, mut response| {
        if request.path == "/device/v3/checkin" && response.status == 200 {
            let mut answer: ModelsCheckInResponse =
                outpost_protocol::decode(&response.body).unwrap();
            answer.models.retain(|model| about(model).0 != "spotter");
            answer.models.push(replay.clone());
            response.body = outpost_protocol::encode(&answer).unwrap();
        }
        Verdict::Forward(response)
    });
    let refusal = first_refusal(&agent, &hub, "the older plan to be refused");
    assert!(
        refusal
            .detail
            .contains("plan sequence 2 is below sequence 3"),
        "{refusal:#?}"
    );
    let status = agent.next_status();
    assert_eq!(active_of(&status, "spotter"), None, "{status:#}");
    assert_eq!(answered_by(&agent, "detector"), "1");
    assert_eq!(installed(&agent), 1, "spotter is not downloaded again");
}

/// The memory budget: a device whose `[models] max_memory` is below a model's file refuses it,
/// naming the budget and the figures, and downloads nothing.
#[test]
fn a_model_past_the_memory_budget_is_refused_naming_it() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "detector", 1, 1);
    fleet.first_rollout(&hub, "detector", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.set_option("models", "max_memory", "\"64\"");
    agent.start();
    let refused = first_refusal(&agent, &hub, "the device to refuse detector@1");
    assert!(
        refused
            .detail
            .contains("over this device's models.max_memory of 64"),
        "{refused:#?}"
    );
    let status = agent.next_status();
    assert_eq!(active_of(&status, "detector"), None, "{status:#}");
    assert_eq!(installed(&agent), 0, "nothing is downloaded");
}
