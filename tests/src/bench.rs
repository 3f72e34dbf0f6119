//! What the benches share: the release hub they measure and the description of the machine they
//! ran on, printed with every result.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::workspace_root;

/// The hub binary under test: `OUTPOST_HUB_BIN`, or a fresh release build.
pub fn release_hub_binary() -> PathBuf {
    if let Ok(path) = std::env::var("OUTPOST_HUB_BIN") {
        // The CLI runs in the hub's temporary directory, so a relative path would not resolve.
        return std::fs::canonicalize(&path)
            .unwrap_or_else(|error| panic!("OUTPOST_HUB_BIN={path}: {error}"));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let status = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "outpost-hub",
            "--bin",
            "outpost-hub",
        ])
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build --release for outpost-hub");
    assert!(status.success(), "building the release outpost-hub failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join("target"));
    target.join("release").join("outpost-hub")
}

/// A number field of `/proc/<pid>/status` (`VmRSS:` and `VmHWM:` in KiB, `Threads:`); `pid` may
/// be `self`.
pub fn proc_status_field(pid: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_else(|error| panic!("reading /proc/{pid}/status: {error}"));
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|number| number.parse().ok())
        .unwrap_or_else(|| panic!("/proc/{pid}/status has no number for {field}"))
}

fn first_line(path: &Path, prefix: &str) -> String {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .find(|line| line.starts_with(prefix))
        .and_then(|line| line.split_once(':'))
        .map_or_else(
            || "unknown".to_owned(),
            |(_, value)| value.trim().to_owned(),
        )
}

/// The machine, the compiler and the load before a run, for the first line of a bench's report.
pub fn machine_description() -> String {
    let cpu = first_line(Path::new("/proc/cpuinfo"), "model name");
    let cpus = std::thread::available_parallelism().map_or(0, usize::from);
    let memory = first_line(Path::new("/proc/meminfo"), "MemTotal");
    let rustc = Command::new(std::env::var("RUSTC").unwrap_or_else(|_| "rustc".to_owned()))
        .arg("-V")
        .output()
        .map(|output| String::from_utf8_lossy(&output.stdout).trim().to_owned())
        .unwrap_or_else(|_| "rustc unknown".to_owned());
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let load: Vec<&str> = load.split_whitespace().take(3).collect();
    format!(
        "{cpu}, {cpus} CPUs, {memory} RAM, {rustc}; load average before the run {}",
        load.join(" ")
    )
}

/// A whole number from the environment variable `name`, or `default` when it is not set.
pub fn env_number(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => text
            .trim()
            .parse()
            .unwrap_or_else(|_| panic!("{name}={text:?} is not a whole number")),
        Err(_) => default,
    }
}
