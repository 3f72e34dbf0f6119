//! Retirements: the signed word that a model leaves the devices a selector picks.
//!
//! A model leaves a device only this way: no plan of another model, and nothing the hub says on
//! its own, takes a model off a device. A retirement shares the plan sequence of its model, so a
//! device accepts it only at or above the highest plan of that model it accepted, and after it
//! refuses that model's older plans; a later plan of the model (a new rollout) brings it back.

use serde::{Deserialize, Serialize};

use super::documents::{Role, Signed, SignedBody};
use super::root::check_expiry;
use super::{message, TimeFloor, VerifiedRoot, VerifyError};
use crate::envelope::{self, MessageKind};
use crate::keys::{sha256, Sha256};
use crate::name::{Label, ModelName};
use crate::Message;

/// Devices whose own labels carry every label of `selector` (all devices when it is empty) stop
/// serving `model` and remove its versions.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetireBody {
    /// In the plan sequence: above every plan of the model it ends.
    pub sequence: u64,
    pub created: u64,
    pub expires: u64,
    pub model: String,
    pub selector: Vec<Label>,
}

message!(
    Signed<RetireBody>,
    SignedRetire,
    "signed retirement",
    8 * 1024
);
message!(RetireBody, RetireBody, "retirement", 4 * 1024);

/// Signed by the keys, and with the threshold, that sign plans.
impl SignedBody for RetireBody {
    const ROLE: Role = Role::Plan;
}

/// A retirement whose signatures, structure, freshness and sequence have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedRetire {
    body: RetireBody,
    digest: Sha256,
    signed_bytes: Vec<u8>,
}

impl VerifiedRetire {
    pub fn body(&self) -> &RetireBody {
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
}

/// Whether `bytes` frame a signed retirement rather than a signed plan: where a check-in answer
/// carries a model's plan, it may carry its retirement instead.
pub fn is_retirement(bytes: &[u8]) -> bool {
    envelope::kind_of(bytes) == Some(<Signed<RetireBody> as Message>::KIND)
}

impl VerifiedRoot {
    /// Verifies a signed retirement: signatures (those of plans), structure, expiry, and that its
    /// sequence is not below `highest_seen`, the highest plan of its model the device accepted.
    pub fn verify_retire(
        &self,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedRetire, VerifyError> {
        let signed: Signed<RetireBody> = envelope::decode(bytes)?;
        self.check_signed(Role::Plan, &signed.payload, &signed.signatures)?;
        let body: RetireBody = envelope::decode(&signed.payload)?;
        if let Err(source) = ModelName::new(&body.model) {
            return Err(VerifyError::InvalidModelName {
                name: body.model.clone(),
                source,
            });
        }
        for label in &body.selector {
            if let Err(error) = label.validate() {
                return Err(VerifyError::InvalidPlan(format!(
                    "retirement selector label {label}: {error}"
                )));
            }
        }
        if body.expires <= body.created {
            return Err(VerifyError::InvalidPlan(
                "retirement expires before it is created".into(),
            ));
        }
        self.check_fresh(floor)?;
        check_expiry(Role::Plan, body.expires, floor)?;
        if let Some(highest) = highest_seen.filter(|highest| body.sequence < *highest) {
            return Err(VerifyError::PlanRollback {
                offered: body.sequence,
                highest,
            });
        }
        Ok(VerifiedRetire {
            digest: sha256(bytes),
            body,
            signed_bytes: bytes.to_vec(),
        })
    }
}
