//! The hub's embedded store: sled `=0.34.7` in the data directory, behind this one module.
//!
//! Handlers never see sled. They call the domain operations below, each of which is atomic (a
//! sled transaction where it spans trees), and [`Store::flush`] before acknowledging anything a
//! client must be able to rely on after a crash. A second backend would implement the same
//! operations.
//!
//! Records are the hub's own storage types, serialized with postcard and converted by hand from
//! wire types, so the device protocol can evolve without rewriting stored data.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::BTreeMap;

use outpost_protocol::device::ShadowReport;
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

fn encode<T: Serialize>(tree: &'static str, value: &T) -> Result<Vec<u8>> {
    postcard::to_stdvec(value).map_err(|error| StoreError::Encode {
        tree,
        reason: error.to_string(),
    })
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
}

/// One device's drift summary of one model version over one window, as stored: every part the
/// device uploaded for that window, merged.
///
/// The summary is kept as its protocol frame, which carries its own format version: the protocol
/// already promises to read its frames, and a hand-made copy of a summary's twenty-odd fields
/// would only be a second format to keep in step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftRecord {
    /// `outpost_protocol::encode` of the merged [`DriftSummary`].
    pub frame: Vec<u8>,
    /// How many uploads were merged into it.
    pub parts: u64,
    /// Unix second of the last upload merged in.
    pub updated: u64,
}

/// A window's drift summary while a batch is merged into the store.
struct MergedDrift {
    summary: DriftSummary,
    parts: u64,
    /// Index in the batch of the last window merged in, to name in a refusal.
    window: usize,
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

/// A window's merged drift record, ready to write if the part it was merged from is still there.
struct DriftWrite {
    key: Vec<u8>,
    /// The stored record the merge started from, as read; none for a new window.
    read: Option<IVec>,
    record: Vec<u8>,
}

/// Reads a stored drift record as the start of a merge for the batch's window `window`.
fn stored_drift_part(bytes: &[u8], window: usize) -> Result<MergedDrift> {
    let record: DriftRecord = decode("drift", bytes)?;
    let summary = outpost_protocol::decode::<DriftSummary>(&record.frame).map_err(|error| {
        StoreError::Corrupt {
            tree: "drift",
            reason: error.to_string(),
        }
    })?;
    Ok(MergedDrift {
        summary,
        parts: record.parts,
        window,
    })
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
    fn add(&mut self, report: &ShadowReport) {
        self.compared = self.compared.saturating_add(report.compared);
        self.top1_agreed = self.top1_agreed.saturating_add(report.top1_agreed);
        self.errors = self.errors.saturating_add(report.errors);
        self.abs_diff_sum += report.abs_diff_sum;
        self.abs_diff_values = self.abs_diff_values.saturating_add(report.abs_diff_values);
        self.dropped = self.dropped.saturating_add(report.dropped);
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
}

impl Store {
    /// Opens (or creates) the store under `dir/db`.
    pub fn open(dir: &Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(dir.join("db"))
            .flush_every_ms(Some(200))
            .open()?;
        let tree = |name: &str| db.open_tree(name);
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
            roots: tree("roots")?,
            manifests: tree("manifests")?,
            rollouts: tree("rollouts")?,
            audit: tree("audit")?,
            meta: tree("meta")?,
            db,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            flushes_begun: Arc::new(AtomicU64::new(0)),
            flush_done: Arc::new(AtomicU64::new(0)),
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
                devices.insert(&device.id, encode("devices", &device).map_err(abort)?)?;
                let event_key = [device.id.as_slice(), &event_id.to_be_bytes()].concat();
                events.insert(event_key, encode("events", event).map_err(abort)?)?;
                Ok(Ok(device))
            },
        )?;
        Ok(outcome)
    }

    // Devices.

    pub fn device(&self, id: &[u8; 16]) -> Result<Option<DeviceRecord>> {
        self.devices
            .get(id)?
            .map(|bytes| decode("devices", &bytes))
            .transpose()
    }

    pub fn put_device(&self, device: &DeviceRecord) -> Result<()> {
        self.devices.insert(device.id, encode("devices", device)?)?;
        Ok(())
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices
            .iter()
            .values()
            .map(|bytes| decode("devices", &bytes?))
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
                        let mut record: DeviceRecord = decode("devices", &bytes).map_err(abort)?;
                        record.active = Some(running.clone());
                        devices.insert(
                            device.as_slice(),
                            encode("devices", &record).map_err(abort)?,
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

    /// Stores a telemetry batch exactly once: the idempotency key `(device, sequence)`, the
    /// counters it adds, its drift summaries, each merged with the parts of the same window
    /// stored before, and its shadow comparisons, added likewise, are written in one transaction.
    /// A resent batch adds nothing. A drift summary
    /// that does not merge (its counts would overflow) refuses the whole batch, and nothing of it
    /// is written, not even its idempotency key.
    ///
    /// The merging (decoding the stored parts, adding, encoding) is the costly part, and sled
    /// runs one transaction at a time, so it is done before the transaction, from the parts as
    /// they were read. The transaction then only checks that every part it read is still the one
    /// stored and writes; if another batch of the same device changed one meanwhile, the merge is
    /// done again from the new part.
    pub fn ingest_telemetry(
        &self,
        device: &[u8; 16],
        sequence: u64,
        windows: &[WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<Ingested> {
        let seen_key = [device.as_slice(), &sequence.to_be_bytes()].concat();
        loop {
            if self.telemetry_seen.get(&seen_key)?.is_some() {
                return Ok(Ingested::Duplicate);
            }
            let merged = match self.merge_drift(device, windows, now)? {
                Ok(merged) => merged,
                Err(refused) => return Ok(refused),
            };
            let outcome = (
                &self.telemetry_seen,
                &self.stats,
                &self.devices,
                &self.drift,
                &self.shadow,
            )
                .transaction(|(seen, stats, devices, drift, shadow)| {
                    if seen.get(&seen_key)?.is_some() {
                        return Ok(Some(Ingested::Duplicate));
                    }
                    for part in &merged {
                        if drift.get(&part.key)? != part.read {
                            // Another batch of this device changed the window since it was read.
                            return Ok(None);
                        }
                    }
                    seen.insert(seen_key.as_slice(), &now.to_be_bytes())?;
                    for window in windows {
                        let key = stats_key(device, &window.model, window.version);
                        let mut record: StatsRecord = match stats.get(&key)? {
                            Some(bytes) => decode("stats", &bytes).map_err(abort)?,
                            None => StatsRecord::default(),
                        };
                        record.add(window.count, window.errors, &window.latency_buckets);
                        stats.insert(key, encode("stats", &record).map_err(abort)?)?;
                    }
                    for part in &merged {
                        drift.insert(part.key.as_slice(), part.record.as_slice())?;
                    }
                    let mut shadows: BTreeMap<Vec<u8>, ShadowRecord> = BTreeMap::new();
                    for window in windows {
                        let Some(report) = &window.shadow else {
                            continue;
                        };
                        let key = shadow_key(
                            &report.target.manifest_sha256.0,
                            (window.start, window.end),
                            device,
                            (&window.model, window.version),
                        );
                        let record = match shadows.remove(&key) {
                            Some(record) => record,
                            None => match shadow.get(&key)? {
                                Some(bytes) => decode("shadow", &bytes).map_err(abort)?,
                                None => ShadowRecord::default(),
                            },
                        };
                        shadows.entry(key).or_insert(record).add(report);
                    }
                    for (key, record) in shadows {
                        shadow.insert(key, encode("shadow", &record).map_err(abort)?)?;
                    }
                    if dropped_records > 0 {
                        if let Some(bytes) = devices.get(device)? {
                            let mut record: DeviceRecord =
                                decode("devices", &bytes).map_err(abort)?;
                            record.dropped_records =
                                record.dropped_records.saturating_add(dropped_records);
                            devices.insert(device, encode("devices", &record).map_err(abort)?)?;
                        }
                    }
                    Ok(Some(Ingested::Stored))
                })?;
            if let Some(outcome) = outcome {
                return Ok(outcome);
            }
        }
    }

    /// Merges a batch's drift summaries with the parts of their windows stored now, and encodes
    /// the records to write; a summary that does not merge refuses the batch.
    fn merge_drift(
        &self,
        device: &[u8; 16],
        windows: &[WindowInput],
        now: u64,
    ) -> Result<std::result::Result<Vec<DriftWrite>, Ingested>> {
        // Key → (the stored record as read, the merge so far).
        let mut merged: BTreeMap<Vec<u8>, (Option<IVec>, MergedDrift)> = BTreeMap::new();
        for (index, window) in windows.iter().enumerate() {
            let Some(summary) = &window.drift else {
                continue;
            };
            let key = drift_key(
                &window.model,
                window.version,
                summary.window_end,
                summary.window_start,
                device,
            );
            let (read, before) = match merged.remove(&key) {
                Some((read, part)) => (read, Some(part)),
                None => {
                    let read = self.drift.get(&key)?;
                    let part = read
                        .as_ref()
                        .map(|bytes| stored_drift_part(bytes, index))
                        .transpose()?;
                    (read, part)
                }
            };
            let part = match before {
                None => MergedDrift {
                    summary: summary.clone(),
                    parts: 1,
                    window: index,
                },
                Some(mut part) => {
                    if let Err(error) = part.summary.merge(summary) {
                        return Ok(Err(Ingested::Refused {
                            window: index,
                            reason: format!(
                                "drift summary does not merge with the parts of its window \
                                 stored before: {error}"
                            ),
                        }));
                    }
                    part.parts = part.parts.saturating_add(1);
                    part.window = index;
                    part
                }
            };
            merged.insert(key, (read, part));
        }
        let mut writes = Vec::with_capacity(merged.len());
        for (key, (read, part)) in merged {
            let frame = match outpost_protocol::encode(&part.summary) {
                Ok(frame) => frame,
                Err(error) => {
                    return Ok(Err(Ingested::Refused {
                        window: part.window,
                        reason: format!("merged drift summary: {error}"),
                    }))
                }
            };
            let record = DriftRecord {
                frame,
                parts: part.parts,
                updated: now,
            };
            writes.push(DriftWrite {
                key,
                read,
                record: encode("drift", &record)?,
            });
        }
        Ok(Ok(writes))
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
            let record: DriftRecord = decode("drift", &value)?;
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
            let stored = parse_shadow_key(&key, decode("shadow", &value)?).ok_or_else(|| {
                StoreError::Corrupt {
                    tree: "shadow",
                    reason: "bad key".to_owned(),
                }
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
            .map(|bytes| decode("stats", &bytes))
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
                Ok((name.to_owned(), version, decode("stats", &value)?))
            })
            .collect()
    }

    // Roots.

    pub fn put_root(&self, version: u64, signed: &[u8]) -> Result<()> {
        self.roots.insert(version.to_be_bytes(), signed)?;
        Ok(())
    }

    /// Every stored root, oldest first.
    pub fn roots(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.roots.iter().map(root_entry).collect()
    }

    /// Signed roots with a version above `version`, oldest first: what a device that trusts root
    /// `version` needs next (for a device up to date, one lookup that finds nothing).
    pub fn roots_after(&self, version: u64) -> Result<Vec<(u64, Vec<u8>)>> {
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
                compared,
                top1_agreed: agreed,
                errors: 1,
                abs_diff_sum: 0.5,
                abs_diff_values: compared * 3,
                dropped: 2,
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

    #[test]
    fn concurrent_batches_of_one_window_all_count_once() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let profile = profile();
        let (threads, batches) = (4u64, 100u64);
        std::thread::scope(|scope| {
            for thread in 0..threads {
                let (store, profile) = (&store, &profile);
                scope.spawn(move || {
                    for batch in 0..batches {
                        let sequence = thread * batches + batch;
                        let windows = [window(summary(profile, 3600, &[sequence as f64]))];
                        let outcome = store.ingest_telemetry(&DEVICE, sequence, &windows, 0, 10);
                        assert_eq!(outcome.unwrap(), Ingested::Stored);
                    }
                });
            }
        });
        // Every batch merged into the one window exactly once, whichever raced.
        let total = threads * batches;
        assert_eq!(
            n_of(&store.drift_summaries("demo", 1, 0).unwrap()),
            [(3600, total, total)]
        );
        assert_eq!(store.stats(&DEVICE, "demo", 1).unwrap().count, total);
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
