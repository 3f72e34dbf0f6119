//! Content-addressed artifacts, named by their SHA-256, in an object store: a local directory by
//! default (`DATA/artifacts/<sha256 hex>`, as release 0.1 kept them), or an S3-compatible bucket
//! that any number of hubs share (`serve --artifacts s3://BUCKET/PREFIX`).
//!
//! Both go through the `object_store` crate, so one set of rules holds for both:
//! - **Nothing half-written is visible.** An upload streams into a staging file of its own under
//!   `DATA/uploads` while it is hashed and counted against the size limit. Only a complete upload
//!   whose hash is the announced one is handed to the store, and the store publishes it whole or
//!   not at all: in the local directory the staging file itself is fsynced, renamed under its
//!   name and the directory fsynced, so its bytes are written once; S3 makes an object visible only when its single PUT or its multipart upload
//!   completes, and an upload that fails is aborted. A store that cannot be reached fails the
//!   upload with an error naming the store, after a few bounded retries.
//! - **What is stored is checked again before the hub relies on it**
//!   ([`ArtifactStore::verified_length`]): an object that no longer hashes to its name (a disk
//!   error, a copy cut short, an edit in the bucket) is set aside as `<name>.corrupt` and counts as
//!   absent, so the publisher uploads it again instead of having it skipped.
//! - **Devices** get an artifact's bytes from the hub, whole or from a byte offset, or, with
//!   `--artifact-urls signed` on S3, a redirect to a presigned URL that expires after
//!   `--artifact-url-ttl`: the object store or a CDN in front of it then carries the bytes. Either
//!   way the device checks the signed length and hash, so neither the hub nor the store is
//!   trusted with the content.

use std::collections::HashMap;
use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use futures_util::stream::BoxStream;
use futures_util::StreamExt;
use object_store::aws::{AmazonS3, AmazonS3Builder};
use object_store::local::LocalFileSystem;
use object_store::path::Path as ObjectPath;
use object_store::signer::Signer;
use object_store::{
    BackoffConfig, ClientOptions, GetOptions, GetRange, ObjectStore, ObjectStoreExt, PutPayload,
    RetryConfig, WriteMultipart,
};
use outpost_protocol::keys::StreamingSha256;
use outpost_protocol::Sha256;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};

/// Uploads at most this large go to the store in one request; larger ones in parts of this size
/// (S3 wants parts of at least 5 MiB).
const PART_BYTES: usize = 8 * 1024 * 1024;

/// How long a request to an S3 store may take before it counts as failed, and how long its
/// retries may go on: an unreachable store fails a publish in seconds, not minutes.
const S3_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
const S3_REQUEST_TIMEOUT: Duration = Duration::from_secs(120);
const S3_RETRIES: usize = 3;
const S3_RETRY_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact is {found}, not the announced {expected}")]
    HashMismatch { expected: Sha256, found: Sha256 },
    #[error("artifact exceeds the {max}-byte limit")]
    TooLarge { max: u64 },
    #[error("upload interrupted: {0}")]
    Body(String),
    #[error("staging the artifact upload failed: {0}")]
    Io(#[from] std::io::Error),
    /// The object store failed or could not be reached; `store` names it.
    #[error("artifact store {store}: {action} failed: {message}")]
    Store {
        store: String,
        action: String,
        message: String,
    },
}

/// The `<Code>` of an S3 error answer quoted in `text`, as object_store's errors quote the body.
fn s3_error_code(text: &str) -> Option<&str> {
    let start = text.find("<Code>")? + "<Code>".len();
    let length = text[start..].find("</Code>")?;
    Some(&text[start..start + length])
}

/// What an S3 error code means for a hub about to start, when no wait mends it: S3's documented
/// codes for a bucket that does not exist and for credentials, a signature or a region the store
/// refuses.
fn refusal_of(code: &str) -> Option<&'static str> {
    match code {
        "NoSuchBucket" => Some("the bucket does not exist (create it, or fix --artifacts)"),
        "InvalidBucketName" => Some("the bucket's name is not valid"),
        "AccessDenied" | "AllAccessDisabled" => {
            Some("the store denies these credentials access to the bucket")
        }
        "InvalidAccessKeyId" => Some("the store does not know AWS_ACCESS_KEY_ID"),
        "SignatureDoesNotMatch" => Some("the store refuses AWS_SECRET_ACCESS_KEY"),
        "AuthorizationHeaderMalformed" => {
            Some("the store refuses the request's signing (is AWS_REGION the bucket's region?)")
        }
        _ => None,
    }
}

/// What [`ArtifactStore::check`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreCheck {
    Ready,
    /// The store answered that this configuration cannot work; the message names the store.
    Refused(String),
    /// The store could not be reached or failed for now; the message names the store.
    Unreachable(String),
}

/// How devices get an artifact's bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ArtifactUrls {
    /// The hub streams them from the store.
    Hub,
    /// The hub redirects the device to a presigned URL of the store (S3 only).
    Signed,
}

/// Where artifacts are kept and how devices reach them.
#[derive(Debug, Clone)]
pub struct ArtifactConfig {
    /// `s3://BUCKET[/PREFIX]`, or none for `DATA/artifacts`.
    pub location: Option<String>,
    /// The S3 endpoint, for stores other than AWS (MinIO, Garage, Ceph, ...); else `AWS_ENDPOINT`
    /// or AWS itself.
    pub endpoint: Option<String>,
    pub urls: ArtifactUrls,
    /// How long a presigned URL stays valid.
    pub url_ttl: Duration,
}

impl Default for ArtifactConfig {
    fn default() -> ArtifactConfig {
        ArtifactConfig {
            location: None,
            endpoint: None,
            urls: ArtifactUrls::Hub,
            url_ttl: Duration::from_secs(15 * 60),
        }
    }
}

/// An object's length and entity tag when it was last hashed.
type Seen = (u64, Option<String>);

#[derive(Clone)]
pub struct ArtifactStore {
    store: Arc<dyn ObjectStore>,
    /// The S3 store again, to presign URLs with, when devices are sent to it.
    signer: Option<(Arc<AmazonS3>, Duration)>,
    /// Prepended to every object's name (`PREFIX/`), empty for none.
    prefix: String,
    /// The local directory the store keeps objects in, when it is one: uploads are renamed into
    /// it rather than written a second time.
    local: Option<PathBuf>,
    /// Where uploads are staged and hashed before the store sees them.
    staging: PathBuf,
    /// Names the store in messages: a directory, or `s3://BUCKET/PREFIX at ENDPOINT`.
    describe: String,
    /// Objects hashed and found to match their names, by the length and entity tag they had then:
    /// unchanged since, they are not read again.
    verified: Arc<Mutex<HashMap<Sha256, Seen>>>,
    /// Tells apart the staging files of uploads running at once.
    uploads: Arc<AtomicU64>,
}

impl fmt::Debug for ArtifactStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ArtifactStore({})", self.describe)
    }
}

impl ArtifactStore {
    /// Opens the store `config` names; `data_dir` holds the staging directory and, by default,
    /// the artifacts themselves. Leftovers of uploads cut short by a crash are removed: they are
    /// never under a final name.
    pub fn open(data_dir: &Path, config: &ArtifactConfig) -> anyhow::Result<ArtifactStore> {
        let staging = data_dir.join("uploads");
        remove_leftovers(&staging, |_| true)?;
        let (store, signer, prefix, describe, local): (Arc<dyn ObjectStore>, _, _, _, _) =
            match &config.location {
                None => {
                    anyhow::ensure!(
                        config.urls == ArtifactUrls::Hub,
                        "--artifact-urls signed needs an S3 store (--artifacts s3://BUCKET): a \
                         local directory cannot presign URLs"
                    );
                    let dir = data_dir.join("artifacts");
                    // Release 0.1 staged uploads as `*.partial` here; object_store stages as
                    // `NAME#N`.
                    remove_leftovers(&dir, |name| {
                        name.ends_with(".partial") || name.contains('#')
                    })?;
                    std::fs::create_dir_all(&dir)?;
                    let local = LocalFileSystem::new_with_prefix(&dir)?.with_fsync(true);
                    (
                        Arc::new(local),
                        None,
                        String::new(),
                        dir.display().to_string(),
                        Some(dir),
                    )
                }
                Some(url) => {
                    let (s3, prefix, describe) = open_s3(url, config.endpoint.as_deref())?;
                    let s3 = Arc::new(s3);
                    let signer = (config.urls == ArtifactUrls::Signed)
                        .then(|| (Arc::clone(&s3), config.url_ttl));
                    (s3, signer, prefix, describe, None)
                }
            };
        Ok(ArtifactStore {
            store,
            signer,
            prefix,
            local,
            staging,
            describe,
            verified: Arc::default(),
            uploads: Arc::default(),
        })
    }

    /// Lists one object of the store, as a hub does once at start. An answer of the store that
    /// no wait mends (the bucket does not exist, the credentials are refused) is
    /// [`StoreCheck::Refused`]: the hub must not start on it. One that may pass (the store cannot
    /// be reached yet) is [`StoreCheck::Unreachable`]: the hub starts, serves what needs no
    /// artifact, and says so.
    pub async fn check(&self) -> StoreCheck {
        let prefix =
            (!self.prefix.is_empty()).then(|| ObjectPath::from(self.prefix.trim_end_matches('/')));
        let mut listing = self.store.list(prefix.as_ref());
        match listing.next().await {
            None | Some(Ok(_)) => StoreCheck::Ready,
            Some(Err(error)) => {
                let text = error.to_string();
                let refusal = match &error {
                    object_store::Error::PermissionDenied { .. }
                    | object_store::Error::Unauthenticated { .. } => {
                        Some("the store refuses these credentials")
                    }
                    _ => s3_error_code(&text).and_then(refusal_of),
                };
                match refusal {
                    Some(why) => StoreCheck::Refused(format!(
                        "artifact store {}: {why} ({text})",
                        self.describe
                    )),
                    None => StoreCheck::Unreachable(format!(
                        "artifact store {}: listing failed: {text}",
                        self.describe
                    )),
                }
            }
        }
    }

    /// Names the store, for logs and errors.
    pub fn describe(&self) -> &str {
        &self.describe
    }

    fn object(&self, name: &str) -> ObjectPath {
        ObjectPath::from(format!("{}{name}", self.prefix))
    }

    fn store_error(&self, action: impl Into<String>, error: object_store::Error) -> ArtifactError {
        ArtifactError::Store {
            store: self.describe.clone(),
            action: action.into(),
            message: error.to_string(),
        }
    }

    /// The stored length of `sha256`, or None when it is absent, without reading it.
    pub async fn length(&self, sha256: &Sha256) -> Result<Option<u64>, ArtifactError> {
        match self.store.head(&self.object(&sha256.to_hex())).await {
            Ok(meta) => Ok(Some(meta.size)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(error) => Err(self.store_error(format!("looking up {sha256}"), error)),
        }
    }

    /// The stored length of an artifact whose content still hashes to its name, or None when it
    /// is absent. One that does not (its content changed since it was stored) is renamed to
    /// `<name>.corrupt` beside the others, logged, and reported absent.
    pub async fn verified_length(&self, sha256: &Sha256) -> Result<Option<u64>, ArtifactError> {
        let path = self.object(&sha256.to_hex());
        let meta = match self.store.head(&path).await {
            Ok(meta) => meta,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(self.store_error(format!("looking up {sha256}"), error)),
        };
        let seen = (meta.size, meta.e_tag.clone());
        let known = self
            .verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(sha256)
            .cloned();
        if known.as_ref() == Some(&seen) {
            return Ok(Some(meta.size));
        }
        let mut hasher = StreamingSha256::new();
        let mut stream = match self.store.get(&path).await {
            Ok(result) => result.into_stream(),
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(self.store_error(format!("reading {sha256}"), error)),
        };
        while let Some(chunk) = stream.next().await {
            let chunk =
                chunk.map_err(|error| self.store_error(format!("reading {sha256}"), error))?;
            hasher.update(&chunk);
        }
        let hashed = hasher.finish();
        if hashed == *sha256 {
            self.verified
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .insert(*sha256, seen);
            return Ok(Some(meta.size));
        }
        let aside = self.object(&format!("{}.corrupt", sha256.to_hex()));
        log::error!(
            "artifact {sha256} in {} hashes to {hashed}: set aside as {aside}; it must be uploaded \
             again",
            self.describe
        );
        self.store
            .rename(&path, &aside)
            .await
            .map_err(|error| self.store_error(format!("setting {sha256} aside"), error))?;
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(sha256);
        Ok(None)
    }

    /// Reads a whole artifact of at most `max` bytes, checked against its name.
    pub async fn read(&self, sha256: &Sha256, max: u64) -> Result<Bytes, ArtifactError> {
        let path = self.object(&sha256.to_hex());
        let result = self
            .store
            .get(&path)
            .await
            .map_err(|error| self.store_error(format!("reading {sha256}"), error))?;
        if result.meta.size > max {
            return Err(ArtifactError::TooLarge { max });
        }
        let bytes = result
            .bytes()
            .await
            .map_err(|error| self.store_error(format!("reading {sha256}"), error))?;
        let found = outpost_protocol::sha256(&bytes);
        if found != *sha256 {
            return Err(ArtifactError::HashMismatch {
                expected: *sha256,
                found,
            });
        }
        Ok(bytes)
    }

    /// The bytes `range` of an artifact, as they stream from the store.
    pub async fn stream(
        &self,
        sha256: &Sha256,
        range: Range<u64>,
    ) -> Result<BoxStream<'static, Result<Bytes, std::io::Error>>, ArtifactError> {
        let options = GetOptions {
            range: Some(GetRange::Bounded(range)),
            ..GetOptions::default()
        };
        let result = self
            .store
            .get_opts(&self.object(&sha256.to_hex()), options)
            .await
            .map_err(|error| self.store_error(format!("reading {sha256}"), error))?;
        Ok(result
            .into_stream()
            .map(|chunk| chunk.map_err(std::io::Error::other))
            .boxed())
    }

    /// A presigned URL to download `sha256` from the store directly, when devices are sent there
    /// (`--artifact-urls signed`); None when the hub serves the bytes itself.
    pub async fn signed_url(&self, sha256: &Sha256) -> Result<Option<String>, ArtifactError> {
        let Some((signer, ttl)) = &self.signer else {
            return Ok(None);
        };
        let url = signer
            .signed_url(
                axum::http::Method::GET,
                &self.object(&sha256.to_hex()),
                *ttl,
            )
            .await
            .map_err(|error| self.store_error(format!("presigning {sha256}"), error))?;
        Ok(Some(url.to_string()))
    }

    /// Streams `body` into the store under `expected`. Returns the length written. Nothing is
    /// stored unless every byte arrived, the hash matches and the store took the whole object.
    pub async fn put(
        &self,
        expected: Sha256,
        body: impl AsyncRead + Unpin,
        max: u64,
    ) -> Result<u64, ArtifactError> {
        tokio::fs::create_dir_all(&self.staging).await?;
        // Unique to this upload: another of the same artifact at the same time stages its own.
        let staged = self.staging.join(format!(
            "{}.{}.{}",
            expected.to_hex(),
            std::process::id(),
            self.uploads.fetch_add(1, Ordering::Relaxed)
        ));
        let result = async {
            let length = stage(&staged, expected, body, max).await?;
            self.publish(expected, &staged, length).await?;
            Ok(length)
        }
        .await;
        let _ = tokio::fs::remove_file(&staged).await;
        result
    }

    /// Hands the staged, checked file of `sha256` to the store, whole or not at all.
    async fn publish(
        &self,
        sha256: Sha256,
        staged: &Path,
        length: u64,
    ) -> Result<(), ArtifactError> {
        let path = self.object(&sha256.to_hex());
        if let Some(dir) = &self.local {
            if self
                .publish_local(sha256, staged, dir, &path, length)
                .await?
            {
                return Ok(());
            }
        }
        let action = format!("storing {sha256}");
        let mut file = tokio::fs::File::open(staged).await?;
        let put = if length <= PART_BYTES as u64 {
            let mut bytes = Vec::with_capacity(length as usize);
            file.read_to_end(&mut bytes).await?;
            self.store.put(&path, PutPayload::from(bytes)).await
        } else {
            let upload = self
                .store
                .put_multipart(&path)
                .await
                .map_err(|error| self.store_error(action.as_str(), error))?;
            let mut writer = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
            let mut buffer = vec![0u8; 1024 * 1024];
            let written = async {
                loop {
                    let n = file.read(&mut buffer).await?;
                    if n == 0 {
                        return Ok::<(), ArtifactError>(());
                    }
                    writer
                        .wait_for_capacity(2)
                        .await
                        .map_err(|error| self.store_error(action.as_str(), error))?;
                    writer.write(&buffer[..n]);
                }
            }
            .await;
            match written {
                Ok(()) => {
                    let parts = length.div_ceil(PART_BYTES as u64);
                    log::info!("storing {sha256} ({length} bytes) as an upload of {parts} parts");
                    writer.finish().await
                }
                Err(error) => {
                    // Parts already sent are dropped with the upload; nothing became visible.
                    if let Err(abort) = writer.abort().await {
                        log::warn!("aborting the upload of {sha256}: {abort}");
                    }
                    return Err(error);
                }
            }
        };
        let meta = put.map_err(|error| self.store_error(action.as_str(), error))?;
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sha256, (length, meta.e_tag));
        Ok(())
    }

    /// Publishes the staged file of `sha256` in the local directory `dir` by renaming it there:
    /// its data is synced first and the directory after, so the name appears whole or not at all
    /// and survives a power cut, as the store's own put would make it, without writing the bytes
    /// a second time. False when the rename crosses filesystems (`dir` is a mount of its own):
    /// then the store copies it.
    async fn publish_local(
        &self,
        sha256: Sha256,
        staged: &Path,
        dir: &Path,
        path: &ObjectPath,
        length: u64,
    ) -> Result<bool, ArtifactError> {
        tokio::fs::File::open(staged).await?.sync_all().await?;
        match tokio::fs::rename(staged, dir.join(sha256.to_hex())).await {
            Ok(()) => {}
            Err(error) if error.kind() == std::io::ErrorKind::CrossesDevices => return Ok(false),
            Err(error) => return Err(error.into()),
        }
        let synced = dir.to_owned();
        tokio::task::spawn_blocking(move || std::fs::File::open(synced)?.sync_all())
            .await
            .map_err(std::io::Error::other)??;
        let meta = self
            .store
            .head(path)
            .await
            .map_err(|error| self.store_error(format!("storing {sha256}"), error))?;
        self.verified
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(sha256, (length, meta.e_tag));
        Ok(true)
    }
}

/// Streams `body` into `staged` while hashing it; fails past `max` bytes or on a hash other than
/// `expected`.
async fn stage(
    staged: &Path,
    expected: Sha256,
    mut body: impl AsyncRead + Unpin,
    max: u64,
) -> Result<u64, ArtifactError> {
    let mut file = tokio::fs::File::create(staged).await?;
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
    file.flush().await?;
    Ok(length)
}

/// Opens `s3://BUCKET[/PREFIX]`: credentials and region from the usual `AWS_*` variables,
/// the endpoint from `endpoint` or `AWS_ENDPOINT`. Returns the store, the prefix its objects'
/// names start with, and how to name it.
fn open_s3(url: &str, endpoint: Option<&str>) -> anyhow::Result<(AmazonS3, String, String)> {
    let rest = url
        .strip_prefix("s3://")
        .ok_or_else(|| anyhow::anyhow!("--artifacts {url:?}: expected s3://BUCKET[/PREFIX]"))?;
    let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
    anyhow::ensure!(!bucket.is_empty(), "--artifacts {url:?} names no bucket");
    let prefix = prefix.trim_matches('/');
    // reqwest's rustls takes the process's provider; ring, as everywhere else in the hub. Another
    // already installed (by an earlier store) is the same one.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = AmazonS3Builder::from_env()
        .with_bucket_name(bucket)
        .with_client_options(
            ClientOptions::new()
                .with_connect_timeout(S3_CONNECT_TIMEOUT)
                .with_timeout(S3_REQUEST_TIMEOUT),
        )
        .with_retry(RetryConfig {
            backoff: BackoffConfig::default(),
            max_retries: S3_RETRIES,
            retry_timeout: S3_RETRY_TIMEOUT,
        });
    if let Some(endpoint) = endpoint {
        builder = builder.with_endpoint(endpoint);
    }
    let endpoint = endpoint
        .map(str::to_owned)
        .or_else(|| std::env::var("AWS_ENDPOINT").ok());
    if let Some(endpoint) = &endpoint {
        // Plain http only when the operator wrote it.
        builder = builder.with_allow_http(endpoint.starts_with("http://"));
    }
    let store = builder
        .build()
        .map_err(|error| anyhow::anyhow!("--artifacts {url}: {error}"))?;
    let describe = match &endpoint {
        Some(endpoint) => format!("{url} at {endpoint}"),
        None => url.to_owned(),
    };
    let prefix = if prefix.is_empty() {
        String::new()
    } else {
        format!("{prefix}/")
    };
    Ok((store, prefix, describe))
}

/// Removes the files of `dir` whose names `leftover` picks; a missing directory has none.
fn remove_leftovers(dir: &Path, leftover: impl Fn(&str) -> bool) -> std::io::Result<()> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(error) => return Err(error),
    };
    for entry in entries {
        let path = entry?.path();
        if path
            .file_name()
            .and_then(|name| name.to_str())
            .is_some_and(&leftover)
        {
            let _ = std::fs::remove_file(&path);
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `length` bytes that do not repeat in any short period.
    fn content(length: usize) -> Vec<u8> {
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        (0..length)
            .map(|_| {
                state ^= state << 13;
                state ^= state >> 7;
                state ^= state << 17;
                state as u8
            })
            .collect()
    }

    fn local(dir: &Path) -> ArtifactStore {
        ArtifactStore::open(dir, &ArtifactConfig::default()).unwrap()
    }

    /// No file but the artifacts under their names: no staging file left behind.
    fn files(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = std::fs::read_dir(dir)
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[tokio::test]
    async fn an_upload_in_parts_is_stored_whole_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        // Larger than one part: the multipart path.
        let bytes = content(PART_BYTES * 2 + 12_345);
        let sha = outpost_protocol::sha256(&bytes);
        let length = store.put(sha, &bytes[..], u64::MAX).await.unwrap();
        assert_eq!(length, bytes.len() as u64);
        assert_eq!(store.verified_length(&sha).await.unwrap(), Some(length));
        assert_eq!(files(&dir.path().join("artifacts")), [sha.to_hex()]);
        assert!(files(&dir.path().join("uploads")).is_empty());
        let read = store.read(&sha, u64::MAX).await.unwrap();
        assert!(read[..] == bytes[..]);
        let mut streamed = Vec::new();
        let mut stream = store
            .stream(&sha, 10..PART_BYTES as u64 + 20)
            .await
            .unwrap();
        while let Some(chunk) = stream.next().await {
            streamed.extend_from_slice(&chunk.unwrap());
        }
        assert!(streamed[..] == bytes[10..PART_BYTES + 20]);
        // A fresh store (another hub process) hashes it again and finds it whole.
        assert_eq!(
            local(dir.path()).verified_length(&sha).await.unwrap(),
            Some(length)
        );
    }

    #[tokio::test]
    async fn a_wrong_hash_or_an_oversized_upload_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let bytes = content(PART_BYTES + 1);
        let sha = outpost_protocol::sha256(&bytes);
        let other = outpost_protocol::sha256(b"another artifact");
        let error = store.put(other, &bytes[..], u64::MAX).await.unwrap_err();
        assert!(
            matches!(error, ArtifactError::HashMismatch { expected, found } if expected == other && found == sha),
            "{error}"
        );
        let error = store.put(sha, &bytes[..], 1000).await.unwrap_err();
        assert!(
            matches!(error, ArtifactError::TooLarge { max: 1000 }),
            "{error}"
        );
        assert_eq!(store.verified_length(&sha).await.unwrap(), None);
        assert_eq!(store.verified_length(&other).await.unwrap(), None);
        assert!(files(&dir.path().join("artifacts")).is_empty());
        assert!(files(&dir.path().join("uploads")).is_empty());
    }

    #[tokio::test]
    async fn an_artifact_changed_on_disk_is_set_aside_and_counts_as_absent() {
        let dir = tempfile::tempdir().unwrap();
        let store = local(dir.path());
        let bytes = content(4096);
        let sha = outpost_protocol::sha256(&bytes);
        store.put(sha, &bytes[..], u64::MAX).await.unwrap();
        let path = dir.path().join("artifacts").join(sha.to_hex());
        let mut changed = bytes.clone();
        changed[100] ^= 1;
        std::fs::write(&path, &changed).unwrap();
        assert_eq!(store.verified_length(&sha).await.unwrap(), None);
        assert_eq!(
            files(&dir.path().join("artifacts")),
            [format!("{}.corrupt", sha.to_hex())]
        );
        assert!(matches!(
            store.read(&sha, u64::MAX).await.unwrap_err(),
            ArtifactError::Store { .. }
        ));
        // Uploaded again, it is whole again.
        store.put(sha, &bytes[..], u64::MAX).await.unwrap();
        assert_eq!(store.verified_length(&sha).await.unwrap(), Some(4096));
    }

    #[test]
    fn presigned_urls_need_a_bucket() {
        let dir = tempfile::tempdir().unwrap();
        let config = ArtifactConfig {
            urls: ArtifactUrls::Signed,
            ..ArtifactConfig::default()
        };
        let error = ArtifactStore::open(dir.path(), &config).unwrap_err();
        assert!(error.to_string().contains("needs an S3 store"), "{error}");
        let config = ArtifactConfig {
            location: Some("gs://bucket".into()),
            ..ArtifactConfig::default()
        };
        let error = ArtifactStore::open(dir.path(), &config).unwrap_err();
        assert!(
            error.to_string().contains("expected s3://BUCKET"),
            "{error}"
        );
    }
}
