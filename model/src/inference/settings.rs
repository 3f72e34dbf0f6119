//! What configuration says about runtimes, and what reports which runtime serves a model: the
//! plain values `runtime.rs` (choosing) and `onnxruntime.rs` (loading) both read.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

pub use outpost_protocol::device::RuntimeKind;

/// The runtime a device asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum RuntimeChoice {
    /// ONNX Runtime when its library loads and the model passes its validation set under it;
    /// tract otherwise.
    #[default]
    Auto,
    /// tract only; ONNX Runtime's library is never opened.
    Tract,
    /// ONNX Runtime, and tract (with the reason reported) whenever ONNX Runtime cannot serve a
    /// model: the device never goes without a working model because of its runtime.
    OnnxRuntime,
}

impl FromStr for RuntimeChoice {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        match text {
            "auto" => Ok(RuntimeChoice::Auto),
            "tract" => Ok(RuntimeChoice::Tract),
            "onnxruntime" => Ok(RuntimeChoice::OnnxRuntime),
            other => Err(format!(
                "{other:?} is not a runtime: give \"auto\", \"tract\" or \"onnxruntime\""
            )),
        }
    }
}

impl fmt::Display for RuntimeChoice {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            RuntimeChoice::Auto => "auto",
            RuntimeChoice::Tract => "tract",
            RuntimeChoice::OnnxRuntime => "onnxruntime",
        })
    }
}

/// Where ONNX Runtime's library is and which execution providers to register, in order of
/// preference (ONNX Runtime's CPU provider always comes last on its own).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct OnnxRuntimeSettings {
    /// The library to load; `None` looks in [`DEFAULT_LIBRARIES`].
    pub library: Option<PathBuf>,
    pub providers: Vec<Provider>,
}

/// Where `auto` looks for ONNX Runtime when no library is configured.
pub const DEFAULT_LIBRARIES: [&str; 3] = [
    "/usr/local/lib/libonnxruntime.so",
    "/usr/lib/libonnxruntime.so",
    "/opt/onnxruntime/lib/libonnxruntime.so",
];

impl OnnxRuntimeSettings {
    /// The library to load: the configured one, or the first of [`DEFAULT_LIBRARIES`] that
    /// exists. `Err` names where it looked.
    pub fn library_path(&self) -> Result<PathBuf, String> {
        if let Some(library) = &self.library {
            return if library.is_file() {
                Ok(library.clone())
            } else {
                Err(format!("no ONNX Runtime library at {}", library.display()))
            };
        }
        DEFAULT_LIBRARIES
            .iter()
            .map(PathBuf::from)
            .find(|path| path.is_file())
            .ok_or_else(|| {
                format!(
                    "no ONNX Runtime library configured or found at {}",
                    DEFAULT_LIBRARIES.join(", ")
                )
            })
    }
}

/// An execution provider to register with ONNX Runtime, with its options as ONNX Runtime names
/// them (`device_id = "0"` for CUDA, for one).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Provider {
    pub kind: ProviderKind,
    pub options: Vec<(String, String)>,
}

/// The execution providers Outpost can register by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    Cpu,
    Cuda,
    TensorRt,
    OpenVino,
    Xnnpack,
    Qnn,
}

impl ProviderKind {
    pub const ALL: [ProviderKind; 6] = [
        ProviderKind::Cpu,
        ProviderKind::Cuda,
        ProviderKind::TensorRt,
        ProviderKind::OpenVino,
        ProviderKind::Xnnpack,
        ProviderKind::Qnn,
    ];

    /// The name in configuration.
    pub fn name(self) -> &'static str {
        match self {
            ProviderKind::Cpu => "cpu",
            ProviderKind::Cuda => "cuda",
            ProviderKind::TensorRt => "tensorrt",
            ProviderKind::OpenVino => "openvino",
            ProviderKind::Xnnpack => "xnnpack",
            ProviderKind::Qnn => "qnn",
        }
    }

    /// ONNX Runtime's own name, the one reported.
    pub fn onnxruntime_name(self) -> &'static str {
        match self {
            ProviderKind::Cpu => "CPUExecutionProvider",
            ProviderKind::Cuda => "CUDAExecutionProvider",
            ProviderKind::TensorRt => "TensorrtExecutionProvider",
            ProviderKind::OpenVino => "OpenVINOExecutionProvider",
            ProviderKind::Xnnpack => "XnnpackExecutionProvider",
            ProviderKind::Qnn => "QNNExecutionProvider",
        }
    }
}

impl FromStr for ProviderKind {
    type Err = String;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        ProviderKind::ALL
            .into_iter()
            .find(|kind| kind.name() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = ProviderKind::ALL.iter().map(|kind| kind.name()).collect();
                format!(
                    "{text:?} is not an execution provider Outpost knows: give one of {}",
                    names.join(", ")
                )
            })
    }
}

/// What serves a loaded model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    pub kind: RuntimeKind,
    /// The runtime's version: tract's crate version, or the ONNX Runtime library's.
    pub version: String,
    /// ONNX Runtime's execution providers, in order; empty for tract.
    pub providers: Vec<String>,
}

impl RuntimeInfo {
    pub fn tract() -> RuntimeInfo {
        RuntimeInfo {
            kind: RuntimeKind::Tract,
            version: env!("OUTPOST_TRACT_VERSION").to_owned(),
            providers: Vec::new(),
        }
    }
}

impl fmt::Display for RuntimeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.kind, self.version)?;
        if !self.providers.is_empty() {
            write!(f, " [{}]", self.providers.join(", "))?;
        }
        Ok(())
    }
}
