//! Router tests in-process (`oneshot`, no sockets) with a fake reconstructor and a real
//! SQLite database: every route, every error code, durability of answered inspections.

mod common;

use std::collections::BTreeMap;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode};
use candle_core::Device;
use futures_util::StreamExt;
use http_body_util::BodyExt;
use serde_json::Value;
use tower::ServiceExt;
use vigil::api::{self, AppState, Limits, ServedModel};
use vigil::detector::Detector;
use vigil::engine::Engine;
use vigil::model::artifact::Fit;
use vigil::model::{AnomalyModel, ModelOutput};
use vigil::storage::blobs::BlobStore;
use vigil::storage::Store;

struct Harness {
    state: Arc<AppState>,
    _dir: tempfile::TempDir,
}

async fn harness(keys: Option<&str>, queue_capacity: usize) -> Harness {
    harness_named(keys, queue_capacity, "default").await
}

/// A harness whose one model has its own name: metrics labelled by model are then this
/// test's alone, although every test in the process shares one recorder.
async fn harness_named(keys: Option<&str>, queue_capacity: usize, name: &str) -> Harness {
    let flat = Arc::new(common::Flat(Device::Cpu));
    harness_with(keys, queue_capacity, name, flat, Duration::from_secs(10), None, None).await
}

/// `artifact`, when given, is copied in as the model's directory on disk (what a reload
/// loads); the model starts out as `model`, version "v1", with `card` (default: the fake
/// reconstructors' test card).
async fn harness_with(
    keys: Option<&str>,
    queue_capacity: usize,
    name: &str,
    model: Arc<dyn AnomalyModel>,
    request_timeout: Duration,
    artifact: Option<&std::path::Path>,
    card: Option<vigil::model::ModelCard>,
) -> Harness {
    let card = card.unwrap_or_else(|| common::test_card(Fit::Whole, 32, 32));
    let dir = tempfile::tempdir().unwrap();
    let model_dir = match artifact {
        Some(src) => {
            let dst = dir.path().join("artifact");
            common::copy_model(src, &dst);
            dst
        }
        None => dir.path().into(),
    };
    let store = Store::connect(&format!("sqlite://{}", dir.path().join("t.db").display()))
        .await
        .unwrap();
    let mut models = BTreeMap::new();
    let detector = Detector::new(card, model);
    models.insert(
        name.to_string(),
        Arc::new(ServedModel {
            engine: Engine::start(name, detector, "v1", 4, queue_capacity),
            dir: model_dir,
            reload: Default::default(),
        }),
    );
    let state = Arc::new(AppState {
        models: std::sync::RwLock::new(models),
        default_model: Some(name.into()),
        store,
        blobs: BlobStore::new(dir.path()),
        limits: Limits {
            max_body_bytes: 200_000,
            max_pixels: 1_000_000,
            request_timeout,
            body_timeout: request_timeout,
            // Short, so that the header-timeout test ends soon; the tests' own requests
            // send their headers at once.
            header_timeout: Duration::from_secs(1),
            shutdown_delay: Duration::ZERO,
            drain_timeout: Duration::from_secs(60),
            pixel_budget: api::budget::PixelBudget::new(1_000_000),
            store_images: true,
            training_root: None,
            max_batch: 4,
            queue_capacity,
        },
        keys: keys.map(|k| api::auth::ApiKeys::parse(k).unwrap()),
        metrics: vigil::metrics::install(),
        device: Device::Cpu,
        stopping: AtomicBool::new(false),
        live: Default::default(),
        models_dir: dir.path().join("models"),
        training: api::training::JobBoard::new(1),
        discovery: Default::default(),
        idempotency: Default::default(),
    });
    Harness { state, _dir: dir }
}

fn png(w: u32, h: u32, square: bool) -> Vec<u8> {
    let mut img = image::GrayImage::from_pixel(w, h, image::Luma([128]));
    if square {
        for y in 10..18 {
            for x in 10..18 {
                img.put_pixel(x, y, image::Luma([255]));
            }
        }
    }
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

async fn send(state: &Arc<AppState>, req: Request<Body>) -> (StatusCode, axum::http::HeaderMap, Vec<u8>) {
    let resp = api::app(state.clone()).oneshot(req).await.unwrap();
    let status = resp.status();
    let headers = resp.headers().clone();
    let body = resp.into_body().collect().await.unwrap().to_bytes().to_vec();
    (status, headers, body)
}

fn post(uri: &str, ct: &str, body: Vec<u8>) -> Request<Body> {
    Request::post(uri)
        .header("content-type", ct)
        .body(Body::from(body))
        .unwrap()
}

fn json(b: &[u8]) -> Value {
    serde_json::from_slice(b).unwrap_or_else(|_| panic!("not JSON: {}", String::from_utf8_lossy(b)))
}

fn error_code(b: &[u8]) -> String {
    json(b)["error"]["code"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_body_that_stops_arriving_is_a_408_not_a_hang() {
    let flat = Arc::new(common::Flat(Device::Cpu));
    let h = harness_with(None, 8, "default", flat, Duration::from_millis(200), None, None).await;
    let stalled = |content_type: &str, start: &[u8]| {
        let first = futures_util::stream::iter([Ok::<_, std::io::Error>(start.to_vec())]);
        let body = Body::from_stream(futures_util::StreamExt::chain(first, futures_util::stream::pending()));
        Request::post("/v1/inspect")
            .header("content-type", content_type)
            .body(body)
            .unwrap()
    };
    let png = png(16, 16, false);
    let multipart = b"--b0undary\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n";
    let (_, _, b) = send(&h.state, post("/v1/inspect", "image/png", png.clone())).await;
    let id = json(&b)["id"].as_str().unwrap().to_string();
    let mut feedback = stalled("application/json", br#"{"label": "go"#);
    *feedback.uri_mut() = format!("/v1/inspections/{id}/feedback").parse().unwrap();
    for req in [
        stalled("image/png", &png[..20]),
        stalled("multipart/form-data; boundary=b0undary", multipart),
        feedback,
    ] {
        let (s, _, b) = tokio::time::timeout(Duration::from_secs(20), send(&h.state, req))
            .await
            .expect("the server waited on the stalled body");
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::REQUEST_TIMEOUT, "body_timeout")
        );
    }
}

#[tokio::test]
async fn client_ids_are_kept_within_bounds() {
    let h = harness(None, 8).await;
    let inspect = |request_id: &str, part_id: &str| {
        Request::post("/v1/inspect")
            .header("content-type", "image/png")
            .header("x-request-id", request_id)
            .header("x-part-id", part_id)
            .body(Body::from(png(16, 16, false)))
            .unwrap()
    };
    // An empty or overlong request id is replaced by a generated one (a UUID).
    for given in ["", &"r".repeat(129)] {
        let (s, headers, b) = send(&h.state, inspect(given, "p")).await;
        assert_eq!(s, StatusCode::OK);
        let echoed = headers["x-request-id"].to_str().unwrap().to_string();
        assert!(uuid::Uuid::parse_str(&echoed).is_ok(), "{echoed:?}");
        assert_eq!(json(&b)["request_id"], echoed.as_str());
    }
    let kept = "r".repeat(128);
    assert_eq!(
        send(&h.state, inspect(&kept, "p")).await.1["x-request-id"],
        kept.as_str()
    );
    // A part id is the caller's data: too long is refused, not cut; empty is none.
    let (s, _, b) = send(&h.state, inspect("a", &"p".repeat(257))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    let (s, _, b) = send(&h.state, inspect("b", "")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(json(&b).get("part_id").is_none());
    // A space or a quote could forge fields of a text log line: replaced too.
    let (_, headers, _) = send(&h.state, inspect("x status=200 level=ERROR", "p")).await;
    assert!(uuid::Uuid::parse_str(headers["x-request-id"].to_str().unwrap()).is_ok());
    // A part id in UTF-8 is kept (it was dropped without a word); bytes that are not
    // UTF-8, or two part ids, are refused.
    let with_part = |values: &[&[u8]]| {
        let mut req = Request::post("/v1/inspect")
            .header("content-type", "image/png")
            .body(Body::from(png(16, 16, false)))
            .unwrap();
        for v in values {
            req.headers_mut()
                .append("x-part-id", axum::http::HeaderValue::from_bytes(v).unwrap());
        }
        req
    };
    let (s, _, b) = send(&h.state, with_part(&["Teil-ä€".as_bytes()])).await;
    assert_eq!(s, StatusCode::OK);
    let id = json(&b)["id"].as_str().unwrap().to_string();
    assert_eq!(json(&b)["part_id"], "Teil-ä€");
    let (_, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}"))).await;
    assert_eq!(json(&b)["part_id"], "Teil-ä€");
    for values in [
        &[b"Teil-\xe4".as_slice()][..],
        &[b"a", b"b"],
        &["Teil\u{202E}42".as_bytes()],
        &[b"Teil\t42"],
    ] {
        let (s, _, b) = send(&h.state, with_part(values)).await;
        assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    }
}

#[tokio::test]
async fn browsers_cannot_post_from_other_sites_and_pages_are_not_framed() {
    let h = harness(None, 8).await;
    let reload = |headers: &[(&str, &str)]| {
        let mut r = Request::post("/v1/models/default/reload");
        for (k, v) in headers {
            r = r.header(*k, *v);
        }
        r.body(Body::empty()).unwrap()
    };
    // A page on another site (no API keys here, so nothing else would stop it).
    for headers in [
        &[("origin", "http://evil.example"), ("host", "vigil:8080")][..],
        &[("sec-fetch-site", "cross-site"), ("origin", "http://evil.example")],
    ] {
        let (s, _, b) = send(&h.state, reload(headers)).await;
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::FORBIDDEN, "cross_origin_request"),
            "{headers:?}"
        );
    }
    // The operator's own page, and a script (no Origin), are served.
    for headers in [
        &[("origin", "http://vigil:8080"), ("host", "vigil:8080")][..],
        &[("sec-fetch-site", "same-origin")],
        &[],
    ] {
        let mut req = post("/v1/inspect", "image/png", png(16, 16, false));
        for (k, v) in headers {
            req.headers_mut().insert(*k, v.parse().unwrap());
        }
        let (s, _, b) = send(&h.state, req).await;
        assert_eq!(s, StatusCode::OK, "{headers:?}: {}", String::from_utf8_lossy(&b));
    }
    // Reads pass (no CORS headers: another site cannot read the answer).
    let mut r = get("/v1/models");
    r.headers_mut().insert("origin", "http://evil.example".parse().unwrap());
    let (s, headers, _) = send(&h.state, r).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers.get("access-control-allow-origin").is_none());
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert_eq!(headers["x-frame-options"], "DENY");
    let (_, headers, _) = send(&h.state, get("/")).await;
    let csp = headers["content-security-policy"].to_str().unwrap();
    assert!(
        csp.contains("frame-ancestors 'none'") && csp.contains("default-src 'self'"),
        "{csp}"
    );
}

#[tokio::test]
async fn a_misspelt_query_parameter_is_refused_and_named() {
    let h = harness(None, 8).await;
    for req in [
        post("/v1/inspect?thresh=0.1", "image/png", png(16, 16, false)),
        get("/v1/inspections?requestid=r-1"),
        get("/v1/stats?window=5"),
        get("/v1/training-jobs?lmit=5"),
    ] {
        let uri = req.uri().to_string();
        let (s, _, b) = send(&h.state, req).await;
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{uri}"
        );
        let message = json(&b)["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("unknown field"), "{uri}: {message}");
    }
    // Routes that take no parameters refuse any, rather than answer as if none were sent.
    let id = json(
        &send(&h.state, post("/v1/inspect", "image/png", png(16, 16, false)))
            .await
            .2,
    )["id"]
        .as_str()
        .unwrap()
        .to_string();
    for uri in [
        "/v1/models?foo=1".to_string(),
        "/v1/models/default?threshold=0.1".to_string(),
        "/v1/whoami?x".to_string(),
        format!("/v1/inspections/{id}?foo=1"),
        format!("/v1/inspections/{id}/anomaly_map.npy?opacity=1"),
        format!("/v1/inspections/{id}/reconstruction.png?format=png"),
    ] {
        let (s, _, b) = send(&h.state, get(&uri)).await;
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{uri}"
        );
        let message = json(&b)["error"]["message"].as_str().unwrap().to_string();
        assert!(message.contains("takes no query parameters"), "{uri}: {message}");
    }
    // A NUL, which PostgreSQL refuses in text, is the request's mistake on either backend.
    for (req, want) in [
        (get("/v1/inspections/%00"), StatusCode::NOT_FOUND),
        (get("/v1/training-jobs/%00"), StatusCode::NOT_FOUND),
        (get("/v1/inspections?model=a%00"), StatusCode::BAD_REQUEST),
        (
            post_json(
                &format!("/v1/inspections/{id}/feedback"),
                serde_json::json!({"label": "good", "note": "a\u{0}b"}),
            ),
            StatusCode::BAD_REQUEST,
        ),
    ] {
        let uri = req.uri().to_string();
        let (s, _, b) = send(&h.state, req).await;
        assert_eq!(s, want, "{uri}: {}", String::from_utf8_lossy(&b));
    }
    let (s, _, b) = send(
        &h.state,
        post_json(
            "/v1/training-jobs?steps=3",
            serde_json::json!({"model": "q", "folder": "."}),
        ),
    )
    .await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    // An empty query string is no parameter.
    let (s, _, _) = send(&h.state, get(&format!("/v1/inspections/{id}?"))).await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test]
async fn a_refusal_of_a_request_with_a_body_closes_the_connection() {
    let h = harness(None, 8).await;
    // Refused before the body is read: hyper closes the connection, so the client must
    // be told not to send its next request on it.
    for (method, uri) in [
        ("POST", "/v1/models/nope/inspect"),
        ("POST", "/v1/inspect?threshold=-1"),
        ("POST", "/v1/inspect?alpha=0.5"),
        ("PUT", "/v1/inspect"),
    ] {
        let body = png(64, 64, false);
        let mut req = post(uri, "image/png", body.clone());
        *req.method_mut() = method.parse().unwrap();
        // As a client sends it over the wire (the in-process request has no length).
        req.headers_mut().insert("content-length", body.len().into());
        let (s, headers, _) = send(&h.state, req).await;
        assert!(s.is_client_error(), "{uri}: {s}");
        assert_eq!(headers["connection"], "close", "{uri}");
    }
    // A request without a body keeps its connection.
    let (s, headers, _) = send(&h.state, get("/v1/inspections/nope")).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert!(headers.get("connection").is_none());
}

#[tokio::test]
async fn inspect_answers_every_field_and_the_record_is_durable() {
    let h = harness(None, 8).await;
    let req = Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .header("x-part-id", "part-42")
        .header("x-request-id", "req-1")
        .body(Body::from(png(40, 30, true)))
        .unwrap();
    let budget = h.state.limits.pixel_budget.available();
    let (status, headers, body) = send(&h.state, req).await;
    assert_eq!(status, StatusCode::OK, "{}", String::from_utf8_lossy(&body));
    assert_eq!(headers["x-request-id"], "req-1");
    assert_eq!(
        h.state.limits.pixel_budget.available(),
        budget,
        "the image's pixels are given back"
    );
    let v = json(&body);
    for key in [
        "id",
        "model",
        "model_version",
        "score",
        "threshold",
        "pixel_threshold",
        "is_anomalous",
        "regions",
        "width",
        "height",
        "timings_ms",
        "created_at",
        "links",
    ] {
        assert!(v.get(key).is_some(), "missing {key}");
    }
    for key in ["decode", "queue", "inference", "scoring", "total"] {
        assert!(v["timings_ms"][key].as_f64().unwrap() >= 0.0);
    }
    assert_eq!((v["width"].as_i64(), v["height"].as_i64()), (Some(40), Some(30)));
    assert_eq!(v["is_anomalous"], true);
    assert_eq!(v["part_id"], "part-42");
    let id = v["id"].as_str().unwrap();
    assert_eq!(uuid::Uuid::parse_str(id).unwrap().get_version_num(), 7);
    // The row is there, with the client's ids.
    let rec = h.state.store.get(id).await.unwrap().unwrap();
    assert_eq!(rec.part_id.as_deref(), Some("part-42"));
    assert_eq!(rec.request_id.as_deref(), Some("req-1"));
    // The model's f32 score, written as the f32 shows it (`0.61035`, not its f64 widening).
    assert_eq!(rec.score as f32, v["score"].as_f64().unwrap() as f32);
    assert_eq!(v["score"].as_f64().unwrap().to_string(), (rec.score as f32).to_string());
    // GET it back, fetch its heatmap, map and reconstruction.
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["id"], id);
    // The stored record answers with the pixel threshold the live answer gave.
    assert_eq!(json(&b)["pixel_threshold"], v["pixel_threshold"]);
    assert!(v["pixel_threshold"].as_f64().unwrap() <= v["threshold"].as_f64().unwrap());
    // An id written another way (upper case, braced) finds the same record.
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{{{}}}", id.to_uppercase()))).await;
    assert_eq!((s, json(&b)["id"].as_str()), (StatusCode::OK, Some(id)));
    let (s, hd, b) = send(&h.state, get(&format!("/v1/inspections/{id}/heatmap.png"))).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(hd["content-type"], "image/png");
    let img = image::load_from_memory(&b).unwrap();
    assert_eq!((img.width(), img.height()), (40, 30));
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}/anomaly_map.npy"))).await;
    assert_eq!(s, StatusCode::OK);
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &b).unwrap();
    let (map, mh, mw) = vigil::npy::read_f32_2d(tmp.path()).unwrap();
    assert_eq!((mh, mw), (30, 40));
    let peak = map.iter().copied().fold(f32::MIN, f32::max) as f64;
    // The score is the peak at working resolution (32²); the map is resampled to 40×30,
    // which can only lower a sharp peak.
    let score = v["score"].as_f64().unwrap();
    assert!(
        peak <= score * 1.001 && peak >= 0.5 * score,
        "map peak {peak}, score {score}"
    );
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}/reconstruction.png"))).await;
    assert_eq!(s, StatusCode::OK);
    assert!(image::load_from_memory(&b).is_ok());
}

#[tokio::test]
async fn multipart_octet_stream_and_threshold_override() {
    let h = harness(None, 8).await;
    let boundary = "XBOUNDARYX";
    let mut body = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n").into_bytes();
    body.extend(png(32, 32, true));
    body.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let (s, _, b) = send(
        &h.state,
        post(
            "/v1/models/default/inspect",
            &format!("multipart/form-data; boundary={boundary}"),
            body,
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let score = json(&b)["score"].as_f64().unwrap();
    // Two images in one request: refused, not one of them judged.
    let mut two = format!("--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n").into_bytes();
    two.extend(png(32, 32, true));
    two.extend(format!("\r\n--{boundary}\r\nContent-Disposition: form-data; name=\"image\"\r\n\r\n").into_bytes());
    two.extend(png(32, 32, false));
    two.extend(format!("\r\n--{boundary}--\r\n").into_bytes());
    let multipart = format!("multipart/form-data; boundary={boundary}");
    let (s, _, b) = send(&h.state, post("/v1/inspect", &multipart, two)).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    assert!(
        String::from_utf8_lossy(&b).contains("more than one"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    let uri = format!("/v1/inspect?threshold={}&store_image=false", score * 2.0);
    let (s, _, b) = send(&h.state, post(&uri, "application/octet-stream", png(32, 32, true))).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["is_anomalous"], false);
    assert_eq!(v["regions"].as_array().unwrap().len(), 0);
    assert_eq!(v["image_stored"], false);
    // Regions are cut at the lower of the model's pixel threshold and the request's.
    let (_, _, b) = send(&h.state, get("/v1/models/default")).await;
    let card_pixel = json(&b)["card"]["thresholds"]["pixel"].as_f64().unwrap();
    let pixel = v["pixel_threshold"].as_f64().unwrap();
    assert!(
        (pixel - card_pixel.min(score * 2.0)).abs() < 1e-5,
        "{pixel} {card_pixel} {score}"
    );
    // A request threshold under the model's pixel threshold cuts regions there.
    let low = card_pixel / 2.0;
    let (s, _, b) = send(
        &h.state,
        post(
            &format!("/v1/inspect?threshold={low}&store_image=false"),
            "image/png",
            png(32, 32, true),
        ),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    assert!((json(&b)["pixel_threshold"].as_f64().unwrap() - low).abs() < 1e-5);
    // Not stored: its heatmap cannot be rendered.
    let id = v["id"].as_str().unwrap();
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}/heatmap.png"))).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "image_not_stored")
    );
}

fn float_tiff() -> Vec<u8> {
    const HEX: &str = "49492a00080000000a000001040001000000020000000101040001000000020000000201030001000000200000000301030001000000010000000601030001000000010000001101040001000000860000001601040001000000020000001701040001000000100000001c0103000100000001000000530103000100000003000000000000000000003f0000003f0000003f0000003f";
    (0..HEX.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&HEX[i..i + 2], 16).unwrap())
        .collect()
}

#[tokio::test]
async fn bad_inputs_get_the_right_status_and_code() {
    let h = harness(None, 8).await;
    let cases: Vec<(Request<Body>, StatusCode, &str)> = vec![
        (
            post("/v1/inspect", "image/png", vec![]),
            StatusCode::BAD_REQUEST,
            "empty_body",
        ),
        (
            post("/v1/inspect", "image/png", b"definitely not an image".to_vec()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post("/v1/inspect", "text/plain", png(8, 8, false)),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            {
                let p = png(64, 64, true);
                post("/v1/inspect", "image/png", p[..p.len() - 30].to_vec())
            },
            StatusCode::UNPROCESSABLE_ENTITY,
            "corrupt_image",
        ),
        // A TIFF of 32-bit float grey samples (2 × 2, written by Pillow): a format vigil
        // reads, in a kind its decoder does not; not a corrupt file.
        (
            post("/v1/inspect", "image/tiff", float_tiff()),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (
            post("/v1/inspect", "image/png", huge_header_png()),
            StatusCode::PAYLOAD_TOO_LARGE,
            "image_too_large",
        ),
        (
            post("/v1/inspect", "application/octet-stream", vec![0u8; 300_000]),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            post("/v1/models/nope/inspect", "image/png", png(8, 8, false)),
            StatusCode::NOT_FOUND,
            "unknown_model",
        ),
        (
            get("/v1/inspections/0190d6c2-0000-7000-8000-000000000000"),
            StatusCode::NOT_FOUND,
            "unknown_inspection",
        ),
        (
            get("/v1/inspections?verdict=maybe"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (get("/v1/inspections?limit=0"), StatusCode::BAD_REQUEST, "bad_request"),
        (get("/v1/inspections?model="), StatusCode::BAD_REQUEST, "bad_request"),
        (get("/v1/inspections?part_id="), StatusCode::BAD_REQUEST, "bad_request"),
        (
            get("/v1/inspections?request_id="),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/v1/inspections?part_prefix="),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            get("/v1/inspections?feedback=maybe"),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            post("/v1/inspect?threshold=abc", "image/png", png(8, 8, false)),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (get("/v2/nothing"), StatusCode::NOT_FOUND, "not_found"),
        (
            post(
                &format!("/v1/inspections/{MISSING}/feedback"),
                "application/json",
                br#"{"label":"good"}"#.to_vec(),
            ),
            StatusCode::NOT_FOUND,
            "unknown_inspection",
        ),
        (
            post(
                &format!("/v1/inspections/{MISSING}/feedback"),
                "application/json",
                vec![b' '; 100_000],
            ),
            StatusCode::PAYLOAD_TOO_LARGE,
            "body_too_large",
        ),
        (
            // curl's default for -d: a form, not JSON.
            post(
                &format!("/v1/inspections/{MISSING}/feedback"),
                "application/x-www-form-urlencoded",
                br#"{"label":"good"}"#.to_vec(),
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
        ),
        (get("/v1/inspect"), StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed"),
        (
            Request::delete("/v1/models").body(Body::empty()).unwrap(),
            StatusCode::METHOD_NOT_ALLOWED,
            "method_not_allowed",
        ),
    ];
    for (req, want_status, want_code) in cases {
        let uri = req.uri().to_string();
        let (s, headers, b) = send(&h.state, req).await;
        if s == StatusCode::METHOD_NOT_ALLOWED {
            assert!(
                headers.get("allow").is_some(),
                "{uri}: a 405 names the methods it takes"
            );
        }
        assert_eq!(s, want_status, "{uri}: {}", String::from_utf8_lossy(&b));
        assert_eq!(error_code(&b), want_code, "{uri}");
    }
    // Nothing was recorded for the refusals.
    assert_eq!(h.state.store.count().await.unwrap(), 0);
}

const MISSING: &str = "0190d6c2-0000-7000-8000-000000000000";

/// A 100000×100000 PNG header on a tiny file: refused before any allocation.
fn huge_header_png() -> Vec<u8> {
    let mut p = png(8, 8, false);
    // IHDR: length at 8..12, type at 12..16, width/height at 16..24, CRC over 12..29.
    p[16..20].copy_from_slice(&100_000u32.to_be_bytes());
    p[20..24].copy_from_slice(&100_000u32.to_be_bytes());
    let crc = crc32fast::hash(&p[12..29]);
    p[29..33].copy_from_slice(&crc.to_be_bytes());
    p
}

#[tokio::test]
async fn a_full_queue_answers_429_with_retry_after() {
    let h = harness(None, 1).await;
    // Hold the only slot, as a request in flight would.
    let _permit = h.state.model("default").unwrap().engine.admit().unwrap();
    let (s, headers, b) = send(&h.state, post("/v1/inspect", "image/png", png(8, 8, false))).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&b), "overloaded");
    assert_eq!(headers["retry-after"], "1");

    // The refusal does not wait for the body: one that never finishes still gets its 429.
    let endless =
        futures_util::stream::once(async { Ok::<_, std::io::Error>(axum::body::Bytes::from_static(b"\x89PNG")) })
            .chain(futures_util::stream::pending());
    let req = Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .body(Body::from_stream(endless))
        .unwrap();
    // The bound only turns a regression (the handler waiting on the body) into a failure
    // instead of a hang; a correct server answers without reading.
    let answered = tokio::time::timeout(Duration::from_secs(30), send(&h.state, req)).await;
    let (s, headers, b) = answered.expect("a full queue answers without reading the body");
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS);
    assert_eq!(error_code(&b), "overloaded");
    // The unread body makes the connection unusable: the answer says it will close.
    assert_eq!(headers["connection"], "close");
}

#[tokio::test]
async fn listing_filters_and_paginates_newest_first() {
    let h = harness(None, 8).await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let (s, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, i % 2 == 0))).await;
        assert_eq!(s, StatusCode::OK);
        ids.push(json(&b)["id"].as_str().unwrap().to_string());
    }
    let (_, _, b) = send(&h.state, get("/v1/inspections?limit=2")).await;
    let page = json(&b);
    let got: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap())
        .collect();
    assert_eq!(got, vec![ids[4].as_str(), ids[3].as_str()]);
    let cursor = page["next_cursor"].as_str().unwrap();
    let (_, _, b) = send(&h.state, get(&format!("/v1/inspections?limit=2&cursor={cursor}"))).await;
    let got: Vec<String> = json(&b)["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(got, vec![ids[2].clone(), ids[1].clone()]);
    let (_, _, b) = send(&h.state, get("/v1/inspections?verdict=anomalous&limit=10")).await;
    let items = json(&b)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 3, "squares on images 0, 2, 4");
    assert!(items.iter().all(|i| i["is_anomalous"] == true));
    let (_, _, b) = send(&h.state, get("/v1/inspections?since=2999-01-01T00:00:00Z")).await;
    assert!(json(&b)["items"].as_array().unwrap().is_empty());
    // None is labelled yet: `feedback=none` lists all five, `feedback=good` none.
    let (_, _, b) = send(&h.state, get("/v1/inspections?feedback=none&limit=10")).await;
    assert_eq!(json(&b)["items"].as_array().unwrap().len(), 5);
    let (_, _, b) = send(&h.state, get("/v1/inspections?feedback=good")).await;
    assert!(json(&b)["items"].as_array().unwrap().is_empty());
}

#[tokio::test]
async fn feedback_counts_false_positives_and_suggests_a_threshold() {
    let h = harness(None, 8).await;
    let mut ids = Vec::new();
    for square in [true, false] {
        let (_, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, square))).await;
        ids.push(json(&b)["id"].as_str().unwrap().to_string());
    }
    // The anomalous one is in fact good (a false positive); the normal one good too.
    for id in &ids {
        let body = serde_json::json!({"label": "good", "note": "checked by hand"}).to_string();
        let (s, _, b) = send(
            &h.state,
            post(
                &format!("/v1/inspections/{id}/feedback"),
                "application/json",
                body.into_bytes(),
            ),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        assert_eq!(json(&b)["feedback"], "good");
        assert_eq!(json(&b)["feedback_note"], "checked by hand");
    }
    // The note is read back with the record and in the list; a new label replaces both.
    let (_, _, b) = send(&h.state, get(&format!("/v1/inspections/{}", ids[0]))).await;
    assert_eq!(json(&b)["feedback_note"], "checked by hand");
    let (_, _, b) = send(&h.state, get("/v1/inspections")).await;
    assert!(json(&b)["items"]
        .as_array()
        .unwrap()
        .iter()
        .all(|i| i["feedback_note"] == "checked by hand"));
    let relabel = |label: &str| {
        post(
            &format!("/v1/inspections/{}/feedback", ids[1]),
            "application/json",
            serde_json::json!({ "label": label }).to_string().into_bytes(),
        )
    };
    for label in ["defective", "good"] {
        let (_, _, b) = send(&h.state, relabel(label)).await;
        assert_eq!(json(&b)["feedback"], label);
        assert!(json(&b).get("feedback_note").is_none(), "{label}");
    }
    let (s, _, b) = send(&h.state, get("/v1/models/default")).await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["feedback"]["labelled"], 2);
    assert_eq!(v["feedback"]["false_positives"], 1);
    assert_eq!(v["feedback"]["false_negatives"], 0);
    assert!(v["feedback"]["suggested_threshold"].is_null(), "needs both labels");
    assert_eq!(v["card"]["architecture"]["name"], "spatial");
    let (s, _, b) = send(
        &h.state,
        post(
            &format!("/v1/inspections/{}/feedback", ids[0]),
            "application/json",
            b"{\"label\":\"meh\"}".to_vec(),
        ),
    )
    .await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
}

#[tokio::test]
async fn api_keys_guard_v1_routes_and_admin_actions() {
    let h = harness(Some("inspect inspect-key-0123456789\nadmin admin-key-0123456789"), 8).await;
    let (s, headers, b) = send(&h.state, post("/v1/inspect", "image/png", png(8, 8, false))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    assert_eq!(headers["www-authenticate"], "Bearer");
    let with_key = |key: &str, req: axum::http::request::Builder| req.header("authorization", format!("Bearer {key}"));
    let req = with_key(
        "wrong-key-0123456789",
        Request::post("/v1/inspect").header("content-type", "image/png"),
    )
    .body(Body::from(png(8, 8, false)))
    .unwrap();
    assert_eq!(send(&h.state, req).await.0, StatusCode::UNAUTHORIZED);
    let req = with_key(
        "inspect-key-0123456789",
        Request::post("/v1/inspect").header("content-type", "image/png"),
    )
    .body(Body::from(png(8, 8, false)))
    .unwrap();
    assert_eq!(send(&h.state, req).await.0, StatusCode::OK);
    // The scheme name is case-insensitive (RFC 7235).
    let req = Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .header("authorization", "bearer inspect-key-0123456789")
        .body(Body::from(png(8, 8, false)))
        .unwrap();
    assert_eq!(send(&h.state, req).await.0, StatusCode::OK);
    let req = with_key("inspect-key-0123456789", Request::post("/v1/models/default/reload"))
        .body(Body::empty())
        .unwrap();
    let (s, _, b) = send(&h.state, req).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    // Health and metrics stay open.
    assert_eq!(send(&h.state, get("/health/live")).await.0, StatusCode::OK);
    assert_eq!(send(&h.state, get("/metrics")).await.0, StatusCode::OK);
}

#[tokio::test]
async fn health_metrics_openapi_and_models() {
    let h = harness_named(None, 8, "metrics-probe").await;
    let (s, _, b) = send(&h.state, get("/health/ready")).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["database"], true);
    let (s, _, _) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(s, StatusCode::OK);
    let (s, _, b) = send(&h.state, get("/metrics")).await;
    assert_eq!(s, StatusCode::OK);
    let text = String::from_utf8(b).unwrap();
    // Series labelled with this test's model: only this one inspection can have made them.
    let one = |prefix: &str| {
        let line = text
            .lines()
            .find(|l| l.starts_with(prefix) && l.contains(r#"model="metrics-probe""#))
            .unwrap_or_else(|| panic!("no {prefix} series for this test's model:\n{text}"));
        assert!(
            line.ends_with(" 1"),
            "{prefix} should count exactly one inspection: {line}"
        );
    };
    one("vigil_inference_duration_seconds_count");
    one("vigil_batch_size_count");
    one("vigil_anomaly_score_count");
    one("vigil_inspection_duration_seconds_count");
    // A method a client invents is counted as `other`: it must not become a label value
    // of its own (each would be a new series).
    let invented = Request::builder()
        .method("FROBNICATE")
        .uri("/metrics-probe-invented")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&h.state, invented).await.0, StatusCode::NOT_FOUND);
    let (_, _, b) = send(&h.state, get("/metrics")).await;
    let text = String::from_utf8(b).unwrap();
    assert!(!text.contains("FROBNICATE"), "{text}");
    assert!(
        text.lines().any(|l| l.starts_with("vigil_http_requests_total")
            && l.contains(r#"method="other""#)
            && l.contains(r#"status="404""#)),
        "{text}"
    );
    let verdicts: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("vigil_verdicts_total") && l.contains(r#"model="metrics-probe""#))
        .collect();
    assert_eq!(verdicts.len(), 1, "{verdicts:?}");
    assert!(verdicts[0].ends_with(" 1"), "{verdicts:?}");
    // Requests are labelled by route, which other tests share: presence only.
    assert!(text.contains(r#"vigil_http_requests_total{route="/v1/inspect",method="POST",status="200"}"#));
    let (s, _, b) = send(&h.state, get("/openapi.json")).await;
    assert_eq!(s, StatusCode::OK);
    let doc = json(&b);
    assert!(doc["paths"]["/v1/inspect"]["post"].is_object());
    assert!(doc["paths"]["/v1/inspections/{id}/feedback"]["post"].is_object());
    // Keys, the answers every route can give, and binary bodies as binary.
    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    let jobs = &doc["paths"]["/v1/training-jobs"]["post"];
    for code in ["401", "403", "413", "415", "500"] {
        assert!(jobs["responses"][code].is_object(), "{code}");
    }
    assert!(jobs["requestBody"]["content"]["multipart/form-data"].is_object());
    // Routes that load a model folder not yet served can answer 422 model_load_failed.
    for path in [
        "/v1/models/{model}",
        "/v1/inspections/{id}/heatmap.png",
        "/v1/inspections/{id}/anomaly_map.npy",
        "/v1/inspections/{id}/reconstruction.png",
    ] {
        assert!(doc["paths"][path]["get"]["responses"]["422"].is_object(), "{path}");
    }
    let inspect = &doc["paths"]["/v1/models/{model}/inspect"]["post"];
    // Inspecting needs no admin key: its 403 is a browser's request from another site.
    let forbidden = inspect["responses"]["403"]["description"].as_str().unwrap();
    assert!(
        forbidden.starts_with("cross_origin_request") && !forbidden.contains("admin"),
        "{forbidden}"
    );
    // Health and metrics are declared, open to all.
    for path in ["/health/live", "/health/ready", "/metrics"] {
        let op = &doc["paths"][path]["get"];
        assert!(op["responses"]["200"].is_object(), "{path}");
        assert!(op["responses"]["401"].is_null() && op["security"].is_null(), "{path}");
    }
    assert!(doc["paths"]["/health/ready"]["get"]["responses"]["503"].is_object());
    for kind in ["image/png", "image/jpeg", "application/octet-stream"] {
        assert_eq!(
            inspect["requestBody"]["content"][kind]["schema"]["format"], "binary",
            "{kind}"
        );
    }
    // Regions are typed (code generators made untyped maps of them), and the headers an
    // integration sends are declared.
    let regions = &doc["components"]["schemas"]["InspectionResponse"]["properties"]["regions"];
    assert_eq!(regions["items"]["$ref"], "#/components/schemas/Region", "{regions}");
    for field in ["x", "y", "width", "height", "area_px", "peak"] {
        assert!(
            doc["components"]["schemas"]["Region"]["properties"][field].is_object(),
            "{field}"
        );
    }
    let headers: Vec<&str> = inspect["parameters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|p| p["in"] == "header")
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(headers, ["X-Part-Id", "X-Request-Id", "Idempotency-Key"]);
    assert!(inspect["responses"]["200"]["headers"]["Idempotent-Replayed"].is_object());
    assert_eq!(inspect["tags"], serde_json::json!(["inspect"]));
    let heatmap = &doc["paths"]["/v1/inspections/{id}/heatmap.png"]["get"]["responses"];
    assert_eq!(heatmap["200"]["content"]["image/png"]["schema"]["format"], "binary");
    assert!(heatmap["409"].is_object());
    // Every parameter is where the route reads it: only `{…}` segments are path ones,
    // and those are required; the rest are optional query parameters.
    for (path, item) in doc["paths"].as_object().unwrap() {
        for (method, op) in item.as_object().unwrap() {
            for p in op["parameters"].as_array().into_iter().flatten() {
                let name = p["name"].as_str().unwrap();
                let in_path = path.contains(&format!("{{{name}}}"));
                let want = if in_path {
                    ("path", true)
                } else if name.starts_with("X-") || name == "Idempotency-Key" {
                    ("header", false)
                } else {
                    ("query", false)
                };
                assert_eq!(
                    (p["in"].as_str().unwrap(), p["required"].as_bool().unwrap_or(false)),
                    want,
                    "{method} {path}: {name}"
                );
            }
        }
    }
    let (s, _, b) = send(&h.state, get("/docs")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(String::from_utf8(b).unwrap().contains("/openapi.json"));
    let (_, _, b) = send(&h.state, get("/v1/models")).await;
    assert_eq!(json(&b)[0]["name"], "metrics-probe");
    assert_eq!(json(&b)[0]["is_default"], true);
    // Not ready while shutting down.
    h.state.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    let (s, _, b) = send(&h.state, get("/health/ready")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
    // Saying why: the models are still there.
    assert_eq!(
        (
            json(&b)["status"].as_str(),
            json(&b)["models"].as_bool(),
            json(&b)["stopping"].as_bool()
        ),
        (Some("stopping"), Some(true), Some(true))
    );
}

#[tokio::test]
async fn a_database_that_cannot_take_the_row_gives_503_not_a_verdict() {
    let h = harness(None, 8).await;
    h.state.store.close().await;
    let (s, headers, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "database_unavailable")
    );
    assert_eq!(headers["retry-after"], "1");
    // The error middleware counted it (no other test closes its database).
    let (_, _, b) = send(&h.state, get("/metrics")).await;
    let text = String::from_utf8(b).unwrap();
    assert!(
        text.contains(r#"vigil_database_errors_total{code="database_unavailable"}"#),
        "{text}"
    );
    let (s, _, _) = send(&h.state, get("/health/ready")).await;
    assert_eq!(s, StatusCode::SERVICE_UNAVAILABLE);
}

/// Holds every batch until the test lets it go; reports when one starts.
struct Held {
    started: std::sync::Mutex<std::sync::mpsc::Sender<()>>,
    go: std::sync::Mutex<std::sync::mpsc::Receiver<()>>,
}

fn held() -> (Arc<Held>, std::sync::mpsc::Receiver<()>, std::sync::mpsc::Sender<()>) {
    let (started_tx, started) = std::sync::mpsc::channel();
    let (go, go_rx) = std::sync::mpsc::channel();
    let model = Arc::new(Held {
        started: std::sync::Mutex::new(started_tx),
        go: std::sync::Mutex::new(go_rx),
    });
    (model, started, go)
}

impl AnomalyModel for Held {
    fn infer(&self, batch: &candle_core::Tensor) -> candle_core::Result<ModelOutput> {
        self.started.lock().unwrap().send(()).unwrap();
        self.go.lock().unwrap().recv().unwrap();
        Ok(ModelOutput {
            reconstruction: batch.clone(),
            learned_map: None,
            second_map: None,
        })
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
}

#[tokio::test]
async fn a_model_slower_than_the_timeout_gives_503_and_its_slot_comes_back() {
    let (held, started, go) = held();
    // One queue slot; the model holds the first request far past the 50 ms timeout.
    let h = harness_with(None, 1, "default", held, Duration::from_millis(50), None, None).await;
    let (s, headers, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "timeout")
    );
    assert_eq!(headers["retry-after"], "1");
    started.recv().unwrap(); // the model did start on it
    assert_eq!(
        h.state.store.count().await.unwrap(),
        0,
        "a timed-out request left a record"
    );
    // The slot stays taken while the model still works on the abandoned request...
    let (s, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::TOO_MANY_REQUESTS, "overloaded")
    );
    // ...and comes back when the model is done with it.
    go.send(()).unwrap();
    h.state.model("default").unwrap().engine.drained().await;
    go.send(()).unwrap(); // let the next request through at once
    let (s, _, _) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(s, StatusCode::OK);
    started.recv().unwrap();
}

#[tokio::test]
async fn retention_deletes_old_records_with_their_images_and_keeps_the_rest() {
    let h = harness(None, 8).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let (s, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
        assert_eq!(s, StatusCode::OK);
        ids.push(json(&b)["id"].as_str().unwrap().to_string());
    }
    let mut records = Vec::new();
    for id in &ids {
        records.push(h.state.store.get(id).await.unwrap().unwrap());
    }
    let image_of = |r: &vigil::storage::Record| h._dir.path().join(r.image_path.as_ref().unwrap());
    assert!(records.iter().all(|r| image_of(r).is_file()));
    // The clock is ours: "now" is 10 days after the second record, keep 10 days.
    let day = 86_400_000_000i64;
    let now = records[1].created_at + 10 * day;
    // Days beyond the clock's range keep everything (they wrapped and deleted it all).
    for days in [106_751_992, 999_999_999, u64::MAX] {
        let pruned = vigil::server::retention_pass(&h.state, now, days).await.unwrap();
        assert_eq!((pruned.records, pruned.images), (0, 0), "{days}");
    }
    let pruned = vigil::server::retention_pass(&h.state, now, 10).await.unwrap();
    // Records strictly older than the cutoff go: the first; the second sits on it.
    assert_eq!((pruned.records, pruned.images), (1, 1));
    assert!(h.state.store.get(&ids[0]).await.unwrap().is_none());
    assert!(!image_of(&records[0]).exists(), "the image outlived its record");
    for r in &records[1..] {
        assert!(h.state.store.get(&r.id).await.unwrap().is_some());
        assert!(image_of(r).is_file());
    }
    // A day later the other two (made within the same second) go as well.
    let pruned = vigil::server::retention_pass(&h.state, now + day, 10).await.unwrap();
    assert_eq!((pruned.records, pruned.images), (2, 2));
    assert_eq!(h.state.store.count().await.unwrap(), 0);
    assert!(records.iter().all(|r| !image_of(r).exists()));
    // Files no record names (an image whose row the database never took, a temporary file
    // a crash left) go with their day folder once the day is past the window by a day's
    // margin; a folder within it stays.
    let later = now + 30 * day;
    let folder = |days_before: i64| {
        let t = chrono::DateTime::from_timestamp_micros(later - 10 * day - days_before * day).unwrap();
        h._dir.path().join("images").join(t.format("%Y-%m-%d").to_string())
    };
    let (old, recent) = (folder(3), folder(1));
    for dir in [&old, &recent] {
        std::fs::create_dir_all(dir).unwrap();
        std::fs::write(dir.join("0190d6c2-0000-7000-8000-000000000001.png"), b"x").unwrap();
    }
    std::fs::write(old.join("0190d6c2-0000-7000-8000-000000000002.tmp"), b"").unwrap();
    let pruned = vigil::server::retention_pass(&h.state, later, 10).await.unwrap();
    assert_eq!((pruned.records, pruned.orphans), (0, 2));
    assert!(!old.exists() && recent.join("0190d6c2-0000-7000-8000-000000000001.png").is_file());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_old_requests_finish_on_the_old_model_new_ones_use_the_new() {
    let (held, started, go) = held();
    let h = harness_with(
        None,
        8,
        "default",
        held,
        Duration::from_secs(60),
        Some(common::tiny_model()),
        None,
    )
    .await;
    let admin = |uri: &str| Request::post(uri).body(Body::empty()).unwrap();
    // A: in the model, held there.
    let st = h.state.clone();
    let a = tokio::spawn(async move { send(&st, post("/v1/inspect", "image/png", png(32, 32, true))).await });
    tokio::task::spawn_blocking(move || {
        started.recv().unwrap();
        started
    })
    .await
    .unwrap();
    // Reload while A is in flight: the artifact on disk (a real model) replaces the fake.
    let (s, _, b) = send(&h.state, admin("/v1/models/default/reload")).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let new_version = json(&b)["version"].as_str().unwrap().to_string();
    assert_ne!(new_version, "v1");
    // The info metric names one served version: the new one 1, the one it replaced 0.
    let (_, _, m) = send(&h.state, get("/metrics")).await;
    let m = String::from_utf8(m).unwrap();
    let info = |version: &str| {
        m.lines()
            .find(|l| {
                l.starts_with("vigil_model_info")
                    && l.contains(r#"model="default""#)
                    && l.contains(&format!(r#"version="{version}""#))
            })
            .and_then(|l| l.rsplit(' ').next())
            .map(str::to_string)
    };
    assert_eq!(info("v1").as_deref(), Some("0"), "{m}");
    assert_eq!(info(&new_version).as_deref(), Some("1"), "{m}");
    // B, sent after the reload, is judged by the new model (it waits behind A for the
    // model thread, then runs in a batch of its own).
    let st = h.state.clone();
    let b_task = tokio::spawn(async move { send(&st, post("/v1/inspect", "image/png", png(32, 32, true))).await });
    go.send(()).unwrap();
    let (s, _, body_a) = a.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(
        json(&body_a)["model_version"],
        "v1",
        "A finished on the model it started with"
    );
    let (s, _, body_b) = b_task.await.unwrap();
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&body_b)["model_version"], new_version.as_str());
    // A's maps would need the old model: 409, stable code. B's render.
    let id_a = json(&body_a)["id"].as_str().unwrap().to_string();
    let id_b = json(&body_b)["id"].as_str().unwrap().to_string();
    let get = |uri: String| get(&uri);
    let (s, _, b) = send(&h.state, get(format!("/v1/inspections/{id_a}/heatmap.png"))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "model_changed"));
    let (s, headers, _) = send(&h.state, get(format!("/v1/inspections/{id_b}/heatmap.png"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(headers["content-type"], "image/png");
    // A corrupt artifact does not load: 422, and the model loaded before keeps serving.
    let served_dir = h.state.model("default").unwrap().dir.clone();
    std::fs::write(served_dir.join("weights.safetensors"), b"not safetensors").unwrap();
    let (s, _, b) = send(&h.state, admin("/v1/models/default/reload")).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "model_load_failed")
    );
    let (s, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["model_version"], new_version.as_str());
}

#[tokio::test]
async fn a_changed_model_answers_409_before_looking_for_the_stored_image() {
    let h = harness(None, 8).await;
    let (s, _, b) = send(
        &h.state,
        post("/v1/inspect?store_image=false", "image/png", png(32, 32, true)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let id = json(&b)["id"].as_str().unwrap().to_string();
    let heatmap = || get(&format!("/v1/inspections/{id}/heatmap.png"));
    // Same model: the image was not stored.
    let (s, _, b) = send(&h.state, heatmap()).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::NOT_FOUND, "image_not_stored")
    );
    // Another version now: that is the answer, whether or not the image was stored.
    let detector = Detector::new(
        common::test_card(Fit::Whole, 32, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    h.state.model("default").unwrap().engine.replace(detector, "v2".into());
    let (s, _, b) = send(&h.state, heatmap()).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "model_changed"));
    assert!(String::from_utf8_lossy(&b).contains(&format!("inspection {id} was made by model version v1")));
}

#[tokio::test]
async fn an_inspections_maps_outlive_a_recalibration_but_not_other_weights_or_scoring() {
    let mut card = common::test_card(Fit::Whole, 32, 32);
    card.weights_sha256 = Some("ab".repeat(32));
    let h = harness_with(
        None,
        8,
        "default",
        Arc::new(common::Flat(Device::Cpu)),
        Duration::from_secs(30),
        None,
        Some(card.clone()),
    )
    .await;
    let (s, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(s, StatusCode::OK);
    let links = json(&b)["links"].clone();
    let (_, _, before) = send(&h.state, get(links["anomaly_map"].as_str().unwrap())).await;
    let replace = |card: vigil::model::ModelCard, version: &str| {
        let detector = Detector::new(card, Arc::new(common::Flat(Device::Cpu)));
        h.state
            .model("default")
            .unwrap()
            .engine
            .replace(detector, version.into());
    };
    // Recalibrated: other thresholds, so another version, but the same maps.
    let mut recalibrated = card.clone();
    recalibrated.thresholds.image *= 2.0;
    recalibrated.thresholds.pixel *= 2.0;
    replace(recalibrated, "v2");
    for link in ["heatmap", "anomaly_map", "reconstruction"] {
        let (s, _, b) = send(&h.state, get(links[link].as_str().unwrap())).await;
        assert_eq!(s, StatusCode::OK, "{link}: {}", String::from_utf8_lossy(&b));
        if link == "anomaly_map" {
            assert_eq!(b, before, "the same map");
        }
    }
    // Other scoring, or other weights: those maps are not the verdict's.
    let mut rescored = card.clone();
    rescored.scoring.smoothing_sigma += 1.0;
    let mut retrained = card.clone();
    retrained.weights_sha256 = Some("cd".repeat(32));
    for (changed, version) in [(rescored, "v3"), (retrained, "v4")] {
        replace(changed, version);
        let (s, _, b) = send(&h.state, get(links["heatmap"].as_str().unwrap())).await;
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::CONFLICT, "model_changed"),
            "{version}"
        );
    }
}

#[tokio::test]
async fn a_stored_tiff_is_sent_as_png_for_a_browser_on_request() {
    let h = harness(None, 8).await;
    let tiff = {
        let img = image::load_from_memory(&png(40, 30, true)).unwrap();
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Tiff).unwrap();
        out.into_inner()
    };
    let (s, _, b) = send(&h.state, post("/v1/inspect", "image/tiff", tiff.clone())).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let link = json(&b)["links"]["image"].as_str().unwrap().to_string();
    // As uploaded...
    let (s, headers, b) = send(&h.state, get(&link)).await;
    assert_eq!(
        (s, headers["content-type"].to_str().unwrap()),
        (StatusCode::OK, "image/tiff")
    );
    assert_eq!(b, tiff);
    // ...or as PNG, the same pixels.
    let (s, headers, b) = send(&h.state, get(&format!("{link}?format=png"))).await;
    assert_eq!(
        (s, headers["content-type"].to_str().unwrap()),
        (StatusCode::OK, "image/png")
    );
    let shown = image::load_from_memory_with_format(&b, image::ImageFormat::Png)
        .unwrap()
        .to_luma8();
    let sent = image::load_from_memory(&tiff).unwrap().to_luma8();
    assert_eq!(shown, sent);
    let (s, _, b) = send(&h.state, get(&format!("{link}?format=jpeg"))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
}

#[tokio::test]
async fn the_suggested_threshold_rests_on_scores_of_the_version_served() {
    let h = harness(None, 8).await;
    let mut ids = Vec::new();
    for (square, label) in [(false, "good"), (true, "defective")] {
        let (_, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, square))).await;
        let id = json(&b)["id"].as_str().unwrap().to_string();
        let body = serde_json::json!({ "label": label }).to_string().into_bytes();
        let (s, _, _) = send(
            &h.state,
            post(&format!("/v1/inspections/{id}/feedback"), "application/json", body),
        )
        .await;
        assert_eq!(s, StatusCode::OK);
        ids.push(id);
    }
    let feedback = |b: &[u8]| json(b)["feedback"].clone();
    let (_, _, b) = send(&h.state, get("/v1/models/default")).await;
    assert!(feedback(&b)["suggested_threshold"].is_number(), "{}", feedback(&b));
    assert_eq!(feedback(&b)["suggestion_labels"], 2);
    // Another version with other weights: those scores are on another scale. The labels
    // still count; the suggestion waits for labels of this version.
    let detector = Detector::new(
        common::test_card(Fit::Whole, 32, 32),
        Arc::new(common::Flat(Device::Cpu)),
    );
    h.state.model("default").unwrap().engine.replace(detector, "v2".into());
    let (_, _, b) = send(&h.state, get("/v1/models/default")).await;
    let f = feedback(&b);
    assert!(f["suggested_threshold"].is_null(), "{f}");
    assert_eq!(
        (f["suggestion_labels"].as_i64(), f["labelled"].as_i64()),
        (Some(0), Some(2))
    );
}

fn delete(uri: &str) -> Request<Body> {
    Request::delete(uri).body(Body::empty()).unwrap()
}

fn get(uri: &str) -> Request<Body> {
    Request::get(uri).body(Body::empty()).unwrap()
}

#[tokio::test]
async fn the_operator_page_loads_without_a_key_and_whoami_tells_the_role() {
    let h = harness(Some("inspect inspect-key-0123456789\nadmin admin-key-0123456789"), 8).await;
    let (s, hd, b) = send(&h.state, get("/")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(hd["content-type"].to_str().unwrap().starts_with("text/html"));
    let page = String::from_utf8(b).unwrap();
    assert!(page.contains("/ui/app.js") && page.contains("/ui/app.css"), "{page}");
    for (path, kind) in [("/ui/app.js", "text/javascript"), ("/ui/app.css", "text/css")] {
        let (s, hd, b) = send(&h.state, get(path)).await;
        assert_eq!(s, StatusCode::OK, "{path}");
        assert!(hd["content-type"].to_str().unwrap().starts_with(kind), "{path}");
        assert!(b.len() > 1000, "{path} is nearly empty");
    }
    // The data behind the page needs a key; the key's role decides what the page shows.
    let (s, _, b) = send(&h.state, get("/v1/whoami")).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::UNAUTHORIZED, "unauthorized"));
    for (key, role) in [("inspect-key-0123456789", "inspect"), ("admin-key-0123456789", "admin")] {
        let req = Request::get("/v1/whoami")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let (s, _, b) = send(&h.state, req).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(json(&b), serde_json::json!({"keys_required": true, "role": role}));
    }
    // Without keys everyone may do everything.
    let open = harness(None, 8).await;
    let (_, _, b) = send(&open.state, get("/v1/whoami")).await;
    assert_eq!(json(&b), serde_json::json!({"keys_required": false, "role": "admin"}));
}

#[tokio::test]
async fn stored_image_heatmap_opacity_part_filter_labels_and_live_stats() {
    let h = harness_named(None, 8, "page").await;
    let upload = png(40, 30, true);
    let req = Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .header("x-part-id", "A-1")
        .body(Body::from(upload.clone()))
        .unwrap();
    let (s, _, b) = send(&h.state, req).await;
    assert_eq!(s, StatusCode::OK);
    let first = json(&b);
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(first["links"]["image"], format!("/v1/inspections/{id}/image"));
    let req = Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .header("x-part-id", "B-2")
        .body(Body::from(png(40, 30, false)))
        .unwrap();
    let second = json(&send(&h.state, req).await.2);

    // The stored image comes back byte for byte, with its type.
    let (s, hd, b) = send(&h.state, get(&format!("/v1/inspections/{id}/image"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(hd["content-type"], "image/png");
    assert_eq!(b, upload);

    // opacity 0 is the image itself away from the defect, 1 is colour only.
    let pixel = |b: &[u8]| image::load_from_memory(b).unwrap().to_rgb8().get_pixel(35, 25).0;
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}/heatmap.png?opacity=0"))).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(pixel(&b), [128, 128, 128]);
    let (_, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}/heatmap.png?opacity=1"))).await;
    assert_ne!(pixel(&b), [128, 128, 128]);
    let (s, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}/heatmap.png?opacity=1.5"))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));

    // Filter by part; labels show in the list.
    let req = post(
        &format!("/v1/inspections/{id}/feedback"),
        "application/json",
        br#"{"label":"defective"}"#.to_vec(),
    );
    assert_eq!(send(&h.state, req).await.0, StatusCode::OK);
    let (_, _, b) = send(&h.state, get("/v1/inspections?part_id=A-1")).await;
    let items = json(&b)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 1);
    assert_eq!(
        (&items[0]["id"], &items[0]["feedback"]),
        (&first["id"], &"defective".into())
    );
    let (_, _, b) = send(&h.state, get("/v1/inspections?model=page")).await;
    let items = json(&b)["items"].as_array().unwrap().clone();
    assert_eq!(items.len(), 2);
    assert!(items[0].get("feedback").is_none(), "the newer one has no label");

    // Live numbers count both inspections of this model and its anomalous share.
    let (s, _, b) = send(&h.state, get("/v1/stats?window_s=600")).await;
    assert_eq!(s, StatusCode::OK);
    let st = json(&b);
    let anomalous = [&first, &second].iter().filter(|v| v["is_anomalous"] == true).count();
    assert_eq!(st["models"]["page"]["inspections"], 2);
    assert_eq!(st["models"]["page"]["anomalous"], anomalous);
    assert_eq!(st["window_s"], 600.0);
    assert!(st["latency_p99_ms"].as_f64().unwrap() >= st["latency_p50_ms"].as_f64().unwrap());
    let (s, _, b) = send(&h.state, get("/v1/stats?window_s=0")).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
}

#[tokio::test]
async fn good_parts_scoring_away_from_calibration_raise_the_drift_metric() {
    let h = harness_named(None, 64, "drift").await;
    // Calibration scores far above what this model gives a flat grey image.
    let mut card = common::test_card(Fit::Whole, 32, 32);
    card.thresholds.image = 1e6;
    card.validation_scores = vigil::model::artifact::ScoreStats::of(&[1000.0, 1001.0, 1002.0, 1003.0, 1004.0]);
    let model = Arc::new(common::Flat(Device::Cpu));
    h.state
        .model("drift")
        .unwrap()
        .engine
        .replace(Detector::new(card, model), "v1".into());
    for i in 0..vigil::api::live::DRIFT_MIN_SAMPLES {
        let (s, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, false))).await;
        assert_eq!(s, StatusCode::OK);
        assert_eq!(json(&b)["is_anomalous"], false);
        let (_, _, b) = send(&h.state, get("/v1/stats")).await;
        let drift = &json(&b)["drift"]["drift"];
        if i + 1 < vigil::api::live::DRIFT_MIN_SAMPLES {
            assert!(drift.is_null(), "too few scores yet: {drift}");
        } else {
            assert_eq!(drift["statistic"], 1.0);
            assert_eq!(drift["drifted"], true);
            assert_eq!(drift["reference"], 5);
        }
    }
    let (_, _, b) = send(&h.state, get("/metrics")).await;
    let text = String::from_utf8(b).unwrap();
    assert!(text.contains("vigil_score_drift{model=\"drift\"} 1"), "{text}");
    assert!(text.contains("vigil_score_drift_critical{model=\"drift\"}"));
    // A reload (or recalibration, or removal) starts the window anew: the gauge goes to 0,
    // so an alert on drift > critical stops once the model is fixed.
    h.state.live.reset_drift("drift", Some("v2"));
    let (_, _, b) = send(&h.state, get("/metrics")).await;
    let text = String::from_utf8(b).unwrap();
    assert!(text.contains("vigil_score_drift{model=\"drift\"} 0"), "{text}");
}

/// A folder of `n` small good images.
fn good_folder(root: &std::path::Path, n: usize) -> std::path::PathBuf {
    let dir = root.join(format!("good-{n}"));
    std::fs::create_dir_all(&dir).unwrap();
    for i in 0..n {
        let mut img = image::GrayImage::new(32, 32);
        for (x, y, p) in img.enumerate_pixels_mut() {
            p.0 = [((x * 7 + y * 3 + i as u32 * 11) % 64 + 96) as u8];
        }
        img.save(dir.join(format!("{i}.png"))).unwrap();
    }
    dir
}

fn post_json(uri: &str, v: Value) -> Request<Body> {
    post(uri, "application/json", serde_json::to_vec(&v).unwrap())
}

/// Every `job` event of a job's stream, until it ends (after the job does).
async fn job_events(state: &Arc<AppState>, id: &str) -> Vec<Value> {
    let resp = api::app(state.clone())
        .oneshot(get(&format!("/v1/training-jobs/{id}/events")))
        .await
        .unwrap();
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    assert_eq!(resp.headers()["x-accel-buffering"], "no");
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    String::from_utf8(body.to_vec())
        .unwrap()
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .map(|d| serde_json::from_str(d).unwrap())
        .collect()
}

const TINY: &str = r#"{"steps": 3, "size": 32, "patch": 32, "batch_size": 2}"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_job_whose_threshold_flags_nothing_says_so_in_its_message() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 5);
    // A margin of 5: six times the good images' scores, over 1 for any score above 1/6
    // (the untrained segmenter's probabilities sit near one half).
    let mut options: Value = serde_json::from_str(TINY).unwrap();
    options["margin"] = 5.into();
    let request = serde_json::json!({"model": "deaf", "folder": folder, "options": options});
    let (s, _, b) = send(&h.state, post_json("/v1/training-jobs", request)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let events = job_events(&h.state, json(&b)["id"].as_str().unwrap()).await;
    let last = events.last().unwrap();
    assert_eq!(last["status"], "succeeded", "{events:?}");
    let card: Value =
        serde_json::from_str(&std::fs::read_to_string(h.state.models_dir.join("deaf/model.json")).unwrap()).unwrap();
    assert!(
        card["thresholds"]["image"].as_f64().unwrap() >= 1.0,
        "{}",
        card["thresholds"]
    );
    let message = last["message"].as_str().unwrap();
    assert!(message.contains("it will flag nothing"), "{message}");
    assert!(message.contains("calibrated on only 1 good image"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_training_job_trains_streams_progress_and_its_model_is_served_at_once() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 5);
    let request = serde_json::json!({"model": "line-2", "folder": folder, "options": serde_json::from_str::<Value>(TINY).unwrap()});
    let (s, _, b) = send(&h.state, post_json("/v1/training-jobs", request.clone())).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let job = json(&b);
    assert_eq!(
        (job["status"].as_str(), job["model"].as_str()),
        (Some("queued"), Some("line-2"))
    );
    let id = job["id"].as_str().unwrap().to_string();
    assert!(job["options"].as_array().unwrap().contains(&"--steps=3".into()));

    let events = job_events(&h.state, &id).await;
    let last = events.last().unwrap();
    assert_eq!(last["status"], "succeeded", "{events:?}");
    assert_eq!((last["step"].as_u64(), last["steps"].as_u64()), (Some(3), Some(3)));
    assert!(last["loss"].as_f64().unwrap().is_finite());
    assert!(last["message"].as_str().unwrap().contains("served as"));
    // Five images hold out one to calibrate on: the message says the threshold is rough.
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .contains("calibrated on only 1 good image:"),
        "{}",
        last["message"]
    );

    // Written into the models folder (and nothing half-written beside it), served at once.
    assert!(h.state.models_dir.join("line-2/model.json").is_file());
    let leftovers: Vec<_> = std::fs::read_dir(&h.state.models_dir)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .filter(|n| n.to_string_lossy().starts_with('.'))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    let (_, _, b) = send(&h.state, get("/v1/models")).await;
    assert!(json(&b).as_array().unwrap().iter().any(|m| m["name"] == "line-2"));
    let (s, _, b) = send(
        &h.state,
        post("/v1/models/line-2/inspect", "image/png", png(32, 32, true)),
    )
    .await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));

    // On record, and the name is now taken.
    let (_, _, b) = send(&h.state, get("/v1/training-jobs")).await;
    assert_eq!(json(&b)[0]["status"], "succeeded");
    let row = h.state.store.job(&id).await.unwrap().unwrap();
    assert_eq!(row.status, "succeeded");
    let (s, _, b) = send(&h.state, post_json("/v1/training-jobs", request)).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "model_exists"));
}

/// A training job for `model` whose images (those of `folder`, named 0.png…3.png) come
/// with the request: one as it is, three in a zip (alone, the one would be refused).
fn upload_job(folder: &std::path::Path, model: &str, options: &str) -> Request<Body> {
    let image = |i: usize| std::fs::read(folder.join(format!("{i}.png"))).unwrap();
    let mut zip = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
    for i in 1..4 {
        zip.start_file(format!("good/part{i}.png"), zip::write::SimpleFileOptions::default())
            .unwrap();
        std::io::Write::write_all(&mut zip, &image(i)).unwrap();
    }
    let zip = zip.finish().unwrap().into_inner();
    upload_files(model, options, &[("part0.png", image(0)), ("more.zip", zip)])
}

/// A training upload of `model` with `options` and these files as `images`.
fn upload_files(model: &str, options: &str, files: &[(&str, Vec<u8>)]) -> Request<Body> {
    let boundary = "vigil-test-boundary";
    let mut body = Vec::new();
    let mut field = |headers: &str, content: &[u8]| {
        body.extend_from_slice(format!("--{boundary}\r\n{headers}\r\n\r\n").as_bytes());
        body.extend_from_slice(content);
        body.extend_from_slice(b"\r\n");
    };
    field("Content-Disposition: form-data; name=\"model\"", model.as_bytes());
    field("Content-Disposition: form-data; name=\"options\"", options.as_bytes());
    for (name, bytes) in files {
        let kind = if name.ends_with(".zip") {
            "application/zip"
        } else {
            "image/png"
        };
        field(
            &format!("Content-Disposition: form-data; name=\"images\"; filename=\"{name}\"\r\nContent-Type: {kind}"),
            bytes,
        );
    }
    body.extend_from_slice(format!("--{boundary}--\r\n").as_bytes());
    post(
        "/v1/training-jobs",
        &format!("multipart/form-data; boundary={boundary}"),
        body,
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_images_can_be_uploaded_with_the_request_and_are_removed_after() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 4);
    let req = upload_job(&folder, "uploaded", TINY);
    let (s, _, b) = send(&h.state, req).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let job = json(&b);
    let upload_dir = std::path::PathBuf::from(job["data"].as_str().unwrap());
    assert!(upload_dir.starts_with(h._dir.path()), "{upload_dir:?}");
    let events = job_events(&h.state, job["id"].as_str().unwrap()).await;
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    assert!(!upload_dir.exists(), "uploaded images outlived their job");
    let (s, _, _) = send(
        &h.state,
        post("/v1/models/uploaded/inspect", "image/png", png(32, 32, false)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uploaded_images_are_named_as_the_client_sent_them_in_errors() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 3);
    let image = |i: usize| std::fs::read(folder.join(format!("{i}.png"))).unwrap();
    // A file that is not an image is refused at once, by the name it was sent as.
    let (s, _, b) = send(
        &h.state,
        upload_files(
            "named",
            TINY,
            &[("a.png", image(0)), ("garbage.png", b"not an image".to_vec())],
        ),
    )
    .await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::UNPROCESSABLE_ENTITY, "bad_training_data")
    );
    assert!(
        String::from_utf8_lossy(&b).contains("\\\"garbage.png\\\": not a PNG"),
        "{}",
        String::from_utf8_lossy(&b)
    );
    // An image sent under another extension counts (it was dropped, leaving "too few
    // images"); one cut short fails the job, which names it as sent, not the server's folder.
    let whole = image(2);
    let files = [
        ("a.bin", image(0)),
        ("b.png", image(1)),
        ("part_17_cam2.png", whole[..whole.len() / 2].to_vec()),
    ];
    let (s, _, b) = send(&h.state, upload_files("named", TINY, &files)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let events = job_events(&h.state, json(&b)["id"].as_str().unwrap()).await;
    let last = events.last().unwrap();
    assert_eq!(last["status"], "failed", "{events:?}");
    let message = last["message"].as_str().unwrap();
    assert!(message.contains("uploaded 00002-part_17_cam2.png"), "{message}");
    assert!(!message.contains("training-uploads"), "{message}");
}

#[tokio::test]
async fn an_upload_s_text_fields_are_bounded() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 4);
    let (s, _, b) = send(&h.state, upload_job(&folder, "x", &" ".repeat(65 * 1024))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    assert!(String::from_utf8_lossy(&b).contains("options field is at most 64 KiB"));
    let (s, _, b) = send(&h.state, upload_job(&folder, &"m".repeat(65 * 1024), TINY)).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    assert!(String::from_utf8_lossy(&b).contains("model field is at most 64 KiB"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn training_jobs_refuse_bad_requests_with_clear_errors_and_need_an_admin_key() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 3);
    let one = good_folder(&h._dir.path().join("one"), 1);
    let fake = good_folder(&h._dir.path().join("fake"), 2);
    std::fs::write(fake.join("1.png"), b"not an image").unwrap();
    // Another job's uploads (a cancel would remove them as this job's own).
    let others = good_folder(&h.state.blobs.root().join("training-uploads/other-job"), 2);
    let dotted = h
        .state
        .blobs
        .root()
        .join("training-uploads/../training-uploads/other-job");
    // The server's own folders: stored inspections (defective parts among them), the
    // data folder that holds them (and, here, the models; refused before any image is
    // stored too, as the job could wait while some are), a folder in the models, another
    // job's uploads, and a folder of good images with a link into the stored ones.
    let data_dir = h.state.blobs.root().to_path_buf();
    assert!(!data_dir.join("images").exists());
    let fresh = send(
        &h.state,
        post_json(
            "/v1/training-jobs",
            serde_json::json!({"model": "x", "folder": data_dir}),
        ),
    )
    .await;
    assert!(
        String::from_utf8_lossy(&fresh.2).contains("holds the server's stored inspection images"),
        "{}",
        String::from_utf8_lossy(&fresh.2)
    );
    let stored = good_folder(&h.state.blobs.root().join("images/2026-11-28"), 2);
    let in_models = good_folder(&h.state.models_dir.join("samples"), 2);
    let linked = good_folder(&h._dir.path().join("linked"), 2);
    std::os::unix::fs::symlink(&stored, linked.join("more")).unwrap();
    for (folder, says) in [
        (&stored, "lies inside the server's stored inspection images"),
        (&data_dir, "holds the server's stored inspection images"),
        (&in_models, "lies inside the server's models folder"),
        (&others, "lies inside the server's uploaded training images"),
        (&linked, "links into the server's stored inspection images"),
    ] {
        let (s, _, b) = send(
            &h.state,
            post_json("/v1/training-jobs", serde_json::json!({"model": "x", "folder": folder})),
        )
        .await;
        let body = String::from_utf8_lossy(&b);
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::UNPROCESSABLE_ENTITY, "bad_training_data"),
            "{body}"
        );
        assert!(body.contains(says), "{says} in {body}");
    }
    let cases = [
        (
            serde_json::json!({"model": "x", "folder": "/no/such/folder"}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_training_data",
        ),
        (
            serde_json::json!({"model": "x", "folder": others}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_training_data",
        ),
        (
            serde_json::json!({"model": "x", "folder": dotted}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_training_data",
        ),
        (
            serde_json::json!({"model": "x", "folder": one}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_training_data",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"steps": "many"}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"out": "/etc"}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "../x", "folder": folder}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "default", "folder": folder}),
            StatusCode::CONFLICT,
            "model_exists",
        ),
        // A bad option is named even when the name is taken too.
        (
            serde_json::json!({"model": "default", "folder": folder, "options": {"stepz": 3}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x"}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Test-time flips for a model trained without flips.
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"test_time_flips": "all", "augment": "brightness,anomalies"}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": format!("{}\u{0}", folder.display())}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Settings the command line takes but training refuses, checked before queueing.
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"steps": 0}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"steps": -5}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"size": 0}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"size": 32, "patch": 64}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Sizes past what vigil trains: a width of 1,000,000 aborted the server on a failed
        // 128 TB allocation.
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"arch": "spatial", "width": 1_000_000}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"segmenter_width": 100_000}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"batch_size": 1_000_000}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Each within its bound, together a terabyte, or four million tiles an image.
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"arch": "spatial", "batch_size": 256, "width": 256, "size": 2048, "patch": 2048, "fit": "whole"}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Small crops, but whole 2048² images judged 16 at a time at width 256 (64 GB).
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"arch": "spatial", "width": 256, "size": 2048, "patch": 128, "fit": "whole"}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"arch": "spatial", "size": 2048, "patch": 16, "fit": "tiles", "stride": 1}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"epochs": u64::MAX}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"time_budget": 1e300}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Sizes the model card would refuse once trained.
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"fit": "tiles", "stride": 0}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"fit": "tiles", "patch": 64, "stride": 65}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // Scoring sizes that would allocate without bound when the model scores.
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"smoothing": 1e9}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"score_filter": 4_000_000_000u64}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        (
            serde_json::json!({"model": "x", "folder": folder, "options": {"arch": "bergmann", "fit": "whole", "size": 256, "patch": 128}}),
            StatusCode::BAD_REQUEST,
            "bad_request",
        ),
        // A file named like an image that is not one.
        (
            serde_json::json!({"model": "x", "folder": fake}),
            StatusCode::UNPROCESSABLE_ENTITY,
            "bad_training_data",
        ),
    ];
    for (request, status, code) in cases {
        let (s, _, b) = send(&h.state, post_json("/v1/training-jobs", request.clone())).await;
        assert_eq!(
            (s, error_code(&b).as_str()),
            (status, code),
            "{request}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    // The bounds say which setting is out of them.
    for (options, says) in [
        (
            serde_json::json!({"arch": "spatial", "width": 1_000_000}),
            "width 1000000 is over the most vigil trains",
        ),
        (
            serde_json::json!({"arch": "spatial", "width": 256, "size": 2048, "patch": 128, "fit": "whole"}),
            "images judged at once",
        ),
        (
            serde_json::json!({"arch": "spatial", "size": 2048, "patch": 16, "fit": "tiles", "stride": 1}),
            "tiles an image",
        ),
    ] {
        let request = serde_json::json!({"model": "x", "folder": folder, "options": options});
        let (_, _, b) = send(&h.state, post_json("/v1/training-jobs", request)).await;
        assert!(
            String::from_utf8_lossy(&b).contains(says),
            "{says}: {}",
            String::from_utf8_lossy(&b)
        );
    }
    let (s, _, b) = send(
        &h.state,
        post(
            "/v1/training-jobs",
            "text/plain",
            serde_json::to_vec(&serde_json::json!({"model": "x", "folder": folder})).unwrap(),
        ),
    )
    .await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_media_type")
    );
    let (_, _, b) = send(&h.state, get("/v1/training-jobs")).await;
    assert_eq!(json(&b), serde_json::json!([]), "a refused job leaves no record");
    let (s, _, b) = send(&h.state, get("/v1/training-jobs/nope")).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::NOT_FOUND, "unknown_job"));

    let keyed = harness(Some("inspect inspect-key-0123456789\nadmin admin-key-0123456789"), 8).await;
    for key in ["inspect-key-0123456789"] {
        let req = Request::get("/v1/training-jobs")
            .header("authorization", format!("Bearer {key}"))
            .body(Body::empty())
            .unwrap();
        let (s, _, b) = send(&keyed.state, req).await;
        assert_eq!((s, error_code(&b).as_str()), (StatusCode::FORBIDDEN, "forbidden"));
    }
    let req = Request::get("/v1/training-jobs")
        .header("authorization", "Bearer admin-key-0123456789")
        .body(Body::empty())
        .unwrap();
    assert_eq!(send(&keyed.state, req).await.0, StatusCode::OK);
}

/// Two long jobs: the first seen running on its event stream (returned with what it sent
/// so far, to read on), the second queued behind it.
async fn a_running_and_a_queued_job(h: &Harness) -> (String, String, Body, String) {
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 4);
    let long = serde_json::json!({"steps": 100000, "size": 32, "patch": 32, "batch_size": 2});
    let start = |name: &str| {
        post_json(
            "/v1/training-jobs",
            serde_json::json!({"model": name, "folder": folder, "options": long}),
        )
    };
    let running = json(&send(&h.state, start("long")).await.2)["id"]
        .as_str()
        .unwrap()
        .to_string();
    let queued = json(&send(&h.state, start("next")).await.2)["id"]
        .as_str()
        .unwrap()
        .to_string();
    // Wait, on the job's own event stream, until the first is training.
    let resp = api::app(h.state.clone())
        .oneshot(get(&format!("/v1/training-jobs/{running}/events")))
        .await
        .unwrap();
    let mut body = resp.into_body();
    let mut seen = String::new();
    while !seen.contains("\"status\":\"running\"") {
        let frame = body
            .frame()
            .await
            .expect("the stream ended before the job ran")
            .unwrap();
        if let Ok(data) = frame.into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    (running, queued, body, seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_queued_job_cancelled_leaves_no_uploaded_images_behind() {
    let h = harness(None, 8).await;
    let (running, queued, _body, _seen) = a_running_and_a_queued_job(&h).await;
    let folder = good_folder(&h._dir.path().join("up"), 4);
    let (s, _, b) = send(&h.state, upload_job(&folder, "uploaded", TINY)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let job = json(&b);
    let upload_dir = std::path::PathBuf::from(job["data"].as_str().unwrap());
    assert!(upload_dir.is_dir());
    let id = job["id"].as_str().unwrap();
    let (s, _, b) = send(&h.state, delete(&format!("/v1/training-jobs/{id}"))).await;
    assert_eq!(
        (s, json(&b)["status"].as_str()),
        (StatusCode::ACCEPTED, Some("cancelled"))
    );
    assert!(!upload_dir.exists(), "a cancelled job's uploads stayed");
    for id in [&queued, &running] {
        let (s, _, _) = send(&h.state, delete(&format!("/v1/training-jobs/{id}"))).await;
        assert_eq!(s, StatusCode::ACCEPTED);
    }
}

#[tokio::test]
async fn uploads_of_ended_jobs_are_removed_at_start_and_live_ones_kept() {
    let h = harness(None, 8).await;
    let uploads = h.state.blobs.root().join("training-uploads");
    let cases = [
        ("ended", Some("failed")),
        ("live", Some("running")),
        ("waiting", Some("queued")),
        ("arriving", None),
        ("forgotten", None),
    ];
    for (id, status) in cases {
        std::fs::create_dir_all(uploads.join(id)).unwrap();
        std::fs::write(uploads.join(id).join("0.png"), png(8, 8, false)).unwrap();
        if let Some(status) = status {
            let row = vigil::storage::jobs::JobRow {
                id: id.into(),
                model: format!("m-{id}"),
                status: status.into(),
                message: None,
                options: "[]".into(),
                data: uploads.join(id).display().to_string(),
                created_at: 1,
                finished_at: None,
            };
            h.state.store.insert_job(&row).await.unwrap();
        }
    }
    // Not on record and two hours old: no request is still arriving with it.
    let two_hours_ago = std::time::SystemTime::now() - std::time::Duration::from_secs(7200);
    std::fs::File::open(uploads.join("forgotten"))
        .unwrap()
        .set_modified(two_hours_ago)
        .unwrap();
    assert_eq!(vigil::api::training::remove_stale_uploads(&h.state).await, 2);
    assert!(!uploads.join("ended").exists() && !uploads.join("forgotten").exists());
    // Another replica's running and queued jobs, and a request still arriving (fresh).
    for kept in ["live", "waiting", "arriving"] {
        assert!(uploads.join(kept).is_dir(), "{kept}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_stops_a_running_job_and_drops_a_queued_one_writing_nothing() {
    let h = harness(None, 8).await;
    let (running, queued, mut body, mut seen) = a_running_and_a_queued_job(&h).await;

    // The queued one is dropped at once; the running one ends as cancelled.
    let (s, _, b) = send(&h.state, delete(&format!("/v1/training-jobs/{queued}"))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    assert_eq!(json(&b)["status"], "cancelled");
    let (s, _, _) = send(&h.state, delete(&format!("/v1/training-jobs/{running}"))).await;
    assert_eq!(s, StatusCode::ACCEPTED);
    while !seen.contains("\"status\":\"cancelled\"") {
        let Some(frame) = body.frame().await else { break };
        if let Ok(data) = frame.unwrap().into_data() {
            seen.push_str(&String::from_utf8_lossy(&data));
        }
    }
    assert!(seen.contains("\"status\":\"cancelled\""), "{seen}");
    for id in [&running, &queued] {
        assert_eq!(h.state.store.job(id).await.unwrap().unwrap().status, "cancelled");
    }
    let written: Vec<_> = std::fs::read_dir(&h.state.models_dir).unwrap().collect();
    assert!(written.is_empty(), "a cancelled job wrote {written:?}");
    // Cancelling again is a conflict, not a second cancellation.
    let (s, _, b) = send(&h.state, delete(&format!("/v1/training-jobs/{running}"))).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "job_finished"));
}

/// Waits for `ready` to hold, failing the test after `limit`: the condition is watched,
/// not guessed at by a fixed sleep.
async fn eventually(limit: Duration, what: &str, mut ready: impl AsyncFnMut() -> bool) {
    let deadline = std::time::Instant::now() + limit;
    while !ready().await {
        assert!(std::time::Instant::now() < deadline, "{what}: not within {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_whose_end_the_database_refuses_is_recorded_once_it_takes_it() {
    use sqlx::Connection;
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 4);
    let db = h._dir.path().join("t.db");
    let mut side = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    // A database that refuses the job's end, as in a failover, counting each attempt
    // (RAISE(FAIL) keeps what the trigger wrote before it).
    sqlx::raw_sql(
        "CREATE TABLE refused (attempt INTEGER);
         CREATE TRIGGER refuse_end BEFORE UPDATE OF status ON training_jobs WHEN NEW.status = 'succeeded'
         BEGIN INSERT INTO refused VALUES (1); SELECT RAISE(FAIL, 'injected: the database is away'); END;",
    )
    .execute(&mut side)
    .await
    .unwrap();
    let options: Value = serde_json::from_str(TINY).unwrap();
    let request = serde_json::json!({"model": "refused", "folder": folder, "options": options});
    let (s, _, b) = send(&h.state, post_json("/v1/training-jobs", request)).await;
    assert_eq!(s, StatusCode::ACCEPTED, "{}", String::from_utf8_lossy(&b));
    let id = json(&b)["id"].as_str().unwrap().to_string();
    async fn refused(side: &mut sqlx::SqliteConnection) -> Result<i64, sqlx::Error> {
        sqlx::query_scalar("SELECT COUNT(*) FROM refused").fetch_one(side).await
    }
    eventually(Duration::from_secs(120), "the job's end was written", async || {
        refused(&mut side).await.unwrap() > 0
    })
    .await;
    // Not on record, so not ended to anyone watching (once showed `succeeded` here while
    // the row stayed `running`, to be swept as interrupted).
    let (_, _, b) = send(&h.state, get(&format!("/v1/training-jobs/{id}"))).await;
    assert_eq!(json(&b)["status"], "running", "{}", String::from_utf8_lossy(&b));
    assert_eq!(h.state.store.job(&id).await.unwrap().unwrap().status, "running");
    // The database takes writes again: the end lands, and the job ends.
    sqlx::raw_sql("DROP TRIGGER refuse_end")
        .execute(&mut side)
        .await
        .unwrap();
    let events = job_events(&h.state, &id).await;
    assert_eq!(events.last().unwrap()["status"], "succeeded", "{events:?}");
    assert_eq!(h.state.store.job(&id).await.unwrap().unwrap().status, "succeeded");
    assert!(refused(&mut side).await.unwrap() >= 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upload_dropped_midway_leaves_no_images_behind() {
    // A request timeout longer than the test: the request is dropped, not timed out.
    let flat = Arc::new(common::Flat(Device::Cpu));
    let h = harness_with(None, 8, "default", flat, Duration::from_secs(600), None, None).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 1);
    // One whole image, then the start of a second part, then nothing more: the client
    // is still sending when it goes away.
    let boundary = "vigil-test-boundary";
    let mut start = Vec::new();
    let part = |name: &str| format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"");
    start.extend_from_slice(format!("{}\r\n\r\ndropped\r\n", part("model")).as_bytes());
    start.extend_from_slice(
        format!(
            "{}; filename=\"a.png\"\r\nContent-Type: image/png\r\n\r\n",
            part("images")
        )
        .as_bytes(),
    );
    start.extend_from_slice(&std::fs::read(folder.join("0.png")).unwrap());
    start.extend_from_slice(format!("\r\n{}; filename=\"b.png\"\r\n", part("images")).as_bytes());
    let first = futures_util::stream::iter([Ok::<_, std::io::Error>(start)]);
    let body = Body::from_stream(futures_util::StreamExt::chain(first, futures_util::stream::pending()));
    let req = Request::post("/v1/training-jobs")
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body)
        .unwrap();
    let request = tokio::spawn(api::app(h.state.clone()).oneshot(req));
    let uploads = h.state.blobs.root().join("training-uploads");
    let files_in = |dir: &std::path::Path| -> usize {
        std::fs::read_dir(dir)
            .map(|d| {
                d.map(|e| std::fs::read_dir(e.unwrap().path()).map_or(0, |f| f.count()))
                    .sum()
            })
            .unwrap_or(0)
    };
    eventually(Duration::from_secs(30), "the first image was stored", async || {
        files_in(&uploads) == 1
    })
    .await;
    request.abort();
    assert!(request.await.unwrap_err().is_cancelled());
    eventually(
        Duration::from_secs(30),
        "the dropped request's uploads were removed",
        async || std::fs::read_dir(&uploads).unwrap().next().is_none(),
    )
    .await;
    let (_, _, b) = send(&h.state, get("/v1/training-jobs")).await;
    assert_eq!(
        json(&b).as_array().map(Vec::len),
        Some(0),
        "{}",
        String::from_utf8_lossy(&b)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_server_interrupts_its_jobs_and_leaves_no_model() {
    let h = harness(None, 8).await;
    let (running, queued, _events, _) = a_running_and_a_queued_job(&h).await;

    // What `vigil serve` does once requests are drained.
    h.state.training.stop_all();
    tokio::time::timeout(Duration::from_secs(60), h.state.training.wait_finished())
        .await
        .expect("the jobs did not stop");
    for id in [&running, &queued] {
        let row = h.state.store.job(id).await.unwrap().unwrap();
        assert_eq!(row.status, "failed", "{id}");
        assert!(row.message.unwrap().starts_with("interrupted"), "{id}");
    }
    let written: Vec<_> = std::fs::read_dir(&h.state.models_dir).unwrap().collect();
    assert!(written.is_empty(), "an interrupted job wrote {written:?}");
    let (_, _, b) = send(&h.state, get("/v1/models")).await;
    assert!(!json(&b).as_array().unwrap().iter().any(|m| m["name"] == "long"));
}

/// `server::run` on a loopback port: its address, the sender that stops it, its task.
async fn serve_on_a_port(
    h: &Harness,
) -> (
    std::net::SocketAddr,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<std::io::Result<()>>,
) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(vigil::server::run(listener, h.state.clone(), async move {
        let _ = stopped.await;
    }));
    (addr, stop, server)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_told_to_stop_ends_its_jobs_before_draining_a_watching_client() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let h = harness(None, 8).await;
    let (running, queued, _events, _) = a_running_and_a_queued_job(&h).await;
    let (addr, stop, server) = serve_on_a_port(&h).await;
    // An operator's page watching the job over a real connection: the drain waits for it.
    let mut watcher = tokio::net::TcpStream::connect(addr).await.unwrap();
    let request = format!("GET /v1/training-jobs/{running}/events HTTP/1.1\r\nHost: vigil\r\n\r\n");
    watcher.write_all(request.as_bytes()).await.unwrap();
    let mut seen = Vec::new();
    while !String::from_utf8_lossy(&seen).contains("\"status\":\"running\"") {
        let mut buf = [0u8; 4096];
        let n = watcher.read(&mut buf).await.unwrap();
        assert!(n > 0, "the stream closed before the job was seen running");
        seen.extend_from_slice(&buf[..n]);
    }
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(60), server)
        .await
        .expect("the drain waited for the training job")
        .unwrap()
        .unwrap();
    h.state
        .training
        .finish_stopping(&h.state.store, Duration::from_secs(60))
        .await;
    for id in [&running, &queued] {
        let row = h.state.store.job(id).await.unwrap().unwrap();
        assert_eq!(row.status, "failed", "{id}");
        assert!(row.message.unwrap().starts_with("interrupted"), "{id}");
    }
}

/// Reads until the server closes the connection; returns what came, or None when it stayed
/// open for `limit`.
async fn read_until_closed(stream: &mut tokio::net::TcpStream, limit: Duration) -> Option<Vec<u8>> {
    use tokio::io::AsyncReadExt;
    let mut seen = Vec::new();
    tokio::time::timeout(limit, async {
        let mut buf = [0u8; 4096];
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.extend_from_slice(&buf[..n]),
            }
        }
    })
    .await
    .ok()
    .map(|()| seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_connection_that_does_not_finish_its_headers_is_closed() {
    use tokio::io::AsyncWriteExt;
    let h = harness(None, 8).await; // header timeout: 1 s
    let (addr, stop, server) = serve_on_a_port(&h).await;
    // Half a request line, then nothing: closed after the header timeout, with no answer.
    let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
    slow.write_all(b"GET /health/live HTT").await.unwrap();
    let answer = read_until_closed(&mut slow, Duration::from_secs(20)).await;
    assert_eq!(
        answer.as_deref().map(String::from_utf8_lossy),
        Some("".into()),
        "still open after 20 s"
    );
    // A connection that sends nothing is closed the same way.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    assert!(read_until_closed(&mut silent, Duration::from_secs(20)).await.is_some());
    // A whole request on a fresh connection is answered; then, kept alive and idle, the
    // connection is closed as well.
    let mut prompt = tokio::net::TcpStream::connect(addr).await.unwrap();
    prompt
        .write_all(b"GET /health/live HTTP/1.1\r\nHost: vigil\r\n\r\n")
        .await
        .unwrap();
    let answer = read_until_closed(&mut prompt, Duration::from_secs(20))
        .await
        .expect("idle keep-alive stayed open");
    assert!(
        String::from_utf8_lossy(&answer).starts_with("HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&answer)
    );
    stop.send(()).unwrap();
    tokio::time::timeout(Duration::from_secs(20), server)
        .await
        .expect("the server did not stop")
        .unwrap()
        .unwrap();
}

#[tokio::test]
async fn jobs_left_unfinished_by_a_stopped_server_are_marked_interrupted() {
    let h = harness(None, 8).await;
    for (id, status) in [("a", "queued"), ("b", "running"), ("c", "succeeded")] {
        let row = vigil::storage::jobs::JobRow {
            id: id.into(),
            model: format!("m-{id}"),
            status: status.into(),
            message: None,
            options: "[]".into(),
            data: "/d".into(),
            created_at: 1,
            finished_at: None,
        };
        h.state.store.insert_job(&row).await.unwrap();
    }
    // Unfinished on record but not this process's (another replica's, as far as it
    // knows): not its to cancel.
    let (s, _, b) = send(
        &h.state,
        Request::delete("/v1/training-jobs/b").body(Body::empty()).unwrap(),
    )
    .await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::CONFLICT, "job_elsewhere"));
    assert_eq!(h.state.store.interrupt_abandoned_jobs(5, None).await.unwrap(), 2);
    for (id, want) in [("a", "failed"), ("b", "failed"), ("c", "succeeded")] {
        let row = h.state.store.job(id).await.unwrap().unwrap();
        assert_eq!(row.status, want, "{id}");
    }
    let (_, _, b) = send(&h.state, get("/v1/training-jobs/b")).await;
    let v = json(&b);
    assert_eq!(v["status"], "failed");
    assert!(v["message"].as_str().unwrap().starts_with("interrupted"));
}

/// A model with two learned maps, as usad has: the input itself, and its negative.
struct TwoMaps;
impl AnomalyModel for TwoMaps {
    fn infer(&self, batch: &candle_core::Tensor) -> candle_core::Result<ModelOutput> {
        Ok(ModelOutput {
            reconstruction: batch.clone(),
            learned_map: Some(batch.clone()),
            second_map: Some((1.0 - batch)?),
        })
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
}

/// The `anomaly_map.npy` of an inspection, re-rendered by the server.
async fn rendered_map(state: &Arc<AppState>, id: &str) -> Vec<f32> {
    let (s, _, b) = send(state, get(&format!("/v1/inspections/{id}/anomaly_map.npy"))).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    let tmp = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(tmp.path(), &b).unwrap();
    vigil::npy::read_f32_2d(tmp.path()).unwrap().0
}

#[tokio::test]
async fn alpha_mixes_two_learned_maps_per_request_and_re_renders_the_same_map() {
    let mut card = common::test_card(Fit::Whole, 32, 32);
    card.architecture = vigil::model::Architecture::Usad {
        width: 4,
        bottleneck: 2,
        alpha: 0.5,
    };
    card.scoring.method = vigil::scoring::MapMethod::Learned;
    let h = harness_with(
        None,
        8,
        "default",
        Arc::new(TwoMaps),
        Duration::from_secs(10),
        None,
        Some(card),
    )
    .await;
    // Grey (128/255 ≈ 0.502) with a white square (1.0): the first map peaks in the square
    // (1.0), the second is ≈ 0.498 around it and 0 inside; α 0.5 mixes both to 0.5.
    let score_at = |v: &Value| v["score"].as_f64().unwrap();
    let mut seen = vec![];
    for (query, alpha) in [("?alpha=1", 1.0), ("?alpha=0", 0.0), ("", 0.5)] {
        let (s, _, b) = send(
            &h.state,
            post(&format!("/v1/inspect{query}"), "image/png", png(32, 32, true)),
        )
        .await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        let v = json(&b);
        assert_eq!(v["alpha"].as_f64(), Some(alpha), "{v}");
        // The stored record keeps the mix: its re-rendered map peaks at the verdict's score.
        let id = v["id"].as_str().unwrap();
        let peak = rendered_map(&h.state, id).await.into_iter().fold(f32::MIN, f32::max) as f64;
        assert!(
            (peak - score_at(&v)).abs() < 1e-4,
            "{query}: map peak {peak}, score {}",
            score_at(&v)
        );
        let (_, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}"))).await;
        assert_eq!(json(&b)["alpha"].as_f64(), Some(alpha));
        seen.push(score_at(&v));
    }
    assert!(seen[0] > 0.9, "α 1: the square's own map, {}", seen[0]);
    assert!(
        (seen[1] - 0.498).abs() < 1e-3 && (seen[2] - 0.5).abs() < 1e-4,
        "{seen:?}"
    );

    for bad in ["alpha=1.5", "alpha=-0.1", "alpha=NaN", "alpha=x"] {
        let (s, _, b) = send(
            &h.state,
            post(&format!("/v1/inspect?{bad}"), "image/png", png(32, 32, true)),
        )
        .await;
        assert_eq!(
            (s, error_code(&b).as_str()),
            (StatusCode::BAD_REQUEST, "bad_request"),
            "{bad}"
        );
    }
    // Refused before a replay too: a fingerprint writes NaN as null, as if no alpha.
    let (s, _, _) = send(&h.state, inspect_with_key("alpha-k", png(32, 32, true), "p1")).await;
    assert_eq!(s, StatusCode::OK);
    let mut again = inspect_with_key("alpha-k", png(32, 32, true), "p1");
    *again.uri_mut() = "/v1/inspect?alpha=NaN".parse().unwrap();
    let (s, _, b) = send(&h.state, again).await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    // A model with one map has nothing to weigh.
    let single = harness(None, 8).await;
    let (s, _, b) = send(
        &single.state,
        post("/v1/inspect?alpha=0.5", "image/png", png(32, 32, true)),
    )
    .await;
    assert_eq!((s, error_code(&b).as_str()), (StatusCode::BAD_REQUEST, "bad_request"));
    assert!(
        String::from_utf8_lossy(&b).contains("usad"),
        "{}",
        String::from_utf8_lossy(&b)
    );
}

#[tokio::test]
async fn without_a_model_named_default_post_inspect_refuses_rather_than_guess() {
    let h = harness_named(None, 8, "small").await;
    // Several models and none named `default`, as a server with two trained models has.
    let state = {
        let other = h.state.model("small").unwrap();
        h.state.models.write().unwrap().insert("other".into(), other);
        let mut s = Arc::try_unwrap(h.state).ok().expect("no other reference yet");
        s.default_model = None;
        Arc::new(s)
    };
    let (s, _, b) = send(&state, post("/v1/inspect", "image/png", png(8, 8, false))).await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&b), "unknown_model");
    let message = json(&b)["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("other") && message.contains("small"), "{message}");
    // Named models still answer.
    let (s, _, _) = send(&state, post("/v1/models/small/inspect", "image/png", png(8, 8, false))).await;
    assert_eq!(s, StatusCode::OK);
    // A model named `default` that joins later (a training job) is the default at once.
    let served = state.model("small").unwrap();
    state.models.write().unwrap().insert("default".into(), served);
    let (s, _, b) = send(&state, post("/v1/inspect", "image/png", png(8, 8, false))).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["model"], "default");
}

#[tokio::test]
async fn a_stopping_server_says_connection_close_and_starts_no_training_job() {
    let h = harness(None, 8).await;
    std::fs::create_dir_all(&h.state.models_dir).unwrap();
    let folder = good_folder(h._dir.path(), 3);
    let (s, headers, _) = send(&h.state, get("/health/live")).await;
    assert_eq!(s, StatusCode::OK);
    assert!(headers.get("connection").is_none());
    // What `server::run` does on SIGTERM, before its shutdown delay.
    h.state.stopping.store(true, std::sync::atomic::Ordering::SeqCst);
    h.state.training.stop_all();
    let (s, headers, _) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    assert_eq!(s, StatusCode::OK, "inspections are still answered");
    assert_eq!(headers["connection"], "close");
    let request = serde_json::json!({"model": "late", "folder": folder, "options": {"steps": 2}});
    let (s, headers, b) = send(&h.state, post_json("/v1/training-jobs", request)).await;
    assert_eq!(
        (s, error_code(&b).as_str()),
        (StatusCode::SERVICE_UNAVAILABLE, "shutting_down")
    );
    assert_eq!(headers["connection"], "close");
    let (_, _, b) = send(&h.state, get("/v1/training-jobs")).await;
    assert_eq!(
        json(&b).as_array().map(Vec::len),
        Some(0),
        "{}",
        String::from_utf8_lossy(&b)
    );
}

fn inspect_with_key(key: &str, image: Vec<u8>, part: &str) -> Request<Body> {
    Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .header("idempotency-key", key)
        .header("x-part-id", part)
        .body(Body::from(image))
        .unwrap()
}

/// Images the blob store holds under `root`, in `images/<day>/`.
fn stored_images(root: &std::path::Path) -> usize {
    std::fs::read_dir(root.join("images"))
        .unwrap()
        .flatten()
        .map(|d| std::fs::read_dir(d.path()).unwrap().count())
        .sum()
}

#[tokio::test]
async fn a_retry_with_the_same_idempotency_key_gets_the_first_answer_and_no_second_record() {
    // Trained on 32×32 images: a 40×30 one is judged with a warning, which the replay and
    // the record must carry too.
    let mut card = common::test_card(Fit::Whole, 32, 32);
    card.training.image_size = Some([32, 32]);
    let flat = Arc::new(common::Flat(Device::Cpu));
    let h = harness_with(None, 8, "idem", flat, Duration::from_secs(10), None, Some(card)).await;
    let image = png(40, 30, true);

    let (s, hd, b) = send(&h.state, inspect_with_key("8e03978e-40d5", image.clone(), "p-1")).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert!(hd.get("idempotent-replayed").is_none(), "a first answer is no replay");
    let first = json(&b);
    let id = first["id"].as_str().unwrap().to_string();
    assert_eq!(first["warnings"].as_array().map(Vec::len), Some(1), "{first}");

    // The retry, with the key bare or quoted (a structured-field string): the same answer.
    for key in ["8e03978e-40d5", "\"8e03978e-40d5\""] {
        let (s, hd, b) = send(&h.state, inspect_with_key(key, image.clone(), "p-1")).await;
        assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
        assert_eq!(hd["idempotent-replayed"], "true");
        let again = json(&b);
        for field in [
            "id",
            "score",
            "threshold",
            "is_anomalous",
            "regions",
            "warnings",
            "links",
            "part_id",
            "created_at",
            "idempotency_key",
        ] {
            assert_eq!(again[field], first[field], "{field}");
        }
        assert_eq!(
            again["idempotency_key"], "8e03978e-40d5",
            "the record shows its key, without quotes"
        );
    }
    let (_, _, b) = send(&h.state, get("/v1/inspections")).await;
    assert_eq!(
        json(&b)["items"].as_array().unwrap().len(),
        1,
        "one record for three requests"
    );
    let (_, _, b) = send(&h.state, get(&format!("/v1/inspections/{id}"))).await;
    assert_eq!(json(&b)["warnings"], first["warnings"], "the record keeps the warning");

    // The key with anything else is refused, not answered with the first part's verdict.
    let other_image = send(&h.state, inspect_with_key("8e03978e-40d5", png(40, 30, false), "p-1")).await;
    let other_part = send(&h.state, inspect_with_key("8e03978e-40d5", image.clone(), "p-2")).await;
    let mut with_threshold = inspect_with_key("8e03978e-40d5", image.clone(), "p-1");
    *with_threshold.uri_mut() = "/v1/inspect?threshold=9".parse().unwrap();
    let other_threshold = send(&h.state, with_threshold).await;
    for (what, (s, _, b)) in [
        ("image", other_image),
        ("part", other_part),
        ("threshold", other_threshold),
    ] {
        assert_eq!(s, StatusCode::UNPROCESSABLE_ENTITY, "another {what}");
        assert_eq!(error_code(&b), "idempotency_key_reused", "another {what}");
        assert!(
            String::from_utf8_lossy(&b).contains(&id),
            "names the record: {}",
            String::from_utf8_lossy(&b)
        );
    }
    // Another key is another inspection.
    let (s, _, b) = send(&h.state, inspect_with_key("second", image.clone(), "p-1")).await;
    assert_eq!(s, StatusCode::OK);
    assert_ne!(json(&b)["id"], first["id"]);

    // Keys that cannot be one.
    let long = "k".repeat(256);
    for bad in ["", "\"\"", long.as_str(), "caf\u{e9}", "a\"b", "a\\b"] {
        let req = Request::post("/v1/inspect")
            .header("content-type", "image/png")
            .header(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(bad.as_bytes()).unwrap(),
            )
            .body(Body::from(image.clone()))
            .unwrap();
        let (s, _, b) = send(&h.state, req).await;
        assert_eq!(
            (s, error_code(&b)),
            (StatusCode::BAD_REQUEST, "bad_request".into()),
            "{bad:?}"
        );
    }
    let two = Request::post("/v1/inspect")
        .header("content-type", "image/png")
        .header("idempotency-key", "a")
        .header("idempotency-key", "b")
        .body(Body::from(image.clone()))
        .unwrap();
    assert_eq!(send(&h.state, two).await.0, StatusCode::BAD_REQUEST);

    let (_, _, b) = send(&h.state, get("/metrics")).await;
    let text = String::from_utf8_lossy(&b);
    assert!(
        text.lines()
            .any(|l| l == "vigil_inspections_replayed_total{model=\"idem\"} 2"),
        "{text}"
    );
}

/// A flat reconstructor that counts the images it is given.
struct Counted(std::sync::atomic::AtomicUsize, common::Flat);

impl AnomalyModel for Counted {
    fn infer(&self, batch: &candle_core::Tensor) -> candle_core::Result<ModelOutput> {
        self.0.fetch_add(batch.dims()[0], std::sync::atomic::Ordering::SeqCst);
        self.1.infer(batch)
    }
    fn device(&self) -> &Device {
        &Device::Cpu
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_sent_at_once_with_one_key_are_judged_once() {
    let counted = Arc::new(Counted(Default::default(), common::Flat(Device::Cpu)));
    let h = harness_with(
        None,
        16,
        "idem-race",
        counted.clone(),
        Duration::from_secs(10),
        None,
        None,
    )
    .await;
    let image = png(32, 32, true);
    let answers =
        futures_util::future::join_all((0..6).map(|_| send(&h.state, inspect_with_key("race", image.clone(), "p-1"))))
            .await;
    let mut replayed = 0;
    let ids: std::collections::BTreeSet<String> = answers
        .iter()
        .map(|(s, hd, b)| {
            assert_eq!(*s, StatusCode::OK, "{}", String::from_utf8_lossy(b));
            replayed += usize::from(hd.get("idempotent-replayed").is_some());
            json(b)["id"].as_str().unwrap().to_string()
        })
        .collect();
    assert_eq!(ids.len(), 1, "every request gets the one record: {ids:?}");
    assert_eq!(replayed, 5);
    assert_eq!(
        counted.0.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "the model ran once: the others waited for the first and were answered from its record"
    );
    let (_, _, b) = send(&h.state, get("/v1/inspections")).await;
    assert_eq!(json(&b)["items"].as_array().unwrap().len(), 1);
    assert_eq!(stored_images(h.state.blobs.root()), 1);
    assert!(h.state.idempotency.is_empty(), "no key is left held");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_given_up_while_waiting_leaves_no_key_behind() {
    let (held, started, go) = held();
    let h = harness_with(None, 4, "default", held, Duration::from_secs(60), None, None).await;
    let image = png(32, 32, true);
    let st = h.state.clone();
    let img = image.clone();
    let first = tokio::spawn(async move { send(&st, inspect_with_key("k", img, "p")).await });
    let started = tokio::task::spawn_blocking(move || {
        started.recv().unwrap();
        started
    })
    .await
    .unwrap();
    // The retry waits for the first, which the model holds: its client gives up.
    let retry = tokio::time::timeout(
        Duration::from_millis(100),
        send(&h.state, inspect_with_key("k", image.clone(), "p")),
    )
    .await;
    assert!(retry.is_err(), "the retry cannot be answered while the first is judged");
    go.send(()).unwrap();
    assert_eq!(first.await.unwrap().0, StatusCode::OK);
    assert!(
        h.state.idempotency.is_empty(),
        "the key is released by the first and by the retry given up"
    );
    drop(started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_is_answered_from_its_record_while_the_queue_is_full() {
    let (held, started, go) = held();
    let h = harness_with(None, 1, "default", held, Duration::from_secs(60), None, None).await;
    go.send(()).unwrap(); // the first request runs at once
    let image = png(32, 32, true);
    let (s, _, b) = send(&h.state, inspect_with_key("k", image.clone(), "p")).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    started.recv().unwrap();
    let first = json(&b)["id"].clone();
    // Another request fills the one queue slot, held in the model.
    let st = h.state.clone();
    let busy = tokio::spawn(async move { send(&st, post("/v1/inspect", "image/png", png(32, 32, false))).await });
    let started = tokio::task::spawn_blocking(move || {
        started.recv().unwrap();
        started
    })
    .await
    .unwrap();
    let (s, _, _) = send(&h.state, post("/v1/inspect", "image/png", image.clone())).await;
    assert_eq!(s, StatusCode::TOO_MANY_REQUESTS, "the queue is full");
    let (s, hd, b) = send(&h.state, inspect_with_key("k", image.clone(), "p")).await;
    assert_eq!(
        s,
        StatusCode::OK,
        "a recorded retry needs no queue slot: {}",
        String::from_utf8_lossy(&b)
    );
    assert_eq!(
        (hd["idempotent-replayed"].to_str().unwrap(), &json(&b)["id"]),
        ("true", &first)
    );
    go.send(()).unwrap();
    assert_eq!(busy.await.unwrap().0, StatusCode::OK);
    drop(started);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_recorded_by_another_replica_while_judging_gives_its_answer_and_removes_the_image() {
    let (held, started, go) = held();
    let h = harness_with(None, 4, "default", held, Duration::from_secs(60), None, None).await;
    let image = png(32, 32, true);
    let st = h.state.clone();
    let img = image.clone();
    let retry = tokio::spawn(async move { send(&st, inspect_with_key("shared", img, "p")).await });
    // In the model: past the look-up. Another replica sharing the database records the
    // same request meanwhile (written here straight into the store).
    tokio::task::spawn_blocking(move || started.recv().unwrap())
        .await
        .unwrap();
    let digest = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&image));
    let elsewhere = vigil::storage::Record {
        id: uuid::Uuid::now_v7().to_string(),
        model: "default".into(),
        model_version: "v1".into(),
        created_at: 1,
        score: 0.25,
        threshold: 0.5,
        is_anomalous: false,
        width: 32,
        height: 32,
        regions: serde_json::json!([]),
        timings: serde_json::json!({"decode": 0.0, "queue": 0.0, "inference": 0.0, "scoring": 0.0, "total": 1.0}),
        image_sha256: digest.clone(),
        image_path: None,
        request_id: None,
        part_id: Some("p".into()),
        alpha: None,
        pixel_threshold: Some(0.3),
        idempotency_key: Some("shared".into()),
        request_fingerprint: Some(api::idempotency::fingerprint(&digest, Some("p"), None, None)),
        warnings: Vec::new(),
        maps_version: None,
    };
    h.state.store.insert(&elsewhere).await.unwrap();
    go.send(()).unwrap();
    let (s, hd, b) = retry.await.unwrap();
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(hd["idempotent-replayed"], "true");
    assert_eq!(
        (json(&b)["id"].as_str(), json(&b)["score"].as_f64()),
        (Some(elsewhere.id.as_str()), Some(0.25))
    );
    assert_eq!(h.state.store.count().await.unwrap(), 1);
    assert_eq!(
        stored_images(h.state.blobs.root()),
        0,
        "the image this replica stored is removed"
    );
}

#[tokio::test]
async fn an_answer_without_a_stored_image_links_to_no_image() {
    let h = harness(None, 8).await;
    let (s, _, b) = send(
        &h.state,
        post("/v1/inspect?store_image=false", "image/png", png(32, 32, true)),
    )
    .await;
    assert_eq!(s, StatusCode::OK);
    let v = json(&b);
    assert_eq!(v["image_stored"], false);
    let links = v["links"].as_object().unwrap();
    assert_eq!(links.keys().collect::<Vec<_>>(), ["self"], "{links:?}");
    let (s, _, b) = send(&h.state, get(links["self"].as_str().unwrap())).await;
    assert_eq!(s, StatusCode::OK);
    assert_eq!(json(&b)["links"].as_object().unwrap().len(), 1);
    let (_, _, b) = send(&h.state, post("/v1/inspect", "image/png", png(32, 32, true))).await;
    let links = json(&b)["links"].clone();
    for link in ["heatmap", "anomaly_map", "reconstruction", "image"] {
        let (s, _, _) = send(&h.state, get(links[link].as_str().unwrap())).await;
        assert_eq!(s, StatusCode::OK, "{link}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_models_folder_is_followed_added_changed_and_removed_folders() {
    // As when another replica sharing the models folder trains one, or one is copied in.
    let h = harness(None, 8).await;
    let models = h.state.models_dir.clone();
    let inspect_late = || post("/v1/models/late/inspect", "image/png", png(32, 32, true));
    let (s, _, b) = send(&h.state, inspect_late()).await;
    assert_eq!((s, error_code(&b)), (StatusCode::NOT_FOUND, "unknown_model".into()));
    // A folder that does not load (still being copied, say) is not served, and says why...
    std::fs::create_dir_all(models.join("late")).unwrap();
    std::fs::write(models.join("late/model.json"), "{").unwrap();
    let (s, _, b) = send(&h.state, inspect_late()).await;
    assert_eq!(
        (s, error_code(&b)),
        (StatusCode::UNPROCESSABLE_ENTITY, "model_load_failed".into())
    );
    // (naming the file it lacks)
    let message = String::from_utf8_lossy(&b);
    assert!(
        message.contains("does not load") && message.contains("weights.safetensors"),
        "{message}"
    );
    // ...until its files are complete: then the next request naming it is judged by it.
    common::copy_model(common::tiny_model(), &models.join("late"));
    let (s, _, b) = send(&h.state, inspect_late()).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["model"], "late");
    assert!(h.state.discovery.failure("late").await.is_none());
    // The list shows a folder as soon as it is there; hidden folders (a job's staging)
    // and names a model cannot have are left alone.
    common::copy_model(common::tiny_model(), &models.join("listed"));
    common::copy_model(common::tiny_model(), &models.join(".late.job.partial"));
    common::copy_model(common::tiny_model(), &models.join("has space"));
    let names = |b: &[u8]| -> Vec<(String, String)> {
        json(b)
            .as_array()
            .unwrap()
            .iter()
            .map(|m| {
                (
                    m["name"].as_str().unwrap().to_string(),
                    m["version"].as_str().unwrap().to_string(),
                )
            })
            .collect()
    };
    let (s, b) = {
        let (s, _, b) = send(&h.state, get("/v1/models")).await;
        (s, b)
    };
    assert_eq!(s, StatusCode::OK);
    let listed = names(&b);
    assert_eq!(
        listed.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["default", "late", "listed"]
    );
    assert!(h
        .state
        .discovery
        .failure("has space")
        .await
        .is_some_and(|w| w.contains("cannot be a model")));
    let (_, _, b) = send(&h.state, get("/metrics")).await;
    assert!(String::from_utf8_lossy(&b).contains("vigil_model_info{model=\"listed\""));
    // A pass with nothing new changes nothing.
    assert_eq!(api::discovery::sync_models(&h.state).await, Default::default());

    // Another version written over a served model's folder (a retraining elsewhere): the
    // next pass reloads it. (The same weights with another threshold: another version.)
    let card_path = models.join("late/model.json");
    let mut card: Value = serde_json::from_slice(&std::fs::read(&card_path).unwrap()).unwrap();
    card["thresholds"]["image"] = serde_json::json!(123.0);
    std::fs::write(models.join(".late.tmp"), serde_json::to_vec_pretty(&card).unwrap()).unwrap();
    std::fs::rename(models.join(".late.tmp"), &card_path).unwrap();
    let changes = api::discovery::sync_models(&h.state).await;
    assert_eq!(changes.reloaded, ["late"]);
    let (_, _, b) = send(&h.state, get("/v1/models/late")).await;
    assert_eq!(json(&b)["card"]["thresholds"]["image"], 123.0);
    assert_ne!(json(&b)["version"].as_str().unwrap(), listed[1].1, "another version");
    // A folder removed: no longer served. Models not loaded from the models folder (the
    // harness's `default`) are not followed.
    std::fs::remove_dir_all(models.join("listed")).unwrap();
    let changes = api::discovery::sync_models(&h.state).await;
    assert_eq!(changes, Default::default(), "one pass without the folder is not enough");
    let changes = api::discovery::sync_models(&h.state).await;
    assert_eq!((changes.removed, changes.added), (vec!["listed".to_string()], vec![]));
    let (s, _, _) = send(
        &h.state,
        post("/v1/models/listed/inspect", "image/png", png(32, 32, true)),
    )
    .await;
    assert_eq!(s, StatusCode::NOT_FOUND);
    let (_, _, b) = send(&h.state, get("/v1/models")).await;
    assert_eq!(
        names(&b).iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["default", "late"]
    );
    // A reload naming a folder not served yet serves it.
    common::copy_model(common::tiny_model(), &models.join("fresh"));
    let reload = Request::post("/v1/models/fresh/reload").body(Body::empty()).unwrap();
    let (s, _, b) = send(&h.state, reload).await;
    assert_eq!(s, StatusCode::OK, "{}", String::from_utf8_lossy(&b));
    assert_eq!(json(&b)["name"], "fresh");
    assert!(h.state.model("fresh").is_ok());
    // A models folder emptied of every model (a share not mounted, say) removes nothing.
    for name in ["late", "fresh", "has space", ".late.job.partial"] {
        std::fs::remove_dir_all(models.join(name)).unwrap();
    }
    for _ in 0..3 {
        assert_eq!(api::discovery::sync_models(&h.state).await, Default::default());
    }
    assert!(h.state.model("late").is_ok() && h.state.model("fresh").is_ok());
}
