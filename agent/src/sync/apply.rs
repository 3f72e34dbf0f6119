//! Acting on the device's verdict on a check-in answer ([`check::decide`]): save a rotated
//! root, ratchet what has been seen, report refusals, and hand each plan's manifests on to
//! activation and shadowing of its model.

use outpost_protocol::trust::{is_retirement, Slot};
use outpost_protocol::{Arch, VerifiedManifest};

use crate::agent_version;
use crate::check::{self, Documents, PlanVerdict, Refusal, Trust, Verdict};
use crate::state::ReportKind;

use super::{to_ref, Answer, PlanDocuments, Syncer};

impl Syncer {
    fn trust(&self, model: Option<usize>) -> Trust<'_> {
        let model = model.map(|index| &self.state.models[index]);
        Trust {
            root: &self.root,
            highest_plan: model.and_then(|model| model.highest_plan),
            plan_digest: model
                .and_then(|model| model.plan_digest)
                .map(outpost_protocol::Sha256),
            signed_since: self.state.signed_since,
            highest_manifest: &self.state.highest_manifest,
            committed: &self.state.committed,
            labels: &self.config.labels,
            arch: Arch::current(),
            agent: agent_version(),
        }
    }

    /// Acts on the device's verdict ([`check::decide`]) on a check-in answer: walks and saves
    /// newer roots, then judges each model's plan against that model's floors, and activates or
    /// shadows what it allows. A model no plan is answered for keeps running as it is; only its
    /// shadow run stops.
    pub(super) fn apply(&mut self, answer: Answer) {
        if !answer.roots.is_empty() && !self.apply_roots(&answer.roots) {
            return;
        }
        let mut answered = Vec::with_capacity(answer.plans.len());
        for documents in &answer.plans {
            answered.extend(self.apply_plan(documents));
        }
        let unanswered: Vec<String> = self
            .state
            .models
            .iter()
            .map(|model| model.name.clone())
            .filter(|name| !answered.contains(name))
            .collect();
        for name in unanswered {
            self.stop_shadow(
                &name,
                "no plan of this model applies to this device any more",
            );
        }
    }

    /// Walks newer roots; false when one was refused (and reported), and nothing else in the
    /// answer is judged.
    fn apply_roots(&mut self, roots: &[Vec<u8>]) -> bool {
        let documents = Documents {
            roots,
            ..Documents::default()
        };
        let (root, recovery) = match check::decide(&documents, &self.trust(None), &self.floor()) {
            Verdict::RootRefused(refusal) => {
                let digest = outpost_protocol::sha256(roots.concat().as_slice()).0;
                self.refuse(None, None, digest, refusal.to_string());
                return false;
            }
            Verdict::Judged { rotated: None, .. } => return true,
            Verdict::Judged {
                rotated: Some(root),
                recovery,
                ..
            } => (root, recovery),
        };
        if recovery {
            // The floors go first: a crash between the two saves must not leave the new root
            // trusted with the revoked keys' floors, which would refuse every plan the new keys
            // sign. Reset without the new root, they would only be reset again.
            self.state.recover(root.body().created);
            if let Err(error) = self.files.save(&self.state) {
                log::error!("saving the floors reset by a recovery: {error:#}");
                return false;
            }
        }
        if let Err(error) = self.files.save_root(root.signed_bytes()) {
            log::error!("saving the rotated root: {error:#}");
            return false;
        }
        if recovery {
            log::warn!(
                "trust root rotated to version {}, revoking keys of version {}: plan, manifest \
                 and commit floors reset, only plans signed since count",
                root.version(),
                self.root.version()
            );
        } else {
            log::info!("trust root rotated to version {}", root.version());
        }
        self.root = root;
        true
    }

    /// Judges one model's plan against the floors of the model it claims, and acts on it. The
    /// name of the model it moves, when the plan was accepted or refused after it was known.
    fn apply_plan(&mut self, documents: &PlanDocuments) -> Option<String> {
        if is_retirement(&documents.plan) {
            return self.apply_retire(&documents.plan);
        }
        let claimed = check::claimed_plan_model(&documents.plan);
        let known = claimed.as_deref().and_then(|name| {
            self.state
                .models
                .iter()
                .position(|model| model.name == name)
        });
        let offered = Documents {
            roots: &[],
            plan: Some(&documents.plan),
            manifest: documents.manifest.as_ref().map(|(_, bytes)| &bytes[..]),
            shadow: documents.shadow.as_deref(),
        };
        let verdict = match check::decide(&offered, &self.trust(known), &self.floor()) {
            Verdict::Judged { plan, .. } => plan,
            // No roots were offered with the plan.
            Verdict::RootRefused(_) => return None,
        };
        let (plan, manifest, shadow) = match verdict {
            // A plan was offered, so there is one to judge.
            PlanVerdict::NoPlan { .. } => return None,
            PlanVerdict::Refused(refusal) => {
                let digest = outpost_protocol::sha256(&documents.plan).0;
                self.refuse(None, None, digest, refusal.to_string());
                if let Some(name) = &claimed {
                    self.stop_shadow(name, "the hub's plan was refused");
                }
                return claimed;
            }
            PlanVerdict::Accepted {
                plan,
                manifest,
                shadow,
                ..
            } => (plan, manifest, shadow),
        };
        let name = plan.body().target.name.clone();
        let model = self.state.model_index(&name);
        let sequence = plan.sequence();
        self.state.models[model].note_plan(sequence, plan.digest().0);
        // The plan's creation is now a signed time seen: its manifests are judged against it,
        // in this answer as in every later one.
        self.state.newest_signed = self.state.newest_signed.max(plan.body().created);
        if let (Some((_, bytes)), Some(verdict)) = (&documents.manifest, manifest) {
            self.apply_manifest(model, sequence, bytes, verdict);
        }
        match (&documents.shadow, shadow) {
            (Some(bytes), Some(verdict)) => self.apply_shadow(model, sequence, bytes, verdict),
            _ => self.stop_shadow(
                &name,
                "the plan no longer has this device shadow its target",
            ),
        }
        Some(name)
    }

    /// Judges a model's signed retirement against that model's floors and, accepted, stops
    /// serving the model and removes its versions. Its floors stay, raised to the retirement's
    /// sequence, so only a later plan of the model brings it back. The name of the model, when
    /// known.
    fn apply_retire(&mut self, bytes: &[u8]) -> Option<String> {
        let claimed = check::claimed_plan_model(bytes);
        let known = claimed.as_deref().and_then(|name| {
            self.state
                .models
                .iter()
                .position(|model| model.name == name)
        });
        let retire = match check::decide_retire(bytes, &self.trust(known), &self.floor()) {
            Ok(retire) => retire,
            Err(refusal) => {
                let digest = outpost_protocol::sha256(bytes).0;
                self.refuse(None, None, digest, refusal.to_string());
                return claimed;
            }
        };
        let name = retire.body().model.clone();
        let model = self.state.model_index(&name);
        self.state.models[model].note_plan(retire.sequence(), retire.digest().0);
        self.state.newest_signed = self.state.newest_signed.max(retire.body().created);
        let state = &self.state.models[model];
        if state.active.is_none() && state.previous.is_empty() && state.pending.is_none() {
            // Retired already, or never served here.
            self.stop_shadow(&name, "the model is retired");
            return Some(name);
        }
        self.stop_shadow(&name, "the model is retired");
        let state = &mut self.state.models[model];
        state.active = None;
        state.previous.clear();
        state.pending = None;
        state.committed_report = None;
        // The state goes to disk before any file is removed: a restart must not look for them.
        if let Err(error) = self.files.save(&self.state) {
            log::error!("saving the retirement of {name}: {error:#}");
            return Some(name);
        }
        self.slot.remove(&name);
        if let Err(error) = self.remove_unkept_versions() {
            log::warn!("removing the versions of {name}: {error:#}");
        }
        log::info!(
            "retired {name} under retirement {}: no longer served, its versions removed",
            retire.sequence()
        );
        self.write_status();
        Some(name)
    }

    /// Reports a refused manifest: as the version it claims when it was verified and refused
    /// only as one this device cannot run.
    pub(super) fn refuse_manifest(&mut self, sequence: u64, digest: [u8; 32], refusal: &Refusal) {
        let candidate = refusal.verified_manifest().map(to_ref);
        self.refuse(Some(sequence), candidate, digest, refusal.to_string());
    }

    /// Unless it runs already, activates the manifest the hub says to serve as `model`, once
    /// verified and within the device's budget.
    pub(super) fn apply_manifest(
        &mut self,
        model: usize,
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
        if self.state.models[model]
            .active
            .as_ref()
            .is_some_and(|active| active.manifest_sha256 == digest)
        {
            // Running already, it counts as committed under this plan too.
            self.state
                .note_commit(&candidate.name, candidate.version, sequence);
            if self.state.models[model].committed_report != Some((sequence, digest)) {
                self.state.models[model].committed_report = Some((sequence, digest));
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
        if let Err(reason) = self.within_budget(model, &manifest) {
            self.refuse(Some(sequence), Some(candidate), digest, reason);
            return;
        }
        log::info!("activating {candidate} ({slot:?} of plan {sequence})");
        self.activate(model, sequence, candidate, &manifest);
    }

    /// Whether serving `manifest` as `model` keeps the device within its budget: how many models
    /// it serves, and their model files together, the candidate's counted in place of the
    /// version it replaces. The refusal names the budget and the figures.
    fn within_budget(&self, model: usize, manifest: &VerifiedManifest) -> Result<(), String> {
        let others: Vec<&crate::state::VersionRef> = self
            .state
            .models
            .iter()
            .enumerate()
            .filter(|(index, _)| *index != model)
            .filter_map(|(_, other)| other.active.as_ref())
            .collect();
        let candidate = to_ref(manifest);
        if self.state.models[model].active.is_none() && others.len() >= self.config.max_models {
            return Err(format!(
                "{candidate} would be model {} on this device, over its models.max_models of {}",
                others.len() + 1,
                self.config.max_models
            ));
        }
        let size = manifest
            .artifact(outpost_protocol::trust::ArtifactRole::Model)
            .map_or(0, |artifact| artifact.length);
        let served: u64 = others
            .iter()
            .map(|version| self.versions.model_size(&version.manifest_sha256))
            .sum();
        if served.saturating_add(size) > self.config.max_memory {
            return Err(format!(
                "{candidate}'s model is {size} bytes; with the {served} bytes of the other models \
                 served it is over this device's models.max_memory of {}",
                self.config.max_memory
            ));
        }
        Ok(())
    }
}
