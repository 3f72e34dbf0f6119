//! Test fixtures shared by the device API's unit tests: a hub with one enrolled device that signs
//! its requests ([`Fixture`]), sent through the real [`routes`], and the check-ins, rollouts and
//! retirements they are given.

// Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::http::{Request, StatusCode};
use outpost_protocol::auth::{
    RequestToSign, HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use outpost_protocol::device::{
    AgentState, CheckIn, CheckInResponse, ErrorResponse, HeldCheckIn, HeldCheckInResponse,
    ModelCheckIn, ModelsCheckIn, ModelsCheckInResponse, RunningModel,
};
use outpost_protocol::keys::SecretKey;
use outpost_protocol::trust::{AgentVersion, BreachAction, GatePolicy, ManifestRef, PlanBody};
use outpost_protocol::{sha256, Label, Message, Sha256};
use serde_bytes::ByteBuf;
use tower::ServiceExt;

use super::routes;
use crate::rollout::{Rollout, RolloutState};
use crate::server::engine::{Document, Live, LiveRetirement, LiveRollout};
use crate::server::{Hub, ServerConfig, SharedHub};
use crate::store::DeviceRecord;
use crate::unix_now;

const DEVICE: [u8; 16] = [3; 16];
pub(super) const POLL_SECS: u32 = 300;
pub(super) const ROLLOUT_POLL_SECS: u32 = 30;

/// A hub with one enrolled device, labelled `site=lab`, whose key signs the requests.
pub(super) struct Fixture {
    _dir: tempfile::TempDir,
    pub(super) hub: SharedHub,
    key: SecretKey,
}

impl Fixture {
    pub(super) async fn new() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(ServerConfig::for_tests(
            dir.path(),
            POLL_SECS,
            ROLLOUT_POLL_SECS,
        ))
        .await
        .unwrap();
        let key = SecretKey::from_seed([9; 32]);
        let labels = vec![("site".to_owned(), "lab".to_owned())];
        hub.store
            .put_device(&DeviceRecord::enrolled_for_tests(
                DEVICE,
                key.public().0,
                labels,
            ))
            .await
            .unwrap();
        Fixture {
            _dir: dir,
            hub,
            key,
        }
    }

    pub(super) fn live(&self, rollouts: Vec<LiveRollout>) {
        self.live_with(rollouts, Vec::new());
    }

    pub(super) fn live_with(&self, rollouts: Vec<LiveRollout>, retirements: Vec<LiveRetirement>) {
        *self.hub.live.write().unwrap() = Arc::new(Live {
            rollouts,
            retirements,
        });
    }

    pub(super) async fn device(&self) -> DeviceRecord {
        self.hub.store.device(&DEVICE).await.unwrap().unwrap()
    }

    /// Posts `message` to `path`, signed by the device, and returns the status and body.
    pub(super) async fn post<M: Message>(&self, path: &str, message: &M) -> (StatusCode, Bytes) {
        let mut nonce = [0u8; 16];
        getrandom::getrandom(&mut nonce).unwrap();
        let body = outpost_protocol::encode(message).unwrap();
        self.send(self.signed(path, body, nonce)).await
    }

    /// A POST of `body` to `path`, signed by the device now with `nonce`.
    pub(super) fn signed(&self, path: &str, body: Vec<u8>, nonce: [u8; 16]) -> Request<Body> {
        let timestamp = unix_now();
        let signature = RequestToSign {
            method: "POST",
            path_and_query: path,
            body_sha256: sha256(&body),
            timestamp,
            nonce,
        }
        .sign(&self.key);
        Request::post(path)
            .header(HEADER_DEVICE, hex::encode(DEVICE))
            .header(HEADER_TIMESTAMP, timestamp.to_string())
            .header(HEADER_NONCE, hex::encode(nonce))
            .header(HEADER_SIGNATURE, hex::encode(signature.0))
            .body(Body::from(body))
            .unwrap()
    }

    /// Sends `request` through the device API's routes and returns the status and body.
    pub(super) async fn send(&self, request: Request<Body>) -> (StatusCode, Bytes) {
        let response = routes(self.hub.clone()).oneshot(request).await.unwrap();
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap();
        (status, body)
    }

    pub(super) async fn models_check_in(&self, models: Vec<ModelCheckIn>) -> ModelsCheckInResponse {
        let (status, body) = self
            .post("/device/v3/checkin", &models_request(models))
            .await;
        assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
        outpost_protocol::decode(&body).unwrap()
    }

    /// A single-model agent's check-in, plain (`v1`) and held (`v2`, holding nothing): both
    /// must hand it the same plan. Returns that plan and the poll interval.
    pub(super) async fn one_model_check_in(
        &self,
        active: Option<RunningModel>,
    ) -> (Option<ByteBuf>, u32) {
        let report = CheckIn {
            state: AgentState::Steady,
            active,
            root_version: 0,
            plan_sequence: None,
            agent_version: AgentVersion::parse("0.2.0").unwrap(),
            dropped_records: 0,
            queue_bytes: 0,
        };
        let (status, body) = self.post("/device/v1/checkin", &report).await;
        assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
        let plain: CheckInResponse = outpost_protocol::decode(&body).unwrap();
        let held = HeldCheckIn {
            check_in: report,
            held: None,
        };
        let (status, body) = self.post("/device/v2/checkin", &held).await;
        assert_eq!(status, StatusCode::OK, "{:?}", error_message(&body));
        let HeldCheckInResponse::Full(full) = outpost_protocol::decode(&body).unwrap() else {
            panic!("a device holding nothing gets a full answer");
        };
        assert_eq!(full.plan, plain.plan);
        assert_eq!(full.poll_after_secs, plain.poll_after_secs);
        (plain.plan, plain.poll_after_secs)
    }
}

pub(super) fn error_message(body: &[u8]) -> Option<String> {
    outpost_protocol::decode::<ErrorResponse>(body)
        .ok()
        .map(|error| error.message)
}

pub(super) fn models_request(models: Vec<ModelCheckIn>) -> ModelsCheckIn {
    ModelsCheckIn {
        state: AgentState::Steady,
        models,
        root_version: 0,
        agent_version: AgentVersion::parse("0.3.0").unwrap(),
        dropped_records: 0,
        queue_bytes: 7,
    }
}

pub(super) fn running(name: &str, version: u64) -> RunningModel {
    RunningModel {
        name: name.to_owned(),
        version,
        manifest_sha256: Sha256([version as u8; 32]),
    }
}

pub(super) fn entry(name: &str, active: Option<u64>, held: Option<Sha256>) -> ModelCheckIn {
    ModelCheckIn {
        name: name.to_owned(),
        active: active.map(|version| running(name, version)),
        plan_sequence: None,
        held,
    }
}

pub(super) fn document(text: String) -> Document {
    let bytes = text.into_bytes();
    Document {
        sha256: sha256(&bytes),
        bytes: Arc::new(bytes),
    }
}

/// Rollout `sequence` of `name@version` to every device labelled `site`, all at its one
/// stage; its signed plan's bytes are `plan <sequence>`.
pub(super) fn rollout(sequence: u64, name: &str, version: u64, state: RolloutState) -> LiveRollout {
    rollout_at("lab", sequence, name, version, state)
}

pub(super) fn rollout_at(
    site: &str,
    sequence: u64,
    name: &str,
    version: u64,
    state: RolloutState,
) -> LiveRollout {
    let plan = PlanBody {
        sequence,
        created: 0,
        expires: u64::MAX,
        target: ManifestRef {
            name: name.to_owned(),
            version,
            manifest_sha256: Sha256([version as u8; 32]),
        },
        fallback: None,
        stages: vec![100],
        selector: vec![Label::new("site", site).unwrap()],
        gates: GatePolicy {
            bake_secs: 60,
            device_timeout_secs: 600,
            max_failure_pct: 5.0,
            max_error_rate: 0.02,
            max_p95_regression_pct: 20.0,
            max_drift_psi: None,
            on_breach: BreachAction::Pause,
            auto_advance: true,
        },
        shadow: None,
    };
    LiveRollout {
        sequence,
        rollout: Rollout {
            plan,
            state,
            stage_index: 0,
            stage_started: vec![0],
        },
        signed_plan: document(format!("plan {sequence}")),
        target_manifest: document(format!("manifest {name}@{version}")),
        fallback_manifest: None,
        target_min_agent: AgentVersion::parse("0.1.0").unwrap(),
    }
}

/// Retirement `sequence` of `name` on every device labelled `site`; its signed bytes are
/// `retire <sequence>`.
pub(super) fn retirement_at(site: &str, sequence: u64, name: &str) -> LiveRetirement {
    LiveRetirement {
        sequence,
        model: name.to_owned(),
        selector: vec![Label::new("site", site).unwrap()],
        signed: document(format!("retire {sequence}")),
    }
}

pub(super) fn retirement(sequence: u64, name: &str) -> LiveRetirement {
    retirement_at("lab", sequence, name)
}
