//! A real published model through the agent against bare tract: Silero VAD, the streaming voice
//! activity detector (`silero_vad_16k_sequence.onnx` from the `silero-vad` PyPI wheel), one
//! 16 kHz chunk (512 new samples and 64 of context) with its LSTM state per call, as a device runs
//! it. (The wheel's `openvino_16k` and `op18_ifless` variants do not load in tract 0.23.9: a
//! duplicate node name after compaction, and an `If` body that will not unify a fixed batch.)
//!
//! Variants, interleaved call by call: bare tract (batch fixed at 1), the agent path
//! ([`LoadedModel::run`] plus the telemetry update), and the local KServe v2 API with JSON and
//! with the binary tensor extension. Prints min, p50, p99 and ratios to bare tract.
//!
//! The wheel is fetched once into `target/bench-cache/` with `python3 -m pip download` (PyPI), or
//! `OUTPOST_SILERO_ONNX` names the `.onnx` file. `OUTPOST_BENCH_ROUNDS` (default 3000).
//!
//! `cargo bench -p outpost-agent --bench silero_vad`

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use outpost_agent::api::{
    ApiLimits, ApiState, BackgroundApi, QueueStats, DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT,
};
use outpost_agent::example_model::normal_rows;
use outpost_agent::inference::LoadedModel;
use outpost_agent::slot::{ActiveModel, ModelSlot};
use outpost_agent::telemetry::Recorder;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;
use outpost_protocol::Sha256;
use support::{env_usize, interleave, post_binary, post_json, Variant};
// Explicit imports above (`Tensor`) take precedence over this glob.
use tract_onnx::prelude::*;

const WHEEL: &str = "silero-vad==6.2.3";
const MEMBER: &str = "silero_vad/data/silero_vad_16k_sequence.onnx";
/// Samples per call: 512 new ones after 64 of context.
const CHUNK: usize = 576;
const MODEL: &str = "vad";

/// The model file: `OUTPOST_SILERO_ONNX`, or the wheel's member, fetched once.
fn model_path() -> anyhow::Result<PathBuf> {
    if let Some(path) = std::env::var_os("OUTPOST_SILERO_ONNX") {
        return Ok(PathBuf::from(path));
    }
    let cache = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/bench-cache");
    let onnx = cache.join("silero_vad_16k_sequence.onnx");
    if onnx.is_file() {
        return Ok(onnx);
    }
    std::fs::create_dir_all(&cache)?;
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--quiet", "-d"])
        .arg(&cache)
        .arg(WHEEL)
        .status()
        .context("running python3 -m pip download")?;
    anyhow::ensure!(status.success(), "pip download {WHEEL} failed");
    let extract = format!(
        "import glob, zipfile\n\
         wheel = sorted(glob.glob({dir:?} + '/silero_vad-*.whl'))[-1]\n\
         open({out:?}, 'wb').write(zipfile.ZipFile(wheel).read({MEMBER:?}))\n",
        dir = cache.to_string_lossy(),
        out = onnx.to_string_lossy(),
    );
    let status = Command::new("python3").args(["-c", &extract]).status()?;
    anyhow::ensure!(
        status.success(),
        "extracting {MEMBER} from the wheel failed"
    );
    Ok(onnx)
}

fn tensor(name: &str, dtype: DType, shape: &[u64], data: Vec<u8>) -> Tensor {
    Tensor {
        name: name.to_owned(),
        dtype,
        shape: shape.to_vec(),
        data,
    }
}

fn main() -> anyhow::Result<()> {
    let rounds = env_usize("OUTPOST_BENCH_ROUNDS", 3000);
    let path = model_path()?;
    let onnx = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;

    let audio: Vec<f32> = normal_rows(CHUNK, 1, 3, 0.0)
        .iter()
        .map(|sample| sample * 0.1)
        .collect();
    let state = vec![0f32; 128];

    // Bare tract, shapes fixed for one stream.
    let bare = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])?
        .with_input_fact(0, f32::fact([1, CHUNK]).into())?
        .with_input_fact(1, f32::fact([1, 1, 128]).into())?
        .with_input_fact(2, f32::fact([1, 1, 128]).into())?
        .into_optimized()?
        .into_runnable()?;
    let bare_inputs: TVec<TValue> = tvec![
        tract_ndarray::Array2::from_shape_vec((1, CHUNK), audio.clone())?
            .into_tensor()
            .into(),
        tract_ndarray::Array3::from_shape_vec((1, 1, 128), state.clone())?
            .into_tensor()
            .into(),
        tract_ndarray::Array3::from_shape_vec((1, 1, 128), state.clone())?
            .into_tensor()
            .into(),
    ];

    // The agent's wrapper, with the specs the model declares (as `model publish` takes them).
    let (inputs, outputs) = LoadedModel::describe(&onnx)?;
    let loaded = LoadedModel::load(&onnx, &inputs, &outputs, 1)?;
    let f32_bytes =
        |values: &[f32]| -> Vec<u8> { values.iter().flat_map(|v| v.to_le_bytes()).collect() };
    let path_inputs = vec![
        tensor("input", DType::F32, &[1, CHUNK as u64], f32_bytes(&audio)),
        tensor("h", DType::F32, &[1, 1, 128], f32_bytes(&state)),
        tensor("c", DType::F32, &[1, 1, 128], f32_bytes(&state)),
    ];
    let recorder = Recorder::new();

    let slot = Arc::new(ModelSlot::new());
    slot.swap(Arc::new(ActiveModel {
        name: MODEL.to_owned(),
        version: 1,
        manifest_sha256: Sha256([1; 32]),
        model: LoadedModel::load(&onnx, &inputs, &outputs, 1)?,
        drift: None,
    }));
    let state_api = Arc::new(ApiState::new(
        slot,
        Arc::new(Recorder::new()),
        Arc::new(QueueStats::default()),
        ApiLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        },
    ));
    let server = BackgroundApi::start(([127, 0, 0, 1], 0).into(), state_api, 2)?;
    let url = format!("http://{}/v2/models/{MODEL}/infer", server.address());
    let http = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let json_body = serde_json::to_vec(&serde_json::json!({"inputs": [
        {"name": "input", "shape": [1, CHUNK], "datatype": "FP32", "data": audio},
        {"name": "h", "shape": [1, 1, 128], "datatype": "FP32", "data": state},
        {"name": "c", "shape": [1, 1, 128], "datatype": "FP32", "data": state},
    ]}))?;
    let binary_header = serde_json::to_vec(&serde_json::json!({"inputs": [
        {"name": "input", "shape": [1, CHUNK], "datatype": "FP32",
         "parameters": {"binary_data_size": CHUNK * 4}},
        {"name": "h", "shape": [1, 1, 128], "datatype": "FP32",
         "parameters": {"binary_data_size": 128 * 4}},
        {"name": "c", "shape": [1, 1, 128], "datatype": "FP32",
         "parameters": {"binary_data_size": 128 * 4}},
    ]}))?;
    let mut binary_body = binary_header.clone();
    for tensor in &path_inputs {
        binary_body.extend_from_slice(&tensor.data);
    }

    let run_bare = || -> anyhow::Result<()> {
        let outputs = bare.run(bare_inputs.clone())?;
        anyhow::ensure!(outputs.len() == 3, "bare tract outputs");
        Ok(())
    };
    let run_path = || -> anyhow::Result<()> {
        let started = std::time::Instant::now();
        let outputs = loaded.run(&path_inputs)?;
        recorder.record(MODEL, 1, started.elapsed(), true, outpost_agent::unix_now());
        anyhow::ensure!(outputs.len() == 3, "agent path outputs");
        Ok(())
    };
    let run_json = || -> anyhow::Result<()> {
        let answer = post_json(&http, &url, &json_body)?;
        anyhow::ensure!(
            answer["outputs"].as_array().map(Vec::len) == Some(3),
            "API JSON answer: {answer}"
        );
        Ok(())
    };
    let run_binary = || -> anyhow::Result<()> {
        let bytes = post_binary(&http, &url, binary_header.len(), &binary_body)?;
        anyhow::ensure!(!bytes.is_empty(), "API answer");
        Ok(())
    };
    let variants: [Variant; 4] = [
        ("bare tract", &run_bare),
        ("agent path (LoadedModel::run + telemetry)", &run_path),
        ("local API, KServe v2 JSON", &run_json),
        ("local API, binary tensor extension", &run_binary),
    ];
    println!(
        "model: {} ({} bytes), one {CHUNK}-sample chunk + LSTM state per call, 1 thread; {rounds} interleaved rounds",
        MEMBER,
        onnx.len()
    );
    println!();
    interleave(rounds, &variants)?;
    server.stop()?;
    Ok(())
}
