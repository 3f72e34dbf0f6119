//! Realistic, fully-populated values of every wire message, shared by the round-trip and
//! robustness suites and by the benchmarks, so all of them exercise the shapes a real fleet sends
//! rather than empty defaults that would hide length-prefix and option handling.
//!
//! Keys come from fixed seeds so every run builds byte-identical documents. The values are frozen:
//! `golden.rs` checks the committed wire-version-1 frames against them, so add samples rather
//! than change these.

// Each test binary and the benchmark include this module and use a different subset of it.
#![allow(dead_code)]

mod drift;

#[allow(unused_imports)]
pub use drift::*;

use outpost_protocol::capture::{
    CaptureAck, CaptureAllowances, CaptureRequest, CaptureSample, CaptureUpload, SealedSample,
};
use outpost_protocol::device::{
    held_digest, AgentState, CheckIn, CheckInResponse, DeviceId, EnrollRequest, EnrollResponse,
    ErrorResponse, HeldCheckIn, HeldCheckInResponse, InferenceWindow, ModelAnswer, ModelCheckIn,
    ModelRuntime, ModelsCheckIn, ModelsCheckInResponse, OutputCheck, RunningModel, RuntimeKind,
    RuntimeReport, ShadowCounts, ShadowReport, Status, StatusReport, TelemetryAck, TelemetryBatch,
    Tensor, ValidationCase, ValidationSet, LATENCY_BUCKETS_US,
};
use outpost_protocol::trust::{
    Artifact, ArtifactRole, BreachAction, CaptureBody, CaptureTrigger, CaptureVersions, DType, Dim,
    GatePolicy, ManifestBody, ManifestRef, PlanBody, RetireBody, RootBody, ShadowStage, Signed,
    Slot, TensorSpec,
};
use outpost_protocol::{
    encode, sha256, AgentVersion, Arch, Label, SecretKey, TimeFloor, VerifiedRoot,
};

/// 2026-01-01T00:00:00Z: the "now" every document is built around.
pub const NOW: u64 = 1_767_225_600;
pub const DAY: u64 = 86_400;

/// The `index`-th release key of the fleet.
pub fn release_key(index: u8) -> SecretKey {
    SecretKey::from_seed([0x40 + index; 32])
}

/// The first `n_keys` release keys.
pub fn release_keys(n_keys: u8) -> Vec<SecretKey> {
    (0..n_keys).map(release_key).collect()
}

pub fn device_key() -> SecretKey {
    SecretKey::from_seed([0xd0; 32])
}

/// A clock that agrees with the documents: everything here is fresh at this floor.
pub fn floor() -> TimeFloor {
    TimeFloor {
        wall_clock: NOW,
        newest_signed: NOW - DAY,
        hub_time: NOW + 5,
    }
}

pub fn agent_version() -> AgentVersion {
    AgentVersion {
        major: 0,
        minor: 4,
        patch: 2,
    }
}

pub fn labels() -> Vec<Label> {
    ["site=berlin", "hw=pi4", "line=3"]
        .into_iter()
        .map(|text| Label::parse(text).expect("sample labels are valid"))
        .collect()
}

pub fn root_body(version: u64, n_keys: u8, threshold: u32) -> RootBody {
    RootBody {
        version,
        created: NOW - 30 * DAY,
        expires: NOW + 365 * DAY,
        threshold,
        keys: release_keys(n_keys).iter().map(SecretKey::public).collect(),
    }
}

/// Signs `body` with the first `n_signers` of `keys`.
pub fn sign_with<B: outpost_protocol::trust::SignedBody>(
    body: &B,
    keys: &[SecretKey],
    n_signers: usize,
) -> Signed<B> {
    let mut signed = Signed::new(body).expect("sample bodies fit their frames");
    for key in &keys[..n_signers] {
        signed.sign(key);
    }
    signed
}

/// A root of `n_keys` release keys with a `threshold`, signed by exactly `threshold` of them.
pub fn signed_root(version: u64, n_keys: u8, threshold: u32) -> Signed<RootBody> {
    sign_with(
        &root_body(version, n_keys, threshold),
        &release_keys(n_keys),
        threshold as usize,
    )
}

pub fn verified_root(n_keys: u8, threshold: u32) -> VerifiedRoot {
    let frame = encode(&signed_root(1, n_keys, threshold)).expect("sample root fits its frame");
    VerifiedRoot::verify_initial(&frame, &floor()).expect("sample root verifies")
}

pub fn manifest_body(version: u64) -> ManifestBody {
    let spec = |name: &str, shape: Vec<Dim>| TensorSpec {
        name: name.to_owned(),
        dtype: DType::F32,
        shape,
    };
    ManifestBody {
        name: "keyword-spotter".to_owned(),
        version,
        created: NOW - DAY,
        expires: NOW + 180 * DAY,
        artifacts: vec![
            Artifact {
                role: ArtifactRole::Model,
                sha256: sha256(b"keyword-spotter.onnx"),
                length: 4_812_345,
            },
            Artifact {
                role: ArtifactRole::Profile,
                sha256: sha256(b"keyword-spotter.profile"),
                length: 18_204,
            },
            Artifact {
                role: ArtifactRole::Validation,
                sha256: sha256(b"keyword-spotter.validation"),
                length: 31_590,
            },
        ],
        inputs: vec![spec(
            "mel",
            vec![Dim::Batch, Dim::Fixed(40), Dim::Fixed(98)],
        )],
        outputs: vec![spec("logits", vec![Dim::Batch, Dim::Fixed(12)])],
        archs: vec![Arch::Aarch64, Arch::Armv7, Arch::X86_64],
        min_agent_version: AgentVersion {
            major: 0,
            minor: 4,
            patch: 0,
        },
    }
}

/// A manifest signed by the first `threshold` of `n_keys` release keys, as a complete frame.
pub fn manifest_frame(version: u64, n_keys: u8, threshold: u32) -> Vec<u8> {
    let signed = sign_with(
        &manifest_body(version),
        &release_keys(n_keys),
        threshold as usize,
    );
    encode(&signed).expect("sample manifest fits its frame")
}

pub fn manifest_ref(frame: &[u8], version: u64) -> ManifestRef {
    ManifestRef {
        name: "keyword-spotter".to_owned(),
        version,
        manifest_sha256: sha256(frame),
    }
}

/// A staged rollout from version 6 to version 7 of the sample model.
pub fn plan_body(target: ManifestRef, fallback: Option<ManifestRef>) -> PlanBody {
    PlanBody {
        sequence: 42,
        created: NOW - DAY,
        expires: NOW + 30 * DAY,
        target,
        fallback,
        stages: vec![1, 10, 50, 100],
        selector: labels()[..2].to_vec(),
        gates: GatePolicy {
            bake_secs: 3_600,
            device_timeout_secs: 900,
            max_failure_pct: 2.0,
            max_error_rate: 0.01,
            max_p95_regression_pct: 15.0,
            max_drift_psi: Some(0.2),
            on_breach: BreachAction::Rollback,
            auto_advance: true,
        },
        shadow: Some(ShadowStage {
            percent: 2,
            min_comparisons: 10_000,
            min_top1_agreement: 0.97,
            max_mean_abs_diff: 0.02,
        }),
    }
}

/// A plan over `manifest_frame(7, ..)` with `manifest_frame(6, ..)` as fallback, as a frame.
pub fn plan_frame(n_keys: u8, threshold: u32) -> Vec<u8> {
    let target = manifest_ref(&manifest_frame(7, n_keys, threshold), 7);
    let fallback = manifest_ref(&manifest_frame(6, n_keys, threshold), 6);
    let signed = sign_with(
        &plan_body(target, Some(fallback)),
        &release_keys(n_keys),
        threshold as usize,
    );
    encode(&signed).expect("sample plan fits its frame")
}

/// A retirement of the sample model, above the sample plan's sequence.
pub fn retire_body() -> RetireBody {
    RetireBody {
        sequence: 43,
        created: NOW - DAY,
        expires: NOW + 30 * DAY,
        model: "keyword-spotter".to_owned(),
        selector: labels()[..2].to_vec(),
    }
}

/// [`retire_body`] signed by `threshold` of `n_keys` release keys, framed.
pub fn retire_frame(n_keys: u8, threshold: u32) -> Vec<u8> {
    let signed = sign_with(&retire_body(), &release_keys(n_keys), threshold as usize);
    encode(&signed).expect("sample retirement fits its frame")
}

/// The operator's X25519 secret key of the sample capture allowance.
pub const CAPTURE_SECRET: [u8; 32] = [0x5c; 32];

/// An allowance to capture one request in a thousand of the sample model's versions 6 and 7,
/// at most 50 samples and 1 MiB per device and day, dropping an input and an output.
pub fn capture_body() -> CaptureBody {
    CaptureBody {
        sequence: 3,
        created: NOW - DAY,
        expires: NOW + 30 * DAY,
        model: "keyword-spotter".to_owned(),
        versions: CaptureVersions::Only(vec![6, 7]),
        rate_ppm: 1_000,
        max_samples_per_day: 50,
        max_bytes_per_day: 1024 * 1024,
        trigger: CaptureTrigger::WhileDriftAlert,
        drop_inputs: vec!["speaker_id".to_owned()],
        drop_outputs: vec!["embedding".to_owned()],
        recipient: outpost_protocol::capture::recipient_of(&CAPTURE_SECRET),
    }
}

/// [`capture_body`] signed by `threshold` of `n_keys` release keys, framed.
pub fn capture_frame(n_keys: u8, threshold: u32) -> Vec<u8> {
    let signed = sign_with(&capture_body(), &release_keys(n_keys), threshold as usize);
    encode(&signed).expect("sample capture allowance fits its frame")
}

pub fn capture_request() -> CaptureRequest {
    CaptureRequest {
        models: vec!["keyword-spotter".to_owned(), "wake-word".to_owned()],
    }
}

pub fn capture_allowances() -> CaptureAllowances {
    CaptureAllowances {
        allowances: vec![serde_bytes::ByteBuf::from(capture_frame(3, 2))],
    }
}

/// One captured request of the sample model: its mel input and logits output.
pub fn capture_sample() -> CaptureSample {
    let set = validation_set();
    CaptureSample {
        model: "keyword-spotter".to_owned(),
        version: 7,
        allowance: 3,
        captured_at: NOW - 60,
        inputs: set.cases[0].inputs.clone(),
        outputs: set.cases[0].outputs.clone(),
    }
}

/// Two sealed samples (the seal's one-time keys fixed, so the bytes are too).
pub fn capture_upload() -> CaptureUpload {
    let frame = encode(&capture_sample()).expect("the sample fits its frame");
    let recipient = outpost_protocol::capture::recipient_of(&CAPTURE_SECRET);
    let sealed = |seed: u8| SealedSample {
        id: [seed; 16],
        model: "keyword-spotter".to_owned(),
        version: 7,
        allowance: 3,
        captured_at: NOW - 60 + u64::from(seed),
        sealed: outpost_protocol::capture::seal(&recipient, [seed; 32], &frame)
            .expect("sealing the sample"),
    };
    CaptureUpload {
        samples: vec![sealed(1), sealed(2)],
        dropped: 4,
    }
}

pub fn capture_ack() -> CaptureAck {
    CaptureAck { stored: 2 }
}

/// Little-endian `f32`s, as a tensor's data holds them.
fn f32_bytes(count: usize, scale: f32) -> Vec<u8> {
    (0..count)
        .flat_map(|i| ((i % 97) as f32 * scale).to_le_bytes())
        .collect()
}

/// Two golden cases for the sample model: a 40x98 mel spectrogram in, 12 logits out.
pub fn validation_set() -> ValidationSet {
    let case = |scale: f32| ValidationCase {
        inputs: vec![Tensor {
            name: "mel".to_owned(),
            dtype: DType::F32,
            shape: vec![1, 40, 98],
            data: f32_bytes(40 * 98, scale),
        }],
        outputs: vec![Tensor {
            name: "logits".to_owned(),
            dtype: DType::F32,
            shape: vec![1, 12],
            data: f32_bytes(12, -scale),
        }],
    };
    ValidationSet {
        abs_tolerance: 1e-4,
        rel_tolerance: 1e-3,
        cases: vec![case(0.25), case(-1.5)],
        checks: vec![OutputCheck {
            output: "logits".to_owned(),
            tolerance: None,
            min_top1: Some(0.95),
        }],
    }
}

pub fn enroll_request() -> EnrollRequest {
    EnrollRequest {
        token: "enr_7f3a9c2e51d84b06a1e0c4f2d9b86e13".to_owned(),
        public_key: device_key().public(),
        arch: Arch::Aarch64,
        agent_version: agent_version(),
        labels: labels(),
    }
}

pub fn device_id() -> DeviceId {
    DeviceId::from_hex("5c1e0a7b93d24f68a0b1c2d3e4f50617").expect("sample device id is hex")
}

pub fn enroll_response() -> EnrollResponse {
    EnrollResponse {
        device_id: device_id(),
        labels: labels(),
        hub_time: NOW,
    }
}

pub fn check_in() -> CheckIn {
    CheckIn {
        state: AgentState::Steady,
        active: Some(RunningModel {
            name: "keyword-spotter".to_owned(),
            version: 6,
            manifest_sha256: sha256(&manifest_frame(6, 1, 1)),
        }),
        root_version: 1,
        plan_sequence: Some(41),
        agent_version: agent_version(),
        dropped_records: 12,
        queue_bytes: 48_213,
    }
}

/// A response that rotates the device's root twice and hands it a plan, its fallback manifest to
/// serve and its target manifest to shadow.
pub fn check_in_response() -> CheckInResponse {
    let root_frame =
        |version| encode(&signed_root(version, 5, 3)).expect("sample root fits its frame");
    CheckInResponse {
        hub_time: NOW + 5,
        roots: vec![root_frame(2).into(), root_frame(3).into()],
        plan: Some(plan_frame(5, 3).into()),
        manifest: Some((Slot::Fallback, manifest_frame(6, 5, 3).into())),
        poll_after_secs: 60,
        shadow: Some(manifest_frame(7, 5, 3).into()),
    }
}

/// A check-in naming the documents of [`check_in_response`] as held.
pub fn held_check_in() -> HeldCheckIn {
    let response = check_in_response();
    let plan = sha256(response.plan.as_deref().expect("sample has a plan"));
    let (slot, manifest) = response.manifest.as_ref().expect("sample has a manifest");
    let manifest = sha256(manifest);
    let shadow = sha256(response.shadow.as_deref().expect("sample has a shadow"));
    HeldCheckIn {
        check_in: check_in(),
        held: Some(held_digest(&plan, Some((*slot, &manifest)), Some(&shadow))),
    }
}

/// The hub's answer when nothing the device holds changed.
pub fn held_unchanged() -> HeldCheckInResponse {
    HeldCheckInResponse::Unchanged {
        hub_time: NOW + 5,
        poll_after_secs: 300,
    }
}

/// A check-in of two models: one running and holding the documents of [`check_in_response`], one
/// with nothing yet.
pub fn models_check_in() -> ModelsCheckIn {
    let single = check_in();
    let held = held_check_in().held;
    ModelsCheckIn {
        state: single.state,
        models: vec![
            ModelCheckIn {
                name: "detector".to_owned(),
                active: single.active.clone(),
                plan_sequence: single.plan_sequence,
                held,
            },
            ModelCheckIn {
                name: "keyword-spotter".to_owned(),
                active: None,
                plan_sequence: None,
                held: None,
            },
        ],
        root_version: single.root_version,
        agent_version: single.agent_version,
        dropped_records: single.dropped_records,
        queue_bytes: single.queue_bytes,
    }
}

/// The answer to [`models_check_in`]: the first model unchanged, the second a full answer.
pub fn models_check_in_response() -> ModelsCheckInResponse {
    let single = check_in_response();
    ModelsCheckInResponse {
        hub_time: single.hub_time,
        roots: single.roots.clone(),
        poll_after_secs: single.poll_after_secs,
        models: vec![
            ModelAnswer::Unchanged {
                name: "detector".to_owned(),
            },
            ModelAnswer::Full {
                plan: single.plan.expect("sample has a plan"),
                manifest: single.manifest,
                shadow: single.shadow,
            },
        ],
    }
}

/// One status report per [`Status`] variant, so every variant's encoding is exercised.
pub fn status_reports() -> Vec<StatusReport> {
    let manifest = manifest_ref(&manifest_frame(7, 1, 1), 7);
    [
        Status::Downloaded,
        Status::Activating,
        Status::Committed,
        Status::Failed {
            reason: "model artifact hashes to 9f2c…, the manifest signs 41ab…".to_owned(),
        },
        Status::RolledBack {
            reason: "validation case 2: output logits[3] off by 0.031".to_owned(),
        },
        Status::Refused {
            reason: "model needs agent 0.5.0 or newer, this agent is 0.4.2".to_owned(),
        },
        Status::Shadowing,
        Status::Stalled {
            reason: "download of model 9f2c… passed its 10m deadline at 812 of 4096 bytes"
                .to_owned(),
        },
    ]
    .into_iter()
    .enumerate()
    .map(|(offset, status)| StatusReport {
        plan_sequence: Some(42),
        manifest: Some(manifest.clone()),
        status,
        at: NOW + offset as u64 * 30,
    })
    .collect()
}

/// The runtimes serving the two models of [`models_check_in`]: one on ONNX Runtime with two
/// execution providers, the other on tract after ONNX Runtime failed to load.
pub fn runtime_report() -> RuntimeReport {
    RuntimeReport {
        models: vec![
            ModelRuntime {
                name: "detector".to_owned(),
                version: 6,
                runtime: RuntimeKind::OnnxRuntime,
                runtime_version: "1.22.0".to_owned(),
                providers: vec![
                    "CUDAExecutionProvider".to_owned(),
                    "CPUExecutionProvider".to_owned(),
                ],
                fallback: None,
            },
            ModelRuntime {
                name: "keyword-spotter".to_owned(),
                version: 7,
                runtime: RuntimeKind::Tract,
                runtime_version: "0.23.9".to_owned(),
                providers: Vec::new(),
                fallback: Some(
                    "onnxruntime: libonnxruntime.so.1: cannot open shared object file".to_owned(),
                ),
            },
        ],
        at: NOW + 90,
    }
}

/// A batch of `n_windows` one-minute inference windows, alternating two model versions.
pub fn telemetry_batch(n_windows: u64) -> TelemetryBatch {
    let windows = (0..n_windows)
        .map(|index| InferenceWindow {
            model: "keyword-spotter".to_owned(),
            version: 6 + index % 2,
            start: NOW + index * 60,
            end: NOW + (index + 1) * 60,
            count: 3_000 + index * 7,
            errors: index % 3,
            latency_buckets: (0..=LATENCY_BUCKETS_US.len() as u64)
                .map(|bucket| (bucket * 37 + index) % 500)
                .collect(),
            drift: None,
            // Every third window is a shadow window: no inference of its own, a comparison.
            shadow: (index % 3 == 2).then(|| ShadowReport {
                target: manifest_ref(&manifest_frame(7, 1, 1), 7),
                counts: ShadowCounts {
                    compared: 2_900 + index,
                    top1_agreed: 2_850 + index,
                    errors: index % 2,
                    abs_diff_sum: 12.5 + index as f64 / 8.0,
                    abs_diff_values: (2_900 + index) * 12,
                    dropped: index % 5,
                },
            }),
        })
        .collect();
    TelemetryBatch {
        sequence: 1_234,
        windows,
        dropped_records: 17,
    }
}

pub fn telemetry_ack() -> TelemetryAck {
    TelemetryAck {
        sequence: 1_234,
        duplicate: true,
    }
}

pub fn error_response() -> ErrorResponse {
    ErrorResponse {
        status: 409,
        message: "plan sequence 40 is below sequence 41 already seen".to_owned(),
    }
}
