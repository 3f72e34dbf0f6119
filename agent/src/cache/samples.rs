//! Sealed capture samples in the telemetry cache: queued until the hub acknowledges them, under
//! the cache's one byte cap, yielding to telemetry (module docs of `mod.rs`, "Captured samples").
//!
//! Keys are 8-byte big-endian sequence numbers, so the tree iterates oldest first; the count of
//! samples dropped and not yet reported lives under [`DROPPED_KEY`], which no sample key can be.

use std::collections::BTreeMap;
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{CacheError, TelemetryCache};

const DROPPED_KEY: &[u8] = b"dropped";

/// A sealed sample as the cache keeps it: the agent's own record, not the wire's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedSample {
    pub id: [u8; 16],
    pub model: String,
    pub version: u64,
    pub allowance: u64,
    pub captured_at: u64,
    #[serde(with = "serde_bytes")]
    pub sealed: Vec<u8>,
}

/// What [`TelemetryCache::append_sample`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SampleAppend {
    /// The sample is queued (false: it did not fit beside the telemetry held, and was dropped).
    pub stored: bool,
    /// Older samples dropped to make room.
    pub dropped_older: u64,
}

/// The samples' index in memory: each key's logical bytes (key and value), their sum, and the
/// drops not yet reported.
#[derive(Debug, Default)]
pub(super) struct SampleQueue {
    keys: BTreeMap<u64, u64>,
    bytes: u64,
    dropped: u64,
    /// The next sample's key: never one a sample in an unacknowledged upload had.
    next: u64,
}

pub(super) fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl SampleQueue {
    /// Notes one stored entry, read at open.
    pub(super) fn scan(&mut self, key: &[u8], value: &[u8]) -> Result<(), String> {
        if key == DROPPED_KEY {
            let bytes: [u8; 8] = value
                .try_into()
                .map_err(|_| "the capture drop counter is not 8 bytes".to_owned())?;
            self.dropped = u64::from_be_bytes(bytes);
            return Ok(());
        }
        let number: [u8; 8] = key
            .try_into()
            .map_err(|_| format!("a capture key of {} bytes", key.len()))?;
        let size = (key.len() + value.len()) as u64;
        let number = u64::from_be_bytes(number);
        self.keys.insert(number, size);
        self.bytes += size;
        self.next = self.next.max(number.saturating_add(1));
        Ok(())
    }

    pub(super) fn len(&self) -> u64 {
        self.keys.len() as u64
    }

    pub(super) fn bytes(&self) -> u64 {
        self.bytes
    }
}

impl TelemetryCache {
    /// Queues one sealed sample, dropping the oldest samples to make room under the cap; a
    /// sample that does not fit beside the telemetry held is dropped itself. Drops are counted.
    pub fn append_sample(&self, sample: &QueuedSample) -> Result<SampleAppend, CacheError> {
        let value = postcard::to_allocvec(sample).map_err(|error| CacheError::Encode {
            tree: "captures",
            reason: error.to_string(),
        })?;
        let state = self.lock();
        let mut queue = lock(&self.samples);
        let size = 8 + value.len() as u64;
        if state.total_bytes.saturating_add(size) > self.cap_bytes {
            queue.dropped += 1;
            self.write_dropped(&queue)?;
            self.flush()?;
            return Ok(SampleAppend {
                stored: false,
                dropped_older: 0,
            });
        }
        let dropped_older = self.drop_oldest_samples(&mut queue, state.total_bytes + size)?;
        let key = queue.next;
        queue.next = key.saturating_add(1);
        self.captures.insert(key.to_be_bytes(), value)?;
        queue.keys.insert(key, size);
        queue.bytes += size;
        if dropped_older > 0 {
            self.write_dropped(&queue)?;
            log::warn!("telemetry cache full: dropped the {dropped_older} oldest captured samples");
        }
        self.flush()?;
        Ok(SampleAppend {
            stored: true,
            dropped_older,
        })
    }

    /// The oldest queued samples, at most `max_samples` of them and about `max_bytes` of sealed
    /// bytes (at least one), with their keys; and the drops not yet reported. A sample that no
    /// longer decodes is removed and counted as dropped.
    pub fn pending_samples(
        &self,
        max_samples: usize,
        max_bytes: usize,
    ) -> Result<(Vec<(u64, QueuedSample)>, u64), CacheError> {
        let mut queue = lock(&self.samples);
        let keys: Vec<u64> = queue.keys.keys().copied().collect();
        let mut out = Vec::new();
        let mut bytes = 0usize;
        for key in keys {
            if out.len() >= max_samples {
                break;
            }
            let Some(value) = self.captures.get(key.to_be_bytes())? else {
                continue;
            };
            match postcard::from_bytes::<QueuedSample>(&value) {
                Ok(sample) => {
                    if !out.is_empty() && bytes + sample.sealed.len() > max_bytes {
                        break;
                    }
                    bytes += sample.sealed.len();
                    out.push((key, sample));
                }
                Err(error) => {
                    log::error!("captured sample {key} is unreadable ({error}); dropping it");
                    self.captures.remove(key.to_be_bytes())?;
                    if let Some(size) = queue.keys.remove(&key) {
                        queue.bytes -= size;
                    }
                    queue.dropped += 1;
                    self.write_dropped(&queue)?;
                }
            }
        }
        Ok((out, queue.dropped))
    }

    /// The hub stored the samples of `keys` and heard of `dropped` drops: forgets them.
    pub fn acknowledge_samples(&self, keys: &[u64], dropped: u64) -> Result<(), CacheError> {
        self.flush()?;
        let mut queue = lock(&self.samples);
        for key in keys {
            self.captures.remove(key.to_be_bytes())?;
            if let Some(size) = queue.keys.remove(key) {
                queue.bytes -= size;
            }
        }
        queue.dropped = queue.dropped.saturating_sub(dropped);
        self.write_dropped(&queue)?;
        self.flush()
    }

    /// Counts `count` samples dropped before they reached the cache (a full queue).
    pub fn count_dropped_samples(&self, count: u64) -> Result<(), CacheError> {
        if count == 0 {
            return Ok(());
        }
        let mut queue = lock(&self.samples);
        queue.dropped = queue.dropped.saturating_add(count);
        self.write_dropped(&queue)
    }

    /// Drops the oldest samples until `telemetry_bytes` and the samples fit the cap together.
    /// Called with the telemetry state locked.
    pub(super) fn evict_samples_for(&self, telemetry_bytes: u64) -> Result<(), CacheError> {
        let mut queue = lock(&self.samples);
        let dropped = self.drop_oldest_samples(&mut queue, telemetry_bytes)?;
        if dropped > 0 {
            self.write_dropped(&queue)?;
            log::warn!(
                "telemetry cache over its cap: dropped the {dropped} oldest captured samples"
            );
        }
        Ok(())
    }

    /// Drops the oldest samples until they fit the cap beside `other_bytes`, counting each.
    /// Returns how many went.
    fn drop_oldest_samples(
        &self,
        queue: &mut SampleQueue,
        other_bytes: u64,
    ) -> Result<u64, CacheError> {
        let mut dropped = 0;
        while other_bytes.saturating_add(queue.bytes) > self.cap_bytes {
            let Some((&oldest, &bytes)) = queue.keys.iter().next() else {
                break;
            };
            self.captures.remove(oldest.to_be_bytes())?;
            queue.keys.remove(&oldest);
            queue.bytes -= bytes;
            queue.dropped += 1;
            dropped += 1;
        }
        Ok(dropped)
    }

    fn write_dropped(&self, queue: &SampleQueue) -> Result<(), CacheError> {
        self.captures
            .insert(DROPPED_KEY, &queue.dropped.to_be_bytes()[..])?;
        Ok(())
    }
}
