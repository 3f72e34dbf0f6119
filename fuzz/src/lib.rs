//! Shared pieces of the fuzz targets, so each file in `fuzz_targets/` stays a one-line call.
//!
//! House style asks for a fuzz target per decoder of untrusted bytes. The decode targets need only
//! the message type, via [`fuzz_decode!`]. The verify targets run the full verification a device
//! runs, against a fixed root built from a fixed seed key. Random bytes can never carry a valid
//! signature, so each verify target also signs the input as a document payload with that key: the
//! fuzzer then reaches the payload decoder and the structural, expiry and rollback checks behind
//! the signature check.
//!
//! The drift targets go one step past decoding: a decoded summary is validated against a small
//! fixed profile, and a decoded profile that passes its check is used to summarise and judge fixed
//! values (see `drift.rs`).

use std::sync::OnceLock;

use outpost_protocol::envelope::{MAGIC, PROTOCOL_VERSION};
use outpost_protocol::trust::{
    Artifact, ArtifactRole, BreachAction, CaptureBody, CaptureTrigger, CaptureVersions, DType, Dim,
    GatePolicy, ManifestBody, ManifestRef, PlanBody, RetireBody, RootBody, Signed, SignedBody,
    TensorSpec,
};
use outpost_protocol::{
    encode, sha256, AgentVersion, Arch, Message, SecretKey, TimeFloor, VerifiedRoot,
};

mod drift;

pub use drift::{decode_drift_summary, decode_profile};

/// Defines a fuzz target that decodes its input as one message type.
#[macro_export]
macro_rules! fuzz_decode {
    ($message:ty) => {
        ::libfuzzer_sys::fuzz_target!(|frame: &[u8]| {
            // A refusal is the expected answer; only a panic, abort or timeout is a finding.
            let _ = ::outpost_protocol::decode::<$message>(frame);
        });
    };
}

/// Decodes a telemetry batch, checks each window's shadow report as the hub does, and cuts its
/// drift summaries' frames out of it as the hub does: a frame cut must be the summary's own
/// encoding, byte for byte, or the hub would store a record that is not the summary it checked.
pub fn decode_telemetry_batch(frame: &[u8]) {
    if let Ok(batch) = outpost_protocol::decode::<outpost_protocol::device::TelemetryBatch>(frame) {
        for report in batch
            .windows
            .iter()
            .filter_map(|window| window.shadow.as_ref())
        {
            let _ = report.validate();
        }
        if let Some(cut) = batch.drift_frames(frame) {
            assert_eq!(cut.len(), batch.windows.len());
            for (window, cut) in batch.windows.iter().zip(cut) {
                match (&window.drift, cut) {
                    (None, None) => {}
                    (Some(summary), Some(cut)) => {
                        // A summary over its own cap does not encode; the hub refuses it.
                        if let Ok(own) = encode(summary) {
                            assert_eq!(own, cut, "a drift frame cut from a batch");
                        }
                    }
                    (drift, cut) => panic!(
                        "summary {} but frame {}",
                        drift.is_some(),
                        cut.is_some()
                    ),
                }
            }
        }
    }
}

/// Decodes a runtime report and checks its caps as the hub does before it stores one.
pub fn decode_runtime_report(frame: &[u8]) {
    use outpost_protocol::device::RuntimeReport;
    if let Ok(report) = outpost_protocol::decode::<RuntimeReport>(frame) {
        let _ = report.validate();
    }
}

/// 2026-01-01T00:00:00Z, the clock every verification runs at.
const NOW: u64 = 1_767_225_600;

/// The fixed root and key the verify targets check against, and templates for signed documents.
struct Fixture {
    key: SecretKey,
    root: VerifiedRoot,
    floor: TimeFloor,
    manifest: ManifestBody,
    plan: PlanBody,
    retire: RetireBody,
    capture: CaptureBody,
}

fn fixture() -> &'static Fixture {
    static FIXTURE: OnceLock<Fixture> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let key = SecretKey::from_seed([0x42; 32]);
        let floor = TimeFloor {
            wall_clock: NOW,
            ..TimeFloor::default()
        };
        let root_body = RootBody {
            version: 1,
            created: NOW - 86_400,
            expires: NOW + 365 * 86_400,
            threshold: 1,
            keys: vec![key.public()],
        };
        let mut signed_root = Signed::new(&root_body).expect("fixed root encodes");
        signed_root.sign(&key);
        let root_frame = encode(&signed_root).expect("fixed root encodes");
        let root = VerifiedRoot::verify_initial(&root_frame, &floor).expect("fixed root verifies");
        let spec = |name: &str| TensorSpec {
            name: name.to_owned(),
            dtype: DType::F32,
            shape: vec![Dim::Batch, Dim::Fixed(16)],
        };
        let manifest = ManifestBody {
            name: "fuzz-model".to_owned(),
            version: 3,
            created: NOW - 3_600,
            expires: NOW + 86_400,
            artifacts: vec![Artifact {
                role: ArtifactRole::Model,
                sha256: sha256(b"fuzz-model.onnx"),
                length: 1_024,
            }],
            inputs: vec![spec("input")],
            outputs: vec![spec("output")],
            archs: vec![Arch::X86_64, Arch::Aarch64],
            min_agent_version: AgentVersion {
                major: 0,
                minor: 1,
                patch: 0,
            },
        };
        let plan = PlanBody {
            sequence: 7,
            created: NOW - 3_600,
            expires: NOW + 86_400,
            target: ManifestRef {
                name: "fuzz-model".to_owned(),
                version: 3,
                manifest_sha256: sha256(b"fuzz-model manifest"),
            },
            fallback: None,
            stages: vec![10, 100],
            selector: Vec::new(),
            gates: GatePolicy {
                bake_secs: 600,
                device_timeout_secs: 300,
                max_failure_pct: 5.0,
                max_error_rate: 0.05,
                max_p95_regression_pct: 20.0,
                max_drift_psi: None,
                on_breach: BreachAction::Pause,
                auto_advance: false,
            },
            shadow: None,
        };
        let retire = RetireBody {
            sequence: 8,
            created: NOW - 3_600,
            expires: NOW + 86_400,
            model: "fuzz-model".to_owned(),
            selector: Vec::new(),
        };
        let capture = CaptureBody {
            sequence: 2,
            created: NOW - 3_600,
            expires: NOW + 86_400,
            model: "fuzz-model".to_owned(),
            versions: CaptureVersions::All,
            rate_ppm: 1_000,
            max_samples_per_day: 10,
            max_bytes_per_day: 1 << 20,
            trigger: CaptureTrigger::Always,
            drop_inputs: Vec::new(),
            drop_outputs: Vec::new(),
            recipient: [9; 32],
        };
        Fixture {
            key,
            root,
            floor,
            manifest,
            plan,
            retire,
            capture,
        }
    })
}

/// A document of `B` whose payload is a valid header followed by `body`, signed by the fixed key.
fn signed_payload<B: SignedBody>(template: &B, body: &[u8], key: &SecretKey) -> Option<Vec<u8>>
where
    Signed<B>: Message,
{
    let mut signed = Signed::new(template).ok()?;
    signed.payload = [&MAGIC[..], &[PROTOCOL_VERSION, B::KIND as u8], body].concat();
    signed.sign(key);
    // Inputs too large for a signed frame are refused by `encode`; there is nothing to verify then.
    encode(&signed).ok()
}

/// Verifies `data` as a signed manifest, then as the payload of a validly signed one.
pub fn verify_manifest(data: &[u8]) {
    let fixture = fixture();
    let _ = fixture.root.verify_manifest(data, &fixture.floor, Some(2));
    if let Some(document) = signed_payload(&fixture.manifest, data, &fixture.key) {
        let _ = fixture
            .root
            .verify_manifest(&document, &fixture.floor, Some(2));
    }
}

/// Verifies `data` as a signed plan, then as the payload of a validly signed one.
pub fn verify_plan(data: &[u8]) {
    let fixture = fixture();
    let _ = fixture.root.verify_plan(data, &fixture.floor, Some(5));
    if let Some(document) = signed_payload(&fixture.plan, data, &fixture.key) {
        if let Ok(plan) = fixture.root.verify_plan(&document, &fixture.floor, Some(5)) {
            // A plan that verifies is asked to authorise the input as its shadow model too.
            let _ = plan.verify_shadow_manifest(&fixture.root, data, &fixture.floor, None);
        }
    }
}

/// Verifies `data` as a signed retirement, then as the payload of a validly signed one.
pub fn verify_retire(data: &[u8]) {
    let fixture = fixture();
    let _ = fixture.root.verify_retire(data, &fixture.floor, Some(5));
    if let Some(document) = signed_payload(&fixture.retire, data, &fixture.key) {
        let _ = fixture
            .root
            .verify_retire(&document, &fixture.floor, Some(5));
    }
}

/// Verifies `data` as a signed capture allowance, then as the payload of a validly signed one.
pub fn verify_capture(data: &[u8]) {
    let fixture = fixture();
    let _ = fixture
        .root
        .verify_capture(data, &fixture.floor, Some("fuzz-model"), Some(1));
    if let Some(document) = signed_payload(&fixture.capture, data, &fixture.key) {
        let _ = fixture
            .root
            .verify_capture(&document, &fixture.floor, None, Some(1));
    }
}

/// Opens `data` as a sealed sample with a fixed key, and decodes what opens as a sample frame.
pub fn open_sample(data: &[u8]) {
    if let Ok(plain) = outpost_protocol::capture::open(&[7; 32], data) {
        let _ = outpost_protocol::decode::<outpost_protocol::capture::CaptureSample>(&plain);
    }
}
