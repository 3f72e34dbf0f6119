//! `/metrics`: running totals per model version since the agent started, in the Prometheus
//! text format.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::header::{HeaderValue, CONTENT_TYPE};
use axum::response::{IntoResponse, Response};
use outpost_protocol::device::LATENCY_BUCKETS_US;

use super::ApiState;

/// Running totals per model version since the agent started, for `/metrics`.
#[derive(Debug, Default)]
pub(super) struct Totals {
    by_version: Mutex<BTreeMap<(String, u64), VersionTotals>>,
}

/// Reads one counter out of a [`VersionTotals`].
pub(super) type TotalsField = fn(&VersionTotals) -> u64;

#[derive(Debug, Default)]
pub(super) struct VersionTotals {
    /// Inferences the model ran, failed ones included.
    count: u64,
    /// Inferences that failed inside the model.
    errors: u64,
    /// Requests refused with 400 before the model ran.
    rejected: u64,
    /// One slot per [`LATENCY_BUCKETS_US`] bound plus the overflow slot; not cumulative.
    buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum: Duration,
}

impl Totals {
    pub(super) fn with(&self, model: &str, version: u64, update: impl FnOnce(&mut VersionTotals)) {
        let mut totals = match self.by_version.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        update(totals.entry((model.to_owned(), version)).or_default());
    }

    pub(super) fn record(&self, model: &str, version: u64, latency: Duration, ok: bool) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.with(model, version, |totals| {
            totals.count += 1;
            if !ok {
                totals.errors += 1;
            }
            totals.buckets[bucket] += 1;
            totals.latency_sum += latency;
        });
    }

    pub(super) fn reject(&self, model: &str, version: u64) {
        self.with(model, version, |totals| totals.rejected += 1);
    }
}

pub(super) async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let text = render_metrics(&state);
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

pub(super) fn render_metrics(state: &ApiState) -> String {
    let mut out = String::new();
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    {
        let totals = match state.totals.by_version.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let counters: [(&str, &str, TotalsField); 3] = [
            (
                "outpost_agent_inferences_total",
                "Inferences run by the model, failed ones included.",
                |totals| totals.count,
            ),
            (
                "outpost_agent_inference_errors_total",
                "Inferences that failed inside the model.",
                |totals| totals.errors,
            ),
            (
                "outpost_agent_inference_rejected_total",
                "Inference requests refused as malformed before reaching the model.",
                |totals| totals.rejected,
            ),
        ];
        for (metric, help, value) in counters {
            header(&mut out, metric, "counter", help);
            for ((model, version), totals) in totals.iter() {
                let labels = labels(model, *version);
                let _ = writeln!(out, "{metric}{{{labels}}} {}", value(totals));
            }
        }
        let metric = "outpost_agent_inference_latency_seconds";
        header(
            &mut out,
            metric,
            "histogram",
            "Time the model took per inference.",
        );
        for ((model, version), totals) in totals.iter() {
            let labels = labels(model, *version);
            let mut cumulative = 0;
            for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&totals.buckets) {
                cumulative += count;
                let le = *bound as f64 / 1e6;
                let _ = writeln!(out, "{metric}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{metric}_bucket{{{labels},le=\"+Inf\"}} {}\n{metric}_sum{{{labels}}} {}\n\
                 {metric}_count{{{labels}}} {}",
                totals.count,
                totals.latency_sum.as_secs_f64(),
                totals.count
            );
        }
    }
    header(
        &mut out,
        "outpost_agent_active_model",
        "gauge",
        "The model version serving requests.",
    );
    for active in state.slot.all() {
        let labels = labels(&active.name, active.version);
        let _ = writeln!(out, "outpost_agent_active_model{{{labels}}} 1");
    }
    header(
        &mut out,
        "outpost_agent_model_runtime",
        "gauge",
        "The inference runtime serving each model version (1), and whether a preferred runtime was passed over (fallback).",
    );
    for active in state.slot.all() {
        let labels = labels(&active.name, active.version);
        let runtime = active.model.runtime();
        let _ = writeln!(
            out,
            "outpost_agent_model_runtime{{{labels},runtime=\"{}\",runtime_version=\"{}\",fallback=\"{}\"}} 1",
            runtime.kind,
            runtime.version.escape_default(),
            active.runtime_fallback.is_some()
        );
    }
    header(
        &mut out,
        "outpost_agent_queue_bytes",
        "gauge",
        "Bytes waiting in the upload queue.",
    );
    let _ = writeln!(
        out,
        "outpost_agent_queue_bytes {}",
        state.queue.queue_bytes.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "outpost_agent_dropped_records_total",
        "counter",
        "Telemetry records dropped because the upload queue was full.",
    );
    let _ = writeln!(
        out,
        "outpost_agent_dropped_records_total {}",
        state.queue.dropped_records.load(Ordering::Relaxed)
    );
    out
}

pub(super) fn labels(model: &str, version: u64) -> String {
    let mut escaped = String::with_capacity(model.len());
    for c in model.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    format!("name=\"{escaped}\",version=\"{version}\"")
}
