//! The README's first command, `outpost-hub quickstart`, run as a newcomer runs it: a hub, two
//! agents, a staged rollout with inference traffic, the fleet and drift printed, all stopped.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use outpost_tests::run;

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
