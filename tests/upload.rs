//! The fuzz targets' seed corpus (`tests/fuzz-seeds/`, used by `fuzz/` and by the mutated
//! upload test in `tests/serve.rs`) stays meaningful: every image seed decodes, and every
//! body seed reads the way its name says. Crashes the fuzzers found are kept in
//! `tests/fuzz-regressions/<target>/` and replayed here.

use vigil::api::upload::{fuzz_request, read_image_body};
use vigil::image_io::decode;

const TESTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests");

/// Every file in `tests/<dir>`, as (name, bytes), by name.
fn files(dir: &str) -> Vec<(String, Vec<u8>)> {
    let mut out: Vec<_> = std::fs::read_dir(format!("{TESTS}/{dir}"))
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
    let seeds = files("fuzz-seeds/decode");
    let mut formats = std::collections::BTreeSet::new();
    for (name, bytes) in &seeds {
        let img = decode(bytes, 1 << 16).unwrap_or_else(|e| panic!("{name}: {e}"));
        assert!(img.width() >= 16 && img.height() >= 16, "{name}");
        formats.insert(format!("{:?}", image::guess_format(bytes).unwrap()));
    }
    assert_eq!(formats.len(), 4, "PNG, JPEG, BMP and TIFF seeds: {formats:?}");
}

/// Reads `data` as the `upload_body` fuzz target does, with its limit.
async fn read_like_the_fuzz_target(data: &[u8]) -> Result<Vec<u8>, vigil::api::error::ApiError> {
    read_image_body(fuzz_request(data).unwrap(), 4096).await
}

#[tokio::test]
async fn every_body_seed_reads_as_its_name_says() {
    let png = std::fs::read(format!("{TESTS}/fuzz-seeds/decode/grey.png")).unwrap();
    for (name, data) in files("fuzz-seeds/upload_body") {
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

#[test]
fn inputs_that_crashed_the_decode_fuzzer_are_refused_as_corrupt() {
    let found = files("fuzz-regressions/decode");
    assert!(!found.is_empty());
    for (name, bytes) in found {
        let err = decode(&bytes, 1 << 16).expect_err(&name);
        assert!(matches!(err, vigil::image_io::ImageError::Corrupt(_)), "{name}: {err}");
    }
}
