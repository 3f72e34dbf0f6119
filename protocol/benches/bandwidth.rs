//! Bytes a device sends and receives per day at default settings, from real frames: the check-in
//! and the telemetry upload of a model with a 20-feature drift profile, encoded with `protocol`
//! from the same realistic samples the round-trip tests pin, plus the HTTP/1.1 heads the agent
//! and hub put around them. Issue 7's goal is ≤ 1 MB a day.
//!
//! Defaults: a check-in every 30 s (the hub's `--poll-secs`); telemetry windows are an hour
//! (`telemetry::WINDOW_SECS`), and only closed windows are uploaded, so one batch an hour however
//! often `sync.telemetry_flush` (60 s) looks. TLS is counted as record overhead only; handshakes
//! are printed apart (see the note at the end of the output).
//!
//! `cargo bench -p outpost-protocol --bench bandwidth`

#[path = "../tests/samples/mod.rs"]
mod samples;

use outpost_protocol::auth::{HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP};
use outpost_protocol::device::{InferenceWindow, TelemetryBatch, LATENCY_BUCKETS_US};
use outpost_protocol::{encode, Message};
use samples::*;

const DAY_SECS: u64 = 86_400;
const POLL_SECS: u64 = 30;
const WINDOW_SECS: u64 = 3_600;
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

/// Bytes of one exchange: heads, frames and one TLS record each way.
fn exchange<Q: Message, R: Message>(path: &str, request: &Q, response: &R) -> (u64, u64, u64) {
    let request = encode(request).expect("sample encodes");
    let response = encode(response).expect("sample encodes");
    let frames = (request.len() + response.len()) as u64;
    let heads =
        (request_head(path, request.len()).len() + response_head(response.len()).len()) as u64;
    (frames, heads, 2 * TLS_RECORD_OVERHEAD)
}

fn main() {
    let check_ins = DAY_SECS / POLL_SECS;
    let batches = DAY_SECS / WINDOW_SECS;

    // In a rollout the hub sends the signed plan and the device's manifest on every check-in; the
    // sample's are signed by 3 of 5 keys. Outside one, the answer carries neither.
    let mut in_rollout = check_in_response();
    in_rollout.roots.clear();
    in_rollout.shadow = None;
    let mut idle = in_rollout.clone();
    idle.plan = None;
    idle.manifest = None;

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
        "| Exchange | frames (B) | HTTP heads (B) | TLS records (B) | per day | bytes a day |"
    );
    println!("|---|---:|---:|---:|---:|---:|");
    let mut rows = Vec::new();
    for (label, (frames, heads, tls), per_day) in [
        (
            "check-in, in a rollout (plan + manifest)",
            exchange("/device/v1/checkin", &check_in(), &in_rollout),
            check_ins,
        ),
        (
            "check-in, no rollout",
            exchange("/device/v1/checkin", &check_in(), &idle),
            check_ins,
        ),
        (
            "telemetry batch: 1 hourly window, 20-feature drift summary",
            exchange("/device/v1/telemetry", &batch, &telemetry_ack()),
            batches,
        ),
    ] {
        let daily = (frames + heads + tls) * per_day;
        println!("| {label} | {frames} | {heads} | {tls} | {per_day} | {daily} |");
        rows.push(daily);
    }
    let (rollout, idle, telemetry) = (rows[0], rows[1], rows[2]);
    println!();
    println!(
        "per device per day: {:.3} MB in a rollout, {:.3} MB outside one (1 MB = 10^6 bytes)",
        (rollout + telemetry) as f64 / 1e6,
        (idle + telemetry) as f64 / 1e6
    );
    println!(
        "not counted: TCP/IP headers and TLS handshakes. The agent's client keeps a connection \
         idle for 15 s, less than the 30 s poll, so each check-in opens a connection: at about \
         {} B per resumed TLS 1.3 handshake plus ~{} B of TCP set-up and tear-down that adds \
         {:.3} MB a day",
        RESUMED_HANDSHAKE,
        TCP_SETUP,
        ((RESUMED_HANDSHAKE + TCP_SETUP) * (check_ins + batches)) as f64 / 1e6
    );
}

/// An estimate, not a measurement: a TLS 1.3 PSK resumption (ClientHello with a ticket and key
/// share, ServerHello, encrypted extensions, finished both ways, a new ticket).
const RESUMED_HANDSHAKE: u64 = 1_000;
/// SYN, SYN-ACK, ACK and FIN/ACK both ways, and the IP/TCP headers of about eight data segments,
/// at 40 bytes of headers each over IPv4.
const TCP_SETUP: u64 = 560;
