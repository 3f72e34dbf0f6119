//! What every device handler shares: [`authenticate`], which checks a signed request and finds
//! its device, the [`KeyCache`] it verifies with, and [`DeviceError`] and [`reply`], the postcard
//! answers. It names no handler, so the handler files and the routes all stand on it.

use std::collections::HashMap;

use axum::extract::rejection::BytesRejection;
use axum::http::{header, HeaderMap, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use outpost_protocol::auth::{
    RequestToSign, HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
    MAX_CLOCK_SKEW_SECS,
};
use outpost_protocol::device::ErrorResponse;
use outpost_protocol::keys::SignatureBytes;
use outpost_protocol::{sha256, Message, PreparedKey, PublicKey};

use crate::server::nonces::{self, NonceRefusal};
use crate::server::SharedHub;
use crate::store::{DeviceRead, DeviceRecord, NonceNote, SignedRequest};
use crate::unix_now;

/// Most device keys kept decompressed; past this the cache starts over (about 200 bytes each).
const MAX_PREPARED_KEYS: usize = 1_000_000;

/// A refusal or failure, sent as a postcard [`ErrorResponse`].
#[derive(Debug)]
pub(super) struct DeviceError {
    status: StatusCode,
    message: String,
}

impl DeviceError {
    pub(super) fn new(status: StatusCode, message: impl Into<String>) -> DeviceError {
        DeviceError {
            status,
            message: message.into(),
        }
    }

    pub(super) fn unauthorized(message: impl Into<String>) -> DeviceError {
        DeviceError::new(StatusCode::UNAUTHORIZED, message)
    }

    pub(super) fn bad_request(message: impl Into<String>) -> DeviceError {
        DeviceError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(super) fn internal(error: impl std::fmt::Display) -> DeviceError {
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

pub(super) fn reply<M: Message>(message: &M) -> Result<Response, DeviceError> {
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
pub(super) enum Kept {
    /// Noted in the store before [`authenticate`] returns.
    ForGood,
    /// Kept for good too, but noted by the handler in the transaction of its own write, which
    /// is durable before it answers (a telemetry batch: `Store::ingest_signed_telemetry`), with
    /// the [`signed_request`] of the request.
    WithTheWrite,
    InMemory,
}

/// The note of an authenticated request that [`Kept::WithTheWrite`] leaves to its handler.
pub(super) fn signed_request(
    device: &[u8; 16],
    headers: &HeaderMap,
) -> Result<SignedRequest, DeviceError> {
    Ok(SignedRequest {
        device: *device,
        timestamp: header_str(headers, HEADER_TIMESTAMP)?
            .parse()
            .map_err(|_| {
                DeviceError::unauthorized(format!("{HEADER_TIMESTAMP} is not a number"))
            })?,
        nonce: header_hex(headers, HEADER_NONCE)?,
    })
}

/// Checks a signed device request and returns the device that sent it.
pub(super) async fn authenticate(
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
    let Some(read) = hub.store.device_read(&device_id).await? else {
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
    // Hubs sharing a database share their nonces too: a request replayed to another hub within
    // the skew window is refused there as well.
    let fresh = fresh
        && (!hub.store.shared() || {
            // The quota counts the device's requests to every hub: one spreading them over N
            // hubs gets no more than one sending them all to one.
            let forget_after = timestamp.saturating_add(MAX_CLOCK_SKEW_SECS);
            match hub
                .store
                .note_nonce(
                    &device_id,
                    &nonce,
                    forget_after,
                    nonces::bucket_of(forget_after),
                    u64::from(nonces::MAX_NONCES_PER_DEVICE),
                )
                .await?
            {
                NonceNote::New => true,
                NonceNote::Replayed => false,
                NonceNote::OverQuota => {
                    return Err(DeviceError::new(
                        StatusCode::TOO_MANY_REQUESTS,
                        NonceRefusal::DeviceQuota.to_string(),
                    ))
                }
            }
        });
    if !fresh {
        return Err(DeviceError::unauthorized(
            "replayed request: nonce already used",
        ));
    }
    if kept == Kept::ForGood {
        hub.store
            .note_signed_at(&device_id, timestamp, nonce)
            .await?;
    }
    Ok(read)
}
