//! The redundant copy of the in-flight plan (SPEC §3: the journal is not a single point of
//! failure). A small self-checksummed file, `<state_dir>/inflight.plan`:
//!
//! ```text
//! magic "TOPEPLN1" (8) | payload length u64 LE (8) | blake3(payload) (32) | payload
//! ```
//! where the payload is the plan encoded exactly as in the journal's `plans` table.
//! Written (temp, fsync, rename, fsync dir) before the `Planned` commit; removed (unlink,
//! fsync dir) after the final commit, before success is reported.

use crate::engine::{Hash, Plan};
use crate::error::{Error, ErrorCode, Result};
use crate::fsutil;
use crate::journal::records::{Size, decode, encode};
use crate::limits::PLAN_BYTES_MAX;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TOPEPLN1";
const HEADER_BYTES: usize = 8 + 8 + 32;
pub const FILE_NAME: &str = "inflight.plan";

pub fn path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(FILE_NAME)
}

/// The temporary file `write` renames into place (`fsutil::write_atomic`'s naming).
pub fn temp_path_in(state_dir: &Path) -> PathBuf {
    state_dir.join(format!("{}{FILE_NAME}.tmp", fsutil::TEMP_PREFIX))
}

pub fn write(state_dir: &Path, plan: &Plan) -> Result<()> {
    let payload = encode(plan, Size::Large)?;
    let mut bytes = Vec::with_capacity(HEADER_BYTES + payload.len());
    bytes.extend_from_slice(MAGIC);
    bytes.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    bytes.extend_from_slice(&Hash::of(&payload).0);
    bytes.extend_from_slice(&payload);
    fsutil::write_atomic(&path_in(state_dir), &bytes)
}

/// `Ok(None)` when there is no copy; `JOURNAL_CORRUPT` when it does not verify.
pub fn read(state_dir: &Path) -> Result<Option<Plan>> {
    let path = path_in(state_dir);
    let bytes = match std::fs::read(&path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(Error::io(ErrorCode::JournalCorrupt, "read", &path, &e)),
    };
    parse(&bytes).map(Some).map_err(|why| {
        Error::new(ErrorCode::JournalCorrupt, format!("plan copy {}: {why}", path.display()))
    })
}

fn parse(bytes: &[u8]) -> std::result::Result<Plan, String> {
    if bytes.len() < HEADER_BYTES || &bytes[..8] != MAGIC {
        return Err("bad magic or short header".into());
    }
    let len = u64::from_le_bytes(bytes[8..16].try_into().map_err(|_| "header")?);
    if len > PLAN_BYTES_MAX as u64 || len != (bytes.len() - HEADER_BYTES) as u64 {
        return Err(format!("payload length {len} does not match the file"));
    }
    let payload = &bytes[HEADER_BYTES..];
    if Hash::of(payload).0[..] != bytes[16..48] {
        return Err("checksum mismatch".into());
    }
    decode(payload, Size::Large, "plan copy").map_err(|e| e.message)
}

/// Removes the copy durably: a copy that reappeared after a power cut could roll back a
/// committed transaction if the journal were later lost.
pub fn remove(state_dir: &Path) -> Result<()> {
    if fsutil::remove_if_present(&path_in(state_dir))? {
        fsutil::fsync_dir(state_dir)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::plan::{PackageRef, TxKind};

    fn plan() -> Plan {
        Plan {
            tx_id: 3,
            kind: TxKind::Install {
                package: PackageRef { path: "/p.zip".into(), blake3: Hash([1; 32]), size: 9 },
            },
            from_version: None,
            to_version: Some("1.0.0".into()),
            modules: vec![],
            targets: vec![],
            created_dirs: vec![],
            removed_dirs: vec![],
            controls_services: false,
            runs_post_cmds: false,
        }
    }

    #[test]
    fn round_trips_and_detects_any_flipped_byte() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), &plan()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), Some(plan()));
        let good = std::fs::read(path_in(dir.path())).unwrap();
        for i in 0..good.len() {
            let mut bad = good.clone();
            bad[i] ^= 0x40;
            assert!(parse(&bad).is_err(), "flip at byte {i} went unnoticed");
        }
        assert!(parse(&good[..good.len() - 1]).is_err());
        remove(dir.path()).unwrap();
        assert_eq!(read(dir.path()).unwrap(), None);
        // The temporary name `write` uses is the one reconciliation cleans up.
        assert!(!temp_path_in(dir.path()).exists());
        assert_eq!(temp_path_in(dir.path()).file_name().unwrap(), ".tope-inflight.plan.tmp");
    }
}
