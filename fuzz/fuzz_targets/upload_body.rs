//! The upload body reader on arbitrary requests (framed by `vigil::api::upload::fuzz_request`:
//! the first byte picks the content type, the rest is the body). Never a panic or a hang;
//! an accepted body is non-empty and within the limit; every refusal is a 4xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::api::upload::{fuzz_request, read_image_body};

const LIMIT: usize = 4096;

fuzz_target!(|data: &[u8]| {
    let Some(req) = fuzz_request(data) else { return };
    let runtime = tokio::runtime::Builder::new_current_thread().build().unwrap();
    match runtime.block_on(read_image_body(req, LIMIT)) {
        Ok(bytes) => assert!(!bytes.is_empty() && bytes.len() <= LIMIT),
        Err(e) => {
            let (status, _) = e.status_and_code();
            assert!(status.is_client_error(), "{status} for {e}");
        }
    }
});
