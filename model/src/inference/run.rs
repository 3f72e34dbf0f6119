//! Running requests: inputs checked against the specs, batches run row by row through the
//! batch-1 plan and the rows' outputs stacked.

use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{Dim, TensorSpec};
use tract_onnx::prelude::{TValue, TVec};

use super::error::InferenceError;
use super::tensor::*;
use super::{catch_panic, Batching, LoadedModel, RowInput};

impl LoadedModel {
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
