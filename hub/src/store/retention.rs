//! What the store keeps, and for how long: a misbehaving device must not fill the hub's disk.
//!
//! - A device's events (its status reports, enrollment, label changes) are kept up to a number
//!   per device, newest first; the oldest beyond it go at the next event of that device.
//! - Telemetry (drift summaries and shadow comparisons, by hourly window) is kept for a time:
//!   windows that end before it are removed by [`Store::prune_telemetry`], which the engine runs
//!   on its tick, and never stored by ingest in the first place.
//! - A device's batch markers (the idempotency keys of telemetry batches) older than that time
//!   go at its next batch, except its newest, which keeps its sequences increasing.
//! - Hourly drift aggregates and hourly inference counters (each one row per model version, label
//!   group and hour, whatever the number of devices) are kept for a time of their own, much
//!   longer: [`Store::prune_hourly`] removes the hours that ended before it from both, on the same
//!   tick.
//!
//! Each device's inference counters are one record per published model version, and outcomes one
//! per device and plan, so neither grows with time.

use super::*;

/// How much the store keeps. The defaults are `outpost-hub serve`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events kept per device.
    pub events_per_device: usize,
    /// Seconds telemetry windows and batch markers are kept after their end.
    pub telemetry_secs: u64,
    /// Seconds hourly drift aggregates and hourly inference counters are kept after their hour
    /// ends.
    pub drift_aggregate_secs: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            events_per_device: 1000,
            telemetry_secs: 30 * 24 * 3600,
            drift_aggregate_secs: 400 * 24 * 3600,
        }
    }
}

/// What one [`Store::prune_telemetry`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub drift: u64,
    pub shadow: u64,
}

/// What one [`Store::prune_hourly`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PrunedHourly {
    /// Rows of `drift_hourly`.
    pub drift: u64,
    /// Rows of `stats_hourly`.
    pub stats: u64,
}

impl Store {
    /// Removes the hourly drift aggregates and hourly inference counters of hours that ended
    /// before `cutoff`.
    pub async fn prune_hourly(&self, cutoff: u64) -> Result<PrunedHourly> {
        let drift = sqlx::query("DELETE FROM drift_hourly WHERE hour < $1")
            .bind(bound(cutoff))
            .execute(&self.writer)
            .await?
            .rows_affected();
        let stats = sqlx::query("DELETE FROM stats_hourly WHERE hour < $1")
            .bind(bound(cutoff))
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(PrunedHourly { drift, stats })
    }

    /// Removes `device`'s events beyond the newest `keep`. Returns how many went.
    pub async fn prune_events(&self, device: &[u8; 16], keep: usize) -> Result<u64> {
        let keep = i64::try_from(keep).unwrap_or(i64::MAX);
        let removed = sqlx::query(
            "DELETE FROM events WHERE device = $1 AND id NOT IN \
             (SELECT id FROM events WHERE device = $1 ORDER BY id DESC LIMIT $2)",
        )
        .bind(device.to_vec())
        .bind(keep)
        .execute(&self.writer)
        .await?;
        Ok(removed.rows_affected())
    }

    /// Removes the drift summaries and shadow comparisons of windows that ended before `cutoff`.
    pub async fn prune_telemetry(&self, cutoff: u64) -> Result<Pruned> {
        let drift = sqlx::query("DELETE FROM drift WHERE window_end < $1")
            .bind(bound(cutoff))
            .execute(&self.writer)
            .await?
            .rows_affected();
        let shadow = sqlx::query("DELETE FROM shadow WHERE window_end < $1")
            .bind(bound(cutoff))
            .execute(&self.writer)
            .await?
            .rows_affected();
        Ok(Pruned { drift, shadow })
    }

    /// Whether `name` version `version` was published here.
    pub async fn has_manifest(&self, name: &str, version: u64) -> Result<bool> {
        Ok(self.manifest(name, version).await?.is_some())
    }
}
