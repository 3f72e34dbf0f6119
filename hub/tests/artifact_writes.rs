//! How many bytes the local artifact store writes for an upload. Alone in its test binary: it
//! reads the whole process's I/O counters (`/proc/self/io`), which no other test may move.

use outpost_hub::artifacts::{ArtifactConfig, ArtifactStore};
use outpost_protocol::sha256;

/// Bytes this process has passed to `write` and its kin so far (`wchar`).
fn written() -> u64 {
    let io = std::fs::read_to_string("/proc/self/io").expect("reading /proc/self/io");
    io.lines()
        .find_map(|line| line.strip_prefix("wchar: "))
        .and_then(|value| value.trim().parse().ok())
        .expect("/proc/self/io has wchar")
}

/// An upload to the local directory is written once, into its staging file, and then renamed
/// under its name: not copied a second time through the store.
#[tokio::test]
async fn a_local_upload_is_written_once() {
    let dir = tempfile::tempdir().unwrap();
    let store = ArtifactStore::open(dir.path(), &ArtifactConfig::default()).unwrap();
    // Distinct bytes, more than one multipart part (the store's parts are 8 MiB).
    let length = 20 * 1024 * 1024;
    let mut state = 0x2545_f491_4f6c_dd1du64;
    let content: Vec<u8> = (0..length)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect();
    let hash = sha256(&content);

    let before = written();
    let stored = store
        .put(hash, content.as_slice(), length as u64 + 1)
        .await
        .unwrap();
    let wrote = written() - before;

    assert_eq!(stored, length as u64);
    assert_eq!(
        std::fs::read(dir.path().join("artifacts").join(hash.to_hex())).unwrap(),
        content
    );
    assert_eq!(
        store.verified_length(&hash).await.unwrap(),
        Some(length as u64)
    );
    // Once is `length`; a copy through the store would be twice that.
    assert!(
        wrote < length as u64 * 5 / 4,
        "an upload of {length} bytes wrote {wrote} bytes"
    );
}
