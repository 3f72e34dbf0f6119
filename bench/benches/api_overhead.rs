//! What the agent's local inference API costs on top of bare tract, on a model big enough for the
//! API's fixed cost to matter little, measured in one run with the variants interleaved call by
//! call.
//!
//! Variants, each one call per round, in this order every round:
//! - **bare tract**: `tract_onnx` loads the ONNX bytes, fixes the input shape, optimizes, and runs
//!   a prepared tensor; nothing else;
//! - **bare tract, symbolic batch**: the same with the batch axis a symbol, as the agent loads
//!   models so one plan serves any batch size;
//! - **agent path**: [`LoadedModel::run`] (the code the API calls: spec checks, conversion in and
//!   out) plus the telemetry update the API makes per request, drift summary included (a profile
//!   of all 256 input columns and the class output);
//! - **API, JSON**: `POST /v2/models/{name}/infer` over loopback HTTP/1.1 keep-alive, the KServe v2
//!   JSON body;
//! - **API, binary**: the same with the binary tensor extension (raw little-endian input bytes).
//!
//! The model is the example MLP with a wide hidden layer, so one call takes over a millisecond.
//! Prints min, p50, p90 and each variant's p50 ratio to bare tract as a Markdown table.
//!
//! `cargo bench -p outpost-bench --bench api_overhead`; `OUTPOST_BENCH_ROUNDS` (default 2000)
//! and `OUTPOST_BENCH_HIDDEN` (default 4096) tune it.
//!
//! [`LoadedModel::run`]: outpost_model::inference::LoadedModel::run

use outpost_bench::models::BenchModel;
use outpost_bench::report::{interleave, print_table, Variant};
use outpost_bench::runtimes::BareTract;
use outpost_bench::{api_bodies, env_usize, AgentPath, LocalApi};
use outpost_model::example::mlp;
use tract_onnx::prelude::*;

const N_INPUTS: usize = 256;
const N_OUTPUTS: usize = 16;

fn main() -> anyhow::Result<()> {
    let rounds = env_usize("OUTPOST_BENCH_ROUNDS", 2000)?;
    let hidden = env_usize("OUTPOST_BENCH_HIDDEN", 4096)?;
    let model = BenchModel::new(
        "wide-mlp",
        format!("MLP {N_INPUTS} → {hidden} → {N_OUTPUTS}"),
        mlp(N_INPUTS, hidden, N_OUTPUTS, 1),
        Some("y"),
        rounds,
    )?;

    let bare = BareTract::load(&model, 1)?;
    // The same, with the batch axis left symbolic as the agent loads it (one plan for any batch).
    let symbolic = tract_onnx::onnx().model_for_read(&mut &model.onnx[..])?;
    let batch = TDim::from(symbolic.symbols.sym("N"));
    let symbolic = symbolic
        .with_input_fact(
            0,
            InferenceFact::dt_shape(f32::datum_type(), tvec![batch, TDim::Val(N_INPUTS as i64)]),
        )?
        .into_optimized()?
        .into_runnable()?;
    let input = model.input_values(0);
    let symbolic_input = tract_ndarray::Array2::from_shape_vec((1, N_INPUTS), input)?.into_tensor();

    let path = AgentPath::load(&model, 1)?;
    let api = LocalApi::start(AgentPath::load(&model, 1)?.into_active(&model))?;
    let (json_body, binary_body, header_len) = api_bodies(&model)?;

    let run_bare = || bare.run().map(drop);
    let run_symbolic = || symbolic.run(tvec!(symbolic_input.clone().into())).map(drop);
    let run_path = || path.run(&model);
    let run_json = || api.post_json(&json_body).map(drop);
    let run_binary = || api.post_binary(&binary_body, header_len).map(drop);
    let variants: [Variant; 5] = [
        ("bare tract", &run_bare),
        ("bare tract, symbolic batch axis", &run_symbolic),
        (
            "agent path (LoadedModel::run + telemetry + drift)",
            &run_path,
        ),
        ("local API, KServe v2 JSON", &run_json),
        ("local API, binary tensor extension", &run_binary),
    ];
    println!(
        "model: {} (f32, {} bytes), batch 1, 1 thread; {rounds} interleaved rounds\n",
        model.description,
        model.onnx.len()
    );
    let timings = interleave(rounds, &variants)?;
    api.stop()?;
    print_table(&timings, &timings[0]);
    Ok(())
}
