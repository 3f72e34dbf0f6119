//! `outpost-hub alert`: rules that watch a model's drift, data quality, error rate or latency
//! and notify webhooks when a condition holds, and the alerts they raise.
//!
//! The hub checks a rule whole (its condition, durations, model and webhooks) and refuses it
//! with the reason, storing nothing; the CLI passes durations through signed so that a negative
//! one gets the hub's own refusal.

use std::time::Duration;

use outpost_protocol::Label;

use crate::api::{AlertInfo, AlertRuleInfo, CreateAlertRule};
use crate::client::path_segment;
use crate::unix_now;

use super::connection::HubArgs;
use super::parse_duration;
use super::plan::parse_label;
use super::table::{self, OutputArgs, Table};
use super::token::ListArgs;
use super::webhook::NameArgs;

#[derive(Debug, clap::Subcommand)]
pub enum AlertCommand {
    /// Create a rule (needs an operator token).
    Create(CreateArgs),
    /// List the rules and each one's alerts.
    List(ListArgs),
    /// Show the alerts pending or firing (`--all`: inactive ones too).
    Status(StatusArgs),
    /// Delete a rule and its alerts' states (needs an operator token). Notifications already
    /// queued are still delivered.
    Delete(NameArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    /// The rule's name: letters, digits, '.', '_' and '-'.
    pub name: String,
    /// The model watched: each of its published versions is an alert of its own.
    #[arg(long)]
    pub model: String,
    /// The condition: `drift>=warn`, `drift>=alert`, `quality=out-of-range`, `quality=missing`,
    /// `quality=nan`, `error-rate>0.05` (a share of inferences) or `latency-p95>250ms`.
    #[arg(long = "when")]
    pub condition: String,
    /// Only devices with all of these labels (k=v,...): a label group.
    #[arg(long, value_delimiter = ',', value_parser = parse_label)]
    pub selector: Vec<Label>,
    /// How long the condition must hold before the alert fires.
    #[arg(long = "for", default_value = "0s", value_parser = signed_secs, allow_hyphen_values = true)]
    pub hold: i64,
    /// How far back the condition looks (1h to 30d): the hourly drift aggregates or inference
    /// counters of the hours ending in it.
    #[arg(long, default_value = "1h", value_parser = signed_secs, allow_hyphen_values = true)]
    pub window: i64,
    /// A webhook to notify (see `outpost-hub webhook create`); repeat for several.
    #[arg(long = "webhook", value_delimiter = ',', required = true)]
    pub webhooks: Vec<String>,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct StatusArgs {
    /// Inactive alerts too.
    #[arg(long)]
    pub all: bool,
    #[command(flatten)]
    pub hub: HubArgs,
    #[command(flatten)]
    pub output: OutputArgs,
}

/// A duration in seconds that may be negative (`-5m`), for the hub to judge.
pub fn signed_secs(text: &str) -> Result<i64, String> {
    let (sign, rest) = match text.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, text),
    };
    let duration: Duration = parse_duration(rest)?;
    let secs = i64::try_from(duration.as_secs()).map_err(|_| format!("{text:?} is too long"))?;
    Ok(sign * secs)
}

impl AlertCommand {
    pub fn run(self) -> anyhow::Result<()> {
        match self {
            AlertCommand::Create(args) => {
                let client = args.hub.connect()?;
                let request = CreateAlertRule {
                    name: args.name,
                    model: args.model,
                    selector: args.selector.iter().map(Label::to_string).collect(),
                    condition: args.condition,
                    for_secs: args.hold,
                    window_secs: args.window,
                    webhooks: args.webhooks,
                };
                let created: AlertRuleInfo = client.post_json("/alerts/rules", &request)?;
                args.output.print(&created, |rule| {
                    format!(
                        "created alert rule {}: {} {} for {}, notifying {}\n",
                        rule.name,
                        rule.model,
                        rule.condition,
                        humantime::format_duration(Duration::from_secs(rule.for_secs)),
                        rule.webhooks.join(", ")
                    )
                })
            }
            AlertCommand::List(args) => {
                let client = args.hub.connect()?;
                let rules: Vec<AlertRuleInfo> = client.get_json("/alerts/rules")?;
                args.output.print(&rules, |rules| render_rules(rules))
            }
            AlertCommand::Status(args) => {
                let client = args.hub.connect()?;
                let mut alerts: Vec<AlertInfo> = client.get_json("/alerts")?;
                if !args.all {
                    alerts.retain(|alert| alert.state != "inactive");
                }
                args.output
                    .print(&alerts, |alerts| render_alerts(alerts, unix_now()))
            }
            AlertCommand::Delete(args) => {
                let client = args.hub.connect()?;
                let path = format!("/alerts/rules/{}", path_segment(&args.name));
                let deleted: AlertRuleInfo = client.delete_json(&path)?;
                args.output.print(&deleted, |rule| {
                    format!("deleted alert rule {}\n", rule.name)
                })
            }
        }
    }
}

fn render_rules(rules: &[AlertRuleInfo]) -> String {
    let mut out = Table::new(&[
        "NAME",
        "MODEL",
        "CONDITION",
        "FOR",
        "WINDOW",
        "SELECTOR",
        "WEBHOOKS",
        "FIRING",
    ]);
    for rule in rules {
        let firing: Vec<&str> = rule
            .alerts
            .iter()
            .filter(|alert| alert.state == "firing")
            .map(|alert| alert.key.as_str())
            .collect();
        out.row(vec![
            rule.name.clone(),
            rule.model.clone(),
            rule.condition.clone(),
            humantime::format_duration(Duration::from_secs(rule.for_secs)).to_string(),
            humantime::format_duration(Duration::from_secs(rule.window_secs)).to_string(),
            rule.selector.join(","),
            rule.webhooks.join(","),
            firing.join(","),
        ]);
    }
    if out.is_empty() {
        return "no alert rules\n".to_owned();
    }
    out.render()
}

fn render_alerts(alerts: &[AlertInfo], now: u64) -> String {
    let mut out = Table::new(&["RULE", "ALERT", "STATE", "SINCE", "HELD SINCE"]);
    for alert in alerts {
        out.row(vec![
            alert.rule.clone(),
            alert.key.clone(),
            alert.state.to_uppercase(),
            table::ago(alert.since, now),
            alert
                .held_since
                .map_or_else(String::new, |at| table::ago(at, now)),
        ]);
    }
    if out.is_empty() {
        return "no alerts pending or firing\n".to_owned();
    }
    out.render()
}

#[cfg(test)]
mod tests {
    use super::signed_secs;

    #[test]
    fn durations_keep_their_sign_for_the_hub_to_judge() {
        assert_eq!(signed_secs("10m"), Ok(600));
        assert_eq!(signed_secs("-5m"), Ok(-300));
        assert!(signed_secs("soon").is_err());
    }
}
