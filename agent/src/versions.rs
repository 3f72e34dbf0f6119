//! Installed model versions: `DATA/versions/<manifest sha256>/` holding `manifest.bin` and one
//! file per artifact role. A version directory appears only complete: it is assembled under a
//! temporary name, every file and the directory fsynced, then renamed into place and the parent
//! fsynced. It disappears the same way: renamed out of place first, then deleted, so a crash
//! mid-removal never leaves part of a version under its final name. Loading re-checks every
//! artifact against the signed manifest, so a file damaged on disk is never run.

use std::fs::{self, File};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use outpost_protocol::device::ValidationSet;
use outpost_protocol::drift::Profile;
use outpost_protocol::keys::StreamingSha256;
use outpost_protocol::trust::{ArtifactRole, ManifestBody, Signed};
use outpost_protocol::{Message, Sha256};

#[derive(Debug, Clone)]
pub struct Versions {
    dir: PathBuf,
}

/// An installed version, read back and checked against its manifest.
#[derive(Debug)]
pub struct Installed {
    pub manifest: ManifestBody,
    pub model: Vec<u8>,
    pub validation: Option<ValidationSet>,
    /// The drift profile and its signed hash.
    pub profile: Option<(Profile, Sha256)>,
}

pub fn artifact_file(role: ArtifactRole) -> &'static str {
    match role {
        ArtifactRole::Model => "model.onnx",
        ArtifactRole::Profile => "profile.bin",
        ArtifactRole::Validation => "validation.bin",
    }
}

/// Name prefix of a version being assembled.
const STAGING: &str = ".staging-";
/// Name prefix of a version being removed.
const REMOVING: &str = ".removing-";

fn sync_dir(dir: &Path) -> std::io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Streams a file through SHA-256.
pub fn hash_file(path: &Path) -> std::io::Result<(u64, Sha256)> {
    use std::io::Read;
    let mut file = File::open(path)?;
    let mut hasher = StreamingSha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut length = 0u64;
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            break;
        }
        hasher.update(&buffer[..n]);
        length += n as u64;
    }
    Ok((length, hasher.finish()))
}

impl Versions {
    pub fn open(data_dir: &Path) -> anyhow::Result<Versions> {
        let dir = data_dir.join("versions");
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        // Versions half assembled or half removed when the agent died are never under a final
        // name; clear them away.
        for entry in fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.file_name().is_some_and(|name| {
                let name = name.to_string_lossy();
                name.starts_with(STAGING) || name.starts_with(REMOVING)
            }) {
                let _ = fs::remove_dir_all(&path);
            }
        }
        Ok(Versions { dir })
    }

    pub fn path(&self, manifest_sha256: &[u8; 32]) -> PathBuf {
        self.dir.join(hex::encode(manifest_sha256))
    }

    pub fn has(&self, manifest_sha256: &[u8; 32]) -> bool {
        self.path(manifest_sha256).join("manifest.bin").is_file()
    }

    /// The size of an installed version's model file; 0 when it is not installed.
    pub fn model_size(&self, manifest_sha256: &[u8; 32]) -> u64 {
        fs::metadata(
            self.path(manifest_sha256)
                .join(artifact_file(ArtifactRole::Model)),
        )
        .map_or(0, |metadata| metadata.len())
    }

    /// Installs a version from downloaded artifact files, which are moved (not copied) in.
    pub fn install(
        &self,
        manifest_sha256: &[u8; 32],
        signed_manifest: &[u8],
        artifacts: &[(ArtifactRole, PathBuf)],
    ) -> anyhow::Result<()> {
        let final_dir = self.path(manifest_sha256);
        if final_dir.exists() {
            return Ok(());
        }
        let staging = self
            .dir
            .join(format!("{STAGING}{}", hex::encode(manifest_sha256)));
        let _ = fs::remove_dir_all(&staging);
        fs::create_dir(&staging).with_context(|| format!("creating {}", staging.display()))?;
        let result = (|| {
            for (role, source) in artifacts {
                let target = staging.join(artifact_file(*role));
                fs::rename(source, &target)
                    .with_context(|| format!("moving {} into place", source.display()))?;
                File::open(&target)?.sync_all()?;
            }
            outpost_model::fsutil::write_atomic(
                &staging.join("manifest.bin"),
                signed_manifest,
                0o644,
            )?;
            sync_dir(&staging)?;
            fs::rename(&staging, &final_dir)
                .with_context(|| format!("installing {}", final_dir.display()))?;
            sync_dir(&self.dir).context("syncing the versions directory")
        })();
        if result.is_err() {
            let _ = fs::remove_dir_all(&staging);
        }
        result
    }

    /// Reads an installed version back, checking every artifact's length and hash against the
    /// manifest stored beside it, and that manifest against the digest it is filed under.
    pub fn load(&self, manifest_sha256: &[u8; 32]) -> anyhow::Result<Installed> {
        let dir = self.path(manifest_sha256);
        let signed_bytes = outpost_model::fsutil::read_capped(
            &dir.join("manifest.bin"),
            Signed::<ManifestBody>::MAX_FRAME as u64,
        )?;
        if outpost_protocol::sha256(&signed_bytes).0 != *manifest_sha256 {
            bail!("{}: manifest does not match its digest", dir.display());
        }
        let signed: Signed<ManifestBody> = outpost_protocol::decode(&signed_bytes)?;
        let manifest = signed.decode_unverified()?;
        let mut model = None;
        let mut validation = None;
        let mut profile = None;
        for artifact in &manifest.artifacts {
            let path = dir.join(artifact_file(artifact.role));
            let (length, digest) =
                hash_file(&path).with_context(|| format!("reading {}", path.display()))?;
            if length != artifact.length || digest != artifact.sha256 {
                bail!("{} does not match its signed hash", path.display());
            }
            match artifact.role {
                ArtifactRole::Model => model = Some(fs::read(&path)?),
                ArtifactRole::Validation => {
                    let bytes = fs::read(&path)?;
                    validation = Some(ValidationSet::decode(&bytes)?);
                }
                ArtifactRole::Profile => {
                    let bytes = fs::read(&path)?;
                    let decoded = outpost_protocol::decode::<Profile>(&bytes)
                        .with_context(|| format!("{} is not a drift profile", path.display()))?;
                    profile = Some((decoded, artifact.sha256));
                }
            }
        }
        let model = model.with_context(|| format!("{} has no model", dir.display()))?;
        Ok(Installed {
            manifest,
            model,
            validation,
            profile,
        })
    }

    /// Removes every installed version not in `keep`. Each is renamed out of place before its
    /// files are deleted: deleting in place, a crash could leave a `manifest.bin` without its
    /// model under the final name, which [`Versions::has`] would take for an installed version.
    pub fn retain(&self, keep: &[[u8; 32]]) -> anyhow::Result<()> {
        let keep: Vec<String> = keep.iter().map(hex::encode).collect();
        let mut removed = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let path = entry?.path();
            let name = path
                .file_name()
                .map(|name| name.to_string_lossy().into_owned())
                .unwrap_or_default();
            if name.len() == 64 && !keep.contains(&name) {
                let removing = self.dir.join(format!("{REMOVING}{name}"));
                fs::rename(&path, &removing)
                    .with_context(|| format!("moving old version {} away", path.display()))?;
                removed.push((name, removing));
            }
        }
        sync_dir(&self.dir)?;
        for (name, removing) in removed {
            fs::remove_dir_all(&removing)
                .with_context(|| format!("removing old version {}", removing.display()))?;
            log::info!("removed old model version {name}");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Installs a version with one model file whose bytes are `model`, filed under `digest`.
    fn install(versions: &Versions, downloads: &Path, digest: [u8; 32], model: &[u8]) {
        let source = downloads.join(hex::encode(digest));
        fs::write(&source, model).unwrap();
        versions
            .install(
                &digest,
                b"signed manifest",
                &[(ArtifactRole::Model, source)],
            )
            .unwrap();
    }

    #[test]
    fn retain_removes_versions_not_kept_and_nothing_else() {
        let data = tempfile::tempdir().unwrap();
        let downloads = data.path().join("downloads");
        fs::create_dir(&downloads).unwrap();
        let versions = Versions::open(data.path()).unwrap();
        for digest in [[1u8; 32], [2; 32], [3; 32]] {
            install(&versions, &downloads, digest, b"onnx");
        }
        versions.retain(&[[1; 32], [3; 32]]).unwrap();
        let mut left: Vec<String> = fs::read_dir(data.path().join("versions"))
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        assert_eq!(left, [hex::encode([1u8; 32]), hex::encode([3u8; 32])]);
        assert!(versions.has(&[1; 32]) && !versions.has(&[2; 32]));
    }

    // Regression: `retain` deleted versions in place, so an agent killed mid-removal left a
    // directory holding only `manifest.bin` under the version's final name. `has` took it for
    // installed, and offering that version again failed it for want of its model. Now what a
    // crash leaves is a `.removing-` directory, which the next start clears like a `.staging-`
    // one.
    #[test]
    fn open_clears_versions_left_half_assembled_or_half_removed() {
        let data = tempfile::tempdir().unwrap();
        let dir = data.path().join("versions");
        let kept = hex::encode([7u8; 32]);
        for name in [
            format!("{STAGING}{}", hex::encode([8u8; 32])),
            format!("{REMOVING}{}", hex::encode([9u8; 32])),
            kept.clone(),
        ] {
            fs::create_dir_all(dir.join(&name)).unwrap();
            fs::write(dir.join(&name).join("manifest.bin"), b"manifest").unwrap();
        }
        let versions = Versions::open(data.path()).unwrap();
        let left: Vec<String> = fs::read_dir(&dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(left, [kept]);
        assert!(versions.has(&[7; 32]));
    }
}
