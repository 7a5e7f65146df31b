//! The operator's page at `/`: plain HTML, CSS and JavaScript embedded in the binary (no
//! CDN, no build step; factory networks are often closed). The page only calls the /v1
//! API, with the API key the operator enters when the server asks for one.

use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::Router;

use super::AppState;
use std::sync::Arc;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");

fn asset(content_type: &'static str, body: &'static str) -> impl IntoResponse {
    // `no-cache`: the browser revalidates, so a new binary's page is picked up at once.
    (
        [
            (header::CONTENT_TYPE, content_type),
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
}

pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route(
            "/",
            get(|| async {
                (
                    [(header::CONTENT_SECURITY_POLICY, super::browser::PAGE_CSP)],
                    asset("text/html; charset=utf-8", INDEX),
                )
            }),
        )
        .route(
            "/ui/app.js",
            get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }),
        )
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
}
