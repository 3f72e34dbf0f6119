//! The device's one decision on signed documents: given the documents a hub offers, what the
//! device trusts and has seen, and the time floor, which of them it accepts and why it refuses
//! the others. Pure: no I/O, no clock. The sync loop acts on its verdict, and
//! `outpost-agent verify` prints it, so the order of verification is written once.

use outpost_protocol::name::{selector_matches, Label};
use outpost_protocol::trust::{
    is_retirement, ManifestBody, PlanBody, RetireBody, Signed, Slot, VerifiedRetire,
};
use outpost_protocol::{
    AgentVersion, Arch, Sha256, TimeFloor, VerifiedManifest, VerifiedPlan, VerifiedRoot,
    VerifyError,
};

use crate::state::Committed;

/// The documents a hub offers a device, as raw bytes.
#[derive(Debug, Default, Clone, Copy)]
pub struct Documents<'a> {
    /// Newer roots, in version order; may be empty.
    pub roots: &'a [Vec<u8>],
    pub plan: Option<&'a [u8]>,
    /// The manifest the plan says to serve (or, with no plan, one judged alone).
    pub manifest: Option<&'a [u8]>,
    /// The manifest the plan says to run in shadow.
    pub shadow: Option<&'a [u8]>,
}

/// What the device trusts and has seen: its trust state.
#[derive(Debug, Clone, Copy)]
pub struct Trust<'a> {
    pub root: &'a VerifiedRoot,
    pub highest_plan: Option<u64>,
    /// The digest of the plan accepted at `highest_plan`, when known: another plan at that
    /// sequence is refused.
    pub plan_digest: Option<Sha256>,
    /// Plans created before this time are refused: the creation of the root whose rotation last
    /// revoked keys (0 before any).
    pub signed_since: u64,
    /// The highest version seen per model name: the rollback floor of a target.
    pub highest_manifest: &'a [(String, u64)],
    /// What the device committed under which plan: the floor of a plan's fallback.
    pub committed: &'a [Committed],
    /// The device's own labels (agent.toml `labels`): a plan is for this device only if its
    /// signed selector is among them. Labels the hub gives a device do not count.
    pub labels: &'a [Label],
    /// The device's architecture, if Outpost supports it.
    pub arch: Option<Arch>,
    pub agent: AgentVersion,
}

/// Which document a refusal is about; it opens the refusal's message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Document {
    Root,
    Plan,
    Manifest,
    ShadowManifest,
    Retirement,
}

impl Document {
    fn label(self) -> &'static str {
        match self {
            Document::Root => "root rotation",
            Document::Plan => "plan",
            Document::Manifest => "manifest",
            Document::ShadowManifest => "shadow manifest",
            Document::Retirement => "retirement",
        }
    }
}

/// Why the device refuses a document. The message is what the device reports to the hub.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// The chain of trust refused the document.
    #[error("{}: {source}", .document.label())]
    Unverified {
        document: Document,
        source: VerifyError,
    },
    /// A verified manifest this device cannot run (architecture, agent version).
    #[error("{}: {source}", .document.label())]
    Incompatible {
        document: Document,
        manifest: Box<VerifiedManifest>,
        source: VerifyError,
    },
    /// A verified manifest, on a CPU architecture Outpost does not support.
    #[error("this CPU architecture is not supported")]
    UnsupportedArch {
        document: Document,
        manifest: Box<VerifiedManifest>,
    },
    /// A verified plan whose signed selector is not among the device's own labels: signed for
    /// other devices, whatever labels the hub gives this one.
    #[error(
        "plan: plan {sequence} is signed for devices labelled {}; this device's own labels \
         (agent.toml `labels`) are {}",
        list(selector),
        list(labels)
    )]
    NotForThisDevice {
        sequence: u64,
        selector: Vec<Label>,
        labels: Vec<Label>,
    },
    /// A plan's verified fallback below a version the device committed under an earlier plan.
    #[error(
        "manifest: fallback {name} version {version} of plan {sequence} is below version \
         {committed}, committed here under an earlier plan"
    )]
    BelowCommitted {
        name: String,
        version: u64,
        sequence: u64,
        committed: u64,
    },
    /// A verified plan at the sequence of the plan the device accepted last, with other bytes:
    /// two plans signed with one sequence must not let the hub choose between them.
    #[error("plan: plan {sequence} differs from the plan {sequence} this device accepted")]
    PlanConflict { sequence: u64 },
    /// A verified plan created before the rotation that last revoked keys: the device's floors
    /// were reset by that recovery, and only plans signed since count.
    #[error(
        "plan: plan {sequence} was created at {created}, before the trust root that revoked \
         keys at {since}; sign a new plan"
    )]
    SignedBeforeRecovery {
        sequence: u64,
        created: u64,
        since: u64,
    },
}

/// Labels as `k=v,k=v`, or `none`.
fn list(labels: &[Label]) -> String {
    if labels.is_empty() {
        return "none".to_owned();
    }
    labels
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(",")
}

impl Refusal {
    /// The manifest refused, when it was verified and refused only as incompatible.
    pub fn verified_manifest(&self) -> Option<&VerifiedManifest> {
        match self {
            Refusal::Unverified { .. }
            | Refusal::NotForThisDevice { .. }
            | Refusal::BelowCommitted { .. }
            | Refusal::PlanConflict { .. }
            | Refusal::SignedBeforeRecovery { .. } => None,
            Refusal::Incompatible { manifest, .. } | Refusal::UnsupportedArch { manifest, .. } => {
                Some(manifest)
            }
        }
    }

    /// The chain-of-trust or compatibility error, if there is one.
    pub fn verify_error(&self) -> Option<&VerifyError> {
        match self {
            Refusal::Unverified { source, .. } | Refusal::Incompatible { source, .. } => {
                Some(source)
            }
            Refusal::UnsupportedArch { .. }
            | Refusal::NotForThisDevice { .. }
            | Refusal::BelowCommitted { .. }
            | Refusal::PlanConflict { .. }
            | Refusal::SignedBeforeRecovery { .. } => None,
        }
    }
}

/// What the device makes of an offer.
// Built once per check-in and taken apart at once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Verdict {
    /// A newer root in the chain was refused; nothing else is judged.
    RootRefused(Refusal),
    /// The roots (if any) are accepted; `rotated` is the new trusted root when the chain moved
    /// it forward.
    Judged {
        rotated: Option<VerifiedRoot>,
        /// The rotation revoked keys: the plan was judged with the device's floors reset (no
        /// plan, manifest or commit seen; the new root's creation as the newest signed time),
        /// and the device must reset them too.
        recovery: bool,
        plan: PlanVerdict,
    },
}

/// The verdict on the plan and the manifests under it.
// Built once per check-in and taken apart at once: boxing the large variant buys nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum PlanVerdict {
    /// No plan was offered. A manifest offered alone is judged on its own.
    NoPlan {
        manifest: Option<Result<VerifiedManifest, Refusal>>,
    },
    Refused(Refusal),
    Accepted {
        plan: VerifiedPlan,
        /// The time floor the plan's manifests were judged against: the plan's creation counts
        /// as a signed time seen.
        floor: TimeFloor,
        manifest: Option<Result<(Slot, VerifiedManifest), Refusal>>,
        shadow: Option<Result<VerifiedManifest, Refusal>>,
    },
}

/// The name a manifest claims, read only to pick its rollback floor; verification checks
/// everything else.
fn claimed_name(manifest_bytes: &[u8]) -> String {
    outpost_protocol::decode::<Signed<ManifestBody>>(manifest_bytes)
        .ok()
        .and_then(|signed| signed.decode_unverified().ok())
        .map(|body| body.name)
        .unwrap_or_default()
}

/// The model a plan claims to move (its target's name), read only to pick that model's plan
/// floor; verification checks everything else, and the verified plan names the same model, as it
/// is read from the same bytes.
pub fn claimed_plan_model(plan_bytes: &[u8]) -> Option<String> {
    if is_retirement(plan_bytes) {
        return outpost_protocol::decode::<Signed<RetireBody>>(plan_bytes)
            .ok()
            .and_then(|signed| signed.decode_unverified().ok())
            .map(|body| body.model);
    }
    outpost_protocol::decode::<Signed<PlanBody>>(plan_bytes)
        .ok()
        .and_then(|signed| signed.decode_unverified().ok())
        .map(|body| body.target.name)
}

/// Judges a model's signed retirement as a plan of that model is judged: verified by the plan
/// keys, not below the highest plan of its model accepted (`trust` holds that model's floors),
/// not another document at that plan's sequence, signed since the last recovery, and for this
/// device's own labels.
pub fn decide_retire(
    bytes: &[u8],
    trust: &Trust<'_>,
    floor: &TimeFloor,
) -> Result<VerifiedRetire, Refusal> {
    let retire = trust
        .root
        .verify_retire(bytes, floor, trust.highest_plan)
        .map_err(|source| Refusal::Unverified {
            document: Document::Retirement,
            source,
        })?;
    let body = retire.body();
    if body.created < trust.signed_since {
        return Err(Refusal::SignedBeforeRecovery {
            sequence: body.sequence,
            created: body.created,
            since: trust.signed_since,
        });
    }
    if trust.highest_plan == Some(body.sequence)
        && trust
            .plan_digest
            .is_some_and(|digest| digest != retire.digest())
    {
        return Err(Refusal::PlanConflict {
            sequence: body.sequence,
        });
    }
    if !selector_matches(&body.selector, trust.labels) {
        return Err(Refusal::NotForThisDevice {
            sequence: body.sequence,
            selector: body.selector.clone(),
            labels: trust.labels.to_vec(),
        });
    }
    Ok(retire)
}

fn highest(seen: &[(String, u64)], name: &str) -> Option<u64> {
    seen.iter()
        .find(|(known, _)| known == name)
        .map(|(_, version)| *version)
}

/// Refuses a verified manifest this device cannot run.
fn compatible(
    document: Document,
    manifest: VerifiedManifest,
    trust: &Trust<'_>,
) -> Result<VerifiedManifest, Refusal> {
    let Some(arch) = trust.arch else {
        return Err(Refusal::UnsupportedArch {
            document,
            manifest: Box::new(manifest),
        });
    };
    match manifest.check_compatible(arch, trust.agent) {
        Ok(()) => Ok(manifest),
        Err(source) => Err(Refusal::Incompatible {
            document,
            manifest: Box::new(manifest),
            source,
        }),
    }
}

/// Applies the chain of trust in order: walk the roots, verify the plan and that its selector is
/// among the device's own labels, then the manifest the plan says to serve and the one it says to
/// run in shadow (each against the plan's creation as a signed time seen, each target against the
/// highest version of its name seen, the served manifest's included, and a fallback against what
/// the device committed under earlier plans), then compatibility. With no plan, a manifest is
/// judged alone.
pub fn decide(documents: &Documents<'_>, trust: &Trust<'_>, floor: &TimeFloor) -> Verdict {
    let rotated = if documents.roots.is_empty() {
        None
    } else {
        match trust.root.update(documents.roots, floor) {
            Ok(root) if root.version() > trust.root.version() => Some(root),
            Ok(_) => None,
            Err(source) => {
                return Verdict::RootRefused(Refusal::Unverified {
                    document: Document::Root,
                    source,
                })
            }
        }
    };
    let root = rotated.as_ref().unwrap_or(trust.root);
    let recovery = root.revokes_keys_of(trust.root);
    let plan = if recovery {
        let since = root.body().created;
        let trust = Trust {
            highest_plan: None,
            plan_digest: None,
            signed_since: since,
            highest_manifest: &[],
            committed: &[],
            ..*trust
        };
        let floor = TimeFloor {
            newest_signed: since,
            ..*floor
        };
        judge_plan(root, documents, &trust, &floor)
    } else {
        judge_plan(root, documents, trust, floor)
    };
    Verdict::Judged {
        rotated,
        recovery,
        plan,
    }
}

fn judge_plan(
    root: &VerifiedRoot,
    documents: &Documents<'_>,
    trust: &Trust<'_>,
    floor: &TimeFloor,
) -> PlanVerdict {
    let Some(plan_bytes) = documents.plan else {
        let manifest = documents.manifest.map(|bytes| {
            let highest = highest(trust.highest_manifest, &claimed_name(bytes));
            root.verify_manifest(bytes, floor, highest)
                .map_err(|source| Refusal::Unverified {
                    document: Document::Manifest,
                    source,
                })
                .and_then(|manifest| compatible(Document::Manifest, manifest, trust))
        });
        return PlanVerdict::NoPlan { manifest };
    };
    let plan = match root.verify_plan(plan_bytes, floor, trust.highest_plan) {
        Ok(plan) => plan,
        Err(source) => {
            return PlanVerdict::Refused(Refusal::Unverified {
                document: Document::Plan,
                source,
            })
        }
    };
    if plan.body().created < trust.signed_since {
        return PlanVerdict::Refused(Refusal::SignedBeforeRecovery {
            sequence: plan.sequence(),
            created: plan.body().created,
            since: trust.signed_since,
        });
    }
    if trust.highest_plan == Some(plan.sequence())
        && trust
            .plan_digest
            .is_some_and(|digest| digest != plan.digest())
    {
        return PlanVerdict::Refused(Refusal::PlanConflict {
            sequence: plan.sequence(),
        });
    }
    if !selector_matches(&plan.body().selector, trust.labels) {
        return PlanVerdict::Refused(Refusal::NotForThisDevice {
            sequence: plan.sequence(),
            selector: plan.body().selector.clone(),
            labels: trust.labels.to_vec(),
        });
    }
    let floor = TimeFloor {
        newest_signed: floor.newest_signed.max(plan.body().created),
        ..*floor
    };
    let mut seen = trust.highest_manifest.to_vec();
    let manifest = documents.manifest.map(|bytes| {
        let highest = highest(&seen, &claimed_name(bytes));
        let (slot, manifest) =
            plan.verify_manifest(root, bytes, &floor, highest)
                .map_err(|source| Refusal::Unverified {
                    document: Document::Manifest,
                    source,
                })?;
        if slot == Slot::Fallback {
            below_committed(&manifest, plan.sequence(), trust.committed)?;
        }
        let manifest = compatible(Document::Manifest, manifest, trust)?;
        // An accepted manifest's version is seen: the shadow target is judged against it.
        let name = manifest.name().as_str();
        match seen.iter_mut().find(|(known, _)| known == name) {
            Some((_, version)) => *version = (*version).max(manifest.version()),
            None => seen.push((name.to_owned(), manifest.version())),
        }
        Ok((slot, manifest))
    });
    let shadow = documents.shadow.map(|bytes| {
        let highest = highest(&seen, &claimed_name(bytes));
        let manifest = plan
            .verify_shadow_manifest(root, bytes, &floor, highest)
            .map_err(|source| Refusal::Unverified {
                document: Document::ShadowManifest,
                source,
            })?;
        compatible(Document::ShadowManifest, manifest, trust)
    });
    PlanVerdict::Accepted {
        plan,
        floor,
        manifest,
        shadow,
    }
}

/// Refuses a plan's fallback below a version of its model committed under an earlier plan.
fn below_committed(
    manifest: &VerifiedManifest,
    sequence: u64,
    committed: &[Committed],
) -> Result<(), Refusal> {
    let name = manifest.name().as_str();
    let floor = committed
        .iter()
        .find(|known| known.name == name)
        .and_then(|known| known.before(sequence));
    match floor {
        Some(committed) if manifest.version() < committed => Err(Refusal::BelowCommitted {
            name: name.to_owned(),
            version: manifest.version(),
            sequence,
            committed,
        }),
        _ => Ok(()),
    }
}

/// What `outpost-agent verify` reports a device would accept.
#[derive(Debug)]
pub struct Accepted {
    pub root: VerifiedRoot,
    pub plan: Option<VerifiedPlan>,
    pub manifest: Option<(Option<Slot>, VerifiedManifest)>,
}

/// The documents `outpost-agent verify` is given, as raw bytes.
#[derive(Debug, Default)]
pub struct Offered<'a> {
    pub roots: Vec<Vec<u8>>,
    pub plan: Option<&'a [u8]>,
    pub manifest: Option<&'a [u8]>,
}

/// What `outpost-agent verify` is told the device trusts and has seen.
#[derive(Debug)]
pub struct DeviceView<'a> {
    pub trusted_root: &'a [u8],
    pub floor: TimeFloor,
    pub highest_plan: Option<u64>,
    /// The highest version seen of whatever model the offered manifest names.
    pub highest_manifest: Option<u64>,
    /// The highest version of that model the device committed under a plan before the offered
    /// one: a fallback below it is refused.
    pub committed_before: Option<u64>,
    /// The device's own labels (agent.toml `labels`).
    pub labels: &'a [Label],
    pub arch: Arch,
    pub agent: AgentVersion,
}

/// The offline answer to "would this device accept these files?": [`decide`] on them, its first
/// refusal as the error.
pub fn check(view: &DeviceView<'_>, offered: &Offered<'_>) -> Result<Accepted, CheckError> {
    let trusted = VerifiedRoot::load_trusted(view.trusted_root)?;
    let highest_manifest: Vec<(String, u64)> = match (offered.manifest, view.highest_manifest) {
        (Some(bytes), Some(version)) => vec![(claimed_name(bytes), version)],
        _ => Vec::new(),
    };
    // Committed under plan 0, before any plan: below every offered plan.
    let committed: Vec<Committed> = match (offered.manifest, view.committed_before) {
        (Some(bytes), Some(version)) => vec![Committed {
            name: claimed_name(bytes),
            plan: 0,
            version,
            earlier: None,
        }],
        _ => Vec::new(),
    };
    let trust = Trust {
        root: &trusted,
        highest_plan: view.highest_plan,
        plan_digest: None,
        signed_since: 0,
        highest_manifest: &highest_manifest,
        committed: &committed,
        labels: view.labels,
        arch: Some(view.arch),
        agent: view.agent,
    };
    let documents = Documents {
        roots: &offered.roots,
        plan: offered.plan,
        manifest: offered.manifest,
        shadow: None,
    };
    let (rotated, plan) = match decide(&documents, &trust, &view.floor) {
        Verdict::RootRefused(refusal) => return Err(refusal.into()),
        Verdict::Judged { rotated, plan, .. } => (rotated, plan),
    };
    let (plan, manifest) = match plan {
        PlanVerdict::NoPlan { manifest } => (None, manifest.transpose()?.map(|m| (None, m))),
        PlanVerdict::Refused(refusal) => return Err(refusal.into()),
        PlanVerdict::Accepted { plan, manifest, .. } => (
            Some(plan),
            manifest.transpose()?.map(|(slot, m)| (Some(slot), m)),
        ),
    };
    Ok(Accepted {
        root: rotated.unwrap_or(trusted),
        plan,
        manifest,
    })
}

/// Why `outpost-agent verify` says a device would refuse.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error(transparent)]
    Verify(#[from] VerifyError),
    #[error("this CPU architecture is not supported")]
    UnsupportedArch,
    /// Signed for other devices, a fallback below what the device committed, or a plan its
    /// floors refuse.
    #[error(transparent)]
    NotForThisDevice(Refusal),
}

impl From<Refusal> for CheckError {
    fn from(refusal: Refusal) -> CheckError {
        match refusal {
            Refusal::Unverified { source, .. } | Refusal::Incompatible { source, .. } => {
                CheckError::Verify(source)
            }
            Refusal::UnsupportedArch { .. } => CheckError::UnsupportedArch,
            Refusal::NotForThisDevice { .. }
            | Refusal::BelowCommitted { .. }
            | Refusal::PlanConflict { .. }
            | Refusal::SignedBeforeRecovery { .. } => CheckError::NotForThisDevice(refusal),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use outpost_protocol::trust::Role;

    use super::*;

    fn fixture(file: &str) -> Vec<u8> {
        let path: PathBuf = [
            env!("CARGO_MANIFEST_DIR"),
            "../protocol/tests/data/time_floor",
            file,
        ]
        .iter()
        .collect();
        std::fs::read(&path).unwrap_or_else(|error| panic!("{}: {error}", path.display()))
    }

    /// protocol/tests/data/time_floor: a device whose clock was reset to 1970 is offered a plan
    /// and, under it, a manifest that expired before the plan was created.
    #[test]
    fn a_manifest_is_judged_against_the_creation_of_the_plan_offered_with_it() {
        let root = fixture("root.bin");
        let (plan, manifest) = (fixture("plan.bin"), fixture("manifest.bin"));
        let view = DeviceView {
            trusted_root: &root,
            floor: TimeFloor::default(),
            highest_plan: None,
            highest_manifest: None,
            committed_before: None,
            labels: &[],
            arch: Arch::X86_64,
            agent: AgentVersion {
                major: 1,
                minor: 0,
                patch: 0,
            },
        };
        let offered = Offered {
            roots: Vec::new(),
            plan: Some(&plan),
            manifest: Some(&manifest),
        };
        let error = check(&view, &offered).expect_err("the manifest expired before the plan");
        let created = VerifiedRoot::load_trusted(&root)
            .and_then(|root| root.verify_plan(&plan, &TimeFloor::default(), None))
            .expect("the plan alone is valid")
            .body()
            .created;
        assert!(
            matches!(
                error,
                CheckError::Verify(VerifyError::Expired { role: Role::Manifest, now, .. })
                    if now == created
            ),
            "{error:?}"
        );
    }

    fn trust(root: &VerifiedRoot, highest_plan: Option<u64>) -> Trust<'_> {
        Trust {
            root,
            highest_plan,
            plan_digest: None,
            signed_since: 0,
            highest_manifest: &[],
            committed: &[],
            labels: &[],
            arch: Some(Arch::X86_64),
            agent: AgentVersion {
                major: 1,
                minor: 0,
                patch: 0,
            },
        }
    }

    /// The refusal the agent reports names the document and carries the exact chain-of-trust
    /// error, and a refused manifest under an accepted plan leaves the plan accepted.
    #[test]
    fn the_verdict_accepts_the_plan_and_refuses_its_expired_manifest() {
        let root = VerifiedRoot::load_trusted(&fixture("root.bin")).expect("the root is valid");
        let (plan, manifest) = (fixture("plan.bin"), fixture("manifest.bin"));
        let documents = Documents {
            roots: &[],
            plan: Some(&plan),
            manifest: Some(&manifest),
            shadow: None,
        };
        let verdict = decide(&documents, &trust(&root, None), &TimeFloor::default());
        let Verdict::Judged {
            rotated: None,
            recovery: false,
            plan:
                PlanVerdict::Accepted {
                    manifest: Some(Err(refusal)),
                    shadow: None,
                    ..
                },
        } = verdict
        else {
            panic!("{verdict:?}");
        };
        assert!(
            matches!(
                &refusal,
                Refusal::Unverified {
                    document: Document::Manifest,
                    source: VerifyError::Expired {
                        role: Role::Manifest,
                        ..
                    },
                }
            ),
            "{refusal:?}"
        );
        let expected = format!(
            "manifest: {}",
            refusal.verify_error().expect("a verify error")
        );
        assert_eq!(refusal.to_string(), expected);
    }

    /// A plan at or below the highest sequence seen is refused, and nothing under it is judged.
    #[test]
    fn a_replayed_plan_is_refused_with_its_document_named() {
        let root = VerifiedRoot::load_trusted(&fixture("root.bin")).expect("the root is valid");
        let (plan, manifest) = (fixture("plan.bin"), fixture("manifest.bin"));
        let documents = Documents {
            roots: &[],
            plan: Some(&plan),
            manifest: Some(&manifest),
            shadow: None,
        };
        let verdict = decide(
            &documents,
            &trust(&root, Some(u64::MAX)),
            &TimeFloor::default(),
        );
        let Verdict::Judged {
            plan: PlanVerdict::Refused(refusal),
            ..
        } = verdict
        else {
            panic!("{verdict:?}");
        };
        assert!(
            matches!(
                refusal,
                Refusal::Unverified {
                    document: Document::Plan,
                    ..
                }
            ),
            "{refusal:?}"
        );
        assert!(refusal.to_string().starts_with("plan: "), "{refusal}");
    }

    /// Issue 21, finding 7: a plan at the sequence the device accepted last, with other bytes,
    /// is refused; the same plan again is not.
    #[test]
    fn another_plan_at_the_accepted_sequence_is_refused() {
        let root = VerifiedRoot::load_trusted(&fixture("root.bin")).expect("the root is valid");
        let plan = fixture("plan.bin");
        let verified = root
            .verify_plan(&plan, &TimeFloor::default(), None)
            .expect("the plan alone is valid");
        let documents = Documents {
            roots: &[],
            plan: Some(&plan),
            manifest: None,
            shadow: None,
        };
        let judge = |digest: Sha256| {
            let trust = Trust {
                plan_digest: Some(digest),
                ..trust(&root, Some(verified.sequence()))
            };
            match decide(&documents, &trust, &TimeFloor::default()) {
                Verdict::Judged { plan, .. } => plan,
                other => panic!("{other:?}"),
            }
        };
        assert!(matches!(
            judge(verified.digest()),
            PlanVerdict::Accepted { .. }
        ));
        let refused = judge(Sha256([7; 32]));
        let PlanVerdict::Refused(refusal) = refused else {
            panic!("{refused:?}");
        };
        assert_eq!(
            refusal.to_string(),
            format!(
                "plan: plan {0} differs from the plan {0} this device accepted",
                verified.sequence()
            )
        );
    }
}
