//! The telemetry cache through its public API, on real sled directories in temp dirs: idempotent
//! and crash-safe upload batches, the byte cap and its drop accounting, roll-up, quarantine.

use std::fs;
use std::path::{Path, PathBuf};

use outpost_agent::cache::{CacheError, PendingBatch, TelemetryCache};
use outpost_protocol::device::{InferenceWindow, ShadowCounts, ShadowReport, LATENCY_BUCKETS_US};
use outpost_protocol::trust::ManifestRef;
use outpost_protocol::Sha256;

/// A UTC midnight; every start below is a 5-byte varint, so same-shaped windows encode alike.
const DAY0: u64 = 1_700_006_400;
const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;
const BIG: u64 = 1 << 30;

fn window(model: &str, start: u64, count: u64, bucket: usize) -> InferenceWindow {
    let mut latency_buckets = vec![0; LATENCY_BUCKETS_US.len() + 1];
    latency_buckets[bucket] = count;
    InferenceWindow {
        model: model.to_owned(),
        version: 1,
        start,
        end: start + HOUR,
        count,
        errors: 1,
        latency_buckets,
        drift: None,
        shadow: None,
    }
}

/// One hourly window on day `day`: windows of different days are never rolled up together.
fn daily(day: u64) -> InferenceWindow {
    window("m", DAY0 + day * DAY, 5, 2)
}

struct Dir {
    _tmp: tempfile::TempDir,
    path: PathBuf,
}

fn dir() -> Dir {
    let tmp = tempfile::tempdir().expect("temp dir");
    let path = tmp.path().join("telemetry");
    Dir { _tmp: tmp, path }
}

fn open(path: &Path, cap_bytes: u64) -> TelemetryCache {
    let (cache, quarantine) = TelemetryCache::open(path, cap_bytes).expect("open cache");
    assert_eq!(quarantine, None);
    cache
}

fn pending(cache: &TelemetryCache, max_windows: usize) -> PendingBatch {
    cache
        .pending(max_windows, usize::MAX)
        .expect("pending")
        .expect("a batch")
}

/// The logical size of a cache holding one record of one `daily` window.
fn record_size() -> u64 {
    let dir = dir();
    let cache = open(&dir.path, BIG);
    cache.append(&[daily(0)]).expect("append");
    cache.stats().queue_bytes
}

fn quarantined_siblings(path: &Path) -> Vec<PathBuf> {
    let name = path
        .file_name()
        .expect("name")
        .to_string_lossy()
        .into_owned();
    let mut found: Vec<PathBuf> = fs::read_dir(path.parent().expect("parent"))
        .expect("read dir")
        .map(|entry| entry.expect("entry").path())
        .filter(|sibling| {
            sibling.file_name().is_some_and(|n| {
                n.to_string_lossy()
                    .starts_with(&format!("{name}.quarantined-"))
            })
        })
        .collect();
    found.sort();
    found
}

#[test]
fn nothing_pending_in_an_empty_cache() {
    let dir = dir();
    let cache = open(&dir.path, BIG);
    assert_eq!(cache.pending(10, usize::MAX).expect("pending"), None);
    assert_eq!(cache.append(&[]).expect("append").appended_windows, 0);
    assert_eq!(cache.pending(10, usize::MAX).expect("pending"), None);
}

#[test]
fn a_batch_is_resent_unchanged_until_acknowledged_even_across_reopen() {
    let dir = dir();
    let first = {
        let cache = open(&dir.path, BIG);
        cache.append(&[daily(0)]).expect("append");
        cache.append(&[daily(1), daily(2)]).expect("append");
        let first = pending(&cache, 10);
        assert_eq!(first.windows, vec![daily(0), daily(1), daily(2)]);
        assert_eq!(first.dropped_records, 0);
        assert_eq!(first.keys.len(), 2);
        // A timeout and a retry: the same batch, not a new one.
        assert_eq!(pending(&cache, 10), first);
        // Windows appended meanwhile wait for the next batch.
        cache.append(&[daily(3)]).expect("append");
        assert_eq!(pending(&cache, 1), first);
        first
    };
    // A crash before the ack arrived: the reopened cache resends the same batch.
    let cache = open(&dir.path, BIG);
    assert_eq!(pending(&cache, 10), first);
    cache.acknowledge(first.sequence).expect("acknowledge");
    let second = pending(&cache, 10);
    assert_eq!(second.sequence, first.sequence + 1);
    assert_eq!(second.windows, vec![daily(3)]);
    // A stale ack changes nothing.
    assert!(matches!(
        cache.acknowledge(first.sequence),
        Err(CacheError::NotPending { acknowledged, pending: Some(pending) })
            if acknowledged == first.sequence && pending == second.sequence
    ));
    cache.acknowledge(second.sequence).expect("acknowledge");
    assert_eq!(cache.pending(10, usize::MAX).expect("pending"), None);
    assert!(matches!(
        cache.acknowledge(second.sequence),
        Err(CacheError::NotPending { pending: None, .. })
    ));
    // Sequences keep counting across a reopen after the ack.
    drop(cache);
    let cache = open(&dir.path, BIG);
    cache.append(&[daily(4)]).expect("append");
    assert_eq!(pending(&cache, 10).sequence, second.sequence + 1);
}

#[test]
fn records_survive_reopen() {
    let dir = dir();
    {
        let cache = open(&dir.path, BIG);
        cache.append(&[daily(0), daily(1)]).expect("append");
        cache.append(&[daily(2)]).expect("append");
    }
    let cache = open(&dir.path, BIG);
    assert_eq!(cache.stats().queued_windows, 3);
    assert_eq!(
        pending(&cache, 10).windows,
        vec![daily(0), daily(1), daily(2)]
    );
}

#[test]
fn max_windows_splits_a_record_oldest_first() {
    let dir = dir();
    let cache = open(&dir.path, BIG);
    // Appended out of order: a record keeps its windows oldest first.
    cache
        .append(&[daily(2), daily(0), daily(4), daily(1), daily(3)])
        .expect("append");
    let mut seen = Vec::new();
    while let Some(batch) = cache.pending(2, usize::MAX).expect("pending") {
        assert!(batch.windows.len() <= 2);
        seen.extend(batch.windows.clone());
        cache.acknowledge(batch.sequence).expect("acknowledge");
    }
    assert_eq!(seen, (0..5).map(daily).collect::<Vec<_>>());
}

#[test]
fn over_the_cap_the_oldest_windows_are_dropped_and_reported_once() {
    let size = record_size();
    let dir = dir();
    let (n, k) = (5u64, 3u64);
    {
        let cache = open(&dir.path, n * size);
        let mut dropped = 0;
        for day in 0..n + k {
            let outcome = cache.append(&[daily(day)]).expect("append");
            assert_eq!(outcome.appended_windows, 1);
            assert_eq!(outcome.merged_windows, 0);
            dropped += outcome.dropped_windows;
        }
        assert_eq!(dropped, k);
        let stats = cache.stats();
        assert_eq!(stats.queue_bytes, n * size);
        assert_eq!(stats.queued_windows, n);
        assert_eq!(stats.dropped_total, k);
        assert_eq!(stats.dropped_since_batch, k);
        assert_eq!(stats.merged_total, 0);
    }
    // The drop count is persisted, not only kept in memory.
    let cache = open(&dir.path, n * size);
    let batch = pending(&cache, 100);
    assert_eq!(batch.dropped_records, k);
    assert_eq!(batch.windows, (k..n + k).map(daily).collect::<Vec<_>>());
    assert_eq!(cache.stats().dropped_since_batch, 0);
    cache.acknowledge(batch.sequence).expect("acknowledge");
    cache.append(&[daily(20)]).expect("append");
    let next = pending(&cache, 100);
    assert_eq!(next.dropped_records, 0, "drops are reported exactly once");
    assert_eq!(cache.stats().dropped_total, k);
}

#[test]
fn drops_spare_the_batch_in_flight() {
    let size = record_size();
    let dir = dir();
    let cache = open(&dir.path, 4 * size);
    cache.append(&[daily(0)]).expect("append");
    cache.append(&[daily(1)]).expect("append");
    let in_flight = pending(&cache, 10);
    let mut dropped = 0;
    for day in 2..8 {
        dropped += cache.append(&[daily(day)]).expect("append").dropped_windows;
    }
    assert!(dropped > 0);
    assert_eq!(pending(&cache, 10), in_flight);
    let stats = cache.stats();
    assert!(stats.queue_bytes <= 4 * size);
    assert_eq!(stats.dropped_total, dropped);
    cache.acknowledge(in_flight.sequence).expect("acknowledge");
    let next = pending(&cache, 10);
    assert_eq!(next.dropped_records, dropped);
    // The newest survived: the queue lost its oldest windows.
    let kept = 6 - dropped;
    assert_eq!(next.windows, (8 - kept..8).map(daily).collect::<Vec<_>>());
}

#[test]
fn an_outbox_batch_alone_over_the_cap_keeps_its_sequence_and_reports_its_drops() {
    let size = record_size();
    let dir = dir();
    let in_flight = {
        let cache = open(&dir.path, BIG);
        cache
            .append(&[daily(0), daily(1), daily(2), daily(3)])
            .expect("append");
        pending(&cache, 10)
    };
    // The operator lowered the cap below the batch in flight.
    let cache = open(&dir.path, 2 * size);
    let outcome = cache.append(&[daily(9)]).expect("append");
    let shrunk = pending(&cache, 10);
    assert_eq!(shrunk.sequence, in_flight.sequence);
    assert!(shrunk.windows.len() < 4);
    // Each version of the batch accounts for all four windows, as windows or as drops.
    assert_eq!(shrunk.windows.len() as u64 + shrunk.dropped_records, 4);
    assert_eq!(
        shrunk.windows[..],
        in_flight.windows[4 - shrunk.windows.len()..]
    );
    assert_eq!(outcome.dropped_windows, 1 + shrunk.dropped_records);
    assert_eq!(cache.stats().dropped_total, 1 + shrunk.dropped_records);
    assert!(cache.stats().queue_bytes <= 2 * size);
    cache.acknowledge(shrunk.sequence).expect("acknowledge");
    // The queued window that was dropped for it is reported by the next batch.
    let next = pending(&cache, 10);
    assert_eq!(next.sequence, in_flight.sequence + 1);
    assert_eq!((next.windows.len(), next.dropped_records), (0, 1));
}

#[test]
fn near_the_cap_hourly_windows_roll_up_into_daily_ones_before_any_drop() {
    let size = record_size();
    let dir = dir();
    let cache = open(&dir.path, 10 * size);
    let hours: Vec<InferenceWindow> = (0..24)
        .map(|hour| window("m", DAY0 + hour * HOUR, 1 + hour % 4, (hour % 17) as usize))
        .collect();
    let mut merged = 0;
    for hour in &hours {
        let outcome = cache.append(std::slice::from_ref(hour)).expect("append");
        assert_eq!(outcome.dropped_windows, 0);
        merged += outcome.merged_windows;
    }
    // Another model's window of the same day stays separate.
    let outcome = cache
        .append(&[window("other", DAY0, 7, 0)])
        .expect("append");
    assert_eq!(outcome.dropped_windows, 0);
    merged += outcome.merged_windows;
    // Without roll-up, 25 windows in a cap of 10 would have dropped 15. Each time the queue
    // passed 80% of the cap, every window of model "m" was merged into one.
    let stats = cache.stats();
    assert_eq!(stats.dropped_total, 0);
    assert_eq!(stats.merged_total, merged);
    assert_eq!(merged, 23);
    assert!(stats.queue_bytes <= 10 * size);
    assert_eq!(stats.queued_windows, 2);

    let batch = pending(&cache, 100);
    assert_eq!(batch.dropped_records, 0);
    let of_m: Vec<&InferenceWindow> = batch.windows.iter().filter(|w| w.model == "m").collect();
    let sum = |field: fn(&InferenceWindow) -> u64, windows: &[&InferenceWindow]| -> u64 {
        windows.iter().map(|w| field(w)).sum()
    };
    assert_eq!(
        sum(|w| w.count, &of_m),
        hours.iter().map(|w| w.count).sum::<u64>()
    );
    assert_eq!(sum(|w| w.errors, &of_m), 24);
    for bucket in 0..=LATENCY_BUCKETS_US.len() {
        let want: u64 = hours.iter().map(|w| w.latency_buckets[bucket]).sum();
        let got: u64 = of_m.iter().map(|w| w.latency_buckets[bucket]).sum();
        assert_eq!(got, want, "bucket {bucket}");
    }
    for merged_window in &of_m {
        assert!(merged_window.start >= DAY0 && merged_window.end <= DAY0 + DAY);
    }
    assert_eq!(of_m.iter().map(|w| w.start).min(), Some(DAY0));
    assert_eq!(of_m.iter().map(|w| w.end).max(), Some(DAY0 + DAY));
    assert!(batch
        .windows
        .iter()
        .any(|w| w.model == "other" && w.count == 7));
}

#[test]
fn stats_count_bytes_windows_and_the_pending_batch() {
    let size = record_size();
    let dir = dir();
    let cache = open(&dir.path, BIG);
    let empty = cache.stats();
    assert_eq!(
        (
            empty.queue_bytes,
            empty.queued_windows,
            empty.dropped_total,
            empty.pending_sequence,
            empty.cap_bytes
        ),
        (0, 0, 0, None, BIG)
    );
    for day in 0..3 {
        cache.append(&[daily(day)]).expect("append");
    }
    let stats = cache.stats();
    assert_eq!(stats.queue_bytes, 3 * size);
    assert_eq!(stats.queued_windows, 3);
    let batch = pending(&cache, 2);
    let stats = cache.stats();
    assert_eq!(stats.queued_windows, 3);
    assert_eq!(stats.pending_sequence, Some(batch.sequence));
    // The outbox batch is one record with its own overhead (sequence, keys): more than the one
    // record left in the queue, of about the size of the two it was formed from.
    assert!(stats.queue_bytes > 2 * size && stats.queue_bytes < 4 * size);
    cache.acknowledge(batch.sequence).expect("acknowledge");
    let stats = cache.stats();
    assert_eq!(
        (
            stats.queue_bytes,
            stats.queued_windows,
            stats.pending_sequence
        ),
        (size, 1, None)
    );
    // Reopening recomputes the same numbers from disk.
    drop(cache);
    let cache = open(&dir.path, BIG);
    assert_eq!(cache.stats(), stats);
}

fn overwrite_files(dir: &Path, with: &dyn Fn(&Path)) {
    for entry in fs::read_dir(dir).expect("read dir") {
        let path = entry.expect("entry").path();
        if path.is_dir() {
            overwrite_files(&path, with);
        } else {
            with(&path);
        }
    }
}

fn assert_quarantined_and_fresh(path: &Path) {
    let (cache, quarantine) = TelemetryCache::open(path, BIG).expect("open");
    let quarantine = quarantine.expect("a quarantine");
    assert!(!quarantine.reason.is_empty());
    assert_eq!(
        quarantined_siblings(path),
        vec![quarantine.moved_to.clone()]
    );
    assert!(quarantine.moved_to.join("db").exists());
    // The new cache is empty and works.
    assert_eq!(cache.stats().queued_windows, 0);
    assert_eq!(cache.pending(10, usize::MAX).expect("pending"), None);
    cache.append(&[daily(7)]).expect("append");
    let batch = pending(&cache, 10);
    assert_eq!(batch.windows, vec![daily(7)]);
    cache.acknowledge(batch.sequence).expect("acknowledge");
    drop(cache);
    // And it opens cleanly the next time.
    let (_cache, quarantine) = TelemetryCache::open(path, BIG).expect("reopen");
    assert_eq!(quarantine, None);
}

fn filled(path: &Path) {
    let cache = open(path, BIG);
    for day in 0..20 {
        cache.append(&[daily(day)]).expect("append");
    }
    pending(&cache, 5);
}

#[test]
fn a_directory_of_garbage_is_quarantined() {
    let dir = dir();
    filled(&dir.path);
    overwrite_files(&dir.path, &|file| {
        let len = fs::metadata(file).expect("metadata").len().max(64);
        let garbage: Vec<u8> = (0..len).map(|i| (i * 31 % 251) as u8).collect();
        fs::write(file, garbage).expect("overwrite");
    });
    assert_quarantined_and_fresh(&dir.path);
}

#[test]
fn a_truncated_database_is_quarantined() {
    let dir = dir();
    filled(&dir.path);
    let db = dir.path.join("db");
    let len = fs::metadata(&db).expect("metadata").len();
    let bytes = fs::read(&db).expect("read db");
    // sled takes a cut log for a torn write and recovers an older state without an error; the
    // cache notices the rollback (its sequences would repeat ones the hub has seen).
    fs::write(&db, &bytes[..(len / 2) as usize]).expect("truncate");
    assert_quarantined_and_fresh(&dir.path);
}

#[test]
fn a_cache_in_use_is_refused_not_quarantined() {
    let dir = dir();
    let cache = open(&dir.path, BIG);
    cache.append(&[daily(0)]).expect("append");
    assert!(matches!(
        TelemetryCache::open(&dir.path, BIG),
        Err(CacheError::Open { .. })
    ));
    assert!(quarantined_siblings(&dir.path).is_empty());
    assert_eq!(pending(&cache, 10).windows, vec![daily(0)]);
}

#[test]
fn a_database_that_comes_back_empty_is_quarantined() {
    let dir = dir();
    filled(&dir.path);
    // sled recovers a log of garbage as an empty database, without an error.
    let db = dir.path.join("db");
    let garbage: Vec<u8> = fs::read(&db)
        .expect("read db")
        .iter()
        .map(|byte| byte ^ 0x5a)
        .collect();
    fs::write(&db, garbage).expect("overwrite");
    assert_quarantined_and_fresh(&dir.path);
}

/// A one-feature profile with edges 0..=10, and an hourly summary of `values` for model "m".
fn drift_profile() -> outpost_protocol::drift::Profile {
    use outpost_protocol::drift::{
        FeatureSource, FeatureSummary, NumericProfile, Profile, TensorSide, Thresholds,
    };
    let edges: Vec<f64> = (0..=10).map(f64::from).collect();
    Profile {
        features: vec![NumericProfile {
            name: "x[0]".to_owned(),
            side: TensorSide::Input,
            source: FeatureSource::Column {
                tensor: "x".to_owned(),
                index: 0,
            },
            reference: FeatureSummary::new(&edges),
            edges,
        }],
        classes: vec![],
        thresholds: Thresholds::default(),
    }
}

fn drifted(hour: u64, values: &[f64]) -> InferenceWindow {
    use outpost_protocol::drift::DriftSummary;
    let profile = drift_profile();
    let start = DAY0 + hour * HOUR;
    let mut summary = DriftSummary::new(
        "m",
        1,
        outpost_protocol::Sha256([3; 32]),
        &profile,
        start,
        start + HOUR,
    );
    for value in values {
        summary.features[0].observe(*value, &profile.features[0].edges);
    }
    InferenceWindow {
        drift: Some(summary),
        ..window("m", start, values.len() as u64, 0)
    }
}

/// A shadow window of hour `hour` of day 0: `compared` comparisons of target `target`.
fn shadowed(hour: u64, target: u8, compared: u64) -> InferenceWindow {
    InferenceWindow {
        count: 0,
        errors: 0,
        latency_buckets: Vec::new(),
        shadow: Some(ShadowReport {
            target: ManifestRef {
                name: "m".to_owned(),
                version: 2,
                manifest_sha256: Sha256([target; 32]),
            },
            counts: ShadowCounts {
                compared,
                top1_agreed: compared - 1,
                errors: 1,
                abs_diff_sum: 0.25,
                abs_diff_values: compared * 3,
                dropped: 2,
            },
        }),
        ..window("m", DAY0 + hour * HOUR, 0, 0)
    }
}

#[test]
fn shadow_reports_travel_with_their_windows_and_add_up_per_target_in_roll_ups() {
    let dir = dir();
    let size = record_size();
    let cache = open(&dir.path, 10 * size);
    // Hours of one day: a serving window and shadow windows of two targets each.
    for hour in 0..8 {
        let windows = [
            window("m", DAY0 + hour * HOUR, 5, 0),
            shadowed(hour, 1, 10),
            shadowed(hour, 2, 20),
        ];
        let outcome = cache.append(&windows).expect("append");
        assert_eq!(outcome.dropped_windows, 0);
    }
    assert!(cache.stats().merged_total > 0, "the cap forced roll-ups");
    let batch = pending(&cache, 100);
    let served: u64 = batch.windows.iter().map(|w| w.count).sum();
    assert_eq!(served, 40);
    for (target, compared) in [(1u8, 10u64), (2, 20)] {
        let reports: Vec<&ShadowReport> = batch
            .windows
            .iter()
            .filter_map(|w| w.shadow.as_ref())
            .filter(|r| r.target.manifest_sha256 == Sha256([target; 32]))
            .collect();
        let sum = |field: fn(&ShadowReport) -> u64| reports.iter().map(|r| field(r)).sum::<u64>();
        assert_eq!(sum(|r| r.counts.compared), 8 * compared, "target {target}");
        assert_eq!(sum(|r| r.counts.top1_agreed), 8 * (compared - 1));
        assert_eq!(sum(|r| r.counts.errors), 8);
        assert_eq!(sum(|r| r.counts.abs_diff_values), 8 * compared * 3);
        assert_eq!(sum(|r| r.counts.dropped), 16);
        let diff: f64 = reports.iter().map(|r| r.counts.abs_diff_sum).sum();
        assert!((diff - 2.0).abs() < 1e-12);
    }
    // A serving window never absorbs a shadow report, nor the other way round.
    for window in &batch.windows {
        assert!(window.shadow.is_none() || window.count == 0, "{window:?}");
    }
}

#[test]
fn drift_summaries_travel_with_their_windows_and_merge_in_roll_ups() {
    let dir = dir();
    let hours: Vec<InferenceWindow> = (0..24)
        .map(|hour| {
            let values: Vec<f64> = (0..50)
                .map(|i| ((i * 7 + hour * 3) % 120) as f64 / 10.0 - 0.5)
                .collect();
            drifted(hour, &values)
        })
        .collect();
    // A cap that forces roll-ups: each drift-carrying window takes a few hundred bytes.
    let cache = open(&dir.path, 2_000);
    for hour in &hours {
        let outcome = cache.append(std::slice::from_ref(hour)).expect("append");
        assert_eq!(outcome.dropped_windows, 0);
    }
    assert!(cache.stats().merged_total > 0, "the cap forced roll-ups");
    let batch = pending(&cache, 100);
    let mut want = hours[0].drift.clone().expect("drift");
    for hour in &hours[1..] {
        want.merge(hour.drift.as_ref().expect("drift"))
            .expect("same profile");
    }
    let mut got = batch.windows[0]
        .drift
        .clone()
        .expect("the daily window keeps its drift");
    for window in &batch.windows[1..] {
        got.merge(window.drift.as_ref().expect("drift"))
            .expect("same profile");
    }
    let (got, want) = (&got.features[0], &want.features[0]);
    assert_eq!(got.n, 24 * 50);
    assert_eq!(
        (got.n, got.below, got.above, &got.bins, got.min, got.max),
        (want.n, want.below, want.above, &want.bins, want.min, want.max)
    );
    assert!((got.mean - want.mean).abs() <= 1e-9 * want.mean.abs().max(1.0));
    assert!((got.m2 - want.m2).abs() <= 1e-9 * want.m2.abs().max(1.0));
}

#[test]
fn a_byte_budget_splits_batches_of_large_summaries() {
    let dir = dir();
    let cache = open(&dir.path, BIG);
    let values: Vec<f64> = (0..10).map(f64::from).collect();
    let windows: Vec<InferenceWindow> = (0..6).map(|hour| drifted(hour, &values)).collect();
    cache.append(&windows).expect("append");
    let mut seen = Vec::new();
    // Room for about two windows per batch, and never fewer than one.
    while let Some(batch) = cache.pending(100, 700).expect("pending") {
        assert!(
            (1..=2).contains(&batch.windows.len()),
            "{} windows",
            batch.windows.len()
        );
        seen.extend(batch.windows.clone());
        cache.acknowledge(batch.sequence).expect("acknowledge");
    }
    assert_eq!(seen, windows);
    cache.append(&windows[..1]).expect("append");
    let one = cache.pending(100, 1).expect("pending").expect("a batch");
    assert_eq!(
        one.windows.len(),
        1,
        "a window bigger than the budget still goes alone"
    );
}

#[test]
fn a_refused_batch_loses_its_drift_then_is_dropped_and_counted() {
    use outpost_agent::cache::Refusal;
    let dir = dir();
    let cache = open(&dir.path, BIG);
    let values: Vec<f64> = (0..10).map(f64::from).collect();
    cache
        .append(&[drifted(0, &values), daily(1)])
        .expect("append");
    let first = pending(&cache, 10);
    assert!(first.windows[0].drift.is_some());
    // The hub refused it: the same batch comes back without drift, counters intact.
    assert_eq!(
        cache.refused(first.sequence).expect("refused"),
        Refusal::DriftStripped
    );
    let stripped = pending(&cache, 10);
    assert_eq!(stripped.sequence, first.sequence);
    assert_eq!(stripped.windows.len(), 2);
    assert!(stripped.windows.iter().all(|window| window.drift.is_none()));
    assert_eq!(stripped.windows[0].count, first.windows[0].count);
    // Refused again: dropped, and its two windows are reported with the next batch.
    assert_eq!(
        cache.refused(first.sequence).expect("refused"),
        Refusal::Dropped { windows: 2 }
    );
    assert_eq!(cache.stats().dropped_total, 2);
    cache.append(&[daily(2)]).expect("append");
    let next = pending(&cache, 10);
    assert_ne!(next.sequence, first.sequence);
    assert_eq!(next.dropped_records, 2);
    assert_eq!(next.windows, vec![daily(2)]);
    assert!(matches!(
        cache.refused(first.sequence),
        Err(CacheError::NotPending { .. })
    ));
}

#[test]
fn near_the_cap_a_roll_up_reads_only_the_days_of_new_windows() {
    let size = record_size();
    let dir = dir();
    let cache = open(&dir.path, 50 * size);
    // One window a day, a record each: nothing to merge. The 41st record takes the queue over 80%
    // of the cap, and the first roll-up since open reads every record.
    for day in 0..40 {
        let outcome = cache.append(&[daily(day)]).expect("append");
        assert_eq!(outcome.rolled_up_records, 0, "day {day}");
    }
    let outcome = cache.append(&[daily(40)]).expect("append");
    assert_eq!((outcome.rolled_up_records, outcome.merged_windows), (41, 0));
    // From then on, a window of a new day is read alone...
    for day in 41..45 {
        let outcome = cache.append(&[daily(day)]).expect("append");
        assert_eq!((outcome.rolled_up_records, outcome.merged_windows), (1, 0));
    }
    // ...and another hour of a day already queued with the one record holding that day.
    let outcome = cache
        .append(&[window("m", DAY0 + 44 * DAY + HOUR, 5, 2)])
        .expect("append");
    assert_eq!((outcome.rolled_up_records, outcome.merged_windows), (2, 1));
    assert_eq!(outcome.dropped_windows, 0);
    assert_eq!(cache.stats().queued_windows, 45);

    // A reopened cache cannot know what was rolled up: its first roll-up reads everything again.
    drop(cache);
    let cache = open(&dir.path, 50 * size);
    let outcome = cache.append(&[daily(45)]).expect("append");
    assert_eq!((outcome.rolled_up_records, outcome.merged_windows), (46, 0));
    let outcome = cache.append(&[daily(46)]).expect("append");
    assert_eq!(outcome.rolled_up_records, 1);
}

#[test]
fn a_roll_up_larger_than_its_memory_bound_still_merges_every_day() {
    const HOURS_PER_RECORD: u64 = 1001;
    const RECORDS: u64 = 90;
    let dir = dir();
    let queued = {
        let cache = open(&dir.path, BIG);
        for record in 0..RECORDS {
            let hours: Vec<InferenceWindow> = (0..HOURS_PER_RECORD)
                .map(|hour| {
                    let hour = record * HOURS_PER_RECORD + hour;
                    window("m", DAY0 + hour * HOUR, 1, (hour % 17) as usize)
                })
                .collect();
            cache.append(&hours).expect("append");
        }
        cache.stats().queue_bytes
    };
    // Three times the megabyte a roll-up holds decoded at once, and records share a day at
    // nearly every boundary (1001 hours are 41 days and 17 hours).
    assert!(queued > 3 << 20, "{queued} bytes queued");
    let days = (RECORDS * HOURS_PER_RECORD).div_ceil(24);
    let cache = open(&dir.path, queued * 100 / 81);
    let outcome = cache
        .append(&[window("m", DAY0 + days * DAY, 1, 0)])
        .expect("append");
    assert_eq!(outcome.rolled_up_records, RECORDS + 1);
    assert_eq!(outcome.dropped_windows, 0);
    assert_eq!(outcome.merged_windows, RECORDS * HOURS_PER_RECORD - days);
    let stats = cache.stats();
    assert_eq!(stats.queued_windows, days + 1);
    // Every inference is still counted, in one window a day.
    let batch = pending(&cache, 5000);
    assert_eq!(batch.windows.len() as u64, days + 1);
    assert_eq!(
        batch.windows.iter().map(|w| w.count).sum::<u64>(),
        RECORDS * HOURS_PER_RECORD + 1
    );
    let mut starts: Vec<u64> = batch.windows.iter().map(|w| w.start / DAY).collect();
    starts.dedup();
    assert_eq!(starts.len() as u64, days + 1);
}
