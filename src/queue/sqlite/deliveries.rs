//! The SQLite side of webhook deliveries (`JobQueue::{claim,record}_delivery…`): single
//! autocommit statements, times in application milliseconds, like the jobs.

use std::time::Duration;

use sqlx::Row;
use sqlx::sqlite::SqliteRow;
use uuid::Uuid;

use super::{SqliteQueue, bounded_ms, id_text, now_ms, opt_time, time};
use crate::queue::deliveries::{delivery_state, parse_event, short_error};
use crate::queue::{Delivery, DeliveryOutcome, DeliveryRecord, QueueError, QueueResult};

/// The columns a [`Delivery`] is built from.
const CLAIM_COLUMNS: &str = "id, job_id, event, url, created_at, attempts, lease_owner, payload";

/// The columns a [`DeliveryRecord`] is built from.
const RECORD_COLUMNS: &str = "id, event, attempts, last_status, last_error, last_attempt_at, \
     next_attempt_at, delivered_at, failed_at, created_at";

impl SqliteQueue {
    pub(super) async fn claim_deliveries_impl(
        &self,
        owner: &str,
        lease: Duration,
        limit: u32,
    ) -> QueueResult<Vec<Delivery>> {
        let sql = format!(
            "UPDATE webhook_deliveries SET attempts = attempts + 1, lease_owner = ?1, \
                 lease_expires_at = ?2 + ?3 \
             WHERE id IN (SELECT id FROM webhook_deliveries \
                          WHERE delivered_at IS NULL AND failed_at IS NULL \
                            AND next_attempt_at <= ?2 \
                            AND (lease_expires_at IS NULL OR lease_expires_at < ?2) \
                          ORDER BY next_attempt_at, id LIMIT ?4) \
             RETURNING {CLAIM_COLUMNS}"
        );
        self.check_file()?;
        let rows = sqlx::query(&sql)
            .bind(owner)
            .bind(now_ms())
            .bind(bounded_ms(lease))
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
        let now = now_ms();
        // (status, error, next_attempt_at, delivered_at, failed_at)
        let (status, error, next, delivered, failed) = match outcome {
            DeliveryOutcome::Delivered { status } => (Some(*status), None, None, Some(now), None),
            DeliveryOutcome::Retry {
                status,
                error,
                after,
            } => (
                *status,
                Some(short_error(error)),
                Some(now + bounded_ms(*after)),
                None,
                None,
            ),
            DeliveryOutcome::GaveUp { status, error } => {
                (*status, Some(short_error(error)), None, None, Some(now))
            }
        };
        let done = sqlx::query(
            "UPDATE webhook_deliveries SET lease_owner = NULL, lease_expires_at = NULL, \
                 payload = coalesce(payload, ?4), last_status = ?5, last_error = ?6, \
                 last_attempt_at = ?7, next_attempt_at = coalesce(?8, next_attempt_at), \
                 delivered_at = ?9, failed_at = ?10 \
             WHERE id = ?1 AND lease_owner = ?2 AND attempts = ?3 \
               AND delivered_at IS NULL AND failed_at IS NULL",
        )
        .bind(&d.id)
        .bind(&d.owner)
        .bind(d.attempts)
        .bind(payload)
        .bind(status.map(i64::from))
        .bind(error)
        .bind(now)
        .bind(next)
        .bind(delivered)
        .bind(failed)
        .execute(&self.pool)
        .await?;
        Ok(done.rows_affected() == 1)
    }

    pub(super) async fn deliveries_impl(&self, job_id: Uuid) -> QueueResult<Vec<DeliveryRecord>> {
        let rows = sqlx::query(&format!(
            "SELECT {RECORD_COLUMNS} FROM webhook_deliveries WHERE job_id = ?1 \
             ORDER BY created_at, rowid"
        ))
        .bind(id_text(job_id))
        .fetch_all(&self.pool)
        .await?;
        rows.iter().map(record_from_row).collect()
    }
}

fn delivery_from_row(row: &SqliteRow) -> QueueResult<Delivery> {
    let job_id: String = row.try_get("job_id")?;
    Ok(Delivery {
        id: row.try_get("id")?,
        job_id: Uuid::parse_str(&job_id)
            .map_err(|e| QueueError::Corrupt(format!("delivery job_id {job_id:?}: {e}")))?,
        event: parse_event(&row.try_get::<String, _>("event")?)?,
        url: row.try_get("url")?,
        created_at: time("created_at", row.try_get("created_at")?)?,
        attempts: row.try_get::<i64, _>("attempts")? as i32,
        owner: row.try_get("lease_owner")?,
        payload: row.try_get("payload")?,
    })
}

fn record_from_row(row: &SqliteRow) -> QueueResult<DeliveryRecord> {
    let delivered_at = opt_time(row, "delivered_at")?;
    let failed_at = opt_time(row, "failed_at")?;
    let state = delivery_state(delivered_at.is_some(), failed_at.is_some());
    Ok(DeliveryRecord {
        id: row.try_get("id")?,
        event: parse_event(&row.try_get::<String, _>("event")?)?,
        state,
        attempts: row.try_get::<i64, _>("attempts")? as i32,
        last_status: row
            .try_get::<Option<i64>, _>("last_status")?
            .map(|s| s as i32),
        last_error: row.try_get("last_error")?,
        last_attempt_at: opt_time(row, "last_attempt_at")?,
        next_attempt_at: if state == crate::queue::DeliveryState::Pending {
            opt_time(row, "next_attempt_at")?
        } else {
            None
        },
        delivered_at,
        created_at: time("created_at", row.try_get("created_at")?)?,
    })
}
