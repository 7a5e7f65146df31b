//! Decoding images with limits, colour conversion and the planar f32 image type the
//! model and scoring work on.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageFormat, ImageReader, RgbImage};

/// Image decoding failures, each a distinct kind so the HTTP layer can map them to statuses.
#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("the image is empty (0 bytes)")]
    Empty,
    #[error("not an image, or a format vigil does not read (PNG, JPEG, BMP, TIFF)")]
    UnsupportedFormat,
    #[error("the image declares {width}×{height} pixels, over the limit of {max_pixels}")]
    TooManyPixels { width: u32, height: u32, max_pixels: u64 },
    #[error("corrupt or truncated image: {0}")]
    Corrupt(String),
    #[error("cannot read {path}: {source}")]
    Io { path: String, source: std::io::Error },
}

/// Formats vigil accepts.
pub const SUPPORTED: &[ImageFormat] = &[ImageFormat::Png, ImageFormat::Jpeg, ImageFormat::Bmp, ImageFormat::Tiff];

/// File extensions treated as images when walking folders.
pub const EXTENSIONS: &[&str] = &["png", "jpg", "jpeg", "bmp", "tif", "tiff"];

/// Default pixel limit: 40 megapixels.
pub const DEFAULT_MAX_PIXELS: u64 = 40_000_000;

/// Decodes `bytes`, refusing from the header alone any image over `max_pixels`
/// (so a small file declaring 100000×100000 never allocates).
pub fn decode(bytes: &[u8], max_pixels: u64) -> Result<DynamicImage, ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    let format = image::guess_format(bytes).map_err(|_| ImageError::UnsupportedFormat)?;
    if !SUPPORTED.contains(&format) {
        return Err(ImageError::UnsupportedFormat);
    }
    let header = ImageReader::with_format(Cursor::new(bytes), format);
    let (width, height) = without_panics(format, || header.into_dimensions())?;
    if width == 0 || height == 0 {
        return Err(ImageError::Corrupt(format!(
            "the image declares {width}×{height} pixels"
        )));
    }
    if width as u64 * height as u64 > max_pixels {
        return Err(ImageError::TooManyPixels {
            width,
            height,
            max_pixels,
        });
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // Room for 16-bit RGBA of the declared size plus decoder scratch.
    limits.max_alloc = Some(width as u64 * height as u64 * 8 * 2 + (64 << 20));
    reader.limits(limits);
    // The decoders are third-party code fed untrusted bytes, and one can panic where it
    // should return an error (fuzzing found zune-jpeg 0.5.15 unwrapping `None` in its AVX2
    // IDCT on a crafted JPEG; tests/upload.rs keeps that input). A panic here is a corrupt
    // image to the caller, not a crashed `vigil inspect` or a 500.
    without_panics(format, || reader.decode())
}

/// Runs a decoder step (header or pixels) so that a panic in it becomes a corrupt image.
fn without_panics<T>(format: ImageFormat, step: impl FnOnce() -> image::ImageResult<T>) -> Result<T, ImageError> {
    quiet_decoder_panics();
    DECODING.with(|d| d.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
    DECODING.with(|d| d.set(false));
    match result {
        Ok(decoded) => decoded.map_err(|e| ImageError::Corrupt(e.to_string())),
        Err(payload) => Err(ImageError::Corrupt(format!(
            "the {format:?} decoder failed on this image ({})",
            panic_message(payload.as_ref())
        ))),
    }
}

/// The text a panic was raised with, when it was text.
fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

thread_local! {
    /// Set while this thread runs a decoder inside `catch_unwind`.
    static DECODING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// A decoder panic that [`decode`] catches is a corrupt image, not a crash: without this
/// the default hook would still print "thread … panicked" (and a backtrace) to stderr,
/// outside the JSON logs. Panics anywhere else go to the previous hook unchanged.
fn quiet_decoder_panics() {
    static INSTALL: std::sync::Once = std::sync::Once::new();
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            if DECODING.try_with(|d| d.get()).unwrap_or(false) {
                let location = info
                    .location()
                    .map(|l| format!("{}:{}", l.file(), l.line()))
                    .unwrap_or_default();
                tracing::warn!(
                    location,
                    message = panic_message(info.payload()),
                    "an image decoder crashed on its input; answered as a corrupt image"
                );
            } else {
                previous(info);
            }
        }));
    });
}

/// Reads and decodes a file.
pub fn load(path: &Path, max_pixels: u64) -> Result<DynamicImage, ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode(&bytes, max_pixels)
}

/// A planar (C, H, W) image with values in [0, 1]: the layout of a candle tensor row.
#[derive(Debug, Clone, PartialEq)]
pub struct Planar {
    pub channels: usize,
    pub width: usize,
    pub height: usize,
    pub data: Vec<f32>,
}

impl Planar {
    pub fn new(channels: usize, width: usize, height: usize) -> Self {
        Self {
            channels,
            width,
            height,
            data: vec![0.0; channels * width * height],
        }
    }

    /// Converts to 1 (luma) or 3 (RGB) channels.
    pub fn from_image(img: &DynamicImage, channels: usize) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let n = w * h;
        let mut out = Self::new(channels, w, h);
        if channels == 1 {
            let g = img.to_luma32f();
            out.data.copy_from_slice(g.as_raw());
        } else {
            let rgb = img.to_rgb32f();
            for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                for (c, v) in px.iter().enumerate() {
                    out.data[c * n + i] = *v;
                }
            }
        }
        out
    }

    pub fn plane(&self, c: usize) -> &[f32] {
        let n = self.width * self.height;
        &self.data[c * n..(c + 1) * n]
    }

    /// Bilinear resize (triangle filter, as `image` implements it) of every channel.
    pub fn resize(&self, width: usize, height: usize) -> Self {
        if width == self.width && height == self.height {
            return self.clone();
        }
        let mut out = Self::new(self.channels, width, height);
        let n = width * height;
        for c in 0..self.channels {
            let plane = resize_plane(self.plane(c), self.width, self.height, width, height);
            out.data[c * n..(c + 1) * n].copy_from_slice(&plane);
        }
        out
    }

    /// Crops a `size × size` window at (x, y).
    pub fn crop(&self, x: usize, y: usize, w: usize, h: usize) -> Self {
        let mut out = Self::new(self.channels, w, h);
        for c in 0..self.channels {
            for r in 0..h {
                let src = c * self.width * self.height + (y + r) * self.width + x;
                let dst = c * w * h + r * w;
                out.data[dst..dst + w].copy_from_slice(&self.data[src..src + w]);
            }
        }
        out
    }

    /// 8-bit RGB for display (gray is replicated).
    pub fn to_rgb8(&self) -> RgbImage {
        let n = self.width * self.height;
        let mut img = RgbImage::new(self.width as u32, self.height as u32);
        for (i, px) in img.pixels_mut().enumerate() {
            for (c, v) in px.0.iter_mut().enumerate() {
                let src = if self.channels == 1 { 0 } else { c };
                *v = (self.data[src * n + i].clamp(0.0, 1.0) * 255.0).round() as u8;
            }
        }
        img
    }
}

/// Resizes one row-major plane with a triangle (bilinear) filter.
pub fn resize_plane(plane: &[f32], w: usize, h: usize, nw: usize, nh: usize) -> Vec<f32> {
    if w == nw && h == nh {
        return plane.to_vec();
    }
    let buf = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, plane.to_vec())
        .expect("plane size matches its dimensions");
    image::imageops::resize(&buf, nw as u32, nh as u32, image::imageops::FilterType::Triangle).into_raw()
}

/// True when an RGB image carries colour (some pixel's channels differ by more than 2/255).
pub fn has_colour(img: &DynamicImage) -> bool {
    if !img.color().has_color() {
        return false;
    }
    let rgb = img.to_rgb8();
    rgb.pixels().any(|p| {
        let (r, g, b) = (p[0] as i16, p[1] as i16, p[2] as i16);
        (r - g).abs() > 2 || (g - b).abs() > 2 || (r - b).abs() > 2
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png_bytes(img: &DynamicImage) -> Vec<u8> {
        let mut out = Vec::new();
        img.write_to(&mut Cursor::new(&mut out), ImageFormat::Png).unwrap();
        out
    }

    #[test]
    fn decode_reports_each_failure_kind() {
        assert!(matches!(decode(b"", 100), Err(ImageError::Empty)));
        assert!(matches!(
            decode(b"hello world", 100),
            Err(ImageError::UnsupportedFormat)
        ));
        let img = DynamicImage::new_luma8(20, 10);
        let bytes = png_bytes(&img);
        assert!(decode(&bytes, 200).is_ok());
        assert!(matches!(
            decode(&bytes, 199),
            Err(ImageError::TooManyPixels {
                width: 20,
                height: 10,
                ..
            })
        ));
        assert!(matches!(
            decode(&bytes[..bytes.len() / 2], 1000),
            Err(ImageError::Corrupt(_))
        ));
    }

    #[test]
    fn planar_round_trips_gray_and_rgb() {
        let mut img = image::RgbImage::new(3, 2);
        img.put_pixel(1, 0, image::Rgb([255, 0, 51]));
        let d = DynamicImage::ImageRgb8(img);
        let p = Planar::from_image(&d, 3);
        assert_eq!(p.data[1], 1.0);
        assert_eq!(p.data[6 + 1], 0.0);
        assert!((p.data[12 + 1] - 0.2).abs() < 1e-6);
        assert_eq!(p.to_rgb8().get_pixel(1, 0).0, [255, 0, 51]);
        assert!(has_colour(&d));
        assert!(!has_colour(&DynamicImage::new_luma8(2, 2)));
        let c = p.crop(1, 0, 2, 2);
        assert_eq!((c.width, c.height, c.data[0]), (2, 2, 1.0));
    }
}
