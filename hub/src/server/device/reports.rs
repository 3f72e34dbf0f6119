//! What devices report: status reports (`/device/v1/status`), which move a device's outcome in a
//! rollout and its events, runtime reports (`/device/v3/runtimes`), which inference runtime
//! serves each model it runs, and telemetry batches (`/device/v1/telemetry`) of inference windows.

use std::collections::{BTreeSet, HashMap};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use outpost_protocol::device::{
    RuntimeReport, Status, StatusReport, TelemetryAck, TelemetryBatch, LATENCY_BUCKETS_US,
};
use outpost_protocol::ModelName;

use super::request::{authenticate, reply, signed_request, DeviceError, Kept};
use crate::server::drift::{check_summary, is_published, SummaryError};
use crate::server::metrics::Metrics;
use crate::server::SharedHub;
use crate::store::{
    EventRecord, Ingested, ModelRuntimeRecord, OutcomeKind, OutcomeRecord, RunningRecord,
    RuntimeReportRecord, WindowInput,
};
use crate::unix_now;

/// Most windows one telemetry batch may carry.
const MAX_WINDOWS: usize = 4096;

pub(super) async fn status(
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
            .rollout(sequence)
            .await?
            .and_then(|rollout| crate::server::engine::target_digest(&rollout))
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
    hub.store
        .record_status(
            &device.id,
            report.plan_sequence,
            outcome.as_ref(),
            &event,
            now_running.as_ref(),
        )
        .await?;
    let pruned = hub
        .store
        .prune_events(&device.id, hub.config.retention.events_per_device)
        .await?;
    Metrics::bump(&hub.metrics.pruned_records, pruned);
    hub.store.flush().await?;
    Metrics::bump(&hub.metrics.status_reports, 1);
    Ok(StatusCode::NO_CONTENT.into_response())
}

/// Keeps the device's latest runtime report, for operators to see; it decides nothing. Every
/// entry must be a model version the hub knows the device runs (from its check-ins and committed
/// status reports), so a device cannot fill the store or `/metrics` with names of its own. A
/// report the device dated before the one stored is acknowledged and dropped.
pub(super) async fn runtimes(
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
    let report: RuntimeReport = outpost_protocol::decode(&body)?;
    report
        .validate()
        .map_err(|error| DeviceError::bad_request(format!("runtime report: {error}")))?;
    let running = device.running();
    if let Some(entry) = report.models.iter().find(|entry| {
        !running
            .iter()
            .any(|model| model.name == entry.name && model.version == entry.version)
    }) {
        let known: Vec<String> = running
            .iter()
            .map(|model| format!("{}@{}", model.name, model.version))
            .collect();
        return Err(DeviceError::bad_request(format!(
            "runtime report: model {}@{} is not one the hub knows the device runs (it runs {}): \
             report a model's runtime after the check-in or committed status report that names it",
            entry.name,
            entry.version,
            if known.is_empty() {
                "none".to_owned()
            } else {
                known.join(", ")
            }
        )));
    }
    let record = RuntimeReportRecord {
        at: report.at,
        models: report
            .models
            .into_iter()
            .map(|entry| ModelRuntimeRecord {
                name: entry.name,
                version: entry.version,
                runtime: entry.runtime.as_str().to_owned(),
                runtime_version: entry.runtime_version,
                providers: entry.providers,
                fallback: entry.fallback,
            })
            .collect(),
    };
    if !hub.store.put_runtimes(&device.id, &record).await? {
        log::debug!(
            "device {}: runtime report of {} dropped, a later one is stored",
            hex::encode(device.id),
            record.at
        );
    }
    hub.store.flush().await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

pub(super) async fn telemetry(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let device = authenticate(&hub, &method, &uri, &headers, &body, Kept::WithTheWrite)
        .await?
        .record;
    let signed = signed_request(&device.id, &headers)?;
    let mut batch: TelemetryBatch = outpost_protocol::decode(&body)?;
    if batch.windows.len() > MAX_WINDOWS {
        return Err(DeviceError::bad_request(format!(
            "batch has {} windows, at most {MAX_WINDOWS} are accepted",
            batch.windows.len()
        )));
    }
    // Each summary's frame, which the store keeps, cut from the request rather than encoded again.
    let mut cut = batch.drift_frames(&body).unwrap_or_default();
    let now = unix_now();
    let cutoff = now.saturating_sub(hub.config.retention.telemetry_secs);
    let mut published: HashMap<(String, u64), bool> = HashMap::new();
    let mut skipped = 0;
    // Each window stored, with its summary's frame.
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
        let frame = cut.get_mut(index).and_then(Option::take);
        let frame = check_summary(&hub, window, frame)
            .await
            .map_err(|error| match error {
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
                let known = is_published(&hub, &window.model, window.version)
                    .await
                    .map_err(|error| DeviceError::internal(format!("{error:#}")))?;
                published.insert(key, known);
                known
            }
        };
        if !known || window.end < cutoff {
            skipped += 1;
            continue;
        }
        indices.push(index);
        let input = WindowInput {
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
        };
        windows.push((input, frame));
    }
    let stored_windows = windows.len() as u64;
    let models: BTreeSet<String> = windows
        .iter()
        .map(|(window, _)| window.model.clone())
        .collect();
    let ingested = hub
        .store
        .ingest_signed_telemetry(
            &signed,
            &crate::server::fleet::labels_of(&device),
            batch.sequence,
            windows,
            batch.dropped_records,
            now,
        )
        .await?;
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
    // No flush: the batch and the request's note are durable once ingested.
    if duplicate {
        Metrics::bump(&hub.metrics.telemetry_duplicates, 1);
    } else {
        Metrics::bump(&hub.metrics.telemetry_batches, 1);
        Metrics::bump(&hub.metrics.telemetry_windows, stored_windows);
        Metrics::bump(&hub.metrics.telemetry_windows_skipped, skipped);
        // The models' alert rules are evaluated off this request, on what is now stored.
        hub.alerts.touch(models);
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

#[cfg(test)]
mod tests;
