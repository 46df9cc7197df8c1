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
            let archive = archive.ok_or_else(|| Error::internal("staging from a package that is not open"))?;
            let reader = crate::package::entry_reader(archive, entry, nf.size)?;
            fsutil::copy_hashed(reader, &file).map_err(|e| match e {
                CopyError::Read(e) => Error::new(ErrorCode::InvalidPackage, format!("entry {entry:?}: {e}")),
                CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e),
            })
        }
        Source::Blob => {
            let hash = nf.hash.ok_or_else(|| Error::internal("blob source without a hash"))?;
            fsutil::copy_hashed(store.open_blob(&hash)?, &file).map_err(|e| match e {
                CopyError::Read(e) => Error::io(ErrorCode::RollbackFailed, "read backup", &store.blob_path(&hash), &e),
                CopyError::Write(e) => Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e),
            })
        }
        Source::Nothing => Err(Error::internal(format!("{} has new content but no source", t.path))),
    };
    let (hash, size) = copied?;
    if size != nf.size {
        return Err(Error::new(ErrorCode::InvalidPackage, format!("{}: {size} bytes staged, {} declared", t.path, nf.size)));
    }
    if let Some(expected) = nf.hash
        && expected != hash
    {
        return Err(Error::new(ErrorCode::HashMismatch, format!("content for {} hashes to {hash}, expected {expected}", t.path)));
    }
    fsutil::apply_meta(&file, &tmp, nf.mode, nf.uid, nf.gid)?;
    hit("stage.file");
    Ok(Some(hash))
}

/// Swaps one target: the staged file renamed over it, or the target removed.
pub(super) fn swap_one(t: &Target, tx: u64) -> Result<()> {
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    let staged = std::fs::symlink_metadata(&tmp).is_ok();
    let current = match (&t.new, staged) {
        (NewState::File(_), true) => None,
        _ => Some(fsutil::observe(target)?),
    };
    match swap_action(&t.new, staged, current.as_ref()) {
        SwapAction::Rename => std::fs::rename(&tmp, target).map_err(|e| Error::io(ErrorCode::DeploymentFailed, "rename", target, &e))?,
        SwapAction::Remove => {
            fsutil::remove_if_present(target)?;
        }
        SwapAction::Done => {}
        SwapAction::Lost => return Err(Error::new(ErrorCode::DeploymentFailed, format!("{}: staged content is missing", t.path))),
    }
    hit("swap.file");
    Ok(())
}

/// Puts one target back to its old state, judged by what it holds now.
pub(super) fn undo_one(t: &Target, tx: u64, store: &BackupStore) -> Result<()> {
    let target = Path::new(&t.path);
    let tmp = temp_path(target, tx);
    fsutil::remove_if_present(&tmp)?;
    let current = fsutil::observe(target)?;
    match restore_action(&t.old, &current) {
        RestoreAction::Nothing => {}
        RestoreAction::Remove => {
            fsutil::remove_if_present(target)?;
        }
        RestoreAction::Restore => {
            let PathState::File(meta) = t.old else { unreachable!("restore_action returns Restore only for old files") };
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent).map_err(|e| Error::io(ErrorCode::RollbackFailed, "create", parent, &e))?;
            }
            store.restore_to(&meta, &tmp)?;
            std::fs::rename(&tmp, target).map_err(|e| Error::io(ErrorCode::RollbackFailed, "rename", target, &e))?;
        }
    }
    hit("rollback.file");
    Ok(())
}
