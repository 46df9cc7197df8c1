//! Known files: the content hash of a file the engine verified, kept with the stat signature
//! the file had then, so that a later plan can take the hash without reading the file again
//! (git's index and OSTree's devino cache rest on the same rule).
//!
//! The signature holds every stat field a content change moves: the inode (a replaced file
//! is another inode), the size, the mtime, and the ctime, which no user call can set back.
//! What remains is the timestamp granularity: a change in the same clock tick as the last
//! one can leave both times unchanged. So a signature is only recorded when its ctime is
//! older than a coarse clock reading taken *before* the stat ("settled"): any change after
//! that reading gets a ctime at or after it, so it cannot match what was recorded.
//!
//! Pure decisions only; the driver stats, reads clocks and journals.

use super::Hash;
use serde::{Deserialize, Serialize};

/// A timestamp as stat reports it: seconds and nanoseconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Timestamp {
    pub sec: i64,
    pub nsec: u32,
}

/// The stat fields that change whenever the content at a path can have changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatSignature {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub ctime: Timestamp,
}

/// A verified file: its signature when it was read, and the hash of what was read.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct KnownFile {
    pub sig: StatSignature,
    pub hash: Hash,
}

/// What a staged file was after staging's flush: its content hash (taken while it was written)
/// and the stat fields that identify that inode and change with any write, `chmod` or `chown`.
/// After the swap, a target whose stat still shows exactly these holds that content: reading
/// it back from the page cache would prove nothing more (SPEC §3, `Verified`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StagedIdentity {
    pub dev: u64,
    pub ino: u64,
    pub size: u64,
    pub mtime: Timestamp,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub hash: Hash,
}

impl StagedIdentity {
    /// Whether an identity may be taken from a staged file whose last write is stamped
    /// `mtime`, given `clock_before`, a coarse clock reading taken before its stat: only when
    /// that write is older than the reading. A write in the same tick as `mtime` (a later
    /// one included) could keep the same stamp and size; then the file is read at `Verified`.
    pub fn settled(mtime: Timestamp, clock_before: Timestamp) -> bool {
        mtime < clock_before
    }

    /// Whether a target whose stat gives `now` (and `mode`, `uid`, `gid`) is still that inode,
    /// unwritten: the rename of the swap changes only its ctime.
    pub fn still_is(&self, now: &StatSignature, mode: u32, uid: u32, gid: u32) -> bool {
        (self.dev, self.ino, self.size, self.mtime, self.mode, self.uid, self.gid)
            == (now.dev, now.ino, now.size, now.mtime, mode, uid, gid)
    }
}

impl StatSignature {
    /// Whether this signature may be recorded: its last change is older than `clock_before`,
    /// a coarse clock reading taken before the stat that produced it. Otherwise a change
    /// in the same tick could go unseen, and the file is simply hashed again next time.
    pub fn settled(&self, clock_before: Timestamp) -> bool {
        self.ctime < clock_before
    }
}

impl KnownFile {
    /// Whether this record vouches for the content of a file whose stat is `now`: only an
    /// exact match of every field.
    pub fn vouches_for(&self, now: &StatSignature) -> bool {
        self.sig == *now
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ts(sec: i64, nsec: u32) -> Timestamp {
        Timestamp { sec, nsec }
    }

    fn sig() -> StatSignature {
        StatSignature { dev: 8, ino: 42, size: 4096, mtime: ts(100, 5), ctime: ts(100, 7) }
    }

    #[test]
    fn only_an_exact_signature_vouches() {
        let k = KnownFile { sig: sig(), hash: Hash::of(b"v1") };
        assert!(k.vouches_for(&sig()));
        let changed: [StatSignature; 5] = [
            StatSignature { dev: 9, ..sig() },
            StatSignature { ino: 43, ..sig() },
            StatSignature { size: 4097, ..sig() },
            StatSignature { mtime: ts(100, 6), ..sig() },
            StatSignature { ctime: ts(101, 7), ..sig() },
        ];
        for c in changed {
            assert!(!k.vouches_for(&c), "{c:?} must not be vouched for");
        }
    }

    #[test]
    fn an_identity_is_taken_only_from_a_file_last_written_before_the_current_tick() {
        assert!(StagedIdentity::settled(ts(100, 5), ts(100, 6)));
        assert!(StagedIdentity::settled(ts(99, 999_999_999), ts(100, 0)));
        // Written in the tick of the reading (or stamped after it): a same-size write now
        // could keep that mtime, so no identity.
        assert!(!StagedIdentity::settled(ts(100, 6), ts(100, 6)));
        assert!(!StagedIdentity::settled(ts(100, 7), ts(100, 6)));
    }

    #[test]
    fn a_staged_identity_holds_only_for_the_same_unwritten_inode() {
        let id = StagedIdentity {
            dev: 8,
            ino: 42,
            size: 4096,
            mtime: ts(100, 5),
            mode: 0o644,
            uid: 0,
            gid: 0,
            hash: Hash::of(b"n"),
        };
        // The swap's rename moves the ctime only.
        assert!(id.still_is(&StatSignature { ctime: ts(200, 0), ..sig() }, 0o644, 0, 0));
        for other in [
            StatSignature { ino: 43, ..sig() },
            StatSignature { size: 1, ..sig() },
            StatSignature { mtime: ts(100, 6), ..sig() },
        ] {
            assert!(!id.still_is(&other, 0o644, 0, 0), "{other:?}");
        }
        assert!(!id.still_is(&sig(), 0o600, 0, 0));
        assert!(!id.still_is(&sig(), 0o644, 1, 0));
    }

    #[test]
    fn a_signature_changed_in_the_current_tick_is_not_settled() {
        // ctime equal to the clock reading: the same tick, a later change could keep it.
        assert!(!sig().settled(ts(100, 7)));
        assert!(!sig().settled(ts(100, 6)));
        assert!(!sig().settled(ts(99, 999_999_999)));
        assert!(sig().settled(ts(100, 8)));
        assert!(sig().settled(ts(101, 0)));
    }
}
