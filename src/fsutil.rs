//! File-system primitives with their durability reasoning. Every fsync-class call in the
//! crate lives here, so the count per transaction can be read off this file and the driver.

use crate::engine::{FileMeta, Hash, PathState};
use crate::error::{Error, ErrorCode, Result};
use crate::limits::IO_BUFFER_BYTES;
use nix::sys::stat::Mode;
use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Prefix of every temporary file the engine creates beside a target.
pub const TEMP_PREFIX: &str = ".tope-";

/// The staged file for `target` in transaction `tx_id`: same directory (so the rename is
/// atomic), a deterministic name (so recovery finds it), short whatever the target's name.
pub fn temp_path(target: &Path, tx_id: u64) -> PathBuf {
    let digest = Hash::of(target.as_os_str().as_encoded_bytes()).to_hex();
    let name = format!("{TEMP_PREFIX}{tx_id}-{}.new", &digest[..16]);
    target.parent().unwrap_or(Path::new("/")).join(name)
}

/// blake3 and length of a file, streamed (never mmap: a file shrinking under us must be an
/// error, not SIGBUS).
pub fn hash_file(path: &Path) -> std::io::Result<(Hash, u64)> {
    hash_reader(File::open(path)?)
}

thread_local! {
    /// One I/O buffer per thread, reused for every file: thousands of small files must not
    /// each allocate and clear a fresh buffer.
    static IO_BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Runs `f` with this thread's I/O buffer (`IO_BUFFER_BYTES` long).
pub fn with_io_buffer<R>(f: impl FnOnce(&mut [u8]) -> R) -> R {
    IO_BUFFER.with(|b| match b.try_borrow_mut() {
        Ok(mut buf) => {
            if buf.len() < IO_BUFFER_BYTES {
                buf.resize(IO_BUFFER_BYTES, 0);
            }
            f(&mut buf[..IO_BUFFER_BYTES])
        }
        // Nested use on one thread (never in the engine): a buffer of its own.
        Err(_) => f(&mut vec![0u8; IO_BUFFER_BYTES]),
    })
}

/// blake3 and length of an open file, read with pread (the descriptor's offset is left alone,
/// so other threads can read the same descriptor).
pub fn hash_file_at(file: &File) -> std::io::Result<(Hash, u64)> {
    use std::os::unix::fs::FileExt;
    with_io_buffer(|buf| {
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        loop {
            let n = file.read_at(buf, total)?;
            if n == 0 {
                return Ok((hasher.finalize().into(), total));
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
    })
}

pub fn hash_reader(mut r: impl Read) -> std::io::Result<(Hash, u64)> {
    with_io_buffer(|buf| {
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        loop {
            let n = r.read(buf)?;
            if n == 0 {
                return Ok((hasher.finalize().into(), total));
            }
            hasher.update(&buf[..n]);
            total += n as u64;
        }
    })
}

/// Which side of a copy failed: a bad source (package, blob) or the destination (disk).
#[derive(Debug)]
pub enum CopyError {
    Read(std::io::Error),
    Write(std::io::Error),
}

/// Streams `r` into `w`, hashing on the way. Returns the hash and the byte count.
pub fn copy_hashed(mut r: impl Read, mut w: impl Write) -> Result<(Hash, u64), CopyError> {
    with_io_buffer(|buf| {
        let mut hasher = blake3::Hasher::new();
        let mut total = 0u64;
        loop {
            let n = r.read(buf).map_err(CopyError::Read)?;
            if n == 0 {
                return Ok((hasher.finalize().into(), total));
            }
            hasher.update(&buf[..n]);
            w.write_all(&buf[..n]).map_err(CopyError::Write)?;
            total += n as u64;
        }
    })
}

/// What is at `path` now: absent, or a regular file with its hash and attributes. Anything
/// else (directory, symlink, device) is refused: the engine only manages regular files.
pub fn observe(path: &Path) -> Result<PathState> {
    let meta = match std::fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(PathState::Absent),
        Err(e) => return Err(Error::io(ErrorCode::DeploymentFailed, "stat", path, &e)),
    };
    if !meta.file_type().is_file() {
        return Err(Error::new(
            ErrorCode::PathNotAllowed,
            format!("{} exists and is not a regular file", path.display()),
        ));
    }
    let (hash, size) =
        hash_file(path).map_err(|e| Error::io(ErrorCode::DeploymentFailed, "read", path, &e))?;
    Ok(PathState::File(FileMeta {
        hash,
        size,
        mode: meta.mode() & 0o7777,
        uid: meta.uid(),
        gid: meta.gid(),
    }))
}

/// Creates a new file for writing, refusing to follow or reuse anything already there.
pub fn create_exclusive(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(path)
}

/// `create_exclusive` for one of the engine's own temporary names: a leftover from an
/// interrupted attempt is removed and the creation retried (no unlink in the common case).
pub fn create_replacing(path: &Path) -> Result<File> {
    match create_exclusive(path) {
        Ok(f) => Ok(f),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
            remove_if_present(path)?;
            create_exclusive(path)
                .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "create", path, &e))
        }
        Err(e) => Err(Error::io(ErrorCode::DeploymentFailed, "create", path, &e)),
    }
}

/// Applies owner then mode (chown clears set-id bits, so mode goes last). chown only when the
/// owner differs, so unprivileged runs work for files they own.
pub fn apply_meta(file: &File, path: &Path, mode: u32, uid: u32, gid: u32) -> Result<()> {
    let meta =
        file.metadata().map_err(|e| Error::io(ErrorCode::DeploymentFailed, "fstat", path, &e))?;
    if meta.uid() != uid || meta.gid() != gid {
        nix::unistd::fchown(
            file,
            Some(nix::unistd::Uid::from_raw(uid)),
            Some(nix::unistd::Gid::from_raw(gid)),
        )
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "fchown", path, &e.into()))?;
    }
    file.set_permissions(std::fs::Permissions::from_mode(mode))
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "fchmod", path, &e))
}

/// Removes a file; absent is fine (every effect must be idempotent).
pub fn remove_if_present(path: &Path) -> Result<bool> {
    match std::fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(Error::io(ErrorCode::DeploymentFailed, "unlink", path, &e)),
    }
}

/// Removes a directory if it is empty; absent, non-empty, or no longer a directory is fine
/// (whatever is there now is not ours to remove).
pub fn remove_dir_if_empty(path: &Path) -> Result<()> {
    match std::fs::remove_dir(path) {
        Ok(()) => Ok(()),
        Err(e)
            if matches!(
                e.raw_os_error(),
                Some(
                    nix::libc::ENOENT
                        | nix::libc::ENOTEMPTY
                        | nix::libc::EEXIST
                        | nix::libc::ENOTDIR
                )
            ) =>
        {
            Ok(())
        }
        Err(e) => Err(Error::io(ErrorCode::DeploymentFailed, "rmdir", path, &e)),
    }
}

/// Creates one directory (its parent must exist); an existing directory is fine.
pub fn make_dir(path: &Path) -> Result<()> {
    match nix::unistd::mkdir(path, Mode::from_bits_truncate(0o755)) {
        Ok(()) => Ok(()),
        Err(nix::errno::Errno::EEXIST) if path.is_dir() => Ok(()),
        Err(e) => Err(Error::io(ErrorCode::DeploymentFailed, "mkdir", path, &e.into())),
    }
}

/// Negative controls for the power-cut harness, and nothing else: in a build with the feature
/// `powercut-negative-control`, `TOPE_NEGATIVE_CONTROL` names the one durability point whose
/// sync is left out (unset: `staging`), so the harness can show that it catches each missing
/// sync. Points: `staging` (the syncfs of staged files before `Staged` is journaled),
/// `backups` (the store's syncfs before `BackedUp`), `swap` (the syncfs of the renames before
/// `Swapped`), `journal` (journal commits without fdatasync), `dirfsync` (every directory fsync
/// after a rename or unlink), `none`. Without the feature this is always false and compiles
/// away.
pub fn negative_control(point: &str) -> bool {
    #[cfg(feature = "powercut-negative-control")]
    {
        static SKIPPED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
        let skipped = SKIPPED.get_or_init(|| {
            let p = std::env::var("TOPE_NEGATIVE_CONTROL").unwrap_or_else(|_| "staging".into());
            eprintln!("tope-updater: NEGATIVE CONTROL BUILD: the {p} sync is left out");
            p
        });
        skipped == point
    }
    #[cfg(not(feature = "powercut-negative-control"))]
    {
        let _ = point;
        false
    }
}

/// fsync of a directory: makes the entries created, renamed or removed in it durable. Without
/// it a power cut can undo a rename whose data was already durable.
pub fn fsync_dir(dir: &Path) -> Result<()> {
    if negative_control("dirfsync") {
        return Ok(());
    }
    let f =
        File::open(dir).map_err(|e| Error::io(ErrorCode::DeploymentFailed, "open dir", dir, &e))?;
    nix::unistd::fsync(&f)
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "fsync dir", dir, &e.into()))
}

/// The nearest existing ancestor (or the path itself), to stat or statvfs a path that may not
/// exist yet.
pub fn existing_ancestor(path: &Path) -> &Path {
    let mut p = path;
    while !p.exists() {
        match p.parent() {
            Some(parent) => p = parent,
            None => break,
        }
    }
    p
}

/// One syncfs(2) per distinct filesystem among `paths` (`st_dev` of the nearest existing
/// ancestor). syncfs writes back every dirty page and inode of that filesystem and commits
/// its journal, so one call makes a whole batch of new files, renames and directory entries
/// durable: the cost is per filesystem, not per file. Returns the number of syncfs calls.
///
/// Caveat (documented in journal-format.md): before Linux 5.8 syncfs did not report
/// writeback errors; the verification phase re-reads content for that reason.
pub fn sync_filesystems<'a>(paths: impl IntoIterator<Item = &'a Path>) -> Result<usize> {
    // Thousands of targets share a few parent directories: stat each directory once.
    let parents: std::collections::BTreeSet<&Path> =
        paths.into_iter().map(|p| p.parent().unwrap_or(p)).collect();
    let mut by_dev: BTreeMap<u64, &Path> = BTreeMap::new();
    for p in parents {
        let anchor = existing_ancestor(p);
        let dev = std::fs::metadata(anchor)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "stat", anchor, &e))?
            .dev();
        by_dev.entry(dev).or_insert(anchor);
    }
    for anchor in by_dev.values() {
        let f = File::open(anchor)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "open", anchor, &e))?;
        nix::unistd::syncfs(&f)
            .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "syncfs", anchor, &e.into()))?;
    }
    Ok(by_dev.len())
}

/// Writes `bytes` to `path` atomically and durably: temp file, fsync (its data survives a
/// power cut), rename (readers see old or new, never a torn file), fsync of the directory
/// (the rename itself survives a power cut).
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::internal(format!("{} has no parent", path.display())))?;
    let tmp = dir.join(format!(
        "{TEMP_PREFIX}{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("file")
    ));
    remove_if_present(&tmp)?;
    let mut f = create_exclusive(&tmp)
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "create", &tmp, &e))?;
    f.write_all(bytes).map_err(|e| Error::io(ErrorCode::DeploymentFailed, "write", &tmp, &e))?;
    nix::unistd::fsync(&f)
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "fsync", &tmp, &e.into()))?;
    drop(f);
    std::fs::rename(&tmp, path)
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "rename", path, &e))?;
    fsync_dir(dir)
}

/// Bytes available to unprivileged writers on the filesystem holding `path`, and its block
/// size.
pub fn available_bytes_and_block(path: &Path) -> Result<(u64, u64)> {
    let anchor = existing_ancestor(path);
    let st = nix::sys::statvfs::statvfs(anchor)
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "statvfs", anchor, &e.into()))?;
    let block = st.fragment_size() as u64;
    Ok(((st.blocks_available() as u64).saturating_mul(block), block))
}

/// `st_dev` of the filesystem holding `path` (or its nearest existing ancestor).
pub fn device_of(path: &Path) -> Result<u64> {
    let anchor = existing_ancestor(path);
    Ok(std::fs::metadata(anchor)
        .map_err(|e| Error::io(ErrorCode::DeploymentFailed, "stat", anchor, &e))?
        .dev())
}

/// fdatasync of a file whose first bytes a journal record is about to vouch for (a download's
/// `offset`, journal-format.md §5.7): its data and size reach stable storage before the
/// commit. Protects against a power cut after the offset is journaled leaving a hole or stale
/// blocks below it, which a resume (`Range` from the offset) would never re-fetch.
pub fn sync_data(file: &File, path: &Path, code: ErrorCode) -> Result<()> {
    file.sync_data().map_err(|e| Error::io(code, "fdatasync", path, &e))
}
