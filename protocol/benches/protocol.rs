//! How much a device and the hub pay per message: signature verification of manifests and plans,
//! framing of the messages exchanged on every check-in and telemetry upload, and the drift
//! summary's hot path and the hub's judgement of it.
//!
//! The numbers feed `docs/BENCHMARKS.md`. They are most useful as ratios within one run, because
//! the machines that run them are shared and noisy.

use std::hint::black_box;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use outpost_protocol::auth::RequestToSign;
use outpost_protocol::device::{CheckIn, CheckInResponse, TelemetryBatch};
use outpost_protocol::drift::{assess, DriftSummary, FeatureSummary};
use outpost_protocol::keys::SignatureBytes;
use outpost_protocol::{decode, encode, verify_batch, BatchItem, Message, PreparedKey, SecretKey};

// The same realistic messages the round-trip and robustness suites use, so the benchmarks measure
// the shapes the tests pin.
#[path = "../tests/samples/mod.rs"]
mod samples;

use samples::*;

/// Signature checking dominates verification, so it is measured with one signer and with a
/// quorum of three out of five keys.
fn verification(c: &mut Criterion) {
    let floor = floor();
    for (n_keys, threshold) in [(1, 1), (5, 3)] {
        let root = verified_root(n_keys, threshold);
        let manifest = manifest_frame(7, n_keys, threshold);
        c.bench_function(&format!("verify_manifest/{threshold}-of-{n_keys}"), |b| {
            b.iter(|| {
                root.verify_manifest(black_box(&manifest), &floor, Some(6))
                    .expect("sample manifest verifies")
            })
        });
        let plan = plan_frame(n_keys, threshold);
        c.bench_function(&format!("verify_plan/{threshold}-of-{n_keys}"), |b| {
            b.iter(|| {
                root.verify_plan(black_box(&plan), &floor, Some(41))
                    .expect("sample plan verifies")
            })
        });
    }
}

/// Benchmarks encoding and decoding one message as `label`.
fn framing<M: Message + PartialEq + std::fmt::Debug>(c: &mut Criterion, label: &str, message: &M) {
    let frame = encode(message).expect("sample encodes");
    c.bench_function(&format!("encode/{label}"), |b| {
        b.iter(|| encode(black_box(message)).expect("sample encodes"))
    });
    c.bench_function(&format!("decode/{label}"), |b| {
        b.iter(|| decode::<M>(black_box(&frame)).expect("sample decodes"))
    });
}

fn envelope(c: &mut Criterion) {
    framing::<CheckIn>(c, "check_in", &check_in());
    // The response a device gets when a rollout reaches it: a signed plan and manifest (5 keys,
    // 3 signatures each), no root rotation.
    let mut response = check_in_response();
    response.roots.clear();
    framing::<CheckInResponse>(c, "check_in_response_plan_manifest", &response);
    framing::<TelemetryBatch>(c, "telemetry_batch_100", &telemetry_batch(100));
    // The summary a device sends with each window and the hub stores and merges: 100 numeric
    // features, the shape of the hub's load benchmark.
    let mut profile = drift_profile_with(100, 1_000);
    profile.classes.clear();
    framing::<DriftSummary>(
        c,
        "drift_summary_100",
        &drift_summary_of(&profile, 1_000, 0, 2),
    );
}

/// A device summarises every value its model sees, so `observe_f32` must keep up with inference
/// (the budget is 10 million values a second on one core); the hub judges every stored summary.
fn drift(c: &mut Criterion) {
    let mut profile = drift_profile_with(100, 10_000);
    profile.classes.clear();
    let feature = &profile.features[0];
    let mut rng = SplitMix::new(1);
    let values: Vec<f32> = feature_values(&mut rng, 0, 100_000, 0.0)
        .into_iter()
        .map(|value| value as f32)
        .collect();
    let mut group = c.benchmark_group("drift");
    group.throughput(Throughput::Elements(values.len() as u64));
    group.bench_function("observe_f32_100k", |b| {
        b.iter(|| {
            let mut summary = FeatureSummary::new(&feature.edges);
            summary.observe_f32(black_box(&values), &feature.edges);
            summary
        })
    });
    let summary = drift_summary_of(&profile, 1_000, 0, 2);
    group.throughput(Throughput::Elements(profile.features.len() as u64));
    group.bench_function("assess_100_features", |b| {
        b.iter(|| assess(&profile, black_box(&summary)))
    });
    group.finish();
}

/// The hub's device request signatures: one by one with `verify_strict`, and in batches of the
/// sizes its verifier sees under load. Throughput is per signature, so the lines compare directly.
fn request_signatures(c: &mut Criterion) {
    let signed: Vec<(Vec<u8>, SignatureBytes, PreparedKey)> = (0..64u8)
        .map(|i| {
            let key = SecretKey::from_seed([i; 32]);
            let request = RequestToSign {
                method: "POST",
                path_and_query: "/device/v2/checkin",
                body_sha256: outpost_protocol::sha256(&[i; 40]),
                timestamp: 1_790_000_000,
                nonce: [i; 16],
            };
            let message = request.message();
            let signature = key.sign(&message);
            (
                message,
                signature,
                key.public().prepare().expect("a valid key"),
            )
        })
        .collect();
    let mut group = c.benchmark_group("request_signatures");
    group.throughput(Throughput::Elements(1));
    group.bench_function("verify_strict", |b| {
        let (message, signature, key) = &signed[0];
        b.iter(|| assert!(key.verify(black_box(message), signature)))
    });
    for size in [1usize, 4, 8, 16, 64] {
        let items: Vec<BatchItem<'_>> = signed[..size]
            .iter()
            .map(|(message, signature, key)| BatchItem {
                message,
                signature,
                key,
            })
            .collect();
        group.throughput(Throughput::Elements(size as u64));
        group.bench_function(format!("verify_batch/{size}"), |b| {
            b.iter(|| assert!(verify_batch(black_box(&items)).iter().all(|ok| *ok)))
        });
    }
    group.finish();
}

criterion_group!(benches, verification, request_signatures, envelope, drift);
criterion_main!(benches);
