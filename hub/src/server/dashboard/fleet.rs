//! The fleet page: every device's state, models, agent, last check-in and labels, filtered by GET
//! parameters and paginated, with the whole fleet's counts by state at the top.
//!
//! One pass over the devices tree serves a page: counts, filters and the page's slice together.
//! At 10,000 devices that is a few milliseconds of decoding (see `docs/BENCHMARKS.md`).

use std::collections::BTreeMap;
use std::fmt::Write;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use outpost_protocol::name::selector_matches;
use outpost_protocol::Label;
use serde::Deserialize;

use super::{badge, internal, problem, query_value, time_cell, viewer_and_query, Esc};
use crate::server::fleet::{display_state, labels_of};
use crate::server::SharedHub;
use crate::store::DeviceRecord;
use crate::unix_now;

/// Devices per page.
pub const PAGE_SIZE: usize = 50;
const TITLE: &str = "Fleet";

#[derive(Debug, Default, Deserialize)]
pub struct FleetQuery {
    /// A display state: `steady`, `silent`, `revoked`, ...
    state: Option<String>,
    /// `name` (any version), `name@version`, or `none` for devices running nothing.
    model: Option<String>,
    /// A `key=value[,key=value]` selector.
    label: Option<String>,
    /// Part of a device id.
    q: Option<String>,
    /// From 1.
    page: Option<usize>,
}

/// A filter's value, with an empty field treated as absent (a form sends empty fields).
fn given(value: &Option<String>) -> Option<&str> {
    value
        .as_deref()
        .map(str::trim)
        .filter(|value| !value.is_empty())
}

/// Every model a device runs, as `name@version`.
fn running(device: &DeviceRecord) -> impl Iterator<Item = String> + '_ {
    device
        .running()
        .iter()
        .map(|model| format!("{}@{}", model.name, model.version))
}

/// Whether a device runs the model a filter asks for: `name` in any version, `name@version`, or
/// `none` for a device running nothing. A device running several models matches each of them.
fn model_matches(device: &DeviceRecord, wanted: &str) -> bool {
    let running = device.running();
    if wanted == "none" {
        return running.is_empty();
    }
    match wanted.split_once('@') {
        Some((name, version)) => device
            .running_model(name)
            .is_some_and(|model| version.parse() == Ok(model.version)),
        None => running.iter().any(|model| model.name == wanted),
    }
}

pub async fn page(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    query: Result<Query<FleetQuery>, QueryRejection>,
) -> Response {
    let (viewer, query) = match viewer_and_query(&hub, &headers, query, TITLE).await {
        Ok(pair) => pair,
        Err(response) => return *response,
    };
    let selector = match given(&query.label) {
        Some(text) => match text
            .split(',')
            .map(|part| Label::parse(part.trim()))
            .collect()
        {
            Ok(selector) => selector,
            Err(error) => {
                return problem(
                    StatusCode::BAD_REQUEST,
                    &viewer,
                    TITLE,
                    &format!("label filter {text:?}: {error} (expected key=value[,key=value])"),
                )
            }
        },
        None => Vec::new(),
    };
    let devices = match hub.store.devices().await {
        Ok(devices) => devices,
        Err(error) => return internal(&viewer, TITLE, error),
    };
    let now = unix_now();
    let state = given(&query.state);
    let model = given(&query.model);
    let search = given(&query.q).map(str::to_ascii_lowercase);
    let page_number = query.page.unwrap_or(1).max(1);

    let mut by_state: BTreeMap<String, usize> = BTreeMap::new();
    let mut models: BTreeMap<String, usize> = BTreeMap::new();
    let mut agents: BTreeMap<&str, usize> = BTreeMap::new();
    let mut matching = 0usize;
    let mut rows = String::new();
    let first = (page_number - 1).saturating_mul(PAGE_SIZE);
    for device in &devices {
        let shown_state = display_state(device, now).as_str();
        *by_state.entry(shown_state.to_owned()).or_default() += 1;
        for running in running(device) {
            *models.entry(running).or_default() += 1;
        }
        *agents.entry(device.agent_version.as_str()).or_default() += 1;
        let id = hex::encode(device.id);
        let wanted = state.is_none_or(|state| state == shown_state)
            && model.is_none_or(|model| model_matches(device, model))
            && search.as_deref().is_none_or(|search| id.contains(search))
            && (selector.is_empty() || selector_matches(&selector, &labels_of(device)));
        if !wanted {
            continue;
        }
        if (first..first + PAGE_SIZE).contains(&matching) {
            row(&mut rows, device, &id, shown_state, now);
        }
        matching += 1;
    }

    let mut body = format!(
        "<h1>Fleet</h1><p class=\"sub\">{} devices enrolled</p>",
        devices.len()
    );
    body.push_str("<div class=\"counts\" id=\"state-counts\">");
    for (name, count) in &by_state {
        let _ = write!(
            body,
            "<a class=\"count\" href=\"/dashboard/fleet?state={}\" data-state=\"{}\">\
             <span class=\"n\">{count}</span>{}</a>",
            Esc(&query_value(name)),
            Esc(name),
            badge(name)
        );
    }
    body.push_str("</div>");
    // The fleet's agent versions: a fleet upgrades piecemeal, and a model that needs a newer
    // agent skips the devices still on an older one.
    body.push_str("<p class=\"sub\" id=\"agent-versions\">agents:");
    for (version, count) in &agents {
        let _ = write!(
            body,
            " <span class=\"agent\">{} × {count}</span>",
            Esc(version)
        );
    }
    body.push_str("</p>");
    filters(&mut body, &query, &by_state, &models);
    let pages = matching.div_ceil(PAGE_SIZE).max(1);
    let _ = write!(
        body,
        "<p class=\"sub\" id=\"matching\">{matching} matching; page {page_number} of {pages}</p>"
    );
    if matching == 0 {
        body.push_str("<p class=\"empty\">No device matches these filters.</p>");
    } else {
        let _ = write!(
            body,
            "<table class=\"devices\" id=\"devices\"><thead><tr><th>Device</th><th>State</th>\
             <th>Model</th><th>Agent</th><th>Arch</th><th>Last check-in</th><th>Labels</th>\
             </tr></thead><tbody>{rows}</tbody></table>"
        );
    }
    pager(&mut body, &query, page_number, pages);
    super::page(TITLE, TITLE, &viewer, &body)
}

fn row(rows: &mut String, device: &DeviceRecord, id: &str, state: &str, now: u64) {
    let _ = write!(
        rows,
        "<tr><td><a class=\"id\" href=\"/dashboard/devices/{id}\">{id}</a></td><td>{}</td>\
         <td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>",
        badge(state),
        Esc(&models_cell(device)),
        Esc(&device.agent_version),
        Esc(&device.arch),
        device
            .last_checkin
            .map_or_else(|| "never".to_owned(), |at| time_cell(at, now)),
    );
    for (key, value) in &device.labels {
        let _ = write!(
            rows,
            "<span class=\"chip\">{}={}</span>",
            Esc(key),
            Esc(value)
        );
    }
    rows.push_str("</td></tr>");
}

/// A device's models for its row, comma-separated; a dash for none.
fn models_cell(device: &DeviceRecord) -> String {
    let models: Vec<String> = running(device).collect();
    if models.is_empty() {
        "—".to_owned()
    } else {
        models.join(", ")
    }
}

/// The filter form: GET, so a filtered view is a link an operator can share.
fn filters(
    body: &mut String,
    query: &FleetQuery,
    by_state: &BTreeMap<String, usize>,
    models: &BTreeMap<String, usize>,
) {
    body.push_str(
        "<form class=\"filters\" method=\"get\" action=\"/dashboard/fleet\" id=\"filters\">\
         <label>State <select name=\"state\" id=\"filter-state\"><option value=\"\">any</option>",
    );
    for name in by_state.keys() {
        let selected = if given(&query.state) == Some(name) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", Esc(name));
    }
    body.push_str(
        "</select></label><label>Model <select name=\"model\" id=\"filter-model\">\
         <option value=\"\">any</option>",
    );
    let none_selected = if given(&query.model) == Some("none") {
        " selected"
    } else {
        ""
    };
    let _ = write!(body, "<option value=\"none\"{none_selected}>none</option>");
    for name in models.keys() {
        let selected = if given(&query.model) == Some(name) {
            " selected"
        } else {
            ""
        };
        let _ = write!(body, "<option{selected}>{}</option>", Esc(name));
    }
    let _ = write!(
        body,
        "</select></label><label>Labels <input name=\"label\" id=\"filter-label\" \
         placeholder=\"key=value\" value=\"{}\"></label><label>Device id <input name=\"q\" \
         id=\"filter-q\" placeholder=\"part of an id\" value=\"{}\"></label>\
         <button type=\"submit\" id=\"apply\">Apply</button>\
         <a class=\"reset\" href=\"/dashboard/fleet\">Reset</a></form>",
        Esc(given(&query.label).unwrap_or("")),
        Esc(given(&query.q).unwrap_or("")),
    );
}

/// Links to the previous and next pages, keeping the filters.
fn pager(body: &mut String, query: &FleetQuery, page_number: usize, pages: usize) {
    let link = |number: usize| {
        let mut href = format!("/dashboard/fleet?page={number}");
        for (name, value) in [
            ("state", &query.state),
            ("model", &query.model),
            ("label", &query.label),
            ("q", &query.q),
        ] {
            if let Some(value) = given(value) {
                let _ = write!(href, "&{name}={}", query_value(value));
            }
        }
        Esc(&href).to_string()
    };
    body.push_str("<nav class=\"pager\">");
    if page_number > 1 {
        let _ = write!(
            body,
            "<a id=\"prev\" href=\"{}\">← previous</a>",
            link(page_number - 1)
        );
    }
    if page_number < pages {
        let _ = write!(
            body,
            "<a id=\"next\" href=\"{}\">next →</a>",
            link(page_number + 1)
        );
    }
    body.push_str("</nav>");
}
