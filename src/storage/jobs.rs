//! Training jobs' rows: what was asked, and how it ended. Progress lives in memory.

use serde::{Deserialize, Serialize};
use sqlx::Row;

use super::{Store, StoreError};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobRow {
    pub id: String,
    pub model: String,
    pub status: String,
    pub message: Option<String>,
    /// The `vigil train` flags, as a JSON array of strings.
    pub options: String,
    pub data: String,
    pub created_at: i64,
    pub finished_at: Option<i64>,
}

const COLUMNS: &str = "id, model, status, message, options, data, created_at, finished_at";

fn from_row(r: &sqlx::any::AnyRow) -> Result<JobRow, sqlx::Error> {
    Ok(JobRow {
        id: r.try_get(0)?,
        model: r.try_get(1)?,
        status: r.try_get(2)?,
        message: r.try_get(3)?,
        options: r.try_get(4)?,
        data: r.try_get(5)?,
        created_at: r.try_get(6)?,
        finished_at: r.try_get(7)?,
    })
}

impl Store {
    pub async fn insert_job(&self, j: &JobRow) -> Result<(), StoreError> {
        sqlx::query(&format!(
            "INSERT INTO training_jobs ({COLUMNS}, heartbeat_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
        ))
        .bind(j.id.clone())
        .bind(j.model.clone())
        .bind(j.status.clone())
        .bind(j.message.clone())
        .bind(j.options.clone())
        .bind(j.data.clone())
        .bind(j.created_at)
        .bind(j.finished_at)
        .bind(j.created_at)
        .execute(&self.pool)
        .await
        .map_err(|e| match e {
            sqlx::Error::Database(d) if d.kind() == sqlx::error::ErrorKind::UniqueViolation => {
                StoreError::Conflict(format!("a job is already queued or running for {:?}", j.model))
            }
            other => other.into(),
        })?;
        Ok(())
    }

    pub async fn set_job_status(
        &self,
        id: &str,
        status: &str,
        message: Option<&str>,
        finished_at: Option<i64>,
    ) -> Result<(), StoreError> {
        sqlx::query("UPDATE training_jobs SET status = $1, message = $2, finished_at = $3 WHERE id = $4")
            .bind(status.to_string())
            .bind(message.map(str::to_string))
            .bind(finished_at)
            .bind(id.to_string())
            .execute(&self.pool)
            .await?;
        Ok(())
    }

    pub async fn job(&self, id: &str) -> Result<Option<JobRow>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM training_jobs WHERE id = $1"))
            .bind(id.to_string())
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| from_row(&r)).transpose()?)
    }

    /// The newest `limit` jobs, newest first.
    pub async fn jobs(&self, limit: i64) -> Result<Vec<JobRow>, StoreError> {
        let rows = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM training_jobs ORDER BY id DESC LIMIT $1"
        ))
        .bind(limit)
        .fetch_all(&self.pool)
        .await?;
        Ok(rows.iter().map(from_row).collect::<Result<_, _>>()?)
    }

    /// Jobs left queued or running by a process that stopped cannot resume: marks them
    /// failed (`interrupted`). With `quiet_since`, only those whose process last said it
    /// was alive ([`Store::heartbeat_jobs`]) before then: other replicas sharing the
    /// database may be training theirs. Returns how many.
    pub async fn interrupt_abandoned_jobs(&self, now_us: i64, quiet_since: Option<i64>) -> Result<u64, StoreError> {
        let r = sqlx::query(
            "UPDATE training_jobs SET status = 'failed', message = 'interrupted: the server stopped before the job finished', \
             finished_at = $1 WHERE status IN ('queued', 'running') AND COALESCE(heartbeat_at, created_at) < $2",
        )
        .bind(now_us)
        .bind(quiet_since.unwrap_or(i64::MAX))
        .execute(&self.pool)
        .await?;
        Ok(r.rows_affected())
    }

    /// Says that this process still has `ids` queued or running.
    pub async fn heartbeat_jobs(&self, ids: &[String], now_us: i64) -> Result<(), StoreError> {
        for id in ids {
            sqlx::query("UPDATE training_jobs SET heartbeat_at = $1 WHERE id = $2 AND status IN ('queued', 'running')")
                .bind(now_us)
                .bind(id.clone())
                .execute(&self.pool)
                .await?;
        }
        Ok(())
    }
}
