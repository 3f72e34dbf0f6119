//! Verified manifests: what a checked model version allows, and the checks of its artifacts.

use super::{
    AgentVersion, Arch, Artifact, ArtifactRole, ManifestBody, ManifestRef, Signed, VerifyError,
};
use crate::envelope;
use crate::keys::{sha256, Sha256};
use crate::name::ModelName;

pub(super) fn validate_manifest(body: &ManifestBody) -> Result<ModelName, VerifyError> {
    let name = ModelName::new(&body.name).map_err(|source| VerifyError::InvalidModelName {
        name: body.name.clone(),
        source,
    })?;
    let invalid = |reason: &str| Err(VerifyError::InvalidManifest(reason.to_owned()));
    let count = |role| body.artifacts.iter().filter(|a| a.role == role).count();
    if count(ArtifactRole::Model) != 1 {
        return invalid("must have exactly one model artifact");
    }
    if count(ArtifactRole::Profile) > 1 || count(ArtifactRole::Validation) > 1 {
        return invalid("lists an artifact role twice");
    }
    if body.archs.is_empty() {
        return invalid("lists no compatible architecture");
    }
    if body.inputs.is_empty() || body.outputs.is_empty() {
        return invalid("must declare inputs and outputs");
    }
    if body.expires <= body.created {
        return invalid("expires before it is created");
    }
    Ok(name)
}

/// A manifest whose signatures, structure and freshness have been checked.
#[derive(Debug, Clone)]
pub struct VerifiedManifest {
    pub(super) body: ManifestBody,
    pub(super) name: ModelName,
    pub(super) digest: Sha256,
    pub(super) signed_bytes: Vec<u8>,
}

impl VerifiedManifest {
    pub fn body(&self) -> &ManifestBody {
        &self.body
    }

    pub fn name(&self) -> &ModelName {
        &self.name
    }

    pub fn version(&self) -> u64 {
        self.body.version
    }

    /// SHA-256 of the signed manifest frame: how plans refer to it.
    pub fn digest(&self) -> Sha256 {
        self.digest
    }

    pub fn signed_bytes(&self) -> &[u8] {
        &self.signed_bytes
    }

    pub fn reference(&self) -> ManifestRef {
        ManifestRef {
            name: self.body.name.clone(),
            version: self.body.version,
            manifest_sha256: self.digest,
        }
    }

    pub fn artifact(&self, role: ArtifactRole) -> Option<&Artifact> {
        self.body.artifacts.iter().find(|a| a.role == role)
    }

    /// Refuses a model this device cannot run.
    pub fn check_compatible(&self, arch: Arch, agent: AgentVersion) -> Result<(), VerifyError> {
        if !self.body.archs.contains(&arch) {
            return Err(VerifyError::IncompatibleArch {
                device: arch,
                supported: self.body.archs.clone(),
            });
        }
        if agent < self.body.min_agent_version {
            return Err(VerifyError::AgentTooOld {
                required: self.body.min_agent_version,
                running: agent,
            });
        }
        Ok(())
    }

    /// Checks a downloaded artifact's length and hash against what this manifest signs.
    pub fn check_artifact(
        &self,
        role: ArtifactRole,
        length: u64,
        digest: Sha256,
    ) -> Result<(), VerifyError> {
        let artifact = self
            .artifact(role)
            .ok_or(VerifyError::MissingArtifact(role))?;
        if artifact.length != length {
            return Err(VerifyError::ArtifactLength {
                role,
                expected: artifact.length,
                found: length,
            });
        }
        if artifact.sha256 != digest {
            return Err(VerifyError::ArtifactHash {
                role,
                expected: artifact.sha256,
                found: digest,
            });
        }
        Ok(())
    }

    /// [`VerifiedManifest::check_artifact`] for bytes held in memory.
    pub fn verify_artifact(&self, role: ArtifactRole, bytes: &[u8]) -> Result<(), VerifyError> {
        self.check_artifact(role, bytes.len() as u64, sha256(bytes))
    }
}

/// The name and version a manifest claims, decoded only to name a stray manifest in an error:
/// nothing here is trusted.
pub(super) fn claimed_identity(bytes: &[u8]) -> (String, u64) {
    envelope::decode::<Signed<ManifestBody>>(bytes)
        .ok()
        .and_then(|signed| signed.decode_unverified().ok())
        .map(|body| (body.name, body.version))
        .unwrap_or_else(|| ("<undecodable>".to_owned(), 0))
}
