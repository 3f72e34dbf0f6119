//! Telemetry ingest, exactly once without a transaction, and the reads of what it stored:
//! inference counters, drift summaries and shadow comparisons.

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

/// `device sequence`, the idempotency key of a telemetry batch; a device's keys are in sequence
/// order.
pub(super) fn telemetry_seen_key(device: &[u8; 16], sequence: u64) -> Vec<u8> {
    [device.as_slice(), &sequence.to_be_bytes()].concat()
}

/// Why a telemetry batch stopped before its idempotency key was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum Stop {
    /// A record carries batch `highest` of the same device, later than this one.
    Overtaken { highest: u64 },
    /// A drift summary does not merge; see [`Ingested::Refused`].
    Refused { window: usize, reason: String },
}

/// What a telemetry batch makes of one record, worked out from the record as stored.
pub(super) enum Plan {
    /// These bytes replace the record read.
    Write(Vec<u8>),
    /// Nothing to write: the batch was added before, or there is nothing to add to.
    Leave,
    Stop(Stop),
}

/// The plan for a record that carries a batch at or after `sequence`, if it does.
pub(super) fn plan_if_applied(applied: Option<u64>, sequence: u64) -> Option<Plan> {
    match applied {
        Some(applied) if applied == sequence => Some(Plan::Leave),
        Some(applied) if applied > sequence => {
            Some(Plan::Stop(Stop::Overtaken { highest: applied }))
        }
        _ => None,
    }
}

/// One stored record a telemetry batch adds to, with what it adds.
pub(super) enum BatchRecord<'a> {
    /// A window's drift summary: the batch's parts of it (with their index in the batch), and the
    /// merged record worked out from `read`, the record as read (none for a new window).
    Drift {
        key: Vec<u8>,
        parts: Vec<(usize, &'a DriftSummary)>,
        read: Option<IVec>,
        planned: Vec<u8>,
    },
    /// A model version's counters and the windows that add to them.
    Stats {
        key: Vec<u8>,
        windows: Vec<&'a WindowInput>,
    },
    /// A window's shadow comparisons and the reports that add to them.
    Shadow {
        key: Vec<u8>,
        reports: Vec<&'a ShadowReport>,
    },
    /// The device record's count of windows the device dropped.
    Dropped { count: u64 },
}

/// Writes `key` by compare-and-swap: `plan` works out the new record from the stored one, and
/// works it out again whenever another writer changed the record in between.
pub(super) fn apply_record(
    tree: &Tree,
    key: &[u8],
    mut plan: impl FnMut(Option<&IVec>) -> Result<Plan>,
) -> Result<std::result::Result<(), Stop>> {
    let read = tree.get(key)?;
    let planned = plan(read.as_ref())?;
    apply_planned(tree, key, read, planned, plan)
}

/// [`apply_record`] with the first plan already worked out from `read`.
pub(super) fn apply_planned(
    tree: &Tree,
    key: &[u8],
    mut read: Option<IVec>,
    mut planned: Plan,
    mut plan: impl FnMut(Option<&IVec>) -> Result<Plan>,
) -> Result<std::result::Result<(), Stop>> {
    loop {
        let bytes = match planned {
            Plan::Write(bytes) => bytes,
            Plan::Leave => return Ok(Ok(())),
            Plan::Stop(stop) => return Ok(Err(stop)),
        };
        match tree.compare_and_swap(key, read.as_ref(), Some(bytes))? {
            Ok(()) => return Ok(Ok(())),
            Err(conflict) => {
                read = conflict.current;
                planned = plan(read.as_ref())?;
            }
        }
    }
}

/// Merges the batch's `parts` of one window into the drift record `current` (none for a new
/// window) and encodes the result, unless the record has the batch already. A part that does not
/// merge stops the batch, naming its window.
pub(super) fn plan_drift(
    current: Option<&IVec>,
    parts: &[(usize, &DriftSummary)],
    sequence: u64,
    now: u64,
) -> Result<Plan> {
    let mut merged: Option<(DriftSummary, u64)> = match current {
        None => None,
        Some(bytes) => {
            let (record, applied) = decode_applied::<DriftRecord>("drift", bytes)?;
            if let Some(plan) = plan_if_applied(applied, sequence) {
                return Ok(plan);
            }
            let summary =
                outpost_protocol::decode::<DriftSummary>(&record.frame).map_err(|error| {
                    StoreError::Corrupt {
                        tree: "drift",
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
                    return Ok(Plan::Stop(Stop::Refused {
                        window,
                        reason: format!(
                            "drift summary does not merge with the parts of its window stored \
                             before: {error}"
                        ),
                    }));
                }
                (stored, n_parts.saturating_add(1))
            }
        });
    }
    let Some((summary, n_parts)) = merged else {
        return Ok(Plan::Leave);
    };
    let frame = match outpost_protocol::encode(&summary) {
        Ok(frame) => frame,
        Err(error) => {
            return Ok(Plan::Stop(Stop::Refused {
                window: last_window,
                reason: format!("merged drift summary: {error}"),
            }))
        }
    };
    let record = DriftRecord {
        frame,
        parts: n_parts,
        updated: now,
    };
    Ok(Plan::Write(encode_applied(
        "drift",
        &record,
        Some(sequence),
    )?))
}

pub(super) fn stats_key(device: &[u8; 16], name: &str, version: u64) -> Vec<u8> {
    [
        device.as_slice(),
        name.as_bytes(),
        &[0],
        &version.to_be_bytes(),
    ]
    .concat()
}

/// `name \0 version`: every drift key of one model version starts with it.
pub(super) fn drift_prefix(name: &str, version: u64) -> Vec<u8> {
    [name.as_bytes(), &[0], &version.to_be_bytes()].concat()
}

/// `name \0 version window_end window_start device`. The window's end comes first so that the
/// summaries overlapping a time range `(since, now]` are one range scan: every key from `since + 1`
/// on. Parts of one device's window share a key and merge.
pub(super) fn drift_key(
    name: &str,
    version: u64,
    window_end: u64,
    window_start: u64,
    device: &[u8; 16],
) -> Vec<u8> {
    [
        drift_prefix(name, version).as_slice(),
        &window_end.to_be_bytes(),
        &window_start.to_be_bytes(),
        device.as_slice(),
    ]
    .concat()
}

/// The window end, window start and device of a drift key, given its prefix's length.
pub(super) fn parse_drift_key(key: &[u8], prefix_len: usize) -> Option<(u64, u64, [u8; 16])> {
    let rest = key.get(prefix_len..)?;
    if rest.len() != 32 {
        return None;
    }
    let end = u64::from_be_bytes(rest.get(..8)?.try_into().ok()?);
    let start = u64::from_be_bytes(rest.get(8..16)?.try_into().ok()?);
    let device = rest.get(16..32)?.try_into().ok()?;
    Some((end, start, device))
}

/// `target manifest sha256, window_end, window_start, device, active name \0 active version`.
/// Like drift keys, the window's end comes first so that the comparisons of one target over a
/// time range are one range scan. Parts of one window from one device share a key and add.
pub(super) fn shadow_key(
    target: &[u8; 32],
    window: (u64, u64),
    device: &[u8; 16],
    active: (&str, u64),
) -> Vec<u8> {
    [
        target.as_slice(),
        &window.1.to_be_bytes(),
        &window.0.to_be_bytes(),
        device.as_slice(),
        active.0.as_bytes(),
        &[0],
        &active.1.to_be_bytes(),
    ]
    .concat()
}

/// The stored shadow record `record` under `key`: the key names its window, device and active
/// model.
pub(super) fn parse_shadow_key(key: &[u8], record: ShadowRecord) -> Option<StoredShadow> {
    let end = u64::from_be_bytes(key.get(32..40)?.try_into().ok()?);
    let start = u64::from_be_bytes(key.get(40..48)?.try_into().ok()?);
    let device = key.get(48..64)?.try_into().ok()?;
    let active = key.get(64..)?;
    let split = active.len().checked_sub(9)?;
    let name = std::str::from_utf8(active.get(..split)?).ok()?;
    let version = u64::from_be_bytes(active.get(split + 1..)?.try_into().ok()?);
    Some(StoredShadow {
        device,
        window_start: start,
        window_end: end,
        active: (name.to_owned(), version),
        record,
    })
}

impl Store {
    // Telemetry.

    /// Stores a telemetry batch exactly once, without a transaction, so that batches of different
    /// devices (and every other request) run side by side.
    ///
    /// Each record the batch adds to (a model version's counters, a window's drift summary, a
    /// window's shadow comparisons, the device record's dropped count) is updated on its own by
    /// compare-and-swap and carries the sequence of the last batch of its device added into it;
    /// a record that already carries this batch's sequence is left alone. The idempotency key
    /// `(device, sequence)` is written last. A crash between two records therefore leaves a state
    /// that the device's resend completes, adding each record's share exactly once; until then the
    /// batch is not acknowledged.
    ///
    /// A device's sequences only increase (the agent forms batch n+1 after n is acknowledged and
    /// keeps a floor across cache quarantines), so a batch below one already stored for its device,
    /// and not itself stored, is refused as [`Ingested::OutOfOrder`]; the agent never sends one.
    ///
    /// A drift summary that does not merge (its counts would overflow) refuses the whole batch and
    /// nothing of it is written, not even its idempotency key: every drift merge is worked out from
    /// the records as read before anything is written. Only if another batch of the same device
    /// changes a window in between, which an agent cannot do, is that merge redone, and a refusal
    /// then may come after some records took the batch.
    pub fn ingest_telemetry(
        &self,
        device: &[u8; 16],
        sequence: u64,
        windows: &[WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<Ingested> {
        let seen_key = telemetry_seen_key(device, sequence);
        if self.telemetry_seen.get(&seen_key)?.is_some() {
            return Ok(Ingested::Duplicate);
        }
        if let Some(highest) = self.highest_sequence_above(device, sequence)? {
            // Unless a copy of this batch was stored since the check above.
            return self.stopped(Stop::Overtaken { highest }, &seen_key);
        }
        let records = match self.batch_records(device, sequence, windows, dropped_records, now)? {
            Ok(records) => records,
            Err(stop) => return self.stopped(stop, &seen_key),
        };
        for record in records {
            if let Err(stop) = self.apply_batch_record(device, sequence, now, record)? {
                return self.stopped(stop, &seen_key);
            }
        }
        // A copy of this batch that raced this one may have finished first; it took the
        // acknowledgement as new, so this one is the duplicate.
        let marked = self.telemetry_seen.compare_and_swap(
            &seen_key,
            None::<&[u8]>,
            Some(&now.to_be_bytes()[..]),
        )?;
        Ok(match marked {
            Ok(()) => Ingested::Stored,
            Err(_) => Ingested::Duplicate,
        })
    }

    /// The highest sequence of a batch of `device` stored above `sequence`, if there is one.
    fn highest_sequence_above(&self, device: &[u8; 16], sequence: u64) -> Result<Option<u64>> {
        let Some(next) = sequence.checked_add(1) else {
            return Ok(None);
        };
        let range = telemetry_seen_key(device, next)..=telemetry_seen_key(device, u64::MAX);
        let Some(entry) = self.telemetry_seen.range(range).next_back() else {
            return Ok(None);
        };
        let (key, _) = entry?;
        let highest = key
            .get(16..)
            .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
            .map(u64::from_be_bytes)
            .ok_or_else(|| StoreError::Corrupt {
                tree: "telemetry_seen",
                reason: "bad key".to_owned(),
            })?;
        Ok(Some(highest))
    }

    /// What to answer for a batch whose ingest stopped before its idempotency key was written.
    fn stopped(&self, stop: Stop, seen_key: &[u8]) -> Result<Ingested> {
        Ok(match stop {
            Stop::Refused { window, reason } => Ingested::Refused { window, reason },
            // A later batch of the device is stored, or applied to a record. If this batch is
            // stored too (a copy of it finished, then the device went on while this copy waited),
            // this is a resend; else it is out of order. Its key is read after the later batch's
            // trace, and was written before the device formed the later batch.
            Stop::Overtaken { highest } => {
                if self.telemetry_seen.get(seen_key)?.is_some() {
                    Ingested::Duplicate
                } else {
                    Ingested::OutOfOrder { highest }
                }
            }
        })
    }

    /// The records batch `sequence` adds to, with every drift merge worked out from the records
    /// as read, so that a summary that does not merge stops the batch before anything is written.
    pub(super) fn batch_records<'a>(
        &self,
        device: &[u8; 16],
        sequence: u64,
        windows: &'a [WindowInput],
        dropped_records: u64,
        now: u64,
    ) -> Result<std::result::Result<Vec<BatchRecord<'a>>, Stop>> {
        let mut stats: BTreeMap<Vec<u8>, Vec<&WindowInput>> = BTreeMap::new();
        let mut drift: BTreeMap<Vec<u8>, Vec<(usize, &DriftSummary)>> = BTreeMap::new();
        let mut shadow: BTreeMap<Vec<u8>, Vec<&ShadowReport>> = BTreeMap::new();
        for (index, window) in windows.iter().enumerate() {
            stats
                .entry(stats_key(device, &window.model, window.version))
                .or_default()
                .push(window);
            if let Some(summary) = &window.drift {
                let key = drift_key(
                    &window.model,
                    window.version,
                    summary.window_end,
                    summary.window_start,
                    device,
                );
                drift.entry(key).or_default().push((index, summary));
            }
            if let Some(report) = &window.shadow {
                let key = shadow_key(
                    &report.target.manifest_sha256.0,
                    (window.start, window.end),
                    device,
                    (&window.model, window.version),
                );
                shadow.entry(key).or_default().push(report);
            }
        }
        let mut records = Vec::with_capacity(stats.len() + drift.len() + shadow.len() + 1);
        for (key, parts) in drift {
            let read = self.drift.get(&key)?;
            match plan_drift(read.as_ref(), &parts, sequence, now)? {
                Plan::Stop(stop) => return Ok(Err(stop)),
                Plan::Leave => {}
                Plan::Write(planned) => records.push(BatchRecord::Drift {
                    key,
                    parts,
                    read,
                    planned,
                }),
            }
        }
        records.extend(
            stats
                .into_iter()
                .map(|(key, windows)| BatchRecord::Stats { key, windows }),
        );
        records.extend(
            shadow
                .into_iter()
                .map(|(key, reports)| BatchRecord::Shadow { key, reports }),
        );
        if dropped_records > 0 {
            records.push(BatchRecord::Dropped {
                count: dropped_records,
            });
        }
        Ok(Ok(records))
    }

    /// Adds batch `sequence`'s share to one record, unless the record has it already.
    pub(super) fn apply_batch_record(
        &self,
        device: &[u8; 16],
        sequence: u64,
        now: u64,
        record: BatchRecord<'_>,
    ) -> Result<std::result::Result<(), Stop>> {
        match record {
            BatchRecord::Drift {
                key,
                parts,
                read,
                planned,
            } => apply_planned(&self.drift, &key, read, Plan::Write(planned), |current| {
                plan_drift(current, &parts, sequence, now)
            }),
            BatchRecord::Stats { key, windows } => apply_record(&self.stats, &key, |current| {
                let (mut record, applied) = match current {
                    Some(bytes) => decode_applied::<StatsRecord>("stats", bytes)?,
                    None => (StatsRecord::default(), None),
                };
                if let Some(plan) = plan_if_applied(applied, sequence) {
                    return Ok(plan);
                }
                for window in &windows {
                    record.add(window.count, window.errors, &window.latency_buckets);
                }
                Ok(Plan::Write(encode_applied(
                    "stats",
                    &record,
                    Some(sequence),
                )?))
            }),
            BatchRecord::Shadow { key, reports } => apply_record(&self.shadow, &key, |current| {
                let (mut record, applied) = match current {
                    Some(bytes) => decode_applied::<ShadowRecord>("shadow", bytes)?,
                    None => (ShadowRecord::default(), None),
                };
                if let Some(plan) = plan_if_applied(applied, sequence) {
                    return Ok(plan);
                }
                for report in &reports {
                    record.add(report);
                }
                Ok(Plan::Write(encode_applied(
                    "shadow",
                    &record,
                    Some(sequence),
                )?))
            }),
            BatchRecord::Dropped { count } => apply_record(&self.devices, device, |current| {
                // A batch of a device no longer stored has nowhere to count its drops.
                let Some(bytes) = current else {
                    return Ok(Plan::Leave);
                };
                let (mut record, applied) = super::devices::decode_device(bytes)?;
                if let Some(plan) = plan_if_applied(applied, sequence) {
                    return Ok(plan);
                }
                record.dropped_records = record.dropped_records.saturating_add(count);
                Ok(Plan::Write(super::devices::encode_device(
                    &record,
                    Some(sequence),
                )?))
            }),
        }
    }

    /// Every device's drift summaries of one model version whose windows end after `since`, in
    /// the order of their windows' ends.
    pub fn drift_summaries(
        &self,
        name: &str,
        version: u64,
        since: u64,
    ) -> Result<Vec<StoredDrift>> {
        let prefix = drift_prefix(name, version);
        let from = [prefix.as_slice(), &since.saturating_add(1).to_be_bytes()].concat();
        let corrupt = |reason: String| StoreError::Corrupt {
            tree: "drift",
            reason,
        };
        let mut summaries = Vec::new();
        for entry in self.drift.range(from..) {
            let (key, value) = entry?;
            if !key.starts_with(&prefix) {
                break;
            }
            let (window_end, window_start, device) =
                parse_drift_key(&key, prefix.len()).ok_or_else(|| corrupt("bad key".to_owned()))?;
            let (record, _) = decode_applied::<DriftRecord>("drift", &value)?;
            let summary = outpost_protocol::decode::<DriftSummary>(&record.frame)
                .map_err(|error| corrupt(error.to_string()))?;
            summaries.push(StoredDrift {
                device,
                window_start,
                window_end,
                parts: record.parts,
                summary,
            });
        }
        Ok(summaries)
    }

    /// Every device's shadow comparisons of the target manifest `target` whose windows end after
    /// `since`, in the order of their windows' ends.
    pub fn shadow_reports(&self, target: &[u8; 32], since: u64) -> Result<Vec<StoredShadow>> {
        let from = [target.as_slice(), &since.saturating_add(1).to_be_bytes()].concat();
        let mut reports = Vec::new();
        for entry in self.shadow.range(from..) {
            let (key, value) = entry?;
            if !key.starts_with(target) {
                break;
            }
            let stored = parse_shadow_key(&key, decode_applied_record("shadow", &value)?)
                .ok_or_else(|| StoreError::Corrupt {
                    tree: "shadow",
                    reason: "bad key".to_owned(),
                })?;
            reports.push(stored);
        }
        Ok(reports)
    }

    /// A device's inference counters on one model version.
    pub fn stats(&self, device: &[u8; 16], name: &str, version: u64) -> Result<StatsRecord> {
        Ok(self
            .stats
            .get(stats_key(device, name, version))?
            .map(|bytes| decode_applied_record("stats", &bytes))
            .transpose()?
            .unwrap_or_default())
    }

    /// Every model version a device reported inferences for, with its counters.
    pub fn device_stats(&self, device: &[u8; 16]) -> Result<Vec<(String, u64, StatsRecord)>> {
        self.stats
            .scan_prefix(device)
            .map(|entry| {
                let (key, value) = entry?;
                let corrupt = || StoreError::Corrupt {
                    tree: "stats",
                    reason: "bad key".into(),
                };
                let rest = key.get(16..).ok_or_else(corrupt)?;
                let split = rest.len().checked_sub(9).ok_or_else(corrupt)?;
                let name = std::str::from_utf8(&rest[..split]).map_err(|_| corrupt())?;
                let version = <[u8; 8]>::try_from(&rest[split + 1..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt())?;
                Ok((
                    name.to_owned(),
                    version,
                    decode_applied_record("stats", &value)?,
                ))
            })
            .collect()
    }
}
