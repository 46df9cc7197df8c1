//! `Config::parse` on arbitrary text: never panics, and an accepted configuration rendered
//! back with `to_toml` parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tope_updater::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(cfg) = Config::parse(text) {
        let rendered = cfg.to_toml();
        let again = Config::parse(&rendered).unwrap_or_else(|e| panic!("rendered config does not parse back: {e}\n{rendered}"));
        assert_eq!(again, cfg, "config round trip changed the value:\n{rendered}");
    }
});
