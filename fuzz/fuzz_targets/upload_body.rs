//! The upload body reader on arbitrary requests: the first byte picks the declared content
//! type (raw image types, multipart with a fixed boundary, others), the rest is the body.
//! Never a panic or a hang; an accepted body is non-empty and within the limit; every
//! refusal is a 4xx.
#![no_main]

use axum::body::Body;
use axum::extract::Request;
use libfuzzer_sys::fuzz_target;
use vigil::api::upload::read_image_body;

const LIMIT: usize = 4096;
const CONTENT_TYPES: &[&str] = &[
    "image/png",
    "application/octet-stream",
    "",
    "multipart/form-data; boundary=b0undary",
    "multipart/form-data",
    "multipart/form-data; boundary=\"b0undary\"",
    "text/plain",
    "IMAGE/JPEG; charset=x",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let content_type = CONTENT_TYPES[pick as usize % CONTENT_TYPES.len()];
    let mut req = Request::post("/v1/inspect");
    if !content_type.is_empty() {
        req = req.header("content-type", content_type);
    }
    // Half the cases declare their true length, so both the early 413 and the streaming
    // limit are reached.
    if pick & 0x80 != 0 {
        req = req.header("content-length", body.len());
    }
    let req = req.body(Body::from(body.to_vec())).unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    match runtime.block_on(read_image_body(req, LIMIT)) {
        Ok(bytes) => assert!(!bytes.is_empty() && bytes.len() <= LIMIT),
        Err(e) => {
            let (status, _) = e.status_and_code();
            assert!(status.is_client_error(), "{status} for {e}");
        }
    }
});
