//! Validating a loaded model against a signed validation set, as the publish gate and the
//! device's probation both do.

use std::time::{Duration, Instant};

use outpost_protocol::device::{Tensor, ValidationSet};
use outpost_protocol::trust::DType;

use super::error::InferenceError;
use super::tensor::*;
use super::LoadedModel;

/// Why a model failed its validation set.
#[derive(Debug, thiserror::Error)]
pub enum ValidationError {
    #[error("the validation set has no cases")]
    NoCases,
    #[error(
        "the validation set's tolerances must be finite and not negative (abs {abs}, rel {rel})"
    )]
    BadTolerance { abs: f64, rel: f64 },
    #[error("validation ran out of time after {completed} of {total} cases ({elapsed:?})")]
    Timeout {
        completed: usize,
        total: usize,
        elapsed: Duration,
    },
    #[error("case {case}: the model cannot run its inputs")]
    Inference {
        case: usize,
        #[source]
        source: InferenceError,
    },
    #[error("case {case}: expected output {output:?} is malformed: {reason}")]
    BadExpected {
        case: usize,
        output: String,
        reason: String,
    },
    #[error("case {case}: expects output {output:?}, which the model does not have")]
    UnknownOutput { case: usize, output: String },
    #[error("case {case}: gives no expected value for output {output:?}")]
    MissingOutput { case: usize, output: String },
    #[error("case {case}, output {output:?}: got type {}, want {}", got.as_str(), want.as_str())]
    DTypeMismatch {
        case: usize,
        output: String,
        got: DType,
        want: DType,
    },
    #[error("case {case}, output {output:?}: got shape {got:?}, want {want:?}")]
    ShapeMismatch {
        case: usize,
        output: String,
        got: Vec<u64>,
        want: Vec<u64>,
    },
    #[error(
        "case {case}, output {output:?}, element {element} {index:?}: got {got}, want {want}, \
         difference {difference} exceeds tolerance {tolerance}"
    )]
    Mismatch {
        case: usize,
        output: String,
        /// Row-major index into the output's elements.
        element: usize,
        /// The same element as one index per axis.
        index: Vec<u64>,
        got: f64,
        want: f64,
        difference: f64,
        tolerance: f64,
    },
}

/// What a passing validation run checked.
#[derive(Debug, Clone, PartialEq)]
pub struct ValidationReport {
    pub cases: usize,
    /// Output elements compared across all cases.
    pub elements: u64,
    /// Largest `|got - want|` seen; how much of the tolerance the model used.
    pub max_abs_difference: f64,
    pub elapsed: Duration,
}

/// Runs every case of a validation set and compares outputs elementwise.
///
/// An element passes when `|got - want| <= abs_tolerance + rel_tolerance * |want|` or the two are
/// equal; NaN never passes. Stops at the first failing case. The deadline is checked before and
/// after each case: tract cannot be interrupted mid-run, so one slow case can overshoot it by its
/// own run time.
pub fn validate(
    model: &LoadedModel,
    set: &ValidationSet,
    deadline: Instant,
) -> Result<ValidationReport, ValidationError> {
    let started = Instant::now();
    let (abs, rel) = (set.abs_tolerance, set.rel_tolerance);
    if !(abs.is_finite() && rel.is_finite() && abs >= 0.0 && rel >= 0.0) {
        return Err(ValidationError::BadTolerance { abs, rel });
    }
    if set.cases.is_empty() {
        return Err(ValidationError::NoCases);
    }
    let total = set.cases.len();
    let mut report = ValidationReport {
        cases: 0,
        elements: 0,
        max_abs_difference: 0.0,
        elapsed: Duration::ZERO,
    };
    for (case_ix, case) in set.cases.iter().enumerate() {
        check_deadline(deadline, started, case_ix, total)?;
        let got = model
            .run(&case.inputs)
            .map_err(|source| ValidationError::Inference {
                case: case_ix,
                source,
            })?;
        check_deadline(deadline, started, case_ix, total)?;
        for want in &case.outputs {
            if !got.iter().any(|tensor| tensor.name == want.name) {
                return Err(ValidationError::UnknownOutput {
                    case: case_ix,
                    output: want.name.clone(),
                });
            }
        }
        for got in &got {
            let mut wants = case.outputs.iter().filter(|want| want.name == got.name);
            let want = match (wants.next(), wants.next()) {
                (Some(want), None) => want,
                (None, _) => {
                    return Err(ValidationError::MissingOutput {
                        case: case_ix,
                        output: got.name.clone(),
                    })
                }
                (Some(_), Some(_)) => {
                    return Err(ValidationError::BadExpected {
                        case: case_ix,
                        output: got.name.clone(),
                        reason: "listed twice".to_owned(),
                    })
                }
            };
            compare(case_ix, got, want, abs, rel, &mut report)?;
        }
        report.cases += 1;
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

pub(super) fn check_deadline(
    deadline: Instant,
    started: Instant,
    completed: usize,
    total: usize,
) -> Result<(), ValidationError> {
    if Instant::now() >= deadline {
        return Err(ValidationError::Timeout {
            completed,
            total,
            elapsed: started.elapsed(),
        });
    }
    Ok(())
}

pub(super) fn compare(
    case: usize,
    got: &Tensor,
    want: &Tensor,
    abs: f64,
    rel: f64,
    report: &mut ValidationReport,
) -> Result<(), ValidationError> {
    want.check().map_err(|error| ValidationError::BadExpected {
        case,
        output: want.name.clone(),
        reason: error.to_string(),
    })?;
    if got.dtype != want.dtype {
        return Err(ValidationError::DTypeMismatch {
            case,
            output: got.name.clone(),
            got: got.dtype,
            want: want.dtype,
        });
    }
    if got.shape != want.shape {
        return Err(ValidationError::ShapeMismatch {
            case,
            output: got.name.clone(),
            got: got.shape.clone(),
            want: want.shape.clone(),
        });
    }
    let got_values = to_f64s(got);
    let want_values = to_f64s(want);
    for (element, (&g, &w)) in got_values.iter().zip(&want_values).enumerate() {
        let difference = (g - w).abs();
        let tolerance = abs + rel * w.abs();
        // Equal infinities pass; NaN compares false on both tests and so never passes.
        let pass = g == w || difference <= tolerance;
        if !pass {
            return Err(ValidationError::Mismatch {
                case,
                output: got.name.clone(),
                element,
                index: unravel(element, &got.shape),
                got: g,
                want: w,
                difference,
                tolerance,
            });
        }
        if difference.is_finite() && difference > report.max_abs_difference {
            report.max_abs_difference = difference;
        }
    }
    report.elements += got_values.len() as u64;
    Ok(())
}

/// Row-major flat index to one index per axis.
pub(super) fn unravel(mut flat: usize, shape: &[u64]) -> Vec<u64> {
    let mut index = vec![0; shape.len()];
    for (axis, &size) in shape.iter().enumerate().rev() {
        if size > 0 {
            index[axis] = flat as u64 % size;
            flat = (flat as u64 / size) as usize;
        }
    }
    index
}
