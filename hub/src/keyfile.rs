//! Release-key files.
//!
//! A private key file holds a header line and the hex seed, and is created with mode 0600 inside a
//! 0700 directory. A public key file holds the hex public key. Private keys are loaded only by the
//! signing commands, which run on the operator's machine; no command sends one anywhere.

use std::fs;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use outpost_protocol::{PublicKey, SecretKey};

use outpost_model::fsutil;

const PRIVATE_HEADER: &str = "outpost release key v1";

/// Generates a key from the operating system's randomness.
pub fn generate() -> anyhow::Result<SecretKey> {
    let mut seed = [0u8; 32];
    getrandom::getrandom(&mut seed).context("reading randomness for a new key")?;
    Ok(SecretKey::from_seed(seed))
}

/// Writes `key` as `DIR/release-<id>.key` (0600) and `.pub`, refusing to overwrite. Returns the
/// private key's path.
pub fn write_pair(dir: &Path, key: &SecretKey) -> anyhow::Result<PathBuf> {
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    let stem = format!("release-{}", key.public().key_id().short());
    let private = dir.join(format!("{stem}.key"));
    let public = dir.join(format!("{stem}.pub"));
    for path in [&private, &public] {
        if path.exists() {
            bail!(
                "{} already exists; refusing to overwrite a key",
                path.display()
            );
        }
    }
    let text = format!("{PRIVATE_HEADER}\n{}\n", hex::encode(key.seed()));
    fsutil::write_atomic(&private, text.as_bytes(), 0o600)?;
    fsutil::write_atomic(
        &public,
        format!("{}\n", key.public().to_hex()).as_bytes(),
        0o644,
    )?;
    Ok(private)
}

/// Loads a private key file. A file readable by group or others is refused, as ssh does.
pub fn load_private(path: &Path) -> anyhow::Result<SecretKey> {
    let mode = fs::metadata(path)
        .with_context(|| format!("reading key {}", path.display()))?
        .permissions()
        .mode();
    if mode & 0o077 != 0 {
        bail!(
            "key {} has mode {:o}; private keys must not be readable by group or others (chmod 600)",
            path.display(),
            mode & 0o777
        );
    }
    let text = String::from_utf8(fsutil::read_capped(path, 4096)?)
        .with_context(|| format!("key {} is not text", path.display()))?;
    let mut lines = text.lines();
    if lines.next() != Some(PRIVATE_HEADER) {
        bail!(
            "{} is not an outpost release key (bad header)",
            path.display()
        );
    }
    let mut seed = [0u8; 32];
    let hex_seed = lines.next().unwrap_or_default().trim();
    hex::decode_to_slice(hex_seed, &mut seed)
        .with_context(|| format!("key {} has a malformed seed", path.display()))?;
    Ok(SecretKey::from_seed(seed))
}

/// Loads a public key file, or the public half of a private key file.
pub fn load_public(path: &Path) -> anyhow::Result<PublicKey> {
    let text = String::from_utf8(fsutil::read_capped(path, 4096)?)
        .with_context(|| format!("key {} is not text", path.display()))?;
    if text.starts_with(PRIVATE_HEADER) {
        return load_private(path).map(|key| key.public());
    }
    let key = PublicKey::from_hex(&text)
        .with_context(|| format!("{} is not a hex ed25519 public key", path.display()))?;
    if !key.is_valid() {
        bail!("{} holds an invalid ed25519 public key", path.display());
    }
    Ok(key)
}

pub fn load_all_private(paths: &[PathBuf]) -> anyhow::Result<Vec<SecretKey>> {
    paths.iter().map(|path| load_private(path)).collect()
}
