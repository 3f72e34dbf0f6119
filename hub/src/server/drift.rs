//! Drift on the hub: the profiles that summaries are judged against, the checks a summary passes
//! before it is stored, and the stored summaries merged per device, label group, model version and
//! time range, for `drift report`, `/metrics` and the rollout engine's drift gate.
//!
//! Fleet-wide figures (`/metrics`, the dashboard's history, a report's features over a label
//! group) read the store's hourly aggregates, one per model version, label group and hour, so
//! their cost does not grow with the fleet; what needs each device (a report's device table, a
//! report or history of one device, the drift gate, which compares devices) reads the per-device
//! rows. [`Scope`] says how the two differ.
//!
//! A model version's profile is the `profile` artifact its signed manifest pins. Manifests never
//! change once published, so a version's profile is read, checked and cached once.

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write;
use std::sync::{Arc, Mutex};

use anyhow::Context;
use outpost_protocol::device::{DeviceId, InferenceWindow};
use outpost_protocol::drift::{
    assess, DriftStatus, DriftSummary, FeatureDrift, Profile, QualityIssue,
};
use outpost_protocol::name::selector_matches;
use outpost_protocol::trust::{Artifact, ArtifactRole, ManifestBody, Signed};
use outpost_protocol::{EncodeError, Label, Message, Sha256};

use super::Hub;
use crate::api::{DeviceDriftInfo, DriftReport, FeatureDriftInfo};
use crate::artifacts::ArtifactStore;
use crate::rollout::RolloutState;
use crate::rollout::{DriftGate, EndedDriftGate, NoDriftGate, Rollout, SummaryDriftGate};
use crate::store::{ManifestRecord, StoredDrift, StoredHourly};

/// How far back `/metrics` looks: the last day.
pub const METRICS_WINDOW_SECS: u64 = 86_400;

/// A model version's drift profile, checked, with the hash of its artifact.
#[derive(Debug)]
pub struct LoadedProfile {
    pub profile: Arc<Profile>,
    pub sha256: Sha256,
}

/// What the hub knows of a model version's profile.
#[derive(Debug, Clone)]
pub enum ProfileLookup {
    /// No manifest of that version is published.
    NotPublished,
    /// The manifest signs no profile.
    NoProfile,
    Found(Arc<LoadedProfile>),
}

/// A published version's profile, or `None` when its manifest signs none; keyed by (model,
/// version).
type ProfileEntries = HashMap<(String, u64), Option<Arc<LoadedProfile>>>;

/// Profiles of published versions, read once. Versions that are not published are not remembered,
/// so a device naming made-up versions cannot grow it.
#[derive(Debug, Default)]
pub struct ProfileCache {
    entries: Mutex<ProfileEntries>,
}

/// Reads and checks the profile artifact `artifact` from the artifact store.
pub async fn read_profile(
    artifacts: &ArtifactStore,
    artifact: &Artifact,
) -> anyhow::Result<Profile> {
    // Checked against its name as it is read.
    let bytes = artifacts
        .read(&artifact.sha256, Profile::MAX_FRAME as u64)
        .await
        .with_context(|| format!("profile artifact {}", artifact.sha256))?;
    let profile: Profile = outpost_protocol::decode(&bytes).with_context(|| {
        format!(
            "profile artifact {} is not a drift profile",
            artifact.sha256
        )
    })?;
    profile.check().with_context(|| {
        format!(
            "profile artifact {} is not a valid drift profile",
            artifact.sha256
        )
    })?;
    Ok(profile)
}

/// The manifest body of a stored manifest, whose signatures were checked when it was published.
fn manifest_body(record: &ManifestRecord) -> anyhow::Result<ManifestBody> {
    let signed: Signed<ManifestBody> =
        outpost_protocol::decode(&record.signed).context("stored manifest is unreadable")?;
    signed
        .decode_unverified()
        .context("stored manifest is unreadable")
}

/// Whether `name@version` was published here. Manifests are never removed, so a version whose
/// profile lookup is cached (as every version a drift summary was checked against is) is known
/// published without asking the store.
pub async fn is_published(hub: &Hub, name: &str, version: u64) -> anyhow::Result<bool> {
    let key = (name.to_owned(), version);
    if lock(&hub.profiles.entries)?.contains_key(&key) {
        return Ok(true);
    }
    Ok(hub.store.has_manifest(name, version).await?)
}

/// The profile of `name@version`, from the cache or read now.
pub async fn profile(hub: &Hub, name: &str, version: u64) -> anyhow::Result<ProfileLookup> {
    let key = (name.to_owned(), version);
    if let Some(entry) = lock(&hub.profiles.entries)?.get(&key) {
        return Ok(match entry {
            Some(loaded) => ProfileLookup::Found(loaded.clone()),
            None => ProfileLookup::NoProfile,
        });
    }
    let Some(record) = hub.store.manifest(name, version).await? else {
        return Ok(ProfileLookup::NotPublished);
    };
    let body = manifest_body(&record).with_context(|| format!("{name}@{version}"))?;
    let loaded = match body
        .artifacts
        .iter()
        .find(|artifact| artifact.role == ArtifactRole::Profile)
    {
        Some(artifact) => Some(Arc::new(LoadedProfile {
            profile: Arc::new(
                read_profile(&hub.artifacts, artifact)
                    .await
                    .with_context(|| format!("loading the profile of {name}@{version}"))?,
            ),
            sha256: artifact.sha256,
        })),
        None => None,
    };
    lock(&hub.profiles.entries)?.insert(key, loaded.clone());
    Ok(match loaded {
        Some(loaded) => ProfileLookup::Found(loaded),
        None => ProfileLookup::NoProfile,
    })
}

fn lock<T>(mutex: &Mutex<T>) -> anyhow::Result<std::sync::MutexGuard<'_, T>> {
    mutex
        .lock()
        .map_err(|_| anyhow::anyhow!("profile cache lock poisoned"))
}

/// Why a telemetry window's drift summary is not stored.
#[derive(Debug, thiserror::Error)]
pub enum SummaryError {
    /// The device sent something the hub will not store; the message says what.
    #[error("{0}")]
    Refused(String),
    /// The hub could not check it.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

/// Checks the drift summary of a telemetry window, if it has one: it is of the window's model
/// version and within its window, that version is published with a profile, and the summary
/// passes [`DriftSummary::validate`] against it (profile hash, counts that add up, finite moments,
/// shapes) and fits its frame. Answers the summary's frame, which the store keeps: `cut`, when
/// the caller cut it from the request ([`outpost_protocol::device::TelemetryBatch::drift_frames`]),
/// or encoded here.
pub async fn check_summary(
    hub: &Hub,
    window: &InferenceWindow,
    cut: Option<Vec<u8>>,
) -> Result<Option<Vec<u8>>, SummaryError> {
    let Some(summary) = &window.drift else {
        return Ok(None);
    };
    let refuse = |message: String| Err(SummaryError::Refused(message));
    if summary.model != window.model || summary.version != window.version {
        return refuse(format!(
            "drift summary is of {}@{}, the window of {}@{}",
            summary.model, summary.version, window.model, window.version
        ));
    }
    if summary.window_start < window.start || summary.window_end > window.end {
        return refuse(format!(
            "drift summary covers {}..{}, outside its window {}..{}",
            summary.window_start, summary.window_end, window.start, window.end
        ));
    }
    let loaded = match profile(hub, &window.model, window.version).await? {
        ProfileLookup::Found(loaded) => loaded,
        ProfileLookup::NotPublished => {
            return refuse(format!(
                "drift summary for {}@{}, which is not published",
                window.model, window.version
            ))
        }
        ProfileLookup::NoProfile => {
            return refuse(format!(
                "drift summary for {}@{}, which has no drift profile",
                window.model, window.version
            ))
        }
    };
    if let Err(error) = summary.validate(&loaded.profile, &loaded.sha256) {
        return refuse(format!("drift summary refused: {error}"));
    }
    let frame = match cut {
        Some(frame) if frame.len() > DriftSummary::MAX_FRAME => Err(EncodeError::TooLarge {
            message: DriftSummary::NAME,
            len: frame.len(),
            max: DriftSummary::MAX_FRAME,
        }),
        Some(frame) => Ok(frame),
        None => outpost_protocol::encode(summary),
    };
    match frame {
        Ok(frame) => Ok(Some(frame)),
        Err(error) => refuse(format!("drift summary refused: {error}")),
    }
}

/// Which devices' summaries a report merges.
///
/// A scope without a device is read from the hourly aggregates the store merges at ingest (one
/// per model version, label group and hour, whatever the number of devices): a label group is in
/// scope when its labels satisfy `selector`. Two things differ from reading each device's rows:
/// an aggregate keeps the labels its devices had when their summaries were stored, and a device
/// revoked since stays in it. Aggregates also begin when the store first had them (its upgrade to
/// schema 3) and are kept for their own retention (`--retain-drift-aggregates`, 400 days), where
/// per-device rows are kept for the telemetry retention. A scope with a device reads that
/// device's rows, with its current record: nothing of a revoked device.
#[derive(Debug, Clone, Default)]
pub struct Scope {
    /// Devices carrying all of these labels; empty for every device.
    pub selector: Vec<Label>,
    /// Only this device.
    pub device: Option<[u8; 16]>,
    /// Summaries of windows ending after this Unix second.
    pub since: u64,
}

/// Each device's stored summaries merged, and how many there were.
type ByDevice = BTreeMap<[u8; 16], (DriftSummary, u64)>;

/// Adds `summary` to `merged`, starting it when empty.
fn merge_into(
    merged: &mut Option<DriftSummary>,
    summary: &DriftSummary,
) -> Result<(), outpost_protocol::drift::DriftError> {
    match merged {
        Some(merged) => merged.merge(summary),
        None => {
            *merged = Some(summary.clone());
            Ok(())
        }
    }
}

/// Every device's labels and whether it is revoked, by id.
type DeviceLabels = HashMap<[u8; 16], (Vec<Label>, bool)>;

async fn device_labels(hub: &Hub) -> anyhow::Result<DeviceLabels> {
    Ok(hub
        .store
        .devices()
        .await?
        .iter()
        .map(|device| (device.id, (super::fleet::labels_of(device), device.revoked)))
        .collect())
}

/// The stored per-device summaries of `name@version` in `scope`, merged per device, by each
/// device's current labels. Revoked devices are left out, and so is a summary that does not merge
/// with its device's others.
async fn by_device(
    hub: &Hub,
    devices: &DeviceLabels,
    name: &str,
    version: u64,
    scope: &Scope,
) -> anyhow::Result<ByDevice> {
    let mut merged = ByDevice::new();
    for stored in hub
        .store
        .drift_summaries(name, version, scope.since)
        .await?
    {
        if !in_scope(devices, scope, &stored) {
            continue;
        }
        let StoredDrift {
            device, summary, ..
        } = stored;
        match merged.entry(device) {
            std::collections::btree_map::Entry::Vacant(vacant) => {
                vacant.insert((summary, 1));
            }
            std::collections::btree_map::Entry::Occupied(mut occupied) => {
                let (merged, count) = occupied.get_mut();
                match merged.merge(&summary) {
                    Ok(()) => *count += 1,
                    Err(error) => log::warn!(
                        "drift: leaving out a summary of {} that does not merge: {error}",
                        hex::encode(device)
                    ),
                }
            }
        }
    }
    Ok(merged)
}

/// True when `stored` belongs to a device of `scope` that is not revoked.
fn in_scope(devices: &DeviceLabels, scope: &Scope, stored: &StoredDrift) -> bool {
    if scope.device.is_some_and(|device| device != stored.device) {
        return false;
    }
    devices
        .get(&stored.device)
        .is_some_and(|(labels, revoked)| !revoked && selector_matches(&scope.selector, labels))
}

/// The hourly aggregates of `name@version` for the hours ending after `scope.since`, of the label
/// groups `scope.selector` matches; `scope.device` is not looked at.
async fn hourly_in_scope(
    hub: &Hub,
    name: &str,
    version: u64,
    scope: &Scope,
) -> anyhow::Result<Vec<StoredHourly>> {
    let mut hours = hub.store.drift_hourly(name, version, scope.since).await?;
    hours.retain(|hourly| selector_matches(&scope.selector, &hourly.labels()));
    Ok(hours)
}

/// The hourly aggregates of `name@version` in `scope`, merged: the merged summary (none without
/// data) and the per-device summaries in it. An aggregate that does not merge with the others is
/// left out.
async fn fleet_merged(
    hub: &Hub,
    name: &str,
    version: u64,
    scope: &Scope,
) -> anyhow::Result<(Option<DriftSummary>, u64)> {
    let mut merged = None;
    let mut summaries = 0;
    for hourly in hourly_in_scope(hub, name, version, scope).await? {
        match merge_into(&mut merged, &hourly.summary) {
            Ok(()) => summaries += hourly.devices,
            Err(error) => log::warn!(
                "drift: leaving out the aggregate of label group {:?} ending {} that does not \
                 merge: {error}",
                hourly.label_group,
                hourly.hour
            ),
        }
    }
    Ok((merged, summaries))
}

/// A model version's summaries in a scope, merged across devices: all of them, and each window's
/// apart, for the dashboard's current histograms and PSI over time.
#[derive(Debug, Default)]
pub struct History {
    /// Every summary in scope merged; none without data.
    pub merged: Option<DriftSummary>,
    /// One merged summary per window end, oldest first.
    pub windows: Vec<DriftSummary>,
    /// Per-device summaries merged in all (one per device and window).
    pub summaries: u64,
}

/// The summaries of `name@version` in `scope`, merged overall and per window end: for a scope
/// without a device, its label groups' hourly aggregates (see [`Scope`] for how they differ
/// from the devices' rows); for one device, its own rows, nothing when it is revoked. A summary
/// that does not merge is left out, as in [`report`].
pub async fn history(
    hub: &Hub,
    name: &str,
    version: u64,
    scope: &Scope,
) -> anyhow::Result<History> {
    let mut history = History::default();
    let mut by_window: BTreeMap<u64, Option<DriftSummary>> = BTreeMap::new();
    if scope.device.is_some() {
        let devices = device_labels(hub).await?;
        for stored in hub
            .store
            .drift_summaries(name, version, scope.since)
            .await?
        {
            if !in_scope(&devices, scope, &stored) {
                continue;
            }
            let window = by_window.entry(stored.window_end).or_default();
            if let Err(error) = merge_into(window, &stored.summary) {
                log::warn!(
                    "drift: leaving out a summary of {} that does not merge: {error}",
                    hex::encode(stored.device)
                );
                continue;
            }
            history.summaries += 1;
        }
    } else {
        // An aggregate's hour is the end of the windows merged into it.
        for hourly in hourly_in_scope(hub, name, version, scope).await? {
            let window = by_window.entry(hourly.hour).or_default();
            if let Err(error) = merge_into(window, &hourly.summary) {
                log::warn!(
                    "drift: leaving out the aggregate of label group {:?} ending {} that does \
                     not merge: {error}",
                    hourly.label_group,
                    hourly.hour
                );
                continue;
            }
            history.summaries += hourly.devices;
        }
    }
    history.windows = by_window.into_values().flatten().collect();
    // The whole range is its windows merged: one merge a window rather than one a summary.
    for window in &history.windows {
        if let Err(error) = merge_into(&mut history.merged, window) {
            log::warn!(
                "drift: leaving out the window ending {} that does not merge: {error}",
                window.window_end
            );
        }
    }
    Ok(history)
}

/// `ok`, `warn` or `alert`.
pub fn status_name(status: DriftStatus) -> &'static str {
    match status {
        DriftStatus::Ok => "ok",
        DriftStatus::Warn => "warn",
        DriftStatus::Alert => "alert",
    }
}

/// 0, 1 or 2, for `/metrics`.
fn status_level(status: DriftStatus) -> u8 {
    match status {
        DriftStatus::Ok => 0,
        DriftStatus::Warn => 1,
        DriftStatus::Alert => 2,
    }
}

pub fn quality_text(issue: &QualityIssue) -> String {
    match issue {
        QualityIssue::Nan { count } => format!("{count} NaN"),
        QualityIssue::Infinite { count } => format!("{count} infinite"),
        QualityIssue::OutOfRange { below, above } => {
            format!("out of the reference's range: {below} below, {above} above")
        }
        QualityIssue::Unseen { count } => format!("{count} of classes the reference never saw"),
        QualityIssue::Missing {
            share,
            reference_share,
        } => format!(
            "{:.1}% missing (reference {:.1}%)",
            share * 100.0,
            reference_share * 100.0
        ),
    }
}

fn feature_info(drift: &FeatureDrift) -> FeatureDriftInfo {
    FeatureDriftInfo {
        name: drift.name.clone(),
        kind: drift.kind.clone(),
        metric: drift.metric.clone(),
        value: drift.value,
        threshold: drift.threshold,
        significant: drift.significant,
        status: status_name(drift.status).to_owned(),
        n: drift.n,
        psi: drift.psi,
        js: drift.js,
        hellinger: drift.hellinger,
        chi_square: drift.chi_square,
        ks: drift.ks,
        quality: drift.quality.iter().map(quality_text).collect(),
        reference_bins: drift.reference_bins.clone(),
        current_bins: drift.current_bins.clone(),
        edges: drift.edges.clone(),
        classes: drift.classes.clone(),
    }
}

/// The drift report of `name@version` over `scope`, judged against `loaded`.
///
/// Its figures (`features`, the window, `summaries`) are, for a scope without a device, its
/// label groups' hourly aggregates merged (see [`Scope`] for how they differ from the devices'
/// rows), and for one device that device's rows. `by_device` and `devices` always come from
/// the devices' rows, by their current labels and without revoked devices, so they reach back
/// only as far as the telemetry retention.
pub async fn report(
    hub: &Hub,
    name: &str,
    version: u64,
    loaded: &LoadedProfile,
    scope: &Scope,
    now: u64,
) -> anyhow::Result<DriftReport> {
    let labels = device_labels(hub).await?;
    let by_device = by_device(hub, &labels, name, version, scope).await?;
    let (merged, summaries) = match scope.device {
        // The scope's one device, if its rows are in scope.
        Some(_) => by_device
            .values()
            .next()
            .map_or((None, 0), |(summary, count)| {
                (Some(summary.clone()), *count)
            }),
        None => fleet_merged(hub, name, version, scope).await?,
    };
    let features = match &merged {
        Some(merged) => assess(&loaded.profile, merged)
            .iter()
            .map(feature_info)
            .collect(),
        None => Vec::new(),
    };
    let mut worst_by_device: Vec<(DriftStatus, DeviceDriftInfo)> = by_device
        .iter()
        .filter_map(|(device, (summary, count))| {
            let worst = assess(&loaded.profile, summary).into_iter().next()?;
            let info = DeviceDriftInfo {
                device: hex::encode(device),
                labels: labels
                    .get(device)
                    .map(|(labels, _)| labels.iter().map(ToString::to_string).collect())
                    .unwrap_or_default(),
                summaries: *count,
                status: status_name(worst.status).to_owned(),
                feature: worst.name,
                metric: worst.metric,
                value: worst.value,
                n: worst.n,
            };
            Some((worst.status, info))
        })
        .collect();
    worst_by_device.sort_by(|(a_status, a), (b_status, b)| {
        b_status
            .cmp(a_status)
            .then_with(|| b.value.total_cmp(&a.value))
    });
    Ok(DriftReport {
        model: name.to_owned(),
        version,
        profile_sha256: loaded.sha256.to_hex(),
        selector: scope.selector.iter().map(ToString::to_string).collect(),
        device: scope.device.map(hex::encode),
        since: scope.since,
        until: now,
        window_start: merged.as_ref().map(|merged| merged.window_start),
        window_end: merged.as_ref().map(|merged| merged.window_end),
        devices: by_device.len() as u64,
        summaries,
        features,
        by_device: worst_by_device.into_iter().map(|(_, info)| info).collect(),
    })
}

/// The drift gate for `rollout`: for a live rollout with a drift limit, each device's summaries
/// of the target and the fallback version since the current stage began; for one that has ended,
/// a gate that lists the limit without measuring it.
pub async fn gate(
    hub: &Hub,
    rollout: &Rollout,
) -> anyhow::Result<Box<dyn DriftGate + Send + Sync>> {
    if rollout.plan.gates.max_drift_psi.is_none() {
        return Ok(Box::new(NoDriftGate));
    }
    if !matches!(rollout.state, RolloutState::Active | RolloutState::Paused) {
        return Ok(Box::new(EndedDriftGate));
    }
    let mut gate = SummaryDriftGate::default();
    let since = rollout.current_stage_started();
    let target = &rollout.plan.target;
    if let ProfileLookup::Found(loaded) = profile(hub, &target.name, target.version).await? {
        gate.target_profile = Some(loaded.profile.clone());
        gate.target = per_device(
            hub.store
                .drift_summaries(&target.name, target.version, since)
                .await?,
        );
    }
    if let Some(fallback) = &rollout.plan.fallback {
        if let ProfileLookup::Found(loaded) = profile(hub, &fallback.name, fallback.version).await?
        {
            gate.fallback_profile = Some(loaded.profile.clone());
            gate.fallback = per_device(
                hub.store
                    .drift_summaries(&fallback.name, fallback.version, since)
                    .await?,
            );
        }
    }
    Ok(Box::new(gate))
}

/// Stored summaries merged per device.
fn per_device(stored: Vec<StoredDrift>) -> HashMap<DeviceId, DriftSummary> {
    let mut merged: HashMap<DeviceId, DriftSummary> = HashMap::new();
    for StoredDrift {
        device, summary, ..
    } in stored
    {
        match merged.entry(DeviceId(device)) {
            std::collections::hash_map::Entry::Vacant(vacant) => {
                vacant.insert(summary);
            }
            std::collections::hash_map::Entry::Occupied(mut occupied) => {
                if let Err(error) = occupied.get_mut().merge(&summary) {
                    log::warn!(
                        "drift gate: leaving out a summary of {} that does not merge: {error}",
                        hex::encode(device)
                    );
                }
            }
        }
    }
    merged
}

/// Escapes a Prometheus label value: backslash, double quote and newline.
pub(super) fn label_value(text: &str) -> String {
    let mut escaped = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '\\' => escaped.push_str("\\\\"),
            '"' => escaped.push_str("\\\""),
            '\n' => escaped.push_str("\\n"),
            c => escaped.push(c),
        }
    }
    escaped
}

/// Features of each model version that `/metrics` names: its most drifted ones. Every other
/// feature is only counted, so a model's series stay bounded whatever its width.
pub const METRICS_WORST_FEATURES: usize = 5;

/// Writes the drift of every published version with a profile over the last day, every label
/// group's hourly aggregates merged (devices revoked since included, see [`Scope`]), in at most 4 + 3 × [`METRICS_WORST_FEATURES`] series per version:
/// `outpost_hub_drift_model_status` (its worst feature's status: 0 ok, 1 warn, 2 alert),
/// `outpost_hub_drift_features` (how many features have each status), and for its most drifted
/// features `outpost_hub_drift_status`, `outpost_hub_drift_value` (the metric the status is
/// judged on) and `outpost_hub_drift_samples`.
pub async fn write_metrics(hub: &Hub, now: u64, out: &mut String) -> anyhow::Result<()> {
    let scope = Scope {
        since: now.saturating_sub(METRICS_WINDOW_SECS),
        ..Scope::default()
    };
    // Each version's features, most severe first (as `assess` orders them).
    let mut versions: Vec<(String, u64, Vec<FeatureDrift>)> = Vec::new();
    for (name, version, _) in hub.store.manifests().await? {
        // One unreadable profile must not take every other metric down with it.
        let loaded = match profile(hub, &name, version).await {
            Ok(ProfileLookup::Found(loaded)) => loaded,
            Ok(ProfileLookup::NotPublished | ProfileLookup::NoProfile) => continue,
            Err(error) => {
                log::error!("drift metrics of {name}@{version}: {error:#}");
                continue;
            }
        };
        let (Some(merged), _) = fleet_merged(hub, &name, version, &scope).await? else {
            continue;
        };
        let drifts = assess(&loaded.profile, &merged);
        if !drifts.is_empty() {
            versions.push((name, version, drifts));
        }
    }
    let model =
        |name: &str, version: u64| format!("model=\"{}\",version=\"{version}\"", label_value(name));
    writeln!(
        out,
        "# HELP outpost_hub_drift_model_status Drift status of each model version over the last \
         day, its most drifted feature's: 0 ok, 1 warn, 2 alert."
    )?;
    writeln!(out, "# TYPE outpost_hub_drift_model_status gauge")?;
    for (name, version, drifts) in &versions {
        let worst = drifts.iter().map(|drift| drift.status).max();
        writeln!(
            out,
            "outpost_hub_drift_model_status{{{}}} {}",
            model(name, *version),
            worst.map_or(0, status_level)
        )?;
    }
    writeln!(
        out,
        "# HELP outpost_hub_drift_features Features and class outputs of each model version by \
         drift status over the last day."
    )?;
    writeln!(out, "# TYPE outpost_hub_drift_features gauge")?;
    for (name, version, drifts) in &versions {
        for status in [DriftStatus::Ok, DriftStatus::Warn, DriftStatus::Alert] {
            let count = drifts.iter().filter(|drift| drift.status == status).count();
            writeln!(
                out,
                "outpost_hub_drift_features{{{},status=\"{}\"}} {count}",
                model(name, *version),
                status_name(status)
            )?;
        }
    }
    let worst: Vec<(&str, u64, &FeatureDrift)> = versions
        .iter()
        .flat_map(|(name, version, drifts)| {
            drifts
                .iter()
                .take(METRICS_WORST_FEATURES)
                .map(move |drift| (name.as_str(), *version, drift))
        })
        .collect();
    let labels = |name: &str, version: u64, drift: &FeatureDrift| {
        format!(
            "{},feature=\"{}\"",
            model(name, version),
            label_value(&drift.name)
        )
    };
    writeln!(
        out,
        "# HELP outpost_hub_drift_status Drift status over the last day of each model version's \
         {METRICS_WORST_FEATURES} most drifted features: 0 ok, 1 warn, 2 alert."
    )?;
    writeln!(out, "# TYPE outpost_hub_drift_status gauge")?;
    for (name, version, drift) in &worst {
        writeln!(
            out,
            "outpost_hub_drift_status{{{}}} {}",
            labels(name, *version, drift),
            status_level(drift.status)
        )?;
    }
    writeln!(
        out,
        "# HELP outpost_hub_drift_value Drift metric over the last day of each model version's \
         most drifted features: PSI for numeric features, Jensen-Shannon distance for class \
         outputs."
    )?;
    writeln!(out, "# TYPE outpost_hub_drift_value gauge")?;
    for (name, version, drift) in &worst {
        writeln!(
            out,
            "outpost_hub_drift_value{{{},metric=\"{}\"}} {}",
            labels(name, *version, drift),
            label_value(&drift.metric),
            drift.value
        )?;
    }
    writeln!(
        out,
        "# HELP outpost_hub_drift_samples Values counted over the last day of each model \
         version's most drifted features."
    )?;
    writeln!(out, "# TYPE outpost_hub_drift_samples gauge")?;
    for (name, version, drift) in &worst {
        writeln!(
            out,
            "outpost_hub_drift_samples{{{}}} {}",
            labels(name, *version, drift),
            drift.n
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::label_value;

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(label_value("x[0]"), "x[0]");
        assert_eq!(label_value("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
