#!/usr/bin/env bash
# The README's test command as a newcomer runs it: an ordinary user (nobody), a copy of the
# checkout, no sudo. Run as root (CI does): it copies the tree (without target/), the Rust
# toolchain and the crate registry to a scratch directory nobody owns, runs
# `cargo test --features failpoints` there as nobody, and checks that
#   - it passes,
#   - every root-only test was reported as ignored (none failed, none ran), and exactly
#     ROOT_ONLY_TESTS of them, the number README.md states,
#   - the build said, in cargo's own output, how many root-only tests it leaves out and how to
#     run them.
#
#   tests/unprivileged.sh            # exit 0 iff all of the above hold
#
# Environment: UNPRIV_USER (default nobody), UNPRIV_KEEP=1 (keep the scratch directory).
set -euo pipefail
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
USER_NAME=${UNPRIV_USER:-nobody}
# The root-only tests (README.md "Tests that need root" lists them); a test added to or
# removed from that set changes this number in the same commit.
ROOT_ONLY_TESTS=10
log() { printf '[unprivileged %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

[ "$(id -u)" = 0 ] || die "run as root: it makes a scratch copy owned by $USER_NAME and runs the tests as $USER_NAME"
id "$USER_NAME" >/dev/null || die "no user $USER_NAME"
uid=$(id -u "$USER_NAME")
[ "$uid" != 0 ] || die "$USER_NAME is root"

work=$(mktemp -d /tmp/tope-unprivileged.XXXXXX)
[ "${UNPRIV_KEEP:-0}" = 1 ] || trap 'rm -rf "$work"' EXIT
chmod 755 "$work"
log "scratch directory $work"

# The checkout, without build output (a newcomer's fresh clone has none).
mkdir "$work/src"
tar -C "$REPO" --exclude=./target --exclude=./fuzz/target -c . | tar -C "$work/src" -x
# The toolchain this machine's cargo uses (rustup keeps it under root's home, which other
# users cannot enter): hard links when possible, it is only read.
sysroot=$(rustc --print sysroot)
cp -al "$sysroot" "$work/toolchain" 2>/dev/null || cp -a "$sysroot" "$work/toolchain"
# The crate registry, copied (cargo writes beside the files it has), so nothing is fetched twice.
mkdir -p "$work/cargo-home" "$work/home"
cargo_home=${CARGO_HOME:-$HOME/.cargo}
[ -d "$cargo_home/registry" ] && cp -a "$cargo_home/registry" "$work/cargo-home/"
chown -R "$USER_NAME" "$work/src" "$work/cargo-home" "$work/home"

log "cargo test --features failpoints as $USER_NAME (uid $uid)"
set +e
runuser -u "$USER_NAME" -- env -i HOME="$work/home" CARGO_HOME="$work/cargo-home" \
    PATH="$work/toolchain/bin:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin" \
    CARGO_TERM_COLOR=never TMPDIR=/tmp LANG=C.UTF-8 \
    sh -c "cd '$work/src' && cargo test --features failpoints" >"$work/test.log" 2>&1
rc=$?
set -e
cat "$work/test.log"
[ $rc = 0 ] || die "cargo test --features failpoints as $USER_NAME exited $rc (log above)"

# Every ignored test is a root-only one, and each says why and how to run it.
ignored=$(grep -cE '^test .* \.\.\. ignored, needs root' "$work/test.log" || true)
other=$(grep -E '^test .* \.\.\. ignored' "$work/test.log" | grep -vc 'ignored, needs root' || true)
[ "$other" = 0 ] || die "$other tests were ignored for another reason"
[ "$ignored" = "$ROOT_ONLY_TESTS" ] || die "$ignored root-only tests ignored, README.md says $ROOT_ONLY_TESTS"
grep -q "root-only tests are ignored" "$work/test.log" || die "cargo's output does not say that root-only tests were left out"
log "PASS: the README's test command passed as $USER_NAME; $ignored root-only tests were ignored and said so"
