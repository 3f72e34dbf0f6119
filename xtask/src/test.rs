//! `cargo xtask test`: every test `.ci/run` runs, in one order, each step timed, with every step
//! run even after one fails so that one red test binary hides no other.
//!
//! The ARM suites' release builds run in the background, one job at a time, while the host's
//! tests run: those spend much of their time waiting on processes they started, and a cross build
//! locks only `target/release` and `target/<triple>/release`, never the host tests' `target/debug`.
//! When the host's steps are done, a background build still running is interrupted (as Ctrl-C
//! would: cargo keeps every crate it finished) and the ARM steps build the rest with every core.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
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

fn words(line: &str) -> Vec<String> {
    line.split_whitespace().map(str::to_owned).collect()
}

/// The cargo arguments of the ARM suites on `target`: release, since tract's kernels unoptimised
/// are unusably slow under emulation, and the ARM agent packages of `.ci/run` reuse these builds.
fn arm_suites(target: &str) -> Vec<String> {
    words(&format!(
        "test --release --no-fail-fast {ARM_PACKAGES} --target {target}"
    ))
}

/// The packages whose suites run on ARM: built in the background and run by the ARM steps.
const ARM_PACKAGES: &str = "-p outpost-protocol -p outpost-model -p outpost-agent";

fn steps(scope: Scope) -> Vec<Step> {
    let mut steps = vec![
        // Every step names `--workspace`, even one that runs a few test targets (`--test NAME`):
        // cargo resolves features over the packages a command selects, so `-p PACKAGE` would
        // build another variant of the shared dependencies and of the tests (minutes a step on a
        // fresh clone) where `--workspace` reuses the first step's build.
        Step {
            title: "the workspace's tests built".into(),
            args: words("test --workspace --no-run"),
            env: Vec::new(),
        },
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
                "test --no-fail-fast --workspace --test api --test agent_e2e --test shadow_e2e \
                 --test several_models --test drift_e2e",
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
                "test --no-fail-fast --workspace --test rollout_e2e --test hub_rollout \
                 --test drift_e2e --test several_models --test held_check_in --test shadow_e2e \
                 --test agent_e2e",
            ),
            env: vec![("OUTPOST_TEST_DATABASE", "postgres")],
        },
    ];
    if scope == Scope::All {
        for target in ARM_TARGETS {
            steps.push(Step {
                title: format!("protocol, model and agent tests on {target}, under qemu-user"),
                args: arm_suites(target),
                env: Vec::new(),
            });
        }
        steps.push(Step {
            title: "the aarch64 agent under qemu-aarch64 against the host's hub".into(),
            args: words("test --workspace --features outpost-tests/arm-e2e --test arm_e2e"),
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
    let mut arm_builds = None;
    for step in steps(scope) {
        if step.args.iter().any(|arg| arg == "--target") {
            if let Some(builds) = arm_builds.take() {
                heading("waiting for the ARM suites' background build");
                results.push(finish_arm_builds(builds));
            }
        }
        heading(&step.title);
        let step_started = Instant::now();
        let status = crate::cargo(&cargo)
            .args(&step.args)
            .envs(step.env.iter().copied())
            .current_dir(root)
            .status()
            .map_err(|error| format!("running {cargo}: {error}"))?;
        let built_host_tests = step.args.iter().any(|arg| arg == "--no-run");
        results.push((step, status.success(), step_started.elapsed().as_secs()));
        if built_host_tests && scope == Scope::All {
            arm_builds = Some(start_arm_builds(&cargo, root)?);
        }
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

/// Where the background ARM build writes its output, under the workspace's `target/`.
const ARM_BUILD_LOG: &str = "target/xtask-arm-build.log";

/// The background build of the ARM suites: one cargo run for both targets, in a process group
/// of its own so that interrupting it reaches its compilers too.
struct ArmBuilds {
    child: Child,
    started: Instant,
    log: std::path::PathBuf,
}

/// Starts building the ARM suites (`--no-run`, one job, both targets in one cargo run), writing
/// cargo's output to [`ARM_BUILD_LOG`].
fn start_arm_builds(cargo: &str, root: &Path) -> Result<ArmBuilds, String> {
    let log = root.join(ARM_BUILD_LOG);
    let file =
        File::create(&log).map_err(|error| format!("creating {}: {error}", log.display()))?;
    let err = file
        .try_clone()
        .map_err(|error| format!("opening {}: {error}", log.display()))?;
    let mut args = words(&format!("test --release --no-run -j 1 {ARM_PACKAGES}"));
    for target in ARM_TARGETS {
        args.extend(["--target".to_owned(), target.to_owned()]);
    }
    println!(
        "xtask: building the ARM suites in the background, one job at a time, into {ARM_BUILD_LOG}"
    );
    let child = crate::cargo(cargo)
        .args(&args)
        .current_dir(root)
        .stdin(Stdio::null())
        .stdout(file)
        .stderr(err)
        .process_group(0)
        .spawn()
        .map_err(|error| format!("running {cargo}: {error}"))?;
    Ok(ArmBuilds {
        child,
        started: Instant::now(),
        log,
    })
}

/// Ends the background ARM build and makes it a step of the summary. One still running is
/// interrupted with SIGINT to its process group and counts as passed: the ARM steps after it
/// build what it left, with every core, and fail there if it does not build. One that ended on
/// its own and failed prints the end of its log.
fn finish_arm_builds(mut builds: ArmBuilds) -> (Step, bool, u64) {
    let running = matches!(builds.child.try_wait(), Ok(None));
    if running {
        let group = format!("-{}", builds.child.id());
        let interrupted = Command::new("kill")
            .args(["-INT", "--", &group])
            .status()
            .is_ok_and(|status| status.success());
        println!(
            "xtask: the host's steps are done and the ARM suites' background build is not: {} \
             it after {}s; the ARM steps build the rest",
            if interrupted {
                "interrupted"
            } else {
                "could not interrupt, waiting for"
            },
            builds.started.elapsed().as_secs()
        );
    }
    let status = builds.child.wait();
    let passed = running || status.is_ok_and(|status| status.success());
    let seconds = builds.started.elapsed().as_secs();
    println!("xtask: the ARM suites' background build took {seconds}s in all");
    if !passed {
        let text = std::fs::read_to_string(&builds.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        println!("xtask: it failed; the end of {}:", builds.log.display());
        for line in &lines[lines.len().saturating_sub(60)..] {
            println!("{line}");
        }
    }
    let step = Step {
        title: "the ARM suites built in the background".into(),
        args: words("test --release --no-run -j 1 (ARM targets, in the background)"),
        env: Vec::new(),
    };
    (step, passed, seconds)
}
