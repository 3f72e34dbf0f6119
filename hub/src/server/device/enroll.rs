//! Enrollment: a device trades an enrollment token for an id, and gets its token's labels.

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::response::Response;
use outpost_protocol::device::{DeviceId, EnrollRequest, EnrollResponse};
use outpost_protocol::sha256;

use super::request::{reply, DeviceError};
use crate::server::fleet::labels_of;
use crate::server::metrics::Metrics;
use crate::server::SharedHub;
use crate::store::{DeviceRecord, EventRecord, TokenRefusal};
use crate::unix_now;

pub(super) async fn enroll(
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
    let outcome = hub
        .store
        .enroll(
            &token_hash,
            now,
            |token| {
                DeviceRecord::enrolled(
                    device_id,
                    request.public_key.0,
                    request.arch.to_string(),
                    request.agent_version.to_string(),
                    token.labels.clone(),
                    now,
                )
            },
            enrolled_event,
        )
        .await?;
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
