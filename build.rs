//! Tells the integration tests whether the build runs as root.
//!
//! Ten tests need root (loop-mounted ext4 images filled to the last block, processes of
//! another user, `chown`). Built by anyone else they are compiled as `#[ignore]`d with the
//! reason "needs root", so `cargo test` passes for a newcomer and its summary counts them
//! ("N ignored"); built as root (CI) they run, and nothing is ignored. A stale build (made by
//! one user, run by another) is caught by `tests/it/support.rs`'s
//! `the_build_knows_whether_the_tests_run_as_root`.

unsafe extern "C" {
    fn geteuid() -> u32;
}

fn main() {
    println!("cargo::rustc-check-cfg=cfg(tope_unprivileged)");
    println!("cargo::rerun-if-changed=build.rs");
    // sudo, su and runuser change these: the next build asks again who runs it.
    for var in ["USER", "LOGNAME", "HOME", "SUDO_UID"] {
        println!("cargo::rerun-if-env-changed={var}");
    }
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { geteuid() } != 0 {
        println!("cargo::rustc-cfg=tope_unprivileged");
        println!(
            "cargo::warning=not root: the root-only tests are ignored (they loop-mount ext4 images and act as other users); \
             `cargo test` counts them as ignored. Run them as root: \
             sudo env PATH=\"$PATH\" CARGO_TARGET_DIR=target/root cargo test --features failpoints"
        );
    }
}
