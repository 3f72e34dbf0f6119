//! The audit log's hash chain as stored: entries and the chain head, written together.

use super::*;

pub(super) const AUDIT_HEAD: &[u8] = b"audit_head";

/// The last audit entry's sequence number and hash, kept beside the log.
pub type AuditHead = (u64, [u8; 32]);

impl Store {
    // Audit log.

    /// Appends to the hash chain: `make` gets the previous entry's (seq, hash) and returns the new
    /// entry. The entry and the chain head are written in one transaction.
    pub fn append_audit(&self, make: impl Fn(u64, [u8; 32]) -> AuditRecord) -> Result<AuditRecord> {
        let record = (&self.audit, &self.meta).transaction(|(audit, meta)| {
            let (prev_seq, prev_hash) = match meta.get(AUDIT_HEAD)? {
                Some(bytes) => decode::<(u64, [u8; 32])>("meta", &bytes).map_err(abort)?,
                None => (0, [0u8; 32]),
            };
            let record = make(prev_seq, prev_hash);
            audit.insert(
                &record.seq.to_be_bytes(),
                encode("audit", &record).map_err(abort)?,
            )?;
            meta.insert(
                AUDIT_HEAD,
                encode("meta", &(record.seq, record.hash)).map_err(abort)?,
            )?;
            Ok(record)
        })?;
        Ok(record)
    }

    /// Audit entries with `seq > since`, oldest first, and the recorded chain head.
    pub fn audit_entries(&self, since: u64) -> Result<(Vec<AuditRecord>, Option<AuditHead>)> {
        let entries = self
            .audit
            .range((since.saturating_add(1)).to_be_bytes()..)
            .values()
            .map(|bytes| decode("audit", &bytes?))
            .collect::<Result<Vec<AuditRecord>>>()?;
        let head = self
            .meta
            .get(AUDIT_HEAD)?
            .map(|bytes| decode("meta", &bytes))
            .transpose()?;
        Ok((entries, head))
    }
}
