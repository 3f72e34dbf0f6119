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
            let (slot, manifest) =
                plan.verify_manifest(&root, bytes, &view.floor, view.highest_manifest)?;
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
