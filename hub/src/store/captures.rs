//! Data capture (schema 6): the signed capture allowances operators uploaded, one per model and
//! allowance sequence, kept as signed; and the sealed samples devices uploaded, opaque bytes the
//! hub cannot read, each with the device, model version, allowance and times it is listed by.
//! A sample is stored once per device and sample id, so an upload sent again after a lost
//! acknowledgement adds nothing; samples go with the hub's telemetry retention
//! ([`Store::prune_captures`]).

use super::*;

/// One sealed sample to store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaptureInsert {
    pub sample_id: [u8; 16],
    pub model: String,
    pub version: u64,
    pub allowance: u64,
    pub captured_at: u64,
    pub sealed: Vec<u8>,
}

/// A stored sample without its bytes, as listings show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredCapture {
    pub id: u64,
    pub device: [u8; 16],
    pub model: String,
    pub version: u64,
    pub allowance: u64,
    pub captured_at: u64,
    pub received_at: u64,
    pub bytes: u64,
}

/// Which samples a listing wants; `None` matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureFilter {
    pub model: Option<String>,
    pub version: Option<u64>,
    pub device: Option<[u8; 16]>,
    /// Received at or after, Unix seconds.
    pub since: Option<u64>,
    /// Received before, Unix seconds.
    pub until: Option<u64>,
    pub limit: u64,
}

const CAPTURE_COLUMNS: &str = "id, device, model, version, allowance, captured_at, received_at, \
     CAST(LENGTH(sealed) AS BIGINT)";

fn stored_capture(row: &AnyRow) -> Result<StoredCapture> {
    const TABLE: &str = "captures";
    Ok(StoredCapture {
        id: column_u64(TABLE, row, 0)?,
        device: fixed(TABLE, &blob(row, 1)?)?,
        model: row.try_get::<String, _>(2)?,
        version: column_u64(TABLE, row, 3)?,
        allowance: column_u64(TABLE, row, 4)?,
        captured_at: column_u64(TABLE, row, 5)?,
        received_at: column_u64(TABLE, row, 6)?,
        bytes: column_u64(TABLE, row, 7)?,
    })
}

impl Store {
    // Capture allowances.

    /// Stores a verified allowance under its model and sequence.
    pub async fn put_capture_allowance(&self, record: &CaptureAllowanceRecord) -> Result<()> {
        sqlx::query(
            "INSERT INTO capture_allowances (model, sequence, record) VALUES ($1, $2, $3) \
             ON CONFLICT (model, sequence) DO UPDATE SET record = excluded.record",
        )
        .bind(record.model.clone())
        .bind(int("allowance sequence", record.sequence)?)
        .bind(encode("capture_allowances", record)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Every allowance, by model and then sequence.
    pub async fn capture_allowances(&self) -> Result<Vec<CaptureAllowanceRecord>> {
        sqlx::query("SELECT record FROM capture_allowances ORDER BY model, sequence")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| decode("capture_allowances", &blob(row, 0)?))
            .collect()
    }

    /// The allowance of `model` at the highest sequence, if there is one.
    pub async fn latest_capture_allowance(
        &self,
        model: &str,
    ) -> Result<Option<CaptureAllowanceRecord>> {
        sqlx::query(
            "SELECT record FROM capture_allowances WHERE model = $1 \
             ORDER BY sequence DESC LIMIT 1",
        )
        .bind(model.to_owned())
        .fetch_optional(&self.pool)
        .await?
        .map(|row| decode("capture_allowances", &blob(&row, 0)?))
        .transpose()
    }

    // Captured samples.

    /// Stores `samples` of `device`, received at `received_at`, in one transaction; a sample
    /// already stored (the same device and sample id) is left as it is. Returns how many were new.
    pub async fn insert_captures(
        &self,
        device: &[u8; 16],
        received_at: u64,
        samples: &[CaptureInsert],
    ) -> Result<u64> {
        let mut transaction = self.writer.begin().await?;
        let mut added = 0;
        for sample in samples {
            added += sqlx::query(
                "INSERT INTO captures (device, sample_id, model, version, allowance, \
                 captured_at, received_at, sealed) VALUES ($1, $2, $3, $4, $5, $6, $7, $8) \
                 ON CONFLICT (device, sample_id) DO NOTHING",
            )
            .bind(device.to_vec())
            .bind(sample.sample_id.to_vec())
            .bind(sample.model.clone())
            .bind(int("model version", sample.version)?)
            .bind(int("allowance sequence", sample.allowance)?)
            .bind(int("capture time", sample.captured_at)?)
            .bind(int("receive time", received_at)?)
            .bind(sample.sealed.clone())
            .execute(&mut *transaction)
            .await?
            .rows_affected();
        }
        transaction.commit().await?;
        Ok(added)
    }

    /// The samples `filter` matches, oldest received first, without their bytes.
    pub async fn captures(&self, filter: &CaptureFilter) -> Result<Vec<StoredCapture>> {
        let mut conditions = Vec::new();
        let mut next = 1;
        let mut condition = |text: &str| {
            conditions.push(format!("{text} ${next}"));
            next += 1;
        };
        if filter.model.is_some() {
            condition("model =");
        }
        if filter.version.is_some() {
            condition("version =");
        }
        if filter.device.is_some() {
            condition("device =");
        }
        if filter.since.is_some() {
            condition("received_at >=");
        }
        if filter.until.is_some() {
            condition("received_at <");
        }
        let mut sql = format!("SELECT {CAPTURE_COLUMNS} FROM captures");
        if !conditions.is_empty() {
            sql.push_str(" WHERE ");
            sql.push_str(&conditions.join(" AND "));
        }
        sql.push_str(&format!(" ORDER BY id LIMIT ${next}"));
        // Built from fixed fragments only; every value is a bound parameter.
        let mut query = sqlx::query(sqlx::AssertSqlSafe(sql));
        if let Some(model) = &filter.model {
            query = query.bind(model.clone());
        }
        if let Some(version) = filter.version {
            query = query.bind(bound(version));
        }
        if let Some(device) = filter.device {
            query = query.bind(device.to_vec());
        }
        if let Some(since) = filter.since {
            query = query.bind(bound(since));
        }
        if let Some(until) = filter.until {
            query = query.bind(bound(until));
        }
        query = query.bind(bound(filter.limit));
        query
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(stored_capture)
            .collect()
    }

    /// One stored sample and its sealed bytes.
    pub async fn capture(&self, id: u64) -> Result<Option<(StoredCapture, Vec<u8>)>> {
        let row = sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {CAPTURE_COLUMNS}, sealed FROM captures WHERE id = $1"
        )))
        .bind(bound(id))
        .fetch_optional(&self.pool)
        .await?;
        row.map(|row| Ok((stored_capture(&row)?, blob(&row, 8)?)))
            .transpose()
    }

    /// Removes the samples received before `cutoff`. Returns how many went.
    pub async fn prune_captures(&self, cutoff: u64) -> Result<u64> {
        Ok(sqlx::query("DELETE FROM captures WHERE received_at < $1")
            .bind(bound(cutoff))
            .execute(&self.writer)
            .await?
            .rows_affected())
    }
}
