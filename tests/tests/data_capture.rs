//! Opt-in data capture under the release keys (issue 26), over real processes: a hub, real
//! agents serving requests through their local inference API, and the operator's CLI.
//!
//! - A hub that asks for capture without a signed allowance gets nothing: allowances under the
//!   threshold or signed by keys the root does not list, served by a hostile hub, are refused and
//!   reported by the agent, and no sample leaves it.
//! - A signed allowance yields samples within its rate and day cap (kept across a restart), with
//!   the dropped tensors absent.
//! - A sample is readable only with the operator's key, and the hub's stored bytes do not hold
//!   the inputs in clear.
//! - An allowance above the protocol's maxima is refused when signed and when uploaded, a
//!   malformed one when uploaded, each with a clear error and nothing stored; captured samples
//!   are listed for `admin` tokens only.
//! - A `while-drift-alert` allowance captures nothing while the device's own drift summary is
//!   not flagged ALERT, and captures drifted requests once it is.
//! - A captured sample is a libsodium sealed box: libsodium itself (PyNaCl's) opens it.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::process::Command;

use outpost_hub::api::{CaptureAllowanceInfo, CaptureInfo};
use outpost_model::example::normal_rows;
use outpost_protocol::capture::{CaptureAllowances, CaptureSample};
use outpost_protocol::trust::{CaptureBody, CaptureTrigger, CaptureVersions};
use outpost_protocol::SecretKey;
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::proxy::{Proxy, Response};
use outpost_tests::{venv_python, wait_until, Run};
use serde_json::Value;

/// A hub with `demo@1` (the example MLP: input `x`, output `y`) rolled out to one agent.
fn serving_agent(hub: &TestHub, fleet: &Fleet, hub_url: Option<&str>) -> TestAgent {
    fleet.publish_example(hub, "demo", 1, 1);
    agent_serving_demo(hub, fleet, hub_url)
}

/// The published `demo@1` rolled out to one agent, reaching the hub at `hub_url` if given.
fn agent_serving_demo(hub: &TestHub, fleet: &Fleet, hub_url: Option<&str>) -> TestAgent {
    fleet.first_rollout(hub, "demo", 1);
    // Allowances are asked for every 200 ms instead of every hour, so one uploaded while the
    // agent runs reaches it within a cycle or two.
    let config = "[sync]\ncapture_interval = \"200ms\"\n";
    let mut agent = match hub_url {
        Some(url) => TestAgent::enroll_at(url, hub, fleet, "site=lab", config),
        None => TestAgent::enroll(hub, fleet, "site=lab", config),
    };
    agent.start();
    agent.wait_status("active", Value::String("demo@1".into()));
    agent
}

fn keygen(hub: &TestHub, dir: &Path) {
    hub.cli(&["capture", "keygen", "--out", &dir.to_string_lossy()])
        .ok();
}

/// `capture sign` of `demo` with `extra` flags, written to `out`.
fn sign_args(fleet: &Fleet, keys: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = [
        "capture",
        "sign",
        "--model",
        "demo",
        "--recipient",
        &keys.join("capture.pub").to_string_lossy(),
        "--root",
        &fleet.root_path.to_string_lossy(),
        "--key",
        &fleet.keys,
        "--out",
        &out.to_string_lossy(),
    ]
    .iter()
    .map(|arg| arg.to_string())
    .collect();
    args.extend(extra.iter().map(|arg| arg.to_string()));
    args
}

fn run(hub: &TestHub, args: &[String]) -> outpost_tests::Run {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    hub.cli(&args)
}

/// Signs allowance 1 of `demo` to the key pair in `keys`: every request, at most
/// `samples_per_day` samples and 1,000,000 bytes a device and day, and `extra` flags. Uploads it
/// and waits for `agent` to accept it.
fn allow_every_request(
    hub: &TestHub,
    fleet: &Fleet,
    agent: &TestAgent,
    keys: &Path,
    samples_per_day: u64,
    extra: &[&str],
) {
    let signed = hub.dir().join("allow-1.bin");
    let samples_per_day = samples_per_day.to_string();
    let mut flags = vec![
        "--sequence",
        "1",
        "--rate-ppm",
        "1000000",
        "--max-samples-per-day",
        &samples_per_day,
        "--max-bytes-per-day",
        "1000000",
    ];
    flags.extend_from_slice(extra);
    run(hub, &sign_args(fleet, keys, &signed, &flags)).ok();
    hub.cli(&["capture", "allow", &signed.to_string_lossy()])
        .ok();
    wait_until(AGENT_WAIT, "the agent to accept the allowance", || {
        agent
            .log()
            .contains("capture allowance 1 of demo accepted")
            .then_some(())
    });
}

/// Waits until the hub holds at least `count` samples of `demo`.
fn wait_for_captures(hub: &TestHub, count: usize) -> Vec<CaptureInfo> {
    wait_until(AGENT_WAIT, &format!("{count} samples at the hub"), || {
        let stored = captures(hub);
        (stored.len() >= count).then_some(stored)
    })
}

/// `capture download` of sample `id` into the hub's directory: the sealed bytes as stored.
fn download(hub: &TestHub, id: u64) -> PathBuf {
    let sample = hub.dir().join(format!("sample-{id}.bin"));
    hub.cli(&[
        "capture",
        "download",
        &id.to_string(),
        "--out",
        &sample.to_string_lossy(),
    ])
    .ok();
    sample
}

/// `capture open` of `sample` with the secret key in `keys`, as JSON.
fn open_sample(hub: &TestHub, keys: &Path, sample: &Path) -> Value {
    let opened = hub
        .cli(&[
            "capture",
            "open",
            "--key",
            &keys.join("capture.key").to_string_lossy(),
            &sample.to_string_lossy(),
        ])
        .ok();
    serde_json::from_str(&opened.stdout).unwrap()
}

/// The values of an opened sample's first input.
fn first_input(opened: &Value) -> Vec<f64> {
    opened["inputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_f64().unwrap())
        .collect()
}

fn captures(hub: &TestHub) -> Vec<CaptureInfo> {
    hub.cli_json(&["capture", "list", "--model", "demo"])
}

fn allowances(hub: &TestHub) -> Vec<CaptureAllowanceInfo> {
    hub.cli_json(&["capture", "allowances"])
}

/// Serves `count` rows through the agent's local API; row `i` is `[i, -i, 0.5, 2]`.
fn serve(agent: &TestAgent, count: usize) {
    let client = http();
    for i in 0..count {
        let i = i as f32;
        let (code, body) = agent.infer(&client, [i, -i, 0.5, 2.0]);
        assert_eq!(code, 200, "{body}");
    }
}

#[test]
fn a_signed_allowance_yields_samples_within_its_rate_and_cap_readable_only_with_the_key() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let mut agent = serving_agent(&hub, &fleet, None);
    let keys = hub.dir().join("capture-keys");
    keygen(&hub, &keys);
    // Every request, at most 3 samples a device and day, output `y` dropped.
    allow_every_request(&hub, &fleet, &agent, &keys, 3, &["--drop-output", "y"]);

    serve(&agent, 6);
    let stored = wait_for_captures(&hub, 3);
    // Two more cycles after the third arrived: the cap held, nothing else came.
    agent.next_status();
    agent.next_status();
    assert_eq!(captures(&hub).len(), 3, "the day's cap of 3 samples");
    assert!(stored
        .iter()
        .all(|sample| sample.allowance == 1 && sample.version == 1));

    // The day's count survives a restart: more requests after it capture nothing.
    agent.sigterm();
    agent.start();
    agent.wait_status("active", Value::String("demo@1".into()));
    serve(&agent, 3);
    agent.next_status();
    agent.next_status();
    assert_eq!(
        captures(&hub).len(),
        3,
        "a restart does not reset the day's cap"
    );

    // The operator's key opens a sample to the request's tensors, `y` dropped.
    let sample = download(&hub, stored[0].id);
    let opened = open_sample(&hub, &keys, &sample);
    assert_eq!(opened["model"], "demo");
    assert_eq!(opened["inputs"][0]["name"], "x");
    assert_eq!(opened["inputs"][0]["shape"], serde_json::json!([1, 4]));
    let row = first_input(&opened);
    assert_eq!(row[2..], [0.5, 2.0], "{opened}");
    assert_eq!(row[0], -row[1], "{opened}");
    assert_eq!(opened["outputs"], serde_json::json!([]), "y is dropped");

    // The stored bytes do not hold the input in clear.
    let sealed = std::fs::read(&sample).unwrap();
    let clear: Vec<u8> = row
        .iter()
        .flat_map(|value| (*value as f32).to_le_bytes())
        .collect();
    assert!(!sealed.windows(clear.len()).any(|window| window == clear));
    assert!(!sealed.windows(8).any(|window| window == &clear[8..16]));

    // Another key cannot open it.
    let other = hub.dir().join("other-keys");
    keygen(&hub, &other);
    hub.cli(&[
        "capture",
        "open",
        "--key",
        &other.join("capture.key").to_string_lossy(),
        &sample.to_string_lossy(),
    ])
    .fails_with("cannot be opened with this key");

    // Samples are for admin tokens only, even sealed.
    let viewer = hub.admin_token("watcher", "viewer");
    hub.cli_as(&viewer.token, &["capture", "list"])
        .fails_with("this needs admin");
}

/// A hostile hub serves allowances the release keys did not sign: one under the threshold (one
/// key of two) and one signed by keys of its own. The agent refuses both, reports why, and no
/// sample leaves it however many requests it serves.
#[test]
fn a_hub_that_asks_for_capture_without_a_signed_allowance_gets_nothing() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let proxy = Proxy::start(&hub.url());
    let agent = serving_agent(&hub, &fleet, Some(&proxy.url()));
    let now = outpost_hub::unix_now();
    let body = |sequence: u64| CaptureBody {
        sequence,
        created: now - 60,
        expires: now + 86_400,
        model: "demo".to_owned(),
        versions: CaptureVersions::All,
        rate_ppm: 1_000_000,
        max_samples_per_day: 100,
        max_bytes_per_day: 1 << 20,
        trigger: CaptureTrigger::Always,
        drop_inputs: Vec::new(),
        drop_outputs: Vec::new(),
        recipient: [7; 32],
    };
    let release = fleet.release_keys();
    let under_threshold = outpost_hub::cli::sign_document(&body(1), &release[..1]).unwrap();
    let strangers = [
        SecretKey::from_seed([0x77; 32]),
        SecretKey::from_seed([0x78; 32]),
    ];
    let unknown_keys = outpost_hub::cli::sign_document(&body(2), &strangers).unwrap();
    let answer = outpost_protocol::encode(&CaptureAllowances {
        allowances: vec![
            serde_bytes::ByteBuf::from(under_threshold),
            serde_bytes::ByteBuf::from(unknown_keys),
        ],
    })
    .unwrap();
    proxy.set_intercept(move |request| {
        (request.path == "/device/v3/capture").then(|| Response {
            status: 200,
            reason: "OK".to_owned(),
            headers: vec![(
                "content-type".to_owned(),
                "application/x-outpost-postcard".to_owned(),
            )],
            body: answer.clone(),
        })
    });
    let refusals = wait_until(AGENT_WAIT, "the agent to report both refusals", || {
        let refused: Vec<String> = agent
            .hub_detail(&hub)
            .events
            .into_iter()
            .filter(|event| {
                event.kind == "refused" && event.detail.starts_with("capture allowance refused")
            })
            .map(|event| event.detail)
            .collect();
        (refused.len() >= 2).then_some(refused)
    });
    assert!(
        refusals.iter().all(|detail| detail.contains("2 required")),
        "{refusals:?}"
    );
    assert!(
        refusals
            .iter()
            .any(|detail| detail.contains("2 by unknown keys")),
        "{refusals:?}"
    );

    serve(&agent, 10);
    agent.next_status();
    agent.next_status();
    assert!(captures(&hub).is_empty());
    assert!(
        proxy
            .log()
            .iter()
            .all(|exchange| exchange.request.path != "/device/v3/captures"),
        "no upload of samples"
    );
}

/// Bad allowances get a clear error and change nothing: above the maxima (refused when signed,
/// and when an allowance signed around the CLI is uploaded), malformed, or not above the latest.
#[test]
fn bad_allowances_are_refused_with_a_clear_error_and_change_nothing() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    let keys = hub.dir().join("capture-keys");
    keygen(&hub, &keys);
    let out = hub.dir().join("over.bin");
    run(
        &hub,
        &sign_args(
            &fleet,
            &keys,
            &out,
            &[
                "--sequence",
                "1",
                "--rate-ppm",
                "1000",
                "--max-samples-per-day",
                "10001",
                "--max-bytes-per-day",
                "1000",
            ],
        ),
    )
    .fails_with("max_samples_per_day is 10001, above the protocol's maximum of 10000");
    assert!(!out.exists(), "nothing signed");

    // Signed by the release keys around the CLI's check: the hub refuses it.
    let now = outpost_hub::unix_now();
    let over = fleet.sign(&CaptureBody {
        sequence: 1,
        created: now - 60,
        expires: now + 86_400,
        model: "demo".to_owned(),
        versions: CaptureVersions::All,
        rate_ppm: 1000,
        max_samples_per_day: 10,
        max_bytes_per_day: 65 * 1024 * 1024,
        trigger: CaptureTrigger::Always,
        drop_inputs: Vec::new(),
        drop_outputs: Vec::new(),
        recipient: [7; 32],
    });
    std::fs::write(&out, over).unwrap();
    hub.cli(&["capture", "allow", &out.to_string_lossy()])
        .fails_with("capture allowance refused: capture allowance max_bytes_per_day is 68157440, above the protocol's maximum of 67108864");

    let junk = hub.dir().join("junk.bin");
    std::fs::write(&junk, b"not an allowance").unwrap();
    hub.cli(&["capture", "allow", &junk.to_string_lossy()])
        .fails_with("cannot decode signed capture allowance");
    assert!(allowances(&hub).is_empty());

    // A good one is stored; the same sequence again is refused.
    let good = hub.dir().join("good.bin");
    let args = sign_args(
        &fleet,
        &keys,
        &good,
        &[
            "--sequence",
            "1",
            "--rate-ppm",
            "1000",
            "--max-samples-per-day",
            "10",
            "--max-bytes-per-day",
            "100000",
        ],
    );
    run(&hub, &args).ok();
    hub.cli(&["capture", "allow", &good.to_string_lossy()]).ok();
    hub.cli(&["capture", "allow", &good.to_string_lossy()])
        .fails_with("is not above the latest allowance 1 of model demo");
    let stored = allowances(&hub);
    assert_eq!(stored.len(), 1);
    assert_eq!((stored[0].sequence, stored[0].max_samples_per_day), (1, 10));
}

/// Allowances change seldom: with the default `capture_interval` (an hour) an agent asks for
/// them in its first cycle and not again in the cycles after, so capture costs no request per
/// poll. Counted at a proxy in front of the hub over five more check-ins.
#[test]
fn allowances_are_asked_for_once_an_interval_not_every_cycle() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let proxy = Proxy::start(&hub.url());
    fleet.publish_example(&hub, "demo", 1, 1);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll_at(&proxy.url(), &hub, &fleet, "site=lab", "");
    agent.start();
    agent.wait_status("active", Value::String("demo@1".into()));
    let count = |path: &str| {
        proxy
            .log()
            .iter()
            .filter(|exchange| exchange.request.path == path)
            .count()
    };
    wait_until(AGENT_WAIT, "the agent to ask for allowances", || {
        (count("/device/v3/capture") > 0).then_some(())
    });
    let check_ins = count("/device/v3/checkin");
    wait_until(AGENT_WAIT, "five more check-ins", || {
        (count("/device/v3/checkin") >= check_ins + 5).then_some(())
    });
    assert_eq!(
        count("/device/v3/capture"),
        1,
        "asked for allowances again within five check-ins"
    );
}

/// How far the drifted requests' x1 and x3 are shifted: three standard deviations, so the device
/// flags ALERT once its hour holds enough values to judge.
const SHIFT: f32 = 3.0;

/// Issue 26: `trigger = while-drift-alert` over real processes. The agent merges the flushed parts
/// of its hour's telemetry window and judges the merge against the model's signed profile, taking
/// an ALERT only once the hour holds about 200 values (`note_drift` and `enough_values` in
/// `agent/src/sync/capture_sync.rs`); it captures a request only while that holds.
///
/// First, in-profile traffic in the two shapes that used to be flagged: rows each sent alone and
/// waited for at the hub (counted in its drift report), so every flushed part holds one row, then
/// bursts of 15 rows, each flushed as a part of its own. Judged part by part, bursts like these
/// were flagged ALERT by PSI's empty bins and captured. After a cycle that finished past the last
/// row's telemetry (which seals and uploads what the requests before it captured), the hub has no
/// sample. Then rows with x1 and x3 shifted by [`SHIFT`] until samples arrive: exactly the day's
/// cap of them, each of a drifted row.
#[test]
fn a_drift_triggered_allowance_captures_only_once_the_devices_own_summary_alerts() {
    const IN_PROFILE_ROWS: usize = 12;
    // 132 in-profile rows in all: below the 200 or so the device needs to judge its hour.
    const BURSTS: usize = 8;
    const BURST_ROWS: usize = 15;
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    let agent = agent_serving_demo(&hub, &fleet, None);
    let keys = hub.dir().join("capture-keys");
    keygen(&hub, &keys);
    allow_every_request(
        &hub,
        &fleet,
        &agent,
        &keys,
        3,
        &["--trigger", "while-drift-alert"],
    );
    assert_eq!(allowances(&hub)[0].trigger, "while-drift-alert");

    let client = http();
    let serve_row = |row: &[f32]| {
        let (code, body) = agent.infer(&client, [row[0], row[1], row[2], row[3]]);
        assert_eq!(code, 200, "{body}");
    };
    for (index, row) in normal_rows(4, IN_PROFILE_ROWS, 1, 0.0)
        .chunks(4)
        .enumerate()
    {
        serve_row(row);
        // Its telemetry reached the hub: the part it was flushed in holds it alone.
        hub.drift_report_of("demo", &["--version", "1"], index as u64 + 1);
    }
    let mut served = IN_PROFILE_ROWS;
    for burst in 0..BURSTS {
        for row in normal_rows(4, BURST_ROWS, 50 + burst as u64, 0.0).chunks(4) {
            serve_row(row);
        }
        served += BURST_ROWS;
        hub.drift_report_of("demo", &["--version", "1"], served as u64);
    }
    agent.next_status();
    agent.next_status();
    assert!(
        captures(&hub).is_empty(),
        "captured while the device's own summary was not flagged ALERT"
    );

    let mut drifted: Vec<Vec<f32>> = Vec::new();
    let mut seed = 100;
    let stored = wait_until(AGENT_WAIT, "samples of drifted requests", || {
        seed += 1;
        for row in normal_rows(4, 20, seed, 0.0).chunks(4) {
            let row = vec![row[0], row[1] + SHIFT, row[2], row[3] + SHIFT];
            serve_row(&row);
            drifted.push(row);
        }
        let stored = captures(&hub);
        (stored.len() >= 3).then_some(stored)
    });
    // More drifted requests and two more cycles: the day's cap held.
    for row in normal_rows(4, 20, 99, 0.0).chunks(4) {
        serve_row(&[row[0], row[1] + SHIFT, row[2], row[3] + SHIFT]);
    }
    agent.next_status();
    agent.next_status();
    assert_eq!(captures(&hub).len(), 3, "the day's cap of 3 samples");
    for info in &stored {
        let opened = open_sample(&hub, &keys, &download(&hub, info.id));
        let row: Vec<f32> = first_input(&opened)
            .into_iter()
            .map(|value| value as f32)
            .collect();
        assert!(
            drifted.contains(&row),
            "a sample of a row not drifted: {opened}"
        );
    }
}

/// Issue 26: a sample the real agent sealed and the hub stored is a libsodium sealed box. Its
/// bytes from `capture download` are opened by libsodium itself (the copy PyNaCl's wheel bundles,
/// `SealedBox.decrypt`) with the secret key `capture keygen` wrote, to the same bytes the Rust
/// side opens: a `CaptureSample` frame of the request served. Another key's `decrypt` fails, so
/// the check is not vacuous. PyNaCl comes from `cargo xtask install`; without it this fails
/// naming that command.
#[test]
fn libsodium_opens_a_sample_the_agent_sealed() {
    const OPEN: &str = "import sys\n\
        from nacl.public import PrivateKey, SealedBox\n\
        key = PrivateKey(bytes.fromhex(open(sys.argv[1]).read().strip()))\n\
        sealed = open(sys.argv[2], 'rb').read()\n\
        print(SealedBox(key).decrypt(sealed).hex())\n";
    let python = venv_python();
    let found = Run::of(Command::new(&python).args(["-c", "import nacl.public"]));
    assert!(
        found.success,
        "PyNaCl is missing from {}: `cargo xtask install` installs it\n{}",
        python.display(),
        found.stderr
    );
    let libsodium_open = |key: &Path, sample: &Path| {
        Run::of(
            Command::new(&python)
                .args(["-c", OPEN])
                .arg(key.join("capture.key"))
                .arg(sample),
        )
    };

    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let agent = serving_agent(&hub, &fleet, None);
    let keys = hub.dir().join("capture-keys");
    keygen(&hub, &keys);
    allow_every_request(&hub, &fleet, &agent, &keys, 1, &[]);
    let row = [1.5f32, -2.25, 0.5, 2.0];
    let (code, body) = agent.infer(&http(), row);
    assert_eq!(code, 200, "{body}");
    let stored = wait_for_captures(&hub, 1);
    let sample = download(&hub, stored[0].id);

    let opened = libsodium_open(&keys, &sample).ok();
    let plaintext = hex::decode(opened.stdout.trim()).unwrap();
    let mut secret = [0u8; 32];
    let secret_hex = std::fs::read_to_string(keys.join("capture.key")).unwrap();
    hex::decode_to_slice(secret_hex.trim(), &mut secret).unwrap();
    let sealed = std::fs::read(&sample).unwrap();
    assert_eq!(
        plaintext,
        outpost_protocol::capture::open(&secret, &sealed).unwrap(),
        "libsodium and the hub's CLI open the sample to other bytes"
    );
    let decoded: CaptureSample = outpost_protocol::decode(&plaintext).unwrap();
    assert_eq!((decoded.model.as_str(), decoded.version), ("demo", 1));
    let served: Vec<u8> = row.iter().flat_map(|value| value.to_le_bytes()).collect();
    assert_eq!(decoded.inputs[0].name, "x");
    assert_eq!(decoded.inputs[0].data, served);
    let cli = open_sample(&hub, &keys, &sample);
    assert_eq!(first_input(&cli), row.map(f64::from));

    let other = hub.dir().join("other-keys");
    keygen(&hub, &other);
    let refused = libsodium_open(&other, &sample);
    assert!(
        !refused.success && refused.stderr.contains("CryptoError"),
        "libsodium opened a sample with another key: {refused:?}"
    );
}
