//! Per-inference telemetry, kept in memory: counters and a latency histogram per model version and
//! hourly window, and the comparisons of a shadow model with the model that served, in windows of
//! their own. Nothing here touches the disk; whole windows are handed to the cache in batches,
//! never one inference at a time.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use outpost_protocol::device::{
    InferenceWindow, ShadowCounts, ShadowReport, Tensor, LATENCY_BUCKETS_US,
};
use outpost_protocol::drift::DriftSummary;
use outpost_protocol::trust::ManifestRef;

use crate::slot::ModelDrift;

/// Length of a telemetry window: aligned UTC hours.
pub const WINDOW_SECS: u64 = 3600;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct WindowKey {
    model: String,
    version: u64,
    start: u64,
}

#[derive(Debug, Clone, Default)]
struct Counters {
    count: u64,
    errors: u64,
    /// One slot per [`LATENCY_BUCKETS_US`] bound plus the overflow slot.
    latency: [u64; LATENCY_BUCKETS_US.len() + 1],
    /// What the model saw and said in this window, when it has a drift profile.
    drift: Option<DriftSummary>,
}

/// A shadow window: the serving model's window and the shadow model's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct ShadowKey {
    window: WindowKey,
    target: (String, u64, [u8; 32]),
}

/// Collects inference outcomes. Shared by every request handler; cheap to call.
#[derive(Debug, Default)]
pub struct Recorder {
    open: Mutex<HashMap<WindowKey, Counters>>,
    shadow: Mutex<HashMap<ShadowKey, ShadowReport>>,
}

fn bucket_of(latency: Duration) -> usize {
    let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
    LATENCY_BUCKETS_US
        .iter()
        .position(|bound| micros <= *bound)
        .unwrap_or(LATENCY_BUCKETS_US.len())
}

impl Recorder {
    pub fn new() -> Recorder {
        Recorder::default()
    }

    /// Counts one inference at Unix second `now`.
    pub fn record(&self, model: &str, version: u64, latency: Duration, ok: bool, now: u64) {
        self.count(model, version, latency, ok, now, |_, _, _| {});
    }

    /// Counts one inference like [`Recorder::record`], and adds what it saw and answered to the
    /// window's drift summary. Only requests that ran go here: a refused request has no answer.
    #[allow(clippy::too_many_arguments)]
    pub fn record_with_drift(
        &self,
        model: &str,
        version: u64,
        drift: &ModelDrift,
        latency: Duration,
        now: u64,
        inputs: &[Tensor],
        outputs: &[Tensor],
    ) {
        self.count(
            model,
            version,
            latency,
            true,
            now,
            |start, bucket, counters| {
                let summary = counters.drift.get_or_insert_with(|| {
                    DriftSummary::new(
                        model,
                        version,
                        drift.sha256,
                        &drift.profile,
                        start,
                        start + WINDOW_SECS,
                    )
                });
                if let Some(slot) = summary.latency_us.get_mut(bucket) {
                    *slot += 1;
                }
                drift
                    .extractor
                    .observe(&drift.profile, summary, inputs, outputs);
            },
        );
    }

    /// Adds one inference to its window's counters, then hands the window (its start, the
    /// latency bucket and the counters) to `then` under the same lock.
    fn count(
        &self,
        model: &str,
        version: u64,
        latency: Duration,
        ok: bool,
        now: u64,
        then: impl FnOnce(u64, usize, &mut Counters),
    ) {
        let start = now - now % WINDOW_SECS;
        let key = WindowKey {
            model: model.to_owned(),
            version,
            start,
        };
        let mut open = match self.open.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let bucket = bucket_of(latency);
        let counters = open.entry(key).or_default();
        counters.count += 1;
        if !ok {
            counters.errors += 1;
        }
        counters.latency[bucket] += 1;
        then(start, bucket, counters);
    }

    /// Adds a shadow comparison (or a dropped input) of `target` beside `model` `version` to the
    /// shadow window of Unix second `now`.
    pub fn record_shadow(
        &self,
        model: &str,
        version: u64,
        target: &ManifestRef,
        comparison: &ShadowCounts,
        now: u64,
    ) {
        let key = ShadowKey {
            window: WindowKey {
                model: model.to_owned(),
                version,
                start: now - now % WINDOW_SECS,
            },
            target: (
                target.name.clone(),
                target.version,
                target.manifest_sha256.0,
            ),
        };
        let mut open = match self.shadow.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let report = open.entry(key).or_insert_with(|| ShadowReport {
            target: target.clone(),
            counts: ShadowCounts::default(),
        });
        report.counts.add(comparison);
    }

    /// Removes and returns the windows that ended at or before `now`.
    pub fn take_closed(&self, now: u64) -> Vec<InferenceWindow> {
        self.take(|key| key.start + WINDOW_SECS <= now)
    }

    /// Removes and returns every window, open or not: for shutdown, and for uploading a partial
    /// window. A later call starts counting the same window afresh; the hub adds the parts.
    pub fn take_all(&self) -> Vec<InferenceWindow> {
        self.take(|_| true)
    }

    fn take(&self, wanted: impl Fn(&WindowKey) -> bool) -> Vec<InferenceWindow> {
        let mut open = match self.open.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let keys: Vec<WindowKey> = open.keys().filter(|key| wanted(key)).cloned().collect();
        let mut windows: Vec<InferenceWindow> = keys
            .into_iter()
            .filter_map(|key| {
                let counters = open.remove(&key)?;
                Some(InferenceWindow {
                    model: key.model,
                    version: key.version,
                    start: key.start,
                    end: key.start + WINDOW_SECS,
                    count: counters.count,
                    errors: counters.errors,
                    latency_buckets: counters.latency.to_vec(),
                    drift: counters.drift,
                    shadow: None,
                })
            })
            .collect();
        drop(open);
        let mut shadow = match self.shadow.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let keys: Vec<ShadowKey> = shadow
            .keys()
            .filter(|key| wanted(&key.window))
            .cloned()
            .collect();
        for key in keys {
            let Some(report) = shadow.remove(&key) else {
                continue;
            };
            // A shadow window counts no inference of its own: the serving model's window does.
            windows.push(InferenceWindow {
                model: key.window.model,
                version: key.window.version,
                start: key.window.start,
                end: key.window.start + WINDOW_SECS,
                count: 0,
                errors: 0,
                latency_buckets: Vec::new(),
                drift: None,
                shadow: Some(report),
            });
        }
        windows
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_count_and_close() {
        let recorder = Recorder::new();
        recorder.record("m", 1, Duration::from_micros(80), true, 7200);
        recorder.record("m", 1, Duration::from_millis(3), false, 7300);
        recorder.record("m", 2, Duration::from_secs(60), true, 10_800);
        assert!(recorder.take_closed(10_799).is_empty());
        let closed = recorder.take_closed(10_800);
        assert_eq!(closed.len(), 1);
        let window = &closed[0];
        assert_eq!(
            (window.start, window.end, window.count, window.errors),
            (7200, 10_800, 2, 1)
        );
        assert_eq!(window.latency_buckets[0], 1);
        assert_eq!(window.latency_buckets[5], 1);
        let rest = recorder.take_all();
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].latency_buckets[LATENCY_BUCKETS_US.len()], 1);
        assert!(recorder.take_all().is_empty());
    }
}
