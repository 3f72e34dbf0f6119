//! Retirements: a model leaves a device only by one, signed like a plan. What a device accepts
//! of one, and what it refuses, each with its reason.

mod samples;

use outpost_protocol::trust::{is_retirement, RetireBody, Role, Signed};
use outpost_protocol::{encode, Label, VerifyError};

use samples::*;

fn frame(body: &RetireBody, signers: usize) -> Vec<u8> {
    encode(&sign_with(body, &release_keys(3), signers)).expect("the retirement fits its frame")
}

#[test]
fn a_retirement_signed_by_the_threshold_verifies_and_is_told_from_a_plan() {
    let root = verified_root(3, 2);
    let bytes = retire_frame(3, 2);
    let retire = root.verify_retire(&bytes, &floor(), Some(43)).unwrap();
    assert_eq!(retire.body(), &retire_body());
    assert_eq!(retire.sequence(), 43);
    assert_eq!(retire.signed_bytes(), bytes.as_slice());
    assert!(is_retirement(&bytes));
    assert!(!is_retirement(&plan_frame(3, 2)));
    assert!(!is_retirement(b"OP"));
}

#[test]
fn a_retirement_the_device_must_not_act_on_is_refused_with_its_reason() {
    let root = verified_root(3, 2);
    let refused = |bytes: &[u8], highest: Option<u64>| {
        root.verify_retire(bytes, &floor(), highest).unwrap_err()
    };
    // Below the threshold of plan signers.
    assert!(matches!(
        refused(&frame(&retire_body(), 1), None),
        VerifyError::ThresholdNotMet {
            role: Role::Plan,
            valid: 1,
            ..
        }
    ));
    // Below the highest plan of the model the device accepted: a replayed, older retirement.
    assert_eq!(
        refused(&retire_frame(3, 2), Some(44)),
        VerifyError::PlanRollback {
            offered: 43,
            highest: 44
        }
    );
    // Expired.
    let expired = RetireBody {
        created: NOW - 3 * DAY,
        expires: NOW - DAY,
        ..retire_body()
    };
    assert!(matches!(
        refused(&frame(&expired, 2), None),
        VerifyError::Expired {
            role: Role::Plan,
            ..
        }
    ));
    // Not a model name, a bad selector, a window that ends before it begins.
    let unnamed = RetireBody {
        model: "no spaces allowed".to_owned(),
        ..retire_body()
    };
    assert!(matches!(
        refused(&frame(&unnamed, 2), None),
        VerifyError::InvalidModelName { .. }
    ));
    let selector = RetireBody {
        selector: vec![Label {
            key: String::new(),
            value: "x".to_owned(),
        }],
        ..retire_body()
    };
    assert!(matches!(
        refused(&frame(&selector, 2), None),
        VerifyError::InvalidPlan(reason) if reason.starts_with("retirement selector label")
    ));
    let backwards = RetireBody {
        expires: NOW - 2 * DAY,
        ..retire_body()
    };
    assert_eq!(
        refused(&frame(&backwards, 2), None),
        VerifyError::InvalidPlan("retirement expires before it is created".to_owned())
    );
    // A plan's signatures do not make a retirement: the payload names its kind.
    let plan: Signed<outpost_protocol::trust::PlanBody> =
        outpost_protocol::decode(&plan_frame(3, 2)).unwrap();
    let mut forged: Signed<RetireBody> = Signed::new(&retire_body()).unwrap();
    forged.signatures = plan.signatures.clone();
    assert!(matches!(
        refused(&encode(&forged).unwrap(), None),
        VerifyError::ThresholdNotMet {
            valid: 0,
            invalid: 2,
            ..
        }
    ));
}
