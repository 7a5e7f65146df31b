//! Decode-with-limits on arbitrary bytes: never a panic, never an image over the limit,
//! and every refusal is one of the typed errors the API maps to 4xx.
#![no_main]

use std::sync::Once;

use libfuzzer_sys::fuzz_target;
use vigil::image_io::{decode, ImageError};

/// Small enough that the fuzzer explores headers rather than spending its time decoding.
const MAX_PIXELS: u64 = 1 << 16;

static DEFAULT_HOOK: Once = Once::new();

fuzz_target!(|data: &[u8]| {
    // `decode` catches a panicking third-party decoder and returns `Corrupt`, which is the
    // behaviour under test; libfuzzer-sys's panic hook would abort on that caught panic.
    // Put back the default hook (print only): a panic that escapes `decode` still reaches
    // libfuzzer-sys's `catch_unwind` and is reported as a crash.
    DEFAULT_HOOK.call_once(|| drop(std::panic::take_hook()));
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
