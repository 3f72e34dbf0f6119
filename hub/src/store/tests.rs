//! The store's suite, run on both engines: each test is an `async fn` over a [`Store`], and
//! [`on_both_engines!`] runs it on SQLite in a temporary directory and on a real PostgreSQL server
//! of its own (`outpost_testkit::postgres`, which fails, never skips, when none is installed).

use std::sync::atomic::AtomicU64;
use std::time::Duration;

use futures_util::future::BoxFuture;
use outpost_protocol::drift::{FeatureSource, NumericProfile, Profile, TensorSide, Thresholds};
use outpost_protocol::{Label, Sha256};
use outpost_testkit::postgres::Postgres;

use super::*;

const DEVICE: [u8; 16] = [7; 16];

/// A store on one engine, with what keeps it alive.
struct Engine {
    store: Store,
    _dir: tempfile::TempDir,
    _server: Option<Postgres>,
}

async fn sqlite() -> Engine {
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path()).await.unwrap();
    Engine {
        store,
        _dir: dir,
        _server: None,
    }
}

async fn postgres() -> Engine {
    let server =
        tokio::task::spawn_blocking(|| Postgres::start().unwrap_or_else(|e| panic!("{e}")))
            .await
            .unwrap();
    let url = server.database("hub").unwrap();
    let store = Store::connect(&Database::Postgres(url)).await.unwrap();
    Engine {
        store,
        _dir: tempfile::tempdir().unwrap(),
        _server: Some(server),
    }
}

/// Runs each named `async fn(&Store)` once on SQLite and once on PostgreSQL, as tests of a module
/// of its name.
macro_rules! on_both_engines {
    ($($test:ident),* $(,)?) => {
        $(
            mod $test {
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn sqlite() {
                    super::$test(&super::sqlite().await.store).await;
                }

                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn postgres() {
                    super::$test(&super::postgres().await.store).await;
                }
            }
        )*
    };
}

on_both_engines!(
    drift_parts_merge_once_per_batch_and_range_by_window_end,
    shadow_parts_add_once_per_batch_and_range_by_window_end,
    concurrent_copies_of_each_batch_count_once,
    a_batch_below_the_highest_stored_one_is_refused_and_adds_nothing,
    a_summary_that_does_not_merge_refuses_the_whole_batch,
    each_batch_of_a_group_keeps_its_own_verdict,
    ingest_prunes_its_devices_markers_past_their_retention,
    a_marker_stored_out_of_time_order_is_kept_until_those_before_it_go,
    drift_aggregates_merge_a_label_group_once_per_batch,
    a_summary_that_does_not_merge_into_its_aggregate_is_left_out_of_it_only,
    hourly_aggregates_are_pruned_by_their_own_retention,
    concurrent_devices_of_a_label_group_lose_no_merge,
    drift_storage_per_row_is_measured,
    hourly_counters_add_each_batch_once_per_label_group_and_hour,
    hourly_counters_storage_per_row_is_measured,
    a_stale_read_written_back_loses_nobody_elses_change,
    the_latest_requests_of_a_device_refuse_their_replays_and_older_ones_only,
    a_committed_report_updates_its_own_model_only,
    writes_beside_groups_take_turns_and_lose_nothing,
    a_token_with_one_use_left_enrolls_one_device_of_many_at_once,
    audit_entries_appended_at_once_form_one_chain,
    roots_manifests_rollouts_and_retirements_read_back_in_order,
    the_latest_runtime_report_of_each_device_is_kept,
    retention_prunes_events_markers_and_expired_windows,
    a_lease_has_one_holder_until_it_expires_or_is_released,
    a_nonce_is_new_once_until_it_expires,
    rollout_changes_take_turns,
    captures_are_stored_once_listed_by_filter_and_pruned,
);

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

async fn drift_parts_merge_once_per_batch_and_range_by_window_end(store: &Store) {
    let profile = profile();
    let first = [window(summary(&profile, 3600, &[1.0, 2.0]))];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &first, 0, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    // Resent: stored once.
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &first, 0, 11)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    // Another part of the same hour, twice in one batch, and the next hour.
    let second = [
        window(summary(&profile, 3600, &[3.0])),
        window(summary(&profile, 3600, &[4.0, 5.0])),
        window(summary(&profile, 7200, &[6.0])),
    ];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 2, &second, 0, 12)
            .await
            .unwrap(),
        Ingested::Stored
    );

    let all = store.drift_summaries("demo", 1, 0).await.unwrap();
    assert_eq!(n_of(&all), [(3600, 5, 3), (7200, 1, 1)]);
    assert_eq!(all[0].device, DEVICE);
    assert_eq!(all[0].window_end, 7200);
    // Windows ending at or before `since` are left out.
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 7200).await.unwrap()),
        [(7200, 1, 1)]
    );
    assert!(store
        .drift_summaries("demo", 1, 10_800)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .drift_summaries("demo", 1, u64::MAX)
        .await
        .unwrap()
        .is_empty());
    assert!(store
        .drift_summaries("demo", 2, 0)
        .await
        .unwrap()
        .is_empty());
    assert!(store.drift_summaries("dem", 1, 0).await.unwrap().is_empty());
    assert_eq!(store.stats(&DEVICE, "demo", 1).await.unwrap().count, 6);
    assert_eq!(
        store.device_stats(&DEVICE).await.unwrap()[0].0.as_str(),
        "demo"
    );
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

async fn shadow_parts_add_once_per_batch_and_range_by_window_end(store: &Store) {
    let first = [shadow_window(3600, 10, 9)];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &first, 0, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &first, 0, 11)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    let second = [
        shadow_window(3600, 5, 5),
        shadow_window(3600, 1, 0),
        shadow_window(7200, 4, 4),
    ];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 2, &second, 0, 12)
            .await
            .unwrap(),
        Ingested::Stored
    );
    let all = store.shadow_reports(&[5; 32], 0).await.unwrap();
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
    assert_eq!(store.shadow_reports(&[5; 32], 7200).await.unwrap().len(), 1);
    assert!(store.shadow_reports(&[6; 32], 0).await.unwrap().is_empty());
}

/// The agent sends a device's batches one after another, but a copy of a batch may race the
/// first (a resend after a timeout while the first is still being stored, possibly by another
/// hub). Here four copies of every batch race, each task going on to the next batch once its
/// copy is answered.
async fn concurrent_copies_of_each_batch_count_once(store: &Store) {
    store.put_device(&device_record()).await.unwrap();
    let profile = Arc::new(profile());
    let (copies, batches) = (4, 40u64);
    let n_stored = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..copies {
        let (store, profile, n_stored) = (store.clone(), profile.clone(), n_stored.clone());
        tasks.push(tokio::spawn(async move {
            for sequence in 1..=batches {
                let windows = [window(summary(&profile, 3600, &[sequence as f64]))];
                match store
                    .ingest_telemetry(&DEVICE, &[], sequence, &windows, 1, 10)
                    .await
                {
                    Ok(Ingested::Stored) => {
                        n_stored.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Ingested::Duplicate) => {}
                    other => panic!("batch {sequence}: {other:?}"),
                }
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    // Each batch was taken as new once and merged into the one window exactly once, whichever
    // copy raced ahead.
    assert_eq!(n_stored.load(Ordering::SeqCst), batches);
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).await.unwrap()),
        [(3600, batches, batches)]
    );
    assert_eq!(
        store.stats(&DEVICE, "demo", 1).await.unwrap().count,
        batches
    );
    assert_eq!(
        store
            .device(&DEVICE)
            .await
            .unwrap()
            .unwrap()
            .dropped_records,
        batches
    );
}

async fn a_batch_below_the_highest_stored_one_is_refused_and_adds_nothing(store: &Store) {
    let profile = profile();
    let batch = |value: f64| [window(summary(&profile, 3600, &[value]))];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 9, &batch(1.0), 0, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 5, &batch(2.0), 0, 11)
            .await
            .unwrap(),
        Ingested::OutOfOrder { highest: 9 }
    );
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).await.unwrap()),
        [(3600, 1, 1)]
    );
    // Refused, it left no idempotency key: it is refused again, not taken as a duplicate.
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 5, &batch(2.0), 0, 12)
            .await
            .unwrap(),
        Ingested::OutOfOrder { highest: 9 }
    );
    // Another device's sequences are its own.
    assert_eq!(
        store
            .ingest_telemetry(&[8; 16], &[], 5, &batch(2.0), 0, 12)
            .await
            .unwrap(),
        Ingested::Stored
    );
    // A sequence the store cannot keep is an error naming it, not a wrapped number.
    let error = store
        .ingest_telemetry(&DEVICE, &[], u64::MAX, &batch(2.0), 0, 12)
        .await
        .unwrap_err();
    assert!(
        error
            .to_string()
            .contains("telemetry batch sequence 18446744073709551615"),
        "{error}"
    );
}

async fn a_summary_that_does_not_merge_refuses_the_whole_batch(store: &Store) {
    let profile = profile();
    let mut huge = summary(&profile, 3600, &[1.0]);
    huge.features[0].n = u64::MAX;
    huge.features[0].bins[0] = u64::MAX;
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &[window(huge)], 0, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    let batch = [
        window(summary(&profile, 7200, &[2.0])),
        window(summary(&profile, 3600, &[3.0])),
    ];
    match store
        .ingest_telemetry(&DEVICE, &[], 2, &batch, 0, 11)
        .await
        .unwrap()
    {
        Ingested::Refused { window, reason } => {
            assert_eq!(window, 1);
            assert!(reason.contains("overflow"), "{reason}");
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    // Nothing of batch 2 was stored, not even its idempotency key.
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).await.unwrap()),
        [(3600, u64::MAX, 1)]
    );
    assert_eq!(
        store.stats(&DEVICE, "demo", 1).await.unwrap().count,
        u64::MAX
    );
    let retry = [window(summary(&profile, 7200, &[2.0]))];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 2, &retry, 0, 12)
            .await
            .unwrap(),
        Ingested::Stored
    );
}

/// Batches stored in one group (the writer is held while they queue, so all but the first wait
/// for the same transaction) are answered each as if alone: a duplicate, a batch out of order and
/// one that does not merge leave nothing, and the others of the group are stored and aggregated.
async fn each_batch_of_a_group_keeps_its_own_verdict(store: &Store) {
    let profile = profile();
    let [dup, late, bad, good, also_good] = [[31u8; 16], [32; 16], [33; 16], [34; 16], [35; 16]];
    let one = |device: &[u8; 16], sequence, values: &[f64]| {
        let windows = [window(summary(&profile, 3600, values))];
        let device = *device;
        async move {
            store
                .ingest_telemetry(&device, &[], sequence, &windows, 0, 10)
                .await
                .unwrap()
        }
    };
    assert_eq!(one(&dup, 5, &[1.0]).await, Ingested::Stored);
    assert_eq!(one(&late, 9, &[1.0]).await, Ingested::Stored);
    let mut huge = summary(&profile, 3600, &[1.0]);
    huge.features[0].n = u64::MAX;
    huge.features[0].bins[0] = u64::MAX;
    assert_eq!(
        store
            .ingest_telemetry(&bad, &[], 1, &[window(huge)], 0, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    let before = hourly_of(&store.drift_hourly("demo", 1, 0).await.unwrap())[0].4;

    // Holds up the first batch's group: its key, written and not yet committed, which the
    // group's own insert of it waits for (on SQLite, for the one writer; on PostgreSQL, for the
    // key's row), so the group stays running while the rest queue.
    let mut holding = store.writer.begin().await.unwrap();
    sqlx::query("INSERT INTO telemetry_seen (device, sequence, stored_at) VALUES ($1, $2, $3)")
        .bind(vec![36u8; 16])
        .bind(1i64)
        .bind(10i64)
        .execute(&mut *holding)
        .await
        .unwrap();
    let taken = store.ingest.taken();
    let first = tokio::spawn({
        let store = store.clone();
        let windows = [window(summary(&profile, 3600, &[2.0]))];
        async move {
            store
                .ingest_telemetry(&[36; 16], &[], 1, &windows, 0, 10)
                .await
        }
    });
    // The first batch's group is held up; the rest queue behind it as one group.
    while store.ingest.taken() == taken {
        tokio::task::yield_now().await;
    }
    let rest = async {
        tokio::join!(
            one(&dup, 5, &[2.0]),
            one(&late, 3, &[2.0]),
            one(&bad, 2, &[2.0]),
            one(&good, 1, &[2.0, 3.0]),
            one(&also_good, 7, &[2.0]),
        )
    };
    let release = async {
        while store.ingest.waiting() < 5 {
            tokio::task::yield_now().await;
        }
        holding.rollback().await.unwrap();
    };
    let ((dup_v, late_v, bad_v, good_v, also_v), ()) = tokio::join!(rest, release);
    assert_eq!(first.await.unwrap().unwrap(), Ingested::Stored);
    assert_eq!(dup_v, Ingested::Duplicate);
    assert_eq!(late_v, Ingested::OutOfOrder { highest: 9 });
    assert!(
        matches!(&bad_v, Ingested::Refused { window: 0, reason } if reason.contains("overflow")),
        "{bad_v:?}"
    );
    assert_eq!(good_v, Ingested::Stored);
    assert_eq!(also_v, Ingested::Stored);

    // Stored: the first batch and the two good ones, each into its own row and the aggregate.
    let stored = store.drift_summaries("demo", 1, 0).await.unwrap();
    let n_by_device = |device: [u8; 16]| -> Vec<u64> {
        stored
            .iter()
            .filter(|row| row.device == device)
            .map(|row| row.summary.features[0].n)
            .collect()
    };
    assert_eq!(n_by_device(good), [2]);
    assert_eq!(n_by_device(also_good), [1]);
    assert_eq!(n_by_device([36; 16]), [1]);
    assert_eq!(n_by_device(dup), [1], "a duplicate adds nothing");
    assert_eq!(n_by_device(late), [1], "a batch out of order adds nothing");
    assert_eq!(n_by_device(bad), [u64::MAX], "a refused batch adds nothing");
    assert_eq!(store.stats(&good, "demo", 1).await.unwrap().count, 2);
    assert_eq!(
        hourly_of(&store.drift_hourly("demo", 1, 0).await.unwrap())[0].4,
        before + 3,
        "three uploads more in the hour's aggregate"
    );
    // The refused batches left no idempotency key: sent again, they are judged afresh.
    assert_eq!(one(&bad, 2, &[]).await, Ingested::Stored);
    assert_eq!(
        one(&late, 3, &[2.0]).await,
        Ingested::OutOfOrder { highest: 9 }
    );
    assert_eq!(one(&good, 1, &[2.0]).await, Ingested::Duplicate);
}

/// [`DEVICE`]'s batch `sequence`, one window of hour `sequence`, stored at `now`: its verdict.
async fn ingest_hour(store: &Store, sequence: u64, now: u64) -> Ingested {
    let windows = [window(summary(&profile(), 3600 * sequence, &[1.0]))];
    store
        .ingest_telemetry(&DEVICE, &[], sequence, &windows, 0, now)
        .await
        .unwrap()
}

/// With a marker retention set, each batch stored removes its device's markers older than it,
/// except the newest: a batch resent after its marker went is refused as out of order, not stored
/// again.
async fn ingest_prunes_its_devices_markers_past_their_retention(store: &Store) {
    let ingest = |sequence: u64, now: u64| ingest_hour(store, sequence, now);
    assert_eq!(ingest(1, 100).await, Ingested::Stored);
    assert_eq!(ingest(2, 200).await, Ingested::Stored);
    store.keep_batch_markers_for(1000);
    assert_eq!(ingest(3, 1150).await, Ingested::Stored);
    // Marker 1 (stored at 100, before 1150 - 1000) went with batch 3; marker 2 is kept.
    assert_eq!(ingest(2, 1160).await, Ingested::Duplicate);
    assert_eq!(ingest(1, 1170).await, Ingested::OutOfOrder { highest: 3 });
    // The newest marker stays however old it is, and is then the only one.
    assert_eq!(ingest(3, 100_000).await, Ingested::Duplicate);
    let markers: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM telemetry_seen WHERE device = $1")
        .bind(DEVICE.to_vec())
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(markers, 1);
}

/// A device's markers go from its lowest sequence up, to the first stored since the cutoff: one
/// stored with an earlier time than a marker before it (a hub whose clock ran behind) is kept
/// while that one is, so markers are kept longer than their retention, never shorter.
async fn a_marker_stored_out_of_time_order_is_kept_until_those_before_it_go(store: &Store) {
    let ingest = |sequence: u64, now: u64| ingest_hour(store, sequence, now);
    store.keep_batch_markers_for(1000);
    assert_eq!(ingest(1, 100).await, Ingested::Stored);
    assert_eq!(ingest(2, 3000).await, Ingested::Stored);
    // Stored "at 50" by a clock behind: its group's cutoff is 0, so nothing went.
    assert_eq!(ingest(3, 50).await, Ingested::Stored);
    // Cutoff 2100: marker 1 goes; marker 2 (3000) bounds the range, so marker 3 (50) stays.
    assert_eq!(ingest(4, 3100).await, Ingested::Stored);
    assert_eq!(ingest(1, 3110).await, Ingested::OutOfOrder { highest: 4 });
    assert_eq!(ingest(3, 3120).await, Ingested::Duplicate);
    // Cutoff 3200: markers 2, 3 and 4 go together; the newest, 5, stays.
    assert_eq!(ingest(5, 4200).await, Ingested::Stored);
    let markers: Vec<i64> = sqlx::query_scalar(
        "SELECT sequence FROM telemetry_seen WHERE device = $1 ORDER BY sequence",
    )
    .bind(DEVICE.to_vec())
    .fetch_all(&store.pool)
    .await
    .unwrap();
    assert_eq!(markers, [5]);
}

fn labels(texts: &[&str]) -> Vec<Label> {
    texts
        .iter()
        .map(|text| Label::parse(text).unwrap())
        .collect()
}

/// Each hourly aggregate's hour, label group, count of x0, devices, uploads and uploads left
/// out.
fn hourly_of(stored: &[StoredHourly]) -> Vec<(u64, &str, u64, u64, u64, u64)> {
    stored
        .iter()
        .map(|s| {
            (
                s.hour,
                s.label_group.as_str(),
                s.summary.features[0].n,
                s.devices,
                s.uploads,
                s.left_out,
            )
        })
        .collect()
}

/// Stores a batch of `device`'s, labelled `labels`, as [`Store::ingest_telemetry`] at time 10.
fn ingester(
    store: &Store,
) -> impl Fn([u8; 16], Vec<Label>, u64, Vec<WindowInput>) -> BoxFuture<'static, Ingested> {
    let store = store.clone();
    move |device, labels, sequence, windows| {
        let store = store.clone();
        Box::pin(async move {
            store
                .ingest_telemetry(&device, &labels, sequence, &windows, 0, 10)
                .await
                .unwrap()
        })
    }
}

async fn drift_aggregates_merge_a_label_group_once_per_batch(store: &Store) {
    let profile = profile();
    let lab = labels(&["tier=canary", "site=lab"]);
    let (a, b, c, d) = ([1; 16], [2; 16], [3; 16], [4; 16]);
    let ingest = ingester(store);
    let first = vec![
        window(summary(&profile, 3600, &[1.0, 2.0])),
        window(summary(&profile, 7200, &[3.0])),
    ];
    assert_eq!(
        ingest(a, lab.clone(), 1, first.clone()).await,
        Ingested::Stored
    );
    // A copy of a batch is not merged again.
    assert_eq!(ingest(a, lab.clone(), 1, first).await, Ingested::Duplicate);
    // More parts of the device's first window: more uploads, not another device.
    let more = vec![
        window(summary(&profile, 3600, &[4.0])),
        window(summary(&profile, 3600, &[5.0])),
    ];
    assert_eq!(ingest(a, lab, 2, more).await, Ingested::Stored);
    // The same labels in another order are the same group; other labels, or none, another.
    let one = |value: f64| vec![window(summary(&profile, 3600, &[value]))];
    let same = labels(&["site=lab", "tier=canary"]);
    assert_eq!(ingest(b, same, 1, one(6.0)).await, Ingested::Stored);
    assert_eq!(
        ingest(c, labels(&["tier=main"]), 1, one(7.0)).await,
        Ingested::Stored
    );
    assert_eq!(ingest(d, Vec::new(), 1, one(8.0)).await, Ingested::Stored);

    let hours = store.drift_hourly("demo", 1, 0).await.unwrap();
    assert_eq!(
        hourly_of(&hours),
        [
            (7200, "", 1, 1, 1, 0),
            (7200, "site=lab,tier=canary", 5, 2, 4, 0),
            (7200, "tier=main", 1, 1, 1, 0),
            (10_800, "site=lab,tier=canary", 1, 1, 1, 0),
        ]
    );
    assert_eq!(hours[1].labels(), labels(&["site=lab", "tier=canary"]));
    assert_eq!(
        (hours[1].summary.window_start, hours[1].summary.window_end),
        (3600, 7200)
    );
    // The per-device rows are kept as before: one per device and window.
    assert_eq!(store.drift_summaries("demo", 1, 0).await.unwrap().len(), 5);
    // Hours ending after `since` only, of the version asked for.
    assert_eq!(
        hourly_of(&store.drift_hourly("demo", 1, 7200).await.unwrap()),
        [(10_800, "site=lab,tier=canary", 1, 1, 1, 0)]
    );
    assert!(store.drift_hourly("demo", 2, 0).await.unwrap().is_empty());
    assert!(store
        .drift_hourly("demo", u64::MAX, 0)
        .await
        .unwrap()
        .is_empty());
}

/// A summary stored for its device may not merge with its label group's others (counts that
/// would overflow, or another profile): it is left out of the aggregate and counted, and neither
/// the batch nor the device's row is refused for it.
async fn a_summary_that_does_not_merge_into_its_aggregate_is_left_out_of_it_only(store: &Store) {
    let profile = profile();
    let group = labels(&["site=lab"]);
    let (a, b, c, d) = ([1; 16], [2; 16], [3; 16], [4; 16]);
    let mut huge = summary(&profile, 3600, &[1.0]);
    huge.features[0].n = u64::MAX;
    huge.features[0].bins[0] = u64::MAX;
    assert_eq!(
        store
            .ingest_telemetry(&a, &group, 1, &[window(huge)], 0, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    // Its first hour overflows the aggregate, not the device's own row; its second hour merges.
    let batch = [
        window(summary(&profile, 3600, &[2.0])),
        window(summary(&profile, 7200, &[3.0])),
    ];
    assert_eq!(
        store
            .ingest_telemetry(&b, &group, 1, &batch, 0, 11)
            .await
            .unwrap(),
        Ingested::Stored
    );
    // A summary of another profile.
    let mut other = summary(&profile, 3600, &[4.0]);
    other.profile_sha256 = Sha256([4; 32]);
    assert_eq!(
        store
            .ingest_telemetry(&c, &group, 1, &[window(other)], 0, 12)
            .await
            .unwrap(),
        Ingested::Stored
    );
    // Two windows of one device ending in one hour (an agent's roll-up beside an hour) whose
    // profiles differ: the first merges, the second is left out within the batch.
    let mut rolled_up = summary(&profile, 7200, &[5.0]);
    rolled_up.window_start = 3600;
    let mut hour = summary(&profile, 7200, &[6.0]);
    hour.profile_sha256 = Sha256([4; 32]);
    assert_eq!(
        store
            .ingest_telemetry(&d, &group, 1, &[window(rolled_up), window(hour)], 0, 13)
            .await
            .unwrap(),
        Ingested::Stored
    );

    assert_eq!(
        hourly_of(&store.drift_hourly("demo", 1, 0).await.unwrap()),
        [
            (7200, "site=lab", u64::MAX, 1, 1, 2),
            (10_800, "site=lab", 2, 2, 2, 1),
        ]
    );
    // Every device's rows are stored, the ones left out of the aggregates included.
    let rows: Vec<([u8; 16], u64, u64, u64)> = store
        .drift_summaries("demo", 1, 0)
        .await
        .unwrap()
        .iter()
        .map(|s| {
            (
                s.device,
                s.window_start,
                s.window_end,
                s.summary.features[0].n,
            )
        })
        .collect();
    assert_eq!(
        rows,
        [
            (a, 3600, 7200, u64::MAX),
            (b, 3600, 7200, 1),
            (c, 3600, 7200, 1),
            (d, 3600, 10_800, 1),
            (b, 7200, 10_800, 1),
            (d, 7200, 10_800, 1),
        ]
    );
}

/// Drift aggregates and hourly inference counters outlive the per-device rows, and go with
/// their own retention.
async fn hourly_aggregates_are_pruned_by_their_own_retention(store: &Store) {
    let profile = profile();
    for (sequence, start) in [(1, 3600), (2, 7200), (3, 10_800)] {
        let windows = [window(summary(&profile, start, &[1.0]))];
        store
            .ingest_telemetry(&DEVICE, &[], sequence, &windows, 0, 10)
            .await
            .unwrap();
    }
    let hours = |store: Store| async move {
        store
            .drift_hourly("demo", 1, 0)
            .await
            .unwrap()
            .iter()
            .map(|hourly| hourly.hour)
            .collect::<Vec<u64>>()
    };
    let counted = |store: Store| async move {
        store
            .stats_hourly("demo", 1, 0)
            .await
            .unwrap()
            .iter()
            .map(|hourly| hourly.hour)
            .collect::<Vec<u64>>()
    };
    // The telemetry retention removes the devices' rows and leaves the aggregates.
    assert_eq!(store.prune_telemetry(u64::MAX).await.unwrap().drift, 3);
    assert_eq!(hours(store.clone()).await, [7200, 10_800, 14_400]);
    assert_eq!(counted(store.clone()).await, [7200, 10_800, 14_400]);
    // Theirs removes the hours that ended before its cutoff, from both tables.
    let pruned = |drift, stats| PrunedHourly { drift, stats };
    assert_eq!(store.prune_hourly(10_800).await.unwrap(), pruned(1, 1));
    assert_eq!(store.prune_hourly(10_800).await.unwrap(), pruned(0, 0));
    assert_eq!(hours(store.clone()).await, [10_800, 14_400]);
    assert_eq!(counted(store.clone()).await, [10_800, 14_400]);
    // The per-device counters are all-time, and stay.
    assert_eq!(store.stats(&DEVICE, "demo", 1).await.unwrap().count, 3);
}

/// Every device of a label group writes the same aggregates. Batches of different devices
/// stored at once (by hubs sharing PostgreSQL, or one hub's requests) create each aggregate once
/// and take turns on it, so no merge is lost.
async fn concurrent_devices_of_a_label_group_lose_no_merge(store: &Store) {
    let profile = Arc::new(profile());
    let (devices, batches) = (4u8, 25u64);
    let mut tasks = Vec::new();
    for device in 0..devices {
        let (store, profile) = (store.clone(), profile.clone());
        tasks.push(tokio::spawn(async move {
            let group = labels(&["site=lab"]);
            for sequence in 1..=batches {
                let windows = [
                    window(summary(&profile, 3600, &[sequence as f64])),
                    window(summary(&profile, 7200, &[1.0])),
                ];
                let stored = store
                    .ingest_telemetry(&[20 + device; 16], &group, sequence, &windows, 0, 10)
                    .await
                    .unwrap();
                assert_eq!(stored, Ingested::Stored);
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let all = u64::from(devices) * batches;
    let devices = u64::from(devices);
    assert_eq!(
        hourly_of(&store.drift_hourly("demo", 1, 0).await.unwrap()),
        [
            (7200, "site=lab", all, devices, all, 0),
            (10_800, "site=lab", all, devices, all, 0),
        ]
    );
    // The hourly counters' rows too (each window counts one inference).
    assert_eq!(
        counters_of(&store.stats_hourly("demo", 1, 0).await.unwrap()),
        [
            (7200, "site=lab", all, 0, Vec::new()),
            (10_800, "site=lab", all, 0, Vec::new()),
        ]
    );
}

/// Each hourly counters row's hour, label group, inferences, errors and latency histogram.
fn counters_of(stored: &[StoredHourlyStats]) -> Vec<(u64, &str, u64, u64, Vec<u64>)> {
    stored
        .iter()
        .map(|s| {
            (
                s.hour,
                s.label_group.as_str(),
                s.stats.count,
                s.stats.errors,
                s.stats.latency_buckets.clone(),
            )
        })
        .collect()
}

/// A window of `demo@version` from `start` to `end` with these counters and no drift summary.
fn counted(version: u64, start: u64, end: u64, counts: (u64, u64), latency: &[u64]) -> WindowInput {
    WindowInput {
        model: "demo".to_owned(),
        version,
        start,
        end,
        count: counts.0,
        errors: counts.1,
        latency_buckets: latency.to_vec(),
        drift: None,
        shadow: None,
    }
}

/// Issue 26: every stored window's counters are added to its label group's hour (the hour it
/// ends at), once per batch, beside the device's all-time counters.
async fn hourly_counters_add_each_batch_once_per_label_group_and_hour(store: &Store) {
    let lab = labels(&["tier=canary", "site=lab"]);
    let (a, b, c, d) = ([1; 16], [2; 16], [3; 16], [4; 16]);
    let ingest = ingester(store);
    let first = vec![
        counted(1, 3600, 7200, (10, 1), &[4, 6]),
        counted(1, 7200, 10_800, (5, 0), &[5]),
        counted(2, 3600, 7200, (3, 3), &[]),
    ];
    assert_eq!(
        ingest(a, lab.clone(), 1, first.clone()).await,
        Ingested::Stored
    );
    // A replayed batch is not counted again.
    assert_eq!(ingest(a, lab.clone(), 1, first).await, Ingested::Duplicate);
    // A roll-up of the first hour and its second half in one batch: both end in that hour.
    let more = vec![
        counted(1, 0, 7200, (7, 2), &[0, 0, 7]),
        counted(1, 5400, 7200, (1, 0), &[1]),
    ];
    assert_eq!(ingest(a, lab, 2, more).await, Ingested::Stored);
    // The same labels in another order are the same group; other labels, or none, another.
    let one = |counts: (u64, u64)| vec![counted(1, 3600, 7200, counts, &[])];
    let same = labels(&["site=lab", "tier=canary"]);
    assert_eq!(ingest(b, same, 1, one((20, 2))).await, Ingested::Stored);
    assert_eq!(
        ingest(c, labels(&["tier=main"]), 1, one((30, 3))).await,
        Ingested::Stored
    );
    // A window of a day lands whole in its last hour.
    let day = vec![counted(1, 0, 86_400, (40, 4), &[])];
    assert_eq!(ingest(d, Vec::new(), 1, day).await, Ingested::Stored);

    let hours = store.stats_hourly("demo", 1, 0).await.unwrap();
    assert_eq!(
        counters_of(&hours),
        [
            (7200, "site=lab,tier=canary", 38, 5, vec![5, 6, 7]),
            (7200, "tier=main", 30, 3, Vec::new()),
            (10_800, "site=lab,tier=canary", 5, 0, vec![5]),
            (86_400, "", 40, 4, Vec::new()),
        ]
    );
    assert_eq!(hours[0].labels(), labels(&["site=lab", "tier=canary"]));
    // Hours ending after `since` only, of the version asked for.
    assert_eq!(
        counters_of(&store.stats_hourly("demo", 1, 7200).await.unwrap()),
        [
            (10_800, "site=lab,tier=canary", 5, 0, vec![5]),
            (86_400, "", 40, 4, Vec::new()),
        ]
    );
    assert_eq!(
        counters_of(&store.stats_hourly("demo", 2, 0).await.unwrap()),
        [(7200, "site=lab,tier=canary", 3, 3, Vec::new())]
    );
    assert!(store
        .stats_hourly("demo", u64::MAX, 0)
        .await
        .unwrap()
        .is_empty());
    // The device's own counters are all-time, whatever the hour.
    let all_time = store.stats(&a, "demo", 1).await.unwrap();
    assert_eq!((all_time.count, all_time.errors), (23, 3));
}

/// Rows, record bytes and bytes on disk (its indexes included) of `table`. On PostgreSQL the
/// table is rewritten first, so that rows updated in place count once.
async fn table_size(store: &Store, table: &str) -> (u64, u64, u64) {
    let (rows, record_bytes): (i64, i64) = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT COUNT(*), COALESCE(SUM(LENGTH(record)), 0) FROM {table}"
    )))
    .fetch_one(&store.pool)
    .await
    .unwrap();
    let on_disk: i64 = match store.dialect {
        Dialect::Sqlite => sqlx::query_scalar(
            "SELECT COALESCE(SUM(pgsize), 0) FROM dbstat WHERE name IN \
             (SELECT name FROM sqlite_master WHERE tbl_name = $1)",
        )
        .bind(table.to_owned())
        .fetch_one(&store.pool)
        .await
        .unwrap(),
        Dialect::Postgres => {
            sqlx::query(sqlx::AssertSqlSafe(format!("VACUUM FULL {table}")))
                .execute(&store.writer)
                .await
                .unwrap();
            sqlx::query_scalar(sqlx::AssertSqlSafe(format!(
                "SELECT pg_total_relation_size('{table}')"
            )))
            .fetch_one(&store.pool)
            .await
            .unwrap()
        }
    };
    let count = |value: i64| u64::try_from(value).unwrap();
    (count(rows), count(record_bytes), count(on_disk))
}

/// What a drift summary of a 100-feature profile takes in the store, as a device's row and as an
/// hourly aggregate: the figures of "Drift storage at fleet scale" in docs/operations.md (run
/// with `--nocapture` to see them). Twelve devices in two label groups send a day of hourly
/// windows of 3,600 inferences each; then one device sends a day of windows whose counts are a
/// million times larger, as an aggregate of a million such devices holds.
async fn drift_storage_per_row_is_measured(store: &Store) {
    const FEATURES: usize = 100;
    const DEVICES: u8 = 12;
    const HOURS: u64 = 24;
    const ROWS: usize = 3600;
    const FLEET: u64 = 1_000_000;
    let reference = outpost_model::example::normal_rows(FEATURES, 1000, 1, 0.0);
    let features = (0..FEATURES)
        .map(|index| {
            let values: Vec<f64> = reference
                .iter()
                .skip(index)
                .step_by(FEATURES)
                .map(|value| f64::from(*value))
                .collect();
            NumericProfile::from_values(
                &format!("x{index}"),
                TensorSide::Input,
                FeatureSource::Column {
                    tensor: "x".to_owned(),
                    index: index as u32,
                },
                &values,
            )
            .unwrap()
        })
        .collect();
    let profile = Profile {
        features,
        classes: Vec::new(),
        thresholds: Thresholds::default(),
    };
    // A few hours of inputs, reused: what a row takes depends on its counts' sizes, not on
    // which hour they came from.
    let hours: Vec<DriftSummary> = (0..4)
        .map(|seed| {
            let mut summary = DriftSummary::new("demo", 1, Sha256([3; 32]), &profile, 3600, 7200);
            let rows = outpost_model::example::normal_rows(FEATURES, ROWS, 100 + seed, 0.0);
            for row in rows.chunks(FEATURES) {
                for ((feature, counts), value) in
                    profile.features.iter().zip(&mut summary.features).zip(row)
                {
                    counts.observe(f64::from(*value), &feature.edges);
                }
            }
            summary.latency_us[3] = ROWS as u64;
            summary
        })
        .collect();
    let at_hour = |summary: &DriftSummary, hour: u64| {
        let mut summary = summary.clone();
        summary.window_start = 3600 * (hour + 1);
        summary.window_end = 3600 * (hour + 2);
        window(summary)
    };
    for hour in 0..HOURS {
        for device in 0..DEVICES {
            let summary = &hours[(usize::from(device) + hour as usize) % hours.len()];
            let group = labels(&[if device % 2 == 0 { "site=a" } else { "site=b" }]);
            let stored = store
                .ingest_telemetry(
                    &[device; 16],
                    &group,
                    hour + 1,
                    &[at_hour(summary, hour)],
                    0,
                    10,
                )
                .await
                .unwrap();
            assert_eq!(stored, Ingested::Stored);
        }
    }
    let per_device = table_size(store, "drift").await;
    let aggregates = table_size(store, "drift_hourly").await;
    assert_eq!(per_device.0, u64::from(DEVICES) * HOURS);
    assert_eq!(aggregates.0, 2 * HOURS);

    let mut fleet_hour = hours[0].clone();
    for feature in &mut fleet_hour.features {
        for count in [&mut feature.n, &mut feature.below, &mut feature.above]
            .into_iter()
            .chain(&mut feature.bins)
        {
            *count *= FLEET;
        }
    }
    fleet_hour.latency_us[3] *= FLEET;
    let fleet_group = labels(&["site=fleet"]);
    for hour in 0..HOURS {
        let windows = [at_hour(&fleet_hour, hour)];
        store
            .ingest_telemetry(&[99; 16], &fleet_group, hour + 1, &windows, 0, 10)
            .await
            .unwrap();
    }
    let with_fleet = table_size(store, "drift_hourly").await;
    let fleet = (
        with_fleet.0 - aggregates.0,
        with_fleet.1 - aggregates.1,
        with_fleet.2.saturating_sub(aggregates.2),
    );

    let per_row = |(rows, record, on_disk): (u64, u64, u64)| (record / rows, on_disk / rows);
    let engine = format!("{:?}", store.dialect);
    for (what, figures) in [
        ("per-device rows", per_device),
        ("aggregates of 6 devices", aggregates),
        ("aggregates of 1M devices", fleet),
    ] {
        let (record, on_disk) = per_row(figures);
        println!(
            "{engine}: {what}: {} rows, {record} record bytes and {on_disk} bytes on disk a row",
            figures.0
        );
    }
    // The bounds docs/operations.md's arithmetic stands on.
    let (record, on_disk) = per_row(per_device);
    assert!(record < 10 * 1024 && on_disk < 12 * 1024, "{per_device:?}");
    let (record, on_disk) = per_row(fleet);
    assert!(record < 16 * 1024 && on_disk < 16 * 1024, "{fleet:?}");
}

/// What a row of hourly inference counters takes in the store: the figure of "Drift storage at
/// fleet scale" in docs/operations.md (run with `--nocapture` to see it). Ten label groups report
/// ten days of hours, each hour with the counts of a million devices of one inference a second
/// and every latency bucket filled, so every count is as wide as it gets in practice.
async fn hourly_counters_storage_per_row_is_measured(store: &Store) {
    const GROUPS: u8 = 10;
    const HOURS: u64 = 240;
    let count = 3600 * 1_000_000;
    let latency = vec![count / 17; 17];
    for group in 0..GROUPS {
        let windows: Vec<WindowInput> = (1..=HOURS)
            .map(|hour| {
                counted(
                    1,
                    hour * 3600,
                    (hour + 1) * 3600,
                    (count, count / 1000),
                    &latency,
                )
            })
            .collect();
        let labels = labels(&[&format!("site=lab-{group:02}"), "tier=canary"]);
        let stored = store
            .ingest_telemetry(&[group; 16], &labels, 1, &windows, 0, 10)
            .await
            .unwrap();
        assert_eq!(stored, Ingested::Stored);
    }
    let (rows, record, on_disk) = table_size(store, "stats_hourly").await;
    assert_eq!(rows, u64::from(GROUPS) * HOURS);
    let (record, on_disk) = (record / rows, on_disk / rows);
    println!(
        "{:?}: hourly counters: {rows} rows, {record} record bytes and {on_disk} bytes on disk a row",
        store.dialect
    );
    // The bounds docs/operations.md's arithmetic stands on.
    assert!(record <= 100 && on_disk <= 320, "{record} {on_disk}");
}

fn device_record() -> DeviceRecord {
    DeviceRecord::enrolled_for_tests(DEVICE, [1; 32], Vec::new())
}

async fn a_stale_read_written_back_loses_nobody_elses_change(store: &Store) {
    store.put_device(&device_record()).await.unwrap();
    let check_in_read = store.device_read(&DEVICE).await.unwrap().unwrap();
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &[], 3, 10)
            .await
            .unwrap(),
        Ingested::Stored
    );
    let operator_read = store.device_read(&DEVICE).await.unwrap().unwrap();
    store
        .update_device(operator_read, |device| {
            device.revoked = true;
            device.labels = vec![("site".to_owned(), "north".to_owned())];
        })
        .await
        .unwrap()
        .unwrap();
    let written = store
        .update_device(check_in_read, |device| {
            device.state = "degraded".to_owned();
            device.last_checkin = Some(42);
        })
        .await
        .unwrap()
        .unwrap();
    let stored = store.device(&DEVICE).await.unwrap().unwrap();
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
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &[], 3, 10)
            .await
            .unwrap(),
        Ingested::Duplicate
    );
    assert_eq!(
        store
            .device(&DEVICE)
            .await
            .unwrap()
            .unwrap()
            .dropped_records,
        3
    );
    assert_eq!(store.device_count().await.unwrap(), 1);
}

async fn the_latest_requests_of_a_device_refuse_their_replays_and_older_ones_only(store: &Store) {
    let device = [7u8; 16];
    store.note_signed_at(&device, 100, [1; 16]).await.unwrap();
    store.note_signed_at(&device, 101, [2; 16]).await.unwrap();
    store.note_signed_at(&device, 101, [3; 16]).await.unwrap();
    store.note_signed_at(&device, 99, [4; 16]).await.unwrap();
    let latest = store.signed_at().await.unwrap().remove(&device).unwrap();
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
        store
            .note_signed_at(&device, 200, [nonce; 16])
            .await
            .unwrap();
    }
    let latest = store.signed_at().await.unwrap().remove(&device).unwrap();
    assert!(latest.overflowed && latest.may_replay(200, &[250; 16]));
}

fn running(name: &str, version: u64) -> RunningRecord {
    RunningRecord {
        name: name.to_owned(),
        version,
        manifest_sha256: [version as u8; 32],
    }
}

/// The store's other writes and its groups of writes take turns: devices report their status and
/// send telemetry at once, and nothing fails, and every write counts. (On SQLite the groups run
/// on a connection of their own, and a status report's transaction reads the device's record,
/// then writes it: a group committed in between would fail it. `ingest`'s test of the groups'
/// lease proves the turns are kept; this, that the writes of both kinds add up.)
async fn writes_beside_groups_take_turns_and_lose_nothing(store: &Store) {
    const DEVICES: u8 = 8;
    const ROUNDS: u64 = 40;
    let mut tasks = Vec::new();
    for device in 0..DEVICES {
        let id = [device; 16];
        store
            .put_device(&DeviceRecord::enrolled_for_tests(id, [1; 32], Vec::new()))
            .await
            .unwrap();
        let telemetry = store.clone();
        tasks.push(tokio::spawn(async move {
            for sequence in 1..=ROUNDS {
                let verdict = telemetry
                    .ingest_telemetry(&id, &[], sequence, &[], 1, 10)
                    .await
                    .unwrap();
                assert_eq!(verdict, Ingested::Stored);
            }
        }));
        let reports = store.clone();
        tasks.push(tokio::spawn(async move {
            for version in 1..=ROUNDS {
                let event = EventRecord {
                    at: version,
                    kind: "committed".to_owned(),
                    plan_sequence: None,
                    model: None,
                    detail: String::new(),
                };
                let model = running("iris", version);
                reports
                    .record_status(&id, None, None, &event, Some(&model))
                    .await
                    .unwrap();
            }
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    for device in 0..DEVICES {
        let record = store.device(&[device; 16]).await.unwrap().unwrap();
        assert_eq!(
            (record.dropped_records, record.models.as_slice()),
            (ROUNDS, [running("iris", ROUNDS)].as_slice()),
            "device {device}"
        );
        assert_eq!(
            store.events(&[device; 16], 1000).await.unwrap().len(),
            ROUNDS as usize
        );
    }
}

/// A committed status report updates the model it names among those the device runs, and
/// `active` only when that is the same model (or none): a device running several models does
/// not lose the others, nor its first, to a commit of one.
async fn a_committed_report_updates_its_own_model_only(store: &Store) {
    store
        .put_device(&DeviceRecord {
            active: Some(running("iris", 1)),
            ..device_record()
        })
        .await
        .unwrap();
    let event = EventRecord {
        at: 5,
        kind: "committed".to_owned(),
        plan_sequence: Some(3),
        model: None,
        detail: String::new(),
    };
    let outcome = OutcomeRecord {
        kind: OutcomeKind::Committed,
        at: 5,
        reason: String::new(),
    };
    for (model, models, active) in [
        (
            running("vad", 1),
            [running("iris", 1), running("vad", 1)],
            running("iris", 1),
        ),
        (
            running("iris", 2),
            [running("iris", 2), running("vad", 1)],
            running("iris", 2),
        ),
        (
            running("vad", 2),
            [running("iris", 2), running("vad", 2)],
            running("iris", 2),
        ),
    ] {
        store
            .record_status(&DEVICE, Some(3), Some(&outcome), &event, Some(&model))
            .await
            .unwrap();
        let stored = store.device(&DEVICE).await.unwrap().unwrap();
        assert_eq!(stored.models, models);
        assert_eq!(stored.active, Some(active));
    }
    assert_eq!(store.outcomes(3).await.unwrap(), [(DEVICE, outcome)]);
    assert!(store.outcomes(4).await.unwrap().is_empty());
    assert_eq!(
        store.events(&DEVICE, 2).await.unwrap(),
        [event.clone(), event]
    );
}

/// However many enrollments race for a token with one use left, one device is enrolled, with
/// its enrollment event; the others are told the token is used up.
async fn a_token_with_one_use_left_enrolls_one_device_of_many_at_once(store: &Store) {
    let hash = [4; 32];
    store
        .insert_enroll_token(
            &hash,
            &EnrollTokenRecord {
                id: "t1".to_owned(),
                labels: vec![("site".to_owned(), "lab".to_owned())],
                expires: 1000,
                uses_left: 1,
                created: 1,
            },
        )
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for n in 0..8u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .enroll(
                    &hash,
                    10,
                    |token| DeviceRecord {
                        id: [n; 16],
                        labels: token.labels.clone(),
                        ..device_record()
                    },
                    |_| EventRecord {
                        at: 10,
                        kind: "enrolled".to_owned(),
                        plan_sequence: None,
                        model: None,
                        detail: String::new(),
                    },
                )
                .await
                .unwrap()
        }));
    }
    let mut enrolled = Vec::new();
    for task in tasks {
        match task.await.unwrap() {
            Ok(device) => enrolled.push(device.id),
            Err(refusal) => assert_eq!(refusal, TokenRefusal::UsedUp),
        }
    }
    assert_eq!(enrolled.len(), 1);
    assert_eq!(store.devices().await.unwrap().len(), 1);
    assert_eq!(store.events(&enrolled[0], 10).await.unwrap().len(), 1);
    assert_eq!(
        store
            .enroll(&[5; 32], 10, |_| device_record(), |_| unreachable!())
            .await
            .unwrap(),
        Err(TokenRefusal::Unknown)
    );
    assert_eq!(
        store
            .revoke_enroll_token("t1")
            .await
            .unwrap()
            .map(|t| t.uses_left),
        Some(0)
    );
    assert!(store.enroll_tokens().await.unwrap().is_empty());
}

/// Appends from several tasks at once each see the entry before them: the chain has no gap and
/// no fork, and its head is the last entry.
async fn audit_entries_appended_at_once_form_one_chain(store: &Store) {
    let mut tasks = Vec::new();
    for n in 0..6u8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .append_audit(|seq, prev_hash| AuditRecord {
                    seq: seq + 1,
                    at: 1,
                    actor: format!("actor {n}"),
                    action: "test".to_owned(),
                    target: String::new(),
                    detail: String::new(),
                    prev_hash,
                    hash: [seq as u8 + 1; 32],
                })
                .await
                .unwrap()
        }));
    }
    for task in tasks {
        task.await.unwrap();
    }
    let (entries, head) = store.audit_entries(0).await.unwrap();
    assert_eq!(entries.len(), 6);
    for (index, entry) in entries.iter().enumerate() {
        assert_eq!(entry.seq, index as u64 + 1);
        assert_eq!(entry.prev_hash, [index as u8; 32]);
    }
    assert_eq!(head, Some((6, [6; 32])));
    assert_eq!(store.audit_entries(4).await.unwrap().0.len(), 2);
    assert!(store.audit_entries(u64::MAX).await.unwrap().0.is_empty());
}

async fn roots_manifests_rollouts_and_retirements_read_back_in_order(store: &Store) {
    for version in [2, 1, 3] {
        store
            .put_root(version, format!("root {version}").as_bytes())
            .await
            .unwrap();
    }
    assert_eq!(
        store
            .roots()
            .await
            .unwrap()
            .iter()
            .map(|r| r.0)
            .collect::<Vec<_>>(),
        [1, 2, 3]
    );
    assert_eq!(
        store.roots_after(2).await.unwrap(),
        [(3, b"root 3".to_vec())]
    );
    assert!(store.roots_after(u64::MAX).await.unwrap().is_empty());
    let error = store.put_root(u64::MAX, b"x").await.unwrap_err();
    assert!(error.to_string().contains("root version"), "{error}");

    let manifest = |n: u8| ManifestRecord {
        signed: vec![n],
        sha256: [n; 32],
        published_at: 1,
    };
    store
        .put_manifest("iris-v2", 3, &manifest(3))
        .await
        .unwrap();
    store
        .put_manifest("iris-v2", 1, &manifest(1))
        .await
        .unwrap();
    assert!(store.has_model("iris-v2").await.unwrap());
    // A name that is a prefix of a published one is not published.
    assert!(!store.has_model("iris").await.unwrap());
    assert!(store.has_manifest("iris-v2", 1).await.unwrap());
    assert!(!store.has_manifest("iris-v2", u64::MAX).await.unwrap());
    assert_eq!(
        store.manifests().await.unwrap(),
        [
            ("iris-v2".to_owned(), 1, manifest(1)),
            ("iris-v2".to_owned(), 3, manifest(3))
        ]
    );

    let rollout = |sequence: u64| RolloutRecord {
        sequence,
        signed_plan: vec![1],
        state: RolloutStateRecord::Active,
        stage_index: 0,
        stage_started: vec![1],
        decisions: Vec::new(),
        created: 1,
    };
    store.put_rollout(&rollout(9)).await.unwrap();
    store.put_rollout(&rollout(2)).await.unwrap();
    store
        .put_rollout(&RolloutRecord {
            state: RolloutStateRecord::Completed,
            ..rollout(9)
        })
        .await
        .unwrap();
    let stored = store.rollouts().await.unwrap();
    assert_eq!(
        stored.iter().map(|r| r.sequence).collect::<Vec<_>>(),
        [2, 9]
    );
    assert_eq!(stored[1].state, RolloutStateRecord::Completed);
    assert_eq!(store.rollout(2).await.unwrap(), Some(rollout(2)));
    assert_eq!(store.rollout(u64::MAX).await.unwrap(), None);

    let retirement = |sequence: u64| RetirementRecord {
        sequence,
        signed: format!("retire {sequence}").into_bytes(),
        stored_at: 100 + sequence,
        by: "ops".to_owned(),
    };
    assert!(store.retirements().await.unwrap().is_empty());
    store.put_retirement(&retirement(300)).await.unwrap();
    store.put_retirement(&retirement(7)).await.unwrap();
    assert_eq!(
        store.retirements().await.unwrap(),
        [retirement(7), retirement(300)]
    );
}

/// A device's latest runtime report is kept, per device; one the device dated earlier than the
/// stored one leaves it be, and one of the same second replaces it.
async fn the_latest_runtime_report_of_each_device_is_kept(store: &Store) {
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
    assert_eq!(store.runtimes(&DEVICE).await.unwrap(), None);
    assert!(store.all_runtimes().await.unwrap().is_empty());
    assert!(store
        .put_runtimes(&DEVICE, &report(100, "onnxruntime"))
        .await
        .unwrap());
    assert!(!store
        .put_runtimes(&DEVICE, &report(99, "tract"))
        .await
        .unwrap());
    assert!(store
        .put_runtimes(&other, &report(5, "tract"))
        .await
        .unwrap());
    assert_eq!(
        store.runtimes(&DEVICE).await.unwrap(),
        Some(report(100, "onnxruntime"))
    );
    assert!(store
        .put_runtimes(&DEVICE, &report(100, "tract"))
        .await
        .unwrap());
    let all = store.all_runtimes().await.unwrap();
    assert_eq!(all.len(), 2);
    assert_eq!(all[&DEVICE], report(100, "tract"));
    assert_eq!(all[&other], report(5, "tract"));
}

async fn retention_prunes_events_markers_and_expired_windows(store: &Store) {
    let profile = profile();
    for n in 0..5u64 {
        store
            .add_event(
                &DEVICE,
                &EventRecord {
                    at: n,
                    kind: "status".to_owned(),
                    plan_sequence: None,
                    model: None,
                    detail: String::new(),
                },
            )
            .await
            .unwrap();
    }
    assert_eq!(store.prune_events(&DEVICE, 2).await.unwrap(), 3);
    let kept: Vec<u64> = store
        .events(&DEVICE, 10)
        .await
        .unwrap()
        .iter()
        .map(|e| e.at)
        .collect();
    assert_eq!(kept, [3, 4]);

    // Markers are kept 150 s: batch 3's group (at 300) removes marker 1 (stored at 100).
    store.keep_batch_markers_for(150);
    for (sequence, start) in [(1, 3600), (2, 7200), (3, 10_800)] {
        let windows = [window(summary(&profile, start, &[1.0]))];
        store
            .ingest_telemetry(&DEVICE, &[], sequence, &windows, 0, sequence * 100)
            .await
            .unwrap();
    }
    // Batch 1, its marker gone, is refused as below the newest, not stored again.
    let late = [window(summary(&profile, 3600, &[1.0]))];
    assert_eq!(
        store
            .ingest_telemetry(&DEVICE, &[], 1, &late, 0, 400)
            .await
            .unwrap(),
        Ingested::OutOfOrder { highest: 3 }
    );
    // Windows that ended before the cutoff go.
    let pruned = store.prune_telemetry(10_800).await.unwrap();
    assert_eq!(
        pruned,
        Pruned {
            drift: 1,
            shadow: 0
        }
    );
    assert_eq!(
        n_of(&store.drift_summaries("demo", 1, 0).await.unwrap()),
        [(7200, 1, 1), (10_800, 1, 1)]
    );
}

/// Issue 26: sealed samples are stored once per device and sample id (an upload sent again adds
/// nothing), listed by model, version, device and time, read back byte for byte, and pruned by
/// when they were received; allowances read back latest first per model.
async fn captures_are_stored_once_listed_by_filter_and_pruned(store: &Store) {
    let sample = |id: u8, version: u64| CaptureInsert {
        sample_id: [id; 16],
        model: "demo".to_owned(),
        version,
        allowance: 2,
        captured_at: 90 + u64::from(id),
        sealed: vec![id; 60 + usize::from(id)],
    };
    let other = [9u8; 16];
    let batch = [sample(1, 1), sample(2, 1), sample(3, 2)];
    assert_eq!(
        store.insert_captures(&DEVICE, 100, &batch).await.unwrap(),
        3
    );
    assert_eq!(
        store.insert_captures(&DEVICE, 150, &batch).await.unwrap(),
        0
    );
    assert_eq!(
        store
            .insert_captures(&other, 200, &[sample(1, 1)])
            .await
            .unwrap(),
        1
    );
    let all = CaptureFilter {
        limit: 100,
        ..CaptureFilter::default()
    };
    let listed = store.captures(&all).await.unwrap();
    assert_eq!(listed.len(), 4);
    assert_eq!(
        (
            listed[0].received_at,
            listed[0].bytes,
            listed[0].captured_at
        ),
        (100, 61, 91)
    );
    let ids = |filter: CaptureFilter| async move {
        store
            .captures(&filter)
            .await
            .unwrap()
            .iter()
            .map(|capture| (capture.device, capture.version))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        ids(CaptureFilter {
            version: Some(2),
            ..all.clone()
        })
        .await,
        [(DEVICE, 2)]
    );
    assert_eq!(
        ids(CaptureFilter {
            device: Some(other),
            model: Some("demo".into()),
            ..all.clone()
        })
        .await,
        [(other, 1)]
    );
    assert_eq!(
        ids(CaptureFilter {
            since: Some(150),
            ..all.clone()
        })
        .await,
        [(other, 1)]
    );
    assert_eq!(
        ids(CaptureFilter {
            until: Some(150),
            limit: 2,
            ..all.clone()
        })
        .await
        .len(),
        2
    );
    assert!(ids(CaptureFilter {
        model: Some("else".into()),
        ..all.clone()
    })
    .await
    .is_empty());
    let (stored, sealed) = store.capture(listed[2].id).await.unwrap().unwrap();
    assert_eq!(stored, listed[2]);
    assert_eq!(sealed, vec![3u8; 63]);
    assert!(store.capture(u64::MAX).await.unwrap().is_none());

    assert_eq!(store.prune_captures(150).await.unwrap(), 3);
    assert_eq!(store.captures(&all).await.unwrap().len(), 1);

    for sequence in [3, 1, 2] {
        store
            .put_capture_allowance(&CaptureAllowanceRecord {
                model: "demo".into(),
                sequence,
                signed: vec![sequence as u8],
                stored_at: 5,
                by: "ops".into(),
            })
            .await
            .unwrap();
    }
    let latest = store
        .latest_capture_allowance("demo")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((latest.sequence, latest.signed), (3, vec![3]));
    assert!(store
        .latest_capture_allowance("else")
        .await
        .unwrap()
        .is_none());
    assert_eq!(store.capture_allowances().await.unwrap().len(), 3);
}

/// Schemas 6 (data capture) and 7 (hourly inference counters) are added to a store an earlier
/// hub made: a store at schema 5 with rows in it opens at the newest schema with its rows, takes
/// samples and counts telemetry by the hour.
#[tokio::test]
async fn a_store_of_schema_5_gains_the_capture_and_hourly_counter_tables() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).await.unwrap();
        store.put_root(1, b"root").await.unwrap();
        // As a hub of schema 5 left it: without the steps of schemas 6 and 7 and their tables.
        for statement in [
            "DROP TABLE stats_hourly",
            "DROP TABLE captures",
            "DROP TABLE capture_allowances",
            "DELETE FROM outpost_schema WHERE version >= 6",
        ] {
            sqlx::query(statement).execute(&store.writer).await.unwrap();
        }
        store.close().await.unwrap();
    }
    let store = reopen(dir.path()).await.unwrap();
    assert_eq!(sql::SCHEMA_VERSION, 7);
    let version: i64 = sqlx::query_scalar("SELECT MAX(version) FROM outpost_schema")
        .fetch_one(&store.pool)
        .await
        .unwrap();
    assert_eq!(version, 7);
    assert_eq!(store.roots().await.unwrap(), [(1, b"root".to_vec())]);
    let sample = CaptureInsert {
        sample_id: [1; 16],
        model: "demo".into(),
        version: 1,
        allowance: 1,
        captured_at: 1,
        sealed: vec![0; 48],
    };
    assert_eq!(
        store.insert_captures(&DEVICE, 1, &[sample]).await.unwrap(),
        1
    );
    let window = counted(1, 3600, 7200, (5, 1), &[]);
    store
        .ingest_telemetry(&DEVICE, &[], 1, &[window], 0, 10)
        .await
        .unwrap();
    assert_eq!(
        counters_of(&store.stats_hourly("demo", 1, 0).await.unwrap()),
        [(7200, "", 5, 1, Vec::new())]
    );
}

/// Opens the store in `dir` once the lock of a store closed there is let go. A child process
/// another test forks at the moment the lock's file is open holds a copy of it until the child
/// execs (and the copy closes), so the lock may outlive the closed store by that long.
async fn reopen(dir: &std::path::Path) -> Result<Store> {
    let started = std::time::Instant::now();
    loop {
        match Store::open(dir).await {
            Err(StoreError::Locked { .. }) if started.elapsed() < Duration::from_secs(10) => {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            other => return other,
        }
    }
}

/// The schema is migrated once: a reopen applies nothing again, and a database a newer hub wrote
/// is refused by name. One process at a time opens an embedded store.
#[tokio::test]
async fn a_reopened_store_keeps_its_rows_and_a_newer_schema_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = Store::open(dir.path()).await.unwrap();
        let error = Store::open(dir.path()).await.unwrap_err();
        assert!(
            error.to_string().contains("is another hub running on it?"),
            "{error}"
        );
        store.put_root(1, b"root").await.unwrap();
        store.close().await.unwrap();
    }
    let store = reopen(dir.path()).await.unwrap();
    assert_eq!(store.roots().await.unwrap(), [(1, b"root".to_vec())]);
    sqlx::query("INSERT INTO outpost_schema (version, applied_at) VALUES ($1, 0)")
        .bind(sql::SCHEMA_VERSION + 1)
        .execute(&store.writer)
        .await
        .unwrap();
    store.close().await.unwrap();
    drop(store);
    let error = reopen(dir.path()).await.unwrap_err();
    assert!(
        error.to_string().contains("written by a newer hub"),
        "{error}"
    );
}

#[test]
fn databases_are_named_as_operators_write_them() {
    let parse = |text: &str| text.parse::<Database>();
    assert_eq!(
        parse("postgres://hub:secret@db.example/outpost"),
        Ok(Database::Postgres(
            "postgres://hub:secret@db.example/outpost".to_owned()
        ))
    );
    assert_eq!(
        parse("postgres://hub:secret@db.example/outpost")
            .unwrap()
            .describe(),
        "PostgreSQL postgres://hub:***@db.example/outpost"
    );
    assert_eq!(
        parse("sqlite:/var/lib/outpost/hub.db"),
        Ok(Database::Sqlite("/var/lib/outpost/hub.db".into()))
    );
    assert_eq!(parse("/tmp/x.db"), Ok(Database::Sqlite("/tmp/x.db".into())));
    assert!(parse("mysql://x")
        .unwrap_err()
        .contains("only postgres:// and sqlite:"));
    assert!(parse("sqlite:").is_err());
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

async fn a_lease_has_one_holder_until_it_expires_or_is_released(store: &Store) {
    assert_eq!(store.lease(ENGINE_LEASE).await.unwrap(), None);
    assert!(store
        .hold_lease(ENGINE_LEASE, "a", 1_000, 500)
        .await
        .unwrap());
    // Held: another holder is refused, the holder renews.
    assert!(!store
        .hold_lease(ENGINE_LEASE, "b", 1_200, 500)
        .await
        .unwrap());
    assert!(store
        .hold_lease(ENGINE_LEASE, "a", 1_400, 500)
        .await
        .unwrap());
    assert_eq!(
        store.lease(ENGINE_LEASE).await.unwrap(),
        Some(("a".to_owned(), 1_900))
    );
    // Expired: the other takes it, and the first holder is refused in turn.
    assert!(!store
        .hold_lease(ENGINE_LEASE, "b", 1_899, 500)
        .await
        .unwrap());
    assert!(store
        .hold_lease(ENGINE_LEASE, "b", 1_900, 500)
        .await
        .unwrap());
    assert!(!store
        .hold_lease(ENGINE_LEASE, "a", 2_000, 500)
        .await
        .unwrap());
    // Released by its holder only.
    store.release_lease(ENGINE_LEASE, "a").await.unwrap();
    assert!(!store
        .hold_lease(ENGINE_LEASE, "a", 2_000, 500)
        .await
        .unwrap());
    store.release_lease(ENGINE_LEASE, "b").await.unwrap();
    assert!(store
        .hold_lease(ENGINE_LEASE, "a", 2_000, 500)
        .await
        .unwrap());
    // Many asking at once: one gets it.
    let mut tasks = Vec::new();
    for n in 0..8 {
        let store = store.clone();
        tasks.push(tokio::spawn(async move {
            store
                .hold_lease("other", &format!("hub {n}"), 5_000, 500)
                .await
                .unwrap()
        }));
    }
    let mut held = 0;
    for task in tasks {
        held += usize::from(task.await.unwrap());
    }
    assert_eq!(held, 1);
}

async fn a_nonce_is_new_once_until_it_expires(store: &Store) {
    use crate::store::NonceNote::{New, OverQuota, Replayed};
    let note = |device: [u8; 16], nonce: u8, expires: u64, quota: u64| async move {
        store
            .note_nonce(&device, &[nonce; 16], expires, 100..110, quota)
            .await
            .unwrap()
    };
    assert_eq!(note(DEVICE, 1, 100, 10).await, New);
    assert_eq!(note(DEVICE, 1, 100, 10).await, Replayed);
    assert_eq!(note([8; 16], 1, 100, 10).await, New);
    assert_eq!(note(DEVICE, 2, 300, 10).await, New);
    // The quota counts the device's nonces expiring within the bucket (100..110): one so far.
    assert_eq!(note(DEVICE, 3, 105, 2).await, New);
    assert_eq!(note(DEVICE, 4, 105, 2).await, OverQuota);
    // A replay past the quota is still a replay, and the refused nonce was not written.
    assert_eq!(note(DEVICE, 3, 105, 2).await, Replayed);
    assert_eq!(note(DEVICE, 4, 105, 3).await, New);
    assert_eq!(note(DEVICE, 5, 105, 3).await, OverQuota);
    assert_eq!(note([8; 16], 4, 105, 2).await, New);
    assert_eq!(store.prune_nonces(101).await.unwrap(), 2);
    assert_eq!(note(DEVICE, 2, 300, 10).await, Replayed);
    // Pruned, the bucket's first nonce no longer counts.
    assert_eq!(note(DEVICE, 6, 105, 3).await, New);
}

/// A rollout change waits for the one before it to let go, on either engine (on PostgreSQL, for
/// every hub sharing the database), and a lock dropped on an error path is let go too.
async fn rollout_changes_take_turns(store: &Store) {
    let first = store.lock_rollouts().await.unwrap();
    let mut waiting = {
        let store = store.clone();
        tokio::spawn(async move { store.lock_rollouts().await.map(|_| ()) })
    };
    // It waits while the first is held. (That it would wait for ever cannot be shown by waiting
    // on an event; a fair while without it finishing is the evidence.)
    if let Ok(finished) = tokio::time::timeout(Duration::from_millis(300), &mut waiting).await {
        panic!("a second rollout lock was taken while the first was held: {finished:?}");
    }
    drop(first);
    waiting.await.unwrap().unwrap();
    drop(store.lock_rollouts().await.unwrap());
}

/// Two stores on one PostgreSQL database, as two hubs, merging into one drift aggregate in
/// turns: each merges into what the other wrote, not into what it wrote itself last (which it
/// keeps decoded).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_sharing_a_database_merge_into_each_others_aggregates() {
    let engine = postgres().await;
    let other = second_hub(&engine).await;
    let profile = profile();
    let (this, that) = (ingester(&engine.store), ingester(&other));
    for (ingest, device) in [(&this, 1), (&this, 2), (&that, 3), (&this, 4), (&that, 5)] {
        let windows = vec![window(summary(&profile, 3600, &[f64::from(device)]))];
        assert_eq!(
            ingest([device; 16], Vec::new(), 1, windows).await,
            Ingested::Stored
        );
    }
    for store in [&engine.store, &other] {
        assert_eq!(
            hourly_of(&store.drift_hourly("demo", 1, 0).await.unwrap()),
            [(7200, "", 5, 5, 5, 0)]
        );
    }
}

/// A second store on the PostgreSQL database `postgres()` made for `engine`'s, as a second hub.
async fn second_hub(engine: &Engine) -> Store {
    let server = engine._server.as_ref().unwrap();
    Store::connect(&Database::Postgres(format!(
        "postgres://outpost@127.0.0.1:{}/hub",
        server.port()
    )))
    .await
    .unwrap()
}

/// Two stores on one PostgreSQL database, as two hubs: a root one stores reaches the other's
/// check-ins once it refreshes (every tick), and a device record one writes is what the other
/// reads next (nothing of them is cached on a shared store).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hubs_sharing_a_database_see_each_others_roots_and_devices() {
    let engine = postgres().await;
    let other = second_hub(&engine).await;
    let store = &engine.store;
    store.put_root(1, b"one").await.unwrap();
    other.refresh().await.unwrap();
    store.put_root(2, b"two").await.unwrap();
    assert!(other.roots_after(1).await.unwrap().is_empty());
    other.refresh().await.unwrap();
    assert_eq!(other.roots_after(1).await.unwrap(), [(2, b"two".to_vec())]);

    store.put_device(&device_record()).await.unwrap();
    let read = other.device_read(&DEVICE).await.unwrap().unwrap();
    other
        .update_device(read, |device| device.revoked = true)
        .await
        .unwrap();
    assert!(store.device(&DEVICE).await.unwrap().unwrap().revoked);
}

/// On SQLite, device records are served from memory once read; a write of the record, through
/// any operation, is what the next read sees.
#[tokio::test]
async fn a_cached_device_record_is_never_read_stale() {
    let engine = sqlite().await;
    let store = &engine.store;
    store.put_device(&device_record()).await.unwrap();
    let read = store.device_read(&DEVICE).await.unwrap().unwrap();
    assert!(store.devices_cache.as_ref().unwrap().get(&DEVICE).is_some());
    store
        .update_device(read, |device| device.revoked = true)
        .await
        .unwrap();
    assert!(store.device(&DEVICE).await.unwrap().unwrap().revoked);
    store
        .ingest_telemetry(&DEVICE, &[], 1, &[], 4, 10)
        .await
        .unwrap();
    assert_eq!(
        store
            .device(&DEVICE)
            .await
            .unwrap()
            .unwrap()
            .dropped_records,
        4
    );
    let event = EventRecord {
        at: 5,
        kind: "committed".to_owned(),
        plan_sequence: Some(3),
        model: None,
        detail: String::new(),
    };
    store
        .record_status(&DEVICE, None, None, &event, Some(&running("iris", 2)))
        .await
        .unwrap();
    assert_eq!(
        store.device(&DEVICE).await.unwrap().unwrap().models,
        [running("iris", 2)]
    );
    // A stale read written back is refused by the database and applied again to what it holds.
    let stale = DeviceRead {
        record: device_record(),
        applied: None,
        stored: devices::encode_device(&device_record(), None).unwrap(),
    };
    let written = store
        .update_device(stale, |device| device.state = "degraded".to_owned())
        .await
        .unwrap()
        .unwrap();
    assert!(written.revoked && written.dropped_records == 4);
    assert_eq!(store.device(&DEVICE).await.unwrap().unwrap(), written);
}

fn alert_rule(name: &str, model: &str) -> AlertRuleRecord {
    AlertRuleRecord {
        name: name.to_owned(),
        model: model.to_owned(),
        selector: Vec::new(),
        condition: "psi > 0.2".to_owned(),
        hold_secs: 0,
        window_secs: 3600,
        webhooks: Vec::new(),
        created: 1,
        created_by: "admin".to_owned(),
    }
}

on_both_engines!(alert_rules_read_after_a_write_are_what_it_left);

/// Reads of the rules, all or a model's, see every add and removal before them (on SQLite they
/// are served from memory once read).
async fn alert_rules_read_after_a_write_are_what_it_left(store: &Store) {
    let names = |rules: Vec<AlertRuleRecord>| -> Vec<String> {
        rules.into_iter().map(|rule| rule.name).collect()
    };
    assert!(store.alert_rules(Some("iris")).await.unwrap().is_empty());
    assert!(store
        .add_alert_rule(&alert_rule("b", "iris"))
        .await
        .unwrap());
    assert_eq!(names(store.alert_rules(Some("iris")).await.unwrap()), ["b"]);
    assert!(store.add_alert_rule(&alert_rule("c", "vad")).await.unwrap());
    assert!(store
        .add_alert_rule(&alert_rule("a", "iris"))
        .await
        .unwrap());
    assert!(!store.add_alert_rule(&alert_rule("a", "vad")).await.unwrap());
    assert_eq!(
        names(store.alert_rules(Some("iris")).await.unwrap()),
        ["a", "b"]
    );
    assert_eq!(names(store.alert_rules(Some("vad")).await.unwrap()), ["c"]);
    assert_eq!(
        names(store.alert_rules(None).await.unwrap()),
        ["a", "b", "c"]
    );
    assert!(store.delete_alert_rule("b").await.unwrap());
    assert!(!store.delete_alert_rule("b").await.unwrap());
    assert_eq!(names(store.alert_rules(Some("iris")).await.unwrap()), ["a"]);
    assert_eq!(
        store.alert_rules(None).await.unwrap(),
        [alert_rule("a", "iris"), alert_rule("c", "vad")]
    );
}

/// On SQLite, the rules are read once until a rule is written; a read that began before a write
/// does not put what it read back after it.
#[tokio::test]
async fn cached_alert_rules_are_never_read_stale() {
    let engine = sqlite().await;
    let store = &engine.store;
    let cache = store.rules_cache.as_ref().unwrap();
    store.alert_rules(Some("iris")).await.unwrap();
    assert_eq!(cache.get().as_deref(), Some(&Vec::new()));
    assert!(store
        .add_alert_rule(&alert_rule("a", "iris"))
        .await
        .unwrap());
    assert!(cache.get().is_none());
    // A read begun before the write, answering after it.
    let before = cache.generation();
    store.alert_rules(None).await.unwrap();
    assert!(cache.get().is_some());
    assert!(store.delete_alert_rule("a").await.unwrap());
    cache.fill(Arc::new(vec![alert_rule("a", "iris")]), before);
    assert!(cache.get().is_none());
    assert!(store.alert_rules(Some("iris")).await.unwrap().is_empty());
}

on_both_engines!(
    an_alert_step_moves_once_and_queues_each_notification_once,
    a_notification_is_claimed_by_one_hub_and_sent_in_order_until_delivered_or_dead,
);

fn alert_state(phase: &str, since: u64) -> AlertStateRecord {
    AlertStateRecord {
        rule: "r".to_owned(),
        alert_key: "demo@1".to_owned(),
        phase: phase.to_owned(),
        since,
        held_since: since,
        firing_since: if phase == "firing" { since } else { 0 },
    }
}

fn notification(key: &str, webhook: &str) -> OutboxInsert {
    OutboxInsert {
        idempotency_key: key.to_owned(),
        webhook: webhook.to_owned(),
        kind: "firing".to_owned(),
        rule: "r".to_owned(),
        alert_key: "demo@1".to_owned(),
        body: key.as_bytes().to_vec(),
    }
}

async fn an_alert_step_moves_once_and_queues_each_notification_once(store: &Store) {
    let firing = alert_state("firing", 100);
    let queued = [notification("k-firing", "a"), notification("k-firing", "b")];
    // Evaluations proposing the same first step at once: one moves the alert and queues.
    let attempts = (0..4).map(|_| {
        let store = store.clone();
        let (firing, queued) = (firing.clone(), queued.clone());
        tokio::spawn(async move { store.apply_alert_step(None, &firing, &queued, 100).await })
    });
    let mut moved = 0;
    for attempt in attempts {
        moved += u32::from(attempt.await.unwrap().unwrap());
    }
    assert_eq!(moved, 1);
    assert_eq!(store.alert_states().await.unwrap(), vec![firing.clone()]);
    assert_eq!(
        store
            .outbox(DeliveryState::Pending, 10)
            .await
            .unwrap()
            .len(),
        2
    );
    // A step from a state that is no longer stored changes nothing.
    let stale = alert_state("pending", 50);
    let inactive = alert_state("inactive", 200);
    assert!(!store
        .apply_alert_step(
            Some(&stale),
            &inactive,
            &[notification("k-resolved", "a")],
            200
        )
        .await
        .unwrap());
    assert_eq!(store.alert_states().await.unwrap(), vec![firing.clone()]);
    // From the stored state it moves; a notification already queued is not queued again.
    assert!(store
        .apply_alert_step(
            Some(&firing),
            &inactive,
            &[
                notification("k-resolved", "a"),
                notification("k-firing", "a")
            ],
            200
        )
        .await
        .unwrap());
    let pending = store.outbox(DeliveryState::Pending, 10).await.unwrap();
    let keys: Vec<(&str, &str)> = pending
        .iter()
        .map(|record| (record.idempotency_key.as_str(), record.webhook.as_str()))
        .collect();
    assert_eq!(
        keys,
        vec![("k-resolved", "a"), ("k-firing", "b"), ("k-firing", "a")]
    );
    assert_eq!(store.alert_states_of("r").await.unwrap(), vec![inactive]);
    assert!(store.delete_alert_rule("r").await.is_ok());
    assert!(store.alert_states().await.unwrap().is_empty());
}

async fn a_notification_is_claimed_by_one_hub_and_sent_in_order_until_delivered_or_dead(
    store: &Store,
) {
    let webhook = WebhookRecord {
        name: "a".to_owned(),
        url: "https://ci.example/hook".to_owned(),
        secret: "0123456789abcdef".to_owned(),
        format: "outpost".to_owned(),
        created: 1,
        created_by: "t".to_owned(),
    };
    assert!(store.add_webhook(&webhook).await.unwrap());
    assert!(!store.add_webhook(&webhook).await.unwrap());
    let firing = alert_state("firing", 100);
    let inactive = alert_state("inactive", 200);
    store
        .apply_alert_step(None, &firing, &[notification("first", "a")], 100)
        .await
        .unwrap();
    store
        .apply_alert_step(
            Some(&firing),
            &inactive,
            &[notification("second", "a")],
            200,
        )
        .await
        .unwrap();
    let now_ms = 300_000;
    // Only the oldest notification of a webhook is due.
    let due = store.due_deliveries(now_ms).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].idempotency_key, "first");
    let id = due[0].id;
    assert!(store
        .claim_delivery(id, "hub-1", now_ms, now_ms + 30_000)
        .await
        .unwrap());
    assert!(!store
        .claim_delivery(id, "hub-2", now_ms, now_ms + 30_000)
        .await
        .unwrap());
    assert!(store.due_deliveries(now_ms).await.unwrap().is_empty());
    assert_eq!(
        store.next_delivery_ms().await.unwrap(),
        Some(now_ms + 30_000)
    );
    // Another hub's outcome is not recorded over a claim it does not hold.
    let delivered = AttemptOutcome::Delivered { status: 200 };
    store
        .finish_delivery(id, "hub-2", &delivered, 300)
        .await
        .unwrap();
    assert!(store
        .outbox(DeliveryState::Delivered, 10)
        .await
        .unwrap()
        .is_empty());
    // A failure waits for its retry, still first in line.
    let failed = AttemptOutcome::Failed {
        status: Some(503),
        error: "the receiver answered 503".to_owned(),
        retry_at_ms: Some(now_ms + 1000),
    };
    store
        .finish_delivery(id, "hub-1", &failed, 300)
        .await
        .unwrap();
    assert!(store.due_deliveries(now_ms).await.unwrap().is_empty());
    assert_eq!(store.next_delivery_ms().await.unwrap(), Some(now_ms + 1000));
    let later = now_ms + 1000;
    let due = store.due_deliveries(later).await.unwrap();
    assert_eq!(
        (due[0].id, due[0].attempts, due[0].last_status),
        (id, 1, 503)
    );
    assert!(store
        .claim_delivery(id, "hub-2", later, later + 30_000)
        .await
        .unwrap());
    store
        .finish_delivery(id, "hub-2", &delivered, 301)
        .await
        .unwrap();
    let done = store.outbox(DeliveryState::Delivered, 10).await.unwrap();
    assert_eq!(
        (done[0].id, done[0].attempts, done[0].done_at),
        (id, 2, 301)
    );
    // A delivered notification is never due again; the next one is.
    let due = store.due_deliveries(later).await.unwrap();
    assert_eq!(due.len(), 1);
    assert_eq!(due[0].idempotency_key, "second");
    let second = due[0].id;
    assert!(store
        .claim_delivery(second, "hub-1", later, later + 30_000)
        .await
        .unwrap());
    let given_up = AttemptOutcome::Failed {
        status: None,
        error: "connection refused".to_owned(),
        retry_at_ms: None,
    };
    store
        .finish_delivery(second, "hub-1", &given_up, 302)
        .await
        .unwrap();
    let dead = store.outbox(DeliveryState::Dead, 10).await.unwrap();
    assert_eq!(
        (dead[0].id, dead[0].last_error.as_str()),
        (second, "connection refused")
    );
    assert_eq!(store.next_delivery_ms().await.unwrap(), None);
    // A dead letter goes back in line; deleting its webhook makes it dead again.
    assert!(store.retry_dead(second, later).await.unwrap());
    assert!(!store.retry_dead(second, later).await.unwrap());
    assert_eq!(store.due_deliveries(later).await.unwrap()[0].attempts, 0);
    assert!(store.delete_webhook("a", 303).await.unwrap());
    let dead = store.outbox(DeliveryState::Dead, 10).await.unwrap();
    assert_eq!(dead[0].last_error, "its webhook was deleted");
    assert!(!store.retry_dead(second, later).await.unwrap());
}

/// The bundled SQLite is built with the workspace's options (`LIBSQLITE3_FLAGS` in
/// `.cargo/config.toml`): it keeps its query plans whatever values are bound (without that, the
/// writer's group statements were compiled again on every run, since sqlx clears their bindings
/// before each), and keeps a group's statement journals in memory.
#[tokio::test]
async fn sqlite_is_built_with_the_workspaces_options() {
    let engine = sqlite().await;
    // What the store's open reads and warns of.
    assert_eq!(
        super::sql::build_options(&engine.store.writer)
            .await
            .unwrap(),
        None
    );
}
