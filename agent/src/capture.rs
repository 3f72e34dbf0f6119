//! Data capture on the device: which served requests are kept, under which signed allowance.
//!
//! A request is captured only when a verified allowance of its model covers its version, the
//! allowance's trigger holds (always, or while this device's own drift summary of the model is
//! flagged ALERT; nothing the hub says decides that), a die roll at the signed rate comes up, and
//! the signed caps per UTC day (samples and sealed bytes) leave room. The decision is made first,
//! under one short lock, so a request that is not captured pays for a hash-map lookup and a
//! random number; one that is copies its tensors (less the signed drops) into a bounded queue
//! (full: dropped and counted), and the sync thread seals them to the signed recipient key off
//! the request path ([`Capturer::take_queued`]).
//!
//! The verified allowances, the highest sequence seen per model and the day's counts are kept in
//! `capture.bin` (written crash-safe), so a restart neither resets the day's caps nor lets the
//! hub replay a lower allowance; the counts are written before the samples they count are
//! queued for upload, so a crash can lose a sample but never exceed a cap.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TrySendError};
use std::sync::{Mutex, MutexGuard};

use anyhow::Context;
use outpost_protocol::capture::CaptureSample;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::{
    CaptureBody, CaptureTrigger, VerifiedCapture, MAX_CAPTURE_SAMPLE_BYTES,
};
use outpost_protocol::{Sha256, TimeFloor, VerifiedRoot};
use serde::{Deserialize, Serialize};

use crate::slot::ActiveModel;

/// Captured requests waiting for the sync thread to seal them.
pub const QUEUE_CAPACITY: usize = 64;
const DAY_SECS: u64 = 86_400;
/// Largest `capture.bin` read.
const MAX_STATE_FILE: u64 = 4 * 1024 * 1024;

/// The signed allowances this device acts on, and what it captured today under them.
#[derive(Debug)]
pub struct Capturer {
    path: PathBuf,
    inner: Mutex<Inner>,
    /// Whether any allowance is held. Until one is (most devices never hold one), the request
    /// path returns before it takes `inner`'s lock. Allowances are replaced, never removed, so
    /// once set it stays set.
    holds_allowance: AtomicBool,
    queue: SyncSender<Taken>,
    queued: Mutex<Receiver<Taken>>,
    /// Captured requests dropped because the queue was full, not yet handed to the cache.
    dropped: AtomicU64,
}

#[derive(Debug, Default)]
struct Inner {
    /// Per model, the verified allowance at the highest sequence.
    rules: HashMap<String, Rule>,
    /// Per model, the highest allowance sequence ever verified: a lower one is refused.
    highest: HashMap<String, u64>,
    /// The UTC day (Unix seconds / 86,400) `counts` are of.
    day: u64,
    /// Per model, samples and sealed bytes captured on `day`.
    counts: HashMap<String, DayCount>,
    /// Model versions whose latest drift summary on this device is flagged ALERT.
    drift_alert: HashSet<(String, u64)>,
    /// xorshift64 state for the die rolls: the rate is a share, not a secret.
    rng: u64,
}

#[derive(Debug, Clone)]
struct Rule {
    body: CaptureBody,
    signed: Vec<u8>,
    digest: Sha256,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DayCount {
    pub samples: u64,
    pub bytes: u64,
}

/// A captured request, not yet sealed.
#[derive(Debug)]
pub struct Taken {
    pub sample: CaptureSample,
    pub recipient: [u8; 32],
}

/// `capture.bin`: the device's own record, not a wire type.
#[derive(Debug, Default, Serialize, Deserialize)]
struct StoredCapture {
    allowances: Vec<serde_bytes::ByteBuf>,
    highest: Vec<(String, u64)>,
    day: u64,
    counts: Vec<(String, DayCount)>,
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    match mutex.lock() {
        Ok(guard) => guard,
        Err(poisoned) => poisoned.into_inner(),
    }
}

impl Capturer {
    /// Loads `capture.bin` from `data_dir`: each stored allowance is verified again against
    /// `root` (one no longer valid, expired say, is dropped; its sequence stays the floor).
    pub fn open(data_dir: &Path, root: &VerifiedRoot, floor: &TimeFloor) -> anyhow::Result<Self> {
        let path = data_dir.join("capture.bin");
        let stored: StoredCapture = if path.exists() {
            let bytes = outpost_model::fsutil::read_capped(&path, MAX_STATE_FILE)?;
            match postcard::from_bytes(&bytes) {
                Ok(stored) => stored,
                Err(error) => {
                    // Written crash-safe, so this is damage, not a torn write. Serving must go
                    // on: the file is set aside and capture starts with nothing allowed, until
                    // the hub serves a signed allowance again.
                    let aside = path.with_extension("bin.unreadable");
                    log::error!(
                        "{} is unreadable ({error}); moved it to {} and capture starts afresh",
                        path.display(),
                        aside.display()
                    );
                    std::fs::rename(&path, &aside)
                        .with_context(|| format!("moving aside {}", path.display()))?;
                    StoredCapture::default()
                }
            }
        } else {
            StoredCapture::default()
        };
        let mut seed = [0u8; 8];
        let _ = getrandom::getrandom(&mut seed);
        let mut inner = Inner {
            highest: stored.highest.into_iter().collect(),
            day: stored.day,
            counts: stored.counts.into_iter().collect(),
            rng: u64::from_le_bytes(seed) | 1,
            ..Inner::default()
        };
        for signed in stored.allowances {
            match root.verify_capture(&signed, floor, None, None) {
                Ok(verified) => inner.install(&verified),
                Err(error) => log::warn!("a stored capture allowance no longer holds: {error}"),
            }
        }
        let (queue, queued) = sync_channel(QUEUE_CAPACITY);
        Ok(Capturer {
            path,
            holds_allowance: AtomicBool::new(!inner.rules.is_empty()),
            inner: Mutex::new(inner),
            queue,
            queued: Mutex::new(queued),
            dropped: AtomicU64::new(0),
        })
    }

    /// The highest allowance sequence of `model` this device verified.
    pub fn highest(&self, model: &str) -> Option<u64> {
        lock(&self.inner).highest.get(model).copied()
    }

    /// Whether `digest` is that of an allowance the device already acts on.
    pub fn current_digest_is(&self, digest: &Sha256) -> bool {
        lock(&self.inner)
            .rules
            .values()
            .any(|rule| rule.digest == *digest)
    }

    /// Acts on `verified` from now on, and keeps it on disk. The caller verified it with the
    /// floor [`Capturer::highest`] gave.
    pub fn install(&self, verified: &VerifiedCapture) -> anyhow::Result<()> {
        let mut inner = lock(&self.inner);
        inner.install(verified);
        self.holds_allowance
            .store(!inner.rules.is_empty(), Ordering::Release);
        self.save(&inner)
    }

    /// Notes whether the device's latest drift summary of `model` `version` is flagged ALERT.
    pub fn set_drift_alert(&self, model: &str, version: u64, alert: bool) {
        let mut inner = lock(&self.inner);
        let key = (model.to_owned(), version);
        if alert {
            inner.drift_alert.insert(key);
        } else {
            inner.drift_alert.remove(&key);
        }
    }

    /// On the request path: decides whether this request is captured and, if so, queues a copy
    /// of its tensors less the dropped ones. Never waits.
    pub fn offer(&self, active: &ActiveModel, inputs: &[Tensor], outputs: &[Tensor], now: u64) {
        if !self.holds_allowance.load(Ordering::Acquire) {
            return;
        }
        let Some(decided) = lock(&self.inner).decide(&active.name, active.version, now) else {
            return;
        };
        let kept_bytes: usize = inputs
            .iter()
            .filter(|tensor| !decided.body.drop_inputs.contains(&tensor.name))
            .chain(
                outputs
                    .iter()
                    .filter(|tensor| !decided.body.drop_outputs.contains(&tensor.name)),
            )
            .map(|tensor| tensor.data.len())
            .sum();
        if kept_bytes >= MAX_CAPTURE_SAMPLE_BYTES {
            // It could never be sealed into a sample: not copied, and not counted.
            lock(&self.inner).unreserve(&active.name, now);
            return;
        }
        let keep = |tensors: &[Tensor], dropped: &[String]| -> Vec<Tensor> {
            tensors
                .iter()
                .filter(|tensor| !dropped.contains(&tensor.name))
                .cloned()
                .collect()
        };
        let taken = Taken {
            sample: CaptureSample {
                model: active.name.clone(),
                version: active.version,
                allowance: decided.body.sequence,
                captured_at: now,
                inputs: keep(inputs, &decided.body.drop_inputs),
                outputs: keep(outputs, &decided.body.drop_outputs),
            },
            recipient: decided.body.recipient,
        };
        match self.queue.try_send(taken) {
            Ok(()) => {}
            Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => {
                lock(&self.inner).unreserve(&active.name, now);
                self.dropped.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Takes every queued capture, for sealing.
    pub fn take_queued(&self) -> Vec<Taken> {
        lock(&self.queued).try_iter().collect()
    }

    /// Takes the count of captures dropped since the last call.
    pub fn take_dropped(&self) -> u64 {
        self.dropped.swap(0, Ordering::Relaxed)
    }

    /// Counts `bytes` sealed bytes of `model` against today's byte cap; false (and nothing
    /// counted) when they would pass it, or when no allowance of the model is left.
    pub fn count_bytes(&self, model: &str, bytes: u64, now: u64) -> bool {
        let mut inner = lock(&self.inner);
        inner.roll_day(now);
        let Some(max) = inner
            .rules
            .get(model)
            .map(|rule| rule.body.max_bytes_per_day)
        else {
            return false;
        };
        let count = inner.counts.entry(model.to_owned()).or_default();
        if count.bytes.saturating_add(bytes) > max {
            count.samples = count.samples.saturating_sub(1);
            return false;
        }
        count.bytes += bytes;
        true
    }

    /// Writes the allowances and today's counts to disk.
    pub fn persist(&self) -> anyhow::Result<()> {
        let inner = lock(&self.inner);
        self.save(&inner)
    }

    /// Today's counts of `model`.
    pub fn today(&self, model: &str, now: u64) -> DayCount {
        let mut inner = lock(&self.inner);
        inner.roll_day(now);
        inner.counts.get(model).copied().unwrap_or_default()
    }

    fn save(&self, inner: &Inner) -> anyhow::Result<()> {
        let stored = StoredCapture {
            allowances: inner
                .rules
                .values()
                .map(|rule| serde_bytes::ByteBuf::from(rule.signed.clone()))
                .collect(),
            highest: inner
                .highest
                .iter()
                .map(|(model, sequence)| (model.clone(), *sequence))
                .collect(),
            day: inner.day,
            counts: inner
                .counts
                .iter()
                .map(|(model, count)| (model.clone(), *count))
                .collect(),
        };
        let bytes = postcard::to_allocvec(&stored).context("encoding the capture state")?;
        outpost_model::fsutil::write_atomic(&self.path, &bytes, 0o600)
    }
}

/// What [`Inner::decide`] lets through: the allowance the capture is taken under.
struct Decided {
    body: CaptureBody,
}

impl Inner {
    fn install(&mut self, verified: &VerifiedCapture) {
        let body = verified.body();
        let highest = self.highest.entry(body.model.clone()).or_insert(0);
        *highest = (*highest).max(body.sequence);
        if *highest == body.sequence {
            self.rules.insert(
                body.model.clone(),
                Rule {
                    body: body.clone(),
                    signed: verified.signed_bytes().to_vec(),
                    digest: verified.digest(),
                },
            );
        }
    }

    fn roll_day(&mut self, now: u64) {
        let day = now / DAY_SECS;
        if day != self.day {
            self.day = day;
            self.counts.clear();
        }
    }

    fn next_random(&mut self) -> u64 {
        let mut x = self.rng;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.rng = x;
        x
    }

    /// The sampling decision: covered, triggered, rolled and under today's sample cap; reserves
    /// the sample in today's count.
    fn decide(&mut self, model: &str, version: u64, now: u64) -> Option<Decided> {
        let rule = self.rules.get(model)?;
        let body = &rule.body;
        if !body.allows_any() || !body.versions.covers(version) || now >= body.expires {
            return None;
        }
        if body.trigger == CaptureTrigger::WhileDriftAlert
            && !self.drift_alert.contains(&(model.to_owned(), version))
        {
            return None;
        }
        let rate = u64::from(body.rate_ppm);
        let body = body.clone();
        if self.next_random() % u64::from(outpost_protocol::trust::CAPTURE_RATE_ALL) >= rate {
            return None;
        }
        self.roll_day(now);
        let count = self.counts.entry(model.to_owned()).or_default();
        if count.samples >= body.max_samples_per_day || count.bytes >= body.max_bytes_per_day {
            return None;
        }
        count.samples += 1;
        Some(Decided { body })
    }

    fn unreserve(&mut self, model: &str, now: u64) {
        self.roll_day(now);
        if let Some(count) = self.counts.get_mut(model) {
            count.samples = count.samples.saturating_sub(1);
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use outpost_protocol::trust::{CaptureVersions, RootBody, Signed};
    use outpost_protocol::SecretKey;

    use super::*;

    const NOW: u64 = 1_767_225_600 + 3_600;

    fn root(key: &SecretKey) -> VerifiedRoot {
        let mut signed = Signed::new(&RootBody {
            version: 1,
            created: NOW - 86_400,
            expires: NOW + 365 * 86_400,
            threshold: 1,
            keys: vec![key.public()],
        })
        .unwrap();
        signed.sign(key);
        VerifiedRoot::verify_initial(&outpost_protocol::encode(&signed).unwrap(), &floor()).unwrap()
    }

    fn floor() -> TimeFloor {
        TimeFloor {
            wall_clock: NOW,
            ..TimeFloor::default()
        }
    }

    fn allowance(key: &SecretKey, root: &VerifiedRoot, body: CaptureBody) -> VerifiedCapture {
        let mut signed = Signed::new(&body).unwrap();
        signed.sign(key);
        root.verify_capture(
            &outpost_protocol::encode(&signed).unwrap(),
            &floor(),
            None,
            None,
        )
        .unwrap()
    }

    fn body(sequence: u64, rate_ppm: u32, samples: u64) -> CaptureBody {
        CaptureBody {
            sequence,
            created: NOW - 60,
            expires: NOW + 7 * 86_400,
            model: "demo".into(),
            versions: CaptureVersions::Only(vec![1]),
            rate_ppm,
            max_samples_per_day: samples,
            max_bytes_per_day: 1 << 20,
            trigger: CaptureTrigger::Always,
            drop_inputs: Vec::new(),
            drop_outputs: Vec::new(),
            recipient: [5; 32],
        }
    }

    fn decide(capturer: &Capturer, version: u64, now: u64) -> bool {
        lock(&capturer.inner).decide("demo", version, now).is_some()
    }

    /// The sample cap holds per UTC day, a restart keeps the day's count, and the next day
    /// starts afresh; uncovered versions and a lower allowance are never captured.
    #[test]
    fn the_day_cap_survives_a_restart_and_resets_the_next_day() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([1; 32]);
        let root = root(&key);
        let capturer = Capturer::open(dir.path(), &root, &floor()).unwrap();
        assert!(
            !capturer.holds_allowance.load(Ordering::Acquire),
            "nothing installed: the request path returns before the lock"
        );
        capturer
            .install(&allowance(&key, &root, body(2, 1_000_000, 3)))
            .unwrap();
        assert!(capturer.holds_allowance.load(Ordering::Acquire));
        assert!(!decide(&capturer, 2, NOW), "version 2 is not covered");
        let taken: Vec<bool> = (0..5).map(|_| decide(&capturer, 1, NOW)).collect();
        assert_eq!(taken, [true, true, true, false, false]);
        capturer.persist().unwrap();
        drop(capturer);

        let capturer = Capturer::open(dir.path(), &root, &floor()).unwrap();
        assert!(capturer.holds_allowance.load(Ordering::Acquire));
        assert_eq!(capturer.highest("demo"), Some(2));
        assert!(
            !decide(&capturer, 1, NOW),
            "the restart kept the day's count"
        );
        assert!(decide(&capturer, 1, NOW + DAY_SECS), "a new UTC day");
        // Bytes: a sample passing the day's byte cap is not counted.
        assert!(capturer.count_bytes("demo", 1000, NOW + DAY_SECS));
        assert!(!capturer.count_bytes("demo", 1 << 20, NOW + DAY_SECS));
        assert_eq!(capturer.today("demo", NOW + DAY_SECS).bytes, 1000);
    }

    /// At a rate of one in four, about a quarter of requests are taken; at zero none are.
    #[test]
    fn the_rate_is_a_share_of_requests() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([1; 32]);
        let root = root(&key);
        let capturer = Capturer::open(dir.path(), &root, &floor()).unwrap();
        capturer
            .install(&allowance(&key, &root, body(1, 250_000, 10_000)))
            .unwrap();
        let taken = (0..4000).filter(|_| decide(&capturer, 1, NOW)).count();
        assert!((800..1200).contains(&taken), "{taken} of 4000");
        capturer
            .install(&allowance(&key, &root, body(2, 0, 10_000)))
            .unwrap();
        assert!((0..1000).all(|_| !decide(&capturer, 1, NOW)), "turned off");
    }

    /// `WhileDriftAlert` captures only while the device flagged the model version itself.
    #[test]
    fn a_drift_triggered_allowance_waits_for_the_devices_own_alert() {
        let dir = tempfile::tempdir().unwrap();
        let key = SecretKey::from_seed([1; 32]);
        let root = root(&key);
        let capturer = Capturer::open(dir.path(), &root, &floor()).unwrap();
        let mut triggered = body(1, 1_000_000, 100);
        triggered.trigger = CaptureTrigger::WhileDriftAlert;
        capturer
            .install(&allowance(&key, &root, triggered))
            .unwrap();
        assert!(!decide(&capturer, 1, NOW));
        capturer.set_drift_alert("demo", 1, true);
        assert!(decide(&capturer, 1, NOW));
        capturer.set_drift_alert("demo", 1, false);
        assert!(!decide(&capturer, 1, NOW));
    }
}
