//! `cargo xtask test`: every test `.ci/run` runs, in one order, each step timed, with every step
//! run even after one fails so that one red test binary hides no other.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use crate::install::{self, ARM_TARGETS};
use crate::Scope;

/// One cargo invocation of the run.
#[derive(Debug)]
struct Step {
    title: String,
    args: Vec<String>,
    env: Vec<(&'static str, &'static str)>,
}

fn steps(scope: Scope) -> Vec<Step> {
    let words = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let mut steps = vec![
        Step {
            title: "the workspace's tests, with the slow variants (OUTPOST_SLOW_TESTS=1)".into(),
            args: words("test --workspace --no-fail-fast"),
            env: vec![("OUTPOST_SLOW_TESTS", "1")],
        },
        // The first step runs the agents on tract (no library is configured); these suites run
        // again with every agent and API test model on ONNX Runtime, failing if any model falls
        // back: the same behaviour proven on both runtimes.
        Step {
            title: "the agent suites again on ONNX Runtime (OUTPOST_TEST_RUNTIME=onnxruntime)"
                .into(),
            args: words(
                "test --no-fail-fast -p outpost-agent --test api -p outpost-tests --test agent_e2e \
                 --test shadow_e2e --test several_models --test drift_e2e",
            ),
            env: vec![("OUTPOST_TEST_RUNTIME", "onnxruntime")],
        },
        // The first step runs every hub on SQLite in its data directory; these suites run again
        // with each hub's store in a PostgreSQL server of its own: rollouts, telemetry and drift,
        // several models, held check-ins and shadow stages over real processes on both engines.
        // (The store's own suite runs on both engines in the first step.)
        Step {
            title: "the hub suites again on PostgreSQL (OUTPOST_TEST_DATABASE=postgres)".into(),
            args: words(
                "test --no-fail-fast -p outpost-tests --test rollout_e2e --test hub_rollout \
                 --test drift_e2e --test several_models --test held_check_in --test shadow_e2e \
                 --test agent_e2e",
            ),
            env: vec![("OUTPOST_TEST_DATABASE", "postgres")],
        },
    ];
    if scope == Scope::All {
        for target in ARM_TARGETS {
            // Release: tract's kernels unoptimised are unusably slow under emulation, and the
            // ARM agent packages of `.ci/run` reuse these builds.
            steps.push(Step {
                title: format!("protocol, model and agent tests on {target}, under qemu-user"),
                args: words(&format!(
                    "test --release --no-fail-fast -p outpost-protocol -p outpost-model -p outpost-agent --target {target}"
                )),
                env: Vec::new(),
            });
        }
        steps.push(Step {
            title: "the aarch64 agent under qemu-aarch64 against the host's hub".into(),
            args: words("test -p outpost-tests --features arm-e2e --test arm_e2e"),
            env: Vec::new(),
        });
    }
    steps
}

pub fn run(scope: Scope) -> Result<(), String> {
    let started = Instant::now();
    let heading = |title: &str| println!("\n==> [{}s] {title}", started.elapsed().as_secs());
    heading("the tests' prerequisites");
    install::run(scope)?;
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    // The workspace's root: this crate's parent folder.
    let root = Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .ok_or("xtask has no parent folder")?;
    let mut results = Vec::new();
    for step in steps(scope) {
        heading(&step.title);
        let step_started = Instant::now();
        let status = Command::new(&cargo)
            .args(&step.args)
            .envs(step.env.iter().copied())
            .current_dir(root)
            .status()
            .map_err(|error| format!("running {cargo}: {error}"))?;
        results.push((step, status.success(), step_started.elapsed().as_secs()));
    }
    println!("\n==> [{}s] summary", started.elapsed().as_secs());
    for (step, passed, seconds) in &results {
        let verdict = if *passed { "ok    " } else { "FAILED" };
        println!("{verdict} {seconds:>5}s  cargo {}", step.args.join(" "));
    }
    let failed = results.iter().filter(|(_, passed, _)| !passed).count();
    if failed == 0 {
        println!("all tests passed in {}s", started.elapsed().as_secs());
        Ok(())
    } else {
        Err(format!(
            "{failed} of {} test steps failed (above)",
            results.len()
        ))
    }
}
