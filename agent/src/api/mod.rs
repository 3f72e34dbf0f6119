//! The agent's local inference API: the Open Inference Protocol (KServe v2 REST, also spoken by
//! Triton), so applications on the device use an off-the-shelf client instead of an Outpost SDK.
//!
//! Every request takes the active model from the [`ModelSlot`] once, when it starts, and finishes
//! on that model: a hot swap changes only what the *next* request gets, so no request fails
//! because of one. Parsing, inference and response encoding run on a blocking thread so a large
//! request cannot stall the async runtime that serves health checks and `/metrics`; a small
//! request to a model that answers in microseconds runs on the async worker instead, since the
//! hand-off would cost more than the model (`routes::INLINE_BODY`, `routes::INLINE_RUN`).
//!
//! Besides plain JSON tensors the API speaks Triton's binary tensor data extension (raw
//! little-endian bytes after the JSON header, sized by `Inference-Header-Content-Length`), because
//! `tritonclient` sends inputs that way unless told otherwise. `GET /v2/models` lists the models
//! served, and Triton's `POST /v2/repository/index` indexes them in the form its clients expect.
//!
//! What is counted: only requests that reached the model. A request the API or
//! [`LoadedModel::run`](outpost_model::inference::LoadedModel::run)
//! refuses for its own content (malformed JSON, an unknown input, a wrong shape or type) is a
//! client's mistake, answered with 400 and counted only as `rejected` in `/metrics`; it is not
//! passed to the [`Recorder`], whose error rate gates rollouts and must not be moved by a
//! misbehaving client. A failure inside the model (a tract error or panic, an output of the wrong
//! type) is answered with 500 and recorded as a failed inference. `/metrics` keeps its own running
//! totals, because the recorder hands its windows off to the upload queue.

mod error;
mod metrics;
mod request;
mod response;
mod routes;

use std::future::Future;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use tokio::net::TcpListener;
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::timeout::TimeoutLayer;

use crate::capture::Capturer;
use crate::shadow::Shadow;
use crate::slot::ModelSlot;
use crate::telemetry::Recorder;
use metrics::*;
use routes::*;

/// A request body limit that fits a batch of camera frames but not a runaway upload.
pub const DEFAULT_MAX_BODY_BYTES: usize = 64 * 1024 * 1024;

/// A request time limit generous for edge CPUs running a batch.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// The header of Triton's binary tensor data extension: how many leading body bytes are JSON.
const HEADER_LENGTH: &str = "inference-header-content-length";

/// Extra time, beyond the request timeout, that shutdown waits for in-flight requests.
const DRAIN_GRACE: Duration = Duration::from_secs(2);

/// Time an API client has to send a request's headers, from connecting or from the end of its
/// previous response.
pub const API_HEADER_TIMEOUT: Duration = Duration::from_secs(10);

/// Connections the inference API holds at once; more are closed when accepted. Each request
/// runs on a worker thread of `[inference] threads`, so more could only wait.
pub const API_MAX_CONNECTIONS: usize = 256;

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
    /// Where answered requests are offered for capture under a signed allowance.
    capture: Option<Arc<Capturer>>,
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
            capture: None,
            totals: Totals::default(),
        }
    }

    /// Offers every answered request for capture; `capture` decides at once and seals off the
    /// request path.
    pub fn with_capture(mut self, capture: Arc<Capturer>) -> ApiState {
        self.capture = Some(capture);
        self
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
///
/// A client has [`API_HEADER_TIMEOUT`] to send each request's headers, and at most
/// [`API_MAX_CONNECTIONS`] connections are held at once.
pub async fn serve(
    listener: TcpListener,
    state: Arc<ApiState>,
    shutdown: impl Future<Output = ()>,
) -> std::io::Result<()> {
    let local = listener.local_addr()?;
    let request_timeout = state.limits.request_timeout;
    let drain = request_timeout + DRAIN_GRACE;
    let app = router(state);
    log::info!("inference API serving on http://{local}");

    // HTTP/1 only: the local API's clients are on the device, and HTTP/2 would bring h2.
    // Its clients are the device's own processes, on one address: the per-address limit is the
    // total. Idle longer than a request may take to answer.
    let options = outpost_serve::Options {
        name: "inference API",
        drain_timeout: drain,
        header_timeout: API_HEADER_TIMEOUT,
        idle_timeout: request_timeout + API_HEADER_TIMEOUT,
        max_per_address: API_MAX_CONNECTIONS,
        max_connections: API_MAX_CONNECTIONS,
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
        .route("/v2/models", get(models))
        .route("/v2/repository/index", post(repository_index))
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
        .layer(axum::middleware::map_response(
            move |response: Response| async move { limit_errors_in_json(response, limits) },
        ))
        .with_state(state)
}

/// The body limit and the request timeout answer from tower-http's layers, in plain text or with
/// no body; the API answers every error in JSON ([`ApiError`]), these too, naming the limit.
fn limit_errors_in_json(response: Response, limits: ApiLimits) -> Response {
    use error::ApiError;
    let json = response
        .headers()
        .get(axum::http::header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    match response.status() {
        StatusCode::PAYLOAD_TOO_LARGE if !json => ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "request body is larger than this API's limit of {} bytes",
                limits.max_body_bytes
            ),
        )
        .into_response(),
        StatusCode::REQUEST_TIMEOUT if !json => ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            format!(
                "the request took longer than this API's limit of {:?}",
                limits.request_timeout
            ),
        )
        .into_response(),
        _ => response,
    }
}
