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

mod error;
mod load;
#[cfg(feature = "onnxruntime")]
mod onnxruntime;
mod run;
mod runtime;
mod settings;
mod tensor;
mod validate;

pub use error::{InferenceError, TensorKind};
pub use runtime::{Runtimes, SelectError, Selected};
pub use settings::{
    OnnxRuntimeSettings, Provider, ProviderKind, RuntimeChoice, RuntimeInfo, RuntimeKind,
    DEFAULT_LIBRARIES,
};
pub use validate::{validate, Top1Agreement, ValidationError, ValidationReport};

use std::any::Any;
use std::fmt;
use std::panic::{catch_unwind, AssertUnwindSafe};

use outpost_protocol::trust::{Dim, TensorSpec};
use tract_onnx::prelude::TypedSimplePlan;

/// Name of the symbol every [`Dim::Batch`] axis is bound to, so all inputs share one batch size.
const BATCH_SYMBOL: &str = "N";

/// A model loaded into a runtime, and the specs it was loaded with.
///
/// `run` takes `&self`, so one `LoadedModel` serves concurrent requests: on tract side by side
/// (fresh state per call), on ONNX Runtime one after the other (see `onnxruntime.rs`).
pub struct LoadedModel {
    engine: Engine,
    batching: Batching,
    inputs: Vec<TensorSpec>,
    outputs: Vec<TensorSpec>,
    /// For each model input, in the model's order, the index of its spec in `inputs`.
    input_spec_of: Vec<usize>,
    /// For each model output, in the model's order, the index of its spec in `outputs`.
    output_spec_of: Vec<usize>,
    threads: usize,
    /// How long the last answered call of `run` took, in nanoseconds; 0 before the first.
    last_run_ns: std::sync::atomic::AtomicU64,
}

/// The runtime a model is loaded into.
enum Engine {
    /// tract's one optimised plan, with every batch axis fixed at 1.
    Tract(std::sync::Arc<TypedSimplePlan>),
    /// An ONNX Runtime session, run a row at a time like tract's plan.
    #[cfg(feature = "onnxruntime")]
    OnnxRuntime(Box<onnxruntime::OrtSession>),
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
            .field("runtime", &self.runtime())
            .finish_non_exhaustive()
    }
}

impl LoadedModel {
    /// A model loaded into `engine`, with the specs it was matched to (`input_spec_of` and
    /// `output_spec_of`: for each model input and output, in the model's order, its spec's
    /// index): what both runtimes' loaders end with.
    fn assemble(
        engine: Engine,
        batching: Batching,
        (inputs, outputs): (&[TensorSpec], &[TensorSpec]),
        (input_spec_of, output_spec_of): (Vec<usize>, Vec<usize>),
        threads: usize,
    ) -> LoadedModel {
        LoadedModel {
            engine,
            batching,
            inputs: inputs.to_vec(),
            outputs: outputs.to_vec(),
            input_spec_of,
            output_spec_of,
            threads,
            last_run_ns: Default::default(),
        }
    }

    /// How long the last answered call of [`LoadedModel::run`] took (checks and copies
    /// included), or `None` before the first: what a caller uses to tell a model that answers in microseconds
    /// from one that takes milliseconds.
    pub fn last_run(&self) -> Option<std::time::Duration> {
        match self.last_run_ns.load(std::sync::atomic::Ordering::Relaxed) {
            0 => None,
            nanos => Some(std::time::Duration::from_nanos(nanos)),
        }
    }

    /// What runs the model.
    pub fn runtime(&self) -> RuntimeInfo {
        match &self.engine {
            Engine::Tract(_) => RuntimeInfo::tract(),
            #[cfg(feature = "onnxruntime")]
            Engine::OnnxRuntime(session) => session.info().clone(),
        }
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
