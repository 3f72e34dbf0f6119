//! Check-ins that cost little (issue 7's bandwidth goal), through real HTTP: the hub leaves the
//! signed plan and manifests out of its answer when the device names them as held, sends them
//! again as soon as they change, and tells a device to come back soon only while a rollout that
//! applies to it is under way. A real agent applies what it holds at every check-in, so a held
//! plan that expires is refused just as one sent again would be.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::{Arc, Mutex};

use outpost_hub::api::RolloutState;
use outpost_protocol::device::{
    AgentState, CheckInResponse, HeldCheckInResponse, ModelAnswer, ModelsCheckInResponse,
};
use outpost_protocol::trust::{PlanBody, Signed, Slot};
use outpost_tests::agent::{TestAgent, AGENT_WAIT};
use outpost_tests::device_sim::{Behaviour, Reply, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Proxy, Response, Verdict};
use outpost_tests::wait_until;
use serde_json::json;

/// The hub's intervals in these tests: outside a rollout, and in one.
const QUIET_SECS: u32 = 7;
const ROLLOUT_SECS: u32 = 2;

fn full(reply: &Reply) -> CheckInResponse {
    match reply.decode::<HeldCheckInResponse>() {
        HeldCheckInResponse::Full(response) => response,
        unchanged => panic!("expected a full answer, got {unchanged:?}"),
    }
}

#[test]
fn a_device_holding_the_current_documents_gets_them_again_only_when_they_change() {
    let hub = TestHub::start_polling(QUIET_SECS, ROLLOUT_SECS);
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    let token = hub.enroll_token("", 1);
    let mut device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);

    // No rollout: nothing to hold, and the quiet interval.
    let idle = full(&device.held_check_in(AgentState::Steady, None));
    assert_eq!(idle.plan, None);
    assert_eq!(idle.held_digest(), None);
    assert_eq!(idle.poll_after_secs, QUIET_SECS);

    // A rollout reaches the device: the full documents, and the short interval.
    fleet.first_rollout(&hub, "demo", 1);
    let first_reply = device.held_check_in(AgentState::Steady, None);
    let first = full(&first_reply);
    assert_eq!(first.poll_after_secs, ROLLOUT_SECS);
    let offer = device
        .verify_offer(&first)
        .expect("the rollout offers demo@1");
    assert_eq!(
        (offer.slot, offer.manifest.body().version),
        (Slot::Target, 1)
    );
    let held = first.held_digest().expect("the answer carries a plan");

    // Holding them, the device gets neither plan nor manifest, only the hub's time and interval.
    let unchanged_reply = device.held_check_in(AgentState::Steady, Some(held));
    match unchanged_reply.decode::<HeldCheckInResponse>() {
        HeldCheckInResponse::Unchanged {
            hub_time,
            poll_after_secs,
        } => {
            assert!(hub_time >= first.hub_time);
            assert_eq!(poll_after_secs, ROLLOUT_SECS);
        }
        answer => panic!("expected an unchanged answer, got {answer:?}"),
    }
    assert!(
        first_reply.body.len() > 500 && unchanged_reply.body.len() < 16,
        "full answer {} bytes, unchanged {} bytes",
        first_reply.body.len(),
        unchanged_reply.body.len()
    );
    // Holding something else (another slot, say), it gets the documents again.
    let other = outpost_protocol::device::held_digest(
        &outpost_protocol::sha256(first.plan.as_ref().unwrap()),
        None,
        None,
    );
    let again = full(&device.held_check_in(AgentState::Steady, Some(other)));
    assert_eq!(
        (again.plan, again.manifest),
        (first.plan.clone(), first.manifest.clone())
    );
    // An older agent's plain check-in still gets everything, at the same interval.
    let plain = device.check_in(AgentState::Steady);
    assert_eq!(
        (plain.plan, plain.manifest),
        (first.plan.clone(), first.manifest.clone())
    );
    assert_eq!(plain.poll_after_secs, ROLLOUT_SECS);

    // The device commits, the rollout completes: the same documents, now at the quiet interval.
    // Check-ins see the completion once the hub has flushed it and reloaded its rollout cache, a
    // moment after `rollout status` shows it.
    device.step(Behaviour::Commit);
    let sequence = offer.plan.sequence();
    wait_until(AGENT_WAIT, "the first rollout to complete", || {
        (hub.rollout(sequence).state == RolloutState::Completed).then_some(())
    });
    wait_until(
        AGENT_WAIT,
        "check-ins to ask for the quiet interval",
        || match device
            .held_check_in(AgentState::Steady, Some(held))
            .decode::<HeldCheckInResponse>()
        {
            HeldCheckInResponse::Unchanged {
                poll_after_secs, ..
            } => (poll_after_secs == QUIET_SECS).then_some(()),
            answer => panic!("expected an unchanged answer, got {answer:?}"),
        },
    );

    // A new plan: the device still names the old documents and gets the new ones in full.
    fleet.publish_example(&hub, "demo", 2, 2);
    let second = fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1h"]);
    let switched = full(&device.held_check_in(AgentState::Steady, Some(held)));
    assert_eq!(switched.poll_after_secs, ROLLOUT_SECS);
    let offer = device
        .verify_offer(&switched)
        .expect("the new rollout offers demo@2");
    assert_eq!(offer.plan.sequence(), second.sequence);
    assert_eq!(
        (offer.slot, offer.manifest.body().version),
        (Slot::Target, 2)
    );
    assert_ne!(switched.held_digest(), Some(held));
}

/// Whether the hub answered every model unchanged (and there was one at least): it sent no
/// document.
fn unchanged(answer: &ModelsCheckInResponse) -> bool {
    !answer.models.is_empty()
        && answer
            .models
            .iter()
            .all(|model| matches!(model, ModelAnswer::Unchanged { .. }))
}

#[test]
fn an_expired_plan_the_agent_holds_is_refused_as_if_the_hub_had_sent_it_again() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    let proxy = Proxy::start(&hub.url());
    // Every check-in answer, in order: unchanged, or full with or without a plan. Once
    // `hub_clock` is set, unchanged answers carry it as the hub's time.
    let answers: Arc<Mutex<Vec<ModelsCheckInResponse>>> = Arc::default();
    let hub_clock: Arc<Mutex<Option<u64>>> = Arc::default();
    {
        let (answers, hub_clock) = (answers.clone(), hub_clock.clone());
        proxy.set_hook(move |request, mut response| {
            if request.path == "/device/v3/checkin" && response.status == 200 {
                let mut answer: ModelsCheckInResponse =
                    outpost_protocol::decode(&response.body).unwrap();
                if let (true, Some(late)) = (unchanged(&answer), *hub_clock.lock().unwrap()) {
                    answer.hub_time = late;
                    response.body = outpost_protocol::encode(&answer).unwrap();
                }
                answers.lock().unwrap().push(answer);
            }
            Verdict::Forward(response)
        });
    }
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "site=lab", "");
    agent.start();
    fleet.first_rollout_with(&hub, "demo", 1, &["--expires", "1h"]);
    agent.wait_status("active", json!("demo@1"));

    // The plan expires while the agent holds it. Rather than the test waiting out a plan short
    // enough to expire soon (and racing the agent's activation against its expiry), the hub's
    // clock moves past the expiry: the agent judges what it holds against the hub's time too.
    let expires = {
        let answers = answers.lock().unwrap();
        let plan = answers
            .iter()
            .flat_map(|answer| &answer.models)
            .find_map(|answer| match answer {
                ModelAnswer::Full { plan, .. } => Some(plan.clone()),
                ModelAnswer::Unchanged { .. } => None,
            })
            .expect("a check-in answer carried the plan");
        outpost_protocol::decode::<Signed<PlanBody>>(&plan)
            .unwrap()
            .decode_unverified()
            .unwrap()
            .expires
    };
    *hub_clock.lock().unwrap() = Some(expires + 1);
    let refusal = wait_until(AGENT_WAIT, "the expired plan to be refused", || {
        agent
            .hub_detail(&hub)
            .events
            .into_iter()
            .find(|event| event.kind == "refused")
    });
    assert!(
        refusal.detail.starts_with("plan: ")
            && refusal
                .detail
                .ends_with(&format!("expired at {expires}, now is {}", expires + 1)),
        "{}",
        refusal.detail
    );
    assert_eq!(agent.next_status()["active"], json!("demo@1"));
    // The hub sent the plan once; the agent refused it when it only held it.
    let answers = answers.lock().unwrap();
    let with_plan = answers
        .iter()
        .filter(|answer| {
            answer
                .models
                .iter()
                .any(|model| matches!(model, ModelAnswer::Full { .. }))
        })
        .count();
    let unchanged = answers.iter().filter(|answer| unchanged(answer)).count();
    assert_eq!(with_plan, 1, "{answers:?}");
    assert!(unchanged > 0, "{answers:?}");
}

/// What the hub asks agents to wait in the next test: the most `serve` allows, far longer than
/// any test waits.
const ASKED_SECS: u32 = 300;

/// The hub here is older than check-ins of several models (the proxy answers them 404), so this
/// also shows the agent falling back to held check-ins about its one model.
#[test]
fn the_agent_waits_the_shorter_of_the_hubs_interval_and_its_own_poll_interval() {
    // The hub asks for five minutes; the device's configuration caps the wait at a second.
    let hub = TestHub::start_polling(ASKED_SECS, ASKED_SECS);
    let fleet = Fleet::new(&hub);
    let proxy = Proxy::start(&hub.url());
    let check_ins: Arc<Mutex<Vec<u32>>> = Arc::default();
    {
        let check_ins = check_ins.clone();
        proxy.set_hook(move |request, response| {
            // A hub older than check-ins of several models: the agent falls back to held ones.
            if request.path == "/device/v3/checkin" {
                return Verdict::Forward(Response {
                    status: 404,
                    reason: "Not Found".to_owned(),
                    headers: Vec::new(),
                    body: Vec::new(),
                });
            }
            if request.path == "/device/v2/checkin" && response.status == 200 {
                let answer: HeldCheckInResponse = outpost_protocol::decode(&response.body).unwrap();
                let asked = match answer {
                    HeldCheckInResponse::Full(full) => full.poll_after_secs,
                    HeldCheckInResponse::Unchanged {
                        poll_after_secs, ..
                    } => poll_after_secs,
                };
                check_ins.lock().unwrap().push(asked);
            }
            Verdict::Forward(response)
        });
    }
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "", "");
    agent.set_option("sync", "poll_interval", "\"1s\"");
    agent.start();
    // Five minutes apart, three check-ins would take ten; a second (and a tenth of jitter)
    // apart, about two seconds: well inside the wait for any agent state.
    wait_until(AGENT_WAIT, "three check-ins a second apart", || {
        (check_ins.lock().unwrap().len() >= 3).then_some(())
    });
    assert!(
        check_ins
            .lock()
            .unwrap()
            .iter()
            .all(|asked| *asked == ASKED_SECS),
        "{check_ins:?}"
    );
}
