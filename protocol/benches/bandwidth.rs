//! Bytes a device sends and receives per day at default settings, from real frames: the check-in
//! of its one model (naming what it holds) and the telemetry upload of a model with a 20-feature drift profile, encoded with
//! `protocol` from the same realistic samples the round-trip tests pin, plus the HTTP/1.1 heads
//! the agent and hub put around them, TLS records, and a TCP connection with a resumed TLS 1.3
//! handshake per check-in. Issue 7's goal is ≤ 1 MB a day.
//!
//! Defaults: a check-in every 300 s outside a rollout (the hub's `--poll-secs`) and every 30 s
//! while an active or paused rollout applies to the device (`--rollout-poll-secs`). A device
//! holding the plan and manifests the hub would send gets an "unchanged" answer without them; it
//! gets them in full once per change, which this leaves out. Telemetry windows are an hour
//! (`telemetry::WINDOW_SECS`), and only closed windows are uploaded, so one batch an hour however
//! often `sync.telemetry_flush` (60 s) looks; it goes out in a check-in's cycle, on its
//! connection. The device asks for its models' capture allowances once an hour too
//! (`sync.capture_interval`), in a check-in's cycle: with none signed the answer is empty, and
//! with one the hub sends it again each time (counted apart, as a day with capture on).
//!
//! `cargo bench -p outpost-protocol --bench bandwidth`

#[path = "../tests/samples/mod.rs"]
mod samples;

use outpost_protocol::auth::{HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use outpost_protocol::capture::{CaptureAllowances, CaptureRequest};
use outpost_protocol::device::{
    InferenceWindow, ModelAnswer, ModelCheckIn, ModelsCheckIn, ModelsCheckInResponse,
    TelemetryBatch, LATENCY_BUCKETS_US,
};
use outpost_protocol::{encode, Message};
use samples::*;

const DAY_SECS: u64 = 86_400;
const POLL_SECS: u64 = 300;
const ROLLOUT_POLL_SECS: u64 = 30;
const WINDOW_SECS: u64 = 3_600;
const CAPTURE_INTERVAL_SECS: u64 = 3_600;
const DRIFT_FEATURES: usize = 20;
/// TLS 1.3 with an AEAD: 5 header bytes, 1 inner content type and a 16-byte tag per record.
const TLS_RECORD_OVERHEAD: u64 = 22;

/// The head of a signed device request as the agent's ureq client writes it.
fn request_head(path: &str, body_len: usize) -> String {
    let mut head = format!("POST {path} HTTP/1.1\r\n");
    for (name, value) in [
        ("host", "hub.example.net:8443".to_owned()),
        ("user-agent", "ureq/3.5.2".to_owned()),
        ("accept", "*/*".to_owned()),
        ("content-type", "application/x-outpost-postcard".to_owned()),
        ("content-length", body_len.to_string()),
        (HEADER_DEVICE, "0".repeat(32)),
        (HEADER_TIMESTAMP, NOW.to_string()),
        (HEADER_NONCE, "0".repeat(32)),
        (HEADER_SIGNATURE, "0".repeat(128)),
    ] {
        head.push_str(&format!("{name}: {value}\r\n"));
    }
    head.push_str("\r\n");
    head
}

/// The head of the hub's answer (hyper via axum).
fn response_head(body_len: usize) -> String {
    format!(
        "HTTP/1.1 200 OK\r\ncontent-type: application/x-outpost-postcard\r\n\
         content-length: {body_len}\r\ndate: Fri, 27 Nov 2026 00:00:00 GMT\r\n\r\n"
    )
}

/// Bytes of one exchange: frames, heads, and one TLS record each way, plus a new connection
/// when `connects`.
fn exchange<Q: Message, R: Message>(
    path: &str,
    request: &Q,
    response: &R,
    connects: bool,
) -> [u64; 4] {
    let request = encode(request).expect("sample encodes");
    let response = encode(response).expect("sample encodes");
    let frames = (request.len() + response.len()) as u64;
    let heads =
        (request_head(path, request.len()).len() + response_head(response.len()).len()) as u64;
    let connection = if connects {
        RESUMED_HANDSHAKE + TCP_CONNECTION
    } else {
        0
    };
    [frames, heads, 2 * TLS_RECORD_OVERHEAD, connection]
}

fn main() {
    let batches = DAY_SECS / WINDOW_SECS;

    // The device holds the plan and manifest (signed by 3 of 5 keys) the hub would send for its
    // one model, so the answer is "unchanged"; a full one, sent once per change, is printed for
    // scale. An agent of 0.2.0 checks in on `/device/v3/checkin` with one entry per model.
    let mut documents = check_in_response();
    documents.roots.clear();
    documents.shadow = None;
    let single = check_in();
    let active = single.active.clone().expect("the sample runs a model");
    let held = ModelsCheckIn {
        state: single.state,
        models: vec![ModelCheckIn {
            name: active.name.clone(),
            active: Some(active.clone()),
            plan_sequence: single.plan_sequence,
            held: documents.held_digest(),
        }],
        root_version: single.root_version,
        agent_version: single.agent_version,
        dropped_records: single.dropped_records,
        queue_bytes: single.queue_bytes,
    };
    let answer = |models: Vec<ModelAnswer>| ModelsCheckInResponse {
        hub_time: NOW,
        roots: Vec::new(),
        poll_after_secs: POLL_SECS as u32,
        models,
    };
    let unchanged = answer(vec![ModelAnswer::Unchanged { name: active.name }]);
    let full = answer(vec![ModelAnswer::Full {
        plan: documents.plan.clone().expect("the sample has a plan"),
        manifest: documents.manifest.clone(),
        shadow: None,
    }]);

    // The device's one model, as the agent asks.
    let asked = CaptureRequest {
        models: vec!["keyword-spotter".to_owned()],
    };

    let profile = drift_profile_with(DRIFT_FEATURES, 10_000);
    let summary = drift_summary_of(&profile, 3_000, 0, 2);
    let batch = TelemetryBatch {
        sequence: 1_234,
        windows: vec![InferenceWindow {
            model: "keyword-spotter".to_owned(),
            version: 7,
            start: NOW,
            end: NOW + WINDOW_SECS,
            count: 3_000,
            errors: 1,
            latency_buckets: vec![17; LATENCY_BUCKETS_US.len() + 1],
            drift: Some(summary),
            shadow: None,
        }],
        dropped_records: 0,
    };

    println!(
        "| Exchange | frames (B) | HTTP heads (B) | TLS records (B) | TCP + TLS resumption (B) | \
         per day | bytes a day |"
    );
    println!("|---|---:|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (label, bytes, per_day) in [
        (
            "check-in, unchanged, outside a rollout (300 s)",
            exchange(CHECK_IN, &held, &unchanged, true),
            DAY_SECS / POLL_SECS,
        ),
        (
            "check-in, unchanged, in a rollout (30 s)",
            exchange(CHECK_IN, &held, &unchanged, true),
            DAY_SECS / ROLLOUT_POLL_SECS,
        ),
        (
            "telemetry batch: 1 hourly window, 20-feature drift summary",
            exchange(TELEMETRY, &batch, &telemetry_ack(), false),
            batches,
        ),
        (
            "capture allowances asked, none signed (1 h)",
            exchange(
                CAPTURE,
                &asked,
                &CaptureAllowances {
                    allowances: Vec::new(),
                },
                false,
            ),
            DAY_SECS / CAPTURE_INTERVAL_SECS,
        ),
        (
            "capture allowances asked, one signed 2-of-3 (1 h)",
            exchange(CAPTURE, &asked, &capture_allowances(), false),
            DAY_SECS / CAPTURE_INTERVAL_SECS,
        ),
        (
            "check-in with plan + manifest in full (once per change)",
            exchange(CHECK_IN, &held, &full, true),
            1,
        ),
    ] {
        let [frames, heads, tls, connection] = bytes;
        let daily = bytes.iter().sum::<u64>() * per_day;
        println!("| {label} | {frames} | {heads} | {tls} | {connection} | {per_day} | {daily} |");
        rows.push(daily);
    }
    let (idle, rollout, telemetry) = (rows[0], rows[1], rows[2]);
    let (no_capture, capture) = (rows[3], rows[4]);
    println!();
    println!(
        "per device per day: {:.3} MB outside a rollout, {:.3} MB on a day spent in one \
         (1 MB = 10^6 bytes), each plus one full answer per change of plan or slot; with a \
         capture allowance signed, {:.3} and {:.3} MB before the samples themselves",
        (idle + telemetry + no_capture) as f64 / 1e6,
        (rollout + telemetry + no_capture) as f64 / 1e6,
        (idle + telemetry + capture) as f64 / 1e6,
        (rollout + telemetry + capture) as f64 / 1e6
    );
    println!(
        "a connection costs {RESUMED_HANDSHAKE} B of resumed TLS 1.3 handshake (measured, see \
         the constant) and {TCP_CONNECTION} B of TCP/IP headers (estimated)"
    );
}

const CHECK_IN: &str = "/device/v3/checkin";
const TELEMETRY: &str = "/device/v1/telemetry";
const CAPTURE: &str = "/device/v3/capture";

/// Measured, once, by hand (see docs/BENCHMARKS.md): a resumed TLS 1.3 connection to
/// `outpost-hub serve` (rustls) from `openssl s_client -sess_in`, counted by a relay between them:
/// 442 B up (ClientHello with ticket and key share, Finished, close_notify), 427 B down
/// (ServerHello, encrypted extensions, Finished, two new tickets). TCP payload only.
const RESUMED_HANDSHAKE: u64 = 869;
/// An estimate: SYN, SYN-ACK, ACK and FIN/ACK both ways, and the IP/TCP headers of about eight
/// data segments, at 40 bytes of headers each over IPv4. The agent's client keeps an idle
/// connection 15 s, less than either poll interval, so every check-in opens one.
const TCP_CONNECTION: u64 = 560;
