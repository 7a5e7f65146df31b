//! Finding and loading training images.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::image_io::{self, Planar, EXTENSIONS};

#[derive(Debug, thiserror::Error)]
pub enum DatasetError {
    #[error("{0}: no such folder")]
    NotFound(PathBuf),
    #[error("{0}: a file, not a folder of images")]
    NotAFolder(PathBuf),
    #[error(
        "{0}: has defect folders under test/ or a ground_truth/ like an MVTec AD category, but no train/good; \
         give a folder of good images only (its train/good)"
    )]
    NoTrainGood(PathBuf),
    /// A folder of a labelled set that holds defects or masks, or one above such a set:
    /// walking it would take defects and masks for good parts.
    #[error("{folder}: {why}; give a folder of good images only")]
    Labelled { folder: PathBuf, why: String },
    #[error("{0}: no images found (looked for {exts} files, recursively)", exts = EXTENSIONS.join(", "))]
    Empty(PathBuf),
    /// Every unreadable image of the set (what went wrong with each), so that one run
    /// names them all.
    #[error("{}", unreadable_list(.0))]
    BadImages(Vec<(PathBuf, String)>),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn unreadable_list(bad: &[(PathBuf, String)]) -> String {
    const SHOWN: usize = 5;
    let mut text: Vec<String> = bad
        .iter()
        .take(SHOWN)
        .map(|(p, e)| format!("{}: {e}", p.display()))
        .collect();
    if bad.len() > SHOWN {
        text.push(format!("and {} more", bad.len() - SHOWN));
    }
    format!("{} unreadable image(s): {}", bad.len(), text.join("; "))
}

/// True when `path` has an image extension.
pub fn is_image(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// That `dir` is a folder: what `vigil train` checks before it announces a training.
pub fn check_folder(dir: &Path) -> Result<(), DatasetError> {
    if dir.is_file() {
        return Err(DatasetError::NotAFolder(dir.to_path_buf()));
    }
    if !dir.is_dir() {
        return Err(DatasetError::NotFound(dir.to_path_buf()));
    }
    Ok(())
}

/// Image files under `dir`, recursively, sorted. An MVTec AD category folder (one with
/// `train/good`) yields its training images only; one with test images but no `train/good`
/// is refused, since walking it would take defects and masks for good parts.
pub fn training_files(dir: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    check_folder(dir)?;
    let mvtec = dir.join("train").join("good");
    let category = mvtec.is_dir();
    let root = if category {
        mvtec
    } else if is_labelled_category(dir) {
        return Err(DatasetError::NoTrainGood(dir.to_path_buf()));
    } else {
        refuse_inside_labelled_set(dir)?;
        dir.to_path_buf()
    };
    let files = image_files(&root)?;
    if files.is_empty() {
        return Err(DatasetError::Empty(root));
    }
    // A folder above categories (or holding a copy of one) would walk into their test
    // images and masks: each folder of the files is judged once.
    if !category {
        let mut seen = std::collections::HashSet::new();
        for file in &files {
            for folder in file.ancestors().skip(1).take_while(|a| *a != root) {
                if seen.contains(folder) {
                    break;
                }
                seen.insert(folder.to_path_buf());
                if let Some(why) = defects_folder(folder) {
                    return Err(DatasetError::Labelled {
                        folder: dir.to_path_buf(),
                        why: format!("holds {why}"),
                    });
                }
            }
        }
    }
    Ok(files)
}

/// `path` made absolute with its longest existing part resolved (links followed).
pub fn resolved(path: &Path) -> PathBuf {
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let mut rest = Vec::new();
    let mut existing = absolute.as_path();
    loop {
        if let Ok(real) = existing.canonicalize() {
            return rest.iter().rev().fold(real, |p, part| p.join(part));
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return absolute,
        }
    }
}

/// A folder laid out as a labelled set (MVTec AD): defect folders under `test/` or masks
/// in `ground_truth/`. A `test/` of good images alone may be a user's own split.
fn is_labelled_category(dir: &Path) -> bool {
    dir.join("ground_truth").is_dir() || has_defect_folders(&dir.join("test"))
}

/// A `test/` folder with folders other than `good` (defect types, in MVTec AD's layout).
fn has_defect_folders(test: &Path) -> bool {
    std::fs::read_dir(test).is_ok_and(|entries| entries.flatten().any(|e| e.path().is_dir() && e.file_name() != "good"))
}

/// What makes `folder` a labelled set's defects or masks: a `ground_truth/` folder, or a
/// defect folder `test/<type>` (not `test/good`) of a labelled set.
fn defects_folder(folder: &Path) -> Option<String> {
    if folder.file_name().is_some_and(|n| n == "ground_truth") {
        return Some(format!("defect masks ({})", folder.display()));
    }
    let test = folder.parent()?;
    let set = test.parent()?;
    let defect_type = test.file_name().is_some_and(|n| n == "test") && folder.file_name().is_some_and(|n| n != "good");
    (defect_type && is_labelled_category(set)).then(|| {
        format!(
            "the defective test images of the labelled set {} (name that folder: its train/good is used)",
            set.display()
        )
    })
}

/// Refuses a folder inside a labelled set's defects or masks (see [`defects_folder`]),
/// or a labelled set's `test/` that holds defect folders: their images are not good
/// parts. The path is judged as given and as resolved, so a linked folder is judged too.
fn refuse_inside_labelled_set(dir: &Path) -> Result<(), DatasetError> {
    let given = std::path::absolute(dir).unwrap_or_else(|_| dir.to_path_buf());
    let real = dir.canonicalize().unwrap_or_else(|_| given.clone());
    for path in [&given, &real] {
        let named_test = path.file_name().is_some_and(|n| n == "test") && has_defect_folders(path);
        let set = path.parent().filter(|set| named_test && is_labelled_category(set));
        let why = match set {
            Some(set) => Some(format!(
                "is the test folder of the labelled set {}, defects included",
                set.display()
            )),
            None => path
                .ancestors()
                .find_map(defects_folder)
                .map(|why| format!("is inside {why}")),
        };
        if let Some(why) = why {
            return Err(DatasetError::Labelled {
                folder: dir.to_path_buf(),
                why,
            });
        }
    }
    Ok(())
}

/// Image files under `root`, recursively, sorted; hidden files and folders skipped. A link
/// that cannot be followed (to nothing, or back to a folder above it) is skipped with a
/// warning rather than failing the whole folder; any other error (an unreadable folder)
/// fails it, so that nothing is silently left out.
pub fn image_files(root: &Path) -> Result<Vec<PathBuf>, DatasetError> {
    walk(root, false).map(|(files, _)| files)
}

/// As [`image_files`], but a folder below `root` that cannot be read is returned with why
/// rather than failing the walk: for inspecting what can be read (an incoming folder on
/// its own filesystem holds a `lost+found` only root may read).
pub fn image_files_and_unreadable(root: &Path) -> Result<(Vec<PathBuf>, Vec<Unreadable>), DatasetError> {
    walk(root, true)
}

/// A folder that could not be read, and why.
pub type Unreadable = (PathBuf, String);

/// The walk of both: with `keep_going`, folders below `root` that cannot be read are
/// returned rather than failing it.
fn walk(root: &Path, keep_going: bool) -> Result<(Vec<PathBuf>, Vec<Unreadable>), DatasetError> {
    let (mut files, mut unreadable) = (Vec::new(), Vec::new());
    let walk = walkdir::WalkDir::new(root).follow_links(true).sort_by_file_name();
    let visible = |e: &walkdir::DirEntry| e.depth() == 0 || !e.file_name().to_str().is_some_and(|n| n.starts_with('.'));
    for entry in walk.into_iter().filter_entry(visible) {
        let entry = match entry {
            Ok(entry) => entry,
            Err(e) if e.depth() > 0 && unfollowable_link(&e) => {
                tracing::warn!("skipped: {e}");
                continue;
            }
            Err(e) if keep_going && e.depth() > 0 && e.io_error().is_some() => {
                let path = e.path().unwrap_or(root).to_path_buf();
                let why = e.io_error().map(|io| io.to_string()).unwrap_or_default();
                unreadable.push((path, why));
                continue;
            }
            Err(e) => return Err(DatasetError::Io(e.into())),
        };
        if entry.file_type().is_file() && is_image(entry.path()) {
            files.push(entry.into_path());
        }
    }
    Ok((files, unreadable))
}

fn unfollowable_link(e: &walkdir::Error) -> bool {
    e.loop_ancestor().is_some()
        || (e.io_error().is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound)
            && e.path().is_some_and(|p| p.is_symlink()))
}

/// Loaded images at working resolution with what the artifact records about them.
pub struct LoadedSet {
    pub images: Vec<Planar>,
    pub files: Vec<PathBuf>,
    /// SHA-256 over the files' contents' SHA-256s, sorted: the same images give the same
    /// fingerprint whatever their names or the folder named to reach them.
    pub fingerprint: String,
    /// True when some image carries colour.
    pub any_colour: bool,
    /// The images' size (width, height) when they all share it.
    pub image_size: Option<(u32, u32)>,
    /// `grey`, `colour` or `mixed`, told as inspection tells it
    /// ([`image_io::has_colour_sampled`]), so the two agree on the same image.
    pub colour: &'static str,
}

/// Loads `files`, converting to `channels` (None: decide by colour, RGB if any image has it)
/// and resizing to `size × size`. Unreadable images are an error naming each of them.
pub fn load_set(
    files: &[PathBuf],
    channels: Option<usize>,
    size: usize,
    max_pixels: u64,
) -> Result<LoadedSet, DatasetError> {
    let mut digests = Vec::with_capacity(files.len());
    let mut decoded = Vec::with_capacity(files.len());
    let mut bad = Vec::new();
    for f in files {
        let bytes = match std::fs::read(f) {
            Ok(bytes) => bytes,
            Err(e) => {
                bad.push((f.clone(), e.to_string()));
                continue;
            }
        };
        digests.push(Sha256::digest(&bytes));
        match image_io::decode(&bytes, max_pixels) {
            Ok(img) => decoded.push(img),
            Err(e) => bad.push((f.clone(), e.to_string())),
        }
    }
    if !bad.is_empty() {
        return Err(DatasetError::BadImages(bad));
    }
    let dims = |img: &image::DynamicImage| (img.width(), img.height());
    let mixed = decoded.iter().position(|img| dims(img) != dims(&decoded[0]));
    let image_size = match (mixed, decoded.first()) {
        (None, Some(first)) => Some(dims(first)),
        _ => None,
    };
    if let Some(i) = mixed {
        let ((w0, h0), (w, h)) = (dims(&decoded[0]), dims(&decoded[i]));
        tracing::warn!(
            "the images differ in size ({} is {w0}×{h0}, {} is {w}×{h}): each is resized to {size}×{size}, \
             which stretches those of another shape",
            files[0].display(),
            files[i].display()
        );
    }
    digests.sort();
    let copies = digests.windows(2).filter(|w| w[0] == w[1]).count();
    if copies > 0 {
        // A copy held out for calibration sets the thresholds on an image the model was
        // trained on: optimistic, like calibrating on the training images.
        tracing::warn!(
            "{copies} of the {} images are byte-for-byte copies of others (a folder copied twice, a link to \
             one): each copy counts as another image",
            files.len()
        );
    }
    let mut hasher = Sha256::new();
    digests.iter().for_each(|d| hasher.update(d));
    let any_colour = decoded.iter().any(image_io::has_colour);
    let coloured = decoded.iter().filter(|img| image_io::has_colour_sampled(img)).count();
    let colour = match coloured {
        0 => "grey",
        n if n == decoded.len() => "colour",
        _ => "mixed",
    };
    let c = channels.unwrap_or(if any_colour { 3 } else { 1 });
    let images = decoded
        .iter()
        .map(|img| Planar::resized_from(img, c, size, size))
        .collect();
    Ok(LoadedSet {
        images,
        files: files.to_vec(),
        fingerprint: hex::encode(hasher.finalize()),
        any_colour,
        image_size,
        colour,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::GrayImage::from_pixel(8, 8, image::Luma([128]))
            .save(path)
            .unwrap();
    }

    #[test]
    fn an_mvtec_folder_without_train_good_is_refused_not_walked() {
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("test/good/000.png"));
        png(&dir.path().join("test/scratch/000.png"));
        png(&dir.path().join("ground_truth/scratch/000_mask.png"));
        let err = training_files(dir.path()).unwrap_err();
        assert!(matches!(err, DatasetError::NoTrainGood(_)), "{err}");
        png(&dir.path().join("train/good/000.png"));
        assert_eq!(
            training_files(dir.path()).unwrap(),
            vec![dir.path().join("train/good/000.png")]
        );
        // A user's own split of good images into train/ and test/ is just a folder.
        let split = tempfile::tempdir().unwrap();
        png(&split.path().join("train/000.png"));
        png(&split.path().join("test/000.png"));
        png(&split.path().join("test/good/001.png"));
        assert_eq!(training_files(split.path()).unwrap().len(), 3);
    }

    #[test]
    fn folders_above_or_inside_a_labelled_set_are_refused_where_they_hold_defects() {
        let root = tempfile::tempdir().unwrap();
        let cat = root.path().join("carpet");
        for f in [
            "train/good/000.png",
            "test/good/000.png",
            "test/hole/000.png",
            "ground_truth/hole/000_mask.png",
        ] {
            png(&cat.join(f));
        }
        let refused = |dir: &Path| match training_files(dir) {
            Err(DatasetError::Labelled { why, .. }) => why,
            other => panic!("{}: {other:?}", dir.display()),
        };
        // The folder above the category, and its test, defect and mask folders.
        assert!(refused(root.path()).contains("carpet"), "{}", refused(root.path()));
        for (inside, why) in [
            ("test", "is the test folder of the labelled set"),
            ("test/hole", "is inside the defective test images"),
            ("ground_truth", "is inside defect masks"),
            ("ground_truth/hole", "is inside defect masks"),
        ] {
            assert!(
                refused(&cat.join(inside)).contains(why),
                "{inside}: {}",
                refused(&cat.join(inside))
            );
        }
        // Linked: judged as given too.
        let link = root.path().join("linked-hole");
        std::os::unix::fs::symlink(cat.join("test/hole"), &link).unwrap();
        assert!(refused(&link).contains("defective test images"));
        // Its good folders are good images.
        for good in ["", "train", "train/good", "test/good"] {
            assert_eq!(training_files(&cat.join(good)).unwrap().len(), 1, "{good:?}");
        }
        // A folder of masks alone, below a user's folder, is refused too.
        let own = tempfile::tempdir().unwrap();
        png(&own.path().join("line-3/a.png"));
        png(&own.path().join("line-3/ground_truth/a_mask.png"));
        assert!(refused(own.path()).contains("masks"));
        // No category above: a folder of good images in a home folder that has a
        // `test/scratch` of its own.
        let home = tempfile::tempdir().unwrap();
        png(&home.path().join("test/scratch/x.png"));
        png(&home.path().join("parts/good/000.png"));
        png(&home.path().join("parts/good/line-2/001.png"));
        assert_eq!(training_files(&home.path().join("parts/good")).unwrap().len(), 2);
        // A user's own split: train/good and a flat test/ of good images; several lines'
        // train/good folders side by side.
        let split = tempfile::tempdir().unwrap();
        png(&split.path().join("parts/train/good/000.png"));
        png(&split.path().join("parts/test/001.png"));
        assert_eq!(training_files(&split.path().join("parts/test")).unwrap().len(), 1);
        png(&split.path().join("lines/l1/train/good/000.png"));
        png(&split.path().join("lines/l2/train/good/000.png"));
        assert_eq!(training_files(&split.path().join("lines")).unwrap().len(), 2);
        // A labelled set without masks or train/good (an evaluation set): its defects are
        // refused below a folder above it, and named directly.
        let eval_set = tempfile::tempdir().unwrap();
        png(&eval_set.path().join("set/test/good/000.png"));
        png(&eval_set.path().join("set/test/scratch/000.png"));
        assert!(refused(eval_set.path()).contains("defective test images"));
        assert!(refused(&eval_set.path().join("set/test/scratch")).contains("defective test images"));
    }

    #[test]
    fn a_file_given_as_the_folder_is_named_as_such() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.png");
        png(&file);
        assert!(matches!(training_files(&file), Err(DatasetError::NotAFolder(_))));
        assert!(matches!(
            training_files(&dir.path().join("none")),
            Err(DatasetError::NotFound(_))
        ));
    }

    #[test]
    fn the_fingerprint_is_of_the_contents_not_of_the_names() {
        let dir = tempfile::tempdir().unwrap();
        let grey = |path: &Path, v: u8| {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            image::GrayImage::from_pixel(8, 8, image::Luma([v])).save(path).unwrap();
        };
        let fingerprint = |folder: &Path| {
            load_set(&image_files(folder).unwrap(), None, 8, image_io::DEFAULT_MAX_PIXELS)
                .unwrap()
                .fingerprint
        };
        grey(&dir.path().join("a/1.png"), 10);
        grey(&dir.path().join("a/2.png"), 20);
        grey(&dir.path().join("b/train/good/x.png"), 20);
        grey(&dir.path().join("b/train/good/y.png"), 10);
        grey(&dir.path().join("c/1.png"), 10);
        grey(&dir.path().join("c/2.png"), 30);
        let a = fingerprint(&dir.path().join("a"));
        assert_eq!(a, fingerprint(&dir.path().join("b")), "renamed and moved");
        assert_ne!(a, fingerprint(&dir.path().join("c")), "one image changed");
    }

    #[test]
    fn every_unreadable_image_is_named_in_one_error() {
        let dir = tempfile::tempdir().unwrap();
        png(&dir.path().join("a.png"));
        std::fs::write(dir.path().join("b.png"), b"").unwrap();
        std::fs::write(dir.path().join("c.png"), b"not a png").unwrap();
        let files = image_files(dir.path()).unwrap();
        let err = load_set(&files, None, 8, image_io::DEFAULT_MAX_PIXELS)
            .err()
            .expect("unreadable images refused");
        let DatasetError::BadImages(bad) = &err else {
            panic!("{err}")
        };
        let names: Vec<_> = bad
            .iter()
            .map(|(p, _)| p.file_name().unwrap().to_str().unwrap())
            .collect();
        assert_eq!(names, ["b.png", "c.png"]);
        assert!(err.to_string().starts_with("2 unreadable image(s): "), "{err}");
    }

    #[cfg(unix)]
    #[test]
    fn hidden_folders_and_unfollowable_links_are_skipped() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        png(&root.join("a.png"));
        png(&root.join(".cache/b.png"));
        png(&root.join(".c.png"));
        png(&root.join("sub/d.png"));
        std::os::unix::fs::symlink(root.join("missing.png"), root.join("dangling.png")).unwrap();
        std::os::unix::fs::symlink(root, root.join("sub/loop")).unwrap();
        let files = image_files(root).unwrap();
        assert_eq!(files, vec![root.join("a.png"), root.join("sub/d.png")]);
        // The folder itself may be hidden: only what is inside it is filtered.
        let hidden_root = root.join(".cache");
        assert_eq!(image_files(&hidden_root).unwrap(), vec![hidden_root.join("b.png")]);
    }
}
