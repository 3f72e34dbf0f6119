//! Activation: download and install a verified manifest's artifacts, put the candidate on
//! probation (load it and run its signed validation set within a deadline), then commit or
//! abandon it; and, at start, load the active model or fall back to a previous one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_protocol::device::AgentState;
use outpost_protocol::{Sha256, VerifiedManifest};

use crate::download::{self, Limits};
use crate::slot::{ActiveModel, ModelDrift};
use crate::state::{DeviceState, Pending, ReportKind, VersionRef};
use crate::unix_now;
use crate::versions::Installed;
use outpost_model::drift::Extractor;
use outpost_model::inference::{LoadedModel, SelectError, Selected};

use super::Syncer;

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

impl Syncer {
    /// Serves, for every model, the newest committed version that still loads and verifies on
    /// disk.
    pub(super) fn load_active(&mut self) -> anyhow::Result<()> {
        for model in 0..self.state.models.len() {
            self.load_active_of(model)?;
        }
        Ok(())
    }

    fn load_active_of(&mut self, model: usize) -> anyhow::Result<()> {
        let state = &self.state.models[model];
        let candidates: Vec<VersionRef> = state
            .active
            .iter()
            .chain(&state.previous)
            .cloned()
            .collect();
        for (index, version) in candidates.iter().enumerate() {
            match self.load_model(version) {
                Ok(loaded) => {
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
                        let state = &mut self.state.models[model];
                        state.previous.retain(|kept| kept != version);
                        state.active = Some(version.clone());
                        self.files.save(&self.state)?;
                    }
                    self.slot.swap(Arc::new(loaded));
                    log::info!("serving {version}");
                    return Ok(());
                }
                Err(error) => log::error!("cannot load {version}: {error:#}"),
            }
        }
        if !candidates.is_empty() {
            log::error!(
                "no installed version of {} loads; serving none until the hub sends one",
                self.state.models[model].name
            );
        }
        Ok(())
    }

    /// Removes every installed version no model keeps (active, previous, pending, shadow) and no
    /// shadow run uses.
    pub(super) fn remove_unkept_versions(&self) -> anyhow::Result<()> {
        let mut keep = self.state.kept();
        keep.extend(
            self.shadow
                .all()
                .iter()
                .map(|shadow| shadow.manifest_sha256.0),
        );
        self.versions.retain(&keep)
    }

    /// Loads a committed version at start. It passed its validation set at probation; when ONNX
    /// Runtime is to be tried, the set runs again under it, since it may not be what ran then.
    pub(super) fn load_model(&self, version: &VersionRef) -> anyhow::Result<ActiveModel> {
        let installed = self.versions.load(&version.manifest_sha256)?;
        let validation = installed
            .validation
            .as_ref()
            .filter(|_| self.runtimes.onnxruntime_ready());
        let Selected { model, fallback } = self.runtimes.load(
            &installed.model,
            &installed.manifest.inputs,
            &installed.manifest.outputs,
            self.config.threads,
            validation,
            Instant::now() + self.config.probation_timeout,
        )?;
        let drift = model_drift(installed.profile, &model)?;
        Ok(ActiveModel {
            name: version.name.clone(),
            version: version.version,
            manifest_sha256: Sha256(version.manifest_sha256),
            model,
            drift,
            runtime_fallback: fallback,
        })
    }

    /// Downloads and installs the manifest's artifacts unless the version is installed already.
    /// False when it is not installed now: refused and reported, failed and reported, or held up
    /// by the network (to be resumed next cycle).
    pub(super) fn install(
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

    pub(super) fn activate(
        &mut self,
        model: usize,
        sequence: u64,
        candidate: VersionRef,
        manifest: &VerifiedManifest,
    ) {
        let digest = candidate.manifest_sha256;
        if !self.install(sequence, &candidate, manifest) {
            return;
        }

        self.agent_state = AgentState::Probation;
        self.state.models[model].pending = Some(Pending {
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
            self.state.models[model].pending = None;
            self.agent_state = AgentState::Degraded;
            return;
        }
        self.write_status();
        let _ = self.deliver_reports();

        match self.probation(&candidate) {
            Ok(loaded) => {
                let state = &mut self.state.models[model];
                let previous = state.active.replace(candidate.clone());
                if let Some(previous) = previous {
                    state.previous.retain(|kept| kept.manifest_sha256 != digest);
                    state.previous.insert(0, previous);
                }
                state.previous.retain(|kept| kept.manifest_sha256 != digest);
                state.previous.truncate(self.config.keep_versions);
                state.pending = None;
                state.committed_report = Some((sequence, digest));
                self.state
                    .note_commit(&candidate.name, candidate.version, sequence);
                let saved = match self.files.save(&self.state) {
                    Ok(()) => true,
                    Err(error) => {
                        log::error!("saving the commit of {candidate}: {error:#}");
                        false
                    }
                };
                self.slot.swap(Arc::new(loaded));
                self.agent_state = AgentState::Steady;
                self.write_status();
                log::info!("committed {candidate}");
                self.queue(
                    Some(sequence),
                    Some(candidate),
                    ReportKind::Committed,
                    String::new(),
                );
                if !saved {
                    // The state on disk still names the version this one replaced as active, and
                    // a restart reverts to it: nothing is removed until a state that no longer
                    // names it is saved (the next cleanup after a commit then removes it).
                    log::warn!("keeping every installed version until the agent state is saved");
                    return;
                }
                // Every model's versions stay: one model's commit removes only its own old ones.
                if let Err(error) = self.remove_unkept_versions() {
                    log::warn!("removing old versions: {error:#}");
                }
            }
            Err(reason) => {
                log::warn!("{candidate} failed probation: {reason}");
                self.state.models[model].pending = None;
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
    pub(super) fn probation(&self, candidate: &VersionRef) -> Result<ActiveModel, ProbationError> {
        let installed: Installed = self
            .versions
            .load(&candidate.manifest_sha256)
            .map_err(ProbationError::Read)?;
        let threads = self.config.threads;
        let timeout = self.config.probation_timeout;
        let profile = installed.profile.clone();
        let runtimes = self.runtimes.clone();
        let (done, result) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            // The set runs under the runtime that will serve (see `Runtimes::load`).
            let outcome = runtimes
                .load(
                    &installed.model,
                    &installed.manifest.inputs,
                    &installed.manifest.outputs,
                    threads,
                    installed.validation.as_ref(),
                    Instant::now() + timeout,
                )
                .map_err(|error| match error {
                    SelectError::Load(error) => ProbationError::Load(error),
                    SelectError::Validation(error) => ProbationError::Validation(error),
                });
            let _ = done.send(outcome);
        });
        let Selected { model, fallback } = match result.recv_timeout(timeout) {
            Ok(outcome) => outcome?,
            Err(_) => return Err(ProbationError::Timeout(timeout)),
        };
        if let Some(fallback) = &fallback {
            log::warn!("{candidate} runs on tract: {fallback}");
        }
        let drift = model_drift(profile, &model).map_err(ProbationError::Drift)?;
        Ok(ActiveModel {
            name: candidate.name.clone(),
            version: candidate.version,
            manifest_sha256: Sha256(candidate.manifest_sha256),
            model,
            drift,
            runtime_fallback: fallback,
        })
    }
}
