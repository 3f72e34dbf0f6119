//! The telemetry cache near its cap: what a device offline for months pays per append.
//!
//! Fills a cache with a 64 MiB cap (the default) to 81% with one window a day, the shape a long
//! offline spell leaves once roll-ups have merged each day's hours, then runs a fresh process that
//! opens it and appends six hourly windows of the next day, as the agent does at each telemetry
//! flush. For the open and for each append it reports the time, the records the roll-up read, and
//! the process's resident set, its peak and its anonymous part (`/proc/self/status`).
//!
//! A measurement, never a pass/fail test: `cargo bench -p outpost-tests --bench telemetry_cache`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use outpost_agent::cache::TelemetryCache;
use outpost_protocol::device::{InferenceWindow, LATENCY_BUCKETS_US};
use outpost_tests::bench::proc_status_field;

const CAP: u64 = 64 << 20;
const DAY: u64 = 86_400;
const HOUR: u64 = 3_600;
/// A UTC midnight.
const DAY0: u64 = 1_700_006_400;
const APPENDS: u64 = 6;

fn window(start: u64) -> InferenceWindow {
    InferenceWindow {
        model: "model".to_owned(),
        version: 1,
        start,
        end: start + HOUR,
        count: 1000,
        errors: 1,
        latency_buckets: vec![1000; LATENCY_BUCKETS_US.len() + 1],
        drift: None,
        shadow: None,
    }
}

/// `VmRSS`, `VmHWM` and `RssAnon` of this process, in MiB.
fn memory() -> String {
    let mib = |field: &str| proc_status_field("self", field) as f64 / 1024.0;
    format!(
        "{:.1} | {:.1} | {:.1}",
        mib("VmRSS:"),
        mib("VmHWM:"),
        mib("RssAnon:")
    )
}

/// Fills `dir` to 81% of the cap with one window a day; returns the days filled.
fn fill(dir: &Path) -> u64 {
    let (cache, _) = TelemetryCache::open(dir, CAP).unwrap();
    let mut day = 0u64;
    while cache.stats().queue_bytes < CAP * 81 / 100 {
        let windows: Vec<InferenceWindow> = (0..200)
            .map(|_| {
                day += 1;
                window(DAY0 + day * DAY)
            })
            .collect();
        cache.append(&windows).unwrap();
    }
    let stats = cache.stats();
    println!(
        "filled: {} windows, {} of {} bytes, {} MiB on disk",
        stats.queued_windows,
        stats.queue_bytes,
        stats.cap_bytes,
        dir_size(dir) >> 20
    );
    day
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            if entry.file_type().unwrap().is_dir() {
                dir_size(&entry.path())
            } else {
                entry.metadata().unwrap().len()
            }
        })
        .sum()
}

/// In a fresh process: open the filled cache and append hours of the day after `days`.
fn measure(dir: &Path, days: u64) {
    println!("| Step | Time | Records the roll-up read | VmRSS MiB | VmHWM MiB | anonymous MiB |");
    println!("|---|---:|---:|---:|---:|---:|");
    let started = Instant::now();
    let (cache, _) = TelemetryCache::open(dir, CAP).unwrap();
    println!(
        "| open (scans every record) | {:.0?} | – | {} |",
        started.elapsed(),
        memory()
    );
    for hour in 0..APPENDS {
        let started = Instant::now();
        let outcome = cache
            .append(&[window(DAY0 + (days + 1) * DAY + hour * HOUR)])
            .unwrap();
        println!(
            "| append {} | {:.1?} | {} | {} |",
            hour + 1,
            started.elapsed(),
            outcome.rolled_up_records,
            memory()
        );
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|arg| arg == "--measure") {
        let dir = Path::new(&args[at + 1]);
        let days: u64 = args[at + 2].parse().unwrap();
        measure(dir, days);
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("telemetry");
    let days = fill(&dir);
    let status = Command::new(std::env::current_exe().unwrap())
        .args(["--measure", &dir.to_string_lossy(), &days.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "the measuring process failed");
}
