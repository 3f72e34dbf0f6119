//! The alerts page: the alerts firing and pending, every rule with its condition and webhooks,
//! and the deliveries the hub gave up on — what `outpost-hub alert list`, `alert status` and
//! `webhook dead-letters` print.

use std::fmt::Write;

use axum::extract::State;
use axum::http::HeaderMap;
use axum::response::Response;

use super::{badge, internal, time_cell, viewer, Esc};
use crate::api::AlertRuleInfo;
use crate::server::{admin, SharedHub};
use crate::store::DeliveryState;
use crate::unix_now;

const TITLE: &str = "Alerts";
/// Dead letters shown, newest first.
const SHOWN_DEAD: u64 = 50;

pub async fn page(State(hub): State<SharedHub>, headers: HeaderMap) -> Response {
    let viewer = match viewer(&hub, &headers).await {
        Ok(viewer) => viewer,
        Err(response) => return *response,
    };
    let rules = match admin::rules_with_alerts(&hub).await {
        Ok(rules) => rules,
        Err(error) => return internal(&viewer, TITLE, error),
    };
    let dead = match hub.store.outbox(DeliveryState::Dead, SHOWN_DEAD).await {
        Ok(dead) => dead,
        Err(error) => return internal(&viewer, TITLE, error),
    };
    let now = unix_now();
    let mut body = String::from("<h1>Alerts</h1>");
    active(&mut body, &rules, now);
    rule_table(&mut body, &rules);
    if !dead.is_empty() {
        body.push_str(
            "<section class=\"card\" id=\"dead-letters\"><h2>Dead letters</h2><table><thead><tr>\
             <th>Id</th><th>Webhook</th><th>Kind</th><th>Alert</th><th>Attempts</th>\
             <th>Given up</th><th>Last error</th></tr></thead><tbody>",
        );
        for letter in &dead {
            let _ = write!(
                body,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td>{} {}</td><td>{}</td><td>{}</td>\
                 <td>{}</td></tr>",
                letter.id,
                Esc(&letter.webhook),
                badge(&letter.kind),
                Esc(&letter.rule),
                Esc(&letter.alert_key),
                letter.attempts,
                time_cell(letter.done_at, now),
                Esc(&letter.last_error)
            );
        }
        body.push_str("</tbody></table></section>");
    }
    super::page(TITLE, TITLE, &viewer, &body)
}

/// The alerts pending or firing, firing first.
fn active(body: &mut String, rules: &[AlertRuleInfo], now: u64) {
    let mut alerts: Vec<_> = rules
        .iter()
        .flat_map(|rule| rule.alerts.iter().map(move |alert| (rule, alert)))
        .filter(|(_, alert)| alert.state != "inactive")
        .collect();
    alerts.sort_by_key(|(_, alert)| (alert.state != "firing", alert.since));
    body.push_str("<section class=\"card\" id=\"firing\"><h2>Firing and pending</h2>");
    if alerts.is_empty() {
        body.push_str("<p class=\"empty\">No alert is firing or pending.</p></section>");
        return;
    }
    body.push_str(
        "<table><thead><tr><th>State</th><th>Rule</th><th>Alert</th><th>Condition</th>\
         <th>Since</th></tr></thead><tbody>",
    );
    for (rule, alert) in alerts {
        let state = if alert.state == "firing" {
            "alert"
        } else {
            "warn"
        };
        let _ = write!(
            body,
            "<tr><td><span title=\"{}\">{}</span></td><td>{}</td><td>{}</td><td><code>{}</code>\
             </td><td>{}</td></tr>",
            Esc(&alert.state),
            badge(state),
            Esc(&rule.name),
            Esc(&alert.key),
            Esc(&rule.condition),
            time_cell(alert.since, now)
        );
    }
    body.push_str("</tbody></table></section>");
}

fn rule_table(body: &mut String, rules: &[AlertRuleInfo]) {
    body.push_str("<section class=\"card\" id=\"rules\"><h2>Rules</h2>");
    if rules.is_empty() {
        body.push_str(
            "<p class=\"empty\">No alert rule yet. Make one with <code>outpost-hub alert \
             create</code>.</p></section>",
        );
        return;
    }
    body.push_str(
        "<table><thead><tr><th>Name</th><th>Model</th><th>Condition</th><th>For</th>\
         <th>Devices</th><th>Webhooks</th></tr></thead><tbody>",
    );
    for rule in rules {
        let devices = if rule.selector.is_empty() {
            "all".to_owned()
        } else {
            rule.selector.join(",")
        };
        let _ = write!(
            body,
            "<tr><td>{}</td><td>{}</td><td><code>{}</code></td><td>{}</td><td>{}</td>\
             <td>{}</td></tr>",
            Esc(&rule.name),
            Esc(&rule.model),
            Esc(&rule.condition),
            Esc(
                &humantime::format_duration(std::time::Duration::from_secs(rule.for_secs))
                    .to_string()
            ),
            Esc(&devices),
            Esc(&rule.webhooks.join(", "))
        );
    }
    body.push_str("</tbody></table></section>");
}
