//! The hub's embedded store: sled `=0.34.7` in the data directory, behind this one module.
//!
//! Handlers never see sled. They call the domain operations below, each of which is atomic (a
//! sled transaction where it spans trees), and [`Store::flush`] before acknowledging anything a
//! client must be able to rely on after a crash. A second backend would implement the same
//! operations.
//!
//! Telemetry ingest is the exception, and the hot path: in sled 0.34 a transaction stops every
//! other read and write in the process while it runs (a process-wide lock), which serialised the
//! hub's ingest. So [`Store::ingest_telemetry`] is exactly-once without one: each record a batch
//! adds to carries the sequence of the last batch applied to it and is updated by
//! compare-and-swap, and the batch's idempotency key is written last.
//!
//! Records are the hub's own storage types, serialized with postcard and converted by hand from
//! wire types, so the device protocol can evolve without rewriting stored data.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::BTreeMap;

use outpost_protocol::device::{ShadowCounts, ShadowReport};
use outpost_protocol::drift::DriftSummary;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::{IVec, Transactional};

use crate::api::{Decision, Role, RolloutState};

/// Why the store failed. Distinct from refusals, which operations return as values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sled(#[from] sled::Error),
    #[error("stored {tree} record is unreadable: {reason}")]
    Corrupt { tree: &'static str, reason: String },
    #[error("cannot encode {tree} record: {reason}")]
    Encode { tree: &'static str, reason: String },
}

impl From<TransactionError<StoreError>> for StoreError {
    fn from(error: TransactionError<StoreError>) -> StoreError {
        match error {
            TransactionError::Abort(inner) => inner,
            TransactionError::Storage(inner) => StoreError::Sled(inner),
        }
    }
}

type Result<T> = std::result::Result<T, StoreError>;

/// Encodes a record into a buffer of its exact size: measuring first costs a pass over the value
/// and saves growing the buffer (several reallocations and copies for a 7 KB drift record).
fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>> {
    let fail = |error: postcard::Error| StoreError::Encode {
        tree,
        reason: error.to_string(),
    };
    let len = postcard::experimental::serialized_size(value).map_err(fail)?;
    postcard::to_extend(value, Vec::with_capacity(len)).map_err(fail)
}

fn decode<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
        tree,
        reason: error.to_string(),
    })
}

fn abort(error: StoreError) -> ConflictableTransactionError<StoreError> {
    ConflictableTransactionError::Abort(error)
}

/// An admin API token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created: u64,
}

/// An enrollment token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub labels: Vec<(String, String)>,
    pub expires: u64,
    pub uses_left: u32,
    pub created: u64,
}

/// A model a device runs, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRecord {
    pub name: String,
    pub version: u64,
    pub manifest_sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: [u8; 16],
    pub public_key: [u8; 32],
    pub arch: String,
    pub agent_version: String,
    pub labels: Vec<(String, String)>,
    pub enrolled_at: u64,
    pub revoked: bool,
    pub last_checkin: Option<u64>,
    /// `steady`, `downloading`, `probation` or `degraded`, as last reported.
    pub state: String,
    pub active: Option<RunningRecord>,
    pub plan_sequence: Option<u64>,
    pub dropped_records: u64,
    pub queue_bytes: u64,
}

/// A device record as read from the store, with the bytes it came from: what
/// [`Store::update_device`] compares against before it writes.
#[derive(Debug, Clone)]
pub struct DeviceRead {
    pub record: DeviceRecord,
    /// The last telemetry batch applied to the record, kept as stored.
    applied: Option<u64>,
    stored: IVec,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub at: u64,
    pub kind: String,
    pub plan_sequence: Option<u64>,
    pub model: Option<(String, u64)>,
    pub detail: String,
}

/// A device's latest result for a plan's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub kind: OutcomeKind,
    pub at: u64,
    pub reason: String,
}

/// What a device's latest result for a plan's target was.
///
/// This field was a `committed: bool` before shadow stages; postcard writes a bool as one byte 0
/// or 1 and an enum's variant as a varint index, so `Failed` and `Committed` must stay the first
/// two variants, in this order, for outcome records stored before to read back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutcomeKind {
    Failed,
    Committed,
    /// Runs the target in shadow after passing its validation set.
    Shadowing,
}

/// Inference counters of one device on one model version.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRecord {
    pub count: u64,
    pub errors: u64,
    pub latency_buckets: Vec<u64>,
}

impl StatsRecord {
    pub fn add(&mut self, count: u64, errors: u64, buckets: &[u64]) {
        self.count = self.count.saturating_add(count);
        self.errors = self.errors.saturating_add(errors);
        if self.latency_buckets.len() < buckets.len() {
            self.latency_buckets.resize(buckets.len(), 0);
        }
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(buckets) {
            *mine = mine.saturating_add(*theirs);
        }
    }
}

/// One inference window of a telemetry batch, as ingested.
#[derive(Debug, Clone, PartialEq)]
pub struct WindowInput {
    pub model: String,
    pub version: u64,
    /// The window's start and end, Unix seconds.
    pub start: u64,
    pub end: u64,
    pub count: u64,
    pub errors: u64,
    pub latency_buckets: Vec<u64>,
    /// The window's drift summary, already validated against its version's profile.
    pub drift: Option<DriftSummary>,
    /// The window's shadow comparisons, already validated.
    pub shadow: Option<ShadowReport>,
}

/// What [`Store::ingest_telemetry`] did with a batch.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ingested {
    /// The batch was new and is stored.
    Stored,
    /// The batch had been stored before; nothing was added.
    Duplicate,
    /// A drift summary of window `window` (its index in the batch) does not merge with what is
    /// stored or with another part of the batch; nothing of the batch was stored.
    Refused { window: usize, reason: String },
    /// The batch is not stored and a later batch of its device, `highest`, is: a device's
    /// sequences only increase, so the batch is refused and nothing of it is stored. (Only a batch
    /// racing a later one of its device, which an agent cannot send, may have added to some
    /// records before the later one was found.)
    OutOfOrder { highest: u64 },
}

/// One device's drift summary of one model version over one window, as stored: every part the
/// device uploaded for that window, merged.
///
/// The summary is kept as its protocol frame, which carries its own format version: the protocol
/// already promises to read its frames, and a hand-made copy of a summary's twenty-odd fields
/// would only be a second format to keep in step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftRecord {
    /// `outpost_protocol::encode` of the merged [`DriftSummary`]. Serialized as bytes, which
    /// postcard writes exactly as the sequence of `u8` it was before (a length, then the bytes),
    /// but copies whole instead of one element at a time: it is read and written on every batch.
    #[serde(with = "serde_bytes")]
    pub frame: Vec<u8>,
    /// How many uploads were merged into it.
    pub parts: u64,
    /// Unix second of the last upload merged in.
    pub updated: u64,
}

/// A stored root as (version, signed bytes).
fn root_entry(entry: sled::Result<(IVec, IVec)>) -> Result<(u64, Vec<u8>)> {
    let (key, value) = entry?;
    let version = <[u8; 8]>::try_from(key.as_ref())
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt {
            tree: "roots",
            reason: "bad key".into(),
        })?;
    Ok((version, value.to_vec()))
}

/// A record telemetry batches add to (stats, drift, shadow, device), as stored since batches are
/// applied record by record: the record's own postcard encoding followed by the sequence of the
/// last batch of its device added into it (postcard writes a struct's fields one after another
/// with nothing around them).
///
/// Records written before carry no sequence: their bytes are the record alone. Reading one as an
/// `Applied` runs out of bytes where the sequence would start, so [`decode_applied`] reads it in the
/// old form, with no batch known to be applied: every batch stored before has its idempotency key,
/// which is checked first. A hub of the previous version reads the new form too, since postcard
/// ignores bytes after a value.
#[derive(Serialize, Deserialize)]
struct Applied<R> {
    record: R,
    /// Sequence of the last batch of the record's device added into it.
    sequence: u64,
}

/// Reads a record telemetry batches add to, in either form, with the sequence of the last batch
/// known to be added into it.
fn decode_applied<T: DeserializeOwned>(
    tree: &'static str,
    bytes: &[u8],
) -> Result<(T, Option<u64>)> {
    match postcard::from_bytes::<Applied<T>>(bytes) {
        Ok(applied) => Ok((applied.record, Some(applied.sequence))),
        Err(_) => Ok((decode(tree, bytes)?, None)),
    }
}

/// [`decode_applied`] for a reader, which needs no sequence.
fn decode_applied_record<T: DeserializeOwned>(tree: &'static str, bytes: &[u8]) -> Result<T> {
    decode_applied(tree, bytes).map(|(record, _)| record)
}

/// Writes a record telemetry batches add to; with no batch applied, in the old form.
fn encode_applied<T: Serialize>(
    tree: &'static str,
    record: &T,
    sequence: Option<u64>,
) -> Result<Vec<u8>> {
    match sequence {
        Some(sequence) => encode(tree, &Applied { record, sequence }),
        None => encode(tree, record),
    }
}

/// `device sequence`, the idempotency key of a telemetry batch; a device's keys are in sequence
/// order.
fn telemetry_seen_key(device: &[u8; 16], sequence: u64) -> Vec<u8> {
    [device.as_slice(), &sequence.to_be_bytes()].concat()
}

/// Why a telemetry batch stopped before its idempotency key was written.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Stop {
    /// A record carries batch `highest` of the same device, later than this one.
    Overtaken { highest: u64 },
    /// A drift summary does not merge; see [`Ingested::Refused`].
    Refused { window: usize, reason: String },
}

/// What a telemetry batch makes of one record, worked out from the record as stored.
enum Plan {
    /// These bytes replace the record read.
    Write(Vec<u8>),
    /// Nothing to write: the batch was added before, or there is nothing to add to.
    Leave,
    Stop(Stop),
}

/// The plan for a record that carries a batch at or after `sequence`, if it does.
fn plan_if_applied(applied: Option<u64>, sequence: u64) -> Option<Plan> {
    match applied {
        Some(applied) if applied == sequence => Some(Plan::Leave),
        Some(applied) if applied > sequence => {
            Some(Plan::Stop(Stop::Overtaken { highest: applied }))
        }
        _ => None,
    }
}

/// One stored record a telemetry batch adds to, with what it adds.
enum BatchRecord<'a> {
    /// A window's drift summary: the batch's parts of it (with their index in the batch), and the
    /// merged record worked out from `read`, the record as read (none for a new window).
    Drift {
        key: Vec<u8>,
        parts: Vec<(usize, &'a DriftSummary)>,
        read: Option<IVec>,
        planned: Vec<u8>,
    },
    /// A model version's counters and the windows that add to them.
    Stats {
        key: Vec<u8>,
        windows: Vec<&'a WindowInput>,
    },
    /// A window's shadow comparisons and the reports that add to them.
    Shadow {
        key: Vec<u8>,
        reports: Vec<&'a ShadowReport>,
    },
    /// The device record's count of windows the device dropped.
    Dropped { count: u64 },
}

/// Writes `key` by compare-and-swap: `plan` works out the new record from the stored one, and
/// works it out again whenever another writer changed the record in between.
fn apply_record(
    tree: &sled::Tree,
    key: &[u8],
    mut plan: impl FnMut(Option<&IVec>) -> Result<Plan>,
) -> Result<std::result::Result<(), Stop>> {
    let read = tree.get(key)?;
    let planned = plan(read.as_ref())?;
    apply_planned(tree, key, read, planned, plan)
}

/// [`apply_record`] with the first plan already worked out from `read`.
fn apply_planned(
    tree: &sled::Tree,
    key: &[u8],
    mut read: Option<IVec>,
    mut planned: Plan,
    mut plan: impl FnMut(Option<&IVec>) -> Result<Plan>,
) -> Result<std::result::Result<(), Stop>> {
    loop {
        let bytes = match planned {
            Plan::Write(bytes) => bytes,
            Plan::Leave => return Ok(Ok(())),
            Plan::Stop(stop) => return Ok(Err(stop)),
        };
        match tree.compare_and_swap(key, read.as_ref(), Some(bytes))? {
            Ok(()) => return Ok(Ok(())),
            Err(conflict) => {
                read = conflict.current;
                planned = plan(read.as_ref())?;
            }
        }
    }
}

/// Merges the batch's `parts` of one window into the drift record `current` (none for a new
/// window) and encodes the result, unless the record has the batch already. A part that does not
/// merge stops the batch, naming its window.
fn plan_drift(
    current: Option<&IVec>,
    parts: &[(usize, &DriftSummary)],
    sequence: u64,
    now: u64,
) -> Result<Plan> {
    let mut merged: Option<(DriftSummary, u64)> = match current {
        None => None,
        Some(bytes) => {
            let (record, applied) = decode_applied::<DriftRecord>("drift", bytes)?;
            if let Some(plan) = plan_if_applied(applied, sequence) {
                return Ok(plan);
            }
            let summary =
                outpost_protocol::decode::<DriftSummary>(&record.frame).map_err(|error| {
                    StoreError::Corrupt {
                        tree: "drift",
                        reason: error.to_string(),
                    }
                })?;
            Some((summary, record.parts))
        }
    };
    let mut last_window = 0;
    for &(window, summary) in parts {
        last_window = window;
        merged = Some(match merged {
            None => (summary.clone(), 1),
            Some((mut stored, n_parts)) => {
                if let Err(error) = stored.merge(summary) {
                    return Ok(Plan::Stop(Stop::Refused {
                        window,
                        reason: format!(
                            "drift summary does not merge with the parts of its window stored \
                             before: {error}"
                        ),
                    }));
                }
                (stored, n_parts.saturating_add(1))
            }
        });
    }
    let Some((summary, n_parts)) = merged else {
        return Ok(Plan::Leave);
    };
    let frame = match outpost_protocol::encode(&summary) {
        Ok(frame) => frame,
        Err(error) => {
            return Ok(Plan::Stop(Stop::Refused {
                window: last_window,
                reason: format!("merged drift summary: {error}"),
            }))
        }
    };
    let record = DriftRecord {
        frame,
        parts: n_parts,
        updated: now,
    };
    Ok(Plan::Write(encode_applied(
        "drift",
        &record,
        Some(sequence),
    )?))
}

/// A stored drift summary with the device and window it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDrift {
    pub device: [u8; 16],
    pub window_start: u64,
    pub window_end: u64,
    pub parts: u64,
    pub summary: DriftSummary,
}

/// One device's shadow comparisons of one target manifest with one active model version over
/// one window, as stored: every part the device uploaded for that window, added up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowRecord {
    pub compared: u64,
    pub top1_agreed: u64,
    pub errors: u64,
    pub abs_diff_sum: f64,
    pub abs_diff_values: u64,
    pub dropped: u64,
    /// How many uploads were added into it.
    pub parts: u64,
}

impl ShadowRecord {
    /// The counts it holds, in the protocol's type, which alone knows how to add them.
    pub fn counts(&self) -> ShadowCounts {
        ShadowCounts {
            compared: self.compared,
            top1_agreed: self.top1_agreed,
            errors: self.errors,
            abs_diff_sum: self.abs_diff_sum,
            abs_diff_values: self.abs_diff_values,
            dropped: self.dropped,
        }
    }

    fn add(&mut self, report: &ShadowReport) {
        let mut counts = self.counts();
        counts.add(&report.counts);
        self.compared = counts.compared;
        self.top1_agreed = counts.top1_agreed;
        self.errors = counts.errors;
        self.abs_diff_sum = counts.abs_diff_sum;
        self.abs_diff_values = counts.abs_diff_values;
        self.dropped = counts.dropped;
        self.parts = self.parts.saturating_add(1);
    }
}

/// A stored shadow record with what it compared and when.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredShadow {
    pub device: [u8; 16],
    pub window_start: u64,
    pub window_end: u64,
    /// The model that served while the target ran in shadow.
    pub active: (String, u64),
    pub record: ShadowRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub signed: Vec<u8>,
    pub sha256: [u8; 32],
    pub published_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub sequence: u64,
    pub signed_plan: Vec<u8>,
    pub state: RolloutState,
    pub stage_index: usize,
    pub stage_started: Vec<u64>,
    pub decisions: Vec<Decision>,
    pub created: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Why an enrollment token could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired,
    UsedUp,
}

fn manifest_key(name: &str, version: u64) -> Vec<u8> {
    [name.as_bytes(), &[0], &version.to_be_bytes()].concat()
}

fn stats_key(device: &[u8; 16], name: &str, version: u64) -> Vec<u8> {
    [
        device.as_slice(),
        name.as_bytes(),
        &[0],
        &version.to_be_bytes(),
    ]
    .concat()
}

/// `name \0 version`: every drift key of one model version starts with it.
fn drift_prefix(name: &str, version: u64) -> Vec<u8> {
    [name.as_bytes(), &[0], &version.to_be_bytes()].concat()
}

/// `name \0 version window_end window_start device`. The window's end comes first so that the
/// summaries overlapping a time range `(since, now]` are one range scan: every key from `since + 1`
/// on. Parts of one device's window share a key and merge.
fn drift_key(
    name: &str,
    version: u64,
    window_end: u64,
    window_start: u64,
    device: &[u8; 16],
) -> Vec<u8> {
    [
        drift_prefix(name, version).as_slice(),
        &window_end.to_be_bytes(),
        &window_start.to_be_bytes(),
        device.as_slice(),
    ]
    .concat()
}

/// The window end, window start and device of a drift key, given its prefix's length.
fn parse_drift_key(key: &[u8], prefix_len: usize) -> Option<(u64, u64, [u8; 16])> {
    let rest = key.get(prefix_len..)?;
    if rest.len() != 32 {
        return None;
    }
    let end = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let start = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    let device = rest.get(16..32)?.try_into().ok()?;
    Some((end, start, device))
}

/// `target manifest sha256, window_end, window_start, device, active name \0 active version`.
/// Like drift keys, the window's end comes first so that the comparisons of one target over a
/// time range are one range scan. Parts of one window from one device share a key and add.
fn shadow_key(
    target: &[u8; 32],
    window: (u64, u64),
    device: &[u8; 16],
    active: (&str, u64),
) -> Vec<u8> {
    [
        target.as_slice(),
        &window.1.to_be_bytes(),
        &window.0.to_be_bytes(),
        device.as_slice(),
        active.0.as_bytes(),
        &[0],
        &active.1.to_be_bytes(),
    ]
    .concat()
}

/// The stored shadow record `record` under `key`: the key names its window, device and active
/// model.
fn parse_shadow_key(key: &[u8], record: ShadowRecord) -> Option<StoredShadow> {
    let end = u64::from_be_bytes(key.get(32..40)?.try_into().ok()?);
    let start = u64::from_be_bytes(key.get(40..48)?.try_into().ok()?);
    let device = key.get(48..64)?.try_into().ok()?;
    let active = key.get(64..)?;
    let split = active.len().checked_sub(9)?;
    let name = std::str::from_utf8(active.get(..split)?).ok()?;
    let version = u64::from_be_bytes(active.get(split + 1..)?.try_into().ok()?);
    Some(StoredShadow {
        device,
        window_start: start,
        window_end: end,
        active: (name.to_owned(), version),
        record,
    })
}

const AUDIT_HEAD: &[u8] = b"audit_head";

/// The last audit entry's sequence number and hash, kept beside the log.
pub type AuditHead = (u64, [u8; 32]);

/// The hub's state on disk.
#[derive(Debug, Clone)]
pub struct Store {
    db: sled::Db,
    admin_tokens: sled::Tree,
    enroll_tokens: sled::Tree,
    devices: sled::Tree,
    events: sled::Tree,
    outcomes: sled::Tree,
    stats: sled::Tree,
    /// Drift summaries under [`drift_key`].
    drift: sled::Tree,
    /// Shadow comparisons under [`shadow_key`].
    shadow: sled::Tree,
    telemetry_seen: sled::Tree,
    roots: sled::Tree,
    manifests: sled::Tree,
    rollouts: sled::Tree,
    audit: sled::Tree,
    meta: sled::Tree,
    /// Serialises flushes; see [`Store::flush`].
    flush_lock: Arc<tokio::sync::Mutex<()>>,
    /// Flushes begun so far, and the number of the last one that finished.
    flushes_begun: Arc<AtomicU64>,
    flush_done: Arc<AtomicU64>,
    /// The highest root version stored, so that a check-in from a device that already trusts it
    /// (nearly every check-in) does not search the `roots` tree. Raised after the root is written.
    newest_root: Arc<AtomicU64>,
}

impl Store {
    /// Opens (or creates) the store under `dir/db`.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .flush_every_ms(Some(200))
            .open()?;
        let tree = |name: &str| db.open_tree(name);
        let roots = tree("roots")?;
        let newest_root = match roots.last()? {
            Some(entry) => root_entry(Ok(entry))?.0,
            None => 0,
        };
        Ok(Store {
            admin_tokens: tree("admin_tokens")?,
            enroll_tokens: tree("enroll_tokens")?,
            devices: tree("devices")?,
            events: tree("events")?,
            outcomes: tree("outcomes")?,
            stats: tree("stats")?,
            drift: tree("drift")?,
            shadow: tree("shadow")?,
            telemetry_seen: tree("telemetry_seen")?,
            roots,
            manifests: tree("manifests")?,
            rollouts: tree("rollouts")?,
            audit: tree("audit")?,
            meta: tree("meta")?,
            db,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            flushes_begun: Arc::new(AtomicU64::new(0)),
            flush_done: Arc::new(AtomicU64::new(0)),
            newest_root: Arc::new(AtomicU64::new(newest_root)),
        })
    }

    /// Makes every write so far durable. Called before acknowledging a write to a client.
    ///
    /// One flush runs at a time. sled 0.34.7 deadlocks when several `flush_async` calls run at
    /// once (spacejam/sled#1308, fixed only on sled's unreleased main; by our reading each one
    /// blocks a thread of sled's small I/O pool waiting for a log write queued behind them on that
    /// same pool), which hung the hub under 16 concurrent telemetry clients. Serialising them also groups them: a caller that finds a flush begun
    /// after it arrived, and finished, is covered by it, since sled's flush covers every write
    /// made before it began.
    pub async fn flush(&self) -> Result<()> {
        let begun_before_arrival = self.flushes_begun.load(Ordering::SeqCst);
        let _guard = self.flush_lock.lock().await;
        if self.flush_done.load(Ordering::SeqCst) > begun_before_arrival {
            return Ok(());
        }
        let number = self.flushes_begun.fetch_add(1, Ordering::SeqCst) + 1;
        self.db.flush_async().await?;
        self.flush_done.store(number, Ordering::SeqCst);
        Ok(())
    }

    /// Blocking flush, for shutdown and for commands outside the server.
    pub fn flush_blocking(&self) -> Result<()> {
        self.db.flush()?;
        Ok(())
    }

    // Admin tokens.

    pub fn admin_token(&self, token_hash: &[u8; 32]) -> Result<Option<AdminTokenRecord>> {
        self.admin_tokens
            .get(token_hash)?
            .map(|bytes| decode("admin_tokens", &bytes))
            .transpose()
    }

    pub fn insert_admin_token(
        &self,
        token_hash: &[u8; 32],
        record: &AdminTokenRecord,
    ) -> Result<()> {
        self.admin_tokens
            .insert(token_hash, encode("admin_tokens", record)?)?;
        Ok(())
    }

    pub fn admin_token_count(&self) -> usize {
        self.admin_tokens.len()
    }

    // Enrollment.

    pub fn insert_enroll_token(
        &self,
        token_hash: &[u8; 32],
        record: &EnrollTokenRecord,
    ) -> Result<()> {
        self.enroll_tokens
            .insert(token_hash, encode("enroll_tokens", record)?)?;
        Ok(())
    }

    pub fn enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        self.enroll_tokens
            .iter()
            .values()
            .map(|bytes| decode("enroll_tokens", &bytes?))
            .collect()
    }

    /// Uses one count of an enrollment token and stores the new device, atomically: a token with
    /// one use left enrolls exactly one device however many try at once. `make_device` receives the
    /// token's labels.
    pub fn enroll(
        &self,
        token_hash: &[u8; 32],
        now: u64,
        make_device: impl Fn(&EnrollTokenRecord) -> DeviceRecord,
        event: &EventRecord,
    ) -> Result<std::result::Result<DeviceRecord, TokenRefusal>> {
        let event_id = self.db.generate_id()?;
        let outcome = (&self.enroll_tokens, &self.devices, &self.events).transaction(
            |(tokens, devices, events)| {
                let Some(bytes) = tokens.get(token_hash)? else {
                    return Ok(Err(TokenRefusal::Unknown));
                };
                let mut token: EnrollTokenRecord =
                    decode("enroll_tokens", &bytes).map_err(abort)?;
                if token.expires <= now {
                    return Ok(Err(TokenRefusal::Expired));
                }
                if token.uses_left == 0 {
                    return Ok(Err(TokenRefusal::UsedUp));
                }
                token.uses_left -= 1;
                tokens.insert(token_hash, encode("enroll_tokens", &token).map_err(abort)?)?;
                let device = make_device(&token);
                devices.insert(
                    &device.id,
                    encode_applied("devices", &device, None).map_err(abort)?,
                )?;
                let event_key = [device.id.as_slice(), &event_id.to_be_bytes()].concat();
                events.insert(event_key, encode("events", event).map_err(abort)?)?;
                Ok(Ok(device))
            },
        )?;
        Ok(outcome)
    }

    // Devices.

    pub fn device(&self, id: &[u8; 16]) -> Result<Option<DeviceRecord>> {
        Ok(self.device_read(id)?.map(|read| read.record))
    }

    /// A device's record with the stored bytes it was decoded from, for [`Store::update_device`].
    pub fn device_read(&self, id: &[u8; 16]) -> Result<Option<DeviceRead>> {
        self.devices
            .get(id)?
            .map(|stored| {
                let (record, applied) = decode_applied::<DeviceRecord>("devices", &stored)?;
                Ok(DeviceRead {
                    record,
                    applied,
                    stored,
                })
            })
            .transpose()
    }

    /// Applies `change` to a device's record and writes it by compare-and-swap against the bytes
    /// `read` came from. When another writer got in between (a revocation, a label change,
    /// telemetry counting dropped records, another check-in), `change` is applied again to the
    /// record as it now stands, so nobody's change is lost: a check-in never undoes a revocation.
    /// Returns the record written; `None` if the device's record is gone.
    pub fn update_device(
        &self,
        read: DeviceRead,
        change: impl Fn(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>> {
        let DeviceRead {
            mut record,
            applied,
            stored,
        } = read;
        let id = record.id;
        change(&mut record);
        let first = Plan::Write(encode_applied("devices", &record, applied)?);
        let mut written = Some(record);
        // Never stops: the plans only write or, for a record that is gone, leave.
        let _ = apply_planned(&self.devices, &id, Some(stored), first, |current| {
            let Some(bytes) = current else {
                written = None;
                return Ok(Plan::Leave);
            };
            let (mut record, applied) = decode_applied::<DeviceRecord>("devices", bytes)?;
            change(&mut record);
            let plan = Plan::Write(encode_applied("devices", &record, applied)?);
            written = Some(record);
            Ok(plan)
        })?;
        Ok(written)
    }

    /// Stores `device`, except its `dropped_records`, which telemetry batches count into the
    /// stored record. Tests set up records with it; handlers change records with
    /// [`Store::update_device`].
    #[cfg(test)]
    pub fn put_device(&self, device: &DeviceRecord) -> Result<()> {
        let mut read = self.devices.get(device.id)?;
        loop {
            let (dropped_records, applied) = match &read {
                Some(bytes) => {
                    let (stored, applied) = decode_applied::<DeviceRecord>("devices", bytes)?;
                    (stored.dropped_records, applied)
                }
                None => (device.dropped_records, None),
            };
            let record = DeviceRecord {
                dropped_records,
                ..device.clone()
            };
            let bytes = encode_applied("devices", &record, applied)?;
            match self
                .devices
                .compare_and_swap(device.id, read.as_ref(), Some(bytes))?
            {
                Ok(()) => return Ok(()),
                Err(conflict) => read = conflict.current,
            }
        }
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices
            .iter()
            .values()
            .map(|bytes| decode_applied_record("devices", &bytes?))
            .collect()
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn add_event(&self, device: &[u8; 16], event: &EventRecord) -> Result<()> {
        let key = [device.as_slice(), &self.db.generate_id()?.to_be_bytes()].concat();
        self.events.insert(key, encode("events", event)?)?;
        Ok(())
    }

    /// A device's events, oldest first, at most the `limit` newest.
    pub fn events(&self, device: &[u8; 16], limit: usize) -> Result<Vec<EventRecord>> {
        let mut events = self
            .events
            .scan_prefix(device)
            .values()
            .rev()
            .take(limit)
            .map(|bytes| decode("events", &bytes?))
            .collect::<Result<Vec<EventRecord>>>()?;
        events.reverse();
        Ok(events)
    }

    /// Stores a status report: the device's outcome for the plan (when it is one) and the event,
    /// atomically.
    /// Stores a status report: the device's outcome in a plan, the event, and, for a committed
    /// model, what the device now runs (so the fleet view does not wait for its next check-in).
    pub fn record_status(
        &self,
        device: &[u8; 16],
        plan_sequence: Option<u64>,
        outcome: Option<&OutcomeRecord>,
        event: &EventRecord,
        now_running: Option<&RunningRecord>,
    ) -> Result<()> {
        let event_key = [device.as_slice(), &self.db.generate_id()?.to_be_bytes()].concat();
        (&self.outcomes, &self.events, &self.devices).transaction(
            |(outcomes, events, devices)| {
                if let (Some(sequence), Some(outcome)) = (plan_sequence, outcome) {
                    let key = [sequence.to_be_bytes().as_slice(), device.as_slice()].concat();
                    outcomes.insert(key, encode("outcomes", outcome).map_err(abort)?)?;
                }
                if let Some(running) = now_running {
                    if let Some(bytes) = devices.get(device)? {
                        let (mut record, applied) =
                            decode_applied::<DeviceRecord>("devices", &bytes).map_err(abort)?;
                        record.active = Some(running.clone());
                        devices.insert(
                            device.as_slice(),
                            encode_applied("devices", &record, applied).map_err(abort)?,
                        )?;
                    }
                }
                events.insert(
                    event_key.as_slice(),
                    encode("events", event).map_err(abort)?,
                )?;
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Every device's outcome for a plan.
    pub fn outcomes(&self, plan_sequence: u64) -> Result<Vec<([u8; 16], OutcomeRecord)>> {
        self.outcomes
            .scan_prefix(plan_sequence.to_be_bytes())
            .map(|entry| {
                let (key, value) = entry?;
                let device = key
                    .get(8..24)
                    .and_then(|id| <[u8; 16]>::try_from(id).ok())
                    .ok_or(StoreError::Corrupt {
                        tree: "outcomes",
                        reason: "short key".into(),
                    })?;
                Ok((device, decode("outcomes", &value)?))
            })
            .collect()
    }

    // Telemetry.

    /// Stores a telemetry batch exactly once, without a transaction, so that batches of different
    /// devices (and every other request) run side by side.
    ///
    /// Each record the batch adds to (a model version's counters, a window's drift summary, a
    /// window's shadow comparisons, the device record's dropped count) is updated on its own by
    /// compare-and-swap and carries the sequence of the last batch of its device added into it;
    /// a record that already carries this batch's sequence is left alone. The idempotency key
    /// `(device, sequence)` is written last. A crash between two records therefore leaves a state
    /// that the device's resend completes, adding each record's share exactly once; until then the
    /// batch is not acknowledged.
    ///
    /// A device's sequences only increase (the agent forms batch n+1 after n is acknowledged and
    /// keeps a floor across cache quarantines), so a batch below one already stored for its device,
    /// and not itself stored, is refused as [`Ingested::OutOfOrder`]; the agent never sends one.
    ///
    /// A drift summary that does not merge (its counts would overflow) refuses the whole batch and
    /// nothing of it is written, not even its idempotency key: every drift merge is worked out from
    /// the records as read before anything is written. Only if another batch of the same device
    /// changes a window in between, which an agent cannot do, is that merge redone, and a refusal
    /// then may come after some records took the batch.
    pub fn ingest_telemetry(
        &self,
        device: &[u8; 16],
        sequence: u64,
        windows: &[WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<Ingested> {
        let seen_key = telemetry_seen_key(device, sequence);
        if self.telemetry_seen.get(&seen_key)?.is_some() {
            return Ok(Ingested::Duplicate);
        }
        if let Some(highest) = self.highest_sequence_above(device, sequence)? {
            // Unless a copy of this batch was stored since the check above.
            return self.stopped(Stop::Overtaken { highest }, &seen_key);
        }
        let records = match self.batch_records(device, sequence, windows, dropped_records, now)? {
            Ok(records) => records,
            Err(stop) => return self.stopped(stop, &seen_key),
        };
        for record in records {
            if let Err(stop) = self.apply_batch_record(device, sequence, now, record)? {
                return self.stopped(stop, &seen_key);
            }
        }
        // A copy of this batch that raced this one may have finished first; it took the
        // acknowledgement as new, so this one is the duplicate.
        let marked = self.telemetry_seen.compare_and_swap(
            &seen_key,
            None::<&[u8]>,
            Some(&now.to_be_bytes()[..]),
        )?;
        Ok(match marked {
            Ok(()) => Ingested::Stored,
            Err(_) => Ingested::Duplicate,
        })
    }

    /// The highest sequence of a batch of `device` stored above `sequence`, if there is one.
    fn highest_sequence_above(&self, device: &[u8; 16], sequence: u64) -> Result<Option<u64>> {
        let Some(next) = sequence.checked_add(1) else {
            return Ok(None);
        };
        let range = telemetry_seen_key(device, next)..=telemetry_seen_key(device, u64::MAX);
        let Some(entry) = self.telemetry_seen.range(range).next_back() else {
            return Ok(None);
        };
        let (key, _) = entry?;
        let highest = key
            .get(16..)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| StoreError::Corrupt {
                tree: "telemetry_seen",
                reason: "bad key".to_owned(),
            })?;
        Ok(Some(highest))
    }

    /// What to answer for a batch whose ingest stopped before its idempotency key was written.
    fn stopped(&self, stop: Stop, seen_key: &[u8]) -> Result<Ingested> {
        Ok(match stop {
            Stop::Refused { window, reason } => Ingested::Refused { window, reason },
            // A later batch of the device is stored, or applied to a record. If this batch is
            // stored too (a copy of it finished, then the device went on while this copy waited),
            // this is a resend; else it is out of order. Its key is read after the later batch's
            // trace, and was written before the device formed the later batch.
            Stop::Overtaken { highest } => {
                if self.telemetry_seen.get(seen_key)?.is_some() {
                    Ingested::Duplicate
                } else {
                    Ingested::OutOfOrder { highest }
                }
            }
        })
    }

    /// The records batch `sequence` adds to, with every drift merge worked out from the records
    /// as read, so that a summary that does not merge stops the batch before anything is written.
    fn batch_records<'a>(
        &self,
        device: &[u8; 16],
        sequence: u64,
        windows: &'a [WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<std::result::Result<Vec<BatchRecord<'a>>, Stop>> {
        let mut stats: BTreeMap<Vec<u8>, Vec<&WindowInput>> = BTreeMap::new();
        let mut drift: BTreeMap<Vec<u8>, Vec<(usize, &DriftSummary)>> = BTreeMap::new();
        let mut shadow: BTreeMap<Vec<u8>, Vec<&ShadowReport>> = BTreeMap::new();
        for (index, window) in windows.iter().enumerate() {
            stats
                .entry(stats_key(device, &window.model, window.version))
                .or_default()
                .push(window);
            if let Some(summary) = &window.drift {
                let key = drift_key(
                    &window.model,
                    window.version,
                    summary.window_end,
                    summary.window_start,
                    device,
                );
                drift.entry(key).or_default().push((index, summary));
            }
            if let Some(report) = &window.shadow {
                let key = shadow_key(
                    &report.target.manifest_sha256.0,
                    (window.start, window.end),
                    device,
                    (&window.model, window.version),
                );
                shadow.entry(key).or_default().push(report);
            }
        }
        let mut records = Vec::with_capacity(stats.len() + drift.len() + shadow.len() + 1);
        for (key, parts) in drift {
            let read = self.drift.get(&key)?;
            match plan_drift(read.as_ref(), &parts, sequence, now)? {
                Plan::Stop(stop) => return Ok(Err(stop)),
                Plan::Leave => {}
                Plan::Write(planned) => records.push(BatchRecord::Drift {
                    key,
                    parts,
                    read,
                    planned,
                }),
            }
        }
        records.extend(
            stats
                .into_iter()
                .map(|(key, windows)| BatchRecord::Stats { key, windows }),
        );
        records.extend(
            shadow
                .into_iter()
                .map(|(key, reports)| BatchRecord::Shadow { key, reports }),
        );
        if dropped_records > 0 {
            records.push(BatchRecord::Dropped {
                count: dropped_records,
            });
        }
        Ok(Ok(records))
    }

    /// Adds batch `sequence`'s share to one record, unless the record has it already.
    fn apply_batch_record(
        &self,
        device: &[u8; 16],
        sequence: u64,
        now: u64,
        record: BatchRecord<'_>,
    ) -> Result<std::result::Result<(), Stop>> {
        match record {
            BatchRecord::Drift {
                key,
                parts,
                read,
                planned,
            } => apply_planned(&self.drift, &key, read, Plan::Write(planned), |current| {
                plan_drift(current, &parts, sequence, now)
            }),
            BatchRecord::Stats { key, windows } => apply_record(&self.stats, &key, |current| {
                let (mut record, applied) = match current {
                    Some(bytes) => decode_applied::<StatsRecord>("stats", bytes)?,
                    None => (StatsRecord::default(), None),
                };
                if let Some(plan) = plan_if_applied(applied, sequence) {
                    return Ok(plan);
                }
                for window in &windows {
                    record.add(window.count, window.errors, &window.latency_buckets);
                }
                Ok(Plan::Write(encode_applied(
                    "stats",
                    &record,
                    Some(sequence),
                )?))
            }),
            BatchRecord::Shadow { key, reports } => apply_record(&self.shadow, &key, |current| {
                let (mut record, applied) = match current {
                    Some(bytes) => decode_applied::<ShadowRecord>("shadow", bytes)?,
                    None => (ShadowRecord::default(), None),
                };
                if let Some(plan) = plan_if_applied(applied, sequence) {
                    return Ok(plan);
                }
                for report in &reports {
                    record.add(report);
                }
                Ok(Plan::Write(encode_applied(
                    "shadow",
                    &record,
                    Some(sequence),
                )?))
            }),
            BatchRecord::Dropped { count } => apply_record(&self.devices, device, |current| {
                // A batch of a device no longer stored has nowhere to count its drops.
                let Some(bytes) = current else {
                    return Ok(Plan::Leave);
                };
                let (mut record, applied) = decode_applied::<DeviceRecord>("devices", bytes)?;
                if let Some(plan) = plan_if_applied(applied, sequence) {
                    return Ok(plan);
                }
                record.dropped_records = record.dropped_records.saturating_add(count);
                Ok(Plan::Write(encode_applied(
                    "devices",
                    &record,
                    Some(sequence),
                )?))
            }),
        }
    }

    /// Every device's drift summaries of one model version whose windows end after `since`, in
    /// the order of their windows' ends.
    pub fn drift_summaries(
        &self,
        name: &str,
        version: u64,
        since: u64,
    ) -> Result<Vec<StoredDrift>> {
        let prefix = drift_prefix(name, version);
        let from = [prefix.as_slice(), &since.saturating_add(1).to_be_bytes()].concat();
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: "drift",
            reason,
        };
        let mut summaries = Vec::new();
        for entry in self.drift.range(from..) {
            let (key, value) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (window_end, window_start, device) =
                parse_drift_key(&key, prefix.len()).ok_or_else(|| corrupt("bad key".to_owned()))?;
            let (record, _) = decode_applied::<DriftRecord>("drift", &value)?;
            let summary = outpost_protocol::decode::<DriftSummary>(&record.frame)
                .map_err(|error| corrupt(error.to_string()))?;
            summaries.push(StoredDrift {
                device,
                window_start,
                window_end,
                parts: record.parts,
                summary,
            });
        }
        Ok(summaries)
    }

    /// Every device's shadow comparisons of the target manifest `target` whose windows end after
    /// `since`, in the order of their windows' ends.
    pub fn shadow_reports(&self, target: &[u8; 32], since: u64) -> Result<Vec<StoredShadow>> {
        let from = [target.as_slice(), &since.saturating_add(1).to_be_bytes()].concat();
        let mut reports = Vec::new();
        for entry in self.shadow.range(from..) {
            let (key, value) = entry?;
            if !key.starts_with(target) {
                break;
            }
            let stored = parse_shadow_key(&key, decode_applied_record("shadow", &value)?)
                .ok_or_else(|| StoreError::Corrupt {
                    tree: "shadow",
                    reason: "bad key".to_owned(),
                })?;
            reports.push(stored);
        }
        Ok(reports)
    }

    /// A device's inference counters on one model version.
    pub fn stats(&self, device: &[u8; 16], name: &str, version: u64) -> Result<StatsRecord> {
        Ok(self
            .stats
            .get(stats_key(device, name, version))?
            .map(|bytes| decode_applied_record("stats", &bytes))
            .transpose()?
            .unwrap_or_default())
    }

    /// Every model version a device reported inferences for, with its counters.
    pub fn device_stats(&self, device: &[u8; 16]) -> Result<Vec<(String, u64, StatsRecord)>> {
        self.stats
            .scan_prefix(device)
            .map(|entry| {
                let (key, value) = entry?;
                let corrupt = || StoreError::Corrupt {
                    tree: "stats",
                    reason: "bad key".into(),
                };
                let rest = key.get(16..).ok_or_else(corrupt)?;
                let split = rest.len().checked_sub(9).ok_or_else(corrupt)?;
                let name = std::str::from_utf8(&rest[..split]).map_err(|_| corrupt())?;
                let version = <[u8; 8]>::try_from(&rest[split + 1..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt())?;
                Ok((
                    name.to_owned(),
                    version,
                    decode_applied_record("stats", &value)?,
                ))
            })
            .collect()
    }

    // Roots.

    pub fn put_root(&self, version: u64, signed: &[u8]) -> Result<()> {
        self.roots.insert(version.to_be_bytes(), signed)?;
        self.newest_root.fetch_max(version, Ordering::SeqCst);
        Ok(())
    }

    /// Every stored root, oldest first.
    pub fn roots(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.roots.iter().map(root_entry).collect()
    }

    /// Signed roots with a version above `version`, oldest first: what a device that trusts root
    /// `version` needs next (for a device up to date, nothing is read).
    pub fn roots_after(&self, version: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if version >= self.newest_root.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let Some(from) = version.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.roots
            .range(from.to_be_bytes()..)
            .map(root_entry)
            .collect()
    }

    // Manifests.

    pub fn put_manifest(&self, name: &str, version: u64, record: &ManifestRecord) -> Result<()> {
        self.manifests
            .insert(manifest_key(name, version), encode("manifests", record)?)?;
        Ok(())
    }

    pub fn manifest(&self, name: &str, version: u64) -> Result<Option<ManifestRecord>> {
        self.manifests
            .get(manifest_key(name, version))?
            .map(|bytes| decode("manifests", &bytes))
            .transpose()
    }

    /// Every version of every model, as (name, version, record), by name then version.
    pub fn manifests(&self) -> Result<Vec<(String, u64, ManifestRecord)>> {
        self.manifests
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let corrupt = || StoreError::Corrupt {
                    tree: "manifests",
                    reason: "bad key".into(),
                };
                let split = key.len().checked_sub(9).ok_or_else(corrupt)?;
                let name = std::str::from_utf8(&key[..split]).map_err(|_| corrupt())?;
                let version = <[u8; 8]>::try_from(&key[split + 1..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt())?;
                Ok((name.to_owned(), version, decode("manifests", &value)?))
            })
            .collect()
    }

    // Rollouts.

    pub fn put_rollout(&self, record: &RolloutRecord) -> Result<()> {
        self.rollouts
            .insert(record.sequence.to_be_bytes(), encode("rollouts", record)?)?;
        Ok(())
    }

    pub fn rollout(&self, sequence: u64) -> Result<Option<RolloutRecord>> {
        self.rollouts
            .get(sequence.to_be_bytes())?
            .map(|bytes| decode("rollouts", &bytes))
            .transpose()
    }

    /// Every rollout, oldest first.
    pub fn rollouts(&self) -> Result<Vec<RolloutRecord>> {
        self.rollouts
            .iter()
            .values()
            .map(|bytes| decode("rollouts", &bytes?))
            .collect()
    }

    // Audit log.

    /// Appends to the hash chain: `make` gets the previous entry's (seq, hash) and returns the new
    /// entry. The entry and the chain head are written in one transaction.
    pub fn append_audit(&self, make: impl Fn(u64, [u8; 32]) -> AuditRecord) -> Result<AuditRecord> {
        let record = (&self.audit, &self.meta).transaction(|(audit, meta)| {
            let (prev_seq, prev_hash) = match meta.get(AUDIT_HEAD)? {
                Some(bytes) => decode::<(u64, [u8; 32])>("meta", &bytes).map_err(abort)?,
                None => (0, [0u8; 32]),
            };
            let record = make(prev_seq, prev_hash);
            audit.insert(
                &record.seq.to_be_bytes(),
                encode("audit", &record).map_err(abort)?,
            )?;
            meta.insert(
                AUDIT_HEAD,
                encode("meta", &(record.seq, record.hash)).map_err(abort)?,
            )?;
            Ok(record)
        })?;
        Ok(record)
    }

    /// Audit entries with `seq > since`, oldest first, and the recorded chain head.
    pub fn audit_entries(&self, since: u64) -> Result<(Vec<AuditRecord>, Option<AuditHead>)> {
        let entries = self
            .audit
            .range((since.saturating_add(1)).to_be_bytes()..)
            .values()
            .map(|bytes| decode("audit", &bytes?))
            .collect::<Result<Vec<AuditRecord>>>()?;
        let head = self
            .meta
            .get(AUDIT_HEAD)?
            .map(|bytes| decode("meta", &bytes))
            .transpose()?;
        Ok((entries, head))
    }
}

#[cfg(test)]
mod tests {
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
        let mut summary =
            DriftSummary::new("demo", 1, Sha256([3; 32]), profile, start, start + 3600);
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
        assert_eq!(
            decode_applied::<DeviceRecord>("devices", &bytes).unwrap().1,
            Some(1)
        );
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
}
