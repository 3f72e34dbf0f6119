//! Verified plans: a plan's structural checks, and which manifests (served or shadow) a
//! checked plan allows.

use super::manifest::claimed_identity;
use super::{PlanBody, ShadowStage, Slot, TimeFloor, VerifiedManifest, VerifiedRoot, VerifyError};
use crate::keys::{sha256, Sha256};
use crate::name::ModelName;

pub(super) fn validate_plan(body: &PlanBody) -> Result<(), VerifyError> {
    let invalid = |reason: String| Err(VerifyError::InvalidPlan(reason));
    if body.stages.is_empty() {
        return invalid("has no stages".into());
    }
    if body.stages.iter().any(|pct| !(1..=100).contains(pct)) {
        return invalid("stage percentages must be within 1..=100".into());
    }
    if body.stages.windows(2).any(|pair| pair[0] >= pair[1]) {
        return invalid("stage percentages must strictly increase".into());
    }
    for reference in std::iter::once(&body.target).chain(&body.fallback) {
        if let Err(source) = ModelName::new(&reference.name) {
            return Err(VerifyError::InvalidModelName {
                name: reference.name.clone(),
                source,
            });
        }
    }
    if let Some(fallback) = &body.fallback {
        if fallback.manifest_sha256 == body.target.manifest_sha256 {
            return invalid("fallback is the target".into());
        }
        // A plan moves one model between two of its versions; devices run other models beside
        // it, each under plans of its own, so a plan must not take one model's place by another.
        if fallback.name != body.target.name {
            return invalid(format!(
                "fallback names model {:?} and the target {:?}: a plan moves one model",
                fallback.name, body.target.name
            ));
        }
    }
    for label in &body.selector {
        if let Err(error) = label.validate() {
            return invalid(format!("selector label {label}: {error}"));
        }
    }
    let gates = &body.gates;
    let limits = [
        ("max failure percent", gates.max_failure_pct),
        ("max error rate", gates.max_error_rate),
        ("max p95 regression percent", gates.max_p95_regression_pct),
        ("max drift PSI", gates.max_drift_psi.unwrap_or(0.0)),
    ];
    for (what, value) in limits {
        if !value.is_finite() || value < 0.0 {
            return invalid(format!("{what} must be a finite non-negative number"));
        }
    }
    if let Some(shadow) = &body.shadow {
        validate_shadow(shadow, body.fallback.is_some())?;
    }
    if body.expires <= body.created {
        return invalid("expires before it is created".into());
    }
    Ok(())
}

fn validate_shadow(shadow: &ShadowStage, has_fallback: bool) -> Result<(), VerifyError> {
    let invalid = |reason: &str| Err(VerifyError::InvalidPlan(format!("shadow stage {reason}")));
    if !has_fallback {
        // The target is compared with what devices serve meanwhile: the plan's fallback.
        return invalid("needs a fallback to compare the target with");
    }
    if !(1..=100).contains(&shadow.percent) {
        return invalid("percentage must be within 1..=100");
    }
    if shadow.min_comparisons == 0 {
        return invalid("needs at least 1 comparison");
    }
    let agreement = shadow.min_top1_agreement;
    if !agreement.is_finite() || !(0.0..=1.0).contains(&agreement) {
        return invalid("minimum top-1 agreement must be a number within 0..=1");
    }
    let diff = shadow.max_mean_abs_diff;
    if !diff.is_finite() || diff < 0.0 {
        return invalid("maximum mean absolute difference must be a finite non-negative number");
    }
    Ok(())
}

/// A plan whose signatures, structure, freshness and sequence have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedPlan {
    pub(super) body: PlanBody,
    pub(super) digest: Sha256,
    pub(super) signed_bytes: Vec<u8>,
}

impl VerifiedPlan {
    pub fn body(&self) -> &PlanBody {
        &self.body
    }

    pub fn sequence(&self) -> u64 {
        self.body.sequence
    }

    pub fn digest(&self) -> Sha256 {
        self.digest
    }

    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }

    /// Verifies a manifest the hub says this plan lets the device run. It must be exactly the
    /// plan's target or fallback (by the hash of its signed bytes). The target must also not be
    /// below `highest_seen`; the fallback may be, since the plan's signers allowed it.
    pub fn verify_manifest(
        &self,
        root: &VerifiedRoot,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<(Slot, VerifiedManifest), VerifyError> {
        let digest = sha256(bytes);
        let slot = if digest == self.body.target.manifest_sha256 {
            Slot::Target
        } else if self
            .body
            .fallback
            .as_ref()
            .is_some_and(|fallback| fallback.manifest_sha256 == digest)
        {
            Slot::Fallback
        } else {
            let (name, version) = claimed_identity(bytes);
            return Err(VerifyError::ManifestNotInPlan {
                name,
                version,
                sequence: self.body.sequence,
            });
        };
        let floor_for_rollback = match slot {
            Slot::Target => highest_seen,
            Slot::Fallback => None,
        };
        let manifest = root.verify_manifest(bytes, floor, floor_for_rollback)?;
        Ok((slot, manifest))
    }

    /// Verifies a manifest the hub says this device should run in shadow, beside its active
    /// model. Only a plan with a shadow stage authorises one, and only its target, which must not
    /// be below `highest_seen` either: shadowing downloads and runs the model like an activation.
    pub fn verify_shadow_manifest(
        &self,
        root: &VerifiedRoot,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedManifest, VerifyError> {
        if self.body.shadow.is_none() {
            return Err(VerifyError::NoShadowStage {
                sequence: self.body.sequence,
            });
        }
        if sha256(bytes) != self.body.target.manifest_sha256 {
            let (name, version) = claimed_identity(bytes);
            return Err(VerifyError::ShadowNotTarget {
                name,
                version,
                sequence: self.body.sequence,
            });
        }
        root.verify_manifest(bytes, floor, highest_seen)
    }
}
