//! Evaluates alert rules against the store and turns their state changes into notifications in
//! the outbox ([`crate::alerts`] decides, `store/alerts.rs` keeps; `webhooks.rs` delivers).
//!
//! Rules are evaluated at two moments: for the models of a telemetry batch, right after the batch
//! is stored (the handler only marks the models and wakes [`evaluator`], so ingest never waits
//! on an evaluation), and every engine tick on the hub holding the engine's lease, so that a
//! hold runs out and an alert whose data ages out of its window resolves without new traffic.
//! Two evaluations of one alert at once (the ingest's and the tick's, or two replicas') are
//! safe: each step is a compare-and-set on the state it started from, with its notifications,
//! in one transaction.

use std::collections::{BTreeSet, HashMap};
use std::sync::Mutex;

use anyhow::Context;
use outpost_protocol::drift::{assess, DriftStatus, FeatureDrift, QualityIssue};
use outpost_protocol::name::selector_matches;
use outpost_protocol::Label;

use super::drift::{self, ProfileLookup, Scope};
use super::SharedHub;
use crate::alerts::payload::{
    self, OutpostPayload, PayloadFeature, PayloadFigure, PayloadRule, TimeRange,
    OUTPOST_PAYLOAD_VERSION,
};
use crate::alerts::state::{self, AlertState, Event, Phase};
use crate::alerts::webhook::Format;
use crate::alerts::{Condition, DriftLevel, QualityKind, MIN_INFERENCES};
use crate::rollout::InferenceStats;
use crate::store::{AlertRuleRecord, AlertStateRecord, OutboxInsert};
use crate::unix_now;

/// What wakes the background tasks: the models whose telemetry arrived since the last
/// evaluation, and the delivery task.
#[derive(Debug, Default)]
pub struct AlertWork {
    touched: Mutex<BTreeSet<String>>,
    evaluate: tokio::sync::Notify,
    /// Woken when the outbox gained notifications.
    pub(super) deliver: tokio::sync::Notify,
}

impl AlertWork {
    /// Marks `models` for evaluation and wakes the evaluator; returns at once.
    pub fn touch(&self, models: impl IntoIterator<Item = String>) {
        if let Ok(mut touched) = self.touched.lock() {
            touched.extend(models);
        }
        self.evaluate.notify_one();
    }

    fn take(&self) -> BTreeSet<String> {
        self.touched
            .lock()
            .map(|mut touched| std::mem::take(&mut *touched))
            .unwrap_or_default()
    }
}

/// The task that evaluates the rules of models whose telemetry arrived, until aborted.
pub async fn evaluator(hub: SharedHub) {
    loop {
        hub.alerts.evaluate.notified().await;
        for model in hub.alerts.take() {
            if let Err(error) = evaluate(&hub, Some(&model)).await {
                log::error!("evaluating the alert rules of {model}: {error:#}");
            }
        }
    }
}

/// Evaluates every rule of `model` (of every model when None) at this moment.
pub async fn evaluate(hub: &SharedHub, model: Option<&str>) -> anyhow::Result<()> {
    evaluate_at(hub, model, unix_now()).await
}

/// [`evaluate`] as at `now`, which the tests move forward.
async fn evaluate_at(hub: &SharedHub, model: Option<&str>, now: u64) -> anyhow::Result<()> {
    let rules = hub.store.alert_rules(model).await?;
    if rules.is_empty() {
        return Ok(());
    }
    let mut sent = false;
    for rule in rules {
        match evaluate_rule(hub, &rule, now).await {
            Ok(events) => sent |= events,
            Err(error) => log::error!("alert rule {}: {error:#}", rule.name),
        }
    }
    if sent {
        hub.store.flush().await?;
        hub.alerts.deliver.notify_one();
    }
    Ok(())
}

/// The published versions of `model`, lowest first.
pub async fn published_versions(hub: &SharedHub, model: &str) -> anyhow::Result<Vec<u64>> {
    Ok(hub
        .store
        .manifests()
        .await?
        .into_iter()
        .filter(|(name, _, _)| name == model)
        .map(|(_, version, _)| version)
        .collect())
}

/// A rule's condition, parsed again from its stored text.
fn condition_of(rule: &AlertRuleRecord) -> anyhow::Result<Condition> {
    Condition::parse(&rule.condition).with_context(|| format!("stored rule {}", rule.name))
}

pub fn selector_of(rule: &AlertRuleRecord) -> Vec<Label> {
    rule.selector
        .iter()
        .map(|(key, value)| Label {
            key: key.clone(),
            value: value.clone(),
        })
        .collect()
}

/// The alert key of a model version.
fn alert_key(model: &str, version: u64) -> String {
    format!("{model}@{version}")
}

fn domain_state(record: &AlertStateRecord) -> AlertState {
    let set = |at: u64| (at != 0).then_some(at);
    AlertState {
        phase: Phase::parse(&record.phase).unwrap_or(Phase::Inactive),
        since: record.since,
        held_since: set(record.held_since),
        firing_since: set(record.firing_since),
    }
}

fn state_record(rule: &str, key: &str, state: &AlertState) -> AlertStateRecord {
    AlertStateRecord {
        rule: rule.to_owned(),
        alert_key: key.to_owned(),
        phase: state.phase.as_str().to_owned(),
        since: state.since,
        held_since: state.held_since.unwrap_or(0),
        firing_since: state.firing_since.unwrap_or(0),
    }
}

/// What an evaluation saw of one model version.
#[derive(Debug, Default)]
struct Observation {
    holds: bool,
    /// Drift and quality: the features involved, most severe first.
    features: Vec<FeatureDrift>,
    figures: Vec<PayloadFigure>,
    summary: String,
}

/// Evaluates one rule on every published version of its model; true when it queued a
/// notification.
async fn evaluate_rule(hub: &SharedHub, rule: &AlertRuleRecord, now: u64) -> anyhow::Result<bool> {
    let condition = condition_of(rule)?;
    let versions = published_versions(hub, &rule.model).await?;
    let states: HashMap<String, AlertStateRecord> = hub
        .store
        .alert_states_of(&rule.name)
        .await?
        .into_iter()
        .map(|state| (state.alert_key.clone(), state))
        .collect();
    let mut sent = false;
    for version in versions {
        let observation = match &condition {
            Condition::Drift(_) | Condition::Quality(_) => {
                observe_drift(hub, rule, &condition, version, now).await?
            }
            Condition::ErrorRate(_) | Condition::LatencyP95(_) => {
                observe_stats(hub, rule, &condition, version, now).await?
            }
        };
        let key = alert_key(&rule.model, version);
        let stored = states.get(&key);
        let previous = stored.map(domain_state);
        let step = state::step(previous.as_ref(), observation.holds, rule.hold_secs, now);
        let Some(next) = step.next else {
            continue;
        };
        let outbox = match &step.event {
            Some(event) => {
                notifications(hub, rule, &condition, version, event, &observation, now).await?
            }
            None => Vec::new(),
        };
        let next_record = state_record(&rule.name, &key, &next);
        if !hub
            .store
            .apply_alert_step(stored, &next_record, &outbox, now)
            .await?
        {
            log::debug!("alert {} {key}: moved by another evaluation", rule.name);
            continue;
        }
        if let Some(event) = step.event {
            log::info!(
                "alert {} {key}: {} ({})",
                rule.name,
                event.kind.as_str(),
                observation.summary
            );
            sent |= !outbox.is_empty();
        }
    }
    Ok(sent)
}

/// The drift scope of a rule at `now`: its label group, over its window.
fn scope_of(rule: &AlertRuleRecord, now: u64) -> Scope {
    Scope {
        selector: selector_of(rule),
        device: None,
        since: now.saturating_sub(rule.window_secs),
    }
}

/// Whether a feature shows what a drift or quality condition looks for.
fn involved(condition: &Condition, feature: &FeatureDrift) -> bool {
    match condition {
        Condition::Drift(level) => {
            let at_least = match level {
                DriftLevel::Warn => DriftStatus::Warn,
                DriftLevel::Alert => DriftStatus::Alert,
            };
            feature.status >= at_least
        }
        Condition::Quality(kind) => feature.quality.iter().any(|issue| {
            matches!(
                (kind, issue),
                (QualityKind::OutOfRange, QualityIssue::OutOfRange { .. })
                    | (QualityKind::Missing, QualityIssue::Missing { .. })
                    | (QualityKind::Nan, QualityIssue::Nan { .. })
            )
        }),
        Condition::ErrorRate(_) | Condition::LatencyP95(_) => false,
    }
}

/// A drift or quality condition on one version: the rule's label group's hourly aggregates over
/// its window, merged and judged against the version's profile. A version without a profile or
/// without data in the window does not hold.
async fn observe_drift(
    hub: &SharedHub,
    rule: &AlertRuleRecord,
    condition: &Condition,
    version: u64,
    now: u64,
) -> anyhow::Result<Observation> {
    let ProfileLookup::Found(loaded) = drift::profile(hub, &rule.model, version).await? else {
        return Ok(Observation::default());
    };
    let history = drift::history(hub, &rule.model, version, &scope_of(rule, now)).await?;
    let Some(merged) = history.merged else {
        return Ok(Observation {
            summary: format!("{}@{version}: no drift summaries in the window", rule.model),
            ..Observation::default()
        });
    };
    let features: Vec<FeatureDrift> = assess(&loaded.profile, &merged)
        .into_iter()
        .filter(|feature| involved(condition, feature))
        .collect();
    let summary = match features.first() {
        Some(worst) => format!(
            "{}@{version}: {} feature(s) {condition}; worst {} {} {:.3} (threshold {:.3}, {})",
            rule.model,
            features.len(),
            worst.name,
            worst.metric,
            worst.value,
            worst.threshold,
            drift::status_name(worst.status)
        ),
        None => format!("{}@{version}: no feature {condition}", rule.model),
    };
    Ok(Observation {
        holds: !features.is_empty(),
        figures: vec![
            PayloadFigure {
                name: "features_involved".to_owned(),
                value: features.len() as f64,
                threshold: None,
            },
            PayloadFigure {
                name: "summaries".to_owned(),
                value: history.summaries as f64,
                threshold: None,
            },
        ],
        features,
        summary,
    })
}

/// An error-rate or latency condition on one version: the hourly inference counters of the label
/// groups the rule's selector matches, summed over its window (the hours ending after `now -
/// window_secs`, as for drift). Errors that have left the window no longer count, so an alert
/// resolves once a burst of them is older than the window, whatever the all-time rate.
async fn observe_stats(
    hub: &SharedHub,
    rule: &AlertRuleRecord,
    condition: &Condition,
    version: u64,
    now: u64,
) -> anyhow::Result<Observation> {
    let scope = scope_of(rule, now);
    let mut stats = InferenceStats::default();
    for hourly in hub
        .store
        .stats_hourly(&rule.model, version, scope.since)
        .await?
    {
        if !selector_matches(&scope.selector, &hourly.labels()) {
            continue;
        }
        stats.merge(&InferenceStats {
            count: hourly.stats.count,
            errors: hourly.stats.errors,
            latency_buckets: hourly.stats.latency_buckets,
        });
    }
    let name = format!("{}@{version}", rule.model);
    let observation = match condition {
        Condition::ErrorRate(limit) => {
            let rate = if stats.count == 0 {
                0.0
            } else {
                stats.errors as f64 / stats.count as f64
            };
            Observation {
                holds: stats.count >= MIN_INFERENCES && rate > *limit,
                figures: vec![
                    figure("error_rate", rate, Some(*limit)),
                    figure("inferences", stats.count as f64, None),
                    figure("errors", stats.errors as f64, None),
                ],
                summary: format!(
                    "{name}: error rate {:.2}% of {} inferences (limit {:.2}%)",
                    rate * 100.0,
                    stats.count,
                    limit * 100.0
                ),
                features: Vec::new(),
            }
        }
        Condition::LatencyP95(limit_us) => {
            let samples = stats.latency_samples();
            let p95 = stats.p95_us();
            let p95_ms = p95.map_or(0.0, |us| us as f64 / 1000.0);
            Observation {
                holds: samples >= MIN_INFERENCES && p95.is_some_and(|us| us > *limit_us),
                figures: vec![
                    figure("latency_p95_ms", p95_ms, Some(*limit_us as f64 / 1000.0)),
                    figure("latency_samples", samples as f64, None),
                ],
                summary: format!(
                    "{name}: p95 latency at most {p95_ms} ms over {samples} timed inferences \
                     (limit {} ms)",
                    *limit_us as f64 / 1000.0
                ),
                features: Vec::new(),
            }
        }
        Condition::Drift(_) | Condition::Quality(_) => Observation::default(),
    };
    Ok(observation)
}

fn figure(name: &str, value: f64, threshold: Option<f64>) -> PayloadFigure {
    PayloadFigure {
        name: name.to_owned(),
        value,
        threshold,
    }
}

fn payload_feature(feature: &FeatureDrift) -> PayloadFeature {
    PayloadFeature {
        name: feature.name.clone(),
        metric: feature.metric.clone(),
        value: feature.value,
        threshold: feature.threshold,
        status: drift::status_name(feature.status).to_owned(),
        quality: feature.quality.iter().map(drift::quality_text).collect(),
    }
}

/// The rule as its payloads describe it.
pub fn payload_rule(rule: &AlertRuleRecord, condition: &Condition) -> PayloadRule {
    PayloadRule {
        name: rule.name.clone(),
        condition: condition.to_string(),
        hold_secs: rule.hold_secs,
        window_secs: rule.window_secs,
        severity: match condition {
            Condition::Drift(DriftLevel::Alert) => "critical",
            _ => "warning",
        }
        .to_owned(),
    }
}

/// The event's notification to each of the rule's webhooks, rendered in its format. A webhook
/// deleted since the rule was made is skipped (deleting one that a rule names is refused).
async fn notifications(
    hub: &SharedHub,
    rule: &AlertRuleRecord,
    condition: &Condition,
    version: u64,
    event: &Event,
    observation: &Observation,
    now: u64,
) -> anyhow::Result<Vec<OutboxInsert>> {
    let key = alert_key(&rule.model, version);
    let idempotency_key = state::idempotency_key(&rule.name, &key, event);
    let scope = scope_of(rule, now);
    let drift_report = match drift::profile(hub, &rule.model, version).await? {
        ProfileLookup::Found(loaded) if condition.reads_drift() => {
            Some(drift::report(hub, &rule.model, version, &loaded, &scope, now).await?)
        }
        _ => None,
    };
    let body = OutpostPayload {
        version: OUTPOST_PAYLOAD_VERSION,
        kind: event.kind.as_str().to_owned(),
        idempotency_key: idempotency_key.clone(),
        at: now,
        rule: payload_rule(rule, condition),
        model: rule.model.clone(),
        model_version: Some(version),
        label_group: scope.selector.iter().map(ToString::to_string).collect(),
        starts_at: event.starts_at,
        ends_at: event.ends_at,
        summary: observation.summary.clone(),
        features: observation.features.iter().map(payload_feature).collect(),
        figures: observation.figures.clone(),
        time_range: TimeRange {
            since: scope.since,
            until: now,
        },
        drift_report,
        samples: Some(crate::alerts::payload::captures_path(
            &rule.model,
            version,
            scope.since,
        )),
    };
    let mut outbox = Vec::new();
    for name in &rule.webhooks {
        let Some(webhook) = hub.store.webhook(name).await? else {
            log::warn!("alert rule {}: webhook {name} no longer exists", rule.name);
            continue;
        };
        let format = Format::parse(&webhook.format).unwrap_or(Format::Outpost);
        outbox.push(OutboxInsert {
            idempotency_key: idempotency_key.clone(),
            webhook: name.clone(),
            kind: event.kind.as_str().to_owned(),
            rule: rule.name.clone(),
            alert_key: key.clone(),
            body: payload::render(&body, format, name).context("encoding a notification")?,
        });
    }
    Ok(outbox)
}

#[cfg(test)]
mod tests {
    // Helpers outside `#[test]` functions unwrap too: any failure there is a test failure.
    #![allow(clippy::unwrap_used)]

    use outpost_protocol::keys::SecretKey;
    use outpost_protocol::trust::{AgentVersion, ManifestBody, Signed};

    use super::*;
    use crate::server::{Hub, ServerConfig};
    use crate::store::{DeviceRecord, ManifestRecord, WindowInput};

    const HOUR: u64 = 3600;

    /// `demo@1` published, as far as evaluation reads it: a manifest without a profile.
    async fn publish_demo(hub: &SharedHub, now: u64) {
        let mut signed = Signed::new(&ManifestBody {
            name: "demo".into(),
            version: 1,
            created: now,
            expires: now + 365 * 24 * HOUR,
            artifacts: Vec::new(),
            inputs: Vec::new(),
            outputs: Vec::new(),
            archs: Vec::new(),
            min_agent_version: AgentVersion::parse("0.1.0").unwrap(),
        })
        .unwrap();
        signed.sign(&SecretKey::from_seed([1; 32]));
        let signed = outpost_protocol::encode(&signed).unwrap();
        let record = ManifestRecord {
            sha256: outpost_protocol::sha256(&signed).0,
            signed,
            published_at: now,
        };
        hub.store.put_manifest("demo", 1, &record).await.unwrap();
    }

    /// An enrolled device labelled `site=<site>`.
    async fn enroll(hub: &SharedHub, id: [u8; 16], site: &str) {
        let key = SecretKey::from_seed([id[0]; 32]).public().0;
        let labels = vec![("site".to_owned(), site.to_owned())];
        hub.store
            .put_device(&DeviceRecord::enrolled_for_tests(id, key, labels))
            .await
            .unwrap();
    }

    /// Stores one hourly window of `demo@1` ending at `end`, as batch `sequence` of `id`.
    async fn report(hub: &SharedHub, id: [u8; 16], sequence: u64, end: u64, counts: (u64, u64)) {
        let device = hub.store.device(&id).await.unwrap().unwrap();
        let window = WindowInput {
            model: "demo".to_owned(),
            version: 1,
            start: end - HOUR,
            end,
            count: counts.0,
            errors: counts.1,
            latency_buckets: Vec::new(),
            drift: None,
            shadow: None,
        };
        let labels = crate::server::fleet::labels_of(&device);
        hub.store
            .ingest_telemetry(&id, &labels, sequence, &[window], 0, end)
            .await
            .unwrap();
    }

    async fn phase(hub: &SharedHub) -> String {
        let states = hub.store.alert_states_of("lab-errors").await.unwrap();
        states.first().map(|state| state.phase.clone()).unwrap()
    }

    /// Issue 26: an error-rate rule judged every inference its label group reported since the
    /// version's first report, whatever its `--window`, so after a burst of errors it stayed
    /// firing long after they stopped. It judges the hours of its window: once the errors are
    /// older than the window it resolves, though the all-time rate is still above the limit.
    /// Errors of devices outside its selector, in the window, do not hold it.
    #[tokio::test]
    async fn an_error_rate_alert_resolves_once_its_errors_leave_the_window() {
        let dir = tempfile::tempdir().unwrap();
        let hub = Hub::open(ServerConfig::for_tests(dir.path(), 300, 30))
            .await
            .unwrap();
        let start = 480_000 * HOUR;
        publish_demo(&hub, start).await;
        let (lab, other) = ([1; 16], [2; 16]);
        enroll(&hub, lab, "lab").await;
        enroll(&hub, other, "other").await;
        hub.store
            .add_alert_rule(&AlertRuleRecord {
                name: "lab-errors".to_owned(),
                model: "demo".to_owned(),
                selector: vec![("site".to_owned(), "lab".to_owned())],
                condition: "error-rate>0.05".to_owned(),
                hold_secs: 0,
                window_secs: HOUR,
                webhooks: Vec::new(),
                created: start,
                created_by: "ops".to_owned(),
            })
            .await
            .unwrap();

        // A burst: half of the lab's inferences of the first hour fail.
        report(&hub, lab, 1, start + HOUR, (200, 100)).await;
        evaluate_at(&hub, Some("demo"), start + HOUR + 60)
            .await
            .unwrap();
        assert_eq!(phase(&hub).await, "firing");

        // Then clean hours in the lab, and a burst elsewhere.
        for hour in 2..=4 {
            report(&hub, lab, hour, start + hour * HOUR, (300, 0)).await;
        }
        report(&hub, other, 1, start + 4 * HOUR, (1000, 500)).await;
        let all_time = hub.store.stats(&lab, "demo", 1).await.unwrap();
        assert_eq!((all_time.count, all_time.errors), (1100, 100));
        // Three hours on, the one-hour window holds the fourth hour alone: 300 inferences, no
        // errors, though 100 of the lab's 1,100 failed in all (9%, above the 5% limit).
        evaluate_at(&hub, Some("demo"), start + 4 * HOUR + 60)
            .await
            .unwrap();
        assert_eq!(phase(&hub).await, "inactive");
    }
}
