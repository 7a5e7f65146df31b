//! Stored images: files under `<data-dir>/images/<yyyy-mm-dd>/<id>.<ext>`, written and
//! synced before the record that names them is committed.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct BlobStore {
    root: PathBuf,
    /// Day folders known to be made and synced into their parents (by this process).
    synced_days: std::sync::Arc<std::sync::Mutex<std::collections::HashSet<String>>>,
}

impl BlobStore {
    /// The data directory the store writes under.
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn new(data_dir: &Path) -> Self {
        Self {
            root: data_dir.to_path_buf(),
            synced_days: Default::default(),
        }
    }

    /// Writes `bytes` durably; returns the path relative to the data directory.
    pub fn put(&self, day: &str, id: &str, ext: &str, bytes: &[u8]) -> std::io::Result<String> {
        let rel = format!("images/{day}/{id}.{ext}");
        let path = self.root.join(&rel);
        let dir = path.parent().expect("has a parent");
        let tmp = path.with_extension("tmp");
        if self.synced_days.lock().expect("days lock").contains(day) {
            match crate::durable::write_file(&tmp, &path, bytes) {
                // The folder went (retention, by hand) since it was made: make it again.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    self.synced_days.lock().expect("days lock").remove(day);
                }
                written => return written.map(|()| rel),
            }
        }
        // A day's folder (and `images/` on the first day) lives in its parent's entries:
        // synced too, or a crash could lose the folder with the day's images. Noted only
        // once synced, so a request that finds the folder made by another one still in
        // progress syncs it too, and a failed sync is tried again.
        std::fs::create_dir_all(dir)?;
        let images = self.root.join("images");
        crate::durable::sync_dir(&images)?;
        crate::durable::sync_dir(&crate::durable::folder_of(&images))?;
        self.synced_days.lock().expect("days lock").insert(day.to_string());
        crate::durable::write_file(&tmp, &path, bytes)?;
        Ok(rel)
    }

    pub fn get(&self, rel: &str) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.resolve(rel)?)
    }

    pub fn remove(&self, rel: &str) -> std::io::Result<()> {
        std::fs::remove_file(self.resolve(rel)?)
    }

    /// Refuses paths that would leave the data directory.
    fn resolve(&self, rel: &str) -> std::io::Result<PathBuf> {
        if rel.contains("..") || Path::new(rel).is_absolute() {
            return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "bad blob path"));
        }
        Ok(self.root.join(rel))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_day_folder_removed_since_it_was_made_is_made_again() {
        let dir = tempfile::tempdir().unwrap();
        let store = BlobStore::new(dir.path());
        let rel = store.put("2026-11-30", "a", "png", b"one").unwrap();
        assert_eq!(rel, "images/2026-11-30/a.png");
        std::fs::remove_dir_all(dir.path().join("images/2026-11-30")).unwrap();
        let rel = store.put("2026-11-30", "b", "png", b"two").unwrap();
        assert_eq!(store.get(&rel).unwrap(), b"two");
        assert!(!dir.path().join("images/2026-11-30/b.tmp").exists());
    }
}
