//! The routes' handlers: metadata, health and inference, each answering as the protocol says.

use std::error::Error as _;
use std::fmt::Write as _;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{Path, State};
use axum::http::header::{HeaderMap, HeaderValue, CONTENT_TYPE};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use outpost_protocol::trust::{Dim, TensorSpec};
use serde_json::{json, Value};

use crate::slot::ActiveModel;
use outpost_model::inference::InferenceError;

use super::error::ApiError;
use super::request::*;
use super::response::*;
use super::{ApiState, HEADER_LENGTH};

pub(super) async fn no_route() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "no such endpoint")
}

pub(super) async fn server_metadata() -> Json<Value> {
    Json(json!({
        "name": "outpost-agent",
        "version": env!("CARGO_PKG_VERSION"),
        "extensions": ["binary_tensor_data"],
    }))
}

/// The models this agent serves, as `GET /v2/models` lists them and as Triton's repository
/// extension indexes them (`POST /v2/repository/index`, which tritonclient's
/// `get_model_repository_index` calls): name, version and state of each.
fn index(state: &ApiState) -> Vec<Value> {
    state
        .slot
        .all()
        .iter()
        .map(|active| {
            json!({
                "name": active.name,
                "version": active.version.to_string(),
                "state": "READY",
            })
        })
        .collect()
}

pub(super) async fn models(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(json!({ "models": index(&state) }))
}

pub(super) async fn repository_index(State(state): State<Arc<ApiState>>) -> Json<Value> {
    Json(Value::Array(index(&state)))
}

pub(super) async fn live() -> StatusCode {
    StatusCode::OK
}

pub(super) async fn ready(State(state): State<Arc<ApiState>>) -> StatusCode {
    if !state.slot.all().is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    }
}

/// The active version of the model asked for: 503 while no model is active, 404 for a model this
/// agent does not serve or a version that is not the active one.
pub(super) fn find_model(
    state: &ApiState,
    name: &str,
    version: Option<&str>,
) -> Result<Arc<ActiveModel>, ApiError> {
    let active = match state.slot.get(name) {
        Some(active) => active,
        None => {
            let served: Vec<String> = state
                .slot
                .all()
                .iter()
                .map(|model| model.name.clone())
                .collect();
            return Err(if served.is_empty() {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "no model is active yet")
            } else {
                ApiError::new(
                    StatusCode::NOT_FOUND,
                    format!("unknown model {name:?}: this agent serves {served:?}"),
                )
            });
        }
    };
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

pub(super) async fn model_metadata(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    find_model(&state, &name, None).map(|active| Json(metadata_of(&active)))
}

pub(super) async fn model_metadata_versioned(
    State(state): State<Arc<ApiState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<Json<Value>, ApiError> {
    find_model(&state, &name, Some(&version)).map(|active| Json(metadata_of(&active)))
}

pub(super) fn metadata_of(active: &ActiveModel) -> Value {
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

pub(super) async fn model_ready(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    find_model(&state, &name, None).map(|_| StatusCode::OK)
}

pub(super) async fn model_ready_versioned(
    State(state): State<Arc<ApiState>>,
    Path((name, version)): Path<(String, String)>,
) -> Result<StatusCode, ApiError> {
    find_model(&state, &name, Some(&version)).map(|_| StatusCode::OK)
}

pub(super) async fn infer(
    State(state): State<Arc<ApiState>>,
    Path(name): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_on(state, &name, None, &headers, body).await
}

pub(super) async fn infer_versioned(
    State(state): State<Arc<ApiState>>,
    Path((name, version)): Path<(String, String)>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    infer_on(state, &name, Some(&version), &headers, body).await
}

/// A request of at most this many bytes, to a model whose last run took at most [`INLINE_RUN`],
/// is parsed, run and encoded on the async worker that read it: handing it to a blocking thread
/// and back costs more than such a model does. Anything larger or slower (and a model's first
/// request) goes to a blocking thread, so it cannot hold up health checks and `/metrics`.
const INLINE_BODY: usize = 64 * 1024;
const INLINE_RUN: std::time::Duration = std::time::Duration::from_micros(200);

pub(super) async fn infer_on(
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
    let inline = body.len() <= INLINE_BODY
        && active
            .model
            .last_run()
            .is_some_and(|took| took <= INLINE_RUN);
    let work = move || {
        let answer = run_request(&state, &active, &body, json_length);
        if matches!(&answer, Err(error) if error.status == StatusCode::BAD_REQUEST) {
            state.totals.reject(&active.name, active.version);
        }
        answer
    };
    let answer = if inline {
        work()?
    } else {
        tokio::task::spawn_blocking(work).await.map_err(|error| {
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("the inference task failed: {error}"),
            )
        })??
    };
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
pub(super) fn json_length(headers: &HeaderMap) -> Result<Option<usize>, ApiError> {
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

/// Parses, runs and encodes one request. Runs on a blocking thread.
pub(super) fn run_request(
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
            if let Some(capture) = &state.capture {
                capture.offer(active, &request.inputs, &outputs, crate::unix_now());
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
pub(super) fn is_request_error(error: &InferenceError) -> bool {
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

pub(super) fn error_chain(error: &InferenceError) -> String {
    let mut message = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        let _ = write!(message, ": {cause}");
        source = cause.source();
    }
    message
}
