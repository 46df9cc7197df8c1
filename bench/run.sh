#!/usr/bin/env bash
# Benchmark: tope-updater install against `cp` + `sync`, `unzip -o` + `sync`, `cp` into new
# files + rename + `sync`, and OSTree pull-local + checkout (Debian's ostree), on the same
# filesystem in the same run (a loop-mounted ext4 image when run as root, a temporary
# directory otherwise). Prints one table; `--md` prints it as Markdown. As root, each timed
# row also gives the bytes the loop device received during it ("written MiB") and that over
# the bytes of changed content ("written / changed"); see bench/bench.py's docstring.
#   bench/run.sh [--md] [--runs N] [--quick]
#   bench/run.sh --endurance [--quick] [--updates N] [--md] ...  (bench/endurance.py --help)
# --quick: smaller payloads and fewer runs (a smoke test of the script itself).
set -euo pipefail
cd "$(dirname "$0")/.."
need() { command -v "$1" >/dev/null 2>&1; }
if [ "$(id -u)" = 0 ]; then
  missing=()
  need strace || missing+=(strace)
  need unzip || missing+=(unzip)
  [ -x /usr/bin/time ] || missing+=(time)
  need mkfs.ext4 || missing+=(e2fsprogs)
  need ostree || missing+=(ostree)
  if [ ${#missing[@]} -gt 0 ]; then apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null; fi
fi
if [ "${1:-}" = --endurance ]; then
  # Endurance benchmark with flash-wear measurement (bench/endurance.py): thousands of updates.
  shift
  cargo build --release --quiet --bin tope-updater
  exec python3 bench/endurance.py --bin "${CARGO_TARGET_DIR:-$PWD/target}/release/tope-updater" "$@"
fi
cargo build --release --quiet --bin tope-updater --example progress_load
exec python3 bench/bench.py --bin "${CARGO_TARGET_DIR:-$PWD/target}/release/tope-updater" "$@"
