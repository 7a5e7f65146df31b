//! Writing files so that they survive a power cut once the call returns: the data is
//! synced before the rename that publishes it, and the folder after it (a rename lives in
//! the folder's own data). Without the syncs a crash can leave a published `model.json`
//! empty, and a server that finds a model folder it cannot load does not start.

use std::io::Write;
use std::path::Path;

/// Writes `bytes` to `tmp`, syncs it and renames it to `path` (same folder), then syncs
/// the folder. On failure (a full disk) the temporary file is removed: nothing names it,
/// so nothing else would.
pub fn write_file(tmp: &Path, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let written = std::fs::File::create(tmp).and_then(|mut f| {
        f.write_all(bytes)?;
        f.sync_all()
    });
    let published = written.and_then(|()| publish(tmp, path));
    if published.is_err() {
        // Gone already when the rename succeeded and only the folder's sync failed.
        let _ = std::fs::remove_file(tmp);
    }
    published
}

/// Syncs a file written by someone else (a library that writes its own files) to disk.
pub fn sync_file(path: &Path) -> std::io::Result<()> {
    std::fs::File::open(path)?.sync_all()
}

/// Renames `from` to `to` (a file or a folder) and syncs the folder that now holds `to`.
pub fn publish(from: &Path, to: &Path) -> std::io::Result<()> {
    std::fs::rename(from, to)?;
    sync_dir(&folder_of(to))
}

/// The folder that holds `path` (`.` for a bare name).
pub fn folder_of(path: &Path) -> std::path::PathBuf {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir.to_path_buf(),
        _ => Path::new(".").to_path_buf(),
    }
}

/// Syncs a folder's entries (names made, renamed or removed in it).
pub fn sync_dir(dir: &Path) -> std::io::Result<()> {
    // A folder opens read-only for fsync on Unix; elsewhere there is no such call.
    #[cfg(unix)]
    std::fs::File::open(dir)?.sync_all()?;
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_written_file_replaces_the_old_one_and_leaves_no_temporary() {
        let dir = tempfile::tempdir().unwrap();
        let (tmp, path) = (dir.path().join(".a.tmp"), dir.path().join("a"));
        write_file(&tmp, &path, b"first").unwrap();
        write_file(&tmp, &path, b"second").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"second");
        assert!(!tmp.exists());
        // A folder is published whole; a missing source is an error, not a silent no-op.
        let staged = dir.path().join("staged");
        std::fs::create_dir(&staged).unwrap();
        write_file(&staged.join(".x.tmp"), &staged.join("x"), b"x").unwrap();
        publish(&staged, &dir.path().join("model")).unwrap();
        assert_eq!(std::fs::read(dir.path().join("model/x")).unwrap(), b"x");
        assert!(publish(&staged, &dir.path().join("again")).is_err());
        assert!(sync_file(&dir.path().join("missing")).is_err());
    }
}
