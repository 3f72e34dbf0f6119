//! What telemetry ingest stores and the reads of it: inference counters, drift summaries and
//! shadow comparisons. Ingest itself, in groups of batches, is `ingest`'s; the hourly drift
//! aggregates it also merges into are `drift_hourly`'s.

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
/// window): the merged record, or why a part does not merge, naming its window. `encoded` is the
/// frame of the one part of a new window, when the caller has it: the record is then that frame.
pub(super) fn merge_drift(
    current: Option<&[u8]>,
    parts: &[(usize, &DriftSummary)],
    encoded: Option<&[u8]>,
    now: u64,
) -> Result<std::result::Result<DriftRecord, (usize, String)>> {
    if let (None, [_], Some(frame)) = (current, parts, encoded) {
        return Ok(Ok(DriftRecord {
            frame: frame.to_vec(),
            parts: 1,
            updated: now,
        }));
    }
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
pub(super) type DriftKey = (String, i64, i64, i64);
/// A shadow record's key past its device: target, window end, window start, active model and
/// version.
pub(super) type ShadowKey = (Vec<u8>, i64, i64, String, i64);

impl Store {
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
