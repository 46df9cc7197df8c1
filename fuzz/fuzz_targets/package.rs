//! Arbitrary bytes as a package file: `Package::open` never panics, and an accepted package
//! deploys only under the allowed root, every entry yielding exactly its declared size or an
//! error. Run with `-rss_limit_mb` so an unbounded allocation is a crash.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = tope_updater_fuzz::check_package_bytes(data);
});
