//! `Verified` by identity (SPEC §3, issue 17): each target must still be the inode staging
//! wrote, hashed and flushed; anything else is read back, and a target changed between the
//! swap and the verification rolls the install back. `verify_from_media` reads everything.

use crate::support::*;
use std::path::PathBuf;

/// Two versions of three files; the second changes two of them.
fn packages(env: &Env) -> (PathBuf, PathBuf) {
    let v1 = env.pkg_path("v1.zip");
    let v2 = env.pkg_path("v2.zip");
    let m = |v: &str, files: &[(&str, &[u8])]| {
        let mods: Vec<serde_json::Value> = files
            .iter()
            .map(|(n, c)| {
                serde_json::json!({
                    "name": n,
                    "src": n,
                    "dst": env.dst(n),
                    "blake3": blake3_hex(c),
                })
            })
            .collect();
        serde_json::json!({"version": v, "modules": mods}).to_string()
    };
    let one: &[(&str, &[u8])] = &[("a", b"a1\n"), ("b", b"b1\n"), ("c", b"kept\n")];
    let two: &[(&str, &[u8])] = &[("a", b"a2\n"), ("b", b"b2\n"), ("c", b"kept\n")];
    write_package(&v1, &m("1.0.0", one), one);
    write_package(&v2, &m("2.0.0", two), two);
    (v1, v2)
}

/// The engine's own count of targets verified by identity and by reading (its debug log).
fn verified_counts(stderr: &str) -> (usize, usize) {
    let line = stderr
        .lines()
        .find(|l| l.contains("targets verified"))
        .unwrap_or_else(|| panic!("no verification line:\n{stderr}"));
    let field = |name: &str| -> usize {
        line.split_whitespace()
            .find_map(|w| w.strip_prefix(&format!("{name}=")))
            .and_then(|v| v.parse().ok())
            .unwrap()
    };
    (field("by_identity"), field("read"))
}

#[test]
fn staged_files_are_verified_by_identity_and_kept_ones_by_reading() {
    let env = Env::new();
    let (v1, v2) = packages(&env);
    env.ok(&["install", v1.to_str().unwrap()]);
    let r = env.run(&["--log-level", "debug", "install", v2.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    // a and b were staged by this process; c kept its content and was not.
    assert_eq!(verified_counts(&r.stderr), (2, 1));
    env.ok(&["verify"]);
}

#[test]
fn verify_from_media_reads_every_target_back() {
    let env = Env::with_config("verify_from_media = true");
    let (v1, v2) = packages(&env);
    env.ok(&["install", v1.to_str().unwrap()]);
    let r = env.run(&["--log-level", "debug", "install", v2.to_str().unwrap()]);
    assert_eq!(r.code, Some(0), "{}", r.describe());
    assert_eq!(verified_counts(&r.stderr), (0, 3));
    assert_eq!(env.read("a").unwrap(), b"a2\n");
}

#[cfg(feature = "failpoints")]
mod changed_after_the_swap {
    use super::*;
    use crate::pause::{SLEEPS_MS, Spawned, spawn_paused};

    /// Installs v2 over v1, paused right after the swap's flush; `change` runs there; returns
    /// the install's result and the tree v1 left.
    fn install_changed_after_swap(
        change: impl Fn(&Env),
    ) -> (Env, Run, std::collections::BTreeMap<String, String>) {
        for sleep_ms in SLEEPS_MS {
            let env = Env::new();
            let (v1, v2) = packages(&env);
            env.ok(&["install", v1.to_str().unwrap()]);
            let before = tree(&env.root);
            match spawn_paused(
                env.command(&["install", v2.to_str().unwrap()]),
                "swap.synced",
                sleep_ms,
                &env.state,
                env.tmp.path(),
            ) {
                Spawned::Paused(p) => {
                    change(&env);
                    let r = p.finish();
                    return (env, r, before);
                }
                Spawned::Exited(r) if sleep_ms == *SLEEPS_MS.last().unwrap() => {
                    panic!("never paused at swap.synced:\n{}", r.describe())
                }
                Spawned::Exited(_) | Spawned::Missed => {}
            }
        }
        panic!("the pause at swap.synced was missed {} times", SLEEPS_MS.len());
    }

    #[test]
    fn a_target_edited_in_place_after_the_swap_is_caught_and_the_install_rolled_back() {
        let (env, r, before) = install_changed_after_swap(|env| {
            use std::io::Write;
            std::fs::OpenOptions::new()
                .append(true)
                .open(env.path("a"))
                .unwrap()
                .write_all(b"tampered")
                .unwrap();
        });
        assert_eq!(
            (r.code, r.error_code().as_deref()),
            (Some(4), Some("HASH_MISMATCH")),
            "{}",
            r.describe()
        );
        assert_eq!(tree(&env.root), before, "rolled back to v1");
    }

    #[test]
    fn a_target_replaced_after_the_swap_is_caught_and_the_install_rolled_back() {
        let (env, r, before) = install_changed_after_swap(|env| {
            let tmp = env.path("a.other");
            std::fs::write(&tmp, b"a3\n").unwrap();
            std::fs::rename(&tmp, env.path("a")).unwrap();
        });
        assert_eq!(
            (r.code, r.error_code().as_deref()),
            (Some(4), Some("HASH_MISMATCH")),
            "{}",
            r.describe()
        );
        assert_eq!(tree(&env.root), before, "rolled back to v1");
    }

    #[test]
    fn a_target_replaced_by_the_same_content_is_read_and_accepted() {
        // Not the staged inode any more, so it is read back: it holds its new content.
        let (env, r, _) = install_changed_after_swap(|env| {
            let tmp = env.path("a.same");
            std::fs::write(&tmp, b"a2\n").unwrap();
            std::fs::set_permissions(&tmp, std::os::unix::fs::PermissionsExt::from_mode(0o644))
                .unwrap();
            std::fs::rename(&tmp, env.path("a")).unwrap();
        });
        assert_eq!(r.code, Some(0), "{}", r.describe());
        assert_eq!(env.read("a").unwrap(), b"a2\n");
        env.ok(&["verify"]);
    }
}
