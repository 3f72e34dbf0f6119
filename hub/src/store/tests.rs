//! The store's unit tests, old-form records and concurrent ingest included.

use outpost_protocol::drift::{FeatureSource, NumericProfile, Profile, TensorSide, Thresholds};
use outpost_protocol::Sha256;

use super::*;

const DEVICE: [u8; 16] = [7; 16];

fn profile() -> Profile {
    let values: Vec<f64> = (0..100).map(f64::from).collect();
    Profile {
        features: vec![NumericProfile::from_values(
            "x0",
            TensorSide::Input,
            FeatureSource::Column {
                tensor: "x".to_owned(),
                index: 0,
            },
            &values,
        )
        .unwrap()],
        classes: Vec::new(),
        thresholds: Thresholds::default(),
    }
}

/// A summary of `values` over the hour starting at `start`.
fn summary(profile: &Profile, start: u64, values: &[f64]) -> DriftSummary {
    let mut summary = DriftSummary::new("demo", 1, Sha256([3; 32]), profile, start, start + 3600);
    for value in values {
        summary.features[0].observe(*value, &profile.features[0].edges);
    }
    summary
}

fn window(drift: DriftSummary) -> WindowInput {
    WindowInput {
        model: "demo".to_owned(),
        version: 1,
        start: drift.window_start,
        end: drift.window_end,
        count: drift.features[0].n,
        errors: 0,
        latency_buckets: Vec::new(),
        drift: Some(drift),
        shadow: None,
    }
}

fn n_of(stored: &[StoredDrift]) -> Vec<(u64, u64, u64)> {
    stored
        .iter()
        .map(|s| (s.window_start, s.summary.features[0].n, s.parts))
        .collect()
}

#[test]
fn drift_parts_merge_once_per_batch_and_range_by_window_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let profile = profile();
    let first = [window(summary(&profile, 3600, &[1.0, 2.0]))];
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &first, 0, 10).unwrap(),
        Ingested::Stored
    );
    // Resent: stored once.
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &first, 0, 11).unwrap(),
        Ingested::Duplicate
    );
    // Another part of the same hour, twice in one batch, and the next hour.
    let second = [
        window(summary(&profile, 3600, &[3.0])),
        window(summary(&profile, 3600, &[4.0, 5.0])),
        window(summary(&profile, 7200, &[6.0])),
    ];
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 2, &second, 0, 12).unwrap(),
        Ingested::Stored
    );

    let all = store.drift_summaries("demo", 1, 0).unwrap();
    assert_eq!(n_of(&all), [(3600, 5, 3), (7200, 1, 1)]);
    assert_eq!(all[0].device, DEVICE);
    assert_eq!(all[0].window_end, 7200);
    // Windows ending at or before `since` are left out.
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 7200).unwrap()),
        [(7200, 1, 1)]
    );
    assert!(store.drift_summaries("demo", 1, 10_800).unwrap().is_empty());
    assert!(store.drift_summaries("demo", 2, 0).unwrap().is_empty());
    assert!(store.drift_summaries("dem", 1, 0).unwrap().is_empty());
    assert_eq!(store.stats(&DEVICE, "demo", 1).unwrap().count, 6);
}

/// A window of `compared` shadow comparisons of target `[5; 32]` beside demo@1, `agreed` of
/// them agreeing.
fn shadow_window(start: u64, compared: u64, agreed: u64) -> WindowInput {
    use outpost_protocol::trust::ManifestRef;
    WindowInput {
        model: "demo".to_owned(),
        version: 1,
        start,
        end: start + 3600,
        count: 0,
        errors: 0,
        latency_buckets: Vec::new(),
        drift: None,
        shadow: Some(ShadowReport {
            target: ManifestRef {
                name: "demo".to_owned(),
                version: 2,
                manifest_sha256: Sha256([5; 32]),
            },
            counts: ShadowCounts {
                compared,
                top1_agreed: agreed,
                errors: 1,
                abs_diff_sum: 0.5,
                abs_diff_values: compared * 3,
                dropped: 2,
            },
        }),
    }
}

#[test]
fn shadow_parts_add_once_per_batch_and_range_by_window_end() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let first = [shadow_window(3600, 10, 9)];
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &first, 0, 10).unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &first, 0, 11).unwrap(),
        Ingested::Duplicate
    );
    let second = [
        shadow_window(3600, 5, 5),
        shadow_window(3600, 1, 0),
        shadow_window(7200, 4, 4),
    ];
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 2, &second, 0, 12).unwrap(),
        Ingested::Stored
    );
    let all = store.shadow_reports(&[5; 32], 0).unwrap();
    let figures: Vec<_> = all
        .iter()
        .map(|s| {
            let r = &s.record;
            (
                s.window_start,
                s.window_end,
                r.compared,
                r.top1_agreed,
                r.errors,
                r.parts,
            )
        })
        .collect();
    assert_eq!(
        figures,
        [(3600, 7200, 16, 14, 3, 3), (7200, 10_800, 4, 4, 1, 1)]
    );
    assert_eq!(all[0].device, DEVICE);
    assert_eq!(all[0].active, ("demo".to_owned(), 1));
    assert_eq!(all[0].record.abs_diff_values, 48);
    assert_eq!(all[0].record.dropped, 6);
    assert_eq!(store.shadow_reports(&[5; 32], 7200).unwrap().len(), 1);
    assert!(store.shadow_reports(&[6; 32], 0).unwrap().is_empty());
}

#[test]
fn outcome_records_stored_as_a_bool_still_read() {
    // Before shadow stages the outcome's first field was `committed: bool`.
    #[derive(Serialize)]
    struct Before {
        committed: bool,
        at: u64,
        reason: String,
    }
    for (committed, kind) in [(false, OutcomeKind::Failed), (true, OutcomeKind::Committed)] {
        let bytes = postcard::to_stdvec(&Before {
            committed,
            at: 9,
            reason: "r".to_owned(),
        })
        .unwrap();
        let read: OutcomeRecord = decode("outcomes", &bytes).unwrap();
        assert_eq!((read.kind, read.at, read.reason.as_str()), (kind, 9, "r"));
    }
}

/// The agent sends a device's batches one after another, but a copy of a batch may race the
/// first (a resend after a timeout while the first is still being stored). Here four copies of
/// every batch race, each thread going on to the next batch once its copy is answered.
#[test]
fn concurrent_batches_of_one_window_all_count_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let profile = profile();
    let (copies, batches) = (4, 100u64);
    let n_stored = AtomicU64::new(0);
    std::thread::scope(|scope| {
        for _ in 0..copies {
            let (store, profile, n_stored) = (&store, &profile, &n_stored);
            scope.spawn(move || {
                for sequence in 1..=batches {
                    let windows = [window(summary(profile, 3600, &[sequence as f64]))];
                    match store.ingest_telemetry(&DEVICE, sequence, &windows, 0, 10) {
                        Ok(Ingested::Stored) => {
                            n_stored.fetch_add(1, Ordering::SeqCst);
                        }
                        Ok(Ingested::Duplicate) => {}
                        other => panic!("batch {sequence}: {other:?}"),
                    }
                }
            });
        }
    });
    // Each batch was taken as new once and merged into the one window exactly once,
    // whichever copy raced ahead.
    assert_eq!(n_stored.load(Ordering::SeqCst), batches);
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
        [(3600, batches, batches)]
    );
    assert_eq!(store.stats(&DEVICE, "demo", 1).unwrap().count, batches);
}

fn device_record() -> DeviceRecord {
    DeviceRecord {
        id: DEVICE,
        public_key: [1; 32],
        arch: "x86_64".to_owned(),
        agent_version: "0.1.0".to_owned(),
        labels: Vec::new(),
        enrolled_at: 1,
        revoked: false,
        last_checkin: None,
        state: "steady".to_owned(),
        active: None,
        plan_sequence: None,
        dropped_records: 0,
        queue_bytes: 0,
        models: Vec::new(),
        several_models: false,
    }
}

/// Every count batch 2 of [`crash_window_batches`] adds to.
#[derive(Debug, PartialEq)]
struct TelemetryFigures {
    /// Each drift window's start, values and parts.
    drift: Vec<(u64, u64, u64)>,
    inferences: u64,
    /// Each shadow window's comparisons and parts.
    shadow: Vec<(u64, u64)>,
    dropped_records: u64,
}

fn telemetry_figures(store: &Store) -> TelemetryFigures {
    let shadow = store
        .shadow_reports(&[5; 32], 0)
        .unwrap()
        .iter()
        .map(|s| (s.record.compared, s.record.parts))
        .collect();
    TelemetryFigures {
        drift: n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
        inferences: store.stats(&DEVICE, "demo", 1).unwrap().count,
        shadow,
        dropped_records: store.device(&DEVICE).unwrap().unwrap().dropped_records,
    }
}

/// Batch 1, and batch 2 which adds to every kind of record batch 1 wrote (two parts of one
/// drift window, a new drift window, the counters, a shadow window, the dropped count).
fn crash_window_batches(profile: &Profile) -> (Vec<WindowInput>, Vec<WindowInput>) {
    let first = vec![
        window(summary(profile, 3600, &[1.0, 2.0])),
        shadow_window(3600, 10, 9),
    ];
    let second = vec![
        window(summary(profile, 3600, &[3.0])),
        window(summary(profile, 3600, &[4.0, 5.0])),
        window(summary(profile, 7200, &[6.0])),
        shadow_window(3600, 5, 5),
    ];
    (first, second)
}

/// A crash between two records of a batch leaves some records with the batch and its
/// idempotency key unwritten; the device then resends the batch. For every point the crash
/// can fall at, the resend completes the batch and every count takes it exactly once.
#[test]
fn a_batch_cut_short_by_a_crash_counts_once_when_resent() {
    let profile = profile();
    let (first, second) = crash_window_batches(&profile);
    let expected = TelemetryFigures {
        drift: vec![(3600, 5, 3), (7200, 1, 1)],
        inferences: 6,
        shadow: vec![(15, 2)],
        dropped_records: 7 + 4,
    };
    let mut n_records = None;
    let mut cut = 0;
    while n_records.is_none_or(|n| cut <= n) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        store.put_device(&device_record()).unwrap();
        assert_eq!(
            store.ingest_telemetry(&DEVICE, 1, &first, 7, 10).unwrap(),
            Ingested::Stored
        );
        // Batch 2 up to the crash: its first `cut` records, and no idempotency key.
        let records = store
            .batch_records(&DEVICE, 2, &second, 4, 11)
            .unwrap()
            .unwrap();
        n_records.get_or_insert(records.len());
        for record in records.into_iter().take(cut) {
            assert_eq!(
                store.apply_batch_record(&DEVICE, 2, 11, record).unwrap(),
                Ok(())
            );
        }
        // The resend is new, completes the batch, and a second resend adds nothing.
        assert_eq!(
            store.ingest_telemetry(&DEVICE, 2, &second, 4, 12).unwrap(),
            Ingested::Stored,
            "crash after {cut} records"
        );
        assert_eq!(
            telemetry_figures(&store),
            expected,
            "crash after {cut} records"
        );
        assert_eq!(
            store.ingest_telemetry(&DEVICE, 2, &second, 4, 13).unwrap(),
            Ingested::Duplicate
        );
        assert_eq!(
            telemetry_figures(&store),
            expected,
            "crash after {cut} records"
        );
        cut += 1;
    }
    // Two drift windows, the counters, the shadow window and the dropped count.
    assert_eq!(n_records, Some(5));
}

#[test]
fn a_batch_below_the_highest_stored_one_is_refused_and_adds_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_device(&device_record()).unwrap();
    let profile = profile();
    let batch = |value: f64| [window(summary(&profile, 3600, &[value]))];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 5, &batch(1.0), 1, 10)
            .unwrap(),
        Ingested::Stored
    );
    let before = (
        n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
        store.stats(&DEVICE, "demo", 1).unwrap(),
        store.device(&DEVICE).unwrap(),
    );
    let after = |store: &Store| {
        (
            n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
            store.stats(&DEVICE, "demo", 1).unwrap(),
            store.device(&DEVICE).unwrap(),
        )
    };
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 3, &batch(2.0), 1, 11)
            .unwrap(),
        Ingested::OutOfOrder { highest: 5 }
    );
    assert_eq!(after(&store), before);
    // Below a later batch that a crash cut short (no idempotency key yet), the records carry
    // the later batch's sequence; that refuses the batch before anything is written too.
    for record in store
        .batch_records(&DEVICE, 9, &batch(3.0), 0, 12)
        .unwrap()
        .unwrap()
    {
        store
            .apply_batch_record(&DEVICE, 9, 12, record)
            .unwrap()
            .unwrap();
    }
    let before = after(&store);
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 7, &batch(4.0), 1, 13)
            .unwrap(),
        Ingested::OutOfOrder { highest: 9 }
    );
    assert_eq!(after(&store), before);
    // The stored batch is still a duplicate and the later ones are taken.
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 5, &batch(1.0), 1, 14)
            .unwrap(),
        Ingested::Duplicate
    );
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 9, &batch(3.0), 0, 15)
            .unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 10, &batch(5.0), 0, 16)
            .unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
        [(3600, 3, 3)]
    );
    assert_eq!(store.device(&DEVICE).unwrap().unwrap().dropped_records, 1);
}

/// A record as the previous version wrote it: postcard of the record alone.
fn old_form<T: Serialize>(record: &T) -> Vec<u8> {
    postcard::to_stdvec(record).unwrap()
}

/// Records written before batches' sequences were stored with them hold the record alone.
#[test]
fn records_written_before_sequences_were_stored_read_and_take_new_batches() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let profile = profile();
    let drift = summary(&profile, 3600, &[1.0, 2.0]);
    let drift_key = drift_key("demo", 1, 7200, 3600, &DEVICE);
    let old_drift = DriftRecord {
        frame: outpost_protocol::encode(&drift).unwrap(),
        parts: 2,
        updated: 9,
    };
    store
        .drift
        .insert(&drift_key, old_form(&old_drift))
        .unwrap();
    let stats = StatsRecord {
        count: 40,
        errors: 1,
        latency_buckets: vec![3, 4],
    };
    store
        .stats
        .insert(stats_key(&DEVICE, "demo", 1), old_form(&stats))
        .unwrap();
    let shadow_key = shadow_key(&[5; 32], (3600, 7200), &DEVICE, ("demo", 1));
    let shadow = ShadowRecord {
        compared: 8,
        parts: 1,
        ..ShadowRecord::default()
    };
    store.shadow.insert(&shadow_key, old_form(&shadow)).unwrap();
    let device = DeviceRecord {
        dropped_records: 2,
        ..device_record()
    };
    store.devices.insert(DEVICE, old_form(&device)).unwrap();
    // Batch 1 was stored by the previous version: a resend is still a duplicate.
    store
        .telemetry_seen
        .insert(telemetry_seen_key(&DEVICE, 1), &10u64.to_be_bytes()[..])
        .unwrap();

    assert_eq!(store.device(&DEVICE).unwrap(), Some(device));
    assert_eq!(store.stats(&DEVICE, "demo", 1).unwrap(), stats);
    let batch = [
        window(summary(&profile, 3600, &[3.0])),
        shadow_window(3600, 5, 5),
    ];
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &batch, 3, 11).unwrap(),
        Ingested::Duplicate
    );
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 2, &batch, 3, 11).unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
        [(3600, 3, 3)]
    );
    assert_eq!(store.stats(&DEVICE, "demo", 1).unwrap().count, 41);
    let shadows = store.shadow_reports(&[5; 32], 0).unwrap();
    assert_eq!(
        (shadows[0].record.compared, shadows[0].record.parts),
        (13, 2)
    );
    assert_eq!(store.device(&DEVICE).unwrap().unwrap().dropped_records, 5);
    // The previous version reads the new form too: postcard ignores the sequence after it.
    let stored = store
        .stats
        .get(stats_key(&DEVICE, "demo", 1))
        .unwrap()
        .unwrap();
    let read_before: StatsRecord = decode("stats", &stored).unwrap();
    assert_eq!(read_before.count, 41);
    assert_eq!(
        decode_applied::<StatsRecord>("stats", &stored).unwrap().1,
        Some(2)
    );
}

/// `roots_after` answers from the newest version it knows without a search, so that number
/// must follow every stored root, also across a restart.
#[test]
fn roots_after_sees_roots_stored_before_and_after_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let versions = |roots: Vec<(u64, Vec<u8>)>| -> Vec<u64> {
        roots.into_iter().map(|(version, _)| version).collect()
    };
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(versions(store.roots_after(0).unwrap()), Vec::<u64>::new());
        store.put_root(1, b"root one").unwrap();
        store.put_root(2, b"root two").unwrap();
        assert_eq!(versions(store.roots_after(0).unwrap()), [1, 2]);
        assert_eq!(versions(store.roots_after(2).unwrap()), Vec::<u64>::new());
        store.flush_blocking().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.roots_after(1).unwrap(), [(2, b"root two".to_vec())]);
    assert_eq!(versions(store.roots_after(2).unwrap()), Vec::<u64>::new());
    store.put_root(3, b"root three").unwrap();
    assert_eq!(versions(store.roots_after(1).unwrap()), [2, 3]);
    assert_eq!(
        versions(store.roots_after(u64::MAX).unwrap()),
        Vec::<u64>::new()
    );
}

/// A check-in's read of a device record, taken before a batch counted dropped windows and
/// before an operator revoked the device and labelled it, undoes none of them when the
/// check-in writes its own fields.
#[test]
fn a_stale_read_written_back_loses_nobody_elses_change() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_device(&device_record()).unwrap();
    let check_in_read = store.device_read(&DEVICE).unwrap().unwrap();
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &[], 3, 10).unwrap(),
        Ingested::Stored
    );
    let operator_read = store.device_read(&DEVICE).unwrap().unwrap();
    store
        .update_device(operator_read, |device| {
            device.revoked = true;
            device.labels = vec![("site".to_owned(), "north".to_owned())];
        })
        .unwrap()
        .unwrap();
    let written = store
        .update_device(check_in_read, |device| {
            device.state = "degraded".to_owned();
            device.last_checkin = Some(42);
        })
        .unwrap()
        .unwrap();
    let stored = store.device(&DEVICE).unwrap().unwrap();
    assert_eq!(stored, written);
    assert_eq!(
        (
            stored.state.as_str(),
            stored.last_checkin,
            stored.revoked,
            stored.labels.as_slice(),
            stored.dropped_records
        ),
        (
            "degraded",
            Some(42),
            true,
            [("site".to_owned(), "north".to_owned())].as_slice(),
            3
        )
    );
    // The batch's sequence stayed with the count: a crash-cut resend would not add again.
    let bytes = store.devices.get(DEVICE).unwrap().unwrap();
    assert_eq!(devices::decode_device(&bytes).unwrap().1, Some(1));
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 1, &[], 3, 10).unwrap(),
        Ingested::Duplicate
    );
    assert_eq!(store.device(&DEVICE).unwrap().unwrap().dropped_records, 3);
}

#[test]
fn drift_frames_written_as_a_sequence_of_u8_read_the_same() {
    // Before the frame was serialized as bytes, it was a plain `Vec<u8>`.
    #[derive(Serialize)]
    struct Before {
        frame: Vec<u8>,
        parts: u64,
        updated: u64,
    }
    let frame: Vec<u8> = (0..=255).cycle().take(700).collect();
    let before = old_form(&Before {
        frame: frame.clone(),
        parts: 3,
        updated: 9,
    });
    let record = DriftRecord {
        frame,
        parts: 3,
        updated: 9,
    };
    assert_eq!(encode("drift", &record).unwrap(), before);
    assert_eq!(decode::<DriftRecord>("drift", &before).unwrap(), record);
}

#[test]
fn a_summary_that_does_not_merge_refuses_the_whole_batch() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let profile = profile();
    let mut huge = summary(&profile, 3600, &[1.0]);
    huge.features[0].n = u64::MAX;
    huge.features[0].bins[0] = u64::MAX;
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, 1, &[window(huge)], 0, 10)
            .unwrap(),
        Ingested::Stored
    );
    let batch = [
        window(summary(&profile, 7200, &[2.0])),
        window(summary(&profile, 3600, &[3.0])),
    ];
    match store.ingest_telemetry(&DEVICE, 2, &batch, 0, 11).unwrap() {
        Ingested::Refused { window, reason } => {
            assert_eq!(window, 1);
            assert!(reason.contains("overflow"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing of batch 2 was stored, not even its idempotency key.
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
        [(3600, u64::MAX, 1)]
    );
    assert_eq!(store.stats(&DEVICE, "demo", 1).unwrap().count, u64::MAX);
    let retry = [window(summary(&profile, 7200, &[2.0]))];
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 2, &retry, 0, 12).unwrap(),
        Ingested::Stored
    );
}

#[test]
fn an_admin_token_without_a_tail_never_expires_and_an_older_hub_reads_one_with_it() {
    let first = AdminTokenRecord {
        id: "0a".into(),
        name: "first".into(),
        role: RoleRecord::Admin,
        created: 10,
        expires: None,
    };
    // As the first hubs wrote it: the fields alone.
    let old_bytes = postcard::to_stdvec(&first).unwrap();
    assert_eq!(registry::decode_admin_token(&old_bytes).unwrap(), first);

    let expiring = AdminTokenRecord {
        expires: Some(20),
        ..first.clone()
    };
    let bytes = registry::encode_admin_token(&expiring).unwrap();
    assert!(bytes.starts_with(&old_bytes));
    assert_eq!(registry::decode_admin_token(&bytes).unwrap(), expiring);
    // An older hub decodes the fields and ignores the tail.
    assert_eq!(
        postcard::from_bytes::<AdminTokenRecord>(&bytes).unwrap(),
        first
    );
    assert!(expiring.expired(20) && !expiring.expired(19) && !first.expired(u64::MAX));
}

#[test]
fn the_latest_requests_of_a_device_refuse_their_replays_and_older_ones_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let device = [7u8; 16];
    store.note_signed_at(&device, 100, [1; 16]).unwrap();
    store.note_signed_at(&device, 101, [2; 16]).unwrap();
    store.note_signed_at(&device, 101, [3; 16]).unwrap();
    store.note_signed_at(&device, 99, [4; 16]).unwrap();
    let latest = store.signed_at().unwrap().remove(&device).unwrap();
    assert_eq!(latest.at, 101);
    assert!(latest.may_replay(100, &[9; 16]), "an older second");
    assert!(latest.may_replay(101, &[2; 16]) && latest.may_replay(101, &[3; 16]));
    assert!(
        !latest.may_replay(101, &[9; 16]),
        "a new request in the same second"
    );
    assert!(!latest.may_replay(102, &[2; 16]));
    // Past the nonces kept for one second, every request of that second could be a replay.
    for nonce in 0..=LatestRequests::MAX_NONCES as u8 {
        store.note_signed_at(&device, 200, [nonce; 16]).unwrap();
    }
    let latest = store.signed_at().unwrap().remove(&device).unwrap();
    assert!(latest.overflowed && latest.may_replay(200, &[250; 16]));
}

fn running(name: &str, version: u64) -> RunningRecord {
    RunningRecord {
        name: name.to_owned(),
        version,
        manifest_sha256: [version as u8; 32],
    }
}

/// Issue 20: the models a device runs live in a tail after the fields (and batch sequence) hubs
/// wrote before, so records of 0.1.0 read as they were, a record with no models is written as
/// before byte for byte, and an older hub reads a record with models, ignoring them.
#[test]
fn a_device_records_models_are_a_tail_that_old_records_and_older_hubs_do_without() {
    let with_models = DeviceRecord {
        active: Some(running("vad", 2)),
        models: vec![running("iris", 1), running("vad", 2)],
        several_models: false,
        ..device_record()
    };
    let without_models = DeviceRecord {
        models: Vec::new(),
        ..with_models.clone()
    };
    for applied in [None, Some(9)] {
        // No models: the record alone, or with its batch sequence, as before.
        let bytes = devices::encode_device(&without_models, applied).unwrap();
        assert_eq!(
            bytes,
            encode_applied("devices", &without_models, applied).unwrap()
        );
        assert_eq!(
            devices::decode_device(&bytes).unwrap(),
            (without_models.clone(), applied)
        );
        // For a record of 0.1.0, the active model is the one it runs.
        assert_eq!(without_models.running(), [running("vad", 2)]);

        let bytes = devices::encode_device(&with_models, applied).unwrap();
        assert!(bytes.starts_with(&old_form(&without_models)));
        assert_eq!(
            devices::decode_device(&bytes).unwrap(),
            (with_models.clone(), applied)
        );
        assert_eq!(with_models.running(), with_models.models.as_slice());
        // An older hub reads the fields it knows and a batch sequence (0 for none).
        assert_eq!(
            decode_applied::<DeviceRecord>("devices", &bytes).unwrap(),
            (without_models.clone(), Some(applied.unwrap_or(0)))
        );
    }

    // Through the store: a check-in's models survive a telemetry batch's dropped count, and the
    // batch's sequence stays known.
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    store.put_device(&device_record()).unwrap();
    let read = store.device_read(&DEVICE).unwrap().unwrap();
    store
        .update_device(read, |device| device.models = with_models.models.clone())
        .unwrap();
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 4, &[], 2, 10).unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        store.ingest_telemetry(&DEVICE, 4, &[], 2, 10).unwrap(),
        Ingested::Duplicate
    );
    let bytes = store.devices.get(DEVICE).unwrap().unwrap();
    let (stored, applied) = devices::decode_device(&bytes).unwrap();
    assert_eq!(applied, Some(4));
    assert_eq!(stored.models, with_models.models);
    assert_eq!(stored.dropped_records, 2);
}

/// A committed status report updates the model it names among those the device runs, and
/// `active` only when that is the same model (or none): a device running several models does
/// not lose the others, nor its first, to a commit of one.
#[test]
fn a_committed_report_updates_its_own_model_only() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    // As 0.1.0 stored it: the one active model, no list.
    let device = DeviceRecord {
        active: Some(running("iris", 1)),
        ..device_record()
    };
    store.devices.insert(DEVICE, old_form(&device)).unwrap();
    let event = EventRecord {
        at: 5,
        kind: "committed".to_owned(),
        plan_sequence: Some(3),
        model: None,
        detail: String::new(),
    };
    let commit = |model: RunningRecord| {
        store
            .record_status(&DEVICE, Some(3), None, &event, Some(&model))
            .unwrap();
        store.device(&DEVICE).unwrap().unwrap()
    };
    let stored = commit(running("vad", 1));
    assert_eq!(stored.models, [running("iris", 1), running("vad", 1)]);
    assert_eq!(stored.active, Some(running("iris", 1)));
    let stored = commit(running("iris", 2));
    assert_eq!(stored.models, [running("iris", 2), running("vad", 1)]);
    assert_eq!(stored.active, Some(running("iris", 2)));
    let stored = commit(running("vad", 2));
    assert_eq!(stored.models, [running("iris", 2), running("vad", 2)]);
    assert_eq!(stored.active, Some(running("iris", 2)));
    assert_eq!(stored.running_model("vad"), Some(&running("vad", 2)));
}

/// Issue 20: retirements are kept as signed, by sequence, oldest first, across a reopen; a store
/// without the tree (every store older hubs wrote) opens with none.
#[test]
fn retirements_are_kept_by_sequence_across_a_reopen() {
    let dir = tempfile::tempdir().unwrap();
    let record = |sequence: u64| RetirementRecord {
        sequence,
        signed: format!("retire {sequence}").into_bytes(),
        stored_at: 100 + sequence,
        by: "ops".to_owned(),
    };
    {
        let store = Store::open(dir.path()).unwrap();
        assert!(store.retirements().unwrap().is_empty());
        store.put_retirement(&record(300)).unwrap();
        store.put_retirement(&record(7)).unwrap();
        store.flush_blocking().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(store.retirements().unwrap(), [record(7), record(300)]);
}

#[test]
fn a_model_is_known_once_any_version_is_published() {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).unwrap();
    let manifest = ManifestRecord {
        signed: b"manifest".to_vec(),
        sha256: [1; 32],
        published_at: 1,
    };
    store.put_manifest("iris-v2", 3, &manifest).unwrap();
    assert!(store.has_model("iris-v2").unwrap());
    // A name that is a prefix of a published one is not published.
    assert!(!store.has_model("iris").unwrap());
    assert!(!store.has_model("iris-v").unwrap());
}

/// A device's latest runtime report is kept across a reopen, per device; one the device dated
/// earlier than the stored one leaves it be, and one of the same second replaces it.
#[test]
fn the_latest_runtime_report_of_each_device_is_kept() {
    let dir = tempfile::tempdir().unwrap();
    let report = |at: u64, runtime: &str| RuntimeReportRecord {
        at,
        models: vec![ModelRuntimeRecord {
            name: "demo".to_owned(),
            version: 3,
            runtime: runtime.to_owned(),
            runtime_version: "1.22.0".to_owned(),
            providers: vec!["CPUExecutionProvider".to_owned()],
            fallback: (runtime == "tract").then(|| "onnxruntime: library not found".to_owned()),
        }],
    };
    let other = [8; 16];
    {
        let store = Store::open(dir.path()).unwrap();
        assert_eq!(store.runtimes(&DEVICE).unwrap(), None);
        assert!(store.all_runtimes().unwrap().is_empty());
        assert!(store
            .put_runtimes(&DEVICE, &report(100, "onnxruntime"))
            .unwrap());
        assert!(!store.put_runtimes(&DEVICE, &report(99, "tract")).unwrap());
        assert!(store.put_runtimes(&other, &report(5, "tract")).unwrap());
        store.flush_blocking().unwrap();
    }
    let store = Store::open(dir.path()).unwrap();
    assert_eq!(
        store.runtimes(&DEVICE).unwrap(),
        Some(report(100, "onnxruntime"))
    );
    assert!(store.put_runtimes(&DEVICE, &report(100, "tract")).unwrap());
    let all = store.all_runtimes().unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[&DEVICE], report(100, "tract"));
    assert_eq!(all[&other], report(5, "tract"));
}
