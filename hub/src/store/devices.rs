//! Enrolled devices: their records, events and the status each reported per plan.

use std::collections::HashMap;

use super::*;

impl Store {
    // Devices.

    pub fn device(&self, id: &[u8; 16]) -> Result<Option<DeviceRecord>> {
        Ok(self.device_read(id)?.map(|read| read.record))
    }

    /// A device's record with the stored bytes it was decoded from, for [`Store::update_device`].
    pub fn device_read(&self, id: &[u8; 16]) -> Result<Option<DeviceRead>> {
        self.devices
            .get(id)?
            .map(|stored| {
                let (record, applied) = decode_device(&stored)?;
                Ok(DeviceRead {
                    record,
                    applied,
                    stored,
                })
            })
            .transpose()
    }

    /// Applies `change` to a device's record and writes it by compare-and-swap against the bytes
    /// `read` came from. When another writer got in between (a revocation, a label change,
    /// telemetry counting dropped records, another check-in), `change` is applied again to the
    /// record as it now stands, so nobody's change is lost: a check-in never undoes a revocation.
    /// Returns the record written; `None` if the device's record is gone.
    pub fn update_device(
        &self,
        read: DeviceRead,
        change: impl Fn(&mut DeviceRecord),
    ) -> Result<Option<DeviceRecord>> {
        let DeviceRead {
            mut record,
            applied,
            stored,
        } = read;
        let id = record.id;
        change(&mut record);
        let first = Plan::Write(encode_device(&record, applied)?);
        let mut written = Some(record);
        // Never stops: the plans only write or, for a record that is gone, leave.
        let _ = apply_planned(&self.devices, &id, Some(stored), first, |current| {
            let Some(bytes) = current else {
                written = None;
                return Ok(Plan::Leave);
            };
            let (mut record, applied) = decode_device(bytes)?;
            change(&mut record);
            let plan = Plan::Write(encode_device(&record, applied)?);
            written = Some(record);
            Ok(plan)
        })?;
        Ok(written)
    }

    /// Stores `device`, except its `dropped_records`, which telemetry batches count into the
    /// stored record. Tests set up records with it; handlers change records with
    /// [`Store::update_device`].
    #[cfg(test)]
    pub fn put_device(&self, device: &DeviceRecord) -> Result<()> {
        let mut read = self.devices.get(device.id)?;
        loop {
            let (dropped_records, applied) = match &read {
                Some(bytes) => {
                    let (stored, applied) = decode_device(bytes)?;
                    (stored.dropped_records, applied)
                }
                None => (device.dropped_records, None),
            };
            let record = DeviceRecord {
                dropped_records,
                ..device.clone()
            };
            let bytes = encode_device(&record, applied)?;
            match self
                .devices
                .compare_and_swap(device.id, read.as_ref(), Some(bytes))?
            {
                Ok(()) => return Ok(()),
                Err(conflict) => read = conflict.current,
            }
        }
    }

    pub fn devices(&self) -> Result<Vec<DeviceRecord>> {
        self.devices
            .iter()
            .values()
            .map(|bytes| Ok(decode_device(&bytes?)?.0))
            .collect()
    }

    pub fn device_count(&self) -> usize {
        self.devices.len()
    }

    pub fn add_event(&self, device: &[u8; 16], event: &EventRecord) -> Result<()> {
        let key = [device.as_slice(), &self.db.generate_id()?.to_be_bytes()].concat();
        self.events.insert(key, encode("events", event)?)?;
        Ok(())
    }

    /// A device's events, oldest first, at most the `limit` newest.
    pub fn events(&self, device: &[u8; 16], limit: usize) -> Result<Vec<EventRecord>> {
        let mut events = self
            .events
            .scan_prefix(device)
            .values()
            .rev()
            .take(limit)
            .map(|bytes| decode("events", &bytes?))
            .collect::<Result<Vec<EventRecord>>>()?;
        events.reverse();
        Ok(events)
    }

    /// Stores a status report, atomically: the device's outcome in a plan, the event, and, for a
    /// committed model, what the device now runs (so the fleet view does not wait for its next
    /// check-in; see [`DeviceRecord::note_committed`]).
    pub fn record_status(
        &self,
        device: &[u8; 16],
        plan_sequence: Option<u64>,
        outcome: Option<&OutcomeRecord>,
        event: &EventRecord,
        now_running: Option<&RunningRecord>,
    ) -> Result<()> {
        let event_key = [device.as_slice(), &self.db.generate_id()?.to_be_bytes()].concat();
        (&self.outcomes, &self.events, &self.devices).transaction(
            |(outcomes, events, devices)| {
                if let (Some(sequence), Some(outcome)) = (plan_sequence, outcome) {
                    let key = [sequence.to_be_bytes().as_slice(), device.as_slice()].concat();
                    outcomes.insert(key, encode("outcomes", outcome).map_err(abort)?)?;
                }
                if let Some(running) = now_running {
                    if let Some(bytes) = devices.get(device)? {
                        let (mut record, applied) = decode_device(&bytes).map_err(abort)?;
                        record.note_committed(running.clone());
                        devices.insert(
                            device.as_slice(),
                            encode_device(&record, applied).map_err(abort)?,
                        )?;
                    }
                }
                events.insert(
                    event_key.as_slice(),
                    encode("events", event).map_err(abort)?,
                )?;
                Ok(())
            },
        )?;
        Ok(())
    }

    /// Every device's outcome for a plan.
    pub fn outcomes(&self, plan_sequence: u64) -> Result<Vec<([u8; 16], OutcomeRecord)>> {
        self.outcomes
            .scan_prefix(plan_sequence.to_be_bytes())
            .map(|entry| {
                let (key, value) = entry?;
                let device = key
                    .get(8..24)
                    .and_then(|id| <[u8; 16]>::try_from(id).ok())
                    .ok_or(StoreError::Corrupt {
                        tree: "outcomes",
                        reason: "short key".into(),
                    })?;
                Ok((device, decode("outcomes", &value)?))
            })
            .collect()
    }

    /// Notes that a signed request of `device` with `timestamp` and `nonce` was accepted: its
    /// highest such timestamp is kept, with the nonces of the requests accepted in that second.
    /// Not flushed on its own: the handlers that change state flush before they answer.
    pub fn note_signed_at(&self, device: &[u8; 16], timestamp: u64, nonce: [u8; 16]) -> Result<()> {
        self.signed_at.fetch_and_update(device, |stored| {
            let mut latest = stored
                .and_then(LatestRequests::decode)
                .unwrap_or(LatestRequests {
                    at: 0,
                    nonces: Vec::new(),
                    overflowed: false,
                });
            latest.note(timestamp, nonce);
            Some(latest.encode())
        })?;
        Ok(())
    }

    /// Every device's latest accepted requests, as [`Store::note_signed_at`] kept them.
    pub fn signed_at(&self) -> Result<HashMap<[u8; 16], LatestRequests>> {
        self.signed_at
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let corrupt = || StoreError::Corrupt {
                    tree: "signed_at",
                    reason: "bad entry".to_owned(),
                };
                let device = <[u8; 16]>::try_from(key.as_ref()).map_err(|_| corrupt())?;
                let latest = LatestRequests::decode(&value).ok_or_else(corrupt)?;
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
        tree: "devices",
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

    fn encode(&self) -> Vec<u8> {
        let mut bytes = self.at.to_be_bytes().to_vec();
        bytes.push(u8::from(self.overflowed));
        for nonce in &self.nonces {
            bytes.extend_from_slice(nonce);
        }
        bytes
    }

    fn decode(bytes: &[u8]) -> Option<LatestRequests> {
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
