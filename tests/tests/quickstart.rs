//! The README's first command, `outpost-hub quickstart`, run as a newcomer runs it: a hub, two
//! agents, a staged rollout with inference traffic, the fleet and drift printed, all stopped.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use outpost_tests::agent::AGENT_WAIT;
use outpost_tests::{run, wait_until};

#[test]
fn quickstart_rolls_a_model_out_to_real_agents_and_reports_drift() {
    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("tour");
    let out = run(
        "outpost-hub",
        dir.path(),
        &[
            "quickstart",
            "--agents",
            "2",
            "--dir",
            &work.to_string_lossy(),
        ],
    )
    .ok();
    let text = out.stdout;
    for expected in [
        "hub listening on http://127.0.0.1:",
        "published demo@1 and demo@2",
        "every agent serves demo@1",
        "stage 1 of 3: 34% of the fleet on demo@2",
        "rollout 2 completed after",
        "stopped the hub and agents",
    ] {
        assert!(text.contains(expected), "no {expected:?} in:\n{text}");
    }
    // Both agents run the new version, by the hub's account.
    let fleet: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.contains("==> the fleet"))
        .take_while(|line| !line.contains("==> the rollout"))
        .filter(|line| line.contains("site=quickstart"))
        .collect();
    assert_eq!(fleet.len(), 2, "{text}");
    assert!(fleet.iter().all(|line| line.contains("demo@2")), "{text}");
    // The agent fed shifted x1 and x3 shows exactly those inputs drifting.
    let agent1: Vec<&str> = text
        .lines()
        .skip_while(|line| !line.contains("==> drift of demo@2 on agent 1"))
        .take_while(|line| !line.contains("==> drift of demo@2 on the whole fleet"))
        .collect();
    let status_of = |feature: &str| {
        agent1
            .iter()
            .find(|line| line.trim_start().starts_with(&format!("{feature} ")))
            .unwrap_or_else(|| panic!("no {feature} row in:\n{}", agent1.join("\n")))
            .to_owned()
    };
    assert!(status_of("x1").contains("ALERT"), "{}", agent1.join("\n"));
    assert!(status_of("x3").contains("ALERT"), "{}", agent1.join("\n"));
    // x0 and x2 are unshifted; with the few dozen requests a tour sends they may still read as
    // noise, so they are only required to be present.
    status_of("x0");
    status_of("x2");
    // Everything stopped; the logs stay in the directory given.
    for log in ["hub.log", "agent-0/agent.log", "agent-1/agent.log"] {
        assert!(work.join(log).is_file(), "{log}");
    }
    let hub_log = std::fs::read_to_string(work.join("hub.log")).unwrap();
    assert!(!hub_log.contains("panicked"), "{hub_log}");
}

/// The address after `label` on the first line of `lines` that has it: `http://127.0.0.1:PORT`.
fn address_after(lines: &[String], label: &str) -> String {
    let line = lines
        .iter()
        .find(|line| line.trim_start().starts_with(label))
        .unwrap_or_else(|| panic!("no {label:?} line in:\n{}", lines.join("\n")));
    let url = line
        .split_whitespace()
        .find(|word| word.starts_with("http://"))
        .unwrap();
    url.trim_start_matches("http://")
        .trim_end_matches(',')
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

/// SIGKILLs a process group when dropped.
struct KillGroupOnDrop(u32);

impl Drop for KillGroupOnDrop {
    fn drop(&mut self) {
        let _ = std::process::Command::new("kill")
            .args(["-s", "KILL", "--", &format!("-{}", self.0)])
            .stderr(std::process::Stdio::null())
            .status();
    }
}

/// Issue 21, also seen: SIGTERM to `quickstart --keep` (what a service manager or `kill` sends)
/// ended it but left the hub and its agents running, orphaned, holding their ports. It stops
/// them as Ctrl-C does.
#[test]
fn sigterm_to_a_kept_quickstart_stops_its_hub_and_agents() {
    use std::io::{BufRead, BufReader};
    use std::os::unix::process::CommandExt;
    use std::process::{Command, Stdio};

    let dir = tempfile::tempdir().unwrap();
    let work = dir.path().join("tour");
    // In a process group of its own, which the guard kills whole if the test fails: a failing
    // test must not leave a hub and agents behind too.
    let mut tour = Command::new(outpost_tests::bin("outpost-hub"))
        .args(["quickstart", "--keep", "--agents", "1", "--dir"])
        .arg(&work)
        .current_dir(dir.path())
        .process_group(0)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _group = KillGroupOnDrop(tour.id());
    let stdout = BufReader::new(tour.stdout.take().unwrap());
    // Up to the first line of the kept tour: the signal goes at once, so the tour must listen for
    // it before it says it is still running.
    let mut lines = Vec::new();
    for line in stdout.lines() {
        let line = line.unwrap();
        let kept = line.contains("still running");
        lines.push(line);
        if kept {
            break;
        }
    }
    let hub = address_after(&lines, "hub listening on");
    let agent = address_after(&lines, "agent 0:");
    for address in [&hub, &agent] {
        std::net::TcpStream::connect(address)
            .unwrap_or_else(|error| panic!("{address} is not listening: {error}"));
    }

    let status = Command::new("kill")
        .args(["-TERM", &tour.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    tour.wait().unwrap();
    for (what, address) in [("the hub", &hub), ("agent 0", &agent)] {
        wait_until(AGENT_WAIT, &format!("{what} at {address} to stop"), || {
            std::net::TcpStream::connect(address).is_err().then_some(())
        });
    }
}
