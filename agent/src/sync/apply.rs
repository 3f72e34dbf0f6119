//! Acting on the device's verdict on a check-in answer ([`check::decide`]): save a rotated
//! root, ratchet what has been seen, report refusals, and hand the plan's manifests on to
//! activation and shadowing.

use outpost_protocol::device::CheckInResponse;
use outpost_protocol::trust::Slot;
use outpost_protocol::{Arch, VerifiedManifest};

use crate::agent_version;
use crate::check::{self, Documents, PlanVerdict, Refusal, Trust, Verdict};
use crate::state::ReportKind;

use super::{to_ref, Syncer};

impl Syncer {
    /// Acts on the device's verdict ([`check::decide`]) on the documents of a check-in answer:
    /// saves a rotated root, ratchets what it has seen, reports refusals, and activates or
    /// shadows what the plan allows.
    pub(super) fn apply(&mut self, response: CheckInResponse) {
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
            plan_digest: self.state.plan_digest.map(outpost_protocol::Sha256),
            signed_since: self.state.signed_since,
            highest_manifest: &self.state.highest_manifest,
            committed: &self.state.committed,
            labels: &self.config.labels,
            arch: Arch::current(),
            agent: agent_version(),
        };
        let (rotated, plan) = match check::decide(&documents, &trust, &self.floor()) {
            Verdict::RootRefused(refusal) => {
                let digest = outpost_protocol::sha256(roots.concat().as_slice()).0;
                self.refuse(None, None, digest, refusal.to_string());
                return;
            }
            Verdict::Judged {
                rotated,
                recovery,
                plan,
            } => (rotated.map(|root| (root, recovery)), plan),
        };
        if let Some((root, recovery)) = rotated {
            if recovery {
                // The floors go first: a crash between the two saves must not leave the new
                // root trusted with the revoked keys' floors, which would refuse every plan the
                // new keys sign. Reset without the new root, they would only be reset again.
                self.state.recover(root.body().created);
                if let Err(error) = self.files.save(&self.state) {
                    log::error!("saving the floors reset by a recovery: {error:#}");
                    return;
                }
            }
            if let Err(error) = self.files.save_root(root.signed_bytes()) {
                log::error!("saving the rotated root: {error:#}");
                return;
            }
            if recovery {
                log::warn!(
                    "trust root rotated to version {}, revoking keys of version {}: plan, \
                     manifest and commit floors reset, only plans signed since count",
                    root.version(),
                    self.root.version()
                );
            } else {
                log::info!("trust root rotated to version {}", root.version());
            }
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
        self.state.note_plan(sequence, plan.digest().0);
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
    pub(super) fn refuse_manifest(&mut self, sequence: u64, digest: [u8; 32], refusal: &Refusal) {
        let candidate = refusal.verified_manifest().map(to_ref);
        self.refuse(Some(sequence), candidate, digest, refusal.to_string());
    }

    /// Unless it runs already, activates the manifest the hub says to serve, once verified.
    pub(super) fn apply_manifest(
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
            // Running already, it counts as committed under this plan too.
            self.state
                .note_commit(&candidate.name, candidate.version, sequence);
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
}
