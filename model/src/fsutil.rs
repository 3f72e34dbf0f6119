//! Crash-safe file writes: a reader sees the old file or the whole new one, never a torn one.

use std::fs::{self, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use anyhow::Context;

/// Writes `bytes` to `path` via a temporary file in the same directory: write, fsync, rename,
/// fsync the directory. `mode` sets the permission bits the file is created with, so a private
/// key is never readable by others, not even for a moment.
pub fn write_atomic(path: &Path, bytes: &[u8], mode: u32) -> anyhow::Result<()> {
    let dir = path
        .parent()
        .filter(|dir| !dir.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let file_name = path
        .file_name()
        .with_context(|| format!("{} has no file name", path.display()))?;
    let temp = dir.join(format!(
        ".{}.tmp-{}",
        file_name.to_string_lossy(),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&temp)
            .with_context(|| format!("creating {}", temp.display()))?;
        file.write_all(bytes)
            .and_then(|()| file.sync_all())
            .with_context(|| format!("writing {}", temp.display()))?;
        fs::rename(&temp, path)
            .with_context(|| format!("renaming {} to {}", temp.display(), path.display()))?;
        File::open(dir)
            .and_then(|dir| dir.sync_all())
            .with_context(|| format!("syncing directory {}", dir.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

/// Removes the temporary files [`write_atomic`] left in `dir` when a process died mid-write
/// (`.NAME.tmp-PID` of another process than this one), and returns how many. Without it each
/// crash at such a moment would leave one more behind, for good. Call it at start, before this
/// process writes there, on a directory no other running process writes to.
pub fn remove_stale_temporaries(dir: &Path) -> anyhow::Result<usize> {
    let own = format!(".tmp-{}", std::process::id());
    let mut removed = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let path = entry?.path();
        let Some(name) = path.file_name().map(|name| name.to_string_lossy()) else {
            continue;
        };
        let stale = name.starts_with('.')
            && !name.ends_with(&own)
            && name.rsplit_once(".tmp-").is_some_and(|(_, pid)| {
                !pid.is_empty() && pid.bytes().all(|byte| byte.is_ascii_digit())
            });
        if stale && path.is_file() {
            fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
            removed += 1;
        }
    }
    Ok(removed)
}

/// Reads a file, refusing one larger than `max` bytes before reading it.
pub fn read_capped(path: &Path, max: u64) -> anyhow::Result<Vec<u8>> {
    let len = fs::metadata(path)
        .with_context(|| format!("reading {}", path.display()))?
        .len();
    anyhow::ensure!(
        len <= max,
        "{} is {len} bytes, over the {max}-byte limit",
        path.display()
    );
    fs::read(path).with_context(|| format!("reading {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    // Regression: an agent killed while `write_atomic` wrote its state left
    // `.state.bin.tmp-PID` behind, and every such crash added one more (crash_e2e found them).
    #[test]
    fn stale_temporaries_of_other_processes_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let own = format!(".state.bin.tmp-{}", std::process::id());
        let names = [
            ".state.bin.tmp-1",
            ".status.json.tmp-4294967295",
            own.as_str(),
            "state.bin",
            ".state.bin.tmp-",
            ".notes.tmp-abc",
            "visible.tmp-12",
        ];
        for name in names {
            fs::write(dir.path().join(name), b"x").unwrap();
        }
        assert_eq!(remove_stale_temporaries(dir.path()).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(dir.path())
            .unwrap()
            .map(|entry| entry.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        left.sort();
        let mut expected = vec![
            own.clone(),
            ".state.bin.tmp-".to_owned(),
            ".notes.tmp-abc".to_owned(),
            "state.bin".to_owned(),
            "visible.tmp-12".to_owned(),
        ];
        expected.sort();
        assert_eq!(left, expected);
    }

    #[test]
    fn write_atomic_leaves_only_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.bin");
        write_atomic(&path, b"old", 0o600).unwrap();
        write_atomic(&path, b"new", 0o600).unwrap();
        assert_eq!(fs::read(&path).unwrap(), b"new");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }
}
