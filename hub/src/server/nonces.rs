//! The replay cache: the nonce of every signed device request, remembered while its timestamp
//! is still acceptable, with a share of it per device.

use std::collections::hash_map::RandomState;
use std::collections::{HashMap, HashSet};
use std::hash::BuildHasher;

use outpost_protocol::auth::MAX_CLOCK_SKEW_SECS;

/// Most distinct nonces remembered at once; past this the hub sheds load rather than grow.
///
/// A nonce is remembered until its timestamp leaves the skew window, about
/// `MAX_CLOCK_SKEW_SECS + NONCE_BUCKET_SECS` = 310 s after it was signed, so this sustains about
/// 51,000 signed requests a second. At 8 bytes an entry (plus the hash table's control byte and
/// slack) a full cache is 150–290 MB; at 20,000 requests a second it holds about 6.2 million.
/// (It was 2 million, which a hub answering 31,000 check-ins a second filled in 65 s and then
/// refused every request with 503.)
const MAX_NONCES: usize = 16_000_000;

/// Why a request's nonce was not recorded; the device API answers 503 and 429.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum NonceRefusal {
    #[error("replay cache is full; retry shortly")]
    Full,
    #[error(
        "more than {MAX_NONCES_PER_DEVICE} signed requests from this device with timestamps \
         within {NONCE_BUCKET_SECS} s; slow down"
    )]
    DeviceQuota,
}

/// Seconds of `forget_after` that share one bucket of the nonce cache.
const NONCE_BUCKET_SECS: u64 = 10;
/// Entries one device may hold in one bucket: signed requests with timestamps within
/// [`NONCE_BUCKET_SECS`], 100 a second. More are refused with 429, so one device, however fast
/// it signs, holds at most about 34,000 of the cache's 16 million entries and cannot fill it for
/// the others. An agent sends a few requests a minute.
pub const MAX_NONCES_PER_DEVICE: u32 = 1000;

/// The `forget_after` times that share a bucket with `forget_after`: what the per-device quota
/// counts over, in this cache and across hubs sharing a database (`Store::note_nonce`).
pub fn bucket_of(forget_after: u64) -> std::ops::Range<u64> {
    let start = forget_after - forget_after % NONCE_BUCKET_SECS;
    start..start.saturating_add(NONCE_BUCKET_SECS)
}
/// Buckets in the ring: more than the `2 * MAX_CLOCK_SKEW_SECS / NONCE_BUCKET_SECS + 1` epochs a
/// live entry can fall in, so two live epochs never share a slot.
const NONCE_BUCKETS: usize = (2 * MAX_CLOCK_SKEW_SECS / NONCE_BUCKET_SECS) as usize + 4;

/// Nonces seen within the clock-skew window, per device.
///
/// A nonce must be remembered until its request's timestamp leaves the skew window
/// (`forget_after`). Entries are kept in a ring of buckets by `forget_after`, so expired ones go a
/// whole bucket at a time instead of by a scan of every entry (which, once a second under load,
/// held the lock for milliseconds). A replay carries the same signed timestamp as the original,
/// so it always lands in the original's bucket.
///
/// A (device, nonce) pair is kept as its 64-bit SipHash under a key drawn when the hub starts,
/// a quarter of the pair's 32 bytes. Two pairs share a digest with a chance of about
/// `entries / 2^64` per request (under 10^-12 with the cache full); the cost of that is one
/// request refused as a replay, which its device sends again with a fresh nonce. Only requests
/// whose signature verified are recorded, so only a device could try to provoke one, and the key
/// keeps digests unpredictable.
#[derive(Debug)]
pub struct NonceCache {
    buckets: Vec<NonceBucket>,
    /// Entries in all buckets.
    len: usize,
    /// Entries allowed before requests are refused with 503.
    capacity: usize,
    last_sweep: u64,
    digests: RandomState,
}

#[derive(Debug, Default)]
struct NonceBucket {
    /// `forget_after / NONCE_BUCKET_SECS` of every entry.
    epoch: u64,
    seen: HashSet<u64>,
    /// Entries per device, each at most [`MAX_NONCES_PER_DEVICE`].
    per_device: HashMap<[u8; 16], u32>,
}

impl NonceBucket {
    fn clear(&mut self) {
        self.seen = HashSet::new();
        self.per_device = HashMap::new();
    }
}

impl Default for NonceCache {
    fn default() -> NonceCache {
        NonceCache::with_capacity(MAX_NONCES)
    }
}

impl NonceCache {
    pub(super) fn with_capacity(capacity: usize) -> NonceCache {
        NonceCache {
            buckets: (0..NONCE_BUCKETS).map(|_| NonceBucket::default()).collect(),
            len: 0,
            capacity,
            last_sweep: 0,
            digests: RandomState::new(),
        }
    }

    /// Records a nonce of a request whose timestamp is within the skew window of `now`; false when
    /// it was already seen (a replay).
    pub(super) fn insert(
        &mut self,
        device: [u8; 16],
        nonce: [u8; 16],
        timestamp: u64,
        now: u64,
    ) -> Result<bool, NonceRefusal> {
        debug_assert!(timestamp.abs_diff(now) <= MAX_CLOCK_SKEW_SECS);
        if now != self.last_sweep {
            // Empty the buckets whose every entry has expired, so `len` counts live entries only.
            for bucket in &mut self.buckets {
                if (bucket.epoch + 1) * NONCE_BUCKET_SECS <= now && !bucket.seen.is_empty() {
                    self.len -= bucket.seen.len();
                    bucket.clear();
                }
            }
            self.last_sweep = now;
        }
        let epoch = (timestamp + MAX_CLOCK_SKEW_SECS) / NONCE_BUCKET_SECS;
        let bucket = &mut self.buckets[(epoch % NONCE_BUCKETS as u64) as usize];
        if bucket.epoch != epoch {
            // Live epochs span fewer slots than the ring has, so the slot's other epoch is at least
            // a full turn old: every entry in it is past its `forget_after`.
            self.len -= bucket.seen.len();
            bucket.clear();
            bucket.epoch = epoch;
        }
        let digest = self.digests.hash_one((device, nonce));
        if bucket.seen.contains(&digest) {
            return Ok(false);
        }
        if self.len >= self.capacity {
            return Err(NonceRefusal::Full);
        }
        let count = bucket.per_device.entry(device).or_default();
        if *count >= MAX_NONCES_PER_DEVICE {
            return Err(NonceRefusal::DeviceQuota);
        }
        let fresh = bucket.seen.insert(digest);
        *count += u32::from(fresh);
        self.len += usize::from(fresh);
        Ok(fresh)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_refused_again_until_their_timestamp_leaves_the_window() {
        let mut cache = NonceCache::default();
        let (device, other) = ([1; 16], [2; 16]);
        let start = 1_000_000;
        assert!(cache.insert(device, [7; 16], start, start).unwrap());
        assert!(cache.insert(other, [7; 16], start, start).unwrap());
        // Replayed at any moment the timestamp is still acceptable.
        for now in [start, start + 1, start + MAX_CLOCK_SKEW_SECS] {
            assert!(!cache.insert(device, [7; 16], start, now).unwrap());
        }
        // One request a second for several turns of the ring, each signed somewhere in the skew
        // window; a replay is refused as long as the hub would still accept its timestamp.
        let skew = MAX_CLOCK_SKEW_SECS;
        let signed_at = |step: u64| start + step + step * 37 % (2 * skew + 1) - skew;
        let nonce = |step: u64| -> [u8; 16] { step.to_le_bytes().repeat(2).try_into().unwrap() };
        for step in 1..3_000u64 {
            let now = start + step;
            assert!(cache
                .insert(device, nonce(step), signed_at(step), now)
                .unwrap());
            for earlier in [step.saturating_sub(10), step.saturating_sub(400)] {
                if earlier > 0 && signed_at(earlier) + skew >= now {
                    assert!(
                        !cache
                            .insert(device, nonce(earlier), signed_at(earlier), now)
                            .unwrap(),
                        "the nonce of step {earlier} was forgotten at step {step}"
                    );
                }
            }
        }
        // Expired entries leave within a bucket's span: what is counted is at most the requests of
        // the last window and a bucket, not of the whole run.
        let bound = (2 * skew + NONCE_BUCKET_SECS) as usize + 1;
        assert!(
            cache.len <= bound,
            "{} entries kept, at most {bound} live",
            cache.len
        );
    }

    /// A full cache refuses new requests with 503 (and still names a replay as one), and takes
    /// requests again once the oldest entries leave the window.
    /// Issue 21, finding 10: one device signing as fast as it can held any number of the
    /// cache's entries, and could fill it for every other device.
    #[test]
    fn one_device_holds_at_most_its_quota_of_the_nonce_cache() {
        let mut cache = NonceCache::default();
        let start = 1_000_000;
        let nonce = |n: u32| {
            let mut nonce = [0u8; 16];
            nonce[..4].copy_from_slice(&n.to_le_bytes());
            nonce
        };
        for n in 0..MAX_NONCES_PER_DEVICE {
            assert!(cache.insert([1; 16], nonce(n), start, start).unwrap());
        }
        let refused = cache
            .insert([1; 16], nonce(MAX_NONCES_PER_DEVICE), start, start)
            .unwrap_err();
        assert_eq!(refused, NonceRefusal::DeviceQuota);
        assert!(refused.to_string().contains("slow down"), "{refused}");
        // A replay is still named a replay, and other devices are not affected.
        assert!(!cache.insert([1; 16], nonce(0), start, start).unwrap());
        assert!(cache.insert([2; 16], nonce(0), start, start).unwrap());
        // Requests signed in the next bucket count afresh.
        let next = start + NONCE_BUCKET_SECS;
        assert!(cache.insert([1; 16], nonce(u32::MAX), next, next).unwrap());
    }

    #[test]
    fn a_full_nonce_cache_sheds_load_until_entries_expire() {
        let mut cache = NonceCache::with_capacity(3);
        let start = 1_000_000;
        for nonce in 1..=3u8 {
            assert!(cache.insert([1; 16], [nonce; 16], start, start).unwrap());
        }
        let full = cache.insert([1; 16], [4; 16], start, start).unwrap_err();
        assert_eq!(full, NonceRefusal::Full);
        assert!(full.to_string().contains("replay cache is full"), "{full}");
        assert!(!cache.insert([1; 16], [2; 16], start, start).unwrap());
        let later = start + MAX_CLOCK_SKEW_SECS + NONCE_BUCKET_SECS + 1;
        assert!(cache.insert([1; 16], [4; 16], later, later).unwrap());
        assert_eq!(cache.len, 1);
    }
}
