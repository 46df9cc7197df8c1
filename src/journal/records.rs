//! Journal records and their encoding: bincode 2 (`standard()`: little-endian, varint
//! integers) with an explicit size limit, each value wrapped in a version envelope. See
//! journal-format.md for the byte layout.

use crate::engine::{Phase, TxKind};
use crate::error::{Error, ErrorCode, Result};
use serde::{Deserialize, Serialize, de::DeserializeOwned};

/// A value stored in the journal. Every stored value is preceded by its record version, a
/// varint (0 = "V1", 1 = "V2", ...). A record type that changes gets a new version; older
/// versions keep decoding through `decode_older` (journal-format.md §7).
pub trait Record: Serialize + DeserializeOwned {
    /// The version this build writes.
    const VERSION: u32 = 0;

    /// Decodes a body written as an older `version` of this record.
    fn decode_older(version: u32, _body: &[u8], _size: Size) -> std::result::Result<Self, String> {
        Err(format!("unknown record version {version}"))
    }
}

impl Record for crate::engine::PathState {}
impl Record for crate::engine::Plan {}
impl Record for crate::engine::trial::Trial {}
impl Record for crate::engine::known::KnownFile {}

/// `Generation` as record version 1 wrote it (no `services`).
#[derive(Deserialize)]
struct GenerationV1 {
    id: u64,
    version: String,
    tx_id: u64,
    parent: Option<u64>,
    files: std::collections::BTreeMap<String, crate::engine::FileMeta>,
    dirs: std::collections::BTreeSet<String>,
}

impl Record for crate::engine::Generation {
    const VERSION: u32 = 1;

    fn decode_older(version: u32, body: &[u8], size: Size) -> std::result::Result<Self, String> {
        match version {
            0 => {
                let v1: GenerationV1 = decode_body(body, size)?;
                Ok(crate::engine::Generation {
                    id: v1.id,
                    version: v1.version,
                    tx_id: v1.tx_id,
                    parent: v1.parent,
                    files: v1.files,
                    dirs: v1.dirs,
                    // Version 1 had no service control: no path has a service.
                    services: std::collections::BTreeMap::default(),
                })
            }
            other => Err(format!("unknown record version {other}")),
        }
    }
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
    /// Post commands of the plan that completed, in plan order (record version 2), as of
    /// this record's commit; the step log (`steplog`) has the count between commits.
    pub post_cmds_done: u32,
    /// Backup blobs that no kept generation, the factory baseline or an in-flight plan needed
    /// once this transaction ended, recorded in its final commit and removed right after it
    /// (record version 3; 0 for transactions of older builds and for unfinished ones).
    pub freed_blobs: u64,
    pub freed_bytes: u64,
}

/// `TxRecord` as record version 1 wrote it (no `post_cmds_done`, no `freed_*`). A version 2
/// body is these fields followed by `post_cmds_done`: bincode lays a struct out as its fields
/// in order, with no framing, so `(TxRecordV1, u32)` reads it.
#[derive(Deserialize)]
#[cfg_attr(test, derive(Serialize))]
struct TxRecordV1 {
    id: u64,
    kind: TxKind,
    from_version: Option<String>,
    to_version: Option<String>,
    phase: Phase,
    phases: Vec<Phase>,
    attempts: u32,
    error: Option<Error>,
    targets: u32,
    new_bytes: u64,
    commits: u32,
    started_unix_ms: u64,
    updated_unix_ms: u64,
}

impl TxRecordV1 {
    /// The record as this build holds it. Older builds collected nothing automatically.
    fn upgrade(self, post_cmds_done: u32) -> TxRecord {
        TxRecord {
            id: self.id,
            kind: self.kind,
            from_version: self.from_version,
            to_version: self.to_version,
            phase: self.phase,
            phases: self.phases,
            attempts: self.attempts,
            error: self.error,
            targets: self.targets,
            new_bytes: self.new_bytes,
            commits: self.commits,
            started_unix_ms: self.started_unix_ms,
            updated_unix_ms: self.updated_unix_ms,
            post_cmds_done,
            freed_blobs: 0,
            freed_bytes: 0,
        }
    }
}

impl Record for TxRecord {
    const VERSION: u32 = 2;

    fn decode_older(version: u32, body: &[u8], size: Size) -> std::result::Result<Self, String> {
        match version {
            1 => decode_body::<(TxRecordV1, u32)>(body, size)
                .map(|(v1, post_cmds_done)| v1.upgrade(post_cmds_done)),
            0 => decode_body::<TxRecordV1>(body, size).map(|v1| v1.upgrade(0)),
            other => Err(format!("unknown record version {other}")),
        }
    }
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

pub fn encode<T: Record>(value: &T, size: Size) -> Result<Vec<u8>> {
    let r = match size {
        Size::Small => encode_parts(T::VERSION, value, SMALL),
        Size::Large => encode_parts(T::VERSION, value, LARGE),
    };
    r.map_err(|e| Error::internal(format!("encode journal record: {e}")))
}

fn encode_parts<T: Serialize, C: bincode::config::Config>(
    version: u32,
    value: &T,
    config: C,
) -> std::result::Result<Vec<u8>, bincode::error::EncodeError> {
    let mut out = bincode::serde::encode_to_vec(version, config)?;
    out.extend(bincode::serde::encode_to_vec(value, config)?);
    Ok(out)
}

/// Decodes a body with the size limit; every byte must be consumed.
pub(super) fn decode_body<T: DeserializeOwned>(
    body: &[u8],
    size: Size,
) -> std::result::Result<T, String> {
    let r: std::result::Result<(T, usize), _> = match size {
        Size::Small => bincode::serde::decode_from_slice(body, SMALL),
        Size::Large => bincode::serde::decode_from_slice(body, LARGE),
    };
    let (value, used) = r.map_err(|e| e.to_string())?;
    if used != body.len() {
        return Err(format!("{} trailing bytes", body.len() - used));
    }
    Ok(value)
}

/// Decodes a record of any version this build knows; trailing bytes, an unknown version or
/// an oversized length are `JOURNAL_CORRUPT`.
pub fn decode<T: Record>(bytes: &[u8], size: Size, what: &str) -> Result<T> {
    let corrupt =
        |why: String| Error::new(ErrorCode::JournalCorrupt, format!("{what} record: {why}"));
    let (version, used): (u32, usize) = bincode::serde::decode_from_slice(bytes, SMALL)
        .map_err(|e| corrupt(format!("record version: {e}")))?;
    let body = &bytes[used..];
    if version == T::VERSION {
        decode_body(body, size)
    } else {
        T::decode_older(version, body, size)
    }
    .map_err(corrupt)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{FileMeta, Hash, PathState};

    impl Record for String {}

    /// A `TxRecord` written as version 1 or 2 (the fields of its time, in order) decodes with
    /// the fields added since at their neutral values.
    #[test]
    fn older_tx_records_decode() {
        let v1 = TxRecordV1 {
            id: 4,
            kind: TxKind::Rollback { to: crate::engine::RollbackTarget::Factory },
            from_version: Some("1.0.0".into()),
            to_version: None,
            phase: Phase::Committed,
            phases: vec![Phase::Planned, Phase::Committed],
            attempts: 1,
            error: None,
            targets: 2,
            new_bytes: 30,
            commits: 5,
            started_unix_ms: 10,
            updated_unix_ms: 11,
        };
        let body = bincode::serde::encode_to_vec(&v1, SMALL).unwrap();
        let with = |version: u32, extra: &[u8]| {
            let mut b = bincode::serde::encode_to_vec(version, SMALL).unwrap();
            b.extend(&body);
            b.extend(extra);
            b
        };
        let old = decode::<TxRecord>(&with(0, &[]), Size::Small, "t").unwrap();
        assert_eq!(
            (old.id, old.commits, old.post_cmds_done, old.freed_blobs, old.freed_bytes),
            (4, 5, 0, 0, 0)
        );
        let v2 = decode::<TxRecord>(&with(1, &[7]), Size::Small, "t").unwrap();
        assert_eq!(
            (v2.post_cmds_done, v2.freed_blobs, v2.freed_bytes, v2.updated_unix_ms),
            (7, 0, 0, 11)
        );
        assert!(
            decode::<TxRecord>(&with(1, &[]), Size::Small, "t").is_err(),
            "a V2 body without post_cmds_done is short"
        );
        // The current version round-trips the new fields.
        let mut now = v2.clone();
        (now.freed_blobs, now.freed_bytes) = (3, 4096);
        assert_eq!(
            decode::<TxRecord>(&encode(&now, Size::Small).unwrap(), Size::Small, "t").unwrap(),
            now
        );
    }

    /// The on-disk enums state their bincode index as their discriminant: every index that
    /// decodes is the variant with that discriminant and encodes back to it, and the first
    /// index that does not decode is the variant count (no gap, nothing renumbered).
    #[test]
    fn on_disk_enum_indexes_are_their_discriminants() {
        fn check<T: serde::Serialize + serde::de::DeserializeOwned + Copy + std::fmt::Debug>(
            discriminant: impl Fn(T) -> u8,
        ) -> u8 {
            let mut n = 0u8;
            while let Ok((v, _)) = bincode::serde::decode_from_slice::<T, _>(&[n], SMALL) {
                assert_eq!(discriminant(v), n, "{v:?} is bincode index {n}");
                assert_eq!(bincode::serde::encode_to_vec(v, SMALL).unwrap(), [n], "{v:?}");
                n += 1;
            }
            n
        }
        assert_eq!(
            check::<ErrorCode>(|c| c as u8),
            28,
            "a new ErrorCode takes the next discriminant"
        );
        assert_eq!(
            check::<crate::engine::Phase>(|p| p as u8) as usize,
            crate::engine::Phase::ALL.len()
        );
        assert_eq!(check::<crate::journal::ddi::DdiActionState>(|s| s as u8), 8);
        assert_eq!(check::<crate::journal::ddi::FeedbackTarget>(|t| t as u8), 2);
    }

    /// `ErrorCode` indices are part of the format (journal-format.md): new codes only at the end.
    #[test]
    fn error_code_indices_are_pinned() {
        let index = |c: ErrorCode| bincode::serde::encode_to_vec(c, SMALL).unwrap();
        assert_eq!(index(ErrorCode::ValidationError), [0]);
        assert_eq!(index(ErrorCode::JournalCorrupt), [22]);
        assert_eq!(index(ErrorCode::InternalError), [23]);
        assert_eq!(index(ErrorCode::RequestRefused), [24]);
        assert_eq!(index(ErrorCode::PackageSizeMismatch), [25]);
        assert_eq!(index(ErrorCode::DeltaBaseMissing), [26]);
        assert_eq!(index(ErrorCode::Canceled), [27]);
    }

    /// `Source` variants are appended (journal-format.md §7): the older ones keep their index,
    /// and a delta source has these bytes.
    #[test]
    fn golden_bytes_of_the_plan_sources() {
        use crate::engine::Source;
        use crate::engine::plan::PatchRef;
        let bytes = |s: &Source| bincode::serde::encode_to_vec(s, SMALL).unwrap();
        assert_eq!(bytes(&Source::Package { entry: "e".into() }), [0, 1, b'e']);
        assert_eq!(bytes(&Source::Blob), [1]);
        assert_eq!(bytes(&Source::Nothing), [2]);
        let delta = Source::Delta {
            base: Hash([1; 32]),
            live: true,
            patch: Some(PatchRef { entry: "p".into(), size: 5 }),
        };
        let mut golden = vec![3u8];
        golden.extend([1; 32]);
        golden.extend([1, 1, 1, b'p', 5]);
        assert_eq!(bytes(&delta), golden);
        assert_eq!(
            bincode::serde::decode_from_slice::<Source, _>(&golden, SMALL).unwrap().0,
            delta
        );
    }

    /// The variant index (the first byte) of every variant of the other on-disk enums with
    /// fields: appended only, never renumbered (journal-format.md §7).
    #[test]
    fn variant_indexes_of_the_enums_with_fields() {
        use crate::engine::plan::{NewFile, PackageRef};
        use crate::engine::{NewState, RollbackTarget};
        use crate::journal::downloads::ExpectedHash;
        fn first<T: serde::Serialize>(v: &T) -> u8 {
            bincode::serde::encode_to_vec(v, SMALL).unwrap()[0]
        }
        let meta = FileMeta { hash: Hash([0; 32]), size: 0, mode: 0, uid: 0, gid: 0 };
        assert_eq!([first(&PathState::Absent), first(&PathState::File(meta))], [0, 1]);
        let file = NewFile { hash: None, size: 0, mode: 0, uid: 0, gid: 0 };
        assert_eq!([first(&NewState::Absent), first(&NewState::File(file))], [0, 1]);
        let to = [RollbackTarget::Generation(1), RollbackTarget::Factory];
        assert_eq!(to.map(|t| first(&t)), [0, 1]);
        let package = PackageRef { path: String::new(), blake3: Hash([0; 32]), size: 0 };
        let kinds = [TxKind::Install { package }, TxKind::Rollback { to: RollbackTarget::Factory }];
        assert_eq!(kinds.map(|k| first(&k)), [0, 1]);
        let hashes = [
            ExpectedHash::Md5(String::new()),
            ExpectedHash::Sha1(String::new()),
            ExpectedHash::Sha256(String::new()),
        ];
        assert_eq!(hashes.map(|h| first(&h)), [0, 1, 2]);
    }

    #[test]
    fn round_trip_and_golden_bytes_of_a_path_state() {
        let s = PathState::File(FileMeta {
            hash: Hash([0xab; 32]),
            size: 300,
            mode: 0o644,
            uid: 0,
            gid: 1000,
        });
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
        assert_eq!(
            decode::<PathState>(&bytes, Size::Small, "t").unwrap_err().code,
            ErrorCode::JournalCorrupt
        );
        assert_eq!(
            decode::<PathState>(&[7, 0], Size::Small, "t").unwrap_err().code,
            ErrorCode::JournalCorrupt
        );
        // A String whose length prefix claims 2^40 bytes must fail, not allocate.
        let bomb = [0u8, 253, 0, 0, 0, 0, 0, 1, 0, 0];
        assert_eq!(
            decode::<String>(&bomb, Size::Small, "t").unwrap_err().code,
            ErrorCode::JournalCorrupt
        );
    }
}
