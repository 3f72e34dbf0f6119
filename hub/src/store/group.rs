//! Writes that many requests make at once, run in groups: every request's write waiting when
//! the last group ends goes into the next group's one transaction, where each kind of row is read
//! and written by one statement for the whole group. A write on its own costs the same statements
//! as before; under load, a group of n costs about what one did. Telemetry batches
//! (`ingest`) and devices' latest signed requests (`devices`) are written this way.
//!
//! A group holds at most [`GROUP_MAX`] writes and at most one per device, so a device's writes
//! are applied in the order they came, each against what the one before it wrote. The group runs
//! on a task of its own, so a caller that goes away cannot cancel it half-way: its transaction
//! either commits or rolls back. A database error fails the whole group, and every caller in it
//! gets that error; nothing of the group was written.
//!
//! On SQLite the groups run on a thread of their own ([`GroupThread`]), not on the runtime's
//! workers, and run their statements there, on a connection of the thread's own (see
//! `statements`), while their [`Lease`] holds sqlx's one write connection, so SQLite's writes
//! still run one at a time. A group is a dozen statements in turn, and nothing else writes
//! meanwhile: run through sqlx, each was a hand-off to sqlx's thread for the connection and
//! back, and woken from outside the runtime, a task waits in the runtime's shared queue behind
//! the request handlers, so under load each statement's answer waited there before the next
//! statement went out.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::future::BoxFuture;
use sqlx::AnyPool;
use tokio::sync::oneshot;

use super::statements::DirectConnection;

use super::*;

/// Most writes in one group.
pub(super) const GROUP_MAX: usize = 64;

/// Most keys one statement of a group looks up or writes: SQLite parses an `OR` chain into a tree
/// as deep as its terms and refuses one deeper than 1,000.
pub(super) const KEYS_PER_STATEMENT: usize = 100;

/// Work queued for a group: a device's, one at most per group.
pub(super) trait Queued {
    fn device(&self) -> [u8; 16];
}

struct Job<W, V> {
    work: W,
    verdict: oneshot::Sender<Result<V>>,
}

/// Work waiting for a group transaction, and whether a task is running groups of it.
pub(super) struct GroupQueue<W, V> {
    state: Mutex<QueueState<W, V>>,
}

struct QueueState<W, V> {
    jobs: VecDeque<Job<W, V>>,
    running: bool,
    /// Work taken into groups so far.
    taken: u64,
}

impl<W, V> Default for GroupQueue<W, V> {
    fn default() -> Self {
        GroupQueue {
            state: Mutex::new(QueueState {
                jobs: VecDeque::new(),
                running: false,
                taken: 0,
            }),
        }
    }
}

impl<W, V> std::fmt::Debug for GroupQueue<W, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        f.debug_struct("GroupQueue")
            .field("waiting", &state.jobs.len())
            .field("running", &state.running)
            .finish()
    }
}

impl<W: Queued + Send + Sync + 'static, V: Send + 'static> GroupQueue<W, V> {
    /// Work waiting for a group.
    #[cfg(test)]
    pub(super) fn waiting(&self) -> usize {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.jobs.len()
    }

    /// True when no task runs groups.
    #[cfg(test)]
    pub(super) fn idle(&self) -> bool {
        !self
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .running
    }

    /// Work taken into groups so far.
    #[cfg(test)]
    pub(super) fn taken(&self) -> u64 {
        let state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        state.taken
    }

    /// Queues `work` and waits for its verdict. The first work to find no task running groups
    /// starts one on `store`, which runs `run` on groups until none waits: spawned, so that a
    /// caller going away cannot cancel a group half-way.
    pub(super) async fn run<F>(
        &self,
        store: &Store,
        queue: fn(&Store) -> &GroupQueue<W, V>,
        work: W,
        run: F,
    ) -> Result<V>
    where
        F: for<'a> Fn(&'a Store, &'a [&'a W]) -> BoxFuture<'a, Result<Vec<V>>>
            + Send
            + Sync
            + 'static,
    {
        let (verdict, answer) = oneshot::channel();
        let start = {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.jobs.push_back(Job { work, verdict });
            !std::mem::replace(&mut state.running, true)
        };
        if start {
            let runtime = match &store.groups {
                Some(thread) => thread.runtime.clone(),
                None => tokio::runtime::Handle::current(),
            };
            let store = store.clone();
            let run = Arc::new(run);
            runtime.clone().spawn(async move {
                loop {
                    let group = queue(&store).next_group();
                    if group.is_empty() {
                        return;
                    }
                    // Each group on a task of its own: one that panics (a bug) drops its callers'
                    // senders, so they get an error, and the groups after it still run.
                    let one = runtime.spawn(run_group(store.clone(), Arc::clone(&run), group));
                    if let Err(error) = one.await {
                        log::error!("a group of writes stopped: {error}");
                    }
                }
            });
        }
        answer.await.map_err(|_| StoreError::GroupStopped)?
    }

    /// The next group: the oldest work waiting, at most one per device and [`GROUP_MAX`] in
    /// all. Empty (and no task running any more) when none waits.
    fn next_group(&self) -> Vec<Job<W, V>> {
        let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let mut devices = HashSet::new();
        let mut group = Vec::new();
        let mut left = VecDeque::with_capacity(state.jobs.len());
        while let Some(job) = state.jobs.pop_front() {
            if group.len() < GROUP_MAX && devices.insert(job.work.device()) {
                group.push(job);
            } else {
                left.push_back(job);
            }
        }
        state.jobs = left;
        state.taken += group.len() as u64;
        if group.is_empty() {
            state.running = false;
        }
        group
    }
}

/// A thread of its own running an SQLite store's groups, on a runtime of its own (see the
/// module's notes), and the connection they run their statements on (see `statements`). It
/// ends once the store's last clone is gone: a group running holds a clone, so no group is
/// stopped half-way by it.
///
/// PostgreSQL's groups stay on the hub's runtime: there a group waits on the server, and a
/// connection a pool opens is driven by the runtime that opened it, which must outlive it.
#[derive(Debug)]
pub(super) struct GroupThread {
    runtime: tokio::runtime::Handle,
    /// The groups' connection; `None` once the store is closed.
    connection: tokio::sync::Mutex<Option<DirectConnection>>,
    /// Dropped with the store's last clone, which ends the thread.
    _stop: oneshot::Sender<()>,
}

impl GroupThread {
    /// Starts the thread, with a connection of its own to the SQLite file `path`.
    pub(super) fn start(path: &Path) -> Result<GroupThread> {
        let connection = DirectConnection::open(path)?;
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(StoreError::GroupThread)?;
        let handle = runtime.handle().clone();
        let (stop, stopped) = oneshot::channel::<()>();
        std::thread::Builder::new()
            .name("outpost-groups".to_owned())
            .spawn(move || {
                runtime.block_on(async {
                    // Either way the store is gone: its sender was dropped.
                    let _ = stopped.await;
                });
            })
            .map_err(StoreError::GroupThread)?;
        Ok(GroupThread {
            runtime: handle,
            connection: tokio::sync::Mutex::new(Some(connection)),
            _stop: stop,
        })
    }

    /// The groups' connection, in a transaction begun for a group, with `writer` (sqlx's one
    /// write connection) held until the lease ends, so that no other write runs meanwhile.
    pub(super) async fn lease(&self, writer: &AnyPool) -> Result<Lease<'_>> {
        let writer = writer.acquire().await?;
        let connection =
            tokio::sync::MutexGuard::try_map(self.connection.lock().await, Option::as_mut)
                .map_err(|_| StoreError::Closed)?;
        let mut lease = Lease {
            connection,
            _writer: writer,
        };
        lease.connection().begin()?;
        Ok(lease)
    }

    /// Closes the groups' connection, waiting for a group running on it to end.
    pub(super) async fn close(&self) {
        self.connection.lock().await.take();
    }
}

/// A group's hold on an SQLite store's writes: see [`GroupThread::lease`].
pub(super) struct Lease<'t> {
    connection: tokio::sync::MappedMutexGuard<'t, DirectConnection>,
    _writer: sqlx::pool::PoolConnection<sqlx::Any>,
}

impl Lease<'_> {
    /// The connection, in the group's transaction.
    pub(super) fn connection(&mut self) -> &mut DirectConnection {
        &mut self.connection
    }

    /// Commits the group's transaction when `group` succeeded, and rolls it back otherwise. A
    /// lease dropped without this (a group that panicked) leaves its transaction to be rolled
    /// back by the next.
    pub(super) fn finish<T>(mut self, group: Result<T>) -> Result<T> {
        self.connection().finish(group)
    }
}

/// Runs one group and answers each of its callers.
async fn run_group<W, V, F>(store: Store, run: Arc<F>, group: Vec<Job<W, V>>)
where
    W: Send + Sync,
    V: Send,
    F: for<'a> Fn(&'a Store, &'a [&'a W]) -> BoxFuture<'a, Result<Vec<V>>> + Send + Sync,
{
    let works: Vec<&W> = group.iter().map(|job| &job.work).collect();
    let verdicts: Vec<Result<V>> = match run(&store, &works).await {
        Ok(verdicts) => verdicts.into_iter().map(Ok).collect(),
        Err(error) => {
            let error = Arc::new(error);
            (0..group.len())
                .map(|_| Err(StoreError::Shared(error.clone())))
                .collect()
        }
    };
    drop(works);
    for (job, verdict) in group.into_iter().zip(verdicts) {
        // A caller that went away no longer needs its verdict.
        let _ = job.verdict.send(verdict);
    }
}

/// A statement's `n`th parameter (counting from 1) as `dialect` writes it: `$n` on PostgreSQL,
/// and on SQLite `?`, which SQLite numbers by its place in the statement. So every parameter of
/// a statement built here is written in the order it is bound, and one bound twice is written
/// twice.
///
/// Why not `$n` on SQLite too: SQLite finds a named parameter's number by walking the list of
/// the statement's names, and sqlx asks for each parameter's name as it binds, so binding P named
/// parameters takes P²/2 steps: 180,000 for a group's insert of 100 rows of 6 columns.
pub(super) fn parameter(dialect: Dialect, n: usize) -> String {
    match dialect {
        Dialect::Sqlite => "?".to_owned(),
        Dialect::Postgres => format!("${n}"),
    }
}

/// `$first, $first+1, …` for `count` parameters (see [`parameter`]).
pub(super) fn placeholders(dialect: Dialect, first: usize, count: usize) -> String {
    (first..first + count)
        .map(|n| parameter(dialect, n))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `($1, $2), ($3, $4), …`: `count` rows of `width` parameters, for `VALUES`.
pub(super) fn rows(dialect: Dialect, count: usize, width: usize) -> String {
    (0..count)
        .map(|row| format!("({})", placeholders(dialect, 1 + row * width, width)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `(a = $1 AND b > $2) OR (a = $3 AND b > $4) OR …`: `count` terms, each comparing the columns
/// of `comparisons` (each written with its operator, `"a = "`) with parameters of its own.
pub(super) fn matching(dialect: Dialect, count: usize, comparisons: &[&str]) -> String {
    let width = comparisons.len();
    (0..count)
        .map(|term| {
            let tests: Vec<String> = comparisons
                .iter()
                .enumerate()
                .map(|(column, comparison)| {
                    format!(
                        "{comparison}{}",
                        parameter(dialect, 1 + term * width + column)
                    )
                })
                .collect();
            format!("({})", tests.join(" AND "))
        })
        .collect::<Vec<_>>()
        .join(" OR ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_number_their_parameters_in_order() {
        let postgres = Dialect::Postgres;
        assert_eq!(placeholders(postgres, 3, 2), "$3, $4");
        assert_eq!(rows(postgres, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(
            matching(postgres, 2, &["device = ", "sequence > "]),
            "(device = $1 AND sequence > $2) OR (device = $3 AND sequence > $4)"
        );
        let sqlite = Dialect::Sqlite;
        assert_eq!(placeholders(sqlite, 3, 2), "?, ?");
        assert_eq!(rows(sqlite, 2, 3), "(?, ?, ?), (?, ?, ?)");
        assert_eq!(
            matching(sqlite, 2, &["device = ", "sequence > "]),
            "(device = ? AND sequence > ?) OR (device = ? AND sequence > ?)"
        );
    }
}
