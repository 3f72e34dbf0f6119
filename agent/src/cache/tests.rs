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
