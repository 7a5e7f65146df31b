//! The fuzz targets' seed corpus (`tests/fuzz-seeds/`, used by `fuzz/` and by the mutated
//! upload test in `tests/serve.rs`) stays meaningful: every image seed decodes, and every
//! body seed reads the way its name says. Crashes the fuzzers find become tests here.

use axum::body::Body;
use axum::extract::Request;
use vigil::api::upload::read_image_body;
use vigil::image_io::decode;

const SEEDS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fuzz-seeds");

fn seeds(target: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(format!("{SEEDS}/{target}"))
        .unwrap()
        .map(|e| {
            let p = e.unwrap().path();
            (
                p.file_name().unwrap().to_string_lossy().to_string(),
                std::fs::read(&p).unwrap(),
            )
        })
        .collect();
    out.sort();
    out
}

#[test]
fn every_image_seed_decodes_in_each_format() {
    let seeds = seeds("decode");
    let mut formats = std::collections::BTreeSet::new();
    for (name, bytes) in &seeds {
        let img = decode(bytes, 1 << 16).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(img.width() >= 16 && img.height() >= 16, "{name}");
        formats.insert(format!("{:?}", image::guess_format(bytes).unwrap()));
    }
    assert_eq!(formats.len(), 4, "PNG, JPEG, BMP and TIFF seeds: {formats:?}");
}

/// The same framing as the `upload_body` fuzz target: the first byte picks the content
/// type (and whether the length is declared), the rest is the body.
async fn read_like_the_fuzz_target(data: &[u8]) -> Result<Vec<u8>, vigil::api::error::ApiError> {
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
    let (&pick, body) = data.split_first().unwrap();
    let content_type = CONTENT_TYPES[pick as usize % CONTENT_TYPES.len()];
    let mut req = Request::post("/v1/inspect");
    if !content_type.is_empty() {
        req = req.header("content-type", content_type);
    }
    if pick & 0x80 != 0 {
        req = req.header("content-length", body.len());
    }
    read_image_body(req.body(Body::from(body.to_vec())).unwrap(), 4096).await
}

#[tokio::test]
async fn every_body_seed_reads_as_its_name_says() {
    let png = std::fs::read(format!("{SEEDS}/decode/grey.png")).unwrap();
    for (name, data) in seeds("upload_body") {
        let got = read_like_the_fuzz_target(&data).await;
        match name.as_str() {
            "multipart-no-image" => {
                let e = got.expect_err(&name);
                assert_eq!(e.status_and_code().1, "bad_request", "{name}: {e}");
            }
            _ => assert_eq!(got.unwrap_or_else(|e| panic!("{name}: {e}")), png, "{name}"),
        }
    }
}
