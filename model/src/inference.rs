//! The one inference path: loading a signed model's ONNX bytes into tract, running requests on it,
//! and checking it against a validation set.
//!
//! The agent's probation and local inference API and the hub's `model publish` gate all call this
//! module, so a model that passes validation at publish time is run by exactly the code that will
//! run it on the device. Every input is checked against the manifest's [`TensorSpec`]s before tract
//! sees it, so a bad request gets an error naming the input and the axis, never a tract internal.
//!
//! tract is a large parser of untrusted bytes and has a few `panic!`s and index operations on
//! malformed graphs, so loading and running are wrapped in [`std::panic::catch_unwind`]. That only
//! helps where panics unwind, which is why every profile, `dist` included, keeps unwinding: with
//! `panic = "abort"` such a model would end the process instead of being refused (the manifest
//! signature is what keeps such models out in the first place).

use std::any::Any;
use std::collections::HashMap;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use outpost_protocol::device::{Tensor, ValidationSet};
use outpost_protocol::trust::{DType, Dim, TensorSpec};
use prost::Message as _;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::multithread::Executor;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, OutletId, RunOptions,
    TDim, TValue, TVec, TypedModel, TypedSimplePlan,
};
use tract_onnx::tract_hir::infer::Factoid;

/// Name of the symbol every [`Dim::Batch`] axis is bound to, so all inputs share one batch size.
const BATCH_SYMBOL: &str = "N";

/// Why a model could not be loaded or described, or why a request could not be run.
#[derive(Debug, thiserror::Error)]
pub enum InferenceError {
    #[error("the inference thread count must be at least 1")]
    ZeroThreads,
    #[error("could not start a pool of {threads} inference threads")]
    ThreadPool {
        threads: usize,
        #[source]
        source: rayon::ThreadPoolBuildError,
    },
    #[error("the model is not an ONNX protobuf")]
    Decode(#[source] prost::DecodeError),
    #[error("tract cannot read the ONNX graph")]
    Parse(#[source] anyhow::Error),
    #[error("tract cannot type or optimize the model for these tensor specs")]
    Optimize(#[source] anyhow::Error),
    #[error("tract panicked while {stage}: {message}")]
    Panicked {
        stage: &'static str,
        message: String,
    },
    #[error("the specs list {kind} {name:?} twice")]
    DuplicateSpec { kind: TensorKind, name: String },
    #[error("the specs list {kind} {name:?}, which the model does not have")]
    UnknownSpec { kind: TensorKind, name: String },
    #[error("the model has {kind} {name:?}, which the specs do not list")]
    UnspecifiedTensor { kind: TensorKind, name: String },
    #[error("the spec of {kind} {name:?} disagrees with the model: {reason}")]
    SpecMismatch {
        kind: TensorKind,
        name: String,
        reason: String,
    },
    #[error("cannot describe {kind} {name:?} of the model: {reason}")]
    Undescribable {
        kind: TensorKind,
        name: String,
        reason: String,
    },
    #[error("the request has input {name:?}, which the model does not take")]
    UnknownInput { name: String },
    #[error("the request has input {name:?} twice")]
    DuplicateInput { name: String },
    #[error("the request lacks input {name:?}")]
    MissingInput { name: String },
    #[error("input {name:?} is {}, the model takes {}", got.as_str(), expected.as_str())]
    WrongDType {
        name: String,
        expected: DType,
        got: DType,
    },
    #[error("input {name:?} has {got} axes, the model takes {expected}")]
    WrongRank {
        name: String,
        expected: usize,
        got: usize,
    },
    #[error("input {name:?} has size {got} on axis {axis}, the model takes {expected}")]
    WrongDim {
        name: String,
        axis: usize,
        expected: u64,
        got: u64,
    },
    #[error("input {name:?} has an empty batch axis {axis}")]
    EmptyBatch { name: String, axis: usize },
    #[error("input {name:?} has batch size {got} on axis {axis}, other inputs have {expected}")]
    BatchMismatch {
        name: String,
        axis: usize,
        expected: u64,
        got: u64,
    },
    #[error("the request has a batch of {got}; this model answers a batch of 1 only: {reason}")]
    BatchOfOneOnly { got: u64, reason: String },
    #[error("input {name:?} is malformed: {reason}")]
    BadData { name: String, reason: String },
    #[error("the model failed on this request")]
    Run(#[source] anyhow::Error),
    #[error("output {name:?} came back as {got}, the spec says {}", expected.as_str())]
    OutputDType {
        name: String,
        expected: DType,
        got: String,
    },
}

/// Whether an error is about a model input or output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TensorKind {
    Input,
    Output,
}

impl fmt::Display for TensorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TensorKind::Input => "input",
            TensorKind::Output => "output",
        })
    }
}

/// An optimized, runnable tract plan and the specs it was loaded with.
///
/// `run` takes `&self` and builds fresh state per call, so one `LoadedModel` serves concurrent
/// requests.
pub struct LoadedModel {
    /// The model's one optimised plan, with every batch axis fixed at 1.
    plan: std::sync::Arc<TypedSimplePlan>,
    batching: Batching,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    /// For each model input, in the model's order, the index of its spec in `inputs`.
    input_spec_of: Vec<usize>,
    /// For each model output, in the model's order, the index of its spec in `outputs`.
    output_spec_of: Vec<usize>,
    threads: usize,
}

/// How a model with a batch axis runs a batch of more than one.
///
/// A model is planned once: a second optimised plan holds a second packed copy of the weights
/// (+18 MiB on MobileNetV2) and doubles the load time. tract's kernels are much faster on concrete
/// shapes than on a symbolic batch (a symbolic plan takes 4.9x the batch-1 plan's time on
/// MobileNetV2 and 1.36x on the Silero sequence export, even at batch 1), so the plan is for
/// batch 1 and the rows of a larger batch run through it one after the other, which also beats
/// the symbolic plan at batch 4 on the CNNs (see `docs/BENCHMARKS.md`, "One plan per model").
/// Rows are independent by the meaning of a batch axis; a validation case with a batch of more
/// than one runs through this same path, so the publish gate checks what the device runs.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Batching {
    /// No input has a batch axis: every request has the plan's one shape.
    None,
    /// The plan is for batch 1. For each input spec, its batch axis (`None`: the input has none
    /// and goes whole to every row); for each output spec, its batch axis, along which the rows'
    /// outputs are stacked.
    Rows {
        input_axes: Vec<Option<usize>>,
        output_axes: Vec<usize>,
    },
    /// An input has several batch axes, or an output has none (an LSTM's state, a reduction
    /// over the batch), so the rows' outputs cannot be put back together: the model answers a
    /// batch of 1, and a larger batch is refused with this reason.
    OneRow { reason: String },
}

/// How one input reaches each row of a batch run through the batch-1 plan.
enum RowInput {
    /// No batch axis: the same converted value for every row.
    Whole(TValue),
    /// Cut along its batch axis, one row at a time.
    Sliced { axis: usize },
}

impl Batching {
    fn of(inputs: &[TensorSpec], outputs: &[TensorSpec]) -> Batching {
        let batch_axes = |spec: &TensorSpec| -> Vec<usize> {
            spec.shape
                .iter()
                .enumerate()
                .filter_map(|(axis, dim)| (*dim == Dim::Batch).then_some(axis))
                .collect()
        };
        let input_axes: Vec<Vec<usize>> = inputs.iter().map(batch_axes).collect();
        let output_axes: Vec<Vec<usize>> = outputs.iter().map(batch_axes).collect();
        // Without a batch axis on an input no request has a batch, whatever the outputs say.
        if input_axes.iter().all(Vec::is_empty) {
            return Batching::None;
        }
        let one = |axes: &Vec<usize>| match axes.as_slice() {
            [axis] => Some(*axis),
            _ => None,
        };
        if let Some(spec) = inputs
            .iter()
            .zip(&input_axes)
            .find(|(_, axes)| axes.len() > 1)
        {
            return Batching::OneRow {
                reason: format!("input {:?} has more than one batch axis", spec.0.name),
            };
        }
        if let Some(spec) = outputs
            .iter()
            .zip(&output_axes)
            .find(|(_, axes)| axes.len() != 1)
        {
            return Batching::OneRow {
                reason: format!(
                    "output {:?} does not have exactly one batch axis to put rows together on",
                    spec.0.name
                ),
            };
        }
        Batching::Rows {
            input_axes: input_axes.iter().map(one).collect(),
            output_axes: output_axes.iter().filter_map(one).collect(),
        }
    }

    /// The size the plan fixes every batch axis at; `None` when no input has one.
    fn planned_batch(&self) -> Option<i64> {
        match self {
            Batching::None => None,
            Batching::Rows { .. } | Batching::OneRow { .. } => Some(1),
        }
    }
}

impl fmt::Debug for LoadedModel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LoadedModel")
            .field("inputs", &self.inputs)
            .field("outputs", &self.outputs)
            .field("threads", &self.threads)
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// Loads ONNX bytes with input shapes fixed from the manifest specs, optimizes the graph and
    /// builds a runnable plan.
    ///
    /// [`Dim::Fixed`] axes become concrete sizes; every [`Dim::Batch`] axis becomes the one
    /// symbolic size `N`, chosen per request. The specs must name every model input and output
    /// exactly once. `threads` above 1 gives the model its own pool for matrix products; 1 runs
    /// everything on the calling thread.
    pub fn load(
        onnx: &[u8],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        threads: usize,
    ) -> Result<LoadedModel, InferenceError> {
        let executor = executor(threads)?;
        let model = parse(onnx)?;
        let input_spec_of = match_specs(TensorKind::Input, &input_names(&model)?, inputs)?;
        let output_spec_of = match_specs(TensorKind::Output, &output_names(&model)?, outputs)?;
        let options = RunOptions {
            executor,
            ..RunOptions::default()
        };
        let batching = Batching::of(inputs, outputs);
        let plan = plan_for(
            model,
            inputs,
            outputs,
            &input_spec_of,
            &output_spec_of,
            batching.planned_batch(),
            &options,
        )?;
        Ok(LoadedModel {
            plan,
            batching,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            input_spec_of,
            output_spec_of,
            threads,
        })
    }

    /// Reads the model's own declarations of its inputs and outputs, for publishing a model
    /// without operator-given specs.
    ///
    /// Inputs come from the ONNX graph's declared types; a first axis that is symbolic, unknown or
    /// 0 is the batch axis. Outputs are what tract infers from those inputs. Any other axis that is
    /// not a fixed size cannot be written as a [`TensorSpec`] and is an error.
    pub fn describe(onnx: &[u8]) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), InferenceError> {
        let mut model = parse(onnx)?;
        let names = input_names(&model)?;
        let mut inputs = Vec::with_capacity(names.len());
        for (ix, name) in names.iter().enumerate() {
            let fact = model.input_fact(ix).map_err(InferenceError::Parse)?;
            inputs.push(describe_input(name, fact)?);
        }
        let output_names = output_names(&model)?;
        let typed = catch_panic("typing the model", || {
            let identity: Vec<usize> = (0..inputs.len()).collect();
            fix_input_facts(&mut model, &inputs, &identity, None)?;
            model.into_typed().map_err(InferenceError::Optimize)
        })?;
        let mut outputs = Vec::with_capacity(output_names.len());
        for (ix, name) in output_names.iter().enumerate() {
            let fact = typed.output_fact(ix).map_err(InferenceError::Optimize)?;
            let dtype =
                output_dtype_of(fact.datum_type).ok_or_else(|| InferenceError::Undescribable {
                    kind: TensorKind::Output,
                    name: name.clone(),
                    reason: format!("type {:?} is not supported", fact.datum_type),
                })?;
            let mut shape = Vec::with_capacity(fact.shape.rank());
            for (axis, dim) in fact.shape.iter().enumerate() {
                shape.push(match dim.to_i64() {
                    Ok(size) if size > 0 => Dim::Fixed(size as u64),
                    _ if axis == 0 => Dim::Batch,
                    _ => {
                        return Err(InferenceError::Undescribable {
                            kind: TensorKind::Output,
                            name: name.clone(),
                            reason: format!("axis {axis} has no fixed size ({dim})"),
                        })
                    }
                });
            }
            outputs.push(TensorSpec {
                name: name.clone(),
                dtype,
                shape,
            });
        }
        Ok((inputs, outputs))
    }

    /// Runs one request.
    ///
    /// Each input is checked against its spec (name, type, rank, fixed sizes, one batch size
    /// across inputs, data length) before tract runs. Outputs come back in spec order, named from
    /// the output specs.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        let mut by_spec: Vec<Option<&Tensor>> = vec![None; self.inputs.len()];
        let mut batch: Option<u64> = None;
        for tensor in inputs {
            let spec_ix = self
                .inputs
                .iter()
                .position(|spec| spec.name == tensor.name)
                .ok_or_else(|| InferenceError::UnknownInput {
                    name: tensor.name.clone(),
                })?;
            if by_spec[spec_ix].is_some() {
                return Err(InferenceError::DuplicateInput {
                    name: tensor.name.clone(),
                });
            }
            check_input(&self.inputs[spec_ix], tensor, &mut batch)?;
            by_spec[spec_ix] = Some(tensor);
        }
        let by_spec = by_spec
            .into_iter()
            .zip(&self.inputs)
            .map(|(tensor, spec)| {
                tensor.ok_or_else(|| InferenceError::MissingInput {
                    name: spec.name.clone(),
                })
            })
            .collect::<Result<Vec<&Tensor>, _>>()?;
        match (&self.batching, batch) {
            (
                Batching::Rows {
                    input_axes,
                    output_axes,
                },
                Some(rows),
            ) if rows > 1 => self.run_rows(&by_spec, input_axes, output_axes, rows),
            (Batching::OneRow { reason }, Some(rows)) if rows > 1 => {
                Err(InferenceError::BatchOfOneOnly {
                    got: rows,
                    reason: reason.clone(),
                })
            }
            _ => {
                let ordered = self
                    .input_spec_of
                    .iter()
                    .map(|&spec_ix| to_tract(by_spec[spec_ix]).map(TValue::from))
                    .collect::<Result<TVec<TValue>, _>>()?;
                self.run_plan(ordered)
            }
        }
    }

    /// Runs a batch of `rows` through the batch-1 plan one row at a time and stacks the rows'
    /// outputs along each output's batch axis (see [`Batching`]).
    fn run_rows(
        &self,
        by_spec: &[&Tensor],
        input_axes: &[Option<usize>],
        output_axes: &[usize],
        rows: u64,
    ) -> Result<Vec<Tensor>, InferenceError> {
        // Inputs without a batch axis are the same for every row: converted once.
        let per_input = by_spec
            .iter()
            .zip(input_axes)
            .map(|(tensor, axis)| match axis {
                Some(axis) => Ok(RowInput::Sliced { axis: *axis }),
                None => to_tract(tensor).map(|tensor| RowInput::Whole(TValue::from(tensor))),
            })
            .collect::<Result<Vec<RowInput>, _>>()?;
        let mut stacks: Vec<Vec<Tensor>> = vec![Vec::new(); self.outputs.len()];
        for row in 0..rows {
            let ordered = self
                .input_spec_of
                .iter()
                .map(|&spec_ix| match &per_input[spec_ix] {
                    RowInput::Whole(value) => Ok(value.clone()),
                    RowInput::Sliced { axis } => {
                        to_tract(&take_row(by_spec[spec_ix], *axis, row)).map(TValue::from)
                    }
                })
                .collect::<Result<TVec<TValue>, _>>()?;
            for (stack, output) in stacks.iter_mut().zip(self.run_plan(ordered)?) {
                stack.push(output);
            }
        }
        stacks
            .into_iter()
            .zip(output_axes)
            .map(|(stack, &axis)| stack_rows(stack, axis))
            .collect()
    }

    /// Runs the plan on inputs in the model's order; outputs in spec order.
    fn run_plan(&self, ordered: TVec<TValue>) -> Result<Vec<Tensor>, InferenceError> {
        let results = catch_panic("running the model", || {
            self.plan.run(ordered).map_err(InferenceError::Run)
        })?;
        let mut outputs: Vec<Option<Tensor>> = vec![None; self.outputs.len()];
        for (value, &spec_ix) in results.iter().zip(&self.output_spec_of) {
            let spec = &self.outputs[spec_ix];
            outputs[spec_ix] = Some(from_tract(spec, value)?);
        }
        outputs
            .into_iter()
            .zip(&self.outputs)
            .map(|(tensor, spec)| {
                tensor.ok_or_else(|| {
                    InferenceError::Run(anyhow::anyhow!("tract returned no {:?}", spec.name))
                })
            })
            .collect()
    }

    pub fn inputs(&self) -> &[TensorSpec] {
        &self.inputs
    }

    pub fn outputs(&self) -> &[TensorSpec] {
        &self.outputs
    }

    /// The thread count the model was loaded with.
    pub fn threads(&self) -> usize {
        self.threads
    }
}

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

fn check_deadline(
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

fn compare(
    case: usize,
    got: &Tensor,
    want: &Tensor,
    abs: f64,
    rel: f64,
    report: &mut ValidationReport,
) -> Result<(), ValidationError> {
    want.check()
        .map_err(|reason| ValidationError::BadExpected {
            case,
            output: want.name.clone(),
            reason,
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
fn unravel(mut flat: usize, shape: &[u64]) -> Vec<u64> {
    let mut index = vec![0; shape.len()];
    for (axis, &size) in shape.iter().enumerate().rev() {
        if size > 0 {
            index[axis] = flat as u64 % size;
            flat = (flat as u64 / size) as usize;
        }
    }
    index
}

/// Fixes the input facts (every batch axis to `batch`, or to the symbol `N`), optimizes and plans.
fn plan_for(
    mut model: InferenceModel,
    inputs: &[TensorSpec],
    outputs: &[TensorSpec],
    input_spec_of: &[usize],
    output_spec_of: &[usize],
    batch: Option<i64>,
    options: &RunOptions,
) -> Result<std::sync::Arc<TypedSimplePlan>, InferenceError> {
    let typed = catch_panic("optimizing the model", || {
        fix_input_facts(&mut model, inputs, input_spec_of, batch)?;
        let optimized = model.into_optimized().map_err(InferenceError::Optimize)?;
        check_output_facts(&optimized, outputs, output_spec_of, batch)?;
        Ok(optimized)
    })?;
    catch_panic("planning the model", || {
        typed
            .into_runnable_with_options(options)
            .map_err(InferenceError::Optimize)
    })
}

fn executor(threads: usize) -> Result<Option<Executor>, InferenceError> {
    match threads {
        0 => Err(InferenceError::ZeroThreads),
        1 => Ok(None),
        _ => {
            // Built here rather than with `Executor::multithread`, which panics when the pool
            // cannot start.
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .thread_name(|ix| format!("outpost-infer-{ix}"))
                .build()
                .map_err(|source| InferenceError::ThreadPool { threads, source })?;
            Ok(Some(Executor::MultiThread(std::sync::Arc::new(pool))))
        }
    }
}

fn parse(onnx: &[u8]) -> Result<InferenceModel, InferenceError> {
    // Parsing from bytes gives tract no model directory, so it refuses tensors stored as
    // "external data" instead of reading files named by the model.
    let proto = ModelProto::decode(onnx).map_err(InferenceError::Decode)?;
    catch_panic("parsing the model", || {
        tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(InferenceError::Parse)
    })
}

fn input_names(model: &InferenceModel) -> Result<Vec<String>, InferenceError> {
    let outlets = model.input_outlets().map_err(InferenceError::Parse)?;
    outlets
        .iter()
        .map(|outlet| {
            model
                .nodes()
                .get(outlet.node)
                .map(|node| node.name.clone())
                .ok_or_else(|| InferenceError::Parse(anyhow::anyhow!("dangling input {outlet:?}")))
        })
        .collect()
}

fn output_names(model: &InferenceModel) -> Result<Vec<String>, InferenceError> {
    let outlets = model.output_outlets().map_err(InferenceError::Parse)?;
    outlets
        .iter()
        .map(|&outlet| outlet_name(model, outlet))
        .collect()
}

fn outlet_name(model: &InferenceModel, outlet: OutletId) -> Result<String, InferenceError> {
    if let Some(label) = model.outlet_label(outlet) {
        return Ok(label.to_owned());
    }
    model
        .nodes()
        .get(outlet.node)
        .map(|node| node.name.clone())
        .ok_or_else(|| InferenceError::Parse(anyhow::anyhow!("dangling output {outlet:?}")))
}

/// Pairs the model's tensors with the specs by name: for each model tensor, its spec's index.
fn match_specs(
    kind: TensorKind,
    model_names: &[String],
    specs: &[TensorSpec],
) -> Result<Vec<usize>, InferenceError> {
    let mut spec_ix_by_name: HashMap<&str, usize> = HashMap::with_capacity(specs.len());
    for (ix, spec) in specs.iter().enumerate() {
        if spec_ix_by_name.insert(&spec.name, ix).is_some() {
            return Err(InferenceError::DuplicateSpec {
                kind,
                name: spec.name.clone(),
            });
        }
        if !model_names.contains(&spec.name) {
            return Err(InferenceError::UnknownSpec {
                kind,
                name: spec.name.clone(),
            });
        }
    }
    model_names
        .iter()
        .map(|name| {
            spec_ix_by_name.get(name.as_str()).copied().ok_or_else(|| {
                InferenceError::UnspecifiedTensor {
                    kind,
                    name: name.clone(),
                }
            })
        })
        .collect()
}

/// Checks each spec against what the ONNX graph declares for that input, then replaces the
/// declaration with the spec.
fn fix_input_facts(
    model: &mut InferenceModel,
    specs: &[TensorSpec],
    spec_of: &[usize],
    batch: Option<i64>,
) -> Result<(), InferenceError> {
    let batch = match batch {
        Some(size) => TDim::Val(size),
        None => TDim::from(model.symbols.sym(BATCH_SYMBOL)),
    };
    for (ix, &spec_ix) in spec_of.iter().enumerate() {
        let spec = &specs[spec_ix];
        let declared = model.input_fact(ix).map_err(InferenceError::Parse)?;
        check_declared_input(spec, declared)?;
        let dims: Vec<TDim> = spec
            .shape
            .iter()
            .map(|dim| match dim {
                Dim::Fixed(size) => TDim::Val(*size as i64),
                Dim::Batch => batch.clone(),
            })
            .collect();
        model
            .set_input_fact(ix, InferenceFact::dt_shape(datum_type(spec.dtype), dims))
            .map_err(InferenceError::Optimize)?;
    }
    Ok(())
}

fn check_declared_input(spec: &TensorSpec, declared: &InferenceFact) -> Result<(), InferenceError> {
    let mismatch = |reason: String| InferenceError::SpecMismatch {
        kind: TensorKind::Input,
        name: spec.name.clone(),
        reason,
    };
    if spec
        .shape
        .iter()
        .any(|dim| matches!(dim, Dim::Fixed(size) if *size > i64::MAX as u64))
    {
        return Err(mismatch("an axis is too large".to_owned()));
    }
    if let Some(declared_type) = declared.datum_type.concretize() {
        if declared_type != datum_type(spec.dtype) {
            return Err(mismatch(format!(
                "the model declares type {declared_type:?}, the spec says {}",
                spec.dtype.as_str()
            )));
        }
    }
    if declared.shape.is_open() {
        return Ok(());
    }
    let declared_dims: Vec<_> = declared.shape.dims().collect();
    if declared_dims.len() != spec.shape.len() {
        return Err(mismatch(format!(
            "the model declares {} axes, the spec has {}",
            declared_dims.len(),
            spec.shape.len()
        )));
    }
    for (axis, (declared_dim, spec_dim)) in declared_dims.iter().zip(&spec.shape).enumerate() {
        // ONNX exporters write 0 or -1 (read by tract as unknown) for a dynamic axis.
        let Some(size) = declared_dim
            .concretize()
            .and_then(|dim| dim.to_i64().ok())
            .filter(|size| *size > 0)
        else {
            continue;
        };
        match spec_dim {
            Dim::Fixed(spec_size) if *spec_size == size as u64 => {}
            Dim::Fixed(spec_size) => {
                return Err(mismatch(format!(
                    "the model fixes axis {axis} at {size}, the spec says {spec_size}"
                )))
            }
            Dim::Batch => {
                return Err(mismatch(format!(
                    "the model fixes axis {axis} at {size}, the spec says batch"
                )))
            }
        }
    }
    Ok(())
}

/// Checks the planned outputs against their specs. With the batch fixed at `batch`, a batch axis
/// must come out at that size too, or the rows of a larger batch could not be stacked along it.
fn check_output_facts(
    model: &TypedModel,
    specs: &[TensorSpec],
    spec_of: &[usize],
    batch: Option<i64>,
) -> Result<(), InferenceError> {
    for (ix, &spec_ix) in spec_of.iter().enumerate() {
        let spec = &specs[spec_ix];
        let mismatch = |reason: String| InferenceError::SpecMismatch {
            kind: TensorKind::Output,
            name: spec.name.clone(),
            reason,
        };
        let fact = model.output_fact(ix).map_err(InferenceError::Optimize)?;
        if output_dtype_of(fact.datum_type) != Some(spec.dtype) {
            return Err(mismatch(format!(
                "the model produces type {:?}, the spec says {}",
                fact.datum_type,
                spec.dtype.as_str()
            )));
        }
        if fact.shape.rank() != spec.shape.len() {
            return Err(mismatch(format!(
                "the model produces {} axes, the spec has {}",
                fact.shape.rank(),
                spec.shape.len()
            )));
        }
        for (axis, (dim, spec_dim)) in fact.shape.iter().zip(&spec.shape).enumerate() {
            match (spec_dim, batch) {
                (Dim::Fixed(size), _) if dim.to_i64().ok() != Some(*size as i64) => {
                    return Err(mismatch(format!(
                        "the model produces size {dim} on axis {axis}, the spec says {size}"
                    )));
                }
                (Dim::Batch, Some(batch)) if dim.to_i64().ok() != Some(batch) => {
                    return Err(mismatch(format!(
                        "the model produces size {dim} on batch axis {axis} for a batch of \
                         {batch}"
                    )));
                }
                _ => {}
            }
        }
    }
    Ok(())
}

fn describe_input(name: &str, fact: &InferenceFact) -> Result<TensorSpec, InferenceError> {
    let undescribable = |reason: String| InferenceError::Undescribable {
        kind: TensorKind::Input,
        name: name.to_owned(),
        reason,
    };
    let datum = fact
        .datum_type
        .concretize()
        .ok_or_else(|| undescribable("the model does not declare its type".to_owned()))?;
    let dtype =
        dtype_of(datum).ok_or_else(|| undescribable(format!("type {datum:?} is not supported")))?;
    if fact.shape.is_open() {
        return Err(undescribable(
            "the model does not declare its rank".to_owned(),
        ));
    }
    let mut shape = Vec::new();
    for (axis, dim) in fact.shape.dims().enumerate() {
        let size = dim.concretize().and_then(|dim| dim.to_i64().ok());
        shape.push(match size {
            Some(size) if size > 0 => Dim::Fixed(size as u64),
            _ if axis == 0 => Dim::Batch,
            _ => return Err(undescribable(format!("axis {axis} has no fixed size"))),
        });
    }
    Ok(TensorSpec {
        name: name.to_owned(),
        dtype,
        shape,
    })
}

/// Checks a request tensor against its spec; `batch` carries the batch size across inputs.
fn check_input(
    spec: &TensorSpec,
    tensor: &Tensor,
    batch: &mut Option<u64>,
) -> Result<(), InferenceError> {
    let name = || tensor.name.clone();
    if tensor.dtype != spec.dtype {
        return Err(InferenceError::WrongDType {
            name: name(),
            expected: spec.dtype,
            got: tensor.dtype,
        });
    }
    if tensor.shape.len() != spec.shape.len() {
        return Err(InferenceError::WrongRank {
            name: name(),
            expected: spec.shape.len(),
            got: tensor.shape.len(),
        });
    }
    for (axis, (&got, spec_dim)) in tensor.shape.iter().zip(&spec.shape).enumerate() {
        match spec_dim {
            Dim::Fixed(expected) if got != *expected => {
                return Err(InferenceError::WrongDim {
                    name: name(),
                    axis,
                    expected: *expected,
                    got,
                })
            }
            Dim::Fixed(_) => {}
            Dim::Batch if got == 0 => {
                return Err(InferenceError::EmptyBatch { name: name(), axis })
            }
            Dim::Batch => match *batch {
                Some(expected) if expected != got => {
                    return Err(InferenceError::BatchMismatch {
                        name: name(),
                        axis,
                        expected,
                        got,
                    })
                }
                Some(_) => {}
                None => *batch = Some(got),
            },
        }
    }
    tensor.check().map_err(|reason| InferenceError::BadData {
        name: name(),
        reason,
    })
}

/// The element types Outpost moves between protocol tensors and tract tensors.
trait Element: tract_onnx::prelude::Datum + Copy {
    const SIZE: usize;
    fn from_le(bytes: &[u8]) -> Self;
    fn to_f64(self) -> f64;
}

macro_rules! element {
    ($t:ty, $to_f64:expr) => {
        impl Element for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn from_le(bytes: &[u8]) -> Self {
                let mut array = [0u8; std::mem::size_of::<$t>()];
                array.copy_from_slice(bytes);
                <$t>::from_le_bytes(array)
            }
            fn to_f64(self) -> f64 {
                $to_f64(self)
            }
        }
    };
}

element!(f32, f64::from);
element!(f64, std::convert::identity);
element!(i32, f64::from);
// Exact up to 2^53, which is as close as a tolerance in f64 can compare anyway.
element!(i64, |value: i64| value as f64);
element!(u8, f64::from);

fn datum_type(dtype: DType) -> DatumType {
    match dtype {
        DType::F32 => DatumType::F32,
        DType::F64 => DatumType::F64,
        DType::I32 => DatumType::I32,
        DType::I64 => DatumType::I64,
        DType::U8 => DatumType::U8,
    }
}

fn dtype_of(datum: DatumType) -> Option<DType> {
    match datum {
        DatumType::F32 => Some(DType::F32),
        DatumType::F64 => Some(DType::F64),
        DatumType::I32 => Some(DType::I32),
        DatumType::I64 => Some(DType::I64),
        DatumType::U8 => Some(DType::U8),
        _ => None,
    }
}

/// As [`dtype_of`], for a model output. tract-onnx turns ONNX int64 arithmetic (a `Cast` to int64,
/// for one) into its symbolic-integer type `TDim`; its values are plain integers by the time they
/// are outputs and convert to i64.
fn output_dtype_of(datum: DatumType) -> Option<DType> {
    if datum == DatumType::TDim {
        Some(DType::I64)
    } else {
        dtype_of(datum)
    }
}

/// For a tensor and one of its axes: the product of the sizes before the axis, the axis's size,
/// and the bytes of one step along the axis. The tensor has passed [`Tensor::check`], so its sizes
/// multiply to its data length and fit in memory.
fn around_axis(tensor: &Tensor, axis: usize) -> (usize, usize, usize) {
    let product = |dims: &[u64]| dims.iter().product::<u64>() as usize;
    (
        product(&tensor.shape[..axis]),
        tensor.shape[axis] as usize,
        product(&tensor.shape[axis + 1..]) * tensor.dtype.size(),
    )
}

/// Row `row` of a checked input along its batch axis, as a tensor with a batch of 1.
fn take_row(tensor: &Tensor, axis: usize, row: u64) -> Tensor {
    let (outer, rows, step) = around_axis(tensor, axis);
    let mut data = Vec::with_capacity(outer * step);
    if step > 0 {
        for block in tensor.data.chunks_exact(rows * step) {
            let start = row as usize * step;
            data.extend_from_slice(&block[start..start + step]);
        }
    }
    let mut shape = tensor.shape.clone();
    shape[axis] = 1;
    Tensor {
        name: tensor.name.clone(),
        dtype: tensor.dtype,
        shape,
        data,
    }
}

/// Stacks the batch-1 outputs of each row along `axis` into one output.
fn stack_rows(rows: Vec<Tensor>, axis: usize) -> Result<Tensor, InferenceError> {
    let Some(first) = rows.first() else {
        return Err(InferenceError::Run(anyhow::anyhow!("a batch with no rows")));
    };
    if first.shape.get(axis) != Some(&1) || rows.iter().any(|row| row.shape != first.shape) {
        return Err(InferenceError::Run(anyhow::anyhow!(
            "output {:?} came back with shapes that do not stack along batch axis {axis}",
            first.name
        )));
    }
    let (outer, _, step) = around_axis(first, axis);
    let mut data = Vec::with_capacity(outer * step * rows.len());
    for block in 0..outer {
        for row in &rows {
            data.extend_from_slice(&row.data[block * step..(block + 1) * step]);
        }
    }
    let mut shape = first.shape.clone();
    shape[axis] = rows.len() as u64;
    Ok(Tensor {
        name: first.name.clone(),
        dtype: first.dtype,
        shape,
        data,
    })
}

/// Copies a checked protocol tensor into a tract tensor: one copy of the little-endian bytes
/// straight into the tensor's buffer, with no intermediate vector (every request pays this).
fn to_tract(tensor: &Tensor) -> Result<tract_onnx::prelude::Tensor, InferenceError> {
    let bad = |reason: String| InferenceError::BadData {
        name: tensor.name.clone(),
        reason,
    };
    let shape = tensor
        .shape
        .iter()
        .map(|&dim| usize::try_from(dim))
        .collect::<Result<Vec<usize>, _>>()
        .map_err(|_| bad("an axis does not fit this machine's address space".to_owned()))?;
    let dtype = datum_type(tensor.dtype);
    let mut out = tract_onnx::prelude::Tensor::zero_dt(dtype, &shape)
        .map_err(|error| bad(format!("{error:#}")))?;
    let mut view = out
        .try_as_plain_ram_mut()
        .map_err(|error| bad(format!("{error:#}")))?;
    let bytes = view.as_bytes_mut();
    if bytes.len() != tensor.data.len() {
        return Err(bad(format!(
            "{} bytes of data for {} bytes of tensor",
            tensor.data.len(),
            bytes.len()
        )));
    }
    bytes.copy_from_slice(&tensor.data);
    to_native_order(bytes, dtype.size_of());
    Ok(out)
}

/// Turns little-endian elements of `size` bytes into this machine's order, and back (the same
/// swap both ways): nothing to do on little-endian machines.
fn to_native_order(bytes: &mut [u8], size: usize) {
    if cfg!(target_endian = "big") {
        for element in bytes.chunks_exact_mut(size) {
            element.reverse();
        }
    }
}

/// Copies a tract output into a protocol tensor named and typed by its spec.
fn from_tract(spec: &TensorSpec, value: &TValue) -> Result<Tensor, InferenceError> {
    if output_dtype_of(value.datum_type()) != Some(spec.dtype) {
        return Err(InferenceError::OutputDType {
            name: spec.name.clone(),
            expected: spec.dtype,
            got: format!("{:?}", value.datum_type()),
        });
    }
    let tensor: &tract_onnx::prelude::Tensor = value;
    let tensor = if tensor.datum_type() == DatumType::TDim {
        tensor.cast_to::<i64>().map_err(InferenceError::Run)?
    } else {
        std::borrow::Cow::Borrowed(tensor)
    };
    // A tract tensor is dense and row-major, so its bytes are the elements in logical order.
    let size = tensor.datum_type().size_of();
    let mut data = tensor
        .try_as_plain_ram()
        .map_err(InferenceError::Run)?
        .as_bytes()
        .to_vec();
    if data.len() != tensor.len() * size {
        return Err(InferenceError::Run(anyhow::anyhow!(
            "output {:?} has {} bytes for {} elements",
            spec.name,
            data.len(),
            tensor.len()
        )));
    }
    to_native_order(&mut data, size);
    Ok(Tensor {
        name: spec.name.clone(),
        dtype: spec.dtype,
        shape: tensor.shape().iter().map(|&dim| dim as u64).collect(),
        data,
    })
}

/// A protocol tensor's elements as `f64`, for comparison. The caller has checked the tensor.
fn to_f64s(tensor: &Tensor) -> Vec<f64> {
    fn widen<T: Element>(data: &[u8]) -> Vec<f64> {
        data.chunks_exact(T::SIZE)
            .map(|bytes| T::from_le(bytes).to_f64())
            .collect()
    }
    match tensor.dtype {
        DType::F32 => widen::<f32>(&tensor.data),
        DType::F64 => widen::<f64>(&tensor.data),
        DType::I32 => widen::<i32>(&tensor.data),
        DType::I64 => widen::<i64>(&tensor.data),
        DType::U8 => widen::<u8>(&tensor.data),
    }
}

/// Runs `f`, turning a panic inside tract into [`InferenceError::Panicked`].
fn catch_panic<T>(
    stage: &'static str,
    f: impl FnOnce() -> Result<T, InferenceError>,
) -> Result<T, InferenceError> {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        Err(InferenceError::Panicked {
            stage,
            message: panic_message(payload.as_ref()),
        })
    })
}

fn panic_message(payload: &(dyn Any + Send)) -> String {
    if let Some(message) = payload.downcast_ref::<&str>() {
        (*message).to_owned()
    } else if let Some(message) = payload.downcast_ref::<String>() {
        message.clone()
    } else {
        "no message".to_owned()
    }
}
