//! Journal records and their encoding: bincode 2 (`standard()`: little-endian, varint
//! integers) with an explicit size limit, each value wrapped in a version envelope. See
//! journal-format.md for the byte layout.

use crate::engine::{Phase, TxKind};
use crate::error::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// Envelope around every stored value. Variants are only ever appended: the variant index is
/// the record's format version, encoded as a varint before the record.
#[derive(Debug, Serialize, Deserialize)]
pub enum Versioned<T> {
    V1(T),
}

/// One transaction (install, rollback, or a rollback imported after journal loss).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TxRecord {
    pub id: u64,
    pub kind: TxKind,
    pub from_version: Option<String>,
    pub to_version: Option<String>,
    pub phase: Phase,
    /// Every phase entered, in order (bounded by the state machine: at most 12).
    pub phases: Vec<Phase>,
    /// Recovery runs that found this transaction in flight.
    pub attempts: u32,
    /// Why it is rolling back / rolled back / failed.
    pub error: Option<Error>,
    pub targets: u32,
    pub new_bytes: u64,
    /// Journal commits made for this transaction (SPEC §7: at most 12).
    pub commits: u32,
    /// Wall-clock milliseconds since the epoch, for people reading `history`; never used
    /// for decisions.
    pub started_unix_ms: u64,
    pub updated_unix_ms: u64,
}

/// Limit for ordinary records.
const SMALL: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ crate::limits::RECORD_BYTES_MAX }>,
> = bincode::config::standard().with_limit::<{ crate::limits::RECORD_BYTES_MAX }>();
/// Limit for plans and generations (thousands of paths).
const LARGE: bincode::config::Configuration<
    bincode::config::LittleEndian,
    bincode::config::Varint,
    bincode::config::Limit<{ crate::limits::PLAN_BYTES_MAX }>,
> = bincode::config::standard().with_limit::<{ crate::limits::PLAN_BYTES_MAX }>();

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Size {
    Small,
    Large,
}

pub fn encode<T: Serialize>(value: &T, size: Size) -> Result<Vec<u8>> {
    let env = Versioned::V1(value);
    let r = match size {
        Size::Small => bincode::serde::encode_to_vec(&env, SMALL),
        Size::Large => bincode::serde::encode_to_vec(&env, LARGE),
    };
    r.map_err(|e| Error::internal(format!("encode journal record: {e}")))
}

/// Decodes a record; trailing bytes, an unknown version or an oversized length are
/// `JOURNAL_CORRUPT`.
pub fn decode<T: DeserializeOwned>(bytes: &[u8], size: Size, what: &str) -> Result<T> {
    let r: std::result::Result<(Versioned<T>, usize), _> = match size {
        Size::Small => bincode::serde::decode_from_slice(bytes, SMALL),
        Size::Large => bincode::serde::decode_from_slice(bytes, LARGE),
    };
    let corrupt = |why: String| Error::new(ErrorCode::JournalCorrupt, format!("{what} record: {why}"));
    let (Versioned::V1(value), used) = r.map_err(|e| corrupt(e.to_string()))?;
    if used != bytes.len() {
        return Err(corrupt(format!("{} trailing bytes", bytes.len() - used)));
    }
    Ok(value)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FileMeta, Hash, PathState};

    #[test]
    fn round_trip_and_golden_bytes_of_a_path_state() {
        let s = PathState::File(FileMeta { hash: Hash([0xab; 32]), size: 300, mode: 0o644, uid: 0, gid: 1000 });
        let bytes = encode(&s, Size::Small).unwrap();
        // envelope V1 = 0, PathState::File = 1, 32 hash bytes, size 300 = 251 0x2c 0x01,
        // mode 420 = 251 0xa4 0x01, uid 0, gid 1000 = 251 0xe8 0x03.
        let mut golden = vec![0u8, 1];
        golden.extend([0xab; 32]);
        golden.extend([251, 0x2c, 0x01, 251, 0xa4, 0x01, 0, 251, 0xe8, 0x03]);
        assert_eq!(bytes, golden);
        assert_eq!(decode::<PathState>(&bytes, Size::Small, "t").unwrap(), s);
    }

    #[test]
    fn trailing_bytes_unknown_versions_and_huge_lengths_are_corrupt() {
        let mut bytes = encode(&PathState::Absent, Size::Small).unwrap();
        bytes.push(0);
        assert_eq!(decode::<PathState>(&bytes, Size::Small, "t").unwrap_err().code, ErrorCode::JournalCorrupt);
        assert_eq!(decode::<PathState>(&[7, 0], Size::Small, "t").unwrap_err().code, ErrorCode::JournalCorrupt);
        // A String whose length prefix claims 2^40 bytes must fail, not allocate.
        let bomb = [0u8, 253, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(decode::<String>(&bomb, Size::Small, "t").unwrap_err().code, ErrorCode::JournalCorrupt);
    }
}
