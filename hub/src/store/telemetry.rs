//! Telemetry ingest, exactly once in one transaction, and the reads of what it stored:
//! inference counters, drift summaries and shadow comparisons. The hourly drift aggregates that
//! ingest also merges into are `drift_hourly`'s.

use std::collections::BTreeSet;

use outpost_protocol::Label;

use super::drift_hourly::{hour_of, label_group, merge_hourly, HourKey, HourParts};
use super::*;

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
    /// The batch is not stored and a later batch of its device, `highest`, is: a device's
    /// sequences only increase, so the batch is refused and nothing of it is stored. (Only a batch
    /// racing a later one of its device, which an agent cannot send, may have added to some
    /// records before the later one was found.)
    OutOfOrder { highest: u64 },
}

/// A record telemetry batches add to (stats, drift, shadow, device), as stored since batches are
/// applied record by record: the record's own postcard encoding followed by the sequence of the
/// last batch of its device added into it (postcard writes a struct's fields one after another
/// with nothing around them).
///
/// Records written before carry no sequence: their bytes are the record alone. Reading one as an
/// `Applied` runs out of bytes where the sequence would start, so [`decode_applied`] reads it in the
/// old form, with no batch known to be applied: every batch stored before has its idempotency key,
/// which is checked first. A hub of the previous version reads the new form too, since postcard
/// ignores bytes after a value.
#[derive(Serialize, Deserialize)]
pub(super) struct Applied<R> {
    record: R,
    /// Sequence of the last batch of the record's device added into it.
    sequence: u64,
}

/// Reads a record telemetry batches add to, in either form, with the sequence of the last batch
/// known to be added into it.
pub(super) fn decode_applied<T: DeserializeOwned>(
    tree: &'static str,
    bytes: &[u8],
) -> Result<(T, Option<u64>)> {
    match postcard::from_bytes::<Applied<T>>(bytes) {
        Ok(applied) => Ok((applied.record, Some(applied.sequence))),
        Err(_) => Ok((decode(tree, bytes)?, None)),
    }
}

/// [`decode_applied`] for a reader, which needs no sequence.
pub(super) fn decode_applied_record<T: DeserializeOwned>(
    tree: &'static str,
    bytes: &[u8],
) -> Result<T> {
    decode_applied(tree, bytes).map(|(record, _)| record)
}

/// Writes a record telemetry batches add to; with no batch applied, in the old form.
pub(super) fn encode_applied<T: Serialize>(
    tree: &'static str,
    record: &T,
    sequence: Option<u64>,
) -> Result<Vec<u8>> {
    match sequence {
        Some(sequence) => encode(tree, &Applied { record, sequence }),
        None => encode(tree, record),
    }
}

/// Merges the batch's `parts` of one window into the drift record `current` (none for a new
/// window): the merged record, or why a part does not merge, naming its window.
fn merge_drift(
    current: Option<&[u8]>,
    parts: &[(usize, &DriftSummary)],
    now: u64,
) -> Result<std::result::Result<DriftRecord, (usize, String)>> {
    let mut merged: Option<(DriftSummary, u64)> = match current {
        None => None,
        Some(bytes) => {
            let (record, _) = decode_applied::<DriftRecord>("drift", bytes)?;
            let summary =
                outpost_protocol::decode::<DriftSummary>(&record.frame).map_err(|error| {
                    StoreError::Corrupt {
                        table: "drift",
                        reason: error.to_string(),
                    }
                })?;
            Some((summary, record.parts))
        }
    };
    let mut last_window = 0;
    for &(window, summary) in parts {
        last_window = window;
        merged = Some(match merged {
            None => (summary.clone(), 1),
            Some((mut stored, n_parts)) => {
                if let Err(error) = stored.merge(summary) {
                    return Ok(Err((
                        window,
                        format!(
                            "drift summary does not merge with the parts of its window stored \
                             before: {error}"
                        ),
                    )));
                }
                (stored, n_parts.saturating_add(1))
            }
        });
    }
    let Some((summary, parts)) = merged else {
        return Ok(Err((last_window, "no drift summary to store".to_owned())));
    };
    match outpost_protocol::encode(&summary) {
        Ok(frame) => Ok(Ok(DriftRecord {
            frame,
            parts,
            updated: now,
        })),
        Err(error) => Ok(Err((last_window, format!("merged drift summary: {error}")))),
    }
}

/// A drift record's key: model, version, window end, window start, device.
type DriftKey = (String, i64, i64, i64);
/// A shadow record's key past its device: target, window end, window start, active model and
/// version.
type ShadowKey = (Vec<u8>, i64, i64, String, i64);

impl Store {
    // Telemetry.

    /// Stores a telemetry batch exactly once, in one transaction.
    ///
    /// The batch's idempotency key `(device, sequence)` is inserted first: a copy of the batch
    /// already stored, or being stored by another request or another hub (which holds the key's
    /// row until it commits), makes this one [`Ingested::Duplicate`]. On PostgreSQL the device's
    /// row is locked as well, so one device's batches are applied one at a time across hubs.
    ///
    /// A device's sequences only increase (the agent forms batch n+1 after n is acknowledged and
    /// keeps a floor across cache quarantines), so a batch below one already stored for its device
    /// is refused as [`Ingested::OutOfOrder`]; the agent never sends one.
    ///
    /// A drift summary that does not merge with its device's window (its counts would overflow)
    /// refuses the whole batch and nothing of it is written, not even its idempotency key.
    ///
    /// Each drift summary stored is also merged into the hourly aggregate of its model version
    /// and of the label group of `labels`, the device's labels now (see `drift_hourly`); one that
    /// does not merge there is left out of the aggregate and counted, and refuses nothing.
    pub async fn ingest_telemetry(
        &self,
        device: &[u8; 16],
        labels: &[Label],
        sequence: u64,
        windows: &[WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<Ingested> {
        let batch = int("telemetry batch sequence", sequence)?;
        let id = device.to_vec();
        let mut transaction = self.writer.begin().await?;
        if self.dialect == Dialect::Postgres {
            sqlx::query("SELECT 1 FROM devices WHERE id = $1 FOR UPDATE")
                .bind(id.clone())
                .fetch_optional(&mut *transaction)
                .await?;
        }
        let marked = sqlx::query(
            "INSERT INTO telemetry_seen (device, sequence, stored_at) VALUES ($1, $2, $3) \
             ON CONFLICT (device, sequence) DO NOTHING",
        )
        .bind(id.clone())
        .bind(batch)
        .bind(int("time", now)?)
        .execute(&mut *transaction)
        .await?;
        if marked.rows_affected() == 0 {
            return Ok(Ingested::Duplicate);
        }
        let highest: Option<i64> = sqlx::query_scalar(
            "SELECT MAX(sequence) FROM telemetry_seen WHERE device = $1 AND sequence > $2",
        )
        .bind(id.clone())
        .bind(batch)
        .fetch_one(&mut *transaction)
        .await?;
        if let Some(highest) = highest {
            return Ok(Ingested::OutOfOrder {
                highest: uint("telemetry_seen", highest)?,
            });
        }

        let mut stats: BTreeMap<(String, i64), Vec<&WindowInput>> = BTreeMap::new();
        let mut drift: BTreeMap<DriftKey, Vec<(usize, &DriftSummary)>> = BTreeMap::new();
        let mut shadow: BTreeMap<ShadowKey, Vec<&ShadowReport>> = BTreeMap::new();
        for (index, window) in windows.iter().enumerate() {
            let version = int("model version", window.version)?;
            stats
                .entry((window.model.clone(), version))
                .or_default()
                .push(window);
            if let Some(summary) = &window.drift {
                let key = (
                    window.model.clone(),
                    version,
                    int("window end", summary.window_end)?,
                    int("window start", summary.window_start)?,
                );
                drift.entry(key).or_default().push((index, summary));
            }
            if let Some(report) = &window.shadow {
                let key = (
                    report.target.manifest_sha256.0.to_vec(),
                    int("window end", window.end)?,
                    int("window start", window.start)?,
                    window.model.clone(),
                    version,
                );
                shadow.entry(key).or_default().push(report);
            }
        }

        // The per-device rows this batch creates, which its aggregates count as devices.
        let mut created: BTreeSet<&DriftKey> = BTreeSet::new();
        for (key, parts) in &drift {
            let (model, version, end, start) = key;
            let stored = sqlx::query(
                "SELECT record FROM drift WHERE model = $1 AND version = $2 AND window_end = $3 \
                 AND window_start = $4 AND device = $5",
            )
            .bind(model.clone())
            .bind(*version)
            .bind(*end)
            .bind(*start)
            .bind(id.clone())
            .fetch_optional(&mut *transaction)
            .await?
            .map(|row| blob(&row, 0))
            .transpose()?;
            if stored.is_none() {
                created.insert(key);
            }
            let record = match merge_drift(stored.as_deref(), parts, now)? {
                Ok(record) => record,
                Err((window, reason)) => return Ok(Ingested::Refused { window, reason }),
            };
            sqlx::query(
                "INSERT INTO drift (model, version, window_end, window_start, device, record) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT \
                 (model, version, window_end, window_start, device) \
                 DO UPDATE SET record = excluded.record",
            )
            .bind(model.clone())
            .bind(*version)
            .bind(*end)
            .bind(*start)
            .bind(id.clone())
            .bind(encode_applied("drift", &record, None)?)
            .execute(&mut *transaction)
            .await?;
        }

        for ((model, version), windows) in stats {
            let stored = sqlx::query(
                "SELECT record FROM stats WHERE device = $1 AND model = $2 AND version = $3",
            )
            .bind(id.clone())
            .bind(model.clone())
            .bind(version)
            .fetch_optional(&mut *transaction)
            .await?;
            let mut record = match stored {
                Some(row) => decode_applied_record::<StatsRecord>("stats", &blob(&row, 0)?)?,
                None => StatsRecord::default(),
            };
            for window in &windows {
                record.add(window.count, window.errors, &window.latency_buckets);
            }
            sqlx::query(
                "INSERT INTO stats (device, model, version, record) VALUES ($1, $2, $3, $4) \
                 ON CONFLICT (device, model, version) DO UPDATE SET record = excluded.record",
            )
            .bind(id.clone())
            .bind(model)
            .bind(version)
            .bind(encode_applied("stats", &record, None)?)
            .execute(&mut *transaction)
            .await?;
        }

        for ((target, end, start, model, version), reports) in shadow {
            let stored = sqlx::query(
                "SELECT record FROM shadow WHERE target = $1 AND window_end = $2 \
                 AND window_start = $3 AND device = $4 AND active_model = $5 \
                 AND active_version = $6",
            )
            .bind(target.clone())
            .bind(end)
            .bind(start)
            .bind(id.clone())
            .bind(model.clone())
            .bind(version)
            .fetch_optional(&mut *transaction)
            .await?;
            let mut record = match stored {
                Some(row) => decode_applied_record::<ShadowRecord>("shadow", &blob(&row, 0)?)?,
                None => ShadowRecord::default(),
            };
            for report in &reports {
                record.add(report);
            }
            sqlx::query(
                "INSERT INTO shadow (target, window_end, window_start, device, active_model, \
                 active_version, record) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT \
                 (target, window_end, window_start, device, active_model, active_version) \
                 DO UPDATE SET record = excluded.record",
            )
            .bind(target)
            .bind(end)
            .bind(start)
            .bind(id.clone())
            .bind(model)
            .bind(version)
            .bind(encode_applied("shadow", &record, None)?)
            .execute(&mut *transaction)
            .await?;
        }

        if dropped_records > 0 {
            let stored = sqlx::query("SELECT record FROM devices WHERE id = $1")
                .bind(id.clone())
                .fetch_optional(&mut *transaction)
                .await?;
            // A batch of a device no longer stored has nowhere to count its drops.
            if let Some(row) = stored {
                let (mut record, applied) = super::devices::decode_device(&blob(&row, 0)?)?;
                record.dropped_records = record.dropped_records.saturating_add(dropped_records);
                sqlx::query("UPDATE devices SET record = $1 WHERE id = $2")
                    .bind(super::devices::encode_device(&record, applied)?)
                    .bind(id.clone())
                    .execute(&mut *transaction)
                    .await?;
            }
        }

        // Last, so that on PostgreSQL the aggregates' rows, which every device of a label group
        // writes, stay locked for as short a time as the batch allows.
        if !drift.is_empty() {
            let mut hours: BTreeMap<HourKey, HourParts<'_>> = BTreeMap::new();
            for (key, parts) in &drift {
                let (model, version, end, _) = key;
                hours
                    .entry((model.clone(), *version, hour_of(*end)))
                    .or_default()
                    .push((created.contains(key), parts.as_slice()));
            }
            merge_hourly(
                &mut transaction,
                self.dialect,
                &label_group(labels),
                hours,
                now,
            )
            .await?;
        }
        transaction.commit().await?;
        if dropped_records > 0 {
            self.device_written(device);
        }
        Ok(Ingested::Stored)
    }

    /// Every device's drift summaries of one model version whose windows end after `since`, in
    /// the order of their windows' ends.
    pub async fn drift_summaries(
        &self,
        name: &str,
        version: u64,
        since: u64,
    ) -> Result<Vec<StoredDrift>> {
        let Ok(version) = i64::try_from(version) else {
            return Ok(Vec::new());
        };
        let corrupt = |reason: String| StoreError::Corrupt {
            table: "drift",
            reason,
        };
        sqlx::query(
            "SELECT window_end, window_start, device, record FROM drift \
             WHERE model = $1 AND version = $2 AND window_end > $3 \
             ORDER BY window_end, window_start, device",
        )
        .bind(name.to_owned())
        .bind(version)
        .bind(bound(since))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            let (record, _) = decode_applied::<DriftRecord>("drift", &blob(row, 3)?)?;
            let summary = outpost_protocol::decode::<DriftSummary>(&record.frame)
                .map_err(|error| corrupt(error.to_string()))?;
            Ok(StoredDrift {
                device: fixed("drift", &blob(row, 2)?)?,
                window_start: column_u64("drift", row, 1)?,
                window_end: column_u64("drift", row, 0)?,
                parts: record.parts,
                summary,
            })
        })
        .collect()
    }

    /// Every device's shadow comparisons of the target manifest `target` whose windows end after
    /// `since`, in the order of their windows' ends.
    pub async fn shadow_reports(&self, target: &[u8; 32], since: u64) -> Result<Vec<StoredShadow>> {
        sqlx::query(
            "SELECT window_end, window_start, device, active_model, active_version, record \
             FROM shadow WHERE target = $1 AND window_end > $2 \
             ORDER BY window_end, window_start, device, active_model, active_version",
        )
        .bind(target.to_vec())
        .bind(bound(since))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok(StoredShadow {
                device: fixed("shadow", &blob(row, 2)?)?,
                window_start: column_u64("shadow", row, 1)?,
                window_end: column_u64("shadow", row, 0)?,
                active: (row.try_get::<String, _>(3)?, column_u64("shadow", row, 4)?),
                record: decode_applied_record("shadow", &blob(row, 5)?)?,
            })
        })
        .collect()
    }

    /// A device's inference counters on one model version.
    pub async fn stats(&self, device: &[u8; 16], name: &str, version: u64) -> Result<StatsRecord> {
        let Ok(version) = i64::try_from(version) else {
            return Ok(StatsRecord::default());
        };
        Ok(sqlx::query(
            "SELECT record FROM stats WHERE device = $1 AND model = $2 AND version = $3",
        )
        .bind(device.to_vec())
        .bind(name.to_owned())
        .bind(version)
        .fetch_optional(&self.pool)
        .await?
        .map(|row| decode_applied_record("stats", &blob(&row, 0)?))
        .transpose()?
        .unwrap_or_default())
    }

    /// Every model version a device reported inferences for, with its counters.
    pub async fn device_stats(&self, device: &[u8; 16]) -> Result<Vec<(String, u64, StatsRecord)>> {
        sqlx::query(
            "SELECT model, version, record FROM stats WHERE device = $1 ORDER BY model, version",
        )
        .bind(device.to_vec())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(|row| {
            Ok((
                row.try_get::<String, _>(0)?,
                column_u64("stats", row, 1)?,
                decode_applied_record("stats", &blob(row, 2)?)?,
            ))
        })
        .collect()
    }
}
