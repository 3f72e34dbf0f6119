//! The admin API: JSON over HTTP(S), under `/admin/v1`, behind bearer tokens with roles.
//!
//! Reads need `viewer` (drift reports included); rollout control, retirements, alert rules and
//! webhooks `operator`;
//! roots, artifacts, manifests and capture allowances `publisher`; tokens, devices and captured
//! samples (listing and download) `admin`. A missing or unknown token is 401, a role
//! too weak 403. Every change is written to the hash-chained audit log under the acting token's
//! name.
//!
//! The hub checks every uploaded document against its root before storing it. Devices verify
//! everything again themselves; the hub's checks keep junk out of the registry and give the
//! operator an error at publish time rather than on the fleet.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::{BytesRejection, JsonRejection};
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures_util::TryStreamExt;
use outpost_protocol::name::selector_matches;
use outpost_protocol::trust::{
    ArtifactRole, Dim, ManifestBody, PlanBody, RootBody, Signed, TensorSpec,
};
use outpost_protocol::{sha256, Label, Message, Sha256, TimeFloor, VerifiedRoot};
use serde::Deserialize;
use tower_http::timeout::TimeoutLayer;

use super::drift::{self, ProfileLookup};
use super::engine;
use super::SharedHub;
use crate::api::*;
use crate::artifacts::ArtifactError;
use crate::store::{
    AdminTokenRecord, DeviceRead, DeviceRecord, EnrollTokenRecord, EventRecord, ManifestRecord,
    RoleRecord, RolloutRecord, RolloutStateRecord,
};
use crate::{audit, unix_now};

mod alerts;
mod captures;
mod devices;
mod models;
mod reports;
mod retirements;
mod rollouts;
mod tokens;

pub(crate) use alerts::rules_with_alerts;
use alerts::*;
use captures::*;
pub(crate) use devices::*;
use models::*;
use reports::*;
use retirements::*;
use rollouts::*;
pub use tokens::*;

/// Largest JSON request body.
const MAX_JSON: usize = 64 * 1024;
/// Most events shown for one device.
pub(super) const MAX_EVENTS: usize = 500;

pub fn routes(hub: SharedHub) -> Router {
    let timeout =
        TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, hub.config.request_timeout);
    let documents =
        DefaultBodyLimit::max(Signed::<ManifestBody>::MAX_FRAME.max(Signed::<RootBody>::MAX_FRAME));
    let api = Router::new()
        .route("/admin/v1/whoami", get(whoami))
        .route(
            "/admin/v1/admin-tokens",
            get(list_admin_tokens).post(create_admin_token),
        )
        .route("/admin/v1/admin-tokens/{id}", delete(revoke_admin_token))
        .route(
            "/admin/v1/enroll-tokens",
            get(list_enroll_tokens).post(create_enroll_token),
        )
        .route("/admin/v1/enroll-tokens/{id}", delete(revoke_enroll_token))
        .route(
            "/admin/v1/roots",
            get(list_roots).post(upload_root).layer(documents),
        )
        .route(
            "/admin/v1/models",
            get(list_models).post(publish_manifest).layer(documents),
        )
        .route("/admin/v1/models/{name}", get(show_model))
        .route("/admin/v1/models/{name}/{version}", get(show_model_version))
        .route(
            "/admin/v1/models/{name}/{version}/manifest",
            get(manifest_bytes),
        )
        .route("/admin/v1/devices", get(list_devices))
        .route("/admin/v1/devices/{id}", get(show_device))
        .route("/admin/v1/devices/{id}/labels", post(label_device))
        .route("/admin/v1/devices/{id}/revoke", post(revoke_device))
        .route(
            "/admin/v1/rollouts",
            get(list_rollouts).post(create_rollout).layer(documents),
        )
        .route("/admin/v1/rollouts/{sequence}", get(show_rollout))
        .route(
            "/admin/v1/rollouts/{sequence}/{action}",
            post(rollout_action),
        )
        .route(
            "/admin/v1/retirements",
            get(list_retirements).post(create_retirement),
        )
        .route(
            "/admin/v1/capture/allowances",
            get(list_capture_allowances).post(create_capture_allowance),
        )
        .route("/admin/v1/captures", get(list_captures))
        .route("/admin/v1/captures/{id}", get(download_capture))
        .route("/admin/v1/drift/{model}", get(drift_report))
        .route(
            "/admin/v1/alerts/rules",
            get(list_alert_rules).post(create_alert_rule),
        )
        .route("/admin/v1/alerts/rules/{name}", delete(delete_alert_rule))
        .route("/admin/v1/alerts", get(list_alerts))
        .route(
            "/admin/v1/webhooks",
            get(list_webhooks).post(create_webhook),
        )
        .route("/admin/v1/webhooks/deliveries", get(list_deliveries))
        .route(
            "/admin/v1/webhooks/deliveries/{id}/retry",
            post(retry_delivery),
        )
        .route("/admin/v1/webhooks/{name}", delete(delete_webhook))
        .route("/admin/v1/webhooks/{name}/test", post(test_webhook))
        .route("/admin/v1/audit", get(audit_log))
        .route("/admin/v1/audit/verify", get(audit_verify))
        .layer(DefaultBodyLimit::max(MAX_JSON))
        .layer(timeout);
    // Artifact uploads stream for as long as a large model takes; their size is capped as they
    // stream, so they get their own, longer time limit.
    let uploads = Router::new()
        .route(
            "/admin/v1/artifacts/{sha256}",
            put(upload_artifact)
                .head(has_artifact)
                .layer(DefaultBodyLimit::disable()),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            Duration::from_secs(3600),
        ));
    api.merge(uploads).with_state(hub)
}

/// A refusal or failure, sent as JSON [`ApiError`].
#[derive(Debug, thiserror::Error)]
#[error("{message}")]
pub struct AdminError {
    status: StatusCode,
    message: String,
}

impl AdminError {
    /// The HTTP status this refusal answers with.
    pub(super) fn status(&self) -> StatusCode {
        self.status
    }

    fn new(status: StatusCode, message: impl Into<String>) -> AdminError {
        AdminError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::BAD_REQUEST, message)
    }

    fn conflict(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::CONFLICT, message)
    }

    fn not_found(message: impl Into<String>) -> AdminError {
        AdminError::new(StatusCode::NOT_FOUND, message)
    }

    fn internal(error: impl std::fmt::Display) -> AdminError {
        log::error!("admin request failed: {error}");
        AdminError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal error; see the hub's log",
        )
    }
}

impl IntoResponse for AdminError {
    fn into_response(self) -> Response {
        (
            self.status,
            Json(ApiError {
                error: self.message,
            }),
        )
            .into_response()
    }
}

impl From<JsonRejection> for AdminError {
    fn from(rejection: JsonRejection) -> AdminError {
        AdminError::new(rejection.status(), rejection.body_text())
    }
}

impl From<BytesRejection> for AdminError {
    fn from(rejection: BytesRejection) -> AdminError {
        AdminError::new(rejection.status(), rejection.body_text())
    }
}

impl From<crate::store::StoreError> for AdminError {
    fn from(error: crate::store::StoreError) -> AdminError {
        AdminError::internal(error)
    }
}

impl From<anyhow::Error> for AdminError {
    fn from(error: anyhow::Error) -> AdminError {
        AdminError::internal(format!("{error:#}"))
    }
}

type Reply<T> = Result<Json<T>, AdminError>;

/// A token's stored role as the admin API names it.
pub(crate) fn role_of(stored: RoleRecord) -> Role {
    match stored {
        RoleRecord::Viewer => Role::Viewer,
        RoleRecord::Operator => Role::Operator,
        RoleRecord::Publisher => Role::Publisher,
        RoleRecord::Admin => Role::Admin,
    }
}

/// A role of the admin API as the store keeps it.
pub(crate) fn role_record(role: Role) -> RoleRecord {
    match role {
        Role::Viewer => RoleRecord::Viewer,
        Role::Operator => RoleRecord::Operator,
        Role::Publisher => RoleRecord::Publisher,
        Role::Admin => RoleRecord::Admin,
    }
}

/// Checks the bearer token and its role.
pub(super) async fn require(
    hub: &SharedHub,
    headers: &HeaderMap,
    role: Role,
) -> Result<AdminTokenRecord, AdminError> {
    let unauthorized = |message: &str| AdminError::new(StatusCode::UNAUTHORIZED, message);
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing bearer token"))?
        .to_str()
        .map_err(|_| unauthorized("authorization header is not text"))?;
    let token = value
        .strip_prefix("Bearer ")
        .ok_or_else(|| unauthorized("authorization header is not a bearer token"))?;
    authorize(hub, token, role).await
}

/// Checks an admin token presented by any means (a bearer header, the dashboard's cookie) and its
/// role: the one check both front doors share.
pub(super) async fn authorize(
    hub: &SharedHub,
    token: &str,
    role: Role,
) -> Result<AdminTokenRecord, AdminError> {
    let record = hub
        .store
        .admin_token(&sha256(token.trim().as_bytes()).0)
        .await?
        .ok_or_else(|| AdminError::new(StatusCode::UNAUTHORIZED, "unknown or revoked token"))?;
    if let Some(expires) = record.expires.filter(|_| record.expired(unix_now())) {
        return Err(AdminError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "token {:?} expired at {}",
                record.name,
                humantime::format_rfc3339_seconds(
                    std::time::UNIX_EPOCH + Duration::from_secs(expires)
                )
            ),
        ));
    }
    if role_of(record.role) < role {
        return Err(AdminError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}, this needs {}",
                record.name,
                role_of(record.role).as_str(),
                role.as_str()
            ),
        ));
    }
    Ok(record)
}

async fn audit(
    hub: &SharedHub,
    actor: &AdminTokenRecord,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), AdminError> {
    audit::append(&hub.store, unix_now(), &actor.name, action, target, detail).await?;
    Ok(())
}

fn floor() -> TimeFloor {
    TimeFloor {
        wall_clock: unix_now(),
        ..TimeFloor::default()
    }
}

fn random_hex(bytes: usize) -> Result<String, AdminError> {
    let mut buffer = vec![0u8; bytes];
    getrandom::getrandom(&mut buffer).map_err(AdminError::internal)?;
    Ok(hex::encode(buffer))
}

async fn whoami(State(hub): State<SharedHub>, headers: HeaderMap) -> Reply<WhoAmI> {
    let token = require(&hub, &headers, Role::Viewer).await?;
    Ok(Json(WhoAmI {
        token_id: token.id,
        name: token.name,
        role: role_of(token.role),
    }))
}

fn parse_labels(texts: &[String]) -> Result<Vec<Label>, AdminError> {
    texts
        .iter()
        .map(|text| {
            Label::parse(text).map_err(|error| {
                AdminError::bad_request(format!("label {text:?}: {error} (expected key=value)"))
            })
        })
        .collect()
}

/// A `k=v,k=v` selector from a query string; none selects every device.
fn parse_selector(text: Option<&str>) -> Result<Vec<Label>, AdminError> {
    match text {
        Some(text) if !text.is_empty() => {
            parse_labels(&text.split(',').map(str::to_owned).collect::<Vec<_>>())
        }
        _ => Ok(Vec::new()),
    }
}
