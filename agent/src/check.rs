//! The device's verdict on a root chain, a plan and a manifest.

use outpost_protocol::trust::Slot;
use outpost_protocol::{
    AgentVersion, Arch, TimeFloor, VerifiedManifest, VerifiedPlan, VerifiedRoot, VerifyError,
};

/// What a device would accept, given its trusted root and what it has seen so far.
#[derive(Debug)]
pub struct Verdict {
    pub root: VerifiedRoot,
    pub plan: Option<VerifiedPlan>,
    pub manifest: Option<(Option<Slot>, VerifiedManifest)>,
}

/// The documents a hub would hand a device, as raw bytes.
#[derive(Debug, Default)]
pub struct Offered<'a> {
    pub roots: Vec<Vec<u8>>,
    pub plan: Option<&'a [u8]>,
    pub manifest: Option<&'a [u8]>,
}

/// What the device already trusts and has seen.
#[derive(Debug)]
pub struct DeviceView<'a> {
    pub trusted_root: &'a [u8],
    pub floor: TimeFloor,
    pub highest_plan: Option<u64>,
    pub highest_manifest: Option<u64>,
    pub arch: Arch,
    pub agent: AgentVersion,
}

/// Applies the chain of trust in the order the agent does: walk the roots, verify the plan, then
/// the manifest under the plan (or alone when no plan is given), then compatibility.
pub fn check(view: &DeviceView<'_>, offered: &Offered<'_>) -> Result<Verdict, VerifyError> {
    let root =
        VerifiedRoot::load_trusted(view.trusted_root)?.update(&offered.roots, &view.floor)?;
    let plan = offered
        .plan
        .map(|bytes| root.verify_plan(bytes, &view.floor, view.highest_plan))
        .transpose()?;
    let manifest = match (offered.manifest, &plan) {
        (None, _) => None,
        (Some(bytes), Some(plan)) => {
            // As in the agent: an accepted plan's creation is a signed time seen.
            let floor = TimeFloor {
                newest_signed: view.floor.newest_signed.max(plan.body().created),
                ..view.floor
            };
            let (slot, manifest) =
                plan.verify_manifest(&root, bytes, &floor, view.highest_manifest)?;
            Some((Some(slot), manifest))
        }
        (Some(bytes), None) => Some((
            None,
            root.verify_manifest(bytes, &view.floor, view.highest_manifest)?,
        )),
    };
    if let Some((_, manifest)) = &manifest {
        manifest.check_compatible(view.arch, view.agent)?;
    }
    Ok(Verdict {
        root,
        plan,
        manifest,
    })
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
                VerifyError::Expired { role: Role::Manifest, now, .. } if now == created
            ),
            "{error:?}"
        );
    }
}
