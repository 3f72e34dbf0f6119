//! The statements a group of writes runs (see `group`), on either of two connections: sqlx's,
//! on PostgreSQL, and on SQLite a connection of the group thread's own, through rusqlite.
//!
//! Why two: sqlx runs each SQLite connection on a thread of its own and hands every statement
//! to it, and its rows back, through channels. A group is a dozen statements in turn, and
//! nothing else writes while it runs, so under drift ingest the group thread and sqlx's thread
//! woke each other twice per statement, and the serial path, which bounds SQLite's ingest, was
//! as much those hand-offs as SQLite's work. The group thread now runs its statements itself,
//! on a connection it owns ([`DirectConnection`]), while it holds sqlx's one write connection,
//! idle, so that no other write of the store's runs meanwhile (`group::Lease`): SQLite's writes
//! stay one at a time, in one queue, and a transaction of sqlx's never finds a group committed
//! between its read and its write.
//!
//! The group's code is written once, over [`Statements`]. Its SQL is the store's: `$n`
//! parameters bound by number, or `?` bound by place (see `group::parameter`).

use std::future::Future;
use std::path::Path;

use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use sqlx::any::AnyRow;
use sqlx::{AnyConnection, AssertSqlSafe, Row as _};

use super::sql::WRITER_CHECKPOINT_PAGES;
use super::{Result, StoreError};

/// A value bound to a statement's parameter.
#[derive(Debug, Clone, Copy)]
pub(super) enum Param<'a> {
    Int(i64),
    Text(&'a str),
    Blob(&'a [u8]),
}

impl<'a> From<&'a str> for Param<'a> {
    fn from(value: &'a str) -> Self {
        Param::Text(value)
    }
}

impl<'a> From<&'a String> for Param<'a> {
    fn from(value: &'a String) -> Self {
        Param::Text(value)
    }
}

impl<'a> From<&'a Vec<u8>> for Param<'a> {
    fn from(value: &'a Vec<u8>) -> Self {
        Param::Blob(value)
    }
}

impl<'a, const N: usize> From<&'a [u8; N]> for Param<'a> {
    fn from(value: &'a [u8; N]) -> Self {
        Param::Blob(value)
    }
}

impl rusqlite::ToSql for Param<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(ToSqlOutput::Borrowed(match *self {
            Param::Int(value) => ValueRef::Integer(value),
            Param::Text(text) => ValueRef::Text(text.as_bytes()),
            Param::Blob(bytes) => ValueRef::Blob(bytes),
        }))
    }
}

/// A row a statement returned, its columns by place.
pub(super) enum Fetched {
    Sqlx(AnyRow),
    Direct(Vec<Value>),
}

impl Fetched {
    fn direct(&self, index: usize) -> Option<&Value> {
        match self {
            Fetched::Direct(values) => values.get(index),
            Fetched::Sqlx(_) => None,
        }
    }

    fn mismatch(index: usize, expected: &str, found: Option<&Value>) -> StoreError {
        let found = match found {
            None => "no such column".to_owned(),
            Some(value) => format!("{:?}", value.data_type()),
        };
        StoreError::Direct(format!(
            "column {index}: expected {expected}, found {found}"
        ))
    }

    /// Column `index` as an integer.
    pub(super) fn int(&self, index: usize) -> Result<i64> {
        match self {
            Fetched::Sqlx(row) => Ok(row.try_get::<i64, _>(index)?),
            Fetched::Direct(_) => match self.direct(index) {
                Some(Value::Integer(value)) => Ok(*value),
                found => Err(Fetched::mismatch(index, "an integer", found)),
            },
        }
    }

    /// Column `index` as a u64, as the store's integer columns keep one (see `super::uint`).
    pub(super) fn uint(&self, table: &'static str, index: usize) -> Result<u64> {
        super::uint(table, self.int(index)?)
    }

    /// Column `index` as text.
    pub(super) fn text(&self, index: usize) -> Result<String> {
        match self {
            Fetched::Sqlx(row) => Ok(row.try_get::<String, _>(index)?),
            Fetched::Direct(_) => match self.direct(index) {
                Some(Value::Text(text)) => Ok(text.clone()),
                found => Err(Fetched::mismatch(index, "text", found)),
            },
        }
    }

    /// Column `index` as bytes.
    pub(super) fn blob(&self, index: usize) -> Result<Vec<u8>> {
        match self {
            Fetched::Sqlx(row) => Ok(row.try_get::<Vec<u8>, _>(index)?),
            Fetched::Direct(_) => match self.direct(index) {
                Some(Value::Blob(bytes)) => Ok(bytes.clone()),
                found => Err(Fetched::mismatch(index, "bytes", found)),
            },
        }
    }
}

/// What a group's code asks of its connection, in the transaction its caller began.
pub(super) trait Statements: Send {
    /// Runs `sql` with `params` and returns its rows.
    fn fetch<'a>(
        &'a mut self,
        sql: &'a str,
        params: &'a [Param<'a>],
    ) -> impl Future<Output = Result<Vec<Fetched>>> + Send + 'a;

    /// Runs `sql` with `params` and returns how many rows it changed.
    fn execute<'a>(
        &'a mut self,
        sql: &'a str,
        params: &'a [Param<'a>],
    ) -> impl Future<Output = Result<u64>> + Send + 'a;
}

/// `sql` with `params` bound, for sqlx.
fn sqlx_query<'a>(
    sql: &str,
    params: &[Param<'_>],
) -> sqlx::query::Query<'a, sqlx::Any, sqlx::any::AnyArguments> {
    let mut query = sqlx::query(AssertSqlSafe(sql.to_owned()));
    for param in params {
        query = match *param {
            Param::Int(value) => query.bind(value),
            Param::Text(text) => query.bind(text.to_owned()),
            Param::Blob(bytes) => query.bind(bytes.to_vec()),
        };
    }
    query
}

impl Statements for AnyConnection {
    async fn fetch<'a>(
        &'a mut self,
        sql: &'a str,
        params: &'a [Param<'a>],
    ) -> Result<Vec<Fetched>> {
        let rows = sqlx_query(sql, params).fetch_all(&mut *self).await?;
        Ok(rows.into_iter().map(Fetched::Sqlx).collect())
    }

    async fn execute<'a>(&'a mut self, sql: &'a str, params: &'a [Param<'a>]) -> Result<u64> {
        let done = sqlx_query(sql, params).execute(&mut *self).await?;
        Ok(done.rows_affected())
    }
}

/// Most statements an SQLite group connection keeps prepared. A group's statements differ by
/// how many rows they read or write, up to `group::GROUP_MAX`, so a dozen kinds make several
/// hundred texts; past this, the least recently used is prepared again when next run.
const PREPARED_STATEMENTS: usize = 512;

/// An SQLite store's connection for its groups of writes, used on the group thread only (see
/// the module's notes). Opened with the settings of sqlx's write connection (`sql::connect`).
#[derive(Debug)]
pub(super) struct DirectConnection {
    connection: rusqlite::Connection,
}

impl DirectConnection {
    /// Opens the store's SQLite file `path`, which sqlx has already opened and brought up to
    /// date.
    pub(super) fn open(path: &Path) -> Result<DirectConnection> {
        let connection = rusqlite::Connection::open_with_flags(
            path,
            rusqlite::OpenFlags::SQLITE_OPEN_READ_WRITE | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )
        .map_err(|error| {
            StoreError::Direct(format!(
                "opening {} for the store's groups of writes: {error}",
                path.display()
            ))
        })?;
        connection.set_prepared_statement_cache_capacity(PREPARED_STATEMENTS);
        // The log's mode is the file's (sqlx's writer set it); the rest is per connection.
        connection
            .execute_batch(&format!(
                "PRAGMA synchronous = NORMAL; PRAGMA busy_timeout = 30000; \
                 PRAGMA wal_autocheckpoint = {WRITER_CHECKPOINT_PAGES};"
            ))
            .map_err(direct_error)?;
        Ok(DirectConnection { connection })
    }

    /// Begins a transaction that writes. One left open by a group that stopped half-way (a
    /// bug that panicked) is rolled back first.
    pub(super) fn begin(&mut self) -> Result<()> {
        if !self.connection.is_autocommit() {
            log::warn!("rolling back a group of writes left half-way");
            self.connection
                .execute_batch("ROLLBACK")
                .map_err(direct_error)?;
        }
        self.connection
            .execute_batch("BEGIN IMMEDIATE")
            .map_err(direct_error)
    }

    /// Commits the transaction [`DirectConnection::begin`] began, or rolls it back when the
    /// group failed, and returns the group's result.
    pub(super) fn finish<T>(&mut self, group: Result<T>) -> Result<T> {
        match group {
            Ok(value) => {
                self.connection
                    .execute_batch("COMMIT")
                    .map_err(direct_error)?;
                Ok(value)
            }
            Err(error) => {
                if let Err(rollback) = self.connection.execute_batch("ROLLBACK") {
                    log::warn!("rolling back a failed group of writes: {rollback}");
                }
                Err(error)
            }
        }
    }

    fn statement<'c>(
        &'c self,
        sql: &str,
        params: &[Param<'_>],
    ) -> rusqlite::Result<rusqlite::CachedStatement<'c>> {
        let mut statement = self.connection.prepare_cached(sql)?;
        let count = statement.parameter_count();
        if count != params.len() {
            return Err(rusqlite::Error::InvalidParameterCount(params.len(), count));
        }
        // `$n` is bound to the nth value wherever it stands; `?` to the value of its place.
        // (A statement's parameters are all one or all the other, so asking the names, which
        // costs a walk of the name list each, is needed only for a statement with a `$`.)
        let numbered = sql.contains('$');
        for place in 1..=count {
            let index = match statement.parameter_name(place) {
                Some(name) if numbered => name
                    .strip_prefix('$')
                    .and_then(|number| number.parse::<usize>().ok())
                    .filter(|number| (1..=count).contains(number))
                    .ok_or_else(|| rusqlite::Error::InvalidParameterName(name.to_owned()))?,
                _ => place,
            };
            statement.raw_bind_parameter(place, params[index - 1])?;
        }
        Ok(statement)
    }

    fn fetch_now(&self, sql: &str, params: &[Param<'_>]) -> rusqlite::Result<Vec<Fetched>> {
        let mut statement = self.statement(sql, params)?;
        let columns = statement.column_count();
        let mut rows = statement.raw_query();
        let mut found = Vec::new();
        while let Some(row) = rows.next()? {
            let values = (0..columns)
                .map(|index| row.get::<_, Value>(index))
                .collect::<rusqlite::Result<Vec<Value>>>()?;
            found.push(Fetched::Direct(values));
        }
        Ok(found)
    }

    fn execute_now(&self, sql: &str, params: &[Param<'_>]) -> rusqlite::Result<u64> {
        let mut statement = self.statement(sql, params)?;
        Ok(statement.raw_execute()? as u64)
    }
}

fn direct_error(error: rusqlite::Error) -> StoreError {
    StoreError::Direct(error.to_string())
}

/// Each statement runs at once, on the calling thread (the group thread): the futures are
/// ready when made.
impl Statements for DirectConnection {
    fn fetch<'a>(
        &'a mut self,
        sql: &'a str,
        params: &'a [Param<'a>],
    ) -> impl Future<Output = Result<Vec<Fetched>>> + Send + 'a {
        std::future::ready(self.fetch_now(sql, params).map_err(direct_error))
    }

    fn execute<'a>(
        &'a mut self,
        sql: &'a str,
        params: &'a [Param<'a>],
    ) -> impl Future<Output = Result<u64>> + Send + 'a {
        std::future::ready(self.execute_now(sql, params).map_err(direct_error))
    }
}
