//! The per-file effects of the phases. Each is idempotent: it looks at what the file system
//! holds now and does only what is missing.

use crate::engine::plan::{RestoreAction, SwapAction, restore_action, swap_action};
use crate::engine::{NewState, PathState, Source, Target};
use crate::error::{Error, ErrorCode, Result};
use crate::failpoint::hit;
use crate::fsutil::{self, CopyError, temp_path};
use crate::store::BackupStore;
use std::path::Path;

/// Stages one target: its new content to `.tope-N-h.new`, checked against the plan, with its
/// mode and owner. Returns the content hash (`None` for a target whose new state is absent).
pub(super) fn stage_one(
    t: &Target,
    tx: u64,
    archive: Option<&mut crate::package::Archive>,
    store: &BackupStore,
) -> Result<Option<crate::engine::Hash>> {
    let NewState::File(nf) = &t.new else { return Ok(None) };
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    let file = fsutil::create_replacing(&tmp)?;
    let copied = match &t.source {
        Source::Package { entry } => {
            let archive = archive
                .ok_or_else(|| Error::internal("staging from a package that is not open"))?;
            let reader = crate::package::entry_reader(archive, entry, nf.size)?;
            fsutil::copy_hashed(reader, &file).map_err(|e| match e {
                CopyError::Read(e) => {
                    Error::new(ErrorCode::InvalidPackage, format!("entry {entry:?}: {e}"))
                }
                CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e),
            })
        }
        Source::Blob => {
            let hash = nf.hash.ok_or_else(|| Error::internal("blob source without a hash"))?;
            fsutil::copy_hashed(store.open_blob(&hash)?, &file).map_err(|e| match e {
                CopyError::Read(e) => {
                    Error::io(ErrorCode::RollbackFailed, "read backup", &store.blob_path(&hash), &e)
                }
                CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e),
            })
        }
        Source::Delta { base, live, patch } => {
            stage_delta(t, nf.size, (base, *live), patch.as_ref(), archive, store, (&tmp, &file))
        }
        Source::Nothing => {
            Err(Error::internal(format!("{} has new content but no source", t.path)))
        }
    };
    let (hash, size) = copied?;
    if size != nf.size {
        // From the package: the package is wrong; from a blob or a delta base: the content is.
        let code = if matches!(t.source, Source::Package { .. }) {
            ErrorCode::InvalidPackage
        } else {
            ErrorCode::HashMismatch
        };
        return Err(Error::new(
            code,
            format!("{}: {size} bytes staged, {} declared", t.path, nf.size),
        ));
    }
    if let Some(expected) = nf.hash
        && expected != hash
    {
        return Err(Error::new(
            ErrorCode::HashMismatch,
            format!("content for {} hashes to {hash}, expected {expected}", t.path),
        ));
    }
    fsutil::apply_meta(&file, &tmp, nf.mode, nf.uid, nf.gid)?;
    hit("stage.file");
    Ok(Some(hash))
}

/// A delta file's new content into the staged file `out`: its base (the live target, or the
/// backup blob of that hash) copied, or with the patch applied. Returns hash and length.
fn stage_delta(
    t: &Target,
    size: u64,
    (base, live): (&crate::engine::Hash, bool),
    patch: Option<&crate::engine::plan::PatchRef>,
    archive: Option<&mut crate::package::Archive>,
    store: &BackupStore,
    (tmp, file): (&Path, &std::fs::File),
) -> Result<(crate::engine::Hash, u64)> {
    let target = Path::new(&t.path);
    let base_file = if live {
        std::fs::File::open(target)
            .map_err(|e| Error::io(ErrorCode::DeltaBaseMissing, "open delta base", target, &e))?
    } else {
        store.open_blob(base).map_err(|e| Error::new(ErrorCode::DeltaBaseMissing, e.message))?
    };
    let base_path = if live { target.to_path_buf() } else { store.blob_path(base) };
    let Some(p) = patch else {
        return fsutil::copy_hashed(&base_file, file).map_err(|e| match e {
            CopyError::Read(e) => {
                Error::io(ErrorCode::DeltaBaseMissing, "read delta base", &base_path, &e)
            }
            CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", tmp, &e),
        });
    };
    let archive =
        archive.ok_or_else(|| Error::internal("staging from a package that is not open"))?;
    let mut reader = crate::package::entry_reader(archive, &p.entry, p.size)?;
    let mut out = HashingWriter { file, hasher: blake3::Hasher::new(), len: 0 };
    crate::delta::apply(&mut reader, &base_file, size, &mut out).map_err(|e| {
        use crate::delta::PatchError;
        let what = format!("patch {:?} for {}", p.entry, t.path);
        match e {
            PatchError::Invalid(m) => Error::new(ErrorCode::InvalidPackage, format!("{what}: {m}")),
            PatchError::Corrupt(m) => Error::new(
                ErrorCode::HashMismatch,
                format!("{what} does not produce the pinned content: {m}"),
            ),
            PatchError::Read(e) => Error::new(ErrorCode::InvalidPackage, format!("{what}: {e}")),
            PatchError::Base(m) => Error::new(
                ErrorCode::DeltaBaseMissing,
                format!("{what}: base {}: {m}", base_path.display()),
            ),
            PatchError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", tmp, &e),
        }
    })?;
    Ok((out.hasher.finalize().into(), out.len))
}

/// The staged file, hashed as the patch output is written (in whole windows: no buffering).
struct HashingWriter<'f> {
    file: &'f std::fs::File,
    hasher: blake3::Hasher,
    len: u64,
}

impl std::io::Write for HashingWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = std::io::Write::write(&mut &*self.file, buf)?;
        self.hasher.update(&buf[..n]);
        self.len += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A large file being staged by pieces on every core: its temporary file is open, and each
/// piece is read from the package, written at its offset and hashed as a blake3 subtree.
pub(super) struct SplitStage {
    tmp: std::path::PathBuf,
    out: std::fs::File,
    package: std::sync::Arc<std::fs::File>,
    data_start: u64,
    pub size: u64,
    expected: crate::engine::Hash,
}

/// Starts a split staging for `t` when it can be split: a large stored entry whose hash the
/// manifest pins (the pinned hash then checks every byte; the ZIP CRC, which only a
/// sequential read computes, adds nothing to it). `None`: stage it whole with `stage_one`.
pub(super) fn split_stage(
    t: &Target,
    tx: u64,
    pkg: &crate::package::Package,
    archive: &mut crate::package::Archive,
) -> Result<Option<SplitStage>> {
    let (NewState::File(nf), Source::Package { entry }) = (&t.new, &t.source) else {
        return Ok(None);
    };
    let Some(expected) = nf.hash else { return Ok(None) };
    if nf.size <= crate::treehash::PIECE_BYTES {
        return Ok(None);
    }
    let Some((package, data_start)) = pkg.stored_entry(archive, entry, nf.size)? else {
        return Ok(None);
    };
    let tmp = temp_path(Path::new(&t.path), tx);
    let out = fsutil::create_replacing(&tmp)?;
    Ok(Some(SplitStage { tmp, out, package, data_start, size: nf.size, expected }))
}

impl SplitStage {
    /// Copies and hashes one piece (`treehash::pieces(self.size)`), with pread/pwrite: the
    /// pieces of one file run on different threads.
    pub(super) fn copy_piece(&self, offset: u64, len: u64) -> Result<crate::treehash::PieceHash> {
        use std::os::unix::fs::FileExt;
        fsutil::with_io_buffer(|buf| {
            let mut hasher = crate::treehash::piece_hasher(offset, self.size);
            let mut done = 0u64;
            while done < len {
                let want = buf.len().min((len - done) as usize);
                let n = self
                    .package
                    .read_at(&mut buf[..want], self.data_start + offset + done)
                    .map_err(|e| {
                        Error::new(
                            ErrorCode::InvalidPackage,
                            format!("package entry for {}: {e}", self.tmp.display()),
                        )
                    })?;
                if n == 0 {
                    return Err(Error::new(
                        ErrorCode::InvalidPackage,
                        format!("package entry for {} is truncated", self.tmp.display()),
                    ));
                }
                hasher.update(&buf[..n]);
                self.out
                    .write_all_at(&buf[..n], offset + done)
                    .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "write", &self.tmp, &e))?;
                done += n as u64;
            }
            Ok(hasher.finish())
        })
    }

    /// After every piece: the merged hash must be the pinned one; then mode and owner.
    pub(super) fn finish(self, t: &Target, hash: crate::engine::Hash) -> Result<()> {
        let NewState::File(nf) = &t.new else {
            return Err(Error::internal("split staging of a target without new content"));
        };
        if hash != self.expected {
            return Err(Error::new(
                ErrorCode::HashMismatch,
                format!("content for {} hashes to {hash}, expected {}", t.path, self.expected),
            ));
        }
        fsutil::apply_meta(&self.out, &self.tmp, nf.mode, nf.uid, nf.gid)?;
        hit("stage.file");
        Ok(())
    }
}

/// Swaps one target: the staged file renamed over it, or the target removed.
pub(super) fn swap_one(t: &Target, tx: u64) -> Result<()> {
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    if let NewState::File(_) = t.new {
        // The common case first: a staged file is renamed whatever the target holds
        // (`swap_action`), so the rename itself tells whether it was staged.
        match std::fs::rename(&tmp, target) {
            Ok(()) => {
                hit("swap.file");
                return Ok(());
            }
            // A target that already held its new state was not staged: left alone (its
            // content is read by verification). One staged all the same (a package without
            // hashes, whose content was only known once staged) is renamed above.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && t.unchanged() => return Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(Error::io(ErrorCode::DeploymentFailed, "rename", target, &e)),
        }
    }
    let staged = std::fs::symlink_metadata(&tmp).is_ok();
    let current = match (&t.new, staged) {
        (NewState::File(_), true) => None,
        _ => Some(fsutil::observe(target)?),
    };
    match swap_action(&t.new, staged, current.as_ref()) {
        SwapAction::Rename => std::fs::rename(&tmp, target)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "rename", target, &e))?,
        SwapAction::Remove => {
            fsutil::remove_if_present(target)?;
        }
        SwapAction::Done => {}
        SwapAction::Lost => {
            return Err(Error::new(
                ErrorCode::DeploymentFailed,
                format!("{}: staged content is missing", t.path),
            ));
        }
    }
    hit("swap.file");
    Ok(())
}

/// Puts one target back to its old state, judged by what it holds now.
pub(super) fn undo_one(t: &Target, tx: u64, store: &BackupStore) -> Result<()> {
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    // Removing the staged file tells whether there was one: a target that kept its content
    // was neither staged nor swapped, so there is nothing to undo (and no backup of it).
    let was_staged = std::fs::symlink_metadata(&tmp).is_ok();
    fsutil::remove_if_present(&tmp)?;
    if t.unchanged() && !was_staged {
        hit("rollback.file");
        return Ok(());
    }
    let current = fsutil::observe(target)?;
    match restore_action(&t.old, &current) {
        RestoreAction::Nothing => {}
        RestoreAction::Remove => {
            fsutil::remove_if_present(target)?;
        }
        RestoreAction::Restore => {
            let PathState::File(meta) = t.old else {
                unreachable!("restore_action returns Restore only for old files")
            };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Error::io(ErrorCode::RollbackFailed, "create", parent, &e))?;
            }
            store.restore_to(&meta, &tmp)?;
            std::fs::rename(&tmp, target)
                .map_err(|e| Error::io(ErrorCode::RollbackFailed, "rename", target, &e))?;
        }
    }
    hit("rollback.file");
    Ok(())
}
