//! The audit log's hash chain as stored: entries and the chain head, written together.

use super::sql::for_update;
use super::*;

pub(super) const AUDIT_HEAD: &str = "audit_head";

/// The last audit entry's sequence number and hash, kept beside the log.
pub type AuditHead = (u64, [u8; 32]);

impl Store {
    // Audit log.

    /// Appends to the hash chain: `make` gets the previous entry's (seq, hash) and returns the new
    /// entry. The entry and the chain head are written in one transaction, which locks the head:
    /// two hubs on one database append one after the other.
    pub async fn append_audit(
        &self,
        make: impl Fn(u64, [u8; 32]) -> AuditRecord,
    ) -> Result<AuditRecord> {
        let mut transaction = self.writer.begin().await?;
        // The head row exists before it is locked: two first appends at once on PostgreSQL would
        // otherwise both lock nothing and both take sequence 1. (The second insert waits for the
        // first's commit, then does nothing.)
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ('audit_head', $1) ON CONFLICT (key) DO NOTHING",
        )
        .bind(encode("meta", &(0u64, [0u8; 32]))?)
        .execute(&mut *transaction)
        .await?;
        let head = sqlx::query(self.dialect.locking(for_update!(
            "SELECT value FROM meta WHERE key = 'audit_head'"
        )))
        .fetch_one(&mut *transaction)
        .await?;
        let (prev_seq, prev_hash) = decode::<(u64, [u8; 32])>("meta", &blob(&head, 0)?)?;
        let record = make(prev_seq, prev_hash);
        sqlx::query("INSERT INTO audit (seq, record) VALUES ($1, $2)")
            .bind(int("audit sequence", record.seq)?)
            .bind(encode("audit", &record)?)
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "INSERT INTO meta (key, value) VALUES ($1, $2) \
             ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        )
        .bind(AUDIT_HEAD)
        .bind(encode("meta", &(record.seq, record.hash))?)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(record)
    }

    /// Audit entries with `seq > since`, oldest first, and the recorded chain head.
    pub async fn audit_entries(&self, since: u64) -> Result<(Vec<AuditRecord>, Option<AuditHead>)> {
        let mut transaction = self.pool.begin().await?;
        let entries = sqlx::query("SELECT record FROM audit WHERE seq > $1 ORDER BY seq")
            .bind(bound(since))
            .fetch_all(&mut *transaction)
            .await?
            .iter()
            .map(|row| decode("audit", &blob(row, 0)?))
            .collect::<Result<Vec<AuditRecord>>>()?;
        let head = sqlx::query("SELECT value FROM meta WHERE key = 'audit_head'")
            .fetch_optional(&mut *transaction)
            .await?
            .map(|row| decode("meta", &blob(&row, 0)?))
            .transpose()?;
        transaction.commit().await?;
        Ok((entries, head))
    }
}
