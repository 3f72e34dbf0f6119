//! Admin and enrollment tokens, trust roots and model manifests: what the admin API registers.

use super::*;

pub(super) fn manifest_key(name: &str, version: u64) -> Vec<u8> {
    [name.as_bytes(), &[0], &version.to_be_bytes()].concat()
}

impl Store {
    // Admin tokens.

    pub fn admin_token(&self, token_hash: &[u8; 32]) -> Result<Option<AdminTokenRecord>> {
        self.admin_tokens
            .get(token_hash)?
            .map(|bytes| decode_admin_token(&bytes))
            .transpose()
    }

    pub fn insert_admin_token(
        &self,
        token_hash: &[u8; 32],
        record: &AdminTokenRecord,
    ) -> Result<()> {
        self.admin_tokens
            .insert(token_hash, encode_admin_token(record)?)?;
        Ok(())
    }

    /// Every admin token, in the order of their hashes.
    pub fn admin_tokens(&self) -> Result<Vec<AdminTokenRecord>> {
        self.admin_tokens
            .iter()
            .values()
            .map(|bytes| decode_admin_token(&bytes?))
            .collect()
    }

    /// Deletes the admin token with id `id`, unless `keep` refuses it given the record and every
    /// other token; returns the deleted record, None when no token has that id. Atomic: two
    /// revocations at once cannot both pass a `keep` that counts what remains.
    pub fn revoke_admin_token<E>(
        &self,
        id: &str,
        keep: impl Fn(&AdminTokenRecord, &[AdminTokenRecord]) -> std::result::Result<(), E>,
    ) -> Result<Option<std::result::Result<AdminTokenRecord, E>>> {
        let _guard = self
            .token_lock
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut found = None;
        let mut others = Vec::new();
        for entry in self.admin_tokens.iter() {
            let (hash, bytes) = entry?;
            let record = decode_admin_token(&bytes)?;
            if record.id == id {
                found = Some((hash, record));
            } else {
                others.push(record);
            }
        }
        let Some((hash, record)) = found else {
            return Ok(None);
        };
        if let Err(refusal) = keep(&record, &others) {
            return Ok(Some(Err(refusal)));
        }
        self.admin_tokens.remove(hash)?;
        Ok(Some(Ok(record)))
    }

    // Enrollment.

    pub fn insert_enroll_token(
        &self,
        token_hash: &[u8; 32],
        record: &EnrollTokenRecord,
    ) -> Result<()> {
        self.enroll_tokens
            .insert(token_hash, encode("enroll_tokens", record)?)?;
        Ok(())
    }

    /// Deletes the enrollment token with id `id`; returns it, None when no token has that id.
    pub fn revoke_enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRecord>> {
        for entry in self.enroll_tokens.iter() {
            let (hash, bytes) = entry?;
            let record: EnrollTokenRecord = decode("enroll_tokens", &bytes)?;
            if record.id == id {
                // Only if unchanged since read: an enrollment that used it meanwhile wins, and
                // the revocation is tried again on the record it left.
                match self.enroll_tokens.compare_and_swap(
                    &hash,
                    Some(&bytes),
                    None as Option<&[u8]>,
                )? {
                    Ok(()) => return Ok(Some(record)),
                    Err(_) => return self.revoke_enroll_token(id),
                }
            }
        }
        Ok(None)
    }

    pub fn enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        self.enroll_tokens
            .iter()
            .values()
            .map(|bytes| decode("enroll_tokens", &bytes?))
            .collect()
    }

    /// Uses one count of an enrollment token and stores the new device and its enrollment event,
    /// atomically: a token with one use left enrolls exactly one device however many try at once.
    /// `make_device` and `make_event` receive the token (its labels).
    pub fn enroll(
        &self,
        token_hash: &[u8; 32],
        now: u64,
        make_device: impl Fn(&EnrollTokenRecord) -> DeviceRecord,
        make_event: impl Fn(&EnrollTokenRecord) -> EventRecord,
    ) -> Result<std::result::Result<DeviceRecord, TokenRefusal>> {
        let event_id = self.db.generate_id()?;
        let outcome = (&self.enroll_tokens, &self.devices, &self.events).transaction(
            |(tokens, devices, events)| {
                let Some(bytes) = tokens.get(token_hash)? else {
                    return Ok(Err(TokenRefusal::Unknown));
                };
                let mut token: EnrollTokenRecord =
                    decode("enroll_tokens", &bytes).map_err(abort)?;
                if token.expires <= now {
                    return Ok(Err(TokenRefusal::Expired));
                }
                if token.uses_left == 0 {
                    return Ok(Err(TokenRefusal::UsedUp));
                }
                token.uses_left -= 1;
                tokens.insert(token_hash, encode("enroll_tokens", &token).map_err(abort)?)?;
                let device = make_device(&token);
                devices.insert(
                    &device.id,
                    super::devices::encode_device(&device, None).map_err(abort)?,
                )?;
                let event_key = [device.id.as_slice(), &event_id.to_be_bytes()].concat();
                let event = make_event(&token);
                events.insert(event_key, encode("events", &event).map_err(abort)?)?;
                Ok(Ok(device))
            },
        )?;
        Ok(outcome)
    }

    // Roots.

    pub fn put_root(&self, version: u64, signed: &[u8]) -> Result<()> {
        self.roots.insert(version.to_be_bytes(), signed)?;
        self.newest_root.fetch_max(version, Ordering::SeqCst);
        Ok(())
    }

    /// Every stored root, oldest first.
    pub fn roots(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.roots.iter().map(root_entry).collect()
    }

    /// Signed roots with a version above `version`, oldest first: what a device that trusts root
    /// `version` needs next (for a device up to date, nothing is read).
    pub fn roots_after(&self, version: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if version >= self.newest_root.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        let Some(from) = version.checked_add(1) else {
            return Ok(Vec::new());
        };
        self.roots
            .range(from.to_be_bytes()..)
            .map(root_entry)
            .collect()
    }

    // Manifests.

    pub fn put_manifest(&self, name: &str, version: u64, record: &ManifestRecord) -> Result<()> {
        self.manifests
            .insert(manifest_key(name, version), encode("manifests", record)?)?;
        Ok(())
    }

    pub fn manifest(&self, name: &str, version: u64) -> Result<Option<ManifestRecord>> {
        self.manifests
            .get(manifest_key(name, version))?
            .map(|bytes| decode("manifests", &bytes))
            .transpose()
    }

    /// Whether any version of model `name` was ever published here.
    pub fn has_model(&self, name: &str) -> Result<bool> {
        let prefix = [name.as_bytes(), &[0]].concat();
        Ok(self
            .manifests
            .scan_prefix(prefix)
            .next()
            .transpose()?
            .is_some())
    }

    /// Every version of every model, as (name, version, record), by name then version.
    pub fn manifests(&self) -> Result<Vec<(String, u64, ManifestRecord)>> {
        self.manifests
            .iter()
            .map(|entry| {
                let (key, value) = entry?;
                let corrupt = || StoreError::Corrupt {
                    tree: "manifests",
                    reason: "bad key".into(),
                };
                let split = key.len().checked_sub(9).ok_or_else(corrupt)?;
                let name = std::str::from_utf8(&key[..split]).map_err(|_| corrupt())?;
                let version = <[u8; 8]>::try_from(&key[split + 1..])
                    .map(u64::from_be_bytes)
                    .map_err(|_| corrupt())?;
                Ok((name.to_owned(), version, decode("manifests", &value)?))
            })
            .collect()
    }
}

/// An admin token record's bytes: its fields, then its [`AdminTokenTail`].
pub(super) fn encode_admin_token(record: &AdminTokenRecord) -> Result<Vec<u8>> {
    let mut bytes = encode("admin_tokens", record)?;
    bytes.extend(encode(
        "admin_tokens",
        &AdminTokenTail {
            expires: record.expires,
        },
    )?);
    Ok(bytes)
}

/// Reads an admin token record, with or without the tail an older hub did not write.
pub(super) fn decode_admin_token(bytes: &[u8]) -> Result<AdminTokenRecord> {
    let corrupt = |error: postcard::Error| StoreError::Corrupt {
        tree: "admin_tokens",
        reason: error.to_string(),
    };
    let (mut record, rest): (AdminTokenRecord, &[u8]) =
        postcard::take_from_bytes(bytes).map_err(corrupt)?;
    if !rest.is_empty() {
        let tail: AdminTokenTail = postcard::from_bytes(rest).map_err(corrupt)?;
        record.expires = tail.expires;
    }
    Ok(record)
}
