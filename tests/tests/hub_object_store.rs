//! Artifacts in S3-compatible object storage (issue 24): a real S3 server (Garage, installed by
//! `cargo xtask install`), real `serve` processes on a real PostgreSQL, and real agents.
//!
//! - Two replicas share one bucket: a model published through one is downloaded by an agent of
//!   the other from a presigned URL of the store, which the agent follows under its usual download
//!   rules; no artifact lands in the hubs' data directory and no byte passes through a hub.
//! - A model larger than one part of an upload (8 MiB) goes to the bucket as a multipart upload,
//!   and an agent downloads it whole from a presigned URL, checks it and serves it.
//! - The third fault: the object store is unreachable. Publishing fails with an error
//!   naming the store, the device keeps its model and serves it, and nothing half-written is
//!   visible once the store is back: the failed version's artifacts are absent, and publishing it
//!   again then succeeds.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use outpost_tests::agent::{http, TestAgent};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::postgres::Postgres;
use outpost_tests::proxy::{Proxy, Response};
use outpost_tests::s3::S3;
use outpost_tests::wait_until;
use serde_json::{json, Value};

/// Bound on an agent reaching a state.
const AGENT_WAIT: Duration = Duration::from_secs(120);

/// The bucket prefix the hubs keep artifacts under.
const PREFIX: &str = "models";

/// The active version of model `name` in the agent's status, as `name@version`.
fn active_of(status: &Value, name: &str) -> Option<String> {
    status["models"]
        .as_array()?
        .iter()
        .find(|model| model["name"] == json!(name))?["active"]
        .as_str()
        .map(str::to_owned)
}

fn wait_active(agent: &TestAgent, name: &str, want: &str) {
    wait_until(AGENT_WAIT, &format!("the agent to serve {want}"), || {
        (active_of(&agent.status(), name).as_deref() == Some(want)).then_some(())
    });
}

/// The value of the counter `name` in `/metrics`, 0 when absent.
fn counter(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse().ok())
        .unwrap_or(0)
}

/// `serve` flags keeping artifacts in `s3`'s bucket, devices sent there when `signed`.
fn bucket_args(s3: &S3, endpoint: &str, signed: bool) -> Vec<String> {
    let mut args = vec![
        "--artifacts".to_owned(),
        format!("s3://{}/{PREFIX}", s3.bucket()),
        "--artifacts-endpoint".to_owned(),
        endpoint.to_owned(),
    ];
    if signed {
        args.extend(["--artifact-urls".to_owned(), "signed".to_owned()]);
    }
    args
}

/// Restarts `hub` keeping its artifacts in `s3`'s bucket, reached at `endpoint` (the store's, or
/// a proxy's in front of it), with the store's credentials.
fn move_to_bucket(hub: &mut TestHub, s3: &S3, endpoint: &str, signed: bool) {
    hub.set_serve_env(&[
        ("AWS_ACCESS_KEY_ID", s3.access_key_id()),
        ("AWS_SECRET_ACCESS_KEY", s3.secret_access_key()),
        ("AWS_REGION", s3.region()),
    ]);
    let args = bucket_args(s3, endpoint, signed);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let status = hub.sigterm();
    assert!(status.success(), "{status}: {}", hub.log());
    hub.restart_serving(&args);
    assert!(
        hub.log()
            .contains(&format!("artifacts in s3://{}/{PREFIX}", s3.bucket())),
        "{}",
        hub.log()
    );
}

/// Waits until the bucket holds `want` complete objects (Garage counts them in the background, a
/// moment after each write) and no upload is left unfinished.
fn wait_objects(s3: &S3, want: u64) {
    wait_until(
        AGENT_WAIT,
        &format!("the bucket to hold {want} objects"),
        || {
            (s3.object_count().unwrap() == want && s3.unfinished_uploads().unwrap() == 0)
                .then_some(())
        },
    );
}

/// Files in the hub's own artifact directory: none when the bucket holds them.
fn local_artifacts(hub: &TestHub) -> usize {
    match std::fs::read_dir(hub.data().join("artifacts")) {
        Ok(entries) => entries.count(),
        Err(_) => 0,
    }
}

#[test]
fn replicas_share_one_bucket_and_devices_download_from_presigned_urls() {
    let postgres = Postgres::start().unwrap_or_else(|error| panic!("{error}"));
    let database = postgres.database("fleet").unwrap();
    let s3 = S3::start().unwrap_or_else(|error| panic!("{error}"));
    let mut first = TestHub::start_on_database(&database);
    move_to_bucket(&mut first, &s3, &s3.endpoint(), true);
    let second = first.replica();

    // Published through the first replica: the model and its validation set go to the bucket.
    let fleet = Fleet::new(&first);
    fleet.publish_example(&first, "demo", 1, 1);
    wait_objects(&s3, 2);
    assert_eq!(local_artifacts(&first), 0);
    fleet.first_rollout(&second, "demo", 1);

    // An agent of the second replica is sent to the store for the bytes, checks them against the
    // signed manifest as always, and serves the model.
    let mut agent = TestAgent::enroll(&second, &fleet, "site=lab", "");
    agent.start();
    wait_active(&agent, "demo", "demo@1");
    let (code, body) = agent.infer(&http(), [0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 200, "{body}");
    let metrics = second.fresh_metrics();
    assert!(
        counter(&metrics, "outpost_hub_artifact_redirects_total") >= 2,
        "{metrics}"
    );
    assert_eq!(
        counter(&metrics, "outpost_hub_artifact_bytes_served_total"),
        0,
        "{metrics}"
    );
    // The presigned URL's signature is never written to the agent's log.
    assert!(!agent.log().contains("X-Amz-Signature"), "{}", agent.log());
}

#[test]
fn a_model_larger_than_a_part_is_uploaded_in_parts_and_downloaded_whole() {
    let s3 = S3::start().unwrap_or_else(|error| panic!("{error}"));
    let mut hub = TestHub::start();
    move_to_bucket(&mut hub, &s3, &s3.endpoint(), true);
    let fleet = Fleet::new(&hub);
    // 4 inputs, 600,000 hidden units and 3 outputs: about 19 MB of weights, three parts.
    let out = fleet.publish_example_with(&hub, "big", 1, 1, false, &["--hidden", "600000"]);
    let size = std::fs::metadata(out.join("model.onnx")).unwrap().len();
    assert!(size > 2 * 8 * 1024 * 1024, "the model is {size} bytes");
    wait_objects(&s3, 2);
    assert_eq!(s3.unfinished_multipart_uploads().unwrap(), 0);
    assert_eq!(local_artifacts(&hub), 0);
    fleet.first_rollout(&hub, "big", 1);

    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.start();
    wait_active(&agent, "big", "big@1");
    let (code, body) = agent.infer_row(&http(), "big", &[0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 200, "{body}");
    let model_sha = outpost_protocol::sha256(&std::fs::read(out.join("model.onnx")).unwrap());
    assert!(
        hub.log().contains(&format!(
            "storing {} ({size} bytes) as an upload of 3 parts",
            model_sha.to_hex()
        )),
        "{}",
        hub.log()
    );
    let metrics = hub.fresh_metrics();
    assert_eq!(
        counter(&metrics, "outpost_hub_artifact_bytes_served_total"),
        0,
        "{metrics}"
    );
}

/// Runs `serve` on a data directory of its own with `args` and `AWS_*` set from `s3` (with
/// `secret` as the secret key) until it exits, and returns whether it succeeded and what it wrote
/// to stderr. For a start that must fail: one that does not exit within the bound fails the test,
/// and the process is killed.
fn serve_must_fail(hub: &TestHub, s3: &S3, secret: &str, args: &[String]) -> (bool, String) {
    struct Killed(std::process::Child);
    impl Drop for Killed {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let data = tempfile::tempdir().unwrap();
    let stderr = data.path().join("stderr");
    let child = hub
        .cli_command(&[
            "serve",
            "--data",
            &data.path().join("hub").to_string_lossy(),
        ])
        .args(["--listen", "127.0.0.1:0"])
        .args(args)
        .env("AWS_ACCESS_KEY_ID", s3.access_key_id())
        .env("AWS_SECRET_ACCESS_KEY", secret)
        .env("AWS_REGION", s3.region())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut child = Killed(child);
    let status = wait_until(AGENT_WAIT, "serve to refuse to start", || {
        child.0.try_wait().unwrap()
    });
    (status.success(), std::fs::read_to_string(&stderr).unwrap())
}

/// `serve` lists its bucket once at start: a bucket that does not exist, or credentials the
/// store refuses, stop it with an error naming the store, before it serves anything; a store that
/// cannot be reached yet only warns, since it may come back.
#[test]
fn serve_refuses_a_bucket_that_cannot_work_and_warns_of_an_unreachable_one() {
    let mut s3 = S3::start().unwrap_or_else(|error| panic!("{error}"));
    let hub = TestHub::start();
    let endpoint = s3.endpoint();

    let missing = vec![
        "--artifacts".to_owned(),
        "s3://no-such-bucket/models".to_owned(),
        "--artifacts-endpoint".to_owned(),
        endpoint.clone(),
    ];
    let (started, stderr) = serve_must_fail(&hub, &s3, s3.secret_access_key(), &missing);
    assert!(!started, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "artifact store s3://no-such-bucket/models at {endpoint}: the bucket does not exist"
        )),
        "{stderr}"
    );

    let wrong_key = bucket_args(&s3, &endpoint, false);
    let (started, stderr) = serve_must_fail(&hub, &s3, "not-the-secret", &wrong_key);
    assert!(!started, "{stderr}");
    assert!(
        stderr.contains(&format!(
            "artifact store s3://{}/{PREFIX} at {endpoint}: the store denies these credentials",
            s3.bucket()
        )),
        "{stderr}"
    );

    // The store is down: the hub starts all the same, says so, and serves what needs no
    // artifact; once the store is back, publishing works.
    s3.stop().unwrap();
    let mut down = TestHub::start();
    move_to_bucket(&mut down, &s3, &endpoint, false);
    assert!(
        down.log().contains("listing failed")
            && down
                .log()
                .contains("serving anyway: publishing and downloads fail until it answers"),
        "{}",
        down.log()
    );
    s3.start_again().unwrap();
    let fleet = Fleet::new(&down);
    fleet.publish_example(&down, "demo", 1, 1);
    wait_objects(&s3, 2);
}

#[test]
fn an_unreachable_object_store_fails_publishing_clearly_and_devices_keep_their_models() {
    let mut s3 = S3::start().unwrap_or_else(|error| panic!("{error}"));
    // The hub reaches the store through a proxy, which can fail its writes.
    let proxy = Proxy::start(&s3.endpoint());
    let mut hub = TestHub::start();
    move_to_bucket(&mut hub, &s3, &proxy.url(), false);
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=lab", "");
    agent.start();
    wait_active(&agent, "demo", "demo@1");
    let stored = 2;
    wait_objects(&s3, stored);

    let out = hub.dir().join("model-demo-2");
    let out_arg = out.to_string_lossy().into_owned();
    hub.cli(&["example-model", "--out", &out_arg, "--seed", "2"])
        .ok();
    let args = fleet.publish_args(&out, "demo", 2);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let store = format!(
        "artifact store s3://{}/{PREFIX} at {}",
        s3.bucket(),
        proxy.url()
    );

    // The store fails every write: publishing version 2 fails, naming the store and the step.
    proxy.set_intercept(|request| {
        (request.method == "PUT" || request.method == "POST").then(|| Response {
            status: 503,
            reason: "Service Unavailable".into(),
            headers: Vec::new(),
            body: b"<Error><Code>ServiceUnavailable</Code></Error>".to_vec(),
        })
    });
    let failed = hub.cli(&args);
    assert!(!failed.success, "{}", failed.stdout);
    assert!(
        failed.stderr.contains(&store) && failed.stderr.contains("storing "),
        "the error names the store and the step: {}",
        failed.stderr
    );

    // The store goes away altogether: publishing fails again, naming it.
    s3.stop().unwrap_or_else(|error| panic!("{error}"));
    let failed = hub.cli(&args);
    assert!(!failed.success, "{}", failed.stdout);
    assert!(
        failed.stderr.contains(&store) && failed.stderr.contains("failed: "),
        "the error names the store: {}",
        failed.stderr
    );
    let models: Value = hub.cli_json(&["model", "list"]);
    assert_eq!(
        models,
        json!([{"name": "demo", "latest_version": 1, "versions": 1}]),
        "only version 1 is published"
    );

    // The device keeps its model and serves it, checking in as before.
    let checked_in = agent.hub_detail(&hub).device.last_checkin;
    wait_until(AGENT_WAIT, "another check-in", || {
        (agent.hub_detail(&hub).device.last_checkin > checked_in).then_some(())
    });
    assert_eq!(
        active_of(&agent.status(), "demo").as_deref(),
        Some("demo@1")
    );
    let (code, body) = agent.infer(&http(), [0.5, -1.0, 2.0, 0.0]);
    assert_eq!(code, 200, "{body}");

    // Back, the store holds only what was complete before: nothing of version 2 is visible, so
    // the hub counts its artifacts absent and publishing again uploads them and succeeds.
    s3.start_again().unwrap_or_else(|error| panic!("{error}"));
    proxy.set_intercept(|_| None);
    assert_eq!(s3.object_count().unwrap(), stored);
    assert_eq!(s3.unfinished_uploads().unwrap(), 0);
    hub.cli(&args).ok();
    wait_objects(&s3, stored + 2);
    assert_eq!(local_artifacts(&hub), 0);
}
