//! What hubs sharing one database agree on through it: which of them runs the rollout engine (a
//! lease that moves when its holder stops renewing it), one rollout change at a time across all
//! of them, and the nonces of signed device requests, so a request replayed to another hub is
//! refused there too and a device's rate limit counts its requests to every hub. On SQLite, one hub process owns the store (its file lock), so the rollout
//! lock is the process's own and nonces stay in the hub's memory.

use std::ops::Range;

use sqlx::pool::PoolConnection;
use sqlx::{Any, Executor};

use super::*;

/// What [`Store::note_nonce`] found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NonceNote {
    /// Recorded: no hub saw it before.
    New,
    /// A hub sharing the database saw this nonce before.
    Replayed,
    /// The device is over its rate limit on the hubs together; not recorded.
    OverQuota,
}

/// The rollout engine's lease.
pub const ENGINE_LEASE: &str = "engine";

/// Any constant all hubs agree on, for PostgreSQL's advisory lock on rollout changes ("rollout"
/// in ASCII).
const ROLLOUT_LOCK_KEY: i64 = 0x0072_6f6c_6c6f_7574;

/// Held while a rollout or retirement changes: by this process alone on SQLite, by every hub
/// sharing the database on PostgreSQL (a session advisory lock on a connection of its own).
/// Dropping it releases both; the connection is closed rather than returned to the pool, which
/// ends its session and with it the lock, whatever path the holder left by.
#[derive(Debug)]
pub struct RolloutLock {
    _local: tokio::sync::OwnedMutexGuard<()>,
    connection: Option<PoolConnection<Any>>,
}

impl Drop for RolloutLock {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            drop(connection.detach());
        }
    }
}

impl Store {
    /// Takes or renews `lease` for `holder` until `now_ms + ttl_ms` (Unix milliseconds), unless
    /// another holder has it and it has not expired. Returns whether `holder` holds it now. One
    /// statement, so two hubs asking at once cannot both get it.
    pub async fn hold_lease(
        &self,
        lease: &str,
        holder: &str,
        now_ms: u64,
        ttl_ms: u64,
    ) -> Result<bool> {
        let written = sqlx::query(
            "INSERT INTO leases (name, holder, expires_ms) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO UPDATE SET holder = excluded.holder, \
             expires_ms = excluded.expires_ms \
             WHERE leases.holder = excluded.holder OR leases.expires_ms <= $4",
        )
        .bind(lease.to_owned())
        .bind(holder.to_owned())
        .bind(int("lease expiry", now_ms.saturating_add(ttl_ms))?)
        .bind(int("time", now_ms)?)
        .execute(&self.writer)
        .await?;
        Ok(written.rows_affected() == 1)
    }

    /// Gives `lease` up if `holder` has it, so another hub takes it at once.
    pub async fn release_lease(&self, lease: &str, holder: &str) -> Result<()> {
        sqlx::query("DELETE FROM leases WHERE name = $1 AND holder = $2")
            .bind(lease.to_owned())
            .bind(holder.to_owned())
            .execute(&self.writer)
            .await?;
        Ok(())
    }

    /// Who holds `lease` and until when (Unix milliseconds), if anyone ever took it.
    pub async fn lease(&self, lease: &str) -> Result<Option<(String, u64)>> {
        sqlx::query("SELECT holder, expires_ms FROM leases WHERE name = $1")
            .bind(lease.to_owned())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| Ok((row.try_get::<String, _>(0)?, column_u64("leases", &row, 1)?)))
            .transpose()
    }

    /// Waits for, and takes, the lock on rollout changes; see [`RolloutLock`].
    pub async fn lock_rollouts(&self) -> Result<RolloutLock> {
        let local = self.rollout_lock.clone().lock_owned().await;
        let connection = match self.dialect {
            Dialect::Sqlite => None,
            Dialect::Postgres => {
                let mut connection = self.pool.acquire().await?;
                connection
                    .execute(sqlx::query("SELECT pg_advisory_lock($1)").bind(ROLLOUT_LOCK_KEY))
                    .await?;
                Some(connection)
            }
        };
        Ok(RolloutLock {
            _local: local,
            connection,
        })
    }

    /// Whether other hubs may share this store (PostgreSQL): then nonces are kept in it, and
    /// each hub reads rollout changes back from it.
    pub fn shared(&self) -> bool {
        self.dialect == Dialect::Postgres
    }

    /// Records that `device` used `nonce` in a request that is acceptable until `expires` (Unix
    /// seconds), unless any hub sharing the database saw it before ([`NonceNote::Replayed`]), or
    /// the device already used `quota` nonces expiring within `bucket` on all hubs together
    /// ([`NonceNote::OverQuota`]: the per-device rate limit, held across hubs). A replay is
    /// reported as one even past the quota. Two hubs counting at once may each let one request
    /// past the quota.
    pub async fn note_nonce(
        &self,
        device: &[u8; 16],
        nonce: &[u8; 16],
        expires: u64,
        bucket: Range<u64>,
        quota: u64,
    ) -> Result<NonceNote> {
        // One statement, so an accepted request costs one round trip: the nonce is written only
        // while the device's count in the bucket is under the quota.
        let written = sqlx::query(
            "INSERT INTO nonces (device, nonce, expires) SELECT $1, $2, $3 \
             WHERE (SELECT COUNT(*) FROM nonces \
                    WHERE device = $4 AND expires >= $5 AND expires < $6) < $7 \
             ON CONFLICT (device, nonce) DO NOTHING",
        )
        .bind(device.to_vec())
        .bind(nonce.to_vec())
        .bind(int("nonce expiry", expires)?)
        .bind(device.to_vec())
        .bind(bound(bucket.start))
        .bind(bound(bucket.end))
        .bind(bound(quota))
        .execute(&self.writer)
        .await?;
        if written.rows_affected() == 1 {
            return Ok(NonceNote::New);
        }
        // Refused: a nonce seen before is a replay whatever the count; otherwise the quota.
        let seen: Option<i64> =
            sqlx::query_scalar("SELECT 1 FROM nonces WHERE device = $1 AND nonce = $2")
                .bind(device.to_vec())
                .bind(nonce.to_vec())
                .fetch_optional(&self.writer)
                .await?;
        Ok(match seen {
            Some(_) => NonceNote::Replayed,
            None => NonceNote::OverQuota,
        })
    }

    /// Removes nonces whose requests can no longer be accepted. Returns how many went.
    pub async fn prune_nonces(&self, now: u64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM nonces WHERE expires < $1")
            .bind(bound(now))
            .execute(&self.writer)
            .await?
            .rows_affected())
    }
}
