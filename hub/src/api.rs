//! The admin API's JSON bodies and paths, shared by the server's handlers and the CLI's client.
//!
//! These are the hub's own types, not wire types of the device protocol: the admin API is JSON
//! over HTTPS, spoken by `outpost-hub` to `outpost-hub serve`. Signed documents (roots, manifests,
//! plans) and artifacts are uploaded as raw bytes (`application/octet-stream`), never re-encoded.

use serde::{Deserialize, Serialize};

/// Every admin path starts with this.
pub const PREFIX: &str = "/admin/v1";

/// Roles, weakest first: each can do everything the ones before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Reads everything.
    Viewer,
    /// Drives rollouts.
    Operator,
    /// Publishes models and roots.
    Publisher,
    /// Manages tokens and devices.
    Admin,
}

impl Role {
    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Publisher => "publisher",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Option<Role> {
        match text {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "publisher" => Some(Role::Publisher),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Body of every non-2xx admin response.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// `GET /whoami`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WhoAmI {
    pub token_id: String,
    pub name: String,
    pub role: Role,
}

/// `POST /admin-tokens` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateAdminToken {
    pub name: String,
    pub role: Role,
    /// Seconds until the token stops working; absent, it never does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expires_in_secs: Option<u64>,
}

/// `GET /admin-tokens` (admin): a token without its secret, which the hub never keeps.
/// `DELETE /admin-tokens/{id}` (admin) answers with the revoked one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenInfo {
    pub id: String,
    pub name: String,
    pub role: Role,
    pub created: u64,
    /// Unix seconds at which it stops working; None: never.
    pub expires: Option<u64>,
}

/// A token as created; `token` is shown once and stored only hashed.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedToken {
    pub id: String,
    pub token: String,
}

/// `GET /roots`, `POST /roots` (publisher; body: a signed root).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootInfo {
    pub version: u64,
    pub threshold: u32,
    pub key_ids: Vec<String>,
    pub expires: u64,
}

/// One artifact of a model version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArtifactInfo {
    /// `model`, `profile` or `validation`.
    pub role: String,
    pub sha256: String,
    pub length: u64,
}

/// A tensor as the admin API shows it: `x FP32 [N,4]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TensorInfo {
    pub name: String,
    pub datatype: String,
    /// Sizes, with -1 for the batch axis.
    pub shape: Vec<i64>,
}

/// `GET /models/{name}/{version}`; `POST /models` (publisher; body: a signed manifest) answers
/// with one too. The signed bytes themselves: `GET /models/{name}/{version}/manifest`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelVersionInfo {
    pub name: String,
    pub version: u64,
    pub manifest_sha256: String,
    pub created: u64,
    pub expires: u64,
    pub artifacts: Vec<ArtifactInfo>,
    pub inputs: Vec<TensorInfo>,
    pub outputs: Vec<TensorInfo>,
    pub archs: Vec<String>,
    pub min_agent_version: String,
    /// True when this exact manifest was already stored (an idempotent re-publish).
    #[serde(default)]
    pub already_published: bool,
}

/// `GET /models`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelSummary {
    pub name: String,
    pub latest_version: u64,
    pub versions: usize,
}

/// `GET /models/{name}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelDetail {
    pub name: String,
    pub versions: Vec<ModelVersionInfo>,
}

/// `POST /enroll-tokens` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateEnrollToken {
    /// `key=value` labels given to every device that enrolls with the token.
    pub labels: Vec<String>,
    /// Seconds from now until the token stops working.
    pub expires_in_secs: u64,
    /// How many devices may enroll with it.
    pub uses: u32,
}

/// `GET /enroll-tokens`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollTokenInfo {
    pub id: String,
    pub labels: Vec<String>,
    pub expires: u64,
    pub uses_left: u32,
}

/// A device's model, by name and version.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: u64,
}

/// `GET /devices?selector=k=v,k=v`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub id: String,
    pub labels: Vec<String>,
    pub arch: String,
    pub agent_version: String,
    /// `steady`, `downloading`, `probation`, `degraded`, `silent` or `revoked`.
    pub state: String,
    /// The model the device reports first: its only one, for an agent that runs one model.
    pub active: Option<ModelRef>,
    /// Every model the device runs, sorted by name, as its latest check-in (or a committed
    /// status report since) said. Empty, and left out, while the hub knows only `active`: for a
    /// device that has not checked in since the hub kept this list (then `active` is its one
    /// model; [`DeviceSummary::running`] reads either).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub models: Vec<ModelRef>,
    pub enrolled_at: u64,
    pub last_checkin: Option<u64>,
    pub revoked: bool,
    /// Which inference runtime serves each model, as the device's latest runtime report
    /// (`/device/v3/runtimes`) said, in its order. Empty, and left out, until the device sends
    /// one (agents before runtime reports never do).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub runtimes: Vec<ModelRuntimeJson>,
}

/// The inference runtime serving one model version of a device, by the device's latest runtime
/// report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRuntimeJson {
    pub name: String,
    pub version: u64,
    /// `tract` or `onnxruntime`.
    pub runtime: String,
    /// The runtime's own version: ONNX Runtime's library's, or tract's.
    pub runtime_version: String,
    /// ONNX Runtime's execution providers, in the order they were registered; empty for tract.
    #[serde(default)]
    pub providers: Vec<String>,
    /// Why the runtime the device preferred does not serve the model (its library did not load,
    /// a provider is missing, the model failed its validation set under it); none when it does.
    #[serde(default)]
    pub fallback: Option<String>,
}

impl ModelRuntimeJson {
    /// The runtime, its version and any providers, for people: `onnxruntime 1.22.0
    /// [CUDAExecutionProvider, CPUExecutionProvider]`, `tract 0.23.9`.
    pub fn runtime_text(&self) -> String {
        let mut text = self.runtime.clone();
        if !self.runtime_version.is_empty() {
            text.push(' ');
            text.push_str(&self.runtime_version);
        }
        if !self.providers.is_empty() {
            text.push_str(&format!(" [{}]", self.providers.join(", ")));
        }
        text
    }
}

impl DeviceSummary {
    /// Every model the device runs: `models`, or `active` alone when the hub knows no list.
    pub fn running(&self) -> &[ModelRef] {
        if self.models.is_empty() {
            self.active.as_slice()
        } else {
            &self.models
        }
    }
}

/// One thing that happened to a device: an activation, a refusal, a rollback, a label change.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceEvent {
    pub at: u64,
    /// `downloaded`, `activating`, `committed`, `shadowing`, `failed`, `rolled_back`, `refused`,
    /// `stalled`, `enrolled`, `labels`, `revoked`.
    pub kind: String,
    pub plan_sequence: Option<u64>,
    pub model: Option<ModelRef>,
    pub detail: String,
}

/// Inferences a device reported for one model version, as ingested from its telemetry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InferenceCounts {
    pub model: ModelRef,
    pub count: u64,
    pub errors: u64,
}

/// `GET /devices/{id}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceDetail {
    pub device: DeviceSummary,
    pub public_key: String,
    pub plan_sequence: Option<u64>,
    /// Telemetry records the device dropped under its disk cap, as it reported them.
    pub dropped_records: u64,
    #[serde(default)]
    pub inferences: Vec<InferenceCounts>,
    pub events: Vec<DeviceEvent>,
}

/// `POST /devices/{id}/labels` (admin).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LabelChange {
    /// `key=value` labels to set (replacing any value of the same key).
    #[serde(default)]
    pub set: Vec<String>,
    /// Keys to remove.
    #[serde(default)]
    pub remove: Vec<String>,
}

/// Where a rollout stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    Active,
    Paused,
    RolledBack,
    Completed,
    /// A newer plan took over.
    Superseded,
}

impl RolloutState {
    pub fn as_str(&self) -> &'static str {
        match self {
            RolloutState::Active => "active",
            RolloutState::Paused => "paused",
            RolloutState::RolledBack => "rolled_back",
            RolloutState::Completed => "completed",
            RolloutState::Superseded => "superseded",
        }
    }
}

/// Device counts of one stage.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageProgress {
    pub percent: u8,
    /// The plan's shadow stage: its devices run the target beside the fallback, serving the
    /// fallback; `succeeded` counts those that loaded and validated it.
    #[serde(default)]
    pub shadow: bool,
    /// Selected devices whose bucket falls in this stage's cumulative percentage.
    pub devices: u64,
    /// Reported the target committed after probation.
    pub succeeded: u64,
    /// Reported a failure, a refusal or a rollback.
    pub failed: u64,
    /// Silent for longer than the device timeout without committing.
    pub silent: u64,
    pub pending: u64,
    /// Not offered the target because their agent is older than its `min_agent_version`: left
    /// on the fallback, neither pending nor failed.
    #[serde(default)]
    pub skipped: u64,
}

/// One gate's measured figure against its signed limit.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateFigure {
    /// `failure_pct`, `error_rate`, `p95_regression_pct`, `drift_psi`, and in a shadow stage
    /// `shadow_top1_agreement` (a floor, breached below its limit) and `shadow_mean_abs_diff`.
    pub gate: String,
    /// None when there is not yet data to measure it.
    pub value: Option<f64>,
    pub limit: f64,
    pub breached: bool,
    /// What the figure was computed from, for humans: "3 of 40 devices", "p95 12ms vs 10ms".
    pub detail: String,
}

/// A decision the rollout engine or an operator took, with the figures that caused it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Decision {
    pub at: u64,
    /// `advance`, `pause`, `resume`, `rollback`, `complete`, `superseded`.
    pub action: String,
    /// `engine` or the token name of the operator.
    pub by: String,
    pub stage_index: usize,
    pub reason: String,
    pub figures: Vec<GateFigure>,
}

/// `GET /rollouts/{sequence}`; `POST /rollouts` (operator; body: a signed plan) answers with one.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutInfo {
    pub sequence: u64,
    pub target: ModelRef,
    pub fallback: Option<ModelRef>,
    pub selector: Vec<String>,
    pub state: RolloutState,
    pub stage_index: usize,
    pub stage_started_at: u64,
    pub stages: Vec<StageProgress>,
    pub gates: Vec<GateFigure>,
    pub decisions: Vec<Decision>,
    pub created: u64,
}

/// `GET /retirements` (viewer), oldest first; `POST /retirements` (operator; body: a signed
/// retirement) answers with the one stored. A retirement shares the plans' sequence space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetirementInfo {
    pub sequence: u64,
    /// The model the devices it selects stop serving.
    pub model: String,
    /// `k=v` labels a device must all carry; empty: every device.
    pub selector: Vec<String>,
    /// Unix seconds, as signed.
    pub created: u64,
    /// Unix seconds, as signed: devices refuse it after then.
    pub expires: u64,
    /// Unix seconds the hub stored it.
    pub stored_at: u64,
    /// Token name of the operator who uploaded it.
    pub by: String,
}

/// `GET /capture/allowances` (viewer): every stored capture allowance, by model and sequence;
/// `POST /capture/allowances` (publisher; body: a signed allowance) answers with the one stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureAllowanceInfo {
    pub model: String,
    /// Per model: devices keep the highest they verified.
    pub sequence: u64,
    /// The versions it covers; empty: every version.
    pub versions: Vec<u64>,
    /// Chance a served request is captured, in parts per million; 0: capture off.
    pub rate_ppm: u32,
    pub max_samples_per_day: u64,
    pub max_bytes_per_day: u64,
    /// `always` or `while-drift-alert`.
    pub trigger: String,
    pub drop_inputs: Vec<String>,
    pub drop_outputs: Vec<String>,
    /// The operator's X25519 public key samples are sealed to, in hex.
    pub recipient: String,
    /// Unix seconds, as signed.
    pub created: u64,
    pub expires: u64,
    /// Unix seconds the hub stored it, and the token name that uploaded it.
    pub stored_at: u64,
    pub by: String,
}

/// `GET /captures` (admin): stored samples, oldest first, filtered by `model`, `version`,
/// `device`, `since` and `until` (Unix seconds received) and at most `limit` (default 1000);
/// `GET /captures/{id}` (admin) downloads one sample's sealed bytes.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureInfo {
    pub id: u64,
    pub device: String,
    pub model: String,
    pub version: u64,
    /// The allowance's sequence the device captured it under.
    pub allowance: u64,
    /// Device time, Unix seconds.
    pub captured_at: u64,
    /// Hub time, Unix seconds.
    pub received_at: u64,
    /// Sealed bytes.
    pub bytes: u64,
}

/// One entry of the hash-chained audit log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditEntry {
    pub seq: u64,
    pub at: u64,
    /// Token name of whoever acted, or `engine`, or `bootstrap`.
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    /// Hex SHA-256 of the previous entry's `hash` (zeros for the first).
    pub prev_hash: String,
    /// Hex SHA-256 over this entry's fields and `prev_hash`.
    pub hash: String,
}

/// `GET /audit/verify`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditVerdict {
    pub entries: u64,
    pub intact: bool,
    /// What is wrong, naming the first bad entry.
    pub problem: Option<String>,
}

/// `GET /drift/{model}?version=V&selector=k=v,...&device=ID&since_secs=S` (viewer): the drift of
/// one model version's features and outputs, from the summaries of the devices in scope whose
/// windows end within the last `since_secs` seconds (default a day). Without `version`, the
/// latest published version with a drift profile. Without `device`, the figures come from the
/// hourly aggregates of the label groups the selector matches (a device's labels when its
/// telemetry arrived; devices revoked since included), and `by_device` from each device's own
/// summaries (by its current labels, revoked devices left out).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DriftReport {
    pub model: String,
    pub version: u64,
    /// Hex SHA-256 of the profile the summaries were judged against.
    pub profile_sha256: String,
    /// The label group reported on (`key=value`); empty for every device.
    pub selector: Vec<String>,
    /// The one device reported on, when the report was asked for one.
    pub device: Option<String>,
    /// Summaries of windows ending after this Unix second count.
    pub since: u64,
    /// When the report was made, Unix seconds.
    pub until: u64,
    /// Earliest start and latest end of the windows merged; none without data.
    pub window_start: Option<u64>,
    pub window_end: Option<u64>,
    /// Devices in `by_device`.
    pub devices: u64,
    /// Per-device summaries merged into `features` (one per device and window, each the merge
    /// of its uploads).
    pub summaries: u64,
    /// Every numeric feature and class output, most severe first.
    pub features: Vec<FeatureDriftInfo>,
    /// Each device's most drifted feature, most severe first.
    pub by_device: Vec<DeviceDriftInfo>,
}

/// A condition on a device's agent version, for `device list --agent`: `<0.3`, `>=0.2.1`,
/// `=0.1.0`, `0.1.0` (equal). A version of one or two numbers has the rest 0: `<0.3` is
/// `<0.3.0`. A device whose reported version cannot be read matches no condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentFilter {
    pub comparison: std::cmp::Ordering,
    /// With `comparison`, also equal: `<=` and `>=`.
    pub or_equal: bool,
    pub version: outpost_protocol::trust::AgentVersion,
}

impl AgentFilter {
    pub fn parse(text: &str) -> Result<AgentFilter, String> {
        use std::cmp::Ordering;
        let text = text.trim();
        let (comparison, or_equal, rest) = [
            ("<=", Ordering::Less, true),
            (">=", Ordering::Greater, true),
            ("<", Ordering::Less, false),
            (">", Ordering::Greater, false),
            ("=", Ordering::Equal, true),
        ]
        .into_iter()
        .find_map(|(prefix, comparison, or_equal)| {
            text.strip_prefix(prefix)
                .map(|rest| (comparison, or_equal, rest))
        })
        .unwrap_or((Ordering::Equal, true, text));
        let refused =
            || format!("{text:?}: expected a comparison and a version, e.g. <0.3 or >=0.2.1");
        let mut parts: Vec<&str> = rest.trim().split('.').collect();
        if !(1..=3).contains(&parts.len()) {
            return Err(refused());
        }
        parts.resize(3, "0");
        let version =
            outpost_protocol::trust::AgentVersion::parse(&parts.join(".")).ok_or_else(refused)?;
        Ok(AgentFilter {
            comparison,
            or_equal,
            version,
        })
    }

    /// Whether an agent that reported `reported` meets the condition.
    pub fn matches(&self, reported: &str) -> bool {
        outpost_protocol::trust::AgentVersion::parse(reported).is_some_and(|version| {
            let ordering = version.cmp(&self.version);
            ordering == self.comparison || (self.or_equal && ordering.is_eq())
        })
    }
}

impl std::fmt::Display for AgentFilter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        use std::cmp::Ordering;
        let operator = match (self.comparison, self.or_equal) {
            (Ordering::Less, false) => "<",
            (Ordering::Less, true) => "<=",
            (Ordering::Greater, false) => ">",
            (Ordering::Greater, true) => ">=",
            (Ordering::Equal, _) => "=",
        };
        write!(f, "{operator}{}", self.version)
    }
}

/// The drift of one numeric feature or class output against the profile's reference.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeatureDriftInfo {
    pub name: String,
    /// `numeric` or `class`.
    pub kind: String,
    /// The metric the status is judged on: `psi` for numeric features, `js` for class outputs.
    pub metric: String,
    pub value: f64,
    /// The flag threshold that applied to `value` at this sample size.
    pub threshold: f64,
    /// Whether the counts differ from the reference's more than chance allows at the profile's
    /// confidence (Pearson's test of homogeneity of the bins below). A feature is flagged only
    /// when they do: at small samples a `value` over `threshold` can be chance alone. Absent
    /// from a hub older than this field: read as `false`.
    #[serde(default)]
    pub significant: bool,
    /// `ok`, `warn` or `alert`.
    pub status: String,
    /// Values (numeric) or outputs (class) counted.
    pub n: u64,
    pub psi: f64,
    pub js: f64,
    pub hellinger: f64,
    pub chi_square: f64,
    pub ks: f64,
    /// Data-quality issues: NaN or infinite values, values out of range, unseen classes, missing
    /// values.
    pub quality: Vec<String>,
    /// The reference's and the current counts per bin that every figure above is computed from.
    /// A numeric feature's bins are `[below, interior..., above]` of `edges`: below the first
    /// edge, each `[e_i, e_{i+1})` (the last one closed), above the last edge. A class output's
    /// are `[each of classes..., unseen]`.
    pub reference_bins: Vec<u64>,
    pub current_bins: Vec<u64>,
    /// A numeric feature's bin edges; empty for a class output.
    pub edges: Vec<f64>,
    /// A class output's classes in bin order; empty for a numeric feature.
    pub classes: Vec<i64>,
}

/// One device's most drifted feature.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDriftInfo {
    pub device: String,
    pub labels: Vec<String>,
    /// Stored summaries of this device merged.
    pub summaries: u64,
    /// `ok`, `warn` or `alert`: the status of its most drifted feature.
    pub status: String,
    pub feature: String,
    pub metric: String,
    pub value: f64,
    pub n: u64,
}

/// `POST /alerts/rules`: a rule that notifies `webhooks` when `condition` has held for `for_secs`
/// on a version of `model`, over the devices of `selector` (`key=value`; every device when
/// empty). `condition` is written as `drift>=warn|alert`, `quality=out-of-range|missing|nan`,
/// `error-rate>SHARE` or `latency-p95>DURATION`; drift and quality look back `window_secs`.
/// Durations are signed so that a negative one is refused by name rather than by the parser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CreateAlertRule {
    pub name: String,
    pub model: String,
    #[serde(default)]
    pub selector: Vec<String>,
    pub condition: String,
    pub for_secs: i64,
    pub window_secs: i64,
    pub webhooks: Vec<String>,
}

/// An alert rule, with its alerts (one per model version evaluated).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRuleInfo {
    pub name: String,
    pub model: String,
    pub selector: Vec<String>,
    pub condition: String,
    pub for_secs: u64,
    pub window_secs: u64,
    pub webhooks: Vec<String>,
    pub created: u64,
    pub created_by: String,
    pub alerts: Vec<AlertInfo>,
}

/// One alert of a rule: its key (`model@version`) and where it stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AlertInfo {
    pub rule: String,
    pub key: String,
    /// `inactive`, `pending` or `firing`.
    pub state: String,
    /// When it entered that state, Unix seconds.
    pub since: u64,
    /// Since when its condition has held, while pending or firing.
    pub held_since: Option<u64>,
    /// When it (last) started firing.
    pub firing_since: Option<u64>,
}

/// `POST /webhooks`: an endpoint notified in `format` (`outpost`, the default, or
/// `alertmanager`). Without `secret`, the hub makes one and shows it once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateWebhook {
    pub name: String,
    pub url: String,
    #[serde(default)]
    pub format: Option<String>,
    #[serde(default)]
    pub secret: Option<String>,
}

/// A webhook endpoint; its URL without the query (which may hold a receiver's token), never its
/// secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookInfo {
    pub name: String,
    pub url: String,
    pub format: String,
    pub created: u64,
    pub created_by: String,
}

/// A webhook just created, with its signing secret, shown this once.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreatedWebhook {
    pub webhook: WebhookInfo,
    pub secret: String,
}

/// A notification in the outbox.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryInfo {
    pub id: u64,
    pub idempotency_key: String,
    pub webhook: String,
    /// `firing` or `resolved`.
    pub kind: String,
    pub rule: String,
    pub alert_key: String,
    pub created: u64,
    /// `pending`, `delivered` or `dead`.
    pub state: String,
    pub attempts: u64,
    /// The receiver's last HTTP status, if it ever answered.
    pub last_status: Option<u16>,
    /// Why the last attempt failed; empty after a success.
    pub last_error: String,
    /// When it was delivered or given up on.
    pub done_at: Option<u64>,
}

/// `POST /webhooks/{name}/test`: what the receiver answered to a test message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WebhookTestResult {
    pub webhook: String,
    pub idempotency_key: String,
    /// The receiver's HTTP status; none when it could not be reached.
    pub status: Option<u16>,
    /// The start of its answer's body.
    pub body: String,
    /// Why it could not be reached.
    pub error: Option<String>,
}
