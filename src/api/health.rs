//! Liveness, readiness and the Prometheus scrape.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::json;

use super::AppState;

pub async fn live() -> impl IntoResponse {
    Json(json!({"status": "live"}))
}

/// Ready when every model is warm and the database answers.
pub async fn ready(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let models = state.ready.load(Ordering::SeqCst);
    let database = state.store.ping().await;
    let status = if models && database {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(
            json!({"status": if status == StatusCode::OK { "ready" } else { "not_ready" }, "models": models, "database": database}),
        ),
    )
}

pub async fn metrics(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    for (name, m) in state.model_list() {
        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "model" => name.clone()).set(m.engine.in_flight() as f64);
    }
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
}
