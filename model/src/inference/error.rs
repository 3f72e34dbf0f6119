//! Why a model could not be loaded, described or run: the errors callers act on.

use std::fmt;

use outpost_protocol::trust::DType;

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
    #[error(
        "the model's own declarations do not describe it; give every tensor's spec instead, here \
         as the model declares them (replace each ? with the type or size): {flags}"
    )]
    NeedsSpecs {
        flags: String,
        source: Box<InferenceError>,
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
    #[error("ONNX Runtime: {0}")]
    Runtime(String),
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
