//! Liveness, readiness and the Prometheus scrape.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;

/// Liveness: the process answers.
#[utoipa::path(get, path = "/health/live", responses((status = 200, description = "`{\"status\": \"live\"}`", body = Object)))]
pub async fn live() -> impl IntoResponse {
    Json(json!({"status": "live"}))
}

/// Ready when a model is served, the database answers and the server is not stopping.
/// Models are loaded and warmed before the port opens, so `models` is false only if the
/// last was removed.
#[utoipa::path(get, path = "/health/ready", responses(
    (status = 200, description = "ready: `{\"status\": \"ready\", \"models\": true, \"database\": true, \"stopping\": false}`", body = Object),
    (status = 503, description = "not ready: `status` is `not_ready` (no model served, or the database does not answer) or `stopping` (after SIGTERM)", body = Object)))]
pub async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let stopping = state.stopping.load(Ordering::SeqCst);
    let models = !state.model_list().is_empty();
    let database = state.store.ping().await;
    let (status, word) = match (stopping, models && database) {
        (true, _) => (StatusCode::SERVICE_UNAVAILABLE, "stopping"),
        (false, true) => (StatusCode::OK, "ready"),
        (false, false) => (StatusCode::SERVICE_UNAVAILABLE, "not_ready"),
    };
    (
        status,
        Json(json!({"status": word, "models": models, "database": database, "stopping": stopping})),
    )
}

/// Prometheus metrics, text exposition format.
#[utoipa::path(get, path = "/metrics", responses((status = 200, content_type = "text/plain", body = String)))]
pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    for (name, m) in state.model_list() {
        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "model" => name.clone()).set(m.engine.in_flight() as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
