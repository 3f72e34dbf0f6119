//! ONNX Runtime through the `ort` crate: the library loaded once per process from a path
//! (`load-dynamic`: nothing linked at build time), sessions with the configured execution
//! providers, and protocol tensors in and out.
//!
//! A session's `run` takes `&mut self` in `ort`, so each model's session sits behind a mutex:
//! requests to one model on ONNX Runtime run one at a time, each with the model's intra-op
//! threads (`[inference] threads`), where tract runs concurrent requests side by side. The same
//! mutex holds the input and output values a session's calls reuse (see [`State`]).

use std::path::Path;
use std::sync::Mutex;

use ort::ep::{self, ExecutionProviderDispatch};
use ort::memory::Allocator;
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{
    HasSelectedOutputs, OutputSelector, RunOptions, Session, SessionInputValue, SessionOutputs,
};
use ort::value::{DynTensor, DynValue, Shape, Tensor as OrtTensor, ValueType};
use ort::{ep::ArbitrarilyConfigurableExecutionProvider, ep::ExecutionProvider};
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{DType, Dim, TensorSpec};
use tract_onnx::prelude::TVec;

use super::error::{InferenceError, TensorKind};
use super::load::match_specs;

use super::settings::{Provider, ProviderKind, RuntimeInfo, RuntimeKind};
use super::tensor::{around_axis, Element, Input};
use super::{catch_panic, Batching, Engine, LoadedModel};

/// The path of the one library `ort` loads in a process.
static LOADED_FROM: std::sync::OnceLock<std::path::PathBuf> = std::sync::OnceLock::new();

/// The ONNX Runtime library this process loaded, and the providers every session registers.
#[derive(Debug)]
pub(super) struct Library {
    version: String,
    providers: Vec<Provider>,
}

impl Library {
    /// Loads the library at `path` into the process and checks each provider is in it. The
    /// library stays loaded for the life of the process; once one has loaded, a call with
    /// another path is refused, since `ort` keeps one.
    pub(super) fn open(path: &Path, providers: &[Provider]) -> Result<Library, String> {
        if let Some(first) = LOADED_FROM.get().filter(|first| *first != path) {
            return Err(format!(
                "this process loaded ONNX Runtime from {} already, not {}",
                first.display(),
                path.display()
            ));
        }
        let loaded = catch_panic("loading ONNX Runtime", || {
            let builder = ort::init_from(path).map_err(|error| {
                InferenceError::Runtime(format!("cannot load {}: {error}", path.display()))
            })?;
            // `commit` is false when an environment already exists, which is only when this
            // process loaded the library before: the same library, since `ort` keeps one.
            builder.with_name("outpost").commit();
            Ok(())
        });
        loaded.map_err(|error| error.to_string())?;
        // Only a library that loaded is the process's one: a failed attempt leaves room for
        // another path.
        let _ = LOADED_FROM.set(path.to_path_buf());
        let version = library_version(path);
        for provider in providers {
            let available = dispatch(provider)
                .and_then(|(_, available)| available)
                .map_err(|error| format!("execution provider {}: {error}", provider.kind.name()))?;
            if !available {
                return Err(format!(
                    "execution provider {} ({}) is not in ONNX Runtime {version} at {}",
                    provider.kind.name(),
                    provider.kind.onnxruntime_name(),
                    path.display()
                ));
            }
        }
        Ok(Library {
            version,
            providers: providers.to_vec(),
        })
    }

    pub(super) fn info(&self) -> RuntimeInfo {
        let mut providers: Vec<String> = self
            .providers
            .iter()
            .map(|provider| provider.kind.onnxruntime_name().to_owned())
            .collect();
        if !self
            .providers
            .iter()
            .any(|provider| provider.kind == ProviderKind::Cpu)
        {
            providers.push(ProviderKind::Cpu.onnxruntime_name().to_owned());
        }
        RuntimeInfo {
            kind: RuntimeKind::OnnxRuntime,
            version: self.version.clone(),
            providers,
        }
    }

    /// A session of a small built-in model with the configured providers, run once and compared
    /// with tract's answer.
    pub(super) fn probe(&self) -> Result<RuntimeInfo, String> {
        let (inputs, outputs) = crate::example::mlp_specs(4, 3);
        let onnx = crate::example::mlp(4, 8, 3, 1);
        let model = self
            .load(&onnx, &inputs, &outputs, 1)
            .map_err(|error| format!("{:#}", anyhow::Error::new(error)))?;
        let tract = LoadedModel::load(&onnx, &inputs, &outputs, 1)
            .map_err(|error| format!("tract: {:#}", anyhow::Error::new(error)))?;
        let request = crate::example::example_inputs(&inputs, 1, 7);
        let answer = model
            .run(&request)
            .map_err(|error| format!("running a probe model: {:#}", anyhow::Error::new(error)))?;
        let expected = tract
            .run(&request)
            .map_err(|error| format!("tract: {:#}", anyhow::Error::new(error)))?;
        let close = answer.len() == expected.len()
            && answer.iter().zip(&expected).all(|(got, want)| {
                got.shape == want.shape
                    && super::tensor::to_f64s(got)
                        .iter()
                        .zip(super::tensor::to_f64s(want))
                        .all(|(got, want)| (got - want).abs() <= 1e-4 + 1e-4 * want.abs())
            });
        if !close {
            return Err("a probe model's answer differs from tract's".to_owned());
        }
        Ok(self.info())
    }

    /// Loads `onnx` as a session, its inputs and outputs matched to the specs.
    pub(super) fn load(
        &self,
        onnx: &[u8],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        threads: usize,
    ) -> Result<LoadedModel, InferenceError> {
        if threads == 0 {
            return Err(InferenceError::ZeroThreads);
        }
        let session = catch_panic("loading the model into ONNX Runtime", || {
            self.session(onnx, threads)
        })?;
        let input_names: Vec<String> = session
            .inputs()
            .iter()
            .map(|outlet| outlet.name().to_owned())
            .collect();
        let output_names: Vec<String> = session
            .outputs()
            .iter()
            .map(|outlet| outlet.name().to_owned())
            .collect();
        let input_spec_of = match_specs(TensorKind::Input, &input_names, inputs)?;
        let output_spec_of = match_specs(TensorKind::Output, &output_names, outputs)?;
        for (outlet, &spec_ix) in session.inputs().iter().zip(&input_spec_of) {
            check_declared(TensorKind::Input, &inputs[spec_ix], outlet.dtype())?;
        }
        for (outlet, &spec_ix) in session.outputs().iter().zip(&output_spec_of) {
            check_declared(TensorKind::Output, &outputs[spec_ix], outlet.dtype())?;
        }
        let engine = Engine::OnnxRuntime(Box::new(OrtSession {
            state: Mutex::new(State {
                inputs: std::iter::repeat_with(|| None)
                    .take(input_names.len())
                    .collect(),
                session,
                outputs: Outputs::Fresh,
            }),
            info: self.info(),
        }));
        Ok(LoadedModel::assemble(
            engine,
            Batching::of(inputs, outputs),
            (inputs, outputs),
            (input_spec_of, output_spec_of),
            threads,
        ))
    }

    fn session(&self, onnx: &[u8], threads: usize) -> Result<Session, InferenceError> {
        let error = |error: String| InferenceError::Runtime(error);
        let mut providers = Vec::with_capacity(self.providers.len());
        for provider in &self.providers {
            let (dispatch, _) = dispatch(provider).map_err(error)?;
            providers.push(dispatch.error_on_failure());
        }
        Session::builder()
            .map_err(|e| error(e.to_string()))?
            .with_optimization_level(GraphOptimizationLevel::Level3)
            .map_err(|e| error(e.to_string()))?
            .with_intra_threads(threads)
            .map_err(|e| error(e.to_string()))?
            .with_inter_threads(1)
            .map_err(|e| error(e.to_string()))?
            .with_execution_providers(providers)
            .map_err(|e| error(format!("registering the execution providers: {e}")))?
            .commit_from_memory(onnx)
            .map_err(|e| error(format!("cannot load the model: {e}")))
    }
}

/// A provider's registration, and whether the loaded library has it.
fn dispatch(
    provider: &Provider,
) -> Result<(ExecutionProviderDispatch, Result<bool, String>), String> {
    /// Applies the options, asks the library for the provider, and builds its registration.
    macro_rules! configured {
        ($provider:expr) => {{
            let provider = provider
                .options
                .iter()
                .fold($provider, |provider, (key, value)| {
                    provider.with_arbitrary_config(key, value)
                });
            let available = provider.is_available().map_err(|error| error.to_string());
            (provider.build(), available)
        }};
    }
    Ok(match provider.kind {
        ProviderKind::Cpu => {
            if let Some((key, _)) = provider.options.first() {
                return Err(format!("takes no options, got {key:?}"));
            }
            let cpu = ep::CPU::default();
            let available = cpu.is_available().map_err(|error| error.to_string());
            (cpu.build(), available)
        }
        ProviderKind::Cuda => configured!(ep::CUDA::default()),
        ProviderKind::TensorRt => configured!(ep::TensorRT::default()),
        ProviderKind::OpenVino => configured!(ep::OpenVINO::default()),
        ProviderKind::Xnnpack => configured!(ep::XNNPACK::default()),
        ProviderKind::Qnn => configured!(ep::QNN::default()),
    })
}

/// The loaded library's own version (`1.22.0`), as `OrtGetApiBase()->GetVersionString()` gives
/// it: `ort` reads it when it loads the library but does not expose it.
#[allow(unsafe_code)]
fn library_version(path: &Path) -> String {
    type GetApiBase = unsafe extern "C" fn() -> *const ort::sys::OrtApiBase;
    // SAFETY: `path` is the library `ort` has just loaded, having checked that it exports
    // `OrtGetApiBase`; opening it again takes another reference to the same mapping (no
    // initialiser runs twice). `OrtGetApiBase` takes no argument and returns a pointer to a
    // static table, checked for null, whose `GetVersionString` returns a static NUL-terminated
    // string, copied before the reference is dropped.
    let version = unsafe {
        libloading::Library::new(path).ok().and_then(|library| {
            let get = library.get::<GetApiBase>(b"OrtGetApiBase").ok()?;
            let base = get();
            if base.is_null() {
                return None;
            }
            let version = ((*base).GetVersionString)();
            (!version.is_null()).then(|| {
                std::ffi::CStr::from_ptr(version)
                    .to_string_lossy()
                    .into_owned()
            })
        })
    };
    version.unwrap_or_else(|| "unknown".to_owned())
}

/// Checks what ONNX Runtime says the model declares against a spec: type and rank, and every
/// fixed size the model fixes too.
fn check_declared(
    kind: TensorKind,
    spec: &TensorSpec,
    declared: &ValueType,
) -> Result<(), InferenceError> {
    let mismatch = |reason: String| InferenceError::SpecMismatch {
        kind,
        name: spec.name.clone(),
        reason,
    };
    let ValueType::Tensor { ty, shape, .. } = declared else {
        return Err(mismatch(format!(
            "the model declares {declared:?}, not a tensor"
        )));
    };
    if element_type(spec.dtype) != *ty {
        return Err(mismatch(format!(
            "the spec says {}, the model {ty:?}",
            spec.dtype.as_str()
        )));
    }
    if shape.len() != spec.shape.len() {
        return Err(mismatch(format!(
            "the spec has {} axes, the model {}",
            spec.shape.len(),
            shape.len()
        )));
    }
    for (axis, (&declared, dim)) in shape.iter().zip(&spec.shape).enumerate() {
        if let (Dim::Fixed(size), true) = (dim, declared >= 0) {
            if declared as u64 != *size {
                return Err(mismatch(format!(
                    "axis {axis} is {size} in the spec, {declared} in the model"
                )));
            }
        }
    }
    Ok(())
}

fn element_type(dtype: DType) -> ort::value::TensorElementType {
    use ort::value::TensorElementType as T;
    match dtype {
        DType::F32 => T::Float32,
        DType::F64 => T::Float64,
        DType::I32 => T::Int32,
        DType::I64 => T::Int64,
        DType::U8 => T::Uint8,
    }
}

/// Calls `$f::<T>($args)` with `T` the element type of `$dtype`.
macro_rules! typed {
    ($dtype:expr, $f:ident, $($arg:expr),*) => {
        match $dtype {
            DType::F32 => $f::<f32>($($arg),*),
            DType::F64 => $f::<f64>($($arg),*),
            DType::I32 => $f::<i32>($($arg),*),
            DType::I64 => $f::<i64>($($arg),*),
            DType::U8 => $f::<u8>($($arg),*),
        }
    };
}

/// One model's session.
pub(super) struct OrtSession {
    state: Mutex<State>,
    info: RuntimeInfo,
}

/// What one call at a time holds: the session, for each of its inputs (in the model's order) the
/// value the last call gave it, and where ONNX Runtime writes the outputs.
///
/// On a model that runs in microseconds the values around a call cost as much as anything else
/// in the agent's path. ONNX Runtime reads an input from a value that owns its buffer, and making
/// one per input per call (a vector, a value around it, a few calls into the library) took about
/// 0.3 µs on the bench's MLP (64 → 256 → 10, 4 µs a call). A request nearly always has the shape
/// of the one before: every request at a batch of 1 has the model's one shape, and so has each
/// row of a larger batch, run one at a time. So each input's value stays for the next call, which
/// copies its request into the value's buffer when the shape is the same, and otherwise makes a
/// new value and keeps that. Outputs cost more still, about 0.6 µs there: ONNX Runtime allocating
/// them, and `ort` asking the library about each to wrap it; see [`Outputs`].
struct State {
    session: Session,
    inputs: Vec<Option<DynValue>>,
    outputs: Outputs,
}

/// Where a call's outputs go.
///
/// Kept values go to ONNX Runtime as preallocated outputs in the run's options rather than bound
/// to an `IoBinding`, whose run asks the library about every output again to wrap it: on the
/// bench's MLP a bare session call took 3.4 µs with kept outputs, 3.5 µs through a binding and
/// 4.0 µs with ONNX Runtime allocating.
enum Outputs {
    /// Into what ONNX Runtime allocates: before the first call and after the inputs change shape.
    /// Values of the outputs' shapes are then made, to be kept for the next calls.
    Fresh,
    /// Into values of the outputs' shapes at the inputs' current shapes, kept from call to call
    /// and overwritten by each, which copies its outputs out before it lets go of the lock. They
    /// are values made for the purpose, never ones ONNX Runtime handed back (which may share
    /// another value's buffer), so a call writes into nothing else.
    Kept(RunOptions<HasSelectedOutputs>),
    /// Into what ONNX Runtime allocates, always: an output is an input passed through (which ONNX
    /// Runtime hands back as the input's own value, leaving a kept one as it was), or ONNX Runtime
    /// refused a kept value and then answered with its own (an output whose shape follows an
    /// input's data, not only its shape, such as `Tile` by an input's counts).
    Never,
}

impl OrtSession {
    pub(super) fn info(&self) -> &RuntimeInfo {
        &self.info
    }

    /// A checked protocol tensor as a new ONNX Runtime value.
    pub(super) fn value(&self, tensor: &Tensor) -> Result<DynValue, InferenceError> {
        let source = Source::Whole(tensor);
        typed!(tensor.dtype, new_value, &source, source.shape()?)
    }

    /// Runs one call of inputs in the model's input order; outputs in spec order (`output_spec_of`:
    /// for each model output, in the model's order, its spec's index), typed by their specs.
    pub(super) fn run(
        &self,
        ordered: &[Input<'_, DynValue>],
        specs: &[TensorSpec],
        output_spec_of: &[usize],
    ) -> Result<Vec<Tensor>, InferenceError> {
        catch_panic("running the model", || {
            let mut state = self
                .state
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let State {
                session,
                inputs,
                outputs,
            } = &mut *state;
            let mut reshaped = false;
            for (input, slot) in ordered.iter().zip(inputs.iter_mut()) {
                let source = match *input {
                    Input::Whole(tensor) => Source::Whole(tensor),
                    Input::Row { tensor, axis, row } => Source::Row { tensor, axis, row },
                    Input::Value(_) => continue,
                };
                reshaped |= typed!(source.tensor().dtype, reuse, slot, &source)?;
            }
            if reshaped && matches!(outputs, Outputs::Kept(_)) {
                *outputs = Outputs::Fresh;
            }
            let values = ordered
                .iter()
                .zip(inputs.iter())
                .map(|(input, slot)| match (input, slot) {
                    (Input::Value(value), _) => Ok(*value),
                    (_, Some(value)) => Ok(value),
                    (_, None) => Err(InferenceError::Run(anyhow::anyhow!(
                        "an input was not given a value"
                    ))),
                })
                .collect::<Result<TVec<&DynValue>, _>>()?;
            // A slice of values goes in the session's own input order, with no names to match.
            let session_values: TVec<SessionInputValue<'_>> =
                values.iter().map(|&value| value.into()).collect();
            let previous = std::mem::replace(outputs, Outputs::Never);
            if let Outputs::Kept(options) = &previous {
                let answered = match session.run_with_options(&session_values[..], options) {
                    Ok(results) => Some(answer(&results, specs, output_spec_of)),
                    // Perhaps a kept value that does not fit: the call again, without them.
                    Err(_) => None,
                };
                if let Some(answer) = answered {
                    *outputs = previous;
                    return answer;
                }
            }
            let results = match session.run(&session_values[..]) {
                Ok(results) => results,
                Err(error) => {
                    // The request failed, not the kept values.
                    *outputs = previous;
                    return Err(InferenceError::Run(anyhow::anyhow!("{error}")));
                }
            };
            if let Outputs::Fresh = previous {
                *outputs = keep(&results, &values);
            }
            answer(&results, specs, output_spec_of)
        })
    }
}

/// A call's outputs in spec order, each copied into a protocol tensor.
fn answer(
    results: &SessionOutputs<'_>,
    specs: &[TensorSpec],
    output_spec_of: &[usize],
) -> Result<Vec<Tensor>, InferenceError> {
    let mut outputs: TVec<Option<Tensor>> = std::iter::repeat_n(None, specs.len()).collect();
    for (value, &spec_ix) in results.values().zip(output_spec_of) {
        outputs[spec_ix] = Some(from_ort(&specs[spec_ix], &value)?);
    }
    outputs
        .into_iter()
        .zip(specs)
        .map(|(tensor, spec)| {
            tensor.ok_or_else(|| {
                InferenceError::Run(anyhow::anyhow!("ONNX Runtime returned no {:?}", spec.name))
            })
        })
        .collect()
}

/// Values of the shapes and types of the outputs ONNX Runtime allocated for a call on `inputs`,
/// for it to write the next calls' outputs into; [`Outputs::Never`] when an output is one of the
/// inputs, or the values cannot be made.
fn keep(results: &SessionOutputs<'_>, inputs: &[&DynValue]) -> Outputs {
    let mut selector = OutputSelector::default();
    for (name, value) in results.iter() {
        let ValueType::Tensor { ty, shape, .. } = value.dtype() else {
            return Outputs::Never;
        };
        // An output passed through from an input is that input's own value, sharing its buffer.
        let buffer = value.data_ptr();
        if inputs.iter().any(|input| input.data_ptr() == buffer) {
            return Outputs::Never;
        }
        match DynTensor::new(&Allocator::default(), *ty, shape.clone()) {
            Ok(kept) => selector = selector.preallocate(name, kept),
            Err(_) => return Outputs::Never,
        }
    }
    match RunOptions::new() {
        Ok(options) => Outputs::Kept(options.with_outputs(selector)),
        Err(_) => Outputs::Never,
    }
}

/// The request bytes of one input of a call: a checked tensor, or one row of it.
enum Source<'a> {
    Whole(&'a Tensor),
    /// Row `row` along batch axis `axis`, as [`super::tensor::take_row`] cuts it.
    Row {
        tensor: &'a Tensor,
        axis: usize,
        row: u64,
    },
}

impl Source<'_> {
    fn tensor(&self) -> &Tensor {
        match self {
            Source::Whole(tensor) | Source::Row { tensor, .. } => tensor,
        }
    }

    /// The shape of the value: the tensor's, with a batch of 1 for a row.
    fn shape(&self) -> Result<Shape, InferenceError> {
        let tensor = self.tensor();
        let row_axis = match self {
            Source::Whole(_) => None,
            Source::Row { axis, .. } => Some(*axis),
        };
        tensor
            .shape
            .iter()
            .enumerate()
            .map(|(axis, &dim)| {
                if Some(axis) == row_axis {
                    Ok(1)
                } else {
                    i64::try_from(dim)
                }
            })
            .collect::<Result<Shape, _>>()
            .map_err(|_| InferenceError::BadData {
                name: tensor.name.clone(),
                reason: "an axis is too large".to_owned(),
            })
    }

    /// Calls `f` on each run of the value's bytes in order: the whole data, or for a row the
    /// row's part of each block before its batch axis.
    fn for_each_run(&self, mut f: impl FnMut(&[u8])) {
        match *self {
            Source::Whole(tensor) => f(&tensor.data),
            Source::Row { tensor, axis, row } => {
                let (_, rows, step) = around_axis(tensor, axis);
                if step > 0 {
                    let start = row as usize * step;
                    for block in tensor.data.chunks_exact(rows * step) {
                        f(&block[start..start + step]);
                    }
                }
            }
        }
    }

    /// Copies the source into `out`, element by element from little-endian; whether it filled
    /// `out` exactly.
    fn copy_into<T: Element>(&self, out: &mut [T]) -> bool {
        let mut at = 0;
        let mut fits = true;
        self.for_each_run(|bytes| {
            let elements = bytes.len() / T::SIZE;
            match out.get_mut(at..at + elements) {
                Some(part) if fits => {
                    for (element, bytes) in part.iter_mut().zip(bytes.chunks_exact(T::SIZE)) {
                        *element = T::from_le(bytes);
                    }
                    at += elements;
                }
                _ => fits = false,
            }
        });
        fits && at == out.len()
    }

    fn bad_data(&self, reason: String) -> InferenceError {
        InferenceError::BadData {
            name: self.tensor().name.clone(),
            reason,
        }
    }
}

/// Copies `source` into `slot`'s value when it has `source`'s shape and type, and otherwise puts a
/// new value of it there; whether it did that.
fn reuse<T>(slot: &mut Option<DynValue>, source: &Source<'_>) -> Result<bool, InferenceError>
where
    T: Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static,
{
    let shape = source.shape()?;
    if let Some(value) = slot {
        let same_shape =
            matches!(value.dtype(), ValueType::Tensor { shape: had, .. } if *had == shape);
        if same_shape {
            if let Ok((_, data)) = value.try_extract_tensor_mut::<T>() {
                if source.copy_into(data) {
                    return Ok(false);
                }
            }
        }
    }
    // A value that cannot be made leaves no value behind, rather than one with the data of
    // another call.
    *slot = None;
    *slot = Some(new_value::<T>(source, shape)?);
    Ok(true)
}

/// A new ONNX Runtime value of `source`, of `shape`.
fn new_value<T>(source: &Source<'_>, shape: Shape) -> Result<DynValue, InferenceError>
where
    T: Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static,
{
    let mut data: Vec<T> = Vec::with_capacity(shape.num_elements());
    source.for_each_run(|bytes| data.extend(bytes.chunks_exact(T::SIZE).map(T::from_le)));
    OrtTensor::<T>::from_array((shape, data))
        .map(|value| value.into_dyn())
        .map_err(|error| source.bad_data(error.to_string()))
}

/// Copies an ONNX Runtime output into a protocol tensor named and typed by its spec.
fn from_ort(spec: &TensorSpec, value: &ort::value::ValueRef<'_>) -> Result<Tensor, InferenceError> {
    fn bytes<T>(
        spec: &TensorSpec,
        value: &ort::value::ValueRef<'_>,
    ) -> Result<Tensor, InferenceError>
    where
        T: Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static,
    {
        let (shape, data) =
            value
                .try_extract_tensor::<T>()
                .map_err(|_| InferenceError::OutputDType {
                    name: spec.name.clone(),
                    expected: spec.dtype,
                    got: format!("{:?}", value.dtype()),
                })?;
        let mut out = Vec::with_capacity(data.len() * T::SIZE);
        for element in data {
            element.extend_le(&mut out);
        }
        Ok(Tensor {
            name: spec.name.clone(),
            dtype: spec.dtype,
            shape: shape.iter().map(|&dim| dim.max(0) as u64).collect(),
            data: out,
        })
    }
    typed!(spec.dtype, bytes, spec, value)
}

// No package a registry serves has ONNX Runtime for 32-bit ARM (see `tests/onnxruntime.rs`).
#[cfg(test)]
#[cfg(not(target_arch = "arm"))]
mod tests {
    use super::*;
    use crate::example::{
        batch_axes, batch_axes_specs, byte_casts, byte_casts_specs, example_inputs,
        installed_onnxruntime, mlp, mlp_specs,
    };
    use crate::inference::tensor::to_f64s;
    use prost::Message as _;
    use tract_onnx::pb::tensor_proto::DataType;
    use tract_onnx::pb::tensor_shape_proto::dimension::Value::{DimParam, DimValue};
    use tract_onnx::pb::{type_proto, GraphProto, ModelProto, NodeProto, TypeProto};

    fn library() -> Library {
        Library::open(&installed_onnxruntime(std::env::consts::ARCH), &[]).unwrap()
    }

    fn session(model: &LoadedModel) -> &OrtSession {
        match &model.engine {
            Engine::OnnxRuntime(session) => session,
            Engine::Tract(_) => panic!("the model is on tract"),
        }
    }

    fn assert_close(got: &[Tensor], want: &[Tensor]) {
        assert_eq!(got.len(), want.len());
        for (got, want) in got.iter().zip(want) {
            assert_eq!(
                (&got.name, got.dtype, &got.shape),
                (&want.name, want.dtype, &want.shape)
            );
            for (g, w) in to_f64s(got).iter().zip(to_f64s(want)) {
                assert!(
                    (g - w).abs() <= 1e-5 + 1e-4 * w.abs(),
                    "{}: {g} vs {w}",
                    got.name
                );
            }
        }
    }

    /// The input values a session keeps from call to call never answer with another call's
    /// shape or data: requests whose batches change size (a batch of 1 whole, larger ones row by
    /// row, an input without a batch axis converted once for the rows), and whole batches of
    /// other shapes given to the session directly, as a runtime that runs batches whole would,
    /// answer as tract does, each with its own data.
    #[test]
    fn kept_inputs_never_answer_with_another_calls_shape_or_data() {
        let library = library();
        let models = [
            (mlp(4, 8, 3, 1), mlp_specs(4, 3)),
            (batch_axes(), batch_axes_specs()),
            (byte_casts(6), byte_casts_specs(6)),
        ];
        for (onnx, (inputs, outputs)) in &models {
            let ort = library.load(onnx, inputs, outputs, 1).unwrap();
            let tract = LoadedModel::load(onnx, inputs, outputs, 1).unwrap();
            for (seed, batch) in [1, 3, 1, 1, 17, 2, 2, 1, 5].into_iter().enumerate() {
                let request = example_inputs(inputs, batch, seed as u64 + 1);
                let want = tract.run(&request).unwrap();
                assert_close(&ort.run(&request).unwrap(), &want);
                let whole: Vec<Input<'_, DynValue>> = ort
                    .input_spec_of
                    .iter()
                    .map(|&spec_ix| Input::Whole(&request[spec_ix]))
                    .collect();
                let got = session(&ort).run(&whole, &ort.outputs, &ort.output_spec_of);
                assert_close(&got.unwrap(), &want);
                assert_eq!(kept(&ort), "kept");
            }
        }
    }

    fn kept(model: &LoadedModel) -> &'static str {
        let state = session(model).state.lock().unwrap();
        match state.outputs {
            Outputs::Fresh => "fresh",
            Outputs::Kept(_) => "kept",
            Outputs::Never => "never",
        }
    }

    /// A model changed: its graph, inputs and outputs given by `edit`.
    fn edited(onnx: &[u8], edit: impl FnOnce(&mut GraphProto)) -> Vec<u8> {
        let mut model = ModelProto::decode(onnx).unwrap();
        edit(model.graph.as_mut().unwrap());
        model.encode_to_vec()
    }

    /// Shapes of the same size, which only the shape tells apart: `s` (`z = s * s`) with all three
    /// of its axes free in the model, given to the session directly.
    #[test]
    fn kept_inputs_are_never_reused_at_another_shape_of_the_same_size() {
        let library = library();
        let (inputs, outputs) = batch_axes_specs();
        let onnx = edited(&batch_axes(), |graph| {
            for info in [&mut graph.input[1], &mut graph.output[1]] {
                let Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(tensor)),
                    ..
                }) = &mut info.r#type
                else {
                    unreachable!()
                };
                for (dim, name) in tensor
                    .shape
                    .as_mut()
                    .unwrap()
                    .dim
                    .iter_mut()
                    .zip(["A", "B", "C"])
                {
                    dim.value = Some(DimParam(name.to_owned()));
                }
            }
        });
        let ort = library.load(&onnx, &inputs, &outputs, 1).unwrap();
        let mut request = example_inputs(&inputs, 1, 1);
        for (seed, shape) in [
            [2, 1, 4],
            [4, 1, 2],
            [1, 8, 1],
            [1, 8, 1],
            [2, 2, 2],
            [2, 1, 4],
        ]
        .into_iter()
        .enumerate()
        {
            let values: Vec<f32> = (0..8).map(|i| (seed * 8 + i) as f32).collect();
            request[1].shape = shape.to_vec();
            request[1].data = values
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect();
            let whole: Vec<Input<'_, DynValue>> = ort
                .input_spec_of
                .iter()
                .map(|&spec_ix| Input::Whole(&request[spec_ix]))
                .collect();
            let got = session(&ort)
                .run(&whole, &ort.outputs, &ort.output_spec_of)
                .unwrap();
            let squares: Vec<f32> = values.iter().map(|value| value * value).collect();
            assert_eq!(got[1].shape, shape);
            assert_eq!(
                to_f64s(&got[1]),
                squares.iter().map(|&v| f64::from(v)).collect::<Vec<_>>()
            );
        }
    }

    /// An output that is an input passed through comes back as the input's own value, so its
    /// calls never write into kept values: each answers with its own input.
    #[test]
    fn an_input_passed_through_is_never_answered_from_a_kept_value() {
        let library = library();
        let (inputs, mut outputs) = batch_axes_specs();
        outputs.push(inputs[0].clone());
        let onnx = edited(&batch_axes(), |graph| {
            let x = graph.input[0].clone();
            graph.output.push(x);
        });
        let ort = library.load(&onnx, &inputs, &outputs, 1).unwrap();
        let tract = LoadedModel::load(&onnx, &inputs, &outputs, 1).unwrap();
        for (seed, batch) in [1, 1, 3, 1].into_iter().enumerate() {
            let request = example_inputs(&inputs, batch, seed as u64 + 1);
            let got = ort.run(&request).unwrap();
            assert_close(&got, &tract.run(&request).unwrap());
            assert_eq!(got[2].data, request[0].data);
            assert_eq!(kept(&ort), "never");
        }
    }

    /// An output whose shape follows an input's data (`tiled = Tile(w, r)`, `[3 r]`) does not fit
    /// the values kept at another call's data: ONNX Runtime refuses them, and the call is answered
    /// without them, as is every later one. A request that fails fails alike with them or without,
    /// and leaves them kept.
    #[test]
    fn an_output_whose_shape_follows_the_data_is_answered_without_kept_values() {
        let library = library();
        let (mut inputs, _) = batch_axes_specs();
        inputs.drain(..2);
        inputs.push(TensorSpec {
            name: "r".to_owned(),
            dtype: DType::I64,
            shape: vec![Dim::Fixed(1)],
        });
        let outputs = vec![TensorSpec {
            name: "tiled".to_owned(),
            dtype: DType::F32,
            shape: vec![Dim::Batch],
        }];
        let onnx = edited(&batch_axes(), |graph| {
            let w = graph.input.remove(2);
            let mut r = w.clone();
            r.name = "r".to_owned();
            let mut tiled = w.clone();
            tiled.name = "tiled".to_owned();
            for (info, elem_type, dim) in [
                (&mut r, DataType::Int64, DimValue(1)),
                (&mut tiled, DataType::Float, DimParam("T".to_owned())),
            ] {
                let Some(TypeProto {
                    value: Some(type_proto::Value::TensorType(tensor)),
                    ..
                }) = &mut info.r#type
                else {
                    unreachable!()
                };
                tensor.elem_type = elem_type as i32;
                tensor.shape.as_mut().unwrap().dim[0].value = Some(dim);
            }
            graph.input = vec![w, r];
            graph.output = vec![tiled];
            graph.node = vec![NodeProto {
                name: "tiled".to_owned(),
                op_type: "Tile".to_owned(),
                input: vec!["w".to_owned(), "r".to_owned()],
                output: vec!["tiled".to_owned()],
                ..NodeProto::default()
            }];
        });
        let ort = library.load(&onnx, &inputs, &outputs, 1).unwrap();
        let w = [0.5f32, -1.0, 2.0];
        let call = |repeats: i64| {
            let request = [
                Tensor {
                    name: "w".to_owned(),
                    dtype: DType::F32,
                    shape: vec![3],
                    data: w.iter().flat_map(|value| value.to_le_bytes()).collect(),
                },
                Tensor {
                    name: "r".to_owned(),
                    dtype: DType::I64,
                    shape: vec![1],
                    data: repeats.to_le_bytes().to_vec(),
                },
            ];
            ort.run(&request)
        };
        let tiled = |repeats: usize| {
            let values: Vec<f32> = w.iter().copied().cycle().take(3 * repeats).collect();
            vec![Tensor {
                name: "tiled".to_owned(),
                dtype: DType::F32,
                shape: vec![3 * repeats as u64],
                data: values
                    .iter()
                    .flat_map(|value| value.to_le_bytes())
                    .collect(),
            }]
        };
        assert_eq!(call(1).unwrap(), tiled(1));
        assert_eq!(kept(&ort), "kept");
        assert!(call(-1).is_err());
        assert_eq!(kept(&ort), "kept");
        assert_eq!(call(1).unwrap(), tiled(1));
        assert_eq!(call(2).unwrap(), tiled(2));
        assert_eq!(kept(&ort), "never");
        for repeats in [1, 3, 2] {
            assert_eq!(call(repeats as i64).unwrap(), tiled(repeats));
        }
    }

    /// Callers on several threads share a session and its kept inputs, each getting the answer to
    /// its own request.
    #[test]
    fn concurrent_callers_each_get_their_own_answer() {
        let library = library();
        let (inputs, outputs) = batch_axes_specs();
        let ort = library.load(&batch_axes(), &inputs, &outputs, 1).unwrap();
        let tract = LoadedModel::load(&batch_axes(), &inputs, &outputs, 1).unwrap();
        std::thread::scope(|scope| {
            for thread in 0..4u64 {
                let (ort, tract, inputs) = (&ort, &tract, &inputs);
                scope.spawn(move || {
                    for call in 0..50 {
                        let request =
                            example_inputs(inputs, 1 + (thread + call) % 3, thread * 100 + call);
                        assert_close(&ort.run(&request).unwrap(), &tract.run(&request).unwrap());
                    }
                });
            }
        });
    }
}
