//! Two real published models, not made by this project, through the user's three commands and a
//! real agent each (issue 20): Magika's content-type classifier (int32 bytes `[N, 2048]` → 214
//! class scores, from its PyPI wheel) and Silero VAD's 16 kHz sequence model (audio windows and
//! an LSTM state → a speech probability and the next state, from its PyPI wheel).
//!
//! `tests/real_models/prepare.py` takes each model out of its wheel (checking its SHA-256), makes
//! sample inputs (files of this repository for Magika, a streamed synthetic signal for Silero) and
//! computes ONNX Runtime's outputs for each sample. Then, with the real binaries and no
//! `--input`/`--output` flags: `validation make` with ONNX Runtime's outputs as `--expected`,
//! `profile`, `model publish`; a rollout of Magika to an agent, then of Silero to the same agent,
//! which serves both side by side; every sample sent to the agent's inference API, its answer
//! compared with ONNX Runtime's; and the samples counted in the hub's drift report.
//!
//! ONNX Runtime and the wheels come from PyPI through `cargo xtask install` (into
//! `target/real-models/`); without them the test fails naming that command.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use outpost_hub::api::DriftReport;
use outpost_protocol::dataset::{parse_npy, NdArray};
use outpost_tests::agent::{http, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::{real_models_dir, run, venv_python, wait_until, workspace_root, Run};
use serde_json::{json, Value};

fn hub(dir: &Path, args: &[&str]) -> Run {
    run("outpost-hub", dir, args)
}

/// ONNX Runtime's virtual environment and the downloaded wheels, from `cargo xtask install`.
fn real_models() -> (PathBuf, PathBuf) {
    let python = venv_python();
    let wheels = real_models_dir().join("wheels");
    assert!(
        wheels.is_dir(),
        "{} is missing: `cargo xtask install` downloads the model wheels",
        wheels.display()
    );
    (python, wheels)
}

fn npy(path: &Path) -> NdArray {
    parse_npy(&std::fs::read(path).unwrap()).unwrap()
}

/// Row `row` of `array` (one sample), as f64 values.
fn row(array: &NdArray, row: usize) -> Vec<f64> {
    let values = array.to_f64();
    let width = values.len() / array.shape[0];
    values[row * width..(row + 1) * width].to_vec()
}

/// Sends `inputs` (name, datatype, shape, values) to `model` on `agent`; returns its outputs by
/// name.
fn infer(agent: &TestAgent, model: &str, inputs: &[(&str, &str, Vec<u64>, Vec<f64>)]) -> Value {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|(name, datatype, shape, data)| {
            json!({"name": name, "datatype": datatype, "shape": shape, "data": data})
        })
        .collect();
    let mut response = http()
        .post(format!("http://{}/v2/models/{model}/infer", agent.listen))
        .send(json!({ "inputs": inputs }).to_string())
        .unwrap();
    let text = response.body_mut().read_to_string().unwrap();
    assert_eq!(response.status().as_u16(), 200, "{text}");
    serde_json::from_str(&text).unwrap()
}

fn output(answer: &Value, name: &str) -> Vec<f64> {
    answer["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .find(|output| output["name"] == name)
        .unwrap_or_else(|| panic!("no output {name} in {answer}"))["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_f64().unwrap())
        .collect()
}

/// Asserts every element of `got` is within the validation set's default tolerances of ONNX
/// Runtime's `want`.
fn assert_close(what: &str, got: &[f64], want: &[f64]) {
    assert_eq!(got.len(), want.len(), "{what}");
    for (index, (got, want)) in got.iter().zip(want).enumerate() {
        assert!(
            (got - want).abs() <= 1e-4 + 1e-3 * want.abs(),
            "{what} element {index}: the agent says {got}, ONNX Runtime {want}"
        );
    }
}

fn argmax(values: &[f64]) -> usize {
    (0..values.len())
        .max_by(|a, b| values[*a].total_cmp(&values[*b]))
        .unwrap()
}

/// Waits until the hub's drift report on `model` counts `n` values of `feature`.
fn wait_for_drift(hub: &TestHub, model: &str, feature: &str, n: u64) {
    wait_until(AGENT_WAIT, &format!("{model}'s drift at the hub"), || {
        let report: DriftReport = hub.cli_json(&["drift", "report", "--model", model]);
        report
            .features
            .iter()
            .any(|drift| drift.name == feature && drift.n == n)
            .then_some(())
    });
}

#[test]
fn published_models_run_side_by_side_on_an_agent_as_onnx_runtime_runs_them() {
    let (python, wheels) = real_models();
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    Run::of(
        std::process::Command::new(&python)
            .arg(workspace_root().join("tests/real_models/prepare.py"))
            .arg(&wheels)
            .arg(workspace_root())
            .arg(d),
    )
    .ok();

    // The user's three commands, with ONNX Runtime's outputs as the expected ones.
    let server = TestHub::start();
    let fleet = Fleet::new(&server);
    let three_commands = |model: &str, data: &[&str], expected: &[&str], classes: &[&str]| {
        let path = |file: &str| format!("{model}/{file}");
        let mut make = vec![
            "validation".to_owned(),
            "make".into(),
            "--model".into(),
            path("model.onnx"),
            "--cases".into(),
            "32".into(),
            "--out".into(),
            path("validation.bin"),
        ];
        let mut profile = vec![
            "profile".to_owned(),
            "--model".into(),
            path("model.onnx"),
            "--out".into(),
            path("profile.bin"),
        ];
        for input in data {
            for args in [&mut make, &mut profile] {
                args.push("--data".into());
                args.push(format!("{input}={}", path(&format!("{input}.npy"))));
            }
        }
        for output in expected {
            make.push("--expected".into());
            make.push(format!("{output}={}", path(&format!("{output}.npy"))));
        }
        for class in classes {
            profile.push("--classes".into());
            profile.push((*class).to_owned());
        }
        let made = hub(d, &make.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        assert!(
            made.stderr
                .contains("expected outputs from --expected; the model passes it"),
            "{}",
            made.stderr
        );
        hub(d, &profile.iter().map(String::as_str).collect::<Vec<_>>()).ok();
        let mut publish = fleet.publish_args(&d.join(model), model, 1);
        publish.push("--profile".into());
        publish.push(d.join(path("profile.bin")).to_string_lossy().into_owned());
        server
            .cli(&publish.iter().map(String::as_str).collect::<Vec<_>>())
            .ok();
    };
    three_commands("magika", &["bytes"], &["target_label"], &["target_label"]);
    three_commands(
        "silero",
        &["input", "h", "c"],
        &["speech_probs", "hn", "cn"],
        &[],
    );

    // Magika first; then Silero rolls out to the agent that already serves Magika, and it serves
    // both.
    fleet.first_rollout(&server, "magika", 1);
    let mut agent = TestAgent::enroll(&server, &fleet, "", "");
    agent.start();
    agent.wait_status("active", json!("magika@1"));
    fleet.first_rollout(&server, "silero", 1);
    let status = wait_until(AGENT_WAIT, "the agent to serve silero@1 too", || {
        let status = agent.status();
        let active: Vec<&str> = status["models"]
            .as_array()?
            .iter()
            .filter_map(|model| model["active"].as_str())
            .collect();
        (active == ["magika@1", "silero@1"]).then_some(status)
    });
    assert_eq!(status["active"], json!("magika@1"), "{status:#}");

    // Magika: every file's scores as ONNX Runtime's, and the same top class.
    let bytes = npy(&d.join("magika/bytes.npy"));
    let scores = npy(&d.join("magika/target_label.npy"));
    let labels = std::fs::read_to_string(d.join("magika/labels.txt")).unwrap();
    let samples = bytes.shape[0];
    for (sample, line) in labels.lines().enumerate() {
        let answer = infer(
            &agent,
            "magika",
            &[("bytes", "INT32", vec![1, 2048], row(&bytes, sample))],
        );
        let got = output(&answer, "target_label");
        let want = row(&scores, sample);
        assert_close(line, &got, &want);
        assert_eq!(argmax(&got), argmax(&want), "{line}");
    }
    for (file, label) in [
        ("docs/dashboard/fleet.png", "png"),
        ("README.md.gz", "gzip"),
        ("protocol/src/lib.rs", "rust"),
        ("README.md", "markdown"),
    ] {
        assert!(
            labels.contains(&format!("{file}\t{label}\n")),
            "{file} is not {label}:\n{labels}"
        );
    }
    wait_for_drift(&server, "magika", "target_label", samples as u64);

    // Silero: each window's speech probability and next state as ONNX Runtime's.
    let arrays: Vec<NdArray> = ["input", "h", "c", "speech_probs", "hn", "cn"]
        .iter()
        .map(|name| npy(&d.join(format!("silero/{name}.npy"))))
        .collect();
    let steps = arrays[0].shape[0];
    for step in 0..steps {
        let answer = infer(
            &agent,
            "silero",
            &[
                ("input", "FP32", vec![1, 576], row(&arrays[0], step)),
                ("h", "FP32", vec![1, 1, 128], row(&arrays[1], step)),
                ("c", "FP32", vec![1, 1, 128], row(&arrays[2], step)),
            ],
        );
        for (index, name) in ["speech_probs", "hn", "cn"].iter().enumerate() {
            assert_close(
                &format!("step {step} {name}"),
                &output(&answer, name),
                &row(&arrays[3 + index], step),
            );
        }
    }
    let probabilities = arrays[3].to_f64();
    assert!(
        probabilities.iter().any(|p| *p > 0.5) && probabilities.iter().any(|p| *p < 0.1),
        "the signal has both speech and silence: {probabilities:?}"
    );
    wait_for_drift(&server, "silero", "speech_probs", steps as u64);
}
