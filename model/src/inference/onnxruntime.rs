//! ONNX Runtime through the `ort` crate: the library loaded once per process from a path
//! (`load-dynamic`: nothing linked at build time), sessions with the configured execution
//! providers, and protocol tensors in and out.
//!
//! A session's `run` takes `&mut self` in `ort`, so each model's session sits behind a mutex:
//! requests to one model on ONNX Runtime run one at a time, each with the model's intra-op
//! threads (`[inference] threads`), where tract runs concurrent requests side by side.

use std::path::Path;
use std::sync::{Arc, Mutex};

use ort::ep::{self, ExecutionProviderDispatch};
use ort::session::builder::GraphOptimizationLevel;
use ort::session::{Session, SessionInputValue};
use ort::value::{DynValue, Tensor as OrtTensor, ValueType};
use ort::{ep::ArbitrarilyConfigurableExecutionProvider, ep::ExecutionProvider};
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{DType, Dim, TensorSpec};

use super::error::{InferenceError, TensorKind};
use super::load::match_specs;
use super::settings::{Provider, ProviderKind, RuntimeInfo, RuntimeKind};
use super::tensor::Element;
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
            session: Mutex::new(session),
            input_names,
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

/// One model's session.
pub(super) struct OrtSession {
    session: Mutex<Session>,
    /// The session's inputs in the model's order.
    input_names: Vec<String>,
    info: RuntimeInfo,
}

impl OrtSession {
    pub(super) fn info(&self) -> &RuntimeInfo {
        &self.info
    }

    /// A checked protocol tensor as an ONNX Runtime value.
    pub(super) fn value(&self, tensor: &Tensor) -> Result<Arc<DynValue>, InferenceError> {
        fn typed<T>(tensor: &Tensor, shape: Vec<i64>) -> Result<DynValue, InferenceError>
        where
            T: Element + ort::value::PrimitiveTensorElementType + std::fmt::Debug + 'static,
        {
            let data: Vec<T> = tensor.data.chunks_exact(T::SIZE).map(T::from_le).collect();
            OrtTensor::<T>::from_array((shape, data))
                .map(|value| value.into_dyn())
                .map_err(|error| InferenceError::BadData {
                    name: tensor.name.clone(),
                    reason: error.to_string(),
                })
        }
        let shape = tensor
            .shape
            .iter()
            .map(|&dim| i64::try_from(dim))
            .collect::<Result<Vec<i64>, _>>()
            .map_err(|_| InferenceError::BadData {
                name: tensor.name.clone(),
                reason: "an axis is too large".to_owned(),
            })?;
        let value = match tensor.dtype {
            DType::F32 => typed::<f32>(tensor, shape),
            DType::F64 => typed::<f64>(tensor, shape),
            DType::I32 => typed::<i32>(tensor, shape),
            DType::I64 => typed::<i64>(tensor, shape),
            DType::U8 => typed::<u8>(tensor, shape),
        }?;
        Ok(Arc::new(value))
    }

    /// Runs values in the model's input order; outputs in spec order, typed by their specs.
    pub(super) fn run(
        &self,
        ordered: &[Arc<DynValue>],
        specs: &[TensorSpec],
    ) -> Result<Vec<Tensor>, InferenceError> {
        catch_panic("running the model", || {
            let mut session = self
                .session
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            let inputs: Vec<(&str, SessionInputValue)> = self
                .input_names
                .iter()
                .zip(ordered)
                .map(|(name, value)| (name.as_str(), SessionInputValue::from(&**value)))
                .collect();
            let results = session
                .run(inputs)
                .map_err(|error| InferenceError::Run(anyhow::anyhow!("{error}")))?;
            let mut outputs: Vec<Option<Tensor>> = vec![None; specs.len()];
            for (name, value) in results.iter() {
                if let Some(spec_ix) = specs.iter().position(|spec| spec.name == name) {
                    outputs[spec_ix] = Some(from_ort(&specs[spec_ix], &value)?);
                }
            }
            outputs
                .into_iter()
                .zip(specs)
                .map(|(tensor, spec)| {
                    tensor.ok_or_else(|| {
                        InferenceError::Run(anyhow::anyhow!(
                            "ONNX Runtime returned no {:?}",
                            spec.name
                        ))
                    })
                })
                .collect()
        })
    }
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
    match spec.dtype {
        DType::F32 => bytes::<f32>(spec, value),
        DType::F64 => bytes::<f64>(spec, value),
        DType::I32 => bytes::<i32>(spec, value),
        DType::I64 => bytes::<i64>(spec, value),
        DType::U8 => bytes::<u8>(spec, value),
    }
}
