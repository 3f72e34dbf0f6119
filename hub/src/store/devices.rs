//! Enrolled devices: their records, events and the status each reported per plan.

use std::collections::HashMap;

use super::group::{placeholders, rows, GroupQueue, Queued, KEYS_PER_STATEMENT};
use super::sql::for_update;
use super::statements::{Param, Statements};
use super::*;

/// A signed request of a device that was accepted, to note; see [`Store::note_signed_at`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignedRequest {
    pub device: [u8; 16],
    pub timestamp: u64,
    pub nonce: [u8; 16],
}

impl Queued for SignedRequest {
    fn device(&self) -> [u8; 16] {
        self.device
    }
}

/// The signed requests waiting to be noted.
pub(super) type SignedQueue = GroupQueue<SignedRequest, ()>;

/// A device record read from `stored`.
fn device_read_of(stored: Vec<u8>) -> Result<DeviceRead> {
    let (record, applied) = decode_device(&stored)?;
    Ok(DeviceRead {
        record,
        applied,
        stored,
    })
}

/// Adds `event` to `device`'s events in `transaction`.
pub(super) async fn insert_event(
    transaction: &mut sqlx::Transaction<'_, sqlx::Any>,
    device: &[u8; 16],
    event: &EventRecord,
) -> Result<()> {
    sqlx::query("INSERT INTO events (device, record) VALUES ($1, $2)")
        .bind(device.to_vec())
        .bind(encode("events", event)?)
        .execute(&mut **transaction)
        .await?;
    Ok(())
}

impl Store {
    // Devices.

    pub async fn device(&self, id: &[u8; 16]) -> Result<Option<DeviceRecord>> {
        Ok(self.device_read(id).await?.map(|read| read.record))
    }

    /// A device's record with the stored bytes it was decoded from, for [`Store::update_device`]:
    /// from the cache of a store no other hub shares when it holds them (see `cache`).
    pub async fn device_read(&self, id: &[u8; 16]) -> Result<Option<DeviceRead>> {
        if let Some(stored) = self.devices_cache.as_ref().and_then(|cache| cache.get(id)) {
            return device_read_of(stored).map(Some);
        }
        self.device_read_stored(id).await
    }

    /// [`Store::device_read`] from the database, filling the cache.
    async fn device_read_stored(&self, id: &[u8; 16]) -> Result<Option<DeviceRead>> {
        let generation = self.devices_cache.as_ref().map(|cache| cache.generation());
        let stored = sqlx::query("SELECT record FROM devices WHERE id = $1")
            .bind(id.to_vec())
            .fetch_optional(&self.pool)
            .await?;
        let Some(row) = stored else {
            return Ok(None);
        };
        let stored = blob(&row, 0)?;
        if let (Some(cache), Some(generation)) = (&self.devices_cache, generation) {
            cache.fill(id, &stored, generation);
        }
        device_read_of(stored).map(Some)
    }

    /// Applies `change` to a device's record and writes it by compare-and-swap against the bytes
    /// `read` came from. When another writer got in between (a revocation, a label change,
    /// telemetry counting dropped records, another check-in, another hub), `change` is applied
    /// again to the record as it now stands, so nobody's change is lost: a check-in never undoes
    /// a revocation. Returns the record written; `None` if the device's record is gone.
    pub async fn update_device(
        &self,
        read: DeviceRead,
        change: impl Fn(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>> {
        let DeviceRead {
            mut record,
            mut applied,
            mut stored,
        } = read;
        let id = record.id;
        loop {
            change(&mut record);
            let bytes = encode_device(&record, applied)?;
            if bytes == stored {
                return Ok(Some(record));
            }
            let written =
                sqlx::query("UPDATE devices SET record = $1 WHERE id = $2 AND record = $3")
                    .bind(bytes)
                    .bind(id.to_vec())
                    .bind(stored)
                    .execute(&self.writer)
                    .await?;
            self.device_written(&id);
            if written.rows_affected() == 1 {
                return Ok(Some(record));
            }
            let Some(current) = self.device_read_stored(&id).await? else {
                return Ok(None);
            };
            DeviceRead {
                record,
                applied,
                stored,
            } = current;
        }
    }

    /// Stores `device`, except its `dropped_records`, which telemetry batches count into the
    /// stored record. Tests set up records with it; handlers change records with
    /// [`Store::update_device`].
    #[cfg(test)]
    pub async fn put_device(&self, device: &DeviceRecord) -> Result<()> {
        let mut transaction = self.writer.begin().await?;
        let stored = sqlx::query("SELECT record FROM devices WHERE id = $1")
            .bind(device.id.to_vec())
            .fetch_optional(&mut *transaction)
            .await?;
        let (dropped_records, applied) = match stored {
            Some(row) => {
                let (stored, applied) = decode_device(&blob(&row, 0)?)?;
                (stored.dropped_records, applied)
            }
            None => (device.dropped_records, None),
        };
        let record = DeviceRecord {
            dropped_records,
            ..device.clone()
        };
        sqlx::query(
            "INSERT INTO devices (id, record) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET record = excluded.record",
        )
        .bind(device.id.to_vec())
        .bind(encode_device(&record, applied)?)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        self.device_written(&device.id);
        Ok(())
    }

    pub async fn devices(&self) -> Result<Vec<DeviceRecord>> {
        sqlx::query("SELECT record FROM devices ORDER BY id")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok(decode_device(&blob(row, 0)?)?.0))
            .collect()
    }

    pub async fn device_count(&self) -> Result<u64> {
        let count: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM devices")
            .fetch_one(&self.pool)
            .await?;
        uint("devices", count)
    }

    pub async fn add_event(&self, device: &[u8; 16], event: &EventRecord) -> Result<()> {
        let mut transaction = self.writer.begin().await?;
        insert_event(&mut transaction, device, event).await?;
        transaction.commit().await?;
        Ok(())
    }

    /// A device's events, oldest first, at most the `limit` newest.
    pub async fn events(&self, device: &[u8; 16], limit: usize) -> Result<Vec<EventRecord>> {
        let mut events =
            sqlx::query("SELECT record FROM events WHERE device = $1 ORDER BY id DESC LIMIT $2")
                .bind(device.to_vec())
                .bind(i64::try_from(limit).unwrap_or(i64::MAX))
                .fetch_all(&self.pool)
                .await?
                .iter()
                .map(|row| decode("events", &blob(row, 0)?))
                .collect::<Result<Vec<EventRecord>>>()?;
        events.reverse();
        Ok(events)
    }

    /// Stores a status report, in one transaction: the device's outcome in a plan, the event, and,
    /// for a committed model, what the device now runs (so the fleet view does not wait for its
    /// next check-in; see [`DeviceRecord::note_committed`]).
    pub async fn record_status(
        &self,
        device: &[u8; 16],
        plan_sequence: Option<u64>,
        outcome: Option<&OutcomeRecord>,
        event: &EventRecord,
        now_running: Option<&RunningRecord>,
    ) -> Result<()> {
        let mut transaction = self.writer.begin().await?;
        if let (Some(sequence), Some(outcome)) = (plan_sequence, outcome) {
            sqlx::query(
                "INSERT INTO outcomes (plan_sequence, device, record) VALUES ($1, $2, $3) \
                 ON CONFLICT (plan_sequence, device) DO UPDATE SET record = excluded.record",
            )
            .bind(int("plan sequence", sequence)?)
            .bind(device.to_vec())
            .bind(encode("outcomes", outcome)?)
            .execute(&mut *transaction)
            .await?;
        }
        if let Some(running) = now_running {
            let stored = sqlx::query(
                self.dialect
                    .locking(for_update!("SELECT record FROM devices WHERE id = $1")),
            )
            .bind(device.to_vec())
            .fetch_optional(&mut *transaction)
            .await?;
            if let Some(row) = stored {
                let (mut record, applied) = decode_device(&blob(&row, 0)?)?;
                record.note_committed(running.clone());
                sqlx::query("UPDATE devices SET record = $1 WHERE id = $2")
                    .bind(encode_device(&record, applied)?)
                    .bind(device.to_vec())
                    .execute(&mut *transaction)
                    .await?;
            }
        }
        insert_event(&mut transaction, device, event).await?;
        transaction.commit().await?;
        self.device_written(device);
        Ok(())
    }

    /// Every device's outcome for a plan.
    pub async fn outcomes(&self, plan_sequence: u64) -> Result<Vec<([u8; 16], OutcomeRecord)>> {
        let Ok(sequence) = i64::try_from(plan_sequence) else {
            return Ok(Vec::new());
        };
        sqlx::query("SELECT device, record FROM outcomes WHERE plan_sequence = $1 ORDER BY device")
            .bind(sequence)
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    fixed("outcomes", &blob(row, 0)?)?,
                    decode("outcomes", &blob(row, 1)?)?,
                ))
            })
            .collect()
    }

    /// Notes that a signed request of `device` with `timestamp` and `nonce` was accepted: its
    /// highest such timestamp is kept, with the nonces of the requests accepted in that second.
    /// Not flushed on its own: the handlers that change state flush before they answer.
    ///
    /// Noted in a group with the other devices' requests waiting (see `group`).
    pub async fn note_signed_at(
        &self,
        device: &[u8; 16],
        timestamp: u64,
        nonce: [u8; 16],
    ) -> Result<()> {
        let signed = SignedRequest {
            device: *device,
            timestamp,
            nonce,
        };
        self.signed
            .run(
                self,
                |store| &store.signed,
                signed,
                |store, group| Box::pin(store.note_signed_group(group)),
            )
            .await
    }

    /// Notes a group of signed requests, at most one per device, in one transaction.
    async fn note_signed_group(&self, group: &[&SignedRequest]) -> Result<Vec<()>> {
        match &self.groups {
            Some(groups) => {
                let mut lease = groups.lease(&self.writer).await?;
                let written = self.write_signed(lease.connection(), group).await;
                lease.finish(written)?;
            }
            None => {
                let mut transaction = self.writer.begin().await?;
                self.write_signed(&mut *transaction, group).await?;
                transaction.commit().await?;
            }
        }
        Ok(vec![(); group.len()])
    }

    /// Writes what [`Store::note_signed_at`] keeps of `group` (at most one request per device)
    /// in the caller's transaction.
    pub(super) async fn write_signed<S: Statements>(
        &self,
        transaction: &mut S,
        group: &[&SignedRequest],
    ) -> Result<()> {
        let mut group: Vec<&SignedRequest> = group.to_vec();
        // One order for every hub, so two groups sharing devices lock their rows in turn.
        group.sort_unstable_by_key(|signed| signed.device);
        let empty = LatestRequests {
            at: 0,
            nonces: Vec::new(),
            overflowed: false,
        };
        for chunk in group.chunks(KEYS_PER_STATEMENT) {
            // On PostgreSQL the rows exist before they are locked, so two first requests of a
            // device at once (on two hubs) take turns rather than both writing over nothing.
            // SQLite has one writer, which this transaction is.
            if self.dialect == Dialect::Postgres {
                let sql = format!(
                    "INSERT INTO signed_at (device, latest) VALUES {} \
                     ON CONFLICT (device) DO NOTHING",
                    rows(self.dialect, chunk.len(), 2)
                );
                let encoded = empty.encode();
                let params: Vec<Param<'_>> = chunk
                    .iter()
                    .flat_map(|signed| [Param::from(&signed.device), Param::from(&encoded)])
                    .collect();
                transaction.execute(&sql, &params).await?;
            }

            let sql = self.dialect.locking((
                "SELECT device, latest FROM signed_at WHERE device IN ({}) ORDER BY device",
                "SELECT device, latest FROM signed_at WHERE device IN ({}) ORDER BY device \
                 FOR UPDATE",
            ));
            let sql = sql.replace("{}", &placeholders(self.dialect, 1, chunk.len()));
            let params: Vec<Param<'_>> = chunk
                .iter()
                .map(|signed| Param::from(&signed.device))
                .collect();
            let mut stored: HashMap<[u8; 16], LatestRequests> = HashMap::new();
            for row in transaction.fetch(&sql, &params).await? {
                if let Some(latest) = LatestRequests::decode(&row.blob(1)?) {
                    stored.insert(fixed("signed_at", &row.blob(0)?)?, latest);
                }
            }
            let mut changed: Vec<([u8; 16], Vec<u8>)> = Vec::new();
            for signed in chunk {
                let before = stored
                    .remove(&signed.device)
                    .unwrap_or_else(|| empty.clone());
                let mut latest = before.clone();
                latest.note(signed.timestamp, signed.nonce);
                if latest != before {
                    changed.push((signed.device, latest.encode()));
                }
            }
            if changed.is_empty() {
                continue;
            }
            let sql = format!(
                "INSERT INTO signed_at (device, latest) VALUES {} \
                 ON CONFLICT (device) DO UPDATE SET latest = excluded.latest",
                rows(self.dialect, changed.len(), 2)
            );
            let params: Vec<Param<'_>> = changed
                .iter()
                .flat_map(|(device, latest)| [Param::from(device), Param::from(latest)])
                .collect();
            transaction.execute(&sql, &params).await?;
        }
        Ok(())
    }

    /// Every device's latest accepted requests, as [`Store::note_signed_at`] kept them.
    pub async fn signed_at(&self) -> Result<HashMap<[u8; 16], LatestRequests>> {
        sqlx::query("SELECT device, latest FROM signed_at")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                let corrupt = || StoreError::Corrupt {
                    table: "signed_at",
                    reason: "bad entry".to_owned(),
                };
                let device = fixed("signed_at", &blob(row, 0)?)?;
                let latest = LatestRequests::decode(&blob(row, 1)?).ok_or_else(corrupt)?;
                Ok((device, latest))
            })
            .collect()
    }
}

/// What a device record holds after the fields release 0.1.0 wrote and the sequence of the last
/// telemetry batch applied to it ([`Applied`]): the list of models it runs. Add fields only at its
/// end.
///
/// A record is stored in one of three forms, told apart by what follows each part:
/// - the record alone (no batch applied, no models: as 0.1.0 wrote every device);
/// - the record and a batch sequence, the [`Applied`] form (no models);
/// - the record, a batch sequence and this tail, once the device runs any model. The sequence
///   before the tail is the one an older hub reads (it ignores what follows, as postcard reads a
///   value and leaves the rest), 0 when no batch was applied; this hub reads `applied` from the
///   tail instead. (An older hub taking that 0 as a batch would skip only the dropped count of a
///   batch numbered 0, where agents start theirs at a random 62-bit base.)
///
/// A record without models keeps the first two forms, byte for byte what hubs wrote before.
#[derive(Serialize, Deserialize)]
struct DeviceTail<M> {
    /// The last telemetry batch applied to the record.
    applied: Option<u64>,
    /// [`DeviceRecord::models`].
    models: M,
    /// [`DeviceRecord::several_models`].
    several_models: bool,
}

/// A device record's bytes in the form [`DeviceTail`] describes.
pub(super) fn encode_device(record: &DeviceRecord, applied: Option<u64>) -> Result<Vec<u8>> {
    if record.models.is_empty() {
        return encode_applied("devices", record, applied);
    }
    let mut bytes = encode_applied("devices", record, Some(applied.unwrap_or(0)))?;
    bytes.extend(encode(
        "devices",
        &DeviceTail {
            applied,
            models: &record.models,
            several_models: record.several_models,
        },
    )?);
    Ok(bytes)
}

/// Reads a device record in any of the forms [`DeviceTail`] describes, with the last telemetry
/// batch applied to it.
pub(super) fn decode_device(bytes: &[u8]) -> Result<(DeviceRecord, Option<u64>)> {
    let corrupt = |error: postcard::Error| StoreError::Corrupt {
        table: "devices",
        reason: error.to_string(),
    };
    let (mut record, rest): (DeviceRecord, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(corrupt)?;
    if rest.is_empty() {
        return Ok((record, None));
    }
    let (sequence, rest): (u64, &[u8]) = postcard::take_from_bytes(rest).map_err(corrupt)?;
    if rest.is_empty() {
        return Ok((record, Some(sequence)));
    }
    let tail: DeviceTail<Vec<RunningRecord>> = postcard::from_bytes(rest).map_err(corrupt)?;
    record.models = tail.models;
    record.several_models = tail.several_models;
    Ok((record, tail.applied))
}

/// A device's latest accepted signed requests: their second, and the nonces of those accepted in
/// it (at most [`LatestRequests::MAX_NONCES`]; past that, `overflowed`). Stored as the second
/// (8 bytes, big-endian), a byte for `overflowed`, then the nonces.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LatestRequests {
    pub at: u64,
    pub nonces: Vec<[u8; 16]>,
    pub overflowed: bool,
}

impl LatestRequests {
    pub const MAX_NONCES: usize = 64;

    fn note(&mut self, timestamp: u64, nonce: [u8; 16]) {
        if timestamp > self.at {
            *self = LatestRequests {
                at: timestamp,
                nonces: vec![nonce],
                overflowed: false,
            };
        } else if timestamp == self.at && !self.nonces.contains(&nonce) {
            if self.nonces.len() < LatestRequests::MAX_NONCES {
                self.nonces.push(nonce);
            } else {
                self.overflowed = true;
            }
        }
    }

    /// Whether a request signed at `timestamp` with `nonce` could be one of these or older: one
    /// of an earlier second, or of the same second with a nonce seen (or, past the cap, any).
    pub fn may_replay(&self, timestamp: u64, nonce: &[u8; 16]) -> bool {
        timestamp < self.at
            || (timestamp == self.at && (self.overflowed || self.nonces.contains(nonce)))
    }

    pub(super) fn encode(&self) -> Vec<u8> {
        let mut bytes = self.at.to_be_bytes().to_vec();
        bytes.push(u8::from(self.overflowed));
        for nonce in &self.nonces {
            bytes.extend_from_slice(nonce);
        }
        bytes
    }

    pub(super) fn decode(bytes: &[u8]) -> Option<LatestRequests> {
        let at = u64::from_be_bytes(bytes.get(..8)?.try_into().ok()?);
        let overflowed = *bytes.get(8)? != 0;
        let rest = bytes.get(9..)?;
        if rest.len() % 16 != 0 {
            return None;
        }
        let nonces = rest
            .chunks_exact(16)
            .map(|chunk| <[u8; 16]>::try_from(chunk).ok())
            .collect::<Option<Vec<_>>>()?;
        Some(LatestRequests {
            at,
            nonces,
            overflowed,
        })
    }
}
