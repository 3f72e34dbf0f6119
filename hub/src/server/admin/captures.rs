//! Data capture: storing signed capture allowances (publisher), listing them (viewer), and
//! listing and downloading the sealed samples devices uploaded (admin).
//!
//! An allowance is verified against the hub's root before it is stored, the protocol's maxima
//! included, so one a device would refuse is refused here with the same reason. Samples are
//! sensitive even sealed (they say which device served what, when), so reading them takes the
//! `admin` role, and every download is written to the audit log.

use super::*;
use crate::store::{CaptureAllowanceRecord, CaptureFilter, StoredCapture};
use outpost_protocol::trust::{CaptureBody, CaptureVersions};

/// Most samples one listing returns.
const MAX_LISTED: u64 = 10_000;

fn allowance_info(record: &CaptureAllowanceRecord) -> Result<CaptureAllowanceInfo, AdminError> {
    let signed: Signed<CaptureBody> =
        outpost_protocol::decode(&record.signed).map_err(AdminError::internal)?;
    let body = signed.decode_unverified().map_err(AdminError::internal)?;
    Ok(CaptureAllowanceInfo {
        model: body.model,
        sequence: body.sequence,
        versions: match body.versions {
            CaptureVersions::All => Vec::new(),
            CaptureVersions::Only(versions) => versions,
        },
        rate_ppm: body.rate_ppm,
        max_samples_per_day: body.max_samples_per_day,
        max_bytes_per_day: body.max_bytes_per_day,
        trigger: body.trigger.as_str().to_owned(),
        drop_inputs: body.drop_inputs,
        drop_outputs: body.drop_outputs,
        recipient: hex::encode(body.recipient),
        created: body.created,
        expires: body.expires,
        stored_at: record.stored_at,
        by: record.by.clone(),
    })
}

fn capture_info(stored: &StoredCapture) -> CaptureInfo {
    CaptureInfo {
        id: stored.id,
        device: hex::encode(stored.device),
        model: stored.model.clone(),
        version: stored.version,
        allowance: stored.allowance,
        captured_at: stored.captured_at,
        received_at: stored.received_at,
        bytes: stored.bytes,
    }
}

pub(super) async fn list_capture_allowances(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<CaptureAllowanceInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    let infos = hub
        .store
        .capture_allowances()
        .await?
        .iter()
        .map(allowance_info)
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Json(infos))
}

pub(super) async fn create_capture_allowance(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<CaptureAllowanceInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Publisher).await?;
    let bytes = body?;
    if bytes.len() > Signed::<CaptureBody>::MAX_FRAME {
        return Err(AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "capture allowance is larger than any signed capture allowance",
        ));
    }
    let root = require_root(&hub).await?;
    let allowance = root
        .verify_capture(&bytes, &floor(), None, None)
        .map_err(|error| AdminError::bad_request(format!("capture allowance refused: {error}")))?;
    let body = allowance.body();
    if !hub.store.has_model(&body.model).await? {
        return Err(AdminError::conflict(format!(
            "model {} has never been published on this hub: there is nothing to capture",
            body.model
        )));
    }
    if let Some(latest) = hub.store.latest_capture_allowance(&body.model).await? {
        if latest.sequence >= body.sequence {
            return Err(AdminError::conflict(format!(
                "capture allowance sequence {} is not above the latest allowance {} of model {}: \
                 devices would refuse it",
                body.sequence, latest.sequence, body.model
            )));
        }
    }
    let record = CaptureAllowanceRecord {
        model: body.model.clone(),
        sequence: body.sequence,
        signed: bytes.to_vec(),
        stored_at: unix_now(),
        by: actor.name.clone(),
    };
    hub.store.put_capture_allowance(&record).await?;
    let info = allowance_info(&record)?;
    audit(
        &hub,
        &actor,
        "capture allow",
        &format!("capture {} {}", info.model, info.sequence),
        &format!(
            "rate {} ppm, {} samples and {} bytes per device and day, {}, recipient {}",
            info.rate_ppm,
            info.max_samples_per_day,
            info.max_bytes_per_day,
            info.trigger,
            info.recipient
        ),
    )
    .await?;
    hub.store.flush().await?;
    log::info!(
        "capture allowance {} of {} stored: devices fetch it at their next poll",
        info.sequence,
        info.model
    );
    Ok((StatusCode::CREATED, Json(info)))
}

#[derive(Debug, Deserialize)]
pub(super) struct CaptureQuery {
    model: Option<String>,
    version: Option<u64>,
    device: Option<String>,
    since: Option<u64>,
    until: Option<u64>,
    limit: Option<u64>,
}

pub(super) async fn list_captures(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Query(query): Query<CaptureQuery>,
) -> Reply<Vec<CaptureInfo>> {
    require(&hub, &headers, Role::Admin).await?;
    let device = match &query.device {
        Some(text) => {
            let mut id = [0u8; 16];
            hex::decode_to_slice(text, &mut id).map_err(|_| {
                AdminError::bad_request(format!(
                    "device {text:?} is not a device id (32 hex digits)"
                ))
            })?;
            Some(id)
        }
        None => None,
    };
    let filter = CaptureFilter {
        model: query.model,
        version: query.version,
        device,
        since: query.since,
        until: query.until,
        limit: query.limit.unwrap_or(1000).min(MAX_LISTED),
    };
    let listed = hub.store.captures(&filter).await?;
    Ok(Json(listed.iter().map(capture_info).collect()))
}

pub(super) async fn download_capture(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Result<Response, AdminError> {
    let actor = require(&hub, &headers, Role::Admin).await?;
    let (stored, sealed) = hub
        .store
        .capture(id)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no captured sample {id}")))?;
    audit(
        &hub,
        &actor,
        "capture download",
        &format!("capture sample {id}"),
        &format!(
            "{}@{} from device {}",
            stored.model,
            stored.version,
            hex::encode(stored.device)
        ),
    )
    .await?;
    hub.store.flush().await?;
    Ok(([(header::CONTENT_TYPE, "application/octet-stream")], sealed).into_response())
}
