//! Golden frames: wire version 1, frozen. One committed frame per message kind under
//! `tests/data/golden/v1/`, built from the shared samples. Every frame must still decode with the
//! current code to the same value, re-encode to the same bytes, and the signed documents among
//! them must still verify: a message that changes shape without a new wire version fails here,
//! not in a fleet whose devices upgrade over months (issue 22, `docs/operations.md`, "Upgrading").
//!
//! A kind added later gets its frame with `OUTPOST_BLESS_GOLDEN=1 cargo test -p outpost-protocol
//! --test golden`, which writes only frames that are missing: a committed frame is never rewritten.

mod samples;

use std::fmt::Debug;
use std::path::{Path, PathBuf};

use outpost_protocol::device::{HeldCheckInResponse, ValidationSetV1};
use outpost_protocol::trust::{CaptureBody, ManifestBody, PlanBody, RetireBody, RootBody, Signed};
use outpost_protocol::{decode, encode, Message, MessageKind};

use samples::*;

/// The wire version these frames freeze: the frame header's version byte.
const WIRE_VERSION: u8 = 1;

fn golden_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("tests/data/golden/v{WIRE_VERSION}"))
}

/// The committed frame of `M` named `name`, checked against `sample`: it decodes to the sample,
/// re-encodes to its own bytes, and the current encoder gives those bytes too. Returns the kind
/// checked.
#[track_caller]
fn check<M: Message + PartialEq + Debug>(name: &str, sample: &M) -> MessageKind {
    let path = golden_dir().join(format!("{name}.bin"));
    let fresh = encode(sample).expect("the sample encodes");
    if !path.exists() && std::env::var_os("OUTPOST_BLESS_GOLDEN").is_some() {
        std::fs::create_dir_all(golden_dir()).expect("creating the golden directory");
        std::fs::write(&path, &fresh).expect("writing a golden frame");
    }
    let golden = std::fs::read(&path).unwrap_or_else(|error| {
        panic!(
            "{}: {error}. A new message kind needs its golden frame: \
             OUTPOST_BLESS_GOLDEN=1 cargo test -p outpost-protocol --test golden",
            path.display()
        )
    });
    assert_eq!(golden[2], WIRE_VERSION, "{name}: the frame's wire version");
    let decoded: M = decode(&golden).unwrap_or_else(|error| {
        panic!("{name}: a version-{WIRE_VERSION} frame no longer decodes: {error}")
    });
    assert_eq!(
        &decoded, sample,
        "{name}: the version-{WIRE_VERSION} frame decodes to another value"
    );
    assert_eq!(
        encode(&decoded).expect("re-encodes"),
        golden,
        "{name}: re-encoded differently"
    );
    assert_eq!(
        fresh, golden,
        "{name}: the current encoder writes other bytes than wire version {WIRE_VERSION}: a \
         changed message needs a new wire version (and its golden frames), not a silent change"
    );
    M::KIND
}

#[test]
fn every_version_1_frame_still_decodes_to_what_was_frozen() {
    let root = signed_root(1, 3, 2);
    let manifest_frame = manifest_frame(4, 3, 2);
    let plan_frame = plan_frame(3, 2);
    let manifest: Signed<ManifestBody> = decode(&manifest_frame).expect("sample manifest");
    let plan: Signed<PlanBody> = decode(&plan_frame).expect("sample plan");
    let retire: Signed<RetireBody> = decode(&retire_frame(3, 2)).expect("sample retirement");
    let capture: Signed<CaptureBody> = decode(&capture_frame(3, 2)).expect("sample allowance");
    let set = validation_set();
    let first_form = ValidationSetV1 {
        abs_tolerance: set.abs_tolerance,
        rel_tolerance: set.rel_tolerance,
        cases: set.cases.clone(),
    };
    let mut checked = vec![
        check("signed_root", &root),
        check("signed_manifest", &manifest),
        check("signed_plan", &plan),
        check("root_body", &root_body(1, 3, 2)),
        check("manifest_body", &manifest_body(4)),
        check(
            "plan_body",
            &plan.decode_unverified().expect("the sample plan's body"),
        ),
        check("validation_set_v1", &first_form),
        check("validation_set", &set),
        check("enroll_request", &enroll_request()),
        check("enroll_response", &enroll_response()),
        check("check_in", &check_in()),
        check("check_in_response", &check_in_response()),
        check("status_report", &status_reports()[0]),
        check("telemetry_batch", &telemetry_batch(2)),
        check("telemetry_ack", &telemetry_ack()),
        check("error_response", &error_response()),
        check("profile", &drift_profile()),
        check("drift_summary", &drift_summary()),
        check("held_check_in", &held_check_in()),
        check("held_check_in_response", &held_unchanged()),
        check("models_check_in", &models_check_in()),
        check("models_check_in_response", &models_check_in_response()),
        check("retire_body", &retire_body()),
        check("signed_retire", &retire),
        check("runtime_report", &runtime_report()),
        check("signed_capture", &capture),
        check("capture_body", &capture_body()),
        check("capture_request", &capture_request()),
        check("capture_allowances", &capture_allowances()),
        check("capture_upload", &capture_upload()),
        check("capture_ack", &capture_ack()),
        check("capture_sample", &capture_sample()),
    ];
    check(
        "held_check_in_response_full",
        &HeldCheckInResponse::Full(check_in_response()),
    );
    for (index, report) in status_reports().iter().enumerate().skip(1) {
        check(&format!("status_report_{index}"), report);
    }

    // Every kind of the wire has its frozen frame.
    checked.sort_by_key(|kind| *kind as u8);
    checked.dedup();
    let all: Vec<MessageKind> = (0..=u8::MAX).filter_map(MessageKind::from_byte).collect();
    assert_eq!(checked, all, "a message kind without a golden frame");

    // The signed documents still verify: the root by its own keys, the manifest and plan by it.
    let verified = outpost_protocol::VerifiedRoot::verify_initial(
        &std::fs::read(golden_dir().join("signed_root.bin")).expect("the frozen root"),
        &floor(),
    )
    .expect("the frozen root verifies");
    let _: &RootBody = verified.body();
    verified
        .verify_manifest(
            &std::fs::read(golden_dir().join("signed_manifest.bin")).expect("the frozen manifest"),
            &floor(),
            None,
        )
        .expect("the frozen manifest verifies");
    verified
        .verify_plan(
            &std::fs::read(golden_dir().join("signed_plan.bin")).expect("the frozen plan"),
            &floor(),
            None,
        )
        .expect("the frozen plan verifies");
    verified
        .verify_retire(
            &std::fs::read(golden_dir().join("signed_retire.bin")).expect("the frozen retirement"),
            &floor(),
            None,
        )
        .expect("the frozen retirement verifies");
    let allowance = verified
        .verify_capture(
            &std::fs::read(golden_dir().join("signed_capture.bin")).expect("the frozen allowance"),
            &floor(),
            Some("keyword-spotter"),
            None,
        )
        .expect("the frozen capture allowance verifies");
    // A frozen sealed sample still opens with the operator's key to the frozen sample.
    let upload: outpost_protocol::capture::CaptureUpload =
        decode(&std::fs::read(golden_dir().join("capture_upload.bin")).expect("the frozen upload"))
            .expect("the frozen upload decodes");
    let opened = outpost_protocol::capture::open(&CAPTURE_SECRET, &upload.samples[0].sealed)
        .expect("the frozen sample opens");
    assert_eq!(
        decode::<outpost_protocol::capture::CaptureSample>(&opened).expect("a sample frame"),
        capture_sample()
    );
    assert_eq!(allowance.body().recipient, upload_recipient());
}

fn upload_recipient() -> [u8; 32] {
    outpost_protocol::capture::recipient_of(&CAPTURE_SECRET)
}
