//! The hub's embedded store: sled `=0.34.7` in the data directory, behind this one module tree.
//! Only this file names sled's types; the other store modules reach them through it.
//!
//! Handlers never see sled. They call the domain operations of the submodules, each of which is
//! atomic (a sled transaction where it spans trees), and [`Store::flush`] before acknowledging
//! anything a client must be able to rely on after a crash. A second backend would implement the same
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
use sled::{IVec, Transactional, Tree};

mod audit;
mod devices;
mod records;
mod registry;
mod retention;
mod retirements;
mod rollouts;
mod runtimes;
mod telemetry;
#[cfg(test)]
mod tests;

pub use audit::*;
pub use devices::LatestRequests;
pub use records::*;
pub use retention::{Pruned, Retention};
pub use telemetry::*;

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
    /// Per device, the highest timestamp of a signed request the hub accepted from it.
    signed_at: sled::Tree,
    roots: sled::Tree,
    manifests: sled::Tree,
    rollouts: sled::Tree,
    /// Signed retirements by plan sequence; a store older hubs wrote has none, and sled
    /// creates the tree when it opens.
    retirements: sled::Tree,
    /// Each device's latest runtime report by device id; created when the store opens, like
    /// `retirements`, so a store older hubs wrote reads as one without reports.
    runtimes: sled::Tree,
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
    /// Serialises admin token revocations, which read every token before deleting one.
    token_lock: Arc<std::sync::Mutex<()>>,
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
            signed_at: tree("signed_at")?,
            roots,
            manifests: tree("manifests")?,
            rollouts: tree("rollouts")?,
            retirements: tree("retirements")?,
            runtimes: tree("runtimes")?,
            audit: tree("audit")?,
            meta: tree("meta")?,
            db,
            flush_lock: Arc::new(tokio::sync::Mutex::new(())),
            flushes_begun: Arc::new(AtomicU64::new(0)),
            flush_done: Arc::new(AtomicU64::new(0)),
            newest_root: Arc::new(AtomicU64::new(newest_root)),
            token_lock: Arc::default(),
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
}
