//! Bodies of the device API: enrollment, check-in, status reports and telemetry.
//!
//! Every type here is a [`Message`] with its own frame cap. Signed documents
//! travel inside these messages as opaque byte strings and are verified by [`crate::trust`], never
//! trusted because of the message that carried them.

use std::fmt;

use serde::{Deserialize, Serialize};
use serde_bytes::ByteBuf;

use crate::drift::DriftSummary;
use crate::keys::{PublicKey, Sha256};
use crate::name::Label;
use crate::trust::{message, AgentVersion, Arch, DType, ManifestRef, Slot};
use crate::{Message, MessageKind};

pub use crate::latency::LATENCY_BUCKETS_US;

/// A device's id, assigned by the hub at enrollment.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct DeviceId(pub [u8; 16]);

impl DeviceId {
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }

    pub fn from_hex(text: &str) -> Option<DeviceId> {
        let mut out = [0u8; 16];
        hex::decode_to_slice(text, &mut out).ok()?;
        Some(DeviceId(out))
    }
}

impl fmt::Debug for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "device:{}", self.to_hex())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_hex())
    }
}

/// Sent once, with an enrollment token, to become a device of the fleet.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollRequest {
    pub token: String,
    /// The device's own key; every later request is signed with its private half.
    pub public_key: PublicKey,
    pub arch: Arch,
    pub agent_version: AgentVersion,
    /// Labels the device reports about itself; the token's labels are added to them.
    pub labels: Vec<Label>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollResponse {
    pub device_id: DeviceId,
    /// The labels the hub recorded: the device's own and the token's.
    pub labels: Vec<Label>,
    pub hub_time: u64,
}

/// The model a device is running, by the manifest it came from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningModel {
    pub name: String,
    pub version: u64,
    pub manifest_sha256: Sha256,
}

/// What the agent is doing, as far as the hub needs to know.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum AgentState {
    /// Serving its active model, or idle with none yet.
    Steady,
    Downloading,
    /// Running the validation set on a candidate.
    Probation,
    /// Could not apply what the hub asked for; see the last status report.
    Degraded,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckIn {
    pub state: AgentState,
    pub active: Option<RunningModel>,
    /// Highest root version the device trusts, so the hub sends only newer roots.
    pub root_version: u64,
    /// Highest plan sequence the device has accepted.
    pub plan_sequence: Option<u64>,
    pub agent_version: AgentVersion,
    /// Telemetry records dropped under the disk cap since enrollment.
    pub dropped_records: u64,
    pub queue_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckInResponse {
    pub hub_time: u64,
    /// Signed roots newer than the device's, oldest first.
    pub roots: Vec<ByteBuf>,
    /// The signed plan that applies to this device, if any.
    pub plan: Option<ByteBuf>,
    /// The signed manifest the device should run now, and which slot of the plan it is.
    pub manifest: Option<(Slot, ByteBuf)>,
    /// Seconds until the next check-in the hub would like.
    pub poll_after_secs: u32,
    /// The signed manifest a device in the plan's shadow stage runs beside its active model,
    /// without serving it. Only the target of a plan with a shadow stage is ever accepted
    /// ([`crate::trust::VerifiedPlan::verify_shadow_manifest`]); `manifest` stays what it serves.
    pub shadow: Option<ByteBuf>,
}

/// A check-in that names the signed documents the device already holds, so the hub can leave
/// them out of its answer when they are still the ones that apply (`/device/v2/checkin`). A hub
/// that does not know this path answers 404, and the agent falls back to a plain [`CheckIn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldCheckIn {
    pub check_in: CheckIn,
    /// [`held_digest`] of the plan, manifest and shadow manifest of the last full answer, or
    /// `None` when the device holds no plan (it then always gets a full answer).
    pub held: Option<Sha256>,
}

/// The hub's answer to a [`HeldCheckIn`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum HeldCheckInResponse {
    /// The documents the device holds are exactly the ones the hub would send, for the same slot,
    /// and there is no newer root: the device applies its held documents again, checked against
    /// this `hub_time` as if they had been sent.
    Unchanged { hub_time: u64, poll_after_secs: u32 },
    /// Anything else: the answer a plain check-in gets.
    Full(CheckInResponse),
}

/// What a device holds from a check-in answer, as one digest: the SHA-256 of the signed plan, of
/// the signed manifest with its slot and of the signed shadow manifest, each present or absent,
/// hashed together unambiguously. Hub and agent compute it the same way from the digests of the
/// exact bytes.
pub fn held_digest(
    plan: &Sha256,
    manifest: Option<(Slot, &Sha256)>,
    shadow: Option<&Sha256>,
) -> Sha256 {
    let mut bytes = Vec::with_capacity(32 + 34 + 33 + HELD_CONTEXT.len());
    bytes.extend_from_slice(HELD_CONTEXT);
    bytes.extend_from_slice(&plan.0);
    match manifest {
        Some((slot, digest)) => {
            bytes.push(match slot {
                Slot::Target => 1,
                Slot::Fallback => 2,
            });
            bytes.extend_from_slice(&digest.0);
        }
        None => bytes.push(0),
    }
    match shadow {
        Some(digest) => {
            bytes.push(1);
            bytes.extend_from_slice(&digest.0);
        }
        None => bytes.push(0),
    }
    crate::sha256(&bytes)
}

const HELD_CONTEXT: &[u8] = b"outpost held documents v1\0";

impl CheckInResponse {
    /// The [`held_digest`] of the documents this answer hands the device, or `None` when it
    /// carries no plan (then there is nothing to hold).
    pub fn held_digest(&self) -> Option<Sha256> {
        let plan = crate::sha256(self.plan.as_ref()?);
        let manifest = self
            .manifest
            .as_ref()
            .map(|(slot, bytes)| (*slot, crate::sha256(bytes)));
        let shadow = self.shadow.as_ref().map(|bytes| crate::sha256(bytes));
        Some(held_digest(
            &plan,
            manifest.as_ref().map(|(slot, digest)| (*slot, digest)),
            shadow.as_ref(),
        ))
    }
}

/// Most models one device runs side by side, and so the most entries a [`ModelsCheckIn`] or its
/// answer carries.
pub const MAX_DEVICE_MODELS: usize = 16;

/// A check-in from an agent that runs several models side by side (`/device/v3/checkin`): one
/// entry per model it runs or holds a plan for, each with its own plan floor and held documents.
/// A hub that does not know this path answers 404, and the agent falls back to a
/// [`HeldCheckIn`] about its first model.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsCheckIn {
    pub state: AgentState,
    /// At most [`MAX_DEVICE_MODELS`], one per model name.
    pub models: Vec<ModelCheckIn>,
    pub root_version: u64,
    pub agent_version: AgentVersion,
    pub dropped_records: u64,
    pub queue_bytes: u64,
}

/// What a device holds of one model: the version it serves, the highest plan of this model it
/// accepted, and the [`held_digest`] of the documents of the last full answer about it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelCheckIn {
    /// The model's name: the name of its plans' target.
    pub name: String,
    pub active: Option<RunningModel>,
    pub plan_sequence: Option<u64>,
    pub held: Option<Sha256>,
}

/// The hub's answer to a [`ModelsCheckIn`]: one entry per model name for which a plan applies to
/// the device. A model the device runs with no entry keeps running as it is; only a signed plan
/// changes what a device runs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelsCheckInResponse {
    pub hub_time: u64,
    /// Signed roots newer than the device's, oldest first.
    pub roots: Vec<ByteBuf>,
    pub poll_after_secs: u32,
    /// At most [`MAX_DEVICE_MODELS`].
    pub models: Vec<ModelAnswer>,
}

/// The documents of one model in a [`ModelsCheckInResponse`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ModelAnswer {
    /// The documents the device holds for this model are exactly the ones the hub would send,
    /// for the same slot: the device applies them again, checked against the answer's time.
    Unchanged { name: String },
    /// The signed plan of this model's latest rollout that applies to the device, the manifest
    /// of its slot and any shadow manifest, as in a [`CheckInResponse`]; or, when the model's
    /// latest signed word for the device is its retirement, the signed
    /// [`RetireBody`](crate::trust::RetireBody) in `plan` (told apart by its frame's kind, see
    /// [`crate::trust::is_retirement`]) with no manifest.
    Full {
        plan: ByteBuf,
        manifest: Option<(Slot, ByteBuf)>,
        shadow: Option<ByteBuf>,
    },
}

impl ModelAnswer {
    /// The [`held_digest`] of a full answer's documents.
    pub fn held_digest(&self) -> Option<Sha256> {
        let ModelAnswer::Full {
            plan,
            manifest,
            shadow,
        } = self
        else {
            return None;
        };
        let manifest = manifest
            .as_ref()
            .map(|(slot, bytes)| (*slot, crate::sha256(bytes)));
        Some(held_digest(
            &crate::sha256(plan),
            manifest.as_ref().map(|(slot, digest)| (*slot, digest)),
            shadow.as_ref().map(|bytes| crate::sha256(bytes)).as_ref(),
        ))
    }
}

/// Which inference runtime serves each model a device runs, sent to `/device/v3/runtimes` when
/// it changes (and once after the agent starts). A hub that does not know the path answers 404
/// and the agent stops sending it until it restarts. It changes nothing on the device: it is what
/// the operator sees in `device show`, the dashboard and `/metrics`.
///
/// A receiver checks the caps the fields document with [`RuntimeReport::validate`]; the frame cap
/// alone lets through, say, one entry with a 20 KiB fallback reason.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeReport {
    /// At most [`MAX_DEVICE_MODELS`], one per model name.
    pub models: Vec<ModelRuntime>,
    /// Device time of the report, Unix seconds: a receiver keeps the report with the latest.
    pub at: u64,
}

/// The runtime serving one model version on a device.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRuntime {
    /// The model's name, at most 128 bytes.
    pub name: String,
    pub version: u64,
    pub runtime: RuntimeKind,
    /// The runtime's own version (`1.22.0` for ONNX Runtime's library, tract's crate version),
    /// at most [`MAX_RUNTIME_TEXT`] bytes.
    pub runtime_version: String,
    /// ONNX Runtime's execution providers in the order they were registered (at most
    /// [`MAX_RUNTIME_PROVIDERS`], each at most [`MAX_RUNTIME_TEXT`] bytes); empty for tract.
    pub providers: Vec<String>,
    /// Why a runtime the device preferred is not the one serving (its library did not load, an
    /// execution provider is missing, the model failed its validation set under it), at most
    /// [`MAX_RUNTIME_NOTE`] bytes; `None` when the first choice serves.
    pub fallback: Option<String>,
}

/// An inference runtime the agent can serve a model with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum RuntimeKind {
    /// tract, pure Rust, built into every agent.
    Tract,
    /// ONNX Runtime, loaded from the device's `libonnxruntime`.
    OnnxRuntime,
}

impl RuntimeKind {
    /// The name configuration, the CLI and `/metrics` use.
    pub fn as_str(self) -> &'static str {
        match self {
            RuntimeKind::Tract => "tract",
            RuntimeKind::OnnxRuntime => "onnxruntime",
        }
    }
}

impl std::fmt::Display for RuntimeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Longest runtime version or provider name in a [`ModelRuntime`], in bytes.
pub const MAX_RUNTIME_TEXT: usize = 64;
/// Most execution providers in a [`ModelRuntime`].
pub const MAX_RUNTIME_PROVIDERS: usize = 8;
/// Longest fallback reason in a [`ModelRuntime`], in bytes.
pub const MAX_RUNTIME_NOTE: usize = 512;

impl RuntimeReport {
    /// Checks every cap the fields document, for a receiver that must not store or show more than
    /// they allow: at most [`MAX_DEVICE_MODELS`] entries, each naming a model (a [`ModelName`])
    /// no other entry names, with a runtime version and providers within [`MAX_RUNTIME_TEXT`]
    /// bytes, at most [`MAX_RUNTIME_PROVIDERS`] providers and a fallback reason within
    /// [`MAX_RUNTIME_NOTE`] bytes. The first problem found is the answer.
    ///
    /// [`ModelName`]: crate::ModelName
    pub fn validate(&self) -> Result<(), RuntimeReportError> {
        if self.models.len() > MAX_DEVICE_MODELS {
            return Err(RuntimeReportError::TooManyModels {
                count: self.models.len(),
            });
        }
        for (index, entry) in self.models.iter().enumerate() {
            crate::ModelName::new(&entry.name)
                .map_err(|source| RuntimeReportError::Name { index, source })?;
            if self.models[..index]
                .iter()
                .any(|earlier| earlier.name == entry.name)
            {
                return Err(RuntimeReportError::Duplicate {
                    model: entry.name.clone(),
                });
            }
            entry.validate()?;
        }
        Ok(())
    }
}

impl ModelRuntime {
    /// The caps of one entry, its name aside (see [`RuntimeReport::validate`]).
    fn validate(&self) -> Result<(), RuntimeReportError> {
        let model = || self.name.clone();
        if self.runtime_version.len() > MAX_RUNTIME_TEXT {
            return Err(RuntimeReportError::RuntimeVersionTooLong {
                model: model(),
                len: self.runtime_version.len(),
            });
        }
        if self.providers.len() > MAX_RUNTIME_PROVIDERS {
            return Err(RuntimeReportError::TooManyProviders {
                model: model(),
                count: self.providers.len(),
            });
        }
        for (index, provider) in self.providers.iter().enumerate() {
            if provider.len() > MAX_RUNTIME_TEXT {
                return Err(RuntimeReportError::ProviderTooLong {
                    model: model(),
                    index,
                    len: provider.len(),
                });
            }
        }
        match &self.fallback {
            Some(reason) if reason.len() > MAX_RUNTIME_NOTE => {
                Err(RuntimeReportError::FallbackTooLong {
                    model: model(),
                    len: reason.len(),
                })
            }
            _ => Ok(()),
        }
    }
}

/// Why a [`RuntimeReport`] was refused: the first cap it breaks, naming the entry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RuntimeReportError {
    #[error("{count} models, at most {MAX_DEVICE_MODELS}")]
    TooManyModels { count: usize },
    #[error("model entry {index}: name: {source}")]
    Name {
        index: usize,
        #[source]
        source: crate::NameError,
    },
    #[error("model {model:?} has two entries: one entry per model")]
    Duplicate { model: String },
    #[error(
        "model {model:?}: runtime version is {len} bytes, over the {MAX_RUNTIME_TEXT}-byte limit"
    )]
    RuntimeVersionTooLong { model: String, len: usize },
    #[error("model {model:?}: {count} execution providers, at most {MAX_RUNTIME_PROVIDERS}")]
    TooManyProviders { model: String, count: usize },
    #[error(
        "model {model:?}: execution provider {index} is {len} bytes, over the \
         {MAX_RUNTIME_TEXT}-byte limit"
    )]
    ProviderTooLong {
        model: String,
        index: usize,
        len: usize,
    },
    #[error(
        "model {model:?}: fallback reason is {len} bytes, over the {MAX_RUNTIME_NOTE}-byte limit"
    )]
    FallbackTooLong { model: String, len: usize },
}

/// A step of applying a manifest, reported to the hub as it happens.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Status {
    Downloaded,
    Activating,
    /// The model passed probation and serves requests.
    Committed,
    Failed {
        reason: String,
    },
    RolledBack {
        reason: String,
    },
    /// The chain of trust or a compatibility check refused the document or artifact.
    Refused {
        reason: String,
    },
    /// The plan's target passed its validation set and runs in shadow beside the active model;
    /// it serves no request.
    Shadowing,
    /// A download of the document's artifacts broke off on its deadline or throughput floor; the
    /// device keeps what it has, backs off and resumes. Not an outcome: a device that never
    /// finishes counts as silent once the plan's device timeout passes.
    Stalled {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub plan_sequence: Option<u64>,
    pub manifest: Option<ManifestRef>,
    pub status: Status,
    /// Device time of the event, Unix seconds.
    pub at: u64,
}

/// Inference counters for one model version over one window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InferenceWindow {
    pub model: String,
    pub version: u64,
    pub start: u64,
    pub end: u64,
    pub count: u64,
    pub errors: u64,
    /// One count per [`LATENCY_BUCKETS_US`] bucket plus the overflow bucket.
    pub latency_buckets: Vec<u64>,
    /// What the model saw and said over the window, when its manifest signs a drift profile. It
    /// travels, is capped, dropped and de-duplicated with the window's counters.
    pub drift: Option<DriftSummary>,
    /// How the target of a shadow stage compared with this window's model, which kept serving.
    /// A window carrying one counts no inference of its own (`count` 0).
    pub shadow: Option<ShadowReport>,
}

/// Comparisons of a shadow model with the active model over one window, on the same live inputs.
///
/// A comparison is one row of the first output (one batch item, or the whole output when it has
/// no batch axis): `top1_agreed` of them had the same argmax in both models. Every value of every
/// output both models produced as finite numbers adds its absolute difference to `abs_diff_sum`
/// and one to `abs_diff_values`. Rows the shadow model failed on (an error, an output of another
/// shape, a NaN or infinity where the active model had none) are `errors`, not comparisons.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShadowReport {
    /// The shadow model, as its plan names it.
    pub target: ManifestRef,
    /// On the wire its fields follow `target` directly: postcard encodes no nesting.
    pub counts: ShadowCounts,
}

/// Shadow comparisons counted: what one input added up to on a device, a window's report, or a
/// device's or a fleet's sum of reports. [`ShadowCounts::add`] is the one place they are summed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowCounts {
    /// Rows of the first output both models answered comparably.
    pub compared: u64,
    /// Compared rows whose argmax was the same in both models.
    pub top1_agreed: u64,
    /// Rows the shadow model failed on.
    pub errors: u64,
    pub abs_diff_sum: f64,
    pub abs_diff_values: u64,
    /// Inputs not shadowed because the shadow queue was full; the request was served regardless.
    pub dropped: u64,
}

impl ShadowCounts {
    /// Adds `other`'s counts. Counts saturate: absurd numbers from a device skew its own figures,
    /// they never make a receiver panic.
    pub fn add(&mut self, other: &ShadowCounts) {
        self.compared = self.compared.saturating_add(other.compared);
        self.top1_agreed = self.top1_agreed.saturating_add(other.top1_agreed);
        self.errors = self.errors.saturating_add(other.errors);
        self.abs_diff_sum += other.abs_diff_sum;
        self.abs_diff_values = self.abs_diff_values.saturating_add(other.abs_diff_values);
        self.dropped = self.dropped.saturating_add(other.dropped);
    }

    /// Comparisons the top-1 agreement is judged over: errors count as disagreements.
    pub fn judged(&self) -> u64 {
        self.compared.saturating_add(self.errors)
    }

    /// Checks that the counts add up, for a receiver that must not store nonsense.
    pub fn validate(&self) -> Result<(), ShadowError> {
        if self.top1_agreed > self.compared {
            return Err(ShadowError::MoreAgreedThanCompared {
                agreed: self.top1_agreed,
                compared: self.compared,
            });
        }
        if !self.abs_diff_sum.is_finite() || self.abs_diff_sum < 0.0 {
            return Err(ShadowError::DifferenceSum(self.abs_diff_sum));
        }
        if self.compared > 0 && self.abs_diff_values < self.compared {
            // Every compared row has at least one value in the first output.
            return Err(ShadowError::TooFewValues {
                values: self.abs_diff_values,
                compared: self.compared,
            });
        }
        if self.abs_diff_values == 0 && self.abs_diff_sum != 0.0 {
            return Err(ShadowError::SumOverNoValues);
        }
        Ok(())
    }
}

/// Why a shadow report's counts were refused.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ShadowError {
    #[error("{agreed} top-1 agreements in {compared} comparisons")]
    MoreAgreedThanCompared { agreed: u64, compared: u64 },
    #[error("absolute difference sum {0} is not a finite non-negative number")]
    DifferenceSum(f64),
    #[error("{values} values differenced over {compared} comparisons")]
    TooFewValues { values: u64, compared: u64 },
    #[error("an absolute difference sum over no values")]
    SumOverNoValues,
    #[error("target model name: {0}")]
    TargetName(#[from] crate::name::NameError),
}

impl ShadowReport {
    /// Checks that the counts add up and the target is a model name, for a receiver that must not
    /// store nonsense.
    pub fn validate(&self) -> Result<(), ShadowError> {
        self.counts.validate()?;
        crate::ModelName::new(&self.target.name)?;
        Ok(())
    }
}

/// A batch of telemetry. `(device, sequence)` is its idempotency key: the hub stores a resent batch
/// once and acknowledges it again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TelemetryBatch {
    pub sequence: u64,
    pub windows: Vec<InferenceWindow>,
    /// Records dropped under the disk cap since the previous batch.
    pub dropped_records: u64,
}

impl TelemetryBatch {
    /// Each window's drift summary as a frame of its own, the bytes [`crate::encode`] gives for it,
    /// cut from `frame`, the frame this batch was decoded from, instead of encoded again: postcard
    /// writes a summary inside a window exactly as on its own. `None` for a window without a
    /// summary.
    ///
    /// The whole answer is `None` when `frame` is not exactly this batch's encoding, say a varint
    /// written longer than it needs (postcard reads those too): every field's encoding is at least
    /// as long as the shortest, so the positions hold only when the lengths add up to the frame's.
    /// The caller then encodes the summaries. This walks one size pass over the batch, about a
    /// third of the cost of encoding its summaries.
    pub fn drift_frames(&self, frame: &[u8]) -> Option<Vec<Option<Vec<u8>>>> {
        fn size<T: Serialize + ?Sized>(value: &T) -> Option<usize> {
            postcard::experimental::serialized_size(value).ok()
        }
        if crate::envelope::kind_of(frame) != Some(TelemetryBatch::KIND) {
            return None;
        }
        let (header, body) = frame.split_first_chunk::<{ crate::envelope::HEADER_LEN }>()?;
        let [m0, m1, version, _] = *header;
        let summary_header = [m0, m1, version, DriftSummary::KIND as u8];
        // The fields in their declared order: a reordering fails the tests, which compare every
        // cut frame with the summary's own encoding.
        let mut at = size(&(self.sequence, self.windows.len()))?;
        let mut frames = Vec::with_capacity(self.windows.len());
        for window in &self.windows {
            at += size(&(
                &window.model,
                window.version,
                window.start,
                window.end,
                window.count,
                window.errors,
                &window.latency_buckets,
            ))?;
            // The option's tag, then the summary.
            let drift = size(&window.drift)?;
            frames.push(match window.drift {
                None => None,
                Some(_) => {
                    let summary = body.get(at + 1..at + drift)?;
                    let mut frame = Vec::with_capacity(summary_header.len() + summary.len());
                    frame.extend_from_slice(&summary_header);
                    frame.extend_from_slice(summary);
                    Some(frame)
                }
            });
            at += drift + size(&window.shadow)?;
        }
        at += size(&self.dropped_records)?;
        (at == body.len()).then_some(frames)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TelemetryAck {
    pub sequence: u64,
    /// The hub had already stored this batch.
    pub duplicate: bool,
}

/// The body of every non-2xx device API response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorResponse {
    pub status: u16,
    pub message: String,
}

/// A dense tensor, little-endian, row-major.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tensor {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<u64>,
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

impl Tensor {
    /// Checks that `data` holds exactly the elements `shape` calls for.
    pub fn check(&self) -> Result<(), TensorError> {
        let elements = self
            .shape
            .iter()
            .try_fold(1u64, |acc, dim| acc.checked_mul(*dim))
            .ok_or_else(|| TensorError::ShapeOverflows {
                name: self.name.clone(),
                shape: self.shape.clone(),
            })?;
        let expected = elements.checked_mul(self.dtype.size() as u64);
        if expected != Some(self.data.len() as u64) {
            return Err(TensorError::Length {
                name: self.name.clone(),
                shape: self.shape.clone(),
                dtype: self.dtype,
                expected,
                found: self.data.len(),
            });
        }
        Ok(())
    }
}

/// Why a tensor's bytes do not fit its shape.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TensorError {
    #[error("tensor {name:?}: shape {shape:?} overflows")]
    ShapeOverflows { name: String, shape: Vec<u64> },
    #[error(
        "tensor {name:?}: shape {shape:?} of {} needs {} bytes, has {found}",
        .dtype.as_str(),
        .expected.map_or("too many".to_owned(), |n| n.to_string())
    )]
    Length {
        name: String,
        shape: Vec<u64>,
        dtype: DType,
        /// None when the byte count overflows.
        expected: Option<u64>,
        found: usize,
    },
}

/// One golden case: inputs and the outputs the model must produce for them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ValidationCase {
    pub inputs: Vec<Tensor>,
    pub outputs: Vec<Tensor>,
}

/// The validation-set artifact. Its hash is signed in the manifest, so its checks are too.
///
/// Frames of kind [`MessageKind::ValidationSet`]; the first
/// form, [`ValidationSetV1`], is still read by [`ValidationSet::decode`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationSet {
    /// Outputs without a check of their own pass element by element when
    /// `|got - want| <= abs_tolerance + rel_tolerance * |want|`.
    pub abs_tolerance: f64,
    pub rel_tolerance: f64,
    pub cases: Vec<ValidationCase>,
    /// How particular outputs are checked instead, at most one per output.
    pub checks: Vec<OutputCheck>,
}

/// How one output of a validation set is checked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputCheck {
    pub output: String,
    /// Element by element, `|got - want| <= abs + rel * |want|`; `None` compares no element (a
    /// class output judged on its top-1 agreement alone).
    pub tolerance: Option<Tolerance>,
    /// For a class output (scores along its last axis): the least share, 0 to 1, of all the
    /// cases' rows whose highest-scoring class is the expected one's.
    pub min_top1: Option<f64>,
}

/// An element-by-element tolerance: `|got - want| <= abs + rel * |want|`.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    pub abs: f64,
    pub rel: f64,
}

/// The first form of the validation set, before per-output checks: every output compared element
/// by element with the same two tolerances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationSetV1 {
    pub abs_tolerance: f64,
    pub rel_tolerance: f64,
    pub cases: Vec<ValidationCase>,
}

impl From<ValidationSetV1> for ValidationSet {
    fn from(set: ValidationSetV1) -> ValidationSet {
        ValidationSet {
            abs_tolerance: set.abs_tolerance,
            rel_tolerance: set.rel_tolerance,
            cases: set.cases,
            checks: Vec::new(),
        }
    }
}

impl ValidationSet {
    /// Decodes a validation set of either form: the current one, or a [`ValidationSetV1`] frame,
    /// read as a set without per-output checks.
    pub fn decode(frame: &[u8]) -> Result<ValidationSet, crate::DecodeError> {
        if crate::envelope::peek_kind(frame) == Some(crate::MessageKind::ValidationSetV1) {
            return crate::decode::<ValidationSetV1>(frame).map(ValidationSet::from);
        }
        crate::decode::<ValidationSet>(frame)
    }

    /// The set's frame in the oldest form that holds it: the first form ([`ValidationSetV1`],
    /// which every agent reads) when no output has a check of its own, else the current one.
    pub fn encode_oldest(&self) -> Result<Vec<u8>, crate::EncodeError> {
        if self.checks.is_empty() {
            crate::encode(&ValidationSetV1 {
                abs_tolerance: self.abs_tolerance,
                rel_tolerance: self.rel_tolerance,
                cases: self.cases.clone(),
            })
        } else {
            crate::encode(self)
        }
    }

    /// The check of `output`, if the set has one.
    pub fn check_of(&self, output: &str) -> Option<&OutputCheck> {
        self.checks.iter().find(|check| check.output == output)
    }
}

message!(EnrollRequest, EnrollRequest, "enroll request", 8 * 1024);
message!(EnrollResponse, EnrollResponse, "enroll response", 8 * 1024);
message!(CheckIn, CheckIn, "check-in", 4 * 1024);
message!(
    CheckInResponse,
    CheckInResponse,
    "check-in response",
    512 * 1024
);
message!(HeldCheckIn, HeldCheckIn, "held check-in", 4 * 1024);
// One byte more than a full check-in response: the variant tag.
message!(
    HeldCheckInResponse,
    HeldCheckInResponse,
    "held check-in response",
    512 * 1024 + 1
);
// An entry is two names of at most 128 bytes, a version, a digest, a plan sequence and a held
// digest: under 350 bytes, so 16 fit with room to spare.
message!(ModelsCheckIn, ModelsCheckIn, "models check-in", 8 * 1024);
message!(
    ModelsCheckInResponse,
    ModelsCheckInResponse,
    "models check-in response",
    2 * 1024 * 1024
);
message!(StatusReport, StatusReport, "status report", 8 * 1024);
// An entry is at most 1,242 bytes: a 128-byte name and a 10-byte varint version, the runtime's
// tag, a 64-byte version, 8 providers of 64 bytes, a 512-byte fallback reason, and their length
// prefixes and option tag. 16 of them and the report's time come to 19,883: 24 KiB holds them
// (`tests/runtime_report.rs` checks it).
message!(RuntimeReport, RuntimeReport, "runtime report", 24 * 1024);
message!(
    TelemetryBatch,
    TelemetryBatch,
    "telemetry batch",
    1024 * 1024
);
message!(TelemetryAck, TelemetryAck, "telemetry ack", 64);
message!(ErrorResponse, ErrorResponse, "error response", 8 * 1024);
message!(
    ValidationSet,
    ValidationSet,
    "validation set",
    64 * 1024 * 1024
);
message!(
    ValidationSetV1,
    ValidationSetV1,
    "validation set (first form)",
    64 * 1024 * 1024
);
