//! The model registry: finding, loading, warming and versioning the models a server
//! serves. Used by `server` at start-up and by the API's reload route, so neither imports
//! the other.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use candle_core::Tensor;
use sha2::{Digest, Sha256};

use crate::detector::Detector;
use crate::model::artifact;

/// A model version: the first 16 hex digits of SHA-256 over model.json and the weights.
pub fn artifact_version(dir: &Path) -> std::io::Result<String> {
    let mut h = Sha256::new();
    for f in [artifact::CARD_FILE, artifact::WEIGHTS_FILE] {
        let path = dir.join(f);
        // Named, so that "a model folder does not load" says which file is missing.
        let bytes =
            std::fs::read(&path).map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", path.display())))?;
        h.update(bytes);
    }
    Ok(hex::encode(h.finalize())[..16].to_string())
}

/// One forward pass, so the first request does not pay for allocation and kernel set-up.
pub fn warm_up(d: &Detector) -> candle_core::Result<()> {
    let s = d.card.input.working_size;
    let p = crate::image_io::Planar::new(d.card.input.channels, s, s);
    d.reconstruct(&[&p])?;
    let _ = Tensor::zeros(1, candle_core::DType::F32, d.device())?;
    Ok(())
}

/// The model in `dir`, loaded and warmed, with its version. Files replaced while they
/// were read (a copy landing meanwhile) are an error, not a detector labelled with the
/// other version.
pub fn load_warm(dir: &Path, device: &candle_core::Device) -> anyhow::Result<(Detector, String)> {
    let version = artifact_version(dir)?;
    let d = Detector::load(dir, device)?;
    warm_up(&d).context("warming it up")?;
    anyhow::ensure!(
        artifact_version(dir)? == version,
        "its files changed while it was loaded; try again once they are in place"
    );
    Ok((d, version))
}

/// The sub-folders of `dir` that hold a model: a model.json, in a folder whose name is
/// not hidden (a training job stages its model in a hidden one). Sorted.
pub fn model_folders(dir: &Path) -> std::io::Result<Vec<PathBuf>> {
    let mut dirs: Vec<_> = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join(artifact::CARD_FILE).is_file())
        .filter(|p| !p.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')))
        .collect();
    dirs.sort();
    Ok(dirs)
}

/// Every sub-folder of `dir` holding a model.json, loaded and warmed.
pub fn load_models(
    dir: &Path,
    device: &candle_core::Device,
) -> anyhow::Result<Vec<(String, PathBuf, Detector, String)>> {
    let mut out = Vec::new();
    let dirs = model_folders(dir).with_context(|| format!("reading the models folder {}", dir.display()))?;
    for path in dirs {
        let name = path.file_name().expect("folder name").to_string_lossy().to_string();
        // As training and discovery rule: a name that could not be a model's is not one.
        if !crate::jobs::valid_model_name(&name) {
            tracing::warn!(
                model = name,
                "a folder in the models folder has a name that cannot be a model's (1–64 letters, digits, `-`, `_` or `.`): not served"
            );
            continue;
        }
        let (d, version) = load_warm(&path, device).with_context(|| format!("loading {name}"))?;
        tracing::info!(model = name, version, "model loaded and warm");
        out.push((name, path, d, version));
    }
    if out.is_empty() {
        bail!(
            "no models in {} (each model is a folder holding model.json and weights.safetensors)",
            dir.display()
        );
    }
    Ok(out)
}
