//! Journal record decoding on arbitrary bytes (what a corrupt or hostile `journal.redb` or
//! `inflight.plan` can hold): never panics or aborts, errors are `JOURNAL_CORRUPT`, and an
//! accepted record round-trips: encode(decode(b)) decodes to the same value and re-encodes
//! to the same bytes. Older record versions decode too; re-encoding writes the current one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use serde::Serialize;
use serde::de::DeserializeOwned;
use std::fmt::Debug;
use std::path::PathBuf;
use std::sync::OnceLock;
use tope_updater::engine::{Generation, Hash, PathState, Plan};
use tope_updater::error::ErrorCode;
use tope_updater::journal::records::{Record, Size, TxRecord, decode, encode};
use tope_updater::plancopy;

fn round_trip<T: Record + Serialize + DeserializeOwned + PartialEq + Debug>(data: &[u8], size: Size, what: &str) {
    match decode::<T>(data, size, what) {
        Ok(v) => {
            let bytes = encode(&v, size).unwrap_or_else(|e| panic!("{what}: a decoded record does not encode: {e}"));
            let v2 = decode::<T>(&bytes, size, what).unwrap_or_else(|e| panic!("{what}: a re-encoded record does not decode: {e}"));
            assert_eq!(v, v2, "{what}: round trip changed the value");
            assert_eq!(encode(&v2, size).unwrap(), bytes, "{what}: encoding is not stable");
        }
        Err(e) => assert_eq!(e.code, ErrorCode::JournalCorrupt, "{what}: {e}"),
    }
}

/// A per-process state directory for the plan copy.
fn state_dir() -> &'static PathBuf {
    static D: OnceLock<PathBuf> = OnceLock::new();
    D.get_or_init(|| {
        let d = tope_updater_fuzz::scratch_dir().join(format!("state-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    })
}

fn check_plan_copy(file: &[u8], payload: Option<&[u8]>) {
    std::fs::write(plancopy::path_in(state_dir()), file).unwrap();
    match plancopy::read(state_dir()) {
        Ok(Some(plan)) => {
            // Accepted only with a verified payload that decodes as a journal plan does.
            let payload = payload.expect("plan copy accepted without a valid header");
            assert_eq!(decode::<Plan>(payload, Size::Large, "plan").ok(), Some(plan));
        }
        Ok(None) => panic!("plan copy exists but read says there is none"),
        Err(e) => {
            assert_eq!(e.code, ErrorCode::JournalCorrupt, "{e}");
            if let Some(p) = payload {
                assert!(decode::<Plan>(p, Size::Large, "plan").is_err(), "valid plan copy refused: {e}");
            }
        }
    }
}

fuzz_target!(|data: &[u8]| {
    round_trip::<TxRecord>(data, Size::Small, "transaction");
    round_trip::<Plan>(data, Size::Large, "plan");
    round_trip::<Generation>(data, Size::Large, "generation");
    round_trip::<PathState>(data, Size::Small, "factory");
    round_trip::<tope_updater::engine::trial::Trial>(data, Size::Small, "trial");
    round_trip::<tope_updater::reporter::Report>(data, Size::Small, "report");
    round_trip::<tope_updater::download::DownloadRecord>(data, Size::Small, "download");
    round_trip::<tope_updater::engine::known::KnownFile>(data, Size::Small, "known file");
    // The plan copy: once as raw file bytes, once wrapped in a correct header so the payload
    // reaches the decoder.
    let valid_header = data.len() >= 48 && &data[..8] == b"TOPEPLN1" && {
        let len = u64::from_le_bytes(data[8..16].try_into().unwrap());
        len == (data.len() - 48) as u64 && Hash::of(&data[48..]).0[..] == data[16..48]
    };
    check_plan_copy(data, valid_header.then(|| &data[48..]));
    let mut file = b"TOPEPLN1".to_vec();
    file.extend_from_slice(&(data.len() as u64).to_le_bytes());
    file.extend_from_slice(&Hash::of(data).0);
    file.extend_from_slice(data);
    check_plan_copy(&file, Some(data));
});
