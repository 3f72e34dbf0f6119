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
    /// Runs any batch size: every batch axis is the symbol `N`.
    plan: std::sync::Arc<TypedSimplePlan>,
    /// The same model planned for a batch of exactly 1, the common case on a device: tract picks
    /// faster kernels for concrete shapes (about 20% on a matrix-vector model). `None` when the
    /// model has no batch axis, so `plan` is already concrete.
    single: Option<std::sync::Arc<TypedSimplePlan>>,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    /// For each model input, in the model's order, the index of its spec in `inputs`.
    input_spec_of: Vec<usize>,
    /// For each model output, in the model's order, the index of its spec in `outputs`.
    output_spec_of: Vec<usize>,
    threads: usize,
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
        let has_batch = inputs
            .iter()
            .chain(outputs)
            .any(|spec| spec.shape.contains(&Dim::Batch));
        let single = if has_batch {
            Some(plan_for(
                model.clone(),
                inputs,
                outputs,
                &input_spec_of,
                &output_spec_of,
                Some(1),
                &options,
            )?)
        } else {
            None
        };
        let plan = plan_for(
            model,
            inputs,
            outputs,
            &input_spec_of,
            &output_spec_of,
            None,
            &options,
        )?;
        Ok(LoadedModel {
            plan,
            single,
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
        let mut by_spec: Vec<Option<tract_onnx::prelude::Tensor>> = vec![None; self.inputs.len()];
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
            by_spec[spec_ix] = Some(to_tract(tensor)?);
        }
        if let Some(spec) = by_spec
            .iter()
            .zip(&self.inputs)
            .find_map(|(tensor, spec)| tensor.is_none().then_some(spec))
        {
            return Err(InferenceError::MissingInput {
                name: spec.name.clone(),
            });
        }
        // `input_spec_of` is a permutation, so each tensor moves into its slot exactly once.
        let ordered: TVec<TValue> = self
            .input_spec_of
            .iter()
            .filter_map(|&spec_ix| by_spec.get_mut(spec_ix).and_then(Option::take))
            .map(TValue::from)
            .collect();
        let plan = match (&self.single, batch) {
            (Some(single), Some(1)) => single,
            _ => &self.plan,
        };
        let results = catch_panic("running the model", || {
            plan.run(ordered).map_err(InferenceError::Run)
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
        check_output_facts(&optimized, outputs, output_spec_of)?;
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

fn check_output_facts(
    model: &TypedModel,
    specs: &[TensorSpec],
    spec_of: &[usize],
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
            if let Dim::Fixed(size) = spec_dim {
                if dim.to_i64().ok() != Some(*size as i64) {
                    return Err(mismatch(format!(
                        "the model produces size {dim} on axis {axis}, the spec says {size}"
                    )));
                }
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
    fn put_le(self, out: &mut Vec<u8>);
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
            fn put_le(self, out: &mut Vec<u8>) {
                out.extend_from_slice(&self.to_le_bytes());
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

fn decode<T: Element>(data: &[u8]) -> Vec<T> {
    data.chunks_exact(T::SIZE).map(T::from_le).collect()
}

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

/// Copies a checked protocol tensor into a tract tensor.
fn to_tract(tensor: &Tensor) -> Result<tract_onnx::prelude::Tensor, InferenceError> {
    fn build<T: Element>(
        shape: &[usize],
        data: &[u8],
    ) -> anyhow::Result<tract_onnx::prelude::Tensor> {
        tract_onnx::prelude::Tensor::from_shape(shape, &decode::<T>(data))
    }
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
    let data = &tensor.data;
    match tensor.dtype {
        DType::F32 => build::<f32>(&shape, data),
        DType::F64 => build::<f64>(&shape, data),
        DType::I32 => build::<i32>(&shape, data),
        DType::I64 => build::<i64>(&shape, data),
        DType::U8 => build::<u8>(&shape, data),
    }
    .map_err(|error| bad(format!("{error:#}")))
}

/// Copies a tract output into a protocol tensor named and typed by its spec.
fn from_tract(spec: &TensorSpec, value: &TValue) -> Result<Tensor, InferenceError> {
    fn encode<T: Element>(tensor: &tract_onnx::prelude::Tensor) -> anyhow::Result<Vec<u8>> {
        let view = tensor.to_plain_array_view::<T>()?;
        let mut out = Vec::with_capacity(view.len() * T::SIZE);
        // The view iterates in logical row-major order whatever the tensor's strides.
        for element in view.iter() {
            element.put_le(&mut out);
        }
        Ok(out)
    }
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
    let data = match spec.dtype {
        DType::F32 => encode::<f32>(&tensor),
        DType::F64 => encode::<f64>(&tensor),
        DType::I32 => encode::<i32>(&tensor),
        DType::I64 => encode::<i64>(&tensor),
        DType::U8 => encode::<u8>(&tensor),
    }
    .map_err(InferenceError::Run)?;
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
