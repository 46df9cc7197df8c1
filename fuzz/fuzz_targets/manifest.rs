//! `Manifest::parse` on arbitrary bytes: never panics; an accepted manifest satisfies the
//! SPEC §2 invariants and survives being written back and parsed again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tope_updater::error::ErrorCode;
use tope_updater::manifest::Manifest;

fuzz_target!(|data: &[u8]| {
    match Manifest::parse(data) {
        Ok(m) => tope_updater_fuzz::check_manifest(&m),
        Err(e) => assert_eq!(e.code, ErrorCode::InvalidManifest, "{e}"),
    }
});
