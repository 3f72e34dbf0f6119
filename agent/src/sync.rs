//! The agent's conversation with the hub, one cycle at a time: deliver queued status reports,
//! check in, walk any new roots, verify the plan and the manifest it allows, download, install
//! and put a candidate on probation, commit or abandon it, and upload telemetry.
//!
//! Activation never leaves the device without a working model: the candidate is installed beside
//! the active version, a persisted `pending` marker is set, the candidate must load and pass its
//! signed validation set within a deadline, and only then does the active pointer move and the
//! serving slot swap. A crash during probation finds the marker at start and reverts.
//!
//! A shadow model (the target of a plan's shadow stage) is verified, downloaded, installed and
//! validated the same way, but never activated: it only goes to the [`Shadow`] runner, and is
//! taken off it as soon as a check-in no longer asks for it. It is kept in memory only; after a
//! restart the next check-in sets it again.

use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_protocol::device::{
    AgentState, CheckIn, CheckInResponse, HeldCheckIn, HeldCheckInResponse, RunningModel, Status,
    StatusReport, TelemetryAck, TelemetryBatch,
};
use outpost_protocol::trust::{ManifestRef, Slot};
use outpost_protocol::{Arch, Message, Sha256, TimeFloor, VerifiedManifest, VerifiedRoot};
use serde::Serialize;

use crate::api::QueueStats;
use crate::cache::{self, TelemetryCache};
use crate::check::{self, Documents, PlanVerdict, Refusal, Trust, Verdict};
use crate::config::Config;
use crate::download::{self, Limits};
use crate::hub_client::{HubClient, HubError};
use crate::notify::Notifier;
use crate::shadow::Shadow;
use crate::slot::{ActiveModel, ModelDrift, ModelSlot};
use crate::state::{DeviceState, Pending, QueuedReport, ReportKind, StateFiles, VersionRef};
use crate::telemetry::Recorder;
use crate::versions::{Installed, Versions};
use crate::{agent_version, unix_now};
use outpost_model::drift::Extractor;
use outpost_model::inference::{validate, LoadedModel};

/// Most windows uploaded in one telemetry batch.
const MAX_BATCH_WINDOWS: usize = 1000;
/// Stored bytes of windows (drift summaries included) in one telemetry batch: half the frame cap,
/// so the encoded batch stays well inside it.
const MAX_BATCH_BYTES: usize = TelemetryBatch::MAX_FRAME / 2;
/// A hub clock further ahead of the device's than this is logged as a warning when it starts.
const HUB_CLOCK_WARNING: Duration = Duration::from_secs(24 * 3600);

/// What `outpost-agent status` shows, written after every cycle.
#[derive(Debug, Serialize)]
pub struct StatusFile {
    pub device_id: String,
    pub hub_url: String,
    pub active: Option<String>,
    pub previous: Vec<String>,
    pub pending: Option<String>,
    /// The plan's target running in shadow beside the active model, if any.
    pub shadow: Option<String>,
    pub last_checkin: Option<u64>,
    pub last_error: Option<String>,
    pub root_version: u64,
    pub plan_sequence: Option<u64>,
    pub queue_bytes: u64,
    pub queued_windows: u64,
    pub dropped_records: u64,
    pub undelivered_reports: usize,
    pub updated_at: u64,
}

/// What the sync loop shares with the rest of the service.
#[derive(Debug)]
pub struct Shared {
    pub slot: Arc<ModelSlot>,
    pub recorder: Arc<Recorder>,
    pub cache: Arc<TelemetryCache>,
    pub queue: Arc<QueueStats>,
    pub notifier: Arc<Notifier>,
    pub shadow: Arc<Shadow>,
}

pub fn status_path(config: &Config) -> PathBuf {
    config.data_dir.join("status.json")
}

#[derive(Debug)]
pub struct Syncer {
    config: Config,
    device_id: String,
    client: HubClient,
    files: StateFiles,
    state: DeviceState,
    root: VerifiedRoot,
    versions: Versions,
    slot: Arc<ModelSlot>,
    recorder: Arc<Recorder>,
    cache: Arc<TelemetryCache>,
    queue: Arc<QueueStats>,
    notifier: Arc<Notifier>,
    shadow: Arc<Shadow>,
    agent_state: AgentState,
    last_error: Option<String>,
    /// A download this cycle broke off (the network, a deadline, a throughput floor) or was
    /// refused (more bytes than signed, the wrong hash). The cycle then counts as failed, so the
    /// loop backs off before the next attempt: a hub must not get the device to fetch again at
    /// every poll it asks for, whether it stalls its artifacts or serves bad ones.
    download_failed: Option<download::DownloadError>,
    /// The candidate (manifest digest) whose stalled download was last reported, so retries of
    /// the same one are not reported again.
    stall_reported: Option<[u8; 32]>,
    last_telemetry_flush: Instant,
    /// The plan, manifest and shadow manifest of the last full check-in answer that carried a
    /// plan (roots left out), held in memory so the hub may answer "unchanged" instead of sending
    /// them again; they are applied again, and so checked again, at every check-in.
    held: Option<CheckInResponse>,
    /// False once the hub answered `/device/v2/checkin` with 404 (a hub older than held
    /// check-ins): plain check-ins from then on, until the agent restarts.
    hub_knows_held: bool,
}

/// Why a candidate (or a shadow model) failed probation. The message is the reason reported.
#[derive(Debug, thiserror::Error)]
pub enum ProbationError {
    /// `versions/` no longer holds the version's files as its manifest signed them.
    #[error("reading the installed files: {0:#}")]
    Read(anyhow::Error),
    #[error("loading: {0}")]
    Load(#[source] outpost_model::inference::InferenceError),
    #[error("validation: {0}")]
    Validation(#[source] outpost_model::inference::ValidationError),
    #[error("probation did not finish within {0:?}")]
    Timeout(Duration),
    /// The version's drift profile does not fit the model.
    #[error("{0:#}")]
    Drift(anyhow::Error),
}

/// Resolves a version's drift profile against its loaded model. A profile that does not fit the
/// model fails the version, as a bad validation set does.
fn model_drift(
    profile: Option<(outpost_protocol::drift::Profile, Sha256)>,
    model: &LoadedModel,
) -> anyhow::Result<Option<ModelDrift>> {
    let Some((profile, sha256)) = profile else {
        return Ok(None);
    };
    let extractor =
        Extractor::new(&profile, model.inputs(), model.outputs()).context("drift profile")?;
    Ok(Some(ModelDrift {
        profile,
        sha256,
        extractor,
    }))
}

fn to_ref(manifest: &VerifiedManifest) -> VersionRef {
    VersionRef {
        name: manifest.name().as_str().to_owned(),
        version: manifest.version(),
        manifest_sha256: manifest.digest().0,
    }
}

fn wire_ref(version: &VersionRef) -> ManifestRef {
    ManifestRef {
        name: version.name.clone(),
        version: version.version,
        manifest_sha256: Sha256(version.manifest_sha256),
    }
}

impl Syncer {
    /// Loads the trust root and state, recovers from a crash during probation, and puts the
    /// active model (or, if it no longer loads, the newest previous one) into `slot`.
    pub fn start(
        config: Config,
        client: HubClient,
        device_id: String,
        shared: Shared,
    ) -> anyhow::Result<Syncer> {
        let Shared {
            slot,
            recorder,
            cache,
            queue,
            notifier,
            shadow,
        } = shared;
        let files = StateFiles::new(&config.data_dir)?;
        files.remove_stale_temporaries();
        let mut state = files.load()?;
        let floor = TimeFloor {
            wall_clock: unix_now(),
            newest_signed: state.newest_signed,
            hub_time: state.hub_time,
        };
        let root = match files.load_root()? {
            Some(bytes) => VerifiedRoot::load_trusted(&bytes).context("the stored trust root")?,
            None => {
                let bytes = outpost_model::fsutil::read_capped(&config.trust_root, 64 * 1024)?;
                let root = VerifiedRoot::verify_initial(&bytes, &floor).with_context(|| {
                    format!("the initial trust root {}", config.trust_root.display())
                })?;
                files.save_root(&bytes)?;
                root
            }
        };
        let versions = Versions::open(&config.data_dir)?;
        if let Some(pending) = state.pending.take() {
            let reverted_to = state
                .active
                .as_ref()
                .map_or("no model".to_owned(), ToString::to_string);
            let reason = format!(
                "agent restarted during probation of {}; reverted to {reverted_to}",
                pending.candidate
            );
            log::warn!("{reason}");
            DeviceState::remember(&mut state.failed, pending.candidate.manifest_sha256);
            state.queue(QueuedReport {
                plan_sequence: pending.plan_sequence,
                manifest: Some(pending.candidate),
                kind: ReportKind::RolledBack,
                reason,
                at: unix_now(),
            });
            files.save(&state)?;
        }
        let mut syncer = Syncer {
            device_id,
            client,
            files,
            state,
            root,
            versions,
            slot,
            recorder,
            cache,
            queue,
            notifier,
            shadow,
            agent_state: AgentState::Steady,
            last_error: None,
            download_failed: None,
            stall_reported: None,
            last_telemetry_flush: Instant::now(),
            held: None,
            hub_knows_held: true,
            config,
        };
        syncer.load_active()?;
        syncer.write_status();
        Ok(syncer)
    }

    /// Serves the newest committed version that still loads and verifies on disk.
    fn load_active(&mut self) -> anyhow::Result<()> {
        let candidates: Vec<VersionRef> = self
            .state
            .active
            .iter()
            .chain(&self.state.previous)
            .cloned()
            .collect();
        for (index, version) in candidates.iter().enumerate() {
            match self.load_model(version) {
                Ok(model) => {
                    if index > 0 {
                        // The active version is damaged on disk: fall back and say so.
                        let reason = format!(
                            "active version {} no longer loads; serving {version}",
                            candidates[0]
                        );
                        log::error!("{reason}");
                        self.queue(
                            None,
                            Some(candidates[0].clone()),
                            ReportKind::RolledBack,
                            reason,
                        );
                        self.state.previous.retain(|kept| kept != version);
                        self.state.active = Some(version.clone());
                        self.files.save(&self.state)?;
                    }
                    self.slot.swap(Arc::new(model));
                    log::info!("serving {version}");
                    return Ok(());
                }
                Err(error) => log::error!("cannot load {version}: {error:#}"),
            }
        }
        if !candidates.is_empty() {
            log::error!(
                "no installed model version loads; serving nothing until the hub sends one"
            );
        }
        Ok(())
    }

    fn load_model(&self, version: &VersionRef) -> anyhow::Result<ActiveModel> {
        let installed = self.versions.load(&version.manifest_sha256)?;
        let model = LoadedModel::load(
            &installed.model,
            &installed.manifest.inputs,
            &installed.manifest.outputs,
            self.config.threads,
        )?;
        let drift = model_drift(installed.profile, &model)?;
        Ok(ActiveModel {
            name: version.name.clone(),
            version: version.version,
            manifest_sha256: Sha256(version.manifest_sha256),
            model,
            drift,
        })
    }

    /// Takes the hub's time from its latest answer. It is not ratcheted like the newest signed
    /// time: a hub whose clock once ran far ahead (or that lied) makes every document look
    /// expired, and would otherwise stop this device's updates for good. Taken this way, updates
    /// resume as soon as the hub's clock is right again; the signed times the device has seen
    /// still keep the floor from going back.
    fn note_hub_time(&mut self, hub_time: u64) {
        let now = unix_now();
        let warn_over = HUB_CLOCK_WARNING.as_secs();
        let ahead = hub_time.saturating_sub(now);
        if ahead > warn_over && self.state.hub_time.saturating_sub(now) <= warn_over {
            log::warn!(
                "the hub reports time {hub_time}, {} ahead of this device's clock; documents are \
                 judged against it and may look expired until one of the two clocks is corrected",
                humantime::format_duration(Duration::from_secs(ahead))
            );
        }
        self.state.hub_time = hub_time;
    }

    fn floor(&self) -> TimeFloor {
        TimeFloor {
            wall_clock: unix_now(),
            newest_signed: self.state.newest_signed,
            hub_time: self.state.hub_time,
        }
    }

    fn queue(
        &mut self,
        plan_sequence: Option<u64>,
        manifest: Option<VersionRef>,
        kind: ReportKind,
        reason: String,
    ) {
        self.state.queue(QueuedReport {
            plan_sequence,
            manifest,
            kind,
            reason,
            at: unix_now(),
        });
    }

    /// Runs cycles until `shutdown` receives or its sender is dropped, backing off on errors.
    /// Telemetry moves from memory to the disk cache on its own clock, whether or not the hub can
    /// be reached: an outage must not leave it in memory only.
    pub fn run(mut self, shutdown: Receiver<()>) {
        let mut backoff = Duration::ZERO;
        let mut next_cycle = Instant::now();
        loop {
            self.notifier.watchdog();
            if self.last_telemetry_flush.elapsed() >= self.config.telemetry_flush {
                self.flush_telemetry();
            }
            if Instant::now() >= next_cycle {
                let wait = match self.cycle() {
                    Ok(poll_after) => {
                        backoff = Duration::ZERO;
                        self.last_error = None;
                        poll_after
                    }
                    Err(error) => {
                        backoff = (backoff * 2)
                            .max(Duration::from_secs(1))
                            .min(self.config.max_backoff);
                        log::warn!(
                            "sync with {} failed, retrying in {backoff:?}: {error:#}",
                            self.client.base_url()
                        );
                        self.last_error = Some(format!("{error:#}"));
                        backoff
                    }
                };
                if let Err(error) = self.files.save(&self.state) {
                    log::error!("saving agent state: {error:#}");
                }
                self.write_status();
                next_cycle = Instant::now() + wait + self.jitter();
            }
            let next_flush = self.last_telemetry_flush + self.config.telemetry_flush;
            let wake = next_cycle.min(next_flush);
            match shutdown.recv_timeout(wake.saturating_duration_since(Instant::now())) {
                Err(RecvTimeoutError::Timeout) => {}
                Ok(()) | Err(RecvTimeoutError::Disconnected) => break,
            }
        }
        self.flush_telemetry();
        if let Err(error) = self.files.save(&self.state) {
            log::error!("saving agent state: {error:#}");
        }
        self.write_status();
    }

    /// A random share of the configured jitter, so a fleet does not check in in lockstep.
    fn jitter(&self) -> Duration {
        let mut bytes = [0u8; 8];
        let _ = getrandom::getrandom(&mut bytes);
        let max = self.config.poll_jitter.as_millis() as u64;
        Duration::from_millis(if max == 0 {
            0
        } else {
            u64::from_le_bytes(bytes) % max
        })
    }

    /// One round with the hub. Errors are transport-level or a failed download, and make the
    /// caller back off; refusals are reported, and returned only when they were of a download.
    pub fn cycle(&mut self) -> anyhow::Result<Duration> {
        self.deliver_reports()?;
        let stats = self.cache.stats();
        let check_in = CheckIn {
            state: self.agent_state,
            active: self.state.active.as_ref().map(|active| RunningModel {
                name: active.name.clone(),
                version: active.version,
                manifest_sha256: Sha256(active.manifest_sha256),
            }),
            root_version: self.root.version(),
            plan_sequence: self.state.highest_plan,
            agent_version: agent_version(),
            dropped_records: stats.dropped_total,
            queue_bytes: stats.queue_bytes,
        };
        let response = self.check_in(check_in)?;
        self.note_hub_time(response.hub_time);
        self.state.last_checkin = Some(unix_now());
        self.apply(response.clone());
        self.deliver_reports()?;
        self.upload_telemetry()?;
        if let Some(error) = self.download_failed.take() {
            // Reports (a refusal among them) and telemetry went out above; only the next download
            // attempt waits for the backoff.
            return Err(error.into());
        }
        // The hub names the wait; the device's own setting caps it.
        Ok(
            Duration::from_secs(u64::from(response.poll_after_secs.max(1)))
                .min(self.config.poll_interval),
        )
    }

    /// Checks in naming the documents held from the last full answer. An unchanged answer is
    /// turned back into that answer with the new hub time and poll interval, so the held plan and
    /// manifests go through exactly the checks (expiry against the hub time among them) they
    /// would if the hub had sent them again.
    fn check_in(&mut self, check_in: CheckIn) -> anyhow::Result<CheckInResponse> {
        if !self.hub_knows_held {
            return Ok(self.client.call("/device/v1/checkin", &check_in)?);
        }
        let request = HeldCheckIn {
            check_in,
            held: self.held.as_ref().and_then(CheckInResponse::held_digest),
        };
        match self.client.call("/device/v2/checkin", &request) {
            Ok(HeldCheckInResponse::Full(response)) => {
                self.held = response.plan.is_some().then(|| CheckInResponse {
                    roots: Vec::new(),
                    ..response.clone()
                });
                Ok(response)
            }
            Ok(HeldCheckInResponse::Unchanged {
                hub_time,
                poll_after_secs,
            }) => match &self.held {
                Some(held) => Ok(CheckInResponse {
                    hub_time,
                    poll_after_secs,
                    ..held.clone()
                }),
                None => anyhow::bail!("the hub answered unchanged, but this device holds no plan"),
            },
            Err(HubError::Refused { status: 404, .. }) => {
                log::info!(
                    "{} does not know held check-ins; checking in without them",
                    self.client.base_url()
                );
                self.hub_knows_held = false;
                Ok(self.client.call("/device/v1/checkin", &request.check_in)?)
            }
            Err(error) => Err(error.into()),
        }
    }

    fn refuse(
        &mut self,
        plan_sequence: Option<u64>,
        manifest: Option<VersionRef>,
        digest: [u8; 32],
        reason: String,
    ) {
        if self.state.refused.contains(&digest) {
            return;
        }
        log::warn!("refused: {reason}");
        DeviceState::remember(&mut self.state.refused, digest);
        self.queue(plan_sequence, manifest, ReportKind::Refused, reason);
    }

    /// Acts on the device's verdict ([`check::decide`]) on the documents of a check-in answer:
    /// saves a rotated root, ratchets what it has seen, reports refusals, and activates or
    /// shadows what the plan allows.
    fn apply(&mut self, response: CheckInResponse) {
        let roots: Vec<Vec<u8>> = response
            .roots
            .into_iter()
            .map(|root| root.into_vec())
            .collect();
        let documents = Documents {
            roots: &roots,
            plan: response.plan.as_deref().map(Vec::as_slice),
            manifest: response.manifest.as_ref().map(|(_, bytes)| &bytes[..]),
            shadow: response.shadow.as_deref().map(Vec::as_slice),
        };
        let trust = Trust {
            root: &self.root,
            highest_plan: self.state.highest_plan,
            highest_manifest: &self.state.highest_manifest,
            arch: Arch::current(),
            agent: agent_version(),
        };
        let (rotated, plan) = match check::decide(&documents, &trust, &self.floor()) {
            Verdict::RootRefused(refusal) => {
                let digest = outpost_protocol::sha256(roots.concat().as_slice()).0;
                self.refuse(None, None, digest, refusal.to_string());
                return;
            }
            Verdict::Judged { rotated, plan } => (rotated, plan),
        };
        if let Some(root) = rotated {
            if let Err(error) = self.files.save_root(root.signed_bytes()) {
                log::error!("saving the rotated root: {error:#}");
                return;
            }
            log::info!("trust root rotated to version {}", root.version());
            self.root = root;
        }
        let (plan, manifest, shadow) = match plan {
            // A manifest without a plan is not the device's to run.
            PlanVerdict::NoPlan { .. } => {
                self.stop_shadow("no plan applies to this device any more");
                return;
            }
            PlanVerdict::Refused(refusal) => {
                let digest = outpost_protocol::sha256(documents.plan.unwrap_or_default()).0;
                self.refuse(None, None, digest, refusal.to_string());
                self.stop_shadow("the hub's plan was refused");
                return;
            }
            PlanVerdict::Accepted {
                plan,
                manifest,
                shadow,
                ..
            } => (plan, manifest, shadow),
        };
        let sequence = plan.sequence();
        self.state.highest_plan = Some(self.state.highest_plan.unwrap_or(0).max(sequence));
        // The plan's creation is now a signed time seen: its manifests are judged against it,
        // in this answer as in every later one.
        self.state.newest_signed = self.state.newest_signed.max(plan.body().created);
        if let (Some(bytes), Some(verdict)) = (documents.manifest, manifest) {
            self.apply_manifest(sequence, bytes, verdict);
        }
        match (documents.shadow, shadow) {
            (Some(bytes), Some(verdict)) => self.apply_shadow(sequence, bytes, verdict),
            _ => self.stop_shadow("the plan no longer has this device shadow its target"),
        }
    }

    /// Reports a refused manifest: as the version it claims when it was verified and refused
    /// only as one this device cannot run.
    fn refuse_manifest(&mut self, sequence: u64, digest: [u8; 32], refusal: &Refusal) {
        let candidate = refusal.verified_manifest().map(to_ref);
        self.refuse(Some(sequence), candidate, digest, refusal.to_string());
    }

    /// Unless it runs already, activates the manifest the hub says to serve, once verified.
    fn apply_manifest(
        &mut self,
        sequence: u64,
        manifest_bytes: &[u8],
        verdict: Result<(Slot, VerifiedManifest), Refusal>,
    ) {
        let digest = outpost_protocol::sha256(manifest_bytes).0;
        let (slot, manifest) = match verdict {
            Ok(verified) => verified,
            Err(refusal) => {
                self.refuse_manifest(sequence, digest, &refusal);
                return;
            }
        };
        let candidate = to_ref(&manifest);
        self.state.note_manifest(&candidate.name, candidate.version);
        self.state.newest_signed = self.state.newest_signed.max(manifest.body().created);
        if self
            .state
            .active
            .as_ref()
            .is_some_and(|active| active.manifest_sha256 == digest)
        {
            if self.state.committed_report != Some((sequence, digest)) {
                self.state.committed_report = Some((sequence, digest));
                self.queue(
                    Some(sequence),
                    Some(candidate),
                    ReportKind::Committed,
                    String::new(),
                );
            }
            return;
        }
        if self.state.failed.contains(&digest) {
            return;
        }
        log::info!("activating {candidate} ({slot:?} of plan {sequence})");
        self.activate(sequence, candidate, &manifest);
    }

    /// Unless it runs in shadow already, or failed here before, downloads, installs and
    /// validates the verified shadow manifest exactly as for an activation, then hands it to the
    /// shadow runner. The active model keeps serving throughout.
    fn apply_shadow(
        &mut self,
        sequence: u64,
        manifest_bytes: &[u8],
        verdict: Result<VerifiedManifest, Refusal>,
    ) {
        let digest = outpost_protocol::sha256(manifest_bytes).0;
        if self
            .shadow
            .current()
            .is_some_and(|running| running.manifest_sha256.0 == digest)
        {
            return;
        }
        if self.state.failed.contains(&digest) || self.state.refused.contains(&digest) {
            self.stop_shadow("the new shadow model failed or was refused here");
            return;
        }
        let manifest = match verdict {
            Ok(manifest) => manifest,
            Err(refusal) => {
                self.stop_shadow(match refusal {
                    Refusal::Unverified { .. } => "the hub's shadow manifest was refused",
                    _ => "the new shadow model cannot run here",
                });
                self.refuse_manifest(sequence, digest, &refusal);
                return;
            }
        };
        let candidate = to_ref(&manifest);
        if self.state.active.is_none() {
            // Nothing serves, so there is nothing to compare with.
            return;
        }
        if !self.install(sequence, &candidate, &manifest) {
            return;
        }
        self.agent_state = AgentState::Steady;
        match self.probation(&candidate) {
            Ok(model) => {
                log::info!("running {candidate} in shadow (plan {sequence})");
                self.stop_shadow("another shadow model replaces it");
                self.shadow.set(Some(Arc::new(model)));
                self.queue(
                    Some(sequence),
                    Some(candidate),
                    ReportKind::Shadowing,
                    String::new(),
                );
            }
            Err(reason) => {
                log::warn!("{candidate} failed as a shadow model: {reason}");
                self.stop_shadow("the new shadow model failed");
                DeviceState::remember(&mut self.state.failed, digest);
                let reason = format!("shadow: {reason}");
                self.queue(Some(sequence), Some(candidate), ReportKind::Failed, reason);
            }
        }
    }

    /// Takes the shadow model, if any, off the shadow runner.
    fn stop_shadow(&self, why: &str) {
        if let Some(stopped) = self.shadow.set(None) {
            log::info!(
                "stopped running {}@{} in shadow: {why}",
                stopped.name,
                stopped.version
            );
        }
    }

    /// Downloads and installs the manifest's artifacts unless the version is installed already.
    /// False when it is not installed now: refused and reported, failed and reported, or held up
    /// by the network (to be resumed next cycle).
    fn install(
        &mut self,
        sequence: u64,
        candidate: &VersionRef,
        manifest: &VerifiedManifest,
    ) -> bool {
        let digest = candidate.manifest_sha256;
        if self.versions.has(&digest) {
            return true;
        }
        let candidate = candidate.clone();
        if let Some(model) = manifest.artifact(outpost_protocol::trust::ArtifactRole::Model) {
            if model.length > self.config.max_model_size {
                let reason = format!(
                    "model is {} bytes, over this device's max_model_size of {}",
                    model.length, self.config.max_model_size
                );
                self.refuse(Some(sequence), Some(candidate), digest, reason);
                return false;
            }
        }
        self.agent_state = AgentState::Downloading;
        let downloads = self.config.data_dir.join("downloads");
        let limits = Limits {
            deadline: self.config.download_deadline,
            min_rate: self.config.min_download_rate,
        };
        let notifier = self.notifier.clone();
        let mut files = Vec::new();
        for artifact in &manifest.body().artifacts {
            match download::fetch(&self.client, artifact, &downloads, limits, &|| {
                notifier.watchdog()
            }) {
                Ok(path) => files.push((artifact.role, path)),
                Err(error) if error.is_refusal() => {
                    self.agent_state = AgentState::Steady;
                    self.refuse(Some(sequence), Some(candidate), digest, error.to_string());
                    self.download_failed = Some(error);
                    return false;
                }
                Err(error) => {
                    // Network trouble: keep the partial file and resume after a backoff. A hub
                    // too slow for the limits hears of it, once per candidate: a stalled rollout
                    // then shows why in the device's history, not only in its silence.
                    self.agent_state = AgentState::Steady;
                    let stalled = matches!(
                        error,
                        download::DownloadError::Deadline { .. }
                            | download::DownloadError::TooSlow { .. }
                    );
                    if stalled && self.stall_reported != Some(digest) {
                        self.stall_reported = Some(digest);
                        let reason = format!("{error}; resuming after a backoff");
                        self.queue(Some(sequence), Some(candidate), ReportKind::Stalled, reason);
                    }
                    self.download_failed = Some(error);
                    return false;
                }
            }
        }
        if let Err(error) = self
            .versions
            .install(&digest, manifest.signed_bytes(), &files)
        {
            self.agent_state = AgentState::Degraded;
            log::error!("installing {candidate}: {error:#}");
            self.queue(
                Some(sequence),
                Some(candidate),
                ReportKind::Failed,
                format!("install: {error:#}"),
            );
            return false;
        }
        self.queue(
            Some(sequence),
            Some(candidate),
            ReportKind::Downloaded,
            String::new(),
        );
        true
    }

    fn activate(&mut self, sequence: u64, candidate: VersionRef, manifest: &VerifiedManifest) {
        let digest = candidate.manifest_sha256;
        if !self.install(sequence, &candidate, manifest) {
            return;
        }

        self.agent_state = AgentState::Probation;
        self.state.pending = Some(Pending {
            candidate: candidate.clone(),
            plan_sequence: Some(sequence),
            started_at: unix_now(),
        });
        self.queue(
            Some(sequence),
            Some(candidate.clone()),
            ReportKind::Activating,
            String::new(),
        );
        if let Err(error) = self.files.save(&self.state) {
            // Without the marker on disk a crash could not be recovered from: do not go on.
            log::error!("saving the probation marker: {error:#}");
            self.state.pending = None;
            self.agent_state = AgentState::Degraded;
            return;
        }
        self.write_status();
        let _ = self.deliver_reports();

        match self.probation(&candidate) {
            Ok(model) => {
                let previous = self.state.active.replace(candidate.clone());
                if let Some(previous) = previous {
                    self.state
                        .previous
                        .retain(|kept| kept.manifest_sha256 != digest);
                    self.state.previous.insert(0, previous);
                }
                self.state
                    .previous
                    .retain(|kept| kept.manifest_sha256 != digest);
                self.state.previous.truncate(self.config.keep_versions);
                self.state.pending = None;
                self.state.committed_report = Some((sequence, digest));
                if let Err(error) = self.files.save(&self.state) {
                    log::error!("saving the commit of {candidate}: {error:#}");
                }
                self.slot.swap(Arc::new(model));
                self.agent_state = AgentState::Steady;
                self.write_status();
                log::info!("committed {candidate}");
                self.queue(
                    Some(sequence),
                    Some(candidate),
                    ReportKind::Committed,
                    String::new(),
                );
                let mut keep: Vec<[u8; 32]> = self
                    .state
                    .active
                    .iter()
                    .chain(&self.state.previous)
                    .map(|version| version.manifest_sha256)
                    .collect();
                keep.extend(self.shadow.current().map(|shadow| shadow.manifest_sha256.0));
                if let Err(error) = self.versions.retain(&keep) {
                    log::warn!("removing old versions: {error:#}");
                }
            }
            Err(reason) => {
                log::warn!("{candidate} failed probation: {reason}");
                self.state.pending = None;
                DeviceState::remember(&mut self.state.failed, digest);
                self.agent_state = AgentState::Steady;
                if let Err(error) = self.files.save(&self.state) {
                    log::error!("saving agent state: {error:#}");
                }
                // Before the report goes out: whoever reads the hub's event then finds the
                // status file already without the candidate.
                self.write_status();
                self.queue(
                    Some(sequence),
                    Some(candidate),
                    ReportKind::Failed,
                    reason.to_string(),
                );
            }
        }
    }

    /// Loads the candidate and runs its signed validation set, on a separate thread bounded by
    /// the probation timeout: a model that hangs fails like one that answers wrongly.
    fn probation(&self, candidate: &VersionRef) -> Result<ActiveModel, ProbationError> {
        let installed: Installed = self
            .versions
            .load(&candidate.manifest_sha256)
            .map_err(ProbationError::Read)?;
        let threads = self.config.threads;
        let timeout = self.config.probation_timeout;
        let profile = installed.profile.clone();
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let deadline = Instant::now() + timeout;
            let outcome = LoadedModel::load(
                &installed.model,
                &installed.manifest.inputs,
                &installed.manifest.outputs,
                threads,
            )
            .map_err(ProbationError::Load)
            .and_then(|model| match &installed.validation {
                Some(set) => validate(&model, set, deadline)
                    .map(|_| model)
                    .map_err(ProbationError::Validation),
                None => Ok(model),
            });
            let _ = done.send(outcome);
        });
        let model = match result.recv_timeout(timeout) {
            Ok(outcome) => outcome?,
            Err(_) => return Err(ProbationError::Timeout(timeout)),
        };
        let drift = model_drift(profile, &model).map_err(ProbationError::Drift)?;
        Ok(ActiveModel {
            name: candidate.name.clone(),
            version: candidate.version,
            manifest_sha256: Sha256(candidate.manifest_sha256),
            model,
            drift,
        })
    }

    /// Sends queued status reports in order. A transport failure stops and is returned, so the
    /// caller backs off; a report the hub refuses outright is dropped with a warning.
    fn deliver_reports(&mut self) -> Result<(), HubError> {
        while let Some(report) = self.state.outbox.first().cloned() {
            let reason = report.reason.clone();
            let status = match report.kind {
                ReportKind::Downloaded => Status::Downloaded,
                ReportKind::Activating => Status::Activating,
                ReportKind::Committed => Status::Committed,
                ReportKind::Shadowing => Status::Shadowing,
                ReportKind::RolledBack => Status::RolledBack { reason },
                ReportKind::Refused => Status::Refused { reason },
                ReportKind::Stalled => Status::Stalled { reason },
                // The wire has no status for an event outside a rollout: it goes as `Failed`.
                ReportKind::Failed | ReportKind::TelemetryRefused => Status::Failed { reason },
            };
            let wire = StatusReport {
                plan_sequence: report.plan_sequence,
                manifest: report.manifest.as_ref().map(wire_ref),
                status,
                at: report.at,
            };
            match self.client.send("/device/v1/status", &wire) {
                Ok(()) => {}
                Err(error) if error.is_transient() => return Err(error),
                Err(error) => log::warn!("hub refused a status report, dropping it: {error}"),
            }
            self.state.outbox.remove(0);
        }
        Ok(())
    }

    /// Moves finished in-memory windows into the disk cache.
    fn flush_telemetry(&mut self) {
        let windows = self.recorder.take_all();
        if !windows.is_empty() {
            if let Err(error) = self.cache.append(&windows) {
                log::error!("caching {} telemetry windows: {error}", windows.len());
            }
        }
        self.last_telemetry_flush = Instant::now();
    }

    fn upload_telemetry(&mut self) -> Result<(), HubError> {
        let batch = match self.cache.pending(MAX_BATCH_WINDOWS, MAX_BATCH_BYTES) {
            Ok(Some(batch)) => batch,
            Ok(None) => return Ok(()),
            Err(error) => {
                log::error!("reading the telemetry cache: {error}");
                return Ok(());
            }
        };
        let sequence = batch.sequence;
        let sent: Result<TelemetryAck, HubError> = self.client.call(
            "/device/v1/telemetry",
            &TelemetryBatch {
                sequence,
                windows: batch.windows,
                dropped_records: batch.dropped_records,
            },
        );
        let ack = match sent {
            Ok(ack) => ack,
            Err(error) if error.is_transient() => return Err(error),
            Err(error) => {
                // Sending it again would be refused again and hold up the whole queue.
                let reason = format!("hub refused telemetry batch {sequence}: {error}");
                match self.cache.refused(sequence) {
                    Ok(cache::Refusal::DriftStripped) => {
                        log::error!("{reason}; sending it again without its drift summaries");
                    }
                    Ok(cache::Refusal::Dropped { windows }) => {
                        log::error!("{reason}; dropped it, {windows} windows counted as dropped");
                    }
                    Err(cache_error) => log::error!("{reason}; {cache_error}"),
                }
                self.report_event(ReportKind::TelemetryRefused, reason);
                return Ok(());
            }
        };
        if ack.sequence == sequence {
            if let Err(error) = self.cache.acknowledge(sequence) {
                log::error!("acknowledging telemetry batch {sequence}: {error}");
            }
        }
        Ok(())
    }

    /// Queues an event for the hub that is not about a rollout (a quarantined cache, say).
    pub fn report_event(&mut self, kind: ReportKind, reason: String) {
        self.queue(None, None, kind, reason);
    }

    fn write_status(&self) {
        let stats = self.cache.stats();
        use std::sync::atomic::Ordering;
        self.queue
            .queue_bytes
            .store(stats.queue_bytes, Ordering::Relaxed);
        self.queue
            .dropped_records
            .store(stats.dropped_total, Ordering::Relaxed);
        let status = StatusFile {
            device_id: self.device_id.clone(),
            hub_url: self.client.base_url().to_owned(),
            active: self.state.active.as_ref().map(ToString::to_string),
            previous: self
                .state
                .previous
                .iter()
                .map(ToString::to_string)
                .collect(),
            pending: self
                .state
                .pending
                .as_ref()
                .map(|pending| pending.candidate.to_string()),
            shadow: self
                .shadow
                .current()
                .map(|shadow| format!("{}@{}", shadow.name, shadow.version)),
            last_checkin: self.state.last_checkin,
            last_error: self.last_error.clone(),
            root_version: self.root.version(),
            plan_sequence: self.state.highest_plan,
            queue_bytes: stats.queue_bytes,
            queued_windows: stats.queued_windows,
            dropped_records: stats.dropped_total,
            undelivered_reports: self.state.outbox.len(),
            updated_at: unix_now(),
        };
        match serde_json::to_vec_pretty(&status) {
            Ok(bytes) => {
                if let Err(error) =
                    outpost_model::fsutil::write_atomic(&status_path(&self.config), &bytes, 0o644)
                {
                    log::warn!("writing the status file: {error:#}");
                }
            }
            Err(error) => log::warn!("encoding the status file: {error}"),
        }
    }
}
