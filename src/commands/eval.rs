//! `vigil eval`, for one model or several side by side (`--compare`).

use anyhow::Context;

use crate::cli::EvalArgs;
use crate::eval::compare::{Compared, Comparison};

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    if let Some(figure) = &args.figure {
        // The figure's format comes from its name: an unknown one fails now, not after.
        let format = image::ImageFormat::from_path(figure).ok();
        if !format.is_some_and(|f| crate::image_io::SUPPORTED.contains(&f)) {
            anyhow::bail!(
                "{}: name the figure .png, .jpg, .bmp or .tif (its format is taken from its name)",
                figure.display()
            );
        }
    }
    // Where the outputs go is settled before minutes of evaluation, as --maps-dir is for
    // `vigil inspect`: missing folders are made, and a path that cannot be one fails now.
    for path in [&args.json, &args.figure].into_iter().flatten() {
        if path.is_dir() {
            anyhow::bail!("{} is a folder; name the file to write", path.display());
        }
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent).with_context(|| format!("creating {}", parent.display()))?;
        }
    }
    if !args.compare.is_empty() {
        return compare(args);
    }
    let detector = super::load_detector(&args.model, args.device)?;
    let report = crate::eval::evaluate(&detector, &args.model, &args.data, true, args.limit.max_pixels)?;
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        write_json(path, &report)?;
    }
    if let Some(path) = &args.figure {
        crate::eval::figure::render(&report, path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn compare(args: &EvalArgs) -> anyhow::Result<()> {
    let mut models = Vec::with_capacity(args.compare.len());
    for dir in &args.compare {
        let detector = super::load_detector(dir, args.device)?;
        let report = crate::eval::evaluate(&detector, dir, &args.data, true, args.limit.max_pixels)
            .with_context(|| format!("evaluating {}", dir.display()))?;
        models.push(Compared::new(&detector, report));
    }
    let comparison = Comparison {
        data: args.data.display().to_string(),
        models,
    };
    print!("{}", comparison.summary());
    if let Some(path) = &args.json {
        write_json(path, &comparison)?;
    }
    if let Some(path) = &args.figure {
        crate::eval::figure::render_comparison(&comparison, path)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

fn write_json(path: &std::path::Path, value: &impl serde::Serialize) -> anyhow::Result<()> {
    std::fs::write(path, serde_json::to_string_pretty(value)? + "\n")
        .with_context(|| format!("writing {}", path.display()))
}
