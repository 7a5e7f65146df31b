//! Finding and loading training images.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::image_io::{self, Planar, EXTENSIONS};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{0}: no such folder")]
    NotFound(PathBuf),
    #[error("{0}: no images found (looked for {exts} files, recursively)", exts = EXTENSIONS.join(", "))]
    Empty(PathBuf),
    #[error("{path}: {source}")]
    BadImage {
        path: PathBuf,
        source: image_io::ImageError,
    },
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// True when `path` has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files under `dir`, recursively, sorted. An MVTec AD category folder (one with
/// `train/good`) yields its training images only.
pub fn training_files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    if !dir.is_dir() {
        return Err(DatasetError::NotFound(dir.to_path_buf()));
    }
    let mvtec = dir.join("train").join("good");
    let root = if mvtec.is_dir() { mvtec } else { dir.to_path_buf() };
    let files = image_files(&root)?;
    if files.is_empty() {
        return Err(DatasetError::Empty(root));
    }
    Ok(files)
}

/// Image files under `root`, recursively, sorted; hidden entries skipped.
pub fn image_files(root: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    let mut files = Vec::new();
    for entry in walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name() {
        let entry = entry.map_err(|e| DatasetError::Io(e.into()))?;
        let hidden = entry.file_name().to_str().is_some_and(|n| n.starts_with('.')) && entry.depth() > 0;
        if entry.file_type().is_file() && !hidden && is_image(entry.path()) {
            files.push(entry.into_path());
        }
    }
    Ok(files)
}

/// Loaded images at working resolution with what the artifact records about them.
pub struct LoadedSet {
    pub images: Vec<Planar>,
    pub files: Vec<PathBuf>,
    /// SHA-256 over relative paths and contents, in sorted order.
    pub fingerprint: String,
    /// True when some image carries colour.
    pub any_colour: bool,
}

/// Loads `files`, converting to `channels` (None: decide by colour, RGB if any image has it)
/// and resizing to `size × size`. Any unreadable image is an error naming it.
pub fn load_set(
    root: &Path,
    files: &[PathBuf],
    channels: Option<usize>,
    size: usize,
) -> Result<LoadedSet, DatasetError> {
    let mut hasher = Sha256::new();
    let mut decoded = Vec::with_capacity(files.len());
    for f in files {
        let bytes = std::fs::read(f)?;
        let rel = f.strip_prefix(root).unwrap_or(f);
        hasher.update(rel.to_string_lossy().as_bytes());
        hasher.update([0]);
        hasher.update(Sha256::digest(&bytes));
        let img = image_io::decode(&bytes, image_io::DEFAULT_MAX_PIXELS).map_err(|source| DatasetError::BadImage {
            path: f.clone(),
            source,
        })?;
        decoded.push(img);
    }
    let any_colour = decoded.iter().any(image_io::has_colour);
    let c = channels.unwrap_or(if any_colour { 3 } else { 1 });
    let images = decoded
        .iter()
        .map(|img| Planar::from_image(img, c).resize(size, size))
        .collect();
    Ok(LoadedSet {
        images,
        files: files.to_vec(),
        fingerprint: hex::encode(hasher.finalize()),
        any_colour,
    })
}
