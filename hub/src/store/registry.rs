//! Admin and enrollment tokens, trust roots and model manifests: what the admin API registers.

use super::sql::for_update;
use super::*;

impl Store {
    // Admin tokens.

    pub async fn admin_token(&self, token_hash: &[u8; 32]) -> Result<Option<AdminTokenRecord>> {
        sqlx::query("SELECT record FROM admin_tokens WHERE token_hash = $1")
            .bind(token_hash.to_vec())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| decode_admin_token(&blob(&row, 0)?))
            .transpose()
    }

    pub async fn insert_admin_token(
        &self,
        token_hash: &[u8; 32],
        record: &AdminTokenRecord,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO admin_tokens (token_hash, id, record) VALUES ($1, $2, $3) \
             ON CONFLICT (token_hash) DO UPDATE SET id = excluded.id, record = excluded.record",
        )
        .bind(token_hash.to_vec())
        .bind(record.id.clone())
        .bind(encode_admin_token(record)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Every admin token, in the order of their hashes.
    pub async fn admin_tokens(&self) -> Result<Vec<AdminTokenRecord>> {
        sqlx::query("SELECT record FROM admin_tokens ORDER BY token_hash")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| decode_admin_token(&blob(row, 0)?))
            .collect()
    }

    /// Deletes the admin token with id `id`, unless `keep` refuses it given the record and every
    /// other token; returns the deleted record, None when no token has that id. One transaction
    /// that locks every token: two revocations at once cannot both pass a `keep` that counts
    /// what remains.
    pub async fn revoke_admin_token<E>(
        &self,
        id: &str,
        keep: impl Fn(&AdminTokenRecord, &[AdminTokenRecord]) -> std::result::Result<(), E>,
    ) -> Result<Option<std::result::Result<AdminTokenRecord, E>>> {
        let mut transaction = self.writer.begin().await?;
        let rows = sqlx::query(self.dialect.locking(for_update!(
            "SELECT token_hash, record FROM admin_tokens ORDER BY token_hash"
        )))
        .fetch_all(&mut *transaction)
        .await?;
        let mut found = None;
        let mut others = Vec::new();
        for row in &rows {
            let record = decode_admin_token(&blob(row, 1)?)?;
            if record.id == id {
                found = Some((blob(row, 0)?, record));
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
        sqlx::query("DELETE FROM admin_tokens WHERE token_hash = $1")
            .bind(hash)
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Some(Ok(record)))
    }

    // Enrollment.

    pub async fn insert_enroll_token(
        &self,
        token_hash: &[u8; 32],
        record: &EnrollTokenRecord,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO enroll_tokens (token_hash, id, record) VALUES ($1, $2, $3) \
             ON CONFLICT (token_hash) DO UPDATE SET id = excluded.id, record = excluded.record",
        )
        .bind(token_hash.to_vec())
        .bind(record.id.clone())
        .bind(encode("enroll_tokens", record)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Deletes the enrollment token with id `id`; returns it, None when no token has that id.
    pub async fn revoke_enroll_token(&self, id: &str) -> Result<Option<EnrollTokenRecord>> {
        let mut transaction = self.writer.begin().await?;
        let row = sqlx::query(self.dialect.locking(for_update!(
            "SELECT record FROM enroll_tokens WHERE id = $1"
        )))
        .bind(id.to_owned())
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Ok(None);
        };
        let record: EnrollTokenRecord = decode("enroll_tokens", &blob(&row, 0)?)?;
        sqlx::query("DELETE FROM enroll_tokens WHERE id = $1")
            .bind(id.to_owned())
            .execute(&mut *transaction)
            .await?;
        transaction.commit().await?;
        Ok(Some(record))
    }

    pub async fn enroll_tokens(&self) -> Result<Vec<EnrollTokenRecord>> {
        sqlx::query("SELECT record FROM enroll_tokens ORDER BY token_hash")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| decode("enroll_tokens", &blob(row, 0)?))
            .collect()
    }

    /// Uses one count of an enrollment token and stores the new device and its enrollment event,
    /// in one transaction that locks the token: a token with one use left enrolls exactly one
    /// device however many try at once. `make_device` and `make_event` receive the token (its
    /// labels).
    pub async fn enroll(
        &self,
        token_hash: &[u8; 32],
        now: u64,
        make_device: impl Fn(&EnrollTokenRecord) -> DeviceRecord,
        make_event: impl Fn(&EnrollTokenRecord) -> EventRecord,
    ) -> Result<std::result::Result<DeviceRecord, TokenRefusal>> {
        let mut transaction = self.writer.begin().await?;
        let row = sqlx::query(self.dialect.locking(for_update!(
            "SELECT record FROM enroll_tokens WHERE token_hash = $1"
        )))
        .bind(token_hash.to_vec())
        .fetch_optional(&mut *transaction)
        .await?;
        let Some(row) = row else {
            return Ok(Err(TokenRefusal::Unknown));
        };
        let mut token: EnrollTokenRecord = decode("enroll_tokens", &blob(&row, 0)?)?;
        if token.expires <= now {
            return Ok(Err(TokenRefusal::Expired));
        }
        if token.uses_left == 0 {
            return Ok(Err(TokenRefusal::UsedUp));
        }
        token.uses_left -= 1;
        sqlx::query("UPDATE enroll_tokens SET record = $1 WHERE token_hash = $2")
            .bind(encode("enroll_tokens", &token)?)
            .bind(token_hash.to_vec())
            .execute(&mut *transaction)
            .await?;
        let device = make_device(&token);
        sqlx::query(
            "INSERT INTO devices (id, record) VALUES ($1, $2) \
             ON CONFLICT (id) DO UPDATE SET record = excluded.record",
        )
        .bind(device.id.to_vec())
        .bind(super::devices::encode_device(&device, None)?)
        .execute(&mut *transaction)
        .await?;
        super::devices::insert_event(&mut transaction, &device.id, &make_event(&token)).await?;
        transaction.commit().await?;
        self.device_written(&device.id);
        Ok(Ok(device))
    }

    // Roots.

    pub async fn put_root(&self, version: u64, signed: &[u8]) -> Result<()> {
        sqlx::query(
            "INSERT INTO roots (version, signed) VALUES ($1, $2) \
             ON CONFLICT (version) DO UPDATE SET signed = excluded.signed",
        )
        .bind(int("root version", version)?)
        .bind(signed.to_vec())
        .execute(&self.writer)
        .await?;
        self.newest_root.fetch_max(version, Ordering::SeqCst);
        Ok(())
    }

    /// Every stored root, oldest first.
    pub async fn roots(&self) -> Result<Vec<(u64, Vec<u8>)>> {
        self.roots_from(0).await
    }

    /// Signed roots with a version above `version`, oldest first: what a device that trusts root
    /// `version` needs next (for a device up to date, nothing is read).
    pub async fn roots_after(&self, version: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        if version >= self.newest_root.load(Ordering::SeqCst) {
            return Ok(Vec::new());
        }
        self.roots_from(version).await
    }

    async fn roots_from(&self, version: u64) -> Result<Vec<(u64, Vec<u8>)>> {
        sqlx::query("SELECT version, signed FROM roots WHERE version > $1 ORDER BY version")
            .bind(bound(version))
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| Ok((column_u64("roots", row, 0)?, blob(row, 1)?)))
            .collect()
    }

    // Manifests.

    pub async fn put_manifest(
        &self,
        name: &str,
        version: u64,
        record: &ManifestRecord,
    ) -> Result<()> {
        sqlx::query(
            "INSERT INTO manifests (model, version, record) VALUES ($1, $2, $3) \
             ON CONFLICT (model, version) DO UPDATE SET record = excluded.record",
        )
        .bind(name.to_owned())
        .bind(int("model version", version)?)
        .bind(encode("manifests", record)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    pub async fn manifest(&self, name: &str, version: u64) -> Result<Option<ManifestRecord>> {
        let Ok(version) = i64::try_from(version) else {
            return Ok(None);
        };
        sqlx::query("SELECT record FROM manifests WHERE model = $1 AND version = $2")
            .bind(name.to_owned())
            .bind(version)
            .fetch_optional(&self.pool)
            .await?
            .map(|row| decode("manifests", &blob(&row, 0)?))
            .transpose()
    }

    /// Whether any version of model `name` was ever published here.
    pub async fn has_model(&self, name: &str) -> Result<bool> {
        Ok(
            sqlx::query("SELECT 1 FROM manifests WHERE model = $1 LIMIT 1")
                .bind(name.to_owned())
                .fetch_optional(&self.pool)
                .await?
                .is_some(),
        )
    }

    /// Every version of every model, as (name, version, record), by name then version.
    pub async fn manifests(&self) -> Result<Vec<(String, u64, ManifestRecord)>> {
        sqlx::query("SELECT model, version, record FROM manifests ORDER BY model, version")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| {
                Ok((
                    row.try_get::<String, _>(0)?,
                    column_u64("manifests", row, 1)?,
                    decode("manifests", &blob(row, 2)?)?,
                ))
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
        table: "admin_tokens",
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
