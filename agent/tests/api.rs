//! The local inference API over real HTTP: the Open Inference Protocol endpoints, every refusal a
//! client gets for a bad request, hot swaps under load, `/metrics`, and an off-the-shelf
//! `tritonclient` talking to it unchanged.
//!
//! With `OUTPOST_TEST_RUNTIME=onnxruntime` every model here is loaded into ONNX Runtime (the
//! library `cargo xtask install` brings), so the same tests prove the API behaves the same on it;
//! `cargo xtask test` runs them both ways.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use outpost_agent::api::{
    ApiLimits, ApiState, BackgroundApi, QueueStats, API_HEADER_TIMEOUT, API_MAX_CONNECTIONS,
    DEFAULT_MAX_BODY_BYTES, DEFAULT_REQUEST_TIMEOUT,
};
use outpost_agent::slot::{ActiveModel, ModelDrift, ModelSlot};
use outpost_agent::telemetry::Recorder;
use outpost_model::drift::{build_profile, Extractor, ProfileOptions};
use outpost_model::example::{
    batch_mean, batch_mean_specs, byte_casts, byte_casts_specs, example_inputs, mlp, mlp_specs,
    normal_rows,
};
use outpost_model::inference::{
    LoadedModel, OnnxRuntimeSettings, RuntimeChoice, RuntimeKind, Runtimes,
};
use outpost_protocol::device::Tensor;
use outpost_protocol::trust::DType;
use outpost_protocol::trust::TensorSpec;
use outpost_protocol::Sha256;
use serde_json::{json, Value};

const N_INPUTS: usize = 4;
const HIDDEN: usize = 8;
const N_OUTPUTS: usize = 3;
const MODEL: &str = "classifier";

/// Loads a model into the runtime the run asks for (see the module docs).
fn load(onnx: &[u8], inputs: &[TensorSpec], outputs: &[TensorSpec]) -> LoadedModel {
    match std::env::var("OUTPOST_TEST_RUNTIME").as_deref() {
        Ok("onnxruntime") => {
            let library = outpost_model::example::installed_onnxruntime(std::env::consts::ARCH);
            let runtimes = Runtimes::new(
                RuntimeChoice::OnnxRuntime,
                &OnnxRuntimeSettings {
                    library: Some(library),
                    providers: Vec::new(),
                },
            );
            let selected = runtimes
                .load(onnx, inputs, outputs, 1, None, Instant::now())
                .expect("the model loads");
            assert_eq!(
                (selected.model.runtime().kind, selected.fallback),
                (RuntimeKind::OnnxRuntime, None)
            );
            selected.model
        }
        Ok("tract") | Err(_) => {
            LoadedModel::load(onnx, inputs, outputs, 1).expect("the model loads")
        }
        Ok(other) => panic!("OUTPOST_TEST_RUNTIME={other:?}: give tract or onnxruntime"),
    }
}

fn mlp_model(seed: u64) -> LoadedModel {
    let (inputs, outputs) = mlp_specs(N_INPUTS, N_OUTPUTS);
    load(&mlp(N_INPUTS, HIDDEN, N_OUTPUTS, seed), &inputs, &outputs)
}

/// Version `version` of the test model: the MLP with seed `version`.
fn mlp_version(version: u64) -> Arc<ActiveModel> {
    Arc::new(ActiveModel {
        name: MODEL.to_owned(),
        version,
        manifest_sha256: Sha256([version as u8; 32]),
        model: mlp_model(version),
        drift: None,
        runtime_fallback: None,
    })
}

fn byte_casts_active(width: usize) -> Arc<ActiveModel> {
    let (inputs, outputs) = byte_casts_specs(width);
    Arc::new(ActiveModel {
        name: "casts".to_owned(),
        version: 7,
        manifest_sha256: Sha256([7; 32]),
        model: load(&byte_casts(width), &inputs, &outputs),
        drift: None,
        runtime_fallback: None,
    })
}

/// An API server on 127.0.0.1:0, on its own runtime, stopped when dropped.
struct Api {
    base: String,
    http: ureq::Agent,
    slot: Arc<ModelSlot>,
    state: Arc<ApiState>,
    server: BackgroundApi,
}

impl Api {
    fn start() -> Api {
        Api::start_with(ApiLimits {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        })
    }

    fn start_with(limits: ApiLimits) -> Api {
        let slot = Arc::new(ModelSlot::new());
        let state = Arc::new(ApiState::new(
            slot.clone(),
            Arc::new(Recorder::new()),
            Arc::new(QueueStats::default()),
            limits,
        ));
        let server = BackgroundApi::start(([127, 0, 0, 1], 0).into(), state.clone(), 2)
            .expect("starting the API on 127.0.0.1:0");
        let http = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(Duration::from_secs(30)))
            .build()
            .new_agent();
        Api {
            base: format!("http://{}", server.address()),
            http,
            slot,
            state,
            server,
        }
    }

    fn get(&self, path: &str) -> Reply {
        let response = self
            .http
            .get(format!("{}{path}", self.base))
            .call()
            .expect("GET reaches the API");
        Reply::read(response)
    }

    fn post(&self, path: &str, body: &[u8]) -> Reply {
        self.post_with(path, body, None)
    }

    /// POSTs `body`; `json_length` sets the binary tensor extension's header.
    fn post_with(&self, path: &str, body: &[u8], json_length: Option<usize>) -> Reply {
        let mut request = self
            .http
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        if let Some(length) = json_length {
            request = request.header("inference-header-content-length", length.to_string());
        }
        Reply::read(request.send(body).expect("POST reaches the API"))
    }

    fn infer(&self, request: &Value) -> Reply {
        self.post(
            &format!("/v2/models/{MODEL}/infer"),
            request.to_string().as_bytes(),
        )
    }

    fn metrics(&self) -> String {
        let reply = self.get("/metrics");
        assert_eq!(reply.status, 200);
        String::from_utf8(reply.body).expect("metrics are UTF-8")
    }

    /// Stops the server and returns what `serve` returned.
    fn stop(self) -> std::io::Result<()> {
        self.server.stop()
    }
}

struct Reply {
    status: u16,
    headers: ureq::http::HeaderMap,
    body: Vec<u8>,
}

impl Reply {
    fn read(mut response: ureq::http::Response<ureq::Body>) -> Reply {
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        let body = response
            .body_mut()
            .with_config()
            .limit(256 * 1024 * 1024)
            .read_to_vec()
            .expect("reading the response body");
        Reply {
            status,
            headers,
            body,
        }
    }

    fn json(&self) -> Value {
        serde_json::from_slice(&self.body).unwrap_or_else(|error| {
            panic!(
                "status {} body is not JSON ({error}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        })
    }

    /// Decodes a 200 answer; panics with the API's error otherwise.
    fn ok(&self) -> Value {
        assert_eq!(
            self.status,
            200,
            "expected 200, got {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        self.json()
    }

    /// Panics unless the status is `status` and the `error` message contains every needle.
    fn refused(&self, status: u16, needles: &[&str]) {
        let body = self.json();
        let message = body["error"]
            .as_str()
            .unwrap_or_else(|| panic!("no error message in {body}"));
        assert_eq!(
            self.status, status,
            "expected status {status}, got {} ({message})",
            self.status
        );
        for needle in needles {
            assert!(
                message.contains(needle),
                "error message {message:?} does not mention {needle:?}"
            );
        }
    }
}

fn f32s(tensor: &Tensor) -> Vec<f32> {
    assert_eq!(tensor.dtype, DType::F32);
    tensor
        .data
        .chunks_exact(4)
        .map(|bytes| f32::from_le_bytes(bytes.try_into().expect("4 bytes")))
        .collect()
}

/// A tensor's elements as JSON numbers, as the API should send them back.
fn json_data(tensor: &Tensor) -> Vec<Value> {
    fn each<const N: usize, T>(data: &[u8], convert: impl Fn([u8; N]) -> T) -> Vec<T> {
        data.chunks_exact(N)
            .map(|bytes| convert(bytes.try_into().expect("element bytes")))
            .collect()
    }
    match tensor.dtype {
        DType::F32 => each(&tensor.data, f32::from_le_bytes)
            .into_iter()
            .map(|value| json!(value))
            .collect(),
        DType::F64 => each(&tensor.data, f64::from_le_bytes)
            .into_iter()
            .map(|value| json!(value))
            .collect(),
        DType::I32 => each(&tensor.data, i32::from_le_bytes)
            .into_iter()
            .map(|value| json!(value))
            .collect(),
        DType::I64 => each(&tensor.data, i64::from_le_bytes)
            .into_iter()
            .map(|value| json!(value))
            .collect(),
        DType::U8 => tensor.data.iter().map(|value| json!(value)).collect(),
    }
}

/// The request JSON for protocol tensors, data flat.
fn request_for(inputs: &[Tensor]) -> Value {
    let inputs: Vec<Value> = inputs
        .iter()
        .map(|tensor| {
            json!({
                "name": tensor.name,
                "shape": tensor.shape,
                "datatype": tensor.dtype.as_str(),
                "data": json_data(tensor),
            })
        })
        .collect();
    json!({ "inputs": inputs })
}

/// Checks a response's outputs against what `LoadedModel::run` gives for the same inputs.
fn assert_outputs_match(response: &Value, expected: &[Tensor]) {
    let outputs = response["outputs"].as_array().expect("outputs array");
    assert_eq!(outputs.len(), expected.len(), "{response}");
    for (got, want) in outputs.iter().zip(expected) {
        assert_eq!(got["name"], want.name.as_str());
        assert_eq!(got["datatype"], want.dtype.as_str());
        assert_eq!(got["shape"], json!(want.shape));
        let got_data = got["data"].as_array().expect("flat data");
        if want.dtype == DType::F32 {
            // JSON carries the shortest decimal that reads back as the same f32.
            let got_values: Vec<f32> = got_data
                .iter()
                .map(|value| value.as_f64().expect("number") as f32)
                .collect();
            assert_eq!(got_values, f32s(want), "output {}", want.name);
        } else {
            assert_eq!(got_data, &json_data(want), "output {}", want.name);
        }
    }
}

fn mlp_inputs(batch: u64, seed: u64) -> Vec<Tensor> {
    let (inputs, _) = mlp_specs(N_INPUTS, N_OUTPUTS);
    example_inputs(&inputs, batch, seed)
}

/// Version `version` of the test model with a drift profile of its inputs and class output.
fn mlp_version_with_profile(version: u64) -> Arc<ActiveModel> {
    let model = mlp_model(version);
    let reference = normal_rows(N_INPUTS, 1000, 5, 0.0);
    let profile = build_profile(
        &model,
        &[Tensor {
            name: "x".to_owned(),
            dtype: DType::F32,
            shape: vec![1000, N_INPUTS as u64],
            data: reference.iter().flat_map(|v| v.to_le_bytes()).collect(),
        }],
        &ProfileOptions {
            class_outputs: vec!["y".to_owned()],
            ..ProfileOptions::default()
        },
    )
    .expect("profiling the test model");
    let extractor =
        Extractor::new(&profile, model.inputs(), model.outputs()).expect("the profile fits");
    Arc::new(ActiveModel {
        name: MODEL.to_owned(),
        version,
        manifest_sha256: Sha256([version as u8; 32]),
        model,
        drift: Some(ModelDrift {
            profile,
            sha256: Sha256([9; 32]),
            extractor,
        }),
        runtime_fallback: None,
    })
}

/// Posts `rows` (each of `N_INPUTS` values) to the model through the binary tensor extension,
/// which, unlike JSON, carries NaN and infinities.
fn infer_binary_rows(api: &Api, rows: &[f32]) -> Reply {
    let header = json!({"inputs": [{
        "name": "x", "shape": [rows.len() / N_INPUTS, N_INPUTS], "datatype": "FP32",
        "parameters": {"binary_data_size": rows.len() * 4}
    }]})
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend(rows.iter().flat_map(|v| v.to_le_bytes()));
    api.post_with(
        &format!("/v2/models/{MODEL}/infer"),
        &body,
        Some(header.len()),
    )
}

#[test]
fn served_requests_fill_the_windows_drift_summary() {
    let api = Api::start();
    api.slot.swap(mlp_version_with_profile(1));
    // Five requests of two rows. JSON has no NaN, so the last goes through the binary tensor
    // extension, with x1 of its second row NaN.
    for index in 0..5u64 {
        let mut rows = normal_rows(N_INPUTS, 2, 100 + index, 0.0);
        let reply = if index < 4 {
            api.infer(&json!({"inputs": [{
                "name": "x", "shape": [2, N_INPUTS], "datatype": "FP32", "data": rows
            }]}))
        } else {
            rows[N_INPUTS + 1] = f32::NAN;
            infer_binary_rows(&api, &rows)
        };
        assert_eq!(
            reply.status,
            200,
            "{}",
            String::from_utf8_lossy(&reply.body)
        );
    }
    // A refused request has no answer and is not summarised.
    let refused = api.infer(
        &json!({"inputs": [{"name": "x", "shape": [1, 3], "datatype": "FP32", "data": [1, 2, 3]}]}),
    );
    assert_eq!(refused.status, 400);

    let windows = api.state.recorder.take_all();
    let [window] = windows.as_slice() else {
        panic!("one window: {windows:?}");
    };
    assert_eq!(window.count, 5);
    let drift = window
        .drift
        .as_ref()
        .expect("the window carries a drift summary");
    assert_eq!((drift.model.as_str(), drift.version), (MODEL, 1));
    assert_eq!(drift.profile_sha256, Sha256([9; 32]));
    assert_eq!(drift.window_end - drift.window_start, 3600);
    assert_eq!(drift.features.len(), N_INPUTS);
    for (index, feature) in drift.features.iter().enumerate() {
        let (finite, nan) = if index == 1 { (9, 1) } else { (10, 0) };
        assert_eq!((feature.n, feature.nan), (finite, nan), "feature {index}");
        assert_eq!(
            feature.below + feature.bins.iter().sum::<u64>() + feature.above,
            finite
        );
    }
    let [classes] = drift.classes.as_slice() else {
        panic!("one class output");
    };
    assert_eq!(classes.counts.iter().sum::<u64>() + classes.unseen, 10);
    assert_eq!(drift.latency_us.iter().sum::<u64>(), 5);
}

/// Issue 21: NaN and ±Inf in binary tensor data reach the model as they are (NaN is how many
/// tabular models take a missing value), count in the window's drift summary as the data-quality
/// facts they are, and an answer's non-finite outputs, `null` in JSON, are counted in the
/// output's `parameters.non_finite`, so a client need not guess what a `null` means.
#[test]
fn non_finite_inputs_are_served_counted_in_drift_and_named_in_the_answer() {
    let api = Api::start();
    api.slot.swap(mlp_version_with_profile(1));
    let mut rows = normal_rows(N_INPUTS, 2, 7, 0.0);
    rows[N_INPUTS] = f32::NAN;
    rows[N_INPUTS + 2] = f32::INFINITY;
    let reply = infer_binary_rows(&api, &rows);
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let answer: Value = serde_json::from_slice(&reply.body).unwrap();
    let output = &answer["outputs"][0];
    let data = output["data"].as_array().unwrap();
    let width = data.len() / 2;
    // The first row is finite throughout. Whether the second, fed NaN, answers NaN depends on
    // the CPU's kernels (x86_64's propagate it through the MLP's ReLU; aarch64's max returns the
    // other operand): what JSON says as null, the answer counts, and says nothing when none.
    assert!(data[..width].iter().all(Value::is_number), "{answer}");
    let nulls = data.iter().filter(|value| value.is_null()).count();
    if nulls == 0 {
        assert_eq!(output["parameters"]["non_finite"], Value::Null, "{answer}");
    } else {
        assert_eq!(output["parameters"]["non_finite"], json!(nulls), "{answer}");
    }

    let windows = api.state.recorder.take_all();
    let drift = windows[0].drift.as_ref().unwrap();
    let (nan, inf): (Vec<u64>, Vec<u64>) = drift
        .features
        .iter()
        .map(|feature| (feature.nan, feature.pos_inf))
        .unzip();
    assert_eq!(nan, [1, 0, 0, 0]);
    assert_eq!(inf, [0, 0, 1, 0]);
}

#[test]
fn health_and_readiness_follow_the_slot() {
    let api = Api::start();
    assert_eq!(api.get("/v2/health/live").status, 200);
    assert_eq!(api.get("/v2/health/ready").status, 503);
    assert_eq!(api.get(&format!("/v2/models/{MODEL}/ready")).status, 503);
    api.infer(&request_for(&mlp_inputs(1, 1)))
        .refused(503, &["no model is active"]);

    api.slot.swap(mlp_version(1));
    assert_eq!(api.get("/v2/health/live").status, 200);
    assert_eq!(api.get("/v2/health/ready").status, 200);
    assert_eq!(api.get(&format!("/v2/models/{MODEL}/ready")).status, 200);
    assert_eq!(
        api.get(&format!("/v2/models/{MODEL}/versions/1/ready"))
            .status,
        200
    );
    assert_eq!(
        api.get(&format!("/v2/models/{MODEL}/versions/2/ready"))
            .status,
        404
    );
    assert_eq!(api.get("/v2/models/other/ready").status, 404);
}

#[test]
fn server_and_model_metadata() {
    let api = Api::start();
    let server = api.get("/v2").ok();
    assert_eq!(server["name"], "outpost-agent");
    assert_eq!(server["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(server["extensions"], json!(["binary_tensor_data"]));
    assert_eq!(api.get("/v2/models").ok(), json!({"models": []}));
    assert_eq!(api.post("/v2/repository/index", b"{}").ok(), json!([]));

    api.slot.swap(mlp_version(3));
    let listed = json!({"name": MODEL, "version": "3", "state": "READY"});
    assert_eq!(api.get("/v2/models").ok(), json!({ "models": [listed] }));
    assert_eq!(api.post("/v2/repository/index", b"").ok(), json!([listed]));
    let expected = json!({
        "name": MODEL,
        "versions": ["3"],
        "platform": "onnx",
        "inputs": [{"name": "x", "datatype": "FP32", "shape": [-1, N_INPUTS]}],
        "outputs": [{"name": "y", "datatype": "FP32", "shape": [-1, N_OUTPUTS]}],
    });
    assert_eq!(api.get(&format!("/v2/models/{MODEL}")).ok(), expected);
    assert_eq!(
        api.get(&format!("/v2/models/{MODEL}/versions/3")).ok(),
        expected
    );
    api.get(&format!("/v2/models/{MODEL}/versions/4"))
        .refused(404, &["no version \"4\"", "active version is 3"]);
    api.get("/v2/models/other")
        .refused(404, &["unknown model \"other\""]);
    api.get("/v2/nothing/here")
        .refused(404, &["no such endpoint"]);
}

#[test]
fn infer_matches_loaded_model_at_batch_1_and_3() {
    let api = Api::start();
    api.slot.swap(mlp_version(1));
    let reference = mlp_model(1);
    for batch in [1, 3] {
        let inputs = mlp_inputs(batch, 40 + batch);
        let mut request = request_for(&inputs);
        request["id"] = json!(format!("request-{batch}"));
        let response = api.infer(&request).ok();
        assert_eq!(response["model_name"], MODEL);
        assert_eq!(response["model_version"], "1");
        assert_eq!(response["id"], format!("request-{batch}"));
        let expected = reference.run(&inputs).expect("reference run");
        assert_outputs_match(&response, &expected);
    }

    // Nested data, as numpy's tolist() gives it, is accepted as well as flat data.
    let inputs = mlp_inputs(3, 7);
    let mut request = request_for(&inputs);
    let flat = request["inputs"][0]["data"]
        .as_array()
        .expect("data")
        .clone();
    let nested: Vec<Value> = flat
        .chunks(N_INPUTS)
        .map(|row| Value::Array(row.to_vec()))
        .collect();
    request["inputs"][0]["data"] = Value::Array(nested);
    let response = api.infer(&request).ok();
    assert_outputs_match(&response, &reference.run(&inputs).expect("reference run"));
    assert!(response.get("id").is_none(), "no id asked, none echoed");
}

#[test]
fn versioned_infer_and_unknown_models() {
    let api = Api::start();
    api.slot.swap(mlp_version(2));
    let inputs = mlp_inputs(2, 5);
    let body = request_for(&inputs).to_string();
    let response = api
        .post(
            &format!("/v2/models/{MODEL}/versions/2/infer"),
            body.as_bytes(),
        )
        .ok();
    assert_eq!(response["model_version"], "2");
    assert_outputs_match(&response, &mlp_model(2).run(&inputs).expect("run"));

    api.post(
        &format!("/v2/models/{MODEL}/versions/1/infer"),
        body.as_bytes(),
    )
    .refused(404, &["no version \"1\"", "active version is 2"]);
    api.post(
        &format!("/v2/models/{MODEL}/versions/latest/infer"),
        body.as_bytes(),
    )
    .refused(404, &["no version \"latest\""]);
    api.post("/v2/models/other/infer", body.as_bytes())
        .refused(404, &["unknown model \"other\"", MODEL]);
}

#[test]
fn bad_requests_are_refused_naming_the_problem() {
    let api = Api::start();
    api.slot.swap(mlp_version(1));
    let good = || request_for(&mlp_inputs(2, 1));
    let with = |pointer: &str, value: Value| {
        let mut request = good();
        match request.pointer_mut(pointer) {
            Some(field) => *field = value,
            None => request[pointer.trim_start_matches('/')] = value,
        }
        request
    };

    api.infer(&with("/inputs/0/name", json!("z")))
        .refused(400, &["input \"z\"", "does not take"]);
    api.infer(&with("/inputs/0/datatype", json!("INT32")))
        .refused(400, &["input \"x\"", "INT32", "FP32"]);
    api.infer(&with("/inputs/0/datatype", json!("BYTES")))
        .refused(400, &["input \"x\"", "datatype \"BYTES\" is not supported"]);
    api.infer(&with("/inputs/0/shape", json!([4, 2])))
        .refused(400, &["input \"x\"", "axis 1", "takes 4"]);
    api.infer(&with("/inputs/0/shape", json!([8])))
        .refused(400, &["input \"x\"", "1 axes", "takes 2"]);
    api.infer(&with("/inputs/0/shape", json!([-1, 4])))
        .refused(400, &["input \"x\"", "negative axis"]);
    api.infer(&with("/inputs/0/shape", json!([3, 4])))
        .refused(400, &["input \"x\"", "needs 12 elements, data has 8"]);
    api.infer(&with("/inputs/0/shape", json!([1, 4])))
        .refused(400, &["input \"x\"", "more than the 4 elements"]);
    api.infer(&with("/inputs/0/data/3", json!("seven")))
        .refused(400, &["input \"x\"", "bad data", "string \"seven\""]);
    api.infer(&with("/inputs/0/data/3", json!(null)))
        .refused(400, &["input \"x\"", "bad data"]);
    api.infer(&with("/inputs", json!([])))
        .refused(400, &["lacks input \"x\""]);
    api.infer(&with("/outputs", json!([{"name": "logits"}])))
        .refused(400, &["requested output \"logits\""]);
    let mut no_data = good();
    no_data["inputs"][0]
        .as_object_mut()
        .expect("object")
        .remove("data");
    api.infer(&no_data)
        .refused(400, &["input \"x\"", "has no data"]);

    let path = format!("/v2/models/{MODEL}/infer");
    api.post(&path, b"{\"inputs\": [")
        .refused(400, &["malformed request JSON"]);
    api.post(&path, b"not json")
        .refused(400, &["malformed request JSON"]);
    api.post(&path, b"{}")
        .refused(400, &["malformed request JSON", "inputs"]);

    // None of these reached the model: telemetry saw nothing, and /metrics counts them apart.
    assert!(api.state.recorder.take_all().is_empty());
    let metrics = api.metrics();
    assert!(metrics.contains(&format!(
        "outpost_agent_inference_rejected_total{{name=\"{MODEL}\",version=\"1\"}} 16"
    )));
    assert!(metrics.contains(&format!(
        "outpost_agent_inference_errors_total{{name=\"{MODEL}\",version=\"1\"}} 0"
    )));
}

#[test]
fn integer_inputs_are_range_checked() {
    let api = Api::start();
    api.slot.swap(byte_casts_active(3));
    let (inputs, _) = byte_casts_specs(3);
    let good = request_for(&example_inputs(&inputs, 1, 1));
    let post = |request: &Value| api.post("/v2/models/casts/infer", request.to_string().as_bytes());
    let mut request = good.clone();
    request["inputs"][0]["data"] = json!([0, 255, 256]);
    post(&request).refused(400, &["input \"pixels\"", "256 is out of range for UINT8"]);
    request["inputs"][0]["data"] = json!([0, 1.5, 2]);
    post(&request).refused(400, &["input \"pixels\"", "1.5 is not an integer"]);
    let mut request = good;
    request["inputs"][0]["data"] = json!([0.0, 1.0, 2.0]);
    post(&request).ok();
}

#[test]
fn oversized_body_is_413_in_json_naming_the_limit() {
    let api = Api::start_with(ApiLimits {
        max_body_bytes: 1024,
        request_timeout: DEFAULT_REQUEST_TIMEOUT,
    });
    api.slot.swap(mlp_version(1));
    let small = request_for(&mlp_inputs(1, 1));
    api.infer(&small).ok();
    let large = request_for(&mlp_inputs(64, 1)).to_string();
    assert!(large.len() > 1024);
    // Refused in JSON like every other error (it was plain text), naming the limit.
    api.post(&format!("/v2/models/{MODEL}/infer"), large.as_bytes())
        .refused(
            413,
            &["request body is larger than this API's limit of 1024 bytes"],
        );
}

#[test]
fn requested_outputs_filter_the_response_and_all_dtypes_work() {
    let api = Api::start();
    let active = byte_casts_active(5);
    api.slot.swap(active.clone());
    let (input_specs, _) = byte_casts_specs(5);
    let inputs = example_inputs(&input_specs, 3, 9);
    assert_eq!(inputs[0].dtype, DType::U8);
    assert_eq!(inputs[1].dtype, DType::I64);
    let expected = active.model.run(&inputs).expect("reference run");

    let request = request_for(&inputs);
    let response = api
        .post("/v2/models/casts/infer", request.to_string().as_bytes())
        .ok();
    assert_eq!(response["model_version"], "7");
    assert_outputs_match(&response, &expected);
    let datatypes: Vec<&str> = response["outputs"]
        .as_array()
        .expect("outputs")
        .iter()
        .filter_map(|output| output["datatype"].as_str())
        .collect();
    assert_eq!(datatypes, ["FP32", "INT64", "FP64", "INT32"]);

    let mut filtered = request.clone();
    filtered["outputs"] = json!([{"name": "narrow"}, {"name": "shifted"}]);
    let response = api
        .post("/v2/models/casts/infer", filtered.to_string().as_bytes())
        .ok();
    let by_name = |name: &str| {
        expected
            .iter()
            .find(|tensor| tensor.name == name)
            .cloned()
            .expect("output exists")
    };
    assert_outputs_match(&response, &[by_name("narrow"), by_name("shifted")]);

    filtered["outputs"] = json!([{"name": "shifted"}, {"name": "nope"}]);
    api.post("/v2/models/casts/infer", filtered.to_string().as_bytes())
        .refused(400, &["requested output \"nope\""]);
}

#[test]
fn binary_tensor_data_extension() {
    let api = Api::start();
    api.slot.swap(mlp_version(1));
    let inputs = mlp_inputs(3, 11);
    let expected = mlp_model(1).run(&inputs).expect("reference run");
    let header = json!({
        "inputs": [{
            "name": "x", "shape": [3, N_INPUTS], "datatype": "FP32",
            "parameters": {"binary_data_size": inputs[0].data.len()},
        }],
        "outputs": [{"name": "y", "parameters": {"binary_data": true}}],
    })
    .to_string();
    let mut body = header.clone().into_bytes();
    body.extend_from_slice(&inputs[0].data);
    let path = format!("/v2/models/{MODEL}/infer");
    let reply = api.post_with(&path, &body, Some(header.len()));
    assert_eq!(
        reply.status,
        200,
        "{}",
        String::from_utf8_lossy(&reply.body)
    );
    let json_length: usize = reply
        .headers
        .get("inference-header-content-length")
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse().ok())
        .expect("binary response names its JSON length");
    let response: Value = serde_json::from_slice(&reply.body[..json_length]).expect("JSON header");
    assert_eq!(
        response["outputs"][0]["parameters"]["binary_data_size"],
        expected[0].data.len()
    );
    assert!(response["outputs"][0].get("data").is_none());
    assert_eq!(&reply.body[json_length..], &expected[0].data[..]);

    // Binary data that disagrees with the shape is refused like JSON data.
    let short = &body[..body.len() - 4];
    api.post_with(&path, short, Some(header.len()))
        .refused(400, &["input \"x\"", "binary_data_size is 48"]);
    api.post_with(&path, &body, Some(body.len() + 1))
        .refused(400, &["Inference-Header-Content-Length"]);
}

#[test]
fn hot_swap_under_load_fails_no_request() {
    let api = Arc::new(Api::start());
    api.slot.swap(mlp_version(1));
    let inputs = mlp_inputs(2, 3);
    let request = request_for(&inputs).to_string();
    const VERSIONS: u64 = 4;
    let expected: Vec<Vec<f32>> = (1..=VERSIONS)
        .map(|version| f32s(&mlp_model(version).run(&inputs).expect("run")[0]))
        .collect();
    assert_ne!(expected[0], expected[1], "the versions must be told apart");
    let models: Vec<Arc<ActiveModel>> = (1..=VERSIONS).map(mlp_version).collect();

    let stop = Arc::new(AtomicBool::new(false));
    // Responses so far from each version (index 0 unused), for the swaps to wait on.
    let answered: Arc<Vec<AtomicU64>> =
        Arc::new((0..=VERSIONS).map(|_| AtomicU64::new(0)).collect());
    let clients: Vec<JoinHandle<Vec<u64>>> = (0..2)
        .map(|_| {
            let (api, stop, request, expected, answered) = (
                api.clone(),
                stop.clone(),
                request.clone(),
                expected.clone(),
                answered.clone(),
            );
            std::thread::spawn(move || {
                let mut versions_seen = Vec::new();
                let path = format!("/v2/models/{MODEL}/infer");
                while !stop.load(Ordering::Relaxed) {
                    let response = api.post(&path, request.as_bytes()).ok();
                    let version: u64 = response["model_version"]
                        .as_str()
                        .and_then(|version| version.parse().ok())
                        .expect("model_version");
                    let got: Vec<f32> = response["outputs"][0]["data"]
                        .as_array()
                        .expect("data")
                        .iter()
                        .map(|value| value.as_f64().expect("number") as f32)
                        .collect();
                    assert_eq!(got, expected[version as usize - 1], "version {version}");
                    answered[version as usize].fetch_add(1, Ordering::SeqCst);
                    versions_seen.push(version);
                }
                versions_seen
            })
        })
        .collect();
    // Each version serves requests before the next swap: the clients wait on the slot, not the
    // test on the clock.
    let serves = |version: u64, since: u64| {
        let deadline = Instant::now() + Duration::from_secs(60);
        while answered[version as usize].load(Ordering::SeqCst) <= since {
            assert!(
                Instant::now() < deadline,
                "no request answered by version {version} within a minute"
            );
            std::thread::sleep(Duration::from_millis(1));
        }
    };
    serves(1, 0);
    for round in 0..3 {
        for (model, version) in models.iter().zip(1..).skip(usize::from(round == 0)) {
            let since = answered[version as usize].load(Ordering::SeqCst);
            api.slot.swap(model.clone());
            serves(version, since);
        }
    }
    stop.store(true, Ordering::Relaxed);
    let mut seen = Vec::new();
    for client in clients {
        seen.extend(client.join().expect("client saw only successes"));
    }
    for version in 1..=VERSIONS {
        assert!(
            seen.contains(&version),
            "no response from version {version}"
        );
    }
    // After the last swap, new requests are answered by the last version.
    let response = api.infer(&request_for(&inputs)).ok();
    assert_eq!(response["model_version"], VERSIONS.to_string());

    // Every request is counted under the version that answered it.
    let metrics = api.metrics();
    let count_of = |version: u64| -> usize {
        let line =
            format!("outpost_agent_inferences_total{{name=\"{MODEL}\",version=\"{version}\"}} ");
        metrics
            .lines()
            .find_map(|text| text.strip_prefix(line.as_str()))
            .and_then(|value| value.parse().ok())
            .unwrap_or_else(|| panic!("no count for version {version} in\n{metrics}"))
    };
    let total: usize = (1..=VERSIONS).map(count_of).sum();
    assert_eq!(total, seen.len() + 1);
    assert_eq!(
        count_of(VERSIONS),
        seen.iter().filter(|&&version| version == VERSIONS).count() + 1
    );
}

#[test]
fn metrics_count_per_version_and_show_the_queue() {
    let api = Api::start();
    api.slot.swap(mlp_version(1));
    for _ in 0..3 {
        api.infer(&request_for(&mlp_inputs(1, 1))).ok();
    }
    api.slot.swap(mlp_version(2));
    api.infer(&request_for(&mlp_inputs(2, 1))).ok();
    api.infer(&json!({"inputs": []}))
        .refused(400, &["lacks input"]);
    api.state.queue.queue_bytes.store(4096, Ordering::Relaxed);
    api.state.queue.dropped_records.store(2, Ordering::Relaxed);

    let metrics = api.metrics();
    for line in [
        "# TYPE outpost_agent_inferences_total counter",
        "outpost_agent_inferences_total{name=\"classifier\",version=\"1\"} 3",
        "outpost_agent_inferences_total{name=\"classifier\",version=\"2\"} 1",
        "outpost_agent_inference_errors_total{name=\"classifier\",version=\"1\"} 0",
        "outpost_agent_inference_rejected_total{name=\"classifier\",version=\"2\"} 1",
        "# TYPE outpost_agent_inference_latency_seconds histogram",
        "outpost_agent_inference_latency_seconds_bucket{name=\"classifier\",version=\"1\",le=\"+Inf\"} 3",
        "outpost_agent_inference_latency_seconds_count{name=\"classifier\",version=\"2\"} 1",
        "outpost_agent_active_model{name=\"classifier\",version=\"2\"} 1",
        "outpost_agent_queue_bytes 4096",
        "outpost_agent_dropped_records_total 2",
    ] {
        assert!(
            metrics.lines().any(|text| text == line),
            "{line:?} missing from\n{metrics}"
        );
    }
    assert!(!metrics.contains("outpost_agent_active_model{name=\"classifier\",version=\"1\"}"));

    // The recorder saw the same inferences, and not the refused request.
    let windows = api.state.recorder.take_all();
    let mut counts: Vec<(u64, u64, u64)> = windows
        .iter()
        .map(|window| (window.version, window.count, window.errors))
        .collect();
    counts.sort_unstable();
    assert_eq!(counts, [(1, 3, 0), (2, 1, 0)]);
}

#[test]
fn shutdown_stops_serving() {
    let api = Api::start();
    let base = api.base.clone();
    assert_eq!(api.get("/v2/health/live").status, 200);
    api.stop().expect("serve returns cleanly");
    let http = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(5)))
        .build()
        .new_agent();
    assert!(http.get(format!("{base}/v2/health/live")).call().is_err());
}

/// Pinned versions of the off-the-shelf client the API must work with unchanged.
const TRITON_PACKAGES: [&str; 2] = ["tritonclient[http]==2.73.0", "numpy==2.4.6"];

/// The Python interpreter with `tritonclient[http]` and numpy: `OUTPOST_TRITON_PYTHON` if set,
/// else a virtual environment under `target/pyenv`, created from PyPI on first use. A failure to
/// build it fails the test: this check never skips itself.
fn triton_python() -> PathBuf {
    if let Some(python) = std::env::var_os("OUTPOST_TRITON_PYTHON") {
        return PathBuf::from(python);
    }
    static PYTHON: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    PYTHON
        .get_or_init(|| {
            let target = PathBuf::from(env!("CARGO_TARGET_TMPDIR"));
            let venv = target.parent().expect("target directory").join("pyenv");
            let python = venv.join("bin/python");
            let ready = venv.join(".outpost-ready");
            if !ready.exists() {
                let run = |program: &std::path::Path, args: &[&str]| {
                    let status = std::process::Command::new(program)
                        .args(args)
                        .status()
                        .unwrap_or_else(|error| panic!("running {}: {error}", program.display()));
                    assert!(status.success(), "{} {args:?} failed", program.display());
                };
                run(
                    std::path::Path::new("python3"),
                    &["-m", "venv", &venv.to_string_lossy()],
                );
                let mut install = vec![
                    "-m",
                    "pip",
                    "install",
                    "--quiet",
                    "--disable-pip-version-check",
                ];
                install.extend(TRITON_PACKAGES);
                run(&python, &install);
                std::fs::write(&ready, TRITON_PACKAGES.join("\n")).expect("marking the venv ready");
            }
            python
        })
        .clone()
}

#[test]
fn tritonclient_works_unchanged() {
    let python = triton_python();
    let api = Api::start();
    api.slot.swap(mlp_version(5));
    let inputs = mlp_inputs(3, 21);
    let expected = mlp_model(5).run(&inputs).expect("reference run");
    let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tritonclient_check.py");
    let case = json!({
        "url": api.base.trim_start_matches("http://"),
        "model": MODEL,
        "version": "5",
        "shape": inputs[0].shape,
        "x": f32s(&inputs[0]),
    });
    let output = std::process::Command::new(&python)
        .arg(&script)
        .arg(case.to_string())
        .output()
        .unwrap_or_else(|error| panic!("running {}: {error}", python.display()));
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "tritonclient check failed\nstdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    let results: Value = serde_json::from_str(&stdout).expect("script prints JSON");
    let want = f32s(&expected[0]);
    for mode in ["binary", "json"] {
        let got: Vec<f32> = results[mode]
            .as_array()
            .unwrap_or_else(|| panic!("no {mode} result in {results}"))
            .iter()
            .map(|value| value.as_f64().expect("number") as f32)
            .collect();
        assert_eq!(got, want, "{mode} transfer");
    }
    assert_eq!(results["shape"], json!([3, N_OUTPUTS]));
}

#[test]
fn a_model_answering_batch_1_only_refuses_a_larger_batch_over_http_with_400() {
    // `batch_mean`'s "mean" output has no batch axis, so rows cannot be stacked into it.
    let (inputs, outputs) = batch_mean_specs(true);
    let api = Api::start();
    api.slot.swap(Arc::new(ActiveModel {
        name: MODEL.to_owned(),
        version: 1,
        manifest_sha256: Sha256([1; 32]),
        model: load(&batch_mean(true), &inputs, &outputs),
        drift: None,
        runtime_fallback: None,
    }));
    let request = |rows: u64| {
        json!({"inputs": [{
            "name": "x",
            "datatype": "FP32",
            "shape": [rows, 3],
            "data": vec![1.0f32; rows as usize * 3],
        }]})
    };
    let one = api.infer(&request(1));
    assert_eq!(one.status, 200, "{}", one.json());
    api.infer(&request(3))
        .refused(400, &["batch of 3", "batch of 1 only", "\"mean\""]);
    // The refusal is the request's fault: the model keeps serving.
    assert_eq!(api.infer(&request(1)).status, 200);
}

/// Reads from `stream` until the server closes it (end of file or a reset); what came before.
/// Panics if the server keeps it open for a minute.
fn read_until_closed(stream: &mut std::net::TcpStream) -> Vec<u8> {
    use std::io::Read;
    stream
        .set_read_timeout(Some(Duration::from_secs(60)))
        .expect("setting a read timeout");
    let mut received = Vec::new();
    let mut buffer = [0u8; 4096];
    loop {
        match stream.read(&mut buffer) {
            Ok(0) => return received,
            Ok(n) => received.extend_from_slice(&buffer[..n]),
            Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return received,
            Err(error) => panic!("the connection was not closed: {error}"),
        }
    }
}

/// Asks for `/v2/health/live` on a kept-alive `stream` and reads the whole answer, so the next
/// request on it starts clean; returns its status line.
fn live_on(stream: &mut std::net::TcpStream) -> String {
    use std::io::{Read, Write};
    stream
        .write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: device\r\n\r\n")
        .expect("sending a request on a held connection");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        stream
            .read_exact(&mut byte)
            .expect("reading an answer's head");
        head.push(byte[0]);
    }
    let head = String::from_utf8(head).expect("an answer's head is text");
    let length = head
        .lines()
        .find_map(|line| {
            let (name, value) = line.split_once(':')?;
            name.eq_ignore_ascii_case("content-length")
                .then(|| value.trim().parse::<usize>().expect("a content length"))
        })
        .expect("the answer says its length");
    let mut body = vec![0u8; length];
    stream
        .read_exact(&mut body)
        .expect("reading an answer's body");
    head.lines().next().unwrap_or_default().to_owned()
}

/// Issue 21, finding 2, for the agent's local API: a client that never finishes its headers is
/// cut off at the header timeout, and connections beyond the cap are closed as they are
/// accepted, while requests are answered throughout.
#[test]
fn slow_and_surplus_connections_are_closed_while_requests_are_answered() {
    use std::io::Write;
    use std::net::TcpStream;
    let api = Api::start();
    let address = api.base.trim_start_matches("http://").to_owned();

    let mut slow = TcpStream::connect(&address).unwrap();
    slow.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: device\r\n")
        .unwrap();
    let started = Instant::now();

    // Every place but the slow one's, each held by a kept-alive connection whose request was
    // answered: so each is counted.
    let mut held: Vec<TcpStream> = (1..API_MAX_CONNECTIONS)
        .map(|_| TcpStream::connect(&address).unwrap())
        .collect();
    for stream in &mut held {
        assert_eq!(live_on(stream), "HTTP/1.1 200 OK");
    }
    let mut surplus = TcpStream::connect(&address).unwrap();
    let _ = surplus.write_all(b"GET /v2/health/live HTTP/1.1\r\nHost: device\r\n\r\n");
    assert_eq!(
        read_until_closed(&mut surplus),
        b"",
        "the surplus connection was answered"
    );

    // Requests are answered while the slow client still holds its connection: on a held one,
    // since a new connection could be accepted before the server has seen the held ones close.
    // The one answered last, the furthest from its header timeout.
    let last = held.last_mut().expect("places are held");
    assert_eq!(live_on(last), "HTTP/1.1 200 OK");
    drop(held);
    assert_eq!(read_until_closed(&mut slow), b"");
    assert!(
        started.elapsed() >= API_HEADER_TIMEOUT - Duration::from_millis(500),
        "closed after {:?}, before the header timeout",
        started.elapsed()
    );
}
