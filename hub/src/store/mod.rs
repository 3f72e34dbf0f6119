//! The hub's store: SQL, on SQLite embedded in the data directory (the default) or on PostgreSQL
//! (any number of hubs sharing one database). One schema and one set of queries serve both,
//! through sqlx's `Any` driver; what differs between the two engines is in [`sql`], and only
//! there.
//!
//! Handlers never see SQL. They call the domain operations of the submodules, each of which is
//! one transaction where it spans rows, and [`Store::flush`] before acknowledging anything a
//! client must be able to rely on after a crash.
//!
//! Rows hold the hub's own record types (`records`), serialized with postcard and converted by
//! hand from wire types, so the device protocol can evolve without rewriting stored data; what
//! the store looks records up by (ids, names, versions, windows) are columns of their own. The
//! record bytes are those the sled store of release 0.1.0 wrote, so `outpost-hub admin migrate`
//! ([`import`]) moves a store of that release over as it is.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use std::collections::BTreeMap;

use outpost_protocol::device::{ShadowCounts, ShadowReport};
use outpost_protocol::drift::DriftSummary;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use sqlx::any::AnyRow;
use sqlx::AnyPool;
use sqlx::Row;

mod alerts;
mod audit;
mod cache;
mod captures;
mod devices;
mod drift_hourly;
mod group;
pub mod import;
mod ingest;
mod records;
mod registry;
mod replicas;
mod retention;
mod retirements;
mod rollouts;
mod runtimes;
pub mod sql;
mod statements;
mod stats_hourly;
mod telemetry;
#[cfg(test)]
mod tests;

pub use alerts::*;
pub use audit::*;
pub use captures::{CaptureFilter, CaptureInsert, StoredCapture};
pub use devices::{LatestRequests, SignedRequest};
pub use drift_hourly::{group_labels, label_group, StoredHourly};
pub use records::*;
pub use replicas::{NonceNote, RolloutLock, ENGINE_LEASE};
pub use retention::{Pruned, PrunedHourly, Retention};
pub use sql::{Database, Dialect};
pub use stats_hourly::StoredHourlyStats;
pub use telemetry::*;

/// Why the store failed. Distinct from refusals, which operations return as values.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Sql(#[from] sqlx::Error),
    #[error("stored {table} record is unreadable: {reason}")]
    Corrupt { table: &'static str, reason: String },
    #[error("cannot encode {table} record: {reason}")]
    Encode { table: &'static str, reason: String },
    #[error("{what} {value} is above the largest the store keeps ({})", i64::MAX)]
    OutOfRange { what: &'static str, value: u64 },
    #[error(
        "{dir} holds a store of Outpost 0.1 (sled, in {dir}/db) and no SQL store: \
         run `outpost-hub admin migrate --data {dir}` once, with the hub stopped"
    )]
    Unmigrated { dir: String },
    #[error(
        "the database was written by a newer hub (schema {found}; this hub knows up to {known})"
    )]
    NewerSchema { found: i64, known: i64 },
    #[error("{0}")]
    Import(String),
    /// A group of writes failed together (see `ingest`): each caller in the group gets it.
    #[error(transparent)]
    Shared(Arc<StoreError>),
    #[error("the task running a group of writes stopped without answering")]
    GroupStopped,
    #[error("the store is in use: cannot lock {path} ({reason}); is another hub running on it?")]
    Locked { path: String, reason: String },
    /// Syncing an SQLite store's log failed, now or earlier (see `sql::WalSync`).
    #[error("{0}; writes since the hub started may not be on disk: restart the hub")]
    Unsynced(String),
    /// The thread an SQLite store's groups of writes run on could not start (see `group`).
    #[error("cannot start the store's thread for writes: {0}")]
    GroupThread(std::io::Error),
    /// An SQLite store's connection for its groups of writes failed (see `statements`).
    #[error("database error: {0}")]
    Direct(String),
    #[error("the store is closed")]
    Closed,
}

type Result<T> = std::result::Result<T, StoreError>;

/// Encodes a record into a buffer of its exact size: measuring first costs a pass over the value
/// and saves growing the buffer (several reallocations and copies for a 7 KB drift record).
fn encode<T: Serialize>(table: &'static str, value: &T) -> Result<Vec<u8>> {
    let fail = |error: postcard::Error| StoreError::Encode {
        table,
        reason: error.to_string(),
    };
    let len = postcard::experimental::serialized_size(value).map_err(fail)?;
    postcard::to_extend(value, Vec::with_capacity(len)).map_err(fail)
}

fn decode<T: DeserializeOwned>(table: &'static str, bytes: &[u8]) -> Result<T> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt {
        table,
        reason: error.to_string(),
    })
}

/// A u64 as the store's integer columns keep it (BIGINT, signed on both engines). Values above
/// `i64::MAX` are refused by name rather than wrapped, which would break their order.
fn int(what: &'static str, value: u64) -> Result<i64> {
    i64::try_from(value).map_err(|_| StoreError::OutOfRange { what, value })
}

/// A bound for a range over an integer column: values above `i64::MAX` are never stored, so such
/// a bound is the largest one.
fn bound(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

/// An integer column read back as the u64 it was stored from.
fn uint(table: &'static str, value: i64) -> Result<u64> {
    u64::try_from(value).map_err(|_| StoreError::Corrupt {
        table,
        reason: format!("negative value {value}"),
    })
}

/// A fixed-size id (device ids, hashes) read from a blob column.
fn fixed<const N: usize>(table: &'static str, bytes: &[u8]) -> Result<[u8; N]> {
    <[u8; N]>::try_from(bytes).map_err(|_| StoreError::Corrupt {
        table,
        reason: format!("an id of {} bytes, not {N}", bytes.len()),
    })
}

/// Column `index` of `row` as bytes.
fn blob(row: &AnyRow, index: usize) -> Result<Vec<u8>> {
    Ok(row.try_get::<Vec<u8>, _>(index)?)
}

/// Column `index` of `row` as a u64.
fn column_u64(table: &'static str, row: &AnyRow, index: usize) -> Result<u64> {
    uint(table, row.try_get::<i64, _>(index)?)
}

/// The hub's state, in a SQL database.
#[derive(Debug, Clone)]
pub struct Store {
    /// Reads, and on PostgreSQL writes too.
    pool: AnyPool,
    /// Writes: on SQLite one connection, since SQLite has one writer at a time and a second one
    /// would wait on its lock instead of in the pool's queue; on PostgreSQL, `pool` again.
    writer: AnyPool,
    dialect: Dialect,
    /// What syncs an SQLite store's log; see [`Store::flush`].
    wal: Option<Arc<sql::WalSync>>,
    /// An SQLite store's checkpoints; see `sql::Checkpoints`.
    checkpoints: Option<Arc<sql::Checkpoints>>,
    /// Serialises flushes; see [`Store::flush`].
    flush_lock: Arc<tokio::sync::Mutex<()>>,
    /// Flushes begun so far, and the number of the last one that finished.
    flushes_begun: Arc<AtomicU64>,
    flush_done: Arc<AtomicU64>,
    /// The highest root version stored, so that a check-in from a device that already trusts it
    /// (nearly every check-in) reads no roots; see `cache`.
    newest_root: Arc<AtomicU64>,
    /// Recently read device records, on a store no other hub shares; see `cache`.
    devices_cache: Option<Arc<cache::DeviceCache>>,
    /// The alert rules, on a store no other hub shares; see `cache`.
    rules_cache: Option<Arc<cache::RulesCache>>,
    /// The drift aggregates last written, decoded; see `drift_hourly`.
    decoded_hours: Arc<drift_hourly::DecodedHours>,
    /// Telemetry batches waiting to be stored in a group; see `ingest`.
    ingest: Arc<ingest::IngestQueue>,
    /// Seconds a device's telemetry batch markers are kept (`u64::MAX`: for good); see
    /// [`Store::keep_batch_markers_for`].
    markers_kept_for: Arc<AtomicU64>,
    /// Devices' latest signed requests waiting to be noted in a group; see `devices`.
    signed: Arc<devices::SignedQueue>,
    /// The thread an SQLite store's groups run on; see `group`.
    groups: Option<Arc<group::GroupThread>>,
    /// This process's side of [`Store::lock_rollouts`].
    rollout_lock: Arc<tokio::sync::Mutex<()>>,
    /// An embedded store's lock on its file, held while any clone of the store lives.
    _lock: Option<Arc<sql::FileLock>>,
}

impl Store {
    /// Opens (or creates) the embedded store in `dir`: SQLite, in `dir/hub.db`. A directory that
    /// holds only a store of release 0.1.0 (sled) is refused, naming the command that migrates it.
    pub async fn open(dir: &Path) -> Result<Store> {
        let file = Store::sqlite_file(dir);
        let unmigrated = || StoreError::Unmigrated {
            dir: dir.display().to_string(),
        };
        let sled = import::has_sled_store(dir);
        if sled && !file.exists() {
            return Err(unmigrated());
        }
        let store = Store::connect(&Database::Sqlite(file)).await?;
        // A migration that failed leaves an empty SQL store beside the old one.
        if sled && !store.imported().await? {
            return Err(unmigrated());
        }
        Ok(store)
    }

    /// The SQLite file of the embedded store in `dir`.
    pub fn sqlite_file(dir: &Path) -> PathBuf {
        dir.join("hub.db")
    }

    /// Connects to `database`, bringing its schema up to date.
    pub async fn connect(database: &Database) -> Result<Store> {
        let connected = sql::connect(database).await?;
        let dialect = database.dialect();
        sql::migrate(&connected.writer, dialect).await?;
        let checkpoints = (dialect == Dialect::Sqlite)
            .then(|| Arc::new(sql::Checkpoints::start(connected.readers.clone())));
        let store = Store {
            pool: connected.readers,
            writer: connected.writer,
            dialect,
            wal: connected.wal.map(Arc::new),
            checkpoints,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            flushes_begun: Arc::new(AtomicU64::new(0)),
            flush_done: Arc::new(AtomicU64::new(0)),
            newest_root: Arc::default(),
            devices_cache: (dialect == Dialect::Sqlite).then(Arc::default),
            rules_cache: (dialect == Dialect::Sqlite).then(Arc::default),
            decoded_hours: Arc::default(),
            ingest: Arc::default(),
            markers_kept_for: Arc::new(AtomicU64::new(u64::MAX)),
            signed: Arc::default(),
            groups: match database {
                Database::Sqlite(path) => Some(Arc::new(group::GroupThread::start(path)?)),
                Database::Postgres(_) => None,
            },
            rollout_lock: Arc::default(),
            _lock: connected.lock.map(Arc::new),
        };
        store.refresh().await?;
        Ok(store)
    }

    /// Which engine this store is on.
    pub fn dialect(&self) -> Dialect {
        self.dialect
    }

    /// Makes every write so far durable. Called before acknowledging a write to a client.
    ///
    /// PostgreSQL makes each commit durable before it returns, so this does nothing there. SQLite
    /// commits to its write-ahead log without waiting for the disk (`synchronous = NORMAL`), and
    /// a flush syncs that log on a blocking thread, outside the writer: every commit that
    /// returned before it began is then durable (see `sql::WalSync`). One flush runs at a time,
    /// and a caller that finds a flush begun after it arrived, and finished, is covered by it, so
    /// callers arriving during one sync share the next.
    pub async fn flush(&self) -> Result<()> {
        let Some(wal) = &self.wal else {
            return Ok(());
        };
        let begun_before_arrival = self.flushes_begun.load(Ordering::SeqCst);
        let _guard = self.flush_lock.lock().await;
        if self.flush_done.load(Ordering::SeqCst) > begun_before_arrival {
            return Ok(());
        }
        let number = self.flushes_begun.fetch_add(1, Ordering::SeqCst) + 1;
        let wal = Arc::clone(wal);
        tokio::task::spawn_blocking(move || wal.sync())
            .await
            .map_err(|error| StoreError::Unsynced(format!("the sync stopped: {error}")))??;
        self.flush_done.store(number, Ordering::SeqCst);
        if let Some(checkpoints) = &self.checkpoints {
            checkpoints.request();
        }
        Ok(())
    }

    /// Closes the store's connections, after a last flush.
    pub async fn close(&self) -> Result<()> {
        self.flush().await?;
        if let Some(groups) = &self.groups {
            groups.close().await;
        }
        self.writer.close().await;
        self.pool.close().await;
        Ok(())
    }
}
