//! Which runtime runs a model: tract, built into every binary, or ONNX Runtime, loaded from a
//! `libonnxruntime` the device already has (the crate's `onnxruntime` feature).
//!
//! [`Runtimes`] is the process's one choice (`[inference] runtime` on the agent). It picks the
//! runtime per model, when the model is loaded for serving: ONNX Runtime is used only when its
//! library loaded, its execution providers registered, the model loaded under it and passed its
//! validation set there. Anything else falls back to tract, and the reason is kept beside the model
//! ([`Selected::fallback`]) for the device to report. Whatever serves, requests go through the same
//! input checks and the same row-by-row batches (`run.rs`), so the local API, drift extraction and
//! shadow comparisons see the same tensors from either runtime.

use std::time::Instant;

use outpost_protocol::device::ValidationSet;
use outpost_protocol::trust::TensorSpec;

use super::error::InferenceError;
use super::settings::{OnnxRuntimeSettings, RuntimeChoice, RuntimeInfo};
use super::validate::{validate, ValidationError};
use super::LoadedModel;

/// Where ONNX Runtime stands in this process.
#[derive(Debug)]
enum OnnxRuntime {
    /// `runtime = "tract"`: never looked for.
    NotWanted,
    /// Looked for and not usable. `quiet`: `auto` found no library at all, which is not worth
    /// reporting beside every model (tract is what such a device expects).
    Unavailable { reason: String, quiet: bool },
    #[cfg(feature = "onnxruntime")]
    Ready(super::onnxruntime::Library),
}

/// The runtimes this process uses, chosen once from configuration (see the module docs).
#[derive(Debug)]
pub struct Runtimes {
    choice: RuntimeChoice,
    onnxruntime: OnnxRuntime,
}

/// A model loaded for serving, and why a runtime preferred to the one serving it was passed over.
#[derive(Debug)]
pub struct Selected {
    pub model: LoadedModel,
    pub fallback: Option<String>,
}

/// Why no runtime could serve a model: tract's own refusal (every fallback ends on tract).
#[derive(Debug, thiserror::Error)]
pub enum SelectError {
    #[error(transparent)]
    Load(InferenceError),
    #[error(transparent)]
    Validation(ValidationError),
}

impl Runtimes {
    /// tract alone, as the hub's publish gate and tests use.
    pub fn tract() -> Runtimes {
        Runtimes {
            choice: RuntimeChoice::Tract,
            onnxruntime: OnnxRuntime::NotWanted,
        }
    }

    /// Sets up `choice`: for `auto` and `onnxruntime`, loads ONNX Runtime's library into the
    /// process (once per process, whatever is asked later) and keeps why it is unusable if it
    /// is. A library that crashes the process on load cannot be caught here: the agent tries it
    /// in a child process first ([`Runtimes::unavailable`]).
    pub fn new(choice: RuntimeChoice, settings: &OnnxRuntimeSettings) -> Runtimes {
        let onnxruntime = match choice {
            RuntimeChoice::Tract => OnnxRuntime::NotWanted,
            RuntimeChoice::Auto | RuntimeChoice::OnnxRuntime => match settings.library_path() {
                Err(reason) => OnnxRuntime::Unavailable {
                    reason,
                    quiet: choice == RuntimeChoice::Auto && settings.library.is_none(),
                },
                Ok(path) => open_onnxruntime(&path, settings),
            },
        };
        Runtimes {
            choice,
            onnxruntime,
        }
    }

    /// `choice` with ONNX Runtime known to be unusable, for `reason`: every model runs on tract
    /// and reports why.
    pub fn unavailable(choice: RuntimeChoice, reason: String) -> Runtimes {
        Runtimes {
            choice,
            onnxruntime: match choice {
                RuntimeChoice::Tract => OnnxRuntime::NotWanted,
                _ => OnnxRuntime::Unavailable {
                    reason,
                    quiet: false,
                },
            },
        }
    }

    pub fn choice(&self) -> RuntimeChoice {
        self.choice
    }

    /// Whether ONNX Runtime is loaded and would be tried first.
    pub fn onnxruntime_ready(&self) -> bool {
        match &self.onnxruntime {
            #[cfg(feature = "onnxruntime")]
            OnnxRuntime::Ready(_) => true,
            _ => false,
        }
    }

    /// Why ONNX Runtime is not used, when it was asked for and is not loaded.
    pub fn onnxruntime_problem(&self) -> Option<&str> {
        match &self.onnxruntime {
            OnnxRuntime::Unavailable { reason, .. } => Some(reason),
            _ => None,
        }
    }

    /// Proves ONNX Runtime serves: a session of a small built-in model, with the configured
    /// execution providers, that answers like tract does. What the agent's child process runs
    /// before the agent loads the library itself.
    pub fn probe(&self) -> Result<RuntimeInfo, String> {
        match &self.onnxruntime {
            OnnxRuntime::NotWanted => Err("ONNX Runtime is not asked for".to_owned()),
            OnnxRuntime::Unavailable { reason, .. } => Err(reason.clone()),
            #[cfg(feature = "onnxruntime")]
            OnnxRuntime::Ready(library) => library.probe(),
        }
    }

    /// Loads a model for serving (see the module docs): under ONNX Runtime first when it is
    /// ready, and on tract when that fails or ONNX Runtime is not used. With a validation set,
    /// the model is checked against it under the runtime that will serve it, so what is returned
    /// has passed it there; an error is tract's own (every fallback ends on tract).
    pub fn load(
        &self,
        onnx: &[u8],
        inputs: &[TensorSpec],
        outputs: &[TensorSpec],
        threads: usize,
        validation: Option<&ValidationSet>,
        deadline: Instant,
    ) -> Result<Selected, SelectError> {
        let fallback = match &self.onnxruntime {
            OnnxRuntime::NotWanted | OnnxRuntime::Unavailable { quiet: true, .. } => None,
            OnnxRuntime::Unavailable { reason, .. } => Some(format!("onnxruntime: {reason}")),
            #[cfg(feature = "onnxruntime")]
            OnnxRuntime::Ready(library) => {
                let attempt = library
                    .load(onnx, inputs, outputs, threads)
                    .map_err(|error| format!("{:#}", anyhow::Error::new(error)))
                    .and_then(|model| match validation {
                        Some(set) => {
                            validate(&model, set, deadline)
                                .map(|_| model)
                                .map_err(|error| {
                                    format!(
                                        "the validation set failed under it: {:#}",
                                        anyhow::Error::new(error)
                                    )
                                })
                        }
                        None => Ok(model),
                    });
                match attempt {
                    Ok(model) => {
                        return Ok(Selected {
                            model,
                            fallback: None,
                        })
                    }
                    Err(reason) => Some(format!("onnxruntime: {reason}")),
                }
            }
        };
        let model = LoadedModel::load(onnx, inputs, outputs, threads).map_err(SelectError::Load)?;
        if let Some(set) = validation {
            validate(&model, set, deadline).map_err(SelectError::Validation)?;
        }
        Ok(Selected { model, fallback })
    }
}

fn open_onnxruntime(path: &std::path::Path, settings: &OnnxRuntimeSettings) -> OnnxRuntime {
    #[cfg(feature = "onnxruntime")]
    {
        match super::onnxruntime::Library::open(path, &settings.providers) {
            Ok(library) => OnnxRuntime::Ready(library),
            Err(reason) => OnnxRuntime::Unavailable {
                reason,
                quiet: false,
            },
        }
    }
    #[cfg(not(feature = "onnxruntime"))]
    {
        let _ = settings;
        OnnxRuntime::Unavailable {
            reason: format!(
                "this binary was built without ONNX Runtime support, so {} is not loaded",
                path.display()
            ),
            quiet: false,
        }
    }
}
