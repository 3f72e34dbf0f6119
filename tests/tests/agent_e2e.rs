//! The real agent against a real hub: enrollment, activation under probation, the local inference
//! API through a version change, reverts after failed validation and after a crash in probation,
//! telemetry through a hub outage and a full cache, and, through a proxy between agent and hub,
//! a download broken off and resumed. Attacks by a hostile hub are in `hostile_hub.rs`.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use outpost_hub::api::ModelVersionInfo;
use outpost_protocol::device::StatusReport;
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Exchange, Proxy, Verdict};
use outpost_tests::wait_until;
use serde_json::{json, Value};

/// A hub with demo@1 published and rolled out, and an agent serving it.
fn serving_v1() -> (TestHub, Fleet, TestAgent) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.start();
    agent.wait_status("active", json!("demo@1"));
    (hub, fleet, agent)
}

#[test]
fn enrolls_activates_and_serves_inference() {
    let (hub, _fleet, agent) = serving_v1();
    let client = http();
    let ready = client
        .get(format!("http://{}/v2/health/ready", agent.listen))
        .call()
        .unwrap();
    assert_eq!(ready.status().as_u16(), 200);
    let (status, body) = agent.infer(&client, [0.5, -1.0, 2.0, 0.25]);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"], "1");
    assert_eq!(body["outputs"][0]["shape"], json!([1, 3]));
    let sum: f64 = body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .sum();
    assert!((sum - 1.0).abs() < 1e-4, "softmax row sums to {sum}");
    // The hub counts the device a success only once it committed. The agent reports the commit
    // after it wrote the status file that shows it, so the report may still be on its way.
    wait_until(AGENT_WAIT, "the hub to count the commit", || {
        let rollout = hub.rollout(1);
        assert_eq!(rollout.stages[0].failed, 0, "{rollout:?}");
        (rollout.stages[0].succeeded == 1).then_some(())
    });
    // The hub learns what the device runs from its next check-in.
    let detail = wait_until(AGENT_WAIT, "the hub to see demo@1 active", || {
        let detail = agent.hub_detail(&hub);
        (detail.device.active.as_ref().map(|m| m.version) == Some(1)).then_some(detail)
    });
    let kinds: Vec<&str> = detail.events.iter().map(|e| e.kind.as_str()).collect();
    for kind in ["enrolled", "downloaded", "activating", "committed"] {
        assert!(kinds.contains(&kind), "events {kinds:?} lack {kind}");
    }
}

#[test]
fn a_new_version_under_load_fails_no_request() {
    let (hub, fleet, agent) = serving_v1();
    fleet.publish_example(&hub, "demo", 2, 2);
    let stop = Arc::new(AtomicBool::new(false));
    let versions: Arc<Mutex<BTreeSet<String>>> = Arc::default();
    let agent = Arc::new(agent);
    let client_thread = {
        let (stop, agent, versions) = (stop.clone(), agent.clone(), versions.clone());
        std::thread::spawn(move || {
            let client = http();
            let mut failures = Vec::new();
            let mut sent = 0u32;
            while !stop.load(Ordering::Relaxed) {
                let (status, body) = agent.infer(&client, [1.0, 2.0, 3.0, 4.0]);
                sent += 1;
                if status == 200 {
                    let version = body["model_version"].as_str().unwrap_or("?").to_owned();
                    versions.lock().unwrap().insert(version);
                } else {
                    failures.push((status, body));
                }
            }
            (sent, failures)
        })
    };
    // Requests straddle the swap: some are answered before it, and some after it.
    let answered_by = |version: &str| {
        wait_until(
            AGENT_WAIT,
            &format!("a request answered by {version}"),
            || versions.lock().unwrap().contains(version).then_some(()),
        );
    };
    answered_by("1");
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    agent.wait_status("active", json!("demo@2"));
    answered_by("2");
    stop.store(true, Ordering::Relaxed);
    let (sent, failures) = client_thread.join().unwrap();
    let versions = versions.lock().unwrap().clone();
    assert!(
        failures.is_empty(),
        "{} of {sent} requests failed: {:?}",
        failures.len(),
        &failures[..failures.len().min(3)]
    );
    assert!(
        versions.contains("1") && versions.contains("2"),
        "served versions {versions:?} over {sent} requests"
    );
    assert_eq!(agent.status()["previous"], json!(["demo@1"]));
}

#[test]
fn a_candidate_failing_validation_is_reverted_and_reported() {
    let (hub, fleet, agent) = serving_v1();
    fleet.publish_unvalidated(&hub, "demo", 2);
    fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &["--stages", "100", "--bake", "1s", "--on-breach", "rollback"],
    );
    let detail = wait_until(
        AGENT_WAIT,
        "the device to report the failed candidate",
        || {
            let detail = agent.hub_detail(&hub);
            detail
                .events
                .iter()
                .any(|e| e.kind == "failed")
                .then_some(detail)
        },
    );
    let failed = detail.events.iter().find(|e| e.kind == "failed").unwrap();
    assert!(failed.detail.contains("validation"), "{failed:?}");
    assert_eq!(failed.model.as_ref().map(|m| m.version), Some(2));
    // The device kept serving the old version throughout.
    let status = agent.status();
    assert_eq!(status["active"], "demo@1");
    assert_eq!(status["pending"], Value::Null);
    let (code, body) = agent.infer(&http(), [1.0, 0.0, 0.0, 0.0]);
    assert_eq!((code, body["model_version"].clone()), (200, json!("1")));
    // And the rollout, with one of one device failed, rolled back.
    wait_until(AGENT_WAIT, "the rollout to roll back", || {
        (hub.rollout(2).state == outpost_hub::api::RolloutState::RolledBack).then_some(())
    });
}

const STATUS: &str = "/device/v1/status";

/// An agent serving demo@1, in probation of demo@2 under plan 2, with `extra` in its config.
/// A proxy between it and the hub holds the hub's answer to the first status report about plan
/// 2: the agent sends it once the probation marker is on its disk, and before it loads the
/// candidate, so the agent stays in probation however fast probation would go, until the
/// returned flag is cleared. The agent waits for that answer longer than a test takes.
fn in_probation_of_demo_2(extra: &str) -> (TestHub, Proxy, Arc<AtomicBool>, TestAgent) {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let proxy = Proxy::start(&hub.url());
    let hold = Arc::new(AtomicBool::new(false));
    let holding = Arc::new(AtomicBool::new(false));
    {
        let (hold, holding) = (hold.clone(), holding.clone());
        proxy.set_hook(move |request, response| {
            if request.path == STATUS && hold.load(Ordering::SeqCst) {
                let report: StatusReport = outpost_protocol::decode(&request.body).unwrap();
                if report.plan_sequence == Some(2) {
                    holding.store(true, Ordering::SeqCst);
                    let held_since = Instant::now();
                    while hold.load(Ordering::SeqCst) && held_since.elapsed() < AGENT_WAIT {
                        std::thread::sleep(Duration::from_millis(10));
                    }
                }
            }
            Verdict::Forward(response)
        });
    }
    let mut agent = TestAgent::enroll_at(
        &proxy.url(),
        &hub,
        &fleet,
        "site=lab",
        &format!("[sync]\nread_timeout = \"10m\"\n{extra}"),
    );
    agent.start();
    agent.wait_status("active", json!("demo@1"));
    hold.store(true, Ordering::SeqCst);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    wait_until(AGENT_WAIT, "the agent to report the candidate", || {
        holding.load(Ordering::SeqCst).then_some(())
    });
    agent.wait_status("pending", json!("demo@2"));
    (hub, proxy, hold, agent)
}

#[test]
fn a_crash_during_probation_reverts_at_restart() {
    let (hub, _proxy, hold, mut agent) = in_probation_of_demo_2("");
    agent.kill9();
    hold.store(false, Ordering::SeqCst);
    // Start again without the hub offering anything new: the marker alone must revert.
    agent.start();
    agent.wait_status("pending", Value::Null);
    assert_eq!(agent.status()["active"], "demo@1");
    let (code, body) = agent.infer(&http(), [0.0, 1.0, 0.0, 1.0]);
    assert_eq!((code, body["model_version"].clone()), (200, json!("1")));
    let detail = wait_until(AGENT_WAIT, "the revert to be reported", || {
        let detail = agent.hub_detail(&hub);
        detail
            .events
            .iter()
            .any(|e| e.kind == "rolled_back")
            .then_some(detail)
    });
    let event = detail
        .events
        .iter()
        .find(|e| e.kind == "rolled_back")
        .unwrap();
    assert!(
        event.detail.contains("restarted during probation"),
        "{event:?}"
    );
}

/// Inferences the hub has counted for the device on demo@`version`.
fn hub_count(hub: &TestHub, agent: &TestAgent, version: u64) -> u64 {
    agent
        .hub_detail(hub)
        .inferences
        .iter()
        .filter(|counts| counts.model.name == "demo" && counts.model.version == version)
        .map(|counts| counts.count)
        .sum()
}

fn infer_n(agent: &TestAgent, n: usize) {
    let client = http();
    for i in 0..n {
        let (status, body) = agent.infer(&client, [i as f32, 1.0, 0.0, -1.0]);
        assert_eq!(status, 200, "{body}");
    }
}

#[test]
fn telemetry_survives_a_hub_outage_and_arrives_exactly_once() {
    let (mut hub, _fleet, mut agent) = serving_v1();
    infer_n(&agent, 25);
    wait_until(AGENT_WAIT, "the first 25 inferences at the hub", || {
        (hub_count(&hub, &agent, 1) == 25).then_some(())
    });

    // The hub goes away for the rest of the window; the agent keeps serving and caching.
    assert!(hub.sigterm().success());
    infer_n(&agent, 40);
    wait_until(
        AGENT_WAIT,
        "the agent to cache telemetry while the hub is down",
        || {
            let status = agent.status();
            (status["queued_windows"].as_u64().unwrap_or(0) > 0 && !status["last_error"].is_null())
                .then_some(())
        },
    );
    // The agent restarts too (a power cycle) before the hub returns: the cache is on disk.
    assert!(agent.sigterm().success());
    hub.restart();
    agent.point_at(&hub.url());
    agent.start();
    wait_until(AGENT_WAIT, "all 65 inferences at the hub", || {
        (hub_count(&hub, &agent, 1) >= 65).then_some(())
    });
    agent.wait_status("queued_windows", json!(0));
    // Resends after acknowledgements must not count again: the total stays exact through a
    // further cycle, which would upload anything still (or again) queued.
    agent.next_status();
    assert_eq!(hub_count(&hub, &agent, 1), 65);
}

/// A tiny cache through an outage: same-day windows roll up into daily ones instead of being
/// dropped, so the cache stays within its cap and the hub still gets every inference. (Dropping
/// the oldest windows with exact counts, once roll-ups no longer suffice, is pinned on real files
/// in `agent/tests/cache.rs`.)
#[test]
fn a_small_cache_stays_under_its_cap_without_losing_inferences() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "", "[storage]\ntelemetry_cap = \"4KiB\"");
    agent.start();
    agent.wait_status("active", json!("demo@1"));
    let mut hub = hub;
    assert!(hub.sigterm().success());
    // One inference per telemetry flush, so each lands in its own cached record.
    for _ in 0..40 {
        infer_n(&agent, 1);
        std::thread::sleep(std::time::Duration::from_millis(350));
    }
    assert!(agent.sigterm().success());
    let status = agent.status();
    assert!(status["queue_bytes"].as_u64().unwrap() <= 4096, "{status}");
    assert_eq!(status["dropped_records"], 0, "{status}");
    hub.restart();
    agent.point_at(&hub.url());
    agent.start();
    agent.wait_status("queued_windows", json!(0));
    wait_until(AGENT_WAIT, "all 40 inferences at the hub", || {
        (hub_count(&hub, &agent, 1) == 40).then_some(())
    });
    assert_eq!(agent.hub_detail(&hub).dropped_records, 0);
}

#[test]
fn a_corrupted_cache_is_quarantined_and_the_agent_recovers() {
    let (hub, _fleet, mut agent) = serving_v1();
    assert!(agent.sigterm().success());
    let cache = agent.data().join("telemetry");
    let mut corrupted = 0;
    for entry in std::fs::read_dir(&cache).unwrap() {
        let path = entry.unwrap().path();
        if path.is_file() {
            std::fs::write(&path, b"\xff\xfenot a sled file at all\x00\x01").unwrap();
            corrupted += 1;
        }
    }
    assert!(corrupted > 0, "no files in {}", cache.display());
    agent.start();
    let (code, _) = agent.infer(&http(), [1.0, 1.0, 1.0, 1.0]);
    assert_eq!(code, 200, "inference keeps working");
    let quarantined: Vec<String> = std::fs::read_dir(agent.data())
        .unwrap()
        .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|name| name.starts_with("telemetry.quarantined-"))
        .collect();
    assert_eq!(quarantined.len(), 1, "{quarantined:?}");
    let detail = wait_until(AGENT_WAIT, "the quarantine to be reported", || {
        let detail = agent.hub_detail(&hub);
        detail
            .events
            .iter()
            .any(|e| e.detail.contains("quarantined"))
            .then_some(detail)
    });
    assert!(detail.events.iter().any(|e| e.kind == "failed"));
    // The new cache works: the inference above reaches the hub.
    wait_until(AGENT_WAIT, "telemetry from the new cache", || {
        (hub_count(&hub, &agent, 1) >= 1).then_some(())
    });
}

const ARTIFACTS: &str = "/device/v1/artifacts/";

#[test]
fn an_interrupted_download_resumes_where_it_stopped() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    let proxy = Proxy::start(&hub.url());
    // The first answer for each artifact breaks off halfway through its body.
    let mut cut = HashSet::new();
    proxy.set_hook(move |request, response| {
        if request.path.starts_with(ARTIFACTS)
            && response.status == 200
            && cut.insert(request.path.clone())
        {
            let half = response.body.len() / 2;
            return Verdict::Cut(response, half);
        }
        Verdict::Forward(response)
    });
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "site=lab", "");
    agent.start();
    fleet.first_rollout(&hub, "demo", 1);
    agent.wait_status("active", json!("demo@1"));

    // The proxy logs an exchange once it has closed the connection, which may be after the agent
    // read the whole body and went on to commit: wait for both downloads of every artifact.
    let published: ModelVersionInfo = hub.cli_json(&["model", "show", "demo@1"]);
    let paths: Vec<String> = published
        .artifacts
        .iter()
        .map(|artifact| format!("{ARTIFACTS}{}", artifact.sha256))
        .collect();
    let by_artifact = wait_until(AGENT_WAIT, "every download in the proxy's log", || {
        let mut by_artifact: BTreeMap<String, Vec<Exchange>> = BTreeMap::new();
        for exchange in proxy.log() {
            if exchange.request.path.starts_with(ARTIFACTS) {
                by_artifact
                    .entry(exchange.request.path.clone())
                    .or_default()
                    .push(exchange);
            }
        }
        paths
            .iter()
            .all(|path| {
                by_artifact
                    .get(path)
                    .is_some_and(|logged| logged.len() >= 2)
            })
            .then_some(by_artifact)
    });
    for (path, exchanges) in &by_artifact {
        // In the order they were made (the log has them in the order they ended).
        let mut exchanges = exchanges.clone();
        exchanges.sort_by_key(|exchange| exchange.request.header("range").is_some());
        let [first, resumed] = exchanges.as_slice() else {
            panic!("{path}: expected a cut download and one resumption: {exchanges:#?}");
        };
        let length = first.body_len;
        assert!(length > 1, "{path} is {length} bytes");
        assert_eq!(first.request.header("range"), None, "{path}");
        assert_eq!(first.body_sent, length / 2, "{path}");
        // The second request asks only for what is missing, and gets just that.
        let range = format!("bytes={}-", length / 2);
        assert_eq!(
            resumed.request.header("range"),
            Some(range.as_str()),
            "{path}"
        );
        assert_eq!(resumed.status, 206, "{path}");
        assert_eq!(
            first.body_sent + resumed.body_sent,
            length,
            "{path}: every byte crossed once"
        );
    }
    let (status, _) = agent.infer(&http(), [1.0, 2.0, 3.0, 4.0]);
    assert_eq!(status, 200);
}

/// Issue 21, finding 15: `enroll --hub http://...` sent the enrollment token in clear to any host,
/// past the https-only rule the config's `hub_url` obeys. It is refused before anything is sent,
/// and nothing is written.
#[test]
fn enrolling_over_plain_http_to_another_host_is_refused_before_sending_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        "hub_url = \"https://hub.example.com:8443\"\ntrust_root = \"root.bin\"\ndata_dir = \"data\"\n",
    )
    .unwrap();
    let config_arg = config.to_string_lossy().into_owned();
    // 203.0.113.1 is TEST-NET-3: nothing answers there, so only a refusal before connecting
    // gives this message.
    outpost_tests::run(
        "outpost-agent",
        dir.path(),
        &[
            "enroll",
            "--hub",
            "http://203.0.113.1:8443",
            "--token",
            "ope_secret",
            "--config",
            &config_arg,
        ],
    )
    .fails_with(
        "--hub \"http://203.0.113.1:8443\" uses plain http to a non-loopback host; device \
         traffic must use https",
    );
    assert!(
        !dir.path().join("data").exists(),
        "enroll wrote to the data directory before refusing"
    );
}

/// A directory whose entries not even root may create, rename or remove (`chattr +i`) until this
/// is dropped: a disk that refuses the agent's writes of its state.
struct Immutable(std::path::PathBuf);

impl Immutable {
    fn set(dir: std::path::PathBuf) -> Immutable {
        let status = std::process::Command::new("chattr")
            .arg("+i")
            .arg(&dir)
            .status()
            .expect("running chattr (e2fsprogs)");
        assert!(status.success(), "chattr +i {} failed", dir.display());
        Immutable(dir)
    }
}

impl Drop for Immutable {
    fn drop(&mut self) {
        let _ = std::process::Command::new("chattr")
            .arg("-i")
            .arg(&self.0)
            .status();
    }
}

/// Issue 21, finding 13: with `keep_versions = 0`, a commit whose state could not be saved went
/// on to remove the version it replaced, the one the state on disk still names as active. The
/// agent then died (here SIGKILL), reverted at restart to that version, and found it gone. Now
/// nothing is removed until a state that no longer names it is saved.
#[test]
fn a_commit_that_cannot_be_saved_keeps_the_version_a_restart_reverts_to() {
    let (_hub, _proxy, hold, mut agent) = in_probation_of_demo_2("[storage]\nkeep_versions = 0\n");
    // In probation, its marker saved: from here on the data directory refuses every write.
    let immutable = Immutable::set(agent.data());
    hold.store(false, Ordering::SeqCst);
    wait_until(AGENT_WAIT, "the commit's save to fail", || {
        agent
            .log()
            .contains("saving the commit of demo@2")
            .then_some(())
    });
    agent.kill9();
    drop(immutable);

    agent.start();
    agent.wait_status("pending", Value::Null);
    assert_eq!(agent.status()["active"], "demo@1");
    let (code, body) = agent.infer(&http(), [0.0, 1.0, 0.0, 1.0]);
    assert_eq!(
        (code, body["model_version"].clone()),
        (200, json!("1")),
        "{body}\n{}",
        agent.log()
    );
}

/// A model larger than the device's budget (`storage.max_model_size`) is refused before a byte
/// of it is downloaded, with the sizes in the reason the hub shows, and the device keeps serving
/// what it ran.
#[test]
fn a_model_over_the_device_budget_is_refused_and_changes_nothing() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll(
        &hub,
        &fleet,
        "site=lab",
        "[storage]\nmax_model_size = \"64KiB\"\n",
    );
    agent.start();
    agent.wait_status("active", json!("demo@1"));
    // About 130 KiB of weights: over the budget.
    let dir = fleet.publish_example_with(&hub, "demo", 2, 2, false, &["--hidden", "4096"]);
    let size = std::fs::metadata(dir.join("model.onnx")).unwrap().len();
    assert!(size > 64 * 1024, "{size}");
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    let detail = wait_until(AGENT_WAIT, "the device to refuse demo@2", || {
        let detail = agent.hub_detail(&hub);
        detail
            .events
            .iter()
            .any(|event| event.kind == "refused")
            .then_some(detail)
    });
    let refused = detail
        .events
        .iter()
        .find(|event| event.kind == "refused")
        .unwrap();
    assert_eq!(refused.model.as_ref().map(|m| m.version), Some(2));
    assert!(
        refused.detail.contains(&format!(
            "model is {size} bytes, over this device's max_model_size of 65536"
        )),
        "{refused:?}"
    );
    let status = agent.status();
    assert_eq!(status["active"], "demo@1", "{status:#}");
    assert_eq!(status["pending"], Value::Null, "{status:#}");
    let (code, body) = agent.infer(&http(), [1.0, 0.0, 0.0, 0.0]);
    assert_eq!((code, body["model_version"].clone()), (200, json!("1")));
    assert!(
        !agent
            .data()
            .join("downloads")
            .read_dir()
            .is_ok_and(|mut entries| entries.next().is_some()),
        "nothing of demo@2 was downloaded"
    );
}
