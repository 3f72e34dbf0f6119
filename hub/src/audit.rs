//! The admin audit log: an append-only, hash-chained record of every admin action.
//!
//! Each entry's hash covers its fields and the previous entry's hash, and the store keeps the
//! chain head beside the entries. [`verify`] recomputes the chain: an edited entry breaks its own
//! hash, a deleted one leaves a gap in the sequence or a broken link, and a deleted tail no longer
//! matches the head.
//!
//! The chain has no key, so a hub that is itself compromised could rewrite it whole and
//! consistently. `outpost-hub audit verify` therefore checks the chain again on the operator's
//! machine ([`chain_problem`] over the entries the admin API lists), and with `--pin FILE` keeps
//! the head it verified outside the hub: a later log that no longer holds that entry, with that
//! hash, was rewritten.

use outpost_protocol::sha256;

use crate::api::{AuditEntry, AuditVerdict};
use crate::store::{AuditRecord, Store, StoreError};

const CONTEXT: &[u8] = b"outpost audit entry v1\0";

/// The hash of one entry, over every field but itself.
pub fn entry_hash(
    prev_hash: &[u8; 32],
    seq: u64,
    at: u64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> [u8; 32] {
    let mut bytes = Vec::with_capacity(128 + detail.len());
    bytes.extend_from_slice(CONTEXT);
    bytes.extend_from_slice(prev_hash);
    bytes.extend_from_slice(&seq.to_le_bytes());
    bytes.extend_from_slice(&at.to_le_bytes());
    for field in [actor, action, target, detail] {
        bytes.extend_from_slice(&(field.len() as u64).to_le_bytes());
        bytes.extend_from_slice(field.as_bytes());
    }
    sha256(&bytes).0
}

/// Appends an entry to the chain.
pub async fn append(
    store: &Store,
    at: u64,
    actor: &str,
    action: &str,
    target: &str,
    detail: &str,
) -> Result<AuditRecord, StoreError> {
    store
        .append_audit(|prev_seq, prev_hash| {
            let seq = prev_seq + 1;
            AuditRecord {
                seq,
                at,
                actor: actor.to_owned(),
                action: action.to_owned(),
                target: target.to_owned(),
                detail: detail.to_owned(),
                prev_hash,
                hash: entry_hash(&prev_hash, seq, at, actor, action, target, detail),
            }
        })
        .await
}

/// One entry of the chain as [`chain_problem`] checks it: the hub's stored record, or an entry
/// as the admin API lists it, checked again by `audit verify` on the operator's machine.
#[derive(Debug, Clone, Copy)]
pub struct Link<'a> {
    pub seq: u64,
    pub at: u64,
    pub actor: &'a str,
    pub action: &'a str,
    pub target: &'a str,
    pub detail: &'a str,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

impl<'a> From<&'a AuditRecord> for Link<'a> {
    fn from(record: &'a AuditRecord) -> Link<'a> {
        Link {
            seq: record.seq,
            at: record.at,
            actor: &record.actor,
            action: &record.action,
            target: &record.target,
            detail: &record.detail,
            prev_hash: record.prev_hash,
            hash: record.hash,
        }
    }
}

/// Walks a chain from its first entry and names the first thing wrong with it: a missing entry,
/// a broken link, or an entry whose contents no longer match its hash.
pub fn chain_problem<'a>(entries: impl IntoIterator<Item = Link<'a>>) -> Option<String> {
    let mut prev_hash = [0u8; 32];
    for (expected_seq, entry) in (1u64..).zip(entries) {
        if entry.seq != expected_seq {
            return Some(format!(
                "entry {expected_seq} is missing (next entry is {})",
                entry.seq
            ));
        }
        if entry.prev_hash != prev_hash {
            return Some(format!(
                "entry {} does not link to entry {}",
                entry.seq,
                entry.seq - 1
            ));
        }
        let hash = entry_hash(
            &entry.prev_hash,
            entry.seq,
            entry.at,
            entry.actor,
            entry.action,
            entry.target,
            entry.detail,
        );
        if hash != entry.hash {
            return Some(format!(
                "entry {} was altered: its contents no longer match its hash",
                entry.seq
            ));
        }
        prev_hash = entry.hash;
    }
    None
}

/// Walks the whole stored chain and names the first thing wrong with it, the chain head the
/// store keeps beside the entries included.
pub async fn verify(store: &Store) -> Result<AuditVerdict, StoreError> {
    let (entries, head) = store.audit_entries(0).await?;
    let count = entries.len() as u64;
    let verdict = |problem: Option<String>| AuditVerdict {
        entries: count,
        intact: problem.is_none(),
        problem,
    };
    if let Some(problem) = chain_problem(entries.iter().map(Link::from)) {
        return Ok(verdict(Some(problem)));
    }
    let last = entries.last().map(|entry| (entry.seq, entry.hash));
    if head != last {
        let head_seq = head.map_or(0, |(seq, _)| seq);
        return Ok(verdict(Some(format!(
            "the chain head records entry {head_seq}, the log ends at entry {}",
            last.map_or(0, |(seq, _)| seq)
        ))));
    }
    Ok(verdict(None))
}

pub fn to_api(record: &AuditRecord) -> AuditEntry {
    AuditEntry {
        seq: record.seq,
        at: record.at,
        actor: record.actor.clone(),
        action: record.action.clone(),
        target: record.target.clone(),
        detail: record.detail.clone(),
        prev_hash: hex::encode(record.prev_hash),
        hash: hex::encode(record.hash),
    }
}
