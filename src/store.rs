//! The backup store: old contents, content-addressed by blake3, under `<state_dir>/backups/`.
//!
//! A blob enters by hard link when the target is on the same filesystem (no bytes copied;
//! the swap renames a new inode over the target, so the blob keeps the old inode) and by a
//! verified copy otherwise. A blob is verified by hash before it is ever restored. Durability
//! comes from the driver's batched `syncfs`, not from per-blob fsyncs.

use crate::engine::{FileMeta, Hash};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil::{self, TEMP_PREFIX};
use std::collections::BTreeSet;
use std::fs::File;
use std::path::{Path, PathBuf};

pub struct BackupStore {
    dir: PathBuf,
}

/// How a blob came to be in the store.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    AlreadyThere,
    Linked,
    Copied,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct GcStats {
    pub kept: u64,
    pub removed: u64,
    pub removed_bytes: u64,
}

/// Blobs and bytes in the backup store of `state_dir` (none when it was never created).
pub fn usage_in(state_dir: &Path) -> Result<(u64, u64)> {
    let store = BackupStore { dir: state_dir.join("backups") };
    if !store.dir.is_dir() {
        return Ok((0, 0));
    }
    store.usage()
}

impl BackupStore {
    pub fn open(state_dir: &Path) -> Result<BackupStore> {
        let dir = state_dir.join("backups");
        std::fs::create_dir_all(&dir)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "create", &dir, &e))?;
        Ok(BackupStore { dir })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn blob_path(&self, hash: &Hash) -> PathBuf {
        self.dir.join(hash.to_hex())
    }

    pub fn has(&self, hash: &Hash) -> bool {
        self.blob_path(hash).is_file()
    }

    /// Ensures the blob `hash` exists, taking it from `src`, which holds that content.
    pub fn put(&self, src: &Path, hash: &Hash) -> Result<Put> {
        let blob = self.blob_path(hash);
        if Self::existing_blob_is_sound(&blob, src, hash)? {
            return Ok(Put::AlreadyThere);
        }
        match std::fs::hard_link(src, &blob) {
            Ok(()) => return Ok(Put::Linked),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Ok(Put::AlreadyThere);
            }
            // EXDEV: another filesystem. EPERM: protected_hardlinks for a file we do not own.
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(nix::libc::EXDEV | nix::libc::EPERM | nix::libc::EMLINK)
                ) => {}
            Err(e) => return Err(Error::io(ErrorCode::DeploymentFailed, "link backup", &blob, &e)),
        }
        // Copy under a temporary name and rename, so a blob name only ever holds whole content.
        let tmp = self.dir.join(format!("{TEMP_PREFIX}{}.tmp", hash.to_hex()));
        fsutil::remove_if_present(&tmp)?;
        let copied = Self::copy_in(src, hash, &tmp).and_then(|()| {
            std::fs::rename(&tmp, &blob)
                .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "rename", &blob, &e))
        });
        if copied.is_err() {
            // A partial (or unnamed) copy must not keep the space a full disk needs for the
            // rollback.
            let _ = fsutil::remove_if_present(&tmp);
        }
        copied.map(|()| Put::Copied)
    }

    /// Copies `src` to `tmp`, verifying that it still has content `hash`.
    fn copy_in(src: &Path, hash: &Hash, tmp: &Path) -> Result<()> {
        let out = fsutil::create_exclusive(tmp)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "create", tmp, &e))?;
        let input =
            File::open(src).map_err(|e| Error::io(ErrorCode::DeploymentFailed, "open", src, &e))?;
        let (got, _) = fsutil::copy_hashed(input, &out).map_err(|e| match e {
            fsutil::CopyError::Read(e) => Error::io(ErrorCode::DeploymentFailed, "read", src, &e),
            fsutil::CopyError::Write(e) => {
                Error::io(ErrorCode::DeploymentFailed, "write backup", tmp, &e)
            }
        })?;
        if got != *hash {
            return Err(Error::new(
                ErrorCode::HashMismatch,
                format!(
                    "{} changed while being backed up (expected {hash}, read {got})",
                    src.display()
                ),
            ));
        }
        Ok(())
    }

    /// An existing blob can be trusted without reading it when it is `src` itself (a link of
    /// the file just observed) or has no other link (only this store can change it). A blob
    /// that shares its inode with some other live file may have been modified in place
    /// through that file: it is re-hashed, and replaced when it no longer matches.
    fn existing_blob_is_sound(blob: &Path, src: &Path, hash: &Hash) -> Result<bool> {
        use std::os::unix::fs::MetadataExt;
        let Ok(b) = std::fs::symlink_metadata(blob) else { return Ok(false) };
        if b.nlink() == 1 {
            return Ok(true);
        }
        let s = std::fs::metadata(src)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "stat", src, &e))?;
        if b.dev() == s.dev() && b.ino() == s.ino() {
            return Ok(true);
        }
        match fsutil::hash_file(blob) {
            Ok((h, _)) if h == *hash => Ok(true),
            _ => {
                tracing::warn!(blob = %blob.display(), "backup blob no longer matches its name; \
                    replacing it");
                fsutil::remove_if_present(blob)?;
                Ok(false)
            }
        }
    }

    /// Writes blob `meta.hash` to the new file `dst` (which must not exist) with `meta`'s mode
    /// and owner, verifying the content on the way. A blob that does not verify is never
    /// restored.
    pub fn restore_to(&self, meta: &FileMeta, dst: &Path) -> Result<()> {
        let blob = self.blob_path(&meta.hash);
        let input = File::open(&blob)
            .map_err(|e| Error::io(ErrorCode::RollbackFailed, "open backup", &blob, &e))?;
        fsutil::remove_if_present(dst)?;
        let restored = Self::copy_verified(input, &blob, meta, dst);
        if restored.is_err() {
            let _ = fsutil::remove_if_present(dst);
        }
        restored
    }

    fn copy_verified(input: File, blob: &Path, meta: &FileMeta, dst: &Path) -> Result<()> {
        let out = fsutil::create_exclusive(dst)
            .map_err(|e| Error::io(ErrorCode::RollbackFailed, "create", dst, &e))?;
        let (got, _) = fsutil::copy_hashed(input, &out).map_err(|e| match e {
            fsutil::CopyError::Read(e) => {
                Error::io(ErrorCode::RollbackFailed, "read backup", blob, &e)
            }
            fsutil::CopyError::Write(e) => Error::io(ErrorCode::RollbackFailed, "write", dst, &e),
        })?;
        if got != meta.hash {
            return Err(Error::new(
                ErrorCode::HashMismatch,
                format!("backup blob {} is damaged (read {got})", blob.display()),
            ));
        }
        fsutil::apply_meta(&out, dst, meta.mode, meta.uid, meta.gid)
    }

    /// Opens a blob for reading (staging a rollback's new content).
    pub fn open_blob(&self, hash: &Hash) -> Result<File> {
        let blob = self.blob_path(hash);
        File::open(&blob)
            .map_err(|e| Error::io(ErrorCode::RollbackFailed, "open backup", &blob, &e))
    }

    /// Removes every blob not in `keep` (and stray temporaries), then fsyncs the directory so
    /// the removals are durable before `gc` reports them.
    pub fn gc(&self, keep: &BTreeSet<Hash>) -> Result<GcStats> {
        let garbage = self.garbage(keep)?;
        self.remove(&garbage)
    }

    /// Every entry of the store that is not a blob in `keep` (stray temporaries included),
    /// with its size, and how many are kept: what a collection would remove. Only the
    /// entries to remove are stat'ed: `recover` runs this at every boot and each install at
    /// its end, and a store of thousands of kept blobs must not cost thousands of stats.
    pub fn garbage(&self, keep: &BTreeSet<Hash>) -> Result<Garbage> {
        let mut g = Garbage::default();
        for name in self.names()? {
            if Hash::from_hex(&name).is_some_and(|h| keep.contains(&h)) {
                g.kept += 1;
            } else {
                let len = self.entry_len(&name);
                g.entries.push((name, len));
            }
        }
        Ok(g)
    }

    /// Removes `garbage`, then fsyncs the directory: after this returns, a power cut cannot
    /// bring a removed blob back (a lost unlink would only leave garbage for the next run).
    pub fn remove(&self, garbage: &Garbage) -> Result<GcStats> {
        let mut stats = GcStats { kept: garbage.kept, ..GcStats::default() };
        if garbage.entries.is_empty() {
            return Ok(stats);
        }
        crate::failpoint::hit("gc.before_unlink");
        for (name, len) in &garbage.entries {
            if fsutil::remove_if_present(&self.dir.join(name))? {
                stats.removed += 1;
                stats.removed_bytes += len;
            }
            crate::failpoint::hit("gc.unlinked_one");
        }
        fsutil::fsync_dir(&self.dir)?;
        Ok(stats)
    }

    /// Blobs in the store and their bytes (for `status`).
    pub fn usage(&self) -> Result<(u64, u64)> {
        let entries = self.entries()?;
        Ok((entries.len() as u64, entries.iter().map(|(_, len)| len).sum()))
    }

    /// Every entry's name and size.
    fn entries(&self) -> Result<Vec<(String, u64)>> {
        Ok(self
            .names()?
            .into_iter()
            .map(|name| {
                let len = self.entry_len(&name);
                (name, len)
            })
            .collect())
    }

    /// The size of the entry `name` (0 when it went away meanwhile), its symlink not followed.
    fn entry_len(&self, name: &str) -> u64 {
        std::fs::symlink_metadata(self.dir.join(name)).map_or(0, |m| m.len())
    }

    /// Every entry's name, from the directory alone (a name that is not UTF-8 is kept out:
    /// the store never writes one).
    fn names(&self) -> Result<Vec<String>> {
        let rd = std::fs::read_dir(&self.dir)
            .map_err(|e| Error::io(ErrorCode::InternalError, "read dir", &self.dir, &e))?;
        let mut out = Vec::new();
        for entry in rd {
            let entry = entry
                .map_err(|e| Error::io(ErrorCode::InternalError, "read dir", &self.dir, &e))?;
            if let Ok(name) = entry.file_name().into_string() {
                out.push(name);
            }
        }
        Ok(out)
    }
}

/// What a collection would remove: store entries no kept generation, the factory baseline or
/// an in-flight plan needs.
#[derive(Debug, Default, Clone)]
pub struct Garbage {
    /// Name and size of each entry to remove.
    pub entries: Vec<(String, u64)>,
    /// Blobs that stay.
    pub kept: u64,
}

impl Garbage {
    pub fn bytes(&self) -> u64 {
        self.entries.iter().map(|(_, len)| len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn garbage_is_every_entry_but_the_kept_blobs_each_with_its_size() {
        let dir = tempfile::tempdir().unwrap();
        let store = BackupStore::open(dir.path()).unwrap();
        let blob = |content: &[u8]| {
            let hash = Hash(*blake3::hash(content).as_bytes());
            std::fs::write(store.blob_path(&hash), content).unwrap();
            hash
        };
        let kept = blob(b"kept content");
        let dropped = blob(b"content no generation needs");
        let stray = format!("{TEMP_PREFIX}left-by-a-cut");
        std::fs::write(store.dir().join(&stray), b"half").unwrap();
        let g = store.garbage(&BTreeSet::from([kept])).unwrap();
        let mut entries = g.entries.clone();
        entries.sort();
        let mut want = vec![(dropped.to_hex(), 27), (stray, 4)];
        want.sort();
        assert_eq!(entries, want);
        assert_eq!((g.kept, g.bytes()), (1, 31));
        // Collected: the kept blob alone stays, and the store's usage says so.
        let stats = store.remove(&g).unwrap();
        assert_eq!((stats.removed, stats.removed_bytes, stats.kept), (2, 31, 1));
        assert_eq!(store.usage().unwrap(), (1, 12));
    }
}
