//! Delivers the outbox's notifications to webhook receivers, at least once, in order per webhook:
//! the one place the hub talks to receivers (reqwest, rustls on ring).
//!
//! Every hub runs [`deliverer`]; a notification is sent only by the hub that claimed it in the
//! store, so replicas sharing a database never send one twice at once, and a hub that restarts
//! resumes whatever is pending. Each attempt sends the stored body as it is, signed with the
//! webhook's secret ([`crate::alerts::webhook::signature`]); a 2xx marks it delivered, anything
//! else (another status, a refused connection, a timeout) is recorded and tried again after an
//! exponential backoff, until the last attempt moves it to the dead-letter list.

use std::time::Duration;

use anyhow::Context;

use super::{unix_millis, SharedHub};
use crate::alerts::webhook::{self, EVENT_HEADER, IDEMPOTENCY_HEADER, SIGNATURE_HEADER};
use crate::store::{AttemptOutcome, OutboxRecord, WebhookRecord};
use crate::unix_now;

/// Time limit of one attempt, connecting included.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a claim keeps other hubs off a notification: well past an attempt's time limit.
const CLAIM: Duration = Duration::from_secs(30);
/// Most bytes of a receiver's answer kept (in an error, or shown by `webhook test`).
const MAX_ANSWER: usize = 1024;

/// How failed deliveries are retried.
#[derive(Debug, Clone, Copy)]
pub struct RetrySettings {
    /// The wait after the first failure; it doubles after each further one, up to an hour.
    pub first_retry: Duration,
    /// Attempts before a notification moves to the dead-letter list.
    pub max_attempts: u32,
}

/// The HTTP client of webhook deliveries: no redirects (a receiver's redirect could lead to a
/// URL the webhook check never saw), a time limit per attempt.
#[derive(Debug, Clone)]
pub struct WebhookClient {
    client: reqwest::Client,
}

/// What a receiver answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: u16,
    /// The start of its body, as text.
    pub body: String,
}

impl WebhookClient {
    pub fn new() -> anyhow::Result<WebhookClient> {
        // reqwest's rustls takes the process's provider: ring, as everywhere else in the hub.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .timeout(ATTEMPT_TIMEOUT)
            .connect_timeout(ATTEMPT_TIMEOUT)
            .user_agent(format!("outpost-hub/{}", env!("CARGO_PKG_VERSION")))
            .build()
            .context("building the webhook client")?;
        Ok(WebhookClient { client })
    }

    /// Posts `body` to `webhook`, signed, with its idempotency key and event kind.
    pub async fn post(
        &self,
        webhook: &WebhookRecord,
        idempotency_key: &str,
        event: &str,
        body: Vec<u8>,
    ) -> Result<Answer, String> {
        let response = self
            .client
            .post(&webhook.url)
            .header("content-type", "application/json")
            .header(SIGNATURE_HEADER, webhook::signature(&webhook.secret, &body))
            .header(IDEMPOTENCY_HEADER, idempotency_key)
            .header(EVENT_HEADER, event)
            .body(body)
            .send()
            .await
            .map_err(|error| describe(&webhook.url, &error))?;
        let status = response.status().as_u16();
        // Only the answer's start is kept, so only that much is read: a receiver that answers
        // without end costs the time limit, not memory.
        let mut response = response;
        let mut bytes = Vec::new();
        while bytes.len() < MAX_ANSWER {
            match response.chunk().await {
                Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
                Ok(None) | Err(_) => break,
            }
        }
        bytes.truncate(MAX_ANSWER);
        Ok(Answer {
            status,
            body: String::from_utf8_lossy(&bytes).trim().to_owned(),
        })
    }
}

/// A transport error with its causes, naming the URL without its query.
fn describe(url: &str, error: &reqwest::Error) -> String {
    let mut text = format!("posting to {}: {error}", webhook::shown_url(url));
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

/// The task that delivers the outbox, until aborted: what is due, then a sleep until the next
/// notification is due, a new one is queued, or a tick passes (another hub may have queued one).
pub async fn deliverer(hub: SharedHub) {
    if !hub.store.shared() {
        // This process owns the store: claims left by one killed mid-delivery are its own.
        if let Err(error) = hub.store.release_delivery_claims().await {
            log::error!("releasing the webhook deliveries' claims: {error}");
        }
    }
    loop {
        let attempted = match deliver_due(&hub).await {
            Ok(attempted) => attempted,
            Err(error) => {
                log::error!("delivering webhooks: {error:#}");
                false
            }
        };
        if attempted {
            continue;
        }
        let wait = match hub.store.next_delivery_ms().await {
            Ok(Some(next)) => Duration::from_millis(next.saturating_sub(unix_millis())),
            Ok(None) => hub.config.tick,
            Err(error) => {
                log::error!("reading the webhook outbox: {error}");
                hub.config.tick
            }
        }
        .min(hub.config.tick);
        tokio::select! {
            _ = hub.alerts.deliver.notified() => {}
            _ = tokio::time::sleep(wait) => {}
        }
    }
}

/// Attempts every due notification (one per webhook), at once; true when any was attempted.
async fn deliver_due(hub: &SharedHub) -> anyhow::Result<bool> {
    let due = hub.store.due_deliveries(unix_millis()).await?;
    if due.is_empty() {
        return Ok(false);
    }
    let mut attempts = tokio::task::JoinSet::new();
    for record in due {
        let hub = hub.clone();
        attempts.spawn(async move {
            if let Err(error) = deliver(&hub, &record).await {
                log::error!(
                    "webhook {} notification {}: {error:#}",
                    record.webhook,
                    record.idempotency_key
                );
            }
        });
    }
    while attempts.join_next().await.is_some() {}
    hub.store.flush().await?;
    Ok(true)
}

/// Claims a notification and makes one attempt at it.
async fn deliver(hub: &SharedHub, record: &OutboxRecord) -> anyhow::Result<()> {
    let now_ms = unix_millis();
    let until = now_ms.saturating_add(CLAIM.as_millis() as u64);
    if !hub
        .store
        .claim_delivery(record.id, &hub.instance, now_ms, until)
        .await?
    {
        return Ok(());
    }
    let answer = match hub.store.webhook(&record.webhook).await? {
        Some(webhook) => {
            hub.webhooks
                .post(
                    &webhook,
                    &record.idempotency_key,
                    &record.kind,
                    record.body.clone(),
                )
                .await
        }
        None => Err(format!("webhook {} was deleted", record.webhook)),
    };
    let attempts = u32::try_from(record.attempts.saturating_add(1)).unwrap_or(u32::MAX);
    let settings = hub.config.webhooks;
    let retry_at_ms = (attempts < settings.max_attempts).then(|| {
        unix_millis()
            .saturating_add(webhook::backoff(settings.first_retry, attempts).as_millis() as u64)
    });
    let outcome = match answer {
        Ok(answer) if (200..300).contains(&answer.status) => {
            log::info!(
                "webhook {}: {} delivered ({})",
                record.webhook,
                record.idempotency_key,
                answer.status
            );
            AttemptOutcome::Delivered {
                status: answer.status,
            }
        }
        Ok(answer) => AttemptOutcome::Failed {
            status: Some(answer.status),
            error: format!("the receiver answered {}: {}", answer.status, answer.body),
            retry_at_ms,
        },
        Err(error) => AttemptOutcome::Failed {
            status: None,
            error,
            retry_at_ms,
        },
    };
    if let AttemptOutcome::Failed {
        error, retry_at_ms, ..
    } = &outcome
    {
        match retry_at_ms {
            Some(_) => log::warn!(
                "webhook {}: {} attempt {attempts} failed, tried again later: {error}",
                record.webhook,
                record.idempotency_key
            ),
            None => log::error!(
                "webhook {}: {} given up after {attempts} attempts, now a dead letter: {error}",
                record.webhook,
                record.idempotency_key
            ),
        }
    }
    hub.store
        .finish_delivery(record.id, &hub.instance, &outcome, unix_now())
        .await?;
    Ok(())
}
