//! The admin API: JSON over HTTP(S), under `/admin/v1`, behind bearer tokens with roles.
//!
//! Reads need `viewer` (drift reports included); rollout control `operator`; roots, artifacts and
//! manifests `publisher`; tokens and devices `admin`. A missing or unknown token is 401, a role
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
use axum::routing::{get, post, put};
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
    RolloutRecord,
};
use crate::{audit, unix_now};

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
        .route("/admin/v1/admin-tokens", post(create_admin_token))
        .route(
            "/admin/v1/enroll-tokens",
            get(list_enroll_tokens).post(create_enroll_token),
        )
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
        .route("/admin/v1/drift/{model}", get(drift_report))
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

/// Checks the bearer token and its role.
fn require(
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
    authorize(hub, token, role)
}

/// Checks an admin token presented by any means (a bearer header, the dashboard's cookie) and its
/// role: the one check both front doors share.
pub(super) fn authorize(
    hub: &SharedHub,
    token: &str,
    role: Role,
) -> Result<AdminTokenRecord, AdminError> {
    let record = hub
        .store
        .admin_token(&sha256(token.trim().as_bytes()).0)?
        .ok_or_else(|| AdminError::new(StatusCode::UNAUTHORIZED, "unknown token"))?;
    if record.role < role {
        return Err(AdminError::new(
            StatusCode::FORBIDDEN,
            format!(
                "token {:?} has role {}, this needs {}",
                record.name,
                record.role.as_str(),
                role.as_str()
            ),
        ));
    }
    Ok(record)
}

fn audit(
    hub: &SharedHub,
    actor: &AdminTokenRecord,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<(), AdminError> {
    audit::append(&hub.store, unix_now(), &actor.name, action, target, detail)?;
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
    let token = require(&hub, &headers, Role::Viewer)?;
    Ok(Json(WhoAmI {
        token_id: token.id,
        name: token.name,
        role: token.role,
    }))
}

/// Creates an admin token; also used by `admin bootstrap` on the hub host.
pub fn new_admin_token(
    store: &crate::store::Store,
    name: &str,
    role: Role,
) -> Result<CreatedToken, AdminError> {
    if name.trim().is_empty() || name.len() > 64 || name.chars().any(char::is_control) {
        return Err(AdminError::bad_request(
            "token name must be 1 to 64 printable characters",
        ));
    }
    let token = format!("opa_{}", random_hex(32)?);
    let record = AdminTokenRecord {
        id: random_hex(8)?,
        name: name.to_owned(),
        role,
        created: unix_now(),
    };
    store.insert_admin_token(&sha256(token.as_bytes()).0, &record)?;
    Ok(CreatedToken {
        id: record.id,
        token,
    })
}

async fn create_admin_token(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Json<CreateAdminToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), AdminError> {
    let actor = require(&hub, &headers, Role::Admin)?;
    let Json(request) = body?;
    let created = new_admin_token(&hub.store, &request.name, request.role)?;
    audit(
        &hub,
        &actor,
        "admin-token create",
        &created.id,
        &format!("{} as {}", request.name, request.role.as_str()),
    )?;
    hub.store.flush().await?;
    Ok((StatusCode::CREATED, Json(created)))
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

fn enroll_token_info(record: &EnrollTokenRecord) -> EnrollTokenInfo {
    EnrollTokenInfo {
        id: record.id.clone(),
        labels: record
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        expires: record.expires,
        uses_left: record.uses_left,
    }
}

async fn create_enroll_token(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Json<CreateEnrollToken>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedToken>), AdminError> {
    let actor = require(&hub, &headers, Role::Admin)?;
    let Json(request) = body?;
    let labels = parse_labels(&request.labels)?;
    if request.uses == 0 {
        return Err(AdminError::bad_request("uses must be at least 1"));
    }
    if request.expires_in_secs == 0 {
        return Err(AdminError::bad_request("expires_in_secs must be positive"));
    }
    let token = format!("ope_{}", random_hex(32)?);
    let now = unix_now();
    let record = EnrollTokenRecord {
        id: random_hex(8)?,
        labels: labels
            .iter()
            .map(|l| (l.key.clone(), l.value.clone()))
            .collect(),
        expires: now.saturating_add(request.expires_in_secs),
        uses_left: request.uses,
        created: now,
    };
    hub.store
        .insert_enroll_token(&sha256(token.as_bytes()).0, &record)?;
    let info = enroll_token_info(&record);
    audit(
        &hub,
        &actor,
        "enroll-token create",
        &record.id,
        &format!(
            "labels {:?}, {} uses, expires {}",
            info.labels, record.uses_left, record.expires
        ),
    )?;
    hub.store.flush().await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedToken {
            id: record.id,
            token,
        }),
    ))
}

async fn list_enroll_tokens(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<EnrollTokenInfo>> {
    require(&hub, &headers, Role::Admin)?;
    Ok(Json(
        hub.store
            .enroll_tokens()?
            .iter()
            .map(enroll_token_info)
            .collect(),
    ))
}

/// The newest root the hub holds, as a verified value.
fn latest_root(hub: &SharedHub) -> Result<Option<VerifiedRoot>, AdminError> {
    match hub.store.roots()?.pop() {
        Some((_, bytes)) => Ok(Some(
            VerifiedRoot::load_trusted(&bytes)
                .map_err(|error| AdminError::internal(format!("stored root: {error}")))?,
        )),
        None => Ok(None),
    }
}

fn require_root(hub: &SharedHub) -> Result<VerifiedRoot, AdminError> {
    latest_root(hub)?.ok_or_else(|| {
        AdminError::conflict(
            "the hub has no trust root yet; upload one with `outpost-hub root upload`",
        )
    })
}

fn root_info(root: &VerifiedRoot) -> RootInfo {
    RootInfo {
        version: root.version(),
        threshold: root.body().threshold,
        key_ids: root
            .body()
            .keys
            .iter()
            .map(|key| key.key_id().to_string())
            .collect(),
        expires: root.body().expires,
    }
}

async fn list_roots(State(hub): State<SharedHub>, headers: HeaderMap) -> Reply<Vec<RootInfo>> {
    require(&hub, &headers, Role::Viewer)?;
    let mut infos = Vec::new();
    for (_, bytes) in hub.store.roots()? {
        let root = VerifiedRoot::load_trusted(&bytes)
            .map_err(|error| AdminError::internal(format!("stored root: {error}")))?;
        infos.push(root_info(&root));
    }
    Ok(Json(infos))
}

async fn upload_root(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RootInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Publisher)?;
    let bytes = body?;
    let refused = |error: outpost_protocol::VerifyError| {
        AdminError::bad_request(format!("root refused: {error}"))
    };
    let root = match latest_root(&hub)? {
        None => VerifiedRoot::verify_initial(&bytes, &floor()).map_err(refused)?,
        Some(current) if current.signed_bytes() == bytes.as_ref() => {
            return Ok((StatusCode::OK, Json(root_info(&current))));
        }
        Some(current) => {
            let next = current.verify_rotation(&bytes).map_err(refused)?;
            next.check_fresh(&floor()).map_err(refused)?;
            next
        }
    };
    hub.store.put_root(root.version(), &bytes)?;
    audit(
        &hub,
        &actor,
        "root upload",
        &format!("root {}", root.version()),
        &format!("{}-of-{}", root.body().threshold, root.body().keys.len()),
    )?;
    hub.store.flush().await?;
    Ok((StatusCode::CREATED, Json(root_info(&root))))
}

async fn has_artifact(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<StatusCode, AdminError> {
    require(&hub, &headers, Role::Viewer)?;
    let digest = Sha256::from_hex(&digest)
        .ok_or_else(|| AdminError::bad_request("artifact name is not a hex sha256"))?;
    Ok(
        match hub
            .artifacts
            .length(&digest)
            .map_err(AdminError::internal)?
        {
            Some(_) => StatusCode::OK,
            None => StatusCode::NOT_FOUND,
        },
    )
}

async fn upload_artifact(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(digest): Path<String>,
    body: Body,
) -> Result<StatusCode, AdminError> {
    let actor = require(&hub, &headers, Role::Publisher)?;
    let digest = Sha256::from_hex(&digest)
        .ok_or_else(|| AdminError::bad_request("artifact name is not a hex sha256"))?;
    if hub
        .artifacts
        .length(&digest)
        .map_err(AdminError::internal)?
        .is_some()
    {
        return Ok(StatusCode::OK);
    }
    let reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let length = match hub
        .artifacts
        .put(digest, reader, hub.config.max_artifact_bytes)
        .await
    {
        Ok(length) => length,
        Err(error @ ArtifactError::HashMismatch { .. }) => {
            return Err(AdminError::bad_request(error.to_string()))
        }
        Err(error @ ArtifactError::TooLarge { .. }) => {
            return Err(AdminError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                error.to_string(),
            ))
        }
        Err(error @ ArtifactError::Body(_)) => {
            return Err(AdminError::bad_request(error.to_string()))
        }
        Err(error) => return Err(AdminError::internal(error)),
    };
    audit(
        &hub,
        &actor,
        "artifact upload",
        &digest.to_hex(),
        &format!("{length} bytes"),
    )?;
    hub.store.flush().await?;
    Ok(StatusCode::CREATED)
}

fn tensor_info(spec: &TensorSpec) -> TensorInfo {
    TensorInfo {
        name: spec.name.clone(),
        datatype: spec.dtype.as_str().to_owned(),
        shape: spec
            .shape
            .iter()
            .map(|dim| match dim {
                Dim::Fixed(size) => i64::try_from(*size).unwrap_or(i64::MAX),
                Dim::Batch => -1,
            })
            .collect(),
    }
}

fn version_info(
    body: &ManifestBody,
    record: &ManifestRecord,
    already_published: bool,
) -> ModelVersionInfo {
    ModelVersionInfo {
        name: body.name.clone(),
        version: body.version,
        manifest_sha256: hex::encode(record.sha256),
        created: body.created,
        expires: body.expires,
        artifacts: body
            .artifacts
            .iter()
            .map(|artifact| ArtifactInfo {
                role: artifact.role.as_str().to_owned(),
                sha256: artifact.sha256.to_hex(),
                length: artifact.length,
            })
            .collect(),
        inputs: body.inputs.iter().map(tensor_info).collect(),
        outputs: body.outputs.iter().map(tensor_info).collect(),
        archs: body.archs.iter().map(|arch| arch.to_string()).collect(),
        min_agent_version: body.min_agent_version.to_string(),
        already_published,
    }
}

fn stored_manifest_body(record: &ManifestRecord) -> Result<ManifestBody, AdminError> {
    outpost_protocol::decode::<Signed<ManifestBody>>(&record.signed)
        .map_err(AdminError::internal)?
        .decode_unverified()
        .map_err(AdminError::internal)
}

async fn publish_manifest(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ModelVersionInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Publisher)?;
    let bytes = body?;
    let root = require_root(&hub)?;
    let manifest = root
        .verify_manifest(&bytes, &floor(), None)
        .map_err(|error| AdminError::bad_request(format!("manifest refused: {error}")))?;
    let name = manifest.name().as_str();
    let version = manifest.version();
    if let Some(existing) = hub.store.manifest(name, version)? {
        if existing.sha256 == manifest.digest().0 {
            return Ok((
                StatusCode::OK,
                Json(version_info(manifest.body(), &existing, true)),
            ));
        }
        return Err(AdminError::conflict(format!(
            "{name} version {version} is already published with different contents"
        )));
    }
    let latest = hub
        .store
        .manifests()?
        .into_iter()
        .filter(|(stored, _, _)| stored == name)
        .map(|(_, stored_version, _)| stored_version)
        .max();
    if let Some(latest) = latest.filter(|latest| *latest > version) {
        return Err(AdminError::conflict(format!(
            "{name} version {version} is below the latest published version {latest}"
        )));
    }
    for artifact in &manifest.body().artifacts {
        let stored = hub
            .artifacts
            .length(&artifact.sha256)
            .map_err(AdminError::internal)?;
        if stored != Some(artifact.length) {
            return Err(AdminError::conflict(format!(
                "{} artifact {} ({} bytes) has not been uploaded",
                artifact.role, artifact.sha256, artifact.length
            )));
        }
        // Devices would refuse to summarise against a profile they cannot read, and the hub could
        // judge no summary with it: keep such a version out of the registry.
        if artifact.role == ArtifactRole::Profile {
            drift::read_profile(&hub.artifacts, artifact)
                .map_err(|error| AdminError::bad_request(format!("manifest refused: {error:#}")))?;
        }
    }
    let record = ManifestRecord {
        signed: bytes.to_vec(),
        sha256: manifest.digest().0,
        published_at: unix_now(),
    };
    hub.store.put_manifest(name, version, &record)?;
    audit(
        &hub,
        &actor,
        "model publish",
        &format!("{name}@{version}"),
        &format!("manifest {}", manifest.digest()),
    )?;
    hub.store.flush().await?;
    log::info!("published {name}@{version}");
    Ok((
        StatusCode::CREATED,
        Json(version_info(manifest.body(), &record, false)),
    ))
}

async fn list_models(State(hub): State<SharedHub>, headers: HeaderMap) -> Reply<Vec<ModelSummary>> {
    require(&hub, &headers, Role::Viewer)?;
    let mut models: BTreeMap<String, ModelSummary> = BTreeMap::new();
    for (name, version, _) in hub.store.manifests()? {
        let summary = models.entry(name.clone()).or_insert(ModelSummary {
            name,
            latest_version: version,
            versions: 0,
        });
        summary.latest_version = summary.latest_version.max(version);
        summary.versions += 1;
    }
    Ok(Json(models.into_values().collect()))
}

async fn show_model(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<ModelDetail> {
    require(&hub, &headers, Role::Viewer)?;
    let mut versions = Vec::new();
    for (stored, _, record) in hub.store.manifests()? {
        if stored == name {
            versions.push(version_info(
                &stored_manifest_body(&record)?,
                &record,
                false,
            ));
        }
    }
    if versions.is_empty() {
        return Err(AdminError::not_found(format!("no model named {name:?}")));
    }
    Ok(Json(ModelDetail { name, versions }))
}

fn find_manifest(hub: &SharedHub, name: &str, version: u64) -> Result<ManifestRecord, AdminError> {
    hub.store
        .manifest(name, version)?
        .ok_or_else(|| AdminError::not_found(format!("no model {name}@{version}")))
}

async fn show_model_version(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, u64)>,
) -> Reply<ModelVersionInfo> {
    require(&hub, &headers, Role::Viewer)?;
    let record = find_manifest(&hub, &name, version)?;
    Ok(Json(version_info(
        &stored_manifest_body(&record)?,
        &record,
        false,
    )))
}

async fn manifest_bytes(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, u64)>,
) -> Result<Response, AdminError> {
    require(&hub, &headers, Role::Viewer)?;
    let record = find_manifest(&hub, &name, version)?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        record.signed,
    )
        .into_response())
}

pub(super) fn device_summary(device: &DeviceRecord, now: u64) -> DeviceSummary {
    DeviceSummary {
        id: hex::encode(device.id),
        labels: device
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        arch: device.arch.clone(),
        agent_version: device.agent_version.clone(),
        state: super::fleet::display_state(device, now),
        active: device.active.as_ref().map(|active| ModelRef {
            name: active.name.clone(),
            version: active.version,
        }),
        enrolled_at: device.enrolled_at,
        last_checkin: device.last_checkin,
        revoked: device.revoked,
    }
}

#[derive(Debug, Deserialize)]
struct DeviceQuery {
    selector: Option<String>,
}

async fn list_devices(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Query(query): Query<DeviceQuery>,
) -> Reply<Vec<DeviceSummary>> {
    require(&hub, &headers, Role::Viewer)?;
    let selector = parse_selector(query.selector.as_deref())?;
    let now = unix_now();
    let devices = hub
        .store
        .devices()?
        .iter()
        .filter(|device| selector_matches(&selector, &super::fleet::labels_of(device)))
        .map(|device| device_summary(device, now))
        .collect();
    Ok(Json(devices))
}

fn find_device(hub: &SharedHub, id: &str) -> Result<DeviceRecord, AdminError> {
    Ok(read_device(hub, id)?.record)
}

/// A device's record as stored, to change with [`crate::store::Store::update_device`].
fn read_device(hub: &SharedHub, id: &str) -> Result<DeviceRead, AdminError> {
    let parsed = outpost_protocol::device::DeviceId::from_hex(id).ok_or_else(|| {
        AdminError::bad_request(format!("{id:?} is not a device id (32 hex digits)"))
    })?;
    hub.store
        .device_read(&parsed.0)?
        .ok_or_else(|| AdminError::not_found(format!("no device {id}")))
}

/// Applies `change` to a device's stored record (again, if a check-in or a telemetry batch
/// wrote it in between) and returns the record written.
fn update_device(
    hub: &SharedHub,
    id: &str,
    change: impl Fn(&mut DeviceRecord),
) -> Result<DeviceRecord, AdminError> {
    hub.store
        .update_device(read_device(hub, id)?, change)?
        .ok_or_else(|| AdminError::not_found(format!("no device {id}")))
}

async fn show_device(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<DeviceDetail> {
    require(&hub, &headers, Role::Viewer)?;
    let device = find_device(&hub, &id)?;
    let events = hub
        .store
        .events(&device.id, MAX_EVENTS)?
        .into_iter()
        .map(|event| DeviceEvent {
            at: event.at,
            kind: event.kind,
            plan_sequence: event.plan_sequence,
            model: event
                .model
                .map(|(name, version)| ModelRef { name, version }),
            detail: event.detail,
        })
        .collect();
    let inferences = hub
        .store
        .device_stats(&device.id)?
        .into_iter()
        .map(|(name, version, stats)| InferenceCounts {
            model: ModelRef { name, version },
            count: stats.count,
            errors: stats.errors,
        })
        .collect();
    Ok(Json(DeviceDetail {
        device: device_summary(&device, unix_now()),
        public_key: hex::encode(device.public_key),
        plan_sequence: device.plan_sequence,
        dropped_records: device.dropped_records,
        inferences,
        events,
    }))
}

async fn label_device(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<LabelChange>, JsonRejection>,
) -> Reply<DeviceSummary> {
    let actor = require(&hub, &headers, Role::Admin)?;
    let Json(change) = body?;
    let set = parse_labels(&change.set)?;
    let device = update_device(&hub, &id, |device| {
        device.labels.retain(|(key, _)| {
            !change.remove.contains(key) && !set.iter().any(|label| label.key == *key)
        });
        device.labels.extend(
            set.iter()
                .map(|label| (label.key.clone(), label.value.clone())),
        );
        device.labels.sort();
    })?;
    let detail = format!("set {:?}, removed {:?}", change.set, change.remove);
    hub.store.add_event(
        &device.id,
        &EventRecord {
            at: unix_now(),
            kind: "labels".into(),
            plan_sequence: None,
            model: None,
            detail: detail.clone(),
        },
    )?;
    audit(&hub, &actor, "device label", &id, &detail)?;
    hub.store.flush().await?;
    Ok(Json(device_summary(&device, unix_now())))
}

async fn revoke_device(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<DeviceSummary> {
    let actor = require(&hub, &headers, Role::Admin)?;
    let device = update_device(&hub, &id, |device| device.revoked = true)?;
    hub.store.add_event(
        &device.id,
        &EventRecord {
            at: unix_now(),
            kind: "revoked".into(),
            plan_sequence: None,
            model: None,
            detail: format!("by {}", actor.name),
        },
    )?;
    audit(&hub, &actor, "device revoke", &id, "")?;
    hub.store.flush().await?;
    log::info!("device {id} revoked by {}", actor.name);
    Ok(Json(device_summary(&device, unix_now())))
}

async fn list_rollouts(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<RolloutInfo>> {
    require(&hub, &headers, Role::Viewer)?;
    let infos = hub
        .store
        .rollouts()?
        .iter()
        .map(|record| engine::info(&hub, record))
        .collect::<anyhow::Result<Vec<_>>>()?;
    Ok(Json(infos))
}

fn find_rollout(hub: &SharedHub, sequence: u64) -> Result<RolloutRecord, AdminError> {
    hub.store
        .rollout(sequence)?
        .ok_or_else(|| AdminError::not_found(format!("no rollout {sequence}")))
}

async fn show_rollout(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(sequence): Path<u64>,
) -> Reply<RolloutInfo> {
    require(&hub, &headers, Role::Viewer)?;
    Ok(Json(engine::info(&hub, &find_rollout(&hub, sequence)?)?))
}

/// Checks that a plan's manifest reference names a manifest this hub holds, byte for byte.
fn check_published(
    hub: &SharedHub,
    what: &str,
    reference: &outpost_protocol::trust::ManifestRef,
) -> Result<(), AdminError> {
    let record = hub
        .store
        .manifest(&reference.name, reference.version)?
        .ok_or_else(|| {
            AdminError::conflict(format!(
                "the plan's {what} {}@{} is not published on this hub",
                reference.name, reference.version
            ))
        })?;
    if record.sha256 != reference.manifest_sha256.0 {
        return Err(AdminError::conflict(format!(
            "the plan's {what} {}@{} differs from the published manifest",
            reference.name, reference.version
        )));
    }
    Ok(())
}

async fn create_rollout(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RolloutInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Operator)?;
    let bytes = body?;
    if bytes.len() > Signed::<PlanBody>::MAX_FRAME {
        return Err(AdminError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "plan is larger than any signed plan",
        ));
    }
    let root = require_root(&hub)?;
    let _guard = hub.rollout_lock.lock().await;
    let highest = hub
        .store
        .rollouts()?
        .iter()
        .map(|record| record.sequence)
        .max();
    let plan = root
        .verify_plan(&bytes, &floor(), None)
        .map_err(|error| AdminError::bad_request(format!("plan refused: {error}")))?;
    if let Some(highest) = highest.filter(|highest| plan.sequence() <= *highest) {
        return Err(AdminError::conflict(format!(
            "plan sequence {} is not above the latest rollout {highest}",
            plan.sequence()
        )));
    }
    let body = plan.body();
    check_published(&hub, "target", &body.target)?;
    if let Some(fallback) = &body.fallback {
        check_published(&hub, "fallback", fallback)?;
    }
    let now = unix_now();
    // A newer plan for the same model takes over from older ones.
    for mut older in hub.store.rollouts()? {
        if older.state == RolloutState::Superseded {
            continue;
        }
        let mut rollout = engine::to_rollout(&older)?;
        if rollout.plan.target.name != body.target.name {
            continue;
        }
        let decision = Decision {
            at: now,
            action: "superseded".into(),
            by: actor.name.clone(),
            stage_index: older.stage_index,
            reason: format!("superseded by rollout {}", plan.sequence()),
            figures: Vec::new(),
        };
        engine::persist_decision(&hub, &mut older, &mut rollout, decision)?;
    }
    let record = RolloutRecord {
        sequence: plan.sequence(),
        signed_plan: bytes.to_vec(),
        state: RolloutState::Active,
        stage_index: 0,
        stage_started: vec![now],
        decisions: Vec::new(),
        created: now,
    };
    hub.store.put_rollout(&record)?;
    audit(
        &hub,
        &actor,
        "rollout create",
        &format!("rollout {}", record.sequence),
        &format!(
            "{}@{} stages {:?} selector {:?}",
            body.target.name,
            body.target.version,
            body.stages,
            body.selector
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
        ),
    )?;
    hub.store.flush().await?;
    engine::reload(&hub)?;
    log::info!(
        "rollout {} of {}@{} started",
        record.sequence,
        body.target.name,
        body.target.version
    );
    Ok((StatusCode::CREATED, Json(engine::info(&hub, &record)?)))
}

async fn rollout_action(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path((sequence, action)): Path<(u64, String)>,
) -> Reply<RolloutInfo> {
    let actor = require(&hub, &headers, Role::Operator)?;
    let action = crate::rollout::OperatorAction::parse(&action).ok_or_else(|| {
        AdminError::not_found(format!(
            "no rollout action {action:?} (pause, resume, advance, rollback)"
        ))
    })?;
    let _guard = hub.rollout_lock.lock().await;
    let mut record = find_rollout(&hub, sequence)?;
    let mut rollout = engine::to_rollout(&record)?;
    let facts = engine::device_facts(&hub, sequence, &rollout)?;
    let decision =
        crate::rollout::operator_decision(&rollout, action, &actor.name, unix_now(), &facts)
            .map_err(AdminError::conflict)?;
    engine::persist_decision(&hub, &mut record, &mut rollout, decision)?;
    hub.store.flush().await?;
    engine::reload(&hub)?;
    Ok(Json(engine::info(&hub, &record)?))
}

#[derive(Debug, Deserialize)]
struct DriftQuery {
    version: Option<u64>,
    selector: Option<String>,
    device: Option<String>,
    /// How far back, in seconds; a day when absent.
    since_secs: Option<u64>,
}

/// Default reach of a drift report: the last day.
const DRIFT_DEFAULT_SECS: u64 = 86_400;

async fn drift_report(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(model): Path<String>,
    Query(query): Query<DriftQuery>,
) -> Reply<DriftReport> {
    require(&hub, &headers, Role::Viewer)?;
    let selector = parse_selector(query.selector.as_deref())?;
    let device = match &query.device {
        Some(id) => Some(find_device(&hub, id)?.id),
        None => None,
    };
    let version = match query.version {
        Some(version) => version,
        None => latest_profiled_version(&hub, &model)?,
    };
    let loaded = match drift::profile(&hub, &model, version)? {
        ProfileLookup::Found(loaded) => loaded,
        ProfileLookup::NotPublished => {
            return Err(AdminError::not_found(format!("no model {model}@{version}")))
        }
        ProfileLookup::NoProfile => {
            return Err(AdminError::not_found(format!(
                "{model}@{version} has no drift profile; publish it with `model publish --profile`"
            )))
        }
    };
    let now = unix_now();
    let scope = drift::Scope {
        selector,
        device,
        since: now.saturating_sub(query.since_secs.unwrap_or(DRIFT_DEFAULT_SECS)),
    };
    Ok(Json(drift::report(
        &hub, &model, version, &loaded, &scope, now,
    )?))
}

/// The highest published version of `model` whose manifest signs a drift profile.
pub(super) fn latest_profiled_version(hub: &SharedHub, model: &str) -> Result<u64, AdminError> {
    let mut versions: Vec<u64> = hub
        .store
        .manifests()?
        .into_iter()
        .filter(|(name, _, _)| name == model)
        .map(|(_, version, _)| version)
        .collect();
    if versions.is_empty() {
        return Err(AdminError::not_found(format!("no model named {model:?}")));
    }
    versions.sort_unstable();
    for version in versions.into_iter().rev() {
        if let ProfileLookup::Found(_) = drift::profile(hub, model, version)? {
            return Ok(version);
        }
    }
    Err(AdminError::not_found(format!(
        "no version of {model} has a drift profile; publish one with `model publish --profile`"
    )))
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    since: Option<u64>,
}

async fn audit_log(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Reply<Vec<AuditEntry>> {
    require(&hub, &headers, Role::Viewer)?;
    let (entries, _) = hub.store.audit_entries(query.since.unwrap_or(0))?;
    Ok(Json(entries.iter().map(audit::to_api).collect()))
}

async fn audit_verify(State(hub): State<SharedHub>, headers: HeaderMap) -> Reply<AuditVerdict> {
    require(&hub, &headers, Role::Viewer)?;
    Ok(Json(audit::verify(&hub.store)?))
}
