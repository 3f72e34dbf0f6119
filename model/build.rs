//! Records the tract version this crate is built with (from the workspace's `Cargo.lock`), so an
//! agent can report which runtime serves a model down to its version.

use std::path::Path;

fn main() {
    let manifest_dir = std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default();
    let version = Path::new(&manifest_dir)
        .ancestors()
        .map(|dir| dir.join("Cargo.lock"))
        .find(|lock| lock.is_file())
        .and_then(|lock| {
            println!("cargo:rerun-if-changed={}", lock.display());
            std::fs::read_to_string(lock).ok()
        })
        .and_then(|lock| tract_version(&lock))
        .unwrap_or_else(|| "unknown".to_owned());
    println!("cargo:rustc-env=OUTPOST_TRACT_VERSION={version}");
    println!("cargo:rerun-if-changed=build.rs");
}

/// The version of the `tract-core` package in a lock file.
fn tract_version(lock: &str) -> Option<String> {
    let mut lines = lock.lines();
    while let Some(line) = lines.next() {
        if line.trim() == "name = \"tract-core\"" {
            let version = lines.next()?.trim();
            return version
                .strip_prefix("version = \"")
                .and_then(|rest| rest.strip_suffix('"'))
                .map(str::to_owned);
        }
    }
    None
}
