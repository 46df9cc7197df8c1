//! The pure transaction engine: plans, phases, generations and recovery decisions.
//!
//! **Architecture invariant:** nothing in `engine` does I/O, reads a clock, or knows redb.
//! The driver (`crate::driver`) observes the world, asks the engine what to do, journals the
//! decision, and only then performs it.

pub mod generation;
pub mod known;
pub mod phase;
pub mod plan;
pub mod recovery;
pub mod services;
pub mod trial;

pub use generation::{Factory, Generation};
pub use phase::{Event, Phase};
pub use plan::{
    FileMeta, NewFile, NewState, PathState, Plan, RollbackTarget, Source, Target, TxKind,
};
pub use recovery::{Decision, Inputs, ResumeNeeds};

/// A blake3 digest. Serialised as 32 raw bytes in binary formats (the journal) and as 64 hex
/// digits in human-readable ones (`--json`, `journal`).
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Hash(pub [u8; 32]);

impl Hash {
    pub fn of(bytes: &[u8]) -> Hash {
        Hash(*blake3::hash(bytes).as_bytes())
    }

    pub fn to_hex(&self) -> String {
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut out = String::with_capacity(64);
        for b in self.0 {
            out.push(DIGITS[(b >> 4) as usize] as char);
            out.push(DIGITS[(b & 0xf) as usize] as char);
        }
        out
    }

    /// Parses exactly 64 hex digits.
    pub fn from_hex(s: &str) -> Option<Hash> {
        if s.len() != 64 || !s.is_ascii() {
            return None;
        }
        let mut out = [0u8; 32];
        for (i, chunk) in s.as_bytes().chunks(2).enumerate() {
            out[i] = u8::from_str_radix(std::str::from_utf8(chunk).ok()?, 16).ok()?;
        }
        Some(Hash(out))
    }
}

impl From<blake3::Hash> for Hash {
    fn from(h: blake3::Hash) -> Hash {
        Hash(*h.as_bytes())
    }
}

impl std::fmt::Display for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.to_hex())
    }
}

impl std::fmt::Debug for Hash {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", &self.to_hex()[..16])
    }
}

impl serde::Serialize for Hash {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() { s.serialize_str(&self.to_hex()) } else { self.0.serialize(s) }
    }
}

impl<'de> serde::Deserialize<'de> for Hash {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Hash, D::Error> {
        if d.is_human_readable() {
            let s = String::deserialize(d)?;
            Hash::from_hex(&s).ok_or_else(|| serde::de::Error::custom("expected 64 hex digits"))
        } else {
            <[u8; 32]>::deserialize(d).map(Hash)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::Hash;

    #[test]
    fn hash_hex_round_trips_and_rejects_junk() {
        let h = Hash::of(b"x");
        assert_eq!(Hash::from_hex(&h.to_hex()), Some(h));
        assert_eq!(Hash::from_hex("zz"), None);
        assert_eq!(Hash::from_hex(&"g".repeat(64)), None);
    }
}
