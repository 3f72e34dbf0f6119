//! What the agent must remember across restarts, apart from telemetry: the trusted root, the
//! highest plan sequence and manifest versions it has seen, the newest signed time, which version
//! is active and which came before, the probation marker, and status reports not yet delivered.
//!
//! Kept in `DATA/state.bin` (postcard) and `DATA/trust/root.bin`, each replaced atomically
//! (temp → fsync → rename → fsync dir), so a crash leaves the old or the new state, never neither.

use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use outpost_model::fsutil;

/// A model version by its manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionRef {
    pub name: String,
    pub version: u64,
    pub manifest_sha256: [u8; 32],
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.name, self.version)
    }
}

/// Set before a candidate is activated and cleared once it is committed or abandoned. Finding it
/// at start means the agent died during probation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub candidate: VersionRef,
    pub plan_sequence: Option<u64>,
    pub started_at: u64,
}

/// A status report waiting to be delivered to the hub.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueuedReport {
    pub plan_sequence: Option<u64>,
    pub manifest: Option<VersionRef>,
    /// `downloaded`, `activating`, `committed`, `shadowing`, `failed`, `rolled_back`, `refused`.
    pub kind: String,
    pub reason: String,
    pub at: u64,
}

/// Most undelivered status reports kept; older ones are dropped first.
pub const MAX_QUEUED_REPORTS: usize = 64;

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceState {
    pub highest_plan: Option<u64>,
    /// Highest manifest version seen per model name.
    pub highest_manifest: Vec<(String, u64)>,
    /// Newest `created` time of any document accepted: part of the time floor.
    pub newest_signed: u64,
    /// The time in the hub's latest answer: part of the time floor. Replaced by each answer,
    /// never ratcheted: a hub clock that once ran ahead must not freeze the device for good.
    pub hub_time: u64,
    pub active: Option<VersionRef>,
    /// Earlier committed versions, newest first, kept on disk for rollbacks without a download.
    pub previous: Vec<VersionRef>,
    pub pending: Option<Pending>,
    /// Manifests that failed probation here: not tried again until the hub offers another.
    pub failed: Vec<[u8; 32]>,
    /// Refusals already reported, by the digest of what was refused, so they are not repeated.
    pub refused: Vec<[u8; 32]>,
    /// The last (plan, manifest) a commit was reported for.
    pub committed_report: Option<(u64, [u8; 32])>,
    pub outbox: Vec<QueuedReport>,
    pub last_checkin: Option<u64>,
}

impl DeviceState {
    pub fn highest_manifest(&self, name: &str) -> Option<u64> {
        self.highest_manifest
            .iter()
            .find(|(known, _)| known == name)
            .map(|(_, version)| *version)
    }

    pub fn note_manifest(&mut self, name: &str, version: u64) {
        match self
            .highest_manifest
            .iter_mut()
            .find(|(known, _)| known == name)
        {
            Some((_, highest)) => *highest = (*highest).max(version),
            None => self.highest_manifest.push((name.to_owned(), version)),
        }
    }

    pub fn queue(&mut self, report: QueuedReport) {
        self.outbox.push(report);
        if self.outbox.len() > MAX_QUEUED_REPORTS {
            let excess = self.outbox.len() - MAX_QUEUED_REPORTS;
            self.outbox.drain(..excess);
        }
    }

    /// Remembers a digest in a bounded list.
    pub fn remember(list: &mut Vec<[u8; 32]>, digest: [u8; 32]) {
        if !list.contains(&digest) {
            list.push(digest);
            if list.len() > 64 {
                list.remove(0);
            }
        }
    }
}

/// Where the state lives.
#[derive(Debug, Clone)]
pub struct StateFiles {
    dir: PathBuf,
}

/// Largest state file read back.
const MAX_STATE: u64 = 1024 * 1024;

impl StateFiles {
    pub fn new(data_dir: &Path) -> anyhow::Result<StateFiles> {
        std::fs::create_dir_all(data_dir.join("trust"))
            .with_context(|| format!("creating {}", data_dir.display()))?;
        Ok(StateFiles {
            dir: data_dir.to_owned(),
        })
    }

    /// Removes what a crash during a write left next to the state, the trust root and the status
    /// file. For the service at start only: it must be the one process writing there. A failure
    /// only costs disk space, so it is logged and the agent starts all the same.
    pub fn remove_stale_temporaries(&self) {
        for dir in [self.dir.clone(), self.dir.join("trust")] {
            match fsutil::remove_stale_temporaries(&dir) {
                Ok(0) => {}
                Ok(removed) => log::warn!(
                    "removed {removed} temporary file(s) an interrupted write left in {}",
                    dir.display()
                ),
                Err(error) => log::warn!("{error:#}"),
            }
        }
    }

    fn state_path(&self) -> PathBuf {
        self.dir.join("state.bin")
    }

    pub fn root_path(&self) -> PathBuf {
        self.dir.join("trust").join("root.bin")
    }

    /// The stored state, or a fresh one on first start.
    pub fn load(&self) -> anyhow::Result<DeviceState> {
        let path = self.state_path();
        if !path.exists() {
            return Ok(DeviceState::default());
        }
        let bytes = fsutil::read_capped(&path, MAX_STATE)?;
        postcard::from_bytes(&bytes).with_context(|| format!("{} is unreadable", path.display()))
    }

    pub fn save(&self, state: &DeviceState) -> anyhow::Result<()> {
        let bytes = postcard::to_stdvec(state).context("encoding agent state")?;
        fsutil::write_atomic(&self.state_path(), &bytes, 0o600)
    }

    pub fn load_root(&self) -> anyhow::Result<Option<Vec<u8>>> {
        let path = self.root_path();
        if !path.exists() {
            return Ok(None);
        }
        fsutil::read_capped(&path, MAX_STATE).map(Some)
    }

    pub fn save_root(&self, bytes: &[u8]) -> anyhow::Result<()> {
        fsutil::write_atomic(&self.root_path(), bytes, 0o644)
    }
}
