//! Verifying roots: signature thresholds and expiry, root rotation, and the only constructors
//! of [`VerifiedRoot`] (and, through it, of the manifests and plans it verifies).

use super::documents::signing_message;
use super::manifest::validate_manifest;
use super::plan::validate_plan;
use super::{
    KeySignature, ManifestBody, PlanBody, Role, RootBody, Signed, TimeFloor, VerifiedManifest,
    VerifiedPlan, VerifyError, MAX_ROOT_KEYS,
};
use crate::envelope;
use crate::keys::{sha256, KeyId, PublicKey};

/// Checks `signatures` over `payload` against `keys`, counting each trusted key once.
fn check_threshold(
    role: Role,
    payload: &[u8],
    signatures: &[KeySignature],
    keys: &[(KeyId, PublicKey)],
    threshold: u32,
) -> Result<(), VerifyError> {
    let message = signing_message(payload);
    let mut valid: Vec<KeyId> = Vec::new();
    // Each trusted key is checked at most once, so a document stuffed with repeated bad signatures
    // costs no more ed25519 work than one listing every key once.
    let mut attempted: Vec<KeyId> = Vec::new();
    let (mut unknown_keys, mut invalid, mut duplicates) = (0, 0, 0);
    for entry in signatures {
        if attempted.contains(&entry.key_id) {
            duplicates += 1;
            continue;
        }
        let Some((_, key)) = keys.iter().find(|(id, _)| *id == entry.key_id) else {
            unknown_keys += 1;
            continue;
        };
        attempted.push(entry.key_id);
        if key.verify(&message, &entry.signature) {
            valid.push(entry.key_id);
        } else {
            invalid += 1;
        }
    }
    // A threshold of zero never reaches here (roots are validated), but never let it pass vacuously.
    if valid.len() < threshold.max(1) as usize {
        return Err(VerifyError::ThresholdNotMet {
            role,
            valid: valid.len(),
            threshold,
            unknown_keys,
            invalid,
            duplicates,
        });
    }
    Ok(())
}

pub(super) fn check_expiry(role: Role, expires: u64, floor: &TimeFloor) -> Result<(), VerifyError> {
    let now = floor.now();
    if expires <= now {
        return Err(VerifyError::Expired { role, expires, now });
    }
    Ok(())
}

fn validate_root(body: &RootBody) -> Result<Vec<(KeyId, PublicKey)>, VerifyError> {
    if body.version == 0 {
        return Err(VerifyError::InvalidRoot("version must start at 1"));
    }
    if body.keys.is_empty() || body.keys.len() > MAX_ROOT_KEYS {
        return Err(VerifyError::InvalidRoot("must list between 1 and 64 keys"));
    }
    if body.threshold == 0 || body.threshold as usize > body.keys.len() {
        return Err(VerifyError::InvalidRoot(
            "threshold must be at least 1 and at most the number of keys",
        ));
    }
    if body.expires <= body.created {
        return Err(VerifyError::InvalidRoot("expires before it is created"));
    }
    let mut keys: Vec<(KeyId, PublicKey)> = Vec::with_capacity(body.keys.len());
    for key in &body.keys {
        if !key.is_valid() {
            return Err(VerifyError::InvalidRoot(
                "lists a key that is not a valid ed25519 point",
            ));
        }
        let id = key.key_id();
        if keys.iter().any(|(known, _)| *known == id) {
            return Err(VerifyError::InvalidRoot("lists the same key twice"));
        }
        keys.push((id, *key));
    }
    Ok(keys)
}

/// A root whose signatures have been checked: the keys everything else is verified against.
#[derive(Debug, Clone)]
pub struct VerifiedRoot {
    body: RootBody,
    keys: Vec<(KeyId, PublicKey)>,
    signed_bytes: Vec<u8>,
}

impl VerifiedRoot {
    /// Accepts a root the device was given out of band (shipped or installed) and checks it is
    /// self-consistent, signed by a threshold of its own keys, and not expired.
    pub fn verify_initial(bytes: &[u8], floor: &TimeFloor) -> Result<VerifiedRoot, VerifyError> {
        let root = VerifiedRoot::load_trusted(bytes)?;
        root.check_fresh(floor)?;
        Ok(root)
    }

    /// Re-loads a root this device accepted earlier, as the starting point of an update. Its
    /// signatures are re-checked, its expiry is not: an expired trusted root may still be rotated
    /// away from, as in TUF. Anything verified *with* it checks its freshness.
    pub fn load_trusted(bytes: &[u8]) -> Result<VerifiedRoot, VerifyError> {
        let signed: Signed<RootBody> = envelope::decode(bytes)?;
        // The first root has no predecessor to vouch for its keys; it is trusted because of how it
        // arrived, so its payload is decoded to learn the keys and then its self-signatures checked.
        let body: RootBody = envelope::decode(&signed.payload)?;
        let keys = validate_root(&body)?;
        check_threshold(
            Role::Root,
            &signed.payload,
            &signed.signatures,
            &keys,
            body.threshold,
        )?;
        Ok(VerifiedRoot {
            body,
            keys,
            signed_bytes: bytes.to_vec(),
        })
    }

    /// Verifies the next root in a rotation: signed by a threshold of this root's keys (checked
    /// before the new payload is decoded) and by a threshold of its own keys, with a version exactly
    /// one higher. Expiry of an intermediate root is not checked; [`VerifiedRoot::update`] checks
    /// the final one.
    pub fn verify_rotation(&self, bytes: &[u8]) -> Result<VerifiedRoot, VerifyError> {
        let signed: Signed<RootBody> = envelope::decode(bytes)?;
        check_threshold(
            Role::Root,
            &signed.payload,
            &signed.signatures,
            &self.keys,
            self.body.threshold,
        )?;
        let body: RootBody = envelope::decode(&signed.payload)?;
        // Checked: a trusted root at u64::MAX has no successor, and must not overflow into one.
        if self.body.version.checked_add(1) != Some(body.version) {
            return Err(VerifyError::RootVersion {
                trusted: self.body.version,
                found: body.version,
            });
        }
        let keys = validate_root(&body)?;
        check_threshold(
            Role::Root,
            &signed.payload,
            &signed.signatures,
            &keys,
            body.threshold,
        )?;
        Ok(VerifiedRoot {
            body,
            keys,
            signed_bytes: bytes.to_vec(),
        })
    }

    /// Walks a chain of newer roots, in version order, and checks the last one is not expired.
    /// Roots at or below the trusted version are skipped, so a hub may send its whole history.
    ///
    /// A chain that ends in a root [revoking](VerifiedRoot::revokes_keys_of) keys of this one is
    /// a recovery from a key compromise, and the time signed by the revoked keys is not held
    /// against it: the last root is judged against `floor` with the newest signed time replaced
    /// by its own creation (the keys that signed it are the ones trusted now). Without this, a
    /// compromised threshold that signed a document dated far in the future would make every
    /// later root look expired, and no rotation could ever recover the device.
    pub fn update(
        &self,
        chain: &[Vec<u8>],
        floor: &TimeFloor,
    ) -> Result<VerifiedRoot, VerifyError> {
        let mut current = self.clone();
        for bytes in chain {
            let signed: Signed<RootBody> = envelope::decode(bytes)?;
            let version = signed
                .decode_unverified()
                .map(|body| body.version)
                .unwrap_or(u64::MAX);
            if version <= current.body.version {
                continue;
            }
            current = current.verify_rotation(bytes)?;
        }
        if current.revokes_keys_of(self) {
            current.check_fresh(&TimeFloor {
                newest_signed: current.body.created,
                ..*floor
            })?;
        } else {
            current.check_fresh(floor)?;
        }
        Ok(current)
    }

    /// Whether this root no longer trusts a key `older` trusted: a rotation that revokes keys.
    /// TUF's fast-forward recovery: what the revoked keys signed (a plan sequence, a manifest
    /// version, a signed time) must no longer floor what the remaining and new keys sign.
    pub fn revokes_keys_of(&self, older: &VerifiedRoot) -> bool {
        older
            .body
            .keys
            .iter()
            .any(|key| !self.body.keys.contains(key))
    }

    pub fn check_fresh(&self, floor: &TimeFloor) -> Result<(), VerifyError> {
        check_expiry(Role::Root, self.body.expires, floor)
    }

    /// Verifies a signed manifest without a plan: signatures, structure, expiry, and that its
    /// version is not below `highest_seen` for its name.
    pub fn verify_manifest(
        &self,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedManifest, VerifyError> {
        let signed: Signed<ManifestBody> = envelope::decode(bytes)?;
        self.check_signed(Role::Manifest, &signed.payload, &signed.signatures)?;
        let body: ManifestBody = envelope::decode(&signed.payload)?;
        let name = validate_manifest(&body)?;
        self.check_fresh(floor)?;
        check_expiry(Role::Manifest, body.expires, floor)?;
        if let Some(highest) = highest_seen.filter(|highest| body.version < *highest) {
            return Err(VerifyError::ManifestRollback {
                name: body.name,
                offered: body.version,
                highest,
            });
        }
        Ok(VerifiedManifest {
            digest: sha256(bytes),
            body,
            name,
            signed_bytes: bytes.to_vec(),
        })
    }

    /// Verifies a signed plan: signatures, structure, expiry, and that its sequence is not below
    /// `highest_seen`.
    pub fn verify_plan(
        &self,
        bytes: &[u8],
        floor: &TimeFloor,
        highest_seen: Option<u64>,
    ) -> Result<VerifiedPlan, VerifyError> {
        let signed: Signed<PlanBody> = envelope::decode(bytes)?;
        self.check_signed(Role::Plan, &signed.payload, &signed.signatures)?;
        let body: PlanBody = envelope::decode(&signed.payload)?;
        validate_plan(&body)?;
        self.check_fresh(floor)?;
        check_expiry(Role::Plan, body.expires, floor)?;
        if let Some(highest) = highest_seen.filter(|highest| body.sequence < *highest) {
            return Err(VerifyError::PlanRollback {
                offered: body.sequence,
                highest,
            });
        }
        Ok(VerifiedPlan {
            digest: sha256(bytes),
            body,
            signed_bytes: bytes.to_vec(),
        })
    }

    pub(super) fn check_signed(
        &self,
        role: Role,
        payload: &[u8],
        signatures: &[KeySignature],
    ) -> Result<(), VerifyError> {
        check_threshold(role, payload, signatures, &self.keys, self.body.threshold)
    }

    pub fn body(&self) -> &RootBody {
        &self.body
    }

    pub fn version(&self) -> u64 {
        self.body.version
    }

    /// The exact bytes that were verified, for storing and serving.
    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }
}
