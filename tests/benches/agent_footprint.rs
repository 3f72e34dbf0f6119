//! The agent's memory footprint, measured on the real release binary against a real hub.
//!
//! Builds `outpost-hub` and `outpost-agent` in the release profile, starts a hub with a 2-of-2
//! root, enrolls one agent and reads its resident set (`VmRSS`) and peak (`VmHWM`) from
//! `/proc/<pid>/status` at each step:
//! 1. idle: enrolled and checking in, no model;
//! 2. the small example MLP (4 → 8 → 3) active, then after 1000 inference requests;
//! 3. a wide MLP (4 → 131072 → 3, about 4 MiB of weights) active, then after 1000 requests.
//!
//! This is a measurement, never a pass/fail test: `cargo bench -p outpost-tests --bench
//! agent_footprint`.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{use_binaries_from, wait_until, workspace_root};
use serde_json::json;

/// Time the agent is left alone before each reading, so start-up work has settled.
const SETTLE: Duration = Duration::from_secs(3);
const REQUESTS: usize = 1000;
/// Hidden width of the large model.
const WIDE_HIDDEN: &str = "131072";

/// `VmRSS` and `VmHWM` of `pid`, in KiB.
fn memory(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|line| line.strip_prefix(name))
            .and_then(|rest| rest.split_whitespace().next())
            .and_then(|kib| kib.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in /proc/{pid}/status"))
    };
    (field("VmRSS:"), field("VmHWM:"))
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
    use_binaries_from(target.join("release"));

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
    let mut rows: Vec<(String, (u64, u64))> = Vec::new();
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

    println!("agent: {}", target.join("release/outpost-agent").display());
    println!();
    println!("| Agent state | VmRSS | VmHWM (peak so far) |");
    println!("|---|---:|---:|");
    for (label, (rss, hwm)) in &rows {
        println!("| {label} | {} | {} |", mib(*rss), mib(*hwm));
    }
    println!();
    println!(
        "data directory after both versions: {}",
        mib(disk_usage(&agent.data()) / 1024)
    );
}
