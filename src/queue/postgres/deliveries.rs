//! The Postgres side of webhook deliveries (`JobQueue::{claim,record}_delivery…`): the claim
//! skips rows other processes hold (`FOR UPDATE SKIP LOCKED`), every time is the database's.

use std::time::Duration;

use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::PostgresQueue;
use crate::queue::deliveries::{delivery_state, parse_event, short_error};
use crate::queue::state;
use crate::queue::{Delivery, DeliveryOutcome, DeliveryRecord, DeliveryState, QueueResult};

/// The columns a [`Delivery`] is built from.
const CLAIM_COLUMNS: &str = "id, job_id, event, url, created_at, attempts, lease_owner, payload";

/// The columns a [`DeliveryRecord`] is built from.
const RECORD_COLUMNS: &str = "id, event, attempts, last_status, last_error, last_attempt_at, \
     next_attempt_at, delivered_at, failed_at, created_at";

impl PostgresQueue {
    pub(super) async fn claim_deliveries_impl(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> QueueResult<Vec<Delivery>> {
        let sql = format!(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_owner = $1, \
                 lease_expires_at = now() + make_interval(secs => $2) \
             WHERE id IN (SELECT id FROM webhook_deliveries \
                          WHERE delivered_at IS NULL AND failed_at IS NULL \
                            AND next_attempt_at <= now() \
                            AND (lease_expires_at IS NULL OR lease_expires_at < now()) \
                          ORDER BY next_attempt_at, id LIMIT $3 \
                          FOR UPDATE SKIP LOCKED) \
             RETURNING {CLAIM_COLUMNS}"
        );
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(state::duration_secs(lease))
            .bind(i64::from(limit))
            .fetch_all(&self.pool)
            .await?;
        rows.iter().map(delivery_from_row).collect()
    }

    pub(super) async fn record_delivery_impl(
        &self,
        d: &Delivery,
        payload: &str,
        outcome: &DeliveryOutcome,
    ) -> QueueResult<bool> {
        // (status, error, retry delay in seconds, delivered, failed)
        let (status, error, after, delivered, failed) = match outcome {
            DeliveryOutcome::Delivered { status } => (Some(*status), None, None, true, false),
            DeliveryOutcome::Retry {
                status,
                error,
                after,
            } => (
                *status,
                Some(short_error(error)),
                Some(state::duration_secs(*after)),
                false,
                false,
            ),
            DeliveryOutcome::GaveUp { status, error } => {
                (*status, Some(short_error(error)), None, false, true)
            }
        };
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET lease_owner = NULL, lease_expires_at = NULL, \
                 payload = coalesce(payload, $4), last_status = $5, last_error = $6, \
                 last_attempt_at = now(), \
                 next_attempt_at = CASE WHEN $7::float8 IS NULL THEN next_attempt_at \
                                        ELSE now() + make_interval(secs => $7::float8) END, \
                 delivered_at = CASE WHEN $8 THEN now() END, \
                 failed_at = CASE WHEN $9 THEN now() END \
             WHERE id = $1 AND lease_owner = $2 AND attempts = $3 \
               AND delivered_at IS NULL AND failed_at IS NULL",
        )
        .bind(&d.id)
        .bind(&d.owner)
        .bind(d.attempts)
        .bind(payload)
        .bind(status.map(i32::from))
        .bind(error)
        .bind(after)
        .bind(delivered)
        .bind(failed)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn deliveries_impl(&self, job_id: Uuid) -> QueueResult<Vec<DeliveryRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM webhook_deliveries WHERE job_id = $1 \
             ORDER BY created_at, id"
        ))
        .bind(job_id)
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
    }
}

fn delivery_from_row(row: &PgRow) -> QueueResult<Delivery> {
    Ok(Delivery {
        id: row.try_get("id")?,
        job_id: row.try_get("job_id")?,
        event: parse_event(&row.try_get::<String, _>("event")?)?,
        url: row.try_get("url")?,
        created_at: row.try_get("created_at")?,
        attempts: row.try_get("attempts")?,
        owner: row.try_get("lease_owner")?,
        payload: row.try_get("payload")?,
    })
}

fn record_from_row(row: &PgRow) -> QueueResult<DeliveryRecord> {
    let delivered_at: Option<chrono::DateTime<chrono::Utc>> = row.try_get("delivered_at")?;
    let failed_at: Option<chrono::DateTime<chrono::Utc>> = row.try_get("failed_at")?;
    let state = delivery_state(delivered_at.is_some(), failed_at.is_some());
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        event: parse_event(&row.try_get::<String, _>("event")?)?,
        state,
        attempts: row.try_get("attempts")?,
        last_status: row.try_get("last_status")?,
        last_error: row.try_get("last_error")?,
        last_attempt_at: row.try_get("last_attempt_at")?,
        next_attempt_at: if state == DeliveryState::Pending {
            row.try_get("next_attempt_at")?
        } else {
            None
        },
        delivered_at,
        created_at: row.try_get("created_at")?,
    })
}
