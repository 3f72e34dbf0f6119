//! The agent's local inference API: the Open Inference Protocol (KServe v2 REST, also spoken by
//! Triton), so applications on the device use an off-the-shelf client instead of an Outpost SDK.
//!
//! Every request takes the active model from the [`ModelSlot`] once, when it starts, and finishes
//! on that model: a hot swap changes only what the *next* request gets, so no request fails
//! because of one. Parsing, inference and response encoding run on a blocking thread so a large
//! request cannot stall the async runtime that serves health checks and `/metrics`.
//!
//! Besides plain JSON tensors the API speaks Triton's binary tensor data extension (raw
//! little-endian bytes after the JSON header, sized by `Inference-Header-Content-Length`), because
//! `tritonclient` sends inputs that way unless told otherwise.
//!
//! What is counted: only requests that reached the model. A request the API or [`LoadedModel::run`]
//! refuses for its own content (malformed JSON, an unknown input, a wrong shape or type) is a
//! client's mistake, answered with 400 and counted only as `rejected` in `/metrics`; it is not
//! passed to the [`Recorder`], whose error rate gates rollouts and must not be moved by a
//! misbehaving client. A failure inside the model (a tract error or panic, an output of the wrong
//! type) is answered with 500 and recorded as a failed inference. `/metrics` keeps its own running
//! totals, because the recorder hands its windows off to the upload queue.

use std::collections::BTreeMap;
use std::error::Error as _;
use std::fmt::{self, Write as _};
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use outpost_protocol::device::{Tensor, LATENCY_BUCKETS_US};
use outpost_protocol::trust::{DType, Dim, TensorSpec};
use serde::de::{self, DeserializeSeed, SeqAccess, Visitor};
use serde::{Deserialize, Serialize, Serializer};
use serde_json::value::RawValue;
use serde_json::{json, Map, Value};
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::shadow::Shadow;
use crate::slot::{ActiveModel, ModelSlot};
use crate::telemetry::Recorder;
use outpost_model::inference::{InferenceError, LoadedModel};

/// A request body limit that fits a batch of camera frames but not a runaway upload.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A request time limit generous for edge CPUs running a batch.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The header of Triton's binary tensor data extension: how many leading body bytes are JSON.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// Extra time, beyond the request timeout, that shutdown waits for in-flight requests.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Limits on each request, chosen by the agent's config.
#[derive(Debug, Clone, Copy)]
pub struct ApiLimits {
    /// Larger bodies are refused with 413 before they are read.
    pub max_body_bytes: usize,
    /// Time for a request to produce its response; a slower one gets 408.
    pub request_timeout: Duration,
}

/// Upload-queue figures shown on `/metrics`, updated by whoever owns the telemetry cache.
#[derive(Debug, Default)]
pub struct QueueStats {
    /// Bytes waiting in the upload queue.
    pub queue_bytes: AtomicU64,
    /// Telemetry records dropped because the queue was full, since the agent started.
    pub dropped_records: AtomicU64,
}

/// What the API's handlers share.
#[derive(Debug)]
pub struct ApiState {
    pub slot: Arc<ModelSlot>,
    pub recorder: Arc<Recorder>,
    pub queue: Arc<QueueStats>,
    pub limits: ApiLimits,
    /// Where answered requests are offered to a shadow model, when the service runs one.
    shadow: Option<Arc<Shadow>>,
    totals: Totals,
}

impl ApiState {
    pub fn new(
        slot: Arc<ModelSlot>,
        recorder: Arc<Recorder>,
        queue: Arc<QueueStats>,
        limits: ApiLimits,
    ) -> ApiState {
        ApiState {
            slot,
            recorder,
            queue,
            limits,
            shadow: None,
            totals: Totals::default(),
        }
    }

    /// Offers every answered request to `shadow`, off the request path.
    pub fn with_shadow(mut self, shadow: Arc<Shadow>) -> ApiState {
        self.shadow = Some(shadow);
        self
    }
}

/// The API served on a runtime of its own thread: for embedding it in a program that is not async
/// (tests, benches). [`BackgroundApi::stop`] or dropping it shuts it down gracefully.
#[derive(Debug)]
pub struct BackgroundApi {
    address: std::net::SocketAddr,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<std::io::Result<()>>>,
}

impl BackgroundApi {
    /// Binds `address` (port 0 picks one) and serves `state` with `workers` runtime threads.
    pub fn start(
        address: std::net::SocketAddr,
        state: Arc<ApiState>,
        workers: usize,
    ) -> std::io::Result<BackgroundApi> {
        let listener = std::net::TcpListener::bind(address)?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers.max(1))
            .thread_name("outpost-api")
            .enable_all()
            .build()?;
        let (shutdown, stop) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("outpost-api".to_owned())
            .spawn(move || {
                runtime.block_on(async move {
                    let listener = TcpListener::from_std(listener)?;
                    serve(listener, state, async {
                        let _ = stop.await;
                    })
                    .await
                })
            })?;
        Ok(BackgroundApi {
            address,
            shutdown: Some(shutdown),
            thread: Some(thread),
        })
    }

    /// The bound address.
    pub fn address(&self) -> std::net::SocketAddr {
        self.address
    }

    /// Stops accepting, lets in-flight requests finish, and returns what the server returned.
    pub fn stop(mut self) -> std::io::Result<()> {
        self.stop_inner()
    }

    fn stop_inner(&mut self) -> std::io::Result<()> {
        if let Some(shutdown) = self.shutdown.take() {
            let _ = shutdown.send(());
        }
        match self.thread.take() {
            Some(thread) => thread
                .join()
                .unwrap_or_else(|_| Err(std::io::Error::other("the API thread panicked"))),
            None => Ok(()),
        }
    }
}

impl Drop for BackgroundApi {
    fn drop(&mut self) {
        let _ = self.stop_inner();
    }
}

/// Serves the API on `listener` until `shutdown` resolves, then lets in-flight requests finish
/// (for at most the request timeout plus a short grace) and returns.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let drain = state.limits.request_timeout + DRAIN_GRACE;
    let app = router(state);
    log::info!("inference API serving on http://{local}");

    // HTTP/1 only: the local API's clients are on the device, and HTTP/2 would bring h2.
    let options = outpost_serve::Options {
        name: "inference API",
        drain_timeout: drain,
    };
    outpost_serve::serve_http1(listener, app, &options, shutdown).await;
    log::info!("inference API stopped");
    Ok(())
}

fn router(state: Arc<ApiState>) -> Router {
    let limits = state.limits;
    Router::new()
        .route("/v2", get(server_metadata))
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2/models/{name}", get(model_metadata))
        .route(
            "/v2/models/{name}/versions/{version}",
            get(model_metadata_versioned),
        )
        .route("/v2/models/{name}/ready", get(model_ready))
        .route(
            "/v2/models/{name}/versions/{version}/ready",
            get(model_ready_versioned),
        )
        .route("/v2/models/{name}/infer", post(infer))
        .route(
            "/v2/models/{name}/versions/{version}/infer",
            post(infer_versioned),
        )
        .route("/metrics", get(metrics))
        .fallback(no_route)
        // The body limit below replaces axum's 2 MiB default.
        .layer(DefaultBodyLimit::disable())
        .layer(RequestBodyLimitLayer::new(limits.max_body_bytes))
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            limits.request_timeout,
        ))
        .with_state(state)
}

/// An answer other than success: the status and the `{"error": …}` message the protocol defines.
#[derive(Debug)]
struct ApiError {
    status: StatusCode,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
        }
    }

    fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(json!({ "error": self.message }))).into_response()
    }
}

async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "outpost-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

async fn live() -> StatusCode {
    StatusCode::OK
}

async fn ready(State(state): State<Arc<ApiState>>) -> StatusCode {
    if state.slot.current().is_some() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The active model if it is the one asked for: 503 while none is active, 404 for another name
/// or version.
fn find_model(
    state: &ApiState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ActiveModel>, ApiError> {
    let active = state
        .slot
        .current()
        .ok_or_else(|| ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no model is active yet"))?;
    if active.name != name {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            format!(
                "unknown model {name:?}: this agent serves {:?}",
                active.name
            ),
        ));
    }
    if let Some(version) = version {
        if version.parse::<u64>().ok() != Some(active.version) {
            return Err(ApiError::new(
                StatusCode::NOT_FOUND,
                format!(
                    "model {name:?} has no version {version:?} loaded; the active version is {}",
                    active.version
                ),
            ));
        }
    }
    Ok(active)
}

async fn model_metadata(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find_model(&state, &name, None).map(|active| Json(metadata_of(&active)))
}

async fn model_metadata_versioned(
    State(state): State<Arc<ApiState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    find_model(&state, &name, Some(&version)).map(|active| Json(metadata_of(&active)))
}

fn metadata_of(active: &ActiveModel) -> Value {
    let tensors = |specs: &[TensorSpec]| -> Vec<Value> {
        specs
            .iter()
            .map(|spec| {
                let shape: Vec<i64> = spec
                    .shape
                    .iter()
                    .map(|dim| match dim {
                        Dim::Fixed(size) => i64::try_from(*size).unwrap_or(i64::MAX),
                        Dim::Batch => -1,
                    })
                    .collect();
                json!({ "name": spec.name, "datatype": spec.dtype.as_str(), "shape": shape })
            })
            .collect()
    };
    json!({
        "name": active.name,
        "versions": [active.version.to_string()],
        "platform": "onnx",
        "inputs": tensors(active.model.inputs()),
        "outputs": tensors(active.model.outputs()),
    })
}

async fn model_ready(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    find_model(&state, &name, None).map(|_| StatusCode::OK)
}

async fn model_ready_versioned(
    State(state): State<Arc<ApiState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    find_model(&state, &name, Some(&version)).map(|_| StatusCode::OK)
}

async fn infer(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_on(state, &name, None, &headers, body).await
}

async fn infer_versioned(
    State(state): State<Arc<ApiState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_on(state, &name, Some(&version), &headers, body).await
}

async fn infer_on(
    state: Arc<ApiState>,
    name: &str,
    version: Option<&str>,
    headers: &HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    // Taken once: this request finishes on this model whatever the slot holds meanwhile.
    let active = find_model(&state, name, version)?;
    let body =
        body.map_err(|rejection| ApiError::new(rejection.status(), rejection.body_text()))?;
    let json_length = json_length(headers)?;
    let job = tokio::task::spawn_blocking(move || {
        let answer = run_request(&state, &active, &body, json_length);
        if matches!(&answer, Err(error) if error.status == StatusCode::BAD_REQUEST) {
            state.totals.reject(&active.name, active.version);
        }
        answer
    });
    let answer = job.await.map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("the inference task failed: {error}"),
        )
    })??;
    let mut response = answer.body.into_response();
    let headers = response.headers_mut();
    match answer.json_length {
        Some(length) => {
            headers.insert(
                CONTENT_TYPE,
                HeaderValue::from_static("application/octet-stream"),
            );
            headers.insert(HEADER_LENGTH, HeaderValue::from(length));
        }
        None => {
            headers.insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
        }
    }
    Ok(response)
}

/// The JSON header's length under the binary tensor data extension, if the request uses it.
fn json_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
    let Some(value) = headers.get(HEADER_LENGTH) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|text| text.trim().parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| ApiError::bad_request("Inference-Header-Content-Length is not a number"))
}

/// An encoded inference response; `json_length` is set when binary output data follows the JSON.
struct Answer {
    body: Vec<u8>,
    json_length: Option<usize>,
}

/// Parses, runs and encodes one request. Runs on a blocking thread.
fn run_request(
    state: &ApiState,
    active: &ActiveModel,
    body: &[u8],
    json_length: Option<usize>,
) -> Result<Answer, ApiError> {
    let request = parse_request(body, json_length, &active.model)?;
    let started = Instant::now();
    let result = active.model.run(&request.inputs);
    let latency = started.elapsed();
    let outputs = match result {
        Ok(outputs) => {
            state
                .totals
                .record(&active.name, active.version, latency, true);
            match &active.drift {
                Some(drift) => state.recorder.record_with_drift(
                    &active.name,
                    active.version,
                    drift,
                    latency,
                    crate::unix_now(),
                    &request.inputs,
                    &outputs,
                ),
                None => state.recorder.record(
                    &active.name,
                    active.version,
                    latency,
                    true,
                    crate::unix_now(),
                ),
            }
            if let Some(shadow) = &state.shadow {
                shadow.offer(active, &request.inputs, &outputs, crate::unix_now());
            }
            outputs
        }
        Err(error) if is_request_error(&error) => {
            return Err(ApiError::bad_request(error.to_string()));
        }
        Err(error) => {
            state
                .totals
                .record(&active.name, active.version, latency, false);
            state.recorder.record(
                &active.name,
                active.version,
                latency,
                false,
                crate::unix_now(),
            );
            return Err(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                error_chain(&error),
            ));
        }
    };
    encode_response(active, request, outputs)
}

/// Whether `run` refused the request for its own content, before the model ran.
fn is_request_error(error: &InferenceError) -> bool {
    matches!(
        error,
        InferenceError::UnknownInput { .. }
            | InferenceError::DuplicateInput { .. }
            | InferenceError::MissingInput { .. }
            | InferenceError::WrongDType { .. }
            | InferenceError::WrongRank { .. }
            | InferenceError::WrongDim { .. }
            | InferenceError::EmptyBatch { .. }
            | InferenceError::BatchMismatch { .. }
            | InferenceError::BatchOfOneOnly { .. }
            | InferenceError::BadData { .. }
    )
}

fn error_chain(error: &InferenceError) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    message
}

/// The request body's JSON, as the protocol defines it. Unknown fields are ignored.
#[derive(Deserialize)]
struct InferRequest<'a> {
    #[serde(default)]
    id: Option<String>,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    #[serde(borrow)]
    inputs: Vec<RequestInput<'a>>,
    #[serde(default)]
    outputs: Option<Vec<RequestOutput>>,
}

#[derive(Deserialize)]
struct RequestInput<'a> {
    name: String,
    shape: Vec<i64>,
    datatype: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
    /// Left unparsed until the datatype is known, so elements go straight into typed bytes.
    #[serde(borrow, default)]
    data: Option<&'a RawValue>,
}

#[derive(Deserialize)]
struct RequestOutput {
    name: String,
    #[serde(default)]
    parameters: Option<Map<String, Value>>,
}

/// A request checked as far as the API can without the model's help.
struct ParsedRequest {
    id: Option<String>,
    inputs: Vec<Tensor>,
    /// The outputs to return, in order, each with whether to send it as binary data.
    outputs: Vec<(usize, bool)>,
}

fn parse_request(
    body: &[u8],
    json_length: Option<usize>,
    model: &LoadedModel,
) -> Result<ParsedRequest, ApiError> {
    let (header, mut binary) = match json_length {
        Some(length) => {
            if length > body.len() {
                return Err(ApiError::bad_request(format!(
                    "Inference-Header-Content-Length is {length} but the body has {} bytes",
                    body.len()
                )));
            }
            body.split_at(length)
        }
        None => (body, &[][..]),
    };
    let request: InferRequest<'_> = serde_json::from_slice(header)
        .map_err(|error| ApiError::bad_request(format!("malformed request JSON: {error}")))?;
    let mut inputs = Vec::with_capacity(request.inputs.len());
    for input in &request.inputs {
        inputs.push(parse_input(input, model, &mut binary)?);
    }
    if !binary.is_empty() {
        return Err(ApiError::bad_request(format!(
            "{} bytes of binary data follow the JSON but no input claims them",
            binary.len()
        )));
    }
    let binary_by_default = flag(request.parameters.as_ref(), "binary_data_output")?;
    let outputs = match &request.outputs {
        None => (0..model.outputs().len())
            .map(|ix| (ix, binary_by_default))
            .collect(),
        Some(wanted) => wanted
            .iter()
            .map(|output| {
                let ix = model
                    .outputs()
                    .iter()
                    .position(|spec| spec.name == output.name)
                    .ok_or_else(|| {
                        ApiError::bad_request(format!(
                            "requested output {:?} is not an output of the model",
                            output.name
                        ))
                    })?;
                let binary = match output.parameters.as_ref() {
                    Some(parameters) if parameters.contains_key("binary_data") => {
                        flag(Some(parameters), "binary_data")?
                    }
                    _ => binary_by_default,
                };
                Ok((ix, binary))
            })
            .collect::<Result<_, ApiError>>()?,
    };
    Ok(ParsedRequest {
        id: request.id,
        inputs,
        outputs,
    })
}

/// A boolean parameter; absent is false.
fn flag(parameters: Option<&Map<String, Value>>, key: &str) -> Result<bool, ApiError> {
    match parameters.and_then(|parameters| parameters.get(key)) {
        None => Ok(false),
        Some(Value::Bool(value)) => Ok(*value),
        Some(other) => Err(ApiError::bad_request(format!(
            "parameter {key:?} must be true or false, not {other}"
        ))),
    }
}

/// Turns one request input into a tensor, taking binary data from the front of `binary`.
fn parse_input(
    input: &RequestInput<'_>,
    model: &LoadedModel,
    binary: &mut &[u8],
) -> Result<Tensor, ApiError> {
    let name = &input.name;
    let bad = |reason: String| ApiError::bad_request(format!("input {name:?}: {reason}"));
    let dtype = DType::parse(&input.datatype).ok_or_else(|| {
        bad(format!(
            "datatype {:?} is not supported (use FP32, FP64, INT32, INT64 or UINT8)",
            input.datatype
        ))
    })?;
    // Checked before the data, so a wrong datatype is reported as that and not as data that does
    // not fit it. `run` checks everything else about the input against its spec.
    if let Some(spec) = model.inputs().iter().find(|spec| spec.name == *name) {
        if spec.dtype != dtype {
            let error = InferenceError::WrongDType {
                name: name.clone(),
                expected: spec.dtype,
                got: dtype,
            };
            return Err(ApiError::bad_request(error.to_string()));
        }
    }
    let shape = input
        .shape
        .iter()
        .map(|&dim| u64::try_from(dim))
        .collect::<Result<Vec<u64>, _>>()
        .map_err(|_| bad(format!("shape {:?} has a negative axis", input.shape)))?;
    let elements = shape
        .iter()
        .try_fold(1u64, |acc, &dim| acc.checked_mul(dim))
        .and_then(|elements| usize::try_from(elements).ok())
        .ok_or_else(|| bad(format!("shape {shape:?} is too large")))?;
    let binary_size = match input
        .parameters
        .as_ref()
        .and_then(|parameters| parameters.get("binary_data_size"))
    {
        None => None,
        Some(size) => Some(
            size.as_u64()
                .and_then(|size| usize::try_from(size).ok())
                .ok_or_else(|| bad(format!("binary_data_size {size} is not a byte count")))?,
        ),
    };
    let data = match (input.data, binary_size) {
        (Some(_), Some(_)) => return Err(bad("has both JSON data and binary data".to_owned())),
        (None, None) => return Err(bad("has no data".to_owned())),
        (None, Some(size)) => {
            if size > binary.len() {
                return Err(bad(format!(
                    "binary_data_size is {size} but only {} binary bytes remain",
                    binary.len()
                )));
            }
            let (data, rest) = binary.split_at(size);
            *binary = rest;
            let needed = elements.checked_mul(dtype.size());
            if needed != Some(size) {
                return Err(bad(format!(
                    "shape {shape:?} of {} needs {} bytes, binary data has {size}",
                    dtype.as_str(),
                    needed.map_or("too many".to_owned(), |n| n.to_string()),
                )));
            }
            data.to_vec()
        }
        (Some(raw), None) => {
            // Each element takes at least one byte of JSON, which caps the allocation.
            let capacity = elements.min(raw.get().len()).saturating_mul(dtype.size());
            let mut flat = FlatData {
                dtype,
                data: Vec::with_capacity(capacity),
                count: 0,
                limit: elements,
            };
            let mut deserializer = serde_json::Deserializer::from_str(raw.get());
            ElementSeed(&mut flat)
                .deserialize(&mut deserializer)
                .map_err(|error| bad(format!("bad data: {}", strip_position(&error))))?;
            if flat.count != elements {
                return Err(bad(format!(
                    "shape {shape:?} needs {elements} elements, data has {}",
                    flat.count
                )));
            }
            flat.data
        }
    };
    Ok(Tensor {
        name: name.clone(),
        dtype,
        shape,
        data,
    })
}

/// serde_json's message without its "at line 1 column 7", which points into the data field, not
/// the request.
fn strip_position(error: &serde_json::Error) -> String {
    let message = error.to_string();
    match message.rfind(" at line ") {
        Some(at) => message[..at].to_owned(),
        None => message,
    }
}

/// Elements of one input, flattened from any nesting into little-endian bytes.
struct FlatData {
    dtype: DType,
    data: Vec<u8>,
    count: usize,
    /// The element count the shape calls for; more is refused as soon as it is seen.
    limit: usize,
}

/// A JSON number as read, before conversion to the input's type.
#[derive(Clone, Copy)]
enum Number {
    Signed(i64),
    Unsigned(u64),
    Float(f64),
}

impl fmt::Display for Number {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Number::Signed(value) => write!(f, "{value}"),
            Number::Unsigned(value) => write!(f, "{value}"),
            Number::Float(value) => write!(f, "{value}"),
        }
    }
}

impl FlatData {
    fn push(&mut self, number: Number) -> Result<(), String> {
        if self.count == self.limit {
            return Err(format!(
                "more than the {} elements the shape needs",
                self.limit
            ));
        }
        let out = &mut self.data;
        let out_of_range = || format!("{number} is out of range for {}", self.dtype.as_str());
        let integer = || -> Result<i128, String> {
            match number {
                Number::Signed(value) => Ok(i128::from(value)),
                Number::Unsigned(value) => Ok(i128::from(value)),
                // 2^63 and 2^64 are exact in f64, so the range check is exact too.
                Number::Float(value)
                    if value.fract() == 0.0 && value.abs() < 18_446_744_073_709_551_616.0 =>
                {
                    Ok(value as i128)
                }
                Number::Float(value) => Err(format!(
                    "{value} is not an integer, as {} requires",
                    self.dtype.as_str()
                )),
            }
        };
        let float = match number {
            Number::Signed(value) => value as f64,
            Number::Unsigned(value) => value as f64,
            Number::Float(value) => value,
        };
        match self.dtype {
            DType::F32 => {
                let value = float as f32;
                if !value.is_finite() {
                    return Err(out_of_range());
                }
                out.extend_from_slice(&value.to_le_bytes());
            }
            DType::F64 => out.extend_from_slice(&float.to_le_bytes()),
            DType::I32 => {
                let value = i32::try_from(integer()?).map_err(|_| out_of_range())?;
                out.extend_from_slice(&value.to_le_bytes());
            }
            DType::I64 => {
                let value = i64::try_from(integer()?).map_err(|_| out_of_range())?;
                out.extend_from_slice(&value.to_le_bytes());
            }
            DType::U8 => {
                let value = u8::try_from(integer()?).map_err(|_| out_of_range())?;
                out.push(value);
            }
        }
        self.count += 1;
        Ok(())
    }
}

/// Reads a number or an array of (arrays of) numbers into a [`FlatData`].
struct ElementSeed<'a>(&'a mut FlatData);

impl<'de> DeserializeSeed<'de> for ElementSeed<'_> {
    type Value = ();

    fn deserialize<D: de::Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for ElementSeed<'_> {
    type Value = ();

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("a number or an array of numbers")
    }

    fn visit_i64<E: de::Error>(self, value: i64) -> Result<(), E> {
        self.0.push(Number::Signed(value)).map_err(E::custom)
    }

    fn visit_u64<E: de::Error>(self, value: u64) -> Result<(), E> {
        self.0.push(Number::Unsigned(value)).map_err(E::custom)
    }

    fn visit_f64<E: de::Error>(self, value: f64) -> Result<(), E> {
        self.0.push(Number::Float(value)).map_err(E::custom)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<(), A::Error> {
        while seq.next_element_seed(ElementSeed(&mut *self.0))?.is_some() {}
        Ok(())
    }
}

#[derive(Serialize)]
struct InferResponse<'a> {
    model_name: &'a str,
    model_version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    id: Option<String>,
    outputs: Vec<ResponseOutput<'a>>,
}

#[derive(Serialize)]
struct ResponseOutput<'a> {
    name: &'a str,
    datatype: &'static str,
    shape: &'a [u64],
    #[serde(skip_serializing_if = "Option::is_none")]
    parameters: Option<BinarySize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    data: Option<Elements<'a>>,
}

#[derive(Serialize)]
struct BinarySize {
    binary_data_size: usize,
}

/// A tensor's little-endian bytes, serialized as a flat JSON array without an intermediate `Vec`.
/// Non-finite floats, which JSON cannot express, come out as `null`.
struct Elements<'a>(&'a Tensor);

impl Serialize for Elements<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        fn array<const N: usize>(chunk: &[u8]) -> [u8; N] {
            let mut bytes = [0u8; N];
            bytes.copy_from_slice(chunk);
            bytes
        }
        let data = &self.0.data;
        match self.0.dtype {
            DType::F32 => {
                serializer.collect_seq(data.chunks_exact(4).map(|c| f32::from_le_bytes(array(c))))
            }
            DType::F64 => {
                serializer.collect_seq(data.chunks_exact(8).map(|c| f64::from_le_bytes(array(c))))
            }
            DType::I32 => {
                serializer.collect_seq(data.chunks_exact(4).map(|c| i32::from_le_bytes(array(c))))
            }
            DType::I64 => {
                serializer.collect_seq(data.chunks_exact(8).map(|c| i64::from_le_bytes(array(c))))
            }
            DType::U8 => serializer.collect_seq(data.iter()),
        }
    }
}

fn encode_response(
    active: &ActiveModel,
    request: ParsedRequest,
    outputs: Vec<Tensor>,
) -> Result<Answer, ApiError> {
    let mut binary_parts: Vec<&[u8]> = Vec::new();
    let mut listed = Vec::with_capacity(request.outputs.len());
    for &(ix, binary) in &request.outputs {
        let tensor = outputs.get(ix).ok_or_else(|| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "the model returned fewer outputs than it declares",
            )
        })?;
        if binary {
            binary_parts.push(&tensor.data);
        }
        listed.push(ResponseOutput {
            name: &tensor.name,
            datatype: tensor.dtype.as_str(),
            shape: &tensor.shape,
            parameters: binary.then_some(BinarySize {
                binary_data_size: tensor.data.len(),
            }),
            data: (!binary).then_some(Elements(tensor)),
        });
    }
    let response = InferResponse {
        model_name: &active.name,
        model_version: active.version.to_string(),
        id: request.id,
        outputs: listed,
    };
    let mut body = serde_json::to_vec(&response).map_err(|error| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the response: {error}"),
        )
    })?;
    if binary_parts.is_empty() {
        return Ok(Answer {
            body,
            json_length: None,
        });
    }
    let json_length = body.len();
    for part in binary_parts {
        body.extend_from_slice(part);
    }
    Ok(Answer {
        body,
        json_length: Some(json_length),
    })
}

/// Running totals per model version since the agent started, for `/metrics`.
#[derive(Debug, Default)]
struct Totals {
    by_version: Mutex<BTreeMap<(String, u64), VersionTotals>>,
}

/// Reads one counter out of a [`VersionTotals`].
type TotalsField = fn(&VersionTotals) -> u64;

#[derive(Debug, Default)]
struct VersionTotals {
    /// Inferences the model ran, failed ones included.
    count: u64,
    /// Inferences that failed inside the model.
    errors: u64,
    /// Requests refused with 400 before the model ran.
    rejected: u64,
    /// One slot per [`LATENCY_BUCKETS_US`] bound plus the overflow slot; not cumulative.
    buckets: [u64; LATENCY_BUCKETS_US.len() + 1],
    latency_sum: Duration,
}

impl Totals {
    fn with(&self, model: &str, version: u64, update: impl FnOnce(&mut VersionTotals)) {
        let mut totals = match self.by_version.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        update(totals.entry((model.to_owned(), version)).or_default());
    }

    fn record(&self, model: &str, version: u64, latency: Duration, ok: bool) {
        let micros = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        let bucket = LATENCY_BUCKETS_US
            .iter()
            .position(|bound| micros <= *bound)
            .unwrap_or(LATENCY_BUCKETS_US.len());
        self.with(model, version, |totals| {
            totals.count += 1;
            if !ok {
                totals.errors += 1;
            }
            totals.buckets[bucket] += 1;
            totals.latency_sum += latency;
        });
    }

    fn reject(&self, model: &str, version: u64) {
        self.with(model, version, |totals| totals.rejected += 1);
    }
}

async fn metrics(State(state): State<Arc<ApiState>>) -> Response {
    let text = render_metrics(&state);
    (
        [(
            CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        text,
    )
        .into_response()
}

fn render_metrics(state: &ApiState) -> String {
    let mut out = String::new();
    let header = |out: &mut String, name: &str, kind: &str, help: &str| {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
    };
    {
        let totals = match state.totals.by_version.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        };
        let counters: [(&str, &str, TotalsField); 3] = [
            (
                "outpost_agent_inferences_total",
                "Inferences run by the model, failed ones included.",
                |totals| totals.count,
            ),
            (
                "outpost_agent_inference_errors_total",
                "Inferences that failed inside the model.",
                |totals| totals.errors,
            ),
            (
                "outpost_agent_inference_rejected_total",
                "Inference requests refused as malformed before reaching the model.",
                |totals| totals.rejected,
            ),
        ];
        for (metric, help, value) in counters {
            header(&mut out, metric, "counter", help);
            for ((model, version), totals) in totals.iter() {
                let labels = labels(model, *version);
                let _ = writeln!(out, "{metric}{{{labels}}} {}", value(totals));
            }
        }
        let metric = "outpost_agent_inference_latency_seconds";
        header(
            &mut out,
            metric,
            "histogram",
            "Time the model took per inference.",
        );
        for ((model, version), totals) in totals.iter() {
            let labels = labels(model, *version);
            let mut cumulative = 0;
            for (bound, count) in LATENCY_BUCKETS_US.iter().zip(&totals.buckets) {
                cumulative += count;
                let le = *bound as f64 / 1e6;
                let _ = writeln!(out, "{metric}_bucket{{{labels},le=\"{le}\"}} {cumulative}");
            }
            let _ = writeln!(
                out,
                "{metric}_bucket{{{labels},le=\"+Inf\"}} {}\n{metric}_sum{{{labels}}} {}\n\
                 {metric}_count{{{labels}}} {}",
                totals.count,
                totals.latency_sum.as_secs_f64(),
                totals.count
            );
        }
    }
    header(
        &mut out,
        "outpost_agent_active_model",
        "gauge",
        "The model version serving requests.",
    );
    if let Some(active) = state.slot.current() {
        let labels = labels(&active.name, active.version);
        let _ = writeln!(out, "outpost_agent_active_model{{{labels}}} 1");
    }
    header(
        &mut out,
        "outpost_agent_queue_bytes",
        "gauge",
        "Bytes waiting in the upload queue.",
    );
    let _ = writeln!(
        out,
        "outpost_agent_queue_bytes {}",
        state.queue.queue_bytes.load(Ordering::Relaxed)
    );
    header(
        &mut out,
        "outpost_agent_dropped_records_total",
        "counter",
        "Telemetry records dropped because the upload queue was full.",
    );
    let _ = writeln!(
        out,
        "outpost_agent_dropped_records_total {}",
        state.queue.dropped_records.load(Ordering::Relaxed)
    );
    out
}

fn labels(model: &str, version: u64) -> String {
    let mut escaped = String::with_capacity(model.len());
    for c in model.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    format!("name=\"{escaped}\",version=\"{version}\"")
}
