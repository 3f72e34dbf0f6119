//! What the agent's local inference API costs on top of bare tract, on the same model, measured
//! in one run with the variants interleaved call by call.
//!
//! Variants, each one call per round, in this order every round:
//! - **bare tract**: `tract_onnx` loads the ONNX bytes, fixes the input shape, optimizes, and runs
//!   a prepared tensor; nothing else;
//! - **bare tract, symbolic batch**: the same with the batch axis a symbol, as the agent loads
//!   models so one plan serves any batch size;
//! - **agent path**: [`LoadedModel::run`] (the code the API calls: spec checks, conversion in and
//!   out) plus the telemetry [`Recorder`] update the API makes per request, drift summary
//!   included (a profile of all 256 input columns and the class output);
//! - **API, JSON**: `POST /v2/models/{name}/infer` over loopback HTTP/1.1 keep-alive, the KServe v2
//!   JSON body, answer parsed;
//! - **API, binary**: the same with the binary tensor extension (raw little-endian input bytes).
//!
//! The model is the example MLP with a wide hidden layer, so one call takes over a millisecond.
//! Prints min, p50, p99 and each variant's p50 ratio to bare tract as a Markdown table.
//!
//! `cargo bench -p outpost-agent --bench api_overhead`; `OUTPOST_BENCH_ROUNDS` (default 2000)
//! and `OUTPOST_BENCH_HIDDEN` (default 4096) tune it.

use std::sync::Arc;
mod support;

use std::time::{Duration, Instant};

use support::{env_usize, interleave, post_binary, post_json, Variant};

use outpost_agent::api::{
    ApiLimits, ApiState, BackgroundApi, QueueStats, DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT,
};
use outpost_agent::drift::{build_profile, Extractor, ProfileOptions};
use outpost_agent::example_model::{mlp, mlp_specs, normal_rows};
use outpost_agent::inference::LoadedModel;
use outpost_agent::slot::{ActiveModel, ModelDrift, ModelSlot};
use outpost_agent::telemetry::Recorder;
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;
use outpost_protocol::Sha256;
// Explicit imports above (`Tensor`) take precedence over this glob.
use tract_onnx::prelude::*;

const N_INPUTS: usize = 256;
const N_OUTPUTS: usize = 16;
const MODEL: &str = "wide-mlp";

fn main() -> anyhow::Result<()> {
    let rounds = env_usize("OUTPOST_BENCH_ROUNDS", 2000);
    let hidden = env_usize("OUTPOST_BENCH_HIDDEN", 4096);
    let onnx = mlp(N_INPUTS, hidden, N_OUTPUTS, 1);
    let input: Vec<f32> = normal_rows(N_INPUTS, 1, 11, 0.0);

    // Bare tract, the way its own examples load a model.
    let bare = tract_onnx::onnx()
        .model_for_read(&mut &onnx[..])?
        .with_input_fact(0, f32::fact([1, N_INPUTS]).into())?
        .into_optimized()?
        .into_runnable()?;
    // The same, with the batch axis left symbolic as the agent loads it (one plan for any batch).
    let symbolic = tract_onnx::onnx().model_for_read(&mut &onnx[..])?;
    let batch = TDim::from(symbolic.symbols.sym("N"));
    let symbolic = symbolic
        .with_input_fact(
            0,
            InferenceFact::dt_shape(f32::datum_type(), tvec![batch, TDim::Val(N_INPUTS as i64)]),
        )?
        .into_optimized()?
        .into_runnable()?;
    let bare_input =
        tract_ndarray::Array2::from_shape_vec((1, N_INPUTS), input.clone())?.into_tensor();

    // The agent's model wrapper, single-threaded like the bare plan.
    let (input_specs, output_specs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    let loaded = LoadedModel::load(&onnx, &input_specs, &output_specs, 1)?;

    // A drift profile over every input column and the class output, as a published model has.
    let reference_rows = 2000;
    let reference = normal_rows(N_INPUTS, reference_rows, 7, 0.0);
    let profile = build_profile(
        &loaded,
        &[Tensor {
            name: "x".to_owned(),
            dtype: DType::F32,
            shape: vec![reference_rows as u64, N_INPUTS as u64],
            data: reference
                .iter()
                .flat_map(|value| value.to_le_bytes())
                .collect(),
        }],
        &ProfileOptions {
            class_outputs: vec!["y".to_owned()],
            ..ProfileOptions::default()
        },
    )?;
    let drift = || -> anyhow::Result<ModelDrift> {
        Ok(ModelDrift {
            extractor: Extractor::new(&profile, &input_specs, &output_specs)?,
            profile: profile.clone(),
            sha256: Sha256([2; 32]),
        })
    };
    let path_drift = drift()?;
    let wrapped = Arc::new(ActiveModel {
        name: MODEL.to_owned(),
        version: 1,
        manifest_sha256: Sha256([1; 32]),
        model: LoadedModel::load(&onnx, &input_specs, &output_specs, 1)?,
        drift: Some(drift()?),
    });
    let path_input = vec![Tensor {
        name: "x".to_owned(),
        dtype: DType::F32,
        shape: vec![1, N_INPUTS as u64],
        data: input.iter().flat_map(|value| value.to_le_bytes()).collect(),
    }];
    let recorder = Recorder::new();

    // The API on loopback, on its own runtime, as the agent runs it.
    let slot = Arc::new(ModelSlot::new());
    slot.swap(wrapped);
    let state = Arc::new(ApiState::new(
        slot,
        Arc::new(Recorder::new()),
        Arc::new(QueueStats::default()),
        ApiLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        },
    ));
    let server = BackgroundApi::start(([127, 0, 0, 1], 0).into(), state, 2)?;
    let address = server.address();
    let http = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let url = format!("http://{address}/v2/models/{MODEL}/infer");
    let json_body = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "x", "shape": [1, N_INPUTS], "datatype": "FP32", "data": input}],
    }))?;
    let binary_header = serde_json::to_vec(&serde_json::json!({
        "inputs": [{"name": "x", "shape": [1, N_INPUTS], "datatype": "FP32",
                    "parameters": {"binary_data_size": N_INPUTS * 4}}],
        "outputs": [{"name": "y", "parameters": {"binary_data": true}}],
    }))?;
    let mut binary_body = binary_header.clone();
    for value in &input {
        binary_body.extend_from_slice(&value.to_le_bytes());
    }

    let run_bare = || -> anyhow::Result<()> {
        let outputs = bare.run(tvec!(bare_input.clone().into()))?;
        anyhow::ensure!(outputs[0].len() == N_OUTPUTS, "bare tract output size");
        Ok(())
    };
    let run_symbolic = || -> anyhow::Result<()> {
        let outputs = symbolic.run(tvec!(bare_input.clone().into()))?;
        anyhow::ensure!(outputs[0].len() == N_OUTPUTS, "symbolic tract output size");
        Ok(())
    };
    let run_path = || -> anyhow::Result<()> {
        let started = Instant::now();
        let outputs = loaded.run(&path_input)?;
        recorder.record_with_drift(
            MODEL,
            1,
            &path_drift,
            started.elapsed(),
            outpost_agent::unix_now(),
            &path_input,
            &outputs,
        );
        anyhow::ensure!(outputs.len() == 1, "agent path outputs");
        Ok(())
    };
    let run_json = || -> anyhow::Result<()> {
        let answer = post_json(&http, &url, &json_body)?;
        anyhow::ensure!(
            answer["outputs"][0]["data"].as_array().map(Vec::len) == Some(N_OUTPUTS),
            "API JSON answer: {answer}"
        );
        Ok(())
    };
    let run_binary = || -> anyhow::Result<()> {
        let bytes = post_binary(&http, &url, binary_header.len(), &binary_body)?;
        anyhow::ensure!(bytes.len() > N_OUTPUTS * 4, "API binary answer");
        Ok(())
    };
    let variants: [Variant; 5] = [
        ("bare tract", &run_bare),
        ("bare tract, symbolic batch axis", &run_symbolic),
        ("agent path (LoadedModel::run + telemetry)", &run_path),
        ("local API, KServe v2 JSON", &run_json),
        ("local API, binary tensor extension", &run_binary),
    ];
    println!(
        "model: MLP {N_INPUTS} → {hidden} → {N_OUTPUTS} (f32, {} bytes), batch 1, 1 thread; {rounds} interleaved rounds",
        onnx.len()
    );
    println!();
    interleave(rounds, &variants)?;
    server.stop()?;
    Ok(())
}
