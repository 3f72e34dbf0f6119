//! The telemetry cache: closed inference windows kept on disk until the hub acknowledges them, so a
//! device that is offline for weeks still reports what it served. sled `=0.34.7` lives behind this
//! one module; nothing else in the agent names it.
//!
//! The per-inference path never comes here: [`crate::telemetry::Recorder`] counts in memory and
//! whole windows are appended in batches ([`TelemetryCache::append`]), one sled record per call.
//!
//! # Upload batches and exactly-once
//!
//! The hub stores a `TelemetryBatch` once per `(device, sequence)`. So a batch's sequence is
//! assigned when the batch is first formed, and the formed batch is persisted in the `outbox` tree
//! (and flushed) before [`TelemetryCache::pending`] returns it. Until [`TelemetryCache::acknowledge`]
//! removes it, every call to `pending` — after a timeout, a crash or a reboot — returns that same
//! batch with the same sequence, and no new batch is formed. Forming a batch *moves* its windows out
//! of the `records` tree, so they can never be sent under two sequences.
//!
//! A fresh cache (first start, or after a quarantine) starts its sequences at a random 62-bit base:
//! the hub remembers the sequences of the device's earlier cache and would silently discard a new
//! batch that reused one, and a new cache cannot know which were used.
//!
//! # Size accounting and the cap
//!
//! The cap bounds a logical size: the sum of key and value bytes of every queued record and of the
//! outbox batch (the small `meta` record is not counted). It is recomputed by the scan at open and
//! kept in memory, so it is exact and deterministic — unlike sled's `size_on_disk`, which lags
//! behind writes and includes log overhead. Expect the directory to take a small multiple of it.
//!
//! When an append takes the cache over the cap:
//! 1. above [`ROLLUP_PERCENT`] of the cap, hourly windows of the same (model, version, UTC day) in
//!    the queue are merged into one daily window (counts and latency buckets add); merging loses
//!    resolution but no inference, and is counted separately from drops. The first roll-up after
//!    open reads every record; later ones read the records appended since and those sharing a day
//!    with them, and a roll-up holds about a megabyte of records decoded at a time;
//! 2. while still over the cap, the oldest queued windows are dropped, one window at a time;
//! 3. only if the queue is empty and the outbox batch alone is over the cap, windows are removed
//!    from the outbox batch (oldest first) and added to *its* `dropped_records`. The batch keeps
//!    its sequence: whichever version of it reaches the hub first accounts for every window
//!    exactly once, either as a window or as a drop.
//!
//! Every dropped window is counted once: drops from the queue go into the `dropped_records` of the
//! next batch formed, and all drops into [`CacheStats::dropped_total`]; both counters are persisted
//! in the same transaction as the drop.
//!
//! # Corruption
//!
//! [`TelemetryCache::open`] decodes every record. If sled reports corruption, panics, or a record
//! does not decode, or the database has lost data, the directory is moved aside to `<dir>.quarantined-<unix time>`, an empty cache
//! is created in its place and the [`Quarantine`] is returned for the agent to report. Errors that
//! say nothing about the data (the directory is locked by another process, permissions, a full
//! disk) are returned as [`CacheError::Open`] and nothing is moved. A record found unreadable
//! later (in `pending` or while enforcing the cap) is deleted and its windows counted as dropped;
//! the count is known because the open scan indexed every record.
//!
//! sled takes a damaged log file for a torn write and silently recovers an older state, or an
//! empty one. An older state would hand out sequences the hub has already seen, so the cache keeps
//! a high-water mark outside sled (`sequence-floor`, written atomically after each batch is
//! formed): a database that comes back empty, or with its next sequence below the mark, is
//! quarantined like an unreadable one.
//!
//! # Captured samples
//!
//! Sealed capture samples (`samples.rs`) wait in a tree of their own until the hub acknowledges
//! them, under the same cap: telemetry and samples together stay within it. Samples yield to
//! telemetry: a telemetry append over the cap drops the oldest samples before any window, and a
//! sample that does not fit beside the telemetry held is dropped; each drop is counted
//! (persisted) and reported with the next upload of samples.
//!
//! Every method blocks on disk I/O (`append`, `pending` and `acknowledge` flush); async callers use
//! `spawn_blocking`.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use outpost_protocol::device::{InferenceWindow, ShadowCounts, ShadowReport};
use outpost_protocol::drift::DriftSummary;
use outpost_protocol::trust::ManifestRef;
use outpost_protocol::Sha256;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

mod index;
mod records;
mod rollup;
mod samples;

use index::*;
use records::*;
use rollup::*;
use samples::SampleQueue;
pub use samples::{QueuedSample, SampleAppend};

/// Above this share of the cap, hourly windows are rolled up into daily ones before any drop.
pub const ROLLUP_PERCENT: u64 = 80;

const DAY_SECS: u64 = 86_400;
const META_KEY: &[u8] = b"meta";
const OUTBOX_KEY: &[u8] = b"batch";
/// How long [`TelemetryCache::open`] waits for sled's file lock: `LOCK_ATTEMPTS` × `LOCK_RETRY`.
const LOCK_ATTEMPTS: u32 = 20;
const LOCK_RETRY: std::time::Duration = std::time::Duration::from_millis(100);
/// A file beside sled's own, holding the cache's next sequence as of the last batch formed.
const SEQUENCE_FLOOR: &str = "sequence-floor";

/// Why the cache failed. Drops and quarantines are outcomes, reported as values, not errors.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// sled could not open the directory for a reason that says nothing about the data in it
    /// (locked by another process, permissions, disk full); nothing was moved.
    #[error("cannot open telemetry cache {path}: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: sled::Error,
    },
    /// The directory was unreadable and could not be moved aside.
    #[error("cannot quarantine unreadable telemetry cache {path} to {moved_to}: {source}")]
    Quarantine {
        path: PathBuf,
        moved_to: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("telemetry cache database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("cannot encode {tree} record: {reason}")]
    Encode { tree: &'static str, reason: String },
    /// An acknowledgement for a batch that is not the one in the outbox (a stale or foreign ack).
    #[error("acknowledged telemetry batch {acknowledged} is not the pending batch ({pending:?})")]
    NotPending {
        acknowledged: u64,
        pending: Option<u64>,
    },
}

/// The previous cache directory was unreadable and was moved aside; the agent reports this.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantine {
    pub moved_to: PathBuf,
    pub reason: String,
}

/// What one [`TelemetryCache::append`] did to make room.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AppendOutcome {
    pub appended_windows: u64,
    /// Hourly windows merged away into daily windows (no inference lost).
    pub merged_windows: u64,
    /// Windows dropped under the cap, oldest first.
    pub dropped_windows: u64,
    /// Queued records the roll-up read and decoded: 0 below [`ROLLUP_PERCENT`] of the cap; after
    /// the first roll-up since open, only the new records and those holding windows of their days.
    pub rolled_up_records: u64,
}

/// What [`TelemetryCache::refused`] did with a batch the hub will never take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its drift summaries and shadow reports were removed; the batch is sent again with its
    /// counters.
    DriftStripped,
    /// It was dropped; its windows count as dropped.
    Dropped { windows: u64 },
}

/// One upload batch; becomes a `TelemetryBatch` with the same three fields.
#[derive(Debug, Clone, PartialEq)]
pub struct PendingBatch {
    /// The idempotency sequence: the same for every resend until acknowledged.
    pub sequence: u64,
    pub windows: Vec<InferenceWindow>,
    /// Windows dropped under the cap since the previous batch was formed.
    pub dropped_records: u64,
    /// The cache records the batch was formed from, oldest first, for logs.
    pub keys: Vec<u64>,
}

/// The cache's numbers, for `outpost-agent status`, check-ins and `/metrics`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheStats {
    /// Logical bytes held: queued records and the outbox batch (see the module docs).
    pub queue_bytes: u64,
    pub cap_bytes: u64,
    /// Windows held, in the queue and in the outbox batch.
    pub queued_windows: u64,
    /// The sequence of the batch awaiting acknowledgement, if one was formed.
    pub pending_sequence: Option<u64>,
    /// Windows dropped since the last batch was formed; they go into the next one.
    pub dropped_since_batch: u64,
    /// Every window this cache has dropped, since it was created.
    pub dropped_total: u64,
    /// Every hourly window merged into a daily one, since the cache was created.
    pub merged_total: u64,
    /// Sealed capture samples held, and their logical bytes (also under `cap_bytes`).
    pub queued_samples: u64,
    pub sample_bytes: u64,
}

/// Why an open attempt failed: the data is unreadable (quarantine it) or something else is wrong.
enum OpenFailure {
    Unreadable(String),
    Fatal(CacheError),
}

/// The agent's on-disk telemetry queue. See the module docs for the rules it keeps.
#[derive(Debug)]
pub struct TelemetryCache {
    dir: PathBuf,
    db: sled::Db,
    records: sled::Tree,
    outbox: sled::Tree,
    meta: sled::Tree,
    /// Sealed capture samples, under the same cap (see `samples.rs`).
    captures: sled::Tree,
    cap_bytes: u64,
    state: Mutex<State>,
    /// Locked after `state` when both are held.
    samples: Mutex<SampleQueue>,
}

impl TelemetryCache {
    /// Opens (or creates) the cache in `dir`, bounded by `cap_bytes` of logical size. An
    /// unreadable cache is moved aside and replaced by an empty one; the returned [`Quarantine`]
    /// says where it went and why.
    pub fn open(
        dir: &Path,
        cap_bytes: u64,
    ) -> Result<(TelemetryCache, Option<Quarantine>), CacheError> {
        let reason = match TelemetryCache::try_open_waiting_for_lock(dir, cap_bytes) {
            Ok(cache) => return Ok((cache, None)),
            Err(OpenFailure::Fatal(error)) => return Err(error),
            Err(OpenFailure::Unreadable(reason)) => reason,
        };
        let moved_to = quarantine_path(dir);
        if let Err(source) = std::fs::rename(dir, &moved_to) {
            return Err(CacheError::Quarantine {
                path: dir.to_owned(),
                moved_to,
                source,
            });
        }
        log::error!(
            "telemetry cache {} is unreadable ({reason}); moved it to {} and started an empty cache",
            dir.display(),
            moved_to.display()
        );
        match TelemetryCache::try_open(dir, cap_bytes) {
            Ok(cache) => Ok((cache, Some(Quarantine { moved_to, reason }))),
            Err(OpenFailure::Fatal(error)) => Err(error),
            Err(OpenFailure::Unreadable(reason)) => Err(CacheError::Open {
                path: dir.to_owned(),
                source: sled::Error::Unsupported(format!("a new cache is unreadable: {reason}")),
            }),
        }
    }

    /// sled 0.34 releases its file lock only when its last in-flight write finishes on an I/O
    /// thread, which can be just after the previous handle was dropped: a restart within the same
    /// process (or a quick reopen) waits briefly for it. Another live process keeps the lock, and
    /// after the wait its error is returned.
    fn try_open_waiting_for_lock(
        dir: &Path,
        cap_bytes: u64,
    ) -> Result<TelemetryCache, OpenFailure> {
        let mut attempts_left = LOCK_ATTEMPTS;
        loop {
            match TelemetryCache::try_open(dir, cap_bytes) {
                Err(OpenFailure::Fatal(CacheError::Open {
                    source: sled::Error::Io(io_error),
                    ..
                })) if attempts_left > 1 && io_error.to_string().contains("acquire lock") => {
                    attempts_left -= 1;
                    std::thread::sleep(LOCK_RETRY);
                }
                other => return other,
            }
        }
    }

    fn try_open(dir: &Path, cap_bytes: u64) -> Result<TelemetryCache, OpenFailure> {
        // sled 0.34 can panic on some damaged files instead of returning an error; that is a
        // verdict on the data, and must not take inference down with it.
        match catch_unwind(AssertUnwindSafe(|| {
            TelemetryCache::open_and_scan(dir, cap_bytes)
        })) {
            Ok(result) => result,
            Err(panic) => {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|text| (*text).to_owned())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "unknown panic".to_owned());
                Err(OpenFailure::Unreadable(format!(
                    "sled panicked while opening: {message}"
                )))
            }
        }
    }

    fn open_and_scan(dir: &Path, cap_bytes: u64) -> Result<TelemetryCache, OpenFailure> {
        let sled_failure = |source: sled::Error| match &source {
            sled::Error::Io(io_error)
                if !matches!(
                    io_error.kind(),
                    io::ErrorKind::InvalidData | io::ErrorKind::UnexpectedEof
                ) =>
            {
                OpenFailure::Fatal(CacheError::Open {
                    path: dir.to_owned(),
                    source,
                })
            }
            _ => OpenFailure::Unreadable(format!("sled: {source}")),
        };
        let db = sled::Config::new().path(dir).open().map_err(sled_failure)?;
        let records = db.open_tree("records").map_err(sled_failure)?;
        let outbox = db.open_tree("outbox").map_err(sled_failure)?;
        let meta = db.open_tree("meta").map_err(sled_failure)?;
        let captures = db.open_tree("captures").map_err(sled_failure)?;
        let mut samples = SampleQueue::default();
        for entry in captures.iter() {
            let (key, value) = entry.map_err(sled_failure)?;
            samples
                .scan(&key, &value)
                .map_err(OpenFailure::Unreadable)?;
        }

        let mut index = BTreeMap::new();
        let mut total_bytes = 0u64;
        for entry in records.iter() {
            let (key, value) = entry.map_err(sled_failure)?;
            let key_number = record_key(&key).map_err(OpenFailure::Unreadable)?;
            let windows = decode::<StoredRecord>("records", &value)
                .map_err(OpenFailure::Unreadable)?
                .into_windows();
            let info = RecordInfo::new((key.len() + value.len()) as u64, &windows);
            total_bytes += info.bytes;
            index.insert(key_number, info);
        }
        let outbox_info = match outbox.get(OUTBOX_KEY).map_err(sled_failure)? {
            None => None,
            Some(value) => {
                let OutboxParts {
                    sequence,
                    dropped_records,
                    windows,
                    keys: _,
                } = decode::<StoredOutbox>("outbox", &value)
                    .map_err(OpenFailure::Unreadable)?
                    .into_parts();
                let info = OutboxInfo {
                    sequence,
                    dropped_records,
                    windows: windows.len() as u64,
                    bytes: (OUTBOX_KEY.len() + value.len()) as u64,
                };
                total_bytes += info.bytes;
                Some(info)
            }
        };
        let stored_meta = match meta.get(META_KEY).map_err(sled_failure)? {
            Some(value) => {
                let StoredMeta::V1(meta) =
                    decode("meta", &value).map_err(OpenFailure::Unreadable)?;
                Some(meta)
            }
            None => None,
        };
        let floor = read_sequence_floor(dir)?;
        match (&stored_meta, floor) {
            (None, Some(floor)) => {
                return Err(OpenFailure::Unreadable(format!(
                    "the database lost its data: it is empty, but batches up to {} were formed",
                    floor.saturating_sub(1)
                )))
            }
            (Some(meta), Some(floor)) if meta.next_sequence < floor => {
                return Err(OpenFailure::Unreadable(format!(
                    "the database rolled back: its next sequence is {}, but batches up to {} were \
                     formed",
                    meta.next_sequence,
                    floor - 1
                )))
            }
            _ => {}
        }
        let mut meta_record = match stored_meta {
            Some(meta) => meta,
            None if index.is_empty() && outbox_info.is_none() => MetaV1 {
                next_record: 0,
                next_sequence: random_sequence_base(),
                dropped_since_batch: 0,
                dropped_total: 0,
                merged_total: 0,
            },
            None => {
                return Err(OpenFailure::Unreadable(
                    "records without a meta record".to_owned(),
                ))
            }
        };
        // Counters behind the data they number can only come from damage; moving them past it
        // keeps keys and sequences unique, which is all they are for.
        if let Some((&last, _)) = index.last_key_value() {
            meta_record.next_record = meta_record.next_record.max(last.saturating_add(1));
        }
        if let Some(info) = &outbox_info {
            meta_record.next_sequence = meta_record
                .next_sequence
                .max(info.sequence.saturating_add(1));
        }
        let cache = TelemetryCache {
            dir: dir.to_owned(),
            records,
            outbox,
            meta,
            captures,
            cap_bytes,
            samples: Mutex::new(samples),
            state: Mutex::new(State {
                index,
                outbox: outbox_info,
                meta: meta_record,
                total_bytes,
                rolled_through: None,
            }),
            db,
        };
        // Persist the sequence base of a new cache (and any repaired counter) before use.
        let change = Change::new(&cache.lock());
        cache
            .commit(change)
            .and_then(|()| cache.flush())
            .map_err(|error| match error {
                CacheError::Sled(source) => sled_failure(source),
                other => OpenFailure::Fatal(other),
            })?;
        let next_sequence = cache.lock().meta.next_sequence;
        write_sequence_floor(dir, next_sequence).map_err(OpenFailure::Fatal)?;
        Ok(cache)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Makes every write so far durable.
    pub fn flush(&self) -> Result<(), CacheError> {
        self.db.flush()?;
        Ok(())
    }

    /// Stores `windows` as one record, then makes room under the cap (roll-up, then drops of the
    /// oldest windows) and flushes. Windows within a record are kept oldest first.
    pub fn append(&self, windows: &[InferenceWindow]) -> Result<AppendOutcome, CacheError> {
        if windows.is_empty() {
            return Ok(AppendOutcome::default());
        }
        let mut stored: Vec<StoredWindow> = windows.iter().map(StoredWindow::from_wire).collect();
        stored.sort_by_key(|window| window.start);
        let state = self.lock();
        let mut change = Change::new(&state);
        let key = change.state.meta.next_record;
        change.state.meta.next_record = key.saturating_add(1);
        change.put_record(key, encode_record(&stored)?, &stored);
        // Captured samples yield to telemetry: the oldest go before any window does.
        self.evict_samples_for(change.state.total_bytes)?;
        let outcome = self.enforce_cap(&mut change)?;
        self.commit_locked(state, change)?;
        self.flush()?;
        if outcome.dropped_windows > 0 {
            log::warn!(
                "telemetry cache over its cap of {} bytes: dropped the {} oldest windows",
                self.cap_bytes,
                outcome.dropped_windows
            );
        }
        Ok(AppendOutcome {
            appended_windows: stored.len() as u64,
            ..outcome
        })
    }

    /// The batch to upload: the outbox batch if one awaits acknowledgement (whatever the limits
    /// are now), else a new batch of the oldest windows, at most `max_windows` of them and at most
    /// about `max_bytes` of stored window (but always at least one window), persisted and flushed
    /// under a new sequence before it is returned. `None` when there is nothing to report: no
    /// windows and no drops. Callers choose the limits so that a batch fits the `TelemetryBatch`
    /// frame cap (a window without drift encodes to well under 200 bytes; its drift summary is
    /// counted at its stored size).
    pub fn pending(
        &self,
        max_windows: usize,
        max_bytes: usize,
    ) -> Result<Option<PendingBatch>, CacheError> {
        let state = self.lock();
        if let Some(info) = state.outbox {
            return self.read_outbox(state, info).map(Some);
        }
        let max_windows = max_windows.max(1);
        let mut change = Change::new(&state);
        let mut taken: Vec<StoredWindow> = Vec::new();
        let mut keys = Vec::new();
        let mut unreadable_windows = 0u64;
        let mut taken_bytes = 0usize;
        let queued: Vec<(u64, RecordInfo)> = state
            .index
            .iter()
            .map(|(key, info)| (*key, *info))
            .collect();
        for (key, info) in queued {
            if taken.len() >= max_windows || taken_bytes >= max_bytes {
                break;
            }
            let Some(mut windows) = self.read_record(&change, key)? else {
                change.remove_record(key);
                unreadable_windows += info.windows;
                continue;
            };
            let mut room = 0;
            for window in windows.iter().take(max_windows - taken.len()) {
                let size = window.stored_size();
                if (!taken.is_empty() || room > 0) && taken_bytes + size > max_bytes {
                    break;
                }
                taken_bytes += size;
                room += 1;
            }
            if room == 0 {
                break;
            }
            keys.push(key);
            if windows.len() <= room {
                change.remove_record(key);
            } else {
                let rest = windows.split_off(room);
                change.put_record(key, encode_record(&rest)?, &rest);
            }
            taken.append(&mut windows);
        }
        let meta = &mut change.state.meta;
        meta.dropped_total = meta.dropped_total.saturating_add(unreadable_windows);
        let dropped_records = meta.dropped_since_batch.saturating_add(unreadable_windows);
        if taken.is_empty() && dropped_records == 0 {
            return Ok(None);
        }
        let sequence = meta.next_sequence;
        meta.next_sequence = sequence.saturating_add(1);
        meta.dropped_since_batch = 0;
        change.put_outbox(sequence, dropped_records, &taken, &keys)?;
        // Forming the batch moves bytes around; the cap still holds for the result.
        let dropped_now = self.enforce_cap(&mut change)?.dropped_windows;
        let outbox_now = change.state.outbox;
        let next_sequence = change.state.meta.next_sequence;
        self.commit_locked(state, change)?;
        self.flush()?;
        // The mark only guards against a later rollback; the batch itself is already durable.
        if let Err(error) = write_sequence_floor(&self.dir, next_sequence) {
            log::warn!("{error}; a rollback of the telemetry cache may go unnoticed");
        }
        if dropped_now > 0 {
            log::warn!("telemetry cache over its cap: dropped {dropped_now} windows");
        }
        let Some(info) = outbox_now else {
            return Ok(None);
        };
        let state = self.lock();
        self.read_outbox(state, info).map(Some)
    }

    /// The hub has stored batch `sequence`: removes it from the outbox, so the next
    /// [`TelemetryCache::pending`] forms a new batch.
    pub fn acknowledge(&self, sequence: u64) -> Result<(), CacheError> {
        let state = self.lock();
        let pending = state.outbox.map(|info| info.sequence);
        if pending != Some(sequence) {
            return Err(CacheError::NotPending {
                acknowledged: sequence,
                pending,
            });
        }
        // Everything written before the ack is made durable before anything is deleted.
        self.flush()?;
        let mut change = Change::new(&state);
        change.remove_outbox();
        self.commit_locked(state, change)?;
        self.flush()
    }

    /// The hub refused batch `sequence` outright (a 4xx: it will never take it as it is). A batch
    /// carrying drift summaries or shadow reports loses them and keeps its sequence and counters,
    /// so one summary or report the hub cannot use does not cost the inference counts; a batch without any is dropped, its
    /// windows counted as dropped and reported with the next batch. Either way the queue moves on.
    pub fn refused(&self, sequence: u64) -> Result<Refusal, CacheError> {
        let state = self.lock();
        let Some(info) = state.outbox.filter(|info| info.sequence == sequence) else {
            return Err(CacheError::NotPending {
                acknowledged: sequence,
                pending: state.outbox.map(|info| info.sequence),
            });
        };
        let parts = match self.outbox.get(OUTBOX_KEY)? {
            Some(value) => decode::<StoredOutbox>("outbox", &value)
                .ok()
                .map(StoredOutbox::into_parts),
            None => None,
        };
        let mut change = Change::new(&state);
        let outcome = match parts {
            Some(mut parts)
                if parts
                    .windows
                    .iter()
                    .any(|window| window.drift.is_some() || window.shadow.is_some()) =>
            {
                for window in &mut parts.windows {
                    window.drift = None;
                    window.shadow = None;
                }
                change.put_outbox(
                    parts.sequence,
                    parts.dropped_records,
                    &parts.windows,
                    &parts.keys,
                )?;
                Refusal::DriftStripped
            }
            _ => {
                change.remove_outbox();
                let meta = &mut change.state.meta;
                meta.dropped_total = meta.dropped_total.saturating_add(info.windows);
                // The drops this batch carried are reported again with the next one.
                meta.dropped_since_batch = meta
                    .dropped_since_batch
                    .saturating_add(info.windows)
                    .saturating_add(info.dropped_records);
                Refusal::Dropped {
                    windows: info.windows,
                }
            }
        };
        self.commit_locked(state, change)?;
        self.flush()?;
        Ok(outcome)
    }

    pub fn stats(&self) -> CacheStats {
        let state = self.lock();
        let queued: u64 = state.index.values().map(|info| info.windows).sum();
        let samples = samples::lock(&self.samples);
        CacheStats {
            queued_samples: samples.len(),
            sample_bytes: samples.bytes(),
            queue_bytes: state.total_bytes,
            cap_bytes: self.cap_bytes,
            queued_windows: queued + state.outbox.map_or(0, |info| info.windows),
            pending_sequence: state.outbox.map(|info| info.sequence),
            dropped_since_batch: state.meta.dropped_since_batch,
            dropped_total: state.meta.dropped_total,
            merged_total: state.meta.merged_total,
        }
    }

    /// Reads the outbox batch. An unreadable one is replaced, under the same sequence, by a batch
    /// that reports its windows as dropped (see the module docs on why that is still exactly once).
    fn read_outbox(
        &self,
        state: MutexGuard<'_, State>,
        info: OutboxInfo,
    ) -> Result<PendingBatch, CacheError> {
        let decoded = match self.outbox.get(OUTBOX_KEY)? {
            Some(value) => decode::<StoredOutbox>("outbox", &value),
            None => Err("outbox batch is missing".to_owned()),
        };
        match decoded.map(StoredOutbox::into_parts) {
            Ok(OutboxParts {
                sequence,
                dropped_records,
                windows,
                keys,
            }) => Ok(PendingBatch {
                sequence,
                windows: windows.into_iter().map(StoredWindow::into_wire).collect(),
                dropped_records,
                keys,
            }),
            Err(reason) => {
                log::error!(
                    "telemetry batch {} is unreadable ({reason}); reporting its {} windows as dropped",
                    info.sequence,
                    info.windows
                );
                let dropped_records = info.dropped_records.saturating_add(info.windows);
                let mut change = Change::new(&state);
                change.put_outbox(info.sequence, dropped_records, &[], &[])?;
                let meta = &mut change.state.meta;
                meta.dropped_total = meta.dropped_total.saturating_add(info.windows);
                self.commit_locked(state, change)?;
                self.flush()?;
                Ok(PendingBatch {
                    sequence: info.sequence,
                    windows: Vec::new(),
                    dropped_records,
                    keys: Vec::new(),
                })
            }
        }
    }

    /// A queued record's windows as `change` would leave them; `None` if unreadable (logged).
    fn read_record(
        &self,
        change: &Change,
        key: u64,
    ) -> Result<Option<Vec<StoredWindow>>, CacheError> {
        let decoded = match change.records.get(&key) {
            Some(Some(value)) => decode::<StoredRecord>("records", value),
            Some(None) => return Ok(None),
            None => match self.records.get(key.to_be_bytes())? {
                Some(value) => decode::<StoredRecord>("records", &value),
                None => Err("record is missing".to_owned()),
            },
        };
        match decoded {
            Ok(record) => Ok(Some(record.into_windows())),
            Err(reason) => {
                log::error!("telemetry record {key} is unreadable ({reason}); dropping it");
                Ok(None)
            }
        }
    }

    /// Brings `change` under the cap (module docs, "Size accounting and the cap"). Returns the
    /// windows merged and dropped (both also added to the persisted counters in `change`) and the
    /// records the roll-up read; `appended_windows` is left 0.
    fn enforce_cap(&self, change: &mut Change) -> Result<AppendOutcome, CacheError> {
        let cap = self.cap_bytes;
        let mut merged = 0u64;
        let mut dropped = 0u64;
        let mut rolled_up_records = 0u64;
        if u128::from(change.state.total_bytes) * 100 > u128::from(cap) * u128::from(ROLLUP_PERCENT)
        {
            let rolled = self.roll_up(change)?;
            merged += rolled.merged;
            dropped += rolled.unreadable;
            rolled_up_records = rolled.records_read;
        }
        while change.state.total_bytes > cap {
            let Some((&key, &info)) = change.state.index.iter().next() else {
                break;
            };
            let excess = change.state.total_bytes - cap;
            if info.bytes <= excess {
                change.remove_record(key);
                dropped += info.windows;
                continue;
            }
            let Some(mut windows) = self.read_record(change, key)? else {
                change.remove_record(key);
                dropped += info.windows;
                continue;
            };
            // Drop this record's oldest windows until what is left fits.
            loop {
                if windows.is_empty() {
                    change.remove_record(key);
                    break;
                }
                windows.remove(0);
                dropped += 1;
                if windows.is_empty() {
                    change.remove_record(key);
                    break;
                }
                let value = encode_record(&windows)?;
                let bytes = 8 + value.len() as u64;
                if change.state.total_bytes - info.bytes + bytes <= cap {
                    change.put_record(key, value, &windows);
                    break;
                }
            }
        }
        let meta = &mut change.state.meta;
        meta.dropped_since_batch = meta.dropped_since_batch.saturating_add(dropped);
        meta.dropped_total = meta.dropped_total.saturating_add(dropped);
        meta.merged_total = meta.merged_total.saturating_add(merged);
        let from_outbox = self.shrink_outbox(change)?;
        Ok(AppendOutcome {
            appended_windows: 0,
            merged_windows: merged,
            dropped_windows: dropped + from_outbox,
            rolled_up_records,
        })
    }

    /// Last resort when the outbox batch alone is over the cap: moves its oldest windows into its
    /// own `dropped_records`, keeping its sequence.
    fn shrink_outbox(&self, change: &mut Change) -> Result<u64, CacheError> {
        let cap = self.cap_bytes;
        let Some(info) = change.state.outbox else {
            return Ok(0);
        };
        if change.state.total_bytes <= cap || info.windows == 0 {
            return Ok(0);
        }
        let (mut windows, keys) = match &change.outbox {
            Some(Some(value)) => match decode::<StoredOutbox>("outbox", value) {
                Ok(outbox) => {
                    let parts = outbox.into_parts();
                    (parts.windows, parts.keys)
                }
                Err(_) => (Vec::new(), Vec::new()),
            },
            Some(None) => return Ok(0),
            None => match self
                .outbox
                .get(OUTBOX_KEY)?
                .map(|value| decode::<StoredOutbox>("outbox", &value))
            {
                Some(Ok(outbox)) => {
                    let parts = outbox.into_parts();
                    (parts.windows, parts.keys)
                }
                _ => (Vec::new(), Vec::new()),
            },
        };
        let removed = loop {
            // An unreadable outbox arrives here empty: all of its windows are reported as dropped.
            if !windows.is_empty() {
                windows.remove(0);
            }
            let removed = info.windows.saturating_sub(windows.len() as u64);
            change.put_outbox(
                info.sequence,
                info.dropped_records.saturating_add(removed),
                &windows,
                &keys,
            )?;
            if windows.is_empty() || change.state.total_bytes <= cap {
                break removed;
            }
        };
        let meta = &mut change.state.meta;
        meta.dropped_total = meta.dropped_total.saturating_add(removed);
        log::warn!(
            "telemetry batch {} alone is over the cap of {cap} bytes: reporting {removed} of its windows as dropped",
            info.sequence
        );
        Ok(removed)
    }

    /// Merges queued windows of the same (model, version, UTC day) into the oldest of them.
    ///
    /// Only records a roll-up has not seen yet can add a window to a group, and every other window
    /// of that group starts on the same day: so after the first roll-up since open, a roll-up
    /// reads the new records and the older ones whose days overlap theirs, not the whole queue.
    /// Near the cap an append comes every telemetry flush; reading the whole queue each time cost
    /// seconds of CPU and hundreds of MiB per append on a full 64 MiB cache.
    fn roll_up(&self, change: &mut Change) -> Result<RollUp, CacheError> {
        let index = &change.state.index;
        let unseen_from = change
            .state
            .rolled_through
            .map_or(0, |key| key.saturating_add(1));
        let unseen_days = DaySpans::new(index.range(unseen_from..).map(|(_, info)| info.days));
        let queued: Vec<(u64, RecordInfo)> = index
            .iter()
            .filter(|(key, info)| **key >= unseen_from || unseen_days.overlaps(&info.days))
            .map(|(key, info)| (*key, *info))
            .collect();
        let records_read = queued.len() as u64;
        let mut pass = RollUpPass::default();
        let mut unreadable = 0u64;
        for (key, info) in queued {
            if pass.held_bytes >= ROLLUP_HELD_BYTES {
                // Records are appended in time order, so a later record rarely shares a day with
                // any but the last few: let go of the others, which bounds the memory of a pass.
                pass.release(change, |held| held.days.last >= info.days.first)?;
            }
            let Some(windows) = self.read_record(change, key)? else {
                change.remove_record(key);
                unreadable += info.windows;
                continue;
            };
            pass.add(key, info, windows);
        }
        pass.release(change, |_| false)?;
        let merged = pass.merged;
        if merged > 0 {
            log::info!(
                "telemetry cache near its cap: rolled {merged} hourly windows into daily ones"
            );
        }
        // Every key so far was either read above or holds no day of an unseen record.
        change.state.rolled_through = change.state.meta.next_record.checked_sub(1);
        Ok(RollUp {
            merged,
            unreadable,
            records_read,
        })
    }

    fn commit_locked(
        &self,
        mut state: MutexGuard<'_, State>,
        change: Change,
    ) -> Result<(), CacheError> {
        self.write(&change)?;
        *state = change.state;
        Ok(())
    }

    fn commit(&self, change: Change) -> Result<(), CacheError> {
        let state = self.lock();
        self.commit_locked(state, change)
    }

    /// Writes `change` in one transaction over the three trees: records, outbox and counters move
    /// together or not at all.
    fn write(&self, change: &Change) -> Result<(), CacheError> {
        let meta_bytes = encode("meta", &StoredMeta::V1(change.state.meta.clone()))?;
        let result: Result<(), TransactionError<CacheError>> =
            (&self.records, &self.outbox, &self.meta).transaction(|(records, outbox, meta)| {
                for (key, value) in &change.records {
                    match value {
                        Some(value) => {
                            records.insert(&key.to_be_bytes(), value.as_slice())?;
                        }
                        None => {
                            records.remove(&key.to_be_bytes())?;
                        }
                    }
                }
                match &change.outbox {
                    Some(Some(value)) => {
                        outbox.insert(OUTBOX_KEY, value.as_slice())?;
                    }
                    Some(None) => {
                        outbox.remove(OUTBOX_KEY)?;
                    }
                    None => {}
                }
                meta.insert(META_KEY, meta_bytes.as_slice())?;
                Ok::<(), ConflictableTransactionError<CacheError>>(())
            });
        result.map_err(|error| match error {
            TransactionError::Abort(inner) => inner,
            TransactionError::Storage(inner) => CacheError::Sled(inner),
        })
    }
}

/// The high-water mark of sequences handed out, if one was written; unparseable counts as damage.
fn read_sequence_floor(dir: &Path) -> Result<Option<u64>, OpenFailure> {
    let path = dir.join(SEQUENCE_FLOOR);
    match std::fs::read(&path) {
        Ok(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .map(Some)
            .ok_or_else(|| OpenFailure::Unreadable(format!("{} is unreadable", path.display()))),
        Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(source) => Err(OpenFailure::Fatal(CacheError::Io { path, source })),
    }
}

/// Replaces the high-water mark atomically: temp file, fsync, rename, fsync of the directory.
fn write_sequence_floor(dir: &Path, next_sequence: u64) -> Result<(), CacheError> {
    let path = dir.join(SEQUENCE_FLOOR);
    let temp = dir.join(format!("{SEQUENCE_FLOOR}.tmp"));
    let io_error = |source| CacheError::Io {
        path: path.clone(),
        source,
    };
    {
        use std::io::Write;
        let mut file = std::fs::File::create(&temp).map_err(io_error)?;
        file.write_all(format!("{next_sequence}\n").as_bytes())
            .map_err(io_error)?;
        file.sync_all().map_err(io_error)?;
    }
    std::fs::rename(&temp, &path).map_err(io_error)?;
    std::fs::File::open(dir)
        .and_then(|directory| directory.sync_all())
        .map_err(io_error)
}

/// `<dir>.quarantined-<unix time>`, with a counter if that exists already.
fn quarantine_path(dir: &Path) -> PathBuf {
    let base = format!(
        "{}.quarantined-{}",
        dir.file_name()
            .map_or_else(|| "telemetry".into(), |name| name.to_string_lossy()),
        crate::unix_now()
    );
    let parent = dir.parent().unwrap_or_else(|| Path::new("."));
    let mut candidate = parent.join(&base);
    let mut attempt = 1u32;
    while candidate.exists() {
        candidate = parent.join(format!("{base}-{attempt}"));
        attempt += 1;
    }
    candidate
}

/// A random start for a new cache's sequences, below 2^62 so it can count up for ever.
fn random_sequence_base() -> u64 {
    let mut bytes = [0u8; 8];
    match getrandom::getrandom(&mut bytes) {
        Ok(()) => (u64::from_le_bytes(bytes) >> 2).max(1),
        // Without randomness, the clock is the next best way to avoid an old cache's sequences.
        Err(_) => crate::unix_now().saturating_mul(1_000_000).max(1),
    }
}

#[cfg(test)]
mod tests;
