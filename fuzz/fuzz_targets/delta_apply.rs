//! Arbitrary bytes as a delta patch (`delta::apply`) against a fixed base or one taken from
//! the input, with a declared target size from the input (layout: `tope_updater_fuzz::delta::
//! split_raw`). Checked: no panic; never more than the declared size written, even on an
//! error; on success exactly the declared size; the Rust heap's peak within what the
//! patch's windows may hold (reference + payload + bsdiff stream + one window of output) and
//! within limits.rs's budget; `-rss_limit_mb` catches the rest (C allocations). The seeds
//! (`fuzz/corpus/delta_apply`, from `make_patch`) are valid patches of both methods.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tope_updater_fuzz::delta::{self as d, CountingAlloc};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc;

fuzz_target!(|data: &[u8]| {
    let Some(input) = d::split_raw(data) else { return };
    let owned;
    let base = match input.base {
        Ok(i) => d::fixed_base_file(i),
        Err(bytes) => {
            owned = d::input_base_file(bytes);
            &owned
        }
    };
    let _ = d::check_apply(input.patch, base, input.declared, false);
});
