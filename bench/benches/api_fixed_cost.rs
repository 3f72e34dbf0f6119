//! The local inference API's fixed cost, as issue 23 defines it: the API's p50 less the agent
//! path's, on the MLP, over loopback HTTP/1.1 keep-alive, for JSON and binary tensors. Each
//! variant is called back to back in blocks (see [`in_blocks`]), as an application on a device
//! calls its model in a loop; `vs_ort` interleaves the same variants call by call instead, where
//! every HTTP exchange starts with its threads parked and its caches cold.
//!
//! Variants:
//! - **agent path**: [`LoadedModel::run`] plus the telemetry and drift update, no HTTP;
//! - **local API**, KServe v2 JSON and binary tensor extension, through a client that only writes
//!   and reads ([`RawClient`]) and through ureq;
//! - **HTTP floor**: a bare hyper server answering the API's answer and doing nothing else, on a
//!   runtime like the API's (two workers), through the same clients;
//! - **HTTP floor running the agent path**: the same server calling the agent path in its handler
//!   before it answers, so the model runs where the API runs it, on a worker woken by the
//!   request: what is left between it and the API is the API's own parsing, routing, layers and
//!   encoding.
//!
//! `cargo bench -p outpost-bench --bench api_fixed_cost`; `OUTPOST_BENCH_BLOCKS` (default 40) and
//! `OUTPOST_BENCH_BLOCK` (calls per block, default 500) tune it, and `OUTPOST_BENCH_THREADS`
//! (default 1) sets the model's threads.
//!
//! Where the kernel puts the client's and the API's threads moves the figures more than anything
//! the API does: run the built bench under `taskset -c 0` as well, to measure them on one core
//! (see `docs/BENCHMARKS.md`).
//!
//! [`LoadedModel::run`]: outpost_model::inference::LoadedModel::run

use std::cell::RefCell;

use outpost_bench::http::{HttpFloor, RawClient};
use outpost_bench::models::BenchModel;
use outpost_bench::report::{in_blocks, print_table, Variant};
use outpost_bench::{api_bodies, env_usize, AgentPath, LocalApi};
use outpost_model::example::mlp;

fn main() -> anyhow::Result<()> {
    let blocks = env_usize("OUTPOST_BENCH_BLOCKS", 40)?;
    let per_block = env_usize("OUTPOST_BENCH_BLOCK", 500)?;
    let threads = env_usize("OUTPOST_BENCH_THREADS", 1)?;
    let (n_inputs, hidden, n_outputs) = (64, 256, 10);
    let model = BenchModel::new(
        "mlp",
        format!("MLP {n_inputs} → {hidden} → {n_outputs}, example::mlp, seed 1"),
        mlp(n_inputs, hidden, n_outputs, 1),
        Some("y"),
        blocks * per_block,
    )?;
    println!(
        "\n#### {} — {threads} thread(s), {blocks} blocks of {per_block} calls\n",
        model.description
    );

    let path = AgentPath::load(&model, threads)?;
    let api = LocalApi::start(AgentPath::load(&model, threads)?.into_active(&model))?;
    let (json_body, binary_body, header_len) = api_bodies(&model)?;
    let (raw_json, raw_binary) = api.raw_requests(&json_body, &binary_body, header_len);
    let raw = RefCell::new(RawClient::connect(api.address())?);
    let floor = HttpFloor::start(api.post_json(&json_body)?)?;
    let floor_url = format!("http://{}{}", floor.address(), api.path());
    let floor_raw = RefCell::new(RawClient::connect(floor.address())?);
    let worked_model = std::sync::Arc::new(BenchModel::new(
        "mlp",
        model.description.clone(),
        mlp(n_inputs, hidden, n_outputs, 1),
        Some("y"),
        blocks * per_block,
    )?);
    let worked_path = AgentPath::load(&worked_model, threads)?;
    let worked = HttpFloor::start_with(
        api.post_json(&json_body)?,
        Some(Box::new(move || worked_path.run(&worked_model))),
    )?;
    let worked_raw = RefCell::new(RawClient::connect(worked.address())?);

    let run_path = || path.run(&model);
    let run_raw_json = || raw.borrow_mut().exchange(&raw_json).map(drop);
    let run_raw_binary = || raw.borrow_mut().exchange(&raw_binary).map(drop);
    let run_json = || api.post_json(&json_body).map(drop);
    let run_binary = || api.post_binary(&binary_body, header_len).map(drop);
    let run_floor_raw = || floor_raw.borrow_mut().exchange(&raw_json).map(drop);
    let run_floor = || api.post_json_to(&floor_url, &json_body).map(drop);
    let run_worked_raw = || worked_raw.borrow_mut().exchange(&raw_json).map(drop);
    let variants: [Variant; 8] = [
        (
            "agent path (LoadedModel::run + telemetry + drift)",
            &run_path,
        ),
        ("local API, KServe v2 JSON (raw client)", &run_raw_json),
        (
            "local API, binary tensor extension (raw client)",
            &run_raw_binary,
        ),
        ("local API, KServe v2 JSON (ureq)", &run_json),
        ("local API, binary tensor extension (ureq)", &run_binary),
        (
            "HTTP floor: bare hyper, fixed answer (raw client)",
            &run_floor_raw,
        ),
        ("HTTP floor: bare hyper, fixed answer (ureq)", &run_floor),
        (
            "HTTP floor running the agent path, fixed answer (raw client)",
            &run_worked_raw,
        ),
    ];
    let timings = in_blocks(blocks, per_block, &variants)?;
    api.stop()?;
    drop(floor);
    drop(worked);
    print_table(&timings, &timings[0]);
    let p50 = |index: usize| timings[index].p50().as_secs_f64() * 1e6;
    let fixed = |index: usize| p50(index) - p50(0);
    println!(
        "\nlocal API fixed cost at p50 (API − agent path): raw client JSON {:.1} µs, binary {:.1} \
         µs; ureq JSON {:.1} µs, binary {:.1} µs. The HTTP exchange alone (bare hyper): raw \
         client {:.1} µs, ureq {:.1} µs. Bare hyper running the agent path in its handler: {:.1} \
         µs, so the API's own parsing, routing, layers and encoding add {:.1} µs (JSON) and \
         {:.1} µs (binary) over it",
        fixed(1),
        fixed(2),
        fixed(3),
        fixed(4),
        p50(5),
        p50(6),
        p50(7),
        p50(1) - p50(7),
        p50(2) - p50(7),
    );
    Ok(())
}
