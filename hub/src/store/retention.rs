//! What the store keeps, and for how long: a misbehaving device must not fill the hub's disk.
//!
//! - A device's events (its status reports, enrollment, label changes) are kept up to a number
//!   per device, newest first; the oldest beyond it go at the next event of that device.
//! - Telemetry (drift summaries and shadow comparisons, by hourly window) is kept for a time:
//!   windows that end before it are removed by [`Store::prune_telemetry`], which the engine runs
//!   on its tick, and never stored by ingest in the first place.
//! - A device's batch markers (the idempotency keys of telemetry batches) older than that time
//!   go at its next batch, except its newest, which keeps its sequences increasing.
//!
//! Inference counters are one record per device and published model version, and outcomes one
//! per device and plan, so neither grows with time.

use super::registry::manifest_key;
use super::*;

/// How much the store keeps. The defaults are `outpost-hub serve`'s.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    /// Events kept per device.
    pub events_per_device: usize,
    /// Seconds telemetry windows and batch markers are kept after their end.
    pub telemetry_secs: u64,
}

impl Default for Retention {
    fn default() -> Retention {
        Retention {
            events_per_device: 1000,
            telemetry_secs: 30 * 24 * 3600,
        }
    }
}

/// What one [`Store::prune_telemetry`] removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Pruned {
    pub drift: u64,
    pub shadow: u64,
}

impl Store {
    /// Removes `device`'s events beyond the newest `keep`. Returns how many went.
    pub fn prune_events(&self, device: &[u8; 16], keep: usize) -> Result<u64> {
        let mut removed = 0;
        for key in self.events.scan_prefix(device).keys().rev().skip(keep) {
            self.events.remove(key?)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes `device`'s telemetry batch markers stored before `cutoff`, except its newest.
    /// Returns how many went.
    pub fn prune_batch_markers(&self, device: &[u8; 16], cutoff: u64) -> Result<u64> {
        let Some(newest) = self.telemetry_seen.scan_prefix(device).keys().next_back() else {
            return Ok(0);
        };
        let newest = newest?;
        let mut removed = 0;
        for entry in self.telemetry_seen.scan_prefix(device) {
            let (key, value) = entry?;
            if key == newest {
                break;
            }
            let stored_at = <[u8; 8]>::try_from(value.as_ref())
                .map(u64::from_be_bytes)
                .map_err(|_| StoreError::Corrupt {
                    tree: "telemetry_seen",
                    reason: "bad value".to_owned(),
                })?;
            // Sequences only increase, and so do the times their batches were stored.
            if stored_at >= cutoff {
                break;
            }
            self.telemetry_seen.remove(key)?;
            removed += 1;
        }
        Ok(removed)
    }

    /// Removes the drift summaries and shadow comparisons of windows that ended before `cutoff`,
    /// for every published model version (drift by name and version, shadow by the version's
    /// manifest as a target): one range scan each over what has expired.
    pub fn prune_telemetry(&self, cutoff: u64) -> Result<Pruned> {
        let mut pruned = Pruned::default();
        for (name, version, record) in self.manifests()? {
            let prefix = drift_prefix(&name, version);
            let end = [prefix.as_slice(), &cutoff.to_be_bytes()].concat();
            for key in self.drift.range(prefix..end).keys() {
                self.drift.remove(key?)?;
                pruned.drift += 1;
            }
            let start = [record.sha256.as_slice(), &0u64.to_be_bytes()].concat();
            let end = [record.sha256.as_slice(), &cutoff.to_be_bytes()].concat();
            for key in self.shadow.range(start..end).keys() {
                self.shadow.remove(key?)?;
                pruned.shadow += 1;
            }
        }
        Ok(pruned)
    }

    /// Whether `name` version `version` was published here.
    pub fn has_manifest(&self, name: &str, version: u64) -> Result<bool> {
        Ok(self.manifests.contains_key(manifest_key(name, version))?)
    }
}
