//! Drift at fleet scale: every device's drift summaries merged at ingest into one aggregate per
//! model version, label group and hour (`drift_hourly`), so that fleet-wide reads (`/metrics`,
//! the dashboard's history, a report's figures over a label group) read a row per label group and
//! hour instead of one per device and window, and reach back for months where the per-device rows
//! of `drift` are kept only for the telemetry retention.
//!
//! - The label group is the device's labels when the batch was stored, in one canonical form
//!   ([`label_group`]). An aggregate does not follow the device afterwards: a device relabelled
//!   later leaves its past hours in its old group, and a device revoked later stays in every hour
//!   it reported.
//! - The hour is the one a summary's window ends at (windows end on whole hours). The agent's
//!   windows are hourly, so each lands in its own hour; a longer window (the agent's daily
//!   roll-up of a full cache) lands whole in its last hour, as the per-device rows file it by its
//!   end too.
//! - Summaries are merged in the batch's own transaction (shared with the other batches of its
//!   group, see `ingest`), after its idempotency key is taken: a batch is merged once or not at
//!   all, like its per-device rows. A summary that does not merge
//!   into its aggregate (counts that would overflow, a summary of another profile) is left out of
//!   it, counted in the row's `left_out` and logged, and the batch is stored all the same.
//! - A group of batches costs one read-modify-write per (model, version, hour, label group) it
//!   touches, whatever its number of batches and windows, done last in its transaction (but for
//!   the hourly inference counters of `stats_hourly`, which come after) and in key order: on
//!   PostgreSQL the row is locked (`FOR UPDATE`) from then to the commit, and every device of a
//!   label group writes the same row, so it is held as briefly as the group allows and taken in
//!   one order by all.
//! - A store made before the table existed starts with it empty: aggregates begin at the upgrade
//!   (and at `admin migrate` for a store of release 0.1), and the hours before it are only in the
//!   per-device rows, for as long as the telemetry retention keeps them.

use outpost_protocol::drift::DriftError;
use outpost_protocol::Label;
use sqlx::any::AnyRow;
use sqlx::AnyPool;

use super::statements::{Fetched, Param, Statements};

use super::sql::for_update;
use super::*;

/// One hour of one label group's drift summaries of a model version, merged.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredHourly {
    /// The labels its devices had when their summaries were stored, as [`label_group`] writes
    /// them; empty for devices without labels.
    pub label_group: String,
    /// Unix second the hour ends at: the end of the windows merged in.
    pub hour: u64,
    /// Per-device summaries merged in, one per device and window however many uploads it took:
    /// with hourly windows, the devices that reported that hour.
    pub devices: u64,
    /// Uploads merged in.
    pub uploads: u64,
    /// Uploads left out because they did not merge.
    pub left_out: u64,
    pub summary: DriftSummary,
}

impl StoredHourly {
    /// The labels of [`StoredHourly::label_group`].
    pub fn labels(&self) -> Vec<Label> {
        group_labels(&self.label_group)
    }
}

/// A device's labels as an aggregate's label group: sorted, each once, `key=value` joined by `,`
/// (neither character is allowed in a label), and empty for none.
pub fn label_group(labels: &[Label]) -> String {
    let mut sorted: Vec<&Label> = labels.iter().collect();
    sorted.sort();
    sorted.dedup();
    let texts: Vec<String> = sorted.iter().map(ToString::to_string).collect();
    texts.join(",")
}

/// The labels of a label group [`label_group`] wrote.
pub fn group_labels(group: &str) -> Vec<Label> {
    group
        .split(',')
        .filter_map(|text| text.split_once('='))
        .map(|(key, value)| Label {
            key: key.to_owned(),
            value: value.to_owned(),
        })
        .collect()
}

/// An aggregate's key past its label group: model, version and hour.
pub(super) type HourKey = (String, i64, i64);

/// What a batch adds to one aggregate: for each per-device row of the batch in that hour,
/// whether the batch creates the row, and its parts (each with its window's index in the batch).
pub(super) type HourParts<'a> = Vec<(bool, &'a [(usize, &'a DriftSummary)])>;

/// The hour a window ending at `end` is aggregated in.
pub(super) fn hour_of(end: i64) -> i64 {
    end - end.rem_euclid(3600)
}

/// One aggregate's share of a batch, merged before it is written.
#[derive(Default)]
struct Share {
    merged: Option<DriftSummary>,
    uploads: u64,
    devices: u64,
    left_out: u64,
}

/// Adds `summary` to `merged`, starting it when empty.
fn merge_into(
    merged: &mut Option<DriftSummary>,
    summary: &DriftSummary,
) -> std::result::Result<(), DriftError> {
    match merged {
        Some(merged) => merged.merge(summary),
        None => {
            *merged = Some(summary.clone());
            Ok(())
        }
    }
}

/// A merged summary as an aggregate's record: like a `drift` row's, its protocol frame, the
/// uploads merged into it and when it last changed. Counts grow as summaries merge, and with them
/// their encoding: a merge whose frame would pass the summary's cap is refused here, and left out
/// of the aggregate by the caller like one that does not merge.
fn encode_hourly(
    summary: &DriftSummary,
    uploads: u64,
    now: u64,
) -> std::result::Result<Vec<u8>, String> {
    let frame = outpost_protocol::encode(summary).map_err(|error| error.to_string())?;
    let record = DriftRecord {
        frame,
        parts: uploads,
        updated: now,
    };
    encode("drift_hourly", &record).map_err(|error| error.to_string())
}

/// An aggregate's record read back: its summary and the uploads merged into it.
fn decode_hourly(bytes: &[u8]) -> Result<(DriftSummary, u64)> {
    let record: DriftRecord = decode("drift_hourly", bytes)?;
    let summary = outpost_protocol::decode::<DriftSummary>(&record.frame).map_err(|error| {
        StoreError::Corrupt {
            table: "drift_hourly",
            reason: error.to_string(),
        }
    })?;
    Ok((summary, record.parts))
}

/// Aggregates kept at most by [`DecodedHours`]: past the hours of many model versions and label
/// groups that one hub's groups merge into at a time.
const DECODED_HOURS: usize = 64;

/// The aggregates this store last wrote, with their summaries decoded: under load each group
/// reads back, byte for byte, what the group before it wrote, and decoding a 100-feature summary
/// again was about a twelfth of a group's work. A row read is used decoded only when its bytes
/// are the ones kept, so one another hub wrote, or a group rolled back, is decoded as read.
#[derive(Debug, Default)]
pub(super) struct DecodedHours {
    entries: std::sync::Mutex<std::collections::HashMap<(HourKey, String), Decoded>>,
}

#[derive(Debug)]
struct Decoded {
    record: Vec<u8>,
    summary: DriftSummary,
    uploads: u64,
}

impl DecodedHours {
    fn lock(
        &self,
    ) -> std::sync::MutexGuard<'_, std::collections::HashMap<(HourKey, String), Decoded>> {
        self.entries
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The summary and uploads of the aggregate `key` whose stored record is `record`: taken
    /// from what was kept when it is that record, decoded otherwise.
    fn take_or_decode(
        &self,
        key: &HourKey,
        label_group: &str,
        record: &[u8],
    ) -> Result<(DriftSummary, u64)> {
        let kept = {
            let mut entries = self.lock();
            let entry = (key.clone(), label_group.to_owned());
            match entries.get(&entry) {
                Some(kept) if kept.record == record => entries.remove(&entry),
                _ => None,
            }
        };
        match kept {
            Some(kept) => Ok((kept.summary, kept.uploads)),
            None => decode_hourly(record),
        }
    }

    /// Keeps `summary` as what `record`, just written for `key`, decodes to.
    fn keep(
        &self,
        key: &HourKey,
        label_group: &str,
        record: Vec<u8>,
        summary: DriftSummary,
        uploads: u64,
    ) {
        let mut entries = self.lock();
        let entry = (key.clone(), label_group.to_owned());
        if entries.len() >= DECODED_HOURS && !entries.contains_key(&entry) {
            // Any one goes: this only saves decoding.
            if let Some(evicted) = entries.keys().next().cloned() {
                entries.remove(&evicted);
            }
        }
        entries.insert(
            entry,
            Decoded {
                record,
                summary,
                uploads,
            },
        );
    }
}

/// Merges a group of batches' drift summaries into their aggregates, one read-modify-write per
/// entry of `hours` (an aggregate's key and label group), in their order, within the group's
/// transaction `connection`, decoding only what `decoded` does not hold.
pub(super) async fn merge_hourly<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    decoded: &DecodedHours,
    hours: BTreeMap<(HourKey, &str), HourParts<'_>>,
    now: u64,
) -> Result<()> {
    for (((model, version, hour), label_group), rows) in hours {
        let mut share = Share::default();
        for (creates_row, parts) in rows {
            let mut merged_any = false;
            for &(_, summary) in parts {
                match merge_into(&mut share.merged, summary) {
                    Ok(()) => {
                        share.uploads += 1;
                        merged_any = true;
                    }
                    Err(error) => {
                        share.left_out += 1;
                        log::warn!(
                            "drift: a summary of {model}@{version} ending at {hour} is left out of \
                             label group {label_group:?}'s hourly aggregate: {error}"
                        );
                    }
                }
            }
            if creates_row && merged_any {
                share.devices += 1;
            }
        }
        let key = (model, version, hour);
        let stored = match read_locked(connection, dialect, &key, label_group).await? {
            Some(stored) => Some(stored),
            None => {
                let Some(merged) = share.merged.take() else {
                    continue;
                };
                let record = match encode_hourly(&merged, share.uploads, now) {
                    Ok(record) => record,
                    Err(reason) => {
                        log::warn!(
                            "drift: {} summaries of {}@{} ending at {} are left out of label \
                             group {label_group:?}'s hourly aggregate: {reason}",
                            share.uploads,
                            key.0,
                            key.1,
                            key.2
                        );
                        continue;
                    }
                };
                let inserted = connection
                    .execute(
                        "INSERT INTO drift_hourly (model, version, hour, label_group, record, \
                         devices, left_out) VALUES ($1, $2, $3, $4, $5, $6, $7) \
                         ON CONFLICT (model, version, hour, label_group) DO NOTHING",
                        &with_hour_key(
                            &key,
                            label_group,
                            [
                                Param::from(&record),
                                Param::Int(int("drift aggregate devices", share.devices)?),
                                Param::Int(int("drift aggregate left out", share.left_out)?),
                            ],
                        ),
                    )
                    .await?;
                if inserted == 1 {
                    decoded.keep(&key, label_group, record, merged, share.uploads);
                    continue;
                }
                share.merged = Some(merged);
                // Another batch of the group created it meanwhile (on PostgreSQL this insert
                // waited for that batch to commit): merge into what it wrote.
                read_locked(connection, dialect, &key, label_group).await?
            }
        };
        let Some((bytes, devices, left_out)) = stored else {
            return Err(StoreError::Corrupt {
                table: "drift_hourly",
                reason: format!(
                    "the aggregate of {}@{} at {} ({label_group:?}) is neither stored nor new",
                    key.0, key.1, key.2
                ),
            });
        };
        let (mut summary, uploads) = decoded.take_or_decode(&key, label_group, &bytes)?;
        let uploads = uploads.saturating_add(share.uploads);
        let mut left_out = left_out.saturating_add(share.left_out);
        let mut record = None;
        let mut devices = devices;
        if let Some(merged) = &share.merged {
            let merged = summary
                .merge(merged)
                .map_err(|error| error.to_string())
                .and_then(|()| encode_hourly(&summary, uploads, now));
            match merged {
                Ok(bytes) => {
                    record = Some(bytes);
                    devices = devices.saturating_add(share.devices);
                }
                Err(reason) => {
                    left_out = left_out.saturating_add(share.uploads);
                    log::warn!(
                        "drift: {} summaries of {}@{} ending at {} are left out of label group \
                         {label_group:?}'s hourly aggregate: {reason}",
                        share.uploads,
                        key.0,
                        key.1,
                        key.2
                    );
                }
            }
        }
        let query = match &record {
            Some(_) => {
                "UPDATE drift_hourly SET record = $5, devices = $6, left_out = $7 \
                 WHERE model = $1 AND version = $2 AND hour = $3 AND label_group = $4"
            }
            None => {
                "UPDATE drift_hourly SET left_out = $5 \
                 WHERE model = $1 AND version = $2 AND hour = $3 AND label_group = $4"
            }
        };
        let params = match &record {
            Some(record) => with_hour_key(
                &key,
                label_group,
                [
                    Param::from(record),
                    Param::Int(int("drift aggregate devices", devices)?),
                    Param::Int(int("drift aggregate left out", left_out)?),
                ],
            ),
            None => with_hour_key(
                &key,
                label_group,
                [Param::Int(int("drift aggregate left out", left_out)?)],
            ),
        };
        connection.execute(query, &params).await?;
        drop(params);
        // A summary whose merge failed may be half-merged: only a written one is kept.
        if let Some(record) = record {
            decoded.keep(&key, label_group, record, summary, uploads);
        }
    }
    Ok(())
}

/// One row of an hourly table (`drift_hourly`, `stats_hourly`) by its key, read by `query`
/// (binding model, version, hour and label group in that order), locked until the transaction
/// ends on PostgreSQL; none when it is not stored.
pub(super) async fn read_hour_locked<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    query: (&'static str, &'static str),
    key: &HourKey,
    label_group: &str,
) -> Result<Option<Fetched>> {
    let params = with_hour_key(key, label_group, []);
    let rows = connection.fetch(dialect.locking(query), &params).await?;
    Ok(rows.into_iter().next())
}

/// The parameters of an hourly row's key (model, version, hour and label group, `$1` to `$4`),
/// then `rest`.
pub(super) fn with_hour_key<'a, const N: usize>(
    (model, version, hour): &'a HourKey,
    label_group: &'a str,
    rest: [Param<'a>; N],
) -> Vec<Param<'a>> {
    let mut params = vec![
        Param::from(model),
        Param::Int(*version),
        Param::Int(*hour),
        Param::from(label_group),
    ];
    params.extend(rest);
    params
}

/// The rows of an hourly table for one model version's hours ending after `since`, read by
/// `query` (binding model, version and `since` in that order); none for a version above what
/// the store keeps.
pub(super) async fn hours_since(
    pool: &AnyPool,
    query: &'static str,
    name: &str,
    version: u64,
    since: u64,
) -> Result<Vec<AnyRow>> {
    let Ok(version) = i64::try_from(version) else {
        return Ok(Vec::new());
    };
    Ok(sqlx::query(query)
        .bind(name.to_owned())
        .bind(version)
        .bind(bound(since))
        .fetch_all(pool)
        .await?)
}

/// An aggregate's record, devices and uploads left out, locked until the transaction ends on
/// PostgreSQL; none when it is not stored.
async fn read_locked<S: Statements>(
    connection: &mut S,
    dialect: Dialect,
    key: &HourKey,
    label_group: &str,
) -> Result<Option<(Vec<u8>, u64, u64)>> {
    let query = for_update!(
        "SELECT record, devices, left_out FROM drift_hourly WHERE model = $1 AND version = $2 \
         AND hour = $3 AND label_group = $4"
    );
    let row = read_hour_locked(connection, dialect, query, key, label_group).await?;
    row.map(|row| {
        Ok((
            row.blob(0)?,
            row.uint("drift_hourly", 1)?,
            row.uint("drift_hourly", 2)?,
        ))
    })
    .transpose()
}

impl Store {
    /// Every label group's hourly drift aggregates of one model version for hours ending after
    /// `since`, oldest first.
    pub async fn drift_hourly(
        &self,
        name: &str,
        version: u64,
        since: u64,
    ) -> Result<Vec<StoredHourly>> {
        let query = "SELECT hour, label_group, record, devices, left_out FROM drift_hourly \
                     WHERE model = $1 AND version = $2 AND hour > $3 ORDER BY hour, label_group";
        hours_since(&self.pool, query, name, version, since)
            .await?
            .iter()
            .map(|row| {
                let (summary, uploads) = decode_hourly(&blob(row, 2)?)?;
                Ok(StoredHourly {
                    hour: column_u64("drift_hourly", row, 0)?,
                    label_group: row.try_get::<String, _>(1)?,
                    devices: column_u64("drift_hourly", row, 3)?,
                    uploads,
                    left_out: column_u64("drift_hourly", row, 4)?,
                    summary,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_group_is_one_text_for_any_order_and_reads_back() {
        let labels = |texts: &[&str]| -> Vec<Label> {
            texts
                .iter()
                .map(|text| Label::parse(text).unwrap())
                .collect()
        };
        let group = label_group(&labels(&["tier=canary", "site=lab", "tier=canary"]));
        assert_eq!(group, "site=lab,tier=canary");
        assert_eq!(
            label_group(&labels(&["site=lab", "tier=canary"])),
            group,
            "the same labels in another order"
        );
        assert_eq!(group_labels(&group), labels(&["site=lab", "tier=canary"]));
        assert_eq!(label_group(&[]), "");
        assert!(group_labels("").is_empty());
    }
}
