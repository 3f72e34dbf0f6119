//! Alert rules and webhook notifications, as pure logic: what a rule is and how it is checked
//! ([`Condition`], [`RuleSpec::validate`]), when an alert fires and resolves ([`state`]), how a
//! webhook URL is judged, a delivery signed and retried ([`webhook`]), and what receivers are
//! sent ([`payload`]). The store keeps rules, alert states and the outbox
//! (`store/alerts.rs`); `server/alerts.rs` evaluates rules against the store and
//! `server/webhooks.rs` delivers, the one place that talks to receivers.
//!
//! A rule watches one model (every published version of it, each its own alert) in one label
//! group (a selector; every device when empty) and fires when its condition has held for
//! `hold_secs`. Every condition judges the last `window_secs` of the label group: drift and
//! data-quality conditions the model version's hourly drift aggregates, error-rate and latency
//! conditions its hourly inference counters (both added up at ingest per label group and hour).

use std::fmt;

use outpost_protocol::{Label, ModelName};

pub mod payload;
pub mod state;
pub mod webhook;

/// Longest rule or webhook name.
pub const MAX_NAME: usize = 64;
/// Longest a condition may have to hold: 30 days.
pub const MAX_HOLD_SECS: u64 = 30 * 86_400;
/// Shortest and longest look-back of a condition: an hour (the telemetry windows' length, and the
/// aggregates' grain) to 30 days.
pub const MIN_WINDOW_SECS: u64 = 3600;
pub const MAX_WINDOW_SECS: u64 = 30 * 86_400;
/// Most webhooks one rule notifies.
pub const MAX_RULE_WEBHOOKS: usize = 8;
/// Inferences a version needs before its error rate or latency is judged: a handful of early
/// errors must not page anyone.
pub const MIN_INFERENCES: u64 = 100;

/// A drift status a condition asks for at least.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum DriftLevel {
    Warn,
    Alert,
}

/// A data-quality fact of the drift assessment (see `QualityIssue` in the protocol).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QualityKind {
    /// Values outside the reference's range, more than chance allows.
    OutOfRange,
    /// More values missing than the reference allows.
    Missing,
    /// NaN values where the reference had none.
    Nan,
}

/// What a rule watches, written as text (`drift>=warn`, `quality=out-of-range`,
/// `error-rate>0.05`, `latency-p95>250ms`) in the CLI, the admin API and the store alike.
#[derive(Debug, Clone, PartialEq)]
pub enum Condition {
    /// Some feature or class output of the version at this drift status or worse.
    Drift(DriftLevel),
    /// Some feature showing this data-quality fact.
    Quality(QualityKind),
    /// Errors above this share of inferences (0 < share < 1).
    ErrorRate(f64),
    /// The 95th latency percentile's bucket bound above this many microseconds.
    LatencyP95(u64),
}

/// Why a rule or webhook is refused: one variant per mistake, each naming what was wrong.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RuleError {
    #[error(
        "{what} name {name:?} is not valid: 1 to {MAX_NAME} characters of letters, digits, \
         '.', '_' and '-'"
    )]
    Name { what: &'static str, name: String },
    #[error(
        "condition {0:?} is not one of drift>=warn|alert, quality=out-of-range|missing|nan, \
         error-rate>SHARE, latency-p95>DURATION"
    )]
    Syntax(String),
    #[error(
        "condition {text:?} names unknown metric {metric:?}: expected drift, quality, \
         error-rate or latency-p95"
    )]
    UnknownMetric { text: String, metric: String },
    #[error("condition {text:?}: {reason}")]
    Threshold { text: String, reason: String },
    #[error("{what} is negative ({secs} s): a duration is 0 or more")]
    Negative { what: &'static str, secs: i64 },
    #[error("{what} of {secs} s is out of range: {range}")]
    Duration {
        what: &'static str,
        secs: i64,
        range: &'static str,
    },
    #[error("label {text:?}: {reason} (expected key=value)")]
    Label { text: String, reason: String },
    #[error("model name {name:?}: {reason}")]
    Model { name: String, reason: String },
    #[error("a rule notifies 1 to {MAX_RULE_WEBHOOKS} webhooks; {0} given")]
    Webhooks(usize),
}

impl fmt::Display for Condition {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Condition::Drift(DriftLevel::Warn) => f.write_str("drift>=warn"),
            Condition::Drift(DriftLevel::Alert) => f.write_str("drift>=alert"),
            Condition::Quality(kind) => write!(f, "quality={}", kind.as_str()),
            Condition::ErrorRate(share) => write!(f, "error-rate>{share}"),
            Condition::LatencyP95(us) => write!(f, "latency-p95>{}ms", *us as f64 / 1000.0),
        }
    }
}

impl QualityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            QualityKind::OutOfRange => "out-of-range",
            QualityKind::Missing => "missing",
            QualityKind::Nan => "nan",
        }
    }
}

impl Condition {
    /// Parses a condition as [`Condition`]'s `Display` writes it; spaces are ignored.
    pub fn parse(text: &str) -> Result<Condition, RuleError> {
        let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
        let split = ["<=", ">=", "=", ">", "<"].iter().find_map(|op| {
            compact
                .split_once(op)
                .map(|(metric, value)| (metric, *op, value))
        });
        let Some((metric, op, value)) = split else {
            return Err(RuleError::Syntax(text.to_owned()));
        };
        let threshold = |reason: String| RuleError::Threshold {
            text: text.to_owned(),
            reason,
        };
        match (metric, op) {
            ("drift", ">=") => match value {
                "warn" => Ok(Condition::Drift(DriftLevel::Warn)),
                "alert" => Ok(Condition::Drift(DriftLevel::Alert)),
                other => Err(threshold(format!(
                    "drift level {other:?} is not warn or alert"
                ))),
            },
            ("quality", "=") => match value {
                "out-of-range" => Ok(Condition::Quality(QualityKind::OutOfRange)),
                "missing" => Ok(Condition::Quality(QualityKind::Missing)),
                "nan" => Ok(Condition::Quality(QualityKind::Nan)),
                other => Err(threshold(format!(
                    "quality fact {other:?} is not out-of-range, missing or nan"
                ))),
            },
            ("error-rate", ">") => {
                let share: f64 = value
                    .parse()
                    .map_err(|_| threshold(format!("{value:?} is not a number")))?;
                if !(share > 0.0 && share < 1.0) {
                    return Err(threshold(format!(
                        "error rate {value} is out of range: a share above 0 and below 1 \
                         (0.05 is 5%)"
                    )));
                }
                Ok(Condition::ErrorRate(share))
            }
            ("latency-p95", ">") => {
                let bound = humantime::parse_duration(value)
                    .map_err(|error| threshold(format!("{value:?} is not a duration ({error})")))?;
                let us = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX);
                if us == 0 || bound.as_secs() > 3600 {
                    return Err(threshold(format!(
                        "latency {value} is out of range: above 0 and at most 1h"
                    )));
                }
                Ok(Condition::LatencyP95(us))
            }
            ("drift" | "quality" | "error-rate" | "latency-p95", _) => {
                Err(RuleError::Syntax(text.to_owned()))
            }
            (other, _) => Err(RuleError::UnknownMetric {
                text: text.to_owned(),
                metric: other.to_owned(),
            }),
        }
    }

    /// True when the condition reads drift summaries (and so needs a drift profile).
    pub fn reads_drift(&self) -> bool {
        matches!(self, Condition::Drift(_) | Condition::Quality(_))
    }
}

/// A rule as an operator asks for it, before it is checked.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRequest {
    pub name: String,
    pub model: String,
    pub selector: Vec<String>,
    pub condition: String,
    pub hold_secs: i64,
    pub window_secs: i64,
    pub webhooks: Vec<String>,
}

/// A checked rule: every field within its range. Whether its model and webhooks exist is the
/// server's to check against the store.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleSpec {
    pub name: String,
    pub model: String,
    pub selector: Vec<Label>,
    pub condition: Condition,
    pub hold_secs: u64,
    pub window_secs: u64,
    pub webhooks: Vec<String>,
}

impl RuleSpec {
    /// Checks everything about a rule that needs no store.
    pub fn validate(request: &RuleRequest) -> Result<RuleSpec, RuleError> {
        check_name("rule", &request.name)?;
        ModelName::new(&request.model).map_err(|error| RuleError::Model {
            name: request.model.clone(),
            reason: error.to_string(),
        })?;
        let condition = Condition::parse(&request.condition)?;
        let hold_secs = checked_secs(
            "hold (--for)",
            request.hold_secs,
            0,
            MAX_HOLD_SECS,
            "0 to 30 days",
        )?;
        let window_secs = checked_secs(
            "window",
            request.window_secs,
            MIN_WINDOW_SECS,
            MAX_WINDOW_SECS,
            "1 hour to 30 days",
        )?;
        if request.webhooks.is_empty() || request.webhooks.len() > MAX_RULE_WEBHOOKS {
            return Err(RuleError::Webhooks(request.webhooks.len()));
        }
        for webhook in &request.webhooks {
            check_name("webhook", webhook)?;
        }
        let mut webhooks = request.webhooks.clone();
        webhooks.sort();
        webhooks.dedup();
        let selector = request
            .selector
            .iter()
            .map(|text| {
                Label::parse(text).map_err(|error| RuleError::Label {
                    text: text.clone(),
                    reason: error.to_string(),
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RuleSpec {
            name: request.name.clone(),
            model: request.model.clone(),
            selector,
            condition,
            hold_secs,
            window_secs,
            webhooks,
        })
    }
}

/// A rule or webhook name: what idempotency keys, headers and URLs are made of.
pub fn check_name(what: &'static str, name: &str) -> Result<(), RuleError> {
    let fine = !name.is_empty()
        && name.len() <= MAX_NAME
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
    if fine {
        Ok(())
    } else {
        Err(RuleError::Name {
            what,
            name: name.to_owned(),
        })
    }
}

fn checked_secs(
    what: &'static str,
    secs: i64,
    min: u64,
    max: u64,
    range: &'static str,
) -> Result<u64, RuleError> {
    let Ok(unsigned) = u64::try_from(secs) else {
        return Err(RuleError::Negative { what, secs });
    };
    if unsigned < min || unsigned > max {
        return Err(RuleError::Duration { what, secs, range });
    }
    Ok(unsigned)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(condition: &str) -> RuleRequest {
        RuleRequest {
            name: "demo-drift".to_owned(),
            model: "demo".to_owned(),
            selector: vec!["site=lab".to_owned()],
            condition: condition.to_owned(),
            hold_secs: 600,
            window_secs: 3600,
            webhooks: vec!["ci".to_owned(), "ci".to_owned()],
        }
    }

    #[test]
    fn conditions_read_back_as_written() {
        for text in [
            "drift>=warn",
            "drift>=alert",
            "quality=out-of-range",
            "quality=missing",
            "quality=nan",
            "error-rate>0.05",
            "latency-p95>250ms",
        ] {
            let condition = Condition::parse(text).unwrap();
            assert_eq!(condition.to_string(), text);
            assert_eq!(Condition::parse(&condition.to_string()).unwrap(), condition);
        }
        assert_eq!(
            Condition::parse(" latency-p95 > 1.5ms ").unwrap(),
            Condition::LatencyP95(1500)
        );
    }

    #[test]
    fn bad_conditions_say_what_is_wrong() {
        assert_eq!(
            Condition::parse("cpu>0.5").unwrap_err(),
            RuleError::UnknownMetric {
                text: "cpu>0.5".to_owned(),
                metric: "cpu".to_owned()
            }
        );
        let error = Condition::parse("error-rate>1.5").unwrap_err().to_string();
        assert!(error.contains("error rate 1.5 is out of range"), "{error}");
        assert!(matches!(
            Condition::parse("error-rate>-0.1"),
            Err(RuleError::Threshold { .. })
        ));
        assert!(matches!(
            Condition::parse("drift>=ok"),
            Err(RuleError::Threshold { .. })
        ));
        assert!(matches!(
            Condition::parse("latency-p95>0ms"),
            Err(RuleError::Threshold { .. })
        ));
        assert!(matches!(
            Condition::parse("drift<warn"),
            Err(RuleError::Syntax(_))
        ));
        assert!(matches!(
            Condition::parse("drift"),
            Err(RuleError::Syntax(_))
        ));
    }

    #[test]
    fn rules_are_checked_field_by_field() {
        let spec = RuleSpec::validate(&request("drift>=warn")).unwrap();
        assert_eq!(spec.webhooks, vec!["ci".to_owned()]);
        assert_eq!(spec.selector[0].to_string(), "site=lab");

        let mut negative = request("drift>=warn");
        negative.hold_secs = -300;
        assert_eq!(
            RuleSpec::validate(&negative).unwrap_err(),
            RuleError::Negative {
                what: "hold (--for)",
                secs: -300
            }
        );
        let mut short = request("drift>=warn");
        short.window_secs = 60;
        assert!(matches!(
            RuleSpec::validate(&short),
            Err(RuleError::Duration { what: "window", .. })
        ));
        let mut none = request("drift>=warn");
        none.webhooks.clear();
        assert_eq!(
            RuleSpec::validate(&none).unwrap_err(),
            RuleError::Webhooks(0)
        );
        let mut name = request("drift>=warn");
        name.name = "a/b".to_owned();
        assert!(matches!(
            RuleSpec::validate(&name),
            Err(RuleError::Name { what: "rule", .. })
        ));
        let mut label = request("drift>=warn");
        label.selector = vec!["nolabel".to_owned()];
        assert!(matches!(
            RuleSpec::validate(&label),
            Err(RuleError::Label { .. })
        ));
    }
}
