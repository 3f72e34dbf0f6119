//! Alert rules, webhook endpoints and their deliveries: create, list, delete, test, and the
//! dead-letter list. Reads need `viewer`; changes `operator`, each written to the audit log. A
//! refused change writes nothing.

use super::*;
use crate::alerts::payload::{self, OutpostPayload};
use crate::alerts::webhook::{self, Format};
use crate::alerts::{check_name, RuleRequest, RuleSpec};
use crate::server::alerts::{published_versions, selector_of};
use crate::store::{AlertRuleRecord, AlertStateRecord, DeliveryState, OutboxRecord, WebhookRecord};

/// Most deliveries one listing shows.
const MAX_DELIVERIES: u64 = 1000;

fn alert_info(state: &AlertStateRecord) -> AlertInfo {
    let set = |at: u64| (at != 0).then_some(at);
    AlertInfo {
        rule: state.rule.clone(),
        key: state.alert_key.clone(),
        state: state.phase.clone(),
        since: state.since,
        held_since: set(state.held_since),
        firing_since: set(state.firing_since),
    }
}

fn rule_info(rule: &AlertRuleRecord, states: &[AlertStateRecord]) -> AlertRuleInfo {
    AlertRuleInfo {
        name: rule.name.clone(),
        model: rule.model.clone(),
        selector: selector_of(rule).iter().map(ToString::to_string).collect(),
        condition: rule.condition.clone(),
        for_secs: rule.hold_secs,
        window_secs: rule.window_secs,
        webhooks: rule.webhooks.clone(),
        created: rule.created,
        created_by: rule.created_by.clone(),
        alerts: states
            .iter()
            .filter(|state| state.rule == rule.name)
            .map(alert_info)
            .collect(),
    }
}

fn webhook_info(record: &WebhookRecord) -> WebhookInfo {
    WebhookInfo {
        name: record.name.clone(),
        url: webhook::shown_url(&record.url),
        format: record.format.clone(),
        created: record.created,
        created_by: record.created_by.clone(),
    }
}

fn delivery_info(record: &OutboxRecord) -> DeliveryInfo {
    DeliveryInfo {
        id: record.id,
        idempotency_key: record.idempotency_key.clone(),
        webhook: record.webhook.clone(),
        kind: record.kind.clone(),
        rule: record.rule.clone(),
        alert_key: record.alert_key.clone(),
        created: record.created,
        state: record.state.as_str().to_owned(),
        attempts: record.attempts,
        last_status: u16::try_from(record.last_status)
            .ok()
            .filter(|status| *status != 0),
        last_error: record.last_error.clone(),
        done_at: (record.done_at != 0).then_some(record.done_at),
    }
}

/// Every rule with its alerts.
pub(crate) async fn rules_with_alerts(hub: &SharedHub) -> Result<Vec<AlertRuleInfo>, AdminError> {
    let states = hub.store.alert_states().await?;
    Ok(hub
        .store
        .alert_rules(None)
        .await?
        .iter()
        .map(|rule| rule_info(rule, &states))
        .collect())
}

pub(super) async fn list_alert_rules(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<AlertRuleInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    Ok(Json(rules_with_alerts(&hub).await?))
}

pub(super) async fn create_alert_rule(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Json<CreateAlertRule>, JsonRejection>,
) -> Reply<AlertRuleInfo> {
    let token = require(&hub, &headers, Role::Operator).await?;
    let Json(request) = body?;
    let spec = RuleSpec::validate(&RuleRequest {
        name: request.name,
        model: request.model,
        selector: request.selector,
        condition: request.condition,
        hold_secs: request.for_secs,
        window_secs: request.window_secs,
        webhooks: request.webhooks,
    })
    .map_err(|error| AdminError::bad_request(error.to_string()))?;
    if published_versions(&hub, &spec.model).await?.is_empty() {
        return Err(AdminError::not_found(format!(
            "no model named {:?} is published",
            spec.model
        )));
    }
    if spec.condition.reads_drift() {
        // The same refusal `drift report` gives: no version to judge drift against.
        latest_profiled_version(&hub, &spec.model).await?;
    }
    for name in &spec.webhooks {
        if hub.store.webhook(name).await?.is_none() {
            return Err(AdminError::not_found(format!(
                "no webhook named {name:?}; create it with `outpost-hub webhook create`"
            )));
        }
    }
    let record = AlertRuleRecord {
        name: spec.name.clone(),
        model: spec.model.clone(),
        selector: spec
            .selector
            .iter()
            .map(|label| (label.key.clone(), label.value.clone()))
            .collect(),
        condition: spec.condition.to_string(),
        hold_secs: spec.hold_secs,
        window_secs: spec.window_secs,
        webhooks: spec.webhooks.clone(),
        created: unix_now(),
        created_by: token.name.clone(),
    };
    if !hub.store.add_alert_rule(&record).await? {
        return Err(AdminError::conflict(format!(
            "an alert rule named {:?} exists; delete it first to change it",
            record.name
        )));
    }
    audit(
        &hub,
        &token,
        "alert create",
        &format!("alert {}", record.name),
        &format!(
            "{} {} for {} s over {} s, selector [{}], webhooks {}",
            record.model,
            record.condition,
            record.hold_secs,
            record.window_secs,
            rule_info(&record, &[]).selector.join(","),
            record.webhooks.join(",")
        ),
    )
    .await?;
    hub.store.flush().await?;
    // Evaluated at once on what is stored, not at the next telemetry batch or tick.
    hub.alerts.touch([record.model.clone()]);
    Ok(Json(rule_info(&record, &[])))
}

pub(super) async fn delete_alert_rule(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<AlertRuleInfo> {
    let token = require(&hub, &headers, Role::Operator).await?;
    let rules = rules_with_alerts(&hub).await?;
    let Some(rule) = rules.into_iter().find(|rule| rule.name == name) else {
        return Err(AdminError::not_found(format!(
            "no alert rule named {name:?}"
        )));
    };
    if !hub.store.delete_alert_rule(&name).await? {
        return Err(AdminError::not_found(format!(
            "no alert rule named {name:?}"
        )));
    }
    audit(&hub, &token, "alert delete", &format!("alert {name}"), "").await?;
    hub.store.flush().await?;
    Ok(Json(rule))
}

pub(super) async fn list_alerts(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<AlertInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    Ok(Json(
        hub.store
            .alert_states()
            .await?
            .iter()
            .map(alert_info)
            .collect(),
    ))
}

pub(super) async fn list_webhooks(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
) -> Reply<Vec<WebhookInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    Ok(Json(
        hub.store
            .webhooks()
            .await?
            .iter()
            .map(webhook_info)
            .collect(),
    ))
}

pub(super) async fn create_webhook(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    body: Result<Json<CreateWebhook>, JsonRejection>,
) -> Reply<CreatedWebhook> {
    let token = require(&hub, &headers, Role::Operator).await?;
    let Json(request) = body?;
    let refuse = |error: &dyn std::fmt::Display| AdminError::bad_request(error.to_string());
    check_name("webhook", &request.name).map_err(|error| refuse(&error))?;
    webhook::check_url(&request.url).map_err(|error| refuse(&error))?;
    let format_text = request.format.as_deref().unwrap_or("outpost");
    let format = Format::parse(format_text)
        .ok_or_else(|| refuse(&webhook::WebhookError::Format(format_text.to_owned())))?;
    let secret = match request.secret {
        Some(secret) => {
            webhook::check_secret(&secret).map_err(|error| refuse(&error))?;
            secret
        }
        None => random_hex(32)?,
    };
    let record = WebhookRecord {
        name: request.name,
        url: request.url,
        secret,
        format: format.as_str().to_owned(),
        created: unix_now(),
        created_by: token.name.clone(),
    };
    if !hub.store.add_webhook(&record).await? {
        return Err(AdminError::conflict(format!(
            "a webhook named {:?} exists; delete it first to change it",
            record.name
        )));
    }
    let info = webhook_info(&record);
    audit(
        &hub,
        &token,
        "webhook create",
        &format!("webhook {}", record.name),
        &format!("{} ({})", info.url, info.format),
    )
    .await?;
    hub.store.flush().await?;
    Ok(Json(CreatedWebhook {
        webhook: info,
        secret: record.secret,
    }))
}

pub(super) async fn delete_webhook(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<WebhookInfo> {
    let token = require(&hub, &headers, Role::Operator).await?;
    let Some(record) = hub.store.webhook(&name).await? else {
        return Err(AdminError::not_found(format!("no webhook named {name:?}")));
    };
    let users: Vec<String> = hub
        .store
        .alert_rules(None)
        .await?
        .into_iter()
        .filter(|rule| rule.webhooks.contains(&name))
        .map(|rule| rule.name)
        .collect();
    if !users.is_empty() {
        return Err(AdminError::conflict(format!(
            "webhook {name:?} is notified by alert rule(s) {}: delete them first",
            users.join(", ")
        )));
    }
    if !hub.store.delete_webhook(&name, unix_now()).await? {
        return Err(AdminError::not_found(format!("no webhook named {name:?}")));
    }
    audit(
        &hub,
        &token,
        "webhook delete",
        &format!("webhook {name}"),
        "",
    )
    .await?;
    hub.store.flush().await?;
    Ok(Json(webhook_info(&record)))
}

/// Sends a test message now, outside the outbox, and answers with what the receiver said.
pub(super) async fn test_webhook(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Reply<WebhookTestResult> {
    let token = require(&hub, &headers, Role::Operator).await?;
    let Some(record) = hub.store.webhook(&name).await? else {
        return Err(AdminError::not_found(format!("no webhook named {name:?}")));
    };
    let message = OutpostPayload::test(&name, crate::server::unix_millis());
    let format = Format::parse(&record.format).unwrap_or(Format::Outpost);
    let body = payload::render(&message, format, &name).map_err(AdminError::internal)?;
    let answer = hub
        .webhooks
        .post(&record, &message.idempotency_key, "test", body)
        .await;
    let result = match answer {
        Ok(answer) => WebhookTestResult {
            webhook: name.clone(),
            idempotency_key: message.idempotency_key,
            status: Some(answer.status),
            body: answer.body,
            error: None,
        },
        Err(error) => WebhookTestResult {
            webhook: name.clone(),
            idempotency_key: message.idempotency_key,
            status: None,
            body: String::new(),
            error: Some(error),
        },
    };
    let outcome = match (&result.status, &result.error) {
        (Some(status), _) => format!("answered {status}"),
        (None, Some(error)) => error.clone(),
        (None, None) => String::new(),
    };
    audit(
        &hub,
        &token,
        "webhook test",
        &format!("webhook {name}"),
        &outcome,
    )
    .await?;
    hub.store.flush().await?;
    Ok(Json(result))
}

#[derive(Debug, Deserialize)]
pub(super) struct DeliveryQuery {
    /// `pending`, `delivered` or `dead` (the default: the dead-letter list).
    state: Option<String>,
}

pub(super) async fn list_deliveries(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Query(query): Query<DeliveryQuery>,
) -> Reply<Vec<DeliveryInfo>> {
    require(&hub, &headers, Role::Viewer).await?;
    let state = match query.state.as_deref().unwrap_or("dead") {
        "pending" => DeliveryState::Pending,
        "delivered" => DeliveryState::Delivered,
        "dead" => DeliveryState::Dead,
        other => {
            return Err(AdminError::bad_request(format!(
                "delivery state {other:?} is not pending, delivered or dead"
            )))
        }
    };
    Ok(Json(
        hub.store
            .outbox(state, MAX_DELIVERIES)
            .await?
            .iter()
            .map(delivery_info)
            .collect(),
    ))
}

/// Puts a dead letter back in the outbox, due now.
pub(super) async fn retry_delivery(
    State(hub): State<SharedHub>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Reply<Vec<DeliveryInfo>> {
    let token = require(&hub, &headers, Role::Operator).await?;
    if !hub
        .store
        .retry_dead(id, crate::server::unix_millis())
        .await?
    {
        return Err(AdminError::not_found(format!(
            "no dead letter {id} whose webhook still exists"
        )));
    }
    audit(&hub, &token, "webhook retry", &format!("delivery {id}"), "").await?;
    hub.store.flush().await?;
    hub.alerts.deliver.notify_one();
    Ok(Json(
        hub.store
            .outbox(DeliveryState::Pending, MAX_DELIVERIES)
            .await?
            .iter()
            .filter(|record| record.id == id)
            .map(delivery_info)
            .collect(),
    ))
}
