//! A device's page: what it is and every model it runs (with the runtime serving it), its
//! inference counts, and its history of activations, refusals, stalls and rollbacks with the
//! reasons it gave, newest first. The same stored events `outpost-hub device show` prints.

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use outpost_protocol::device::DeviceId;

use super::{badge, internal, problem, time_cell, viewer, Esc};
use crate::api::{ModelRef, ModelRuntimeJson};
use crate::server::admin::{device_summary, MAX_EVENTS};
use crate::server::SharedHub;
use crate::unix_now;

const TITLE: &str = "Device";
/// Section of the navigation a device page belongs to.
const SECTION: &str = "Fleet";

pub async fn page(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Response {
    let viewer = match viewer(&hub, &headers).await {
        Ok(viewer) => viewer,
        Err(response) => return *response,
    };
    let Some(parsed) = DeviceId::from_hex(&id) else {
        return problem(
            StatusCode::BAD_REQUEST,
            &viewer,
            SECTION,
            &format!("{id:?} is not a device id (32 hex digits)"),
        );
    };
    let device = match hub.store.device(&parsed.0).await {
        Ok(Some(device)) => device,
        Ok(None) => {
            return problem(
                StatusCode::NOT_FOUND,
                &viewer,
                SECTION,
                &format!("no device {id}"),
            )
        }
        Err(error) => return internal(&viewer, SECTION, error),
    };
    let (events, stats, runtimes) = match (
        hub.store.events(&device.id, MAX_EVENTS).await,
        hub.store.device_stats(&device.id).await,
        hub.store.runtimes(&device.id).await,
    ) {
        (Ok(events), Ok(stats), Ok(runtimes)) => (events, stats, runtimes),
        (Err(error), _, _) | (_, Err(error), _) | (_, _, Err(error)) => {
            return internal(&viewer, SECTION, error)
        }
    };
    let now = unix_now();
    let summary = device_summary(&device, runtimes.as_ref(), now);
    let mut body = format!(
        "<p class=\"crumbs\"><a href=\"/dashboard/fleet\">Fleet</a> /</p>\
         <h1 class=\"id\" id=\"device-id\">{}</h1><dl class=\"facts\">\
         <dt>State</dt><dd id=\"device-state\">{}</dd><dt>Models</dt><dd id=\"device-models\">{}</dd>\
         <dt>Agent</dt><dd>{}</dd><dt>Arch</dt><dd>{}</dd><dt>Enrolled</dt><dd>{}</dd>\
         <dt>Last check-in</dt><dd>{}</dd><dt>Plan</dt><dd>{}</dd>\
         <dt>Telemetry dropped</dt><dd>{} records</dd><dt>Labels</dt><dd>",
        Esc(&summary.id),
        badge(&summary.state),
        models_list(summary.running(), &summary.runtimes),
        Esc(&summary.agent_version),
        Esc(&summary.arch),
        time_cell(summary.enrolled_at, now),
        summary
            .last_checkin
            .map_or_else(|| "never".to_owned(), |at| time_cell(at, now)),
        device
            .plan_sequence
            .map_or_else(|| "—".to_owned(), |sequence| format!("rollout {sequence}")),
        device.dropped_records,
    );
    for label in &summary.labels {
        let _ = write!(body, "<span class=\"chip\">{}</span>", Esc(label));
    }
    body.push_str("</dd></dl>");

    if !stats.is_empty() {
        body.push_str(
            "<h2>Inferences</h2><table><thead><tr><th>Model</th><th>Count</th><th>Errors</th>\
             </tr></thead><tbody>",
        );
        for (name, version, stats) in &stats {
            let _ = write!(
                body,
                "<tr><td>{}@{version}</td><td class=\"num\">{}</td><td class=\"num\">{}</td></tr>",
                Esc(name),
                stats.count,
                stats.errors
            );
        }
        body.push_str("</tbody></table>");
    }

    let mut kinds: BTreeMap<&str, usize> = BTreeMap::new();
    for event in &events {
        *kinds.entry(event.kind.as_str()).or_default() += 1;
    }
    body.push_str("<h2>History</h2><div class=\"counts small\">");
    for (kind, count) in &kinds {
        let _ = write!(
            body,
            "<span class=\"count\"><span class=\"n\">{count}</span>{}</span>",
            badge(kind)
        );
    }
    body.push_str(
        "</div><table id=\"events\"><thead><tr><th>When</th><th>Event</th><th>Rollout</th>\
         <th>Model</th><th>Reason</th></tr></thead><tbody>",
    );
    for event in events.iter().rev() {
        let _ = write!(
            body,
            "<tr class=\"event {}\"><td>{}</td><td>{}</td><td>{}</td><td>{}</td>\
             <td class=\"reason\">{}</td></tr>",
            Esc(&event.kind),
            time_cell(event.at, now),
            badge(&event.kind),
            event
                .plan_sequence
                .map_or_else(String::new, |sequence| sequence.to_string()),
            Esc(&event
                .model
                .as_ref()
                .map_or_else(String::new, |(name, version)| format!("{name}@{version}"))),
            Esc(&event.detail),
        );
    }
    body.push_str("</tbody></table>");
    super::page(TITLE, SECTION, &viewer, &body)
}

/// Every model a device runs, one per line, or a dash for none; beside each, the runtime that
/// serves it and why it is not the one the device preferred, as far as the device's latest
/// runtime report says about that version.
fn models_list(models: &[ModelRef], runtimes: &[ModelRuntimeJson]) -> String {
    if models.is_empty() {
        return "—".to_owned();
    }
    let mut list = String::from("<ul class=\"models\">");
    for model in models {
        let _ = write!(list, "<li>{}@{}", Esc(&model.name), model.version);
        if let Some(runtime) = runtimes
            .iter()
            .find(|runtime| runtime.name == model.name && runtime.version == model.version)
        {
            let _ = write!(
                list,
                " <span class=\"sub runtime\">{}</span>",
                Esc(&runtime.runtime_text())
            );
            if let Some(reason) = &runtime.fallback {
                let _ = write!(
                    list,
                    " <span class=\"fallback\">fallback: {}</span>",
                    Esc(reason)
                );
            }
        }
        list.push_str("</li>");
    }
    list.push_str("</ul>");
    list
}
