//! The three check-in paths: `/device/v1/checkin` ([`check_in`]), `/device/v2/checkin`
//! ([`held_check_in`], naming what the device holds) and `/device/v3/checkin`
//! ([`models_check_in`], one entry per model), and everything only they use: the answer for an
//! agent of one model ([`rollout_for_one_model`]) and per model ([`latest_per_model`]),
//! retirements included, the documents one rollout hands one device ([`Documents`]), the poll
//! interval ([`poll_after`]) and what a check-in writes into the device's record ([`Reported`]).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::State;
use axum::http::{HeaderMap, Method, Uri};
use axum::response::Response;
use outpost_protocol::device::{
    held_digest, AgentState, CheckIn, CheckInResponse, DeviceId, HeldCheckIn, HeldCheckInResponse,
    ModelAnswer, ModelCheckIn, ModelsCheckIn, ModelsCheckInResponse, RunningModel,
    MAX_DEVICE_MODELS,
};
use outpost_protocol::trust::Slot;
use outpost_protocol::{Label, ModelName, Sha256};
use serde_bytes::ByteBuf;

use super::request::{authenticate, reply, DeviceError, Kept};
use crate::rollout::RolloutState;
use crate::server::engine::{Document, Live, LiveRetirement, LiveRollout};
use crate::server::fleet::{labels_of, DeviceState};
use crate::server::metrics::Metrics;
use crate::server::SharedHub;
use crate::store::{DeviceRead, DeviceRecord, RunningRecord};
use crate::unix_now;

pub(super) async fn check_in(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let read = authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let report: CheckIn = outpost_protocol::decode(&body)?;
    reply(&answer_check_in(&hub, read, &report).await?.into_response())
}

/// A check-in naming what the device holds: when the answer would hand it the very documents it
/// holds, for the same slot, and no newer root, it gets only the hub time and the poll interval
/// and applies its held documents again. An older agent keeps using `/device/v1/checkin`.
pub(super) async fn held_check_in(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let read = authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let request: HeldCheckIn = outpost_protocol::decode(&body)?;
    let answer = answer_check_in(&hub, read, &request.check_in).await?;
    if request.held.is_some() && answer.roots.is_empty() && answer.held_digest() == request.held {
        Metrics::bump(&hub.metrics.check_ins_unchanged, 1);
        return reply(&HeldCheckInResponse::Unchanged {
            hub_time: answer.hub_time,
            poll_after_secs: answer.poll_after_secs,
        });
    }
    reply(&HeldCheckInResponse::Full(answer.into_response()))
}

/// A check-in from an agent that runs several models side by side, one entry per model. Each
/// model name is answered on its own, by the latest signed word about that model that applies to
/// the device ([`latest_per_model`]): its latest live rollout, or a retirement of it signed
/// later, which is sent alone, with no manifest. Each is "unchanged" when the device holds
/// exactly its documents, for the same slot, and there is no newer root, else sent in full. A
/// model the device runs with neither gets no entry, and the device keeps running it. The poll
/// interval is short while any of those rollouts is active or paused; a retirement never
/// shortens it.
///
/// `check_ins_unchanged` counts a check-in all of whose entries (one at least) are unchanged, as
/// it counts a held check-in answered "unchanged": both mean the hub sent no document.
pub(super) async fn models_check_in(
    State(hub): State<SharedHub>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, DeviceError> {
    let body = body?;
    let read = authenticate(&hub, &method, &uri, &headers, &body, Kept::InMemory).await?;
    let request: ModelsCheckIn = outpost_protocol::decode(&body)?;
    check_models(&request.models).map_err(DeviceError::bad_request)?;
    let now = unix_now();
    let device = record_check_in(&hub, read, now, &Reported::of_models(&request)).await?;
    let roots = roots_after(&hub, request.root_version).await?;
    let labels = labels_of(&device);
    let live = live_cache(&hub)?;
    let reported: Vec<&str> = request
        .models
        .iter()
        .map(|entry| entry.name.as_str())
        .collect();
    let latest = latest_per_model(&live, &labels, &reported);
    let models: Vec<ModelAnswer> = latest
        .iter()
        .map(|word| {
            let name = word.model();
            let documents = match word {
                Latest::Rollout(rollout) => Documents::for_device(rollout, &device, &labels),
                Latest::Retired(retirement) => Documents::retirement(retirement),
            };
            let held = request
                .models
                .iter()
                .find(|entry| entry.name == name)
                .and_then(|entry| entry.held);
            if roots.is_empty() && held == Some(documents.held_digest()) {
                ModelAnswer::Unchanged {
                    name: name.to_owned(),
                }
            } else {
                documents.into_model_answer()
            }
        })
        .collect();
    let rollouts: Vec<&LiveRollout> = latest.iter().filter_map(Latest::rollout).collect();
    Metrics::bump(&hub.metrics.check_ins, 1);
    if !models.is_empty()
        && models
            .iter()
            .all(|answer| matches!(answer, ModelAnswer::Unchanged { .. }))
    {
        Metrics::bump(&hub.metrics.check_ins_unchanged, 1);
    }
    reply(&ModelsCheckInResponse {
        hub_time: now,
        roots,
        poll_after_secs: poll_after(&hub, &rollouts),
        models,
    })
}

/// Why a models check-in is refused, if it is: more entries than a device may run models, an
/// entry whose name is no model name, two entries of one name, or an entry whose active model
/// is another model than the one it names.
fn check_models(models: &[ModelCheckIn]) -> Result<(), String> {
    if models.len() > MAX_DEVICE_MODELS {
        return Err(format!(
            "check-in names {} models, at most {MAX_DEVICE_MODELS} are accepted",
            models.len()
        ));
    }
    for (index, entry) in models.iter().enumerate() {
        ModelName::new(&entry.name)
            .map_err(|error| format!("model entry {index}: name {:?}: {error}", entry.name))?;
        if models[..index]
            .iter()
            .any(|earlier| earlier.name == entry.name)
        {
            return Err(format!(
                "model {:?} has two entries: one entry per model",
                entry.name
            ));
        }
        if let Some(active) = entry.active.as_ref().filter(|a| a.name != entry.name) {
            return Err(format!(
                "the entry of model {:?} runs model {:?}: an entry's active model is the \
                 model it names",
                entry.name, active.name
            ));
        }
    }
    Ok(())
}

/// A check-in's answer before it is encoded: the signed documents stay shared, and their digests
/// are the ones worked out when the rollout cache was built.
struct Answer {
    hub_time: u64,
    roots: Vec<ByteBuf>,
    documents: Option<Documents>,
    poll_after_secs: u32,
}

impl Answer {
    /// [`CheckInResponse::held_digest`] of the response this answer becomes, without hashing the
    /// documents again.
    fn held_digest(&self) -> Option<Sha256> {
        self.documents.as_ref().map(Documents::held_digest)
    }

    fn into_response(self) -> CheckInResponse {
        let (plan, manifest, shadow) = match self.documents {
            Some(documents) => (
                Some(bytes_of(documents.plan)),
                documents
                    .manifest
                    .map(|(slot, document)| (slot, bytes_of(document))),
                documents.shadow.map(bytes_of),
            ),
            None => (None, None, None),
        };
        CheckInResponse {
            hub_time: self.hub_time,
            roots: self.roots,
            plan,
            manifest,
            poll_after_secs: self.poll_after_secs,
            shadow,
        }
    }
}

/// What one rollout hands one device: its signed plan, the manifest of the device's slot and
/// any shadow manifest, shared from the rollout cache with their digests. Or, for a retired
/// model, the signed retirement in the plan's place, alone.
struct Documents {
    plan: Document,
    manifest: Option<(Slot, Document)>,
    shadow: Option<Document>,
}

impl Documents {
    /// The documents `rollout` hands `device`: the manifest of its slot, unless its agent is too
    /// old for the target (then the fallback's, or none), and the target in shadow when the
    /// device is in the plan's shadow stage. Every check-in path answers a rollout with this.
    fn for_device(rollout: &LiveRollout, device: &DeviceRecord, labels: &[Label]) -> Documents {
        let id = DeviceId(device.id);
        let too_old =
            crate::server::engine::agent_too_old(&device.agent_version, rollout.target_min_agent);
        let slot = crate::rollout::slot_for(&rollout.rollout, &id, labels);
        let manifest = match crate::rollout::offered(&rollout.rollout, slot, too_old) {
            Some(Slot::Target) => Some((Slot::Target, rollout.target_manifest.clone())),
            Some(Slot::Fallback) => rollout
                .fallback_manifest
                .clone()
                .map(|document| (Slot::Fallback, document)),
            None => None,
        };
        let shadow = (!too_old && crate::rollout::shadow_for(&rollout.rollout, &id, labels))
            .then(|| rollout.target_manifest.clone());
        Documents {
            plan: rollout.signed_plan.clone(),
            manifest,
            shadow,
        }
    }

    /// A retirement's documents: its signed bytes where a plan goes, no manifest, no shadow.
    fn retirement(retirement: &LiveRetirement) -> Documents {
        Documents {
            plan: retirement.signed.clone(),
            manifest: None,
            shadow: None,
        }
    }

    /// The protocol's [`held_digest`] of these documents, from the digests the rollout cache
    /// worked out.
    fn held_digest(&self) -> Sha256 {
        held_digest(
            &self.plan.sha256,
            self.manifest
                .as_ref()
                .map(|(slot, document)| (*slot, &document.sha256)),
            self.shadow.as_ref().map(|document| &document.sha256),
        )
    }

    fn into_model_answer(self) -> ModelAnswer {
        ModelAnswer::Full {
            plan: bytes_of(self.plan),
            manifest: self
                .manifest
                .map(|(slot, document)| (slot, bytes_of(document))),
            shadow: self.shadow.map(bytes_of),
        }
    }
}

fn bytes_of(document: Document) -> ByteBuf {
    ByteBuf::from(document.bytes.as_ref().clone())
}

/// The rollout a device that runs one model follows (`/device/v1` and `/device/v2` check-ins):
/// the latest live rollout that applies to it and whose target is the model it runs, so that
/// another model's rollout never switches it off its model; when it runs none yet, the latest
/// that applies of a model not retired for it since. Such an agent cannot read a retirement, so
/// it is never sent one: one running a retired model keeps it, under that model's latest plan.
fn rollout_for_one_model<'a>(
    live: &'a Live,
    labels: &[Label],
    running: Option<&str>,
) -> Option<&'a LiveRollout> {
    live.rollouts.iter().rev().find(|rollout| {
        let name = rollout.rollout.plan.target.name.as_str();
        rollout.applies_to(labels)
            && match running {
                Some(running) => name == running,
                None => !live.retirements.iter().any(|retirement| {
                    retirement.model == name
                        && retirement.sequence > rollout.sequence
                        && retirement.applies_to(labels)
                }),
            }
    })
}

/// The latest signed word about one model for one device: a rollout's plan, or a retirement.
#[derive(Debug, Clone, Copy)]
enum Latest<'a> {
    Rollout(&'a LiveRollout),
    Retired(&'a LiveRetirement),
}

impl<'a> Latest<'a> {
    /// Its place in the plan sequence that rollouts and retirements share.
    fn sequence(&self) -> u64 {
        match self {
            Latest::Rollout(rollout) => rollout.sequence,
            Latest::Retired(retirement) => retirement.sequence,
        }
    }

    /// The model it is about: a plan's target name, or the model a retirement names.
    fn model(&self) -> &'a str {
        match self {
            Latest::Rollout(rollout) => &rollout.rollout.plan.target.name,
            Latest::Retired(retirement) => &retirement.model,
        }
    }

    fn rollout(&self) -> Option<&'a LiveRollout> {
        match self {
            Latest::Rollout(rollout) => Some(rollout),
            Latest::Retired(_) => None,
        }
    }
}

/// What a device that runs several models follows (`/device/v3`): per model name, the latest
/// (highest sequence) of the live rollouts of that model (its plans' target name) and the
/// retirements of it that apply to the device, sorted by name. So a retirement takes over from
/// the model's rollouts before it, and a rollout signed after it brings the model back. A device
/// is answered about at most [`MAX_DEVICE_MODELS`] models, retired ones included: those it
/// `reported` first, then the others by name.
fn latest_per_model<'a>(live: &'a Live, labels: &[Label], reported: &[&str]) -> Vec<Latest<'a>> {
    let rollouts = live
        .rollouts
        .iter()
        .filter(|rollout| rollout.applies_to(labels))
        .map(Latest::Rollout);
    let retirements = live
        .retirements
        .iter()
        .filter(|retirement| retirement.applies_to(labels))
        .map(Latest::Retired);
    let mut latest: BTreeMap<&str, Latest<'a>> = BTreeMap::new();
    for word in rollouts.chain(retirements) {
        latest
            .entry(word.model())
            .and_modify(|kept| {
                if word.sequence() > kept.sequence() {
                    *kept = word;
                }
            })
            .or_insert(word);
    }
    if latest.len() > MAX_DEVICE_MODELS {
        // A check-in names at most as many models as an answer may carry, so they all fit.
        let (mut kept, others): (Vec<&str>, Vec<&str>) =
            latest.keys().partition(|name| reported.contains(name));
        kept.extend(others);
        kept.truncate(MAX_DEVICE_MODELS);
        latest.retain(|name, _| kept.contains(name));
    }
    latest.into_values().collect()
}

/// How long a device waits before it checks in again: briefly while one of the `rollouts` it
/// follows is active or paused, so that it follows their stages, and the quiet interval
/// otherwise.
fn poll_after(hub: &SharedHub, rollouts: &[&LiveRollout]) -> u32 {
    let moving = rollouts.iter().any(|rollout| {
        matches!(
            rollout.rollout.state,
            RolloutState::Active | RolloutState::Paused
        )
    });
    if moving {
        hub.config.rollout_poll_secs
    } else {
        hub.config.poll_secs
    }
}

/// What a check-in says of its device, whichever path it came by: the fields of the device
/// record a check-in refreshes.
#[derive(Debug, Clone)]
struct Reported {
    state: AgentState,
    agent_version: String,
    queue_bytes: u64,
    plan_sequence: Option<u64>,
    active: Option<RunningRecord>,
    models: Vec<RunningRecord>,
    several_models: bool,
}

impl Reported {
    /// A single-model agent's check-in: its active model is the only one it runs.
    fn of_one(report: &CheckIn) -> Reported {
        let active = report.active.as_ref().map(running_record);
        Reported {
            state: report.state,
            agent_version: report.agent_version.to_string(),
            queue_bytes: report.queue_bytes,
            plan_sequence: report.plan_sequence,
            models: active.iter().cloned().collect(),
            active,
            several_models: false,
        }
    }

    /// A models check-in: every entry's active model, sorted by name; as `active` the first
    /// entry's that runs one (the agent's first model, the one it names when it falls back to a
    /// held check-in); and the highest plan sequence of any entry.
    fn of_models(request: &ModelsCheckIn) -> Reported {
        let mut models: Vec<RunningRecord> = request
            .models
            .iter()
            .filter_map(|entry| entry.active.as_ref().map(running_record))
            .collect();
        let active = models.first().cloned();
        models.sort_by(|a, b| a.name.cmp(&b.name));
        Reported {
            state: request.state,
            agent_version: request.agent_version.to_string(),
            queue_bytes: request.queue_bytes,
            plan_sequence: request
                .models
                .iter()
                .filter_map(|entry| entry.plan_sequence)
                .max(),
            active,
            models,
            several_models: true,
        }
    }
}

fn running_record(running: &RunningModel) -> RunningRecord {
    RunningRecord {
        name: running.name.clone(),
        version: running.version,
        manifest_sha256: running.manifest_sha256.0,
    }
}

/// Writes what a check-in reported into the device's record, and returns the record.
async fn record_check_in(
    hub: &SharedHub,
    read: DeviceRead,
    now: u64,
    reported: &Reported,
) -> Result<DeviceRecord, DeviceError> {
    // Check-in state is refreshed by the next check-in, so it is not flushed on its own: the store
    // flushes on a short timer and before every acknowledged write.
    hub.store
        .update_device(read, |device| {
            device.last_checkin = Some(now);
            device.state = DeviceState::reported(reported.state).as_str().to_owned();
            device.active = reported.active.clone();
            device.models = reported.models.clone();
            device.several_models = reported.several_models;
            device.plan_sequence = reported.plan_sequence;
            device.agent_version = reported.agent_version.clone();
            device.queue_bytes = reported.queue_bytes;
        })
        .await?
        .ok_or_else(|| DeviceError::internal("the device's record vanished during its check-in"))
}

/// Signed roots newer than `version`, oldest first.
async fn roots_after(hub: &SharedHub, version: u64) -> Result<Vec<ByteBuf>, DeviceError> {
    Ok(hub
        .store
        .roots_after(version)
        .await?
        .into_iter()
        .map(|(_, bytes)| ByteBuf::from(bytes))
        .collect())
}

fn live_cache(hub: &SharedHub) -> Result<Arc<Live>, DeviceError> {
    Ok(hub
        .live
        .read()
        .map_err(|_| DeviceError::internal("rollout cache lock poisoned"))?
        .clone())
}

/// Records a single-model check-in and works out its full answer: roots newer than the
/// device's, the plan of [`rollout_for_one_model`] with the manifest of the device's slot and
/// any shadow manifest, and when to come back ([`poll_after`]).
async fn answer_check_in(
    hub: &SharedHub,
    read: DeviceRead,
    report: &CheckIn,
) -> Result<Answer, DeviceError> {
    let now = unix_now();
    let device = record_check_in(hub, read, now, &Reported::of_one(report)).await?;
    let roots = roots_after(hub, report.root_version).await?;
    let labels = labels_of(&device);
    let live = live_cache(hub)?;
    let running = report.active.as_ref().map(|active| active.name.as_str());
    let rollout = rollout_for_one_model(&live, &labels, running);
    Metrics::bump(&hub.metrics.check_ins, 1);
    Ok(Answer {
        hub_time: now,
        roots,
        documents: rollout.map(|rollout| Documents::for_device(rollout, &device, &labels)),
        poll_after_secs: poll_after(hub, rollout.as_slice()),
    })
}

#[cfg(test)]
mod tests;
