//! Decode-with-limits on arbitrary bytes: never a panic, never an image over the limit,
//! and every refusal is one of the typed errors the API maps to 4xx.
#![no_main]

use libfuzzer_sys::fuzz_target;
use vigil::image_io::{decode, ImageError};

/// Small enough that the fuzzer explores headers rather than spending its time decoding.
const MAX_PIXELS: u64 = 1 << 16;

fuzz_target!(|data: &[u8]| {
    match decode(data, MAX_PIXELS) {
        Ok(img) => {
            let pixels = img.width() as u64 * img.height() as u64;
            assert!(
                pixels > 0 && pixels <= MAX_PIXELS,
                "{}×{} decoded",
                img.width(),
                img.height()
            );
        }
        Err(ImageError::Empty) => assert!(data.is_empty()),
        Err(_) => {}
    }
});
