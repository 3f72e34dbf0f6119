//! The signed documents as they travel: roots, manifests and plans, the [`Signed`] wrapper that
//! carries each, and the small wire types they are made of.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use super::message;
use crate::envelope::{self, DecodeError, EncodeError, Message, MessageKind};
use crate::keys::{KeyId, PublicKey, SecretKey, Sha256, SignatureBytes};
use crate::name::Label;

/// Prefix of every signed message: keeps Outpost signatures useless in any other protocol.
pub const SIGNING_CONTEXT: &[u8] = b"outpost signed document v1\0";
/// Most keys a root may list.
pub const MAX_ROOT_KEYS: usize = 64;

/// Which kind of signed document an error is about.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Root,
    Manifest,
    Plan,
    /// A capture allowance: signed by the keys, and with the threshold, of plans.
    Capture,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Manifest => "manifest",
            Role::Plan => "plan",
            Role::Capture => "capture allowance",
        })
    }
}

/// CPU architectures a model may declare itself compatible with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Arch {
    X86_64,
    Aarch64,
    Armv7,
}

impl Arch {
    /// The architecture this code was compiled for, if Outpost supports it.
    pub fn current() -> Option<Arch> {
        if cfg!(target_arch = "x86_64") {
            Some(Arch::X86_64)
        } else if cfg!(target_arch = "aarch64") {
            Some(Arch::Aarch64)
        } else if cfg!(target_arch = "arm") {
            Some(Arch::Armv7)
        } else {
            None
        }
    }

    pub fn as_str(&self) -> &'static str {
        match self {
            Arch::X86_64 => "x86_64",
            Arch::Aarch64 => "aarch64",
            Arch::Armv7 => "armv7",
        }
    }

    pub fn parse(text: &str) -> Option<Arch> {
        match text {
            "x86_64" | "amd64" => Some(Arch::X86_64),
            "aarch64" | "arm64" => Some(Arch::Aarch64),
            "armv7" | "armhf" => Some(Arch::Armv7),
            _ => None,
        }
    }
}

impl std::fmt::Display for Arch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A semantic version of the agent, compared field by field.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct AgentVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl AgentVersion {
    /// Parses `MAJOR.MINOR.PATCH`.
    pub fn parse(text: &str) -> Option<AgentVersion> {
        let mut parts = text.trim().split('.').map(|part| part.parse::<u32>().ok());
        let version = AgentVersion {
            major: parts.next()??,
            minor: parts.next()??,
            patch: parts.next()??,
        };
        parts.next().is_none().then_some(version)
    }
}

impl std::fmt::Display for AgentVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

/// One signature in a signed document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeySignature {
    pub key_id: KeyId,
    pub signature: SignatureBytes,
}

/// A signed document: the exact payload frame that was signed, and its signatures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(bound = "")]
pub struct Signed<B> {
    /// A complete frame of `B`; signatures cover these bytes, prefixed by [`SIGNING_CONTEXT`].
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub signatures: Vec<KeySignature>,
    #[serde(skip)]
    body: PhantomData<fn() -> B>,
}

/// A body that is carried inside a [`Signed`] document.
pub trait SignedBody: Message {
    const ROLE: Role;
}

impl<B: SignedBody> Signed<B> {
    /// An unsigned document around `body`; add signatures with [`Signed::sign`].
    pub fn new(body: &B) -> Result<Signed<B>, EncodeError> {
        Ok(Signed {
            payload: envelope::encode(body)?,
            signatures: Vec::new(),
            body: PhantomData,
        })
    }

    /// Adds `key`'s signature, replacing an earlier one by the same key.
    pub fn sign(&mut self, key: &SecretKey) {
        let key_id = key.public().key_id();
        let signature = key.sign(&signing_message(&self.payload));
        self.signatures.retain(|entry| entry.key_id != key_id);
        self.signatures.push(KeySignature { key_id, signature });
    }

    /// Decodes the payload without checking any signature. For tooling that inspects or co-signs a
    /// document; never for deciding what to trust.
    pub fn decode_unverified(&self) -> Result<B, DecodeError> {
        envelope::decode(&self.payload)
    }
}

pub(super) fn signing_message(payload: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, payload].concat()
}

message!(Signed<RootBody>, SignedRoot, "signed root", 64 * 1024);
message!(
    Signed<ManifestBody>,
    SignedManifest,
    "signed manifest",
    64 * 1024
);
message!(Signed<PlanBody>, SignedPlan, "signed plan", 32 * 1024);
message!(RootBody, RootBody, "root", 48 * 1024);
message!(ManifestBody, ManifestBody, "manifest", 48 * 1024);
message!(PlanBody, PlanBody, "plan", 16 * 1024);

impl SignedBody for RootBody {
    const ROLE: Role = Role::Root;
}
impl SignedBody for ManifestBody {
    const ROLE: Role = Role::Manifest;
}
impl SignedBody for PlanBody {
    const ROLE: Role = Role::Plan;
}

/// The trust root: which release keys sign, and how many must agree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootBody {
    /// Starts at 1; each rotation is exactly one higher.
    pub version: u64,
    pub created: u64,
    pub expires: u64,
    pub threshold: u32,
    pub keys: Vec<PublicKey>,
}

/// What an artifact is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum ArtifactRole {
    /// The ONNX model file.
    Model,
    /// The drift reference profile.
    Profile,
    /// Golden inputs, expected outputs and tolerance, run before a model is committed.
    Validation,
}

impl ArtifactRole {
    pub fn as_str(&self) -> &'static str {
        match self {
            ArtifactRole::Model => "model",
            ArtifactRole::Profile => "profile",
            ArtifactRole::Validation => "validation",
        }
    }
}

impl std::fmt::Display for ArtifactRole {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One file of a model version, pinned by hash and length.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    pub role: ArtifactRole,
    pub sha256: Sha256,
    pub length: u64,
}

/// Element type of a tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum DType {
    F32,
    F64,
    I32,
    I64,
    U8,
}

impl DType {
    pub fn size(&self) -> usize {
        match self {
            DType::U8 => 1,
            DType::F32 | DType::I32 => 4,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// The Open Inference Protocol's name for this type.
    pub fn as_str(&self) -> &'static str {
        match self {
            DType::F32 => "FP32",
            DType::F64 => "FP64",
            DType::I32 => "INT32",
            DType::I64 => "INT64",
            DType::U8 => "UINT8",
        }
    }

    pub fn parse(text: &str) -> Option<DType> {
        match text.to_ascii_uppercase().as_str() {
            "FP32" | "F32" => Some(DType::F32),
            "FP64" | "F64" => Some(DType::F64),
            "INT32" | "I32" => Some(DType::I32),
            "INT64" | "I64" => Some(DType::I64),
            "UINT8" | "U8" => Some(DType::U8),
            _ => None,
        }
    }
}

/// One axis of a tensor shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Dim {
    Fixed(u64),
    /// The dynamic batch axis: any size at request time.
    Batch,
}

/// Name, element type and shape of a model input or output.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<Dim>,
}

/// A signed model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestBody {
    /// Checked with [`ModelName::new`](crate::ModelName::new) during verification.
    pub name: String,
    /// Only ever increases for a given name.
    pub version: u64,
    pub created: u64,
    pub expires: u64,
    pub artifacts: Vec<Artifact>,
    pub inputs: Vec<TensorSpec>,
    pub outputs: Vec<TensorSpec>,
    pub archs: Vec<Arch>,
    pub min_agent_version: AgentVersion,
}

/// Points at one signed manifest by its exact bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRef {
    pub name: String,
    pub version: u64,
    /// SHA-256 of the complete signed-manifest frame.
    pub manifest_sha256: Sha256,
}

/// What a breached gate does to a rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum BreachAction {
    Pause,
    Rollback,
}

/// The health limits the operator signed with the plan. The hub evaluates them; signing them stops
/// a compromised hub from quietly loosening them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatePolicy {
    /// How long a stage must hold its gates before it may advance.
    pub bake_secs: u64,
    /// A device silent for longer counts as a failure.
    pub device_timeout_secs: u64,
    /// Percent of a stage's devices that may fail activation.
    pub max_failure_pct: f64,
    /// Fraction of inferences that may error.
    pub max_error_rate: f64,
    /// Allowed p95 latency increase on the target over devices on the fallback, in percent.
    pub max_p95_regression_pct: f64,
    /// Drift limit: largest PSI a feature on the target may show, when set.
    pub max_drift_psi: Option<f64>,
    pub on_breach: BreachAction,
    /// Advance to the next stage by itself once a stage has baked.
    pub auto_advance: bool,
}

/// A signed rollout plan.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PlanBody {
    /// Only ever increases; also the plan's id.
    pub sequence: u64,
    pub created: u64,
    pub expires: u64,
    pub target: ManifestRef,
    /// Where devices go when the rollout is rolled back; none for a first release.
    pub fallback: Option<ManifestRef>,
    /// Cumulative percentages of the selected fleet, strictly increasing, each in 1..=100.
    pub stages: Vec<u8>,
    /// Devices that carry every one of these labels take part; empty selects all.
    pub selector: Vec<Label>,
    pub gates: GatePolicy,
    /// An optional first stage in which devices run the target beside the fallback, without
    /// serving it, and report how often the two agree. Signed, so that a hub can neither invent a
    /// shadow stage nor loosen its gate.
    pub shadow: Option<ShadowStage>,
}

/// The shadow stage of a plan and its signed gate.
///
/// Devices in the stage's bucket keep serving the fallback and run the target on copies of their
/// live inputs, off the request path, comparing both answers. The rollout leaves the stage only
/// once at least `min_comparisons` comparisons were reported and both limits hold.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowStage {
    /// Percent of the selected fleet that shadows, in 1..=100.
    pub percent: u8,
    /// Fewest comparisons (output rows), over every shadowing device, before the gate is judged
    /// and the stage may be left; at least 1.
    pub min_comparisons: u64,
    /// Smallest share, in 0..=1, of comparisons in which the target's top-1 (the argmax of the
    /// first output) is the fallback's. A comparison the target failed on counts against it.
    pub min_top1_agreement: f64,
    /// Largest mean absolute difference between the target's and the fallback's output values.
    pub max_mean_abs_diff: f64,
}

/// Which manifest of a plan a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slot {
    Target,
    Fallback,
}
