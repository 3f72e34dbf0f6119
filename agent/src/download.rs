//! Artifact downloads that an untrusted hub cannot abuse.
//!
//! A download resumes a `.partial` file with an HTTP Range request, hashes as it streams, stops
//! the moment the body passes the signed length (endless data), and gives up past an overall
//! deadline or under a minimum throughput (slow retrieval). A complete file is checked against the
//! signed length and hash before anyone uses it. These rules hold for the body whatever its
//! origin: the hub, or the object store the hub redirected the download to
//! ([`HubClient::download`]).

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use outpost_protocol::keys::StreamingSha256;
use outpost_protocol::trust::Artifact;

use crate::hub_client::{HubClient, HubError};

/// Limits on one artifact download.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub deadline: Duration,
    /// Bytes per second; judged once [`RATE_GRACE`] has passed.
    pub min_rate: u64,
}

/// Time allowed before the throughput floor applies, so a slow start is not punished.
pub const RATE_GRACE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DownloadError {
    #[error(transparent)]
    Hub(#[from] HubError),
    /// The body stopped coming partway; what arrived is kept for the next attempt.
    #[error("download of {artifact} from {source_url} broke off at {received} bytes: {message}")]
    BrokenOff {
        artifact: String,
        /// The hub's URL, or the object store's without its query.
        source_url: String,
        received: u64,
        message: String,
    },
    #[error("hub sent more than the {signed} signed bytes of {artifact}")]
    EndlessData { artifact: String, signed: u64 },
    #[error(
        "download of {artifact} passed its {deadline:?} deadline at {received} of {signed} bytes"
    )]
    Deadline {
        artifact: String,
        deadline: Duration,
        received: u64,
        signed: u64,
    },
    #[error("download of {artifact} fell below {min_rate} bytes/s ({rate} bytes/s)")]
    TooSlow {
        artifact: String,
        min_rate: u64,
        rate: u64,
    },
    #[error("download of {artifact} ended at {received} of {signed} bytes")]
    Truncated {
        artifact: String,
        received: u64,
        signed: u64,
    },
    #[error("{artifact} does not hash to its signed value")]
    HashMismatch { artifact: String },
    #[error("writing {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
}

impl DownloadError {
    /// True when the hub served something the signed manifest rules out, or redirected the
    /// download where the device does not follow, as opposed to a network failure worth retrying.
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            DownloadError::EndlessData { .. }
                | DownloadError::HashMismatch { .. }
                | DownloadError::Hub(HubError::Redirect { .. })
        )
    }
}

/// Downloads `artifact` into `dir`, resuming a previous partial download, and returns the path of
/// the complete, verified file. `tick` is called as bytes arrive (for the service watchdog).
pub fn fetch(
    client: &HubClient,
    artifact: &Artifact,
    dir: &Path,
    limits: Limits,
    tick: &dyn Fn(),
) -> Result<PathBuf, DownloadError> {
    let name = format!("{} artifact {}", artifact.role, artifact.sha256);
    let partial = dir.join(format!("{}.partial", artifact.sha256.to_hex()));
    let io = |source| DownloadError::Io {
        path: partial.clone(),
        source,
    };
    std::fs::create_dir_all(dir).map_err(io)?;

    // Resume: hash what is already there, unless it is already longer than it may be.
    let mut hasher = StreamingSha256::new();
    let mut have = 0u64;
    if let Ok(mut existing) = File::open(&partial) {
        let len = existing.metadata().map_err(io)?.len();
        if len <= artifact.length {
            let mut buffer = vec![0u8; 64 * 1024];
            loop {
                let n = existing.read(&mut buffer).map_err(io)?;
                if n == 0 {
                    break;
                }
                hasher.update(&buffer[..n]);
                have += n as u64;
            }
        }
    }
    if have < artifact.length {
        let mut download = client.download(&artifact.sha256, have)?;
        if download.status == 200 && have > 0 {
            // The hub ignored the range and sends the whole file: start over.
            hasher = StreamingSha256::new();
            have = 0;
        }
        let mut file = OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(have == 0)
            .append(have > 0)
            .open(&partial)
            .map_err(io)?;
        let started = Instant::now();
        let mut this_attempt = 0u64;
        let mut buffer = vec![0u8; 64 * 1024];
        loop {
            let n = match download.body.read(&mut buffer) {
                Ok(n) => n,
                Err(error) => {
                    // Keep what arrived; the next attempt resumes from here.
                    file.sync_all().map_err(io)?;
                    return Err(DownloadError::BrokenOff {
                        artifact: name,
                        source_url: download.source,
                        received: have,
                        message: error.to_string(),
                    });
                }
            };
            if n == 0 {
                break;
            }
            if have + n as u64 > artifact.length {
                drop(file);
                let _ = std::fs::remove_file(&partial);
                return Err(DownloadError::EndlessData {
                    artifact: name,
                    signed: artifact.length,
                });
            }
            file.write_all(&buffer[..n]).map_err(io)?;
            hasher.update(&buffer[..n]);
            have += n as u64;
            this_attempt += n as u64;
            tick();
            let elapsed = started.elapsed();
            if elapsed > limits.deadline {
                file.sync_all().map_err(io)?;
                return Err(DownloadError::Deadline {
                    artifact: name,
                    deadline: limits.deadline,
                    received: have,
                    signed: artifact.length,
                });
            }
            if elapsed > RATE_GRACE {
                let rate = this_attempt / elapsed.as_secs().max(1);
                if rate < limits.min_rate {
                    file.sync_all().map_err(io)?;
                    return Err(DownloadError::TooSlow {
                        artifact: name,
                        min_rate: limits.min_rate,
                        rate,
                    });
                }
            }
        }
        file.sync_all().map_err(io)?;
    }
    if have != artifact.length {
        return Err(DownloadError::Truncated {
            artifact: name,
            received: have,
            signed: artifact.length,
        });
    }
    if hasher.finish() != artifact.sha256 {
        let _ = std::fs::remove_file(&partial);
        return Err(DownloadError::HashMismatch { artifact: name });
    }
    Ok(partial)
}
