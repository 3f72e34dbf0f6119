//! What webhook receivers are sent: Outpost's own JSON ([`OutpostPayload`], documented in
//! docs/operations.md, "Alerts and webhooks") or the JSON Alertmanager's webhook receiver sends
//! ([`AlertmanagerPayload`], version "4"), so anything that takes Alertmanager's webhooks takes
//! the hub's. These are a promise to receivers: fields are added, never renamed or removed, and
//! `version` says which form a body is.
//!
//! A body is rendered once, when its event is put in the outbox, and every attempt sends those
//! exact bytes, so a receiver sees one signature and one body per event.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::api::DriftReport;

/// The version of [`OutpostPayload`] this hub writes.
pub const OUTPOST_PAYLOAD_VERSION: u32 = 1;

/// Outpost's own payload: everything a retraining pipeline needs to start on a drifting model.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutpostPayload {
    /// [`OUTPOST_PAYLOAD_VERSION`].
    pub version: u32,
    /// `firing`, `resolved` or `test`.
    pub kind: String,
    /// The same on every copy of this event, and different for any other event.
    pub idempotency_key: String,
    /// When the hub decided the event, Unix seconds.
    pub at: u64,
    pub rule: PayloadRule,
    pub model: String,
    /// The model version the alert is about (none for a test message).
    pub model_version: Option<u64>,
    /// The rule's label group (`key=value`); empty for every device.
    pub label_group: Vec<String>,
    /// When the alert started firing, Unix seconds.
    pub starts_at: u64,
    /// When it resolved; none while firing.
    pub ends_at: Option<u64>,
    /// One line for a human.
    pub summary: String,
    /// The features and outputs involved (drift and quality conditions), most severe first.
    pub features: Vec<PayloadFeature>,
    /// The figures the condition was judged on.
    pub figures: Vec<PayloadFigure>,
    /// The data judged: windows ending after `since` up to `until`, Unix seconds.
    pub time_range: TimeRange,
    /// The drift report over the rule's label group and window, as `outpost-hub drift report
    /// --json` prints it (drift and quality conditions on a version with a profile).
    pub drift_report: Option<DriftReport>,
    /// Where captured samples of the model version are: the admin API path that lists those
    /// received since the time range began (an admin token reads it; `capture download` and
    /// `capture open` take it from there). Null in a test message, which is about no model.
    pub samples: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayloadRule {
    pub name: String,
    /// As written: `drift>=warn`, `error-rate>0.05`, ...
    pub condition: String,
    /// How long the condition had to hold, seconds.
    pub hold_secs: u64,
    /// How far back the condition looks, seconds.
    pub window_secs: u64,
    /// `warning` or `critical` (a `drift>=alert` rule).
    pub severity: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayloadFeature {
    pub name: String,
    /// `psi` for numeric features, `js` for class outputs.
    pub metric: String,
    pub value: f64,
    pub threshold: f64,
    /// `ok`, `warn` or `alert`.
    pub status: String,
    /// Data-quality facts, as `drift report` words them.
    pub quality: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PayloadFigure {
    /// `error_rate`, `latency_p95_ms`, `inferences`, `errors`, `drift_features`, ...
    pub name: String,
    pub value: f64,
    /// The rule's threshold for this figure, when it has one.
    pub threshold: Option<f64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TimeRange {
    pub since: u64,
    pub until: u64,
}

/// The JSON Alertmanager's webhook receiver sends, version "4": one group of one alert.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerPayload {
    pub version: String,
    pub group_key: String,
    pub truncated_alerts: u64,
    /// `firing` or `resolved`.
    pub status: String,
    /// The webhook's name.
    pub receiver: String,
    pub group_labels: BTreeMap<String, String>,
    pub common_labels: BTreeMap<String, String>,
    pub common_annotations: BTreeMap<String, String>,
    #[serde(rename = "externalURL")]
    pub external_url: String,
    pub alerts: Vec<AlertmanagerAlert>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct AlertmanagerAlert {
    pub status: String,
    pub labels: BTreeMap<String, String>,
    pub annotations: BTreeMap<String, String>,
    /// RFC 3339.
    pub starts_at: String,
    /// RFC 3339; Alertmanager's zero time while firing.
    pub ends_at: String,
    #[serde(rename = "generatorURL")]
    pub generator_url: String,
    pub fingerprint: String,
}

impl OutpostPayload {
    /// The message `outpost-hub webhook test` sends to the webhook `receiver`: kind `test`, about
    /// no model, with an idempotency key of its own.
    pub fn test(receiver: &str, now_ms: u64) -> OutpostPayload {
        let now = now_ms / 1000;
        OutpostPayload {
            version: OUTPOST_PAYLOAD_VERSION,
            kind: "test".to_owned(),
            idempotency_key: format!("outpost-test-{receiver}-{now_ms}"),
            at: now,
            rule: PayloadRule {
                name: "test".to_owned(),
                condition: String::new(),
                hold_secs: 0,
                window_secs: 0,
                severity: "warning".to_owned(),
            },
            model: String::new(),
            model_version: None,
            label_group: Vec::new(),
            starts_at: now,
            ends_at: None,
            summary: format!("a test message to webhook {receiver} from outpost-hub"),
            features: Vec::new(),
            figures: Vec::new(),
            time_range: TimeRange {
                since: now,
                until: now,
            },
            drift_report: None,
            samples: None,
        }
    }
}

/// The admin API path listing the captured samples of `model` `version` received since `since`.
pub fn captures_path(model: &str, version: u64, since: u64) -> String {
    format!("/admin/v1/captures?model={model}&version={version}&since={since}")
}

/// Alertmanager's "not ended" time.
const ZERO_TIME: &str = "0001-01-01T00:00:00Z";

fn rfc3339(at: u64) -> String {
    humantime::format_rfc3339_seconds(UNIX_EPOCH + Duration::from_secs(at)).to_string()
}

impl AlertmanagerPayload {
    /// The Alertmanager form of an Outpost payload, for the webhook named `receiver`. Labels:
    /// `alertname` (the rule), `model`, `version`, `severity` and the label group's labels;
    /// annotations: `summary`, `condition` and `idempotency_key`.
    pub fn from_outpost(payload: &OutpostPayload, receiver: &str) -> AlertmanagerPayload {
        let status = if payload.kind == "resolved" {
            "resolved"
        } else {
            "firing"
        };
        let mut labels = BTreeMap::new();
        for label in &payload.label_group {
            if let Some((key, value)) = label.split_once('=') {
                labels.insert(key.to_owned(), value.to_owned());
            }
        }
        labels.insert("alertname".to_owned(), payload.rule.name.clone());
        labels.insert("model".to_owned(), payload.model.clone());
        if let Some(version) = payload.model_version {
            labels.insert("version".to_owned(), version.to_string());
        }
        labels.insert("severity".to_owned(), payload.rule.severity.clone());
        let annotations = BTreeMap::from([
            ("summary".to_owned(), payload.summary.clone()),
            ("condition".to_owned(), payload.rule.condition.clone()),
            (
                "idempotency_key".to_owned(),
                payload.idempotency_key.clone(),
            ),
        ]);
        let label_text: Vec<String> = labels.iter().map(|(k, v)| format!("{k}={v:?}")).collect();
        let fingerprint = &outpost_protocol::sha256(label_text.join(",").as_bytes()).to_hex()[..16];
        let group_labels = BTreeMap::from([("alertname".to_owned(), payload.rule.name.clone())]);
        AlertmanagerPayload {
            version: "4".to_owned(),
            group_key: format!("{{}}:{{alertname={:?}}}", payload.rule.name),
            truncated_alerts: 0,
            status: status.to_owned(),
            receiver: receiver.to_owned(),
            group_labels,
            common_labels: labels.clone(),
            common_annotations: annotations.clone(),
            external_url: String::new(),
            alerts: vec![AlertmanagerAlert {
                status: status.to_owned(),
                labels,
                annotations,
                starts_at: rfc3339(payload.starts_at),
                ends_at: payload
                    .ends_at
                    .map_or_else(|| ZERO_TIME.to_owned(), rfc3339),
                generator_url: String::new(),
                fingerprint: fingerprint.to_owned(),
            }],
        }
    }
}

/// The bytes sent to an endpoint of `format` named `receiver`.
pub fn render(
    payload: &OutpostPayload,
    format: super::webhook::Format,
    receiver: &str,
) -> Result<Vec<u8>, serde_json::Error> {
    match format {
        super::webhook::Format::Outpost => serde_json::to_vec(payload),
        super::webhook::Format::Alertmanager => {
            serde_json::to_vec(&AlertmanagerPayload::from_outpost(payload, receiver))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::alerts::webhook::Format;

    fn payload(kind: &str, ends_at: Option<u64>) -> OutpostPayload {
        OutpostPayload {
            version: OUTPOST_PAYLOAD_VERSION,
            kind: kind.to_owned(),
            idempotency_key: "outpost-r-demo-v1-1700000000-firing".to_owned(),
            at: 1_700_000_100,
            rule: PayloadRule {
                name: "demo-drift".to_owned(),
                condition: "drift>=warn".to_owned(),
                hold_secs: 0,
                window_secs: 3600,
                severity: "warning".to_owned(),
            },
            model: "demo".to_owned(),
            model_version: Some(1),
            label_group: vec!["site=lab".to_owned()],
            starts_at: 1_700_000_000,
            ends_at,
            summary: "demo@1: x1 psi 0.8 over 0.25 (alert)".to_owned(),
            features: vec![PayloadFeature {
                name: "x1".to_owned(),
                metric: "psi".to_owned(),
                value: 0.8,
                threshold: 0.25,
                status: "alert".to_owned(),
                quality: Vec::new(),
            }],
            figures: vec![],
            time_range: TimeRange {
                since: 1_699_996_400,
                until: 1_700_000_100,
            },
            drift_report: None,
            samples: Some(captures_path("demo", 1, 1_699_996_400)),
        }
    }

    #[test]
    fn outpost_payload_shape() {
        let value: serde_json::Value = serde_json::from_slice(
            &render(&payload("firing", None), Format::Outpost, "ci").unwrap(),
        )
        .unwrap();
        assert_eq!(value["version"], 1);
        assert_eq!(value["kind"], "firing");
        assert_eq!(value["model"], "demo");
        assert_eq!(value["model_version"], 1);
        assert_eq!(value["label_group"][0], "site=lab");
        assert_eq!(value["features"][0]["name"], "x1");
        assert_eq!(value["time_range"]["since"], 1_699_996_400u64);
        assert!(value["ends_at"].is_null());
        assert_eq!(
            value["samples"],
            "/admin/v1/captures?model=demo&version=1&since=1699996400"
        );
        assert!(value.get("drift_report").is_some());
    }

    #[test]
    fn alertmanager_payload_shape() {
        let firing: serde_json::Value = serde_json::from_slice(
            &render(&payload("firing", None), Format::Alertmanager, "pager").unwrap(),
        )
        .unwrap();
        assert_eq!(firing["version"], "4");
        assert_eq!(firing["status"], "firing");
        assert_eq!(firing["receiver"], "pager");
        assert_eq!(firing["groupKey"], "{}:{alertname=\"demo-drift\"}");
        assert_eq!(firing["truncatedAlerts"], 0);
        assert_eq!(firing["groupLabels"]["alertname"], "demo-drift");
        assert!(firing["externalURL"].is_string());
        let alert = &firing["alerts"][0];
        assert_eq!(alert["status"], "firing");
        assert_eq!(alert["labels"]["alertname"], "demo-drift");
        assert_eq!(alert["labels"]["model"], "demo");
        assert_eq!(alert["labels"]["version"], "1");
        assert_eq!(alert["labels"]["site"], "lab");
        assert_eq!(alert["labels"]["severity"], "warning");
        assert_eq!(alert["startsAt"], "2023-11-14T22:13:20Z");
        assert_eq!(alert["endsAt"], ZERO_TIME);
        assert_eq!(alert["fingerprint"].as_str().unwrap().len(), 16);
        assert!(alert["annotations"]["summary"]
            .as_str()
            .unwrap()
            .contains("x1"));

        let resolved: serde_json::Value = serde_json::from_slice(
            &render(
                &payload("resolved", Some(1_700_000_600)),
                Format::Alertmanager,
                "pager",
            )
            .unwrap(),
        )
        .unwrap();
        assert_eq!(resolved["status"], "resolved");
        assert_eq!(resolved["alerts"][0]["endsAt"], "2023-11-14T22:23:20Z");
        // The same alert: Alertmanager matches the two by fingerprint.
        assert_eq!(
            resolved["alerts"][0]["fingerprint"],
            firing["alerts"][0]["fingerprint"]
        );
    }
}
