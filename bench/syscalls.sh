#!/usr/bin/env bash
# Counts, per install, the fsync-class syscalls, renames/links and journal commits, for
# packages of 200 and 2000 files (one directory module, and as many single-file modules),
# to show that none of them grows with the number of files. Needs strace.
# Usage: bench/syscalls.sh [--md]
set -euo pipefail
cd "$(dirname "$0")/.."
command -v strace >/dev/null || { echo "strace is required (apt-get install strace)" >&2; exit 1; }
cargo build --release --quiet
BIN=$PWD/target/release/tope-updater
work=$(mktemp -d /tmp/tope-syscalls.XXXXXX)
trap 'rm -rf "$work"' EXIT

gen() { # gen DIR N SEED: N files of 4-64 KiB in 100 nested dirs
  python3 - "$1" "$2" "$3" <<'PY'
import os, random, sys
d, n, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
r = random.Random(seed)
for i in range(n):
    p = os.path.join(d, f"d{i % 10}", f"e{(i // 10) % 10}", f"f{i}.bin")
    os.makedirs(os.path.dirname(p), exist_ok=True)
    with open(p, "wb") as f:
        f.write(r.randbytes(r.randint(4096, 65536)))
PY
}

rows=()
for n in 200 2000; do
  for layout in dir-module file-modules; do
    case_dir=$work/$n-$layout
    mkdir -p "$case_dir/root/app" "$case_dir/src/modules/app"
    gen "$case_dir/root/app" "$n" 1          # the old version, on the device
    gen "$case_dir/src/modules/app" "$n" 2   # the new version, same paths
    python3 - "$case_dir" "$layout" <<'PY'
import json, os, sys
case, layout = sys.argv[1], sys.argv[2]
src = os.path.join(case, "src")
dst = os.path.join(case, "root", "app")
if layout == "dir-module":
    mods = [{"name": "app", "src": "modules/app/", "dst": dst}]
else:
    mods = []
    base = os.path.join(src, "modules", "app")
    for root, _, files in os.walk(base):
        for f in files:
            rel = os.path.relpath(os.path.join(root, f), base)
            mods.append({"name": rel, "src": "modules/app/" + rel, "dst": os.path.join(dst, rel)})
json.dump({"version": "2.0.0", "modules": mods}, open(os.path.join(src, "manifest.json"), "w"))
PY
    printf 'state_dir = "%s/state"\nallowed_roots = ["%s/root"]\nservice_manager = "none"\n' "$case_dir" "$case_dir" > "$case_dir/config.toml"
    "$BIN" pack "$case_dir/src" -o "$case_dir/pkg.zip" >/dev/null
    # Warm the journal (its one-time creation is not part of an install) and the page cache.
    "$BIN" --config "$case_dir/config.toml" status >/dev/null
    cat "$case_dir/pkg.zip" > /dev/null
    strace -f -c -o "$case_dir/strace.txt" \
      -e trace=fsync,fdatasync,syncfs,sync,sync_file_range,rename,renameat,renameat2,link,linkat \
      "$BIN" --config "$case_dir/config.toml" --log-level warn install "$case_dir/pkg.zip" >/dev/null
    count() { awk -v s="$1" '$NF==s {print $4}' "$case_dir/strace.txt" | head -1; }
    fsync=$(count fsync); fdatasync=$(count fdatasync); syncfs=$(count syncfs)
    renames=$(( $(count rename || true)+0 + $(count renameat || true)+0 + $(count renameat2 || true)+0 ))
    links=$(( $(count link || true)+0 + $(count linkat || true)+0 ))
    commits=$("$BIN" --config "$case_dir/config.toml" history --json | python3 -c 'import json,sys; print(json.load(sys.stdin)[0]["commits"])')
    rows+=("$n|$layout|${fsync:-0}|${fdatasync:-0}|${syncfs:-0}|$renames|$links|$commits")
  done
done

if [ "${1:-}" = "--md" ]; then
  echo "| files | layout | fsync | fdatasync | syncfs | renames | links | journal commits |"
  echo "|---:|---|---:|---:|---:|---:|---:|---:|"
  for r in "${rows[@]}"; do echo "| ${r//|/ | } |"; done
else
  printf '%6s %-13s %6s %10s %7s %8s %6s %16s\n' files layout fsync fdatasync syncfs renames links "journal commits"
  for r in "${rows[@]}"; do IFS='|' read -r a b c d e f g h <<<"$r"; printf '%6s %-13s %6s %10s %7s %8s %6s %16s\n' "$a" "$b" "$c" "$d" "$e" "$f" "$g" "$h"; done
fi
