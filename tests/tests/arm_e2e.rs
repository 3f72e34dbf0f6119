//! An aarch64 agent against an x86_64 hub: the agent cross-built for `aarch64-unknown-linux-gnu`
//! runs under qemu-user, enrolls with the host's hub, takes a first rollout and then a staged one,
//! and serves inference through its local HTTP API with the same answers tract gives on the host.
//!
//! It needs the cross-built agent and qemu, which `cargo test --workspace` neither builds nor
//! installs, so it is built only with the `arm-e2e` feature of `outpost-tests`; `cargo xtask test`
//! (the README's test command) installs qemu, builds the agent and runs it. By hand:
//!
//! ```sh
//! cargo xtask install
//! cargo test --release -p outpost-protocol -p outpost-agent --target aarch64-unknown-linux-gnu --no-run
//! cargo test -p outpost-tests --features arm-e2e --test arm_e2e
//! ```
//!
//! `OUTPOST_AARCH64_AGENT` names another agent binary; `OUTPOST_AARCH64_RUNNER` another emulator
//! command (default: the runner in `.cargo/config.toml`). A missing binary or emulator fails the
//! test.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::PathBuf;
use std::time::{Duration, Instant};

use outpost_hub::api::{DeviceDetail, RolloutState};
use outpost_model::inference::LoadedModel;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;
use outpost_tests::agent::{http, AgentProgram, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;
use serde_json::{json, Value};

const TARGET: &str = "aarch64-unknown-linux-gnu";
/// The same emulator command as `.cargo/config.toml`'s runner for [`TARGET`].
const DEFAULT_RUNNER: &str = "qemu-aarch64 -L /usr/aarch64-linux-gnu";
/// ELF `e_machine` of aarch64 (EM_AARCH64).
const EM_AARCH64: u16 = 183;
/// Under qemu the agent runs several times slower than natively (tract most of all), so each
/// wait is five of the native ones: still bounded, and far above what it takes on 2 busy cores.
const EMULATED_WAIT: Duration = Duration::from_secs(5 * AGENT_WAIT.as_secs());

/// The aarch64 agent behind its emulator, checked to be what it claims before any test uses it.
fn aarch64_agent() -> AgentProgram {
    let binary = match std::env::var_os("OUTPOST_AARCH64_AGENT") {
        Some(path) => PathBuf::from(path),
        // CARGO_TARGET_TMPDIR is `<target dir>/tmp`.
        None => PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
            .parent()
            .unwrap()
            .join(TARGET)
            // Release, as `cargo xtask test` builds it: the arm64 package reuses that build.
            .join("release/outpost-agent"),
    };
    let header = std::fs::read(&binary).unwrap_or_else(|error| {
        panic!(
            "no aarch64 agent at {} ({error}): `cargo xtask test` builds it, or by hand \
             `cargo test --release -p outpost-protocol -p outpost-agent --target {TARGET} \
             --no-run`; or set OUTPOST_AARCH64_AGENT",
            binary.display()
        )
    });
    assert!(
        header.len() > 20 && header.starts_with(b"\x7fELF"),
        "{} is not an ELF file",
        binary.display()
    );
    let machine = u16::from_le_bytes([header[18], header[19]]);
    assert_eq!(
        machine,
        EM_AARCH64,
        "{} is not an aarch64 binary",
        binary.display()
    );
    let runner = std::env::var("OUTPOST_AARCH64_RUNNER").unwrap_or_else(|_| DEFAULT_RUNNER.into());
    let launcher: Vec<String> = runner.split_whitespace().map(str::to_owned).collect();
    assert!(!launcher.is_empty(), "OUTPOST_AARCH64_RUNNER is empty");
    // One run through the emulator before the real ones, so a missing qemu or sysroot fails here
    // with its own message rather than as an enrollment that "failed".
    let output = std::process::Command::new(&launcher[0])
        .args(&launcher[1..])
        .arg(&binary)
        .arg("--version")
        .output()
        .unwrap_or_else(|error| {
            panic!("running {runner}: {error} (`cargo xtask install` installs qemu-user; or set OUTPOST_AARCH64_RUNNER)")
        });
    assert!(
        output.status.success(),
        "{runner} {} --version failed: {}",
        binary.display(),
        String::from_utf8_lossy(&output.stderr)
    );
    AgentProgram::emulated(launcher, binary, EMULATED_WAIT)
}

fn device(hub: &TestHub, agent: &TestAgent) -> DeviceDetail {
    let id = agent.status()["device_id"].as_str().unwrap().to_owned();
    hub.cli_json(&["device", "show", &id])
}

/// What tract on this (x86_64) host answers for the model in `dir` at input `x`.
fn host_answer(dir: &std::path::Path, x: [f32; 4]) -> Vec<f32> {
    let onnx = std::fs::read(dir.join("model.onnx")).unwrap();
    let (inputs, outputs) = LoadedModel::describe(&onnx).unwrap();
    let model = LoadedModel::load(&onnx, &inputs, &outputs, 1).unwrap();
    let input = Tensor {
        name: "x".to_owned(),
        dtype: DType::F32,
        shape: vec![1, 4],
        data: x.iter().flat_map(|v| v.to_le_bytes()).collect(),
    };
    let answer = model.run(&[input]).unwrap();
    answer[0]
        .data
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().unwrap()))
        .collect()
}

/// Sends `x` to the agent and checks that it answers with `version`, as the host would.
fn assert_serves(agent: &TestAgent, version: u64, model_dir: &std::path::Path, x: [f32; 4]) {
    let (status, body) = agent.infer(&http(), x);
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["model_version"], json!(version.to_string()));
    assert_eq!(body["outputs"][0]["shape"], json!([1, 3]));
    let served: Vec<f32> = body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap() as f32)
        .collect();
    let expected = host_answer(model_dir, x);
    // Both run the same tract code, but with each CPU's own kernels (NEON against AVX), so the
    // sums may round differently in the last bits.
    for (got, want) in served.iter().zip(&expected) {
        assert!(
            (got - want).abs() < 1e-5,
            "aarch64 answered {served:?}, x86_64 {expected:?}"
        );
    }
    assert_eq!(served.len(), expected.len());
}

#[test]
fn an_aarch64_agent_under_qemu_rolls_out_and_serves_against_an_x86_64_hub() {
    let program = aarch64_agent();
    let started = Instant::now();
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    // `model publish` signs for every architecture unless told otherwise.
    let v1 = fleet.publish_example_with(&hub, "demo", 1, 1, false, &[]);
    fleet.first_rollout(&hub, "demo", 1);
    let mut agent = TestAgent::enroll_program(program, &hub.url(), &hub, &fleet, "site=arm", "");
    agent.start();
    agent.wait_status("active", json!("demo@1"));
    // The hub knows the device by what the emulated agent reported of itself.
    let detail = device(&hub, &agent);
    assert_eq!(detail.device.arch, "aarch64", "{detail:?}");
    assert_serves(&agent, 1, &v1, [0.5, -1.0, 2.0, 0.25]);
    eprintln!("aarch64 agent serving demo@1 after {:?}", started.elapsed());

    // A staged rollout to version 2: the agent downloads it, validates it under probation on
    // aarch64, commits, and the hub completes the rollout.
    let v2 = fleet.publish_example_with(&hub, "demo", 2, 2, false, &[]);
    fleet.create_rollout(&hub, "demo", 2, 1, &["--stages", "50,100", "--bake", "1s"]);
    agent.wait_status("active", json!("demo@2"));
    assert_eq!(agent.status()["previous"], json!(["demo@1"]));
    assert_serves(&agent, 2, &v2, [1.0, 2.0, 3.0, 4.0]);
    let rollout = wait_until(EMULATED_WAIT, "the rollout to complete", || {
        let rollout = hub.rollout(2);
        (rollout.state == RolloutState::Completed).then_some(rollout)
    });
    assert_eq!(rollout.stages.last().unwrap().succeeded, 1, "{rollout:?}");
    let events: Vec<Value> = device(&hub, &agent)
        .events
        .iter()
        .map(|e| json!(e.kind))
        .collect();
    assert!(events.contains(&json!("committed")), "events {events:?}");
    eprintln!("aarch64 agent serving demo@2 after {:?}", started.elapsed());
    assert!(agent.sigterm().success(), "the agent's graceful stop");
}
