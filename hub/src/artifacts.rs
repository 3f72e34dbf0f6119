//! Content-addressed artifact files: `DATA/artifacts/<sha256 hex>`.
//!
//! An upload streams into a temporary file while it is hashed, is fsynced, and is renamed to its
//! hash only if the hash is the one announced; the directory is then fsynced. A file under its
//! final name is therefore always complete and always hashes to its name, whenever the hub dies.

use std::io::ErrorKind;
use std::path::{Path, PathBuf};

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
        Ok(ArtifactStore { dir })
    }

    pub fn path(&self, sha256: &Sha256) -> PathBuf {
        self.dir.join(sha256.to_hex())
    }

    /// The stored length, or None when the artifact is absent.
    pub fn length(&self, sha256: &Sha256) -> std::io::Result<Option<u64>> {
        match std::fs::metadata(self.path(sha256)) {
            Ok(meta) => Ok(Some(meta.len())),
            Err(error) if error.kind() == ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Streams `body` into the store under `expected`. Returns the length written. Nothing is
    /// stored unless every byte arrived and the hash matches.
    pub async fn put(
        &self,
        expected: Sha256,
        mut body: impl AsyncRead + Unpin,
        max: u64,
    ) -> Result<u64, ArtifactError> {
        let temp = self.dir.join(format!(
            "{}.{}.partial",
            expected.to_hex(),
            std::process::id()
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
            tokio::fs::rename(&temp, self.path(&expected)).await?;
            tokio::fs::File::open(&self.dir).await?.sync_all().await?;
            Ok(length)
        }
        .await;
        if result.is_err() {
            let _ = tokio::fs::remove_file(&temp).await;
        }
        result
    }
}
