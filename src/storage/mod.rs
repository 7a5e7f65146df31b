//! Inspection records in SQLite (embedded default) or PostgreSQL, chosen by the URL,
//! through one code path (sqlx's `Any` driver with runtime queries), plus a blob store
//! for the images.

pub mod blobs;
pub mod jobs;

use serde::{Deserialize, Serialize};
use sqlx::any::{AnyConnectOptions, AnyPoolOptions};
use sqlx::{AnyPool, Row};
use std::str::FromStr;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migration(#[from] sqlx::migrate::MigrateError),
    #[error("stored record is malformed: {0}")]
    Malformed(String),
    /// A row that a unique rule refuses (a second unfinished job for one model name).
    #[error("{0}")]
    Conflict(String),
    /// An inspection whose idempotency key another record of its model already holds.
    #[error("an inspection with idempotency key {0:?} is already recorded")]
    KeyTaken(String),
    /// A file the database URL (or `PGSSL*`) names that cannot be read.
    #[error("{0}")]
    Config(String),
}

impl StoreError {
    /// True when the database could not be reached, or is still starting: worth trying
    /// again, unlike a refused login, a failed migration or a certificate that fails.
    pub fn is_unreachable(&self) -> bool {
        match self {
            // A TLS handshake that fails (a certificate no trusted root signs, a host name
            // it does not name) reaches sqlx as an I/O error of this kind, and will fail
            // the same way on every try.
            StoreError::Database(sqlx::Error::Io(e)) => e.kind() != std::io::ErrorKind::InvalidData,
            StoreError::Database(sqlx::Error::PoolTimedOut) => true,
            // PostgreSQL's "the database system is starting up" / "shutting down".
            StoreError::Database(sqlx::Error::Database(d)) => matches!(d.code().as_deref(), Some("57P03" | "57P01")),
            _ => false,
        }
    }
}

/// The certificate and key files a PostgreSQL URL names (`sslrootcert`, `sslcert`,
/// `sslkey` and their other spellings, or `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY`), each
/// checked readable before connecting: sqlx reports a missing one as "No such file or
/// directory" without its path, as an I/O error that reads like a server not up yet, and
/// a missing file does not appear by waiting. Certificates given inline (PEM text) are
/// sqlx's to check.
fn check_tls_files(url: &str) -> Result<(), StoreError> {
    // A URL sqlx could parse is a URL `url` parses.
    let Ok(parsed) = url::Url::parse(url) else {
        return Ok(());
    };
    let canonical = |key: &str| match key {
        "sslrootcert" | "ssl-root-cert" | "ssl-ca" => Some("sslrootcert"),
        "sslcert" | "ssl-cert" => Some("sslcert"),
        "sslkey" | "ssl-key" => Some("sslkey"),
        _ => None,
    };
    let (mut named, mut in_url) = (Vec::new(), Vec::new());
    for (key, value) in parsed.query_pairs() {
        if let Some(param) = canonical(&key) {
            in_url.push(param);
            named.push((format!("the database URL's {key}"), value.into_owned()));
        }
    }
    // sqlx starts from these variables and lets the URL override them.
    for (var, param) in [
        ("PGSSLROOTCERT", "sslrootcert"),
        ("PGSSLCERT", "sslcert"),
        ("PGSSLKEY", "sslkey"),
    ] {
        match std::env::var(var) {
            Ok(value) if !in_url.contains(&param) => named.push((var.to_string(), value)),
            _ => {}
        }
    }
    for (source, value) in named {
        if value.trim_start().starts_with("-----BEGIN") {
            continue;
        }
        if let Err(e) = std::fs::File::open(&value) {
            return Err(StoreError::Config(format!(
                "{source} names {value}, which cannot be read: {e}"
            )));
        }
    }
    Ok(())
}

/// An operator's label of an inspection (`good` or `defective`) and the note given with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Feedback {
    pub label: String,
    pub note: Option<String>,
}

/// One stored inspection.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Record {
    pub id: String,
    pub model: String,
    pub model_version: String,
    /// Unix time in microseconds.
    pub created_at: i64,
    pub score: f64,
    pub threshold: f64,
    pub is_anomalous: bool,
    pub width: i64,
    pub height: i64,
    /// JSON array of regions.
    pub regions: serde_json::Value,
    /// JSON object of timings in milliseconds.
    pub timings: serde_json::Value,
    pub image_sha256: String,
    pub image_path: Option<String>,
    pub request_id: Option<String>,
    pub part_id: Option<String>,
    /// The request's weight of the first of two learned maps (`?alpha=`), when it set one.
    #[serde(default)]
    pub alpha: Option<f64>,
    /// The pixel threshold its regions were cut at; absent in rows older than the column.
    #[serde(default)]
    pub pixel_threshold: Option<f64>,
    /// The request's `Idempotency-Key`, when it sent one (unique among the model's records).
    #[serde(default)]
    pub idempotency_key: Option<String>,
    /// What a retry with the same key must match: see `api::idempotency::fingerprint`.
    #[serde(default)]
    pub request_fingerprint: Option<String>,
    /// Why the verdict may not mean what it says (empty in rows older than the column).
    #[serde(default)]
    pub warnings: Vec<String>,
    /// What its maps depend on (`ModelCard::maps_version`), when known.
    #[serde(default)]
    pub maps_version: Option<String>,
}

/// Filters for listing, newest first.
#[derive(Debug, Clone, Default)]
pub struct ListQuery {
    pub model: Option<String>,
    pub anomalous: Option<bool>,
    pub part_id: Option<String>,
    /// The record of the request sent with this `X-Request-Id`.
    pub request_id: Option<String>,
    /// Part ids that start with this (case-sensitive): a lot, a line, a day's prefix.
    pub part_prefix: Option<String>,
    /// Only records with this feedback label (`good`, `defective`), or with none (`none`).
    pub feedback: Option<FeedbackFilter>,
    pub since_us: Option<i64>,
    pub until_us: Option<i64>,
    /// Return records with ids below this one (the previous page's last id).
    pub before_id: Option<String>,
    pub limit: i64,
}

/// Which records [`ListQuery::feedback`] keeps.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FeedbackFilter {
    Good,
    Defective,
    Unlabelled,
}

/// Feedback counts for one model.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct FeedbackStats {
    pub labelled: i64,
    pub false_positives: i64,
    pub false_negatives: i64,
    /// Every labelled inspection's score and label, with what made it.
    pub labelled_scores: Vec<LabelledScore>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelledScore {
    pub score: f64,
    pub defective: bool,
    pub model_version: String,
    pub maps_version: Option<String>,
}

#[derive(Clone)]
pub struct Store {
    pool: AnyPool,
    pub backend: &'static str,
}

/// How long opening the database may take before it counts as not answering.
const CONNECT_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

impl Store {
    /// Connects (creating an SQLite file if needed) and runs the migrations.
    /// SQLite runs in WAL mode with `synchronous = FULL`: a committed row survives a crash.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        sqlx::any::install_default_drivers();
        let sqlite = url.starts_with("sqlite:");
        let url = if sqlite && !url.contains("mode=") {
            format!("{url}{}mode=rwc", if url.contains('?') { "&" } else { "?" })
        } else {
            url.to_string()
        };
        let opts = AnyConnectOptions::from_str(&url)?;
        if !sqlite {
            check_tls_files(&url)?;
        }
        let mut pool = AnyPoolOptions::new().max_connections(if sqlite { 4 } else { 8 });
        if sqlite {
            pool = pool.after_connect(|conn, _| {
                Box::pin(async move {
                    sqlx::query("PRAGMA journal_mode = WAL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA synchronous = FULL").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA busy_timeout = 5000").execute(&mut *conn).await?;
                    sqlx::query("PRAGMA foreign_keys = ON").execute(&mut *conn).await?;
                    Ok(())
                })
            });
        }
        // The pool retries a server that refuses (one still starting) until the timeout,
        // then says only "pool timed out": one connection made directly then says why.
        let connecting = pool.acquire_timeout(CONNECT_TIMEOUT).connect_with(opts.clone());
        let pool = match tokio::time::timeout(2 * CONNECT_TIMEOUT, connecting)
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
        {
            Err(sqlx::Error::PoolTimedOut) => {
                // Bounded too: a server (or a firewall) that accepts the connection and
                // never answers would hold the start for good.
                let direct = <sqlx::AnyConnection as sqlx::Connection>::connect_with(&opts);
                let cause = match tokio::time::timeout(CONNECT_TIMEOUT, direct).await {
                    Ok(connected) => connected.err(),
                    Err(_) => Some(sqlx::Error::Io(std::io::Error::new(
                        std::io::ErrorKind::TimedOut,
                        format!(
                            "the database server took the connection but did not answer within {} s",
                            CONNECT_TIMEOUT.as_secs()
                        ),
                    ))),
                };
                return Err(cause.unwrap_or(sqlx::Error::PoolTimedOut).into());
            }
            pool => pool?,
        };
        MIGRATOR.run(&pool).await?;
        Ok(Self {
            pool,
            backend: if sqlite { "sqlite" } else { "postgres" },
        })
    }

    /// True when the database answers.
    pub async fn ping(&self) -> bool {
        self.check().await.is_ok()
    }

    /// One round trip to the database.
    pub async fn check(&self) -> Result<(), StoreError> {
        sqlx::query("SELECT 1").execute(&self.pool).await?;
        Ok(())
    }

    /// Inserts a record in a transaction; returns once it is committed.
    pub async fn insert(&self, r: &Record) -> Result<(), StoreError> {
        // A missing value is written as a literal NULL, not bound: sqlx 0.8's `Any` driver
        // declares a NULL double as PostgreSQL float4, and that declaration stays with the
        // cached statement, so the next row's real float8 would be refused ("incorrect
        // binary data format"). Each combination of present values has its own text.
        let optional = [r.alpha, r.pixel_threshold];
        let mut next = 20;
        let placeholders: Vec<String> = optional
            .iter()
            .map(|v| match v {
                Some(_) => {
                    next += 1;
                    format!("${}", next - 1)
                }
                None => "NULL".into(),
            })
            .collect();
        let sql = format!(
            "INSERT INTO inspections (id, model, model_version, created_at, score, threshold, verdict, width, \
             height, regions, timings, image_sha256, image_path, request_id, part_id, idempotency_key, \
             request_fingerprint, warnings, maps_version, alpha, pixel_threshold) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $19, {})",
            placeholders.join(", ")
        );
        let mut tx = self.pool.begin().await?;
        let mut query = sqlx::query(&sql)
            .bind(&r.id)
            .bind(&r.model)
            .bind(&r.model_version)
            .bind(r.created_at)
            .bind(r.score)
            .bind(r.threshold)
            .bind(if r.is_anomalous { "anomalous" } else { "normal" })
            .bind(r.width)
            .bind(r.height)
            .bind(r.regions.to_string())
            .bind(r.timings.to_string())
            .bind(&r.image_sha256)
            .bind(r.image_path.clone())
            .bind(r.request_id.clone())
            .bind(r.part_id.clone())
            .bind(r.idempotency_key.clone())
            .bind(r.request_fingerprint.clone())
            .bind((!r.warnings.is_empty()).then(|| serde_json::to_string(&r.warnings).expect("strings serialise")))
            .bind(r.maps_version.clone());
        for value in optional.into_iter().flatten() {
            query = query.bind(value);
        }
        query.execute(&mut *tx).await.map_err(|e| match e {
            // PostgreSQL names the index; SQLite names the columns in its message.
            sqlx::Error::Database(d)
                if d.kind() == sqlx::error::ErrorKind::UniqueViolation
                    && match d.constraint() {
                        Some(index) => index == "inspections_idempotency_key",
                        None => d.message().contains("inspections.idempotency_key"),
                    } =>
            {
                StoreError::KeyTaken(r.idempotency_key.clone().unwrap_or_default())
            }
            other => other.into(),
        })?;
        tx.commit().await?;
        Ok(())
    }

    pub async fn get(&self, id: &str) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(&format!("SELECT {COLUMNS} FROM inspections WHERE id = $1"))
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// The record of the request sent to `model` with this `Idempotency-Key`, if any.
    pub async fn by_idempotency_key(&self, model: &str, key: &str) -> Result<Option<Record>, StoreError> {
        let row = sqlx::query(&format!(
            "SELECT {COLUMNS} FROM inspections WHERE model = $1 AND idempotency_key = $2"
        ))
        .bind(model.to_string())
        .bind(key.to_string())
        .fetch_optional(&self.pool)
        .await?;
        row.map(|r| from_row(&r)).transpose()
    }

    /// Records matching `q`, newest first.
    pub async fn list(&self, q: &ListQuery) -> Result<Vec<Record>, StoreError> {
        let mut sql = format!("SELECT {COLUMNS} FROM inspections WHERE 1 = 1");
        let mut n = 0;
        let mut next = || {
            n += 1;
            format!("${n}")
        };
        if q.model.is_some() {
            sql += &format!(" AND model = {}", next());
        }
        if q.anomalous.is_some() {
            sql += &format!(" AND verdict = {}", next());
        }
        if q.part_id.is_some() {
            sql += &format!(" AND part_id = {}", next());
        }
        if q.request_id.is_some() {
            sql += &format!(" AND request_id = {}", next());
        }
        if q.part_prefix.is_some() {
            // A position rather than LIKE: no wildcards to escape, and case-sensitive on
            // both databases (SQLite's LIKE ignores ASCII case, PostgreSQL's does not).
            let position = if self.backend == "sqlite" { "instr" } else { "strpos" };
            sql += &format!(" AND {position}(part_id, {}) = 1", next());
        }
        match q.feedback {
            Some(FeedbackFilter::Good) | Some(FeedbackFilter::Defective) => {
                sql += &format!(
                    " AND id IN (SELECT inspection_id FROM feedback WHERE label = {})",
                    next()
                );
            }
            Some(FeedbackFilter::Unlabelled) => sql += " AND id NOT IN (SELECT inspection_id FROM feedback)",
            None => {}
        }
        if q.since_us.is_some() {
            sql += &format!(" AND created_at >= {}", next());
        }
        if q.until_us.is_some() {
            sql += &format!(" AND created_at < {}", next());
        }
        if q.before_id.is_some() {
            sql += &format!(" AND id < {}", next());
        }
        sql += &format!(" ORDER BY id DESC LIMIT {}", next());
        let mut query = sqlx::query(&sql);
        if let Some(m) = &q.model {
            query = query.bind(m.clone());
        }
        if let Some(a) = q.anomalous {
            query = query.bind(if a { "anomalous" } else { "normal" });
        }
        if let Some(p) = &q.part_id {
            query = query.bind(p.clone());
        }
        if let Some(r) = &q.request_id {
            query = query.bind(r.clone());
        }
        if let Some(p) = &q.part_prefix {
            query = query.bind(p.clone());
        }
        match q.feedback {
            Some(FeedbackFilter::Good) => query = query.bind("good"),
            Some(FeedbackFilter::Defective) => query = query.bind("defective"),
            _ => {}
        }
        if let Some(s) = q.since_us {
            query = query.bind(s);
        }
        if let Some(u) = q.until_us {
            query = query.bind(u);
        }
        if let Some(b) = &q.before_id {
            query = query.bind(b.clone());
        }
        query = query.bind(q.limit);
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter().map(from_row).collect()
    }

    /// The operator's labels (`good` / `defective`) and notes of those of `ids` that have one.
    pub async fn labels_of(&self, ids: &[String]) -> Result<std::collections::HashMap<String, Feedback>, StoreError> {
        if ids.is_empty() {
            return Ok(Default::default());
        }
        let placeholders: Vec<String> = (1..=ids.len()).map(|i| format!("${i}")).collect();
        let sql = format!(
            "SELECT inspection_id, label, note FROM feedback WHERE inspection_id IN ({})",
            placeholders.join(", ")
        );
        let mut query = sqlx::query(&sql);
        for id in ids {
            query = query.bind(id.clone());
        }
        let rows = query.fetch_all(&self.pool).await?;
        rows.iter()
            .map(|r| {
                let feedback = Feedback {
                    label: r.try_get(1)?,
                    note: r.try_get(2)?,
                };
                Ok((r.try_get::<String, _>(0)?, feedback))
            })
            .collect()
    }

    /// Stores (or replaces) an operator's label for an inspection. False when the
    /// inspection does not exist.
    pub async fn set_feedback(
        &self,
        id: &str,
        defective: bool,
        note: Option<&str>,
        now_us: i64,
    ) -> Result<bool, StoreError> {
        // One statement (no read-then-write transaction, which SQLite in WAL mode can
        // refuse under concurrent inserts); the foreign key tells a missing inspection.
        let result = sqlx::query(
            "INSERT INTO feedback (inspection_id, label, note, created_at) VALUES ($1, $2, $3, $4) \
             ON CONFLICT (inspection_id) DO UPDATE SET label = excluded.label, note = excluded.note, created_at = excluded.created_at",
        )
        .bind(id)
        .bind(if defective { "defective" } else { "good" })
        .bind(note.map(str::to_string))
        .bind(now_us)
        .execute(&self.pool)
        .await;
        match result {
            Ok(_) => Ok(true),
            Err(sqlx::Error::Database(e)) if e.kind() == sqlx::error::ErrorKind::ForeignKeyViolation => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// The operator's label of an inspection, if any.
    pub async fn feedback_of(&self, id: &str) -> Result<Option<Feedback>, StoreError> {
        let row = sqlx::query("SELECT label, note FROM feedback WHERE inspection_id = $1")
            .bind(id)
            .fetch_optional(&self.pool)
            .await?;
        Ok(row.map(|r| Feedback {
            label: r.get(0),
            note: r.get(1),
        }))
    }

    /// Feedback counts for `model`.
    pub async fn feedback_stats(&self, model: &str) -> Result<FeedbackStats, StoreError> {
        let rows = sqlx::query(
            "SELECT i.score, i.verdict, f.label, i.model_version, i.maps_version FROM feedback f \
             JOIN inspections i ON i.id = f.inspection_id WHERE i.model = $1",
        )
        .bind(model)
        .fetch_all(&self.pool)
        .await?;
        let mut s = FeedbackStats::default();
        for r in rows {
            let score: f64 = r.get(0);
            let anomalous = r.get::<String, _>(1) == "anomalous";
            let defective = r.get::<String, _>(2) == "defective";
            s.labelled += 1;
            s.false_positives += (anomalous && !defective) as i64;
            s.false_negatives += (!anomalous && defective) as i64;
            s.labelled_scores.push(LabelledScore {
                score,
                defective,
                model_version: r.try_get(3)?,
                maps_version: r.try_get(4)?,
            });
        }
        Ok(s)
    }

    /// Deletes the `batch` oldest records created before `cutoff_us`, in one statement
    /// (their feedback goes with them, by the foreign key's cascade). Returns how many
    /// were deleted and the stored image paths of exactly those. In batches because
    /// retention turned on over a long backlog must not hold SQLite's write lock for
    /// longer than an inspection waits for it (5 s).
    pub async fn prune_batch(&self, cutoff_us: i64, batch: i64) -> Result<Pruned, StoreError> {
        let rows = sqlx::query(
            "DELETE FROM inspections WHERE id IN \
             (SELECT id FROM inspections WHERE created_at < $1 ORDER BY created_at, id LIMIT $2) \
             RETURNING image_path",
        )
        .bind(cutoff_us)
        .bind(batch.max(1))
        .fetch_all(&self.pool)
        .await?;
        Ok(Pruned {
            records: rows.len(),
            images: rows
                .iter()
                .map(|r| r.try_get::<Option<String>, _>(0))
                .collect::<Result<Vec<_>, _>>()?
                .into_iter()
                .flatten()
                .collect(),
        })
    }

    /// Closes every connection; later queries fail (used to test the database-down path).
    pub async fn close(&self) {
        if self.backend == "sqlite" {
            // Folds the write-ahead log into the database file and empties it, so that a
            // copy of the file alone holds every record. Closing the last connection would
            // do the same, but not when one is still being closed as the process exits.
            if let Err(e) = sqlx::query("PRAGMA wal_checkpoint(TRUNCATE)").execute(&self.pool).await {
                tracing::warn!(error = %e, "could not fold the write-ahead log into the database");
            }
        }
        self.pool.close().await;
    }

    pub async fn count(&self) -> Result<i64, StoreError> {
        Ok(sqlx::query("SELECT COUNT(*) FROM inspections")
            .fetch_one(&self.pool)
            .await?
            .get::<i64, _>(0))
    }
}

/// What one [`Store::prune_batch`] deleted.
#[derive(Debug, Default)]
pub struct Pruned {
    pub records: usize,
    /// The stored image paths of those records (records kept without one have none).
    pub images: Vec<String>,
}

const COLUMNS: &str = "id, model, model_version, created_at, score, threshold, verdict, width, height, regions, \
                       timings, image_sha256, image_path, request_id, part_id, alpha, pixel_threshold, \
                       idempotency_key, request_fingerprint, warnings, maps_version";

fn from_row(r: &sqlx::any::AnyRow) -> Result<Record, StoreError> {
    let json = |i: usize| -> Result<serde_json::Value, StoreError> {
        serde_json::from_str(&r.try_get::<String, _>(i)?).map_err(|e| StoreError::Malformed(e.to_string()))
    };
    Ok(Record {
        id: r.try_get(0)?,
        model: r.try_get(1)?,
        model_version: r.try_get(2)?,
        created_at: r.try_get(3)?,
        score: r.try_get(4)?,
        threshold: r.try_get(5)?,
        is_anomalous: r.try_get::<String, _>(6)? == "anomalous",
        width: r.try_get(7)?,
        height: r.try_get(8)?,
        regions: json(9)?,
        timings: json(10)?,
        image_sha256: r.try_get(11)?,
        image_path: r.try_get(12)?,
        request_id: r.try_get(13)?,
        part_id: r.try_get(14)?,
        alpha: r.try_get(15)?,
        pixel_threshold: r.try_get(16)?,
        idempotency_key: r.try_get(17)?,
        request_fingerprint: r.try_get(18)?,
        warnings: match r.try_get::<Option<String>, _>(19)? {
            Some(text) => serde_json::from_str(&text).map_err(|e| StoreError::Malformed(e.to_string()))?,
            None => Vec::new(),
        },
        maps_version: r.try_get(20)?,
    })
}
