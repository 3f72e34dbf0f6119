//! The side-by-side inference harness of issue 7: the same models and inputs through bare tract,
//! the agent's inference path, the agent's local HTTP API and ONNX Runtime, in one process,
//! interleaved call by call, at 1 and 2 threads. It checks that every runtime's outputs agree with
//! ONNX Runtime's, and reports load times and resident memory per runtime.
//!
//! The agent path runs on both runtimes: tract, and ONNX Runtime loaded as the agent loads it
//! (`Runtimes`), each against its bare runtime. Bare ONNX Runtime is the `ort` crate called
//! directly. Everything it needs is fetched or generated into `target/bench-cache/` (see
//! [`cache`]); nothing large is committed.

pub mod cache;
pub mod footprint;
pub mod http;
pub mod models;
pub mod report;
pub mod runtimes;

use std::cell::RefCell;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::Context;
use outpost_agent::api::{
    ApiLimits, ApiState, BackgroundApi, QueueStats, DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT,
};
use outpost_agent::slot::{ActiveModel, ModelDrift, ModelSlot};
use outpost_agent::telemetry::Recorder;
use outpost_model::drift::{build_profile, Extractor, ProfileOptions};
use outpost_model::example::example_inputs;
use outpost_model::inference::{
    LoadedModel, OnnxRuntimeSettings, RuntimeChoice, RuntimeKind, Runtimes,
};
use outpost_protocol::device::Tensor;
use outpost_protocol::Sha256;

use cache::Cache;
use http::{HttpFloor, RawClient};
use models::{f32s, BenchModel};
use report::{interleave, micros, print_table, Variant};
use runtimes::{BareTract, OnnxRuntime, Outputs};

/// Outputs agree when, for every output tensor, max |x − ort| ≤ `AGREEMENT` · max |ort|.
pub const AGREEMENT: f64 = 1e-4;

/// What to run, from the environment.
#[derive(Debug)]
pub struct Settings {
    /// `OUTPOST_BENCH_ROUNDS`: timed rounds per model and thread count (default per model).
    pub rounds: Option<usize>,
    /// `OUTPOST_BENCH_MODELS`: comma-separated (default all of [`models::NAMES`]).
    pub models: Vec<String>,
    /// `OUTPOST_BENCH_THREADS`: comma-separated thread counts (default `1,2`).
    pub threads: Vec<usize>,
    /// `OUTPOST_BENCH_FOOTPRINT=0` skips the memory and bandwidth part.
    pub footprint: bool,
    /// `OUTPOST_BENCH_F16=1` also times each model translated to f16 (minutes on a CPU without
    /// f16 arithmetic).
    pub f16: bool,
    pub cache_dir: PathBuf,
}

/// The whole number in the environment variable `name`, or `default` when it is not set.
pub fn env_usize(name: &str, default: usize) -> anyhow::Result<usize> {
    match std::env::var(name) {
        Ok(text) => text
            .parse()
            .map_err(|_| anyhow::anyhow!("{name}={text:?} is not a whole number")),
        Err(_) => Ok(default),
    }
}

fn list<T: std::str::FromStr>(name: &str, default: &str) -> anyhow::Result<Vec<T>> {
    let text = std::env::var(name).unwrap_or_else(|_| default.to_owned());
    text.split(',')
        .map(|item| {
            item.trim()
                .parse()
                .map_err(|_| anyhow::anyhow!("{name}={text:?}: {item:?} is not valid"))
        })
        .collect()
}

impl Settings {
    pub fn from_env() -> anyhow::Result<Settings> {
        let rounds = match std::env::var("OUTPOST_BENCH_ROUNDS") {
            Ok(text) => Some(text.parse().map_err(|_| {
                anyhow::anyhow!("OUTPOST_BENCH_ROUNDS={text:?} is not a whole number")
            })?),
            Err(_) => None,
        };
        let threads: Vec<usize> = list("OUTPOST_BENCH_THREADS", "1,2")?;
        anyhow::ensure!(
            threads.iter().all(|&n| n > 0),
            "OUTPOST_BENCH_THREADS must be positive"
        );
        Ok(Settings {
            rounds,
            models: list("OUTPOST_BENCH_MODELS", &models::NAMES.join(","))?,
            threads,
            footprint: std::env::var("OUTPOST_BENCH_FOOTPRINT").as_deref() != Ok("0"),
            f16: std::env::var("OUTPOST_BENCH_F16").as_deref() == Ok("1"),
            cache_dir: PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/bench-cache"),
        })
    }
}

/// How far one output of a runtime is from the reference's.
#[derive(Debug)]
struct Difference {
    name: String,
    /// max |got − reference|.
    diff: f64,
    /// max |reference|.
    magnitude: f64,
    nan: bool,
}

impl Difference {
    fn relative(&self) -> f64 {
        if self.magnitude > 0.0 {
            self.diff / self.magnitude
        } else {
            self.diff
        }
    }
}

/// Compares `got` with `reference`, output by output.
fn differences(what: &str, got: &Outputs, reference: &Outputs) -> anyhow::Result<Vec<Difference>> {
    anyhow::ensure!(
        got.len() == reference.len(),
        "{what}: {} outputs, the reference gave {}",
        got.len(),
        reference.len()
    );
    reference
        .iter()
        .map(|(name, expected)| {
            let (_, values) = got
                .iter()
                .find(|(other, _)| other == name)
                .with_context(|| format!("{what}: no output {name:?}"))?;
            anyhow::ensure!(
                values.len() == expected.len(),
                "{what}: output {name:?} has {} elements, the reference's {}",
                values.len(),
                expected.len()
            );
            Ok(Difference {
                name: name.clone(),
                diff: values.iter().zip(expected).fold(0f64, |m, (&a, &b)| {
                    m.max((f64::from(a) - f64::from(b)).abs())
                }),
                magnitude: expected
                    .iter()
                    .fold(0f64, |m, &v| m.max(f64::from(v).abs())),
                nan: values.iter().chain(expected).any(|v| v.is_nan()),
            })
        })
        .collect()
}

/// Checks `got` against ONNX Runtime's `reference`, output by output; prints the worst relative
/// difference and fails if any exceeds [`AGREEMENT`] or either side has a NaN.
fn check_agreement(what: &str, got: &Outputs, reference: &Outputs) -> anyhow::Result<()> {
    for difference in differences(what, got, reference)? {
        let relative = difference.relative();
        let Difference {
            name,
            diff,
            magnitude,
            nan,
        } = difference;
        println!(
            "- {what}, output `{name}`: max |Δ| = {diff:.3e}, max |ort| = {magnitude:.3e}, ratio {relative:.2e}"
        );
        anyhow::ensure!(
            !nan && diff <= AGREEMENT * magnitude,
            "OUTPUTS DISAGREE: {what}, output {name:?}: max |Δ| {diff:.3e} > {AGREEMENT:e} × \
             max |ort| {magnitude:.3e}{}",
            if nan { " (NaN)" } else { "" }
        );
    }
    Ok(())
}

/// The largest relative difference over the outputs, or NaN if any value is NaN.
fn worst_relative(what: &str, got: &Outputs, reference: &Outputs) -> anyhow::Result<f64> {
    let differences = differences(what, got, reference)?;
    if differences.iter().any(|difference| difference.nan) {
        return Ok(f64::NAN);
    }
    Ok(differences
        .iter()
        .map(Difference::relative)
        .fold(0.0, f64::max))
}

fn tensors_as_outputs(tensors: &[Tensor]) -> Outputs {
    tensors
        .iter()
        .map(|tensor| (tensor.name.clone(), f32s(&tensor.data)))
        .collect()
}

/// A drift profile over the model's inputs and outputs from 16 seeded reference rows, as a
/// published model has; `None` with the reason when the agent cannot build one for this model.
fn drift_profile(model: &BenchModel, loaded: &LoadedModel) -> Result<ModelDrift, String> {
    let reference = example_inputs(&model.inputs, 16, 7);
    let options = ProfileOptions {
        class_outputs: model.class_output.iter().map(|&s| s.to_owned()).collect(),
        ..ProfileOptions::default()
    };
    let profile = build_profile(loaded, &reference, &options).map_err(|e| format!("{e:#}"))?;
    let extractor =
        Extractor::new(&profile, &model.inputs, &model.outputs).map_err(|e| format!("{e:#}"))?;
    Ok(ModelDrift {
        profile,
        sha256: Sha256([2; 32]),
        extractor,
    })
}

/// The agent's inference path as the API runs it: [`LoadedModel::run`], then the telemetry
/// [`Recorder`] update with the drift summary when the model has a profile.
#[derive(Debug)]
pub struct AgentPath {
    pub loaded: LoadedModel,
    drift: Option<ModelDrift>,
    recorder: Recorder,
}

impl AgentPath {
    /// Loads `model` at `threads` with a drift profile if the agent can build one (see
    /// `drift_profile`; printed either way).
    pub fn load(model: &BenchModel, threads: usize) -> anyhow::Result<AgentPath> {
        let loaded = LoadedModel::load(&model.onnx, &model.inputs, &model.outputs, threads)?;
        AgentPath::with(model, loaded)
    }

    /// [`AgentPath::load`] on ONNX Runtime, as an agent with `runtime = "onnxruntime"` loads a
    /// model: through `Runtimes::load`, failing if it would fall back to tract.
    pub fn load_on_onnxruntime(
        model: &BenchModel,
        threads: usize,
        runtimes: &Runtimes,
    ) -> anyhow::Result<AgentPath> {
        let far = Instant::now() + Duration::from_secs(3600);
        let selected = runtimes.load(
            &model.onnx,
            &model.inputs,
            &model.outputs,
            threads,
            None,
            far,
        )?;
        if let Some(fallback) = selected.fallback {
            anyhow::bail!("the agent would serve {} on tract: {fallback}", model.name);
        }
        AgentPath::with(model, selected.model)
    }

    fn with(model: &BenchModel, loaded: LoadedModel) -> anyhow::Result<AgentPath> {
        let drift = match drift_profile(model, &loaded) {
            Ok(drift) => {
                println!(
                    "drift profile: {} features, {} class outputs",
                    drift.profile.features.len(),
                    drift.profile.classes.len()
                );
                Some(drift)
            }
            Err(reason) => {
                println!("drift profile: none, the agent cannot build one here ({reason})");
                None
            }
        };
        Ok(AgentPath {
            loaded,
            drift,
            recorder: Recorder::new(),
        })
    }

    /// [`LoadedModel::run`] alone: the request's checks and tensor copies, no telemetry.
    pub fn run_model(&self, model: &BenchModel) -> anyhow::Result<()> {
        self.loaded.run(&model.request)?;
        Ok(())
    }

    /// The path with the telemetry counters but without the drift update, as for a model
    /// published without a profile.
    pub fn run_without_drift(&self, model: &BenchModel) -> anyhow::Result<()> {
        let started = Instant::now();
        self.loaded.run(&model.request)?;
        let latency = started.elapsed();
        let now = outpost_agent::unix_now();
        self.recorder.record(model.name, 1, latency, true, now);
        Ok(())
    }

    pub fn run(&self, model: &BenchModel) -> anyhow::Result<()> {
        let started = Instant::now();
        let outputs = self.loaded.run(&model.request)?;
        let latency = started.elapsed();
        let now = outpost_agent::unix_now();
        match &self.drift {
            Some(drift) => self.recorder.record_with_drift(
                model.name,
                1,
                drift,
                latency,
                now,
                &model.request,
                &outputs,
            ),
            None => self.recorder.record(model.name, 1, latency, true, now),
        }
        Ok(())
    }

    /// The model and profile as the agent's slot holds them, for [`LocalApi`].
    pub fn into_active(self, model: &BenchModel) -> ActiveModel {
        ActiveModel {
            name: model.name.to_owned(),
            version: 1,
            manifest_sha256: Sha256([1; 32]),
            model: self.loaded,
            drift: self.drift,
            runtime_fallback: None,
        }
    }
}

/// The KServe v2 JSON body and binary-extension body (and its JSON header's length) of the request.
pub fn api_bodies(model: &BenchModel) -> anyhow::Result<(Vec<u8>, Vec<u8>, usize)> {
    let json = serde_json::json!({"inputs": model.request.iter().enumerate().map(|(i, tensor)| {
        serde_json::json!({"name": tensor.name, "shape": tensor.shape, "datatype": "FP32",
                           "data": model.input_values(i)})
    }).collect::<Vec<_>>()});
    let header = serde_json::json!({
        "inputs": model.request.iter().map(|tensor| serde_json::json!({
            "name": tensor.name, "shape": tensor.shape, "datatype": "FP32",
            "parameters": {"binary_data_size": tensor.data.len()}})).collect::<Vec<_>>(),
        "outputs": model.outputs.iter().map(|spec| serde_json::json!({
            "name": spec.name, "parameters": {"binary_data": true}})).collect::<Vec<_>>(),
    });
    let mut binary = serde_json::to_vec(&header)?;
    let header_len = binary.len();
    for tensor in &model.request {
        binary.extend_from_slice(&tensor.data);
    }
    Ok((serde_json::to_vec(&json)?, binary, header_len))
}

/// The agent's local inference API on loopback, serving one model on its own runtime (two
/// workers) as the agent runs it, and a keep-alive HTTP client for it.
#[derive(Debug)]
pub struct LocalApi {
    server: BackgroundApi,
    url_path: String,
    url: String,
    http: ureq::Agent,
}

impl LocalApi {
    pub fn start(active: ActiveModel) -> anyhow::Result<LocalApi> {
        let url_path = format!("/v2/models/{}/infer", active.name);
        let slot = Arc::new(ModelSlot::new());
        slot.swap(Arc::new(active));
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
        let url = format!("http://{}{url_path}", server.address());
        // Timeouts on sending and receiving only: with a global (or resolve) timeout ureq resolves
        // every request's host on a thread it spawns, even an IP on a pooled connection, which
        // cost ≈ 50 µs a request here and was most of what earlier runs called the API's cost.
        let http = ureq::Agent::config_builder()
            .timeout_send_body(Some(Duration::from_secs(60)))
            .timeout_recv_response(Some(Duration::from_secs(60)))
            .timeout_recv_body(Some(Duration::from_secs(60)))
            .build()
            .new_agent();
        Ok(LocalApi {
            server,
            url_path,
            url,
            http,
        })
    }

    /// The address the API serves on.
    pub fn address(&self) -> std::net::SocketAddr {
        self.server.address()
    }

    /// The inference route's path.
    pub fn path(&self) -> &str {
        &self.url_path
    }

    /// The bytes of the JSON and the binary-extension inference request, for a [`RawClient`].
    pub fn raw_requests(
        &self,
        json_body: &[u8],
        binary_body: &[u8],
        header_len: usize,
    ) -> (Vec<u8>, Vec<u8>) {
        let json = RawClient::request(
            &self.url_path,
            &[("content-type", "application/json".to_owned())],
            json_body,
        );
        let binary = RawClient::request(
            &self.url_path,
            &[
                ("content-type", "application/octet-stream".to_owned()),
                ("inference-header-content-length", header_len.to_string()),
            ],
            binary_body,
        );
        (json, binary)
    }

    /// POSTs a KServe v2 JSON request and returns the answer's bytes.
    pub fn post_json(&self, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        self.post_json_to(&self.url, body)
    }

    /// [`LocalApi::post_json`] to another server, with the same client.
    pub fn post_json_to(&self, url: &str, body: &[u8]) -> anyhow::Result<Vec<u8>> {
        let mut response = self
            .http
            .post(url)
            .header("content-type", "application/json")
            .send(body)?;
        Ok(response.body_mut().read_to_vec()?)
    }

    /// POSTs a request in the binary tensor extension (`header_len` bytes of JSON, then raw
    /// tensors) and returns the answer's bytes.
    pub fn post_binary(&self, body: &[u8], header_len: usize) -> anyhow::Result<Vec<u8>> {
        let mut response = self
            .http
            .post(&self.url)
            .header("content-type", "application/octet-stream")
            .header("inference-header-content-length", header_len.to_string())
            .send(body)?;
        Ok(response.body_mut().read_to_vec()?)
    }

    pub fn stop(self) -> anyhow::Result<()> {
        Ok(self.server.stop()?)
    }
}

/// The time `load` takes, best of three.
fn best_of_three<T>(mut load: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<Duration> {
    let mut best = Duration::MAX;
    for _ in 0..3 {
        let started = Instant::now();
        drop(load()?);
        best = best.min(started.elapsed());
    }
    Ok(best)
}

/// Load times of one model: the agent's (verified ONNX bytes to a ready `LoadedModel`, which is
/// what activation does after the signature check), bare tract's, bare tract's from the model's
/// NNEF archive (the form a device could cache after the first load) and ONNX Runtime's.
fn report_loads(model: &BenchModel) -> anyhow::Result<()> {
    let agent = best_of_three(|| {
        LoadedModel::load(&model.onnx, &model.inputs, &model.outputs, 1).map_err(Into::into)
    })?;
    let bare = best_of_three(|| BareTract::load(model, 1))?;
    let nnef = runtimes::nnef();
    let archive = BareTract::nnef_archive(model, &nnef)?;
    let from_nnef = best_of_three(|| BareTract::load_nnef(model, &nnef, &archive, 1))?;
    let ort = best_of_three(|| OnnxRuntime::load(model, 1))?;
    println!(
        "load (best of 3, 1 thread): agent `LoadedModel::load` {}, bare tract {}, bare tract from \
         its NNEF archive {} ({} bytes against {} of ONNX), ONNX Runtime session {}",
        micros(agent),
        micros(bare),
        micros(from_nnef),
        archive.len(),
        model.onnx.len(),
        micros(ort)
    );
    let reference = BareTract::load(model, 1)?.outputs()?;
    let got = BareTract::load_nnef(model, &nnef, &archive, 1)?.outputs()?;
    let off = worst_relative("bare tract from NNEF", &got, &reference)?;
    anyhow::ensure!(
        off <= AGREEMENT,
        "the NNEF archive of {} computes other outputs: off by {off:.2e} of their magnitude",
        model.name
    );
    Ok(())
}

/// tract's f16 translation of the whole model next to f32, at 1 thread: the time of a call and
/// how far the outputs move. Interleaved over `rounds` calls when f16's first call is within 10x
/// of f32's best; when it is slower than that (tract has no f16 kernels for the CPU, and a CNN's
/// call then takes seconds) that one call is the figure. A model tract cannot translate or plan
/// in f16 is reported as such.
fn report_f16(model: &BenchModel, rounds: usize) -> anyhow::Result<()> {
    let single = BareTract::load(model, 1)?;
    let half = match BareTract::load_f16(model, 1) {
        Ok(half) => half,
        Err(error) => {
            println!("f16: tract does not run this model in f16: {error:#}");
            return Ok(());
        }
    };
    let best_single = best_of_three(|| single.run())?;
    let started = Instant::now();
    let half_outputs = half.outputs()?;
    let first_half = started.elapsed();
    let off = worst_relative("bare tract in f16", &half_outputs, &single.outputs()?)?;
    let (how, half_time, single_time) = if first_half > best_single * 10 {
        (
            "one call against f32's best of 3".to_owned(),
            first_half,
            best_single,
        )
    } else {
        let timings = interleave(
            rounds,
            &[
                ("f32", &|| single.run().map(drop)),
                ("f16", &|| half.run().map(drop)),
            ],
        )?;
        (
            format!("p50 of {rounds} interleaved calls"),
            timings[1].p50(),
            timings[0].p50(),
        )
    };
    println!(
        "f16 (1 thread, {how}): {} against f32 {} ({:.2}x); outputs off by {off:.2e} of their \
         largest magnitude (the harness's agreement bar is {AGREEMENT:e})",
        micros(half_time),
        micros(single_time),
        half_time.as_secs_f64() / single_time.as_secs_f64()
    );
    Ok(())
}

/// Where bare tract spends a call at one thread, by operator kind (tract's own op names, after
/// optimisation), from 20 timed runs.
fn report_profile(model: &BenchModel) -> anyhow::Result<()> {
    let profile = BareTract::load(model, 1)?.profile(20)?;
    let total: Duration = profile.iter().map(|(_, time)| *time).sum();
    let shares: Vec<String> = profile
        .iter()
        .take(6)
        .map(|(op, time)| {
            format!(
                "{op} {} ({:.0}%)",
                micros(*time),
                100.0 * time.as_secs_f64() / total.as_secs_f64()
            )
        })
        .collect();
    println!(
        "tract profile (1 thread, mean per call, {} in all): {}",
        micros(total),
        shares.join(", ")
    );
    Ok(())
}

/// Benchmarks one model at one thread count: agreement first, then the interleaved timing.
fn bench_model(
    model: &BenchModel,
    threads: usize,
    rounds: usize,
    runtimes: &Runtimes,
) -> anyhow::Result<()> {
    println!(
        "\n#### {} — {threads} thread(s), {rounds} rounds\n",
        model.name
    );
    let bare = BareTract::load(model, threads)?;
    let ort = OnnxRuntime::load(model, threads)?;
    let path = AgentPath::load(model, threads)?;
    let ort_path = AgentPath::load_on_onnxruntime(model, threads, runtimes)?;
    anyhow::ensure!(ort_path.loaded.runtime().kind == RuntimeKind::OnnxRuntime);
    let reference = ort.outputs()?;
    check_agreement("bare tract", &bare.outputs()?, &reference)?;
    check_agreement(
        "agent path",
        &tensors_as_outputs(&path.loaded.run(&model.request)?),
        &reference,
    )?;
    check_agreement(
        "agent path on ONNX Runtime",
        &tensors_as_outputs(&ort_path.loaded.run(&model.request)?),
        &reference,
    )?;
    println!();

    let api = LocalApi::start(AgentPath::load(model, threads)?.into_active(model))?;
    let (json_body, binary_body, header_len) = api_bodies(model)?;
    // The same requests through a client that only writes and reads ([`http::RawClient`]), and
    // the HTTP exchange alone: a bare hyper server answering the API's own JSON answer.
    let (raw_json, raw_binary) = api.raw_requests(&json_body, &binary_body, header_len);
    let raw = RefCell::new(RawClient::connect(api.address())?);
    let floor = HttpFloor::start(api.post_json(&json_body)?)?;
    let floor_url = format!("http://{}{}", floor.address(), api.path());
    let floor_raw = RefCell::new(RawClient::connect(floor.address())?);

    let run_bare = || bare.run().map(drop);
    let run_path = || path.run(model);
    let run_model = || path.run_model(model);
    let run_counted = || path.run_without_drift(model);
    let run_json = || api.post_json(&json_body).map(drop);
    let run_binary = || api.post_binary(&binary_body, header_len).map(drop);
    let run_raw_json = || raw.borrow_mut().exchange(&raw_json).map(drop);
    let run_raw_binary = || raw.borrow_mut().exchange(&raw_binary).map(drop);
    let run_floor = || api.post_json_to(&floor_url, &json_body).map(drop);
    let run_floor_raw = || floor_raw.borrow_mut().exchange(&raw_json).map(drop);
    let run_ort = || ort.run();
    let run_ort_path = || ort_path.run(model);
    let run_ort_model = || ort_path.run_model(model);
    // The agent path's rows split its overhead over bare tract: the request's checks and copies,
    // then the telemetry counters, then the drift update. The last two are the same path with
    // the model on ONNX Runtime, against bare ONNX Runtime.
    let variants: [Variant; 13] = [
        ("bare tract", &run_bare),
        (
            "agent path (LoadedModel::run + telemetry + drift)",
            &run_path,
        ),
        ("agent path, LoadedModel::run alone", &run_model),
        ("agent path, telemetry without drift", &run_counted),
        ("local API, KServe v2 JSON (ureq)", &run_json),
        ("local API, binary tensor extension (ureq)", &run_binary),
        ("ONNX Runtime", &run_ort),
        (
            "agent path on ONNX Runtime (LoadedModel::run + telemetry + drift)",
            &run_ort_path,
        ),
        (
            "agent path on ONNX Runtime, LoadedModel::run alone",
            &run_ort_model,
        ),
        ("local API, KServe v2 JSON (raw client)", &run_raw_json),
        (
            "local API, binary tensor extension (raw client)",
            &run_raw_binary,
        ),
        ("HTTP floor: bare hyper, fixed answer (ureq)", &run_floor),
        (
            "HTTP floor: bare hyper, fixed answer (raw client)",
            &run_floor_raw,
        ),
    ];
    let timings = interleave(rounds, &variants)?;
    api.stop()?;
    drop(floor);
    print_table(&timings, &timings[6]);
    let p50 = |index: usize| timings[index].p50().as_secs_f64();
    let over = |index: usize, base: usize| p50(index) / p50(base);
    let over_p90 = |index: usize, base: usize| {
        timings[index].percentile(0.9).as_secs_f64() / timings[base].percentile(0.9).as_secs_f64()
    };
    println!(
        "\nagent path ÷ bare tract at p50: {:.3} (LoadedModel::run alone {:.3}, with telemetry \
         but no drift {:.3}); at p90 {:.3}",
        over(1, 0),
        over(2, 0),
        over(3, 0),
        over_p90(1, 0)
    );
    println!(
        "agent path on ONNX Runtime ÷ bare ONNX Runtime at p50: {:.3} (LoadedModel::run alone \
         {:.3}); at p90 {:.3}",
        over(7, 6),
        over(8, 6),
        over_p90(7, 6)
    );
    // The API's fixed cost: its p50 less the agent path's, per client and body; and the part of
    // it that is the HTTP exchange alone (the floor with the same client).
    let fixed = |api: usize| (p50(api) - p50(1)) * 1e6;
    println!(
        "local API fixed cost at p50 (API − agent path): ureq JSON {:.1} µs, binary {:.1} µs; raw \
         client JSON {:.1} µs, binary {:.1} µs; of which the HTTP exchange alone (bare hyper): \
         ureq {:.1} µs, raw client {:.1} µs",
        fixed(4),
        fixed(5),
        fixed(9),
        fixed(10),
        p50(11) * 1e6,
        p50(12) * 1e6
    );
    Ok(())
}

/// What `runtime = "auto"` costs an agent's start on a device without ONNX Runtime: the time of
/// `outpost_agent::runtime::start` on a config naming no library (median of 1,000; it looks for
/// the library in the default places and spawns nothing).
fn report_auto_without_library(cache_dir: &std::path::Path) -> anyhow::Result<()> {
    let path = cache_dir.join("auto-agent.toml");
    std::fs::write(
        &path,
        "hub_url = \"https://hub.invalid\"\ntrust_root = \"root.bin\"\ndata_dir = \"data\"\n",
    )?;
    let config = outpost_agent::config::load(&path)?;
    let mut times: Vec<Duration> = (0..1000)
        .map(|_| {
            let started = Instant::now();
            let runtimes = outpost_agent::runtime::start(&config);
            let took = started.elapsed();
            anyhow::ensure!(
                !runtimes.onnxruntime_ready(),
                "this machine has ONNX Runtime in a default place; the figure would not be of a \
                 device without it"
            );
            Ok(took)
        })
        .collect::<anyhow::Result<_>>()?;
    times.sort_unstable();
    println!(
        "agent start, `runtime = \"auto\"` without a library: `runtime::start` {} (median of \
         1,000), nothing per request",
        micros(times[times.len() / 2])
    );
    Ok(())
}

/// Runs everything [`Settings`] asks for and prints the report (Markdown) to stdout.
pub fn run(settings: &Settings) -> anyhow::Result<()> {
    let cache = Cache::prepare(&settings.cache_dir)?;
    report_auto_without_library(&settings.cache_dir)?;
    let library = cache.onnxruntime_library()?;
    runtimes::init_onnxruntime(&library)?;
    // The agent's own loading of the same library, as `runtime = "onnxruntime"` sets it up.
    let agent_runtimes = Runtimes::new(
        RuntimeChoice::OnnxRuntime,
        &OnnxRuntimeSettings {
            library: Some(library.clone()),
            providers: Vec::new(),
        },
    );
    if let Some(problem) = agent_runtimes.onnxruntime_problem() {
        anyhow::bail!("the agent cannot use ONNX Runtime here: {problem}");
    }
    let mut notes = Vec::new();
    let models = settings
        .models
        .iter()
        .map(|name| BenchModel::load(name, &cache, &mut notes))
        .collect::<anyhow::Result<Vec<_>>>()?;
    println!("ONNX Runtime: {}", library.display());
    for note in &notes {
        println!("note: {note}");
    }
    for model in &models {
        println!(
            "\n### {}: {} ({} bytes)\n",
            model.name,
            model.description,
            model.onnx.len()
        );
        report_loads(model)?;
        report_profile(model)?;
        if settings.f16 {
            report_f16(model, settings.rounds.unwrap_or(model.default_rounds) / 4)?;
        }
        for &threads in &settings.threads {
            bench_model(
                model,
                threads,
                settings.rounds.unwrap_or(model.default_rounds),
                &agent_runtimes,
            )?;
        }
    }
    if settings.footprint {
        footprint::report(&models)?;
    }
    Ok(())
}
