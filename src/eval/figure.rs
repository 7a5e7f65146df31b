//! The evaluation figure: ROC curve and score histograms.

use std::path::Path;

use super::EvalReport;

pub fn render(_report: &EvalReport, _path: &Path) -> anyhow::Result<()> {
    anyhow::bail!("figure rendering is not built yet")
}
