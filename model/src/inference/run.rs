//! Running requests: inputs checked against the specs, batches run row by row through the
//! batch-1 plan and the rows' outputs stacked.

use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{Dim, TensorSpec};
use tract_onnx::prelude::{TValue, TVec, TypedSimplePlan};

use super::error::InferenceError;
use super::tensor::*;
use super::{catch_panic, Batching, Engine, LoadedModel};

/// What the row logic needs of a runtime: its value of a checked protocol tensor that is the
/// same in every row of a batch, and a run of inputs in the model's input order giving outputs in
/// spec order.
///
/// A runtime takes the request's tensors (and rows of them) rather than values converted
/// beforehand, so that ONNX Runtime can copy them straight into the input values it keeps from
/// call to call (see `onnxruntime.rs`); tract converts each as before.
trait Backend {
    type Value;
    fn value(&self, tensor: &Tensor) -> Result<Self::Value, InferenceError>;
    fn run(
        &self,
        model: &LoadedModel,
        ordered: TVec<Input<'_, Self::Value>>,
    ) -> Result<Vec<Tensor>, InferenceError>;
}

/// How one input reaches each row of a batch run through the batch-1 plan.
enum RowInput<V> {
    /// No batch axis: the same converted value for every row.
    Whole(V),
    /// Cut along its batch axis, one row at a time.
    Sliced { axis: usize },
}

impl LoadedModel {
    /// Runs one request.
    ///
    /// Each input is checked against its spec (name, type, rank, fixed sizes, one batch size
    /// across inputs, data length) before tract runs. Outputs come back in spec order, named from
    /// the output specs.
    pub fn run(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        let started = std::time::Instant::now();
        let result = self.run_checked(inputs);
        // Only an answered request says how long the model takes: a refused one stops early.
        if result.is_ok() {
            let nanos = u64::try_from(started.elapsed().as_nanos()).unwrap_or(u64::MAX);
            self.last_run_ns
                .store(nanos.max(1), std::sync::atomic::Ordering::Relaxed);
        }
        result
    }

    fn run_checked(&self, inputs: &[Tensor]) -> Result<Vec<Tensor>, InferenceError> {
        let mut by_spec: TVec<Option<&Tensor>> =
            std::iter::repeat_n(None, self.inputs.len()).collect();
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
            .collect::<Result<TVec<&Tensor>, _>>()?;
        match (&self.batching, batch) {
            (
                Batching::Rows {
                    input_axes,
                    output_axes,
                },
                Some(rows),
            ) if rows > 1 => match &self.engine {
                Engine::Tract(plan) => {
                    self.run_rows(&Tract(plan), &by_spec, input_axes, output_axes, rows)
                }
                #[cfg(feature = "onnxruntime")]
                Engine::OnnxRuntime(session) => {
                    self.run_rows(&**session, &by_spec, input_axes, output_axes, rows)
                }
            },
            (Batching::OneRow { reason }, Some(rows)) if rows > 1 => {
                Err(InferenceError::BatchOfOneOnly {
                    got: rows,
                    reason: reason.clone(),
                })
            }
            _ => match &self.engine {
                Engine::Tract(plan) => self.run_whole(&Tract(plan), &by_spec),
                #[cfg(feature = "onnxruntime")]
                Engine::OnnxRuntime(session) => self.run_whole(&**session, &by_spec),
            },
        }
    }

    /// Runs a request as it is, in one call of the runtime.
    fn run_whole<B: Backend>(
        &self,
        backend: &B,
        by_spec: &[&Tensor],
    ) -> Result<Vec<Tensor>, InferenceError> {
        let ordered = self
            .input_spec_of
            .iter()
            .map(|&spec_ix| Input::Whole(by_spec[spec_ix]))
            .collect();
        backend.run(self, ordered)
    }

    /// Runs a batch of `rows` through the batch-1 plan one row at a time and stacks the rows'
    /// outputs along each output's batch axis (see [`Batching`]).
    fn run_rows<B: Backend>(
        &self,
        backend: &B,
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
                None => backend.value(tensor).map(RowInput::Whole),
            })
            .collect::<Result<TVec<RowInput<B::Value>>, _>>()?;
        let mut stacks: Vec<Vec<Tensor>> = vec![Vec::new(); self.outputs.len()];
        for row in 0..rows {
            let ordered = self
                .input_spec_of
                .iter()
                .map(|&spec_ix| match &per_input[spec_ix] {
                    RowInput::Whole(value) => Input::Value(value),
                    RowInput::Sliced { axis } => Input::Row {
                        tensor: by_spec[spec_ix],
                        axis: *axis,
                        row,
                    },
                })
                .collect();
            for (stack, output) in stacks.iter_mut().zip(backend.run(self, ordered)?) {
                stack.push(output);
            }
        }
        stacks
            .into_iter()
            .zip(output_axes)
            .map(|(stack, &axis)| stack_rows(stack, axis))
            .collect()
    }
}

/// tract's optimised plan.
struct Tract<'a>(&'a std::sync::Arc<TypedSimplePlan>);

impl Backend for Tract<'_> {
    type Value = TValue;

    fn value(&self, tensor: &Tensor) -> Result<TValue, InferenceError> {
        to_tract(tensor).map(TValue::from)
    }

    fn run(
        &self,
        model: &LoadedModel,
        ordered: TVec<Input<'_, TValue>>,
    ) -> Result<Vec<Tensor>, InferenceError> {
        let ordered = ordered
            .into_iter()
            .map(|input| match input {
                Input::Whole(tensor) => self.value(tensor),
                Input::Row { tensor, axis, row } => self.value(&take_row(tensor, axis, row)),
                Input::Value(value) => Ok(value.clone()),
            })
            .collect::<Result<TVec<TValue>, _>>()?;
        let results = catch_panic("running the model", || {
            self.0.run(ordered).map_err(InferenceError::Run)
        })?;
        let mut outputs: Vec<Option<Tensor>> = vec![None; model.outputs.len()];
        for (value, &spec_ix) in results.iter().zip(&model.output_spec_of) {
            let spec = &model.outputs[spec_ix];
            outputs[spec_ix] = Some(from_tract(spec, value)?);
        }
        outputs
            .into_iter()
            .zip(&model.outputs)
            .map(|(tensor, spec)| {
                tensor.ok_or_else(|| {
                    InferenceError::Run(anyhow::anyhow!("tract returned no {:?}", spec.name))
                })
            })
            .collect()
    }
}

#[cfg(feature = "onnxruntime")]
impl Backend for super::onnxruntime::OrtSession {
    type Value = ort::value::DynValue;

    fn value(&self, tensor: &Tensor) -> Result<Self::Value, InferenceError> {
        super::onnxruntime::OrtSession::value(self, tensor)
    }

    fn run(
        &self,
        model: &LoadedModel,
        ordered: TVec<Input<'_, Self::Value>>,
    ) -> Result<Vec<Tensor>, InferenceError> {
        super::onnxruntime::OrtSession::run(self, &ordered, &model.outputs, &model.output_spec_of)
    }
}

/// Checks a request tensor against its spec; `batch` carries the batch size across inputs.
pub(super) fn check_input(
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
    tensor.check().map_err(|error| InferenceError::BadData {
        name: name(),
        reason: error.to_string(),
    })
}
