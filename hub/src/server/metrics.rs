//! `GET /metrics` in the Prometheus text format, and the middleware that times every request.
//!
//! A scrape needs an admin token of any role (a viewer's is enough) unless the hub runs with
//! `--metrics-public`: the metrics name models, features and the fleet's state. What must read the
//! store (devices by state, the runtimes serving each model, rollout stages, a day of drift) is
//! computed once per engine tick, by [`refresh_fleet`]; a scrape only copies
//! that text and reads counters, so scrapes cannot stall the hub however many come at once.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header::CONTENT_TYPE;
use axum::http::HeaderMap;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use super::drift::label_value;
use super::SharedHub;
use crate::store::DeviceRecord;

/// Upper bounds of the request latency histogram, in seconds.
const LATENCY_BOUNDS: [f64; 12] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default)]
struct RouteStats {
    /// Requests per status code.
    by_status: BTreeMap<u16, u64>,
    buckets: [u64; LATENCY_BOUNDS.len()],
    count: u64,
    sum_secs: f64,
}

/// Counters the handlers bump, and the gauges the engine computes from the store each tick.
#[derive(Debug, Default)]
pub struct Metrics {
    routes: Mutex<BTreeMap<String, RouteStats>>,
    /// The store's gauges as text, from the latest [`refresh_fleet`]; empty before the first.
    fleet: RwLock<Arc<str>>,
    /// Set by a scrape, taken by the next [`refresh_fleet`]: the gauges are computed only while
    /// someone reads them.
    scraped: AtomicBool,
    pub check_ins: AtomicU64,
    /// Check-ins answered without documents, the device holding them already: a held check-in
    /// answered "unchanged", or a models check-in all of whose entries (one at least) are.
    pub check_ins_unchanged: AtomicU64,
    pub enrollments: AtomicU64,
    pub status_reports: AtomicU64,
    pub telemetry_batches: AtomicU64,
    pub telemetry_duplicates: AtomicU64,
    pub telemetry_windows: AtomicU64,
    /// Windows acknowledged but not stored: of a version never published here, or older than
    /// the telemetry retention.
    pub telemetry_windows_skipped: AtomicU64,
    /// Events, drift summaries, shadow comparisons and hourly drift aggregates removed under
    /// their retentions.
    pub pruned_records: AtomicU64,
    pub artifact_bytes_served: AtomicU64,
    /// Artifact downloads sent to a presigned URL of the object store instead.
    pub artifact_redirects: AtomicU64,
}

impl Metrics {
    pub fn bump(counter: &AtomicU64, by: u64) {
        counter.fetch_add(by, Ordering::Relaxed);
    }

    fn record(&self, route: &str, status: u16, seconds: f64) {
        let Ok(mut routes) = self.routes.lock() else {
            return;
        };
        let stats = routes.entry(route.to_owned()).or_default();
        *stats.by_status.entry(status).or_default() += 1;
        stats.count += 1;
        stats.sum_secs += seconds;
        if let Some(bucket) = LATENCY_BOUNDS.iter().position(|bound| seconds <= *bound) {
            stats.buckets[bucket] += 1;
        }
    }
}

/// Middleware: counts and times each request under its route pattern, never its raw path, so
/// device ids and hashes do not explode the label space.
pub async fn track(State(hub): State<SharedHub>, request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_owned(), |path| path.as_str().to_owned());
    let started = Instant::now();
    let response = next.run(request).await;
    hub.metrics.record(
        &route,
        response.status().as_u16(),
        started.elapsed().as_secs_f64(),
    );
    response
}

pub fn routes(hub: SharedHub) -> Router {
    Router::new().route("/metrics", get(render)).with_state(hub)
}

async fn render(State(hub): State<SharedHub>, headers: HeaderMap) -> Response {
    if !hub.config.metrics_public {
        if let Err(error) = super::admin::require(&hub, &headers, crate::api::Role::Viewer).await {
            return error.into_response();
        }
    }
    hub.metrics.scraped.store(true, Ordering::Relaxed);
    match render_text(&hub) {
        Ok(text) => ([(CONTENT_TYPE, "text/plain; version=0.0.4")], text).into_response(),
        Err(error) => {
            log::error!("rendering metrics failed: {error:#}");
            (
                axum::http::StatusCode::INTERNAL_SERVER_ERROR,
                "metrics unavailable",
            )
                .into_response()
        }
    }
}

/// Computes the gauges that read the store (devices by state and by model runtime, rollout
/// stages, drift) and keeps them for scrapes until the next call. The hub's clock calls it once
/// per tick.
///
/// Only when a scrape came since the last call, or none was computed yet: a hub nobody scrapes
/// does not scan its store every tick.
pub async fn refresh_fleet(hub: &SharedHub) -> anyhow::Result<()> {
    let computed = !hub
        .metrics
        .fleet
        .read()
        .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))?
        .is_empty();
    if computed && !hub.metrics.scraped.swap(false, Ordering::Relaxed) {
        return Ok(());
    }
    let text = fleet_text(hub).await?;
    *hub.metrics
        .fleet
        .write()
        .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))? = text.into();
    Ok(())
}

async fn fleet_text(hub: &SharedHub) -> anyhow::Result<String> {
    let mut out = String::new();
    let now = crate::unix_now();

    let devices = hub.store.devices().await?;
    let mut by_state: BTreeMap<&str, u64> = BTreeMap::new();
    for device in &devices {
        *by_state
            .entry(super::fleet::display_state(device, now).as_str())
            .or_default() += 1;
    }
    writeln!(out, "# HELP outpost_hub_devices Enrolled devices by state.")?;
    writeln!(out, "# TYPE outpost_hub_devices gauge")?;
    for (state, count) in &by_state {
        writeln!(out, "outpost_hub_devices{{state=\"{state}\"}} {count}")?;
    }
    write_model_runtimes(hub, &devices, &mut out).await?;

    writeln!(
        out,
        "# HELP outpost_hub_rollout_stage Current stage percentage of each rollout."
    )?;
    writeln!(out, "# TYPE outpost_hub_rollout_stage gauge")?;
    for rollout in hub.store.rollouts().await? {
        let percent = super::engine::stage_percent(&rollout);
        writeln!(
            out,
            "outpost_hub_rollout_stage{{sequence=\"{}\",state=\"{}\"}} {percent}",
            rollout.sequence,
            super::engine::state_of(rollout.state).as_str()
        )?;
    }

    super::drift::write_metrics(hub, now, &mut out).await?;
    writeln!(
        out,
        "# HELP outpost_hub_fleet_gauges_timestamp_seconds When the gauges above were computed \
         from the store (once per engine tick)."
    )?;
    writeln!(
        out,
        "# TYPE outpost_hub_fleet_gauges_timestamp_seconds gauge"
    )?;
    writeln!(out, "outpost_hub_fleet_gauges_timestamp_seconds {now}")?;
    Ok(out)
}

/// `outpost_hub_model_runtime_devices{model,runtime}`: the devices whose latest runtime report
/// says that runtime serves that model. Revoked devices are left out, as they are of the drift
/// metrics: their reports are kept, but they are no longer the fleet's.
async fn write_model_runtimes(
    hub: &SharedHub,
    devices: &[DeviceRecord],
    out: &mut String,
) -> anyhow::Result<()> {
    let reports = hub.store.all_runtimes().await?;
    let mut by_runtime: BTreeMap<(&str, &str), u64> = BTreeMap::new();
    for report in devices
        .iter()
        .filter(|device| !device.revoked)
        .filter_map(|device| reports.get(&device.id))
    {
        for model in &report.models {
            *by_runtime
                .entry((model.name.as_str(), model.runtime.as_str()))
                .or_default() += 1;
        }
    }
    writeln!(
        out,
        "# HELP outpost_hub_model_runtime_devices Devices whose latest runtime report says the \
         runtime serves the model (revoked devices aside)."
    )?;
    writeln!(out, "# TYPE outpost_hub_model_runtime_devices gauge")?;
    for ((model, runtime), count) in &by_runtime {
        writeln!(
            out,
            "outpost_hub_model_runtime_devices{{model=\"{}\",runtime=\"{}\"}} {count}",
            label_value(model),
            label_value(runtime)
        )?;
    }
    Ok(())
}

fn render_text(hub: &SharedHub) -> anyhow::Result<String> {
    let fleet = hub
        .metrics
        .fleet
        .read()
        .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))?
        .clone();
    let mut out = String::from(&*fleet);

    let counters = [
        (
            "outpost_hub_check_ins_total",
            "Device check-ins served.",
            &hub.metrics.check_ins,
        ),
        (
            "outpost_hub_check_ins_unchanged_total",
            "Device check-ins answered without documents: the device held them already.",
            &hub.metrics.check_ins_unchanged,
        ),
        (
            "outpost_hub_enrollments_total",
            "Devices enrolled.",
            &hub.metrics.enrollments,
        ),
        (
            "outpost_hub_status_reports_total",
            "Status reports stored.",
            &hub.metrics.status_reports,
        ),
        (
            "outpost_hub_ingest_batches_total",
            "Telemetry batches stored.",
            &hub.metrics.telemetry_batches,
        ),
        (
            "outpost_hub_ingest_duplicate_batches_total",
            "Telemetry batches resent and acknowledged again.",
            &hub.metrics.telemetry_duplicates,
        ),
        (
            "outpost_hub_ingest_windows_total",
            "Inference windows stored.",
            &hub.metrics.telemetry_windows,
        ),
        (
            "outpost_hub_ingest_windows_skipped_total",
            "Inference windows acknowledged but not stored: of a version never published here, \
             or ended before the telemetry retention.",
            &hub.metrics.telemetry_windows_skipped,
        ),
        (
            "outpost_hub_pruned_records_total",
            "Events, drift summaries, shadow comparisons and hourly drift aggregates removed \
             under their retentions.",
            &hub.metrics.pruned_records,
        ),
        (
            "outpost_hub_artifact_bytes_served_total",
            "Artifact bytes sent to devices.",
            &hub.metrics.artifact_bytes_served,
        ),
        (
            "outpost_hub_artifact_redirects_total",
            "Artifact downloads redirected to a presigned URL of the object store.",
            &hub.metrics.artifact_redirects,
        ),
        (
            "outpost_hub_signature_batches_total",
            "Batches of device request signatures checked together.",
            &hub.verifier.stats().batches,
        ),
        (
            "outpost_hub_signatures_checked_total",
            "Device request signatures checked, in all batches.",
            &hub.verifier.stats().signatures,
        ),
    ];
    for (name, help, counter) in counters {
        writeln!(out, "# HELP {name} {help}")?;
        writeln!(out, "# TYPE {name} counter")?;
        writeln!(out, "{name} {}", counter.load(Ordering::Relaxed))?;
    }

    let routes = hub
        .metrics
        .routes
        .lock()
        .map_err(|_| anyhow::anyhow!("metrics lock poisoned"))?;
    writeln!(
        out,
        "# HELP outpost_hub_http_requests_total Requests by route and status."
    )?;
    writeln!(out, "# TYPE outpost_hub_http_requests_total counter")?;
    for (route, stats) in routes.iter() {
        for (status, count) in &stats.by_status {
            writeln!(
                out,
                "outpost_hub_http_requests_total{{route=\"{route}\",status=\"{status}\"}} {count}"
            )?;
        }
    }
    writeln!(
        out,
        "# HELP outpost_hub_http_request_duration_seconds Request latency by route."
    )?;
    writeln!(
        out,
        "# TYPE outpost_hub_http_request_duration_seconds histogram"
    )?;
    for (route, stats) in routes.iter() {
        let mut cumulative = 0;
        for (bound, count) in LATENCY_BOUNDS.iter().zip(stats.buckets) {
            cumulative += count;
            writeln!(
                out,
                "outpost_hub_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"{bound}\"}} {cumulative}"
            )?;
        }
        writeln!(
            out,
            "outpost_hub_http_request_duration_seconds_bucket{{route=\"{route}\",le=\"+Inf\"}} {}",
            stats.count
        )?;
        writeln!(
            out,
            "outpost_hub_http_request_duration_seconds_sum{{route=\"{route}\"}} {}",
            stats.sum_secs
        )?;
        writeln!(
            out,
            "outpost_hub_http_request_duration_seconds_count{{route=\"{route}\"}} {}",
            stats.count
        )?;
    }
    Ok(out)
}
