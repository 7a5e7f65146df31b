//! Training jobs run by the server: the options a caller may set, the `vigil train`
//! arguments they become, and one training written atomically into the models folder.
//! Queueing, progress and serving the result belong to the HTTP layer (`api::training`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use clap::Parser;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use crate::cli::TrainArgs;
use crate::train::{ProgressHook, StepReport};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            _ => return None,
        })
    }

    pub fn finished(self) -> bool {
        matches!(self, JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled)
    }
}

/// A job as callers see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, ToSchema)]
pub struct JobView {
    pub id: String,
    /// The name the trained model is served under.
    pub model: String,
    pub status: JobStatus,
    /// Why it failed, or where the model was written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The `vigil train` flags the job runs with.
    pub options: Vec<String>,
    /// The folder of good images.
    pub data: String,
    pub step: usize,
    pub steps: usize,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub loss: Option<f32>,
    pub elapsed_s: f64,
    /// Seconds left at the pace so far.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub eta_s: Option<f64>,
    /// RFC 3339, UTC.
    pub created_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finished_at: Option<String>,
}

impl JobView {
    pub fn progress(&mut self, r: StepReport) {
        self.step = r.step;
        self.steps = r.steps;
        self.loss = Some(r.loss);
        self.elapsed_s = r.elapsed_s;
        self.eta_s = (r.step > 0).then(|| r.elapsed_s / r.step as f64 * (r.steps - r.step) as f64);
    }
}

/// Options a caller may set: `vigil train`'s own flags (same names with `_` for `-`, same
/// defaults). Where the data is and where the model goes are the job's to decide, and
/// threads and device are the server's.
const ALLOWED: &[&str] = &[
    "arch",
    "steps",
    "epochs",
    "time_budget",
    "batch_size",
    "lr",
    "size",
    "patch",
    "resize",
    "channels",
    "seed",
    "width",
    "bottleneck",
    "segmenter_width",
    "segmenter_depth",
    "segmenter_error_maps",
    "joint_training",
    "latent",
    "beta",
    "kl_warmup",
    "alpha",
    "critic_width",
    "adversarial_weight",
    "loss",
    "augment",
    "validation_fraction",
    "quantile",
    "margin",
    "min_defect_area",
    "threshold_method",
    "map",
    "smoothing",
    "score_smoothing",
    "top_k",
    "score_filter",
    "fit",
    "stride",
    "test_time_flips",
];

/// Options that are `vigil train` flags taking `true` or `false`, not bare switches.
const VALUED_SWITCHES: &[&str] = &["segmenter_error_maps", "joint_training"];

/// Turns `{"steps": 300, "arch": "draem", "resize": true}` into `vigil train` flags.
pub fn flags(options: &BTreeMap<String, serde_json::Value>) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    for (key, value) in options {
        if !ALLOWED.contains(&key.as_str()) {
            return Err(format!(
                "unknown training option {key:?}; allowed: {}",
                ALLOWED.join(", ")
            ));
        }
        let flag = format!("--{}", key.replace('_', "-"));
        // `--flag=value`, one word: a negative number is then the flag's value (refused by
        // its own check) rather than an unknown flag of its own.
        match value {
            // Switches whose default may be on take the value itself, so false turns them off.
            serde_json::Value::Bool(b) if VALUED_SWITCHES.contains(&key.as_str()) => out.push(format!("{flag}={b}")),
            serde_json::Value::Bool(true) => out.push(flag),
            serde_json::Value::Bool(false) | serde_json::Value::Null => {}
            serde_json::Value::Number(n) => out.push(format!("{flag}={n}")),
            serde_json::Value::String(s) => out.push(format!("{flag}={s}")),
            other => {
                return Err(format!(
                    "training option {key:?} must be a number, a string or true, not {other}"
                ))
            }
        }
    }
    Ok(out)
}

#[derive(Parser)]
#[command(name = "train")]
struct TrainCommand {
    #[command(flatten)]
    args: TrainArgs,
}

/// The `vigil train` arguments of a job: `flags` checked exactly as the command line
/// checks them (so defaults and errors are the command's own).
pub fn train_args(data: &Path, out: &Path, flags: &[String]) -> Result<TrainArgs, String> {
    let mut argv: Vec<String> = vec!["train".into(), "--data".into(), data.display().to_string()];
    argv.extend(["--out".into(), out.display().to_string()]);
    argv.extend(flags.iter().cloned());
    TrainCommand::try_parse_from(argv)
        .map(|c| c.args)
        .map_err(|e| as_option_error(&e))
}

/// clap's error in the API's words, from the error's parts rather than its rendered text
/// (which would name flags, show usage and point at `--help`): options named as a job
/// spells them (`--batch-size` → `batch_size`), values quoted so that a hidden character
/// shows.
fn as_option_error(e: &clap::Error) -> String {
    use clap::error::{ContextKind, ContextValue, ErrorKind};
    let text = |kind| match e.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        Some(ContextValue::Strings(v)) => v.first().cloned(),
        _ => None,
    };
    // `--batch-size <BATCH_SIZE>` or `--stepz`: the option's name.
    let option = |flag: String| {
        let name = flag
            .trim_start_matches('-')
            .split([' ', '='])
            .next()
            .unwrap_or_default()
            .replace('-', "_");
        format!("`{name}`")
    };
    let arg = text(ContextKind::InvalidArg).map(option);
    let value = text(ContextKind::InvalidValue);
    match (e.kind(), arg, value) {
        (ErrorKind::UnknownArgument, Some(arg), _) => {
            let hint = text(ContextKind::SuggestedArg).map(|s| format!(" (did you mean {}?)", option(s)));
            format!("unknown option {arg}{}", hint.unwrap_or_default())
        }
        (ErrorKind::InvalidValue | ErrorKind::ValueValidation, Some(arg), Some(value)) => {
            let why = std::error::Error::source(e)
                .map(|s| format!(": {s}"))
                .unwrap_or_default();
            let valid = match e.get(ContextKind::ValidValue) {
                Some(ContextValue::Strings(v)) => format!(" (one of {})", v.join(", ")),
                _ => String::new(),
            };
            format!("invalid value {value:?} for option {arg}{why}{valid}")
        }
        (_, Some(arg), _) => format!("option {arg}: {}", e.kind()),
        _ => e.kind().to_string(),
    }
}

/// Where a job trains before the model is moved into place: beside the final folder (one
/// filesystem, so the move is a rename) and hidden, so the server never loads it as a model.
pub fn staging_dir(models_dir: &Path, model: &str, job_id: &str) -> PathBuf {
    models_dir.join(format!(".{model}.{job_id}.partial"))
}

/// Trains into a staging folder on `threads` threads and renames it to `models_dir/model`
/// when training, calibration and writing all succeeded and `cancel` was not set. Leaves
/// nothing behind otherwise. Returns the model's folder.
pub fn run(
    models_dir: &Path,
    model: &str,
    job_id: &str,
    args: &TrainArgs,
    threads: usize,
    cancel: &Arc<AtomicBool>,
    on_step: impl Fn(StepReport) + Send + Sync + 'static,
) -> Result<PathBuf, String> {
    let staging = staging_dir(models_dir, model, job_id);
    let target = models_dir.join(model);
    let mut args = args.clone();
    args.out = staging.clone();
    let result = (|| {
        let mut cfg = crate::commands::train::config(&args, threads).map_err(|e| format!("{e:#}"))?;
        cfg.progress = false;
        cfg.abandon_when_stopped = true;
        cfg.on_step = Some(ProgressHook(Arc::new(on_step)));
        // Its own pool: training takes `threads` cores and leaves the rest to inspection.
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("vigil-train-{i}"))
            .build()
            .map_err(|e| e.to_string())?;
        let trained = pool.install(|| crate::train::train(&cfg, cancel));
        if cancel.load(std::sync::atomic::Ordering::SeqCst) {
            return Err("cancelled".to_string());
        }
        trained.map_err(|e| e.to_string())?;
        if target.exists() {
            return Err(format!("a model named {model:?} appeared while training; not replaced"));
        }
        if let Err(e) = crate::durable::publish(&staging, &target) {
            // The folder's sync can fail after the rename (a filesystem that refuses to
            // sync folders): the model is then in place, and is the job's result.
            let moved = target.is_dir() && !staging.exists();
            if !moved {
                return Err(format!("moving the model into place: {e}"));
            }
            tracing::warn!(model = %target.display(), "the model is in place, but its folder could not be synced: {e}");
        }
        Ok(target.clone())
    })();
    if result.is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    result
}

/// Image files a zip of training images may hold (others are skipped).
use crate::image_io::EXTENSIONS as IMAGE_EXTENSIONS;

/// The name an uploaded image is kept under: its place in the upload, then as much of the
/// client's own name as is plain (letters, digits, `-`, `_`, `.`; up to 48 characters), so
/// that an error about the file names the file the user sent, and nothing of the client's
/// can reach outside the folder.
pub fn upload_file_name(index: usize, client_name: Option<&str>, ext: &str) -> String {
    let stem: String = client_name
        .and_then(|n| Path::new(n).file_stem())
        .map(|s| s.to_string_lossy())
        .unwrap_or_default()
        .chars()
        .filter(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        .take(48)
        .collect();
    let stem = stem.trim_start_matches('.');
    if stem.is_empty() {
        format!("{index:05}.{ext}")
    } else {
        format!("{index:05}-{stem}.{ext}")
    }
}

/// Writes the images in a zip archive into `dir` as `NNNNN.ext`, numbered from `first`.
/// Folder names inside the archive are dropped (nothing is written outside `dir`), other
/// files are skipped, and extraction stops with an error once more than `limit` bytes
/// have been unpacked (a small archive can expand enormously: the caller passes what is
/// left of the whole upload's limit), or once it would write more than `max_images` files
/// (empty entries cost no bytes, but each is a file on disk). Returns how many images,
/// and their bytes.
pub fn extract_zip_images(
    bytes: &[u8],
    dir: &Path,
    first: usize,
    limit: u64,
    max_images: usize,
) -> Result<(usize, u64), String> {
    use std::io::Read;
    let mut archive =
        zip::ZipArchive::new(std::io::Cursor::new(bytes)).map_err(|e| format!("not a readable zip archive: {e}"))?;
    let (mut written, mut unpacked) = (0usize, 0u64);
    for i in 0..archive.len() {
        let mut entry = archive.by_index(i).map_err(|e| format!("zip entry {i}: {e}"))?;
        if !entry.is_file() {
            continue;
        }
        let name = entry.name().map_err(|e| format!("zip entry {i}: {e}"))?.into_owned();
        let ext = Path::new(&name)
            .extension()
            .map(|e| e.to_string_lossy().to_ascii_lowercase())
            .unwrap_or_default();
        let hidden = Path::new(&name)
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with('.'));
        if hidden || !IMAGE_EXTENSIONS.contains(&ext.as_str()) {
            continue;
        }
        if written == max_images {
            return Err(format!(
                "the zip archive holds more than the {max_images} images left of the upload's limit"
            ));
        }
        let mut data = Vec::new();
        let budget = limit.saturating_sub(unpacked);
        (&mut entry)
            .take(budget + 1)
            .read_to_end(&mut data)
            .map_err(|e| format!("zip entry {name:?}: {e}"))?;
        unpacked += data.len() as u64;
        if unpacked > limit {
            return Err(format!(
                "the zip archive unpacks to more than the {limit} bytes left of the upload's limit"
            ));
        }
        let path = dir.join(upload_file_name(first + written, Some(&name), &ext));
        std::fs::write(&path, data).map_err(|e| format!("writing {}: {e}", path.display()))?;
        written += 1;
    }
    Ok((written, unpacked))
}

/// Model names become folder names and URL segments: letters, digits, `-`, `_`, `.`, not
/// starting with `.`, at most 64 characters.
pub fn valid_model_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_become_the_commands_own_flags_and_are_checked_by_it() {
        let options: BTreeMap<String, serde_json::Value> =
            serde_json::from_str(r#"{"steps": 30, "arch": "spatial", "resize": true, "seed": null}"#).unwrap();
        let f = flags(&options).unwrap();
        assert_eq!(f, ["--arch=spatial", "--resize", "--steps=30"]);
        let a = train_args(Path::new("/good"), Path::new("/out"), &f).unwrap();
        assert_eq!((a.steps, a.data.as_path()), (Some(30), Path::new("/good")));
        // A switch that takes its value is given it, false as well as true.
        for (given, want) in [("true", true), ("false", false)] {
            let o = serde_json::from_str(&format!(
                r#"{{"segmenter_error_maps": {given}, "joint_training": {given}}}"#
            ))
            .unwrap();
            let f = flags(&o).unwrap();
            assert_eq!(
                f,
                [
                    format!("--joint-training={given}"),
                    format!("--segmenter-error-maps={given}")
                ]
            );
            let a = train_args(Path::new("/g"), Path::new("/o"), &f).unwrap();
            assert_eq!((a.segmenter_error_maps, a.joint_training), (Some(want), want));
        }
        // The command's defaults apply to what is not given.
        let d = train_args(Path::new("/good"), Path::new("/out"), &[]).unwrap();
        assert_eq!((d.steps, d.batch_size, d.seed), (None, 16, 42));
        assert_eq!(d.segmenter_error_maps, None, "decided by the images' colour");
        assert_eq!(d.time_budget, 14.0);
        let o = serde_json::from_str(r#"{"time_budget": 5}"#).unwrap();
        let a = train_args(Path::new("/g"), Path::new("/o"), &flags(&o).unwrap()).unwrap();
        assert_eq!(a.time_budget, 5.0);
        let o = serde_json::from_str(r#"{"time_budget": -1}"#).unwrap();
        let e = train_args(Path::new("/g"), Path::new("/o"), &flags(&o).unwrap()).unwrap_err();
        assert!(e.contains("minutes"), "{e}");
        // Not the caller's to set, or not a training option at all.
        for bad in [
            r#"{"out": "/etc"}"#,
            r#"{"threads": 8}"#,
            r#"{"nonsense": 1}"#,
            r#"{"steps": [1]}"#,
        ] {
            let o: BTreeMap<String, serde_json::Value> = serde_json::from_str(bad).unwrap();
            assert!(flags(&o).is_err(), "{bad}");
        }
        // A bad value is refused with the command line's own message; a negative number
        // is the option's value, not taken for a flag.
        let o: BTreeMap<String, serde_json::Value> = serde_json::from_str(r#"{"test_time_flips": "all"}"#).unwrap();
        let args = train_args(Path::new("/g"), Path::new("/o"), &flags(&o).unwrap()).unwrap();
        assert_eq!(
            args.scoring.views.test_time_flips,
            Some(crate::scoring::TestTimeFlips::All)
        );
        let e = train_args(Path::new("/g"), Path::new("/o"), &["--steps".into(), "many".into()]).unwrap_err();
        assert!(e.contains("option `steps`"), "{e}");
        for bad in [
            r#"{"steps": -5}"#,
            r#"{"steps": 0}"#,
            r#"{"batch_size": 0}"#,
            r#"{"lr": -1}"#,
        ] {
            let o = serde_json::from_str(bad).unwrap();
            let e = train_args(Path::new("/g"), Path::new("/o"), &flags(&o).unwrap()).unwrap_err();
            assert!(
                e.contains("invalid value") && !e.contains("unexpected argument"),
                "{bad}: {e}"
            );
        }
    }

    fn zip_of(entries: &[(&str, &[u8])]) -> Vec<u8> {
        let mut w = zip::ZipWriter::new(std::io::Cursor::new(Vec::new()));
        let opts = zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Deflated);
        for (name, data) in entries {
            w.start_file(*name, opts).unwrap();
            std::io::Write::write_all(&mut w, data).unwrap();
        }
        w.finish().unwrap().into_inner()
    }

    #[test]
    fn uploads_keep_the_plain_part_of_the_clients_name() {
        assert_eq!(
            upload_file_name(2, Some("part_17 cam2.PNG"), "png"),
            "00002-part_17cam2.png"
        );
        assert_eq!(upload_file_name(0, Some("../../etc/passwd"), "png"), "00000-passwd.png");
        assert_eq!(upload_file_name(1, Some("..hidden.png"), "png"), "00001-hidden.png");
        assert_eq!(upload_file_name(3, Some("€€€.png"), "jpg"), "00003.jpg");
        assert_eq!(upload_file_name(4, None, "tif"), "00004.tif");
        assert_eq!(
            upload_file_name(5, Some(&"x".repeat(300)), "png").len(),
            "00005-".len() + 48 + ".png".len()
        );
    }

    #[test]
    fn option_errors_name_options_not_flags() {
        let refused = |flags: &[&str]| {
            let flags: Vec<String> = flags.iter().map(|f| f.to_string()).collect();
            train_args(Path::new("d"), Path::new("o"), &flags).err().unwrap()
        };
        for (flags, want) in [
            (
                &["--steps=0"][..],
                "invalid value \"0\" for option `steps`: \"0\" is not a whole number",
            ),
            (&["--batch-size=x"][..], "option `batch_size`"),
            (&["--stepz=3"][..], "unknown option `stepz` (did you mean `steps`?)"),
            (
                &["--arch=nope"][..],
                "invalid value \"nope\" for option `arch` (one of spatial, ",
            ),
            // A value that looks like a flag stays a value; a hidden character shows.
            (&["--lr=--steps"][..], "invalid value \"--steps\" for option `lr`"),
            (&["--loss=l2\0"][..], "invalid value \"l2\\0\" for option `loss`"),
        ] {
            let e = refused(flags);
            assert!(e.contains(want), "{flags:?}: {e}");
            assert!(
                !e.contains("Usage") && !e.contains("--help") && !e.contains('\n'),
                "{e}"
            );
        }
    }

    #[test]
    fn zip_uploads_give_their_images_flat_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let zip = zip_of(&[
            ("good/a.png", b"png-bytes"),
            ("../../escape.JPG", b"jpeg-bytes"),
            ("notes.txt", b"skip me"),
            ("__MACOSX/._a.png", b"resource fork"),
        ]);
        let (n, _) = extract_zip_images(&zip, dir.path(), 3, 1 << 20, 10).unwrap();
        assert_eq!(n, 2);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["00003-a.png", "00004-escape.jpg"]);
        assert_eq!(
            std::fs::read(dir.path().join("00004-escape.jpg")).unwrap(),
            b"jpeg-bytes"
        );
        // A zip bomb stops at the limit: 1 MB of zeros compresses to about a kilobyte.
        let zeros = vec![0u8; 1 << 20];
        let bomb = zip_of(&[("a.png", &zeros)]);
        assert!(bomb.len() < 10_000);
        let e = extract_zip_images(&bomb, dir.path(), 0, 100_000, 10).unwrap_err();
        assert!(e.contains("more than the 100000 bytes left"), "{e}");
        assert!(extract_zip_images(b"not a zip", dir.path(), 0, 1 << 20, 10).is_err());
        // Empty entries cost no bytes; they stop at the count.
        let empty = tempfile::tempdir().unwrap();
        let many: Vec<(String, &[u8])> = (0..5).map(|i| (format!("{i}.png"), &b""[..])).collect();
        let many: Vec<(&str, &[u8])> = many.iter().map(|(n, b)| (n.as_str(), *b)).collect();
        let e = extract_zip_images(&zip_of(&many), empty.path(), 0, 1 << 20, 4).unwrap_err();
        assert!(e.contains("more than the 4 images left"), "{e}");
        assert_eq!(std::fs::read_dir(empty.path()).unwrap().count(), 4);
        assert_eq!(
            extract_zip_images(&zip_of(&many), empty.path(), 4, 1 << 20, 5)
                .unwrap()
                .0,
            5
        );
    }

    #[test]
    fn model_names_are_safe_folder_names() {
        for ok in ["pcb-top", "line_2", "v1.2"] {
            assert!(valid_model_name(ok), "{ok}");
        }
        for bad in ["", ".hidden", "../x", "a/b", "with space", &"x".repeat(65)] {
            assert!(!valid_model_name(bad), "{bad:?}");
        }
    }
}
