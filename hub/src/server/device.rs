//! The device API: postcard over HTTP(S), under `/device/v1`.
//!
//! Enrollment is authorised by an enrollment token. Every other request is signed by the device's
//! own key over method, path, body hash, timestamp and nonce ([`outpost_protocol::auth`]); the
//! hub refuses stale timestamps, replayed nonces, unknown and revoked devices, each with its own
//! reason. Errors are postcard [`ErrorResponse`]s with the matching HTTP status.

use std::collections::HashMap;

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
    held_digest, CheckIn, CheckInResponse, DeviceId, EnrollRequest, EnrollResponse, ErrorResponse,
    HeldCheckIn, HeldCheckInResponse, Status, StatusReport, TelemetryAck, TelemetryBatch,
    LATENCY_BUCKETS_US,
};
use outpost_protocol::keys::SignatureBytes;
use outpost_protocol::trust::Slot;
use outpost_protocol::{sha256, Message, ModelName, PreparedKey, PublicKey, Sha256};
use serde_bytes::ByteBuf;
use tokio::io::{AsyncReadExt, AsyncSeekExt};
use tower_http::timeout::TimeoutLayer;

use super::drift::{check_summary, SummaryError};
use super::engine::Document;
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

/// A check-in's answer before it is encoded: the signed documents stay shared, and their digests
/// are the ones worked out when the rollout cache was built.
struct Answer {
    hub_time: u64,
    roots: Vec<ByteBuf>,
    plan: Option<Document>,
    manifest: Option<(Slot, Document)>,
    shadow: Option<Document>,
    poll_after_secs: u32,
}

impl Answer {
    /// [`CheckInResponse::held_digest`] of the response this answer becomes, without hashing the
    /// documents again.
    fn held_digest(&self) -> Option<Sha256> {
        Some(held_digest(
            &self.plan.as_ref()?.sha256,
            self.manifest
                .as_ref()
                .map(|(slot, document)| (*slot, &document.sha256)),
            self.shadow.as_ref().map(|document| &document.sha256),
        ))
    }

    fn into_response(self) -> CheckInResponse {
        let bytes = |document: Document| ByteBuf::from(document.bytes.as_ref().clone());
        CheckInResponse {
            hub_time: self.hub_time,
            roots: self.roots,
            plan: self.plan.map(bytes),
            manifest: self
                .manifest
                .map(|(slot, document)| (slot, bytes(document))),
            poll_after_secs: self.poll_after_secs,
            shadow: self.shadow.map(bytes),
        }
    }
}

/// Records a check-in and works out the full answer: roots newer than the device's, the plan that
/// applies to it with the manifest of its slot and any shadow manifest, and when to come back —
/// soon while that plan's rollout is active or paused, so the device follows its stages, and
/// after the quiet interval otherwise.
fn answer_check_in(
    hub: &SharedHub,
    read: DeviceRead,
    report: &CheckIn,
) -> Result<Answer, DeviceError> {
    let now = unix_now();
    // Check-in state is refreshed by the next check-in, so it is not flushed on its own: the store
    // flushes on a short timer and before every acknowledged write.
    let device = hub
        .store
        .update_device(read, |device| {
            device.last_checkin = Some(now);
            device.state = DeviceState::reported(report.state).as_str().to_owned();
            device.active = report.active.as_ref().map(|running| RunningRecord {
                name: running.name.clone(),
                version: running.version,
                manifest_sha256: running.manifest_sha256.0,
            });
            device.plan_sequence = report.plan_sequence;
            device.agent_version = report.agent_version.to_string();
            device.queue_bytes = report.queue_bytes;
        })?
        .ok_or_else(|| DeviceError::internal("the device's record vanished during its check-in"))?;

    let roots = hub
        .store
        .roots_after(report.root_version)?
        .into_iter()
        .map(|(_, bytes)| ByteBuf::from(bytes))
        .collect();
    let labels = labels_of(&device);
    let live = hub
        .live
        .read()
        .map_err(|_| DeviceError::internal("rollout cache lock poisoned"))?
        .clone();
    let id = DeviceId(device.id);
    let mut plan = None;
    let mut manifest = None;
    let mut shadow = None;
    let mut poll_after_secs = hub.config.poll_secs;
    if let Some(rollout) = live
        .iter()
        .rev()
        .find(|rollout| rollout.applies_to(&labels))
    {
        if matches!(
            rollout.rollout.state,
            RolloutState::Active | RolloutState::Paused
        ) {
            poll_after_secs = hub.config.rollout_poll_secs;
        }
        plan = Some(rollout.signed_plan.clone());
        let too_old = super::engine::agent_too_old(&device.agent_version, rollout.target_min_agent);
        let slot = crate::rollout::slot_for(&rollout.rollout, &id, &labels);
        manifest = match crate::rollout::offered(&rollout.rollout, slot, too_old) {
            Some(Slot::Target) => Some((Slot::Target, rollout.target_manifest.clone())),
            Some(Slot::Fallback) => rollout
                .fallback_manifest
                .clone()
                .map(|document| (Slot::Fallback, document)),
            None => None,
        };
        if !too_old && crate::rollout::shadow_for(&rollout.rollout, &id, &labels) {
            shadow = Some(rollout.target_manifest.clone());
        }
    }
    Metrics::bump(&hub.metrics.check_ins, 1);
    Ok(Answer {
        hub_time: now,
        roots,
        plan,
        manifest,
        poll_after_secs,
        shadow,
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
    use super::parse_range;

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
