//! Where SQLite and PostgreSQL differ, and only here: connecting, the schema's type names, row
//! locks, the schema's migrations and making commits durable. Every query elsewhere in the store
//! is written once, in the SQL both engines read (`$1` parameters, `ON CONFLICT` upserts,
//! `BIGINT`, `TEXT`).

use std::path::PathBuf;
use std::str::FromStr;
use std::time::Duration;

use sqlx::any::AnyPoolOptions;
use sqlx::{AnyConnection, AnyPool};
use sqlx::{AssertSqlSafe, Connection, Executor};

use super::{Result, StoreError};

/// Which database a hub keeps its state in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Database {
    /// An SQLite file, embedded in the hub's process.
    Sqlite(PathBuf),
    /// A PostgreSQL server, by its `postgres://` (or `postgresql://`) URL.
    Postgres(String),
}

impl Database {
    pub fn dialect(&self) -> Dialect {
        match self {
            Database::Sqlite(_) => Dialect::Sqlite,
            Database::Postgres(_) => Dialect::Postgres,
        }
    }

    /// The database without a password, for logs and errors.
    pub fn describe(&self) -> String {
        match self {
            Database::Sqlite(path) => format!("SQLite {}", path.display()),
            Database::Postgres(url) => {
                let hidden = url.split_once("://").and_then(|(scheme, rest)| {
                    let (credentials, host) = rest.split_once('@')?;
                    let (user, _) = credentials.split_once(':')?;
                    Some(format!("{scheme}://{user}:***@{host}"))
                });
                format!("PostgreSQL {}", hidden.as_deref().unwrap_or(url))
            }
        }
    }
}

impl FromStr for Database {
    type Err = String;

    /// `postgres://…` or `postgresql://…` for PostgreSQL; `sqlite:PATH` (or a plain path) for
    /// an SQLite file.
    fn from_str(text: &str) -> std::result::Result<Database, String> {
        if text.starts_with("postgres://") || text.starts_with("postgresql://") {
            return Ok(Database::Postgres(text.to_owned()));
        }
        let path = text
            .strip_prefix("sqlite://")
            .or_else(|| text.strip_prefix("sqlite:"))
            .unwrap_or(text);
        if path.is_empty() {
            return Err(format!(
                "database {text:?}: expected postgres://USER@HOST/NAME or sqlite:PATH"
            ));
        }
        if text.contains("://") && !text.starts_with("sqlite://") {
            return Err(format!(
                "database {text:?}: only postgres:// and sqlite: databases are supported"
            ));
        }
        Ok(Database::Sqlite(PathBuf::from(path)))
    }
}

/// The engine a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dialect {
    Sqlite,
    Postgres,
}

impl Dialect {
    /// `query`, with its rows locked against other writers until the transaction ends where the
    /// engine has row locks (PostgreSQL). SQLite has one writer at a time, so its transactions
    /// need none.
    pub fn locking(self, query: (&'static str, &'static str)) -> &'static str {
        match self {
            Dialect::Sqlite => query.0,
            Dialect::Postgres => query.1,
        }
    }

    /// The type of byte columns.
    fn bytes(self) -> &'static str {
        match self {
            Dialect::Sqlite => "BLOB",
            Dialect::Postgres => "BYTEA",
        }
    }

    /// An integer primary key the database numbers itself, in insertion order.
    fn serial(self) -> &'static str {
        match self {
            Dialect::Sqlite => "INTEGER PRIMARY KEY AUTOINCREMENT",
            Dialect::Postgres => "BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
        }
    }
}

/// A `SELECT` as both engines run it in a transaction that writes what it read: as written, and
/// with `FOR UPDATE` (see [`Dialect::locking`]).
macro_rules! for_update {
    ($query:literal) => {
        ($query, concat!($query, " FOR UPDATE"))
    };
}
pub(crate) use for_update;

/// The lock an embedded store holds for as long as it is open: one hub process per SQLite file
/// (hubs that share a store share a PostgreSQL database). Released when the file closes, so a
/// killed hub leaves nothing to clean up.
#[derive(Debug)]
pub(super) struct FileLock {
    _file: std::fs::File,
}

/// The pools [`connect`] opens: one for reads, and one for writes (on SQLite, one connection; on
/// PostgreSQL, the same pool); for SQLite, with the lock of its file and what syncs its log.
pub(super) struct Connected {
    pub readers: AnyPool,
    pub writer: AnyPool,
    pub lock: Option<FileLock>,
    pub wal: Option<WalSync>,
}

/// Opens the pools for `database`.
pub(super) async fn connect(database: &Database) -> Result<Connected> {
    sqlx::any::install_default_drivers();
    match database {
        Database::Sqlite(path) => {
            let lock_path = path.with_extension("lock");
            let lock = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path)
                .map_err(|error| StoreError::Locked {
                    path: lock_path.display().to_string(),
                    reason: error.to_string(),
                })?;
            lock.try_lock().map_err(|error| StoreError::Locked {
                path: lock_path.display().to_string(),
                reason: error.to_string(),
            })?;
            let url = format!("sqlite://{}?mode=rwc", percent_encode(path));
            // Connections in the process, not over a network: nothing to test before handing
            // one out, which would cost a round trip to its thread on every write.
            let options = || {
                AnyPoolOptions::new()
                    .acquire_timeout(Duration::from_secs(60))
                    .test_before_acquire(false)
                    .after_connect(|connection, _| {
                        Box::pin(async move { sqlite_pragmas(connection).await })
                    })
            };
            // The writer first: it sets the file's journal mode before readers open it.
            let writer = options().max_connections(1).connect(&url).await?;
            let readers = options().max_connections(4).connect(&url).await?;
            match build_options(&writer).await {
                Ok(None) => {}
                Ok(Some(warning)) => log::warn!("{warning}"),
                Err(error) => log::warn!("reading SQLite's compile options: {error}"),
            }
            Ok(Connected {
                readers,
                writer,
                lock: Some(FileLock { _file: lock }),
                wal: Some(WalSync::new(path)),
            })
        }
        Database::Postgres(url) => {
            let pool = AnyPoolOptions::new()
                .max_connections(16)
                .acquire_timeout(Duration::from_secs(30))
                .connect(url)
                .await?;
            Ok(Connected {
                readers: pool.clone(),
                writer: pool,
                lock: None,
                wal: None,
            })
        }
    }
}

/// The options the workspace's `.cargo/config.toml` compiles the bundled SQLite with
/// (`LIBSQLITE3_FLAGS`), as `compile_options` names each, and what a hub pays without it. A hub
/// built from outside the workspace does not get them.
/// - `ENABLE_QPSG`: without it, SQLite compiles again on every run each statement whose plan
///   noted a bound value, because sqlx clears a cached statement's bindings before each run, and
///   that expires it.
/// - `STMTJRNL_SPILL`: a statement that may fail half-way through a transaction (an insert of
///   many rows) keeps the pages it changes in a statement journal, in memory up to this many
///   bytes and in a temporary file past them. A group's statements change more than SQLite's
///   default of 64 KiB; with 4 MiB they stay in memory, where each group opened, wrote and
///   dropped a file in the temporary directory.
///
/// The flag that sets each is its name with `SQLITE_` before it.
const BUILD_OPTIONS: [(&str, &str); 2] = [
    (
        "ENABLE_QPSG",
        "it compiles many statements again on every run (drift ingest costs about a fifth more)",
    ),
    (
        "STMTJRNL_SPILL=4194304",
        "its groups of writes write their statement journals to temporary files",
    ),
];

/// What to say when the SQLite of `sqlite` (a pool of SQLite connections) was built without
/// one of [`BUILD_OPTIONS`], by its `compile_options`.
pub(super) async fn build_options(
    sqlite: &AnyPool,
) -> std::result::Result<Option<String>, sqlx::Error> {
    let options: Vec<String> =
        sqlx::query_scalar("SELECT compile_options FROM pragma_compile_options")
            .fetch_all(sqlite)
            .await?;
    Ok(build_options_warning(&options))
}

/// [`build_options`]'s judgement of `options`.
fn build_options_warning(options: &[String]) -> Option<String> {
    let missing: Vec<String> = BUILD_OPTIONS
        .iter()
        .filter(|(option, _)| !options.iter().any(|built| built == option))
        .map(|(option, cost)| format!("without SQLITE_{option}, so {cost}"))
        .collect();
    let flags: Vec<String> = BUILD_OPTIONS
        .iter()
        .map(|(option, _)| format!("SQLITE_{option}"))
        .collect();
    (!missing.is_empty()).then(|| {
        format!(
            "this hub's SQLite was built {}: build the hub from its workspace, whose \
             .cargo/config.toml sets LIBSQLITE3_FLAGS, or set LIBSQLITE3_FLAGS=\"{}\" when \
             building it",
            missing.join(", and "),
            flags.join(" ")
        )
    })
}

/// Write-ahead logging, so readers never wait on the writer; commits that do not wait for the
/// disk (see [`sync`]); a writer that waits for a lock rather than failing at once.
async fn sqlite_pragmas(connection: &mut AnyConnection) -> std::result::Result<(), sqlx::Error> {
    connection.execute("PRAGMA journal_mode = WAL").await?;
    connection.execute("PRAGMA synchronous = NORMAL").await?;
    connection.execute("PRAGMA busy_timeout = 30000").await?;
    connection
        .execute(AssertSqlSafe(format!(
            "PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES}"
        )))
        .await?;
    Ok(())
}

/// The least time from one checkpoint's end to the next's start; see [`Checkpoints`]. Longer spacing
/// writes a little less and makes each checkpoint longer, which slows the writer's commits
/// meanwhile: at 200 ms, the p99 of drift ingest rose by half.
const CHECKPOINT_SPACING: Duration = Duration::from_millis(50);

/// How long (in pages) the log may grow before the writer checkpoints it itself, after a commit.
/// See [`Checkpoints`].
pub(super) const WRITER_CHECKPOINT_PAGES: u32 = 8192;

/// SQLite's checkpoints (copying the log's pages into the database file, so the log can start
/// over), run mostly on a reader connection instead of the writer's.
///
/// SQLite checkpoints in the connection that commits, once the log holds 1,000 pages: the copy and
/// its two syncs then sit on the one writer's path, and under drift ingest they took about a
/// fifth of its time. Here every [`Store::flush`](super::Store::flush) asks for a checkpoint,
/// which runs beside the writer: a `PASSIVE` one copies what was committed when it began and
/// waits on nobody.
///
/// The log starts over only when the writer begins a transaction with all of it copied. When
/// writes leave gaps, a checkpoint here finishes in one and the log stays short. A writer busy
/// without a gap never sees that, so the writer's own checkpoint at [`WRITER_CHECKPOINT_PAGES`]
/// (32 MiB of log) remains, and starts the log over. By then the checkpoints here have copied
/// nearly all of it, so the writer's is short. The log file keeps its largest size on disk.
///
/// Checkpoints are [`CHECKPOINT_SPACING`] apart at least. One after every flush copied the
/// pages that every group rewrites (aggregates, the small per-device tables) again each time:
/// a third more bytes written per drift batch, and more CPU.
#[derive(Debug)]
pub(super) struct Checkpoints {
    wake: tokio::sync::mpsc::Sender<()>,
}

impl Checkpoints {
    /// Starts the task running checkpoints on `readers`. It ends when every handle to this is
    /// dropped or the pool is closed.
    pub(super) fn start(readers: AnyPool) -> Checkpoints {
        let (wake, mut woken) = tokio::sync::mpsc::channel(1);
        tokio::spawn(async move {
            while woken.recv().await.is_some() {
                let done = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                    .fetch_all(&readers)
                    .await;
                if readers.is_closed() {
                    return;
                }
                if let Err(error) = done {
                    log::warn!("checkpointing the SQLite log: {error}");
                }
                // Asks meanwhile wait for the next: see `CHECKPOINT_SPACING`.
                tokio::time::sleep(CHECKPOINT_SPACING).await;
            }
        });
        Checkpoints { wake }
    }

    /// Asks for a checkpoint of everything committed so far. One already asked for and not yet
    /// begun covers it.
    pub(super) fn request(&self) {
        let _ = self.wake.try_send(());
    }
}

/// A path as the `sqlite://` URL sqlx parses (which percent-decodes it).
fn percent_encode(path: &std::path::Path) -> String {
    let mut encoded = String::new();
    for byte in path.as_os_str().as_encoded_bytes() {
        match byte {
            b'a'..=b'z' | b'A'..=b'Z' | b'0'..=b'9' | b'/' | b'-' | b'_' | b'.' | b'~' => {
                encoded.push(char::from(*byte))
            }
            other => encoded.push_str(&format!("%{other:02X}")),
        }
    }
    encoded
}

/// Makes an SQLite store's commits durable by syncing its write-ahead log, outside the writer.
///
/// Commits run with `synchronous = NORMAL`: they write their frames to the log (`<file>-wal`)
/// and return without waiting for the disk. A sync of the log file begun after a commit returned
/// makes it durable, with every commit before it. That is what SQLite's `synchronous = FULL` does
/// inside each commit, while the one writer waits; done here, the writer goes on to the next
/// transaction, and one sync covers every commit that returned before it began (see
/// [`Store::flush`](super::Store::flush)).
///
/// Recovery after a crash or power loss replays the log's frames up to its last complete commit,
/// checked by their checksums and the log header's salts, all in the synced file. Where the log
/// is gone (the last connection closed), SQLite moved every commit into the database file and
/// synced it first (`NORMAL` syncs at checkpoints); the database file is synced again anyway.
/// A log the process has not synced before (a new file) has its directory synced too, so its
/// name survives a power loss as well.
///
/// A failed sync is final: the kernel may have dropped the pages it could not write, and a later
/// sync would then report success over lost commits. Every sync after a failure fails with it,
/// and the hub must be restarted, which makes SQLite recover from what is on disk.
#[derive(Debug)]
pub(super) struct WalSync {
    database: PathBuf,
    wal: PathBuf,
    state: std::sync::Mutex<WalState>,
}

#[derive(Debug, Default)]
struct WalState {
    /// The log file (device and inode) whose directory entry has been synced.
    named: Option<(u64, u64)>,
    /// The first sync that failed, for good.
    failed: Option<String>,
}

impl WalSync {
    pub(super) fn new(database: &std::path::Path) -> WalSync {
        let mut wal = database.as_os_str().to_owned();
        wal.push("-wal");
        WalSync {
            database: database.to_owned(),
            wal: PathBuf::from(wal),
            state: std::sync::Mutex::default(),
        }
    }

    /// Syncs the log (blocking): every commit that returned before this began is durable when it
    /// returns `Ok`.
    pub(super) fn sync(&self) -> Result<()> {
        let mut state = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(reason) = &state.failed {
            return Err(StoreError::Unsynced(reason.clone()));
        }
        match self.sync_files(&mut state) {
            Ok(()) => Ok(()),
            Err(reason) => {
                log::error!("{reason}; the hub must be restarted");
                state.failed = Some(reason.clone());
                Err(StoreError::Unsynced(reason))
            }
        }
    }

    fn sync_files(&self, state: &mut WalState) -> std::result::Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        let failed = |what: &std::path::Path, error: std::io::Error| {
            format!("syncing {} to disk failed: {error}", what.display())
        };
        // Opened by name each time, not kept open: SQLite deletes the log when its last
        // connection closes and makes a new file when one opens again.
        let wal = match std::fs::File::open(&self.wal) {
            Ok(wal) => Some(wal),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => None,
            Err(error) => return Err(failed(&self.wal, error)),
        };
        let Some(wal) = wal else {
            let database =
                std::fs::File::open(&self.database).map_err(|e| failed(&self.database, e))?;
            return database.sync_all().map_err(|e| failed(&self.database, e));
        };
        wal.sync_data().map_err(|e| failed(&self.wal, e))?;
        let metadata = wal.metadata().map_err(|e| failed(&self.wal, e))?;
        let file = (metadata.dev(), metadata.ino());
        if state.named != Some(file) {
            let directory = self
                .wal
                .parent()
                .filter(|parent| !parent.as_os_str().is_empty())
                .unwrap_or(std::path::Path::new("."));
            std::fs::File::open(directory)
                .and_then(|directory| directory.sync_all())
                .map_err(|e| failed(directory, e))?;
            state.named = Some(file);
        }
        Ok(())
    }
}

/// The schema, one step per entry, in the order they apply: each runs once per database, in one
/// transaction with the record of it. `{bytes}` and `{serial}` are the engine's names for byte
/// columns and self-numbered keys. Never edit a step a release has shipped; add one.
const MIGRATIONS: &[&str] = &[
    // 1: the tables of release 0.1's sled trees, one per tree.
    "CREATE TABLE meta (key TEXT PRIMARY KEY, value {bytes} NOT NULL);
     CREATE TABLE admin_tokens (
         token_hash {bytes} PRIMARY KEY, id TEXT NOT NULL, record {bytes} NOT NULL);
     CREATE TABLE enroll_tokens (
         token_hash {bytes} PRIMARY KEY, id TEXT NOT NULL, record {bytes} NOT NULL);
     CREATE TABLE devices (id {bytes} PRIMARY KEY, record {bytes} NOT NULL);
     CREATE TABLE events (
         id {serial}, device {bytes} NOT NULL, record {bytes} NOT NULL);
     CREATE INDEX events_by_device ON events (device, id);
     CREATE TABLE outcomes (
         plan_sequence BIGINT NOT NULL, device {bytes} NOT NULL, record {bytes} NOT NULL,
         PRIMARY KEY (plan_sequence, device));
     CREATE TABLE stats (
         device {bytes} NOT NULL, model TEXT NOT NULL, version BIGINT NOT NULL,
         record {bytes} NOT NULL, PRIMARY KEY (device, model, version));
     CREATE TABLE drift (
         model TEXT NOT NULL, version BIGINT NOT NULL, window_end BIGINT NOT NULL,
         window_start BIGINT NOT NULL, device {bytes} NOT NULL, record {bytes} NOT NULL,
         PRIMARY KEY (model, version, window_end, window_start, device));
     CREATE INDEX drift_by_end ON drift (window_end);
     CREATE TABLE shadow (
         target {bytes} NOT NULL, window_end BIGINT NOT NULL, window_start BIGINT NOT NULL,
         device {bytes} NOT NULL, active_model TEXT NOT NULL, active_version BIGINT NOT NULL,
         record {bytes} NOT NULL,
         PRIMARY KEY (target, window_end, window_start, device, active_model, active_version));
     CREATE INDEX shadow_by_end ON shadow (window_end);
     CREATE TABLE telemetry_seen (
         device {bytes} NOT NULL, sequence BIGINT NOT NULL, stored_at BIGINT NOT NULL,
         PRIMARY KEY (device, sequence));
     CREATE TABLE signed_at (device {bytes} PRIMARY KEY, latest {bytes} NOT NULL);
     CREATE TABLE roots (version BIGINT PRIMARY KEY, signed {bytes} NOT NULL);
     CREATE TABLE manifests (
         model TEXT NOT NULL, version BIGINT NOT NULL, record {bytes} NOT NULL,
         PRIMARY KEY (model, version));
     CREATE TABLE rollouts (sequence BIGINT PRIMARY KEY, record {bytes} NOT NULL);
     CREATE TABLE retirements (sequence BIGINT PRIMARY KEY, record {bytes} NOT NULL);
     CREATE TABLE runtimes (
         device {bytes} PRIMARY KEY, at BIGINT NOT NULL, record {bytes} NOT NULL);
     CREATE TABLE audit (seq BIGINT PRIMARY KEY, record {bytes} NOT NULL)",
    // 2: what hubs sharing a database agree on: leases (the rollout engine's) and the nonces of
    // signed device requests.
    "CREATE TABLE leases (
         name TEXT PRIMARY KEY, holder TEXT NOT NULL, expires_ms BIGINT NOT NULL);
     CREATE TABLE nonces (
         device {bytes} NOT NULL, nonce {bytes} NOT NULL, expires BIGINT NOT NULL,
         PRIMARY KEY (device, nonce));
     CREATE INDEX nonces_by_expiry ON nonces (expires)",
    // 3: drift summaries merged at ingest per model version, label group and hour (the hour its
    // window ends), kept far longer than the per-device rows of `drift` (see `drift_hourly`).
    // A store made before this step gets the table empty: its aggregates start at the upgrade.
    "CREATE TABLE drift_hourly (
         model TEXT NOT NULL, version BIGINT NOT NULL, hour BIGINT NOT NULL,
         label_group TEXT NOT NULL, record {bytes} NOT NULL, devices BIGINT NOT NULL,
         left_out BIGINT NOT NULL,
         PRIMARY KEY (model, version, hour, label_group));
     CREATE INDEX drift_hourly_by_hour ON drift_hourly (hour)",
    // 4: the per-device rate limit across hubs sharing a database counts a device's nonces by
    // when they expire (`Store::note_nonce`).
    "CREATE INDEX nonces_by_device ON nonces (device, expires)",
    // 5: alert rules and webhook endpoints (records by name), each alert's state (one row per
    // rule and alert key; times 0 when unset) and the outbox of notifications: one row per event
    // and endpoint, unique by idempotency key and endpoint, kept once delivered or dead.
    "CREATE TABLE alert_rules (
         name TEXT PRIMARY KEY, model TEXT NOT NULL, record {bytes} NOT NULL);
     CREATE INDEX alert_rules_by_model ON alert_rules (model);
     CREATE TABLE webhooks (name TEXT PRIMARY KEY, record {bytes} NOT NULL);
     CREATE TABLE alert_states (
         rule TEXT NOT NULL, alert_key TEXT NOT NULL, phase TEXT NOT NULL,
         since BIGINT NOT NULL, held_since BIGINT NOT NULL, firing_since BIGINT NOT NULL,
         PRIMARY KEY (rule, alert_key));
     CREATE TABLE alert_outbox (
         id {serial}, idempotency_key TEXT NOT NULL, webhook TEXT NOT NULL,
         kind TEXT NOT NULL, rule TEXT NOT NULL, alert_key TEXT NOT NULL,
         body {bytes} NOT NULL, created BIGINT NOT NULL, state TEXT NOT NULL,
         attempts BIGINT NOT NULL, next_attempt_ms BIGINT NOT NULL,
         claimed_by TEXT NOT NULL, claim_until_ms BIGINT NOT NULL,
         last_status BIGINT NOT NULL, last_error TEXT NOT NULL, done_at BIGINT NOT NULL,
         UNIQUE (idempotency_key, webhook));
     CREATE INDEX alert_outbox_by_state ON alert_outbox (state, webhook, id)",
    // 6: data capture: signed capture allowances (records by model and sequence) and the sealed
    // samples devices upload, unique by device and the sample id the device chose, listed by
    // model version and pruned by when they were received.
    "CREATE TABLE capture_allowances (
         model TEXT NOT NULL, sequence BIGINT NOT NULL, record {bytes} NOT NULL,
         PRIMARY KEY (model, sequence));
     CREATE TABLE captures (
         id {serial}, device {bytes} NOT NULL, sample_id {bytes} NOT NULL, model TEXT NOT NULL,
         version BIGINT NOT NULL, allowance BIGINT NOT NULL, captured_at BIGINT NOT NULL,
         received_at BIGINT NOT NULL, sealed {bytes} NOT NULL,
         UNIQUE (device, sample_id));
     CREATE INDEX captures_by_model ON captures (model, version, id);
     CREATE INDEX captures_by_received ON captures (received_at)",
    // 7: inference counters added at ingest per model version, label group and hour (the hour
    // its window ends), which error-rate and latency alert rules judge over their window (see
    // `stats_hourly`); pruned with the drift aggregates. A store made before this step gets the
    // table empty: its hourly counters start at the upgrade.
    "CREATE TABLE stats_hourly (
         model TEXT NOT NULL, version BIGINT NOT NULL, hour BIGINT NOT NULL,
         label_group TEXT NOT NULL, record {bytes} NOT NULL,
         PRIMARY KEY (model, version, hour, label_group));
     CREATE INDEX stats_hourly_by_hour ON stats_hourly (hour)",
];

/// The newest schema this hub writes.
pub const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the database's schema up to [`SCHEMA_VERSION`], refusing one a newer hub wrote. Hubs
/// starting side by side on one PostgreSQL database take turns (an advisory lock); on SQLite the
/// one writer connection does the same.
pub(super) async fn migrate(writer: &AnyPool, dialect: Dialect) -> Result<()> {
    let mut connection = writer.acquire().await?;
    let mut transaction = connection.begin().await?;
    if dialect == Dialect::Postgres {
        // Any constant both sides agree on: "outpost" in ASCII.
        transaction
            .execute("SELECT pg_advisory_xact_lock(31372865377891188)")
            .await?;
    }
    transaction
        .execute(
            "CREATE TABLE IF NOT EXISTS outpost_schema \
             (version BIGINT PRIMARY KEY, applied_at BIGINT NOT NULL)",
        )
        .await?;
    let found: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM outpost_schema")
        .fetch_one(&mut *transaction)
        .await?;
    let found = found.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::NewerSchema {
            found,
            known: SCHEMA_VERSION,
        });
    }
    let applied = usize::try_from(found).map_err(|_| StoreError::Corrupt {
        table: "outpost_schema",
        reason: format!("schema version {found}"),
    })?;
    for (index, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        let step = step
            .replace("{bytes}", dialect.bytes())
            .replace("{serial}", dialect.serial());
        for statement in step.split(';').filter(|s| !s.trim().is_empty()) {
            transaction
                .execute(AssertSqlSafe(statement.to_owned()))
                .await?;
        }
        sqlx::query("INSERT INTO outpost_schema (version, applied_at) VALUES ($1, $2)")
            .bind(index as i64 + 1)
            .bind(super::bound(crate::unix_now()))
            .execute(&mut *transaction)
            .await?;
    }
    transaction.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A log that cannot be synced fails the sync, naming the file, and every sync after it:
    /// the kernel may have dropped the pages it could not write, so a later success would hide
    /// lost commits.
    #[test]
    fn a_log_that_cannot_be_synced_fails_every_sync_after_it() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("hub.db");
        std::fs::write(&database, b"").unwrap();
        let wal = dir.path().join("hub.db-wal");
        // A link to itself: opening it fails (too many levels of symbolic links).
        std::os::unix::fs::symlink(&wal, &wal).unwrap();
        let sync = WalSync::new(&database);
        let error = sync.sync().unwrap_err().to_string();
        assert!(error.contains("hub.db-wal"), "{error}");
        assert!(error.contains("restart the hub"), "{error}");
        std::fs::remove_file(&wal).unwrap();
        std::fs::write(&wal, b"a log").unwrap();
        let again = sync.sync().unwrap_err().to_string();
        assert_eq!(again, error);
        // A new process (a restarted hub) syncs it.
        WalSync::new(&database).sync().unwrap();
    }

    /// With no log (the last connection moved it into the database file), the database file is
    /// what holds the commits, and it is synced; with neither, the sync fails by name.
    #[test]
    fn with_the_log_gone_the_database_file_is_synced() {
        let dir = tempfile::tempdir().unwrap();
        let database = dir.path().join("hub.db");
        let error = WalSync::new(&database).sync().unwrap_err().to_string();
        assert!(error.contains("hub.db"), "{error}");
        std::fs::write(&database, b"").unwrap();
        WalSync::new(&database).sync().unwrap();
    }

    /// However much is written, the log stays within what the writer's own checkpoint allows,
    /// and with checkpoints moved off the writer, it still starts over: it never grows without
    /// bound.
    ///
    /// The writer's bound is exact when the writer is the only one checkpointing: commits with
    /// no flush, which is what asks for checkpoints on readers. With flushes, a checkpoint on a
    /// reader that runs when the writer passes its bound makes the writer skip its own for the
    /// commits it overlaps, as many as the machine's load lets through, so there the log is only
    /// held to having started over: well below what was written.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_log_stays_bounded_under_writes() {
        let page = 4096;
        let frame = page + 24;
        // Twice the bound, in commits of 17 pages each. Each value differs from the one it
        // replaces, which SQLite would otherwise leave unwritten.
        let commits = 2 * WRITER_CHECKPOINT_PAGES as usize / 16;
        let written = commits as u64 * 17 * frame;
        for flushed in [false, true] {
            let dir = tempfile::tempdir().unwrap();
            let store = crate::store::Store::open(dir.path()).await.unwrap();
            for n in 0..commits {
                let value = vec![n as u8; 64 * 1024];
                sqlx::query(
                    "INSERT INTO meta (key, value) VALUES ($1, $2) \
                     ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                )
                .bind(format!("filler {}", n % 100))
                .bind(value)
                .execute(&store.writer)
                .await
                .unwrap();
                if flushed {
                    store.flush().await.unwrap();
                }
            }
            let wal = dir.path().join("hub.db-wal");
            let size = std::fs::metadata(&wal).unwrap().len();
            let bound = if flushed {
                written / 2 + written / 4
            } else {
                (u64::from(WRITER_CHECKPOINT_PAGES) + 64) * frame + 32
            };
            assert!(
                size <= bound,
                "the log reached {size} bytes, past {bound} (flushed: {flushed})"
            );
            store.close().await.unwrap();
        }
    }

    #[test]
    fn a_sqlite_built_without_the_workspaces_options_is_warned_of_by_its_flags() {
        let built = |options: &[&str]| -> Vec<String> {
            options.iter().map(|option| option.to_string()).collect()
        };
        assert_eq!(
            build_options_warning(&built(&[
                "ENABLE_FTS5",
                "ENABLE_QPSG",
                "STMTJRNL_SPILL=4194304",
                "THREADSAFE=1"
            ])),
            None
        );
        let warning = build_options_warning(&built(&["ENABLE_FTS5", "THREADSAFE=1"])).unwrap();
        assert!(warning.contains("without SQLITE_ENABLE_QPSG"), "{warning}");
        assert!(
            warning.contains("without SQLITE_STMTJRNL_SPILL"),
            "{warning}"
        );
        assert!(warning.contains("LIBSQLITE3_FLAGS"), "{warning}");
        let warning = build_options_warning(&built(&["ENABLE_QPSG", "STMTJRNL_SPILL=65536"]));
        let warning = warning.unwrap();
        assert!(!warning.contains("without SQLITE_ENABLE_QPSG"), "{warning}");
        assert!(
            warning.contains("without SQLITE_STMTJRNL_SPILL"),
            "{warning}"
        );
    }
}
