//! /openapi.json (generated from the handler annotations and types) and /docs, a small
//! self-contained page that renders it: no CDN, so it works on an offline factory network.

use axum::response::{Html, IntoResponse};
use axum::Json;
use utoipa::OpenApi;

#[derive(OpenApi)]
#[openapi(
    info(title = "vigil", description = "Visual anomaly detection service"),
    paths(
        super::inspect::inspect_default,
        super::inspect::inspect_model,
        super::records::list,
        super::records::get_one,
        super::records::feedback,
        super::records::heatmap,
        super::records::anomaly_map,
        super::records::reconstruction,
        super::records::image,
        super::live::stats,
        super::auth::whoami,
        super::training::create,
        super::training::list,
        super::training::get_one,
        super::training::events,
        super::training::cancel,
        super::models::list,
        super::models::card,
        super::models::reload,
    ),
    components(schemas(crate::api::error::ErrorBody, crate::api::error::ErrorDetail))
)]
pub struct ApiDoc;

pub async fn openapi() -> impl IntoResponse {
    Json(ApiDoc::openapi())
}

pub async fn page() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
