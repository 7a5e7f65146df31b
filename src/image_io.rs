//! Decoding images with limits, colour conversion and the planar f32 image type the
//! model and scoring work on.

use std::io::{Cursor, Read};
use std::path::Path;

use image::metadata::Orientation;
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
    #[error("the image is larger than its decoder will read: {0}")]
    OverDecoderLimit(String),
    /// A format vigil reads, in a variant its decoder does not (a TIFF of 32-bit floats).
    #[error("a kind of image vigil does not read: {0}")]
    UnsupportedKind(String),
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
    decode_oriented(bytes, max_pixels).map(|(img, _)| img)
}

/// [`decode`], with the EXIF orientation it applied (`NoTransforms` when there was none),
/// for what belongs to the image's stored pixels (an evaluation mask drawn on them).
pub fn decode_oriented(bytes: &[u8], max_pixels: u64) -> Result<(DynamicImage, Orientation), ImageError> {
    let (format, width, height) = declared(bytes, max_pixels)?;
    if format == ImageFormat::Jpeg && !ends_with_jpeg_eoi(bytes) {
        // The JPEG decoder fills the rows a cut-short file lacks and succeeds: a transfer
        // cut short would be judged as a part with a grey band (flagged, or with the
        // spatial model, once, passed as normal). PNG, BMP and TIFF decoders refuse it.
        return Err(ImageError::Corrupt(
            "the JPEG's image data stops before its end-of-image marker: the file is cut short".into(),
        ));
    }
    let mut reader = ImageReader::with_format(Cursor::new(bytes), format);
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(width);
    limits.max_image_height = Some(height);
    // Room for 16-bit RGBA of the declared size plus decoder scratch.
    limits.max_alloc = Some(width as u64 * height as u64 * 8 * 2 + (64 << 20));
    reader.limits(limits.clone());
    // The decoders are third-party code fed untrusted bytes, and one can panic where it
    // should return an error (fuzzing found zune-jpeg 0.5.15 unwrapping `None` in its AVX2
    // IDCT on a crafted JPEG; tests/upload.rs keeps that input). A panic here is a corrupt
    // image to the caller, not a crashed `vigil inspect` or a 500.
    let (img, orientation) = without_panics(format, || {
        use image::ImageDecoder as _;
        let mut decoder = reader.into_decoder()?;
        // As `ImageReader::decode` does: the output counts against the allocation limit,
        // and the decoder's own scratch gets what is left.
        let mut budget = limits;
        budget.reserve(decoder.total_bytes())?;
        decoder.set_limits(budget)?;
        // Upright as a viewer shows it (an EXIF orientation, as phones and some cameras
        // write): the verdict, the regions' boxes and the heatmap are then in the frame
        // the operator's page draws, and training and inspection images agree. An
        // unreadable orientation is taken as none.
        let orientation = decoder.orientation().unwrap_or(Orientation::NoTransforms);
        let mut img = DynamicImage::from_decoder(decoder)?;
        img.apply_orientation(orientation);
        Ok((img, orientation))
    })?;
    refuse_non_finite(&img)?;
    Ok((img, orientation))
}

/// A TIFF of floats can hold NaN or infinite samples. They would pass through resizing
/// and the network into the anomaly map, whose score passes NaN over: an image of NaN
/// was judged normal. Refused as corrupt instead.
fn refuse_non_finite(img: &DynamicImage) -> Result<(), ImageError> {
    let samples: &[f32] = match img {
        DynamicImage::ImageRgb32F(b) => b.as_raw(),
        DynamicImage::ImageRgba32F(b) => b.as_raw(),
        _ => return Ok(()),
    };
    match samples.iter().position(|v| !v.is_finite()) {
        None => Ok(()),
        Some(i) => Err(ImageError::Corrupt(format!(
            "sample {i} of the image is {}, not a finite number",
            samples[i]
        ))),
    }
}

/// Whether a JPEG's image data reaches its end-of-image marker (FF D9): the marker
/// segments before the first scan are skipped by their lengths (an EXIF thumbnail in them
/// has an end marker of its own), then an FF D9 must follow, which entropy-coded data
/// cannot contain (an FF in it is followed by 00 or a restart marker). Data appended after
/// the end (a phone's trailer, padding) is allowed.
fn ends_with_jpeg_eoi(bytes: &[u8]) -> bool {
    let mut at = 2; // after SOI
    loop {
        let Some(&[first, marker]) = bytes.get(at..at + 2) else {
            return false;
        };
        if first != 0xFF {
            // Stray bytes between segments: decoders skip to the next marker, as here.
            at += 1;
            continue;
        }
        match marker {
            // Fill bytes before a marker.
            0xFF => at += 1,
            // Markers without a length.
            0x01 | 0xD0..=0xD8 => at += 2,
            0xD9 => return true,
            _ => {
                let Some(&[hi, lo]) = bytes.get(at + 2..at + 4) else {
                    return false;
                };
                let next = at + 2 + usize::from(u16::from_be_bytes([hi, lo]));
                if marker == 0xDA {
                    return bytes
                        .get(next..)
                        .is_some_and(|scan| scan.windows(2).any(|w| w == [0xFF, 0xD9]));
                }
                at = next;
            }
        }
    }
}

/// The size `bytes` declare, checked as [`decode`] checks them, from the header alone.
pub fn dimensions(bytes: &[u8], max_pixels: u64) -> Result<(u32, u32), ImageError> {
    let (_, width, height) = declared(bytes, max_pixels)?;
    Ok((width, height))
}

/// [`header`] of an image held in memory.
fn declared(bytes: &[u8], max_pixels: u64) -> Result<(ImageFormat, u32, u32), ImageError> {
    if bytes.is_empty() {
        return Err(ImageError::Empty);
    }
    header(ImageReader::new(Cursor::new(bytes)), max_pixels)
}

/// The format and size a file declares, checked as [`decode`] checks them, reading
/// only its header: whether a file is an image vigil can read, without decoding it.
pub fn probe(path: &Path, max_pixels: u64) -> Result<(u32, u32), ImageError> {
    let io = |source| ImageError::Io {
        path: path.display().to_string(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    if file.metadata().map_err(io)?.len() == 0 {
        return Err(ImageError::Empty);
    }
    let (_, width, height) = header(ImageReader::new(std::io::BufReader::new(file)), max_pixels)?;
    Ok((width, height))
}

/// Format (from the content, not the name) and declared size, within `max_pixels`.
fn header<R: std::io::BufRead + std::io::Seek>(
    reader: ImageReader<R>,
    max_pixels: u64,
) -> Result<(ImageFormat, u32, u32), ImageError> {
    let reader = reader
        .with_guessed_format()
        .map_err(|_| ImageError::UnsupportedFormat)?;
    let format = reader.format().ok_or(ImageError::UnsupportedFormat)?;
    if !SUPPORTED.contains(&format) {
        return Err(ImageError::UnsupportedFormat);
    }
    let reader = if format == ImageFormat::Bmp {
        // The BMP decoder refuses sides over 65535 with a format error: read what the header
        // declares first, so a huge BMP is "too large" as a huge PNG is.
        let mut inner = reader.into_inner();
        let start = inner
            .stream_position()
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        let mut head = Vec::with_capacity(26);
        (&mut inner)
            .take(26)
            .read_to_end(&mut head)
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        inner
            .seek(std::io::SeekFrom::Start(start))
            .map_err(|e| ImageError::Corrupt(e.to_string()))?;
        if let Some((width, height)) = bmp_declared_size(&head) {
            if width as u64 * height as u64 > max_pixels {
                return Err(ImageError::TooManyPixels {
                    width,
                    height,
                    max_pixels,
                });
            }
        }
        ImageReader::with_format(inner, format)
    } else {
        reader
    };
    let (width, height) = without_panics(format, || reader.into_dimensions())?;
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
    Ok((format, width, height))
}

/// Width and height a BMP's info header declares (40-byte and later headers; a negative
/// height means top-down rows).
fn bmp_declared_size(head: &[u8]) -> Option<(u32, u32)> {
    let i32_at = |at: usize| Some(i32::from_le_bytes(head.get(at..at + 4)?.try_into().ok()?));
    if !head.starts_with(b"BM") || i32_at(14)? < 40 {
        return None;
    }
    Some((i32_at(18)?.unsigned_abs(), i32_at(22)?.unsigned_abs()))
}

/// Runs a decoder step (header or pixels) so that a panic in it becomes a corrupt image.
fn without_panics<T>(format: ImageFormat, step: impl FnOnce() -> image::ImageResult<T>) -> Result<T, ImageError> {
    quiet_decoder_panics();
    DECODING.with(|d| d.set(true));
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(step));
    DECODING.with(|d| d.set(false));
    match result {
        // A decoder's own size limit (BMP's, on a header declaring a huge image).
        Ok(Err(image::ImageError::Limits(e))) => Err(ImageError::OverDecoderLimit(e.to_string())),
        Ok(Err(image::ImageError::Unsupported(e))) => Err(ImageError::UnsupportedKind(e.to_string())),
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
    load_oriented(path, max_pixels).map(|(img, _)| img)
}

/// [`load`] with the EXIF orientation it applied (see [`decode_oriented`]).
pub fn load_oriented(path: &Path, max_pixels: u64) -> Result<(DynamicImage, Orientation), ImageError> {
    let bytes = std::fs::read(path).map_err(|source| ImageError::Io {
        path: path.display().to_string(),
        source,
    })?;
    decode_oriented(&bytes, max_pixels)
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
    /// Large images are converted without a second full-size f32 copy (a 40-megapixel
    /// image is 160 MB a channel as f32): luma is moved, not copied, and 8-bit RGB is
    /// read as `to_rgb32f` reads it (v / 255) straight into the planes.
    pub fn from_image(img: &DynamicImage, channels: usize) -> Self {
        let (width, height) = (img.width() as usize, img.height() as usize);
        if channels == 1 {
            return Self {
                channels,
                width,
                height,
                data: img.to_luma32f().into_raw(),
            };
        }
        let n = width * height;
        let mut out = Self::new(channels, width, height);
        let mut put = |i: usize, px: [f32; 3]| {
            for (c, v) in px.into_iter().enumerate() {
                out.data[c * n + i] = v;
            }
        };
        match img.as_rgb8() {
            Some(rgb) => {
                for (i, px) in rgb.as_raw().chunks_exact(3).enumerate() {
                    put(i, [0, 1, 2].map(|c| px[c] as f32 / 255.0));
                }
            }
            None => {
                for (i, px) in img.to_rgb32f().as_raw().chunks_exact(3).enumerate() {
                    put(i, [px[0], px[1], px[2]]);
                }
            }
        }
        out
    }

    /// `from_image(img, channels).resize(width, height)`, value for value, holding one
    /// channel of the image's size as f32 at a time instead of all of them and a copy: a
    /// 40-megapixel image costs 160 MB of floats on its way to the working size, not 320
    /// (grey) or 640 (RGB).
    pub fn resized_from(img: &DynamicImage, channels: usize, width: usize, height: usize) -> Self {
        let (w, h) = (img.width() as usize, img.height() as usize);
        let n = width * height;
        let mut out = Self::new(channels, width, height);
        if channels == 1 {
            let plane = resize_plane_owned(img.to_luma32f().into_raw(), w, h, width, height);
            out.data.copy_from_slice(&plane);
            return out;
        }
        let Some(rgb) = img.as_rgb8() else {
            return Self::from_image(img, channels).resize(width, height);
        };
        for c in 0..3 {
            let plane = rgb.as_raw().chunks_exact(3).map(|px| px[c] as f32 / 255.0).collect();
            out.data[c * n..(c + 1) * n].copy_from_slice(&resize_plane_owned(plane, w, h, width, height));
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

    /// Mirrors every channel left to right.
    pub fn flip_horizontal(&mut self) {
        flip_planes(&mut self.data, self.width, self.height, true, false);
    }

    /// Mirrors every channel top to bottom.
    pub fn flip_vertical(&mut self) {
        flip_planes(&mut self.data, self.width, self.height, false, true);
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

/// Mirrors each `w × h` row-major plane in `data` (one or more, back to back) left to
/// right and/or top to bottom. Each is its own inverse.
pub fn flip_planes(data: &mut [f32], w: usize, h: usize, horizontal: bool, vertical: bool) {
    if w == 0 || h == 0 {
        return;
    }
    for plane in data.chunks_exact_mut(w * h) {
        if horizontal {
            plane.chunks_exact_mut(w).for_each(<[f32]>::reverse);
        }
        if vertical {
            for r in 0..h / 2 {
                let (top, bottom) = plane.split_at_mut((h - 1 - r) * w);
                top[r * w..(r + 1) * w].swap_with_slice(&mut bottom[..w]);
            }
        }
    }
}

/// Resizes one row-major plane with a triangle (bilinear) filter.
pub fn resize_plane(plane: &[f32], w: usize, h: usize, nw: usize, nh: usize) -> Vec<f32> {
    resize_plane_owned(plane.to_vec(), w, h, nw, nh)
}

/// [`resize_plane`] of a plane it may consume, so that a large one is not copied first.
pub fn resize_plane_owned(mut plane: Vec<f32>, w: usize, h: usize, nw: usize, nh: usize) -> Vec<f32> {
    if w == nw && h == nh {
        return plane;
    }
    // `image` clamps f32 pixels to [0, 1] as it resizes, and anomaly maps (the
    // reconstruction families' are divided by their good images' mean) go well above 1.
    // The triangle filter's weights are positive and sum to one, so resizing commutes
    // with an affine map: values outside [0, 1] are squeezed into it and stretched back.
    let (lo, hi) = plane
        .iter()
        .filter(|v| v.is_finite())
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    let squeeze = (lo < 0.0 || hi > 1.0).then_some((lo, (hi - lo).max(f32::MIN_POSITIVE)));
    if let Some((lo, span)) = squeeze {
        plane.iter_mut().for_each(|v| *v = (*v - lo) / span);
    }
    let buf = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(w as u32, h as u32, plane)
        .expect("plane size matches its dimensions");
    let mut out = image::imageops::resize(&buf, nw as u32, nh as u32, image::imageops::FilterType::Triangle).into_raw();
    if let Some((lo, span)) = squeeze {
        out.iter_mut().for_each(|v| *v = *v * span + lo);
    }
    out
}

/// [`has_colour`] on up to about 4096 pixels spread over the image: cheap enough for every
/// inspection of a camera-sized image (the full check converts the whole image).
pub fn has_colour_sampled(img: &DynamicImage) -> bool {
    use image::GenericImageView;
    if !img.color().has_color() {
        return false;
    }
    // A 64 × 64 grid of pixels (all of them in a smaller image).
    let (w, h) = img.dimensions();
    let (nx, ny) = (w.min(64), h.min(64));
    (0..ny).any(|j| {
        (0..nx).any(|i| {
            let at = |k: u32, size: u32, n: u32| (u64::from(k) * u64::from(size) / u64::from(n)) as u32;
            let p = img.get_pixel(at(i, w, nx), at(j, h, ny));
            is_coloured([p[0], p[1], p[2]])
        })
    })
}

/// True when an RGB image carries colour (some pixel's channels differ by more than 2/255).
pub fn has_colour(img: &DynamicImage) -> bool {
    if !img.color().has_color() {
        return false;
    }
    img.to_rgb8().pixels().any(|p| is_coloured(p.0))
}

/// Whether a pixel's channels differ by more than 2/255: colour rather than grey.
fn is_coloured([r, g, b]: [u8; 3]) -> bool {
    r.abs_diff(g) > 2 || g.abs_diff(b) > 2 || r.abs_diff(b) > 2
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
    fn a_float_tiff_with_samples_that_are_not_numbers_is_corrupt() {
        let tiff = |v: f32| {
            let mut img = image::Rgb32FImage::from_pixel(4, 3, image::Rgb([0.25, 0.5, 0.75]));
            img.put_pixel(2, 1, image::Rgb([0.5, v, 0.5]));
            let mut out = Vec::new();
            DynamicImage::ImageRgb32F(img)
                .write_to(&mut Cursor::new(&mut out), ImageFormat::Tiff)
                .unwrap();
            out
        };
        assert!(matches!(decode(&tiff(0.5), 100), Ok(DynamicImage::ImageRgb32F(_))));
        for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
            match decode(&tiff(bad), 100) {
                Err(ImageError::Corrupt(e)) => {
                    assert!(e.contains("sample 19 ") && e.contains("not a finite number"), "{e}")
                }
                other => panic!("{bad}: {other:?}"),
            }
        }
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
    fn a_cut_short_jpeg_is_corrupt_and_a_padded_one_is_not() {
        let mut img = image::RgbImage::new(64, 48);
        img.pixels_mut()
            .enumerate()
            .for_each(|(i, p)| *p = image::Rgb([(i * 7) as u8, (i * 13) as u8, 90]));
        let mut jpeg = Vec::new();
        DynamicImage::ImageRgb8(img)
            .write_to(&mut Cursor::new(&mut jpeg), ImageFormat::Jpeg)
            .unwrap();
        assert!(decode(&jpeg, DEFAULT_MAX_PIXELS).is_ok());
        // The decoder alone accepts a JPEG cut at any point past its header.
        for cut in [0.3, 0.6, 0.99] {
            let short = &jpeg[..(jpeg.len() as f64 * cut) as usize];
            assert!(ImageReader::with_format(Cursor::new(short), ImageFormat::Jpeg)
                .decode()
                .is_ok());
            assert!(
                matches!(decode(short, DEFAULT_MAX_PIXELS), Err(ImageError::Corrupt(_))),
                "cut at {cut}"
            );
        }
        let mut padded = jpeg.clone();
        padded.extend_from_slice(&[0, 0, 0xFF, b'\n']);
        assert!(decode(&padded, DEFAULT_MAX_PIXELS).is_ok());
        // A trailer after the end, as some phones append (here: bytes that end in neither
        // padding nor a marker).
        let mut trailer = jpeg.clone();
        trailer.extend_from_slice(b"\x00\x00\x00\x18ftypmp42 appended video");
        assert!(decode(&trailer, DEFAULT_MAX_PIXELS).is_ok());
        // An APP1 segment holding a thumbnail's own end marker, before a main image cut
        // short: the thumbnail's end does not count (its segment is skipped by length).
        let mut app1 = vec![0xFF, 0xE1, 0x00, 0x08, b'E', b'x', 0xFF, 0xD8, 0xFF, 0xD9];
        let mut with_thumbnail = jpeg[..2].to_vec();
        with_thumbnail.append(&mut app1);
        with_thumbnail.extend_from_slice(&jpeg[2..jpeg.len() * 6 / 10]);
        assert!(!ends_with_jpeg_eoi(&with_thumbnail));
        let mut whole = with_thumbnail[..2 + 10].to_vec();
        whole.extend_from_slice(&jpeg[2..]);
        assert!(ends_with_jpeg_eoi(&whole));
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

    #[test]
    fn eight_bit_rgb_converts_exactly_as_the_generic_path() {
        let img = image::RgbImage::from_fn(17, 5, |x, y| {
            image::Rgb([(x * 15) as u8, (y * 50) as u8, (x * y) as u8])
        });
        let fast = Planar::from_image(&DynamicImage::ImageRgb8(img.clone()), 3);
        // The same pixels as RGBA: not 8-bit RGB, so converted through `to_rgb32f`.
        let generic = Planar::from_image(&DynamicImage::ImageRgba8(DynamicImage::ImageRgb8(img).to_rgba8()), 3);
        assert_eq!(fast, generic);
    }

    #[test]
    fn maps_above_one_keep_their_values_when_resized() {
        // An 8×8 map of 2 with a 2×2 block of 12 (a reconstruction family's map, in units
        // of its good images' mean), doubled in size: bilinear interpolation keeps the flat
        // parts at 2 and the block's centre at 12. (`image` alone returned 1.0 everywhere.)
        let mut map = vec![2.0f32; 64];
        for (x, y) in [(3, 3), (4, 3), (3, 4), (4, 4)] {
            map[y * 8 + x] = 12.0;
        }
        let out = resize_plane(&map, 8, 8, 16, 16);
        assert!(
            (out[0] - 2.0).abs() < 1e-5 && (out[15 * 16 + 15] - 2.0).abs() < 1e-5,
            "{}",
            out[0]
        );
        // Output pixel k sits at input coordinate (k + ½)·½ − ½. Pixel 8, at 3.75, lies
        // between the block's 3 and 4: 12. Pixel 6, at 2.75: ¼ of 2 (at 2) and ¾ of 12
        // (at 3), 9.5; pixel 5, at 2.25: 4.5.
        let row = &out[8 * 16..9 * 16];
        assert!(
            (row[8] - 12.0).abs() < 1e-4 && (row[6] - 9.5).abs() < 1e-4 && (row[5] - 4.5).abs() < 1e-4,
            "{row:?}"
        );
        // Negative values too, and values within [0, 1] exactly as `image` resizes them.
        let neg: Vec<f32> = map.iter().map(|v| -v).collect();
        assert!((resize_plane(&neg, 8, 8, 16, 16)[8 * 16 + 6] + 9.5).abs() < 1e-4);
        let unit: Vec<f32> = map.iter().map(|v| v / 12.0).collect();
        let buf = image::ImageBuffer::<image::Luma<f32>, Vec<f32>>::from_raw(8, 8, unit.clone()).unwrap();
        let plain = image::imageops::resize(&buf, 16, 16, image::imageops::FilterType::Triangle).into_raw();
        assert_eq!(resize_plane(&unit, 8, 8, 16, 16), plain);
        // A flat map above 1 stays flat.
        assert!(resize_plane(&[5.0; 16], 4, 4, 7, 3)
            .iter()
            .all(|v| (v - 5.0).abs() < 1e-5));
    }

    #[test]
    fn resizing_channel_by_channel_gives_the_same_values() {
        let rgb = image::RgbImage::from_fn(37, 23, |x, y| {
            image::Rgb([(x * 7) as u8, (y * 11) as u8, ((x * y) % 256) as u8])
        });
        let rgba = DynamicImage::ImageRgb8(rgb.clone()).to_rgba8();
        for img in [DynamicImage::ImageRgb8(rgb), DynamicImage::ImageRgba8(rgba)] {
            for channels in [1, 3] {
                for (w, h) in [(16, 16), (37, 23), (50, 9)] {
                    let whole = Planar::from_image(&img, channels).resize(w, h);
                    assert_eq!(Planar::resized_from(&img, channels, w, h), whole, "{channels} {w}×{h}");
                }
            }
        }
    }

    #[test]
    fn an_exif_orientation_is_applied() {
        // 16 × 8, the left half white: with orientation 6 (turn 90° clockwise to view) it
        // is 8 × 16 upright, its top half white.
        let img = image::GrayImage::from_fn(16, 8, |x, _| image::Luma([if x < 8 { 255 } else { 0 }]));
        let mut jpeg = Vec::new();
        image::codecs::jpeg::JpegEncoder::new_with_quality(&mut jpeg, 95)
            .encode_image(&DynamicImage::ImageLuma8(img))
            .unwrap();
        // APP1: "Exif\0\0", a big-endian TIFF header, one IFD entry: tag 0x0112
        // (orientation), SHORT, count 1, value 6.
        let mut app1 = vec![0xFF, 0xE1, 0x00, 34];
        app1.extend_from_slice(b"Exif\0\0MM\0\x2a\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0");
        let mut rotated = jpeg[..2].to_vec();
        rotated.extend_from_slice(&app1);
        rotated.extend_from_slice(&jpeg[2..]);
        let plain = decode(&jpeg, DEFAULT_MAX_PIXELS).unwrap().to_luma8();
        assert_eq!(plain.dimensions(), (16, 8));
        let upright = decode(&rotated, DEFAULT_MAX_PIXELS).unwrap().to_luma8();
        assert_eq!(upright.dimensions(), (8, 16));
        assert!(upright.get_pixel(4, 2)[0] > 200 && upright.get_pixel(4, 13)[0] < 50);
    }

    #[test]
    fn a_bmp_header_declaring_a_huge_image_is_too_large_not_corrupt() {
        // BITMAPFILEHEADER + BITMAPINFOHEADER of a 100000 × 100000, 24-bit image, no pixels.
        let mut bmp = b"BM".to_vec();
        bmp.extend(54u32.to_le_bytes()); // file size (as declared)
        bmp.extend([0u8; 4]);
        bmp.extend(54u32.to_le_bytes()); // pixel data offset
        bmp.extend(40u32.to_le_bytes()); // info header size
        bmp.extend(100_000i32.to_le_bytes());
        bmp.extend(100_000i32.to_le_bytes());
        bmp.extend(1u16.to_le_bytes()); // planes
        bmp.extend(24u16.to_le_bytes()); // bits per pixel
        bmp.extend([0u8; 24]); // no compression, sizes, resolution, palette
        let e = decode(&bmp, DEFAULT_MAX_PIXELS).unwrap_err();
        assert!(
            matches!(
                e,
                ImageError::TooManyPixels {
                    width: 100_000,
                    height: 100_000,
                    ..
                }
            ),
            "{e:?}"
        );
    }

    #[test]
    fn probe_reads_the_header_only_and_refuses_what_decode_refuses() {
        let dir = tempfile::tempdir().unwrap();
        let good = dir.path().join("good.png");
        image::GrayImage::new(7, 3).save(&good).unwrap();
        assert_eq!(probe(&good, DEFAULT_MAX_PIXELS).unwrap(), (7, 3));
        assert!(matches!(probe(&good, 20), Err(ImageError::TooManyPixels { .. })));
        // Named like an image, content decides.
        let text = dir.path().join("text.png");
        std::fs::write(&text, "not an image").unwrap();
        assert!(matches!(
            probe(&text, DEFAULT_MAX_PIXELS),
            Err(ImageError::UnsupportedFormat)
        ));
        let empty = dir.path().join("empty.png");
        std::fs::write(&empty, "").unwrap();
        assert!(matches!(probe(&empty, DEFAULT_MAX_PIXELS), Err(ImageError::Empty)));
    }
}
