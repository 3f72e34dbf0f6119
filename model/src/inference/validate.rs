//! Validating a loaded model against a signed validation set, as the publish gate and the
//! device's probation both do.

use std::time::{Duration, Instant};

use outpost_protocol::device::{OutputCheck, Tensor, Tolerance, ValidationSet};
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
    #[error("the check of output {output:?} is not usable: {reason}")]
    BadCheck { output: String, reason: String },
    #[error(
        "output {output:?}: the top class agrees with the expected one in {agreed} of {rows} rows, \
         fewer than the {min} share the set asks for"
    )]
    Top1 {
        output: String,
        agreed: u64,
        rows: u64,
        min: f64,
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
    /// Each output checked on its top-1 agreement: rows whose top class agreed, of all rows.
    pub top1: Vec<Top1Agreement>,
    pub elapsed: Duration,
}

/// How often one class output's top class was the expected one's.
#[derive(Debug, Clone, PartialEq)]
pub struct Top1Agreement {
    pub output: String,
    pub agreed: u64,
    pub rows: u64,
}

/// Runs every case of a validation set and compares each output as the set checks it.
///
/// Every output must have the expected type and shape. An element passes when
/// `|got - want| <= abs + rel * |want|` or the two are equal, with the output's own tolerance from
/// its [`OutputCheck`] or else the set's; NaN never passes. An output checked on top-1 alone has
/// no element compared; its rows' top classes are counted over every case and must agree in at
/// least the check's share. Stops at the first failing case. The deadline is checked before and
/// after each case: tract cannot be interrupted mid-run, so one slow case can overshoot it by its
/// own run time.
pub fn validate(
    model: &LoadedModel,
    set: &ValidationSet,
    deadline: Instant,
) -> Result<ValidationReport, ValidationError> {
    let started = Instant::now();
    let default = Tolerance {
        abs: set.abs_tolerance,
        rel: set.rel_tolerance,
    };
    if !usable(default) {
        return Err(ValidationError::BadTolerance {
            abs: default.abs,
            rel: default.rel,
        });
    }
    check_checks(model, &set.checks)?;
    if set.cases.is_empty() {
        return Err(ValidationError::NoCases);
    }
    let total = set.cases.len();
    let mut report = ValidationReport {
        cases: 0,
        elements: 0,
        max_abs_difference: 0.0,
        top1: set
            .checks
            .iter()
            .filter(|check| check.min_top1.is_some())
            .map(|check| Top1Agreement {
                output: check.output.clone(),
                agreed: 0,
                rows: 0,
            })
            .collect(),
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
            let check = set.check_of(&got.name);
            let tolerance = check.map_or(Some(default), |check| check.tolerance);
            compare(case_ix, got, want, tolerance, &mut report)?;
            if let Some(agreement) = report
                .top1
                .iter_mut()
                .find(|agreement| agreement.output == got.name)
            {
                let (agreed, rows) = top1_agreement(got, want);
                agreement.agreed += agreed;
                agreement.rows += rows;
            }
        }
        report.cases += 1;
    }
    for agreement in &report.top1 {
        let min = set
            .check_of(&agreement.output)
            .and_then(|check| check.min_top1)
            .unwrap_or(0.0);
        if (agreement.agreed as f64) < min * agreement.rows as f64 || agreement.rows == 0 {
            return Err(ValidationError::Top1 {
                output: agreement.output.clone(),
                agreed: agreement.agreed,
                rows: agreement.rows,
                min,
            });
        }
    }
    report.elapsed = started.elapsed();
    Ok(report)
}

fn usable(tolerance: Tolerance) -> bool {
    let Tolerance { abs, rel } = tolerance;
    abs.is_finite() && rel.is_finite() && abs >= 0.0 && rel >= 0.0
}

/// Each check names an output of the model once, with usable tolerances, a share between 0 and
/// 1, and top-1 only where the output has a last axis of classes.
fn check_checks(model: &LoadedModel, checks: &[OutputCheck]) -> Result<(), ValidationError> {
    for (index, check) in checks.iter().enumerate() {
        let bad = |reason: &str| ValidationError::BadCheck {
            output: check.output.clone(),
            reason: reason.to_owned(),
        };
        let Some(spec) = model
            .outputs()
            .iter()
            .find(|spec| spec.name == check.output)
        else {
            return Err(bad("the model has no such output"));
        };
        if checks[..index]
            .iter()
            .any(|other| other.output == check.output)
        {
            return Err(bad("it is checked twice"));
        }
        if check.tolerance.is_some_and(|tolerance| !usable(tolerance)) {
            return Err(bad("its tolerances must be finite and not negative"));
        }
        match check.min_top1 {
            Some(min) if !(0.0..=1.0).contains(&min) => {
                return Err(bad("its top-1 share must be between 0 and 1"))
            }
            Some(_) if spec.shape.is_empty() => {
                return Err(bad("top-1 needs class scores along a last axis"))
            }
            None if check.tolerance.is_none() => {
                return Err(bad("it checks nothing: give a tolerance or a top-1 share"))
            }
            _ => {}
        }
    }
    Ok(())
}

/// Rows of `got` (along its last axis) whose highest score is at the same class as `want`'s,
/// and the rows compared. A row whose scores are all NaN has no top class and never agrees.
fn top1_agreement(got: &Tensor, want: &Tensor) -> (u64, u64) {
    let width = got.shape.last().copied().unwrap_or(1).max(1) as usize;
    let (got, want) = (to_f64s(got), to_f64s(want));
    let top = |row: &[f64]| {
        row.iter()
            .enumerate()
            .filter(|(_, value)| !value.is_nan())
            .fold(
                None,
                |best: Option<(usize, f64)>, (class, &value)| match best {
                    Some((_, top)) if top >= value => best,
                    _ => Some((class, value)),
                },
            )
            .map(|(class, _)| class)
    };
    let mut agreed = 0;
    let mut rows = 0;
    for (got, want) in got.chunks(width).zip(want.chunks(width)) {
        rows += 1;
        if top(got).is_some() && top(got) == top(want) {
            agreed += 1;
        }
    }
    (agreed, rows)
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

/// Checks `got` has `want`'s type and shape and, with a `tolerance`, every element within it.
pub(super) fn compare(
    case: usize,
    got: &Tensor,
    want: &Tensor,
    tolerance: Option<Tolerance>,
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
    let Some(Tolerance { abs, rel }) = tolerance else {
        return Ok(());
    };
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
