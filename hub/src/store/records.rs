//! The store's record types: what is kept on disk, serialized with postcard. Changing a field's
//! order or type changes the bytes of stores already written.

use super::*;

/// An admin API token, stored under the SHA-256 of its secret: the fields the first hubs wrote,
/// then an `AdminTokenTail`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdminTokenRecord {
    pub id: String,
    pub name: String,
    pub role: RoleRecord,
    pub created: u64,
    /// When the token stops working; never, for tokens made before tokens expired. Stored in the
    /// tail.
    #[serde(skip)]
    pub expires: Option<u64>,
}

impl AdminTokenRecord {
    pub fn expired(&self, now: u64) -> bool {
        self.expires.is_some_and(|expires| expires <= now)
    }
}

/// An admin token's role as stored: by variant index, in this order, as 0.1.0 wrote it. Add
/// roles only at the end. Ordered as the roles are: each one can do what those before it can.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum RoleRecord {
    Viewer,
    Operator,
    Publisher,
    Admin,
}

/// A rollout's state as stored: by variant index, in this order, as 0.1.0 wrote it. Add states
/// only at the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RolloutStateRecord {
    Active,
    Paused,
    RolledBack,
    Completed,
    Superseded,
}

/// What an admin token record holds after the fields the first hubs wrote. An older hub reads
/// those fields and ignores this (postcard reads a value and leaves what follows); a record
/// without it reads with its defaults. Add fields only at its end.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct AdminTokenTail {
    pub expires: Option<u64>,
}

/// An enrollment token, stored under the SHA-256 of its secret.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EnrollTokenRecord {
    pub id: String,
    pub labels: Vec<(String, String)>,
    pub expires: u64,
    pub uses_left: u32,
    pub created: u64,
}

/// A model a device runs, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningRecord {
    pub name: String,
    pub version: u64,
    pub manifest_sha256: [u8; 32],
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeviceRecord {
    pub id: [u8; 16],
    pub public_key: [u8; 32],
    pub arch: String,
    pub agent_version: String,
    pub labels: Vec<(String, String)>,
    pub enrolled_at: u64,
    pub revoked: bool,
    pub last_checkin: Option<u64>,
    /// `steady`, `downloading`, `probation` or `degraded`, as last reported.
    pub state: String,
    /// The model the device reports first: its only one for an agent that runs one model, the
    /// first of its check-in's entries for one that runs several.
    pub active: Option<RunningRecord>,
    /// The highest plan sequence the device has accepted, of any of its models.
    pub plan_sequence: Option<u64>,
    pub dropped_records: u64,
    pub queue_bytes: u64,
    /// Every model the device runs, one per name, sorted by name. Stored in the record's tail
    /// (see `devices::encode_device`), so empty in records written before hubs kept the list;
    /// read it through [`DeviceRecord::running`], which then falls back to `active`.
    #[serde(skip)]
    pub models: Vec<RunningRecord>,
    /// The device's agent checks in about every model it runs (`/device/v3/checkin`), so
    /// another model's rollout adds a model beside its own. False for an agent of one model,
    /// which keeps the model it runs. Stored in the record's tail.
    #[serde(skip)]
    pub several_models: bool,
}

impl DeviceRecord {
    /// A device as enrollment leaves it: steady, running nothing yet, its labels sorted.
    pub fn enrolled(
        id: [u8; 16],
        public_key: [u8; 32],
        arch: String,
        agent_version: String,
        mut labels: Vec<(String, String)>,
        enrolled_at: u64,
    ) -> DeviceRecord {
        labels.sort();
        DeviceRecord {
            id,
            public_key,
            arch,
            agent_version,
            labels,
            enrolled_at,
            revoked: false,
            last_checkin: None,
            state: "steady".to_owned(),
            active: None,
            plan_sequence: None,
            dropped_records: 0,
            queue_bytes: 0,
            models: Vec::new(),
            several_models: false,
        }
    }

    /// [`DeviceRecord::enrolled`] for the tests of the store and the server: an x86_64 agent
    /// 0.3.0 enrolled at second 1.
    #[cfg(test)]
    pub fn enrolled_for_tests(
        id: [u8; 16],
        public_key: [u8; 32],
        labels: Vec<(String, String)>,
    ) -> DeviceRecord {
        DeviceRecord::enrolled(
            id,
            public_key,
            "x86_64".to_owned(),
            "0.3.0".to_owned(),
            labels,
            1,
        )
    }

    /// Every model the device runs, sorted by name: `models`, or, for a record written before
    /// hubs kept that list, `active` alone.
    pub fn running(&self) -> &[RunningRecord] {
        if self.models.is_empty() {
            self.active.as_slice()
        } else {
            &self.models
        }
    }

    /// The version of model `name` the device runs, if it runs that model.
    pub fn running_model(&self, name: &str) -> Option<&RunningRecord> {
        self.running().iter().find(|model| model.name == name)
    }

    /// Notes that the device committed `model` (a status report, ahead of its next check-in):
    /// it replaces the device's entry of that name or joins its list, and becomes `active` when
    /// the device had none or ran an older version of the same model. Its other models stay: a
    /// device changes one model at a time, and its next check-in lists them all again.
    pub fn note_committed(&mut self, model: RunningRecord) {
        if self.models.is_empty() {
            self.models = self.active.iter().cloned().collect();
        }
        if self
            .active
            .as_ref()
            .is_none_or(|active| active.name == model.name)
        {
            self.active = Some(model.clone());
        }
        match self
            .models
            .binary_search_by(|entry| entry.name.as_str().cmp(&model.name))
        {
            Ok(index) => self.models[index] = model,
            Err(index) => self.models.insert(index, model),
        }
    }
}

/// A device record as read from the store, with the bytes it came from: what
/// [`Store::update_device`] compares against before it writes.
#[derive(Debug, Clone)]
pub struct DeviceRead {
    pub record: DeviceRecord,
    /// The last telemetry batch applied to the record, kept as stored.
    pub(super) applied: Option<u64>,
    pub(super) stored: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub at: u64,
    pub kind: String,
    pub plan_sequence: Option<u64>,
    pub model: Option<(String, u64)>,
    pub detail: String,
}

/// A device's latest result for a plan's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutcomeRecord {
    pub kind: OutcomeKind,
    pub at: u64,
    pub reason: String,
}

/// What a device's latest result for a plan's target was.
///
/// This field was a `committed: bool` before shadow stages; postcard writes a bool as one byte 0
/// or 1 and an enum's variant as a varint index, so `Failed` and `Committed` must stay the first
/// two variants, in this order, for outcome records stored before to read back unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutcomeKind {
    Failed,
    Committed,
    /// Runs the target in shadow after passing its validation set.
    Shadowing,
}

/// Inference counters of one model version: one device's since its first report (`stats`), or one
/// label group's in one hour (`stats_hourly`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsRecord {
    pub count: u64,
    pub errors: u64,
    pub latency_buckets: Vec<u64>,
}

impl StatsRecord {
    pub fn add(&mut self, count: u64, errors: u64, buckets: &[u64]) {
        self.count = self.count.saturating_add(count);
        self.errors = self.errors.saturating_add(errors);
        if self.latency_buckets.len() < buckets.len() {
            self.latency_buckets.resize(buckets.len(), 0);
        }
        for (mine, theirs) in self.latency_buckets.iter_mut().zip(buckets) {
            *mine = mine.saturating_add(*theirs);
        }
    }
}

/// One device's drift summary of one model version over one window, as stored: every part the
/// device uploaded for that window, merged.
///
/// The summary is kept as its protocol frame, which carries its own format version: the protocol
/// already promises to read its frames, and a hand-made copy of a summary's twenty-odd fields
/// would only be a second format to keep in step.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DriftRecord {
    /// `outpost_protocol::encode` of the merged [`DriftSummary`]. Serialized as bytes, which
    /// postcard writes exactly as the sequence of `u8` it was before (a length, then the bytes),
    /// but copies whole instead of one element at a time: it is read and written on every batch.
    #[serde(with = "serde_bytes")]
    pub frame: Vec<u8>,
    /// How many uploads were merged into it.
    pub parts: u64,
    /// Unix second of the last upload merged in.
    pub updated: u64,
}

/// A stored drift summary with the device and window it belongs to.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredDrift {
    pub device: [u8; 16],
    pub window_start: u64,
    pub window_end: u64,
    pub parts: u64,
    pub summary: DriftSummary,
}

/// One device's shadow comparisons of one target manifest with one active model version over
/// one window, as stored: every part the device uploaded for that window, added up.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ShadowRecord {
    pub compared: u64,
    pub top1_agreed: u64,
    pub errors: u64,
    pub abs_diff_sum: f64,
    pub abs_diff_values: u64,
    pub dropped: u64,
    /// How many uploads were added into it.
    pub parts: u64,
}

impl ShadowRecord {
    /// The counts it holds, in the protocol's type, which alone knows how to add them.
    pub fn counts(&self) -> ShadowCounts {
        ShadowCounts {
            compared: self.compared,
            top1_agreed: self.top1_agreed,
            errors: self.errors,
            abs_diff_sum: self.abs_diff_sum,
            abs_diff_values: self.abs_diff_values,
            dropped: self.dropped,
        }
    }

    pub(super) fn add(&mut self, report: &ShadowReport) {
        let mut counts = self.counts();
        counts.add(&report.counts);
        self.compared = counts.compared;
        self.top1_agreed = counts.top1_agreed;
        self.errors = counts.errors;
        self.abs_diff_sum = counts.abs_diff_sum;
        self.abs_diff_values = counts.abs_diff_values;
        self.dropped = counts.dropped;
        self.parts = self.parts.saturating_add(1);
    }
}

/// A stored shadow record with what it compared and when.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredShadow {
    pub device: [u8; 16],
    pub window_start: u64,
    pub window_end: u64,
    /// The model that served while the target ran in shadow.
    pub active: (String, u64),
    pub record: ShadowRecord,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManifestRecord {
    pub signed: Vec<u8>,
    pub sha256: [u8; 32],
    pub published_at: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RolloutRecord {
    pub sequence: u64,
    pub signed_plan: Vec<u8>,
    pub state: RolloutStateRecord,
    pub stage_index: usize,
    pub stage_started: Vec<u64>,
    pub decisions: Vec<DecisionRecord>,
    pub created: u64,
}

/// A signed retirement as stored, by its plan sequence, with when the hub stored it and whose
/// admin token did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RetirementRecord {
    pub sequence: u64,
    /// The signed retirement, exactly as uploaded: devices verify these bytes.
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
    pub stored_at: u64,
    /// The token name of the operator who uploaded it.
    pub by: String,
}

/// A signed capture allowance as stored, by its model and sequence, with when the hub stored it
/// and whose admin token did.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CaptureAllowanceRecord {
    pub model: String,
    pub sequence: u64,
    /// The signed allowance, exactly as uploaded: devices verify these bytes.
    #[serde(with = "serde_bytes")]
    pub signed: Vec<u8>,
    pub stored_at: u64,
    pub by: String,
}

/// A device's latest runtime report, as stored under its id: which inference runtime serves each
/// model it runs, by the device's word.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeReportRecord {
    /// Device time of the report, Unix seconds: an earlier report does not replace this one.
    pub at: u64,
    /// One per model name, in the order the device listed them.
    pub models: Vec<ModelRuntimeRecord>,
}

/// The runtime serving one model version of a device, as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRuntimeRecord {
    pub name: String,
    pub version: u64,
    /// `tract` or `onnxruntime`, by name as the protocol's `RuntimeKind::as_str` gives it, like
    /// a device's `state`: a runtime the protocol adds later is stored without a new layout.
    pub runtime: String,
    pub runtime_version: String,
    /// ONNX Runtime's execution providers in the order registered; empty for tract.
    pub providers: Vec<String>,
    /// Why the runtime the device preferred does not serve the model; `None` when it does.
    pub fallback: Option<String>,
}

/// A decision as stored: the action, actor and gates by name, so the rollout engine's types can
/// change without making stored rollouts unreadable. Its postcard layout is the one 0.1.0 wrote
/// (then the admin API's own type), checked by `tests/store_compat.rs`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecisionRecord {
    pub at: u64,
    /// `advance`, `pause`, `resume`, `rollback`, `complete`, `superseded`.
    pub action: String,
    /// `engine` or the token name of the operator.
    pub by: String,
    pub stage_index: usize,
    pub reason: String,
    pub figures: Vec<FigureRecord>,
}

/// A gate figure of a stored decision, its gate by name.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FigureRecord {
    pub gate: String,
    pub value: Option<f64>,
    pub limit: f64,
    pub breached: bool,
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AuditRecord {
    pub seq: u64,
    pub at: u64,
    pub actor: String,
    pub action: String,
    pub target: String,
    pub detail: String,
    pub prev_hash: [u8; 32],
    pub hash: [u8; 32],
}

/// Why an enrollment token could not be used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TokenRefusal {
    Unknown,
    Expired,
    UsedUp,
}
