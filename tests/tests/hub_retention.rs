//! Issue 21, finding 10: one device could grow the hub's store without end. Events of up to
//! 8 KiB per status report, inference counters under any model name it made up, and drift
//! summaries and batch markers were kept for good, and it could take any share of the replay
//! cache. Here a device misbehaves for a simulated week against a real hub, and what the hub
//! keeps stays within the retention it documents.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use outpost_hub::api::{DeviceDetail, DriftReport};
use outpost_protocol::device::{
    InferenceWindow, Status, StatusReport, TelemetryAck, TelemetryBatch,
};
use outpost_protocol::drift::Profile;
use outpost_protocol::{sha256, Sha256};
use outpost_tests::device_sim::{drift_window, unix_now, Reply, SimDevice};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;

const HOUR: u64 = 3600;
const DAY: u64 = 24 * HOUR;
/// Events the hub under test keeps per device (`--retain-events`).
const KEEP_EVENTS: usize = 20;
/// Status reports the device sends per simulated hour, each with a reason as long as the frame
/// allows.
const REPORTS_PER_HOUR: usize = 6;
/// Inferences in each window of demo@1.
const ROWS: u64 = 200;

/// Bytes of every file under `dir`.
fn disk_use(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            let meta = entry.metadata().unwrap();
            if meta.is_dir() {
                disk_use(&entry.path())
            } else {
                meta.len()
            }
        })
        .sum()
}

/// The value of the un-labelled series `name` in a Prometheus text.
fn series(text: &str, name: &str) -> Option<u64> {
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
}

/// Sends a signed request until the hub takes it, as a device told to slow down (429: over its
/// share of the replay cache) would; returns the reply and how often it was told to slow down.
fn send_until_taken(device: &SimDevice, path: &str, body: &[u8]) -> (Reply, u64) {
    let mut slowed = 0;
    let reply = wait_until(Duration::from_secs(60), "the hub to take a request", || {
        let reply = device.signed_request("POST", path, Some(body));
        if reply.status == 429 {
            slowed += 1;
            std::thread::sleep(Duration::from_millis(100));
            return None;
        }
        Some(reply)
    });
    (reply, slowed)
}

/// One simulated hour of the misbehaving device: a telemetry batch with its hour's window of
/// demo@1 (a full drift summary) and a window of a model it made up, and reports of the longest
/// reason a report's frame allows. Returns how often the hub told it to slow down.
fn misbehave_for_an_hour(
    device: &SimDevice,
    profile: (&Profile, Sha256),
    sequence: u64,
    start: u64,
) -> u64 {
    let mut made_up = drift_window("demo", 1, profile, start, 1, sequence, &[]);
    made_up.model = format!("made-up-{sequence}");
    made_up.drift = None;
    let windows: Vec<InferenceWindow> = vec![
        drift_window("demo", 1, profile, start, ROWS as usize, sequence, &[]),
        made_up,
    ];
    let batch = outpost_protocol::encode(&TelemetryBatch {
        sequence,
        windows,
        dropped_records: 0,
    })
    .unwrap();
    let (reply, mut slowed) = send_until_taken(device, "/device/v1/telemetry", &batch);
    assert!(!reply.decode::<TelemetryAck>().duplicate);
    for _ in 0..REPORTS_PER_HOUR {
        let report = outpost_protocol::encode(&StatusReport {
            plan_sequence: None,
            manifest: None,
            status: Status::Failed {
                reason: "x".repeat(8000),
            },
            at: unix_now(),
        })
        .unwrap();
        let (reply, more) = send_until_taken(device, "/device/v1/status", &report);
        assert_eq!(
            reply.status,
            204,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
        slowed += more;
    }
    slowed
}

/// Drift summaries of demo@1 from `device` stored for windows ending within two days.
fn stored_summaries(hub: &TestHub, device: &str) -> u64 {
    let report: DriftReport = hub.cli_json(&[
        "drift",
        "report",
        "--model",
        "demo",
        "--version",
        "1",
        "--device",
        device,
        "--since",
        "2d",
    ]);
    report.summaries
}

#[test]
fn a_device_misbehaving_for_a_week_leaves_the_hub_within_its_retention() {
    let keep_events = KEEP_EVENTS.to_string();
    let mut hub = TestHub::start_serving(
        &[],
        &["--retain-events", &keep_events, "--retain-telemetry", "1d"],
    );
    let fleet = Fleet::new(&hub);
    let model_dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    let profile_bytes = std::fs::read(model_dir.join("profile.bin")).unwrap();
    let profile: Profile = outpost_protocol::decode(&profile_bytes).unwrap();
    let profile = (&profile, sha256(&profile_bytes));
    let token = hub.enroll_token("site=lab", 1);
    let device = SimDevice::enroll(&hub.url(), &token, &[], &fleet.root);
    let id = device.id.to_hex();
    let before = disk_use(hub.data());

    // A week of hourly windows, oldest first, all sent now (as a device back from a week
    // offline would send them), as fast as the hub takes them.
    let now = unix_now();
    let first = now / HOUR * HOUR - 7 * DAY;
    let mut slowed = 0;
    for hour in 0..7 * 24 {
        slowed += misbehave_for_an_hour(&device, profile, hour + 1, first + hour * HOUR);
    }
    let after = disk_use(hub.data());
    // Over 1,000 signed requests with timestamps within ten seconds are past one device's share
    // of the replay cache, so it may have been told to slow down (how often depends on how fast
    // this machine is; `server::device` tests the quota itself).
    println!("told to slow down {slowed} times");

    // The newest events only, each reason cut to 1 KiB.
    let detail: DeviceDetail = hub.cli_json(&["device", "show", &id]);
    assert_eq!(detail.events.len(), KEEP_EVENTS, "{:#?}", detail.events);
    for event in &detail.events {
        assert!(
            event.detail.len() < 1100 && event.detail.ends_with("more bytes not kept)"),
            "{event:?}"
        );
    }
    // Only the windows of the day the retention keeps, and none of the made-up model.
    let kept = 24;
    let models: Vec<&str> = detail
        .inferences
        .iter()
        .map(|counts| counts.model.name.as_str())
        .collect();
    assert_eq!(models, ["demo"], "{:#?}", detail.inferences);
    assert_eq!(detail.inferences[0].count, ROWS * kept, "{detail:#?}");
    assert_eq!(stored_summaries(&hub, &id), kept);
    let metrics = hub.metrics();
    assert_eq!(
        series(&metrics, "outpost_hub_ingest_windows_skipped_total"),
        Some(7 * 24 * 2 - kept),
        "{metrics}"
    );

    // On a hub keeping everything this week of one device held 7 * 24 * REPORTS_PER_HOUR
    // reports of 8,000 bytes, 8 MB, and growing; within the retention it is a day of windows
    // and KEEP_EVENTS events of 1 KiB.
    let grown = after.saturating_sub(before);
    println!(
        "hub data directory: {before} bytes before, {after} after a simulated week (+{grown})"
    );
    assert!(
        grown < 4 * 1024 * 1024,
        "the data directory grew by {grown} bytes in a simulated week"
    );

    // Windows stored while they were fresh go once they are older than the retention, on an
    // engine tick: the same store under a hub keeping two hours of telemetry keeps the windows
    // that ended within them.
    assert!(hub.sigterm().success());
    hub.restart_serving(&["--retain-events", &keep_events, "--retain-telemetry", "2h"]);
    let ends: Vec<u64> = (0..kept)
        .map(|hour| first + 7 * DAY - hour * HOUR)
        .collect();
    let within = |now: u64| ends.iter().filter(|end| **end >= now - 2 * HOUR).count() as u64;
    let most = within(unix_now());
    let stored = wait_until(
        Duration::from_secs(30),
        "the aged windows to be pruned",
        || {
            let stored = stored_summaries(&hub, &id);
            (stored <= most).then_some(stored)
        },
    );
    // Windows that ended in the two hours before the hub pruned: the hub's clock moved on a
    // little since `most` was counted, across an hour boundary at worst.
    assert!(stored >= within(unix_now()), "{stored} of {most} kept");
    assert!(
        hub.log()
            .contains(&format!("removed {} drift summaries", kept - stored)),
        "{}",
        hub.log()
    );
}
