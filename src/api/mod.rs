//! HTTP routes. Handlers decode, hand the model work to the engine, score off the async
//! workers, record, and answer; errors become JSON in `error`.

pub mod auth;
pub mod browser;
pub mod budget;
pub mod discovery;
pub mod docs;
pub mod error;
pub mod health;
pub mod idempotency;
pub mod inspect;
pub mod judge;
pub mod live;
pub mod models;
pub mod records;
pub mod training;
pub mod types;
pub mod ui;
pub mod upload;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::Response;
use axum::routing::{get, post};
use axum::Router;
use metrics_exporter_prometheus::PrometheusHandle;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::timeout::RequestBodyTimeoutLayer;
use tower_http::trace::TraceLayer;

use crate::engine::Engine;
use crate::storage::blobs::BlobStore;
use crate::storage::Store;

/// Request limits and options.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_body_bytes: usize,
    pub max_pixels: u64,
    pub request_timeout: Duration,
    /// The longest pause while a request body arrives.
    pub body_timeout: Duration,
    /// The longest wait for a request's headers, from the moment the connection is ready
    /// for them (so also how long a keep-alive connection may stay idle).
    pub header_timeout: Duration,
    /// After SIGTERM: how long the server stays reachable, answering, while readiness is
    /// already 503 (for load balancers to notice).
    pub shutdown_delay: Duration,
    /// After that: how long requests in flight may take before their connections close.
    pub drain_timeout: Duration,
    pub store_images: bool,
    /// Where a training job's `folder` must lie (canonical), when set.
    pub training_root: Option<PathBuf>,
    /// Pixels held at full resolution at once, across requests (see [`budget`]).
    pub pixel_budget: budget::PixelBudget,
    /// Engine settings for models added while serving (trained by a job).
    pub max_batch: usize,
    pub queue_capacity: usize,
}

/// A served model: its engine and the artifact it came from.
pub struct ServedModel {
    pub engine: Arc<Engine>,
    pub dir: PathBuf,
    /// Held while a reload loads the artifact, so reloads run one at a time.
    pub reload: tokio::sync::Mutex<()>,
}

/// The model `POST /v1/inspect` uses when none is named `default`: the only one served,
/// if there is exactly one.
pub fn fallback_default_model<T>(models: &BTreeMap<String, T>) -> Option<String> {
    if models.contains_key("default") || models.len() != 1 {
        return None;
    }
    models.keys().next().cloned()
}

pub struct AppState {
    /// Served models by name. A lock, not a plain map, so a model trained by the server
    /// joins without a restart; held only to look a model up or add one.
    pub models: std::sync::RwLock<BTreeMap<String, Arc<ServedModel>>>,
    /// The model `POST /v1/inspect` falls back to when none is named `default`: the only
    /// model served at start, if there was one (see [`AppState::default_model_name`]).
    pub default_model: Option<String>,
    pub store: Store,
    pub blobs: BlobStore,
    pub limits: Limits,
    pub keys: Option<auth::ApiKeys>,
    pub metrics: PrometheusHandle,
    pub device: candle_core::Device,
    /// Set on SIGTERM: readiness answers 503 and every answer closes its connection.
    pub stopping: AtomicBool,
    pub live: live::LiveStats,
    /// Where models live: trained models are written here.
    pub models_dir: PathBuf,
    pub training: training::JobBoard,
    /// Model folders that appeared while serving and failed to load.
    pub discovery: discovery::Discovery,
    /// Idempotency keys being judged by this server.
    pub idempotency: idempotency::KeysInFlight,
}

impl AppState {
    pub fn model(&self, name: &str) -> Result<Arc<ServedModel>, crate::api::error::ApiError> {
        self.models
            .read()
            .expect("models lock")
            .get(name)
            .cloned()
            .ok_or_else(|| crate::api::error::ApiError::UnknownModel(name.to_string()))
    }

    /// The model behind `POST /v1/inspect`: the one named `default` (also one a training
    /// job adds later), else the only model served at start. None when several are served
    /// and none is named `default`: a guess could change silently when a model is added.
    pub fn default_model_name(&self) -> Option<String> {
        if self.models.read().expect("models lock").contains_key("default") {
            return Some("default".to_string());
        }
        self.default_model.clone()
    }

    /// The served models, by name.
    pub fn model_list(&self) -> Vec<(String, Arc<ServedModel>)> {
        let models = self.models.read().expect("models lock");
        models.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Serves one more model; false (and nothing changes) if the name is taken.
    pub fn add_model(&self, name: &str, model: ServedModel) -> bool {
        let mut models = self.models.write().expect("models lock");
        if models.contains_key(name) {
            return false;
        }
        models.insert(name.to_string(), Arc::new(model));
        true
    }

    /// Stops serving `served` as `name` (requests already admitted finish on it). False
    /// when `name` now serves another model (replaced meanwhile) or none.
    pub fn remove_model(&self, name: &str, served: &Arc<ServedModel>) -> bool {
        {
            let mut models = self.models.write().expect("models lock");
            if !models.get(name).is_some_and(|m| Arc::ptr_eq(m, served)) {
                return false;
            }
            models.remove(name);
        }
        self.live.reset_drift(name, None);
        metrics::gauge!(crate::metrics::QUEUE_DEPTH, "model" => name.to_string()).set(0.0);
        let (_, version) = served.engine.current();
        metrics::gauge!(crate::metrics::MODEL_INFO, "model" => name.to_string(), "version" => version,
            "device" => crate::model::device::name(&self.device).to_string())
        .set(0.0);
        true
    }

    /// Serves `detector` (version `version`) in place of what `served`, named `name`,
    /// serves now: requests in flight finish on the old one.
    pub fn replace_model(
        &self,
        name: &str,
        served: &ServedModel,
        detector: crate::detector::Detector,
        version: String,
    ) {
        let (_, replaced) = served.engine.current();
        served.engine.replace(detector, version.clone());
        self.live.reset_drift(name, Some(&version));
        crate::metrics::model_served(
            name,
            &version,
            Some(&replaced),
            crate::model::device::name(&self.device),
        );
    }

    /// Starts an engine for `detector` (loaded from `dir`) and serves it as `name`, unless
    /// a model of that name is served already (false).
    pub fn serve_model(&self, name: &str, dir: PathBuf, detector: crate::detector::Detector, version: &str) -> bool {
        let engine = crate::engine::Engine::start(
            name,
            detector,
            version,
            self.limits.max_batch,
            self.limits.queue_capacity,
        );
        let served = ServedModel {
            engine,
            dir,
            reload: Default::default(),
        };
        let added = self.add_model(name, served);
        if added {
            // A name served again (its folder deleted and trained anew) starts afresh.
            self.live.reset_drift(name, Some(version));
            crate::metrics::model_served(name, version, None, crate::model::device::name(&self.device));
        }
        added
    }
}

/// Refuses text with a NUL character: no record holds one, and PostgreSQL refuses it in a
/// text value (SQLite would take it), so it is the request's mistake on either backend.
pub(crate) fn refuse_nul(name: &str, value: Option<&str>) -> Result<(), error::ApiError> {
    match value {
        Some(v) if v.contains('\0') => Err(error::ApiError::BadRequest(format!(
            "{name} must not contain a NUL character"
        ))),
        _ => Ok(()),
    }
}

/// Refuses a query string on a route that takes none, as the routes that take some refuse
/// a parameter they do not know: `?threshold=` sent to the wrong route must not be ignored.
async fn refuse_query(req: Request, next: axum::middleware::Next) -> Response {
    match req.uri().query() {
        Some(q) if !q.is_empty() => axum::response::IntoResponse::into_response(error::ApiError::BadRequest(format!(
            "this route takes no query parameters, not {q:?}"
        ))),
        _ => next.run(req).await,
    }
}

/// The router, so tests can drive it in-process.
pub fn app(state: Arc<AppState>) -> Router {
    // Routes that take no query parameters, each refusing one ([`refuse_query`]).
    let without_query = Router::new()
        .route("/models", get(models::list))
        .route("/models/{model}", get(models::card))
        .route("/models/{model}/reload", post(models::reload))
        .route("/inspections/{id}", get(records::get_one))
        .route("/inspections/{id}/anomaly_map.npy", get(records::anomaly_map))
        .route("/inspections/{id}/reconstruction.png", get(records::reconstruction))
        .route("/whoami", get(auth::whoami))
        .route("/training-jobs", post(training::create))
        .route("/training-jobs/{id}", get(training::get_one).delete(training::cancel))
        .route("/training-jobs/{id}/events", get(training::events))
        .route(
            "/inspections/{id}/feedback",
            post(records::feedback).layer(axum::extract::DefaultBodyLimit::max(64 * 1024)),
        )
        .route_layer(axum::middleware::from_fn(refuse_query));
    let v1 = Router::new()
        .route("/inspect", post(inspect::inspect_default))
        .route("/models/{model}/inspect", post(inspect::inspect_model))
        .route("/inspections", get(records::list))
        .route("/inspections/{id}/heatmap.png", get(records::heatmap))
        .route("/inspections/{id}/image", get(records::image))
        .route("/stats", get(live::stats))
        .route("/training-jobs", get(training::list))
        .merge(without_query)
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::require_key));
    Router::new()
        .nest("/v1", v1)
        .route("/health/live", get(health::live))
        .route("/health/ready", get(health::ready))
        .route("/metrics", get(health::metrics))
        .route("/openapi.json", get(docs::openapi))
        .route("/docs", get(docs::page))
        .merge(ui::routes())
        .fallback(|| async { crate::api::error::ApiError::NoRoute })
        // The body limit is enforced by the handlers (to answer in our JSON shape).
        .layer(axum::extract::DefaultBodyLimit::disable())
        // A client that stops sending its body mid-way gets a 408, not a connection held
        // open for good.
        .layer(RequestBodyTimeoutLayer::new(state.limits.body_timeout))
        .layer(axum::middleware::from_fn(browser::refuse_cross_site))
        .layer(axum::middleware::from_fn(record_metrics))
        .layer(axum::middleware::from_fn_with_state(state.clone(), close_when_stopping))
        .layer(axum::middleware::from_fn(error::report_errors))
        // Outside report_errors, which rewrites axum's own refusals (405) into JSON.
        .layer(axum::middleware::from_fn(close_after_refusal))
        .layer(axum::middleware::from_fn(browser::security_headers))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(
            TraceLayer::new_for_http()
                .make_span_with(|req: &Request| {
                    let id = req
                        .headers()
                        .get("x-request-id")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("-");
                    tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id = %id)
                })
                // record_metrics logs every answer once, at info; tower-http's own line for a 5xx
                // would repeat it at error (a 503 under overload is not an error of the server's).
                .on_failure(()),
        )
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
        .layer(axum::middleware::from_fn(drop_unusable_request_id))
        .with_state(state)
}

/// Longest `X-Request-Id` kept from a client; a longer or empty one, or one with other
/// characters than letters, digits and `-_.:/+@`, is replaced by a generated id (it is
/// echoed, logged and stored with the record: a space or a quote in it could forge
/// fields of a text log line).
const MAX_REQUEST_ID: usize = 128;

async fn drop_unusable_request_id(mut req: Request, next: Next) -> Response {
    let usable = |v: &axum::http::HeaderValue| {
        let id = v.as_bytes();
        !id.is_empty()
            && id.len() <= MAX_REQUEST_ID
            && id.iter().all(|b| b.is_ascii_alphanumeric() || b"-_.:/+@".contains(b))
    };
    if req.headers().get("x-request-id").is_some_and(|v| !usable(v)) {
        req.headers_mut().remove("x-request-id");
    }
    next.run(req).await
}

/// Requests by route, method and status; latency by route. Routes are the matched
/// patterns and methods the standard ones (any other is `other`), so neither ids nor a
/// client's invented methods become labels. Each request is also logged at info (probes
/// and scrapes at debug, so they do not drown the log), inside the request's span, which
/// carries its request id.
async fn record_metrics(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched".to_string(), |p| p.as_str().to_string());
    let method = standard_method(req.method());
    let path = req.uri().path().to_string();
    let started = Instant::now();
    let resp = next.run(req).await;
    let elapsed = started.elapsed();
    let status = resp.status().as_u16();
    metrics::counter!(crate::metrics::REQUESTS, "route" => route.clone(), "method" => method, "status" => status.to_string())
        .increment(1);
    metrics::histogram!(crate::metrics::REQUEST_SECONDS, "route" => route.clone()).record(elapsed.as_secs_f64());
    // Rounded to 10 µs: the full float (`32.290507000000005`) is noise in a log line.
    let latency_ms = (elapsed.as_secs_f64() * 1e5).round() / 100.0;
    if route.starts_with("/health/") || route == "/metrics" {
        tracing::debug!(method, path, status, latency_ms, "answered");
    } else {
        tracing::info!(method, path, status, latency_ms, "answered");
    }
    resp
}

/// While the server is stopping (readiness already 503), every answer says `Connection:
/// close`, so a keep-alive client reconnects, through its load balancer, to a replica
/// that stays, rather than meet the close of an idle connection at the drain.
async fn close_when_stopping(State(state): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let mut resp = next.run(req).await;
    if state.stopping.load(std::sync::atomic::Ordering::SeqCst) {
        resp.headers_mut().insert(
            axum::http::header::CONNECTION,
            axum::http::HeaderValue::from_static("close"),
        );
    }
    resp
}

/// A refusal (4xx, 5xx) of a request that came with a body says `Connection: close`: a
/// handler may refuse before reading the body (bad query, unknown model, a key missing),
/// hyper then closes the connection, and a keep-alive client whose next request meets
/// that close loses it (a camera PC's next part; measured with 50–400 KB bodies, 5 of 5).
/// Told, the client reconnects instead.
async fn close_after_refusal(req: Request, next: Next) -> Response {
    use axum::http::header;
    let has_body = req.headers().contains_key(header::TRANSFER_ENCODING)
        || req
            .headers()
            .get(header::CONTENT_LENGTH)
            .is_some_and(|v| v.as_bytes() != b"0");
    let mut resp = next.run(req).await;
    if has_body && (resp.status().is_client_error() || resp.status().is_server_error()) {
        resp.headers_mut()
            .insert(header::CONNECTION, axum::http::HeaderValue::from_static("close"));
    }
    resp
}

fn standard_method(m: &axum::http::Method) -> &'static str {
    use axum::http::Method;
    match *m {
        Method::GET => "GET",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::DELETE => "DELETE",
        Method::PATCH => "PATCH",
        Method::HEAD => "HEAD",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Unix time in microseconds.
pub fn now_us() -> i64 {
    chrono::Utc::now().timestamp_micros()
}

pub fn rfc3339(us: i64) -> String {
    chrono::DateTime::from_timestamp_micros(us)
        .unwrap_or_default()
        .to_rfc3339_opts(chrono::SecondsFormat::Micros, true)
}

pub type AppStateRef = State<Arc<AppState>>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_fallback_default_is_the_only_model_and_never_a_guess_among_several() {
        let of = |names: &[&str]| -> BTreeMap<String, ()> { names.iter().map(|n| (n.to_string(), ())).collect() };
        assert_eq!(fallback_default_model(&of(&["tiles"])), Some("tiles".to_string()));
        assert_eq!(fallback_default_model(&of(&["bricks", "tiles"])), None);
        // A model named `default` is found by name at request time, not pinned here.
        assert_eq!(fallback_default_model(&of(&["default", "tiles"])), None);
        assert_eq!(fallback_default_model(&of(&[])), None);
    }
}
