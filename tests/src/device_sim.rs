//! Simulated devices: the device API spoken the way an agent speaks it, without running models.
//!
//! A [`SimDevice`] enrolls, signs every request with its own key, checks in, downloads artifacts
//! and reports status. It trusts only the root it was given out of band and verifies every plan,
//! manifest and artifact the hub hands it, so a test that drives devices also checks that the hub
//! serves properly signed documents. [`SignedRequest`] keeps a request's exact headers so a test
//! can send it twice (a replay) or alter one field.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use outpost_protocol::auth::{
    RequestToSign, HEADER_DEVICE, HEADER_NONCE, HEADER_SIGNATURE, HEADER_TIMESTAMP,
};
use outpost_protocol::device::{
    AgentState, CheckIn, CheckInResponse, DeviceId, EnrollRequest, EnrollResponse, ErrorResponse,
    HeldCheckIn, InferenceWindow, RunningModel, Status, StatusReport, TelemetryAck, TelemetryBatch,
    LATENCY_BUCKETS_US,
};
use outpost_protocol::drift::{DriftSummary, FeatureSource, Profile, TensorSide};
use outpost_protocol::trust::{ArtifactRole, ManifestRef, Slot};
use outpost_protocol::{
    sha256, AgentVersion, Arch, Label, Message, SecretKey, Sha256, TimeFloor, VerifiedManifest,
    VerifiedPlan, VerifiedRoot,
};

pub const POSTCARD: &str = "application/x-outpost-postcard";

/// Largest response a simulated device reads (artifacts included).
const MAX_RESPONSE: u64 = 256 * 1024 * 1024;

pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("the clock is after 1970")
        .as_secs()
}

fn random<const N: usize>() -> [u8; N] {
    let mut out = [0u8; N];
    getrandom::getrandom(&mut out).expect("reading random bytes");
    out
}

/// CA certificates simulated devices trust for HTTPS, set by [`trust_ca`]: a device is given
/// its hub's CA out of band, as an agent's config names it.
static TRUSTED_CA: std::sync::Mutex<Vec<ureq::tls::Certificate<'static>>> =
    std::sync::Mutex::new(Vec::new());

/// Makes every simulated device (and [`http_agent`]) of this process trust the CA in `pem`.
pub fn trust_ca(pem: &[u8]) {
    let certificates = ureq::tls::parse_pem(pem).filter_map(|item| match item {
        Ok(ureq::tls::PemItem::Certificate(certificate)) => Some(certificate.to_owned()),
        _ => None,
    });
    TRUSTED_CA
        .lock()
        .expect("the trusted CA list is not poisoned")
        .extend(certificates);
}

/// An HTTP client that hands back every status instead of turning 4xx into errors, and trusts
/// the CAs given to [`trust_ca`] for HTTPS.
pub fn http_agent() -> ureq::Agent {
    let trusted = TRUSTED_CA
        .lock()
        .expect("the trusted CA list is not poisoned")
        .clone();
    let mut config = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .max_redirects(0)
        .timeout_global(Some(Duration::from_secs(30)));
    if !trusted.is_empty() {
        config = config.tls_config(
            ureq::tls::TlsConfig::builder()
                .root_certs(ureq::tls::RootCerts::new_with_certs(&trusted))
                .build(),
        );
    }
    config.build().new_agent()
}

/// A response's status and body.
#[derive(Debug, Clone)]
pub struct Reply {
    pub status: u16,
    pub body: Vec<u8>,
}

impl Reply {
    /// The hub's `ErrorResponse` message; panics when the body is not one.
    pub fn error_message(&self) -> String {
        let error: ErrorResponse = outpost_protocol::decode(&self.body).unwrap_or_else(|error| {
            panic!(
                "status {} body is not an ErrorResponse ({error}): {:?}",
                self.status,
                String::from_utf8_lossy(&self.body)
            )
        });
        assert_eq!(
            error.status, self.status,
            "ErrorResponse.status disagrees with the HTTP status"
        );
        error.message
    }

    /// Panics unless the status is `status` and the error message contains `needle`.
    pub fn refused(&self, status: u16, needle: &str) {
        let message = self.error_message();
        assert_eq!(
            self.status, status,
            "expected status {status}, got {} ({message})",
            self.status
        );
        assert!(
            message.contains(needle),
            "error message {message:?} does not mention {needle:?}"
        );
    }

    /// Decodes a 200 answer; panics with the hub's error otherwise.
    pub fn decode<M: Message>(&self) -> M {
        assert_eq!(
            self.status,
            200,
            "expected 200, got {}: {}",
            self.status,
            String::from_utf8_lossy(&self.body)
        );
        outpost_protocol::decode(&self.body)
            .unwrap_or_else(|error| panic!("decoding the hub's answer: {error}"))
    }
}

/// Sends `body` to `url` (POST, or GET when `body` is `None`) with `headers`.
pub fn send(url: &str, headers: &[(String, String)], body: Option<&[u8]>) -> Reply {
    let agent = http_agent();
    let result = match body {
        Some(body) => {
            let mut request = agent.post(url).header("content-type", POSTCARD);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request.send(body)
        }
        None => {
            let mut request = agent.get(url);
            for (name, value) in headers {
                request = request.header(name, value);
            }
            request.call()
        }
    };
    let mut response = result.unwrap_or_else(|error| panic!("request to {url} failed: {error}"));
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(MAX_RESPONSE)
        .read_to_vec()
        .unwrap_or_else(|error| panic!("reading the answer from {url}: {error}"));
    Reply { status, body }
}

/// One signed request, kept whole so it can be sent again byte for byte.
#[derive(Debug, Clone)]
pub struct SignedRequest {
    pub url: String,
    /// `None` for a GET.
    pub body: Option<Vec<u8>>,
    pub headers: Vec<(String, String)>,
}

impl SignedRequest {
    pub fn send(&self) -> Reply {
        send(&self.url, &self.headers, self.body.as_deref())
    }

    /// Replaces one header's value (to forge a field after signing).
    pub fn with_header(mut self, name: &str, value: &str) -> SignedRequest {
        for header in &mut self.headers {
            if header.0 == name {
                header.1 = value.to_owned();
            }
        }
        self
    }
}

/// How a simulated device responds to what the hub asks it to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Behaviour {
    /// Downloads, verifies and commits every manifest it is handed.
    Commit,
    /// Commits the fallback, but reports `Failed` for the plan's target.
    FailTarget,
    /// Checks in but never downloads or reports anything.
    Mute,
}

/// What the hub offered at one check-in, verified the way a device verifies it.
#[derive(Debug)]
pub struct Offer {
    pub slot: Slot,
    pub plan: VerifiedPlan,
    pub manifest: VerifiedManifest,
}

/// A device of the fleet, simulated.
#[derive(Debug)]
pub struct SimDevice {
    pub key: SecretKey,
    pub id: DeviceId,
    /// Labels the hub recorded at enrollment.
    pub labels: Vec<Label>,
    hub_url: String,
    /// The root the device was given out of band; everything the hub serves is checked with it.
    root: VerifiedRoot,
    pub active: Option<RunningModel>,
    pub plan_sequence: Option<u64>,
    /// The manifest this device last reported failed, so it does not retry it every round.
    failed: Option<Sha256>,
}

impl SimDevice {
    /// Enrolls a new device with a random key; panics when the hub refuses.
    pub fn enroll(hub_url: &str, token: &str, labels: &[&str], trusted_root: &[u8]) -> SimDevice {
        let key = SecretKey::from_seed(random());
        let reply = SimDevice::enroll_request(hub_url, token, &key, labels);
        let response: EnrollResponse = reply.decode();
        let root = VerifiedRoot::load_trusted(trusted_root)
            .unwrap_or_else(|error| panic!("the fleet's root does not verify: {error}"));
        SimDevice {
            key,
            id: response.device_id,
            labels: response.labels,
            hub_url: hub_url.to_owned(),
            root,
            active: None,
            plan_sequence: None,
            failed: None,
        }
    }

    /// Sends an enrollment request and returns the raw answer.
    pub fn enroll_request(hub_url: &str, token: &str, key: &SecretKey, labels: &[&str]) -> Reply {
        let request = EnrollRequest {
            token: token.to_owned(),
            public_key: key.public(),
            arch: Arch::current().expect("tests run on a supported architecture"),
            agent_version: agent_version(),
            labels: labels
                .iter()
                .map(|text| Label::parse(text).expect("test labels are valid"))
                .collect(),
        };
        let body = outpost_protocol::encode(&request).expect("encoding an enroll request");
        send(&format!("{hub_url}/device/v1/enroll"), &[], Some(&body))
    }

    pub fn hub_url(&self) -> &str {
        &self.hub_url
    }

    /// Points the device at a restarted hub, which listens on a new port.
    pub fn set_hub_url(&mut self, hub_url: &str) {
        hub_url.clone_into(&mut self.hub_url);
    }

    /// Signs a request now with a fresh nonce; `body` is `None` for a GET.
    pub fn sign(&self, method: &str, path: &str, body: Option<&[u8]>) -> SignedRequest {
        self.sign_at(method, path, body, unix_now())
    }

    /// Signs a request as if at `timestamp`.
    pub fn sign_at(
        &self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
        timestamp: u64,
    ) -> SignedRequest {
        let nonce: [u8; 16] = random();
        let signature = RequestToSign {
            method,
            path_and_query: path,
            body_sha256: sha256(body.unwrap_or_default()),
            timestamp,
            nonce,
        }
        .sign(&self.key);
        SignedRequest {
            url: format!("{}{path}", self.hub_url),
            body: body.map(<[u8]>::to_vec),
            headers: vec![
                (HEADER_DEVICE.to_owned(), self.id.to_hex()),
                (HEADER_TIMESTAMP.to_owned(), timestamp.to_string()),
                (HEADER_NONCE.to_owned(), hex::encode(nonce)),
                (HEADER_SIGNATURE.to_owned(), hex::encode(signature.0)),
            ],
        }
    }

    /// Signs and sends one request.
    pub fn signed_request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Reply {
        self.sign(method, path, body).send()
    }

    /// The check-in body this device would send now.
    pub fn check_in_body(&self, state: AgentState) -> Vec<u8> {
        outpost_protocol::encode(&self.check_in_message(state)).expect("encoding a check-in")
    }

    fn check_in_message(&self, state: AgentState) -> CheckIn {
        CheckIn {
            state,
            active: self.active.clone(),
            root_version: 0,
            plan_sequence: self.plan_sequence,
            agent_version: agent_version(),
            dropped_records: 0,
            queue_bytes: 0,
        }
    }

    /// Checks in; panics unless the hub answers 200.
    pub fn check_in(&self, state: AgentState) -> CheckInResponse {
        let body = self.check_in_body(state);
        self.signed_request("POST", "/device/v1/checkin", Some(&body))
            .decode()
    }

    /// Checks in on `/device/v2/checkin` naming `held` (a [`CheckInResponse::held_digest`]) as
    /// the documents this device holds, and returns the hub's answer whatever it is. Unlike
    /// [`SimDevice::check_in`] it names the version of its trusted root, as an agent does, so it
    /// is sent only newer roots.
    pub fn held_check_in(&self, state: AgentState, held: Option<Sha256>) -> Reply {
        let body = outpost_protocol::encode(&HeldCheckIn {
            check_in: CheckIn {
                root_version: self.root.version(),
                ..self.check_in_message(state)
            },
            held,
        })
        .expect("encoding a held check-in");
        self.signed_request("POST", "/device/v2/checkin", Some(&body))
    }

    /// Verifies what a check-in answer offers, as a device would: the plan with the trusted root,
    /// then the manifest against the plan. Panics on anything that does not verify.
    pub fn verify_offer(&self, response: &CheckInResponse) -> Option<Offer> {
        let floor = TimeFloor {
            wall_clock: unix_now(),
            ..TimeFloor::default()
        };
        for root in &response.roots {
            let offered = VerifiedRoot::load_trusted(root).unwrap_or_else(|error| {
                panic!("the hub sent a root that does not verify: {error}")
            });
            assert_eq!(
                offered.signed_bytes(),
                self.root.signed_bytes(),
                "the hub sent a root other than the fleet's"
            );
        }
        let (claimed_slot, manifest_bytes) = response.manifest.as_ref()?;
        let plan_bytes = response
            .plan
            .as_ref()
            .expect("the hub sent a manifest without a plan");
        let plan = self
            .root
            .verify_plan(plan_bytes, &floor, self.plan_sequence)
            .unwrap_or_else(|error| panic!("the hub's plan does not verify: {error}"));
        let (slot, manifest) = plan
            .verify_manifest(&self.root, manifest_bytes, &floor, None)
            .unwrap_or_else(|error| panic!("the hub's manifest does not verify: {error}"));
        assert_eq!(
            slot, *claimed_slot,
            "the hub labels the manifest {claimed_slot:?} but it is the plan's {slot:?}"
        );
        Some(Offer {
            slot,
            plan,
            manifest,
        })
    }

    /// Verifies the manifest a check-in answer hands over to run in shadow, as a device would:
    /// under the offered plan, which must authorise it. Panics on anything that does not verify.
    pub fn verify_shadow(&self, response: &CheckInResponse) -> Option<VerifiedManifest> {
        let bytes = response.shadow.as_ref()?;
        let offer = self
            .verify_offer(response)
            .expect("the hub sent a shadow manifest without a plan and a manifest to serve");
        let floor = TimeFloor {
            wall_clock: unix_now(),
            ..TimeFloor::default()
        };
        let manifest = offer
            .plan
            .verify_shadow_manifest(&self.root, bytes, &floor, None)
            .unwrap_or_else(|error| panic!("the hub's shadow manifest does not verify: {error}"));
        Some(manifest)
    }

    /// Sends a status report; panics unless the hub answers 204.
    pub fn report(
        &self,
        plan_sequence: Option<u64>,
        manifest: Option<ManifestRef>,
        status: Status,
    ) {
        let body = outpost_protocol::encode(&StatusReport {
            plan_sequence,
            manifest,
            status,
            at: unix_now(),
        })
        .expect("encoding a status report");
        let reply = self.signed_request("POST", "/device/v1/status", Some(&body));
        assert_eq!(
            reply.status,
            204,
            "status report refused: {}",
            String::from_utf8_lossy(&reply.body)
        );
    }

    /// Sends a telemetry batch and returns the hub's acknowledgement.
    pub fn telemetry(&self, sequence: u64, windows: Vec<InferenceWindow>) -> TelemetryAck {
        self.send_telemetry(sequence, windows).decode()
    }

    /// Sends a telemetry batch and returns the hub's answer, whatever it is.
    pub fn send_telemetry(&self, sequence: u64, windows: Vec<InferenceWindow>) -> Reply {
        let body = outpost_protocol::encode(&TelemetryBatch {
            sequence,
            windows,
            dropped_records: 0,
        })
        .expect("encoding a telemetry batch");
        self.signed_request("POST", "/device/v1/telemetry", Some(&body))
    }

    /// Downloads an artifact by its hash; panics unless the hub answers 200.
    pub fn download(&self, sha256_hex: &str) -> Vec<u8> {
        let reply = self.signed_request("GET", &format!("/device/v1/artifacts/{sha256_hex}"), None);
        assert_eq!(
            reply.status,
            200,
            "downloading artifact {sha256_hex}: {}",
            String::from_utf8_lossy(&reply.body)
        );
        reply.body
    }

    /// One round of an agent's loop: check in, and when the hub offers a manifest other than the
    /// active one, verify it, fetch and check its model, and report the steps `behaviour` calls
    /// for. Returns the verified offer, if any.
    pub fn step(&mut self, behaviour: Behaviour) -> Option<Offer> {
        let response = self.check_in(AgentState::Steady);
        let offer = self.verify_offer(&response)?;
        if behaviour == Behaviour::Mute {
            return Some(offer);
        }
        let digest = offer.manifest.digest();
        let running = self
            .active
            .as_ref()
            .is_some_and(|active| active.manifest_sha256 == digest);
        if running || self.failed == Some(digest) {
            return Some(offer);
        }
        let sequence = Some(offer.plan.sequence());
        let reference = offer.manifest.reference();
        let artifact = offer
            .manifest
            .artifact(ArtifactRole::Model)
            .copied()
            .expect("every published manifest has a model artifact");
        let bytes = self.download(&artifact.sha256.to_hex());
        offer
            .manifest
            .verify_artifact(ArtifactRole::Model, &bytes)
            .unwrap_or_else(|error| panic!("the hub served a model that does not match: {error}"));
        self.report(sequence, Some(reference.clone()), Status::Downloaded);
        self.report(sequence, Some(reference.clone()), Status::Activating);
        self.plan_sequence = sequence;
        if behaviour == Behaviour::FailTarget && offer.slot == Slot::Target {
            self.report(
                sequence,
                Some(reference),
                Status::Failed {
                    reason: "simulated probation failure".to_owned(),
                },
            );
            self.failed = Some(digest);
            return Some(offer);
        }
        self.report(sequence, Some(reference.clone()), Status::Committed);
        self.active = Some(RunningModel {
            name: reference.name,
            version: reference.version,
            manifest_sha256: reference.manifest_sha256,
        });
        Some(offer)
    }
}

/// The agent version simulated devices claim.
pub fn agent_version() -> AgentVersion {
    AgentVersion::parse(env!("CARGO_PKG_VERSION"))
        .expect("the workspace version is MAJOR.MINOR.PATCH")
}

/// A telemetry window of `model@version` over the hour from `start`, as an agent serving it with
/// `profile` (whose artifact hashes to `profile_sha256`) would send it after `rows` inferences on
/// standard normal inputs from `seed`: the input columns' drift summary, with `shift` added to the
/// columns it names.
pub fn drift_window(
    model: &str,
    version: u64,
    (profile, profile_sha256): (&Profile, Sha256),
    start: u64,
    rows: usize,
    seed: u64,
    shift: &[(usize, f32)],
) -> InferenceWindow {
    let mut summary =
        DriftSummary::new(model, version, profile_sha256, profile, start, start + 3600);
    let columns = profile.features.len();
    for row in outpost_model::example::normal_rows(columns, rows, seed, 0.0).chunks(columns) {
        for (feature, counts) in profile.features.iter().zip(summary.features.iter_mut()) {
            if let (TensorSide::Input, FeatureSource::Column { index, .. }) =
                (feature.side, &feature.source)
            {
                let index = *index as usize;
                let shifted = shift
                    .iter()
                    .filter(|(column, _)| *column == index)
                    .map(|(_, by)| by)
                    .sum::<f32>();
                counts.observe(f64::from(row[index] + shifted), &feature.edges);
            }
        }
    }
    summary_window(model, version, start, rows as u64, summary)
}

/// A telemetry window of `model@version` over the hour from `start`: `count` error-free
/// inferences, all in the fastest latency bucket, summarised by `drift` (which a hostile test
/// may make disagree with the window).
pub fn summary_window(
    model: &str,
    version: u64,
    start: u64,
    count: u64,
    drift: DriftSummary,
) -> InferenceWindow {
    let mut latency_buckets = vec![0; LATENCY_BUCKETS_US.len() + 1];
    latency_buckets[0] = count;
    InferenceWindow {
        model: model.to_owned(),
        version,
        start,
        end: start + 3600,
        count,
        errors: 0,
        latency_buckets,
        drift: Some(drift),
        shadow: None,
    }
}
