//! Writing and reading 2-D float32 `.npy` files (NumPy format 1.0).
//!
//! Hand-written: the format is a fixed 10-byte preamble, a Python-dict header and raw
//! little-endian values; a crate for it would bring ndarray along for 30 lines.

use std::io::{Read, Write};
use std::path::Path;

/// Writes a (height, width) float32 array, C order.
pub fn write_f32_2d(path: &Path, data: &[f32], height: usize, width: usize) -> std::io::Result<()> {
    assert_eq!(data.len(), height * width, "npy shape mismatch");
    let mut f = std::io::BufWriter::new(std::fs::File::create(path)?);
    f.write_all(&encode_f32_2d(data, height, width))?;
    f.flush()
}

/// The `.npy` bytes of a (height, width) float32 array.
pub fn encode_f32_2d(data: &[f32], height: usize, width: usize) -> Vec<u8> {
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': ({height}, {width}), }}");
    // Pad so the data starts on a 64-byte boundary; the header ends with a newline.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + data.len() * 4);
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    for v in data {
        out.extend_from_slice(&v.to_le_bytes());
    }
    out
}

/// Reads a 2-D little-endian float32 C-order array written by [`write_f32_2d`] or NumPy.
pub fn read_f32_2d(path: &Path) -> std::io::Result<(Vec<f32>, usize, usize)> {
    let bad = |m: &str| std::io::Error::new(std::io::ErrorKind::InvalidData, m.to_string());
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" || bytes[6] != 1 {
        return Err(bad("not a version-1 .npy file"));
    }
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).map_err(|_| bad("bad header"))?;
    if !header.contains("'<f4'") || header.contains("'fortran_order': True") {
        return Err(bad("expected little-endian float32 in C order"));
    }
    let shape = header
        .split("'shape': (")
        .nth(1)
        .and_then(|s| s.split(')').next())
        .ok_or_else(|| bad("no shape"))?;
    let dims: Vec<usize> = shape.split(',').filter_map(|d| d.trim().parse().ok()).collect();
    let [h, w] = dims[..] else {
        return Err(bad("expected a 2-D array"));
    };
    let body = &bytes[10 + hlen..];
    if body.len() != h * w * 4 {
        return Err(bad("data length does not match the shape"));
    }
    let data = body
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    Ok((data, h, w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips_and_aligns_data() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("m.npy");
        let data: Vec<f32> = (0..12).map(|i| i as f32 * 0.5).collect();
        write_f32_2d(&p, &data, 3, 4).unwrap();
        let bytes = std::fs::read(&p).unwrap();
        let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        assert_eq!((10 + hlen) % 64, 0);
        assert_eq!(read_f32_2d(&p).unwrap(), (data, 3, 4));
    }
}
