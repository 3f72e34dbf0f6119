//! Read-only reports: drift per model and the audit log with its verification.

use super::*;

#[derive(Debug, Deserialize)]
pub(super) struct DriftQuery {
    version: Option<u64>,
    selector: Option<String>,
    device: Option<String>,
    /// How far back, in seconds; a day when absent.
    since_secs: Option<u64>,
}

/// Default reach of a drift report: the last day.
pub(super) const DRIFT_DEFAULT_SECS: u64 = 86_400;

pub(super) async fn drift_report(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(model): Path<String>,
    Query(query): Query<DriftQuery>,
) -> Reply<DriftReport> {
    require(&hub, &headers, Role::Viewer).await?;
    let selector = parse_selector(query.selector.as_deref())?;
    let device = match &query.device {
        Some(id) => Some(find_device(&hub, id).await?.id),
        None => None,
    };
    let version = match query.version {
        Some(version) => version,
        None => latest_profiled_version(&hub, &model).await?,
    };
    let loaded = match drift::profile(&hub, &model, version).await? {
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
    Ok(Json(
        drift::report(&hub, &model, version, &loaded, &scope, now).await?,
    ))
}

/// The highest published version of `model` whose manifest signs a drift profile.
pub(crate) async fn latest_profiled_version(
    hub: &SharedHub,
    model: &str,
) -> Result<u64, AdminError> {
    let mut versions = crate::server::alerts::published_versions(hub, model).await?;
    if versions.is_empty() {
        return Err(AdminError::not_found(format!("no model named {model:?}")));
    }
    versions.sort_unstable();
    for version in versions.into_iter().rev() {
        if let ProfileLookup::Found(_) = drift::profile(hub, model, version).await? {
            return Ok(version);
        }
    }
    Err(AdminError::not_found(format!(
        "no version of {model} has a drift profile; publish one with `model publish --profile`"
    )))
}

#[derive(Debug, Deserialize)]
pub(super) struct AuditQuery {
    since: Option<u64>,
}

pub(super) async fn audit_log(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Query(query): Query<AuditQuery>,
) -> Reply<Vec<AuditEntry>> {
    require(&hub, &headers, Role::Viewer).await?;
    let (entries, _) = hub.store.audit_entries(query.since.unwrap_or(0)).await?;
    Ok(Json(entries.iter().map(audit::to_api).collect()))
}

pub(super) async fn audit_verify(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<AuditVerdict> {
    require(&hub, &headers, Role::Viewer).await?;
    Ok(Json(audit::verify(&hub.store).await?))
}
