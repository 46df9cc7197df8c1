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
    fn a_signature_changed_in_the_current_tick_is_not_settled() {
        // ctime equal to the clock reading: the same tick, a later change could keep it.
        assert!(!sig().settled(ts(100, 7)));
        assert!(!sig().settled(ts(100, 6)));
        assert!(!sig().settled(ts(99, 999_999_999)));
        assert!(sig().settled(ts(100, 8)));
        assert!(sig().settled(ts(101, 0)));
    }
}
