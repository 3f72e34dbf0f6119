//! Shadow handling: a verified shadow manifest is installed and validated like a candidate,
//! then handed to the shadow runner, never activated; taken off it when a plan stops asking.

use std::sync::Arc;

use outpost_protocol::device::AgentState;
use outpost_protocol::VerifiedManifest;

use crate::check::Refusal;
use crate::state::{DeviceState, ReportKind, ShadowMarker};

use super::{to_ref, Syncer};

impl Syncer {
    /// Unless it runs in shadow already, or failed here before, downloads, installs and
    /// validates the verified shadow manifest exactly as for an activation, then hands it to the
    /// shadow runner. The active model keeps serving throughout.
    pub(super) fn apply_shadow(
        &mut self,
        model: usize,
        sequence: u64,
        manifest_bytes: &[u8],
        verdict: Result<VerifiedManifest, Refusal>,
    ) {
        let digest = outpost_protocol::sha256(manifest_bytes).0;
        let name = self.state.models[model].name.clone();
        if self
            .shadow
            .current(&name)
            .is_some_and(|running| running.manifest_sha256.0 == digest)
        {
            return;
        }
        if self.state.failed.contains(&digest) || self.state.refused.contains(&digest) {
            self.stop_shadow(&name, "the new shadow model failed or was refused here");
            return;
        }
        let manifest = match verdict {
            Ok(manifest) => manifest,
            Err(refusal) => {
                self.stop_shadow(
                    &name,
                    match refusal {
                        Refusal::Unverified { .. } => "the hub's shadow manifest was refused",
                        _ => "the new shadow model cannot run here",
                    },
                );
                self.refuse_manifest(sequence, digest, &refusal);
                return;
            }
        };
        let candidate = to_ref(&manifest);
        if self.state.models[model].active.is_none() {
            // Nothing serves, so there is nothing to compare with.
            return;
        }
        if !self.install(sequence, &candidate, &manifest) {
            return;
        }
        self.agent_state = AgentState::Steady;
        // The marker goes to disk before the model is loaded: from here on, an agent killed by
        // the model finds it at start (see `Syncer::start`).
        let unclean_ends = self.state.models[model]
            .shadow
            .as_ref()
            .filter(|marker| marker.candidate.manifest_sha256 == digest)
            .map_or(0, |marker| marker.unclean_ends);
        self.state.models[model].shadow = Some(ShadowMarker {
            candidate: candidate.clone(),
            plan_sequence: sequence,
            unclean_ends,
        });
        if let Err(error) = self.files.save(&self.state) {
            // Without the marker a model that kills the agent would do so at every start.
            log::error!("saving the shadow marker: {error:#}; {candidate} does not run in shadow");
            self.state.models[model].shadow = None;
            return;
        }
        match self.probation(&candidate) {
            Ok(loaded) => {
                log::info!("running {candidate} in shadow (plan {sequence})");
                if let Some(replaced) = self.shadow.set(&name, Some(Arc::new(loaded))) {
                    log::info!(
                        "stopped running {}@{} in shadow: another shadow model replaces it",
                        replaced.name,
                        replaced.version
                    );
                }
                self.queue(
                    Some(sequence),
                    Some(candidate),
                    ReportKind::Shadowing,
                    String::new(),
                );
            }
            Err(reason) => {
                log::warn!("{candidate} failed as a shadow model: {reason}");
                self.stop_shadow(&name, "the new shadow model failed");
                DeviceState::remember(&mut self.state.failed, digest);
                let reason = format!("shadow: {reason}");
                self.queue(Some(sequence), Some(candidate), ReportKind::Failed, reason);
            }
        }
    }

    /// Takes model `name`'s shadow version, if any, off the shadow runner, and its marker off the
    /// disk at the next save.
    pub(super) fn stop_shadow(&mut self, name: &str, why: &str) {
        if let Some(model) = self
            .state
            .models
            .iter_mut()
            .find(|model| model.name == name)
        {
            model.shadow = None;
        }
        if let Some(stopped) = self.shadow.set(name, None) {
            log::info!(
                "stopped running {}@{} in shadow: {why}",
                stopped.name,
                stopped.version
            );
        }
    }
}
