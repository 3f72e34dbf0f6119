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
//! taken off it as soon as a check-in no longer asks for it. The model is kept in memory only;
//! after a restart the next check-in sets it again. A persisted shadow marker names it while it
//! runs: the agent clears it when it stops cleanly, so finding it at start means the agent died
//! while the model ran in shadow, and after two such ends in a row the model counts as failed here
//! (a model that kills the process must not hold the agent in a crash loop).
//!
//! This module holds the loop, the cycle and the check-in; the rest is one job per submodule:
//! `apply` acts on the verdict of [`crate::check::decide`], `activation` installs, probes and
//! commits, `shadowing` sets and clears the shadow model, `reports` is the status outbox and
//! `telemetry_upload` moves telemetry to the cache and the hub, `capture_sync` fetches capture
//! allowances, seals captured samples and uploads them.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_protocol::device::{
    AgentState, CheckIn, CheckInResponse, HeldCheckIn, HeldCheckInResponse, ModelAnswer,
    ModelCheckIn, ModelRuntime, ModelsCheckIn, ModelsCheckInResponse, RunningModel,
};
use outpost_protocol::drift::DriftSummary;
use outpost_protocol::trust::{ManifestRef, Slot};
use outpost_protocol::{Sha256, TimeFloor, VerifiedManifest, VerifiedRoot};
use serde::Serialize;

use crate::api::QueueStats;
use crate::cache::TelemetryCache;
use crate::capture::Capturer;
use crate::config::Config;
use crate::download;
use crate::hub_client::{HubClient, HubError};
use crate::notify::Notifier;
use crate::shadow::Shadow;
use crate::slot::ModelSlot;
use crate::state::{
    DeviceState, ModelState, QueuedReport, ReportKind, StateFiles, VersionRef, SHADOW_UNCLEAN_ENDS,
};
use crate::telemetry::Recorder;
use crate::versions::Versions;
use crate::{agent_version, unix_now};
use outpost_model::inference::Runtimes;

mod activation;
mod apply;
mod capture_sync;
mod reports;
mod shadowing;
mod telemetry_upload;

pub use activation::ProbationError;

/// A hub clock further ahead of the device's than this is logged as a warning when it starts.
const HUB_CLOCK_WARNING: Duration = Duration::from_secs(24 * 3600);

/// What `outpost-agent status` shows, written after every cycle. `active`, `previous`,
/// `pending`, `shadow` and `plan_sequence` are the first model's, as agents of one model wrote
/// them; `models` has every model.
#[derive(Debug, Serialize)]
pub struct StatusFile {
    pub device_id: String,
    pub hub_url: String,
    pub models: Vec<ModelStatus>,
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

/// One model in the status file.
#[derive(Debug, Serialize)]
pub struct ModelStatus {
    pub name: String,
    pub active: Option<String>,
    /// The runtime serving the active version (`onnxruntime 1.22.0 [CPUExecutionProvider]`).
    pub runtime: Option<String>,
    /// Why a preferred runtime is not the one serving it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub runtime_fallback: Option<String>,
    pub previous: Vec<String>,
    pub pending: Option<String>,
    pub shadow: Option<String>,
    pub plan_sequence: Option<u64>,
}

/// The signed documents of one model's answer, as the hub sent them: the plan, the manifest of
/// the device's slot and any shadow manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct PlanDocuments {
    pub plan: Vec<u8>,
    pub manifest: Option<(Slot, Vec<u8>)>,
    pub shadow: Option<Vec<u8>>,
}

impl PlanDocuments {
    fn from_answer(answer: ModelAnswer) -> Option<PlanDocuments> {
        match answer {
            ModelAnswer::Unchanged { .. } => None,
            ModelAnswer::Full {
                plan,
                manifest,
                shadow,
            } => Some(PlanDocuments {
                plan: plan.into_vec(),
                manifest: manifest.map(|(slot, bytes)| (slot, bytes.into_vec())),
                shadow: shadow.map(|bytes| bytes.into_vec()),
            }),
        }
    }

    fn held_digest(&self) -> Sha256 {
        let manifest = self
            .manifest
            .as_ref()
            .map(|(slot, bytes)| (*slot, outpost_protocol::sha256(bytes)));
        outpost_protocol::device::held_digest(
            &outpost_protocol::sha256(&self.plan),
            manifest.as_ref().map(|(slot, digest)| (*slot, digest)),
            self.shadow
                .as_ref()
                .map(|bytes| outpost_protocol::sha256(bytes))
                .as_ref(),
        )
    }
}

/// A check-in answer, whichever path it came by: newer roots, and one model's documents per
/// model a plan applies to.
#[derive(Debug)]
pub(super) struct Answer {
    pub hub_time: u64,
    pub poll_after_secs: u32,
    pub roots: Vec<Vec<u8>>,
    pub plans: Vec<PlanDocuments>,
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
    pub runtimes: Arc<Runtimes>,
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
    runtimes: Arc<Runtimes>,
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
    /// Per model name (as its plan claims it), the plan, manifest and shadow manifest of the last
    /// full answer about it, held in memory so the hub may answer "unchanged" instead of sending
    /// them again; they are applied again, and so checked again, at every check-in.
    held: Vec<(String, PlanDocuments)>,
    /// On the single-model paths (a hub older than `/device/v3/checkin`): the last full answer
    /// that carried a plan, roots left out.
    held_single: Option<CheckInResponse>,
    /// False once the hub answered `/device/v3/checkin` with 404 (a hub older than check-ins of
    /// several models): check-ins about the first model only from then on, until the agent
    /// restarts.
    hub_knows_models: bool,
    /// False once the hub answered `/device/v2/checkin` with 404 (a hub older than held
    /// check-ins): plain check-ins from then on, until the agent restarts.
    hub_knows_held: bool,
    /// False once the hub answered `/device/v3/runtimes` with 404 (a hub older than runtime
    /// reports): none sent until the agent restarts.
    hub_knows_runtimes: bool,
    /// The runtime of each served model as the hub last took it; `None` until then.
    runtimes_reported: Option<Vec<ModelRuntime>>,
    /// The signed capture allowances acted on, shared with the inference API.
    capturer: Arc<Capturer>,
    /// False once the hub answered `/device/v3/capture` with 404 (a hub older than data
    /// capture): no allowances asked for and no samples sent until the agent restarts.
    hub_knows_capture: bool,
    /// Each served version's drift summary of the current hour so far (its window's start and
    /// the flushed parts merged), judged for `while-drift-alert` allowances.
    drift_hours: HashMap<(String, u64), (u64, DriftSummary)>,
    /// Allowances refused (by digest), so each refusal is reported once.
    capture_refused: std::collections::HashSet<Sha256>,
    /// The models the hub was last asked about for capture allowances, and when it answered:
    /// asked again after `capture_interval`, or at once when the models served change.
    capture_asked: Option<(Vec<String>, Instant)>,
}

pub(super) fn to_ref(manifest: &VerifiedManifest) -> VersionRef {
    VersionRef {
        name: manifest.name().as_str().to_owned(),
        version: manifest.version(),
        manifest_sha256: manifest.digest().0,
    }
}

/// The signed roots of an answer, as owned bytes.
fn owned<B: std::ops::Deref<Target = Vec<u8>>>(roots: Vec<B>) -> Vec<Vec<u8>> {
    roots.iter().map(|root| root.to_vec()).collect()
}

fn running(version: &VersionRef) -> RunningModel {
    RunningModel {
        name: version.name.clone(),
        version: version.version,
        manifest_sha256: Sha256(version.manifest_sha256),
    }
}

/// At start, for one model: a probation the agent did not finish is reverted (the candidate
/// counts as failed here), and a shadow marker left behind counts an unclean end while that
/// version ran in shadow, failing it after [`SHADOW_UNCLEAN_ENDS`] in a row.
fn recover_model(state: &mut DeviceState, index: usize) {
    let model: &mut ModelState = &mut state.models[index];
    let pending = model.pending.take();
    let reverted_to = model
        .active
        .as_ref()
        .map_or("no model".to_owned(), ToString::to_string);
    let marker = model.shadow.take();
    if let Some(pending) = pending {
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
    }
    if let Some(mut marker) = marker {
        marker.unclean_ends += 1;
        if marker.unclean_ends >= SHADOW_UNCLEAN_ENDS {
            let reason = format!(
                "shadow: the agent ended uncleanly {} times in a row while running {} in \
                 shadow; it runs here no more",
                marker.unclean_ends, marker.candidate
            );
            log::error!("{reason}");
            DeviceState::remember(&mut state.failed, marker.candidate.manifest_sha256);
            state.queue(QueuedReport {
                plan_sequence: Some(marker.plan_sequence),
                manifest: Some(marker.candidate),
                kind: ReportKind::Failed,
                reason,
                at: unix_now(),
            });
        } else {
            log::warn!(
                "the agent ended uncleanly while running {} in shadow; it is tried again, and \
                 fails here if that happens {} times in a row",
                marker.candidate,
                SHADOW_UNCLEAN_ENDS
            );
            state.models[index].shadow = Some(marker);
        }
    }
}

pub(super) fn wire_ref(version: &VersionRef) -> ManifestRef {
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
            runtimes,
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
        let capturer =
            Arc::new(Capturer::open(&config.data_dir, &root, &floor).context("the capture state")?);
        let interrupted = state
            .models
            .iter()
            .any(|model| model.pending.is_some() || model.shadow.is_some());
        if interrupted {
            for index in 0..state.models.len() {
                recover_model(&mut state, index);
            }
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
            runtimes,
            agent_state: AgentState::Steady,
            last_error: None,
            download_failed: None,
            stall_reported: None,
            last_telemetry_flush: Instant::now(),
            held: Vec::new(),
            held_single: None,
            hub_knows_models: true,
            hub_knows_held: true,
            hub_knows_runtimes: true,
            runtimes_reported: None,
            capturer,
            hub_knows_capture: true,
            drift_hours: HashMap::new(),
            capture_refused: std::collections::HashSet::new(),
            capture_asked: None,
            config,
        };
        syncer.load_active()?;
        syncer.write_status();
        Ok(syncer)
    }

    /// Takes the hub's time from its latest answer. It is not ratcheted like the newest signed
    /// time: a hub whose clock once ran far ahead (or that lied) makes every document look
    /// expired, and would otherwise stop this device's updates for good. Taken this way, updates
    /// resume as soon as the hub's clock is right again; the signed times the device has seen
    /// still keep the floor from going back.
    pub(super) fn note_hub_time(&mut self, hub_time: u64) {
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

    pub(super) fn floor(&self) -> TimeFloor {
        TimeFloor {
            wall_clock: unix_now(),
            newest_signed: self.state.newest_signed,
            hub_time: self.state.hub_time,
        }
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
        // A clean stop: whatever runs in shadow did not end the agent.
        for model in &mut self.state.models {
            model.shadow = None;
        }
        if let Err(error) = self.files.save(&self.state) {
            log::error!("saving agent state: {error:#}");
        }
        self.write_status();
    }

    /// The capture allowances this agent acts on, for the inference API to sample with.
    pub fn capturer(&self) -> Arc<Capturer> {
        self.capturer.clone()
    }

    /// A random share of the configured jitter, so a fleet does not check in in lockstep.
    pub(super) fn jitter(&self) -> Duration {
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
        let answer = self.check_in()?;
        self.note_hub_time(answer.hub_time);
        self.state.last_checkin = Some(unix_now());
        let poll_after_secs = answer.poll_after_secs;
        self.apply(answer);
        self.deliver_reports()?;
        self.deliver_runtimes();
        self.upload_telemetry()?;
        self.sync_capture();
        if let Some(error) = self.download_failed.take() {
            // Reports (a refusal among them) and telemetry went out above; only the next download
            // attempt waits for the backoff.
            return Err(error.into());
        }
        // The hub names the wait; the device's own setting caps it.
        Ok(Duration::from_secs(u64::from(poll_after_secs.max(1))).min(self.config.poll_interval))
    }

    /// Checks in about every model, naming the documents held of each; a hub that does not know
    /// check-ins of several models is asked about the first model only.
    fn check_in(&mut self) -> anyhow::Result<Answer> {
        let stats = self.cache.stats();
        if self.hub_knows_models {
            // The models it serves first: past the cap it is a retired model's entry (kept for
            // its plan floor) that is left out, and the hub answers about it all the same.
            let mut named: Vec<&ModelState> = self
                .state
                .models
                .iter()
                .filter(|model| !model.name.is_empty())
                .collect();
            named.sort_by_key(|model| model.active.is_none() && model.pending.is_none());
            let models: Vec<ModelCheckIn> = named
                .into_iter()
                .take(outpost_protocol::device::MAX_DEVICE_MODELS)
                .map(|model| ModelCheckIn {
                    name: model.name.clone(),
                    active: model.active.as_ref().map(running),
                    plan_sequence: model.highest_plan,
                    held: self
                        .held
                        .iter()
                        .find(|(name, _)| *name == model.name)
                        .map(|(_, documents)| documents.held_digest()),
                })
                .collect();
            let request = ModelsCheckIn {
                state: self.agent_state,
                models,
                root_version: self.root.version(),
                agent_version: agent_version(),
                dropped_records: stats.dropped_total,
                queue_bytes: stats.queue_bytes,
            };
            match self.client.call("/device/v3/checkin", &request) {
                Ok(response) => return Ok(self.hold(response)),
                Err(HubError::Refused { status: 404, .. }) => {
                    log::info!(
                        "{} does not know check-ins of several models; checking in about the \
                         first model only",
                        self.client.base_url()
                    );
                    self.hub_knows_models = false;
                }
                Err(error) => return Err(error.into()),
            }
        }
        // A hub of one model hears of the first model this device serves.
        let first = self
            .state
            .models
            .iter()
            .find(|model| model.active.is_some())
            .or(self.state.first());
        let check_in = CheckIn {
            state: self.agent_state,
            active: first.and_then(|model| model.active.as_ref()).map(running),
            root_version: self.root.version(),
            plan_sequence: first.and_then(|model| model.highest_plan),
            agent_version: agent_version(),
            dropped_records: stats.dropped_total,
            queue_bytes: stats.queue_bytes,
        };
        let response = self.check_in_single(check_in)?;
        let plans = response.plan.map(|plan| PlanDocuments {
            plan: plan.into_vec(),
            manifest: response
                .manifest
                .map(|(slot, bytes)| (slot, bytes.into_vec())),
            shadow: response.shadow.map(|bytes| bytes.into_vec()),
        });
        Ok(Answer {
            hub_time: response.hub_time,
            poll_after_secs: response.poll_after_secs,
            roots: owned(response.roots),
            plans: plans.into_iter().collect(),
        })
    }

    /// Turns an answer about every model into the documents to apply: a full answer is held for
    /// its model, an unchanged one is replaced by what is held. Documents of a model the hub no
    /// longer answers about are dropped.
    fn hold(&mut self, response: ModelsCheckInResponse) -> Answer {
        let mut held = Vec::with_capacity(response.models.len());
        let mut plans = Vec::with_capacity(response.models.len());
        for answer in response.models {
            let documents = match answer {
                ModelAnswer::Unchanged { name } => {
                    match self.held.iter().find(|(held, _)| *held == name) {
                        Some((_, documents)) => documents.clone(),
                        None => {
                            log::warn!(
                                "the hub answered unchanged for model {name:?}, but this device \
                                 holds no documents of it; they come in full next time"
                            );
                            continue;
                        }
                    }
                }
                full => match PlanDocuments::from_answer(full) {
                    Some(documents) => documents,
                    None => continue,
                },
            };
            // The name the plan claims: were it a lie, the plan fails verification, and the
            // documents held under it are only ever applied, so verified, again.
            let name = crate::check::claimed_plan_model(&documents.plan).unwrap_or_default();
            if held.iter().any(|(known, _)| *known == name) {
                // One answer per model: a second one for the same model is not looked at.
                log::warn!("the hub answered twice about model {name:?}; the first answer counts");
                continue;
            }
            if held.len() == outpost_protocol::device::MAX_DEVICE_MODELS {
                log::warn!("the hub answered about more models than a device runs; the rest wait");
                break;
            }
            held.push((name, documents.clone()));
            plans.push(documents);
        }
        self.held = held;
        Answer {
            hub_time: response.hub_time,
            poll_after_secs: response.poll_after_secs,
            roots: owned(response.roots),
            plans,
        }
    }

    /// Checks in naming the documents held from the last full answer. An unchanged answer is
    /// turned back into that answer with the new hub time and poll interval, so the held plan and
    /// manifests go through exactly the checks (expiry against the hub time among them) they
    /// would if the hub had sent them again.
    fn check_in_single(&mut self, check_in: CheckIn) -> anyhow::Result<CheckInResponse> {
        if !self.hub_knows_held {
            return Ok(self.client.call("/device/v1/checkin", &check_in)?);
        }
        let request = HeldCheckIn {
            check_in,
            held: self
                .held_single
                .as_ref()
                .and_then(CheckInResponse::held_digest),
        };
        match self.client.call("/device/v2/checkin", &request) {
            Ok(HeldCheckInResponse::Full(response)) => {
                self.held_single = response.plan.is_some().then(|| CheckInResponse {
                    roots: Vec::new(),
                    ..response.clone()
                });
                Ok(response)
            }
            Ok(HeldCheckInResponse::Unchanged {
                hub_time,
                poll_after_secs,
            }) => match &self.held_single {
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

    pub(super) fn write_status(&self) {
        let stats = self.cache.stats();
        use std::sync::atomic::Ordering;
        self.queue
            .queue_bytes
            .store(stats.queue_bytes, Ordering::Relaxed);
        self.queue
            .dropped_records
            .store(stats.dropped_total, Ordering::Relaxed);
        let models: Vec<ModelStatus> = self
            .state
            .models
            .iter()
            .filter(|model| !model.name.is_empty())
            .map(|model| {
                let serving = self.slot.get(&model.name);
                (model, serving)
            })
            .map(|(model, serving)| ModelStatus {
                name: model.name.clone(),
                active: model.active.as_ref().map(ToString::to_string),
                runtime: serving
                    .as_ref()
                    .map(|active| active.model.runtime().to_string()),
                runtime_fallback: serving.and_then(|active| active.runtime_fallback.clone()),
                previous: model.previous.iter().map(ToString::to_string).collect(),
                pending: model
                    .pending
                    .as_ref()
                    .map(|pending| pending.candidate.to_string()),
                shadow: self
                    .shadow
                    .current(&model.name)
                    .map(|shadow| format!("{}@{}", shadow.name, shadow.version)),
                plan_sequence: model.highest_plan,
            })
            .collect();
        let first = models.first();
        let status = StatusFile {
            device_id: self.device_id.clone(),
            hub_url: self.client.base_url().to_owned(),
            active: first.and_then(|model| model.active.clone()),
            previous: first
                .map(|model| model.previous.clone())
                .unwrap_or_default(),
            pending: first.and_then(|model| model.pending.clone()),
            shadow: first.and_then(|model| model.shadow.clone()),
            last_checkin: self.state.last_checkin,
            last_error: self.last_error.clone(),
            root_version: self.root.version(),
            plan_sequence: first.and_then(|model| model.plan_sequence),
            queue_bytes: stats.queue_bytes,
            queued_windows: stats.queued_windows,
            dropped_records: stats.dropped_total,
            undelivered_reports: self.state.outbox.len(),
            updated_at: unix_now(),
            models,
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
