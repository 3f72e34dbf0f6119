//! Telemetry batches stored in groups (see `group`): each kind of row a group of batches reads or
//! writes is one statement for the whole group, not one per batch.
//!
//! Why: a batch touches about ten rows (its idempotency key, its device's highest sequence, its
//! drift, counters and shadow records, their hourly aggregates), and the writer is one connection
//! (SQLite has one writer; on PostgreSQL the aggregates' rows are shared). Issued one statement
//! per row and batch, each a round trip to the database's thread or server, the writer spent its
//! time waiting on those round trips: about 800 batches a second on SQLite with the machine half
//! idle.
//!
//! Each batch keeps its own verdict: a duplicate, a batch below one already stored for its
//! device, or one whose drift summary does not merge is answered as before and leaves nothing in
//! the store, and the other batches of its group are stored.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use outpost_protocol::Label;
use sqlx::Connection;

use super::drift_hourly::{hour_of, label_group, merge_hourly, HourKey, HourParts};
use super::group::{
    matching, parameter, placeholders, rows, GroupQueue, Queued, KEYS_PER_STATEMENT,
};
use super::statements::{Param, Statements};
use super::stats_hourly::add_hourly_stats;
use super::telemetry::{encode_applied, merge_drift, DriftKey, ShadowKey};
use super::*;

/// One batch as queued: what [`Store::ingest_telemetry`] was given, owned.
pub(super) struct Batch {
    device: [u8; 16],
    label_group: String,
    sequence: u64,
    windows: Vec<WindowInput>,
    dropped_records: u64,
    now: u64,
    /// The request that carried the batch, noted with it (see [`Store::ingest_signed_telemetry`]).
    signed: Option<SignedRequest>,
    /// Each window's drift summary as a protocol frame, given by the caller, for a window new to
    /// the store in one part, whose record is that frame: the groups run one at a time, and
    /// encoding a 100-feature summary was a fifth of a group's own work. `None` for a window
    /// without a summary, or one that does not encode (the group says why).
    frames: Vec<Option<Vec<u8>>>,
}

impl Batch {
    /// The batch of `windows`, whose summaries' frames are `frames` (see [`Batch::frames`]); any
    /// frame missing is encoded here.
    fn new(
        device: &[u8; 16],
        labels: &[Label],
        sequence: u64,
        windows: Vec<WindowInput>,
        mut frames: Vec<Option<Vec<u8>>>,
        dropped_records: u64,
        now: u64,
    ) -> Batch {
        frames.resize(windows.len(), None);
        for (frame, window) in frames.iter_mut().zip(&windows) {
            if let (None, Some(summary)) = (&frame, &window.drift) {
                *frame = outpost_protocol::encode(summary).ok();
            }
        }
        Batch {
            device: *device,
            label_group: label_group(labels),
            sequence,
            windows,
            dropped_records,
            now,
            signed: None,
            frames,
        }
    }
}

impl Queued for Batch {
    fn device(&self) -> [u8; 16] {
        self.device
    }
}

/// The telemetry batches waiting; see [`Store::ingest_telemetry`].
pub(super) type IngestQueue = GroupQueue<Batch, Ingested>;

impl Store {
    /// Stores a telemetry batch exactly once, in one transaction shared with the other batches
    /// waiting (see the module's notes).
    ///
    /// The batch's idempotency key `(device, sequence)` is inserted first: a copy of the batch
    /// already stored, or being stored by another hub (which holds the key's row until it
    /// commits), makes this one [`Ingested::Duplicate`]. On PostgreSQL the device's row is locked
    /// as well, so one device's batches are applied one at a time across hubs.
    ///
    /// A device's sequences only increase (the agent forms batch n+1 after n is acknowledged and
    /// keeps a floor across cache quarantines), so a batch below one already stored for its device
    /// is refused as [`Ingested::OutOfOrder`]; the agent never sends one.
    ///
    /// A drift summary that does not merge with its device's window (its counts would overflow)
    /// refuses the whole batch and nothing of it is written, not even its idempotency key.
    ///
    /// Each drift summary stored is also merged into the hourly aggregate of its model version
    /// and of the label group of `labels`, the device's labels now (see `drift_hourly`); one that
    /// does not merge there is left out of the aggregate and counted, and refuses nothing. Each
    /// window's counters are likewise added to that label group's hour (see `stats_hourly`).
    pub async fn ingest_telemetry(
        &self,
        device: &[u8; 16],
        labels: &[Label],
        sequence: u64,
        windows: &[WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<Ingested> {
        let batch = Batch::new(
            device,
            labels,
            sequence,
            windows.to_vec(),
            Vec::new(),
            dropped_records,
            now,
        );
        self.ingest_batch(batch).await
    }

    /// [`Store::ingest_telemetry`] of the batch `request` carried, noting the request as
    /// [`Store::note_signed_at`] does in the same transaction. The batch and the note are durable
    /// when this returns, with no [`Store::flush`] of the caller's: one pass through the writer
    /// where a note and a group took two, and the sync is shared with other callers. The windows
    /// are taken, not copied: their summaries are most of a batch. Each comes with its summary's
    /// frame, as `outpost_protocol::encode` gives it, where the caller has it (say, cut from the
    /// request by `TelemetryBatch::drift_frames`); a frame missing is encoded here.
    pub async fn ingest_signed_telemetry(
        &self,
        request: &SignedRequest,
        labels: &[Label],
        sequence: u64,
        windows: Vec<(WindowInput, Option<Vec<u8>>)>,
        dropped_records: u64,
        now: u64,
    ) -> Result<Ingested> {
        let (windows, frames) = windows.into_iter().unzip();
        let mut batch = Batch::new(
            &request.device,
            labels,
            sequence,
            windows,
            frames,
            dropped_records,
            now,
        );
        batch.signed = Some(*request);
        self.ingest_batch(batch).await
    }

    async fn ingest_batch(&self, batch: Batch) -> Result<Ingested> {
        let verdict = self
            .ingest
            .run(
                self,
                |store| &store.ingest,
                batch,
                |store, batches| Box::pin(store.store_group(batches)),
            )
            .await?;
        // Outside the group: the writer is on to the next group while this waits for the disk,
        // and the batches of groups that committed meanwhile share one sync.
        self.flush().await?;
        Ok(verdict)
    }

    /// Stores `batches` (at most one per device) in one transaction and returns each one's
    /// verdict, in their order. On SQLite the commit is durable once a [`Store::flush`] begun
    /// after it has finished.
    async fn store_group(&self, batches: &[&Batch]) -> Result<Vec<Ingested>> {
        let (verdicts, counted) = match &self.groups {
            Some(groups) => {
                let mut lease = groups.lease(&self.writer).await?;
                let group = self.store_group_on(lease.connection(), batches).await;
                lease.finish(group)?
            }
            None => {
                let mut connection = self.writer.acquire().await?;
                let mut transaction = connection.begin().await?;
                let group = self.store_group_on(&mut *transaction, batches).await?;
                transaction.commit().await?;
                group
            }
        };
        for device in counted {
            self.device_written(&device);
        }
        Ok(verdicts)
    }

    /// [`Store::store_group`]'s writes, in the transaction it began on `transaction`: each
    /// batch's verdict, and the devices whose records it changed.
    async fn store_group_on<S: Statements>(
        &self,
        transaction: &mut S,
        batches: &[&Batch],
    ) -> Result<(Vec<Ingested>, Vec<[u8; 16]>)> {
        let mut verdicts = vec![Ingested::Stored; batches.len()];
        if self.dialect == Dialect::Postgres {
            let mut ids: Vec<[u8; 16]> = batches.iter().map(|batch| batch.device).collect();
            ids.sort_unstable();
            for chunk in ids.chunks(KEYS_PER_STATEMENT) {
                let sql = format!(
                    "SELECT id FROM devices WHERE id IN ({}) ORDER BY id FOR UPDATE",
                    placeholders(self.dialect, 1, chunk.len())
                );
                let params: Vec<Param<'_>> = chunk.iter().map(Param::from).collect();
                transaction.fetch(&sql, &params).await?;
            }
        }
        let notes: Vec<&SignedRequest> = batches
            .iter()
            .filter_map(|batch| batch.signed.as_ref())
            .collect();
        if !notes.is_empty() {
            self.write_signed(transaction, &notes).await?;
        }

        // The idempotency keys, and which were new.
        let mut taken: HashSet<([u8; 16], i64)> = HashSet::new();
        let keys: Vec<(usize, i64)> = batches
            .iter()
            .enumerate()
            .map(|(index, batch)| Ok((index, int("telemetry batch sequence", batch.sequence)?)))
            .collect::<Result<_>>()?;
        for chunk in keys.chunks(KEYS_PER_STATEMENT) {
            let sql = format!(
                "INSERT INTO telemetry_seen (device, sequence, stored_at) VALUES {} \
                 ON CONFLICT (device, sequence) DO NOTHING RETURNING device, sequence",
                rows(self.dialect, chunk.len(), 3)
            );
            let mut params = Vec::with_capacity(3 * chunk.len());
            for &(index, sequence) in chunk {
                let batch = batches[index];
                params.extend([
                    Param::from(&batch.device),
                    Param::Int(sequence),
                    Param::Int(int("time", batch.now)?),
                ]);
            }
            for row in transaction.fetch(&sql, &params).await? {
                taken.insert((fixed("telemetry_seen", &row.blob(0)?)?, row.int(1)?));
            }
        }
        let mut left_out: Vec<usize> = Vec::new();
        for &(index, sequence) in &keys {
            if !taken.contains(&(batches[index].device, sequence)) {
                verdicts[index] = Ingested::Duplicate;
            }
        }

        // A later batch of the device stored before: this one is out of order.
        let fresh: Vec<(usize, i64)> = keys
            .iter()
            .copied()
            .filter(|&(index, _)| verdicts[index] == Ingested::Stored)
            .collect();
        for chunk in fresh.chunks(KEYS_PER_STATEMENT) {
            let sql = format!(
                "SELECT device, MAX(sequence) FROM telemetry_seen WHERE {} GROUP BY device",
                matching(self.dialect, chunk.len(), &["device = ", "sequence > "])
            );
            let params: Vec<Param<'_>> = chunk
                .iter()
                .flat_map(|&(index, sequence)| {
                    [Param::from(&batches[index].device), Param::Int(sequence)]
                })
                .collect();
            for row in transaction.fetch(&sql, &params).await? {
                let device: [u8; 16] = fixed("telemetry_seen", &row.blob(0)?)?;
                let highest = row.uint("telemetry_seen", 1)?;
                if let Some(&(index, _)) = chunk
                    .iter()
                    .find(|&&(index, _)| batches[index].device == device)
                {
                    verdicts[index] = Ingested::OutOfOrder { highest };
                    left_out.push(index);
                }
            }
        }

        // What each batch adds to, and the drift records it merges into.
        let mut plans: Vec<Option<Plan<'_>>> = batches
            .iter()
            .zip(&verdicts)
            .map(|(batch, verdict)| {
                (*verdict == Ingested::Stored)
                    .then(|| Plan::of(batch))
                    .transpose()
            })
            .collect::<Result<_>>()?;
        let drift_keys: Vec<(&DriftKey, [u8; 16])> = plans
            .iter()
            .zip(batches)
            .filter_map(|(plan, batch)| Some((plan.as_ref()?, batch)))
            .flat_map(|(plan, batch)| plan.drift.keys().map(|key| (key, batch.device)))
            .collect();
        let stored_drift = read_drift(transaction, self.dialect, &drift_keys).await?;
        let mut drift_rows: Vec<DriftRow> = Vec::new();
        for (index, slot) in plans.iter_mut().enumerate() {
            let Some(plan) = slot else { continue };
            let batch = batches[index];
            let mut rows = Vec::with_capacity(plan.drift.len());
            let mut refused = None;
            for (key, parts) in &plan.drift {
                let stored = stored_drift.get(&(key.clone(), batch.device));
                // A window new to the store, in one part: its record is the frame encoded
                // with the batch.
                let encoded = match (stored, parts.as_slice()) {
                    (None, [(window, _)]) => batch.frames.get(*window).and_then(Option::as_deref),
                    _ => None,
                };
                match merge_drift(stored.map(Vec::as_slice), parts, encoded, batch.now)? {
                    Ok(record) => {
                        if stored.is_none() {
                            plan.created.insert(key.clone());
                        }
                        rows.push((
                            key.clone(),
                            batch.device,
                            encode_applied("drift", &record, None)?,
                        ));
                    }
                    Err((window, reason)) => {
                        refused = Some(Ingested::Refused { window, reason });
                        break;
                    }
                }
            }
            match refused {
                Some(verdict) => {
                    verdicts[index] = verdict;
                    left_out.push(index);
                    *slot = None;
                }
                None => drift_rows.extend(rows),
            }
        }

        // Batches refused after their key was taken leave no key behind.
        if !left_out.is_empty() {
            left_out.sort_unstable();
            for chunk in left_out.chunks(KEYS_PER_STATEMENT) {
                let sql = format!(
                    "DELETE FROM telemetry_seen WHERE {}",
                    matching(self.dialect, chunk.len(), &["device = ", "sequence = "])
                );
                let params: Vec<Param<'_>> = chunk
                    .iter()
                    .flat_map(|&index| {
                        [
                            Param::from(&batches[index].device),
                            Param::Int(keys[index].1),
                        ]
                    })
                    .collect();
                transaction.execute(&sql, &params).await?;
            }
        }
        write_drift(transaction, self.dialect, &drift_rows).await?;

        let stored: Vec<(&Plan<'_>, &Batch)> = plans
            .iter()
            .zip(batches)
            .filter_map(|(plan, batch)| Some((plan.as_ref()?, *batch)))
            .collect();
        write_stats(transaction, self.dialect, &stored).await?;
        write_shadow(transaction, self.dialect, &stored).await?;
        let counted = count_dropped(transaction, &stored).await?;

        self.prune_markers(transaction, batches).await?;

        // Last, so that on PostgreSQL the aggregates' rows, which every device of a label group
        // writes, stay locked for as short a time as the group allows.
        let mut hours: BTreeMap<(HourKey, &str), HourParts<'_>> = BTreeMap::new();
        for (plan, batch) in &stored {
            for (key, parts) in &plan.drift {
                let (model, version, end, _) = key;
                hours
                    .entry((
                        (model.clone(), *version, hour_of(*end)),
                        batch.label_group.as_str(),
                    ))
                    .or_default()
                    .push((plan.created.contains(key), parts.as_slice()));
            }
        }
        if !hours.is_empty() {
            let now = stored.iter().map(|(_, batch)| batch.now).max().unwrap_or(0);
            merge_hourly(transaction, self.dialect, &self.decoded_hours, hours, now).await?;
        }
        // After the drift aggregates, so that every group takes the shared rows' locks in one
        // order.
        let mut stats_hours: BTreeMap<(HourKey, &str), StatsRecord> = BTreeMap::new();
        for (plan, batch) in &stored {
            for ((model, version), windows) in &plan.stats {
                for window in windows {
                    let hour = hour_of(int("window end", window.end)?);
                    stats_hours
                        .entry(((model.clone(), *version, hour), batch.label_group.as_str()))
                        .or_default()
                        .add(window.count, window.errors, &window.latency_buckets);
                }
            }
        }
        add_hourly_stats(transaction, self.dialect, stats_hours).await?;
        Ok((verdicts, counted))
    }
}

impl Store {
    /// Keeps each device's telemetry batch markers (the idempotency keys of its batches) for at
    /// least `secs` after they were stored, and its newest for good, which keeps its sequences
    /// increasing: from now on, each group of batches removes its devices' older markers (see
    /// `Store::prune_markers` for "at least"). Until this is called, markers are kept for good.
    pub fn keep_batch_markers_for(&self, secs: u64) {
        self.markers_kept_for.store(secs, Ordering::Relaxed);
    }

    /// Removes the markers of `batches`' devices past [`Store::keep_batch_markers_for`].
    ///
    /// A device's markers are stored in the order of its sequences (it sends batch n+1 once n
    /// is acknowledged), so those past their time are the device's lowest sequences. Each device's
    /// bound is found from its lowest sequence up, and what is below it goes by the key's range:
    /// the cost is the markers removed, not the markers kept, which a month of retention makes
    /// thousands per device. The bound is the first marker stored at or after the cutoff, or the
    /// newest marker when none was. A marker stored out of time order (by a hub whose clock ran
    /// behind) is kept until the markers before it have gone: kept longer, never shorter.
    async fn prune_markers<S: Statements>(
        &self,
        connection: &mut S,
        batches: &[&Batch],
    ) -> Result<()> {
        let kept_for = self.markers_kept_for.load(Ordering::Relaxed);
        let Some(now) = batches.iter().map(|batch| batch.now).max() else {
            return Ok(());
        };
        if kept_for == u64::MAX {
            return Ok(());
        }
        let cutoff = bound(now.saturating_sub(kept_for));
        for chunk in batches.chunks(KEYS_PER_STATEMENT) {
            let sql = format!(
                "DELETE FROM telemetry_seen WHERE {}",
                (0..chunk.len())
                    .map(|term| prune_term(self.dialect, 1 + 4 * term))
                    .collect::<Vec<_>>()
                    .join(" OR ")
            );
            let params: Vec<Param<'_>> = chunk
                .iter()
                .flat_map(|batch| {
                    let device = Param::from(&batch.device);
                    [device, device, Param::Int(cutoff), device]
                })
                .collect();
            connection.execute(&sql, &params).await?;
        }
        Ok(())
    }
}

/// One device's term of [`Store::prune_markers`]'s `DELETE`, its four parameters numbered from
/// `first` (see `group::parameter`): the device, the device, the cutoff and the device. The bound
/// is a subquery of parameters alone, so it runs once per statement, not once per row.
fn prune_term(dialect: Dialect, first: usize) -> String {
    let [device, kept_device, cutoff, newest_device] =
        [0, 1, 2, 3].map(|n| parameter(dialect, first + n));
    format!(
        "(device = {device} AND sequence < (SELECT COALESCE(\
         (SELECT kept.sequence FROM telemetry_seen AS kept \
         WHERE kept.device = {kept_device} AND kept.stored_at >= {cutoff} \
         ORDER BY kept.sequence LIMIT 1), \
         (SELECT MAX(newest.sequence) FROM telemetry_seen AS newest \
         WHERE newest.device = {newest_device}))))"
    )
}

/// What one batch adds to: its windows by counters record, drift record and shadow record, and
/// the drift records it creates.
struct Plan<'a> {
    stats: BTreeMap<(String, i64), Vec<&'a WindowInput>>,
    drift: BTreeMap<DriftKey, Vec<(usize, &'a DriftSummary)>>,
    shadow: BTreeMap<ShadowKey, Vec<&'a ShadowReport>>,
    created: BTreeSet<DriftKey>,
}

impl<'a> Plan<'a> {
    fn of(batch: &'a Batch) -> Result<Plan<'a>> {
        let mut plan = Plan {
            stats: BTreeMap::new(),
            drift: BTreeMap::new(),
            shadow: BTreeMap::new(),
            created: BTreeSet::new(),
        };
        for (index, window) in batch.windows.iter().enumerate() {
            let version = int("model version", window.version)?;
            plan.stats
                .entry((window.model.clone(), version))
                .or_default()
                .push(window);
            if let Some(summary) = &window.drift {
                let key = (
                    window.model.clone(),
                    version,
                    int("window end", summary.window_end)?,
                    int("window start", summary.window_start)?,
                );
                plan.drift.entry(key).or_default().push((index, summary));
            }
            if let Some(report) = &window.shadow {
                let key = (
                    report.target.manifest_sha256.0.to_vec(),
                    int("window end", window.end)?,
                    int("window start", window.start)?,
                    window.model.clone(),
                    version,
                );
                plan.shadow.entry(key).or_default().push(report);
            }
        }
        Ok(plan)
    }
}

/// A device's row to write: the device, the row's key past it, and its record.
type DeviceRow<'a, K> = ([u8; 16], &'a K, Vec<u8>);

/// A drift row to write: its key, its device and its record.
type DriftRow = (DriftKey, [u8; 16], Vec<u8>);

/// The stored drift records of `keys`, by key and device.
async fn read_drift<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    keys: &[(&DriftKey, [u8; 16])],
) -> Result<HashMap<(DriftKey, [u8; 16]), Vec<u8>>> {
    let mut stored = HashMap::new();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT model, version, window_end, window_start, device, record FROM drift WHERE {}",
            matching(
                dialect,
                chunk.len(),
                &[
                    "model = ",
                    "version = ",
                    "window_end = ",
                    "window_start = ",
                    "device = "
                ]
            )
        );
        let params: Vec<Param<'_>> = chunk
            .iter()
            .flat_map(|((model, version, end, start), device)| {
                [
                    Param::from(model),
                    Param::Int(*version),
                    Param::Int(*end),
                    Param::Int(*start),
                    Param::from(device),
                ]
            })
            .collect();
        for row in connection.fetch(&sql, &params).await? {
            let key = (row.text(0)?, row.int(1)?, row.int(2)?, row.int(3)?);
            stored.insert((key, fixed("drift", &row.blob(4)?)?), row.blob(5)?);
        }
    }
    Ok(stored)
}

/// Runs `insert` (an `INSERT … VALUES {}` with `width` columns and its `ON CONFLICT` clause) over
/// `items` in chunks, each item's `width` columns given by `columns`.
async fn upsert<S: Statements, T, const WIDTH: usize>(
    connection: &mut S,
    dialect: Dialect,
    insert: &str,
    items: &[T],
    columns: impl for<'t> Fn(&'t T) -> [Param<'t>; WIDTH],
) -> Result<()> {
    for chunk in items.chunks(KEYS_PER_STATEMENT) {
        let sql = insert.replace("{}", &rows(dialect, chunk.len(), WIDTH));
        let params: Vec<Param<'_>> = chunk.iter().flat_map(&columns).collect();
        connection.execute(&sql, &params).await?;
    }
    Ok(())
}

async fn write_drift<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    rows: &[DriftRow],
) -> Result<()> {
    upsert(
        connection,
        dialect,
        "INSERT INTO drift (model, version, window_end, window_start, device, record) VALUES {} \
         ON CONFLICT (model, version, window_end, window_start, device) \
         DO UPDATE SET record = excluded.record",
        rows,
        |((model, version, end, start), device, record)| {
            [
                Param::from(model),
                Param::Int(*version),
                Param::Int(*end),
                Param::Int(*start),
                Param::from(device),
                Param::from(record),
            ]
        },
    )
    .await
}

/// Adds each stored batch's windows to its device's counters.
async fn write_stats<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    stored: &[(&Plan<'_>, &Batch)],
) -> Result<()> {
    let keys: Vec<([u8; 16], &(String, i64))> = stored
        .iter()
        .flat_map(|(plan, batch)| plan.stats.keys().map(|key| (batch.device, key)))
        .collect();
    let mut records: HashMap<([u8; 16], (String, i64)), StatsRecord> = HashMap::new();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT device, model, version, record FROM stats WHERE {}",
            matching(
                dialect,
                chunk.len(),
                &["device = ", "model = ", "version = "]
            )
        );
        let params: Vec<Param<'_>> = chunk
            .iter()
            .flat_map(|(device, (model, version))| {
                [
                    Param::from(device),
                    Param::from(model),
                    Param::Int(*version),
                ]
            })
            .collect();
        for row in connection.fetch(&sql, &params).await? {
            records.insert(
                (fixed("stats", &row.blob(0)?)?, (row.text(1)?, row.int(2)?)),
                decode_applied_record::<StatsRecord>("stats", &row.blob(3)?)?,
            );
        }
    }
    let mut rows: Vec<DeviceRow<'_, (String, i64)>> = Vec::with_capacity(keys.len());
    for (plan, batch) in stored {
        for (key, windows) in &plan.stats {
            let mut record = records
                .remove(&(batch.device, key.clone()))
                .unwrap_or_default();
            for window in windows {
                record.add(window.count, window.errors, &window.latency_buckets);
            }
            rows.push((batch.device, key, encode_applied("stats", &record, None)?));
        }
    }
    upsert(
        connection,
        dialect,
        "INSERT INTO stats (device, model, version, record) VALUES {} \
         ON CONFLICT (device, model, version) DO UPDATE SET record = excluded.record",
        &rows,
        |(device, (model, version), record)| {
            [
                Param::from(device),
                Param::from(model),
                Param::Int(*version),
                Param::from(record),
            ]
        },
    )
    .await
}

/// Adds each stored batch's shadow comparisons to its device's shadow records.
async fn write_shadow<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    stored: &[(&Plan<'_>, &Batch)],
) -> Result<()> {
    let keys: Vec<([u8; 16], &ShadowKey)> = stored
        .iter()
        .flat_map(|(plan, batch)| plan.shadow.keys().map(|key| (batch.device, key)))
        .collect();
    if keys.is_empty() {
        return Ok(());
    }
    let mut records: HashMap<([u8; 16], ShadowKey), ShadowRecord> = HashMap::new();
    for chunk in keys.chunks(KEYS_PER_STATEMENT) {
        let sql = format!(
            "SELECT device, target, window_end, window_start, active_model, active_version, \
             record FROM shadow WHERE {}",
            matching(
                dialect,
                chunk.len(),
                &[
                    "target = ",
                    "window_end = ",
                    "window_start = ",
                    "device = ",
                    "active_model = ",
                    "active_version = "
                ]
            )
        );
        let params: Vec<Param<'_>> = chunk
            .iter()
            .flat_map(|(device, key)| shadow_key(device, key))
            .collect();
        for row in connection.fetch(&sql, &params).await? {
            let key = (
                row.blob(1)?,
                row.int(2)?,
                row.int(3)?,
                row.text(4)?,
                row.int(5)?,
            );
            records.insert(
                (fixed("shadow", &row.blob(0)?)?, key),
                decode_applied_record::<ShadowRecord>("shadow", &row.blob(6)?)?,
            );
        }
    }
    let mut rows: Vec<DeviceRow<'_, ShadowKey>> = Vec::with_capacity(keys.len());
    for (plan, batch) in stored {
        for (key, reports) in &plan.shadow {
            let mut record = records
                .remove(&(batch.device, key.clone()))
                .unwrap_or_default();
            for report in reports {
                record.add(report);
            }
            rows.push((batch.device, key, encode_applied("shadow", &record, None)?));
        }
    }
    upsert(
        connection,
        dialect,
        "INSERT INTO shadow (target, window_end, window_start, device, active_model, \
         active_version, record) VALUES {} ON CONFLICT \
         (target, window_end, window_start, device, active_model, active_version) \
         DO UPDATE SET record = excluded.record",
        &rows,
        |(device, key, record)| {
            let [target, end, start, device, model, version] = shadow_key(device, key);
            [
                target,
                end,
                start,
                device,
                model,
                version,
                Param::from(record),
            ]
        },
    )
    .await
}

/// The columns of a shadow row's key, in the table's order: target, window end, window start,
/// device, active model, active version.
fn shadow_key<'a>(
    device: &'a [u8; 16],
    (target, end, start, model, version): &'a ShadowKey,
) -> [Param<'a>; 6] {
    [
        Param::from(target),
        Param::Int(*end),
        Param::Int(*start),
        Param::from(device),
        Param::from(model),
        Param::Int(*version),
    ]
}

/// Adds each stored batch's dropped records to its device's count, and returns the devices whose
/// records changed. A batch of a device no longer stored has nowhere to count its drops.
async fn count_dropped<S: Statements>(
    connection: &mut S,
    stored: &[(&Plan<'_>, &Batch)],
) -> Result<Vec<[u8; 16]>> {
    let mut counted = Vec::new();
    for (_, batch) in stored {
        if batch.dropped_records == 0 {
            continue;
        }
        let id = Param::from(&batch.device);
        let rows = connection
            .fetch("SELECT record FROM devices WHERE id = $1", &[id])
            .await?;
        let Some(row) = rows.first() else { continue };
        let (mut record, applied) = super::devices::decode_device(&row.blob(0)?)?;
        record.dropped_records = record.dropped_records.saturating_add(batch.dropped_records);
        let record = super::devices::encode_device(&record, applied)?;
        connection
            .execute(
                "UPDATE devices SET record = $1 WHERE id = $2",
                &[Param::from(&record), id],
            )
            .await?;
        counted.push(batch.device);
    }
    Ok(counted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    fn batch(device: u8) -> Batch {
        Batch {
            device: [device; 16],
            label_group: String::new(),
            sequence: 1,
            windows: Vec::new(),
            dropped_records: 0,
            now: 10,
            signed: None,
            frames: Vec::new(),
        }
    }

    /// A group that panics (a bug) fails its callers with an error instead of leaving them, or
    /// the queue, waiting for good: the task running groups outlives it and ends once the queue
    /// is empty, and the next batch starts a task again and is stored.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_group_that_panics_fails_its_callers_and_frees_the_queue() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let error = store
            .ingest
            .run(
                &store,
                |store| &store.ingest,
                batch(1),
                |_, _| Box::pin(async { panic!("a bug in a group") }),
            )
            .await
            .unwrap_err();
        assert!(matches!(error, StoreError::GroupStopped), "{error}");
        // The task that ran the group goes on to find the queue empty and ends, freeing it.
        // (Bounded, so a queue left stuck fails the test instead of hanging it.)
        let freed = async {
            while !store.ingest.idle() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), freed)
            .await
            .expect("the queue is freed after a group panicked");
        let verdict = store
            .ingest
            .run(
                &store,
                |store| &store.ingest,
                batch(2),
                |store, batches| Box::pin(store.store_group(batches)),
            )
            .await
            .unwrap();
        assert_eq!(verdict, Ingested::Stored);
    }

    /// An SQLite store's groups run on its thread for writes (see `group`), not on the runtime's
    /// workers, and the thread ends once the store is dropped.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_sqlite_stores_groups_run_on_a_thread_that_ends_with_the_store() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let seen = Arc::new(Mutex::new(None));
        let verdict = store
            .ingest
            .run(&store, |store| &store.ingest, batch(1), {
                let seen = Arc::clone(&seen);
                move |_, batches| {
                    let thread = std::thread::current().name().map(str::to_owned);
                    // `<pid>/task/<tid>`: where /proc shows this thread while it lives.
                    let task = std::fs::read_link("/proc/thread-self").unwrap();
                    *seen.lock().unwrap() = Some((thread, task));
                    let verdicts = vec![Ingested::Stored; batches.len()];
                    Box::pin(async move { Ok(verdicts) })
                }
            })
            .await
            .unwrap();
        assert_eq!(verdict, Ingested::Stored);
        let (thread, task) = seen.lock().unwrap().take().expect("the group ran");
        assert_eq!(thread.as_deref(), Some("outpost-groups"));
        let task = Path::new("/proc").join(task);
        assert!(
            task.exists(),
            "{} is there while the store is",
            task.display()
        );

        drop(store);
        // (Bounded, so a thread left running fails the test instead of hanging it.)
        let ended = async {
            while task.exists() {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), ended)
            .await
            .expect("the thread for writes ends with the store");
    }

    /// While a group of an SQLite store runs on its own connection, no other write of the
    /// store's runs: the group's lease holds sqlx's one write connection until it ends. A
    /// transaction of sqlx's that read before a group committed would otherwise have its write
    /// refused (the snapshot it read is stale: "database is locked").
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_sqlite_groups_lease_holds_the_stores_other_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).await.unwrap();
        let groups = store
            .groups
            .as_ref()
            .expect("an SQLite store has a group thread");
        let lease = groups.lease(&store.writer).await.unwrap();
        assert!(
            store.writer.try_acquire().is_none(),
            "sqlx's write connection is held while a group runs"
        );
        lease.finish(Ok(())).unwrap();
        // The pool takes its connection back on a task of its own. (Bounded, so a connection
        // never given back fails the test instead of hanging it.)
        let given_back = async {
            loop {
                if store.writer.try_acquire().is_some() {
                    return;
                }
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(std::time::Duration::from_secs(60), given_back)
            .await
            .expect("the write connection is given back when the group ends");
    }
}
