//! The alert tables: rules, channels, alerts and deliveries, written once for both backends with
//! [`on_db!`](crate::store::db). What they mean is [`crate::alerts`]'s.

use serde_json::{Value, json};
use sqlx::QueryBuilder;

use super::cursor::PageCursor;
use super::scope::{Rows, push_scope_condition};
use super::{Db, Scope, StoreError, format_timestamp_ms, sealed};
use crate::model::alerts::{ChannelSpec, RuleSpec, Severity};
use crate::store::db::on_db;

/// A stored rule.
#[derive(Debug, Clone, PartialEq)]
pub struct RuleRecord {
    pub rule_id: i64,
    pub spec: RuleSpec,
    pub suppressed_total: i64,
    pub created_by: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl RuleRecord {
    /// The API's form: the rule's fields with its id and bookkeeping.
    pub fn to_json(&self) -> Value {
        let mut v = serde_json::to_value(&self.spec).unwrap_or_else(|_| json!({}));
        if let Some(o) = v.as_object_mut() {
            o.insert("rule_id".into(), self.rule_id.into());
            o.insert("suppressed_total".into(), self.suppressed_total.into());
            o.insert("created_by".into(), self.created_by.clone().into());
            o.insert("created_at_ms".into(), self.created_at_ms.into());
            o.insert("updated_at_ms".into(), self.updated_at_ms.into());
        }
        v
    }
}

/// A stored channel.
#[derive(Debug, Clone, PartialEq)]
pub struct ChannelRecord {
    pub channel_id: i64,
    pub spec: ChannelSpec,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

impl ChannelRecord {
    /// The API's form, without secrets.
    pub fn to_json(&self) -> Value {
        let mut v = self.spec.redacted();
        if let Some(o) = v.as_object_mut() {
            o.insert("channel_id".into(), self.channel_id.into());
            o.insert("max_attempts".into(), self.spec.max_attempts().into());
            o.insert("created_at_ms".into(), self.created_at_ms.into());
            o.insert("updated_at_ms".into(), self.updated_at_ms.into());
        }
        v
    }
}

/// An alert as stored.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Alert {
    pub alert_id: i64,
    pub rule_id: i64,
    pub rule_name: String,
    pub severity: String,
    pub state: String,
    pub subject: String,
    pub device_id: Option<String>,
    pub camera: Option<String>,
    pub title: String,
    pub details: String,
    pub count: i64,
    pub opened_at_ms: i64,
    pub last_seen_ms: i64,
    pub acknowledged_at_ms: Option<i64>,
    pub acknowledged_by: Option<String>,
    pub resolved_at_ms: Option<i64>,
    pub resolved_by: Option<String>,
    pub escalated_at_ms: Option<i64>,
}

const ALERT_COLS: &str = "alert_id, rule_id, rule_name, severity, state, subject, device_id, camera, title, details, \
     count, opened_at_ms, last_seen_ms, acknowledged_at_ms, acknowledged_by, resolved_at_ms, resolved_by, \
     escalated_at_ms";

impl Alert {
    /// The public JSON form (API, bus, notifications).
    pub fn to_json(&self) -> Value {
        json!({
            "alert_id": self.alert_id,
            "rule_id": self.rule_id,
            "rule_name": self.rule_name,
            "severity": self.severity,
            "state": self.state,
            "subject": self.subject,
            "device_id": self.device_id,
            "camera": self.camera,
            "title": self.title,
            "details": serde_json::from_str::<Value>(&self.details).unwrap_or(Value::Null),
            "count": self.count,
            "opened_at": format_timestamp_ms(self.opened_at_ms),
            "opened_at_ms": self.opened_at_ms,
            "last_seen_ms": self.last_seen_ms,
            "acknowledged_at_ms": self.acknowledged_at_ms,
            "acknowledged_by": self.acknowledged_by,
            "resolved_at_ms": self.resolved_at_ms,
            "resolved_by": self.resolved_by,
            "escalated_at_ms": self.escalated_at_ms,
        })
    }
}

/// What [`AlertStore::fire`] did.
#[derive(Debug, Clone, PartialEq)]
pub enum Fired {
    /// A new alert, with its deliveries queued.
    Opened(Alert),
    /// The firing was folded into an alert that is not resolved.
    Bumped(Alert),
}

/// A firing to record.
#[derive(Debug, Clone)]
pub struct Firing<'a> {
    pub rule_id: i64,
    pub rule_name: &'a str,
    pub severity: Severity,
    pub subject: &'a str,
    pub device_id: Option<&'a str>,
    pub camera: Option<&'a str>,
    pub title: &'a str,
    pub details: &'a Value,
    /// Fold into an unresolved alert whose latest firing is at or after this (None: any).
    pub dedupe_since_ms: Option<i64>,
    /// Channels to notify when an alert opens.
    pub channels: &'a [i64],
}

/// A delivery with what is needed to attempt it.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Delivery {
    pub delivery_id: i64,
    pub alert_id: i64,
    pub channel_id: i64,
    pub reason: String,
    pub state: String,
    pub attempts: i64,
    pub round_start: i64,
    pub next_attempt_ms: i64,
    pub payload: String,
    pub last_error: Option<String>,
    pub created_at_ms: i64,
    pub updated_at_ms: i64,
}

const DELIVERY_COLS: &str = "delivery_id, alert_id, channel_id, reason, state, attempts, round_start, \
     next_attempt_ms, payload, last_error, created_at_ms, updated_at_ms";

impl Delivery {
    pub fn to_json(&self) -> Value {
        json!({
            "delivery_id": self.delivery_id,
            "alert_id": self.alert_id,
            "channel_id": self.channel_id,
            "reason": self.reason,
            "state": self.state,
            "attempts": self.attempts,
            "next_attempt_ms": if self.state == "pending" { Some(self.next_attempt_ms) } else { None },
            "last_error": self.last_error,
            "created_at_ms": self.created_at_ms,
            "updated_at_ms": self.updated_at_ms,
        })
    }
}

/// One attempt of a delivery.
#[derive(Debug, Clone, PartialEq, sqlx::FromRow)]
pub struct Attempt {
    pub attempt_id: i64,
    pub delivery_id: i64,
    pub alert_id: i64,
    pub channel_id: i64,
    pub attempt: i64,
    pub at_ms: i64,
    pub outcome: String,
    pub http_status: Option<i64>,
    pub error: Option<String>,
    pub latency_ms: i64,
}

impl Attempt {
    pub fn to_json(&self) -> Value {
        json!({
            "delivery_id": self.delivery_id,
            "alert_id": self.alert_id,
            "channel_id": self.channel_id,
            "attempt": self.attempt,
            "at_ms": self.at_ms,
            "at": format_timestamp_ms(self.at_ms),
            "outcome": self.outcome,
            "http_status": self.http_status,
            "error": self.error,
            "latency_ms": self.latency_ms,
        })
    }
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub struct AttemptResult {
    pub delivered: bool,
    /// No retry can succeed (a 4xx other than 408/429, a channel that no longer exists).
    pub permanent: bool,
    pub http_status: Option<u16>,
    pub error: Option<String>,
    pub latency_ms: i64,
}

/// Filters and page of [`AlertStore::list_alerts`].
#[derive(Debug, Clone, Default)]
pub struct AlertQuery {
    pub state: Option<String>,
    pub severity: Option<String>,
    pub rule_id: Option<i64>,
    pub device: Option<String>,
    pub camera: Option<String>,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub limit: u32,
    pub cursor: Option<String>,
    pub scope: Scope,
}

/// A page of alerts, newest first.
#[derive(Debug, Clone)]
pub struct AlertPage {
    pub alerts: Vec<Alert>,
    pub next_cursor: Option<String>,
}

fn corrupt(what: &str, e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(format!("{what}: {e}"))
}

fn to_text<T: serde::Serialize>(v: &T) -> Result<String, StoreError> {
    serde_json::to_string(v).map_err(|e| StoreError::InvalidData(e.to_string()))
}

#[derive(sqlx::FromRow)]
struct RuleRow {
    rule_id: i64,
    spec: String,
    suppressed_total: i64,
    created_by: Option<String>,
    created_at_ms: i64,
    updated_at_ms: i64,
}

#[derive(sqlx::FromRow)]
struct ChannelRow {
    channel_id: i64,
    spec: String,
    created_at_ms: i64,
    updated_at_ms: i64,
}

fn rule_from_row(
    RuleRow { rule_id, spec, suppressed_total, created_by, created_at_ms, updated_at_ms }: RuleRow,
) -> Result<RuleRecord, StoreError> {
    let spec = serde_json::from_str(&spec).map_err(|e| corrupt(&format!("alert rule {rule_id}"), e))?;
    Ok(RuleRecord { rule_id, spec, suppressed_total, created_by, created_at_ms, updated_at_ms })
}

fn channel_from_row(
    db: &Db,
    ChannelRow { channel_id, spec, created_at_ms, updated_at_ms }: ChannelRow,
) -> Result<ChannelRecord, StoreError> {
    let spec = sealed::open(db, sealed::CHANNEL_CONTEXT, &spec)?;
    let spec = serde_json::from_str(&spec).map_err(|e| corrupt(&format!("alert channel {channel_id}"), e))?;
    Ok(ChannelRecord { channel_id, spec, created_at_ms, updated_at_ms })
}

/// Alert storage on either backend.
#[derive(Debug, Clone)]
pub struct AlertStore {
    db: Db,
}

impl AlertStore {
    pub fn new(db: Db) -> Self {
        Self { db }
    }

    // -- Rules -----------------------------------------------------------------------------------

    pub async fn list_rules(&self) -> Result<Vec<RuleRecord>, StoreError> {
        let rows: Vec<RuleRow> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT rule_id, spec, suppressed_total, created_by, created_at_ms, updated_at_ms FROM alert_rules ORDER BY rule_id"
        ).fetch_all(pool).await)?;
        rows.into_iter().map(rule_from_row).collect()
    }

    pub async fn get_rule(&self, rule_id: i64) -> Result<RuleRecord, StoreError> {
        let row: Option<RuleRow> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT rule_id, spec, suppressed_total, created_by, created_at_ms, updated_at_ms FROM alert_rules WHERE rule_id = $1"
        ).bind(rule_id).fetch_optional(pool).await)?;
        row.map(rule_from_row).transpose()?.ok_or_else(|| StoreError::NotFound(format!("alert rule {rule_id}")))
    }

    pub async fn create_rule(&self, spec: &RuleSpec, by: Option<&str>, now_ms: i64) -> Result<RuleRecord, StoreError> {
        let text = to_text(spec)?;
        let id: i64 = on_db!(self.db.write(), pool => sqlx::query_scalar(
            "INSERT INTO alert_rules (name, enabled, spec, created_by, created_at_ms, updated_at_ms) \
             VALUES ($1, $2, $3, $4, $5, $5) RETURNING rule_id"
        ).bind(&spec.name).bind(i64::from(spec.enabled)).bind(&text).bind(by).bind(now_ms).fetch_one(pool).await)?;
        self.get_rule(id).await
    }

    pub async fn update_rule(&self, rule_id: i64, spec: &RuleSpec, now_ms: i64) -> Result<RuleRecord, StoreError> {
        let text = to_text(spec)?;
        let n = on_db!(self.db.write(), pool => sqlx::query(
            "UPDATE alert_rules SET name = $1, enabled = $2, spec = $3, updated_at_ms = $4 WHERE rule_id = $5"
        ).bind(&spec.name).bind(i64::from(spec.enabled)).bind(&text).bind(now_ms).bind(rule_id).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("alert rule {rule_id}")));
        }
        self.get_rule(rule_id).await
    }

    pub async fn delete_rule(&self, rule_id: i64) -> Result<(), StoreError> {
        let n = on_db!(self.db.write(), pool => sqlx::query("DELETE FROM alert_rules WHERE rule_id = $1")
            .bind(rule_id).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("alert rule {rule_id}")));
        }
        Ok(())
    }

    /// Counts a firing that suppression kept from opening an alert.
    pub async fn count_suppressed(&self, rule_id: i64) -> Result<(), StoreError> {
        on_db!(self.db.write(), pool => sqlx::query(
            "UPDATE alert_rules SET suppressed_total = suppressed_total + 1 WHERE rule_id = $1"
        ).bind(rule_id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    // -- Channels --------------------------------------------------------------------------------

    pub async fn list_channels(&self) -> Result<Vec<ChannelRecord>, StoreError> {
        let rows: Vec<ChannelRow> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT channel_id, spec, created_at_ms, updated_at_ms FROM alert_channels ORDER BY channel_id"
        ).fetch_all(pool).await)?;
        rows.into_iter().map(|r| channel_from_row(&self.db, r)).collect()
    }

    pub async fn get_channel(&self, channel_id: i64) -> Result<ChannelRecord, StoreError> {
        let row: Option<ChannelRow> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT channel_id, spec, created_at_ms, updated_at_ms FROM alert_channels WHERE channel_id = $1"
        ).bind(channel_id).fetch_optional(pool).await)?;
        row.map(|r| channel_from_row(&self.db, r))
            .transpose()?
            .ok_or_else(|| StoreError::NotFound(format!("alert channel {channel_id}")))
    }

    pub async fn create_channel(&self, spec: &ChannelSpec, now_ms: i64) -> Result<ChannelRecord, StoreError> {
        let text = sealed::seal(&self.db, sealed::CHANNEL_CONTEXT, &to_text(spec)?)?;
        let id: i64 = on_db!(self.db.write(), pool => sqlx::query_scalar(
            "INSERT INTO alert_channels (name, kind, spec, created_at_ms, updated_at_ms) VALUES ($1, $2, $3, $4, $4) \
             RETURNING channel_id"
        ).bind(&spec.name).bind(spec.target.kind()).bind(&text).bind(now_ms).fetch_one(pool).await)?;
        self.get_channel(id).await
    }

    pub async fn update_channel(
        &self,
        channel_id: i64,
        spec: &ChannelSpec,
        now_ms: i64,
    ) -> Result<ChannelRecord, StoreError> {
        let text = sealed::seal(&self.db, sealed::CHANNEL_CONTEXT, &to_text(spec)?)?;
        let n = on_db!(self.db.write(), pool => sqlx::query(
            "UPDATE alert_channels SET name = $1, kind = $2, spec = $3, updated_at_ms = $4 WHERE channel_id = $5"
        ).bind(&spec.name).bind(spec.target.kind()).bind(&text).bind(now_ms).bind(channel_id).execute(pool).await.map(|r| r.rows_affected()))?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("alert channel {channel_id}")));
        }
        self.get_channel(channel_id).await
    }

    /// Deletes a channel no rule names (409 otherwise).
    pub async fn delete_channel(&self, channel_id: i64) -> Result<(), StoreError> {
        self.get_channel(channel_id).await?;
        let users: Vec<i64> = self
            .list_rules()
            .await?
            .into_iter()
            .filter(|r| r.spec.channel_refs().iter().any(|(_, c)| *c == channel_id))
            .map(|r| r.rule_id)
            .collect();
        if !users.is_empty() {
            return Err(StoreError::Conflict(format!("alert channel {channel_id} is used by the rules {users:?}")));
        }
        on_db!(self.db.write(), pool => sqlx::query("DELETE FROM alert_channels WHERE channel_id = $1")
            .bind(channel_id).execute(pool).await.map(|_| ()))?;
        Ok(())
    }

    /// The ids among `ids` that name no channel.
    pub async fn missing_channels(&self, ids: &[i64]) -> Result<Vec<i64>, StoreError> {
        let existing: Vec<i64> = on_db!(self.db.read(), pool => sqlx::query_scalar(
            "SELECT channel_id FROM alert_channels"
        ).fetch_all(pool).await)?;
        Ok(ids.iter().copied().filter(|id| !existing.contains(id)).collect())
    }

    // -- Alerts ----------------------------------------------------------------------------------

    /// Records a firing: folds it into an unresolved alert of the same rule and subject (see
    /// [`Firing::dedupe_since_ms`]) or opens an alert and queues its deliveries, in one
    /// transaction.
    pub async fn fire(&self, f: &Firing<'_>, now_ms: i64) -> Result<Fired, StoreError> {
        let details = to_text(f.details)?;
        let payload_of = |alert: &Alert| to_text(&json!({ "event": "alert.opened", "alert": alert.to_json() }));
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let existing: Option<i64> = sqlx::query_scalar(
                "SELECT alert_id FROM alerts WHERE rule_id = $1 AND subject = $2 AND state <> 'resolved' \
                 AND last_seen_ms >= $3 ORDER BY alert_id DESC LIMIT 1"
            ).bind(f.rule_id).bind(f.subject).bind(f.dedupe_since_ms.unwrap_or(i64::MIN)).fetch_optional(&mut *tx).await?;
            let fired = if let Some(id) = existing {
                let alert: Alert = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "UPDATE alerts SET count = count + 1, last_seen_ms = $1 WHERE alert_id = $2 RETURNING {ALERT_COLS}"
                ))).bind(now_ms).bind(id).fetch_one(&mut *tx).await?;
                Fired::Bumped(alert)
            } else {
                let alert: Alert = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                    "INSERT INTO alerts (rule_id, rule_name, severity, state, subject, device_id, camera, title, details, \
                     count, opened_at_ms, last_seen_ms) VALUES ($1, $2, $3, 'open', $4, $5, $6, $7, $8, 1, $9, $9) \
                     RETURNING {ALERT_COLS}"
                ))).bind(f.rule_id).bind(f.rule_name).bind(f.severity.as_str()).bind(f.subject).bind(f.device_id)
                  .bind(f.camera).bind(f.title).bind(&details).bind(now_ms).fetch_one(&mut *tx).await?;
                let payload = payload_of(&alert)?;
                for channel in f.channels {
                    sqlx::query(
                        "INSERT INTO alert_deliveries (alert_id, channel_id, reason, state, next_attempt_ms, payload, \
                         created_at_ms, updated_at_ms) VALUES ($1, $2, 'opened', 'pending', $3, $4, $3, $3)"
                    ).bind(alert.alert_id).bind(*channel).bind(now_ms).bind(&payload).execute(&mut *tx).await?;
                }
                Fired::Opened(alert)
            };
            tx.commit().await?;
            Ok::<_, StoreError>(fired)
        })
    }

    /// Resolves, as `system`, the unresolved alerts of a rule and subject (a device condition
    /// that cleared); returns them.
    pub async fn resolve_cleared(&self, rule_id: i64, subject: &str, now_ms: i64) -> Result<Vec<Alert>, StoreError> {
        let alerts: Vec<Alert> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE alerts SET state = 'resolved', resolved_at_ms = $1, resolved_by = 'system' \
             WHERE rule_id = $2 AND subject = $3 AND state <> 'resolved' RETURNING {ALERT_COLS}"
        ))).bind(now_ms).bind(rule_id).bind(subject).fetch_all(pool).await)?;
        Ok(alerts)
    }

    /// The unresolved alerts of a rule (for the device conditions' periodic check).
    pub async fn unresolved_subjects(&self, rule_id: i64) -> Result<Vec<String>, StoreError> {
        let subjects: Vec<String> = on_db!(self.db.read(), pool => sqlx::query_scalar(
            "SELECT DISTINCT subject FROM alerts WHERE rule_id = $1 AND state <> 'resolved'"
        ).bind(rule_id).fetch_all(pool).await)?;
        Ok(subjects)
    }

    /// One alert, if the scope sees it.
    pub async fn get_alert(&self, alert_id: i64, scope: &Scope) -> Result<Alert, StoreError> {
        let not_found = || StoreError::NotFound(format!("alert {alert_id}"));
        let alert: Option<Alert> = on_db!(self.db.read(), pool => {
            let mut qb = QueryBuilder::new(format!("SELECT {ALERT_COLS} FROM alerts WHERE alert_id = "));
            qb.push_bind(alert_id);
            push_scope_condition(&mut qb, scope, "alerts", Rows::CameraOrDevice);
            qb.build_query_as().fetch_optional(pool).await
        })?;
        alert.ok_or_else(not_found)
    }

    /// Alerts, newest first, filtered and paginated.
    pub async fn list_alerts(&self, q: &AlertQuery) -> Result<AlertPage, StoreError> {
        let cursor = q.cursor.as_deref().map(PageCursor::decode_position).transpose()?;
        let texts = [&q.device, &q.camera, &q.state, &q.severity];
        if texts.into_iter().flatten().any(|s| s.contains('\0')) {
            return Ok(AlertPage { alerts: Vec::new(), next_cursor: None });
        }
        let mut rows: Vec<Alert> = on_db!(self.db.read(), pool => {
            let mut qb = QueryBuilder::new(format!("SELECT {ALERT_COLS} FROM alerts WHERE 1 = 1"));
            for (column, value) in [("state", &q.state), ("severity", &q.severity), ("device_id", &q.device), ("camera", &q.camera)] {
                if let Some(v) = value {
                    qb.push(" AND ").push(column).push(" = ").push_bind(v.as_str());
                }
            }
            if let Some(r) = q.rule_id {
                qb.push(" AND rule_id = ").push_bind(r);
            }
            if let Some(t) = q.from_ms {
                qb.push(" AND opened_at_ms >= ").push_bind(t);
            }
            if let Some(t) = q.to_ms {
                qb.push(" AND opened_at_ms < ").push_bind(t);
            }
            push_scope_condition(&mut qb, &q.scope, "alerts", Rows::CameraOrDevice);
            if let Some(PageCursor { key_ms: t, id }) = cursor {
                qb.push(" AND (opened_at_ms < ").push_bind(t).push(" OR (opened_at_ms = ").push_bind(t)
                    .push(" AND alert_id < ").push_bind(id).push("))");
            }
            qb.push(" ORDER BY opened_at_ms DESC, alert_id DESC LIMIT ").push_bind(i64::from(q.limit) + 1);
            qb.build_query_as().fetch_all(pool).await
        })?;
        let more = rows.len() > q.limit as usize;
        rows.truncate(q.limit as usize);
        let next_cursor = match rows.last() {
            Some(last) if more => Some(PageCursor::new(last.opened_at_ms, last.alert_id).encode_position()),
            _ => None,
        };
        Ok(AlertPage { alerts: rows, next_cursor })
    }

    /// Acknowledges an open alert (409 when it is not open).
    pub async fn acknowledge(&self, alert_id: i64, by: &str, now_ms: i64, scope: &Scope) -> Result<Alert, StoreError> {
        let current = self.get_alert(alert_id, scope).await?;
        if current.state != "open" {
            return Err(StoreError::Conflict(format!("alert {alert_id} is {}", current.state)));
        }
        let alert: Option<Alert> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE alerts SET state = 'acknowledged', acknowledged_at_ms = $1, acknowledged_by = $2 \
             WHERE alert_id = $3 AND state = 'open' RETURNING {ALERT_COLS}"
        ))).bind(now_ms).bind(by).bind(alert_id).fetch_optional(pool).await)?;
        alert.ok_or_else(|| StoreError::Conflict(format!("alert {alert_id} is no longer open")))
    }

    /// Resolves an alert that is not resolved yet (409 when it is).
    pub async fn resolve(&self, alert_id: i64, by: &str, now_ms: i64, scope: &Scope) -> Result<Alert, StoreError> {
        let current = self.get_alert(alert_id, scope).await?;
        if current.state == "resolved" {
            return Err(StoreError::Conflict(format!("alert {alert_id} is already resolved")));
        }
        let alert: Option<Alert> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE alerts SET state = 'resolved', resolved_at_ms = $1, resolved_by = $2 \
             WHERE alert_id = $3 AND state <> 'resolved' RETURNING {ALERT_COLS}"
        ))).bind(now_ms).bind(by).bind(alert_id).fetch_optional(pool).await)?;
        alert.ok_or_else(|| StoreError::Conflict(format!("alert {alert_id} is already resolved")))
    }

    /// Escalates the open (unacknowledged), unescalated critical alerts of a rule opened at or
    /// before `opened_before_ms`: marks each escalated and queues its deliveries to `channels`,
    /// once. Returns the escalated alerts.
    pub async fn escalate_due(
        &self,
        rule_id: i64,
        opened_before_ms: i64,
        channels: &[i64],
        now_ms: i64,
    ) -> Result<Vec<Alert>, StoreError> {
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            let alerts: Vec<Alert> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
                "UPDATE alerts SET escalated_at_ms = $1 WHERE rule_id = $2 AND state = 'open' AND severity = 'critical' \
                 AND escalated_at_ms IS NULL AND opened_at_ms <= $3 RETURNING {ALERT_COLS}"
            ))).bind(now_ms).bind(rule_id).bind(opened_before_ms).fetch_all(&mut *tx).await?;
            for alert in &alerts {
                let payload = to_text(&json!({ "event": "alert.escalated", "alert": alert.to_json() }))?;
                for channel in channels {
                    sqlx::query(
                        "INSERT INTO alert_deliveries (alert_id, channel_id, reason, state, next_attempt_ms, payload, \
                         created_at_ms, updated_at_ms) VALUES ($1, $2, 'escalated', 'pending', $3, $4, $3, $3)"
                    ).bind(alert.alert_id).bind(*channel).bind(now_ms).bind(&payload).execute(&mut *tx).await?;
                }
            }
            tx.commit().await?;
            Ok::<_, StoreError>(alerts)
        })
    }

    // -- Deliveries ------------------------------------------------------------------------------

    /// Takes up to `limit` due pending deliveries: each is leased (its next attempt pushed to
    /// `lease_until_ms`) so that no other worker takes it while it is attempted, and a crash
    /// mid-attempt retries it when the lease ends.
    pub async fn claim_due(&self, now_ms: i64, lease_until_ms: i64, limit: i64) -> Result<Vec<Delivery>, StoreError> {
        let claimed: Vec<Delivery> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE alert_deliveries SET next_attempt_ms = $1 WHERE delivery_id IN (SELECT delivery_id FROM alert_deliveries \
             WHERE state = 'pending' AND next_attempt_ms <= $2 ORDER BY next_attempt_ms, delivery_id LIMIT $3) \
             AND state = 'pending' AND next_attempt_ms <= $2 RETURNING {DELIVERY_COLS}"
        ))).bind(lease_until_ms).bind(now_ms).bind(limit).fetch_all(pool).await)?;
        Ok(claimed)
    }

    /// When the earliest pending delivery is due, if any.
    pub async fn next_due_ms(&self) -> Result<Option<i64>, StoreError> {
        let t: Option<i64> = on_db!(self.db.read(), pool => sqlx::query_scalar(
            "SELECT MIN(next_attempt_ms) FROM alert_deliveries WHERE state = 'pending'"
        ).fetch_one(pool).await)?;
        Ok(t)
    }

    /// Records an attempt and moves the delivery on: delivered, dead (permanent failure or the
    /// channel's attempts used up), or pending again at `retry_at_ms`. Returns the new state.
    pub async fn record_attempt(
        &self,
        d: &Delivery,
        result: &AttemptResult,
        max_attempts: u32,
        retry_at_ms: i64,
        now_ms: i64,
    ) -> Result<&'static str, StoreError> {
        let attempt = d.attempts + 1;
        let state = if result.delivered {
            "delivered"
        } else if result.permanent || attempt - d.round_start >= i64::from(max_attempts) {
            "dead"
        } else {
            "pending"
        };
        let outcome = match state {
            "delivered" => "delivered",
            "dead" => "dead",
            _ => "retry",
        };
        let error = result.error.as_deref().map(|e| e.chars().take(500).collect::<String>());
        on_db!(self.db.write(), pool => {
            let mut tx = pool.begin().await?;
            sqlx::query(
                "INSERT INTO alert_delivery_attempts (delivery_id, alert_id, channel_id, attempt, at_ms, outcome, \
                 http_status, error, latency_ms) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
            ).bind(d.delivery_id).bind(d.alert_id).bind(d.channel_id).bind(attempt).bind(now_ms).bind(outcome)
             .bind(result.http_status.map(i64::from)).bind(error.as_deref()).bind(result.latency_ms).execute(&mut *tx).await?;
            sqlx::query(
                "UPDATE alert_deliveries SET state = $1, attempts = $2, next_attempt_ms = $3, last_error = $4, \
                 updated_at_ms = $5 WHERE delivery_id = $6"
            ).bind(state).bind(attempt).bind(retry_at_ms).bind(error.as_deref()).bind(now_ms).bind(d.delivery_id)
             .execute(&mut *tx).await?;
            tx.commit().await?;
            Ok::<_, StoreError>(())
        })?;
        Ok(state)
    }

    /// The deliveries of an alert with their attempts.
    pub async fn deliveries_of(&self, alert_id: i64) -> Result<Vec<(Delivery, Vec<Attempt>)>, StoreError> {
        let deliveries: Vec<Delivery> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLS} FROM alert_deliveries WHERE alert_id = $1 ORDER BY delivery_id"
        ))).bind(alert_id).fetch_all(pool).await)?;
        let attempts: Vec<Attempt> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT attempt_id, delivery_id, alert_id, channel_id, attempt, at_ms, outcome, http_status, error, latency_ms \
             FROM alert_delivery_attempts WHERE alert_id = $1 ORDER BY attempt_id"
        ).bind(alert_id).fetch_all(pool).await)?;
        Ok(deliveries
            .into_iter()
            .map(|d| {
                let mine = attempts.iter().filter(|a| a.delivery_id == d.delivery_id).cloned().collect();
                (d, mine)
            })
            .collect())
    }

    /// Dead-lettered deliveries, newest first (at most `limit`).
    pub async fn dead_letters(&self, limit: u32) -> Result<Vec<Delivery>, StoreError> {
        let rows: Vec<Delivery> = on_db!(self.db.read(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "SELECT {DELIVERY_COLS} FROM alert_deliveries WHERE state = 'dead' ORDER BY updated_at_ms DESC, delivery_id DESC LIMIT $1"
        ))).bind(i64::from(limit)).fetch_all(pool).await)?;
        Ok(rows)
    }

    /// Puts a dead delivery back in the queue with a fresh round of attempts (409 when it is not
    /// dead).
    pub async fn retry_dead(&self, delivery_id: i64, now_ms: i64) -> Result<Delivery, StoreError> {
        let row: Option<Delivery> = on_db!(self.db.write(), pool => sqlx::query_as(sqlx::AssertSqlSafe(format!(
            "UPDATE alert_deliveries SET state = 'pending', round_start = attempts, next_attempt_ms = $1, updated_at_ms = $1 \
             WHERE delivery_id = $2 AND state = 'dead' RETURNING {DELIVERY_COLS}"
        ))).bind(now_ms).bind(delivery_id).fetch_optional(pool).await)?;
        match row {
            Some(d) => Ok(d),
            None => {
                let exists: Option<String> = on_db!(self.db.read(), pool => sqlx::query_scalar(
                    "SELECT state FROM alert_deliveries WHERE delivery_id = $1"
                ).bind(delivery_id).fetch_optional(pool).await)?;
                Err(match exists {
                    Some(state) => StoreError::Conflict(format!("delivery {delivery_id} is {state}, not dead")),
                    None => StoreError::NotFound(format!("delivery {delivery_id}")),
                })
            }
        }
    }

    /// Device ids with when they were last seen.
    pub async fn devices_last_seen(&self) -> Result<Vec<(String, i64)>, StoreError> {
        let rows: Vec<(String, i64)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id, last_seen_ms FROM devices WHERE disabled_at_ms IS NULL"
        ).fetch_all(pool).await)?;
        Ok(rows)
    }

    /// Cameras with their effective site: (device, camera, site).
    pub async fn camera_sites(&self) -> Result<Vec<(String, String, Option<String>)>, StoreError> {
        let rows: Vec<(String, String, Option<String>)> = on_db!(self.db.read(), pool => sqlx::query_as(
            "SELECT device_id, camera, site_id FROM cameras"
        ).fetch_all(pool).await)?;
        Ok(rows)
    }
}
