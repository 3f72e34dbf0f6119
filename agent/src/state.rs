//! What the agent must remember across restarts, apart from telemetry: the trusted root, the
//! highest plan sequence and manifest versions it has seen, the newest signed time, which version
//! is active and which came before, the versions committed under each plan (the floor of a
//! plan's fallback), the probation marker, and status reports not yet delivered.
//!
//! Kept in `DATA/state.bin` (postcard) and `DATA/trust/root.bin`, each replaced atomically
//! (temp → fsync → rename → fsync dir), so a crash leaves the old or the new state, never neither.
//! `state.bin` is the [`DeviceState`] fields as the first agents wrote them, then a
//! `StateTail` with what later agents added: an older agent reads the fields it knows and
//! ignores the tail, and a state without a tail reads as one with an empty tail.

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

/// What a queued status report says happened.
///
/// Stored in `state.bin` as the string [`ReportKind::as_str`] names, as the agent has always
/// written it, so an outbox written by an older agent reads back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReportKind {
    Downloaded,
    Activating,
    Committed,
    Shadowing,
    Failed,
    RolledBack,
    Refused,
    Stalled,
    /// The hub refused a telemetry batch. Not about a rollout; the wire has no status of its own
    /// for it, so it travels as `Failed` with the reason, as it always has.
    TelemetryRefused,
}

impl ReportKind {
    const ALL: [ReportKind; 9] = [
        ReportKind::Downloaded,
        ReportKind::Activating,
        ReportKind::Committed,
        ReportKind::Shadowing,
        ReportKind::Failed,
        ReportKind::RolledBack,
        ReportKind::Refused,
        ReportKind::Stalled,
        ReportKind::TelemetryRefused,
    ];

    /// The stored name; these strings are part of the `state.bin` format.
    pub fn as_str(self) -> &'static str {
        match self {
            ReportKind::Downloaded => "downloaded",
            ReportKind::Activating => "activating",
            ReportKind::Committed => "committed",
            ReportKind::Shadowing => "shadowing",
            ReportKind::Failed => "failed",
            ReportKind::RolledBack => "rolled_back",
            ReportKind::Refused => "refused",
            ReportKind::Stalled => "stalled",
            ReportKind::TelemetryRefused => "telemetry_refused",
        }
    }

    /// The kind a stored name stands for.
    pub fn from_stored(stored: &str) -> Result<ReportKind, UnknownReportKind> {
        ReportKind::ALL
            .into_iter()
            .find(|kind| kind.as_str() == stored)
            .ok_or_else(|| UnknownReportKind(stored.to_owned()))
    }
}

impl std::fmt::Display for ReportKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A stored report kind this agent does not know (one written by a newer agent, say).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown status report kind {0:?}")]
pub struct UnknownReportKind(pub String);

/// A status report waiting to be delivered to the hub.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedReport {
    pub plan_sequence: Option<u64>,
    pub manifest: Option<VersionRef>,
    pub kind: ReportKind,
    pub reason: String,
    pub at: u64,
}

/// [`QueuedReport`] as `state.bin` stores it: the kind as its name. This layout is a
/// compatibility promise; do not change it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct StoredReport {
    plan_sequence: Option<u64>,
    manifest: Option<VersionRef>,
    kind: String,
    reason: String,
    at: u64,
}

impl From<&QueuedReport> for StoredReport {
    fn from(report: &QueuedReport) -> StoredReport {
        StoredReport {
            plan_sequence: report.plan_sequence,
            manifest: report.manifest.clone(),
            kind: report.kind.as_str().to_owned(),
            reason: report.reason.clone(),
            at: report.at,
        }
    }
}

impl TryFrom<StoredReport> for QueuedReport {
    type Error = UnknownReportKind;

    fn try_from(stored: StoredReport) -> Result<QueuedReport, UnknownReportKind> {
        Ok(QueuedReport {
            plan_sequence: stored.plan_sequence,
            manifest: stored.manifest,
            kind: ReportKind::from_stored(&stored.kind)?,
            reason: stored.reason,
            at: stored.at,
        })
    }
}

/// Serde for `DeviceState::outbox` through [`StoredReport`].
///
/// A stored report of a kind this agent does not know is dropped with a warning naming it: it
/// can only come from a newer agent's `state.bin` after a downgrade, and refusing the whole state
/// for it would leave the device unable to start. It is never sent as some other status.
mod stored_outbox {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{QueuedReport, StoredReport};

    pub fn serialize<S: Serializer>(
        outbox: &[QueuedReport],
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        let stored: Vec<StoredReport> = outbox.iter().map(StoredReport::from).collect();
        stored.serialize(serializer)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<QueuedReport>, D::Error> {
        let stored = Vec::<StoredReport>::deserialize(deserializer)?;
        Ok(stored
            .into_iter()
            .filter_map(|report| match QueuedReport::try_from(report) {
                Ok(report) => Some(report),
                Err(error) => {
                    log::warn!("dropping a queued status report from state.bin: {error}");
                    None
                }
            })
            .collect())
    }
}

/// What a device committed of one model, kept to floor the fallback of later plans: a plan's
/// fallback may lead below the highest version seen (that is what a fallback is for), but not
/// below a version the device committed under an *earlier* plan, which no later plan's signers
/// can have meant to undo by naming an older fallback.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Committed {
    pub name: String,
    /// The plan of the newest commit of this model.
    pub plan: u64,
    /// The highest version committed under `plan`.
    pub version: u64,
    /// The highest version committed under any plan before `plan`.
    pub earlier: Option<u64>,
}

impl Committed {
    /// The highest version of this model committed under a plan before `sequence`, for a
    /// `sequence` at or above `plan` (a device accepts no plan below the highest it has seen;
    /// below `plan` the answer errs high, counting `earlier` whole).
    pub fn before(&self, sequence: u64) -> Option<u64> {
        if self.plan < sequence {
            Some(
                self.earlier
                    .map_or(self.version, |earlier| earlier.max(self.version)),
            )
        } else {
            self.earlier
        }
    }
}

/// Kept on disk while a model runs in shadow (from before its probation until it is taken off
/// the shadow runner or the agent stops cleanly), so that a shadow model that kills the process
/// (an abort, the kernel's OOM killer) cannot hold the agent in a crash loop: finding it at start
/// means the agent ended uncleanly while the model ran in shadow.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShadowMarker {
    pub candidate: VersionRef,
    pub plan_sequence: u64,
    /// Unclean ends of the agent in a row while `candidate` ran in shadow.
    pub unclean_ends: u32,
}

/// Unclean ends in a row while a model runs in shadow after which it counts as failed here. One
/// could be a power cut; two in a row are the model's doing.
pub const SHADOW_UNCLEAN_ENDS: u32 = 2;

/// The part of `state.bin` after the fields the first agents wrote ([`Head`]), as a sequence of
/// postcard values. This layout is a compatibility promise: add values only at its end, and read
/// each back only while bytes remain (see [`decode_state`]), so a tail an older agent wrote reads
/// with the newer values at their defaults.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct StateTail {
    committed: Vec<Committed>,
    /// The first model's shadow marker.
    shadow: Option<ShadowMarker>,
    /// The first model's plan digest.
    plan_digest: Option<[u8; 32]>,
    signed_since: u64,
    /// The first model's name (an older agent's state names it only through its versions).
    first_name: String,
    /// Every model after the first, whole.
    more_models: Vec<ModelState>,
}

/// Most undelivered status reports kept; older ones are dropped first.
pub const MAX_QUEUED_REPORTS: usize = 64;

/// What the device holds of one model: its versions, its probation, its shadow and the plans of
/// its rollouts. Each model a device runs has one, and moves under its own plans only.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelState {
    /// The model's name. Empty only for the floor of a state an older agent wrote before it
    /// served anything: the first model that gets a plan takes it over.
    pub name: String,
    /// Highest plan sequence of this model accepted.
    pub highest_plan: Option<u64>,
    /// The digest of the plan accepted at `highest_plan` (unknown in a state an older agent
    /// wrote).
    pub plan_digest: Option<[u8; 32]>,
    pub active: Option<VersionRef>,
    /// Earlier committed versions, newest first, kept on disk for rollbacks without a download.
    pub previous: Vec<VersionRef>,
    pub pending: Option<Pending>,
    /// The last (plan, manifest) a commit was reported for.
    pub committed_report: Option<(u64, [u8; 32])>,
    /// Set while the model's plan has a version of it run in shadow.
    pub shadow: Option<ShadowMarker>,
}

impl ModelState {
    pub fn new(name: &str) -> ModelState {
        ModelState {
            name: name.to_owned(),
            ..ModelState::default()
        }
    }

    /// Notes an accepted plan: the highest sequence seen, and the digest of the plan at it.
    pub fn note_plan(&mut self, sequence: u64, digest: [u8; 32]) {
        if self.highest_plan.is_none_or(|highest| sequence > highest) {
            self.highest_plan = Some(sequence);
            self.plan_digest = Some(digest);
        } else if self.highest_plan == Some(sequence) && self.plan_digest.is_none() {
            self.plan_digest = Some(digest);
        }
    }

    /// The manifests of every version of this model kept on disk.
    pub fn kept(&self) -> impl Iterator<Item = [u8; 32]> + '_ {
        self.active
            .iter()
            .chain(&self.previous)
            .chain(self.pending.as_ref().map(|pending| &pending.candidate))
            .chain(self.shadow.as_ref().map(|marker| &marker.candidate))
            .map(|version| version.manifest_sha256)
    }
}

/// `state.bin`'s first values, as the first agents wrote them: the whole state of a device with
/// one model. The first model's state goes here, so an older agent still reads it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
struct Head {
    highest_plan: Option<u64>,
    highest_manifest: Vec<(String, u64)>,
    newest_signed: u64,
    hub_time: u64,
    active: Option<VersionRef>,
    previous: Vec<VersionRef>,
    pending: Option<Pending>,
    failed: Vec<[u8; 32]>,
    refused: Vec<[u8; 32]>,
    committed_report: Option<(u64, [u8; 32])>,
    #[serde(with = "stored_outbox")]
    outbox: Vec<QueuedReport>,
    last_checkin: Option<u64>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceState {
    /// One entry per model, in the order the device first took them on.
    pub models: Vec<ModelState>,
    /// Highest manifest version seen per model name.
    pub highest_manifest: Vec<(String, u64)>,
    /// Newest `created` time of any document accepted: part of the time floor.
    pub newest_signed: u64,
    /// The time in the hub's latest answer: part of the time floor. Replaced by each answer,
    /// never ratcheted: a hub clock that once ran ahead must not freeze the device for good.
    pub hub_time: u64,
    /// Manifests that failed probation here: not tried again until the hub offers another.
    pub failed: Vec<[u8; 32]>,
    /// Refusals already reported, by the digest of what was refused, so they are not repeated.
    pub refused: Vec<[u8; 32]>,
    pub outbox: Vec<QueuedReport>,
    pub last_checkin: Option<u64>,
    /// Per model, what was committed under which plan.
    pub committed: Vec<Committed>,
    /// The creation of the root whose rotation last revoked keys: plans created before it are
    /// refused.
    pub signed_since: u64,
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

    /// Notes that `version` of `name` was committed (or found running) under plan `sequence`.
    pub fn note_commit(&mut self, name: &str, version: u64, sequence: u64) {
        match self.committed.iter_mut().find(|known| known.name == name) {
            Some(known) if sequence > known.plan => {
                known.earlier = known.before(sequence);
                known.plan = sequence;
                known.version = version;
            }
            Some(known) if sequence == known.plan => known.version = known.version.max(version),
            // A commit under an older plan than one already noted cannot happen: plans only
            // move forward. Nothing to raise.
            Some(_) => {}
            None => self.committed.push(Committed {
                name: name.to_owned(),
                plan: sequence,
                version,
                earlier: None,
            }),
        }
    }

    /// A state written before commits were noted: the active version counts as committed under
    /// the highest plan seen, so a later plan's fallback cannot go below it.
    fn note_commits_of_an_older_agent(&mut self) {
        let running: Vec<(VersionRef, u64)> = self
            .models
            .iter()
            .filter_map(|model| Some((model.active.clone()?, model.highest_plan?)))
            .collect();
        for (active, plan) in running {
            self.note_commit(&active.name, active.version, plan);
        }
    }

    /// The state of the model `name`, if the device holds one.
    pub fn model(&self, name: &str) -> Option<&ModelState> {
        self.models.iter().find(|model| model.name == name)
    }

    /// The index of model `name`'s state, made if the device has none: an unnamed floor an older
    /// agent left is taken over by the first model named.
    pub fn model_index(&mut self, name: &str) -> usize {
        if let Some(index) = self.models.iter().position(|model| model.name == name) {
            return index;
        }
        if let Some(index) = self.models.iter().position(|model| model.name.is_empty()) {
            self.models[index].name = name.to_owned();
            return index;
        }
        self.models.push(ModelState::new(name));
        self.models.len() - 1
    }

    /// The first model's state (the only one of a device with one model).
    pub fn first(&self) -> Option<&ModelState> {
        self.models.first()
    }

    /// The manifests of every version of every model kept on disk.
    pub fn kept(&self) -> Vec<[u8; 32]> {
        self.models.iter().flat_map(ModelState::kept).collect()
    }

    /// A rotation revoked keys (a recovery from their compromise): forgets every floor they may
    /// have set (plan sequence, manifest versions, commits, the newest signed time) and from now
    /// on accepts only plans created at or after `since`, the new root's creation.
    pub fn recover(&mut self, since: u64) {
        for model in &mut self.models {
            model.highest_plan = None;
            model.plan_digest = None;
            model.committed_report = None;
        }
        self.highest_manifest.clear();
        self.committed.clear();
        self.newest_signed = since;
        self.signed_since = since;
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
        decode_state(&bytes).with_context(|| format!("{} is unreadable", path.display()))
    }

    pub fn save(&self, state: &DeviceState) -> anyhow::Result<()> {
        let bytes = encode_state(state).context("encoding agent state")?;
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

/// `state.bin`'s bytes: the [`Head`] (the first model's state and what all share), then the
/// [`StateTail`].
fn encode_state(state: &DeviceState) -> postcard::Result<Vec<u8>> {
    let first = state.models.first().cloned().unwrap_or_default();
    let mut bytes = postcard::to_stdvec(&Head {
        highest_plan: first.highest_plan,
        highest_manifest: state.highest_manifest.clone(),
        newest_signed: state.newest_signed,
        hub_time: state.hub_time,
        active: first.active,
        previous: first.previous,
        pending: first.pending,
        failed: state.failed.clone(),
        refused: state.refused.clone(),
        committed_report: first.committed_report,
        outbox: state.outbox.clone(),
        last_checkin: state.last_checkin,
    })?;
    bytes.extend(postcard::to_stdvec(&StateTail {
        committed: state.committed.clone(),
        shadow: first.shadow,
        plan_digest: first.plan_digest,
        signed_since: state.signed_since,
        first_name: first.name,
        more_models: state.models.iter().skip(1).cloned().collect(),
    })?);
    Ok(bytes)
}

/// The [`StateTail`]'s values still to read.
struct Tail<'a>(&'a [u8]);

impl Tail<'_> {
    /// The next value, or None when an older agent's tail ends before it.
    fn next<T: serde::de::DeserializeOwned>(&mut self) -> postcard::Result<Option<T>> {
        if self.0.is_empty() {
            return Ok(None);
        }
        let (value, rest) = postcard::take_from_bytes(self.0)?;
        self.0 = rest;
        Ok(Some(value))
    }
}

/// Reads `state.bin`, with or without the tail an older agent did not write.
fn decode_state(bytes: &[u8]) -> postcard::Result<DeviceState> {
    let (head, rest): (Head, &[u8]) = postcard::take_from_bytes(bytes)?;
    let mut tail = Tail(rest);
    let committed = tail.next()?;
    let shadow = tail.next()?.flatten();
    let plan_digest = tail.next()?.flatten();
    let signed_since = tail.next()?.unwrap_or_default();
    let first_name: Option<String> = tail.next()?;
    let more_models: Vec<ModelState> = tail.next()?.unwrap_or_default();
    if !tail.0.is_empty() {
        // Values a newer agent added: this agent cannot read them, and writes them no more.
        log::warn!(
            "state.bin ends with {} bytes this agent does not know; they are dropped",
            tail.0.len()
        );
    }
    let first = ModelState {
        // An older agent's state names its model only through the versions it holds.
        name: first_name.unwrap_or_else(|| {
            head.active
                .as_ref()
                .or(head.pending.as_ref().map(|pending| &pending.candidate))
                .or(shadow
                    .as_ref()
                    .map(|marker: &ShadowMarker| &marker.candidate))
                .map(|version| version.name.clone())
                .unwrap_or_default()
        }),
        highest_plan: head.highest_plan,
        plan_digest,
        active: head.active,
        previous: head.previous,
        pending: head.pending,
        committed_report: head.committed_report,
        shadow,
    };
    let mut models = Vec::with_capacity(1 + more_models.len());
    if first != ModelState::default() {
        models.push(first);
    }
    models.extend(more_models);
    let mut state = DeviceState {
        models,
        highest_manifest: head.highest_manifest,
        newest_signed: head.newest_signed,
        hub_time: head.hub_time,
        failed: head.failed,
        refused: head.refused,
        outbox: head.outbox,
        last_checkin: head.last_checkin,
        committed: committed.clone().unwrap_or_default(),
        signed_since,
    };
    if committed.is_none() {
        state.note_commits_of_an_older_agent();
    }
    Ok(state)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(kind: &str) -> StoredReport {
        StoredReport {
            plan_sequence: Some(3),
            manifest: Some(VersionRef {
                name: "m".into(),
                version: 2,
                manifest_sha256: [7; 32],
            }),
            kind: kind.into(),
            reason: "why".into(),
            at: 1_700_000_000,
        }
    }

    /// The state as the agent stored it while `QueuedReport::kind` was a `String`: the same
    /// fields, in the same order, postcard-encoded.
    #[derive(Serialize)]
    struct StateWithStringKinds {
        highest_plan: Option<u64>,
        highest_manifest: Vec<(String, u64)>,
        newest_signed: u64,
        hub_time: u64,
        active: Option<VersionRef>,
        previous: Vec<VersionRef>,
        pending: Option<Pending>,
        failed: Vec<[u8; 32]>,
        refused: Vec<[u8; 32]>,
        committed_report: Option<(u64, [u8; 32])>,
        outbox: Vec<StoredReport>,
        last_checkin: Option<u64>,
    }

    fn old_state(kinds: &[&str]) -> Vec<u8> {
        postcard::to_stdvec(&StateWithStringKinds {
            highest_plan: Some(4),
            highest_manifest: vec![("m".into(), 2)],
            newest_signed: 10,
            hub_time: 11,
            active: None,
            previous: Vec::new(),
            pending: None,
            failed: Vec::new(),
            refused: Vec::new(),
            committed_report: None,
            outbox: kinds.iter().map(|kind| report(kind)).collect(),
            last_checkin: Some(12),
        })
        .unwrap()
    }

    #[test]
    fn every_kind_an_earlier_agent_stored_reads_back_and_is_stored_the_same() {
        let names: Vec<&str> = ReportKind::ALL.iter().map(|kind| kind.as_str()).collect();
        let bytes = old_state(&names);
        let head: Head = postcard::from_bytes(&bytes).unwrap();
        let kinds: Vec<ReportKind> = head.outbox.iter().map(|report| report.kind).collect();
        assert_eq!(kinds, ReportKind::ALL);
        assert_eq!(postcard::to_stdvec(&head).unwrap(), bytes);
    }

    fn version(name: &str, version: u64, byte: u8) -> VersionRef {
        VersionRef {
            name: name.into(),
            version,
            manifest_sha256: [byte; 32],
        }
    }

    #[test]
    fn a_state_without_a_tail_reads_with_its_active_version_committed_under_the_highest_plan() {
        let mut old = postcard::from_bytes::<Head>(&old_state(&[])).unwrap();
        old.active = Some(version("m", 2, 7));
        let bytes = postcard::to_stdvec(&old).unwrap();
        let state = decode_state(&bytes).unwrap();
        assert_eq!(state.models.len(), 1);
        assert_eq!(state.models[0].name, "m");
        assert_eq!(state.models[0].highest_plan, Some(4));
        assert_eq!(state.committed[0].before(4), None);
        assert_eq!(state.committed[0].before(5), Some(2));
        // Written again, the old fields come first, unchanged, and an older agent reads them.
        let written = encode_state(&state).unwrap();
        assert!(written.starts_with(&bytes));
        assert_eq!(postcard::from_bytes::<Head>(&written).unwrap(), old);
        assert_eq!(decode_state(&written).unwrap(), state);
    }

    #[test]
    fn a_tail_without_the_shadow_marker_reads_without_one_and_a_marker_round_trips() {
        let head: Head = postcard::from_bytes(&old_state(&[])).unwrap();
        let committed = vec![Committed {
            name: "m".into(),
            plan: 4,
            version: 2,
            earlier: None,
        }];
        // The tail as the agent wrote it before shadow markers: the commits only.
        let mut bytes = postcard::to_stdvec(&head).unwrap();
        bytes.extend(postcard::to_stdvec(&committed).unwrap());
        let mut state = decode_state(&bytes).unwrap();
        assert_eq!(state.committed, committed);
        // A plan floor with nothing served yet: a model without a name, which the first model
        // the device gets a plan for takes over.
        assert_eq!(state.models[0].name, "");
        assert_eq!(state.model_index("m"), 0);
        assert_eq!(state.models[0].highest_plan, Some(4));

        state.models[0].shadow = Some(ShadowMarker {
            candidate: version("m", 3, 9),
            plan_sequence: 5,
            unclean_ends: 1,
        });
        let written = encode_state(&state).unwrap();
        assert_eq!(decode_state(&written).unwrap(), state);
        // An agent that knows only the commits reads them and ignores the marker.
        let (_, tail): (Head, &[u8]) = postcard::take_from_bytes(&written).unwrap();
        let (committed, _): (Vec<Committed>, &[u8]) = postcard::take_from_bytes(tail).unwrap();
        assert_eq!(committed, state.committed);
    }

    #[test]
    fn several_models_round_trip_and_an_older_agent_reads_the_first() {
        let mut state = DeviceState::default();
        for (name, byte) in [("detector", 1), ("spotter", 2), ("classifier", 3)] {
            let index = state.model_index(name);
            let model = &mut state.models[index];
            model.active = Some(version(name, 3, byte));
            model.previous = vec![version(name, 2, byte + 10)];
            model.note_plan(u64::from(byte) + 4, [byte; 32]);
            state.note_commit(name, 3, u64::from(byte) + 4);
        }
        let written = encode_state(&state).unwrap();
        assert_eq!(decode_state(&written).unwrap(), state);
        // What an agent of one model reads: the first model, whole, and nothing of the others.
        let (head, _): (Head, &[u8]) = postcard::take_from_bytes(&written).unwrap();
        assert_eq!(head.active, Some(version("detector", 3, 1)));
        assert_eq!(head.highest_plan, Some(5));
        assert_eq!(
            state.kept().len(),
            6,
            "every model's active and previous versions are kept on disk"
        );
    }

    #[test]
    fn a_report_of_an_unknown_kind_is_dropped_not_sent_as_failed() {
        let bytes = old_state(&["committed", "from_the_future", "refused"]);
        let head: Head = postcard::from_bytes(&bytes).unwrap();
        let kinds: Vec<ReportKind> = head.outbox.iter().map(|report| report.kind).collect();
        assert_eq!(kinds, [ReportKind::Committed, ReportKind::Refused]);
        assert_eq!(
            ReportKind::from_stored("from_the_future"),
            Err(UnknownReportKind("from_the_future".into()))
        );
    }

    #[test]
    fn a_commit_floors_only_the_fallbacks_of_later_plans() {
        let mut state = DeviceState::default();
        state.note_commit("m", 2, 3);
        state.note_commit("m", 5, 4);
        state.note_commit("m", 4, 4);
        let floor = &state.committed[0];
        // Under plan 4 itself its fallback may go below 5, not below 2 of plan 3.
        assert_eq!(floor.before(4), Some(2));
        assert_eq!(floor.before(5), Some(5));
        state.note_commit("m", 1, 6);
        assert_eq!(state.committed[0].before(6), Some(5));
        assert_eq!(state.committed[0].before(7), Some(5));
    }
}
