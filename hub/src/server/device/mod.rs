//! The device API: postcard over HTTP(S), under `/device/v1` (check-ins also under `/device/v2`,
//! naming the documents the device holds, and `/device/v3`, one entry per model it runs; and
//! `/device/v3/runtimes`, which inference runtime serves each model it runs; `/device/v3/capture`,
//! the signed capture allowances of its models, and `/device/v3/captures`, its sealed samples).
//!
//! Enrollment is authorised by an enrollment token. Every other request is signed by the device's
//! own key over method, path, body hash, timestamp and nonce ([`outpost_protocol::auth`]); the
//! hub refuses stale timestamps, replayed nonces, unknown and revoked devices, each with its own
//! reason. Errors are postcard [`ErrorResponse`]s with the matching HTTP status.
//!
//! Each model name has rollouts of its own: a plan belongs to the model its target names. An
//! agent running several models is answered per model, by the latest signed word about each: a
//! plan, or a retirement that takes the model off the device (see [`latest_per_model`]). One
//! running a single model is only ever answered about that model, and never with a retirement,
//! which it cannot read (see [`rollout_for_one_model`]).
//!
//! This file holds the routes. What every handler shares (authentication of signed requests, the
//! [`KeyCache`], [`DeviceError`] and the postcard reply) is in `request.rs`, which names no
//! handler: the routes use the handlers and the handlers use `request.rs`, never the other way
//! round. The handlers: `enroll.rs`, `checkin.rs` (the three check-in paths, their tests in
//! `checkin/tests.rs`), `capture.rs` (capture allowances and sealed samples), `reports.rs` (status, runtime reports and telemetry; the runtime
//! reports' tests in `reports/tests.rs`) and `artifacts.rs` (ranged downloads). `testing.rs`
//! holds the fixtures the unit tests share.
//!
//! [`ErrorResponse`]: outpost_protocol::device::ErrorResponse
//! [`latest_per_model`]: checkin::latest_per_model
//! [`rollout_for_one_model`]: checkin::rollout_for_one_model
//! [`DeviceError`]: request::DeviceError

use axum::extract::DefaultBodyLimit;
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::Router;
use outpost_protocol::device::{
    CheckIn, EnrollRequest, HeldCheckIn, ModelsCheckIn, RuntimeReport, StatusReport, TelemetryBatch,
};
use outpost_protocol::Message;
use tower_http::timeout::TimeoutLayer;

use outpost_protocol::capture::{CaptureRequest, CaptureUpload};

use self::artifacts::artifact;
use self::checkin::{check_in, held_check_in, models_check_in};
use self::enroll::enroll;
use self::reports::{runtimes, status, telemetry};
use super::SharedHub;

mod artifacts;
mod capture;
mod checkin;
mod enroll;
mod reports;
mod request;

pub use self::request::KeyCache;

pub fn routes(hub: SharedHub) -> Router {
    let timeout = hub.config.request_timeout;
    let limited = |max: usize| DefaultBodyLimit::max(max);
    Router::new()
        .route(
            "/device/v1/enroll",
            post(enroll).layer(limited(EnrollRequest::MAX_FRAME)),
        )
        .route(
            "/device/v1/checkin",
            post(check_in).layer(limited(CheckIn::MAX_FRAME)),
        )
        .route(
            "/device/v2/checkin",
            post(held_check_in).layer(limited(HeldCheckIn::MAX_FRAME)),
        )
        .route(
            "/device/v3/checkin",
            post(models_check_in).layer(limited(ModelsCheckIn::MAX_FRAME)),
        )
        .route(
            "/device/v1/status",
            post(status).layer(limited(StatusReport::MAX_FRAME)),
        )
        .route(
            "/device/v3/runtimes",
            post(runtimes).layer(limited(RuntimeReport::MAX_FRAME)),
        )
        .route(
            "/device/v3/capture",
            post(capture::allowances).layer(limited(CaptureRequest::MAX_FRAME)),
        )
        .route(
            "/device/v3/captures",
            post(capture::upload).layer(limited(CaptureUpload::MAX_FRAME)),
        )
        .route(
            "/device/v1/telemetry",
            post(telemetry).layer(limited(TelemetryBatch::MAX_FRAME)),
        )
        .route(
            "/device/v1/artifacts/{sha256}",
            get(artifact).layer(limited(0)),
        )
        .layer(TimeoutLayer::with_status_code(
            StatusCode::REQUEST_TIMEOUT,
            timeout,
        ))
        .with_state(hub)
}

#[cfg(test)]
mod testing;
