//! Attacks by a hostile hub (issue 6): a real hub and a real agent on loopback, with a
//! [`Proxy`] between them that rewrites, swaps, pads or stalls the hub's answers the way a
//! compromised hub, or anyone between it and the device, could.
//!
//! The hub is an untrusted mirror: it may pick when a device moves between the target and the
//! fallback of a validly signed plan, and nothing else. For each attack the test asserts that the
//! agent refused it, that the active model did not change (through `status --json`, the
//! inference API and the versions on disk), and that the refusal reached the hub as a `refused`
//! event of the device (`device show --json`). A download stalled past its deadline is not a
//! refusal but network trouble: the agent keeps serving, reports the stall once (a `stalled`
//! event, which is no failure), backs off and resumes it.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use outpost_hub::api::{DeviceEvent, RolloutState};
use outpost_protocol::device::{CheckInResponse, ErrorResponse};
use outpost_protocol::trust::{ManifestBody, ManifestRef, PlanBody, RootBody, Signed, Slot};
use outpost_protocol::{Arch, SecretKey};
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Exchange, Proxy, Request, Response, Verdict};
use outpost_tests::wait_until;
use serde_bytes::ByteBuf;
use serde_json::{json, Value};

const CHECK_IN: &str = "/device/v1/checkin";
/// The check-ins naming held documents, of one model and of every model. The hostile hub plays a
/// hub older than both (404), so every answer it tampers with is a full one the agent gets on
/// [`CHECK_IN`]; the agent judges it with the same code as the others' answers (`sync/apply.rs`).
const HELD_CHECK_INS: [&str; 2] = ["/device/v2/checkin", "/device/v3/checkin"];

/// Forwards `response`, except that, as a hub older than held check-ins, it answers one with 404.
fn older_hub(request: &Request, response: Response) -> Verdict {
    if HELD_CHECK_INS.contains(&request.path.as_str()) {
        return Verdict::Forward(Response {
            status: 404,
            reason: "Not Found".to_owned(),
            headers: Vec::new(),
            body: Vec::new(),
        });
    }
    Verdict::Forward(response)
}

const ARTIFACTS: &str = "/device/v1/artifacts/";
const DAY: u64 = 24 * 60 * 60;

/// A hub with demo@1 published and rolled out, and an agent serving it that reaches the hub only
/// through a proxy, with `extra` added to its config.
fn serving_v1_via_proxy(extra: &str) -> (TestHub, Fleet, Proxy, TestAgent) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let proxy = Proxy::start(&hub.url());
    proxy.set_hook(older_hub);
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "site=lab", extra);
    agent.start();
    agent.wait_status("active", json!("demo@1"));
    (hub, fleet, proxy, agent)
}

/// Rewrites the hub's check-in answers with `change`; other answers pass unchanged.
fn rewrite_check_ins(proxy: &Proxy, mut change: impl FnMut(&mut CheckInResponse) + Send + 'static) {
    proxy.set_hook(move |request, mut response| {
        if request.path == CHECK_IN && response.status == 200 {
            let mut answer: CheckInResponse = outpost_protocol::decode(&response.body).unwrap();
            change(&mut answer);
            response.body = outpost_protocol::encode(&answer).unwrap();
        }
        older_hub(request, response)
    });
}

/// Passes every answer on unchanged and waits for a check-in answer that `wanted` takes,
/// described by `what`.
fn check_in_where(
    proxy: &Proxy,
    what: &str,
    wanted: impl Fn(&CheckInResponse) -> bool,
) -> CheckInResponse {
    let latest: Arc<Mutex<Option<CheckInResponse>>> = Arc::default();
    {
        let latest = latest.clone();
        rewrite_check_ins(proxy, move |answer| {
            *latest.lock().unwrap() = Some(answer.clone());
        });
    }
    wait_until(AGENT_WAIT, what, || {
        latest.lock().unwrap().clone().filter(&wanted)
    })
}

fn plan_sequence(answer: &CheckInResponse) -> Option<u64> {
    answer.plan.as_ref().map(|plan| plan_body(plan).sequence)
}

/// Passes every answer on unchanged and waits for a check-in answer carrying plan `sequence`
/// with its fallback as the manifest to serve: what a hub answers once a rollout is rolled back.
fn check_in_with_fallback_of(proxy: &Proxy, sequence: u64) -> CheckInResponse {
    check_in_where(
        proxy,
        &format!("a check-in answer carrying the fallback of plan {sequence}"),
        |answer| {
            plan_sequence(answer) == Some(sequence)
                && matches!(answer.manifest, Some((Slot::Fallback, _)))
        },
    )
}

/// Passes every answer on unchanged and waits for a check-in answer carrying plan `sequence`,
/// which a hostile hub may keep and replay, or take apart, later.
fn check_in_with_plan(proxy: &Proxy, sequence: u64) -> CheckInResponse {
    check_in_where(
        proxy,
        &format!("a check-in answer carrying plan {sequence}"),
        |answer| plan_sequence(answer) == Some(sequence),
    )
}

fn plan_body(bytes: &[u8]) -> PlanBody {
    outpost_protocol::decode::<Signed<PlanBody>>(bytes)
        .unwrap()
        .decode_unverified()
        .unwrap()
}

fn manifest_body(bytes: &[u8]) -> ManifestBody {
    outpost_protocol::decode::<Signed<ManifestBody>>(bytes)
        .unwrap()
        .decode_unverified()
        .unwrap()
}

/// The answer's manifest bytes; panics when it carries none.
fn manifest_of(answer: &CheckInResponse) -> Vec<u8> {
    let (_, bytes) = answer
        .manifest
        .as_ref()
        .expect("the answer carries a manifest");
    bytes.to_vec()
}

/// Waits for the hub to hold a `refused` event for the agent's device whose detail is not among
/// `seen`, and returns it.
fn next_refusal(hub: &TestHub, agent: &TestAgent, seen: &[String]) -> DeviceEvent {
    wait_until(AGENT_WAIT, "a new refusal to be reported", || {
        agent
            .hub_detail(hub)
            .events
            .into_iter()
            .find(|event| event.kind == "refused" && !seen.contains(&event.detail))
    })
}

/// Asserts the agent still serves demo@`version`, with nothing on probation, to the inference
/// API as in its status; returns that status. It is the status of a cycle that ended after the
/// call, so after an event of the cycle before (a refusal reaching the hub) it shows what that
/// cycle left, not the file written before it.
fn assert_serving(agent: &TestAgent, version: u64) -> Value {
    let status = agent.next_status();
    assert_eq!(status["active"], format!("demo@{version}"), "{status:#}");
    assert_eq!(status["pending"], Value::Null, "{status:#}");
    let (code, body) = agent.infer(&http(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(body["model_version"], version.to_string(), "{body}");
    status
}

/// The model versions installed on the agent's disk, by manifest digest.
fn installed(agent: &TestAgent) -> BTreeSet<String> {
    std::fs::read_dir(agent.data().join("versions"))
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .collect()
}

/// Exchanges so far whose request path starts with `prefix`.
fn exchanges(proxy: &Proxy, prefix: &str) -> Vec<Exchange> {
    proxy
        .log()
        .into_iter()
        .filter(|exchange| exchange.request.path.starts_with(prefix))
        .collect()
}

/// The bytes of demo@`version`'s model as published by [`Fleet::publish_example`], and the
/// device API path it is downloaded from.
fn published_model(hub: &TestHub, version: u64) -> (Vec<u8>, String) {
    let bytes = std::fs::read(
        hub.dir()
            .join(format!("model-demo-{version}"))
            .join("model.onnx"),
    )
    .unwrap();
    let path = format!("{ARTIFACTS}{}", outpost_protocol::sha256(&bytes).to_hex());
    (bytes, path)
}

/// Has the proxy decide with `answer` what becomes of each successful download of `path`, and
/// pass every other answer on unchanged.
fn hijack_downloads(
    proxy: &Proxy,
    path: &str,
    mut answer: impl FnMut(Response) -> Verdict + Send + 'static,
) {
    let path = path.to_owned();
    proxy.set_hook(move |request, response| {
        if request.path == path && (200..300).contains(&response.status) {
            answer(response)
        } else {
            Verdict::Forward(response)
        }
    });
}

/// Waits for the agent to have backed off twice, the wait doubling, after a failed cycle whose
/// error starts with `error`: a hub must not get a fresh attempt at every poll it asks for.
fn wait_for_backoff(agent: &TestAgent, error: &str) {
    let (first, second) = (
        format!("retrying in 1s: {error}"),
        format!("retrying in 2s: {error}"),
    );
    wait_until(AGENT_WAIT, &format!("the agent to log {second:?}"), || {
        let log = agent.log();
        (log.contains(&first) && log.contains(&second)).then_some(())
    });
}

/// Writes `bytes` into the hub's directory as `name` and returns the path as an argument.
fn write_file(hub: &TestHub, name: &str, bytes: &[u8]) -> String {
    let path = hub.dir().join(name);
    std::fs::write(&path, bytes).unwrap();
    path.to_string_lossy().into_owned()
}

/// Signs plan `sequence` offline with the release keys, as `outpost-hub plan sign` does,
/// targeting the manifest file `target` with an optional fallback; returns the plan's bytes.
fn sign_plan(
    hub: &TestHub,
    fleet: &Fleet,
    sequence: u64,
    target: &str,
    fallback: Option<&str>,
) -> Vec<u8> {
    let out = hub.dir().join(format!("plan-{sequence}.bin"));
    let out_arg = out.to_string_lossy().into_owned();
    let sequence = sequence.to_string();
    let mut args = vec![
        "plan",
        "sign",
        "--sequence",
        &sequence,
        "--target",
        target,
        "--stages",
        "100",
        "--key",
        &fleet.keys,
        "--out",
        &out_arg,
    ];
    if let Some(fallback) = fallback {
        args.extend(["--fallback", fallback]);
    }
    hub.cli(&args).ok();
    std::fs::read(&out).unwrap()
}

/// Plan `sequence` naming the manifests `target` and `fallback` (their signed bytes), signed
/// with the release keys directly. `plan sign` refuses to sign a plan that outlives a manifest it
/// names (issue 21, finding 14), but a careless or hostile key holder need not use it, and the
/// device must refuse what such a plan names all the same. The gates are `plan sign`'s defaults.
fn sign_plan_naming(
    hub: &TestHub,
    fleet: &Fleet,
    sequence: u64,
    target: &[u8],
    fallback: &[u8],
) -> Vec<u8> {
    let fallback_arg = write_file(hub, &format!("plan-{sequence}-fallback.bin"), fallback);
    let mut body = plan_body(&sign_plan(hub, fleet, sequence, &fallback_arg, None));
    let reference = |bytes: &[u8]| {
        let manifest = manifest_body(bytes);
        ManifestRef {
            name: manifest.name.to_string(),
            version: manifest.version,
            manifest_sha256: outpost_protocol::sha256(bytes),
        }
    };
    body.target = reference(target);
    body.fallback = Some(reference(fallback));
    fleet.sign(&body)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

#[test]
fn an_older_signed_version_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let v1 = check_in_with_plan(&proxy, 1);
    // Plan 2 (signed by `first_rollout`, without a fallback) moves the device to demo@2, and no
    // plan from then on lets it run demo@1 again.
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.first_rollout(&hub, "demo", 2);
    agent.wait_status("active", json!("demo@2"));
    check_in_with_plan(&proxy, 2);
    let versions_before = installed(&agent);
    let artifacts_before = exchanges(&proxy, ARTIFACTS).len();

    // The current plan, with demo@1's validly signed manifest beside it.
    let v1_manifest = v1.manifest.clone();
    rewrite_check_ins(&proxy, move |answer| {
        answer.manifest = v1_manifest.clone();
    });
    let not_in_plan = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        not_in_plan.detail,
        "manifest: manifest demo version 1 is neither the target nor the fallback of plan 2"
    );
    assert_serving(&agent, 2);

    // A newer plan the release keys did sign, whose target is demo@1: only a plan's fallback may
    // lead below a version the device has seen. The manifest is signed afresh, so that it is not
    // the document refused above (a device reports each refused document once).
    let model_dir = hub.dir().join("model-demo-1");
    let resigned = hub.dir().join("demo-1-resigned.bin");
    let resigned_arg = resigned.to_string_lossy().into_owned();
    hub.cli(&[
        "model",
        "sign",
        "--name",
        "demo",
        "--version",
        "1",
        "--model",
        &model_dir.join("model.onnx").to_string_lossy(),
        "--validation",
        &model_dir.join("validation.bin").to_string_lossy(),
        "--input",
        "x:FP32:N,4",
        "--output",
        "y:FP32:N,3",
        "--key",
        &fleet.keys,
        "--out",
        &resigned_arg,
    ])
    .ok();
    let plan = sign_plan(&hub, &fleet, 3, &resigned_arg, None);
    let manifest = std::fs::read(&resigned).unwrap();
    rewrite_check_ins(&proxy, move |answer| {
        answer.plan = Some(ByteBuf::from(plan.clone()));
        answer.manifest = Some((Slot::Target, ByteBuf::from(manifest.clone())));
    });
    let below = next_refusal(&hub, &agent, &[not_in_plan.detail]);
    assert_eq!(
        below.detail,
        "manifest: manifest demo version 1 is below version 2 already seen"
    );
    assert_serving(&agent, 2);
    assert_eq!(installed(&agent), versions_before);
    assert_eq!(exchanges(&proxy, ARTIFACTS).len(), artifacts_before);
}

/// Issue 21, finding 1: with only an admin token, a hub relabelled a device into a plan signed
/// for other devices (`site=nowhere`), which the device ran, and then rolled it back to that
/// plan's fallback, below the version it had committed. A plan's selector binds the device's
/// own labels (agent.toml `labels`), not the ones the hub gives it.
#[test]
fn a_device_relabelled_by_the_hub_refuses_a_plan_signed_for_other_devices() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.publish_example(&hub, "demo", 3, 3);
    let lab = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &["--selector", "site=lab", "--stages", "100", "--bake", "1s"],
    );
    agent.wait_status("active", json!("demo@2"));
    check_in_with_plan(&proxy, lab.sequence);
    let versions_before = installed(&agent);
    let elsewhere = fleet.create_rollout(
        &hub,
        "demo",
        3,
        1,
        &[
            "--selector",
            "site=nowhere",
            "--stages",
            "100",
            "--bake",
            "1h",
        ],
    );

    let id = agent.hub_detail(&hub).device.id;
    hub.cli(&["device", "label", &id, "--set", "site=nowhere"])
        .ok();
    let refusal = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        refusal.detail,
        format!(
            "plan: plan {} is signed for devices labelled site=nowhere; this device's own \
             labels (agent.toml `labels`) are site=lab",
            elsewhere.sequence
        )
    );
    assert_serving(&agent, 2);

    // Rolled back, the hub offers that plan's fallback, demo@1: refused all the same.
    hub.cli(&["rollout", "rollback", &elsewhere.sequence.to_string()])
        .ok();
    check_in_with_fallback_of(&proxy, elsewhere.sequence);
    assert_serving(&agent, 2);
    assert_eq!(installed(&agent), versions_before);
    assert_eq!(agent.status()["plan_sequence"], lab.sequence);
}

/// Issue 21, finding 1: a plan's fallback may lead below the highest version seen (back to what
/// ran before the plan), but not below a version the device committed under an earlier plan.
#[test]
fn a_fallback_below_a_version_committed_under_an_earlier_plan_is_refused() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.first_rollout(&hub, "demo", 2);
    agent.wait_status("active", json!("demo@2"));
    fleet.publish_example(&hub, "demo", 3, 3);
    let plan = fleet.create_rollout(&hub, "demo", 3, 1, &["--stages", "100", "--bake", "1h"]);
    agent.wait_status("active", json!("demo@3"));
    check_in_with_plan(&proxy, plan.sequence);

    hub.cli(&["rollout", "rollback", &plan.sequence.to_string()])
        .ok();
    let refusal = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        refusal.detail,
        format!(
            "manifest: fallback demo version 1 of plan {} is below version 2, committed here \
             under an earlier plan",
            plan.sequence
        )
    );
    assert_serving(&agent, 3);
}

/// Issue 21, finding 12: a hub that refuses a status report with 401, as it does one signed at a
/// time outside its clock-skew window (a board without a real-time clock, booted before NTP),
/// made the agent drop the report for good. It is kept, and delivered once the hub accepts it.
#[test]
fn status_reports_refused_as_stale_are_kept_and_delivered_later() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    // demo@1's reports reach the hub first: the agent serves demo@1 before its "committed"
    // report is out, and a report kept waiting holds each sync back before its check-in, so
    // one refused from here on would keep demo@2 from ever being learnt of.
    wait_until(AGENT_WAIT, "demo@1's reports to reach the hub", || {
        agent
            .hub_detail(&hub)
            .events
            .into_iter()
            .any(|event| {
                event.kind == "committed"
                    && event.model.as_ref().is_some_and(|model| model.version == 1)
            })
            .then_some(())
    });
    let refusing = Arc::new(AtomicBool::new(true));
    {
        let refusing = refusing.clone();
        proxy.set_intercept(move |request| {
            (refusing.load(Ordering::SeqCst) && request.path == "/device/v1/status").then(|| {
                let error = ErrorResponse {
                    status: 401,
                    message: format!(
                        "stale timestamp {}: hub time is {}, allowed skew 300s",
                        unix_now(),
                        unix_now() + 3600
                    ),
                };
                Response {
                    status: 401,
                    reason: "Unauthorized".to_owned(),
                    headers: vec![(
                        "content-type".to_owned(),
                        "application/x-outpost-postcard".to_owned(),
                    )],
                    body: outpost_protocol::encode(&error).unwrap(),
                }
            })
        });
    }
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.first_rollout(&hub, "demo", 2);
    agent.wait_status("active", json!("demo@2"));
    // The reports of the update (downloaded, activating, committed) were each refused at least
    // once: before this change, once, and then dropped.
    wait_until(AGENT_WAIT, "three status reports refused", || {
        (exchanges(&proxy, "/device/v1/status")
            .iter()
            .filter(|exchange| exchange.status == 401)
            .count()
            >= 3)
            .then_some(())
    });
    let committed = |hub: &TestHub| {
        agent.hub_detail(hub).events.into_iter().any(|event| {
            event.kind == "committed"
                && event.model.as_ref().is_some_and(|model| model.version == 2)
        })
    };
    assert!(!committed(&hub), "a refused report reached the hub");

    refusing.store(false, Ordering::SeqCst);
    wait_until(AGENT_WAIT, "the kept reports to reach the hub", || {
        committed(&hub).then_some(())
    });
    let kinds: Vec<String> = agent
        .hub_detail(&hub)
        .events
        .into_iter()
        .filter(|event| event.model.as_ref().is_some_and(|model| model.version == 2))
        .map(|event| event.kind)
        .collect();
    assert_eq!(kinds, ["downloaded", "activating", "committed"]);
}

#[test]
fn a_replayed_older_plan_is_refused_and_reported_also_after_a_restart() {
    let (hub, fleet, proxy, mut agent) = serving_v1_via_proxy("");
    let old = check_in_with_plan(&proxy, 1);
    assert!(old.manifest.is_some());
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    agent.wait_status("active", json!("demo@2"));

    // The agent restarts, and from its first check-in on, the hub (or anyone between) answers
    // with the older plan, still validly signed: the highest sequence seen was kept on disk.
    let stopped = agent.sigterm();
    assert!(stopped.success(), "the agent stopped with {stopped}");
    rewrite_check_ins(&proxy, move |answer| {
        answer.plan = old.plan.clone();
        answer.manifest = old.manifest.clone();
    });
    agent.start();
    let refusal = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        refusal.detail,
        "plan: plan sequence 1 is below sequence 2 already seen"
    );
    let status = assert_serving(&agent, 2);
    assert_eq!(status["plan_sequence"], 2, "{status:#}");
}

#[test]
fn a_hub_clock_far_ahead_stops_updates_only_while_it_lasts() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    // The hub's answers claim a time ten years ahead: against it the root (valid for a year)
    // has expired, so the plan it verifies is refused.
    let future = unix_now() + 3650 * DAY;
    rewrite_check_ins(&proxy, move |answer| answer.hub_time = future);
    let refusal = next_refusal(&hub, &agent, &[]);
    assert!(
        refusal.detail.starts_with("plan: root expired at ")
            && refusal.detail.ends_with(&format!(", now is {future}")),
        "{refusal:?}"
    );
    assert_serving(&agent, 1);
    assert!(
        agent.log().contains("ahead of this device's clock"),
        "{}",
        agent.log()
    );

    // The hub's clock is right again: the next rollout goes through. Had the device kept the
    // highest hub time it ever saw, every document would look expired to it for ten years.
    proxy.set_hook(older_hub);
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    agent.wait_status("active", json!("demo@2"));
    assert_serving(&agent, 2);
}

#[test]
fn an_expired_manifest_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let v1 = check_in_with_plan(&proxy, 1);
    let v1_manifest = manifest_of(&v1);
    // demo@2, validly signed by the release keys, but a day past its expiry, named by a fresh
    // plan that is itself valid.
    let mut body = manifest_body(&v1_manifest);
    body.version = 2;
    body.created = unix_now() - 2 * DAY;
    body.expires = unix_now() - DAY;
    let expired = fleet.sign(&body);
    let plan = sign_plan_naming(&hub, &fleet, 2, &expired, &v1_manifest);
    let versions_before = installed(&agent);
    let artifacts_before = exchanges(&proxy, ARTIFACTS).len();

    rewrite_check_ins(&proxy, move |answer| {
        answer.plan = Some(ByteBuf::from(plan.clone()));
        answer.manifest = Some((Slot::Target, ByteBuf::from(expired.clone())));
    });
    let refusal = next_refusal(&hub, &agent, &[]);
    let expected = format!("manifest: manifest expired at {}, now is ", body.expires);
    assert!(refusal.detail.starts_with(&expected), "{refusal:?}");
    // The plan itself was sound and is accepted; only its target was refused. The refusal
    // reaches the hub before the cycle that accepted the plan writes the status file.
    agent.wait_status("plan_sequence", json!(2));
    assert_serving(&agent, 1);
    assert_eq!(installed(&agent), versions_before);
    assert_eq!(exchanges(&proxy, ARTIFACTS).len(), artifacts_before);
}

#[test]
fn a_manifest_that_expired_before_its_plan_was_signed_is_refused_at_once() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let v1 = check_in_with_plan(&proxy, 1);
    let v1_manifest = manifest_of(&v1);
    // demo@2 is valid until tomorrow, and plan 2 names it but was signed the day after: this
    // device's clock runs days behind. Having accepted the plan, the device knows it is at least
    // that late, so the manifest is refused in the very answer that brings both.
    let mut body = manifest_body(&v1_manifest);
    body.version = 2;
    body.created = unix_now() - DAY;
    body.expires = unix_now() + DAY;
    let manifest = fleet.sign(&body);
    let mut plan = plan_body(&sign_plan_naming(&hub, &fleet, 2, &manifest, &v1_manifest));
    plan.created = unix_now() + 2 * DAY;
    plan.expires = plan.created + 30 * DAY;
    let plan_created = plan.created;
    let plan = fleet.sign(&plan);
    let versions_before = installed(&agent);
    let artifacts_before = exchanges(&proxy, ARTIFACTS).len();

    rewrite_check_ins(&proxy, move |answer| {
        answer.plan = Some(ByteBuf::from(plan.clone()));
        answer.manifest = Some((Slot::Target, ByteBuf::from(manifest.clone())));
    });
    let refusal = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        refusal.detail,
        format!(
            "manifest: manifest expired at {}, now is {plan_created}",
            body.expires
        )
    );
    // The refusal reaches the hub before the cycle that accepted the plan writes the status file.
    agent.wait_status("plan_sequence", json!(2));
    assert_serving(&agent, 1);
    assert_eq!(installed(&agent), versions_before);
    assert_eq!(exchanges(&proxy, ARTIFACTS).len(), artifacts_before);
}

#[test]
fn a_valid_manifest_with_a_swapped_artifact_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let versions_before = installed(&agent);
    let (v1_model, _) = published_model(&hub, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let (v2_model, v2_path) = published_model(&hub, 2);
    // Same length, other bytes: only the signed hash tells them apart.
    assert_eq!(v1_model.len(), v2_model.len());
    assert_ne!(v1_model, v2_model);
    hijack_downloads(&proxy, &v2_path, move |mut response| {
        response.body = v1_model.clone();
        Verdict::Forward(response)
    });
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    let refusal = next_refusal(&hub, &agent, &[]);
    let sha = v2_path.strip_prefix(ARTIFACTS).unwrap();
    assert_eq!(
        refusal.detail,
        format!("model artifact {sha} does not hash to its signed value")
    );
    assert_eq!(refusal.model.map(|model| model.version), Some(2));
    // The proxy logs an exchange once it has closed the connection, which may be after the agent
    // read the body, hashed it and reported.
    wait_until(AGENT_WAIT, "the download in the proxy's log", || {
        (!exchanges(&proxy, &v2_path).is_empty()).then_some(())
    });
    assert_serving(&agent, 1);
    assert_eq!(installed(&agent), versions_before);
}

#[test]
fn an_artifact_longer_than_signed_is_cut_off_and_refused() {
    const PADDING: usize = 8 * 1024 * 1024;
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("[sync]\nmax_backoff = \"4s\"\n");
    let versions_before = installed(&agent);
    fleet.publish_example(&hub, "demo", 2, 2);
    let (v2_model, v2_path) = published_model(&hub, 2);
    let signed = v2_model.len();
    hijack_downloads(&proxy, &v2_path, |mut response| {
        // The signed bytes, then far more, all announced in content-length. Paced so that the
        // proxy sees the agent close before the socket buffers swallow the padding: at a MiB a
        // second, an agent held up for most of a second after the signed bytes still closes
        // before the bound below is sent.
        response.body.resize(response.body.len() + PADDING, 0xAB);
        Verdict::Trickle(response, 1024 * 1024)
    });
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    let refusal = next_refusal(&hub, &agent, &[]);
    let sha = v2_path.strip_prefix(ARTIFACTS).unwrap();
    assert_eq!(
        refusal.detail,
        format!("hub sent more than the {signed} signed bytes of model artifact {sha}")
    );
    // The refused download fails the cycle, so the next attempt waits out a growing backoff.
    wait_for_backoff(&agent, "hub sent more than the");
    // The proxy logs a download once it has noticed the agent close the connection.
    let downloads = wait_until(AGENT_WAIT, "a download in the proxy's log", || {
        let downloads = exchanges(&proxy, &v2_path);
        (!downloads.is_empty()).then_some(downloads)
    });
    for download in &downloads {
        assert_eq!(
            download.body_len, signed,
            "the hub's own answer: {download:?}"
        );
        // The proxy announced and offered the signed length plus the padding. The agent stopped
        // reading at about the signed length; socket buffers account for the rest of what the
        // proxy managed to write before the agent closed the connection.
        assert!(
            download.body_sent <= signed + 1024 * 1024,
            "the agent let {} of {} bytes through: {download:?}",
            download.body_sent,
            download.body_len
        );
    }
    // Nothing past the signed length reached the disk, even mid-way through a retry.
    let partial = agent
        .data()
        .join("downloads")
        .join(format!("{sha}.partial"));
    if let Ok(metadata) = std::fs::metadata(&partial) {
        assert!(metadata.len() <= signed as u64, "{}", partial.display());
    }
    assert_serving(&agent, 1);
    assert_eq!(installed(&agent), versions_before);
}

#[test]
fn an_artifact_at_one_byte_per_second_hits_the_deadline_and_is_resumed_after_a_backoff() {
    let (hub, fleet, proxy, agent) =
        serving_v1_via_proxy("[sync]\ndownload_deadline = \"2s\"\nmax_backoff = \"4s\"\n");
    fleet.publish_example(&hub, "demo", 2, 2);
    let (v2_model, v2_path) = published_model(&hub, 2);
    let trickling = Arc::new(AtomicBool::new(true));
    {
        let trickling = trickling.clone();
        hijack_downloads(&proxy, &v2_path, move |response| {
            if trickling.load(Ordering::Relaxed) {
                Verdict::Trickle(response, 1)
            } else {
                Verdict::Forward(response)
            }
        });
    }
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    let stalled = wait_until(AGENT_WAIT, "two stalled downloads", || {
        let downloads = exchanges(&proxy, &v2_path);
        (downloads.len() >= 2).then_some(downloads)
    });
    // Under attack the device keeps serving what it had, and says why it has nothing new.
    let status = assert_serving(&agent, 1);
    let last_error = status["last_error"].as_str().unwrap_or_default();
    assert!(last_error.contains("passed its 2s deadline"), "{status:#}");
    // And it tells the hub, where an operator sees why the rollout is not moving.
    let stall = wait_until(AGENT_WAIT, "the stall to be reported", || {
        stalls(&hub, &agent).into_iter().next()
    });
    assert!(stall.detail.contains("passed its 2s deadline"), "{stall:?}");
    assert_eq!(
        stall.model.as_ref().map(|m| m.version),
        Some(2),
        "{stall:?}"
    );

    let (first, second) = (&stalled[0], &stalled[1]);
    assert_eq!(first.request.header("range"), None, "{first:?}");
    assert!(first.body_sent < first.body_len, "{first:?}");
    assert!(first.elapsed >= Duration::from_secs(2), "{first:?}");
    // The second attempt resumes from what the first one kept, no further than was sent.
    let resumed_at: usize = second
        .request
        .header("range")
        .and_then(|range| range.strip_prefix("bytes="))
        .and_then(|range| range.strip_suffix('-'))
        .and_then(|offset| offset.parse().ok())
        .unwrap_or_else(|| panic!("the retry is no range request: {second:?}"));
    assert!(
        (1..=first.body_sent).contains(&resumed_at),
        "{first:?}\n{second:?}"
    );
    // Each stalled attempt doubles the wait before the next one.
    wait_for_backoff(&agent, "download of model artifact");

    // Once the hub sends at full speed again, the download completes from where it stopped. The
    // proxy logs it once it has closed the connection, which may be after the agent committed;
    // an attempt still trickling when the hub recovered ends at its deadline like the others.
    trickling.store(false, Ordering::Relaxed);
    agent.wait_status("active", json!("demo@2"));
    let whole = wait_until(AGENT_WAIT, "the whole download in the proxy's log", || {
        let downloads = exchanges(&proxy, &v2_path);
        let whole: Vec<Exchange> = downloads
            .into_iter()
            .filter(|download| download.body_sent == download.body_len)
            .collect();
        (!whole.is_empty()).then_some(whole)
    });
    assert_eq!(whole.len(), 1, "{whole:#?}");
    let last = &whole[0];
    assert_eq!(last.status, 206, "{last:?}");
    assert!(last.body_len < v2_model.len(), "{last:?}");
    assert_serving(&agent, 2);
    // One report for the candidate however many attempts stalled, and a stall is no failure:
    // the rollout completes.
    assert_eq!(stalls(&hub, &agent).len(), 1);
    wait_until(AGENT_WAIT, "the rollout to complete", || {
        (hub.rollout(2).state == RolloutState::Completed).then_some(())
    });
}

/// The `stalled` events the hub holds for the agent's device.
fn stalls(hub: &TestHub, agent: &TestAgent) -> Vec<DeviceEvent> {
    agent
        .hub_detail(hub)
        .events
        .into_iter()
        .filter(|event| event.kind == "stalled")
        .collect()
}

#[test]
fn a_model_for_another_architecture_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let versions_before = installed(&agent);
    let artifacts_before = exchanges(&proxy, ARTIFACTS).len();
    let this = Arch::current().unwrap();
    let other = if this == Arch::Aarch64 {
        Arch::X86_64
    } else {
        Arch::Aarch64
    };
    let dir = hub.dir().join("other-arch");
    let dir_arg = dir.to_string_lossy().into_owned();
    hub.cli(&["example-model", "--out", &dir_arg, "--seed", "4"])
        .ok();
    hub.cli(&[
        "model",
        "publish",
        &dir.join("model.onnx").to_string_lossy(),
        "--name",
        "demo",
        "--version",
        "2",
        "--validation",
        &dir.join("validation.bin").to_string_lossy(),
        "--arch",
        other.as_str(),
        "--key",
        &fleet.keys,
    ])
    .ok();
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    let refusal = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        refusal.detail,
        format!("manifest: model supports [{other:?}], this device is {this}")
    );
    assert_eq!(refusal.model.map(|model| model.version), Some(2));
    assert_serving(&agent, 1);
    assert_eq!(installed(&agent), versions_before);
    assert_eq!(exchanges(&proxy, ARTIFACTS).len(), artifacts_before);
}

/// A key no root lists: what a hub that signs for itself holds.
fn attacker_key(seed: u8) -> SecretKey {
    SecretKey::from_seed([seed; 32])
}

#[test]
fn a_plan_signed_below_threshold_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let versions_before = installed(&agent);
    let artifacts_before = exchanges(&proxy, ARTIFACTS).len();
    // Each forgery leaves plan 2 with one valid signature of the two the root requires, and the
    // exact counts the refusal must give.
    type Forgery = fn(&mut Signed<PlanBody>);
    let forgeries: [(&str, Forgery, &str); 4] = [
        (
            "one signature dropped",
            |plan| {
                plan.signatures.pop();
            },
            "0 by unknown keys, 0 invalid, 0 duplicate",
        ),
        (
            "one signature corrupted",
            |plan| {
                plan.signatures.last_mut().unwrap().signature.0[0] ^= 1;
            },
            "0 by unknown keys, 1 invalid, 0 duplicate",
        ),
        (
            "one key's signature twice",
            |plan| {
                plan.signatures[1] = plan.signatures[0].clone();
            },
            "0 by unknown keys, 0 invalid, 1 duplicate",
        ),
        (
            "one signature by a key the root does not list",
            |plan| {
                plan.signatures.pop();
                plan.sign(&attacker_key(7));
            },
            "1 by unknown keys, 0 invalid, 0 duplicate",
        ),
    ];
    let mut seen = Vec::new();
    for (index, (what, forge, counts)) in forgeries.into_iter().enumerate() {
        rewrite_check_ins(&proxy, move |answer| {
            let Some(bytes) = &answer.plan else {
                return;
            };
            if plan_body(bytes).sequence == 2 {
                let mut plan: Signed<PlanBody> = outpost_protocol::decode(bytes).unwrap();
                forge(&mut plan);
                answer.plan = Some(ByteBuf::from(outpost_protocol::encode(&plan).unwrap()));
            }
        });
        if index == 0 {
            fleet.publish_example(&hub, "demo", 2, 2);
            fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
        }
        let refusal = next_refusal(&hub, &agent, &seen);
        assert_eq!(
            refusal.detail,
            format!(
                "plan: plan has 1 valid signature(s) from distinct trusted keys, 2 required ({counts})"
            ),
            "{what}"
        );
        seen.push(refusal.detail);
    }
    // Refused before anything was fetched for it.
    let status = assert_serving(&agent, 1);
    assert_eq!(status["plan_sequence"], 1, "{status:#}");
    assert_eq!(installed(&agent), versions_before);
    assert_eq!(exchanges(&proxy, ARTIFACTS).len(), artifacts_before);
}

#[test]
fn a_rotation_signed_by_the_new_keys_only_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let new_keys = [attacker_key(7), attacker_key(8)];
    let now = unix_now();
    let rotation = RootBody {
        version: 2,
        created: now,
        expires: now + DAY,
        threshold: 2,
        keys: new_keys.iter().map(SecretKey::public).collect(),
    };
    let rotation = outpost_hub::cli::sign_document(&rotation, &new_keys).unwrap();
    rewrite_check_ins(&proxy, move |answer| {
        answer.roots = vec![ByteBuf::from(rotation.clone())];
    });

    let refusal = next_refusal(&hub, &agent, &[]);
    assert_eq!(
        refusal.detail,
        "root rotation: root has 0 valid signature(s) from distinct trusted keys, 2 required \
         (2 by unknown keys, 0 invalid, 0 duplicate)"
    );
    let status = assert_serving(&agent, 1);
    assert_eq!(status["root_version"], 1, "{status:#}");
    let trusted = std::fs::read(agent.data().join("trust").join("root.bin")).unwrap();
    assert!(trusted == fleet.root, "the stored trust root changed");

    // The old keys still rule: once the hub stops, their next plan is followed.
    proxy.set_hook(|_, response| Verdict::Forward(response));
    fleet.publish_example(&hub, "demo", 2, 2);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    agent.wait_status("active", json!("demo@2"));
    assert_eq!(agent.status()["root_version"], 1);
}

/// Issue 21, finding 7: a compromised threshold of release keys signs a plan at sequence
/// `u64::MAX`, dated ten years ahead. The device accepts it (it is validly signed), and its
/// floors are poisoned: no later plan's sequence is high enough, and every root looks expired.
/// The operators recover as TUF's fast-forward recovery does: they rotate the root to new keys,
/// revoking the compromised ones. The device follows the rotation, resets its floors to the new
/// root's creation, and runs what the new keys sign; the revoked keys' plan counts no more.
#[test]
fn a_rotation_that_revokes_compromised_keys_resets_the_floors_they_poisoned() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let v1 = check_in_with_plan(&proxy, 1);
    let mut body = plan_body(v1.plan.as_deref().unwrap());
    let future = unix_now() + 3650 * DAY;
    body.sequence = u64::MAX;
    body.created = future;
    body.expires = future + 365 * DAY;
    let poisoned = fleet.sign(&body);
    rewrite_check_ins(&proxy, move |answer| {
        answer.plan = Some(ByteBuf::from(poisoned.clone()));
    });
    agent.wait_status("plan_sequence", json!(u64::MAX));
    assert_serving(&agent, 1);

    // The recovery: two new keys, and a rotation signed by the old threshold and the new one.
    proxy.set_hook(older_hub);
    let new_keys_dir = hub.dir().join("new-keys");
    let new_keys_arg = new_keys_dir.to_string_lossy().into_owned();
    hub.cli(&["keys", "generate", "--out", &new_keys_arg, "--count", "2"])
        .ok();
    let mut new_keys: Vec<String> = std::fs::read_dir(&new_keys_dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "key"))
        .map(|path| path.to_string_lossy().into_owned())
        .collect();
    new_keys.sort();
    let new_keys = new_keys.join(",");
    let root2 = hub.dir().join("root2.bin");
    let root2_arg = root2.to_string_lossy().into_owned();
    hub.cli(&[
        "root",
        "rotate",
        "--root",
        &fleet.root_path.to_string_lossy(),
        "--old-key",
        &fleet.keys,
        "--key",
        &new_keys,
        "--threshold",
        "2",
        "--out",
        &root2_arg,
    ])
    .ok();
    hub.cli(&["root", "upload", &root2_arg]).ok();
    let recovered = Fleet {
        keys: new_keys,
        root_path: root2,
        root: fleet.root.clone(),
    };
    recovered.publish_example(&hub, "demo", 2, 2);
    recovered.first_rollout(&hub, "demo", 2);
    agent.wait_status("active", json!("demo@2"));
    let status = assert_serving(&agent, 2);
    assert_eq!(status["root_version"], 2, "{status:#}");
    assert!(status["plan_sequence"].as_u64().unwrap() < 10, "{status:#}");
    assert!(
        agent.log().contains("revoking keys of version 1"),
        "{}",
        agent.log()
    );

    // A plan the revoked keys sign now is refused: they sign nothing the device trusts. (The
    // poisoned plan itself was refused once the root looked expired, and a device reports each
    // refused document once.)
    body.sequence = 100;
    body.created = unix_now();
    body.expires = body.created + DAY;
    let revoked = fleet.sign(&body);
    let seen: Vec<String> = agent
        .hub_detail(&hub)
        .events
        .into_iter()
        .filter(|event| event.kind == "refused")
        .map(|event| event.detail)
        .collect();
    rewrite_check_ins(&proxy, move |answer| {
        answer.plan = Some(ByteBuf::from(revoked.clone()));
    });
    let refusal = next_refusal(&hub, &agent, &seen);
    assert!(
        refusal
            .detail
            .starts_with("plan: plan has 0 valid signature(s) from distinct trusted keys"),
        "{refusal:?}"
    );
    assert_serving(&agent, 2);
}

/// A presigned URL's signature, in the query of every redirect below: it must reach the object
/// store as given, and no log or report of the agent's.
const STORE_SECRET: &str = "X-Amz-Signature=5ecre75ecre7";

/// Has the proxy answer every artifact download, before the hub sees it, with a 307 to
/// `location(sha256 hex)`, as a hub handing downloads to its object store does.
fn redirect_downloads(proxy: &Proxy, location: impl Fn(&str) -> String + Send + 'static) {
    proxy.set_intercept(move |request| {
        let sha = request.path.strip_prefix(ARTIFACTS)?;
        Some(Response {
            status: 307,
            reason: "Temporary Redirect".to_owned(),
            headers: vec![("location".to_owned(), location(sha))],
            body: Vec::new(),
        })
    });
}

/// A stand-in for an object store: a second proxy that answers `/bucket/<sha256 hex>?...` itself
/// with the artifact the hub keeps in its data directory (404 for anything else).
fn object_store(hub: &TestHub) -> Proxy {
    let store = Proxy::start(&hub.url());
    let artifacts = hub.data().join("artifacts");
    store.set_intercept(move |request| {
        let path = request.path.split('?').next().unwrap_or_default();
        let body = path
            .strip_prefix("/bucket/")
            .and_then(|sha| std::fs::read(artifacts.join(sha)).ok());
        Some(match body {
            Some(body) => Response {
                status: 200,
                reason: "OK".to_owned(),
                headers: vec![("content-type".to_owned(), "binary/octet-stream".to_owned())],
                body,
            },
            None => Response {
                status: 404,
                reason: "Not Found".to_owned(),
                headers: Vec::new(),
                body: b"<Error><Code>NoSuchKey</Code></Error>".to_vec(),
            },
        })
    });
    store
}

/// The hub's object-store downloads (issue 24): the hub answers a download with a redirect to a
/// presigned URL, and the agent fetches the bytes there, judged by the signed manifest as ever.
/// The store gets the URL's query as given and none of the device's signing headers, which are
/// for the hub alone; the agent's log never shows the query.
#[test]
fn a_download_redirected_to_an_object_store_is_fetched_there_without_the_device_signature() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    fleet.publish_example(&hub, "demo", 2, 2);
    let (_, v2_path) = published_model(&hub, 2);
    let store = object_store(&hub);
    let store_url = store.url();
    redirect_downloads(&proxy, move |sha| {
        format!("{store_url}/bucket/{sha}?X-Amz-Date=20250101T000000Z&{STORE_SECRET}")
    });
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    agent.wait_status("active", json!("demo@2"));
    assert_serving(&agent, 2);
    let sha = v2_path.strip_prefix(ARTIFACTS).unwrap();
    let fetched = wait_until(AGENT_WAIT, "the model in the store's log", || {
        let fetched: Vec<Exchange> = store
            .log()
            .into_iter()
            .filter(|exchange| exchange.request.path.starts_with(&format!("/bucket/{sha}")))
            .collect();
        (!fetched.is_empty()).then_some(fetched)
    });
    let asked = exchanges(&proxy, &v2_path);
    assert!(!asked.is_empty(), "the agent never asked the hub");
    for exchange in &asked {
        assert_eq!(exchange.status, 307, "{exchange:?}");
        assert!(exchange.request.header("x-outpost-signature").is_some());
    }
    for exchange in store.log() {
        assert_eq!(exchange.status, 200, "{exchange:?}");
        assert!(
            exchange.request.path.ends_with(STORE_SECRET),
            "the query was not sent as given: {exchange:?}"
        );
        let signing: Vec<&(String, String)> = exchange
            .request
            .headers
            .iter()
            .filter(|(name, _)| name.starts_with("x-outpost-"))
            .collect();
        assert!(signing.is_empty(), "the store got {signing:?}");
    }
    assert_eq!(fetched[0].body_sent, fetched[0].body_len);
    assert!(!agent.log().contains("5ecre7"), "{}", agent.log());
}

/// A redirect where the device does not go is a refusal, reported, not network trouble: plain
/// http to another host (the rule hub URLs obey), and a store that redirects again (the device
/// follows one hop). Neither shows the presigned URL's query, and the device keeps serving.
#[test]
fn a_download_redirected_where_the_device_does_not_follow_is_refused_and_reported() {
    let (hub, fleet, proxy, agent) = serving_v1_via_proxy("");
    let versions_before = installed(&agent);
    fleet.publish_example(&hub, "demo", 2, 2);
    // 203.0.113.1 is TEST-NET-3: only a refusal before connecting gives the message below.
    redirect_downloads(&proxy, |sha| {
        format!("http://203.0.113.1/bucket/{sha}?{STORE_SECRET}")
    });
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    let refusal = next_refusal(&hub, &agent, &[]);
    let sha = refusal
        .detail
        .strip_prefix(&format!("hub redirected {ARTIFACTS}"))
        .and_then(|rest| rest.split(' ').next())
        .unwrap_or_else(|| panic!("{refusal:?}"));
    assert_eq!(
        refusal.detail,
        format!(
            "hub redirected {ARTIFACTS}{sha} where the device does not follow: \
             http://203.0.113.1/bucket/{sha} uses plain http to a non-loopback host; device \
             traffic must use https"
        )
    );
    assert_eq!(refusal.model.map(|model| model.version), Some(2));
    assert_serving(&agent, 1);

    // A store on loopback that redirects again. The candidate was refused once already, so this
    // refusal is not reported again: the agent's log says it.
    let store = Proxy::start(&hub.url());
    let store_url = store.url();
    {
        let store_url = store_url.clone();
        store.set_intercept(move |request| {
            Some(Response {
                status: 302,
                reason: "Found".to_owned(),
                headers: vec![(
                    "location".to_owned(),
                    format!("{store_url}/elsewhere{}", request.path),
                )],
                body: Vec::new(),
            })
        });
    }
    {
        let store_url = store_url.clone();
        redirect_downloads(&proxy, move |sha| {
            format!("{store_url}/bucket/{sha}?{STORE_SECRET}")
        });
    }
    let again = "redirected it again (302); the device follows one redirect only";
    wait_until(AGENT_WAIT, "the second hop to be refused", || {
        agent.log().contains(again).then_some(())
    });
    assert!(
        store
            .log()
            .iter()
            .all(|exchange| !exchange.request.path.contains("elsewhere")),
        "the agent followed the store's redirect: {:?}",
        store.log()
    );
    assert_serving(&agent, 1);
    assert_eq!(installed(&agent), versions_before);
    assert!(!agent.log().contains("5ecre7"), "{}", agent.log());
    let events = agent.hub_detail(&hub).events;
    assert!(
        events.iter().all(|event| !event.detail.contains("5ecre7")),
        "{events:#?}"
    );
}

/// A configured CA bundle (a private hub's) does not keep the agent from a store whose
/// certificate that CA signed, though the web's roots do not know it: the redirect target is
/// trusted under either. Here the "store" is a TLS hub with a CA of its own, which answers the
/// unsigned request 404: the agent got that far only if the TLS handshake succeeded.
#[test]
fn a_store_under_the_configured_ca_is_reached_over_tls() {
    let store = TestHub::start_tls();
    let ca = store.dir().join("certs").join("ca.pem");
    assert!(ca.exists(), "{} is missing", ca.display());
    let (hub, fleet, proxy, agent) =
        serving_v1_via_proxy(&format!("ca_bundle = {:?}\n", ca.to_string_lossy()));
    fleet.publish_example(&hub, "demo", 2, 2);
    let store_url = store.url();
    assert!(store_url.starts_with("https://localhost:"), "{store_url}");
    {
        let store_url = store_url.clone();
        redirect_downloads(&proxy, move |sha| {
            format!("{store_url}/bucket/{sha}?{STORE_SECRET}")
        });
    }
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);

    let answered = format!("from {store_url}/bucket/");
    let line = wait_until(AGENT_WAIT, "the store's answer in the agent's log", || {
        agent
            .log()
            .lines()
            .find(|line| line.contains(&answered))
            .map(str::to_owned)
    });
    assert!(line.contains(": answered 404"), "{line}");
    assert!(!agent.log().contains("5ecre7"), "{}", agent.log());
    // Network trouble, not a refusal: nothing is reported as refused.
    assert_serving(&agent, 1);
    assert!(
        agent
            .hub_detail(&hub)
            .events
            .iter()
            .all(|event| event.kind != "refused"),
        "a store's answer was reported as a refusal"
    );
}
