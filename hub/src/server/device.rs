//! The device API: postcard over HTTP(S), under `/device/v1` (check-ins also under `/device/v2`,
//! naming the documents the device holds, and `/device/v3`, one entry per model it runs).
//!
//! Enrollment is authorised by an enrollment token. Every other request is signed by the device's
//! own key over method, path, body hash, timestamp and nonce ([`outpost_protocol::auth`]); the
//! hub refuses stale timestamps, replayed nonces, unknown and revoked devices, each with its own
//! reason. Errors are postcard [`ErrorResponse`]s with the matching HTTP status.
//!
//! Each model name has rollouts of its own: a plan belongs to the model its target names. An
//! agent running several models is answered per model, by the latest signed word about each: a
//! plan, or a retirement that takes the model off the device (see [`latest_per_model`]). One
//! running a single model is only ever answered about that model, and never with a retirement,
//! which it cannot read (see [`rollout_for_one_model`]).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use outpost_protocol::auth::{
    RequestToSign, HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    MAX_CLOCK_SKEW_SECS,
};
use outpost_protocol::device::{
    held_digest, AgentState, CheckIn, CheckInResponse, DeviceId, EnrollRequest, EnrollResponse,
    ErrorResponse, HeldCheckIn, HeldCheckInResponse, ModelAnswer, ModelCheckIn, ModelsCheckIn,
    ModelsCheckInResponse, RunningModel, Status, StatusReport, TelemetryAck, TelemetryBatch,
    LATENCY_BUCKETS_US, MAX_DEVICE_MODELS,
};
use outpost_protocol::keys::SignatureBytes;
use outpost_protocol::trust::Slot;
use outpost_protocol::{sha256, Label, Message, ModelName, PreparedKey, PublicKey, Sha256};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tower_http::timeout::TimeoutLayer;

use super::drift::{check_summary, SummaryError};
use super::engine::{Document, Live, LiveRetirement, LiveRollout};
use super::fleet::{labels_of, DeviceState};
use super::metrics::Metrics;
use super::nonces::NonceRefusal;
use super::SharedHub;
use crate::rollout::RolloutState;
use crate::store::{
    DeviceRead, DeviceRecord, EventRecord, Ingested, OutcomeKind, OutcomeRecord, RunningRecord,
    TokenRefusal, WindowInput,
};
use crate::unix_now;

/// Most windows one telemetry batch may carry.
const MAX_WINDOWS: usize = 4096;
/// Most device keys kept decompressed; past this the cache starts over (about 200 bytes each).
const MAX_PREPARED_KEYS: usize = 1_000_000;

pub fn routes(hub: SharedHub) -> Router {
    let timeout = hub.config.request_timeout;
    let limited = |max: usize| DefaultBodyLimit::max(max);
    Router::new()
        .route(
            "/device/v1/enroll",
            post(enroll).layer(limited(EnrollRequest::MAX_FRAME)),
        )
        .route(
            "/device/v1/checkin",
            post(check_in).layer(limited(CheckIn::MAX_FRAME)),
        )
        .route(
            "/device/v2/checkin",
            post(held_check_in).layer(limited(HeldCheckIn::MAX_FRAME)),
        )
        .route(
            "/device/v3/checkin",
            post(models_check_in).layer(limited(ModelsCheckIn::MAX_FRAME)),
        )
        .route(
            "/device/v1/status",
            post(status).layer(limited(StatusReport::MAX_FRAME)),
        )
        .route(
            "/device/v1/telemetry",
            post(telemetry).layer(limited(TelemetryBatch::MAX_FRAME)),
        )
        .route(
            "/device/v1/artifacts/{sha256}",
            get(artifact).layer(limited(0)),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(hub)
}

/// A refusal or failure, sent as a postcard [`ErrorResponse`].
#[derive(Debug)]
pub struct DeviceError {
    status: StatusCode,
    message: String,
}

impl DeviceError {
    fn new(status: StatusCode, message: impl Into<String>) -> DeviceError {
        DeviceError {
            status,
            message: message.into(),
        }
    }

    fn unauthorized(message: impl Into<String>) -> DeviceError {
        DeviceError::new(StatusCode::UNAUTHORIZED, message)
    }

    fn bad_request(message: impl Into<String>) -> DeviceError {
        DeviceError::new(StatusCode::BAD_REQUEST, message)
    }

    fn internal(error: impl std::fmt::Display) -> DeviceError {
        log::error!("device request failed: {error}");
        DeviceError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the hub's log",
        )
    }
}

impl From<BytesRejection> for DeviceError {
    fn from(rejection: BytesRejection) -> DeviceError {
        DeviceError::new(rejection.status(), rejection.body_text())
    }
}

impl From<crate::store::StoreError> for DeviceError {
    fn from(error: crate::store::StoreError) -> DeviceError {
        DeviceError::internal(error)
    }
}

impl From<outpost_protocol::DecodeError> for DeviceError {
    fn from(error: outpost_protocol::DecodeError) -> DeviceError {
        if let outpost_protocol::DecodeReason::UnsupportedVersion { found } = error.reason {
            let message = outpost_protocol::envelope::version_mismatch("hub", "agent", found);
            log::warn!("refused a device request: {message}");
            return DeviceError::bad_request(message);
        }
        DeviceError::bad_request(error.to_string())
    }
}

impl IntoResponse for DeviceError {
    fn into_response(self) -> Response {
        let body = ErrorResponse {
            status: self.status.as_u16(),
            message: self.message,
        };
        // An error message too long for its frame is cut rather than turned into a second error.
        let frame = outpost_protocol::encode(&body).unwrap_or_else(|_| {
            outpost_protocol::encode(&ErrorResponse {
                status: body.status,
                message: body.message.chars().take(1000).collect(),
            })
            .unwrap_or_default()
        });
        (self.status, postcard_headers(), frame).into_response()
    }
}

fn postcard_headers() -> [(header::HeaderName, &'static str); 1] {
    [(header::CONTENT_TYPE, "application/x-outpost-postcard")]
}

fn reply<M: Message>(message: &M) -> Result<Response, DeviceError> {
    let frame = outpost_protocol::encode(message).map_err(DeviceError::internal)?;
    Ok((StatusCode::OK, postcard_headers(), frame).into_response())
}

/// Device keys decompressed once each. A device's key never changes after enrollment, so an entry
/// never goes stale; revocation is read from the device record on every request.
#[derive(Debug, Default)]
pub struct KeyCache {
    keys: HashMap<[u8; 16], PreparedKey>,
}

impl KeyCache {
    fn get(hub: &SharedHub, device: &DeviceRecord) -> Option<PreparedKey> {
        if let Some(key) = hub.keys.read().ok()?.keys.get(&device.id) {
            return Some(key.clone());
        }
        let key = PublicKey(device.public_key).prepare()?;
        if let Ok(mut cache) = hub.keys.write() {
            if cache.keys.len() >= MAX_PREPARED_KEYS {
                cache.keys.clear();
            }
            cache.keys.insert(device.id, key.clone());
        }
        Some(key)
    }
}

fn header_str<'a>(headers: &'a HeaderMap, name: &str) -> Result<&'a str, DeviceError> {
    headers
        .get(name)
        .ok_or_else(|| DeviceError::unauthorized(format!("missing {name} header")))?
        .to_str()
        .map_err(|_| DeviceError::unauthorized(format!("{name} header is not text")))
}

fn header_hex<const N: usize>(headers: &HeaderMap, name: &str) -> Result<[u8; N], DeviceError> {
    let mut out = [0u8; N];
    hex::decode_to_slice(header_str(headers, name)?, &mut out).map_err(|_| {
        DeviceError::unauthorized(format!("{name} header is not {N} hex-encoded bytes"))
    })?;
    Ok(out)
}

/// Whether a request changes what the hub records of its device (a status report, a telemetry
/// batch), so that its time and nonce are kept for good: a replay of it after a restart would
/// change that record again. A replayed check-in or download only repeats what it said.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kept {
    ForGood,
    InMemory,
}

/// Checks a signed device request and returns the device that sent it.
async fn authenticate(
    hub: &SharedHub,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
    kept: Kept,
) -> Result<DeviceRead, DeviceError> {
    let device_id: [u8; 16] = header_hex(headers, HEADER_DEVICE)?;
    let timestamp: u64 = header_str(headers, HEADER_TIMESTAMP)?
        .parse()
        .map_err(|_| DeviceError::unauthorized(format!("{HEADER_TIMESTAMP} is not a number")))?;
    let nonce: [u8; 16] = header_hex(headers, HEADER_NONCE)?;
    let signature = SignatureBytes(header_hex(headers, HEADER_SIGNATURE)?);
    let now = unix_now();
    if timestamp.abs_diff(now) > MAX_CLOCK_SKEW_SECS {
        return Err(DeviceError::unauthorized(format!(
            "stale timestamp {timestamp}: hub time is {now}, allowed skew {MAX_CLOCK_SKEW_SECS}s"
        )));
    }
    if timestamp < hub.started_at {
        return Err(DeviceError::unauthorized(
            "request was signed before the hub started; sign it again",
        ));
    }
    let Some(read) = hub.store.device_read(&device_id)? else {
        return Err(DeviceError::unauthorized(format!(
            "unknown device {}",
            hex::encode(device_id)
        )));
    };
    let request = RequestToSign {
        method: method.as_str(),
        path_and_query: uri.path_and_query().map_or(uri.path(), |pq| pq.as_str()),
        body_sha256: sha256(body),
        timestamp,
        nonce,
    };
    let device = &read.record;
    let verified = match KeyCache::get(hub, device) {
        Some(key) => hub
            .verifier
            .verify(request.message(), signature, key)
            .await
            .map_err(|stopped| {
                DeviceError::new(StatusCode::SERVICE_UNAVAILABLE, stopped.to_string())
            })?,
        None => false,
    };
    if !verified {
        return Err(DeviceError::unauthorized("bad request signature"));
    }
    if device.revoked {
        return Err(DeviceError::new(StatusCode::FORBIDDEN, "device is revoked"));
    }
    if hub
        .signed_before_start
        .get(&device_id)
        .is_some_and(|before| before.may_replay(timestamp, &nonce))
    {
        return Err(DeviceError::unauthorized(
            "replayed request: signed no later than a request accepted before the hub restarted; \
             sign it again",
        ));
    }
    let fresh = hub
        .nonces
        .lock()
        .map_err(|_| DeviceError::internal("nonce cache lock poisoned"))?
        .insert(device_id, nonce, timestamp, now)
        .map_err(|refusal| {
            let status = match refusal {
                NonceRefusal::Full => StatusCode::SERVICE_UNAVAILABLE,
                NonceRefusal::DeviceQuota => StatusCode::TOO_MANY_REQUESTS,
            };
            DeviceError::new(status, refusal.to_string())
        })?;
    if !fresh {
        return Err(DeviceError::unauthorized(
            "replayed request: nonce already used",
        ));
    }
    if kept == Kept::ForGood {
        hub.store.note_signed_at(&device_id, timestamp, nonce)?;
    }
    Ok(read)
}

async fn enroll(
    State(hub): State<SharedHub>,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let request: EnrollRequest = outpost_protocol::decode(&body?)?;
    if !request.public_key.is_valid() {
        return Err(DeviceError::bad_request(
            "public key is not a valid ed25519 key",
        ));
    }
    for label in &request.labels {
        label
            .validate()
            .map_err(|error| DeviceError::bad_request(format!("label {label}: {error}")))?;
    }
    let mut device_id = [0u8; 16];
    getrandom::getrandom(&mut device_id).map_err(DeviceError::internal)?;
    let now = unix_now();
    let token_hash = sha256(request.token.as_bytes()).0;
    // A device gets its token's labels and no others: labels choose which devices a rollout
    // reaches and whose outcomes its gates count, so anyone holding some enrollment token must
    // not pick them. What it claims beyond them is shown in its enrollment event, for an admin to
    // grant with `device label`.
    let enrolled_event = |token: &crate::store::EnrollTokenRecord| {
        let mut detail = format!("{} agent {}", request.arch, request.agent_version);
        let not_applied: Vec<String> = request
            .labels
            .iter()
            .filter(|label| {
                !token
                    .labels
                    .iter()
                    .any(|(key, value)| *key == label.key && *value == label.value)
            })
            .map(ToString::to_string)
            .collect();
        if !not_applied.is_empty() {
            detail.push_str(&format!(
                "; labels it claimed beyond its token's, not applied: {}",
                not_applied.join(",")
            ));
        }
        EventRecord {
            at: now,
            kind: "enrolled".into(),
            plan_sequence: None,
            model: None,
            detail,
        }
    };
    let outcome = hub.store.enroll(
        &token_hash,
        now,
        |token| {
            let mut labels: Vec<(String, String)> = token.labels.clone();
            labels.sort();
            DeviceRecord {
                id: device_id,
                public_key: request.public_key.0,
                arch: request.arch.to_string(),
                agent_version: request.agent_version.to_string(),
                labels,
                enrolled_at: now,
                revoked: false,
                last_checkin: None,
                state: "steady".into(),
                active: None,
                plan_sequence: None,
                dropped_records: 0,
                queue_bytes: 0,
                models: Vec::new(),
                several_models: false,
            }
        },
        enrolled_event,
    )?;
    let device = outcome.map_err(|refusal| {
        DeviceError::unauthorized(match refusal {
            TokenRefusal::Unknown => "unknown or revoked enrollment token",
            TokenRefusal::Expired => "enrollment token has expired",
            TokenRefusal::UsedUp => "enrollment token has no uses left",
        })
    })?;
    hub.store.flush().await?;
    Metrics::bump(&hub.metrics.enrollments, 1);
    log::info!("device {} enrolled", hex::encode(device.id));
    reply(&EnrollResponse {
        device_id: DeviceId(device.id),
        labels: labels_of(&device),
        hub_time: now,
    })
}

async fn check_in(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let read = authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let report: CheckIn = outpost_protocol::decode(&body)?;
    reply(&answer_check_in(&hub, read, &report)?.into_response())
}

/// A check-in naming what the device holds: when the answer would hand it the very documents it
/// holds, for the same slot, and no newer root, it gets only the hub time and the poll interval
/// and applies its held documents again. An older agent keeps using `/device/v1/checkin`.
async fn held_check_in(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let read = authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let request: HeldCheckIn = outpost_protocol::decode(&body)?;
    let answer = answer_check_in(&hub, read, &request.check_in)?;
    if request.held.is_some() && answer.roots.is_empty() && answer.held_digest() == request.held {
        Metrics::bump(&hub.metrics.check_ins_unchanged, 1);
        return reply(&HeldCheckInResponse::Unchanged {
            hub_time: answer.hub_time,
            poll_after_secs: answer.poll_after_secs,
        });
    }
    reply(&HeldCheckInResponse::Full(answer.into_response()))
}

/// A check-in from an agent that runs several models side by side, one entry per model. Each
/// model name is answered on its own, by the latest signed word about that model that applies to
/// the device ([`latest_per_model`]): its latest live rollout, or a retirement of it signed
/// later, which is sent alone, with no manifest. Each is "unchanged" when the device holds
/// exactly its documents, for the same slot, and there is no newer root, else sent in full. A
/// model the device runs with neither gets no entry, and the device keeps running it. The poll
/// interval is short while any of those rollouts is active or paused; a retirement never
/// shortens it.
///
/// `check_ins_unchanged` counts a check-in all of whose entries (one at least) are unchanged, as
/// it counts a held check-in answered "unchanged": both mean the hub sent no document.
async fn models_check_in(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let read = authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let request: ModelsCheckIn = outpost_protocol::decode(&body)?;
    check_models(&request.models).map_err(DeviceError::bad_request)?;
    let now = unix_now();
    let device = record_check_in(&hub, read, now, &Reported::of_models(&request))?;
    let roots = roots_after(&hub, request.root_version)?;
    let labels = labels_of(&device);
    let live = live_cache(&hub)?;
    let reported: Vec<&str> = request
        .models
        .iter()
        .map(|entry| entry.name.as_str())
        .collect();
    let latest = latest_per_model(&live, &labels, &reported);
    let models: Vec<ModelAnswer> = latest
        .iter()
        .map(|word| {
            let name = word.model();
            let documents = match word {
                Latest::Rollout(rollout) => Documents::for_device(rollout, &device, &labels),
                Latest::Retired(retirement) => Documents::retirement(retirement),
            };
            let held = request
                .models
                .iter()
                .find(|entry| entry.name == name)
                .and_then(|entry| entry.held);
            if roots.is_empty() && held == Some(documents.held_digest()) {
                ModelAnswer::Unchanged {
                    name: name.to_owned(),
                }
            } else {
                documents.into_model_answer()
            }
        })
        .collect();
    let rollouts: Vec<&LiveRollout> = latest.iter().filter_map(Latest::rollout).collect();
    Metrics::bump(&hub.metrics.check_ins, 1);
    if !models.is_empty()
        && models
            .iter()
            .all(|answer| matches!(answer, ModelAnswer::Unchanged { .. }))
    {
        Metrics::bump(&hub.metrics.check_ins_unchanged, 1);
    }
    reply(&ModelsCheckInResponse {
        hub_time: now,
        roots,
        poll_after_secs: poll_after(&hub, &rollouts),
        models,
    })
}

/// Why a models check-in is refused, if it is: more entries than a device may run models, an
/// entry whose name is no model name, two entries of one name, or an entry whose active model
/// is another model than the one it names.
fn check_models(models: &[ModelCheckIn]) -> Result<(), String> {
    if models.len() > MAX_DEVICE_MODELS {
        return Err(format!(
            "check-in names {} models, at most {MAX_DEVICE_MODELS} are accepted",
            models.len()
        ));
    }
    for (index, entry) in models.iter().enumerate() {
        ModelName::new(&entry.name)
            .map_err(|error| format!("model entry {index}: name {:?}: {error}", entry.name))?;
        if models[..index]
            .iter()
            .any(|earlier| earlier.name == entry.name)
        {
            return Err(format!(
                "model {:?} has two entries: one entry per model",
                entry.name
            ));
        }
        if let Some(active) = entry.active.as_ref().filter(|a| a.name != entry.name) {
            return Err(format!(
                "the entry of model {:?} runs model {:?}: an entry's active model is the \
                 model it names",
                entry.name, active.name
            ));
        }
    }
    Ok(())
}

/// A check-in's answer before it is encoded: the signed documents stay shared, and their digests
/// are the ones worked out when the rollout cache was built.
struct Answer {
    hub_time: u64,
    roots: Vec<ByteBuf>,
    documents: Option<Documents>,
    poll_after_secs: u32,
}

impl Answer {
    /// [`CheckInResponse::held_digest`] of the response this answer becomes, without hashing the
    /// documents again.
    fn held_digest(&self) -> Option<Sha256> {
        self.documents.as_ref().map(Documents::held_digest)
    }

    fn into_response(self) -> CheckInResponse {
        let (plan, manifest, shadow) = match self.documents {
            Some(documents) => (
                Some(bytes_of(documents.plan)),
                documents
                    .manifest
                    .map(|(slot, document)| (slot, bytes_of(document))),
                documents.shadow.map(bytes_of),
            ),
            None => (None, None, None),
        };
        CheckInResponse {
            hub_time: self.hub_time,
            roots: self.roots,
            plan,
            manifest,
            poll_after_secs: self.poll_after_secs,
            shadow,
        }
    }
}

/// What one rollout hands one device: its signed plan, the manifest of the device's slot and
/// any shadow manifest, shared from the rollout cache with their digests. Or, for a retired
/// model, the signed retirement in the plan's place, alone.
struct Documents {
    plan: Document,
    manifest: Option<(Slot, Document)>,
    shadow: Option<Document>,
}

impl Documents {
    /// The documents `rollout` hands `device`: the manifest of its slot, unless its agent is too
    /// old for the target (then the fallback's, or none), and the target in shadow when the
    /// device is in the plan's shadow stage. Every check-in path answers a rollout with this.
    fn for_device(rollout: &LiveRollout, device: &DeviceRecord, labels: &[Label]) -> Documents {
        let id = DeviceId(device.id);
        let too_old = super::engine::agent_too_old(&device.agent_version, rollout.target_min_agent);
        let slot = crate::rollout::slot_for(&rollout.rollout, &id, labels);
        let manifest = match crate::rollout::offered(&rollout.rollout, slot, too_old) {
            Some(Slot::Target) => Some((Slot::Target, rollout.target_manifest.clone())),
            Some(Slot::Fallback) => rollout
                .fallback_manifest
                .clone()
                .map(|document| (Slot::Fallback, document)),
            None => None,
        };
        let shadow = (!too_old && crate::rollout::shadow_for(&rollout.rollout, &id, labels))
            .then(|| rollout.target_manifest.clone());
        Documents {
            plan: rollout.signed_plan.clone(),
            manifest,
            shadow,
        }
    }

    /// A retirement's documents: its signed bytes where a plan goes, no manifest, no shadow.
    fn retirement(retirement: &LiveRetirement) -> Documents {
        Documents {
            plan: retirement.signed.clone(),
            manifest: None,
            shadow: None,
        }
    }

    /// The protocol's [`held_digest`] of these documents, from the digests the rollout cache
    /// worked out.
    fn held_digest(&self) -> Sha256 {
        held_digest(
            &self.plan.sha256,
            self.manifest
                .as_ref()
                .map(|(slot, document)| (*slot, &document.sha256)),
            self.shadow.as_ref().map(|document| &document.sha256),
        )
    }

    fn into_model_answer(self) -> ModelAnswer {
        ModelAnswer::Full {
            plan: bytes_of(self.plan),
            manifest: self
                .manifest
                .map(|(slot, document)| (slot, bytes_of(document))),
            shadow: self.shadow.map(bytes_of),
        }
    }
}

fn bytes_of(document: Document) -> ByteBuf {
    ByteBuf::from(document.bytes.as_ref().clone())
}

/// The rollout a device that runs one model follows (`/device/v1` and `/device/v2` check-ins):
/// the latest live rollout that applies to it and whose target is the model it runs, so that
/// another model's rollout never switches it off its model; when it runs none yet, the latest
/// that applies of a model not retired for it since. Such an agent cannot read a retirement, so
/// it is never sent one: one running a retired model keeps it, under that model's latest plan.
fn rollout_for_one_model<'a>(
    live: &'a Live,
    labels: &[Label],
    running: Option<&str>,
) -> Option<&'a LiveRollout> {
    live.rollouts.iter().rev().find(|rollout| {
        let name = rollout.rollout.plan.target.name.as_str();
        rollout.applies_to(labels)
            && match running {
                Some(running) => name == running,
                None => !live.retirements.iter().any(|retirement| {
                    retirement.model == name
                        && retirement.sequence > rollout.sequence
                        && retirement.applies_to(labels)
                }),
            }
    })
}

/// The latest signed word about one model for one device: a rollout's plan, or a retirement.
#[derive(Debug, Clone, Copy)]
enum Latest<'a> {
    Rollout(&'a LiveRollout),
    Retired(&'a LiveRetirement),
}

impl<'a> Latest<'a> {
    /// Its place in the plan sequence that rollouts and retirements share.
    fn sequence(&self) -> u64 {
        match self {
            Latest::Rollout(rollout) => rollout.sequence,
            Latest::Retired(retirement) => retirement.sequence,
        }
    }

    /// The model it is about: a plan's target name, or the model a retirement names.
    fn model(&self) -> &'a str {
        match self {
            Latest::Rollout(rollout) => &rollout.rollout.plan.target.name,
            Latest::Retired(retirement) => &retirement.model,
        }
    }

    fn rollout(&self) -> Option<&'a LiveRollout> {
        match self {
            Latest::Rollout(rollout) => Some(rollout),
            Latest::Retired(_) => None,
        }
    }
}

/// What a device that runs several models follows (`/device/v3`): per model name, the latest
/// (highest sequence) of the live rollouts of that model (its plans' target name) and the
/// retirements of it that apply to the device, sorted by name. So a retirement takes over from
/// the model's rollouts before it, and a rollout signed after it brings the model back. A device
/// is answered about at most [`MAX_DEVICE_MODELS`] models, retired ones included: those it
/// `reported` first, then the others by name.
fn latest_per_model<'a>(live: &'a Live, labels: &[Label], reported: &[&str]) -> Vec<Latest<'a>> {
    let rollouts = live
        .rollouts
        .iter()
        .filter(|rollout| rollout.applies_to(labels))
        .map(Latest::Rollout);
    let retirements = live
        .retirements
        .iter()
        .filter(|retirement| retirement.applies_to(labels))
        .map(Latest::Retired);
    let mut latest: BTreeMap<&str, Latest<'a>> = BTreeMap::new();
    for word in rollouts.chain(retirements) {
        latest
            .entry(word.model())
            .and_modify(|kept| {
                if word.sequence() > kept.sequence() {
                    *kept = word;
                }
            })
            .or_insert(word);
    }
    if latest.len() > MAX_DEVICE_MODELS {
        // A check-in names at most as many models as an answer may carry, so they all fit.
        let (mut kept, others): (Vec<&str>, Vec<&str>) =
            latest.keys().partition(|name| reported.contains(name));
        kept.extend(others);
        kept.truncate(MAX_DEVICE_MODELS);
        latest.retain(|name, _| kept.contains(name));
    }
    latest.into_values().collect()
}

/// How long a device waits before it checks in again: briefly while one of the `rollouts` it
/// follows is active or paused, so that it follows their stages, and the quiet interval
/// otherwise.
fn poll_after(hub: &SharedHub, rollouts: &[&LiveRollout]) -> u32 {
    let moving = rollouts.iter().any(|rollout| {
        matches!(
            rollout.rollout.state,
            RolloutState::Active | RolloutState::Paused
        )
    });
    if moving {
        hub.config.rollout_poll_secs
    } else {
        hub.config.poll_secs
    }
}

/// What a check-in says of its device, whichever path it came by: the fields of the device
/// record a check-in refreshes.
#[derive(Debug, Clone)]
struct Reported {
    state: AgentState,
    agent_version: String,
    queue_bytes: u64,
    plan_sequence: Option<u64>,
    active: Option<RunningRecord>,
    models: Vec<RunningRecord>,
    several_models: bool,
}

impl Reported {
    /// A single-model agent's check-in: its active model is the only one it runs.
    fn of_one(report: &CheckIn) -> Reported {
        let active = report.active.as_ref().map(running_record);
        Reported {
            state: report.state,
            agent_version: report.agent_version.to_string(),
            queue_bytes: report.queue_bytes,
            plan_sequence: report.plan_sequence,
            models: active.iter().cloned().collect(),
            active,
            several_models: false,
        }
    }

    /// A models check-in: every entry's active model, sorted by name; as `active` the first
    /// entry's that runs one (the agent's first model, the one it names when it falls back to a
    /// held check-in); and the highest plan sequence of any entry.
    fn of_models(request: &ModelsCheckIn) -> Reported {
        let mut models: Vec<RunningRecord> = request
            .models
            .iter()
            .filter_map(|entry| entry.active.as_ref().map(running_record))
            .collect();
        let active = models.first().cloned();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Reported {
            state: request.state,
            agent_version: request.agent_version.to_string(),
            queue_bytes: request.queue_bytes,
            plan_sequence: request
                .models
                .iter()
                .filter_map(|entry| entry.plan_sequence)
                .max(),
            active,
            models,
            several_models: true,
        }
    }
}

fn running_record(running: &RunningModel) -> RunningRecord {
    RunningRecord {
        name: running.name.clone(),
        version: running.version,
        manifest_sha256: running.manifest_sha256.0,
    }
}

/// Writes what a check-in reported into the device's record, and returns the record.
fn record_check_in(
    hub: &SharedHub,
    read: DeviceRead,
    now: u64,
    reported: &Reported,
) -> Result<DeviceRecord, DeviceError> {
    // Check-in state is refreshed by the next check-in, so it is not flushed on its own: the store
    // flushes on a short timer and before every acknowledged write.
    hub.store
        .update_device(read, |device| {
            device.last_checkin = Some(now);
            device.state = DeviceState::reported(reported.state).as_str().to_owned();
            device.active = reported.active.clone();
            device.models = reported.models.clone();
            device.several_models = reported.several_models;
            device.plan_sequence = reported.plan_sequence;
            device.agent_version = reported.agent_version.clone();
            device.queue_bytes = reported.queue_bytes;
        })?
        .ok_or_else(|| DeviceError::internal("the device's record vanished during its check-in"))
}

/// Signed roots newer than `version`, oldest first.
fn roots_after(hub: &SharedHub, version: u64) -> Result<Vec<ByteBuf>, DeviceError> {
    Ok(hub
        .store
        .roots_after(version)?
        .into_iter()
        .map(|(_, bytes)| ByteBuf::from(bytes))
        .collect())
}

fn live_cache(hub: &SharedHub) -> Result<Arc<Live>, DeviceError> {
    Ok(hub
        .live
        .read()
        .map_err(|_| DeviceError::internal("rollout cache lock poisoned"))?
        .clone())
}

/// Records a single-model check-in and works out its full answer: roots newer than the
/// device's, the plan of [`rollout_for_one_model`] with the manifest of the device's slot and
/// any shadow manifest, and when to come back ([`poll_after`]).
fn answer_check_in(
    hub: &SharedHub,
    read: DeviceRead,
    report: &CheckIn,
) -> Result<Answer, DeviceError> {
    let now = unix_now();
    let device = record_check_in(hub, read, now, &Reported::of_one(report))?;
    let roots = roots_after(hub, report.root_version)?;
    let labels = labels_of(&device);
    let live = live_cache(hub)?;
    let running = report.active.as_ref().map(|active| active.name.as_str());
    let rollout = rollout_for_one_model(&live, &labels, running);
    Metrics::bump(&hub.metrics.check_ins, 1);
    Ok(Answer {
        hub_time: now,
        roots,
        documents: rollout.map(|rollout| Documents::for_device(rollout, &device, &labels)),
        poll_after_secs: poll_after(hub, rollout.as_slice()),
    })
}

async fn status(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let device = authenticate(&hub, &method, &uri, &headers, &body, Kept::ForGood)
        .await?
        .record;
    let report: StatusReport = outpost_protocol::decode(&body)?;
    let (kind, reason, outcome_kind) = match &report.status {
        Status::Downloaded => ("downloaded", String::new(), None),
        Status::Activating => ("activating", String::new(), None),
        Status::Committed => ("committed", String::new(), Some(OutcomeKind::Committed)),
        Status::Shadowing => ("shadowing", String::new(), Some(OutcomeKind::Shadowing)),
        Status::Failed { reason } => ("failed", reason.clone(), Some(OutcomeKind::Failed)),
        Status::RolledBack { reason } => ("rolled_back", reason.clone(), Some(OutcomeKind::Failed)),
        Status::Refused { reason } => ("refused", reason.clone(), Some(OutcomeKind::Failed)),
        Status::Stalled { reason } => ("stalled", reason.clone(), None),
    };
    // Only a report about the plan's own target decides the device's outcome in that rollout.
    let about_target = match (report.plan_sequence, &report.manifest) {
        (Some(sequence), Some(reference)) => hub
            .store
            .rollout(sequence)?
            .and_then(|rollout| super::engine::target_digest(&rollout))
            .is_some_and(|target| target == reference.manifest_sha256.0),
        _ => false,
    };
    let reason = keep_at_most(reason, MAX_EVENT_DETAIL);
    let now = unix_now();
    let outcome = outcome_kind
        .filter(|_| about_target)
        .map(|kind| OutcomeRecord {
            kind,
            at: now,
            reason: reason.clone(),
        });
    let event = EventRecord {
        at: now,
        kind: kind.to_owned(),
        plan_sequence: report.plan_sequence,
        model: report
            .manifest
            .as_ref()
            .map(|reference| (reference.name.clone(), reference.version)),
        detail: reason,
    };
    let now_running = match (&report.status, &report.manifest) {
        (Status::Committed, Some(reference)) => Some(RunningRecord {
            name: reference.name.clone(),
            version: reference.version,
            manifest_sha256: reference.manifest_sha256.0,
        }),
        _ => None,
    };
    hub.store.record_status(
        &device.id,
        report.plan_sequence,
        outcome.as_ref(),
        &event,
        now_running.as_ref(),
    )?;
    let pruned = hub
        .store
        .prune_events(&device.id, hub.config.retention.events_per_device)?;
    Metrics::bump(&hub.metrics.pruned_records, pruned);
    hub.store.flush().await?;
    Metrics::bump(&hub.metrics.status_reports, 1);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn telemetry(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let device = authenticate(&hub, &method, &uri, &headers, &body, Kept::ForGood)
        .await?
        .record;
    let mut batch: TelemetryBatch = outpost_protocol::decode(&body)?;
    if batch.windows.len() > MAX_WINDOWS {
        return Err(DeviceError::bad_request(format!(
            "batch has {} windows, at most {MAX_WINDOWS} are accepted",
            batch.windows.len()
        )));
    }
    let now = unix_now();
    let cutoff = now.saturating_sub(hub.config.retention.telemetry_secs);
    let mut published: HashMap<(String, u64), bool> = HashMap::new();
    let mut skipped = 0;
    let mut windows = Vec::with_capacity(batch.windows.len());
    // The index in the batch of each window in `windows`.
    let mut indices = Vec::with_capacity(batch.windows.len());
    for (index, window) in batch.windows.iter_mut().enumerate() {
        ModelName::new(&window.model).map_err(|error| {
            DeviceError::bad_request(format!("window {index}: model name: {error}"))
        })?;
        if window.latency_buckets.len() > LATENCY_BUCKETS_US.len() + 1 {
            return Err(DeviceError::bad_request(format!(
                "window {index}: {} latency buckets, at most {}",
                window.latency_buckets.len(),
                LATENCY_BUCKETS_US.len() + 1
            )));
        }
        if window.errors > window.count || window.end < window.start {
            return Err(DeviceError::bad_request(format!(
                "window {index}: counts or times do not add up"
            )));
        }
        if let Some(Err(reason)) = window.shadow.as_ref().map(|report| report.validate()) {
            return Err(DeviceError::bad_request(format!(
                "window {index} ({}@{} from {}): shadow report: {reason}",
                window.model, window.version, window.start
            )));
        }
        // A summary the hub would not store refuses the whole batch, so that nothing of it is
        // stored and the device learns which window is wrong.
        check_summary(&hub, window).map_err(|error| match error {
            SummaryError::Refused(reason) => DeviceError::bad_request(format!(
                "window {index} ({}@{} from {}): {reason}",
                window.model, window.version, window.start
            )),
            SummaryError::Internal(error) => DeviceError::internal(format!("{error:#}")),
        })?;
        // Acknowledged, not stored: the store keeps counters per published version only, so a
        // device cannot make it grow with names of its own; and what is past the retention
        // would only be pruned.
        let key = (window.model.clone(), window.version);
        let known = match published.get(&key) {
            Some(known) => *known,
            None => {
                let known = hub.store.has_manifest(&window.model, window.version)?;
                published.insert(key, known);
                known
            }
        };
        if !known || window.end < cutoff {
            skipped += 1;
            continue;
        }
        indices.push(index);
        windows.push(WindowInput {
            model: window.model.clone(),
            version: window.version,
            start: window.start,
            end: window.end,
            count: window.count,
            errors: window.errors,
            latency_buckets: window.latency_buckets.clone(),
            // Moved, not copied: a summary is most of a batch. The window keeps what names it.
            drift: window.drift.take(),
            shadow: window.shadow.clone(),
        });
    }
    let ingested = hub.store.ingest_telemetry(
        &device.id,
        batch.sequence,
        &windows,
        batch.dropped_records,
        now,
    )?;
    let duplicate = match ingested {
        Ingested::Stored => false,
        Ingested::Duplicate => true,
        Ingested::Refused { window, reason } => {
            let window = indices.get(window).copied().unwrap_or(window);
            let name = batch
                .windows
                .get(window)
                .map(|window| {
                    format!(
                        " ({}@{} from {})",
                        window.model, window.version, window.start
                    )
                })
                .unwrap_or_default();
            return Err(DeviceError::bad_request(format!(
                "window {window}{name}: {reason}"
            )));
        }
        Ingested::OutOfOrder { highest } => {
            return Err(DeviceError::bad_request(format!(
                "batch sequence {} is below {highest}, already stored for this device: a \
                 device's batch sequences only increase",
                batch.sequence
            )));
        }
    };
    hub.store.prune_batch_markers(&device.id, cutoff)?;
    hub.store.flush().await?;
    if duplicate {
        Metrics::bump(&hub.metrics.telemetry_duplicates, 1);
    } else {
        Metrics::bump(&hub.metrics.telemetry_batches, 1);
        Metrics::bump(&hub.metrics.telemetry_windows, windows.len() as u64);
        Metrics::bump(&hub.metrics.telemetry_windows_skipped, skipped);
    }
    reply(&TelemetryAck {
        sequence: batch.sequence,
        duplicate,
    })
}

/// Longest reason of a status report the hub keeps in the device's event, in bytes; the rest is
/// cut and counted.
const MAX_EVENT_DETAIL: usize = 1024;

/// `text` cut to at most `max` bytes at a character boundary, saying how much was cut.
fn keep_at_most(mut text: String, max: usize) -> String {
    if text.len() <= max {
        return text;
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    let cut = text.len() - end;
    text.truncate(end);
    text.push_str(&format!("… ({cut} more bytes not kept)"));
    text
}

/// Parses a single `bytes=START-` or `bytes=START-END` range against a file of `len` bytes.
fn parse_range(value: &str, len: u64) -> Option<(u64, u64)> {
    let spec = value.strip_prefix("bytes=")?;
    let (start, end) = spec.split_once('-')?;
    let start: u64 = start.trim().parse().ok()?;
    let end: u64 = match end.trim() {
        "" => len.checked_sub(1)?,
        end => end.parse::<u64>().ok()?.min(len.checked_sub(1)?),
    };
    (start <= end && start < len).then_some((start, end))
}

async fn artifact(
    State(hub): State<SharedHub>,
    Path(digest): Path<String>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
) -> Result<Response, DeviceError> {
    authenticate(&hub, &method, &uri, &headers, &[], Kept::InMemory).await?;
    let digest = Sha256::from_hex(&digest)
        .ok_or_else(|| DeviceError::bad_request("artifact name is not a hex sha256"))?;
    let path = hub.artifacts.path(&digest);
    let mut file = match tokio::fs::File::open(&path).await {
        Ok(file) => file,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
            return Err(DeviceError::new(
                StatusCode::NOT_FOUND,
                format!("no artifact {digest}"),
            ));
        }
        Err(error) => return Err(DeviceError::internal(error)),
    };
    let len = file.metadata().await.map_err(DeviceError::internal)?.len();
    let range = match headers.get(header::RANGE) {
        None => None,
        Some(value) => {
            let parsed = value.to_str().ok().and_then(|text| parse_range(text, len));
            if parsed.is_none() {
                return Ok((
                    StatusCode::RANGE_NOT_SATISFIABLE,
                    [(header::CONTENT_RANGE, format!("bytes */{len}"))],
                )
                    .into_response());
            }
            parsed
        }
    };
    let (start, end) = range.unwrap_or((0, len.saturating_sub(1)));
    let count = if len == 0 { 0 } else { end - start + 1 };
    file.seek(std::io::SeekFrom::Start(start))
        .await
        .map_err(DeviceError::internal)?;
    Metrics::bump(&hub.metrics.artifact_bytes_served, count);
    let body = Body::from_stream(tokio_util::io::ReaderStream::with_capacity(
        file.take(count),
        64 * 1024,
    ));
    let mut response = Response::builder()
        .header(header::CONTENT_TYPE, "application/octet-stream")
        .header(header::ACCEPT_RANGES, "bytes")
        .header(header::CONTENT_LENGTH, count);
    response = match range {
        Some(_) => response
            .status(StatusCode::PARTIAL_CONTENT)
            .header(header::CONTENT_RANGE, format!("bytes {start}-{end}/{len}")),
        None => response.status(StatusCode::OK),
    };
    response.body(body).map_err(DeviceError::internal)
}

#[cfg(test)]
mod tests {
    // Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
    #![allow(clippy::unwrap_used)]

    use std::sync::atomic::Ordering;

    use axum::http::Request;
    use outpost_protocol::keys::SecretKey;
    use outpost_protocol::trust::{AgentVersion, BreachAction, GatePolicy, ManifestRef, PlanBody};
    use tower::ServiceExt;

    use super::*;
    use crate::rollout::Rollout;
    use crate::server::{Hub, ServerConfig};

    const DEVICE: [u8; 16] = [3; 16];
    const POLL_SECS: u32 = 300;
    const ROLLOUT_POLL_SECS: u32 = 30;

    /// A hub with one enrolled device, labelled `site=lab`, whose key signs the requests.
    struct Fixture {
        _dir: tempfile::TempDir,
        hub: SharedHub,
        key: SecretKey,
    }

    impl Fixture {
        fn new() -> Fixture {
            let dir = tempfile::tempdir().unwrap();
            let hub = Hub::open(ServerConfig::for_tests(
                dir.path(),
                POLL_SECS,
                ROLLOUT_POLL_SECS,
            ))
            .unwrap();
            let key = SecretKey::from_seed([9; 32]);
            hub.store
                .put_device(&DeviceRecord {
                    id: DEVICE,
                    public_key: key.public().0,
                    arch: "x86_64".to_owned(),
                    agent_version: "0.3.0".to_owned(),
                    labels: vec![("site".to_owned(), "lab".to_owned())],
                    enrolled_at: 1,
                    revoked: false,
                    last_checkin: None,
                    state: "steady".to_owned(),
                    active: None,
                    plan_sequence: None,
                    dropped_records: 0,
                    queue_bytes: 0,
                    models: Vec::new(),
                    several_models: false,
                })
                .unwrap();
            Fixture {
                _dir: dir,
                hub,
                key,
            }
        }

        fn live(&self, rollouts: Vec<LiveRollout>) {
            self.live_with(rollouts, Vec::new());
        }

        fn live_with(&self, rollouts: Vec<LiveRollout>, retirements: Vec<LiveRetirement>) {
            *self.hub.live.write().unwrap() = Arc::new(Live {
                rollouts,
                retirements,
            });
        }

        fn device(&self) -> DeviceRecord {
            self.hub.store.device(&DEVICE).unwrap().unwrap()
        }

        /// Posts `message` to `path`, signed by the device, and returns the status and body.
        async fn post<M: Message>(&self, path: &str, message: &M) -> (StatusCode, Bytes) {
            let body = outpost_protocol::encode(message).unwrap();
            let timestamp = unix_now();
            let mut nonce = [0u8; 16];
            getrandom::getrandom(&mut nonce).unwrap();
            let signature = RequestToSign {
                method: "POST",
                path_and_query: path,
                body_sha256: sha256(&body),
                timestamp,
                nonce,
            }
            .sign(&self.key);
            let request = Request::post(path)
                .header(HEADER_DEVICE, hex::encode(DEVICE))
                .header(HEADER_TIMESTAMP, timestamp.to_string())
                .header(HEADER_NONCE, hex::encode(nonce))
                .header(HEADER_SIGNATURE, hex::encode(signature.0))
                .body(Body::from(body))
                .unwrap();
            let response = routes(self.hub.clone()).oneshot(request).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), usize::MAX)
                .await
                .unwrap();
            (status, body)
        }

        async fn models_check_in(&self, models: Vec<ModelCheckIn>) -> ModelsCheckInResponse {
            let (status, body) = self
                .post("/device/v3/checkin", &models_request(models))
                .await;
            assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
            outpost_protocol::decode(&body).unwrap()
        }

        /// A single-model agent's check-in, plain (`v1`) and held (`v2`, holding nothing): both
        /// must hand it the same plan. Returns that plan and the poll interval.
        async fn one_model_check_in(&self, active: Option<RunningModel>) -> (Option<ByteBuf>, u32) {
            let report = CheckIn {
                state: AgentState::Steady,
                active,
                root_version: 0,
                plan_sequence: None,
                agent_version: AgentVersion::parse("0.2.0").unwrap(),
                dropped_records: 0,
                queue_bytes: 0,
            };
            let (status, body) = self.post("/device/v1/checkin", &report).await;
            assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
            let plain: CheckInResponse = outpost_protocol::decode(&body).unwrap();
            let held = HeldCheckIn {
                check_in: report,
                held: None,
            };
            let (status, body) = self.post("/device/v2/checkin", &held).await;
            assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
            let HeldCheckInResponse::Full(full) = outpost_protocol::decode(&body).unwrap() else {
                panic!("a device holding nothing gets a full answer");
            };
            assert_eq!(full.plan, plain.plan);
            assert_eq!(full.poll_after_secs, plain.poll_after_secs);
            (plain.plan, plain.poll_after_secs)
        }
    }

    fn error_message(body: &[u8]) -> Option<String> {
        outpost_protocol::decode::<ErrorResponse>(body)
            .ok()
            .map(|error| error.message)
    }

    fn models_request(models: Vec<ModelCheckIn>) -> ModelsCheckIn {
        ModelsCheckIn {
            state: AgentState::Steady,
            models,
            root_version: 0,
            agent_version: AgentVersion::parse("0.3.0").unwrap(),
            dropped_records: 0,
            queue_bytes: 7,
        }
    }

    fn running(name: &str, version: u64) -> RunningModel {
        RunningModel {
            name: name.to_owned(),
            version,
            manifest_sha256: Sha256([version as u8; 32]),
        }
    }

    fn entry(name: &str, active: Option<u64>, held: Option<Sha256>) -> ModelCheckIn {
        ModelCheckIn {
            name: name.to_owned(),
            active: active.map(|version| running(name, version)),
            plan_sequence: None,
            held,
        }
    }

    fn document(text: String) -> Document {
        let bytes = text.into_bytes();
        Document {
            sha256: sha256(&bytes),
            bytes: Arc::new(bytes),
        }
    }

    /// Rollout `sequence` of `name@version` to every device labelled `site`, all at its one
    /// stage; its signed plan's bytes are `plan <sequence>`.
    fn rollout(sequence: u64, name: &str, version: u64, state: RolloutState) -> LiveRollout {
        rollout_at("lab", sequence, name, version, state)
    }

    fn rollout_at(
        site: &str,
        sequence: u64,
        name: &str,
        version: u64,
        state: RolloutState,
    ) -> LiveRollout {
        let plan = PlanBody {
            sequence,
            created: 0,
            expires: u64::MAX,
            target: ManifestRef {
                name: name.to_owned(),
                version,
                manifest_sha256: Sha256([version as u8; 32]),
            },
            fallback: None,
            stages: vec![100],
            selector: vec![Label::new("site", site).unwrap()],
            gates: GatePolicy {
                bake_secs: 60,
                device_timeout_secs: 600,
                max_failure_pct: 5.0,
                max_error_rate: 0.02,
                max_p95_regression_pct: 20.0,
                max_drift_psi: None,
                on_breach: BreachAction::Pause,
                auto_advance: true,
            },
            shadow: None,
        };
        LiveRollout {
            sequence,
            rollout: Rollout {
                plan,
                state,
                stage_index: 0,
                stage_started: vec![0],
            },
            signed_plan: document(format!("plan {sequence}")),
            target_manifest: document(format!("manifest {name}@{version}")),
            fallback_manifest: None,
            target_min_agent: AgentVersion::parse("0.1.0").unwrap(),
        }
    }

    /// The plan of each full answer by its bytes, and the name of each unchanged one.
    fn shown(answers: &[ModelAnswer]) -> Vec<String> {
        answers
            .iter()
            .map(|answer| match answer {
                ModelAnswer::Unchanged { name } => format!("unchanged {name}"),
                ModelAnswer::Full { plan, .. } => String::from_utf8(plan.to_vec()).unwrap(),
            })
            .collect()
    }

    /// Issue 20: each model name is answered by its own latest rollout that applies to the
    /// device, side by side; an older rollout of a model, and one whose selector leaves the
    /// device out, are not.
    #[tokio::test]
    async fn a_models_check_in_is_answered_by_the_latest_rollout_of_each_model() {
        let fixture = Fixture::new();
        fixture.live(vec![
            rollout(1, "iris", 1, RolloutState::Completed),
            rollout(2, "vad", 1, RolloutState::Active),
            rollout(3, "iris", 2, RolloutState::Completed),
            rollout_at("elsewhere", 4, "vad", 2, RolloutState::Active),
            rollout_at("elsewhere", 5, "kws", 1, RolloutState::Active),
        ]);
        let answer = fixture
            .models_check_in(vec![
                entry("vad", None, None),
                entry("iris", Some(1), None),
                // Runs a model no plan applies to: no entry, and the device keeps it.
                entry("kws", Some(3), None),
            ])
            .await;
        assert_eq!(shown(&answer.models), ["plan 3", "plan 2"]);
        let ModelAnswer::Full { manifest, .. } = &answer.models[0] else {
            unreachable!()
        };
        assert_eq!(
            manifest
                .as_ref()
                .map(|(slot, bytes)| (*slot, bytes.to_vec())),
            Some((Slot::Target, b"manifest iris@2".to_vec()))
        );
        // Rollout 2 of vad is active: the device comes back soon.
        assert_eq!(answer.poll_after_secs, ROLLOUT_POLL_SECS);
        assert!(answer.roots.is_empty());

        // The device record lists every model it runs, by name; `active` is the first entry's
        // that runs one.
        let device = fixture.device();
        let names: Vec<(&str, u64)> = device
            .models
            .iter()
            .map(|model| (model.name.as_str(), model.version))
            .collect();
        assert_eq!(names, [("iris", 1), ("kws", 3)]);
        assert_eq!(device.active.map(|active| active.name), Some("iris".into()));
        assert_eq!(device.queue_bytes, 7);
        assert!(device.last_checkin.is_some());

        // With no active or paused rollout left, the quiet interval.
        fixture.live(vec![rollout(3, "iris", 2, RolloutState::Completed)]);
        let answer = fixture
            .models_check_in(vec![entry("iris", Some(2), None)])
            .await;
        assert_eq!(shown(&answer.models), ["plan 3"]);
        assert_eq!(answer.poll_after_secs, POLL_SECS);
    }

    /// Each model is "unchanged" on its own, when the device holds exactly that model's
    /// documents, and in full otherwise; a newer root sends every model in full.
    #[tokio::test]
    async fn each_model_is_unchanged_only_when_the_device_holds_its_documents() {
        let fixture = Fixture::new();
        fixture.live(vec![
            rollout(1, "iris", 1, RolloutState::Active),
            rollout(2, "vad", 1, RolloutState::Completed),
        ]);
        let first = fixture
            .models_check_in(vec![entry("iris", None, None), entry("vad", None, None)])
            .await;
        assert_eq!(shown(&first.models), ["plan 1", "plan 2"]);
        let held: Vec<Sha256> = first
            .models
            .iter()
            .map(|answer| answer.held_digest().unwrap())
            .collect();
        let unchanged_before = fixture
            .hub
            .metrics
            .check_ins_unchanged
            .load(Ordering::Relaxed);

        let both = vec![
            entry("iris", Some(1), Some(held[0])),
            entry("vad", Some(1), Some(held[1])),
        ];
        let answer = fixture.models_check_in(both.clone()).await;
        assert_eq!(shown(&answer.models), ["unchanged iris", "unchanged vad"]);
        assert_eq!(answer.poll_after_secs, ROLLOUT_POLL_SECS);
        assert_eq!(
            fixture
                .hub
                .metrics
                .check_ins_unchanged
                .load(Ordering::Relaxed),
            unchanged_before + 1
        );

        // vad holds iris's documents: only iris is unchanged, and the check-in is not.
        let answer = fixture
            .models_check_in(vec![
                entry("iris", Some(1), Some(held[0])),
                entry("vad", Some(1), Some(held[0])),
            ])
            .await;
        assert_eq!(shown(&answer.models), ["unchanged iris", "plan 2"]);
        assert_eq!(
            fixture
                .hub
                .metrics
                .check_ins_unchanged
                .load(Ordering::Relaxed),
            unchanged_before + 1
        );

        // A newer rollout of vad: vad's documents changed, iris's did not.
        fixture.live(vec![
            rollout(1, "iris", 1, RolloutState::Active),
            rollout(2, "vad", 1, RolloutState::Superseded),
            rollout(3, "vad", 2, RolloutState::Active),
        ]);
        let answer = fixture.models_check_in(both.clone()).await;
        assert_eq!(shown(&answer.models), ["unchanged iris", "plan 3"]);

        // A root newer than the device's comes with every model's documents.
        fixture.hub.store.put_root(2, b"root 2").unwrap();
        let answer = fixture.models_check_in(both).await;
        assert_eq!(shown(&answer.models), ["plan 1", "plan 3"]);
        assert_eq!(answer.roots, [ByteBuf::from(b"root 2".to_vec())]);
    }

    /// More models with a rollout for the device than an answer carries: the models the device
    /// named come first, then the others by name.
    #[test]
    fn an_answer_carries_the_models_the_device_named_first() {
        let live = Live {
            rollouts: (0..MAX_DEVICE_MODELS as u64 + 2)
                .map(|n| rollout(n + 1, &format!("model-{n:02}"), 1, RolloutState::Active))
                .collect(),
            retirements: Vec::new(),
        };
        let labels = [Label::new("site", "lab").unwrap()];
        let names = |reported: &[&str]| -> Vec<String> {
            latest_per_model(&live, &labels, reported)
                .iter()
                .map(|word| word.model().to_owned())
                .collect()
        };
        let all = names(&[]);
        assert_eq!(all.len(), MAX_DEVICE_MODELS);
        assert_eq!(all.last().map(String::as_str), Some("model-15"));
        let with_named = names(&["model-17", "model-03"]);
        assert_eq!(with_named.len(), MAX_DEVICE_MODELS);
        assert!(with_named.contains(&"model-17".to_owned()));
        assert!(!with_named.contains(&"model-15".to_owned()));
        assert_eq!(with_named.first().map(String::as_str), Some("model-00"));
    }

    /// The hub refuses a models check-in that does not add up, naming what is wrong, before it
    /// records anything of it.
    #[tokio::test]
    async fn a_models_check_in_that_does_not_add_up_is_refused() {
        let fixture = Fixture::new();
        let too_many = (0..=MAX_DEVICE_MODELS)
            .map(|n| entry(&format!("model-{n}"), Some(1), None))
            .collect();
        let mismatched = ModelCheckIn {
            active: Some(running("vad", 1)),
            ..entry("iris", None, None)
        };
        let cases: [(Vec<ModelCheckIn>, &str); 4] = [
            (
                too_many,
                "check-in names 17 models, at most 16 are accepted",
            ),
            (
                vec![
                    entry("iris", Some(1), None),
                    entry("vad", None, None),
                    entry("iris", Some(2), None),
                ],
                "model \"iris\" has two entries: one entry per model",
            ),
            (
                vec![entry("vad", None, None), mismatched],
                "the entry of model \"iris\" runs model \"vad\"",
            ),
            (
                vec![entry("../x", None, None)],
                "model entry 0: name \"../x\"",
            ),
        ];
        for (models, expected) in cases {
            let (status, body) = fixture
                .post("/device/v3/checkin", &models_request(models))
                .await;
            assert_eq!(status, StatusCode::BAD_REQUEST);
            let message = error_message(&body).unwrap();
            assert!(message.contains(expected), "{message:?} lacks {expected:?}");
        }
        assert_eq!(fixture.device().last_checkin, None);
        assert_eq!(fixture.hub.metrics.check_ins.load(Ordering::Relaxed), 0);
    }

    /// Issue 20: an agent that runs one model (`/device/v1` and `/device/v2`) follows only the
    /// rollouts of that model, however much newer another model's rollout is; one running
    /// nothing yet follows the latest rollout that applies, of any model.
    #[tokio::test]
    async fn an_agent_running_one_model_keeps_it_whatever_other_models_roll_out() {
        let fixture = Fixture::new();
        fixture.live(vec![
            rollout(1, "iris", 2, RolloutState::Completed),
            rollout(2, "vad", 1, RolloutState::Active),
        ]);
        assert_eq!(
            fixture.one_model_check_in(Some(running("iris", 1))).await,
            (Some(ByteBuf::from(b"plan 1".to_vec())), POLL_SECS)
        );
        let device = fixture.device();
        assert_eq!(device.active.as_ref().map(|active| active.version), Some(1));
        assert_eq!(device.models, device.active.into_iter().collect::<Vec<_>>());

        assert_eq!(
            fixture.one_model_check_in(None).await,
            (Some(ByteBuf::from(b"plan 2".to_vec())), ROLLOUT_POLL_SECS)
        );
        assert!(fixture.device().models.is_empty());

        // A model no rollout moves: no plan, and the quiet interval.
        assert_eq!(
            fixture.one_model_check_in(Some(running("kws", 1))).await,
            (None, POLL_SECS)
        );
    }

    /// Retirement `sequence` of `name` on every device labelled `site`; its signed bytes are
    /// `retire <sequence>`.
    fn retirement_at(site: &str, sequence: u64, name: &str) -> LiveRetirement {
        LiveRetirement {
            sequence,
            model: name.to_owned(),
            selector: vec![Label::new("site", site).unwrap()],
            signed: document(format!("retire {sequence}")),
        }
    }

    fn retirement(sequence: u64, name: &str) -> LiveRetirement {
        retirement_at("lab", sequence, name)
    }

    /// Issue 20: a retirement is the latest signed word about its model for the devices it
    /// selects, sent alone where the plan goes, and touches no other model; held, it is
    /// "unchanged"; and it never shortens the poll interval.
    #[tokio::test]
    async fn a_retirement_answers_for_its_model_only_and_unchanged_when_held() {
        let fixture = Fixture::new();
        fixture.live_with(
            vec![
                rollout(1, "iris", 1, RolloutState::Completed),
                rollout(2, "vad", 1, RolloutState::Completed),
                rollout(5, "kws", 1, RolloutState::Completed),
            ],
            vec![
                retirement(3, "iris"),
                // Older than kws's rollout: the rollout is the latest word.
                retirement(4, "kws"),
                // Leaves this device out.
                retirement_at("elsewhere", 6, "vad"),
            ],
        );
        let models = vec![
            entry("iris", Some(1), None),
            entry("vad", Some(1), None),
            entry("kws", Some(1), None),
        ];
        let answer = fixture.models_check_in(models).await;
        assert_eq!(shown(&answer.models), ["retire 3", "plan 5", "plan 2"]);
        let ModelAnswer::Full {
            manifest, shadow, ..
        } = &answer.models[0]
        else {
            unreachable!()
        };
        assert_eq!((manifest, shadow), (&None, &None));
        assert_eq!(answer.poll_after_secs, POLL_SECS);

        // The device holds the retirement: "unchanged", by the digest of its bytes alone.
        let held = answer.models[0].held_digest().unwrap();
        assert_eq!(held, held_digest(&sha256(b"retire 3"), None, None));
        let holding = vec![entry("iris", None, Some(held)), entry("vad", Some(1), None)];
        let answer = fixture.models_check_in(holding.clone()).await;
        assert_eq!(
            shown(&answer.models),
            ["unchanged iris", "plan 5", "plan 2"]
        );

        // A device the retirement leaves out is still answered by the model's rollout.
        fixture.live_with(
            vec![rollout(1, "iris", 1, RolloutState::Completed)],
            vec![retirement_at("elsewhere", 3, "iris")],
        );
        let answer = fixture.models_check_in(holding).await;
        assert_eq!(shown(&answer.models), ["plan 1"]);
    }

    /// Issue 20: a rollout of a retired model signed after its retirement is the latest word
    /// again: the model comes back, and the device follows the rollout's stages.
    #[tokio::test]
    async fn a_rollout_after_a_retirement_brings_the_model_back() {
        let fixture = Fixture::new();
        let held = held_digest(&sha256(b"retire 3"), None, None);
        fixture.live_with(
            vec![
                rollout(1, "iris", 1, RolloutState::Superseded),
                rollout(5, "iris", 2, RolloutState::Active),
            ],
            vec![retirement(3, "iris")],
        );
        let answer = fixture
            .models_check_in(vec![entry("iris", None, Some(held))])
            .await;
        assert_eq!(shown(&answer.models), ["plan 5"]);
        assert_eq!(answer.poll_after_secs, ROLLOUT_POLL_SECS);
    }

    /// Issue 20: agents of one model (`/device/v1`, `/device/v2`) cannot read a retirement and
    /// are never sent one: one running the retired model keeps it under its latest plan, and one
    /// running none is not handed a model retired for it.
    #[tokio::test]
    async fn an_agent_of_one_model_is_never_sent_a_retirement() {
        let fixture = Fixture::new();
        fixture.live_with(
            vec![
                rollout(1, "vad", 1, RolloutState::Completed),
                rollout(2, "iris", 1, RolloutState::Completed),
            ],
            vec![retirement(3, "iris")],
        );
        assert_eq!(
            fixture.one_model_check_in(Some(running("iris", 1))).await,
            (Some(ByteBuf::from(b"plan 2".to_vec())), POLL_SECS)
        );
        assert_eq!(
            fixture.one_model_check_in(None).await,
            (Some(ByteBuf::from(b"plan 1".to_vec())), POLL_SECS)
        );
        fixture.live_with(
            vec![rollout(2, "iris", 1, RolloutState::Completed)],
            vec![retirement(3, "iris")],
        );
        assert_eq!(fixture.one_model_check_in(None).await, (None, POLL_SECS));
    }

    /// Retired models count toward the answer's cap like models under a rollout.
    #[test]
    fn retired_models_count_toward_the_cap() {
        let live = Live {
            rollouts: (0..MAX_DEVICE_MODELS as u64)
                .map(|n| rollout(n + 1, &format!("model-{n:02}"), 1, RolloutState::Active))
                .collect(),
            retirements: vec![retirement(100, "model-16"), retirement(101, "model-17")],
        };
        let labels = [Label::new("site", "lab").unwrap()];
        let latest = latest_per_model(&live, &labels, &["model-17"]);
        assert_eq!(latest.len(), MAX_DEVICE_MODELS);
        let names: Vec<(&str, u64)> = latest
            .iter()
            .map(|word| (word.model(), word.sequence()))
            .collect();
        assert!(names.contains(&("model-17", 101)), "{names:?}");
        assert!(
            !names.iter().any(|(name, _)| *name == "model-16"),
            "{names:?}"
        );
    }

    #[test]
    fn ranges() {
        assert_eq!(parse_range("bytes=0-", 10), Some((0, 9)));
        assert_eq!(parse_range("bytes=4-", 10), Some((4, 9)));
        assert_eq!(parse_range("bytes=2-5", 10), Some((2, 5)));
        assert_eq!(parse_range("bytes=2-50", 10), Some((2, 9)));
        assert_eq!(parse_range("bytes=10-", 10), None);
        assert_eq!(parse_range("bytes=5-2", 10), None);
        assert_eq!(parse_range("items=0-1", 10), None);
        assert_eq!(parse_range("bytes=-5", 10), None);
    }
}
