//! `vigil eval`.

use anyhow::Context;

use crate::cli::EvalArgs;

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let detector = super::load_detector(&args.model, args.device)?;
    let report = crate::eval::evaluate(&detector, &args.model, &args.data, true)?;
    print!("{}", report.summary());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)? + "\n")
            .with_context(|| format!("writing {}", path.display()))?;
    }
    if let Some(path) = &args.figure {
        crate::eval::figure::render(&report, path).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
