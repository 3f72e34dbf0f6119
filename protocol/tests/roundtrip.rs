//! Every message type survives encode → decode unchanged, and re-encodes to the same bytes.
//!
//! Signatures cover exact bytes, so a type whose encoding drifted between encode and decode (a
//! skipped field, a lossy conversion) would silently break verification in the field. These tests
//! pin that each wire type is a faithful, canonical round trip, and that [`encode`] refuses to
//! produce a frame the peer would reject as oversized.

mod samples;

use std::fmt::Debug;

use outpost_protocol::device::{
    held_digest, ErrorResponse, HeldCheckInResponse, RuntimeReport, TelemetryBatch,
};
use outpost_protocol::envelope::{peek_kind, HEADER_LEN};
use outpost_protocol::trust::{ManifestBody, PlanBody, RootBody, Signed, Slot};
use outpost_protocol::{decode, encode, sha256, EncodeError, Message};

use samples::*;

/// Encodes `message`, decodes the frame, and checks the value, the header and the re-encoding.
#[track_caller]
fn assert_round_trip<M: Message + PartialEq + Debug>(message: &M) {
    let frame = encode(message).expect("sample message encodes");
    assert!(
        frame.len() <= M::MAX_FRAME,
        "{} frame over its cap",
        M::NAME
    );
    assert!(frame.len() > HEADER_LEN, "{} frame has no body", M::NAME);
    assert_eq!(peek_kind(&frame), Some(M::KIND));
    let decoded: M = decode(&frame).expect("own frame decodes");
    assert_eq!(&decoded, message);
    assert_eq!(encode(&decoded).expect("decoded message encodes"), frame);
}

#[test]
fn signed_root_round_trips() {
    assert_round_trip(&signed_root(1, 1, 1));
    assert_round_trip(&signed_root(2, 5, 3));
    // The payload inside a signed document is itself a frame, and must round-trip too.
    let signed = signed_root(3, 5, 3);
    let body: RootBody = signed.decode_unverified().expect("payload decodes");
    assert_eq!(body, root_body(3, 5, 3));
}

#[test]
fn signed_manifest_round_trips() {
    let keys = release_keys(5);
    let signed = sign_with(&manifest_body(7), &keys, 3);
    assert_eq!(signed.signatures.len(), 3);
    assert_round_trip(&signed);
    assert_eq!(
        signed.decode_unverified().expect("payload decodes"),
        manifest_body(7)
    );
}

#[test]
fn signed_plan_round_trips() {
    let frame = plan_frame(5, 3);
    let signed: Signed<PlanBody> = decode(&frame).expect("sample plan decodes");
    assert_eq!(signed.signatures.len(), 3);
    assert_round_trip(&signed);
    let body = signed.decode_unverified().expect("payload decodes");
    assert_eq!(body.sequence, 42);
    assert!(body.fallback.is_some());
}

#[test]
fn root_body_round_trips() {
    assert_round_trip(&root_body(1, 1, 1));
    assert_round_trip(&root_body(9, 5, 3));
}

#[test]
fn manifest_body_round_trips() {
    assert_round_trip::<ManifestBody>(&manifest_body(7));
}

#[test]
fn plan_body_round_trips() {
    let target = manifest_ref(&manifest_frame(7, 1, 1), 7);
    let fallback = manifest_ref(&manifest_frame(6, 1, 1), 6);
    assert_round_trip(&plan_body(target.clone(), Some(fallback)));
    // A first release has no fallback and no drift gate; both options must survive as `None`.
    let mut first_release = plan_body(target, None);
    first_release.gates.max_drift_psi = None;
    assert_round_trip(&first_release);
}

#[test]
fn validation_set_round_trips() {
    let set = validation_set();
    for case in &set.cases {
        for tensor in case.inputs.iter().chain(&case.outputs) {
            tensor.check().expect("sample tensors are consistent");
        }
    }
    assert_round_trip(&set);
}

/// A validation set of the first form (one pair of tolerances for every output, kind 7) still
/// reads, as a set without per-output checks; the current form reads through the same call, and
/// each form is refused as the other by the plain decoder.
#[test]
fn a_first_form_validation_set_still_decodes() {
    use outpost_protocol::device::{ValidationSet, ValidationSetV1};
    let current = validation_set();
    let first = ValidationSetV1 {
        abs_tolerance: current.abs_tolerance,
        rel_tolerance: current.rel_tolerance,
        cases: current.cases.clone(),
    };
    let frame = encode(&first).expect("encodes");
    assert_eq!(frame[3], 7, "the first form's kind");
    let read = ValidationSet::decode(&frame).expect("the first form reads");
    assert_eq!(read.cases, current.cases);
    assert_eq!(read.abs_tolerance, current.abs_tolerance);
    assert!(read.checks.is_empty());
    let frame = encode(&current).expect("encodes");
    assert_eq!(frame[3], 22, "the current form's kind");
    assert_eq!(ValidationSet::decode(&frame).expect("reads"), current);
    assert!(decode::<ValidationSetV1>(&frame).is_err());

    // Written in the oldest form that holds it: the first form without checks, so agents of
    // every release read it; the current form with them.
    assert_eq!(current.encode_oldest().expect("encodes"), frame);
    let unchecked = ValidationSet {
        checks: Vec::new(),
        ..current
    };
    let oldest = unchecked.encode_oldest().expect("encodes");
    assert_eq!(oldest, encode(&first).expect("encodes"));
    assert_eq!(ValidationSet::decode(&oldest).expect("reads"), unchecked);
}

#[test]
fn enroll_request_round_trips() {
    assert_round_trip(&enroll_request());
}

#[test]
fn enroll_response_round_trips() {
    assert_round_trip(&enroll_response());
}

#[test]
fn check_in_round_trips() {
    assert_round_trip(&check_in());
    // A freshly enrolled device runs nothing and has accepted no plan yet.
    let mut fresh = check_in();
    fresh.active = None;
    fresh.plan_sequence = None;
    assert_round_trip(&fresh);
}

#[test]
fn check_in_response_round_trips() {
    let response = check_in_response();
    assert_eq!(response.roots.len(), 2);
    assert_round_trip(&response);
    let mut idle = check_in_response();
    idle.roots.clear();
    idle.plan = None;
    idle.manifest = None;
    assert_round_trip(&idle);
}

#[test]
fn held_check_in_round_trips() {
    assert_round_trip(&held_check_in());
    let mut nothing_held = held_check_in();
    nothing_held.held = None;
    assert_round_trip(&nothing_held);
}

#[test]
fn held_check_in_response_round_trips_both_variants() {
    assert_round_trip(&held_unchanged());
    assert_round_trip(&HeldCheckInResponse::Full(check_in_response()));
}

#[test]
fn models_check_in_and_its_answer_round_trip() {
    assert_round_trip(&models_check_in());
    assert_round_trip(&models_check_in_response());
    let response = models_check_in_response();
    assert_eq!(response.models[0].held_digest(), None);
    assert_eq!(
        response.models[1].held_digest(),
        check_in_response().held_digest(),
        "a model's full answer is held as the single-model answer with the same documents"
    );
}

#[test]
fn a_retirement_round_trips() {
    assert_round_trip(&retire_body());
    let signed: outpost_protocol::trust::Signed<outpost_protocol::trust::RetireBody> =
        outpost_protocol::decode(&retire_frame(3, 2)).unwrap();
    assert_round_trip(&signed);
}

#[test]
fn capture_messages_round_trip() {
    assert_round_trip(&capture_body());
    let signed: outpost_protocol::trust::Signed<outpost_protocol::trust::CaptureBody> =
        outpost_protocol::decode(&capture_frame(3, 2)).unwrap();
    assert_round_trip(&signed);
    assert_round_trip(&capture_request());
    assert_round_trip(&capture_allowances());
    assert_round_trip(&capture_sample());
    assert_round_trip(&capture_upload());
    assert_round_trip(&capture_ack());
}

#[test]
fn held_digest_tells_apart_every_slot_and_absence() {
    let (plan, manifest, shadow) = (sha256(b"plan"), sha256(b"manifest"), sha256(b"shadow"));
    let digests = [
        held_digest(&plan, None, None),
        held_digest(&plan, Some((Slot::Target, &manifest)), None),
        held_digest(&plan, Some((Slot::Fallback, &manifest)), None),
        held_digest(&plan, None, Some(&shadow)),
        held_digest(&plan, Some((Slot::Target, &manifest)), Some(&shadow)),
        held_digest(&shadow, Some((Slot::Target, &manifest)), Some(&plan)),
        held_digest(&manifest, None, None),
    ];
    let distinct: std::collections::HashSet<_> = digests.iter().map(|digest| digest.0).collect();
    assert_eq!(distinct.len(), digests.len());
    // The same held documents give the same digest on hub and device.
    assert_eq!(
        digests[4],
        held_digest(&plan, Some((Slot::Target, &manifest)), Some(&shadow))
    );
}

#[test]
fn status_report_round_trips_every_status() {
    let reports = status_reports();
    assert_eq!(reports.len(), 8, "one sample per Status variant");
    for report in &reports {
        assert_round_trip(report);
    }
}

#[test]
fn runtime_report_round_trips() {
    let report = runtime_report();
    report
        .validate()
        .expect("the sample report is within its caps");
    assert_round_trip(&report);
    // An agent serving nothing yet reports no model.
    assert_round_trip(&RuntimeReport {
        models: Vec::new(),
        at: 0,
    });
}

#[test]
fn telemetry_batch_round_trips() {
    assert_round_trip(&telemetry_batch(100));
    assert_round_trip(&telemetry_batch(0));
}

/// The hub stores each window's drift summary as its own frame, cut from the batch's frame: the
/// cut must be exactly the summary's encoding, wherever the summary sits among the windows.
#[test]
fn drift_frames_cut_from_a_batch_are_the_summaries_own_frames() {
    let profile = drift_profile();
    let mut batch = telemetry_batch(7);
    // Summaries on the first and last windows, on shadow windows (2 and 5) and not on others,
    // one of them empty.
    for (index, hour) in [(0, 0), (2, 1), (3, 2), (5, 3), (6, 4)] {
        let rows = if index == 3 { 0 } else { 300 };
        batch.windows[index].drift = Some(drift_summary_of(&profile, rows, hour, index as u64));
    }
    let frame = encode(&batch).expect("sample batch encodes");
    let decoded: TelemetryBatch = decode(&frame).expect("own frame decodes");
    let expected: Vec<Option<Vec<u8>>> = decoded
        .windows
        .iter()
        .map(|window| {
            let summary = window.drift.as_ref()?;
            Some(encode(summary).expect("sample summary encodes"))
        })
        .collect();
    assert_eq!(decoded.drift_frames(&frame), Some(expected));
    assert_eq!(
        telemetry_batch(0).drift_frames(&encode(&telemetry_batch(0)).unwrap()),
        Some(vec![])
    );

    // The sequence's varint written a byte longer than it needs: postcard reads it as the same
    // batch, but the positions no longer hold, so there is nothing to cut.
    let body = &frame[HEADER_LEN..];
    assert_eq!(&body[..2], &[0xd2, 0x09], "sequence 1,234 as a varint");
    let mut longer = frame[..HEADER_LEN].to_vec();
    longer.extend_from_slice(&[0xd2, 0x89, 0x00]);
    longer.extend_from_slice(&body[2..]);
    let read: TelemetryBatch = decode(&longer).expect("postcard reads a longer varint too");
    assert_eq!(read, decoded);
    assert_eq!(decoded.drift_frames(&longer), None);
    // Nor from another message's frame, or a truncated one.
    assert_eq!(decoded.drift_frames(&frame[..frame.len() - 1]), None);
    assert_eq!(
        decoded.drift_frames(&encode(&telemetry_ack()).unwrap()),
        None
    );
}

#[test]
fn telemetry_ack_round_trips() {
    assert_round_trip(&telemetry_ack());
}

#[test]
fn error_response_round_trips() {
    assert_round_trip(&error_response());
}

#[test]
fn drift_profile_round_trips() {
    assert_round_trip(&drift_profile());
    // A profile of a hundred features with full edges is a realistic large one.
    assert_round_trip(&drift_profile_with(100, 1_000));
}

#[test]
fn drift_summary_round_trips() {
    assert_round_trip(&drift_summary());
    // An hour in which nothing was served: empty summaries, min/max at ±inf.
    let profile = drift_profile();
    assert_round_trip(&drift_summary_of(&profile, 0, 3, 1));
}

#[test]
fn encode_refuses_a_message_over_its_cap() {
    let huge = ErrorResponse {
        status: 500,
        message: "x".repeat(ErrorResponse::MAX_FRAME),
    };
    match encode(&huge) {
        Err(EncodeError::TooLarge { message, len, max }) => {
            assert_eq!(message, "error response");
            assert_eq!(max, ErrorResponse::MAX_FRAME);
            assert!(len > max);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    // A batch grown past the 1 MiB telemetry cap is refused rather than sent to be rejected.
    let Err(EncodeError::TooLarge { message, max, .. }) = encode(&telemetry_batch(20_000)) else {
        panic!("a 20k-window telemetry batch must be too large");
    };
    assert_eq!(
        (message, max),
        ("telemetry batch", TelemetryBatch::MAX_FRAME)
    );
    // Exactly at the cap is still allowed, by encode and decode alike: the limit is inclusive.
    let overhead = encode(&ErrorResponse {
        status: 500,
        message: String::new(),
    })
    .expect("empty error encodes")
    .len();
    // The length prefix of an 8 KiB string takes two varint bytes, one more than an empty one.
    let fitting = ErrorResponse {
        status: 500,
        message: "x".repeat(ErrorResponse::MAX_FRAME - overhead - 1),
    };
    let frame = encode(&fitting).expect("a message exactly at the cap encodes");
    assert_eq!(frame.len(), ErrorResponse::MAX_FRAME);
    assert_eq!(decode::<ErrorResponse>(&frame), Ok(fitting));
}
