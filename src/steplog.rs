//! The post-command step log: `<state_dir>/inflight.steps`, one line per completed post
//! command of the transaction in flight (SPEC §3: "each completed `post_cmds` entry is
//! journaled"). It lives beside the journal rather than in it so that journal commits per
//! install stay at most 12 whatever the number of modules (SPEC §7).
//!
//! ```text
//! line = "<tx id> <command index>\n"      ; appended, then fdatasync
//! ```
//! A power cut can leave a torn last line; only complete lines for the transaction in flight
//! count. Losing the last line only re-runs one command (at least once, never skipped).

use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use std::io::Write;
use std::path::{Path, PathBuf};

pub const FILE_NAME: &str = "inflight.steps";

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// How many post commands of transaction `tx` completed, as the log records it.
pub fn completed(state_dir: &Path, tx: u64) -> Result<u32> {
    let path = path_in(state_dir);
    let text = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(Error::io(ErrorCode::InternalError, "read", &path, &e)),
    };
    let done = text
        .split_inclusive(|b| *b == b'\n')
        .filter(|l| l.ends_with(b"\n"))
        .filter_map(|l| std::str::from_utf8(l).ok())
        .filter_map(|l| l.trim_end().split_once(' '))
        .filter(|(t, _)| t.parse::<u64>().ok() == Some(tx))
        .filter_map(|(_, i)| i.parse::<u32>().ok())
        .map(|i| i + 1)
        .max()
        .unwrap_or(0);
    Ok(done)
}

/// Records that command `index` of `tx` completed. fdatasync: the line (and the file size)
/// survives a power cut once this returns; the directory fsync on creation makes the file
/// itself survive it.
pub fn record(state_dir: &Path, tx: u64, index: u32) -> Result<()> {
    let path = path_in(state_dir);
    let created = !path.exists();
    let io = |e: std::io::Error| Error::io(ErrorCode::InternalError, "write", &path, &e);
    let mut f = std::fs::OpenOptions::new().create(true).append(true).open(&path).map_err(io)?;
    f.write_all(format!("{tx} {index}\n").as_bytes()).map_err(io)?;
    f.sync_data().map_err(io)?;
    if created {
        fsutil::fsync_dir(state_dir)?;
    }
    Ok(())
}

/// Removes the log once its transaction has ended (or when it names none in flight).
/// Without a directory fsync: a log that reappears after a power cut names a transaction
/// that is no longer in flight and is ignored, then removed again.
pub fn remove(state_dir: &Path) -> Result<()> {
    fsutil::remove_if_present(&path_in(state_dir)).map(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_complete_lines_of_its_own_transaction_only() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(completed(dir.path(), 7).unwrap(), 0);
        record(dir.path(), 7, 0).unwrap();
        record(dir.path(), 7, 1).unwrap();
        assert_eq!(completed(dir.path(), 7).unwrap(), 2);
        assert_eq!(
            completed(dir.path(), 8).unwrap(),
            0,
            "another transaction's lines do not count"
        );
        // A torn append (power cut mid-write) does not count.
        let mut f = std::fs::OpenOptions::new().append(true).open(path_in(dir.path())).unwrap();
        f.write_all(b"7 2").unwrap();
        assert_eq!(completed(dir.path(), 7).unwrap(), 2);
        remove(dir.path()).unwrap();
        assert_eq!(completed(dir.path(), 7).unwrap(), 0);
    }
}
