//! /openapi.json (generated from the handler annotations and types) and /docs, a small
//! self-contained page that renders it: no CDN, so it works on an offline factory network.

use axum::response::{Html, IntoResponse};
use axum::Json;
use serde_json::{json, Value};
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
        super::health::live,
        super::health::ready,
        super::health::metrics,
    ),
    components(schemas(crate::api::error::ErrorBody, crate::api::error::ErrorDetail))
)]
pub struct ApiDoc;

pub async fn openapi() -> impl IntoResponse {
    static DOC: std::sync::OnceLock<Value> = std::sync::OnceLock::new();
    Json(DOC.get_or_init(document).clone())
}

/// The generated document with what the annotations cannot say route by route: the
/// bearer keys (optional: a server without `--api-keys-file` takes none) and the answers
/// every `/v1` route can give (401 without a key, 403 for admin routes with an inspect
/// key, 500), 503 where the database is read, and binary bodies as binary (the
/// annotations' `Vec<u8>` renders as an array of integers).
pub fn document() -> Value {
    let mut doc = serde_json::to_value(ApiDoc::openapi()).expect("the OpenAPI document serialises");
    doc["components"]["securitySchemes"] = json!({"bearer": {"type": "http", "scheme": "bearer"}});
    let error = json!({"description": "", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}});
    let binary = json!({"type": "string", "format": "binary"});
    let paths = doc["paths"].as_object_mut().expect("paths");
    for (path, item) in paths.iter_mut() {
        for (method, op) in item.as_object_mut().expect("path item") {
            // Tags by what a route is for (utoipa's default is the handler's Rust module).
            let service = !path.starts_with("/v1/");
            let tag = if path.ends_with("/inspect") {
                "inspect"
            } else if path.starts_with("/v1/inspections") {
                "records"
            } else if path.starts_with("/v1/training-jobs") {
                "training"
            } else if path.starts_with("/v1/models") {
                "models"
            } else {
                "service"
            };
            op["tags"] = json!([tag]);
            if service {
                // Health and metrics: open to all, answered without the database's errors.
                continue;
            }
            let admin = path.starts_with("/v1/training-jobs") || path.ends_with("/reload");
            let mut codes = vec![("500", "internal")];
            if path != "/v1/whoami" {
                op["security"] = json!([{"bearer": []}, {}]);
                codes.push((
                    "401",
                    "unauthorized: keys are required and none or a wrong one was sent",
                ));
            }
            match (admin, method.as_str()) {
                (true, "get") => codes.push(("403", "forbidden: an admin key is needed")),
                (true, _) => codes.push((
                    "403",
                    "forbidden: an admin key is needed, or cross_origin_request: a browser sent it from another site",
                )),
                (false, "post" | "put" | "delete" | "patch") => codes.push((
                    "403",
                    "cross_origin_request: a browser sent it from another site (Sec-Fetch-Site or Origin)",
                )),
                _ => {}
            }
            if !matches!(path.as_str(), "/v1/whoami" | "/v1/stats" | "/v1/models") {
                codes.push(("503", "the database, image store or model is unavailable"));
            }
            let responses = op["responses"].as_object_mut().expect("responses");
            for (code, description) in codes {
                responses.entry(code).or_insert_with(|| {
                    let mut e = error.clone();
                    e["description"] = description.into();
                    e
                });
            }
            // Binary bodies, in and out.
            let as_binary = |body: &mut Value| {
                for (kind, media) in body
                    .get_mut("content")
                    .and_then(Value::as_object_mut)
                    .into_iter()
                    .flatten()
                {
                    if !kind.contains("json") && !kind.starts_with("text/") {
                        media["schema"] = binary.clone();
                    }
                }
            };
            responses.values_mut().for_each(as_binary);
            if let Some(body) = op.get_mut("requestBody") {
                as_binary(body);
            }
            // An image to inspect may come in any format vigil reads, or as a form.
            if method == "post" && path.ends_with("/inspect") {
                let parameters = op["parameters"].as_array_mut().expect("inspect takes query parameters");
                parameters.push(json!({"name": "X-Part-Id", "in": "header", "required": false,
                    "description": "The part this image shows: UTF-8 text of up to 256 bytes, recorded with the inspection (one header).",
                    "schema": {"type": "string", "maxLength": 256}}));
                parameters.push(json!({"name": "X-Request-Id", "in": "header", "required": false,
                    "description": "Correlation id: up to 128 letters, digits and -_.:/+@, echoed in the answer's X-Request-Id header and recorded; \
                        a missing or unusable one is replaced by a generated UUID.",
                    "schema": {"type": "string", "maxLength": 128}}));
                parameters.push(json!({"name": "Idempotency-Key", "in": "header", "required": false,
                    "description": "Makes a retry safe: a request whose key is recorded for its model is answered with that record \
                        (header Idempotent-Replayed: true) instead of being judged and recorded again, even when the queue is full; \
                        one arriving while the first is still being judged by the same server waits for it. The same key with another image, part id, threshold or \
                        alpha is 422 idempotency_key_reused. 1-255 printable ASCII characters without quotes or backslashes inside, \
                        optionally quoted, e.g. a UUID; malformed or repeated: 400.",
                    "schema": {"type": "string", "maxLength": 257}}));
                if let Some(ok) = op["responses"].get_mut("200") {
                    ok["headers"] = json!({"Idempotent-Replayed": {"description": "true when this is the recorded answer to an earlier request with the same Idempotency-Key",
                        "schema": {"type": "string", "enum": ["true"]}}});
                }
                if let Some(busy) = op["responses"].get_mut("429") {
                    busy["headers"] = json!({"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "integer"}}});
                }
                let content = &mut op["requestBody"]["content"];
                for kind in ["image/jpeg", "image/bmp", "image/tiff", "application/octet-stream"] {
                    content[kind] = json!({"schema": binary});
                }
                content["multipart/form-data"] = json!({"schema": {"type": "object",
                    "properties": {"image": binary}, "required": ["image"]}});
            }
            if method == "post" && path == "/v1/training-jobs" {
                op["requestBody"]["content"]["multipart/form-data"] = json!({"schema": {"type": "object",
                    "properties": {"model": {"type": "string"}, "options": {"type": "string", "description": "JSON object of options"},
                        "images": {"type": "array", "items": binary, "description": "images, or zip archives of images"}},
                    "required": ["model", "images"]}});
            }
        }
    }
    doc
}

pub async fn page() -> Html<&'static str> {
    Html(include_str!("docs.html"))
}
