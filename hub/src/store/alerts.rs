//! Alert rules, webhook endpoints, alert states and the notification outbox (schema 5).
//!
//! Nothing is sent twice or lost because an alert's state moves and its notifications enter the
//! outbox in one transaction ([`Store::apply_alert_step`]), a compare-and-set on the state the
//! evaluation started from, so of two hubs (or two evaluations) proposing the same step one
//! wins and the other changes nothing. An outbox row is unique by its event's idempotency key
//! and endpoint; a hub delivers a row only after claiming it ([`Store::claim_delivery`], one
//! conditional update, for a limited time), and marks it delivered only after a 2xx. A hub killed
//! after a receiver's 2xx and before that mark sends the row again once the claim expires: the
//! one duplicate at-least-once allows, with the same idempotency key and body.

use serde::{Deserialize, Serialize};

use super::*;

/// An alert rule as stored. Its condition is kept as the text it is written in
/// (`crate::alerts::Condition`'s form), parsed again when read.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRuleRecord {
    pub name: String,
    pub model: String,
    /// Label group (key, value); empty for every device.
    pub selector: Vec<(String, String)>,
    pub condition: String,
    pub hold_secs: u64,
    pub window_secs: u64,
    pub webhooks: Vec<String>,
    pub created: u64,
    pub created_by: String,
}

/// A webhook endpoint as stored: where to, signed with what, in which format.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WebhookRecord {
    pub name: String,
    pub url: String,
    /// The HMAC key, as text; never shown after creation.
    pub secret: String,
    /// `outpost` or `alertmanager`.
    pub format: String,
    pub created: u64,
    pub created_by: String,
}

/// One alert's state: a rule and an alert key (a model version). Times are Unix seconds, 0 when
/// unset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertStateRecord {
    pub rule: String,
    pub alert_key: String,
    /// `inactive`, `pending` or `firing`.
    pub phase: String,
    pub since: u64,
    pub held_since: u64,
    pub firing_since: u64,
}

/// A notification to put in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxInsert {
    pub idempotency_key: String,
    pub webhook: String,
    /// `firing` or `resolved`.
    pub kind: String,
    pub rule: String,
    pub alert_key: String,
    /// The exact bytes every attempt sends.
    pub body: Vec<u8>,
}

/// Where a notification stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeliveryState {
    Pending,
    Delivered,
    /// Given up on after the last attempt (or its webhook deleted): the dead-letter list.
    Dead,
}

impl DeliveryState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeliveryState::Pending => "pending",
            DeliveryState::Delivered => "delivered",
            DeliveryState::Dead => "dead",
        }
    }

    fn parse(text: &str) -> Result<DeliveryState> {
        match text {
            "pending" => Ok(DeliveryState::Pending),
            "delivered" => Ok(DeliveryState::Delivered),
            "dead" => Ok(DeliveryState::Dead),
            other => Err(StoreError::Corrupt {
                table: "alert_outbox",
                reason: format!("delivery state {other:?}"),
            }),
        }
    }
}

/// A notification in the outbox.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutboxRecord {
    pub id: u64,
    pub idempotency_key: String,
    pub webhook: String,
    pub kind: String,
    pub rule: String,
    pub alert_key: String,
    pub body: Vec<u8>,
    pub created: u64,
    pub state: DeliveryState,
    pub attempts: u64,
    /// Unix milliseconds before which it is not tried again.
    pub next_attempt_ms: u64,
    /// The receiver's last HTTP status; 0 when it never answered.
    pub last_status: u64,
    /// Why the last attempt failed; empty after a success.
    pub last_error: String,
    /// When it was delivered or given up on, Unix seconds; 0 while pending.
    pub done_at: u64,
}

/// How an attempt ended, to record with [`Store::finish_delivery`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AttemptOutcome {
    /// A 2xx from the receiver.
    Delivered { status: u16 },
    /// Anything else: tried again at `retry_at_ms`, or dead when that is None.
    Failed {
        status: Option<u16>,
        error: String,
        retry_at_ms: Option<u64>,
    },
}

const OUTBOX_COLUMNS: &str = "id, idempotency_key, webhook, kind, rule, alert_key, body, \
    created, state, attempts, next_attempt_ms, last_status, last_error, done_at";

fn outbox_record(row: &AnyRow) -> Result<OutboxRecord> {
    const TABLE: &str = "alert_outbox";
    Ok(OutboxRecord {
        id: column_u64(TABLE, row, 0)?,
        idempotency_key: row.try_get(1)?,
        webhook: row.try_get(2)?,
        kind: row.try_get(3)?,
        rule: row.try_get(4)?,
        alert_key: row.try_get(5)?,
        body: blob(row, 6)?,
        created: column_u64(TABLE, row, 7)?,
        state: DeliveryState::parse(&row.try_get::<String, _>(8)?)?,
        attempts: column_u64(TABLE, row, 9)?,
        next_attempt_ms: column_u64(TABLE, row, 10)?,
        last_status: column_u64(TABLE, row, 11)?,
        last_error: row.try_get(12)?,
        done_at: column_u64(TABLE, row, 13)?,
    })
}

fn state_record(row: &AnyRow) -> Result<AlertStateRecord> {
    const TABLE: &str = "alert_states";
    Ok(AlertStateRecord {
        rule: row.try_get(0)?,
        alert_key: row.try_get(1)?,
        phase: row.try_get(2)?,
        since: column_u64(TABLE, row, 3)?,
        held_since: column_u64(TABLE, row, 4)?,
        firing_since: column_u64(TABLE, row, 5)?,
    })
}

impl Store {
    // Alert rules and webhooks.

    /// Stores a new rule; false (and nothing written) when one of that name exists.
    pub async fn add_alert_rule(&self, record: &AlertRuleRecord) -> Result<bool> {
        let written = sqlx::query(
            "INSERT INTO alert_rules (name, model, record) VALUES ($1, $2, $3) \
             ON CONFLICT (name) DO NOTHING",
        )
        .bind(record.name.clone())
        .bind(record.model.clone())
        .bind(encode("alert_rules", record)?)
        .execute(&self.writer)
        .await;
        // Forgotten whatever the answer: an error may come after the row is in.
        self.rules_written();
        Ok(written?.rows_affected() == 1)
    }

    /// Every rule, by name; of one model only when `model` is given. On a store no other hub
    /// shares, from memory once read (see `cache`).
    pub async fn alert_rules(&self, model: Option<&str>) -> Result<Vec<AlertRuleRecord>> {
        let Some(cache) = &self.rules_cache else {
            let query = match model {
                Some(model) => {
                    sqlx::query("SELECT record FROM alert_rules WHERE model = $1 ORDER BY name")
                        .bind(model.to_owned())
                }
                None => sqlx::query("SELECT record FROM alert_rules ORDER BY name"),
            };
            return decode_rules(&query.fetch_all(&self.pool).await?);
        };
        let rules = match cache.get() {
            Some(rules) => rules,
            None => {
                let generation = cache.generation();
                let rows = sqlx::query("SELECT record FROM alert_rules ORDER BY name")
                    .fetch_all(&self.pool)
                    .await?;
                let rules = Arc::new(decode_rules(&rows)?);
                cache.fill(rules.clone(), generation);
                rules
            }
        };
        Ok(rules
            .iter()
            .filter(|rule| model.is_none_or(|model| rule.model == model))
            .cloned()
            .collect())
    }

    /// Forgets the cached rules after a write of one committed.
    fn rules_written(&self) {
        if let Some(cache) = &self.rules_cache {
            cache.written();
        }
    }

    /// Removes a rule and its alerts' states, in one transaction; false when there is none.
    /// Notifications already in the outbox are still delivered: they tell of what happened.
    pub async fn delete_alert_rule(&self, name: &str) -> Result<bool> {
        let mut transaction = self.writer.begin().await?;
        let deleted = sqlx::query("DELETE FROM alert_rules WHERE name = $1")
            .bind(name.to_owned())
            .execute(&mut *transaction)
            .await?;
        sqlx::query("DELETE FROM alert_states WHERE rule = $1")
            .bind(name.to_owned())
            .execute(&mut *transaction)
            .await?;
        let committed = transaction.commit().await;
        self.rules_written();
        committed?;
        Ok(deleted.rows_affected() == 1)
    }

    /// Stores a new webhook; false (and nothing written) when one of that name exists.
    pub async fn add_webhook(&self, record: &WebhookRecord) -> Result<bool> {
        let written = sqlx::query(
            "INSERT INTO webhooks (name, record) VALUES ($1, $2) ON CONFLICT (name) DO NOTHING",
        )
        .bind(record.name.clone())
        .bind(encode("webhooks", record)?)
        .execute(&self.writer)
        .await?;
        Ok(written.rows_affected() == 1)
    }

    pub async fn webhook(&self, name: &str) -> Result<Option<WebhookRecord>> {
        sqlx::query("SELECT record FROM webhooks WHERE name = $1")
            .bind(name.to_owned())
            .fetch_optional(&self.pool)
            .await?
            .map(|row| decode("webhooks", &blob(&row, 0)?))
            .transpose()
    }

    /// Every webhook, by name.
    pub async fn webhooks(&self) -> Result<Vec<WebhookRecord>> {
        sqlx::query("SELECT record FROM webhooks ORDER BY name")
            .fetch_all(&self.pool)
            .await?
            .iter()
            .map(|row| decode("webhooks", &blob(row, 0)?))
            .collect()
    }

    /// Removes a webhook, and moves what is pending for it to the dead-letter list, in one
    /// transaction; false when there is none.
    pub async fn delete_webhook(&self, name: &str, now: u64) -> Result<bool> {
        let mut transaction = self.writer.begin().await?;
        let deleted = sqlx::query("DELETE FROM webhooks WHERE name = $1")
            .bind(name.to_owned())
            .execute(&mut *transaction)
            .await?;
        sqlx::query(
            "UPDATE alert_outbox SET state = 'dead', done_at = $2, \
             last_error = 'its webhook was deleted' WHERE webhook = $1 AND state = 'pending'",
        )
        .bind(name.to_owned())
        .bind(int("time", now)?)
        .execute(&mut *transaction)
        .await?;
        transaction.commit().await?;
        Ok(deleted.rows_affected() == 1)
    }

    // Alert states.

    /// Every alert's state, by rule and key.
    pub async fn alert_states(&self) -> Result<Vec<AlertStateRecord>> {
        sqlx::query(
            "SELECT rule, alert_key, phase, since, held_since, firing_since FROM alert_states \
             ORDER BY rule, alert_key",
        )
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(state_record)
        .collect()
    }

    /// The states of one rule's alerts.
    pub async fn alert_states_of(&self, rule: &str) -> Result<Vec<AlertStateRecord>> {
        sqlx::query(
            "SELECT rule, alert_key, phase, since, held_since, firing_since FROM alert_states \
             WHERE rule = $1 ORDER BY alert_key",
        )
        .bind(rule.to_owned())
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(state_record)
        .collect()
    }

    /// Moves an alert from `expected` (None: never evaluated) to `next` and puts `outbox` in the
    /// outbox, in one transaction, only if the stored state is still `expected` (its phase and
    /// since): returns false, having written nothing, when another evaluation moved it first.
    /// A notification already in the outbox (same key and webhook) is not added again.
    pub async fn apply_alert_step(
        &self,
        expected: Option<&AlertStateRecord>,
        next: &AlertStateRecord,
        outbox: &[OutboxInsert],
        now: u64,
    ) -> Result<bool> {
        let mut transaction = self.writer.begin().await?;
        let moved = match expected {
            None => sqlx::query(
                "INSERT INTO alert_states \
                 (rule, alert_key, phase, since, held_since, firing_since) \
                 VALUES ($1, $2, $3, $4, $5, $6) ON CONFLICT (rule, alert_key) DO NOTHING",
            ),
            Some(_) => sqlx::query(
                "UPDATE alert_states SET phase = $3, since = $4, held_since = $5, \
                 firing_since = $6 WHERE rule = $1 AND alert_key = $2 AND phase = $7 \
                 AND since = $8",
            ),
        }
        .bind(next.rule.clone())
        .bind(next.alert_key.clone())
        .bind(next.phase.clone())
        .bind(int("time", next.since)?)
        .bind(int("time", next.held_since)?)
        .bind(int("time", next.firing_since)?);
        let moved = match expected {
            None => moved,
            Some(expected) => moved
                .bind(expected.phase.clone())
                .bind(int("time", expected.since)?),
        }
        .execute(&mut *transaction)
        .await?;
        if moved.rows_affected() != 1 {
            return Ok(false);
        }
        let now_ms = int("time", now.saturating_mul(1000))?;
        for insert in outbox {
            sqlx::query(
                "INSERT INTO alert_outbox (idempotency_key, webhook, kind, rule, alert_key, \
                 body, created, state, attempts, next_attempt_ms, claimed_by, claim_until_ms, \
                 last_status, last_error, done_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'pending', 0, $8, '', 0, 0, '', 0) \
                 ON CONFLICT (idempotency_key, webhook) DO NOTHING",
            )
            .bind(insert.idempotency_key.clone())
            .bind(insert.webhook.clone())
            .bind(insert.kind.clone())
            .bind(insert.rule.clone())
            .bind(insert.alert_key.clone())
            .bind(insert.body.clone())
            .bind(int("time", now)?)
            .bind(now_ms)
            .execute(&mut *transaction)
            .await?;
        }
        transaction.commit().await?;
        Ok(true)
    }

    // The outbox.

    /// The notifications due at `now_ms`: per webhook, its oldest pending one, if its time has
    /// come and no hub holds a claim on it. A webhook's notifications go out in the order they
    /// were made, so a receiver never sees an alert resolve before it fired.
    pub async fn due_deliveries(&self, now_ms: u64) -> Result<Vec<OutboxRecord>> {
        let now_ms = bound(now_ms);
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox o WHERE state = 'pending' \
             AND id = (SELECT MIN(id) FROM alert_outbox h \
                       WHERE h.webhook = o.webhook AND h.state = 'pending') \
             AND next_attempt_ms <= $1 AND claim_until_ms <= $1 ORDER BY id"
        )))
        .bind(now_ms)
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(outbox_record)
        .collect()
    }

    /// When the next notification may be tried, Unix milliseconds (of each webhook's oldest
    /// pending one only: the others wait for it); None when nothing is pending.
    pub async fn next_delivery_ms(&self) -> Result<Option<u64>> {
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT MIN(CASE WHEN claim_until_ms > next_attempt_ms THEN claim_until_ms \
             ELSE next_attempt_ms END) FROM alert_outbox o WHERE state = 'pending' \
             AND id = (SELECT MIN(id) FROM alert_outbox h \
                       WHERE h.webhook = o.webhook AND h.state = 'pending')",
        )
        .fetch_one(&self.pool)
        .await?;
        next.map(|next| uint("alert_outbox", next)).transpose()
    }

    /// Claims a pending notification for `holder` until `until_ms`, unless another holds an
    /// unexpired claim on it. One statement: of hubs claiming at once, one gets it.
    pub async fn claim_delivery(
        &self,
        id: u64,
        holder: &str,
        now_ms: u64,
        until_ms: u64,
    ) -> Result<bool> {
        let claimed = sqlx::query(
            "UPDATE alert_outbox SET claimed_by = $2, claim_until_ms = $3 \
             WHERE id = $1 AND state = 'pending' AND claim_until_ms <= $4",
        )
        .bind(int("outbox id", id)?)
        .bind(holder.to_owned())
        .bind(int("time", until_ms)?)
        .bind(int("time", now_ms)?)
        .execute(&self.writer)
        .await?;
        Ok(claimed.rows_affected() == 1)
    }

    /// Records how `holder`'s attempt at a notification ended, and gives its claim up. Nothing
    /// is written when the claim is no longer `holder`'s.
    pub async fn finish_delivery(
        &self,
        id: u64,
        holder: &str,
        outcome: &AttemptOutcome,
        now: u64,
    ) -> Result<()> {
        let (state, status, error, next_ms, done) = match outcome {
            AttemptOutcome::Delivered { status } => ("delivered", *status, "", 0, now),
            AttemptOutcome::Failed {
                status,
                error,
                retry_at_ms: Some(at),
            } => ("pending", status.unwrap_or(0), error.as_str(), *at, 0),
            AttemptOutcome::Failed {
                status,
                error,
                retry_at_ms: None,
            } => ("dead", status.unwrap_or(0), error.as_str(), 0, now),
        };
        sqlx::query(
            "UPDATE alert_outbox SET state = $3, attempts = attempts + 1, last_status = $4, \
             last_error = $5, next_attempt_ms = $6, done_at = $7, claimed_by = '', \
             claim_until_ms = 0 WHERE id = $1 AND claimed_by = $2",
        )
        .bind(int("outbox id", id)?)
        .bind(holder.to_owned())
        .bind(state)
        .bind(i64::from(status))
        .bind(error.to_owned())
        .bind(int("time", next_ms)?)
        .bind(int("time", done)?)
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Gives up every claim: on a store no other hub shares, at start, the claims of the
    /// process before (killed mid-delivery) need not be waited out.
    pub async fn release_delivery_claims(&self) -> Result<()> {
        sqlx::query(
            "UPDATE alert_outbox SET claimed_by = '', claim_until_ms = 0 \
             WHERE state = 'pending' AND claimed_by <> ''",
        )
        .execute(&self.writer)
        .await?;
        Ok(())
    }

    /// Notifications in `state`, newest first, at most `limit`.
    pub async fn outbox(&self, state: DeliveryState, limit: u64) -> Result<Vec<OutboxRecord>> {
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "SELECT {OUTBOX_COLUMNS} FROM alert_outbox WHERE state = $1 ORDER BY id DESC LIMIT $2"
        )))
        .bind(state.as_str())
        .bind(bound(limit))
        .fetch_all(&self.pool)
        .await?
        .iter()
        .map(outbox_record)
        .collect()
    }

    /// Puts a dead notification back in the outbox, due now, its attempts counted afresh; false
    /// when no dead notification has that id.
    pub async fn retry_dead(&self, id: u64, now_ms: u64) -> Result<bool> {
        let moved = sqlx::query(
            "UPDATE alert_outbox SET state = 'pending', attempts = 0, next_attempt_ms = $2, \
             done_at = 0, claimed_by = '', claim_until_ms = 0 \
             WHERE id = $1 AND state = 'dead' \
             AND webhook IN (SELECT name FROM webhooks)",
        )
        .bind(int("outbox id", id)?)
        .bind(int("time", now_ms)?)
        .execute(&self.writer)
        .await?;
        Ok(moved.rows_affected() == 1)
    }
}

/// The alert rules the rows of a query of `alert_rules`' records hold.
fn decode_rules(rows: &[AnyRow]) -> Result<Vec<AlertRuleRecord>> {
    rows.iter()
        .map(|row| decode("alert_rules", &blob(row, 0)?))
        .collect()
}
