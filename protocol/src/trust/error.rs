//! Why a document, artifact or plan decision was refused: one variant per outcome.

use super::{AgentVersion, Arch, ArtifactRole, Role};
use crate::envelope::DecodeError;
use crate::keys::Sha256;
use crate::name::NameError;

/// Why a document, artifact or plan decision was refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum VerifyError {
    #[error(transparent)]
    Decode(#[from] DecodeError),
    #[error("{role} has {valid} valid signature(s) from distinct trusted keys, {threshold} required ({unknown_keys} by unknown keys, {invalid} invalid, {duplicates} duplicate)")]
    ThresholdNotMet {
        role: Role,
        valid: usize,
        threshold: u32,
        unknown_keys: usize,
        invalid: usize,
        duplicates: usize,
    },
    #[error("{role} expired at {expires}, now is {now}")]
    Expired { role: Role, expires: u64, now: u64 },
    #[error("invalid root: {0}")]
    InvalidRoot(&'static str),
    #[error("root version {found} does not follow trusted version {trusted}")]
    RootVersion { trusted: u64, found: u64 },
    #[error("manifest {name} version {offered} is below version {highest} already seen")]
    ManifestRollback {
        name: String,
        offered: u64,
        highest: u64,
    },
    #[error("plan sequence {offered} is below sequence {highest} already seen")]
    PlanRollback { offered: u64, highest: u64 },
    #[error("model name {name:?} is invalid: {source}")]
    InvalidModelName {
        name: String,
        #[source]
        source: NameError,
    },
    #[error("invalid manifest: {0}")]
    InvalidManifest(String),
    #[error("invalid plan: {0}")]
    InvalidPlan(String),
    #[error("model supports {supported:?}, this device is {device}")]
    IncompatibleArch { device: Arch, supported: Vec<Arch> },
    #[error("model needs agent {required} or newer, this agent is {running}")]
    AgentTooOld {
        required: AgentVersion,
        running: AgentVersion,
    },
    #[error("manifest {name} version {version} is neither the target nor the fallback of plan {sequence}")]
    ManifestNotInPlan {
        name: String,
        version: u64,
        sequence: u64,
    },
    #[error("plan {sequence} has no shadow stage, so it authorises no shadow model")]
    NoShadowStage { sequence: u64 },
    #[error("shadow manifest {name} version {version} is not the target of plan {sequence}")]
    ShadowNotTarget {
        name: String,
        version: u64,
        sequence: u64,
    },
    #[error("capture allowance {field} is {value}, above the protocol's maximum of {max}")]
    CaptureAboveMaximum {
        field: &'static str,
        value: u64,
        max: u64,
    },
    #[error("invalid capture allowance: {0}")]
    InvalidCapture(String),
    #[error("capture allowance is about model {found}, expected one about {expected}")]
    CaptureWrongModel { expected: String, found: String },
    #[error(
        "capture allowance {offered} of model {model} is below allowance {highest} already seen"
    )]
    CaptureRollback {
        model: String,
        offered: u64,
        highest: u64,
    },
    #[error("manifest has no {0} artifact")]
    MissingArtifact(ArtifactRole),
    #[error("{role} artifact is {found} bytes, the manifest signs {expected}")]
    ArtifactLength {
        role: ArtifactRole,
        expected: u64,
        found: u64,
    },
    #[error("{role} artifact hashes to {found}, the manifest signs {expected}")]
    ArtifactHash {
        role: ArtifactRole,
        expected: Sha256,
        found: Sha256,
    },
}
