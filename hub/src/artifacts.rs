//! Content-addressed artifact files: `DATA/artifacts/<sha256 hex>`.
//!
//! An upload streams into a temporary file of its own (two uploads of one artifact at once never
//! share one) while it is hashed, is fsynced, and is renamed to its hash only if the hash is the
//! one announced; the directory is then fsynced. A file under its final name is therefore complete
//! and hashes to its name, whenever the hub dies. What is already stored is hashed again before
//! the hub relies on it ([`ArtifactStore::verified_length`]): a file that no longer matches its
//! name (a disk error, a copy cut short, an edit) is set aside and counts as absent, so the
//! publisher uploads it again instead of having it skipped.

use std::collections::HashMap;
use std::io::{ErrorKind, Read};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use outpost_protocol::keys::StreamingSha256;
use outpost_protocol::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact is {found}, not the announced {expected}")]
    HashMismatch { expected: Sha256, found: Sha256 },
    #[error("artifact exceeds the {max}-byte limit")]
    TooLarge { max: u64 },
    #[error("upload interrupted: {0}")]
    Body(String),
    #[error("artifact storage failed: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug, Clone)]
pub struct ArtifactStore {
    dir: PathBuf,
    /// Files hashed and found to match their names, by the length and modification time they
    /// had then: unchanged since, they are not read again.
    verified: Arc<Mutex<HashMap<Sha256, (u64, SystemTime)>>>,
    /// Tells apart the temporary files of uploads running at once.
    uploads: Arc<AtomicU64>,
}

impl ArtifactStore {
    pub fn open(data_dir: &Path) -> std::io::Result<ArtifactStore> {
        let dir = data_dir.join("artifacts");
        std::fs::create_dir_all(&dir)?;
        // Leftovers of uploads cut short by a crash are never under a final name; remove them.
        for entry in std::fs::read_dir(&dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|ext| ext == "partial") {
                let _ = std::fs::remove_file(&path);
            }
        }
        Ok(ArtifactStore {
            dir,
            verified: Arc::default(),
            uploads: Arc::default(),
        })
    }

    pub fn path(&self, sha256: &Sha256) -> PathBuf {
        self.dir.join(sha256.to_hex())
    }

    /// The stored length of an artifact whose file still hashes to its name, or None when it is
    /// absent. A file that does not (its content changed since it was stored) is renamed to
    /// `<name>.corrupt` beside the others, logged, and reported absent.
    pub async fn verified_length(&self, sha256: &Sha256) -> std::io::Result<Option<u64>> {
        let path = self.path(sha256);
        let meta = match tokio::fs::metadata(&path).await {
            Ok(meta) => meta,
            Err(error) if error.kind() == ErrorKind::NotFound => return Ok(None),
            Err(error) => return Err(error),
        };
        let seen = (meta.len(), meta.modified()?);
        let known = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sha256)
            .copied();
        if known == Some(seen) {
            return Ok(Some(seen.0));
        }
        let hashed = {
            let path = path.clone();
            tokio::task::spawn_blocking(move || hash_file(&path))
                .await
                .map_err(std::io::Error::other)??
        };
        if hashed == *sha256 {
            self.verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(*sha256, seen);
            return Ok(Some(seen.0));
        }
        let aside = self.dir.join(format!("{}.corrupt", sha256.to_hex()));
        log::error!(
            "artifact {} hashes to {hashed}: set aside as {}; it must be uploaded again",
            path.display(),
            aside.display()
        );
        tokio::fs::rename(&path, &aside).await?;
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sha256);
        Ok(None)
    }

    /// Streams `body` into the store under `expected`. Returns the length written. Nothing is
    /// stored unless every byte arrived and the hash matches.
    pub async fn put(
        &self,
        expected: Sha256,
        mut body: impl AsyncRead + Unpin,
        max: u64,
    ) -> Result<u64, ArtifactError> {
        // Unique to this upload: another of the same artifact at the same time writes its own.
        let temp = self.dir.join(format!(
            "{}.{}.{}.partial",
            expected.to_hex(),
            std::process::id(),
            self.uploads.fetch_add(1, Ordering::Relaxed)
        ));
        let result = async {
            let mut file = tokio::fs::File::create(&temp).await?;
            let mut hasher = StreamingSha256::new();
            let mut buffer = vec![0u8; 64 * 1024];
            let mut length = 0u64;
            loop {
                let n = body
                    .read(&mut buffer)
                    .await
                    .map_err(|error| ArtifactError::Body(error.to_string()))?;
                if n == 0 {
                    break;
                }
                length += n as u64;
                if length > max {
                    return Err(ArtifactError::TooLarge { max });
                }
                hasher.update(&buffer[..n]);
                file.write_all(&buffer[..n]).await?;
            }
            let found = hasher.finish();
            if found != expected {
                return Err(ArtifactError::HashMismatch { expected, found });
            }
            file.sync_all().await?;
            drop(file);
            let path = self.path(&expected);
            tokio::fs::rename(&temp, &path).await?;
            tokio::fs::File::open(&self.dir).await?.sync_all().await?;
            let meta = tokio::fs::metadata(&path).await?;
            self.verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(expected, (meta.len(), meta.modified()?));
            Ok(length)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }
}

/// The SHA-256 of a file's content, read in 64 KiB pieces.
fn hash_file(path: &Path) -> std::io::Result<Sha256> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = StreamingSha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buffer)?;
        if n == 0 {
            return Ok(hasher.finish());
        }
        hasher.update(&buffer[..n]);
    }
}
