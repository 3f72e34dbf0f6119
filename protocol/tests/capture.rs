//! Capture allowances: what a device accepts of one, and each allowance it must refuse, with the
//! exact reason (issue 26). A hub that serves an allowance the release keys did not sign, an old
//! one, one about another model or one above the protocol's maxima gets nothing captured.

mod samples;

use outpost_protocol::capture::{open, recipient_of, seal, SealError};
use outpost_protocol::trust::{
    CaptureBody, CaptureVersions, Role, MAX_CAPTURE_BYTES_PER_DAY, MAX_CAPTURE_SAMPLES_PER_DAY,
};
use outpost_protocol::{encode, SecretKey, VerifyError};

use samples::*;

fn frame(body: &CaptureBody, keys: &[SecretKey], signers: usize) -> Vec<u8> {
    encode(&sign_with(body, keys, signers)).expect("the allowance fits its frame")
}

#[test]
fn an_allowance_signed_by_the_threshold_verifies() {
    let root = verified_root(3, 2);
    let bytes = capture_frame(3, 2);
    let allowance = root
        .verify_capture(&bytes, &floor(), Some("keyword-spotter"), Some(3))
        .unwrap();
    assert_eq!(allowance.body(), &capture_body());
    assert_eq!(allowance.sequence(), 3);
    assert_eq!(allowance.signed_bytes(), bytes.as_slice());
    assert!(allowance.body().versions.covers(7));
    assert!(!allowance.body().versions.covers(8));
    assert_eq!(
        outpost_protocol::trust::capture_model_unverified(&bytes).as_deref(),
        Some("keyword-spotter")
    );
}

/// Each case: the allowance a hostile or careless hub serves, and the exact refusal.
#[test]
fn each_allowance_a_device_must_not_act_on_is_refused_with_its_reason() {
    let root = verified_root(3, 2);
    let refused = |bytes: &[u8], model: Option<&str>, highest: Option<u64>| {
        root.verify_capture(bytes, &floor(), model, highest)
            .unwrap_err()
    };
    let keys = release_keys(3);

    // Under threshold: one release key of the two required.
    assert!(matches!(
        refused(&frame(&capture_body(), &keys, 1), None, None),
        VerifyError::ThresholdNotMet {
            role: Role::Capture,
            valid: 1,
            threshold: 2,
            unknown_keys: 0,
            ..
        }
    ));

    // Signed by keys the root does not list (a hub's own keys).
    let strangers: Vec<SecretKey> = (0..3)
        .map(|i| SecretKey::from_seed([0x90 + i; 32]))
        .collect();
    assert!(matches!(
        refused(&frame(&capture_body(), &strangers, 3), None, None),
        VerifyError::ThresholdNotMet {
            role: Role::Capture,
            valid: 0,
            unknown_keys: 3,
            ..
        }
    ));

    // Expired.
    let expired = CaptureBody {
        created: NOW - 3 * DAY,
        expires: NOW - DAY,
        ..capture_body()
    };
    assert!(matches!(
        refused(&frame(&expired, &keys, 2), None, None),
        VerifyError::Expired {
            role: Role::Capture,
            ..
        }
    ));

    // Above each of the protocol's maxima, named by field.
    let above = [
        (
            CaptureBody {
                max_samples_per_day: MAX_CAPTURE_SAMPLES_PER_DAY + 1,
                ..capture_body()
            },
            "max_samples_per_day",
        ),
        (
            CaptureBody {
                max_bytes_per_day: MAX_CAPTURE_BYTES_PER_DAY + 1,
                ..capture_body()
            },
            "max_bytes_per_day",
        ),
        (
            CaptureBody {
                rate_ppm: 1_000_001,
                ..capture_body()
            },
            "rate_ppm",
        ),
        (
            CaptureBody {
                versions: CaptureVersions::Only((1..=65).collect()),
                ..capture_body()
            },
            "versions",
        ),
    ];
    for (body, field) in above {
        match refused(&frame(&body, &keys, 2), None, None) {
            VerifyError::CaptureAboveMaximum { field: named, .. } => assert_eq!(named, field),
            other => panic!("{field}: {other:?}"),
        }
    }

    // About another model than the one the device asked for.
    assert_eq!(
        refused(&capture_frame(3, 2), Some("wake-word"), None),
        VerifyError::CaptureWrongModel {
            expected: "wake-word".into(),
            found: "keyword-spotter".into()
        }
    );

    // Below the highest allowance of the model the device verified: a replay of an older one,
    // which would switch capture back on after a later allowance turned it off.
    assert_eq!(
        refused(&capture_frame(3, 2), None, Some(4)),
        VerifyError::CaptureRollback {
            model: "keyword-spotter".into(),
            offered: 3,
            highest: 4
        }
    );

    // An empty version list, and a plan's signature passed off as an allowance's.
    let no_versions = CaptureBody {
        versions: CaptureVersions::Only(Vec::new()),
        ..capture_body()
    };
    assert!(matches!(
        refused(&frame(&no_versions, &keys, 2), None, None),
        VerifyError::InvalidCapture(_)
    ));
    assert!(matches!(
        refused(&plan_frame(3, 2), None, None),
        VerifyError::Decode(_)
    ));
}

#[test]
fn validate_refuses_above_the_maxima_before_anything_is_signed() {
    assert_eq!(capture_body().validate(), Ok(()));
    let body = CaptureBody {
        max_samples_per_day: MAX_CAPTURE_SAMPLES_PER_DAY + 1,
        ..capture_body()
    };
    assert_eq!(
        body.validate(),
        Err(VerifyError::CaptureAboveMaximum {
            field: "max_samples_per_day",
            value: MAX_CAPTURE_SAMPLES_PER_DAY + 1,
            max: MAX_CAPTURE_SAMPLES_PER_DAY
        })
    );
    let off = CaptureBody {
        rate_ppm: 0,
        ..capture_body()
    };
    assert_eq!(off.validate(), Ok(()));
    assert!(!off.allows_any());
    assert!(capture_body().allows_any());
}

#[test]
fn a_sample_sealed_to_the_operator_opens_with_that_key_only() {
    let recipient = recipient_of(&CAPTURE_SECRET);
    assert_eq!(capture_body().recipient, recipient);
    let frame = encode(&capture_sample()).unwrap();
    let sealed = seal(&recipient, [3; 32], &frame).unwrap();
    assert_eq!(open(&CAPTURE_SECRET, &sealed).unwrap(), frame);
    assert_eq!(open(&[1; 32], &sealed), Err(SealError::WrongKeyOrTampered));
}
