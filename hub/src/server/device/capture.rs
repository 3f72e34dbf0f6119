//! Data capture on the device API: the signed allowances of the models a device runs
//! (`/device/v3/capture`), and uploads of sealed samples (`/device/v3/captures`).
//!
//! The hub only relays allowances: it serves the latest one an operator uploaded of each model
//! asked about, and the device verifies it against its own root. Samples arrive sealed to the
//! operator's key; the hub checks what it can see (a model version the device runs, an allowance
//! it holds, sizes) and stores the sealed bytes as they came.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use outpost_protocol::capture::{
    CaptureAck, CaptureAllowances, CaptureRequest, CaptureUpload, MAX_CAPTURE_BATCH, SEAL_OVERHEAD,
};
use outpost_protocol::device::MAX_DEVICE_MODELS;
use outpost_protocol::trust::MAX_CAPTURE_SAMPLE_BYTES;
use serde_bytes::ByteBuf;

use super::request::{authenticate, reply, DeviceError, Kept};
use crate::server::SharedHub;
use crate::store::CaptureInsert;
use crate::unix_now;

/// Answers with the latest stored allowance of each model the device asks about and runs.
pub(super) async fn allowances(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let request: CaptureRequest = outpost_protocol::decode(&body)?;
    if request.models.len() > MAX_DEVICE_MODELS {
        return Err(DeviceError::bad_request(format!(
            "capture request names {} models, at most {MAX_DEVICE_MODELS} are answered",
            request.models.len()
        )));
    }
    let mut allowances = Vec::new();
    for model in &request.models {
        if request.models.iter().filter(|name| *name == model).count() > 1 {
            return Err(DeviceError::bad_request(format!(
                "capture request names model {model} twice"
            )));
        }
        if let Some(record) = hub.store.latest_capture_allowance(model).await? {
            allowances.push(ByteBuf::from(record.signed));
        }
    }
    reply(&CaptureAllowances { allowances })
}

/// Stores a batch of sealed samples: each of a model version the device runs, under an
/// allowance of that model the hub holds, of a size a sealed sample can have. One bad sample
/// refuses the batch with 400 naming it, and nothing of it is stored.
pub(super) async fn upload(
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
    let upload: CaptureUpload = outpost_protocol::decode(&body)?;
    if upload.samples.len() > MAX_CAPTURE_BATCH {
        return Err(DeviceError::bad_request(format!(
            "capture upload has {} samples, at most {MAX_CAPTURE_BATCH} are accepted",
            upload.samples.len()
        )));
    }
    let running = device.running();
    let allowances = hub.store.capture_allowances().await?;
    let mut samples = Vec::with_capacity(upload.samples.len());
    for (index, sample) in upload.samples.into_iter().enumerate() {
        let named = format!("sample {index} ({}@{})", sample.model, sample.version);
        if !running
            .iter()
            .any(|model| model.name == sample.model && model.version == sample.version)
        {
            return Err(DeviceError::bad_request(format!(
                "capture upload: {named} is not of a model version the hub knows the device runs"
            )));
        }
        if !allowances
            .iter()
            .any(|record| record.model == sample.model && record.sequence == sample.allowance)
        {
            return Err(DeviceError::bad_request(format!(
                "capture upload: {named} names allowance {}, which this hub does not hold",
                sample.allowance
            )));
        }
        if sample.sealed.len() < SEAL_OVERHEAD || sample.sealed.len() > MAX_CAPTURE_SAMPLE_BYTES {
            return Err(DeviceError::bad_request(format!(
                "capture upload: {named} is {} sealed bytes, not {SEAL_OVERHEAD} to \
                 {MAX_CAPTURE_SAMPLE_BYTES}",
                sample.sealed.len()
            )));
        }
        samples.push(CaptureInsert {
            sample_id: sample.id,
            model: sample.model,
            version: sample.version,
            allowance: sample.allowance,
            captured_at: sample.captured_at,
            sealed: sample.sealed,
        });
    }
    let added = hub
        .store
        .insert_captures(&device.id, unix_now(), &samples)
        .await?;
    hub.store.flush().await?;
    if upload.dropped > 0 {
        log::warn!(
            "device {}: dropped {} captured samples on the device (its queue or cache was full)",
            hex::encode(device.id),
            upload.dropped
        );
    }
    log::debug!(
        "device {}: stored {added} of {} captured samples",
        hex::encode(device.id),
        samples.len()
    );
    reply(&CaptureAck {
        stored: samples.len() as u32,
    })
}

#[cfg(test)]
mod tests;
