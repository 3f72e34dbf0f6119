//! Loading and describing a model: ONNX bytes parsed, checked against the manifest's specs,
//! fixed at batch 1 and planned once.

use std::collections::HashMap;

use outpost_protocol::trust::{Dim, TensorSpec};
use prost::Message as _;
use tract_onnx::pb::ModelProto;
use tract_onnx::prelude::multithread::Executor;
use tract_onnx::prelude::{
    DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, OutletId, RunOptions,
    TDim, TypedFact, TypedModel, TypedSimplePlan,
};
use tract_onnx::tract_hir::infer::Factoid;

use super::error::{InferenceError, TensorKind};
use super::tensor::*;
use super::{catch_panic, Batching, Engine, LoadedModel, BATCH_SYMBOL};

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
        Ok(LoadedModel::assemble(
            Engine::Tract(plan),
            batching,
            (inputs, outputs),
            (input_spec_of, output_spec_of),
            threads,
        ))
    }

    /// Reads the model's own declarations of its inputs and outputs, for publishing a model
    /// without operator-given specs.
    ///
    /// Inputs come from the ONNX graph's declared types; a first axis that is symbolic, unknown or
    /// 0 is the batch axis. Outputs are what tract infers from those inputs: with the batch as a
    /// symbol, or, where tract cannot carry the symbol through the graph, typed at batch sizes 1
    /// and 2, an axis that follows them being the batch axis. Any other axis that is not a fixed
    /// size cannot be written as a [`TensorSpec`] and is an error.
    ///
    /// When that fails, the error names the flags to give instead ([`InferenceError::NeedsSpecs`]),
    /// written from what the file declares, with `?` where it declares nothing usable.
    pub fn describe(onnx: &[u8]) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), InferenceError> {
        let model = parse(onnx)?;
        let flags = declared_flags(onnx, &model);
        describe_parsed(model).map_err(|error| match flags {
            Some(flags) => InferenceError::NeedsSpecs {
                flags,
                source: Box::new(error),
            },
            None => error,
        })
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

/// Fixes the input facts (every batch axis to `batch`, or to the symbol `N`), optimizes and plans.
pub(super) fn plan_for(
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

pub(super) fn executor(threads: usize) -> Result<Option<Executor>, InferenceError> {
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

pub(super) fn parse(onnx: &[u8]) -> Result<InferenceModel, InferenceError> {
    // Parsing from bytes gives tract no model directory, so it refuses tensors stored as
    // "external data" instead of reading files named by the model.
    let proto = ModelProto::decode(onnx).map_err(InferenceError::Decode)?;
    catch_panic("parsing the model", || {
        tract_onnx::onnx()
            .model_for_proto_model(&proto)
            .map_err(InferenceError::Parse)
    })
}

pub(super) fn input_names(model: &InferenceModel) -> Result<Vec<String>, InferenceError> {
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

pub(super) fn output_names(model: &InferenceModel) -> Result<Vec<String>, InferenceError> {
    let outlets = model.output_outlets().map_err(InferenceError::Parse)?;
    outlets
        .iter()
        .map(|&outlet| outlet_name(model, outlet))
        .collect()
}

pub(super) fn outlet_name(
    model: &InferenceModel,
    outlet: OutletId,
) -> Result<String, InferenceError> {
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
pub(super) fn match_specs(
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
pub(super) fn fix_input_facts(
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

pub(super) fn check_declared_input(
    spec: &TensorSpec,
    declared: &InferenceFact,
) -> Result<(), InferenceError> {
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
pub(super) fn check_output_facts(
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

pub(super) fn describe_input(
    name: &str,
    fact: &InferenceFact,
) -> Result<TensorSpec, InferenceError> {
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

/// [`LoadedModel::describe`] of a parsed model, before the error names any flags.
fn describe_parsed(
    model: InferenceModel,
) -> Result<(Vec<TensorSpec>, Vec<TensorSpec>), InferenceError> {
    let names = input_names(&model)?;
    let mut inputs = Vec::with_capacity(names.len());
    for (ix, name) in names.iter().enumerate() {
        let fact = model.input_fact(ix).map_err(InferenceError::Parse)?;
        inputs.push(describe_input(name, fact)?);
    }
    let output_names = output_names(&model)?;
    let identity: Vec<usize> = (0..inputs.len()).collect();
    let typed_at = |batch: Option<i64>| {
        let mut model = model.clone();
        catch_panic("typing the model", || {
            fix_input_facts(&mut model, &inputs, &identity, batch)?;
            model.into_typed().map_err(InferenceError::Optimize)
        })
    };
    let undescribable = |name: &str, reason: String| InferenceError::Undescribable {
        kind: TensorKind::Output,
        name: name.to_owned(),
        reason,
    };
    let dtype = |name: &str, datum: DatumType| {
        output_dtype_of(datum)
            .ok_or_else(|| undescribable(name, format!("type {datum:?} is not supported")))
    };
    let mut outputs = Vec::with_capacity(output_names.len());
    match typed_at(None) {
        Ok(typed) => {
            for (ix, name) in output_names.iter().enumerate() {
                let fact = typed.output_fact(ix).map_err(InferenceError::Optimize)?;
                let mut shape = Vec::with_capacity(fact.shape.rank());
                for (axis, dim) in fact.shape.iter().enumerate() {
                    shape.push(match dim.to_i64() {
                        Ok(size) if size > 0 => Dim::Fixed(size as u64),
                        _ if axis == 0 => Dim::Batch,
                        _ => {
                            return Err(undescribable(
                                name,
                                format!("axis {axis} has no fixed size ({dim})"),
                            ))
                        }
                    });
                }
                outputs.push(TensorSpec {
                    name: name.clone(),
                    dtype: dtype(name, fact.datum_type)?,
                    shape,
                });
            }
        }
        // tract could not carry the batch symbol through the graph (a broadcast to a computed
        // shape, say), though it types the model at any one batch size, as it runs it. Typed at
        // batch sizes 1 and 2, an output axis that follows them is the batch axis.
        Err(symbolic) if inputs.iter().any(|spec| spec.shape.contains(&Dim::Batch)) => {
            let (Ok(one), Ok(two)) = (typed_at(Some(1)), typed_at(Some(2))) else {
                return Err(symbolic);
            };
            for (ix, name) in output_names.iter().enumerate() {
                let fact_one = one.output_fact(ix).map_err(InferenceError::Optimize)?;
                let fact_two = two.output_fact(ix).map_err(InferenceError::Optimize)?;
                let sizes = |fact: &TypedFact| -> Option<Vec<i64>> {
                    fact.shape.iter().map(|dim| dim.to_i64().ok()).collect()
                };
                let (Some(at_one), Some(at_two)) = (sizes(fact_one), sizes(fact_two)) else {
                    return Err(undescribable(
                        name,
                        "its shape depends on the inputs' values".into(),
                    ));
                };
                if at_one.len() != at_two.len() {
                    return Err(undescribable(
                        name,
                        "its rank depends on the batch size".into(),
                    ));
                }
                let mut shape = Vec::with_capacity(at_one.len());
                for (axis, (a, b)) in at_one.iter().zip(&at_two).enumerate() {
                    shape.push(match (*a, *b) {
                        (a, b) if a == b && a > 0 => Dim::Fixed(a as u64),
                        (1, 2) => Dim::Batch,
                        _ => {
                            return Err(undescribable(
                                name,
                                format!("axis {axis} is {a} at batch 1 and {b} at batch 2"),
                            ))
                        }
                    });
                }
                outputs.push(TensorSpec {
                    name: name.clone(),
                    dtype: dtype(name, fact_one.datum_type)?,
                    shape,
                });
            }
        }
        Err(error) => return Err(error),
    }
    Ok((inputs, outputs))
}

/// The `--input` and `--output` flags that would give the specs of every tensor as the ONNX file
/// declares them (its graph's value infos, not what tract makes of them): `x:FP32:N,2048`, with `?`
/// for a type or size it does not declare (a first axis that is named or unknown is `N`). `None`
/// when the file names no tensor at all.
fn declared_flags(onnx: &[u8], model: &InferenceModel) -> Option<String> {
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value;
    use tract_onnx::pb::{type_proto, ValueInfoProto};

    let proto = ModelProto::decode(onnx).ok()?;
    let graph = proto.graph.as_ref()?;
    let flag = |name: &str, declared: &[ValueInfoProto]| {
        let tensor = declared
            .iter()
            .find(|info| info.name == name)
            .and_then(|info| info.r#type.as_ref()?.value.as_ref())
            .map(|value| match value {
                type_proto::Value::TensorType(tensor) => tensor,
            });
        let dtype = match tensor.and_then(|tensor| DataType::try_from(tensor.elem_type).ok()) {
            Some(DataType::Float) => "FP32",
            Some(DataType::Double) => "FP64",
            Some(DataType::Int32) => "INT32",
            Some(DataType::Int64) => "INT64",
            Some(DataType::Uint8) => "UINT8",
            _ => "?",
        };
        let dims = match tensor.and_then(|tensor| tensor.shape.as_ref()) {
            None => "?".to_owned(),
            Some(shape) => shape
                .dim
                .iter()
                .enumerate()
                .map(|(axis, dim)| match dim.value {
                    Some(Value::DimValue(size)) if size > 0 => size.to_string(),
                    _ if axis == 0 => "N".to_owned(),
                    _ => "?".to_owned(),
                })
                .collect::<Vec<_>>()
                .join(","),
        };
        format!("{name}:{dtype}:{dims}")
    };
    let mut flags = Vec::new();
    for name in input_names(model).ok()? {
        flags.push(format!("--input {}", flag(&name, &graph.input)));
    }
    for name in output_names(model).ok()? {
        flags.push(format!("--output {}", flag(&name, &graph.output)));
    }
    (!flags.is_empty()).then(|| flags.join(" "))
}
