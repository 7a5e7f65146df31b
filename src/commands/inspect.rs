//! `vigil inspect`: one JSON object per image; bad images give an error object and the run goes on.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::cli::InspectArgs;
use crate::detector::{Detector, Inspection, Overrides, Reconstruction};
use crate::image_io;
use crate::scoring::heatmap::render_heatmap;
use crate::train::dataset::{self, image_files_and_unreadable};

#[derive(Serialize)]
struct Record<'a> {
    path: String,
    #[serde(flatten)]
    inspection: &'a Inspection,
    #[serde(skip_serializing_if = "Option::is_none")]
    map_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    heatmap_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reconstruction_path: Option<String>,
}

#[derive(Serialize)]
struct Failure {
    path: String,
    error: String,
}

/// Returns the number of images (and folders) that could not be inspected.
pub fn run(args: &InspectArgs) -> anyhow::Result<usize> {
    let detector = super::load_detector(&args.model, args.device)?;
    if let Some(a) = args.alpha {
        detector
            .card
            .architecture
            .check_alpha(a)
            .map_err(|e| anyhow::anyhow!("--alpha: {e} ({})", args.model.display()))?;
    }
    let overrides = Overrides {
        threshold: args.threshold,
        alpha: args.alpha,
    };
    // Folders vigil writes into are not inputs: a recurring run over an incoming folder
    // holding them would inspect its own heatmaps and reconstructions.
    let outputs: Vec<PathBuf> = [&args.heatmaps_dir, &args.reconstructions_dir]
        .into_iter()
        .flatten()
        .filter_map(|d| d.canonicalize().ok())
        .collect();
    let mut paths = Vec::new();
    // Folders that could not be read: reported as failures, the rest inspected.
    let mut unreadable = Vec::new();
    if let Some(p) = args.json_lines.as_ref().filter(|p| p.as_os_str() != "-") {
        refuse_json_lines_over_inputs(p, &args.inputs, &args.model)?;
    }
    for input in &args.inputs {
        // A mistyped path is a usage error (exit 2), not an image that failed (exit 1).
        if input.symlink_metadata().is_err() {
            anyhow::bail!("{}: no such file or folder", input.display());
        }
        if input.is_dir() {
            // Only output folders strictly inside the input: one that is the input folder
            // or holds it would take every image for an output.
            let root = input.canonicalize().unwrap_or_else(|_| input.clone());
            if outputs.contains(&root) {
                anyhow::bail!(
                    "{}: an output folder of this run (--heatmaps-dir, --reconstructions-dir) is the folder inspected; the next run would inspect what this one writes: name a folder of their own",
                    input.display()
                );
            }
            let inside: Vec<&PathBuf> = outputs.iter().filter(|o| o.starts_with(&root) && **o != root).collect();
            // (Each file is resolved only when there is such a folder to compare it with.)
            let (found, cannot) = image_files_and_unreadable(input)?;
            unreadable.extend(cannot);
            let (ours, theirs): (Vec<PathBuf>, Vec<PathBuf>) = found.into_iter().partition(|p| {
                !inside.is_empty() && {
                    let p = p.canonicalize().unwrap_or_else(|_| p.clone());
                    inside.iter().any(|o| p.starts_with(o))
                }
            });
            if !ours.is_empty() {
                tracing::warn!(
                    "{} image(s) under {} are in an output folder of this run (--heatmaps-dir, --reconstructions-dir): not inspected",
                    ours.len(),
                    input.display()
                );
            }
            paths.extend(theirs);
        } else {
            paths.push(input.clone());
        }
    }
    if paths.is_empty() && unreadable.is_empty() {
        anyhow::bail!(
            "no images found in {} (PNG, JPEG, BMP or TIFF files, folders searched recursively)",
            args.inputs
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        );
    }
    for dir in [&args.maps_dir, &args.heatmaps_dir, &args.reconstructions_dir]
        .into_iter()
        .flatten()
    {
        if dir.symlink_metadata().is_ok() && !dir.is_dir() {
            anyhow::bail!("{}: a file, not a folder to write into", dir.display());
        }
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    // Heatmaps and reconstructions are both `<name>.png`: one folder for both would keep
    // only one of each pair.
    if let (Some(h), Some(r)) = (&args.heatmaps_dir, &args.reconstructions_dir) {
        let resolve = |p: &PathBuf| p.canonicalize().with_context(|| format!("resolving {}", p.display()));
        if resolve(h)? == resolve(r)? {
            anyhow::bail!("--heatmaps-dir and --reconstructions-dir must be different folders");
        }
    }
    let mut out: Box<dyn Write> = match &args.json_lines {
        Some(p) if p.as_os_str() != "-" => {
            // As the folder options do: a new folder for the file is made.
            if let Some(parent) = p.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
            }
            Box::new(std::io::BufWriter::new(
                std::fs::File::create(p).with_context(|| format!("creating {}", p.display()))?,
            ))
        }
        _ => Box::new(std::io::stdout().lock()),
    };
    let (mut failures, mut warned) = (unreadable.len(), 0);
    for (folder, error) in unreadable {
        let line = serde_json::to_string(&Failure {
            path: folder.display().to_string(),
            error: format!("folder not read: {error}"),
        })?;
        writeln!(out, "{line}")?;
    }
    for chunk in paths.chunks(8) {
        let loaded: Vec<_> = chunk.iter().map(|p| image_io::load(p, args.limit.max_pixels)).collect();
        let images: Vec<&image::DynamicImage> = loaded.iter().filter_map(|r| r.as_ref().ok()).collect();
        let mut results = detector.inspect_and_reconstruct(&images, overrides)?.into_iter();
        // One line per input, in the order given.
        for (path, img) in chunk.iter().zip(&loaded) {
            let line = match img {
                Ok(img) => {
                    let (insp, recon) = results.next().expect("one result per loaded image");
                    warned += usize::from(!insp.warnings.is_empty());
                    serde_json::to_string(&write_outputs(&detector, args, path, img, &insp, &recon)?)?
                }
                Err(e) => {
                    failures += 1;
                    serde_json::to_string(&Failure {
                        path: path.display().to_string(),
                        error: e.to_string(),
                    })?
                }
            };
            writeln!(out, "{line}")?;
        }
    }
    out.flush()?;
    if warned > 0 {
        tracing::warn!(
            "{warned} image(s) differ from the model's training images (see the warnings in their records): \
             their verdicts may not mean what they say"
        );
    }
    Ok(failures)
}

/// `--json-lines` replaces its file: it must not be an image (a shell glob's first image
/// taken for the file name, `--json-lines *.png`), one of the inputs, or in the model's
/// folder.
fn refuse_json_lines_over_inputs(path: &Path, inputs: &[PathBuf], model: &Path) -> anyhow::Result<()> {
    let named = || format!("--json-lines {}", path.display());
    // Where the file will be: itself resolved when it exists (a link is followed), else
    // its nearest existing folder resolved, with the rest of the path after it.
    let target = dataset::resolved(path);
    if dataset::is_image(path) || dataset::is_image(&target) {
        anyhow::bail!("{}: an image's file name; name a .jsonl file for the results", named());
    }
    if inputs.iter().any(|i| dataset::resolved(i) == target) {
        anyhow::bail!("{}: one of the inputs; name a file of its own for the results", named());
    }
    if target.starts_with(dataset::resolved(model)) {
        anyhow::bail!("{}: inside the model's folder; name a file elsewhere", named());
    }
    Ok(())
}

fn write_outputs<'a>(
    detector: &Detector,
    args: &InspectArgs,
    path: &Path,
    img: &image::DynamicImage,
    insp: &'a Inspection,
    recon: &Reconstruction,
) -> anyhow::Result<Record<'a>> {
    let name = unique_name(path);
    // Built once for both outputs that read it.
    let map = (args.maps_dir.is_some() || args.heatmaps_dir.is_some()).then(|| insp.map());
    let map = map.as_deref().unwrap_or_default();
    let map_path = match &args.maps_dir {
        Some(dir) => {
            let p = dir.join(format!("{name}.npy"));
            crate::npy::write_f32_2d(&p, map, insp.height, insp.width)
                .with_context(|| format!("writing {}", p.display()))?;
            Some(p.display().to_string())
        }
        None => None,
    };
    let heatmap_path = match &args.heatmaps_dir {
        Some(dir) => {
            let p = dir.join(format!("{name}.png"));
            let base = image_io::Planar::from_image(img, detector.card.input.channels).to_rgb8();
            render_heatmap(&base, map, insp.pixel_threshold, 0.5)
                .save(&p)
                .with_context(|| format!("writing {}", p.display()))?;
            Some(p.display().to_string())
        }
        None => None,
    };
    let reconstruction_path = match &args.reconstructions_dir {
        Some(dir) => {
            let p = dir.join(format!("{name}.png"));
            recon
                .image
                .to_rgb8()
                .save(&p)
                .with_context(|| format!("writing {}", p.display()))?;
            Some(p.display().to_string())
        }
        None => None,
    };
    Ok(Record {
        path: path.display().to_string(),
        inspection: insp,
        map_path,
        heatmap_path,
        reconstruction_path,
    })
}

/// `<stem>-<8 hex digits of the path's hash>`: unique even when two inputs share a name.
pub fn unique_name(path: &Path) -> String {
    let full: PathBuf = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let digest = Sha256::digest(full.to_string_lossy().as_bytes());
    let stem = path
        .file_stem()
        .map_or("image".into(), |s| s.to_string_lossy().to_string());
    format!("{stem}-{}", &hex::encode(digest)[..8])
}
