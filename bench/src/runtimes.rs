//! The two runtimes the agent is compared with: bare tract, loaded the way tract's own examples
//! load a model, and ONNX Runtime through the `ort` crate.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::Tensor as OrtTensor;
use tract_nnef::framework::Nnef;
use tract_onnx::prelude::multithread::Executor;
use tract_onnx::prelude::{
    tvec, DatumType, Framework, InferenceFact, InferenceModel, InferenceModelExt, RunOptions,
    TValue, TVec, TypedModel, TypedSimplePlan, WithOnnx,
};
use tract_onnx::tract_core::floats::FloatPrecisionTranslator;

use crate::models::BenchModel;

/// Named f32 outputs, in the model's output order.
pub type Outputs = Vec<(String, Vec<f32>)>;

/// Bare tract: every input shape concrete, `into_optimized().into_runnable()`; with more than one
/// thread, the plan runs on a pool of that size like the agent's.
#[derive(Debug)]
pub struct BareTract {
    plan: Arc<TypedSimplePlan>,
    inputs: TVec<TValue>,
    output_names: Vec<String>,
}

/// tract's NNEF reader and writer, with the extension for operators ONNX has and NNEF lacks.
pub fn nnef() -> Nnef {
    tract_nnef::nnef().with_onnx()
}

impl BareTract {
    pub fn load(model: &BenchModel, threads: usize) -> anyhow::Result<BareTract> {
        let optimized = Self::parse(model)?.into_optimized()?;
        Self::plan(model, optimized, DatumType::F32, threads)
    }

    /// The model as an NNEF archive (a tar): typed and decluttered, every input shape concrete.
    /// It is the form a device could cache after a model's first load, so that a later
    /// activation skips the protobuf parse, type inference and decluttering.
    pub fn nnef_archive(model: &BenchModel, nnef: &Nnef) -> anyhow::Result<Vec<u8>> {
        let typed = Self::parse(model)?.into_typed()?.into_decluttered()?;
        nnef.write_to_tar(&typed, Vec::new())
    }

    /// Loads an archive from [`BareTract::nnef_archive`]: read, optimised, planned.
    pub fn load_nnef(
        model: &BenchModel,
        nnef: &Nnef,
        archive: &[u8],
        threads: usize,
    ) -> anyhow::Result<BareTract> {
        let optimized = nnef.model_for_read(&mut &archive[..])?.into_optimized()?;
        Self::plan(model, optimized, DatumType::F32, threads)
    }

    /// The model with every f32 tensor (inputs, weights, activations, outputs) in f16, by tract's
    /// `FloatPrecisionTranslator`; the request is cast to f16 and [`BareTract::outputs`] casts
    /// back.
    pub fn load_f16(model: &BenchModel, threads: usize) -> anyhow::Result<BareTract> {
        let mut typed = Self::parse(model)?.into_typed()?.into_decluttered()?;
        typed.transform(&FloatPrecisionTranslator::new(
            DatumType::F32,
            DatumType::F16,
        ))?;
        Self::plan(model, typed.into_optimized()?, DatumType::F16, threads)
    }

    /// The ONNX graph with every input's type and shape fixed from the request.
    fn parse(model: &BenchModel) -> anyhow::Result<InferenceModel> {
        let mut graph = tract_onnx::onnx().model_for_read(&mut &model.onnx[..])?;
        for (index, tensor) in model.request.iter().enumerate() {
            let shape: Vec<usize> = tensor.shape.iter().map(|&dim| dim as usize).collect();
            graph =
                graph.with_input_fact(index, InferenceFact::dt_shape(DatumType::F32, &shape))?;
        }
        Ok(graph)
    }

    /// Plans an optimised model; with more than one thread, on a pool of that size like the
    /// agent's. The request's tensors are made once, in `input_type`.
    fn plan(
        model: &BenchModel,
        optimized: TypedModel,
        input_type: DatumType,
        threads: usize,
    ) -> anyhow::Result<BareTract> {
        let mut inputs = tvec![];
        for (index, tensor) in model.request.iter().enumerate() {
            let shape: Vec<usize> = tensor.shape.iter().map(|&dim| dim as usize).collect();
            let values = model.input_values(index);
            let tensor = tract_onnx::prelude::Tensor::from_shape(&shape, &values)?;
            inputs.push(tensor.cast_to_dt(input_type)?.into_owned().into());
        }
        let options = RunOptions {
            executor: (threads > 1).then(|| Executor::multithread(threads)),
            ..RunOptions::default()
        };
        let plan = optimized.into_runnable_with_options(&options)?;
        Ok(BareTract {
            plan,
            inputs,
            output_names: model.outputs.iter().map(|spec| spec.name.clone()).collect(),
        })
    }

    pub fn run(&self) -> anyhow::Result<TVec<TValue>> {
        self.plan.run(self.inputs.clone())
    }

    /// Runs the request `runs` times timing every node, and returns the time per operator kind,
    /// largest first: where tract spends a call.
    pub fn profile(&self, runs: usize) -> anyhow::Result<Vec<(String, Duration)>> {
        let mut state = self.plan.spawn()?;
        let mut by_op: HashMap<String, Duration> = HashMap::new();
        for _ in 0..runs {
            state.run_plan_with_eval(self.inputs.clone(), |context, op_state, node, inputs| {
                let started = Instant::now();
                let outputs = tract_onnx::tract_core::plan::eval(context, op_state, node, inputs);
                *by_op.entry(node.op().name().to_string()).or_default() += started.elapsed();
                outputs
            })?;
        }
        let mut by_op: Vec<(String, Duration)> = by_op
            .into_iter()
            .map(|(op, total)| (op, total / runs as u32))
            .collect();
        by_op.sort_by_key(|(_, time)| std::cmp::Reverse(*time));
        Ok(by_op)
    }

    pub fn outputs(&self) -> anyhow::Result<Outputs> {
        self.run()?
            .iter()
            .zip(&self.output_names)
            .map(|(value, name)| {
                let value = value.cast_to::<f32>()?;
                let view = value.to_plain_array_view::<f32>()?;
                Ok((name.clone(), view.iter().copied().collect()))
            })
            .collect()
    }
}

fn ort_error(error: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("onnx runtime: {error}")
}

/// Loads the ONNX Runtime shared library into the process; once, before any session.
pub fn init_onnxruntime(library: &Path) -> anyhow::Result<()> {
    let committed = ort::init_from(library)
        .map_err(ort_error)
        .with_context(|| format!("loading {}", library.display()))?
        .with_name("outpost-bench")
        .commit();
    anyhow::ensure!(committed, "the ONNX Runtime environment was already set up");
    Ok(())
}

/// An ONNX Runtime session with the request's tensors, all optimisations on, `threads` intra-op
/// threads (inter-op execution stays sequential).
#[derive(Debug)]
pub struct OnnxRuntime {
    /// `Session::run` takes `&mut self`; the timing loop only has `&self`.
    session: RefCell<Session>,
    inputs: Vec<(String, OrtTensor<f32>)>,
}

impl OnnxRuntime {
    pub fn load(model: &BenchModel, threads: usize) -> anyhow::Result<OnnxRuntime> {
        let session = Session::builder()
            .map_err(ort_error)?
            .with_optimization_level(GraphOptimizationLevel::All)
            .map_err(ort_error)?
            .with_intra_threads(threads)
            .map_err(ort_error)?
            .commit_from_memory(&model.onnx)
            .map_err(ort_error)?;
        let inputs = model
            .request
            .iter()
            .enumerate()
            .map(|(index, tensor)| {
                let shape: Vec<i64> = tensor.shape.iter().map(|&dim| dim as i64).collect();
                let value =
                    OrtTensor::from_array((shape, model.input_values(index))).map_err(ort_error)?;
                Ok((tensor.name.clone(), value))
            })
            .collect::<anyhow::Result<_>>()?;
        Ok(OnnxRuntime {
            session: RefCell::new(session),
            inputs,
        })
    }

    /// Runs the request; `copy` also returns the outputs (for the agreement check).
    fn call(&self, copy: bool) -> anyhow::Result<Outputs> {
        let mut session = self.session.borrow_mut();
        let inputs: Vec<(&str, SessionInputValue)> = self
            .inputs
            .iter()
            .map(|(name, value)| (name.as_str(), SessionInputValue::from(value)))
            .collect();
        let outputs = session.run(inputs).map_err(ort_error)?;
        let mut copied = Vec::new();
        for (name, value) in outputs.iter() {
            let (_, data) = value.try_extract_tensor::<f32>().map_err(ort_error)?;
            anyhow::ensure!(!data.is_empty() || !copy, "empty output {name}");
            if copy {
                copied.push((name.to_owned(), data.to_vec()));
            }
        }
        Ok(copied)
    }

    pub fn run(&self) -> anyhow::Result<()> {
        self.call(false).map(drop)
    }

    pub fn outputs(&self) -> anyhow::Result<Outputs> {
        self.call(true)
    }
}
