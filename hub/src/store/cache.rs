//! What a store that no other hub shares (SQLite, locked to one process) keeps in memory: the
//! newest root's version, so a check-in from a device that has it (nearly every one) reads no
//! roots; the stored bytes of recently read device records, so a device's next request reads
//! none; and the alert rules, which the alert evaluator asks for after every telemetry batch,
//! nearly always to find none or the same. A store other hubs may share (PostgreSQL) keeps the
//! newest root's version, read again every tick ([`Store::refresh`]), and neither of the others:
//! another hub may write them at any time.
//!
//! The device cache is filled by reads and emptied of a device by every write of its record,
//! after the write commits; the rules cache is filled by a read of every rule and emptied by
//! every write of a rule, after it commits. A read that raced a write must not put what it read
//! from before the write back: each write moves a generation on, and a read fills the cache only
//! if the generation it started in is still current (both under the cache's lock).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use super::*;

/// Device records kept at most, about 300 bytes each.
const MAX_DEVICES: usize = 100_000;

#[derive(Debug, Default)]
pub(super) struct DeviceCache {
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    generation: u64,
    records: HashMap<[u8; 16], Vec<u8>>,
}

impl DeviceCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) fn get(&self, id: &[u8; 16]) -> Option<Vec<u8>> {
        self.lock().records.get(id).cloned()
    }

    /// The generation a read starts in, for [`DeviceCache::fill`].
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps `bytes`, read from the store in `generation`, unless a write came since.
    pub(super) fn fill(&self, id: &[u8; 16], bytes: &[u8], generation: u64) {
        let mut inner = self.lock();
        if inner.generation != generation {
            return;
        }
        if inner.records.len() >= MAX_DEVICES && !inner.records.contains_key(id) {
            // Any one goes: the cache only saves reads.
            if let Some(evicted) = inner.records.keys().next().copied() {
                inner.records.remove(&evicted);
            }
        }
        inner.records.insert(*id, bytes.to_vec());
    }

    /// Forgets `id` after a write of its record committed.
    pub(super) fn written(&self, id: &[u8; 16]) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.records.remove(id);
    }
}

/// Every alert rule, by name, once read; see the module's notes.
#[derive(Debug, Default)]
pub(super) struct RulesCache {
    inner: Mutex<Rules>,
}

#[derive(Debug, Default)]
struct Rules {
    generation: u64,
    rules: Option<Arc<Vec<AlertRuleRecord>>>,
}

impl RulesCache {
    fn lock(&self) -> std::sync::MutexGuard<'_, Rules> {
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The rules, if read since the last write of one.
    pub(super) fn get(&self) -> Option<Arc<Vec<AlertRuleRecord>>> {
        self.lock().rules.clone()
    }

    /// The generation a read starts in, for [`RulesCache::fill`].
    pub(super) fn generation(&self) -> u64 {
        self.lock().generation
    }

    /// Keeps `rules`, every rule read from the store in `generation`, unless a write came since.
    pub(super) fn fill(&self, rules: Arc<Vec<AlertRuleRecord>>, generation: u64) {
        let mut inner = self.lock();
        if inner.generation == generation {
            inner.rules = Some(rules);
        }
    }

    /// Forgets the rules after a write of one committed.
    pub(super) fn written(&self) {
        let mut inner = self.lock();
        inner.generation = inner.generation.wrapping_add(1);
        inner.rules = None;
    }
}

impl Store {
    /// Forgets device `id`'s cached record, after a write of it committed.
    pub(super) fn device_written(&self, id: &[u8; 16]) {
        if let Some(cache) = &self.devices_cache {
            cache.written(id);
        }
    }

    /// Reads again what the store keeps in memory of data other hubs may change: the newest
    /// root's version. The clock calls it on every tick of a shared store.
    pub async fn refresh(&self) -> Result<()> {
        let newest: Option<i64> = sqlx::query_scalar("SELECT MAX(version) FROM roots")
            .fetch_one(&self.pool)
            .await?;
        self.newest_root
            .fetch_max(uint("roots", newest.unwrap_or(0))?, Ordering::SeqCst);
        Ok(())
    }
}
