//! Inference counters by the hour: every stored window's count, errors and latency histogram
//! added at ingest into one row per model version, label group and hour (`stats_hourly`), so
//! that error-rate and latency alert rules judge the last `window_secs` of a label group rather
//! than every inference since the version's first report. The per-device counters of `stats`
//! stay as they are, all-time: rollout gates and `device show` read those.
//!
//! The conventions are `drift_hourly`'s:
//!
//! - The label group is the device's labels when the batch was stored ([`label_group`]); a row
//!   does not follow a device relabelled or revoked afterwards.
//! - The hour is the one a window ends at ([`hour_of`]): an hourly window lands in its own hour,
//!   a longer one (the agent's daily roll-up) whole in its last.
//! - Counters are added in the batch's own transaction, after its idempotency key is taken, so a
//!   batch is counted once or not at all.
//! - A group of batches costs one read-modify-write per (model, version, hour, label group) it
//!   touches, in key order and last in its transaction, after the drift aggregates' (so every
//!   transaction takes the shared rows' locks in one order: drift aggregates, then these). On
//!   PostgreSQL the row is locked (`FOR UPDATE`) from its read to the commit.
//! - A store made before the table existed (schema 7), or filled by `admin migrate` from release
//!   0.1, starts with it empty: hourly counters begin at the upgrade, and an alert rule sees only
//!   what arrived since.
//!
//! [`label_group`]: super::drift_hourly::label_group
//! [`hour_of`]: super::drift_hourly::hour_of

use super::statements::{Param, Statements};
use outpost_protocol::Label;

use super::drift_hourly::{group_labels, hours_since, read_hour_locked, with_hour_key, HourKey};
use super::sql::for_update;
use super::*;

/// One hour of one label group's inference counters of a model version, added up.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredHourlyStats {
    /// The labels its devices had when their windows were stored, as `label_group` writes them;
    /// empty for devices without labels.
    pub label_group: String,
    /// Unix second the hour ends at: the end of the windows added in.
    pub hour: u64,
    pub stats: StatsRecord,
}

impl StoredHourlyStats {
    /// The labels of [`StoredHourlyStats::label_group`].
    pub fn labels(&self) -> Vec<Label> {
        group_labels(&self.label_group)
    }
}

/// Adds a group of batches' counters to their hourly rows, one read-modify-write per entry of
/// `hours` (a row's key and label group, with what the group adds to it), in their order, within
/// the group's transaction `connection`.
pub(super) async fn add_hourly_stats<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    hours: BTreeMap<(HourKey, &str), StatsRecord>,
) -> Result<()> {
    for ((key, label_group), added) in hours {
        let stored = match read_locked(connection, dialect, &key, label_group).await? {
            Some(stored) => stored,
            None => {
                let record = encode("stats_hourly", &added)?;
                let inserted = connection
                    .execute(
                        "INSERT INTO stats_hourly (model, version, hour, label_group, record) \
                         VALUES ($1, $2, $3, $4, $5) \
                         ON CONFLICT (model, version, hour, label_group) DO NOTHING",
                        &with_hour_key(&key, label_group, [Param::from(&record)]),
                    )
                    .await?;
                if inserted == 1 {
                    continue;
                }
                // Another batch of the group created it meanwhile (on PostgreSQL this insert
                // waited for that batch to commit): add to what it wrote.
                read_locked(connection, dialect, &key, label_group)
                    .await?
                    .ok_or_else(|| StoreError::Corrupt {
                        table: "stats_hourly",
                        reason: format!(
                            "the counters of {}@{} at {} ({label_group:?}) are neither stored \
                             nor new",
                            key.0, key.1, key.2
                        ),
                    })?
            }
        };
        let mut record: StatsRecord = decode("stats_hourly", &stored)?;
        record.add(added.count, added.errors, &added.latency_buckets);
        let record = encode("stats_hourly", &record)?;
        connection
            .execute(
                "UPDATE stats_hourly SET record = $5 \
                 WHERE model = $1 AND version = $2 AND hour = $3 AND label_group = $4",
                &with_hour_key(&key, label_group, [Param::from(&record)]),
            )
            .await?;
    }
    Ok(())
}

/// A row's record, locked until the transaction ends on PostgreSQL; none when it is not stored.
async fn read_locked<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    key: &HourKey,
    label_group: &str,
) -> Result<Option<Vec<u8>>> {
    let query = for_update!(
        "SELECT record FROM stats_hourly WHERE model = $1 AND version = $2 AND hour = $3 \
         AND label_group = $4"
    );
    let row = read_hour_locked(connection, dialect, query, key, label_group).await?;
    row.map(|row| row.blob(0)).transpose()
}

impl Store {
    /// Every label group's hourly inference counters of one model version for hours ending after
    /// `since`, oldest first.
    pub async fn stats_hourly(
        &self,
        name: &str,
        version: u64,
        since: u64,
    ) -> Result<Vec<StoredHourlyStats>> {
        let query = "SELECT hour, label_group, record FROM stats_hourly \
                     WHERE model = $1 AND version = $2 AND hour > $3 ORDER BY hour, label_group";
        hours_since(&self.pool, query, name, version, since)
            .await?
            .iter()
            .map(|row| {
                Ok(StoredHourlyStats {
                    hour: column_u64("stats_hourly", row, 0)?,
                    label_group: row.try_get::<String, _>(1)?,
                    stats: decode("stats_hourly", &blob(row, 2)?)?,
                })
            })
            .collect()
    }
}
