//! Roll-up: merging hourly windows of a (model, version, UTC day, shadow target) into one
//! daily window when the cache nears its cap.

#[allow(unused_imports)]
use super::*;

/// Which windows a roll-up merges into which: (model, version, UTC day, shadow target).
pub(super) type Group = (String, u64, u64, Option<[u8; 32]>);

/// The records a roll-up holds decoded, in key order, and where each group's oldest window is.
#[derive(Debug, Default)]
pub(super) struct RollUpPass {
    pub(super) held: BTreeMap<u64, (RecordInfo, Vec<StoredWindow>)>,
    pub(super) held_bytes: u64,
    /// Each group's oldest window held: (record key, position in it).
    pub(super) owners: HashMap<Group, (u64, usize)>,
    /// Held records whose windows changed and must be written back.
    pub(super) changed: BTreeSet<u64>,
    pub(super) merged: u64,
}

impl RollUpPass {
    /// Merges `windows`, the next record's, into the oldest held window of their group, and holds
    /// what is left of them.
    pub(super) fn add(&mut self, key: u64, info: RecordInfo, windows: Vec<StoredWindow>) {
        let mut kept: Vec<StoredWindow> = Vec::new();
        for window in windows {
            let group = (
                window.model.clone(),
                window.version,
                window.start / DAY_SECS,
                window.shadow_target(),
            );
            let Some(&(owner, position)) = self.owners.get(&group) else {
                self.owners.insert(group, (key, kept.len()));
                kept.push(window);
                continue;
            };
            let target = if owner == key {
                kept.get_mut(position)
            } else {
                self.held
                    .get_mut(&owner)
                    .and_then(|(_, windows)| windows.get_mut(position))
            };
            match target {
                Some(target) => {
                    target.merge(&window);
                    self.merged += 1;
                    self.changed.insert(owner);
                    self.changed.insert(key);
                }
                None => kept.push(window),
            }
        }
        self.held_bytes += info.bytes;
        self.held.insert(key, (info, kept));
    }

    /// Writes back the changed records among those held that `keep` does not keep, and lets
    /// them go; keeps none when those kept would hold too much themselves.
    pub(super) fn release(
        &mut self,
        change: &mut Change,
        keep: impl Fn(&RecordInfo) -> bool,
    ) -> Result<(), CacheError> {
        let kept_bytes: u64 = self
            .held
            .values()
            .filter(|(info, _)| keep(info))
            .map(|(info, _)| info.bytes)
            .sum();
        let keep_any = kept_bytes < ROLLUP_HELD_BYTES / 2;
        let released: Vec<u64> = self
            .held
            .iter()
            .filter(|(_, (info, _))| !(keep_any && keep(info)))
            .map(|(key, _)| *key)
            .collect();
        for key in released {
            let Some((info, windows)) = self.held.remove(&key) else {
                continue;
            };
            self.held_bytes -= info.bytes;
            if self.changed.remove(&key) {
                if windows.is_empty() {
                    change.remove_record(key);
                } else {
                    change.put_record(key, encode_record(&windows)?, &windows);
                }
            }
        }
        let held = &self.held;
        self.owners.retain(|_, (owner, _)| held.contains_key(owner));
        Ok(())
    }
}

/// What one roll-up did: windows merged away, windows of unreadable records dropped, and the
/// records it read.
#[derive(Debug, Clone, Copy)]
pub(super) struct RollUp {
    pub(super) merged: u64,
    pub(super) unreadable: u64,
    pub(super) records_read: u64,
}
