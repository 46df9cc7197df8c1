//! What many paths hold now, on every core: absent, or a regular file with its hash and
//! attributes. The hash comes from a known-file record when the file's stat signature still
//! matches it exactly (`engine::known`), otherwise from reading the file; files larger than
//! one piece are split at blake3 subtree boundaries (`treehash`) so both cores share them.
//!
//! Reading verifies; the record only saves a read of a file the engine verified earlier
//! and nobody changed since. `Verified` and `tope-updater verify` never use records;
//! `Verified` checks the files this process staged by their identity (`Source::Staged`).

use crate::engine::known::{KnownFile, StagedIdentity, StatSignature, Timestamp};
use crate::engine::{FileMeta, Hash, PathState};
use crate::error::{Error, ErrorCode, Result};
use crate::treehash;
use std::collections::BTreeMap;
use std::fs::{File, Metadata, OpenOptions};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::Path;

/// One observed path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Observation {
    pub state: PathState,
    /// For a file that was read and whose signature is settled (`StatSignature::settled`):
    /// the record a later plan may trust. `None` for absent paths, files taken from a
    /// record, and files changed in the current clock tick.
    pub recordable: Option<KnownFile>,
    /// The hash came without a read: from a known-file record, or (verification) from the
    /// staged identity.
    pub unread: bool,
}

/// Where hashes may come from.
pub enum Source<'a> {
    /// Read every file (verification).
    ReadAll,
    /// Trust these records where the signature matches exactly (planning).
    Records(&'a BTreeMap<String, KnownFile>),
    /// Verification: a path that is still the staged inode (`StagedIdentity::still_is`) holds
    /// the content hashed while it was staged; any other path is read.
    Staged(&'a BTreeMap<String, StagedIdentity>),
}

/// A file opened for reading whose hash needs more than one piece.
struct Pending {
    file: File,
    meta: Metadata,
    clock_before: Timestamp,
}

enum First {
    Done(Observation),
    Split(Pending),
}

/// Observes every path of `paths` (absolute, as in a plan) on every worker.
pub fn observe_all(paths: &[&str], source: Source<'_>) -> Result<Vec<Observation>> {
    let first = crate::parallel::try_map(paths, |p| observe_first(p, &source))?;
    // Large files: every piece of every one of them is one work item.
    let lens: Vec<Option<u64>> = first
        .iter()
        .map(|f| if let First::Split(p) = f { Some(p.meta.size()) } else { None })
        .collect();
    let hashes = treehash::hash_split(&lens, |i, off, len| {
        let First::Split(p) = &first[i] else { unreachable!("only split files have a length") };
        treehash::hash_piece(&p.file, p.meta.size(), off, len).map_err(|e| read_error(paths[i], &e))
    })?;
    first
        .into_iter()
        .zip(hashes)
        .enumerate()
        .map(|(i, (f, hash))| match (f, hash) {
            (First::Done(o), _) => Ok(o),
            (First::Split(p), Some(hash)) => {
                finish_read(paths[i], &p.file, &p.meta, hash, p.clock_before)
            }
            (First::Split(_), None) => Err(Error::internal("a split file without its hash")),
        })
        .collect()
}

/// stat, then: absent; vouched for by a record; hashed now (one piece); or left for the
/// split.
fn observe_first(path: &str, source: &Source<'_>) -> Result<First> {
    let p = Path::new(path);
    // Read before the stat: a change after it gets a ctime at or after it (engine::known).
    let clock_before = coarse_now();
    let meta = match std::fs::symlink_metadata(p) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Ok(First::Done(Observation {
                state: PathState::Absent,
                recordable: None,
                unread: false,
            }));
        }
        Err(e) => return Err(Error::io(ErrorCode::DeploymentFailed, "stat", p, &e)),
    };
    if !meta.file_type().is_file() {
        return Err(Error::new(
            ErrorCode::PathNotAllowed,
            format!("{path} exists and is not a regular file"),
        ));
    }
    if let Source::Records(records) = source
        && let Some(k) = records.get(path)
        && k.vouches_for(&signature(&meta))
    {
        let state = PathState::File(file_meta(&meta, k.hash));
        return Ok(First::Done(Observation { state, recordable: None, unread: true }));
    }
    if let Source::Staged(staged) = source
        && let Some(id) = staged.get(path)
    {
        let sig = signature(&meta);
        if id.still_is(&sig, meta.mode() & 0o7777, meta.uid(), meta.gid()) {
            let recordable = sig.settled(clock_before).then_some(KnownFile { sig, hash: id.hash });
            return Ok(First::Done(Observation {
                state: PathState::File(file_meta(&meta, id.hash)),
                recordable,
                unread: true,
            }));
        }
    }
    // The descriptor read is the one described: O_NOFOLLOW, and its own fstat.
    let file = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_CLOEXEC)
        .open(p)
        .map_err(|e| read_error(path, &e))?;
    let meta = file.metadata().map_err(|e| read_error(path, &e))?;
    if !meta.file_type().is_file() {
        return Err(Error::new(
            ErrorCode::PathNotAllowed,
            format!("{path} exists and is not a regular file"),
        ));
    }
    if meta.size() > treehash::PIECE_BYTES {
        return Ok(First::Split(Pending { file, meta, clock_before }));
    }
    let (hash, len) = crate::fsutil::hash_file_at(&file).map_err(|e| read_error(path, &e))?;
    if len != meta.size() {
        return Err(changed(path));
    }
    finish_read(path, &file, &meta, hash, clock_before).map(First::Done)
}

/// A read file: its state, and its record when nothing changed it while it was read and its
/// last change is settled.
fn finish_read(
    path: &str,
    file: &File,
    before: &Metadata,
    hash: Hash,
    clock_before: Timestamp,
) -> Result<Observation> {
    let after = file.metadata().map_err(|e| read_error(path, &e))?;
    let sig = signature(&after);
    if sig != signature(before) {
        return Err(changed(path));
    }
    let recordable = sig.settled(clock_before).then_some(KnownFile { sig, hash });
    Ok(Observation { state: PathState::File(file_meta(&after, hash)), recordable, unread: false })
}

pub fn signature(m: &Metadata) -> StatSignature {
    StatSignature {
        dev: m.dev(),
        ino: m.ino(),
        size: m.size(),
        mtime: Timestamp { sec: m.mtime(), nsec: nanos(m.mtime_nsec()) },
        ctime: Timestamp { sec: m.ctime(), nsec: nanos(m.ctime_nsec()) },
    }
}

/// The kernel's nanoseconds field, always below `1_000_000_000` (a value out of range, which
/// no kernel gives, reads as 0).
fn nanos(n: i64) -> u32 {
    u32::try_from(n).unwrap_or(0)
}

fn file_meta(m: &Metadata, hash: Hash) -> FileMeta {
    FileMeta { hash, size: m.size(), mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() }
}

/// Waits (a tick or two of the coarse clock, 4–20 ms, usually already over) until the coarse
/// clock has moved past `mark`, a `precise_now` reading taken after the last change to a set
/// of files: from then on every one of those changes is settled, whether the kernel stamped
/// it with the coarse clock or (multigrain timestamps) with the precise time, so reading the
/// files records all of them.
pub fn wait_past(mark: Timestamp) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_millis(100);
    while coarse_now() <= mark && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_micros(500));
    }
}

/// The precise wall clock (`CLOCK_REALTIME`): no file change made before this reading has a
/// timestamp after it.
pub fn precise_now() -> Timestamp {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME) {
        Ok(t) => Timestamp { sec: t.tv_sec(), nsec: nanos(t.tv_nsec()) },
        Err(_) => coarse_now(),
    }
}

/// The clock file timestamps are taken from (`CLOCK_REALTIME_COARSE`: the kernel stamps
/// inodes with the current tick). Multigrain kernels may stamp finer, but from the current
/// time, so never at or after the next tick of this clock.
pub fn coarse_now() -> Timestamp {
    match nix::time::clock_gettime(nix::time::ClockId::CLOCK_REALTIME_COARSE) {
        Ok(t) => Timestamp { sec: t.tv_sec(), nsec: nanos(t.tv_nsec()) },
        // No coarse clock: nothing counts as settled, so nothing is recorded.
        Err(_) => Timestamp { sec: i64::MIN, nsec: 0 },
    }
}

fn read_error(path: &str, e: &std::io::Error) -> Error {
    Error::io(ErrorCode::DeploymentFailed, "read", Path::new(path), e)
}

fn changed(path: &str) -> Error {
    Error::new(ErrorCode::DeploymentFailed, format!("{path} changed while it was being read"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn write(path: &Path, bytes: &[u8]) {
        std::fs::File::create(path).unwrap().write_all(bytes).unwrap();
    }

    fn paths(v: &[std::path::PathBuf]) -> Vec<String> {
        v.iter().map(|p| p.to_str().unwrap().to_string()).collect()
    }

    /// A temporary directory holding one file `f` with `content`, and the file's path.
    fn one_file(content: &[u8]) -> (tempfile::TempDir, std::path::PathBuf, String) {
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("f");
        write(&f, content);
        let p = f.to_str().unwrap().to_string();
        (d, f, p)
    }

    #[test]
    fn small_large_and_absent_files_hash_as_a_plain_read_would() {
        let d = tempfile::tempdir().unwrap();
        let big: Vec<u8> =
            (0..(3 * treehash::PIECE_BYTES + 999)).map(|i| (i * 7 % 251) as u8).collect();
        let files = [
            d.path().join("small"),
            d.path().join("big"),
            d.path().join("absent"),
            d.path().join("empty"),
        ];
        write(&files[0], b"hello");
        write(&files[1], &big);
        write(&files[3], b"");
        let ps = paths(&files);
        let refs: Vec<&str> = ps.iter().map(std::string::String::as_str).collect();
        let got = observe_all(&refs, Source::ReadAll).unwrap();
        assert_eq!(got[0].state.hash(), Some(Hash::of(b"hello")));
        assert_eq!(got[1].state.hash(), Some(Hash::of(&big)));
        assert_eq!(got[2].state, PathState::Absent);
        assert_eq!(got[3].state.hash(), Some(Hash::of(b"")));
        assert!(got.iter().all(|o| !o.unread));
    }

    #[test]
    fn a_record_is_trusted_only_while_the_signature_matches() {
        let (_d, f, p) = one_file(b"old content");
        let meta = std::fs::symlink_metadata(&f).unwrap();
        // A record claiming other content: trusted (no read) while the stat matches.
        let lie = Hash::of(b"what the record says");
        let records = BTreeMap::from([(p.clone(), KnownFile { sig: signature(&meta), hash: lie })]);
        let got = observe_all(&[p.as_str()], Source::Records(&records)).unwrap();
        assert_eq!(got[0].state.hash(), Some(lie));
        assert!(got[0].unread);
        // Verification never uses records.
        assert_eq!(
            observe_all(&[p.as_str()], Source::ReadAll).unwrap()[0].state.hash(),
            Some(Hash::of(b"old content"))
        );
        // Rewritten with the same size: ctime moves, the record no longer vouches.
        std::thread::sleep(std::time::Duration::from_millis(20));
        write(&f, b"new content");
        let got = observe_all(&[p.as_str()], Source::Records(&records)).unwrap();
        assert_eq!(got[0].state.hash(), Some(Hash::of(b"new content")));
        assert!(!got[0].unread);
    }

    #[test]
    fn a_file_changed_in_the_current_tick_is_not_recordable_and_a_settled_one_is() {
        let (_d, f, p) = one_file(b"x");
        let meta = std::fs::symlink_metadata(&f).unwrap();
        let sig = signature(&meta);
        // Whether the first observation is recordable depends on the tick; what is
        // recorded is always the signature of the file read.
        let first = observe_all(&[p.as_str()], Source::ReadAll).unwrap()[0];
        if let Some(k) = first.recordable {
            assert_eq!(k.sig, sig);
        }
        // Ticks are at most 10 ms (HZ >= 100): 50 ms later the change is settled.
        std::thread::sleep(std::time::Duration::from_millis(50));
        let later = observe_all(&[p.as_str()], Source::ReadAll).unwrap()[0];
        assert_eq!(later.recordable, Some(KnownFile { sig, hash: Hash::of(b"x") }));
        // A change in the current tick: the ctime is not before the clock reading.
        let now = coarse_now();
        assert!(!StatSignature { ctime: now, ..sig }.settled(now));
    }

    #[test]
    fn a_directory_or_symlink_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let link = d.path().join("l");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        for p in [d.path().to_str().unwrap(), link.to_str().unwrap()] {
            assert_eq!(
                observe_all(&[p], Source::ReadAll).unwrap_err().code,
                ErrorCode::PathNotAllowed,
                "{p}"
            );
        }
    }
}
