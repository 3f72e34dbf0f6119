//! Devices as operators see them: listing, showing, labelling and revoking.

use super::*;
use crate::store::{ModelRuntimeRecord, RunningRecord, RuntimeReportRecord};

/// A device as the admin API shows it, with its latest runtime report if it sent one.
pub(crate) fn device_summary(
    device: &DeviceRecord,
    runtimes: Option<&RuntimeReportRecord>,
    now: u64,
) -> DeviceSummary {
    DeviceSummary {
        id: hex::encode(device.id),
        labels: device
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect(),
        arch: device.arch.clone(),
        agent_version: device.agent_version.clone(),
        state: crate::server::fleet::display_state(device, now)
            .as_str()
            .to_owned(),
        active: device.active.as_ref().map(model_ref),
        models: device.models.iter().map(model_ref).collect(),
        enrolled_at: device.enrolled_at,
        last_checkin: device.last_checkin,
        revoked: device.revoked,
        runtimes: runtimes.map_or_else(Vec::new, |report| {
            report.models.iter().map(model_runtime).collect()
        }),
    }
}

/// [`device_summary`] of a device as stored now, its runtime report read from the store.
async fn stored_summary(
    hub: &SharedHub,
    device: &DeviceRecord,
) -> Result<DeviceSummary, AdminError> {
    let runtimes = hub.store.runtimes(&device.id).await?;
    Ok(device_summary(device, runtimes.as_ref(), unix_now()))
}

fn model_ref(running: &RunningRecord) -> ModelRef {
    ModelRef {
        name: running.name.clone(),
        version: running.version,
    }
}

fn model_runtime(stored: &ModelRuntimeRecord) -> ModelRuntimeJson {
    ModelRuntimeJson {
        name: stored.name.clone(),
        version: stored.version,
        runtime: stored.runtime.clone(),
        runtime_version: stored.runtime_version.clone(),
        providers: stored.providers.clone(),
        fallback: stored.fallback.clone(),
    }
}

#[derive(Debug, Deserialize)]
pub(super) struct DeviceQuery {
    selector: Option<String>,
    /// A condition on the agent version ([`crate::api::AgentFilter`]): `<0.3`.
    agent: Option<String>,
}

pub(super) async fn list_devices(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Query(query): Query<DeviceQuery>,
) -> Reply<Vec<DeviceSummary>> {
    require(&hub, &headers, Role::Viewer).await?;
    let selector = parse_selector(query.selector.as_deref())?;
    let agent = query
        .agent
        .as_deref()
        .map(crate::api::AgentFilter::parse)
        .transpose()
        .map_err(|error| AdminError::bad_request(format!("agent filter {error}")))?;
    let now = unix_now();
    let runtimes = hub.store.all_runtimes().await?;
    let devices = hub
        .store
        .devices()
        .await?
        .iter()
        .filter(|device| selector_matches(&selector, &crate::server::fleet::labels_of(device)))
        .filter(|device| {
            agent
                .as_ref()
                .is_none_or(|agent| agent.matches(&device.agent_version))
        })
        .map(|device| device_summary(device, runtimes.get(&device.id), now))
        .collect();
    Ok(Json(devices))
}

pub(super) async fn find_device(hub: &SharedHub, id: &str) -> Result<DeviceRecord, AdminError> {
    Ok(read_device(hub, id).await?.record)
}

/// A device's record as stored, to change with [`crate::store::Store::update_device`].
pub(super) async fn read_device(hub: &SharedHub, id: &str) -> Result<DeviceRead, AdminError> {
    let parsed = outpost_protocol::device::DeviceId::from_hex(id).ok_or_else(|| {
        AdminError::bad_request(format!("{id:?} is not a device id (32 hex digits)"))
    })?;
    hub.store
        .device_read(&parsed.0)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no device {id}")))
}

/// Applies `change` to a device's stored record (again, if a check-in or a telemetry batch
/// wrote it in between) and returns the record written.
pub(super) async fn update_device(
    hub: &SharedHub,
    id: &str,
    change: impl Fn(&mut DeviceRecord),
) -> Result<DeviceRecord, AdminError> {
    hub.store
        .update_device(read_device(hub, id).await?, change)
        .await?
        .ok_or_else(|| AdminError::not_found(format!("no device {id}")))
}

pub(super) async fn show_device(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<DeviceDetail> {
    require(&hub, &headers, Role::Viewer).await?;
    let device = find_device(&hub, &id).await?;
    let events = hub
        .store
        .events(&device.id, MAX_EVENTS)
        .await?
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
        .device_stats(&device.id)
        .await?
        .into_iter()
        .map(|(name, version, stats)| InferenceCounts {
            model: ModelRef { name, version },
            count: stats.count,
            errors: stats.errors,
        })
        .collect();
    Ok(Json(DeviceDetail {
        device: stored_summary(&hub, &device).await?,
        public_key: hex::encode(device.public_key),
        plan_sequence: device.plan_sequence,
        dropped_records: device.dropped_records,
        inferences,
        events,
    }))
}

pub(super) async fn label_device(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Result<Json<LabelChange>, JsonRejection>,
) -> Reply<DeviceSummary> {
    let actor = require(&hub, &headers, Role::Admin).await?;
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
    })
    .await?;
    let detail = format!("set {:?}, removed {:?}", change.set, change.remove);
    hub.store
        .add_event(
            &device.id,
            &EventRecord {
                at: unix_now(),
                kind: "labels".into(),
                plan_sequence: None,
                model: None,
                detail: detail.clone(),
            },
        )
        .await?;
    audit(&hub, &actor, "device label", &id, &detail).await?;
    hub.store.flush().await?;
    Ok(Json(stored_summary(&hub, &device).await?))
}

pub(super) async fn revoke_device(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Reply<DeviceSummary> {
    let actor = require(&hub, &headers, Role::Admin).await?;
    let device = update_device(&hub, &id, |device| device.revoked = true).await?;
    hub.store
        .add_event(
            &device.id,
            &EventRecord {
                at: unix_now(),
                kind: "revoked".into(),
                plan_sequence: None,
                model: None,
                detail: format!("by {}", actor.name),
            },
        )
        .await?;
    audit(&hub, &actor, "device revoke", &id, "").await?;
    hub.store.flush().await?;
    log::info!("device {id} revoked by {}", actor.name);
    Ok(Json(stored_summary(&hub, &device).await?))
}
