//! The agent's memory footprint, measured on the real release binary against a real hub.
//!
//! Builds `outpost-hub` and `outpost-agent` in the release profile, starts a hub with a 2-of-2
//! root, enrolls one agent and reads its resident set (`VmRSS`) and peak (`VmHWM`) from
//! `/proc/<pid>/status` at each step:
//! 1. idle: enrolled and checking in, no model;
//! 2. the small example MLP (4 → 8 → 3) active, then after 1000 inference requests;
//! 3. a wide MLP (4 → 131072 → 3, about 4 MiB of weights) active, then after 1000 requests.
//!
//! Each reading also splits the resident set into anonymous memory (heap, stacks) and file pages
//! (the binary's code and data), and counts threads; the idle one lists the largest mappings.
//!
//! This is a measurement, never a pass/fail test: `cargo bench -p outpost-tests --bench
//! agent_footprint`. `OUTPOST_FOOTPRINT_AGENT=PATH` runs that agent binary (a `dist` build, say)
//! against the release hub instead of the release agent.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::bench::proc_status_field;
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{use_binaries_from, wait_until, workspace_root};
use serde_json::json;

/// Time the agent is left alone before each reading, so start-up work has settled.
const SETTLE: Duration = Duration::from_secs(3);
const REQUESTS: usize = 1000;
/// Hidden width of the large model.
const WIDE_HIDDEN: &str = "131072";

/// One reading of `/proc/<pid>/status`: sizes in KiB.
struct Memory {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
    threads: u64,
}

fn memory(pid: u32) -> Memory {
    let pid = pid.to_string();
    let field = |name: &str| proc_status_field(&pid, name);
    Memory {
        rss: field("VmRSS:"),
        hwm: field("VmHWM:"),
        anon: field("RssAnon:"),
        file: field("RssFile:"),
        threads: field("Threads:"),
    }
}

/// The `count` mappings of `pid` with the largest resident sets: (KiB, mapping), largest first.
/// Anonymous mappings are named by their size, which tells a thread stack or a malloc arena apart.
fn largest_mappings(pid: u32, count: usize) -> Vec<(u64, String)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap();
    let mut mappings: Vec<(u64, String)> = Vec::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if let Some(rss) = line.strip_prefix("Rss:") {
            let kib = rss.trim().trim_end_matches("kB").trim().parse().unwrap();
            mappings.push((kib, current.clone()));
        } else if first.contains('-') && !first.ends_with(':') {
            let (start, end) = first.split_once('-').unwrap();
            let size =
                u64::from_str_radix(end, 16).unwrap() - u64::from_str_radix(start, 16).unwrap();
            let perms = words.next().unwrap_or_default();
            let name = words.nth(3).unwrap_or("[anon]");
            current = format!("{name} {perms} ({} KiB mapped)", size / 1024);
        }
    }
    mappings.sort_by_key(|mapping| std::cmp::Reverse(mapping.0));
    mappings.truncate(count);
    mappings
}

fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

fn disk_usage(dir: &Path) -> u64 {
    let mut total = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let entry = entry.unwrap();
        let meta = entry.metadata().unwrap();
        total += if meta.is_dir() {
            disk_usage(&entry.path())
        } else {
            meta.len()
        };
    }
    total
}

fn publish(hub: &TestHub, fleet: &Fleet, version: u64, hidden: &str) -> u64 {
    let dir =
        fleet.publish_example_with(hub, "demo", version, version, false, &["--hidden", hidden]);
    std::fs::metadata(dir.join("model.onnx")).unwrap().len()
}

fn main() {
    let root = workspace_root();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_owned());
    let built = Command::new(cargo)
        .args([
            "build",
            "--release",
            "-p",
            "outpost-hub",
            "-p",
            "outpost-agent",
        ])
        .current_dir(&root)
        .status()
        .unwrap();
    assert!(built.success(), "building the release binaries failed");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(Into::into)
        .unwrap_or_else(|| root.join("target"));
    let release = target.join("release");
    let agent_binary = match std::env::var_os("OUTPOST_FOOTPRINT_AGENT") {
        Some(path) => {
            // The harness runs both binaries from one directory.
            let dir = target.join("footprint-bins");
            std::fs::create_dir_all(&dir).unwrap();
            for (name, from) in [
                ("outpost-hub", release.join("outpost-hub")),
                ("outpost-agent", std::path::PathBuf::from(path)),
            ] {
                let _ = std::fs::remove_file(dir.join(name));
                std::os::unix::fs::symlink(std::fs::canonicalize(&from).unwrap(), dir.join(name))
                    .unwrap_or_else(|e| panic!("linking {}: {e}", from.display()));
            }
            use_binaries_from(dir.clone());
            dir.join("outpost-agent")
        }
        None => {
            use_binaries_from(release.clone());
            release.join("outpost-agent")
        }
    };

    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let small = publish(&hub, &fleet, 1, "8");
    let wide = publish(&hub, &fleet, 2, WIDE_HIDDEN);
    let mut agent = TestAgent::enroll(&hub, &fleet, "site=bench", "");
    agent.start();
    wait_until(AGENT_WAIT, "the first check-in", || {
        agent.status()["last_checkin"].as_u64()
    });

    let client = http();
    let mut rows: Vec<(String, Memory)> = Vec::new();
    let mut read = |label: String, agent: &TestAgent| {
        std::thread::sleep(SETTLE);
        rows.push((label, memory(agent.pid())));
    };
    let serve = |agent: &TestAgent| {
        for i in 0..REQUESTS {
            let x = i as f32;
            let (status, body) = agent.infer(&client, [x, 1.0, 2.0, 3.0]);
            assert_eq!(status, 200, "{body}");
        }
    };

    read("idle, enrolled, no model".to_owned(), &agent);
    let idle_mappings = largest_mappings(agent.pid(), 12);
    fleet.first_rollout(&hub, "demo", 1);
    agent.wait_status("active", json!("demo@1"));
    read(format!("small MLP active ({small} B ONNX)"), &agent);
    serve(&agent);
    read(format!("small MLP after {REQUESTS} requests"), &agent);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "100", "--bake", "1s"]);
    agent.wait_status("active", json!("demo@2"));
    read(
        format!(
            "wide MLP active ({:.1} MiB ONNX), small one kept",
            wide as f64 / 1048576.0
        ),
        &agent,
    );
    serve(&agent);
    read(format!("wide MLP after {REQUESTS} requests"), &agent);

    println!(
        "agent: {} ({} bytes)",
        std::fs::canonicalize(&agent_binary).unwrap().display(),
        std::fs::metadata(&agent_binary).unwrap().len()
    );
    println!();
    println!("| Agent state | VmRSS | VmHWM (peak so far) | anonymous | file | threads |");
    println!("|---|---:|---:|---:|---:|---:|");
    for (label, m) in &rows {
        println!(
            "| {label} | {} | {} | {} | {} | {} |",
            mib(m.rss),
            mib(m.hwm),
            mib(m.anon),
            mib(m.file),
            m.threads
        );
    }
    println!();
    println!("largest mappings when idle (resident KiB, mapping):");
    for (kib, mapping) in &idle_mappings {
        println!("  {kib:>6}  {mapping}");
    }
    println!();
    println!(
        "data directory after both versions: {}",
        mib(disk_usage(&agent.data()) / 1024)
    );
}
