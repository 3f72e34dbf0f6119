//! The shadow stage's rules in the protocol: what a signed shadow stage may say (checked by plan
//! verification, so a device refuses a plan whose gate makes no sense), and when a shadow report
//! adds up (checked by the hub before it stores one).

mod samples;

use outpost_protocol::device::{ShadowCounts, ShadowReport};
use outpost_protocol::trust::{ManifestRef, PlanBody, ShadowStage};
use outpost_protocol::{encode, Sha256, VerifyError};

use samples::*;

fn reference(version: u64) -> ManifestRef {
    manifest_ref(&manifest_frame(version, 1, 1), version)
}

/// Signs `body` with one sample key and verifies it as a device would.
fn verify(body: &PlanBody) -> Result<(), VerifyError> {
    let frame = encode(&sign_with(body, &release_keys(1), 1)).expect("the plan fits its frame");
    verified_root(1, 1)
        .verify_plan(&frame, &floor(), None)
        .map(|_| ())
}

fn with_shadow(change: impl FnOnce(&mut ShadowStage)) -> PlanBody {
    let mut body = plan_body(reference(7), Some(reference(6)));
    let mut shadow = body
        .shadow
        .clone()
        .expect("the sample plan has a shadow stage");
    change(&mut shadow);
    body.shadow = Some(shadow);
    body
}

#[test]
fn a_sensible_shadow_stage_verifies() {
    verify(&with_shadow(|_| {})).unwrap();
    // Its limits' end points are allowed: 100% agreement, no difference at all.
    verify(&with_shadow(|shadow| {
        shadow.percent = 100;
        shadow.min_top1_agreement = 1.0;
        shadow.max_mean_abs_diff = 0.0;
    }))
    .unwrap();
}

#[test]
fn a_nonsensical_shadow_stage_is_refused_with_its_reason() {
    let cases: Vec<(PlanBody, &str)> = vec![
        (
            with_shadow(|shadow| shadow.percent = 0),
            "shadow stage percentage must be within 1..=100",
        ),
        (
            with_shadow(|shadow| shadow.percent = 101),
            "shadow stage percentage must be within 1..=100",
        ),
        (
            with_shadow(|shadow| shadow.min_comparisons = 0),
            "shadow stage needs at least 1 comparison",
        ),
        (
            with_shadow(|shadow| shadow.min_top1_agreement = 1.01),
            "shadow stage minimum top-1 agreement must be a number within 0..=1",
        ),
        (
            with_shadow(|shadow| shadow.min_top1_agreement = f64::NAN),
            "shadow stage minimum top-1 agreement must be a number within 0..=1",
        ),
        (
            with_shadow(|shadow| shadow.max_mean_abs_diff = -0.1),
            "shadow stage maximum mean absolute difference must be a finite non-negative number",
        ),
        (
            with_shadow(|shadow| shadow.max_mean_abs_diff = f64::INFINITY),
            "shadow stage maximum mean absolute difference must be a finite non-negative number",
        ),
        (
            PlanBody {
                fallback: None,
                ..with_shadow(|_| {})
            },
            "shadow stage needs a fallback to compare the target with",
        ),
    ];
    for (body, reason) in cases {
        assert_eq!(
            verify(&body),
            Err(VerifyError::InvalidPlan(reason.to_owned())),
            "{:?}",
            body.shadow
        );
    }
}

fn counts() -> ShadowCounts {
    ShadowCounts {
        compared: 100,
        top1_agreed: 97,
        errors: 2,
        abs_diff_sum: 1.5,
        abs_diff_values: 1200,
        dropped: 3,
    }
}

fn report() -> ShadowReport {
    with_counts(counts())
}

fn with_counts(counts: ShadowCounts) -> ShadowReport {
    ShadowReport {
        target: reference(7),
        counts,
    }
}

#[test]
fn shadow_reports_must_add_up() {
    report().validate().unwrap();
    let empty = ShadowCounts {
        compared: 0,
        top1_agreed: 0,
        abs_diff_sum: 0.0,
        abs_diff_values: 0,
        ..counts()
    };
    with_counts(empty).validate().unwrap();

    let cases: Vec<(ShadowReport, &str)> = vec![
        (
            with_counts(ShadowCounts {
                top1_agreed: 101,
                ..counts()
            }),
            "101 top-1 agreements in 100 comparisons",
        ),
        (
            with_counts(ShadowCounts {
                abs_diff_sum: f64::NAN,
                ..counts()
            }),
            "absolute difference sum NaN is not a finite non-negative number",
        ),
        (
            with_counts(ShadowCounts {
                abs_diff_sum: -1.0,
                ..counts()
            }),
            "absolute difference sum -1 is not a finite non-negative number",
        ),
        (
            with_counts(ShadowCounts {
                abs_diff_values: 99,
                ..counts()
            }),
            "99 values differenced over 100 comparisons",
        ),
        (
            with_counts(ShadowCounts {
                abs_diff_sum: 0.5,
                ..empty
            }),
            "an absolute difference sum over no values",
        ),
        (
            ShadowReport {
                target: ManifestRef {
                    name: "../escape".to_owned(),
                    version: 7,
                    manifest_sha256: Sha256([7; 32]),
                },
                ..report()
            },
            "target model name",
        ),
    ];
    for (bad, reason) in cases {
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.starts_with(reason), "{error:?} is not {reason:?}");
    }
}

/// `ShadowReport` gained a nested `counts` (issue 19); postcard encodes no nesting, so its bytes
/// are the flat fields agents and hubs of release 0.1.0 send and store.
#[test]
fn a_shadow_report_encodes_as_its_flat_fields_did() {
    let flat = (reference(7), 100u64, 97u64, 2u64, 1.5f64, 1200u64, 3u64);
    assert_eq!(
        postcard::to_allocvec(&report()).unwrap(),
        postcard::to_allocvec(&flat).unwrap()
    );
}

/// A plan moves one model: a fallback of another name would let a rollout of one model take
/// another model's place on every device it reaches.
#[test]
fn a_plan_whose_fallback_is_another_model_is_refused() {
    let mut fallback = reference(6);
    fallback.name = "another-model".to_owned();
    let body = PlanBody {
        shadow: None,
        ..plan_body(reference(7), Some(fallback))
    };
    let Err(VerifyError::InvalidPlan(reason)) = verify(&body) else {
        panic!("a plan with a fallback of another model verified");
    };
    assert!(
        reason.contains("\"another-model\"") && reason.contains("a plan moves one model"),
        "{reason}"
    );
}
