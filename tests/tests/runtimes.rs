//! ONNX Runtime beside tract on real agents (issue 23): an agent with the library serves on it
//! after the model passes its validation set there, answers as tract does, and says so to the hub
//! (`device show`, the admin API, `/metrics`) and in its own status and `/metrics`. Every way ONNX
//! Runtime cannot serve (no library, one too old, an execution provider it lacks, a library that
//! crashes the process loading it, a model it cannot load) ends with the model served on tract
//! and the reason shown at the hub.
//!
//! The libraries come from `onnxruntime` wheels on PyPI, which `cargo xtask install` extracts into
//! `target/onnxruntime/`; the crashing library is compiled here with the C compiler Rust links
//! with.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::path::{Path, PathBuf};

use outpost_hub::api::ModelRuntimeJson;
use outpost_model::inference::LoadedModel;
use outpost_protocol::device::Tensor;
use outpost_tests::agent::{http, onnxruntime_library, TestAgent, AGENT_WAIT};
use outpost_tests::hub::{Fleet, TestHub};
use outpost_tests::wait_until;
use serde_json::{json, Value};

/// One row the tests ask every model for.
const ROW: [f32; 4] = [0.5, -1.0, 2.0, 0.25];

/// Sets `[inference] runtime` and `[inference.onnxruntime]` keys before the agent starts.
fn configure(agent: &TestAgent, runtime: &str, library: &Path, providers: &str) {
    agent.set_option("inference", "runtime", &format!("{runtime:?}"));
    agent.set_option(
        "inference.onnxruntime",
        "library",
        &format!("{:?}", library.display().to_string()),
    );
    if !providers.is_empty() {
        agent.set_option("inference.onnxruntime", "providers", providers);
    }
}

/// The status entry of model `name` once it serves `name@version`.
fn wait_serving(agent: &TestAgent, name: &str, version: u64) -> Value {
    let want = json!(format!("{name}@{version}"));
    wait_until(AGENT_WAIT, &format!("the agent to serve {want}"), || {
        agent.status()["models"]
            .as_array()?
            .iter()
            .find(|model| model["name"] == json!(name) && model["active"] == want)
            .cloned()
    })
}

/// The hub's record of the runtime serving `name` on the agent's device, once it has one for
/// `name@version`.
fn hub_runtime(agent: &TestAgent, hub: &TestHub, name: &str, version: u64) -> ModelRuntimeJson {
    wait_until(
        AGENT_WAIT,
        &format!("the hub to hear which runtime serves {name}@{version}"),
        || {
            agent
                .hub_detail(hub)
                .device
                .runtimes
                .into_iter()
                .find(|runtime| runtime.name == name && runtime.version == version)
        },
    )
}

/// The first output of `model` for [`ROW`] through the agent's API, as f32 values.
fn answer(agent: &TestAgent, model: &str) -> Vec<f64> {
    let (code, body) = agent.infer_row(&http(), model, &ROW);
    assert_eq!(code, 200, "{model}: {body}");
    body["outputs"][0]["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|value| value.as_f64().unwrap())
        .collect()
}

/// tract's answer for [`ROW`] from the model file itself.
fn tract_answer(model: &Path) -> Vec<f64> {
    let (inputs, outputs) = outpost_model::example::mlp_specs(4, 3);
    let loaded = LoadedModel::load(&std::fs::read(model).unwrap(), &inputs, &outputs, 1).unwrap();
    let request = Tensor {
        name: "x".to_owned(),
        dtype: outpost_protocol::trust::DType::F32,
        shape: vec![1, 4],
        data: ROW.iter().flat_map(|value| value.to_le_bytes()).collect(),
    };
    let output = loaded.run(&[request]).unwrap().remove(0);
    output
        .data
        .chunks_exact(4)
        .map(|bytes| f64::from(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])))
        .collect()
}

#[test]
fn an_agent_serves_on_onnx_runtime_and_the_hub_shows_it() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    let dir = fleet.publish_example_with_profile(&hub, "demo", 1, 1);
    let agent_lib = onnxruntime_library("x86_64");
    let mut agent = TestAgent::enroll(&hub, &fleet, "", "");
    configure(&agent, "auto", &agent_lib, "");
    agent.start();
    fleet.first_rollout(&hub, "demo", 1);

    let status = wait_serving(&agent, "demo", 1);
    assert_eq!(
        status["runtime"],
        json!("onnxruntime 1.32.0 [CPUExecutionProvider]"),
        "{status:#}"
    );
    assert!(status.get("runtime_fallback").is_none(), "{status:#}");
    // The answer is tract's, to within float rounding.
    let want = tract_answer(&dir.join("model.onnx"));
    let got = answer(&agent, "demo");
    assert_eq!(got.len(), want.len());
    for (got, want) in got.iter().zip(&want) {
        assert!((got - want).abs() < 1e-5, "{got} vs {want}");
    }

    let runtime = hub_runtime(&agent, &hub, "demo", 1);
    assert_eq!(
        (
            runtime.runtime.as_str(),
            runtime.runtime_version.as_str(),
            runtime.providers.as_slice(),
            runtime.fallback.as_deref()
        ),
        (
            "onnxruntime",
            "1.32.0",
            ["CPUExecutionProvider".to_owned()].as_slice(),
            None
        )
    );
    let id = agent.hub_detail(&hub).device.id;
    let shown = hub.cli(&["device", "show", &id]).ok().stdout;
    assert!(
        shown.contains("demo@1 onnxruntime 1.32.0 [CPUExecutionProvider]"),
        "{shown}"
    );
    let agent_metrics = http()
        .get(format!("http://{}/metrics", agent.listen))
        .call()
        .unwrap()
        .into_body()
        .read_to_string()
        .unwrap();
    assert!(
        agent_metrics.contains(
            "outpost_agent_model_runtime{name=\"demo\",version=\"1\",runtime=\"onnxruntime\",runtime_version=\"1.32.0\",fallback=\"false\"} 1"
        ),
        "{agent_metrics}"
    );
    wait_until(AGENT_WAIT, "the hub's runtime gauge", || {
        hub.fresh_metrics()
            .contains("outpost_hub_model_runtime_devices{model=\"demo\",runtime=\"onnxruntime\"} 1")
            .then_some(())
    });
}

/// A shared library whose initialiser crashes the process that loads it, as a broken or
/// mismatched ONNX Runtime build can.
fn crashing_library(dir: &Path) -> PathBuf {
    let source = dir.join("crash.c");
    std::fs::write(
        &source,
        "#include <signal.h>\n\
         __attribute__((constructor)) static void crash(void) { raise(SIGSEGV); }\n\
         void OrtGetApiBase(void) {}\n",
    )
    .unwrap();
    let library = dir.join("libonnxruntime.so");
    let status = std::process::Command::new("cc")
        .args(["-shared", "-fPIC", "-o"])
        .arg(&library)
        .arg(&source)
        .status()
        .expect("running cc, the C compiler Rust links with");
    assert!(status.success(), "cc failed: {status}");
    library
}

#[test]
fn every_way_onnx_runtime_cannot_serve_ends_on_tract_with_the_reason() {
    let hub = TestHub::start();
    let fleet = Fleet::new(&hub);
    fleet.publish_example(&hub, "demo", 1, 1);
    // The same model claiming an ONNX IR version no ONNX Runtime reads: tract runs it as it is.
    let legacy = hub.dir().join("model-legacy-1");
    let legacy_arg = legacy.to_string_lossy().into_owned();
    hub.cli(&["example-model", "--out", &legacy_arg, "--seed", "2"])
        .ok();
    let onnx = std::fs::read(legacy.join("model.onnx")).unwrap();
    std::fs::write(
        legacy.join("model.onnx"),
        outpost_model::example::with_ir_version(&onnx, 99).unwrap(),
    )
    .unwrap();
    fleet.publish_dir(&hub, &legacy, "legacy", 1);

    let crash = crashing_library(hub.dir());
    let good = onnxruntime_library("x86_64");
    let old = onnxruntime_library("old");
    let missing = hub.dir().join("absent/libonnxruntime.so");
    // Each agent's configuration, and the reason each model reports (None: ONNX Runtime serves).
    type Case<'a> = (&'a str, &'a Path, &'a str, Option<&'a str>, Option<&'a str>);
    let cases: [Case; 5] = [
        (
            "onnxruntime",
            &missing,
            "",
            Some("no ONNX Runtime library at"),
            Some("no ONNX Runtime library at"),
        ),
        (
            "auto",
            &old,
            "",
            Some("but got '1.19.2'"),
            Some("but got '1.19.2'"),
        ),
        (
            "onnxruntime",
            &good,
            "[\"cuda\"]",
            Some("execution provider cuda (CUDAExecutionProvider) is not in ONNX Runtime 1.32.0"),
            Some("execution provider cuda (CUDAExecutionProvider) is not in ONNX Runtime 1.32.0"),
        ),
        (
            "auto",
            &crash,
            "",
            Some("it crashed a probe process loading it (signal 11)"),
            Some("it crashed a probe process loading it (signal 11)"),
        ),
        ("auto", &good, "", None, Some("IR version")),
    ];
    let agents: Vec<TestAgent> = cases
        .iter()
        .map(|(runtime, library, providers, _, _)| {
            let mut agent = TestAgent::enroll(&hub, &fleet, "", "");
            configure(&agent, runtime, library, providers);
            agent.start();
            agent
        })
        .collect();
    fleet.first_rollout(&hub, "demo", 1);
    fleet.first_rollout(&hub, "legacy", 1);

    for (agent, (runtime, library, providers, demo_reason, legacy_reason)) in
        agents.iter().zip(&cases)
    {
        let case = format!(
            "runtime {runtime}, library {}, providers {providers:?}",
            library.display()
        );
        for (model, reason) in [("demo", demo_reason), ("legacy", legacy_reason)] {
            let status = wait_serving(agent, model, 1);
            // Whatever ONNX Runtime did, the model serves.
            assert_eq!(answer(agent, model).len(), 3, "{case}");
            let at_hub = hub_runtime(agent, &hub, model, 1);
            match reason {
                None => {
                    assert_eq!(at_hub.runtime, "onnxruntime", "{case}: {at_hub:?}");
                    assert_eq!(at_hub.fallback, None, "{case}");
                }
                Some(reason) => {
                    assert_eq!(at_hub.runtime, "tract", "{case}: {model}: {at_hub:?}");
                    let fallback = at_hub.fallback.clone().unwrap_or_default();
                    assert!(
                        fallback.starts_with("onnxruntime: ") && fallback.contains(reason),
                        "{case}: {model}: {fallback}"
                    );
                    assert_eq!(status["runtime_fallback"], json!(fallback), "{case}");
                    assert!(
                        status["runtime"].as_str().unwrap().starts_with("tract "),
                        "{case}: {status:#}"
                    );
                }
            }
        }
    }
}
