//! The chain of trust: what a device may run, and who may say so.
//!
//! Three kinds of signed document, each a [`Signed`] wrapper around a framed body:
//! - a **root** ([`RootBody`]) lists the release keys and the signature threshold;
//! - a **manifest** ([`ManifestBody`]) names one model version and the hashes of its artifacts;
//! - a **plan** ([`PlanBody`]) says which manifest a fleet rolls out and which it falls back to.
//!
//! Verification follows TUF: signatures are checked over the exact payload bytes before the payload
//! is decoded (a rotated root is first checked against the *old* keys), distinct key ids are counted
//! against the threshold, then expiry is checked against a [`TimeFloor`], then rollback. Only the
//! functions here build the `Verified…` types, so holding one is proof that all of this happened.
//!
//! The hub is an untrusted mirror. It may choose *when* a device moves between the target and the
//! fallback of a valid plan, and nothing else: it cannot forge a document, replay an older plan,
//! serve a lower manifest version than the device has seen (except a plan's signed fallback), or
//! pass off one manifest's artifact as another's.

use std::marker::PhantomData;

use serde::{Deserialize, Serialize};

use crate::envelope::{self, DecodeError, EncodeError, Message, MessageKind};
use crate::keys::{sha256, KeyId, PublicKey, SecretKey, Sha256, SignatureBytes};
use crate::name::{Label, ModelName, NameError};

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
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Root => "root",
            Role::Manifest => "manifest",
            Role::Plan => "plan",
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

/// The time against which expiry is judged: the latest of the device's wall clock, the newest
/// `created` time of any document it has accepted, and the hub's reported time. A device whose
/// clock was reset to 1970 still refuses documents that expired before ones it has already seen.
/// The agent keeps the newest signed time for good, but the hub's time only from the hub's latest
/// answer: signed times come from the release keys, the hub's from an untrusted clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct TimeFloor {
    pub wall_clock: u64,
    pub newest_signed: u64,
    pub hub_time: u64,
}

impl TimeFloor {
    /// Unix seconds judged to be "now".
    pub fn now(&self) -> u64 {
        self.wall_clock.max(self.newest_signed).max(self.hub_time)
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

fn signing_message(payload: &[u8]) -> Vec<u8> {
    [SIGNING_CONTEXT, payload].concat()
}

macro_rules! message {
    ($ty:ty, $kind:ident, $name:literal, $max:expr) => {
        impl Message for $ty {
            const KIND: MessageKind = MessageKind::$kind;
            const NAME: &'static str = $name;
            const MAX_FRAME: usize = $max;
        }
    };
}
pub(crate) use message;

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
    /// Checked with [`ModelName::new`] during verification.
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

/// Checks `signatures` over `payload` against `keys`, counting each trusted key once.
fn check_threshold(
    role: Role,
    payload: &[u8],
    signatures: &[KeySignature],
    keys: &[(KeyId, PublicKey)],
    threshold: u32,
) -> Result<(), VerifyError> {
    let message = signing_message(payload);
    let mut valid: Vec<KeyId> = Vec::new();
    // Each trusted key is checked at most once, so a document stuffed with repeated bad signatures
    // costs no more ed25519 work than one listing every key once.
    let mut attempted: Vec<KeyId> = Vec::new();
    let (mut unknown_keys, mut invalid, mut duplicates) = (0, 0, 0);
    for entry in signatures {
        if attempted.contains(&entry.key_id) {
            duplicates += 1;
            continue;
        }
        let Some((_, key)) = keys.iter().find(|(id, _)| *id == entry.key_id) else {
            unknown_keys += 1;
            continue;
        };
        attempted.push(entry.key_id);
        if key.verify(&message, &entry.signature) {
            valid.push(entry.key_id);
        } else {
            invalid += 1;
        }
    }
    // A threshold of zero never reaches here (roots are validated), but never let it pass vacuously.
    if valid.len() < threshold.max(1) as usize {
        return Err(VerifyError::ThresholdNotMet {
            role,
            valid: valid.len(),
            threshold,
            unknown_keys,
            invalid,
            duplicates,
        });
    }
    Ok(())
}

fn check_expiry(role: Role, expires: u64, floor: &TimeFloor) -> Result<(), VerifyError> {
    let now = floor.now();
    if expires <= now {
        return Err(VerifyError::Expired { role, expires, now });
    }
    Ok(())
}

fn validate_root(body: &RootBody) -> Result<Vec<(KeyId, PublicKey)>, VerifyError> {
    if body.version == 0 {
        return Err(VerifyError::InvalidRoot("version must start at 1"));
    }
    if body.keys.is_empty() || body.keys.len() > MAX_ROOT_KEYS {
        return Err(VerifyError::InvalidRoot("must list between 1 and 64 keys"));
    }
    if body.threshold == 0 || body.threshold as usize > body.keys.len() {
        return Err(VerifyError::InvalidRoot(
            "threshold must be at least 1 and at most the number of keys",
        ));
    }
    if body.expires <= body.created {
        return Err(VerifyError::InvalidRoot("expires before it is created"));
    }
    let mut keys: Vec<(KeyId, PublicKey)> = Vec::with_capacity(body.keys.len());
    for key in &body.keys {
        if !key.is_valid() {
            return Err(VerifyError::InvalidRoot(
                "lists a key that is not a valid ed25519 point",
            ));
        }
        let id = key.key_id();
        if keys.iter().any(|(known, _)| *known == id) {
            return Err(VerifyError::InvalidRoot("lists the same key twice"));
        }
        keys.push((id, *key));
    }
    Ok(keys)
}

/// A root whose signatures have been checked: the keys everything else is verified against.
#[derive(Debug, Clone)]
pub struct VerifiedRoot {
    body: RootBody,
    keys: Vec<(KeyId, PublicKey)>,
    signed_bytes: Vec<u8>,
}

impl VerifiedRoot {
    /// Accepts a root the device was given out of band (shipped or installed) and checks it is
    /// self-consistent, signed by a threshold of its own keys, and not expired.
    pub fn verify_initial(bytes: &[u8], floor: &TimeFloor) -> Result<VerifiedRoot, VerifyError> {
        let root = VerifiedRoot::load_trusted(bytes)?;
        root.check_fresh(floor)?;
        Ok(root)
    }

    /// Re-loads a root this device accepted earlier, as the starting point of an update. Its
    /// signatures are re-checked, its expiry is not: an expired trusted root may still be rotated
    /// away from, as in TUF. Anything verified *with* it checks its freshness.
    pub fn load_trusted(bytes: &[u8]) -> Result<VerifiedRoot, VerifyError> {
        let signed: Signed<RootBody> = envelope::decode(bytes)?;
        // The first root has no predecessor to vouch for its keys; it is trusted because of how it
        // arrived, so its payload is decoded to learn the keys and then its self-signatures checked.
        let body: RootBody = envelope::decode(&signed.payload)?;
        let keys = validate_root(&body)?;
        check_threshold(
            Role::Root,
            &signed.payload,
            &signed.signatures,
            &keys,
            body.threshold,
        )?;
        Ok(VerifiedRoot {
            body,
            keys,
            signed_bytes: bytes.to_vec(),
        })
    }

    /// Verifies the next root in a rotation: signed by a threshold of this root's keys (checked
    /// before the new payload is decoded) and by a threshold of its own keys, with a version exactly
    /// one higher. Expiry of an intermediate root is not checked; [`VerifiedRoot::update`] checks
    /// the final one.
    pub fn verify_rotation(&self, bytes: &[u8]) -> Result<VerifiedRoot, VerifyError> {
        let signed: Signed<RootBody> = envelope::decode(bytes)?;
        check_threshold(
            Role::Root,
            &signed.payload,
            &signed.signatures,
            &self.keys,
            self.body.threshold,
        )?;
        let body: RootBody = envelope::decode(&signed.payload)?;
        // Checked: a trusted root at u64::MAX has no successor, and must not overflow into one.
        if self.body.version.checked_add(1) != Some(body.version) {
            return Err(VerifyError::RootVersion {
                trusted: self.body.version,
                found: body.version,
            });
        }
        let keys = validate_root(&body)?;
        check_threshold(
            Role::Root,
            &signed.payload,
            &signed.signatures,
            &keys,
            body.threshold,
        )?;
        Ok(VerifiedRoot {
            body,
            keys,
            signed_bytes: bytes.to_vec(),
        })
    }

    /// Walks a chain of newer roots, in version order, and checks the last one is not expired.
    /// Roots at or below the trusted version are skipped, so a hub may send its whole history.
    pub fn update(
        &self,
        chain: &[Vec<u8>],
        floor: &TimeFloor,
    ) -> Result<VerifiedRoot, VerifyError> {
        let mut current = self.clone();
        for bytes in chain {
            let signed: Signed<RootBody> = envelope::decode(bytes)?;
            let version = signed
                .decode_unverified()
                .map(|body| body.version)
                .unwrap_or(u64::MAX);
            if version <= current.body.version {
                continue;
            }
            current = current.verify_rotation(bytes)?;
        }
        current.check_fresh(floor)?;
        Ok(current)
    }

    pub fn check_fresh(&self, floor: &TimeFloor) -> Result<(), VerifyError> {
        check_expiry(Role::Root, self.body.expires, floor)
    }

    /// Verifies a signed manifest without a plan: signatures, structure, expiry, and that its
    /// version is not below `highest_seen` for its name.
    pub fn verify_manifest(
        &self,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedManifest, VerifyError> {
        let signed: Signed<ManifestBody> = envelope::decode(bytes)?;
        self.check_signed(Role::Manifest, &signed.payload, &signed.signatures)?;
        let body: ManifestBody = envelope::decode(&signed.payload)?;
        let name = validate_manifest(&body)?;
        self.check_fresh(floor)?;
        check_expiry(Role::Manifest, body.expires, floor)?;
        if let Some(highest) = highest_seen.filter(|highest| body.version < *highest) {
            return Err(VerifyError::ManifestRollback {
                name: body.name,
                offered: body.version,
                highest,
            });
        }
        Ok(VerifiedManifest {
            digest: sha256(bytes),
            body,
            name,
            signed_bytes: bytes.to_vec(),
        })
    }

    /// Verifies a signed plan: signatures, structure, expiry, and that its sequence is not below
    /// `highest_seen`.
    pub fn verify_plan(
        &self,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedPlan, VerifyError> {
        let signed: Signed<PlanBody> = envelope::decode(bytes)?;
        self.check_signed(Role::Plan, &signed.payload, &signed.signatures)?;
        let body: PlanBody = envelope::decode(&signed.payload)?;
        validate_plan(&body)?;
        self.check_fresh(floor)?;
        check_expiry(Role::Plan, body.expires, floor)?;
        if let Some(highest) = highest_seen.filter(|highest| body.sequence < *highest) {
            return Err(VerifyError::PlanRollback {
                offered: body.sequence,
                highest,
            });
        }
        Ok(VerifiedPlan {
            digest: sha256(bytes),
            body,
            signed_bytes: bytes.to_vec(),
        })
    }

    fn check_signed(
        &self,
        role: Role,
        payload: &[u8],
        signatures: &[KeySignature],
    ) -> Result<(), VerifyError> {
        check_threshold(role, payload, signatures, &self.keys, self.body.threshold)
    }

    pub fn body(&self) -> &RootBody {
        &self.body
    }

    pub fn version(&self) -> u64 {
        self.body.version
    }

    /// The exact bytes that were verified, for storing and serving.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }
}

fn validate_manifest(body: &ManifestBody) -> Result<ModelName, VerifyError> {
    let name = ModelName::new(&body.name).map_err(|source| VerifyError::InvalidModelName {
        name: body.name.clone(),
        source,
    })?;
    let invalid = |reason: &str| Err(VerifyError::InvalidManifest(reason.to_owned()));
    let count = |role| body.artifacts.iter().filter(|a| a.role == role).count();
    if count(ArtifactRole::Model) != 1 {
        return invalid("must have exactly one model artifact");
    }
    if count(ArtifactRole::Profile) > 1 || count(ArtifactRole::Validation) > 1 {
        return invalid("lists an artifact role twice");
    }
    if body.archs.is_empty() {
        return invalid("lists no compatible architecture");
    }
    if body.inputs.is_empty() || body.outputs.is_empty() {
        return invalid("must declare inputs and outputs");
    }
    if body.expires <= body.created {
        return invalid("expires before it is created");
    }
    Ok(name)
}

fn validate_plan(body: &PlanBody) -> Result<(), VerifyError> {
    let invalid = |reason: String| Err(VerifyError::InvalidPlan(reason));
    if body.stages.is_empty() {
        return invalid("has no stages".into());
    }
    if body.stages.iter().any(|pct| !(1..=100).contains(pct)) {
        return invalid("stage percentages must be within 1..=100".into());
    }
    if body.stages.windows(2).any(|pair| pair[0] >= pair[1]) {
        return invalid("stage percentages must strictly increase".into());
    }
    for reference in std::iter::once(&body.target).chain(&body.fallback) {
        if let Err(source) = ModelName::new(&reference.name) {
            return Err(VerifyError::InvalidModelName {
                name: reference.name.clone(),
                source,
            });
        }
    }
    if let Some(fallback) = &body.fallback {
        if fallback.manifest_sha256 == body.target.manifest_sha256 {
            return invalid("fallback is the target".into());
        }
    }
    for label in &body.selector {
        if let Err(error) = label.validate() {
            return invalid(format!("selector label {label}: {error}"));
        }
    }
    let gates = &body.gates;
    let limits = [
        ("max failure percent", gates.max_failure_pct),
        ("max error rate", gates.max_error_rate),
        ("max p95 regression percent", gates.max_p95_regression_pct),
        ("max drift PSI", gates.max_drift_psi.unwrap_or(0.0)),
    ];
    for (what, value) in limits {
        if !value.is_finite() || value < 0.0 {
            return invalid(format!("{what} must be a finite non-negative number"));
        }
    }
    if let Some(shadow) = &body.shadow {
        validate_shadow(shadow, body.fallback.is_some())?;
    }
    if body.expires <= body.created {
        return invalid("expires before it is created".into());
    }
    Ok(())
}

fn validate_shadow(shadow: &ShadowStage, has_fallback: bool) -> Result<(), VerifyError> {
    let invalid = |reason: &str| Err(VerifyError::InvalidPlan(format!("shadow stage {reason}")));
    if !has_fallback {
        // The target is compared with what devices serve meanwhile: the plan's fallback.
        return invalid("needs a fallback to compare the target with");
    }
    if !(1..=100).contains(&shadow.percent) {
        return invalid("percentage must be within 1..=100");
    }
    if shadow.min_comparisons == 0 {
        return invalid("needs at least 1 comparison");
    }
    let agreement = shadow.min_top1_agreement;
    if !agreement.is_finite() || !(0.0..=1.0).contains(&agreement) {
        return invalid("minimum top-1 agreement must be a number within 0..=1");
    }
    let diff = shadow.max_mean_abs_diff;
    if !diff.is_finite() || diff < 0.0 {
        return invalid("maximum mean absolute difference must be a finite non-negative number");
    }
    Ok(())
}

/// A manifest whose signatures, structure and freshness have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    body: ManifestBody,
    name: ModelName,
    digest: Sha256,
    signed_bytes: Vec<u8>,
}

impl VerifiedManifest {
    pub fn body(&self) -> &ManifestBody {
        &self.body
    }

    pub fn name(&self) -> &ModelName {
        &self.name
    }

    pub fn version(&self) -> u64 {
        self.body.version
    }

    /// SHA-256 of the signed manifest frame: how plans refer to it.
    pub fn digest(&self) -> Sha256 {
        self.digest
    }

    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }

    pub fn reference(&self) -> ManifestRef {
        ManifestRef {
            name: self.body.name.clone(),
            version: self.body.version,
            manifest_sha256: self.digest,
        }
    }

    pub fn artifact(&self, role: ArtifactRole) -> Option<&Artifact> {
        self.body.artifacts.iter().find(|a| a.role == role)
    }

    /// Refuses a model this device cannot run.
    pub fn check_compatible(&self, arch: Arch, agent: AgentVersion) -> Result<(), VerifyError> {
        if !self.body.archs.contains(&arch) {
            return Err(VerifyError::IncompatibleArch {
                device: arch,
                supported: self.body.archs.clone(),
            });
        }
        if agent < self.body.min_agent_version {
            return Err(VerifyError::AgentTooOld {
                required: self.body.min_agent_version,
                running: agent,
            });
        }
        Ok(())
    }

    /// Checks a downloaded artifact's length and hash against what this manifest signs.
    pub fn check_artifact(
        &self,
        role: ArtifactRole,
        length: u64,
        digest: Sha256,
    ) -> Result<(), VerifyError> {
        let artifact = self
            .artifact(role)
            .ok_or(VerifyError::MissingArtifact(role))?;
        if artifact.length != length {
            return Err(VerifyError::ArtifactLength {
                role,
                expected: artifact.length,
                found: length,
            });
        }
        if artifact.sha256 != digest {
            return Err(VerifyError::ArtifactHash {
                role,
                expected: artifact.sha256,
                found: digest,
            });
        }
        Ok(())
    }

    /// [`VerifiedManifest::check_artifact`] for bytes held in memory.
    pub fn verify_artifact(&self, role: ArtifactRole, bytes: &[u8]) -> Result<(), VerifyError> {
        self.check_artifact(role, bytes.len() as u64, sha256(bytes))
    }
}

/// The name and version a manifest claims, decoded only to name a stray manifest in an error:
/// nothing here is trusted.
fn claimed_identity(bytes: &[u8]) -> (String, u64) {
    envelope::decode::<Signed<ManifestBody>>(bytes)
        .ok()
        .and_then(|signed| signed.decode_unverified().ok())
        .map(|body| (body.name, body.version))
        .unwrap_or_else(|| ("<undecodable>".to_owned(), 0))
}

/// Which manifest of a plan a device runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Slot {
    Target,
    Fallback,
}

/// A plan whose signatures, structure, freshness and sequence have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedPlan {
    body: PlanBody,
    digest: Sha256,
    signed_bytes: Vec<u8>,
}

impl VerifiedPlan {
    pub fn body(&self) -> &PlanBody {
        &self.body
    }

    pub fn sequence(&self) -> u64 {
        self.body.sequence
    }

    pub fn digest(&self) -> Sha256 {
        self.digest
    }

    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }

    /// Verifies a manifest the hub says this plan lets the device run. It must be exactly the
    /// plan's target or fallback (by the hash of its signed bytes). The target must also not be
    /// below `highest_seen`; the fallback may be, since the plan's signers allowed it.
    pub fn verify_manifest(
        &self,
        root: &VerifiedRoot,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<(Slot, VerifiedManifest), VerifyError> {
        let digest = sha256(bytes);
        let slot = if digest == self.body.target.manifest_sha256 {
            Slot::Target
        } else if self
            .body
            .fallback
            .as_ref()
            .is_some_and(|fallback| fallback.manifest_sha256 == digest)
        {
            Slot::Fallback
        } else {
            let (name, version) = claimed_identity(bytes);
            return Err(VerifyError::ManifestNotInPlan {
                name,
                version,
                sequence: self.body.sequence,
            });
        };
        let floor_for_rollback = match slot {
            Slot::Target => highest_seen,
            Slot::Fallback => None,
        };
        let manifest = root.verify_manifest(bytes, floor, floor_for_rollback)?;
        Ok((slot, manifest))
    }

    /// Verifies a manifest the hub says this device should run in shadow, beside its active
    /// model. Only a plan with a shadow stage authorises one, and only its target, which must not
    /// be below `highest_seen` either: shadowing downloads and runs the model like an activation.
    pub fn verify_shadow_manifest(
        &self,
        root: &VerifiedRoot,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedManifest, VerifyError> {
        if self.body.shadow.is_none() {
            return Err(VerifyError::NoShadowStage {
                sequence: self.body.sequence,
            });
        }
        if sha256(bytes) != self.body.target.manifest_sha256 {
            let (name, version) = claimed_identity(bytes);
            return Err(VerifyError::ShadowNotTarget {
                name,
                version,
                sequence: self.body.sequence,
            });
        }
        root.verify_manifest(bytes, floor, highest_seen)
    }
}
