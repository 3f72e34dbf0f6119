//! The cache's unit tests of its internals (the behaviour through its API is tested in
//! `agent/tests/cache.rs`).

use super::*;

fn window(day: u64) -> InferenceWindow {
    InferenceWindow {
        model: "m".to_owned(),
        version: 1,
        start: 1_700_006_400 + day * DAY_SECS,
        end: 1_700_010_000 + day * DAY_SECS,
        count: 3,
        errors: 0,
        latency_buckets: vec![3; 17],
        drift: None,
        shadow: None,
    }
}

#[test]
fn day_spans_merge_and_find_overlaps() {
    let span = |first, last| DaySpan { first, last };
    let spans = DaySpans::new([
        span(20, 20),
        span(5, 7),
        span(8, 9),
        span(6, 6),
        span(30, 40),
    ]);
    assert_eq!(spans.0, [span(5, 9), span(20, 20), span(30, 40)]);
    for (days, overlaps) in [
        (span(0, 4), false),
        (span(0, 5), true),
        (span(9, 19), true),
        (span(10, 19), false),
        (span(21, 29), false),
        (span(15, 35), true),
        (span(40, 41), true),
        (span(41, u64::MAX), false),
    ] {
        assert_eq!(spans.overlaps(&days), overlaps, "{days:?}");
    }
    assert!(!DaySpans::default().overlaps(&span(0, u64::MAX)));
}

fn open(dir: &Path) -> TelemetryCache {
    let (cache, quarantine) = TelemetryCache::open(dir, 1 << 30).expect("open");
    assert_eq!(quarantine, None);
    cache
}

#[test]
fn an_undecodable_record_at_open_quarantines_the_cache() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("telemetry");
    {
        let cache = open(&dir);
        cache.append(&[window(0)]).expect("append");
        cache
            .records
            .insert(7u64.to_be_bytes(), &[0xff, 0xff, 0xff][..])
            .expect("insert");
        cache.flush().expect("flush");
    }
    let (cache, quarantine) = TelemetryCache::open(&dir, 1 << 30).expect("open");
    let quarantine = quarantine.expect("quarantined");
    assert!(
        quarantine.reason.contains("records"),
        "{}",
        quarantine.reason
    );
    assert!(quarantine.moved_to.join("db").exists());
    assert_eq!(cache.stats().queued_windows, 0);
}

#[test]
fn a_record_damaged_after_open_is_dropped_and_counted() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = open(&tmp.path().join("telemetry"));
    cache.append(&[window(0), window(1)]).expect("append");
    cache.append(&[window(2)]).expect("append");
    cache
        .records
        .insert(0u64.to_be_bytes(), &[0xff, 0xff, 0xff][..])
        .expect("insert");
    let batch = cache
        .pending(10, usize::MAX)
        .expect("pending")
        .expect("a batch");
    assert_eq!(batch.windows, vec![window(2)]);
    assert_eq!(batch.dropped_records, 2);
    assert_eq!(cache.stats().dropped_total, 2);
}

#[test]
fn an_outbox_damaged_after_open_keeps_its_sequence_and_reports_drops() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let cache = open(&tmp.path().join("telemetry"));
    cache.append(&[window(0), window(1)]).expect("append");
    let formed = cache
        .pending(10, usize::MAX)
        .expect("pending")
        .expect("a batch");
    cache
        .outbox
        .insert(OUTBOX_KEY, &[0xff, 0xff, 0xff][..])
        .expect("insert");
    let resent = cache
        .pending(10, usize::MAX)
        .expect("pending")
        .expect("a batch");
    assert_eq!(resent.sequence, formed.sequence);
    assert_eq!((resent.windows.len(), resent.dropped_records), (0, 2));
    assert_eq!(cache.stats().dropped_total, 2);
    // The replacement is durable and stable.
    assert_eq!(
        cache.pending(10, usize::MAX).expect("pending"),
        Some(resent)
    );
}

#[test]
fn merging_adds_counts_and_widens_the_window() {
    let mut daily = StoredWindow::from_wire(&window(0));
    let mut later = StoredWindow::from_wire(&window(0));
    later.start += 3_600;
    later.end += 3_600;
    later.latency_buckets.push(4);
    daily.merge(&later);
    assert_eq!((daily.start, daily.end), (1_700_006_400, 1_700_013_600));
    assert_eq!(daily.count, 6);
    assert_eq!(daily.latency_buckets.len(), 18);
    assert_eq!(
        (daily.latency_buckets[0], daily.latency_buckets[17]),
        (6, 4)
    );
}

fn sample(id: u8, sealed_len: usize) -> QueuedSample {
    QueuedSample {
        id: [id; 16],
        model: "m".to_owned(),
        version: 1,
        allowance: 1,
        captured_at: 1_700_006_400,
        sealed: vec![id; sealed_len],
    }
}

/// Issue 26: captured samples share the cache's cap and yield to telemetry: the oldest samples
/// go first, a sample that cannot fit beside the telemetry is dropped, every drop is counted
/// (across a reopen) until an upload reports it, and acknowledged samples are forgotten.
#[test]
fn samples_share_the_cap_yield_to_telemetry_and_count_their_drops() {
    let tmp = tempfile::tempdir().expect("temp dir");
    let dir = tmp.path().join("telemetry");
    let cap = 3_500;
    let (cache, _) = TelemetryCache::open(&dir, cap).expect("open");
    for id in 0..3 {
        let appended = cache.append_sample(&sample(id, 1_000)).expect("append");
        assert_eq!((appended.stored, appended.dropped_older), (true, 0));
    }
    // A fourth of the same size does not fit beside the three: the oldest goes.
    let appended = cache.append_sample(&sample(3, 1_000)).expect("append");
    assert_eq!((appended.stored, appended.dropped_older), (true, 1));
    let (pending, dropped) = cache.pending_samples(10, 1 << 20).expect("pending");
    let ids: Vec<u8> = pending.iter().map(|(_, sample)| sample.id[0]).collect();
    assert_eq!((ids, dropped), (vec![1, 2, 3], 1));

    // Telemetry pushes samples out, oldest first, before any window goes.
    let windows: Vec<InferenceWindow> = (0..30).map(window).collect();
    let outcome = cache.append(&windows).expect("append windows");
    assert_eq!(outcome.dropped_windows, 0);
    let stats = cache.stats();
    assert!(stats.queue_bytes + stats.sample_bytes <= cap, "{stats:?}");
    assert!(stats.queued_samples < 3, "{stats:?}");
    drop(cache);

    // Drops are kept across a reopen, and an upload that reports them clears them.
    let (cache, _) = TelemetryCache::open(&dir, cap).expect("reopen");
    let (pending, dropped) = cache.pending_samples(10, 1 << 20).expect("pending");
    assert!(dropped >= 2, "{dropped}");
    let keys: Vec<u64> = pending.iter().map(|(key, _)| *key).collect();
    cache.acknowledge_samples(&keys, dropped).expect("ack");
    assert_eq!(
        cache.pending_samples(10, 1 << 20).expect("pending"),
        (Vec::new(), 0)
    );
    // One larger than the room left beside the telemetry is dropped itself, and counted.
    let appended = cache.append_sample(&sample(9, 5_000)).expect("append");
    assert!(!appended.stored);
    assert_eq!(cache.pending_samples(10, 1 << 20).expect("pending").1, 1);
}
