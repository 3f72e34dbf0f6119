//! Drift end to end: hostile drift summaries refused over real HTTP without touching what the hub
//! stored; and real agents, a canary group of them fed shifted inputs, whose drift the hub
//! reports per feature and label group, exports in `/metrics`, and turns into the rollback of a
//! rollout whose canary stage runs on them.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use outpost_hub::api::{CreatedToken, DeviceDetail, DriftReport, FeatureDriftInfo, RolloutState};
use outpost_model::example::normal_rows;
use outpost_protocol::device::{InferenceWindow, TelemetryAck, TelemetryBatch};
use outpost_protocol::drift::{DriftSummary, FeatureSource, Profile, TensorSide};
use outpost_protocol::envelope::HEADER_LEN;
use outpost_protocol::{sha256, Sha256};
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::device_sim::{summary_window, unix_now, Reply, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;
use serde_json::json;

/// How far the canary group's x1 and x3 are shifted: one and a half standard deviations.
const SHIFT: f32 = 1.5;

/// `drift report --model demo ARGS --json`.
fn report(hub: &TestHub, args: &[&str]) -> DriftReport {
    let mut all = vec!["drift", "report", "--model", "demo"];
    all.extend_from_slice(args);
    hub.cli_json(&all)
}

fn feature<'a>(report: &'a DriftReport, name: &str) -> &'a FeatureDriftInfo {
    report
        .features
        .iter()
        .find(|feature| feature.name == name)
        .unwrap_or_else(|| panic!("the report has no feature {name}: {report:#?}"))
}

/// The demo@1 profile `example-model` wrote, and the hash its manifest signs.
fn load_profile(dir: &std::path::Path) -> (Profile, Sha256) {
    let bytes = std::fs::read(dir.join("profile.bin")).unwrap();
    (outpost_protocol::decode(&bytes).unwrap(), sha256(&bytes))
}

/// A summary of `rows` standard normal input rows from `seed`, as an agent serving demo@1 would
/// make it over the hour starting at `start`.
fn summary(
    profile: &Profile,
    profile_sha256: Sha256,
    start: u64,
    rows: usize,
    seed: u64,
) -> DriftSummary {
    let mut summary = DriftSummary::new("demo", 1, profile_sha256, profile, start, start + 3600);
    for row in normal_rows(4, rows, seed, 0.0).chunks(4) {
        for (feature, counts) in profile.features.iter().zip(summary.features.iter_mut()) {
            if let (TensorSide::Input, FeatureSource::Column { index, .. }) =
                (feature.side, &feature.source)
            {
                counts.observe(f64::from(row[*index as usize]), &feature.edges);
            }
        }
    }
    summary
}

fn window(model: &str, version: u64, start: u64, drift: DriftSummary) -> InferenceWindow {
    let count = drift.features[0].n;
    summary_window(model, version, start, count, drift)
}

/// The drift summary of a window built by [`window`].
fn drift(window: &mut InferenceWindow) -> &mut DriftSummary {
    window.drift.as_mut().unwrap()
}

fn send(device: &SimDevice, sequence: u64, windows: Vec<InferenceWindow>) -> Reply {
    device.send_telemetry(sequence, windows)
}

/// What the hub holds for demo@1 from the device: the drift report's counts and the inference
/// counters.
fn stored(hub: &TestHub, device: &SimDevice) -> (u64, Vec<(String, u64)>, u64) {
    let report = report(hub, &["--version", "1"]);
    let counts = report
        .features
        .iter()
        .map(|feature| (feature.name.clone(), feature.n))
        .collect();
    let detail: DeviceDetail = hub.cli_json(&["device", "show", &device.id.to_hex()]);
    let inferences = detail
        .inferences
        .iter()
        .find(|counts| counts.model.name == "demo" && counts.model.version == 1)
        .map_or(0, |counts| counts.count);
    (report.summaries, counts, inferences)
}

#[test]
fn hostile_summaries_are_refused_whole_and_change_nothing() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    fleet.publish_example(&hub, "demo", 2, 2);
    let (profile, profile_sha256) = load_profile(&dir);
    let token = hub.enroll_token("site=lab", 1);
    let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    let start = unix_now() / 3600 * 3600;
    let good = |seed| {
        window(
            "demo",
            1,
            start,
            summary(&profile, profile_sha256, start, 100, seed),
        )
    };

    let ack: TelemetryAck = send(&device, 1, vec![good(1)]).decode();
    assert!(!ack.duplicate);
    // A resent batch is acknowledged again and stored once.
    let ack: TelemetryAck = send(&device, 1, vec![good(1)]).decode();
    assert!(ack.duplicate);
    let before = stored(&hub, &device);
    assert_eq!(before.0, 1, "{before:?}");
    assert!(before.1.contains(&("x0".to_owned(), 100)), "{before:?}");
    assert_eq!(before.2, 100);

    let hostile = |change: &dyn Fn(&mut InferenceWindow)| {
        let mut window = good(2);
        change(&mut window);
        window
    };
    let features = profile.features.len();
    let cases: Vec<(&str, InferenceWindow, String)> = vec![
        (
            "wrong profile hash",
            hostile(&|w| drift(w).profile_sha256 = Sha256([0xee; 32])),
            "was made against profile eeee".to_owned(),
        ),
        (
            "counts that do not add up",
            hostile(&|w| drift(w).features[1].n += 1),
            "feature 1 (\"x1\"): n is 101 but below + bins + above is 100".to_owned(),
        ),
        (
            "NaN in the moments",
            hostile(&|w| drift(w).features[2].mean = f64::NAN),
            "feature 2 (\"x2\"): mean is NaN, not finite".to_owned(),
        ),
        (
            "oversized bins",
            hostile(&|w| drift(w).features[0].bins = vec![0; 300_000]),
            "feature 0 (\"x0\"): 300000 bins, expected".to_owned(),
        ),
        (
            "too many features",
            hostile(&|w| {
                let extra = drift(w).features[0].clone();
                drift(w).features.resize(1000, extra);
            }),
            format!("1000 feature summaries, expected {features}"),
        ),
        (
            "a version without a profile",
            hostile(&|w| {
                w.version = 2;
                drift(w).version = 2;
            }),
            "drift summary for demo@2, which has no drift profile".to_owned(),
        ),
        (
            "a version that is not published",
            hostile(&|w| {
                w.version = 9;
                drift(w).version = 9;
            }),
            "drift summary for demo@9, which is not published".to_owned(),
        ),
        (
            "another model's summary",
            hostile(&|w| w.version = 2),
            "drift summary is of demo@1, the window of demo@2".to_owned(),
        ),
        (
            "a window not on whole hours",
            hostile(&|w| drift(w).window_end = start + 1800),
            "does not start and end on whole UTC hours".to_owned(),
        ),
    ];
    for (what, bad, needle) in cases {
        // A good window first: the whole batch goes, not only the bad window.
        let reply = send(&device, 2, vec![good(3), bad]);
        let message = reply.error_message();
        assert_eq!(reply.status, 400, "{what}: {message}");
        assert!(message.starts_with("window 1 (demo@"), "{what}: {message}");
        assert!(
            message.contains(&needle),
            "{what}: {message:?} lacks {needle:?}"
        );
        assert_eq!(
            stored(&hub, &device),
            before,
            "{what} changed what the hub stored"
        );
    }

    // Sequence 2 was never recorded as seen: the device's corrected batch is stored in full, its
    // part of the hour merged with the first.
    let ack: TelemetryAck = send(&device, 2, vec![good(3)]).decode();
    assert!(!ack.duplicate);
    let after = stored(&hub, &device);
    assert_eq!(
        after.0, 1,
        "parts of one window merge into one summary: {after:?}"
    );
    assert!(after.1.contains(&("x0".to_owned(), 200)), "{after:?}");
    assert_eq!(after.2, 200);
    // A device's sequences only increase: a new batch below the highest stored one is refused.
    let reply = send(&device, 0, vec![good(4)]);
    let message = reply.error_message();
    assert_eq!(reply.status, 400, "{message}");
    assert!(
        message.contains("batch sequence 0 is below 2, already stored for this device"),
        "{message}"
    );
    assert_eq!(stored(&hub, &device), after);
    // Reports are for viewers and up, and for no one without a token.
    let viewer: CreatedToken = hub.cli_json(&[
        "admin-token",
        "create",
        "--name",
        "watcher",
        "--role",
        "viewer",
    ]);
    let run = hub
        .cli_as(
            &viewer.token,
            &["drift", "report", "--model", "demo", "--json"],
        )
        .ok();
    let as_viewer: DriftReport = serde_json::from_str(&run.stdout).unwrap();
    assert_eq!(as_viewer.summaries, 1);
    let anonymous = http()
        .get(format!("{}/admin/v1/drift/demo", hub.url()))
        .call()
        .unwrap();
    assert_eq!(anonymous.status().as_u16(), 401);
    let text = hub.fresh_metrics();
    assert!(
        text.contains("outpost_hub_drift_samples{model=\"demo\",version=\"1\",feature=\"x0\"} 200"),
        "{text}"
    );
}

/// The hub keeps each summary as its own frame, cut from the batch's frame where postcard put it.
/// A device may write a varint longer than it needs, which postcard reads as the same batch; the
/// cut would then be off by the extra bytes, so the hub must encode the summaries instead. Two
/// devices send the same two windows, one of them with the batch's sequence written a byte
/// longer, and their reports read back the same.
#[test]
fn a_batch_with_a_longer_varint_stores_the_same_summaries() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    let (profile, profile_sha256) = load_profile(&dir);
    let token = hub.enroll_token("site=lab", 2);
    let start = unix_now() / 3600 * 3600;
    // Two windows: where the second summary sits depends on the first's length.
    let windows: Vec<InferenceWindow> = [(start - 3600, 150, 7), (start, 250, 8)]
        .into_iter()
        .map(|(from, rows, seed)| {
            let drift = summary(&profile, profile_sha256, from, rows, seed);
            window("demo", 1, from, drift)
        })
        .collect();
    let batch = TelemetryBatch {
        sequence: 1,
        windows,
        dropped_records: 0,
    };
    let shortest = outpost_protocol::encode(&batch).unwrap();
    assert_eq!(shortest[HEADER_LEN], 1, "sequence 1 as a one-byte varint");
    let mut longer = shortest[..HEADER_LEN].to_vec();
    longer.extend_from_slice(&[0x81, 0x00]);
    longer.extend_from_slice(&shortest[HEADER_LEN + 1..]);
    let read: TelemetryBatch = outpost_protocol::decode(&longer).unwrap();
    assert_eq!(
        read, batch,
        "postcard reads the longer varint as the same batch"
    );

    let mut reports = Vec::new();
    for frame in [&shortest, &longer] {
        let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
        let reply = device.signed_request("POST", "/device/v1/telemetry", Some(frame));
        let ack: TelemetryAck = reply.decode();
        assert!(!ack.duplicate);
        let id = device.id.to_hex();
        let report = report(&hub, &["--version", "1", "--device", &id, "--since", "1d"]);
        assert_eq!(report.summaries, 2, "{report:#?}");
        reports.push(report.features);
    }
    assert_eq!(reports[0], reports[1]);
    let x0 = reports[0].iter().find(|feature| feature.name == "x0");
    assert_eq!(x0.map(|feature| feature.n), Some(400), "{:#?}", reports[0]);
}

/// Devices that serve a few requests an hour send small windows. Ten devices each send one
/// window of 15 rows drawn from demo@1's own profile, and each device's drift report, through
/// the hub's CLI, flags few of their 40 feature verdicts (about one in twenty by chance). Before
/// the flag rule tested for chance, PSI's `EPSILON` for each bin such a window leaves empty
/// flagged nearly all of them; most still have a PSI over the threshold, and are reported not
/// significant.
#[test]
fn small_windows_of_ordinary_traffic_are_not_reported_as_drift() {
    const DEVICES: u64 = 10;
    const ROWS: usize = 15;
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    let (profile, profile_sha256) = load_profile(&dir);
    let token = hub.enroll_token("site=lab", DEVICES as u32);
    let start = unix_now() / 3600 * 3600;
    let mut verdicts = Vec::new();
    for seed in 1..=DEVICES {
        let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
        let drift = summary(&profile, profile_sha256, start, ROWS, 1_000 + seed);
        let ack: TelemetryAck = send(&device, 1, vec![window("demo", 1, start, drift)]).decode();
        assert!(!ack.duplicate);
        let id = device.id.to_hex();
        let report = report(&hub, &["--version", "1", "--device", &id]);
        // The four inputs; the class output, which this window leaves empty, is not judged.
        let numeric: Vec<FeatureDriftInfo> = report
            .features
            .iter()
            .filter(|feature| feature.kind == "numeric")
            .cloned()
            .collect();
        assert_eq!(numeric.len(), 4, "{report:#?}");
        verdicts.extend(numeric);
    }
    for feature in &verdicts {
        assert_eq!(feature.n, ROWS as u64, "{feature:#?}");
        if feature.status != "ok" {
            assert!(feature.significant, "{feature:#?}");
        }
    }
    let flagged = verdicts.iter().filter(|f| f.status != "ok").count();
    assert!(
        flagged <= 6,
        "{flagged} of {} verdicts on ordinary traffic flagged: {verdicts:#?}",
        verdicts.len()
    );
    let saved = verdicts
        .iter()
        .filter(|f| f.status == "ok" && f.value >= f.threshold && !f.significant)
        .count();
    assert!(
        saved * 2 >= verdicts.len(),
        "only {saved} verdicts over their threshold by chance: {verdicts:#?}"
    );
}

/// Sends `rows` standard normal rows from `seed` to the agent's model, with x1 and x3 shifted by
/// [`SHIFT`] when `shifted`.
fn feed(agent: &TestAgent, rows: usize, seed: u64, shifted: bool) {
    let client = http();
    for row in normal_rows(4, rows, seed, 0.0).chunks(4) {
        let mut x = [row[0], row[1], row[2], row[3]];
        if shifted {
            x[1] += SHIFT;
            x[3] += SHIFT;
        }
        let (status, body) = agent.infer(&client, x);
        assert_eq!(status, 200, "{body}");
    }
}

/// Waits until the report for `args` counts `n` values of x0.
fn report_with(hub: &TestHub, args: &[&str], n: u64) -> DriftReport {
    hub.drift_report_of("demo", args, n)
}

#[test]
fn a_drifting_canary_group_is_reported_and_rolls_its_rollout_back() {
    const ROWS: usize = 300;
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    fleet.publish_example_with_profile(&hub, "demo", 2, 2);
    fleet.first_rollout(&hub, "demo", 1);
    let mut canary: Vec<TestAgent> = (0..2)
        .map(|_| TestAgent::enroll(&hub, &fleet, "tier=canary", ""))
        .collect();
    let mut main: Vec<TestAgent> = (0..2)
        .map(|_| TestAgent::enroll(&hub, &fleet, "tier=main", ""))
        .collect();
    for agent in canary.iter_mut().chain(main.iter_mut()) {
        agent.start();
    }
    for agent in canary.iter().chain(&main) {
        agent.wait_status("active", json!("demo@1"));
    }

    for (index, agent) in canary.iter().enumerate() {
        feed(agent, ROWS, 10 + index as u64, true);
    }
    for (index, agent) in main.iter().enumerate() {
        feed(agent, ROWS, 20 + index as u64, false);
    }

    // The canary group's report names the shifted features, and only those of the inputs.
    let canary_report = report_with(&hub, &["--version", "1", "--selector", "tier=canary"], 600);
    assert_eq!(canary_report.devices, 2, "{canary_report:#?}");
    for name in ["x1", "x3"] {
        let drift = feature(&canary_report, name);
        assert_eq!(drift.status, "alert", "{drift:?}");
        assert!(drift.value > 1.0, "{drift:?}");
    }
    for name in ["x0", "x2"] {
        assert_eq!(
            feature(&canary_report, name).status,
            "ok",
            "{canary_report:#?}"
        );
    }
    let severest: Vec<&str> = canary_report.features[..2]
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    assert!(
        severest.contains(&"x1") && severest.contains(&"x3"),
        "{canary_report:#?}"
    );
    assert!(canary_report
        .by_device
        .iter()
        .all(|device| device.status == "alert"));
    let text = hub
        .cli(&[
            "drift",
            "report",
            "--model",
            "demo",
            "--version",
            "1",
            "--selector",
            "tier=canary",
        ])
        .ok()
        .stdout;
    assert!(text.contains("model    demo@1\n"), "{text}");
    assert!(text.contains("ALERT"), "{text}");

    // Without --version, the report is on the latest version with a profile.
    assert_eq!(report(&hub, &[]).version, 2);

    // The other group has not drifted at all.
    let main_report = report_with(&hub, &["--version", "1", "--selector", "tier=main"], 600);
    for drift in &main_report.features {
        assert_eq!(drift.status, "ok", "{main_report:#?}");
    }
    // Over the whole fleet, as /metrics shows it.
    report_with(&hub, &["--version", "1"], 1200);
    let text = hub.fresh_metrics();
    for (name, level) in [("x0", 0), ("x1", 2), ("x2", 0), ("x3", 2)] {
        let line = format!(
            "outpost_hub_drift_status{{model=\"demo\",version=\"1\",feature=\"{name}\"}} {level}\n"
        );
        assert!(text.contains(&line), "{line} missing from\n{text}");
    }
    assert!(
        text.contains(
            "outpost_hub_drift_samples{model=\"demo\",version=\"1\",feature=\"x1\"} 1200"
        ),
        "{text}"
    );

    // A rollout of demo@2 to the canary group, which keeps its shifted inputs.
    let created = fleet.create_rollout(
        &hub,
        "demo",
        2,
        1,
        &[
            "--selector",
            "tier=canary",
            "--stages",
            "100",
            "--bake",
            "1h",
            "--device-timeout",
            "1h",
            "--max-p95-regression-pct",
            "100000",
            "--max-drift-psi",
            "0.25",
            "--on-breach",
            "rollback",
        ],
    );
    for agent in &canary {
        agent.wait_status("active", json!("demo@2"));
    }
    assert_eq!(hub.rollout(created.sequence).state, RolloutState::Active);
    for (index, agent) in canary.iter().enumerate() {
        feed(agent, ROWS, 30 + index as u64, true);
    }

    let rolled_back = wait_until(
        AGENT_WAIT,
        "the drift gate to roll the rollout back",
        || {
            let rollout = hub.rollout(created.sequence);
            (rollout.state == RolloutState::RolledBack).then_some(rollout)
        },
    );
    let decision = rolled_back
        .decisions
        .iter()
        .find(|decision| decision.action == "rollback")
        .unwrap();
    assert_eq!(decision.by, "engine", "{decision:#?}");
    assert!(decision.reason.contains("drift_psi"), "{decision:#?}");
    let figure = decision
        .figures
        .iter()
        .find(|figure| figure.gate == "drift_psi")
        .unwrap();
    assert!(figure.breached, "{figure:#?}");
    assert!(figure.value.unwrap() > 0.25, "{figure:#?}");
    for name in ["x1 psi", "x3 psi"] {
        assert!(figure.detail.contains(name), "{figure:#?}");
    }
    for name in ["x0 psi", "x2 psi"] {
        assert!(!figure.detail.contains(name), "{figure:#?}");
    }
    assert!(figure.detail.contains("vs reference"), "{figure:#?}");
    // Once ended, the rollout lists its drift limit without measuring it.
    let listed = rolled_back
        .gates
        .iter()
        .find(|figure| figure.gate == "drift_psi")
        .unwrap();
    assert_eq!(listed.value, None);
    assert_eq!(listed.detail, "not measured once a rollout is rolled_back");
    // No other gate had a hand in it.
    for other in decision
        .figures
        .iter()
        .filter(|figure| figure.gate != "drift_psi")
    {
        assert!(!other.breached, "{other:#?}");
    }
    for agent in &canary {
        agent.wait_status("active", json!("demo@1"));
    }
}

/// Issue 20: a model with a 2,048-wide input. Its profile is 32 spans, under 64 KiB; a real
/// agent's requests with columns 512..640 shifted are reported as that span's drift, with the
/// bins to recompute the figure; and `/metrics` names only the model's worst features, in fewer
/// than 50 series.
#[test]
fn a_wide_input_keeps_drift_bounded_and_names_the_shifted_span() {
    const WIDTH: usize = 2048;
    const ROWS: usize = 300;
    const SHIFTED: std::ops::Range<usize> = 512..640;
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let dir = fleet.publish_example_with(
        &hub,
        "wide",
        1,
        1,
        true,
        &[
            "--inputs",
            "2048",
            "--hidden",
            "8",
            "--outputs",
            "4",
            "--reference-rows",
            "1000",
        ],
    );
    let bytes = std::fs::read(dir.join("profile.bin")).unwrap();
    assert!(bytes.len() < 64 * 1024, "a {}-byte profile", bytes.len());
    let profile: Profile = outpost_protocol::decode(&bytes).unwrap();
    assert_eq!(profile.features.len(), 32, "{profile:#?}");
    let shown = hub
        .cli(&["inspect", &dir.join("profile.bin").to_string_lossy()])
        .ok()
        .stdout;
    assert!(shown.contains("32 numeric feature(s)"), "{shown}");
    assert!(
        shown.contains("  x.mean[512..640] (Input): 1000 values"),
        "{shown}"
    );

    fleet.first_rollout(&hub, "wide", 1);
    let mut agent = TestAgent::enroll(&hub, &fleet, "", "");
    agent.start();
    agent.wait_status("active", json!("wide@1"));
    let client = http();
    for row in normal_rows(WIDTH, ROWS, 5, 0.0).chunks(WIDTH) {
        let mut x = row.to_vec();
        for value in &mut x[SHIFTED] {
            *value += SHIFT;
        }
        let (status, body) = agent.infer_row(&client, "wide", &x);
        assert_eq!(status, 200, "{body}");
    }

    let report: DriftReport = wait_until(AGENT_WAIT, "the wide model's drift report", || {
        let report: DriftReport = hub.cli_json(&["drift", "report", "--model", "wide"]);
        let counted = report.features.first().map_or(0, |feature| feature.n);
        (counted == ROWS as u64).then_some(report)
    });
    let worst = &report.features[0];
    assert_eq!(
        (worst.name.as_str(), worst.status.as_str()),
        ("x.mean[512..640]", "alert"),
        "{report:#?}"
    );
    for other in &report.features[1..] {
        assert_ne!(other.status, "alert", "{other:#?}");
    }
    // The report carries what its figures are computed from: recomputed here by the formula,
    // zero shares taken as 1e-4, the PSI is the one reported.
    let shares = |counts: &[u64]| -> Vec<f64> {
        let total: u64 = counts.iter().sum();
        counts
            .iter()
            .map(|count| match count {
                0 => 1e-4,
                count => *count as f64 / total as f64,
            })
            .collect()
    };
    assert_eq!(worst.edges.len() + 1, worst.reference_bins.len());
    assert_eq!(worst.current_bins.iter().sum::<u64>(), ROWS as u64);
    assert_eq!(worst.reference_bins.iter().sum::<u64>(), 1000);
    let psi: f64 = shares(&worst.reference_bins)
        .iter()
        .zip(shares(&worst.current_bins))
        .map(|(p, q)| (q - p) * (q / p).ln())
        .sum();
    assert!((psi - worst.psi).abs() < 1e-9, "{psi} vs {worst:#?}");

    let text = hub.fresh_metrics();
    let series = text
        .lines()
        .filter(|line| !line.starts_with('#') && line.contains("model=\"wide\""))
        .count();
    assert!(series < 50, "{series} series of the wide model:\n{text}");
    for line in [
        "outpost_hub_drift_model_status{model=\"wide\",version=\"1\"} 2\n",
        "outpost_hub_drift_features{model=\"wide\",version=\"1\",status=\"alert\"} 1\n",
        "outpost_hub_drift_status{model=\"wide\",version=\"1\",feature=\"x.mean[512..640]\"} 2\n",
    ] {
        assert!(text.contains(line), "{line} missing from\n{text}");
    }
}
