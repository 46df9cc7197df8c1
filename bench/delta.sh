#!/usr/bin/env bash
# Delta packages on real version pairs (issue 14, SPEC §2 and §7): full vs delta package
# bytes, the install time of each, peak RSS, and for comparison the per-file sizes of
# `zstd -19 --patch-from`, `bsdiff` and `xdelta3 -9`; plus a large-file row (a 1 GiB file
# with 64 scattered 4 KiB blocks changed) for the memory bound. Prints one Markdown table
# for README's Performance section.
#
#   bench/delta.sh [quick]           (run as root: loop-mounted ext4, apt-get for the tools)
#
# Environment:
#   BENCH_QUICK=1      same as `quick`: 1 round, a 64 MiB large file, no settle pause, no
#                      prefilled image (a smoke test of the script; under 2 minutes once the
#                      .debs and reference sizes are cached)
#   BENCH_ROUNDS=N     rounds of the package rows (default 5; quick: 1)
#   BENCH_BIG_ROUNDS=N rounds of the large-file row (default 1: each one writes 4 × its size)
#   BENCH_BIG_MIB=N    size of the large file (default 1024; quick: 64)
#   BENCH_PKGS="..."   Debian packages (default: the four of issue 14, plus openssl and
#                      libxml2 in a full run)
#   TOPE_BIN=PATH      the binary to measure (default: cargo build --release)
#
# Downloads, unpacked reference sizes and the large base file are cached under
# target/bench-delta-cache (delete it to start over). Exit 1 if a delta install leaves a tree
# that differs from the full install's (path, mode, sha256) or an install fails.
#
# How sizes are counted (kB = 1000 bytes, as in issue 14's table):
#   full package / delta package: the .zip files from `tope-updater pack` (without and with
#     `--delta-from old.zip`), manifest included.
#   zstd / bsdiff / xdelta3 (sum): over the changed files of the pair only (bytes differ, or
#     the file is new), one patch per file: `zstd -19 --patch-from=OLD`, `bsdiff OLD NEW`,
#     `xdelta3 -9 -e -D -s OLD`. A new file (no old one at that path) counts its `gzip -9` size
#     in every column. No manifest or archive overhead: these are lower bounds a package
#     format can approach, not packages.
set -euo pipefail
# Command substitutions too: a failing step inside $(...) stops the run.
shopt -s inherit_errexit
cd "$(dirname "$0")/.."
REPO=$PWD

QUICK=${BENCH_QUICK:-0}
case "${1:-}" in
  quick | --quick) QUICK=1 ;;
  "") ;;
  -h | --help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  *) echo "usage: bench/delta.sh [quick]" >&2; exit 2 ;;
esac
if [ "$QUICK" = 1 ]; then
  ROUNDS=${BENCH_ROUNDS:-1}
  BIG_MIB=${BENCH_BIG_MIB:-64}
  SETTLE=0
else
  ROUNDS=${BENCH_ROUNDS:-5}
  BIG_MIB=${BENCH_BIG_MIB:-1024}
  # As bench/bench.py: a pause before each timed run lets the shared host's disk absorb the
  # previous writes, so a run does not pay for the one before it.
  SETTLE=1
fi
BIG_ROUNDS=${BENCH_BIG_ROUNDS:-1}
CORE_PKGS="libcurl4 libssl3 systemd libc6" # the pairs measured in issue 14 and research/delta.md
# Two more pairs in a full run: openssl (a rebuilt executable and ~170 gzipped man pages that
# change) and libxml2. Quick runs keep to the four, to stay short.
if [ "$QUICK" = 1 ]; then DEFAULT_PKGS=$CORE_PKGS; else DEFAULT_PKGS="$CORE_PKGS openssl libxml2"; fi
read -r -a PKGS <<<"${BENCH_PKGS:-$DEFAULT_PKGS}"
CACHE=$REPO/target/bench-delta-cache
RSS_BOUND_MIB=64 # the engine's stated bound for applying patches to a file of any size
REF_TAG=ref2     # bump when the reference-size method changes: invalidates cached sizes

log() { printf '[delta-bench %3ds] %s\n' "$SECONDS" "$*" >&2; }
die() { printf '[delta-bench %3ds] FAILURE: %s\n' "$SECONDS" "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------
# Tools and binary

need_tools() {
  local missing=()
  command -v zstd >/dev/null || missing+=(zstd)
  command -v bsdiff >/dev/null || missing+=(bsdiff)
  command -v xdelta3 >/dev/null || missing+=(xdelta3)
  command -v unzip >/dev/null || missing+=(unzip)
  command -v python3 >/dev/null || missing+=(python3)
  command -v mkfs.ext4 >/dev/null || missing+=(e2fsprogs)
  [ -x /usr/bin/time ] || missing+=(time)
  if [ ${#missing[@]} -gt 0 ]; then
    [ "$(id -u)" = 0 ] || die "missing ${missing[*]} (run as root to install them with apt-get)"
    log "installing ${missing[*]}"
    apt-get update -qq && apt-get install -y -qq "${missing[@]}" >/dev/null
  fi
}

# The binary under test: TOPE_BIN, or this worktree's release build (waits for the cargo
# lock if someone else is building).
find_bin() {
  if [ -n "${TOPE_BIN:-}" ]; then
    BIN=$TOPE_BIN
  else
    log "cargo build --release (waits for the cargo lock if another build holds it)"
    cargo build --release --quiet --bin tope-updater
    BIN=${CARGO_TARGET_DIR:-$REPO/target}/release/tope-updater
  fi
  [ -x "$BIN" ] || die "no binary at $BIN"
  HAS_DELTA=0
  # Not `pack --help | grep -q`: grep exits at the first match and pipefail would count the
  # writer's SIGPIPE as a failure.
  if grep -q -- --delta-from <<<"$("$BIN" pack --help 2>&1)"; then
    HAS_DELTA=1
  else
    log "NOTE: $BIN pack has no --delta-from yet: the delta package and delta install"
    log "      columns are skipped (n/a); sizes of the reference tools and the full rows run."
  fi
}

# ---------------------------------------------------------------------------------------
# Real version pairs

# The lowest and highest versions of PKG that apt can download (versions known only from
# /var/lib/dpkg/status, i.e. installed but no longer in any archive, are left out).
version_pair() {
  apt-cache policy "$1" | awk '
    /Version table:/ { t = 1; next }
    t && /^ (\*\*\*|   ) [^ ]+ -?[0-9]+$/ { v = $(NF - 1); next }
    t && v != "" && /^        -?[0-9]+ / && $2 != "/var/lib/dpkg/status" { print v }
  ' | sort -uV | sed -n '1p;$p' | paste -sd' '
}

# Path of PKG=VER's .deb in the cache, downloading it the first time.
fetch_deb() {
  local pkg=$1 ver=$2 dir deb
  dir=$CACHE/debs/$pkg/$ver
  deb=""
  [ -d "$dir" ] && deb=$(find "$dir" -maxdepth 1 -name '*.deb' -print -quit)
  if [ -z "$deb" ]; then
    mkdir -p "$dir"
    # The sandbox user _apt cannot write into the cache; as root, download as root.
    if ! (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null 2>&1); then
      log "apt-get download $pkg=$ver failed; apt-get update and retry"
      apt-get update -qq >/dev/null
      (cd "$dir" && apt-get download -qq -o APT::Sandbox::User=root "$pkg=$ver" >/dev/null)
    fi
    deb=$(find "$dir" -maxdepth 1 -name '*.deb' -print -quit)
    [ -n "$deb" ] || die "apt-get download $pkg=$ver gave no .deb"
  fi
  printf '%s\n' "$deb"
}

# A package source directory for `tope-updater pack` from a .deb: manifest.json (one
# directory module deploying everything under NAME/ to ROOT/NAME) and the unpacked tree
# under NAME/. Symlinks (and anything else that is not a file or a directory) are dropped:
# the packer refuses them, and a package carries files.
make_pack_dir() {
  local deb=$1 dir=$2 name=$3 dst=$4
  rm -rf "$dir"
  mkdir -p "$dir/$name"
  dpkg-deb -x "$deb" "$dir/$name"
  find "$dir/$name" ! -type f ! -type d -delete
  # The engine refuses a backslash in a path (manifest validation), and systemd ships unit
  # names escaped with one (system-systemd\x2dcryptsetup.slice): left out, and said so.
  local dropped
  dropped=$(find "$dir/$name" -name '*\\*' -print -delete | wc -l)
  [ "$dropped" = 0 ] || log "$name: left out $dropped file(s) with a backslash in the name (the engine refuses them)"
  printf '{"version": "0.0.0", "modules": [{"name": "%s", "src": "%s/", "dst": "%s"}]}\n' \
    "$name" "$name" "$dst" >"$dir/manifest.json"
}

# Per changed file of OLD -> NEW (two pack dirs' trees), one TSV line:
#   path  kind(patch|new)  new-size  gzip-9  zstd-patch-from  bsdiff  xdelta3
# Cached per version pair: the tools are deterministic and bsdiff is slow.
ref_sizes() {
  local pkg=$1 oldver=$2 newver=$3 old=$4 new=$5 out tmp rel o n g z b x kind
  out=$CACHE/ref/$REF_TAG/$pkg/${oldver}_${newver}.tsv
  if [ ! -s "$out" ]; then
    log "$pkg: reference patch sizes (zstd, bsdiff, xdelta3; cached afterwards)"
    mkdir -p "$(dirname "$out")"
    tmp=$(mktemp -d "$WORK/ref.XXXXXX")
    : >"$tmp/sizes"
    while IFS= read -r -d '' rel; do
      rel=${rel#./}
      o=$old/$rel
      n=$new/$rel
      if [ -f "$o" ] && cmp -s "$o" "$n"; then continue; fi
      g=$(gzip -9 -c "$n" | wc -c)
      if [ -f "$o" ]; then
        kind="patch"
        # -q and stderr away: zstd prints a long "Optimal parser notes" banner otherwise.
        z=$(zstd -q -19 --patch-from="$o" -c "$n" 2>/dev/null | wc -c)
        bsdiff "$o" "$n" "$tmp/p.bsdiff"
        b=$(stat -c %s "$tmp/p.bsdiff")
        # -D: xdelta3 otherwise gunzips .gz inputs itself and diffs the decompressed text,
        # which is not a patch of the file's bytes (and understated openssl's man pages 6x).
        x=$(xdelta3 -9 -e -D -f -c -s "$o" "$n" | wc -c)
      else
        kind=new z=$g b=$g x=$g
      fi
      printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$rel" "$kind" "$(stat -c %s "$n")" "$g" "$z" "$b" "$x" >>"$tmp/sizes"
    done < <(cd "$new" && find . -type f -print0 | sort -z)
    mv "$tmp/sizes" "$out"
    rm -rf "$tmp"
  fi
  printf '%s\n' "$out"
}

# ---------------------------------------------------------------------------------------
# Filesystem under test (the idea of bench/bench.py's Workspace, which is Python and not
# sourceable): an ext4 image, loop-mounted.

setup_workspace() {
  local gib=$1
  WS=$(mktemp -d /tmp/tope-delta-bench.XXXXXX)
  MNT=$WS/mnt
  mkdir -p "$MNT"
  if [ "$QUICK" = 1 ]; then
    truncate -s "${gib}G" "$WS/fs.img"
  else
    # Every block of the image written once. Over a sparse file, the first write to each
    # block pays the host's block allocation, which made timings of the same command swing
    # 4x from run to run (bench/bench.py). nodiscard keeps mkfs from punching them out again.
    log "prefilling a ${gib} GiB image (every block written once)"
    dd if=/dev/zero of="$WS/fs.img" bs=8M count=$((gib * 128)) oflag=direct status=none
  fi
  mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0,nodiscard "$WS/fs.img"
  mount -o loop "$WS/fs.img" "$MNT"
  FS_KIND="ext4 on a loop device (${gib} GiB image$([ "$QUICK" = 1 ] || echo ", prefilled"))"
  ROOT=$MNT/root
  STATE=$MNT/state
  CFG=$WS/config.toml
  mkdir -p "$ROOT"
  cat >"$CFG" <<EOF
state_dir = "$STATE"
allowed_roots = ["$ROOT"]
service_manager = "none"
EOF
}

cleanup() {
  if [ -n "${MNT:-}" ] && mountpoint -q "$MNT"; then umount "$MNT" || true; fi
  [ -n "${WS:-}" ] && rm -rf "$WS"
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
  return 0
}

tu() { "$BIN" --config "$CFG" --log-level warn "$@"; }

# The device at the old version: empty state and root, then OLD installed (untimed), so the
# known-file records vouch for the old files as on a device that installed them.
reset_device() {
  rm -rf "$STATE" "$ROOT"
  mkdir -p "$ROOT"
  tu install "$1" >"$WORK/install-old.log" 2>&1 || { cat "$WORK/install-old.log" >&2; die "install of $1 failed"; }
}

# Times one install: wall from start to the end of a final `sync` (nothing dirty before the
# clock starts), peak RSS from /usr/bin/time. Sets WALL (s) and RSS_KIB.
timed_install() {
  local pkg=$1 t0 t1
  sync
  sleep "$SETTLE"
  t0=$(date +%s%N)
  if ! /usr/bin/time -f %M -o "$WORK/rss" "$BIN" --config "$CFG" --log-level warn install "$pkg" >"$WORK/install.log" 2>&1; then
    cat "$WORK/install.log" >&2
    die "install of $pkg failed"
  fi
  sync
  t1=$(date +%s%N)
  WALL=$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.3f", (b - a) / 1e9 }')
  RSS_KIB=$(tail -n1 "$WORK/rss")
}

# What a tree holds, for comparing installs: "path mode" lines, then "sha256  path" lines.
tree_digest() {
  (cd "$1" && find . -type f -printf '%P %m\n' | sort && find . -type f -print0 | sort -z | xargs -0 -r sha256sum)
}

# Content only (sha256 and path) of a pack dir's module trees (depth 1 is manifest.json), to
# check that an install deployed every file of the new version.
content_digest() {
  (cd "$1" && find . -mindepth 2 -type f -print0 | sort -z | xargs -0 -r sha256sum)
}

# The delta install must leave exactly what the full install left; and the full install
# every file of the new version.
check_trees() {
  local label=$1 full=$2 delta=$3 src=$4 missing
  if ! diff -q "$full" "$delta" >/dev/null; then
    diff "$full" "$delta" | sed -n '1,20p' >&2
    die "$label: the delta install left a tree different from the full install's"
  fi
  # Not head: it would stop reading early, and pipefail would fail the assignment.
  missing=$(LC_ALL=C comm -23 <(content_digest "$src" | LC_ALL=C sort) <(sed -n '/^[0-9a-f]\{64\}  /p' "$full" | LC_ALL=C sort) | sed -n '1,5p')
  [ -z "$missing" ] || die "$label: installed tree lacks new content: $missing"
}

# Numbers from a space-separated list (as the rounds append them), one a line.
vals() { tr ' ' '\n' <<<"$1" | sed '/^$/d'; }
median() { sort -g | awk '{ a[NR] = $1 } END { if (NR == 0) exit; print (NR % 2 ? a[(NR + 1) / 2] : (a[NR / 2] + a[NR / 2 + 1]) / 2) }'; }
maxof() { sort -g | tail -n1; }
kb() { awk -v b="$1" 'BEGIN { printf "%.0f", b / 1000 }'; }
mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
ratio() { awk -v a="$1" -v b="$2" 'BEGIN { if (b > 0) printf "%.1f×", a / b; else print "n/a" }'; }
fsize() { stat -c %s "$1"; }

# Patches of the delta package larger than zstd --patch-from's for the same file. The zip
# entries are mapped to files through the manifest (any entry name found in a file's record
# of a module's "files" map) or by name (the file's own path, or it plus a suffix).
compare_patches() {
  python3 - "$@" <<'PY'
import json, sys, zipfile
zpath, tsv, module = sys.argv[1:4]
SHOW = 5  # per package
z = zipfile.ZipFile(zpath)
sizes = {i.filename: i.compress_size for i in z.infolist() if not i.filename.endswith("/")}
man = json.loads(z.read("manifest.json"))
ref = {}
for line in open(tsv):
    rel, kind, size, g, zs, b, x = line.rstrip("\n").split("\t")
    ref[rel] = (kind, int(zs))

def names_in(v):
    if isinstance(v, str):
        if v in sizes:
            yield v
    elif isinstance(v, dict):
        for w in v.values():
            yield from names_in(w)
    elif isinstance(v, list):
        for w in v:
            yield from names_in(w)

entries = {}
prefix = module + "/"
delta = man.get("delta") if isinstance(man.get("delta"), dict) else {}
# Records of files: a module's "files" map (relative path -> record) and the delta object's
# "files" map (entry name as in a full package -> record, naming its patch entries).
records = []
for m in man.get("modules", []) + delta.get("modules", []):
    if isinstance(m, dict) and isinstance(m.get("files"), dict):
        records += m["files"].items()
for key, rec in (delta.get("files") or {}).items():
    if key.startswith(prefix):
        records.append((key[len(prefix):], rec))
for rel, rec in records:
    found = set(names_in(rec))
    if found:
        entries.setdefault(rel, set()).update(found)
for name in sizes:
    if name.startswith(prefix):
        rel = name[len(prefix):]
        # The file's own path, or it with a suffix such as ".patch".
        for cand in (rel, rel.rsplit(".", 1)[0]):
            if cand in ref:
                entries.setdefault(cand, set()).add(name)
                break

mapped = [r for r in ref if r in entries]
if not mapped:
    shown = ", ".join(sorted(n for n in sizes if n != "manifest.json")[:4]) or "(none)"
    print(f"  {module}: per-file comparison not available: no entry of the delta package could be "
          f"mapped to a changed file (entries: {shown}{', ...' if len(sizes) > 5 else ''})")
    sys.exit(0)
# Entry bytes only (compressed size): the ZIP's per-entry headers are left out on both sides.
worse = []
for rel in sorted(mapped):
    kind, zs = ref[rel]
    if kind != "patch":
        continue
    mine = sum(sizes[n] for n in entries[rel])
    if mine > zs:
        worse.append((mine - zs, rel, mine, zs, ", ".join(sorted(entries[rel]))))
patched = sum(1 for r in mapped if ref[r][0] == "patch")
# The largest excesses first; many small files each a few bytes over (a fixed per-patch
# header) would otherwise bury the ones that matter.
worse.sort(reverse=True)
for excess, rel, mine, zs, names in worse[:SHOW]:
    print(f"  {module}/{rel}: {mine} B > zstd {zs} B (+{excess} B, {mine / max(zs, 1):.2f}×; {names})")
if len(worse) > SHOW:
    rest = worse[SHOW:]
    print(f"  {module}: {len(rest)} more, +{sum(w[0] for w in rest)} B together (largest +{rest[0][0]} B)")
print(f"  {module}: {len(worse)} of {patched} changed files that had an old version are larger than zstd --patch-from,"
      f" +{sum(w[0] for w in worse)} B in all; {len(ref) - len(mapped)} changed files not mapped to an entry")
PY
}

# ---------------------------------------------------------------------------------------
# The rows

ROWS=()       # Markdown rows, in order
NOTES=()      # lines printed under the table
PERFILE=()    # per-file comparison lines
# Sums: full, delta, zstd, bsdiff, xdelta3 (bytes), changed files; all and issue 14's four.
TOT=(0 0 0 0 0 0)
CORE_TOT=(0 0 0 0 0 0)
declare -A FULL_T DELTA_T DELTA_RSS FULL_RSS

# One version pair: fetch, unpack, pack, reference sizes. Sets P_* for the install rounds.
prepare_pair() {
  local pkg=$1 oldver=$2 newver=$3 d olddeb newdeb
  d=$WORK/$pkg
  olddeb=$(fetch_deb "$pkg" "$oldver")
  newdeb=$(fetch_deb "$pkg" "$newver")
  make_pack_dir "$olddeb" "$d/src-old" "$pkg" "$ROOT/$pkg"
  make_pack_dir "$newdeb" "$d/src-new" "$pkg" "$ROOT/$pkg"
  "$BIN" pack "$d/src-old" -o "$d/old.zip" --version 1.0.0 >/dev/null
  "$BIN" pack "$d/src-new" -o "$d/new-full.zip" --version 1.0.1 >/dev/null
  if [ "$HAS_DELTA" = 1 ]; then
    "$BIN" pack "$d/src-new" -o "$d/new-delta.zip" --version 1.0.1 --delta-from "$d/old.zip" >"$d/pack-delta.log"
    # What pack said it shipped ("delta from 1.0.0: N files shipped whole, M as patches, ...").
    NOTES+=("$pkg: $(grep -m1 '^delta from' "$d/pack-delta.log" || echo "pack printed no delta summary")")
  fi
  P_VERS[$pkg]="$oldver → $newver"
  P_REF[$pkg]=$(ref_sizes "$pkg" "$oldver" "$newver" "$d/src-old/$pkg" "$d/src-new/$pkg")
}
declare -A P_VERS P_REF

# One round of one package: full and delta installs, each from the old version, in an order
# that alternates by round (so neither always runs right after the other's writes).
install_round() {
  local label=$1 d=$2 round=$3 kinds k
  if [ "$HAS_DELTA" = 1 ]; then
    if [ $((round % 2)) = 0 ]; then kinds="full delta"; else kinds="delta full"; fi
  else
    kinds=full
  fi
  for k in $kinds; do
    reset_device "$d/old.zip"
    timed_install "$d/new-$k.zip"
    if [ "$k" = full ]; then
      FULL_T[$label]+="$WALL " FULL_RSS[$label]+="$RSS_KIB "
      tree_digest "$ROOT" >"$d/tree-full.$round"
    else
      DELTA_T[$label]+="$WALL " DELTA_RSS[$label]+="$RSS_KIB "
      tree_digest "$ROOT" >"$d/tree-delta.$round"
    fi
  done
  if [ "$HAS_DELTA" = 1 ]; then check_trees "$label (round $((round + 1)))" "$d/tree-full.$round" "$d/tree-delta.$round" "$d/src-new"; fi
}

# Median wall times, max RSS and the table row of one package (or the large file).
finish_row() {
  local label=$1 full=$2 delta=$3 zs=$4 bs=$5 xs=$6 ft dt rss dcol rcol tcol
  ft=$(vals "${FULL_T[$label]}" | median)
  if [ "$HAS_DELTA" = 1 ]; then
    dt=$(vals "${DELTA_T[$label]}" | median)
    rss=$(vals "${DELTA_RSS[$label]}" | maxof)
    dcol=$(kb "$delta") rcol=$(ratio "$full" "$delta") tcol=$(awk -v a="$dt" -v b="$ft" 'BEGIN { printf "%.2f×", a / b }')
    rss=$(mib "$rss")
  else
    dt=n/a rss=n/a dcol=n/a rcol=n/a tcol=n/a
  fi
  ROWS+=("| $label | $(kb "$full") | $dcol | $rcol | $zs | $bs | $xs | $ft | $dt | $tcol | $rss |")
  ROW_FT[$label]=$ft ROW_DT[$label]=$dt
}
declare -A ROW_FT ROW_DT

add_total() {
  local label=$1 full=$2 delta=$3 zs=$4 bs=$5 xs=$6 dcol=n/a rcol=n/a
  if [ "$HAS_DELTA" = 1 ]; then dcol=$(kb "$delta") rcol=$(ratio "$full" "$delta"); fi
  ROWS+=("| **$label** | $(kb "$full") | $dcol | $rcol | $(kb "$zs") ($(ratio "$full" "$zs")) | $(kb "$bs") ($(ratio "$full" "$bs")) | $(kb "$xs") ($(ratio "$full" "$xs")) | | | | |")
}

# The large-file row: a random base (cached), the target with 64 scattered 4 KiB blocks
# rewritten, full and delta packages, timed installs as for the package rows.
big_row() {
  local d=$WORK/big base blocks step i blk label t0 t1
  base=$CACHE/big-${BIG_MIB}M.bin
  if [ ! -s "$base" ]; then
    log "large file: ${BIG_MIB} MiB of random base (cached)"
    mkdir -p "$CACHE"
    head -c "${BIG_MIB}M" /dev/urandom >"$base.part"
    mv "$base.part" "$base"
  fi
  mkdir -p "$d/src-old/big" "$d/src-new/big"
  ln "$base" "$d/src-old/big/big.bin" 2>/dev/null || cp "$base" "$d/src-old/big/big.bin"
  cp "$base" "$d/src-new/big/big.bin"
  # 64 blocks, one at a random place in each 1/64 of the file (fixed seed: the same places
  # every run).
  blocks=$((BIG_MIB * 256)) step=$((BIG_MIB * 256 / 64))
  RANDOM=14
  for ((i = 0; i < 64; i++)); do
    blk=$((i * step + (RANDOM * 32768 + RANDOM) % step))
    head -c 4096 /dev/urandom | dd of="$d/src-new/big/big.bin" bs=4096 seek="$blk" conv=notrunc status=none
  done
  [ "$(fsize "$d/src-new/big/big.bin")" = $((blocks * 4096)) ] || die "large target has the wrong size"
  for v in old new; do
    printf '{"version": "0.0.0", "modules": [{"name": "big", "src": "big/", "dst": "%s/big"}]}\n' "$ROOT" >"$d/src-$v/manifest.json"
  done
  log "large file: packing (${BIG_MIB} MiB)"
  "$BIN" pack "$d/src-old" -o "$d/old.zip" --version 1.0.0 >/dev/null
  "$BIN" pack "$d/src-new" -o "$d/new-full.zip" --version 1.0.1 >/dev/null
  label="1 file of ${BIG_MIB} MiB, 64 × 4 KiB changed"
  if [ "$HAS_DELTA" = 1 ]; then
    t0=$(date +%s%N)
    /usr/bin/time -f %M -o "$WORK/pack-rss" "$BIN" pack "$d/src-new" -o "$d/new-delta.zip" --version 1.0.1 --delta-from "$d/old.zip" >"$d/pack-delta.log"
    t1=$(date +%s%N)
    NOTES+=("Large file: packing the delta took $(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }') s, peak RSS $(mib "$(tail -n1 "$WORK/pack-rss")") MiB; changed content 64 × 4 KiB.")
  fi
  for ((r = 0; r < BIG_ROUNDS; r++)); do
    log "large file: round $((r + 1))/$BIG_ROUNDS"
    install_round "$label" "$d" "$r"
  done
  local delta=0
  [ "$HAS_DELTA" = 1 ] && delta=$(fsize "$d/new-delta.zip")
  finish_row "$label" "$(fsize "$d/new-full.zip")" "$delta" "—" "—" "—"
  if [ "$HAS_DELTA" = 1 ]; then
    BIG_RSS=$(vals "${DELTA_RSS[$label]}" | maxof)
  fi
  NOTES+=("Large file: full install peak RSS $(mib "$(vals "${FULL_RSS[$label]}" | maxof)") MiB. The reference tools are not run on it (research/delta.md: 273–529 MB RSS to apply at 256 MiB, bsdiff 2.4 GB to create).")
  rm -rf "$d"
}

main() {
  [ "$(id -u)" = 0 ] || die "run as root (loop mount, apt-get)"
  need_tools
  find_bin
  mkdir -p "$CACHE"
  WORK=$(mktemp -d "$REPO/target/bench-delta-work.XXXXXX")
  trap cleanup EXIT
  # Room for the large row: the old file installed, the new one staged, the package's
  # copy; the package rows need little.
  setup_workspace $((BIG_MIB >= 512 ? (BIG_MIB * 4 + 1023) / 1024 : 1))

  local pkg pair sums z b x n full delta label r
  local done_pkgs=()
  for pkg in "${PKGS[@]}"; do
    pair=$(version_pair "$pkg")
    if [ -z "$pair" ] || [ "${pair%% *}" = "${pair##* }" ]; then
      log "$pkg: fewer than two downloadable versions in apt-cache policy; skipped"
      continue
    fi
    log "$pkg: ${pair% *} → ${pair#* }: fetching, unpacking, packing"
    prepare_pair "$pkg" "${pair%% *}" "${pair##* }"
    done_pkgs+=("$pkg")
  done
  [ ${#done_pkgs[@]} -gt 0 ] || die "no version pair could be prepared"

  for ((r = 0; r < ROUNDS; r++)); do
    log "round $((r + 1))/$ROUNDS: ${done_pkgs[*]}"
    for pkg in "${done_pkgs[@]}"; do
      install_round "$pkg ${P_VERS[$pkg]}" "$WORK/$pkg" "$r"
    done
  done

  for pkg in "${done_pkgs[@]}"; do
    label="$pkg ${P_VERS[$pkg]}"
    # Columns of ref_sizes: path kind size gzip zstd bsdiff xdelta3.
    sums=$(awk -F'\t' '{ z += $5; b += $6; x += $7; n++ } END { printf "%d %d %d %d", z, b, x, n }' "${P_REF[$pkg]}")
    read -r z b x n <<<"$sums"
    full=$(fsize "$WORK/$pkg/new-full.zip")
    delta=0
    [ "$HAS_DELTA" = 1 ] && delta=$(fsize "$WORK/$pkg/new-delta.zip")
    finish_row "$label" "$full" "$delta" "$(kb "$z")" "$(kb "$b")" "$(kb "$x")"
    TOT=($((TOT[0] + full)) $((TOT[1] + delta)) $((TOT[2] + z)) $((TOT[3] + b)) $((TOT[4] + x)) $((TOT[5] + n)))
    if [[ " $CORE_PKGS " == *" $pkg "* ]]; then
      CORE_TOT=($((CORE_TOT[0] + full)) $((CORE_TOT[1] + delta)) $((CORE_TOT[2] + z)) $((CORE_TOT[3] + b)) $((CORE_TOT[4] + x)) $((CORE_TOT[5] + n)))
    fi
    if [ "$HAS_DELTA" = 1 ]; then
      mapfile -t -O "${#PERFILE[@]}" PERFILE < <(compare_patches "$WORK/$pkg/new-delta.zip" "${P_REF[$pkg]}" "$pkg")
    fi
  done
  add_total "total (${#done_pkgs[@]} packages, ${TOT[5]} changed files)" "${TOT[@]:0:5}"
  if [ "${#done_pkgs[@]}" != 4 ] && [ "${CORE_TOT[0]}" -gt 0 ]; then
    add_total "total, issue 14's four ($CORE_PKGS)" "${CORE_TOT[@]:0:5}"
  fi

  big_row

  # Free the space before printing (the work dir holds GiBs with the large row).
  cleanup
  WS="" WORK="" MNT=""
  report "${done_pkgs[@]}"
}

report() {
  local pkgs=("$@") worst="" t p
  echo
  echo "Filesystem: $FS_KIND; $ROUNDS round(s) per package row, $BIG_ROUNDS for the large file; sizes in kB (1000 bytes);"
  echo "install times: median wall, each from the old version installed and nothing dirty, ending with sync;"
  echo "peak RSS: max over the rounds. Binary: $BIN"
  echo
  echo "| package | full package | delta package | ratio | zstd --patch-from (sum) | bsdiff (sum) | xdelta3 (sum) | full install s | delta install s | delta/full time | peak RSS delta (MiB) |"
  echo "|---|---|---|---|---|---|---|---|---|---|---|"
  printf '%s\n' "${ROWS[@]}"
  echo
  printf '%s\n' "${NOTES[@]}"
  [ "$HAS_DELTA" = 1 ] || echo "Delta columns n/a: this binary's pack has no --delta-from."
  if [ "$HAS_DELTA" = 1 ]; then
    echo
    echo "Per file, patches of the delta package larger than zstd -19 --patch-from's:"
    printf '%s\n' "${PERFILE[@]}"
    # Issue 14's "done when", as measured here (not a failure of this script: a report).
    for p in "${pkgs[@]}"; do
      t=$(awk -v a="${ROW_DT["$p ${P_VERS[$p]}"]}" -v b="${ROW_FT["$p ${P_VERS[$p]}"]}" 'BEGIN { printf "%.2f", a / b }')
      worst=$(printf '%s\n%s %s\n' "$worst" "$t" "$p" | sort -g | tail -n1)
    done
    echo
    echo "Against issue 14's targets:"
    awk -v f="${TOT[0]}" -v d="${TOT[1]}" -v n="${#pkgs[@]}" 'BEGIN { printf "  delta ≤ 1/10 of full in total (%d packages): %.1f× smaller: %s\n", n, f / d, (d * 10 <= f ? "met" : "NOT met") }'
    if [ "${#pkgs[@]}" != 4 ] && [ "${CORE_TOT[1]}" -gt 0 ]; then
      awk -v f="${CORE_TOT[0]}" -v d="${CORE_TOT[1]}" 'BEGIN { printf "  delta ≤ 1/10 of full in total (issue 14'"'"'s four): %.1f× smaller: %s\n", f / d, (d * 10 <= f ? "met" : "NOT met") }'
    fi
    awk -v w="${worst%% *}" -v p="${worst#* }" 'BEGIN { printf "  delta install ≤ 1.5× the full one: worst %.2f× (%s): %s\n", w, p, (w <= 1.5 ? "met" : "NOT met") }'
    awk -v k="${BIG_RSS:-0}" -v b="$RSS_BOUND_MIB" -v m="$BIG_MIB" 'BEGIN { printf "  peak RSS of the %d MiB delta install < %d MiB: %.1f MiB: %s\n", m, b, k / 1024, (k / 1024 < b ? "met" : "NOT met") }'
  fi
}

main "$@"
