//! The registry: trust roots, artifacts and model manifests, each checked before it is stored.

use super::*;

/// The newest root the hub holds, as a verified value.
pub(super) async fn latest_root(hub: &SharedHub) -> Result<Option<VerifiedRoot>, AdminError> {
    match hub.store.roots().await?.pop() {
        Some((_, bytes)) => Ok(Some(
            VerifiedRoot::load_trusted(&bytes)
                .map_err(|error| AdminError::internal(format!("stored root: {error}")))?,
        )),
        None => Ok(None),
    }
}

pub(super) async fn require_root(hub: &SharedHub) -> Result<VerifiedRoot, AdminError> {
    latest_root(hub).await?.ok_or_else(|| {
        AdminError::conflict(
            "the hub has no trust root yet; upload one with `outpost-hub root upload`",
        )
    })
}

pub(super) fn root_info(root: &VerifiedRoot) -> RootInfo {
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

pub(super) async fn list_roots(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<RootInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    let mut infos = Vec::new();
    for (_, bytes) in hub.store.roots().await? {
        let root = VerifiedRoot::load_trusted(&bytes)
            .map_err(|error| AdminError::internal(format!("stored root: {error}")))?;
        infos.push(root_info(&root));
    }
    Ok(Json(infos))
}

pub(super) async fn upload_root(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<RootInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Publisher).await?;
    let bytes = body?;
    let refused = |error: outpost_protocol::VerifyError| {
        AdminError::bad_request(format!("root refused: {error}"))
    };
    let root = match latest_root(&hub).await? {
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
    hub.store.put_root(root.version(), &bytes).await?;
    audit(
        &hub,
        &actor,
        "root upload",
        &format!("root {}", root.version()),
        &format!("{}-of-{}", root.body().threshold, root.body().keys.len()),
    )
    .await?;
    hub.store.flush().await?;
    Ok((StatusCode::CREATED, Json(root_info(&root))))
}

/// What an artifact upload or lookup that failed tells the publisher: what was wrong with the
/// upload, or which store failed (503: publishing again may succeed once it is back).
impl From<ArtifactError> for AdminError {
    fn from(error: ArtifactError) -> AdminError {
        match error {
            ArtifactError::HashMismatch { .. } | ArtifactError::Body(_) => {
                AdminError::bad_request(error.to_string())
            }
            ArtifactError::TooLarge { .. } => {
                AdminError::new(StatusCode::PAYLOAD_TOO_LARGE, error.to_string())
            }
            ArtifactError::Store { .. } => {
                log::error!("{error}");
                AdminError::new(StatusCode::SERVICE_UNAVAILABLE, error.to_string())
            }
            ArtifactError::Io(_) => AdminError::internal(error),
        }
    }
}

pub(super) async fn has_artifact(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(digest): Path<String>,
) -> Result<StatusCode, AdminError> {
    require(&hub, &headers, Role::Viewer).await?;
    let digest = Sha256::from_hex(&digest)
        .ok_or_else(|| AdminError::bad_request("artifact name is not a hex sha256"))?;
    Ok(match hub.artifacts.verified_length(&digest).await? {
        Some(_) => StatusCode::OK,
        None => StatusCode::NOT_FOUND,
    })
}

pub(super) async fn upload_artifact(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(digest): Path<String>,
    body: Body,
) -> Result<StatusCode, AdminError> {
    let actor = require(&hub, &headers, Role::Publisher).await?;
    let digest = Sha256::from_hex(&digest)
        .ok_or_else(|| AdminError::bad_request("artifact name is not a hex sha256"))?;
    if hub.artifacts.verified_length(&digest).await?.is_some() {
        return Ok(StatusCode::OK);
    }
    let reader =
        tokio_util::io::StreamReader::new(body.into_data_stream().map_err(std::io::Error::other));
    let length = hub
        .artifacts
        .put(digest, reader, hub.config.max_artifact_bytes)
        .await?;
    audit(
        &hub,
        &actor,
        "artifact upload",
        &digest.to_hex(),
        &format!("{length} bytes"),
    )
    .await?;
    hub.store.flush().await?;
    Ok(StatusCode::CREATED)
}

pub(super) fn tensor_info(spec: &TensorSpec) -> TensorInfo {
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

pub(super) fn version_info(
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

pub(super) fn stored_manifest_body(record: &ManifestRecord) -> Result<ManifestBody, AdminError> {
    outpost_protocol::decode::<Signed<ManifestBody>>(&record.signed)
        .map_err(AdminError::internal)?
        .decode_unverified()
        .map_err(AdminError::internal)
}

pub(super) async fn publish_manifest(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<(StatusCode, Json<ModelVersionInfo>), AdminError> {
    let actor = require(&hub, &headers, Role::Publisher).await?;
    let bytes = body?;
    let root = require_root(&hub).await?;
    let manifest = root
        .verify_manifest(&bytes, &floor(), None)
        .map_err(|error| AdminError::bad_request(format!("manifest refused: {error}")))?;
    let name = manifest.name().as_str();
    let version = manifest.version();
    if let Some(existing) = hub.store.manifest(name, version).await? {
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
        .manifests()
        .await?
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
        let stored = hub.artifacts.verified_length(&artifact.sha256).await?;
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
                .await
                .map_err(|error| AdminError::bad_request(format!("manifest refused: {error:#}")))?;
        }
    }
    let record = ManifestRecord {
        signed: bytes.to_vec(),
        sha256: manifest.digest().0,
        published_at: unix_now(),
    };
    hub.store.put_manifest(name, version, &record).await?;
    audit(
        &hub,
        &actor,
        "model publish",
        &format!("{name}@{version}"),
        &format!("manifest {}", manifest.digest()),
    )
    .await?;
    hub.store.flush().await?;
    log::info!("published {name}@{version}");
    Ok((
        StatusCode::CREATED,
        Json(version_info(manifest.body(), &record, false)),
    ))
}

pub(super) async fn list_models(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<ModelSummary>> {
    require(&hub, &headers, Role::Viewer).await?;
    let mut models: BTreeMap<String, ModelSummary> = BTreeMap::new();
    for (name, version, _) in hub.store.manifests().await? {
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

pub(super) async fn show_model(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<ModelDetail> {
    require(&hub, &headers, Role::Viewer).await?;
    let mut versions = Vec::new();
    for (stored, _, record) in hub.store.manifests().await? {
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

pub(super) async fn find_manifest(
    hub: &SharedHub,
    name: &str,
    version: u64,
) -> Result<ManifestRecord, AdminError> {
    hub.store
        .manifest(name, version)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no model {name}@{version}")))
}

pub(super) async fn show_model_version(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, u64)>,
) -> Reply<ModelVersionInfo> {
    require(&hub, &headers, Role::Viewer).await?;
    let record = find_manifest(&hub, &name, version).await?;
    Ok(Json(version_info(
        &stored_manifest_body(&record)?,
        &record,
        false,
    )))
}

pub(super) async fn manifest_bytes(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path((name, version)): Path<(String, u64)>,
) -> Result<Response, AdminError> {
    require(&hub, &headers, Role::Viewer).await?;
    let record = find_manifest(&hub, &name, version).await?;
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        record.signed,
    )
        .into_response())
}
