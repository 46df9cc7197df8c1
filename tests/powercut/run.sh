#!/usr/bin/env bash
# Power-cut harness for tope-updater (SPEC §3, §8; issue 5). See README.md beside this file.
#
#   tests/powercut/run.sh quick          CI: QEMU kills + a dm-flakey batch + one log-writes replay
#   tests/powercut/run.sh soak N         N cuts over every kind, scenario and filesystem; writes a report
#   tests/powercut/run.sh negative [POINT..]  negative controls: a build without one sync (POINT:
#                                        staging backups swap journal dirfsync none; default the
#                                        first five) must be caught (exit 0 iff every point in
#                                        NEG_CAUGHT is, and the normal build is clean)
#   tests/powercut/run.sh kill N [FS..]  only QEMU kills          (FS: ext4 xfs; default ext4)
#   tests/powercut/run.sh flakey N [FS]  only one dm-flakey batch
#   tests/powercut/run.sh lw SCEN [FS] [POLICY]  only one log-writes recording + replay (SCEN: fw many dir rollback factory gc delta)
#   tests/powercut/run.sh selftest       only check the checks (damaged images must fail)
#   tests/powercut/run.sh prep [FS..]    only build and cache everything (FS default: ext4 xfs); the
#                                        uncut runs must equal lib/oracle.py's states, or it dies
#
# Environment: PC_SEED (default: random, always printed), PC_BIN (use this static binary
# instead of building one), PC_CACHE (default target/powercut-cache), PC_OUT (default
# target/powercut-out), PC_KEEP_ALL=1 (keep every cut image), PC_ACCEL (tcg|kvm; default tcg),
# and more in README.md. Every cut is classified (before / in-flight / after the transaction,
# from what `recover` finds after it); each kind's cuts must be at least half in flight per
# scenario (the floor); after recover, `verify` and post-cut rollbacks must leave the oracle's tree.
set -euo pipefail

PCDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$PCDIR/../.." && pwd)
CACHE=${PC_CACHE:-$REPO/target/powercut-cache}
OUTROOT=${PC_OUT:-$REPO/target/powercut-out}
ACCEL=${PC_ACCEL:-tcg}
SCENARIOS=(fw many dir rollback factory gc delta)
# The scenarios cuts are drawn from (PC_SCENARIOS="fw dir" restricts them).
read -r -a CUT_SCENARIOS <<<"${PC_SCENARIOS:-${SCENARIOS[*]}}"
MNT=/mnt/pc

log() { printf '[powercut %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }
sha() { sha256sum "$@" | cut -d' ' -f1; }

# ------------------------------------------------------------------ dependencies

ensure_deps() {
    local need=()
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    [ -e /usr/share/qemu/qboot.rom ] || need+=(qemu-system-data)
    [ -x /bin/busybox ] && [ "$(/bin/busybox --list | grep -cx sha256sum)" = 1 ] || need+=(busybox-static)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    command -v mkfs.xfs >/dev/null || need+=(xfsprogs)
    command -v dmsetup >/dev/null || need+=(dmsetup)
    command -v xz >/dev/null || need+=(xz-utils)
    command -v modprobe >/dev/null || need+=(kmod)
    command -v unshare >/dev/null || need+=(util-linux)
    command -v perl >/dev/null || need+=(perl-base)
    command -v python3 >/dev/null || need+=(python3)
    command -v diff >/dev/null || need+=(diffutils)
    if [ ${#need[@]} -gt 0 ]; then
        [ "$(id -u)" = 0 ] || die "missing packages (${need[*]}) and not root"
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
    fi
    [ "$(id -u)" = 0 ] || die "run as root (loop mounts for image preparation and log replay)"
}

# ------------------------------------------------------------------ the engine binary

# Sets BIN. $1: "normal" or "negative".
build_bin() {
    local flavour=${1:-normal}
    if [ "$flavour" = normal ] && [ -n "${PC_BIN:-}" ]; then BIN=$PC_BIN; return; fi
    local dir=target/powercut feat=()
    if [ "$flavour" = negative ]; then dir=target/powercut-neg; feat=(--features powercut-negative-control); fi
    log "building the static tope-updater ($flavour) in $dir"
    (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --target x86_64-unknown-linux-gnu --target-dir "$dir" "${feat[@]}") >&2
    BIN=$REPO/$dir/x86_64-unknown-linux-gnu/release/tope-updater
    ldd "$BIN" 2>&1 | grep -qE 'statically linked|not a dynamic' || die "$BIN is not statically linked"
}

# ------------------------------------------------------------------ kernel

# prep_kernel (sets KVER, KMODDIR, VMLINUX) and copy_modules: shared with tests/systemd.
# shellcheck source=../guest/kernel.sh
. "$PCDIR/../guest/kernel.sh"

# ------------------------------------------------------------------ initramfs

# Sets INITRD for the current BIN.
prep_initramfs() {
    local bb=/bin/busybox dm
    dm=$(command -v dmsetup)
    local inputs=("$bb" "$dm" "$BIN" "$PCDIR/guest/init" "$PCDIR/lib/dump.sh" "$PCDIR/lib/check.sh")
    local key
    key=$( { echo "$KVER"; sha "${inputs[@]}"; ldd "$dm" | awk '$3 ~ /^\// { print $3 }' | xargs sha256sum; } | sha | cut -c1-16)
    INITRD=$CACHE/initramfs-$key.cpio
    [ -s "$INITRD" ] && return
    log "building the initramfs ($INITRD)"
    local d
    d=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    mkdir -p "$d"/{bin,sbin,proc,sys,dev,tmp,mnt,pc,modules,lib64,lib/x86_64-linux-gnu}
    cp "$bb" "$d/bin/busybox"
    local a
    for a in $("$bb" --list); do [ "$a" = busybox ] || ln -s busybox "$d/bin/$a"; done
    cp "$dm" "$d/sbin/dmsetup"
    for a in $(ldd "$dm" | awk '$3 ~ /^\// { print $3 }'); do cp -L "$a" "$d/lib/x86_64-linux-gnu/"; done
    cp -L /lib64/ld-linux-x86-64.so.2 "$d/lib64/"
    cp "$BIN" "$d/pc/tope-updater"
    cp "$PCDIR/lib/dump.sh" "$d/pc/dump.sh"
    cp "$PCDIR/lib/check.sh" "$d/pc/check.sh"
    cp "$PCDIR/guest/init" "$d/init"
    chmod 755 "$d/init"
    # Module groups, each in load order (modprobe --show-depends prints dependencies first).
    local group mods
    for group in base xfs dm; do
        case $group in
            base) mods="virtio_pci virtio_blk crc32c_generic ext4" ;;
            xfs) mods="xfs" ;;
            dm) mods="dm_mod dm_snapshot dm_flakey dm_log_writes" ;;
        esac
        : >"$d/modules/$group.list"
        # shellcheck disable=SC2086 # $mods: a word list
        copy_modules "$d/modules" $mods | while read -r name; do
            # Earlier groups already loaded it: skip duplicates across groups.
            grep -qx "/modules/$name" "$d"/modules/*.list 2>/dev/null || echo "/modules/$name" >>"$d/modules/$group.list"
        done
    done
    (cd "$d" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$d"
}

# ------------------------------------------------------------------ payloads and images

# Runs "$@" (a bash script text and its arguments) with IMG mounted at /mnt/pc, in a
# private mount namespace (nothing shows on the host). $1 image, $2 fs, $3 script.
in_ns() {
    local img=$1 fs=$2 script=$3
    shift 3
    local opts=
    [ "$fs" = ext4 ] && opts=,noauto_da_alloc
    unshare -m --propagation private -- bash -c '
        set -e
        img=$1 fs=$2 opts=$3 script=$4; shift 4
        mount -t tmpfs pc-ns /mnt
        mkdir -p '"$MNT"'
        mount -t "$fs" -o loop$opts "$img" '"$MNT"'
        umask 022
        set +e
        bash -c "$script" ns "$@"
        rc=$?
        umount '"$MNT"' || { sleep 1; umount '"$MNT"'; }
        exit $rc' ns "$img" "$fs" "$opts" "$script" "$@"
}

rand_file() { head -c "$2" /dev/urandom >"$1"; }

# The factory tree and the package sources (random content, generated once per cache key).
gen_payload() {
    local p=$1
    rm -rf "$p" && mkdir -p "$p"
    local f=$p/factory
    mkdir -p "$f"/{fw,etc,opt/app/bin,opt/app/lib,share/small}
    local n
    for n in boot fpga mcu; do rand_file "$f/fw/$n.bin" 8M; done
    printf 'level = 1\n' >"$f/etc/app.conf" && chmod 640 "$f/etc/app.conf"
    for n in device-api voice-app klippy; do rand_file "$f/opt/app/bin/$n" 256K; chmod 755 "$f/opt/app/bin/$n"; done
    for n in $(seq 0 9); do rand_file "$f/opt/app/lib/lib$n.so" $((4096 * (n + 1))); chmod 755 "$f/opt/app/lib/lib$n.so"; done
    for n in $(seq -w 0 149); do rand_file "$f/share/small/f$n" $((1000 + 10#$n * 20)); done
    printf 'not part of any package\n' >"$f/share/readme.txt" && chmod 444 "$f/share/readme.txt"

    local R=$MNT/root s
    # fw: three 8 MiB firmware images and a config file.
    s=$p/src/fw && mkdir -p "$s/fw" "$s/etc"
    for n in boot fpga mcu; do rand_file "$s/fw/$n.bin" 8M; done
    printf 'level = 2\nextra = true\n' >"$s/etc/app.conf"
    cat >"$s/manifest.json" <<EOF
{"version": "2.0.0", "modules": [
 {"name": "fw-boot", "src": "fw/boot.bin", "dst": "$R/fw/boot.bin"},
 {"name": "fw-fpga", "src": "fw/fpga.bin", "dst": "$R/fw/fpga.bin"},
 {"name": "fw-mcu", "src": "fw/mcu.bin", "dst": "$R/fw/mcu.bin", "mode": "0600"},
 {"name": "conf", "src": "etc/app.conf", "dst": "$R/etc/app.conf"}]}
EOF
    # many: 300 single-file modules, 150 over existing files, 150 new in 15 new directories.
    s=$p/src/many && mkdir -p "$s/m"
    {
        echo '{"version": "2.0.0", "modules": ['
        local sep=''
        for n in $(seq -w 0 149); do
            rand_file "$s/m/f$n" $((500 + 10#$n * 13))
            printf '%s {"name": "m%s", "src": "m/f%s", "dst": "%s/share/small/f%s"}\n' "$sep" "$n" "$n" "$R" "$n"
            sep=,
        done
        for n in $(seq -w 0 149); do
            rand_file "$s/m/g$n" $((300 + 10#$n * 7))
            printf ', {"name": "n%s", "src": "m/g%s", "dst": "%s/share/new/d%02d/g%s"}\n' "$n" "$n" "$R" $((10#$n / 10)) "$n"
        done
        echo ']}'
    } >"$s/manifest.json"
    # dir: a directory module (10 files over existing ones, 30 new in nested new directories)
    # and three binaries, one with a new mode.
    s=$p/src/dir && mkdir -p "$s/lib/plugins/a" "$s/lib/plugins/b/c" "$s/bin"
    for n in $(seq 0 9); do rand_file "$s/lib/lib$n.so" $((3000 * (n + 2))); done
    for n in $(seq 0 14); do rand_file "$s/lib/plugins/a/p$n.so" $((2000 + n * 100)); done
    for n in $(seq 0 14); do rand_file "$s/lib/plugins/b/c/q$n.so" $((1500 + n * 50)); done
    chmod 755 "$s"/lib/plugins/a/*
    for n in device-api voice-app klippy; do rand_file "$s/bin/$n" 300K; done
    cat >"$s/manifest.json" <<EOF
{"version": "2.0.0", "modules": [
 {"name": "lib", "src": "lib/", "dst": "$R/opt/app/lib"},
 {"name": "device-api", "src": "bin/device-api", "dst": "$R/opt/app/bin/device-api", "mode": "0750"},
 {"name": "voice-app", "src": "bin/voice-app", "dst": "$R/opt/app/bin/voice-app"},
 {"name": "klippy", "src": "bin/klippy", "dst": "$R/opt/app/bin/klippy"}]}
EOF
    # mixed2 and mixed3: the two committed installs under the rollback scenarios.
    local v
    for v in 2 3; do
        s=$p/src/mixed$v && mkdir -p "$s/fw" "$s/bin" "$s/web/css" "$s/web/js"
        if [ $v = 2 ]; then rand_file "$s/fw/fpga.bin" 8M; else rand_file "$s/fw/mcu.bin" 8M; fi
        rand_file "$s/fw/boot.bin" 8M
        rand_file "$s/bin/device-api" 280K
        for n in $(seq 0 9); do rand_file "$s/web/page$n.html" $((2000 + n * 300)); done
        for n in $(seq 0 4); do rand_file "$s/web/css/s$n.css" 1200; rand_file "$s/web/js/j$n.js" 5000; done
        if [ $v = 3 ]; then
            # Half of the web files unchanged from version 2, ten more new ones.
            for n in $(seq 0 4); do cp "$p/src/mixed2/web/page$n.html" "$s/web/page$n.html"; done
            cp "$p/src/mixed2/web/css/"* "$s/web/css/"
            for n in $(seq 10 19); do rand_file "$s/web/page$n.html" 2500; done
        fi
        local fwmod
        if [ $v = 2 ]; then fwmod="{\"name\": \"fw-fpga\", \"src\": \"fw/fpga.bin\", \"dst\": \"$R/fw/fpga.bin\"}"
        else fwmod="{\"name\": \"fw-mcu\", \"src\": \"fw/mcu.bin\", \"dst\": \"$R/fw/mcu.bin\"}"; fi
        cat >"$s/manifest.json" <<EOF
{"version": "$v.0.0", "modules": [
 {"name": "fw-boot", "src": "fw/boot.bin", "dst": "$R/fw/boot.bin"},
 $fwmod,
 {"name": "device-api", "src": "bin/device-api", "dst": "$R/opt/app/bin/device-api"},
 {"name": "web", "src": "web/", "dst": "$R/share/web"}]}
EOF
    done
    # mixed4 (the gc scenario, on the v3 image): its commit prunes version 2 (keep_generations
    # = 2), so the collection after it removes version 2's backups (8 MiB of firmware and more).
    s=$p/src/mixed4 && mkdir -p "$s/fw" "$s/bin"
    rand_file "$s/fw/boot.bin" 8M
    rand_file "$s/bin/device-api" 290K
    cat >"$s/manifest.json" <<EOF
{"version": "4.0.0", "modules": [
 {"name": "fw-boot", "src": "fw/boot.bin", "dst": "$R/fw/boot.bin"},
 {"name": "device-api", "src": "bin/device-api", "dst": "$R/opt/app/bin/device-api"}]}
EOF
    # dv1 and dv2: the delta scenario. dv1 (1.0.0) is installed whole when the v1 image is made;
    # dv2 (2.0.0) reaches the device as a delta package against dv1.zip. Per file: fw/dsp.bin
    # (12 MiB, 4 windows of 4 MiB) changed in three places in three windows and grown by 64 KiB
    # (a patch); etc/dsp.conf, small, new random content (a patch is not worth it: whole); the
    # library unchanged (not shipped); a new plugin in two new directories (whole).
    s=$p/src/dv1 && mkdir -p "$s/fw" "$s/etc" "$s/lib"
    rand_file "$s/fw/dsp.bin" $((12 * 1048576 + 12345)) && chmod 600 "$s/fw/dsp.bin"
    rand_file "$s/etc/dsp.conf" 3000
    rand_file "$s/lib/libdsp.so" 300K && chmod 755 "$s/lib/libdsp.so"
    local dsp="{\"name\": \"dsp-fw\", \"src\": \"fw/dsp.bin\", \"dst\": \"$R/fw/dsp.bin\"},
 {\"name\": \"dsp-conf\", \"src\": \"etc/dsp.conf\", \"dst\": \"$R/etc/dsp.conf\", \"mode\": \"0640\"},
 {\"name\": \"dsp-lib\", \"src\": \"lib/libdsp.so\", \"dst\": \"$R/opt/dsp/lib/libdsp.so\"}"
    printf '{"version": "1.0.0", "modules": [\n %s]}\n' "$dsp" >"$s/manifest.json"
    s=$p/src/dv2 && mkdir -p "$s/fw" "$s/etc" "$s/lib" "$s/plugins"
    cp -p "$p/src/dv1/fw/dsp.bin" "$s/fw/dsp.bin"
    local at
    for at in $((1048576 + 0)):4096 $((5 * 1048576 + 777)):3000 $((9 * 1048576 + 4096)):16384; do
        head -c "${at#*:}" /dev/urandom | dd of="$s/fw/dsp.bin" bs=1 seek="${at%:*}" conv=notrunc status=none
    done
    head -c 65536 /dev/urandom >>"$s/fw/dsp.bin"
    rand_file "$s/etc/dsp.conf" 3100
    cp -p "$p/src/dv1/lib/libdsp.so" "$s/lib/libdsp.so"
    rand_file "$s/plugins/extra.so" 200K
    printf '{"version": "2.0.0", "modules": [\n %s,\n %s]}\n' "$dsp" \
        "{\"name\": \"dsp-extra\", \"src\": \"plugins/extra.so\", \"dst\": \"$R/opt/dsp/plugins/extra/extra.so\"}" >"$s/manifest.json"
    mkdir -p "$p/pkg"
    for s in fw many dir mixed2 mixed3 mixed4 dv1; do
        "$BIN" pack "$p/src/$s" -o "$p/pkg/$s.zip" >/dev/null
    done
    # The delta package the device gets, and the full package of the same tree: only the
    # oracle reads that one (the expected all-new state never comes from the delta package).
    "$BIN" pack "$p/src/dv2" -o "$p/pkg/dv2.zip" --delta-from "$p/pkg/dv1.zip" >"$p/pkg/dv2.pack.txt"
    "$BIN" pack "$p/src/dv2" -o "$p/pkg/dv2-full.zip" >/dev/null
    # The delta package must ship what the scenario says (else it tests something else): the
    # big file as one patch (against dv1's), the library not at all, the rest whole.
    python3 - "$p/pkg/dv2.zip" <<'EOF' || die "fixture error: the delta package $p/pkg/dv2.zip does not ship what the delta scenario needs ($(tr '\n' ' ' <"$p/pkg/dv2.pack.txt"))"
import json, sys, zipfile
z = zipfile.ZipFile(sys.argv[1])
m = json.loads(z.read("manifest.json"))
d = m["delta"]
names = set(z.namelist())
files = {k: len(v.get("patches", [])) for k, v in d["files"].items()}
patches = [n for n in names if n.startswith(".tope-delta/")]
ok = (m["modules"] == [] and d["from_versions"] == ["1.0.0"] and files == {"fw/dsp.bin": 1, "lib/libdsp.so": 0}
      and {"etc/dsp.conf", "plugins/extra.so"} <= names and "fw/dsp.bin" not in names and "lib/libdsp.so" not in names
      and len(patches) == 1 and z.getinfo(patches[0]).file_size < 1024 * 1024)
sys.exit(0 if ok else f"delta.files {files}, entries {sorted(names)}")
EOF
}

# Config files the engine gets in the guest; one per recovery policy.
write_configs() {
    local pol
    for pol in resume rollback; do
        cat >"$MNT/cfg-$pol.toml" <<EOF
state_dir = "$MNT/state"
allowed_roots = ["$MNT/root"]
service_manager = "none"
recovery = "$pol"
keep_generations = 2
EOF
    done
}

mkfs_img() {
    local img=$1 fs=$2
    rm -f "$img"
    case $fs in
        ext4) truncate -s 256M "$img" && mkfs.ext4 -q -F -b 4096 -E lazy_itable_init=0,lazy_journal_init=0 "$img" ;;
        xfs) truncate -s 320M "$img" && mkfs.xfs -q -f "$img" ;;
        *) die "unknown filesystem $fs" ;;
    esac
}

# The command line of each scenario's action (after `tope-updater --config CFG`).
scenario_cmd() {
    case $1 in
        fw | many | dir) echo "install $MNT/pkg/$1.zip" ;;
        rollback) echo "rollback" ;;
        gc) echo "install $MNT/pkg/mixed4.zip" ;;
        factory) echo "rollback --to factory" ;;
        delta) echo "install $MNT/pkg/dv2.zip" ;;
        *) die "unknown scenario $1" ;;
    esac
}
scenario_base() { case $1 in fw | many | dir) echo factory ;; delta) echo v1 ;; *) echo v3 ;; esac; }

# The package lib/oracle.py computes an install of package $1 (a name in the payload's pkg/)
# from: a delta package's full twin, made by `pack` from the same source tree. The oracle
# refuses a delta package: the expected tree must not come from what the engine installs.
oracle_pkg() { case $1 in dv2.zip) echo dv2-full.zip ;; *) echo "$1" ;; esac; }

# scenario_base + scenario_cmd told to lib/oracle.py: the steps from the factory tree to the
# base of scenario $2 ($3 = before) or to its end ($3 = after). $1: the payload directory.
oracle_steps() {
    local p=$1 scn=$2 when=$3
    case $(scenario_base "$scn") in
        v3) echo "$p/pkg/mixed2.zip" "$p/pkg/mixed3.zip" ;;
        v1) echo "$p/pkg/dv1.zip" ;;
    esac
    [ "$when" = after ] || return 0
    case $scn in
        fw | many | dir) echo "$p/pkg/$scn.zip" ;;
        gc) echo "$p/pkg/mixed4.zip" ;;
        delta) echo "$p/pkg/$(oracle_pkg dv2.zip)" ;;
        rollback) echo rollback ;;
        factory) echo factory ;;
        *) die "unknown scenario $scn" ;;
    esac
}

# What is done after every cut once `recover` has left the tree on side $2 (old|new) of
# scenario $1, to show the device is still serviceable: a rollback to the previous generation,
# then to the factory while something is still installed; a second install when nothing is
# (delta: when the cut install of 2.0.0 was undone, the same delta package again, over 1.0.0).
# Prints the operations: rollback (`rollback`), factory (`rollback --to factory`), install:PKG
# (`install --force MNT/pkg/PKG`, a package on that image; --force because the cut install may
# have been rolled back, and the engine refuses such a package again without it, SPEC §3).
post_ops() {
    case $1:$2 in
        fw:old | many:old | dir:old) echo "install:$1.zip" ;;   # factory, nothing installed
        fw:new | many:new | dir:new) echo rollback ;;           # previous = the factory
        rollback:new) echo rollback ;;                          # 2.0.0, whose previous is the factory
        factory:new) echo install:mixed4.zip ;;                 # factory again
        rollback:old | factory:old | gc:old) echo rollback factory ;;  # 3.0.0 -> 2.0.0 -> factory
        gc:new) echo rollback factory ;;                        # 4.0.0 -> 3.0.0 -> factory
        delta:old) echo install:dv2.zip ;;                      # 1.0.0: the delta package again
        delta:new) echo rollback ;;                             # 2.0.0 -> 1.0.0
        *) die "post_ops: unknown scenario side $1 $2" ;;
    esac
}

# The lib/oracle.py step of a post-cut operation $2 (payload directory $1).
post_step() {
    case $2 in
        rollback | factory) echo "$2" ;;
        install:*) echo "$1/pkg/$(oracle_pkg "${2#install:}")" ;;
        *) die "post_step: unknown operation $2" ;;
    esac
}

# Runs the operations $4... natively on image $1 (filesystem $2), dumping the tree after each
# to $3.1, $3.2, ...; each must succeed.
engine_ops() {
    local img=$1 fs=$2 out=$3
    shift 3
    in_ns "$img" "$fs" '
        bin=$1 dump=$2 out=$3; shift 3
        c='"$MNT"'/cfg-resume.toml
        k=0
        for op in "$@"; do
            k=$((k + 1))
            case $op in
                rollback) args=(rollback) ;;
                factory) args=(rollback --to factory) ;;
                install:*) args=(install --force '"$MNT"'/pkg/${op#install:}) ;;
            esac
            "$bin" --config $c "${args[@]}" >"$out.$k.log" 2>&1 || { echo "$op failed:"; cat "$out.$k.log"; exit 1; } >&2
            BB=busybox busybox sh "$dump" '"$MNT"' >"$out.$k"
        done' "$BIN" "$PCDIR/lib/dump.sh" "$out" "$@"
}

# Dies unless the engine's dump $1 equals the oracle's dump $2, both of the state $3: an engine
# that always wrote a wrong mode or content, or dropped a file, would otherwise make a wrong
# expectation and then match it after every cut.
oracle_check() {
    local engine=$1 oracle=$2 what=$3
    cmp -s "$oracle" "$engine" && return 0
    log "$what: first differing lines (- lib/oracle.py from the package rules, + the uncut engine run):"
    { diff -u "$oracle" "$engine" || true; } | tail -n +3 | grep '^[-+]' | head -n 20 >&2 || true
    die "engine or fixture error: the uncut engine run of $what is not what the package rules say (both dumps kept: $engine, $oracle)"
}

# Sets IMGS (directory with <fs>/{factory,v3}.img and <fs>/expect/) for the current BIN.
prep_images() {
    local fslist=("$@") key
    # Keyed by everything that shapes the images: the engine, the scripts that make them.
    key=$( { sha "$BIN" "$PCDIR/lib/dump.sh" "$PCDIR/lib/oracle.py" /bin/busybox
        declare -f gen_payload write_configs mkfs_img scenario_cmd scenario_base oracle_pkg oracle_steps oracle_check prep_images in_ns \
            post_ops post_step engine_ops prep_fs_images
        echo "${SCENARIOS[*]}"; mkfs.ext4 -V 2>&1 | sed -n 1p; mkfs.xfs -V; } | sha | cut -c1-16)
    IMGS=$CACHE/images-$key
    local payload=$CACHE/payload-$key
    local fs pids=() names=() i
    for fs in "${fslist[@]}"; do
        [ -e "$IMGS/$fs/ready" ] && continue
        [ -e "$payload/ready" ] || { log "generating payloads"; gen_payload "$payload"; touch "$payload/ready"; }
        # One filesystem per core: the engine runs natively, one loop mount at a time each.
        prep_fs_images "$fs" "$payload" &
        pids+=($!) names+=("$fs")
    done
    for i in "${!pids[@]}"; do
        wait "${pids[i]}" || die "preparing the ${names[i]} images failed (above)"
    done
    return 0
}

# prep_fs_images FS PAYLOAD: the images and expected states of one filesystem (prep_images).
prep_fs_images() {
    local fs=$1 payload=$2
    (
        log "preparing $fs images in $IMGS/$fs"
        local d=$IMGS/$fs
        rm -rf "$d" && mkdir -p "$d/expect"
        # factory.img: the factory tree, the packages of the install scenarios, configs.
        mkfs_img "$d/factory.img" "$fs"
        in_ns "$d/factory.img" "$fs" '
            set -e
            p=$1
            mkdir -p '"$MNT"'/root '"$MNT"'/state '"$MNT"'/pkg
            cp -a "$p/factory/." '"$MNT"'/root/
            cp "$p/pkg/fw.zip" "$p/pkg/many.zip" "$p/pkg/dir.zip" '"$MNT"'/pkg/
            '"$(declare -f write_configs); MNT=$MNT; write_configs"'
            sync' "$payload"
        # v3.img: factory, then 2.0.0 and 3.0.0 installed (committed) by the engine itself, and
        # the package of the gc scenario.
        cp --sparse=always "$d/factory.img" "$d/v3.img"
        in_ns "$d/v3.img" "$fs" '
            set -e
            p=$1 bin=$2
            cp "$p/pkg/mixed2.zip" "$p/pkg/mixed3.zip" "$p/pkg/mixed4.zip" '"$MNT"'/pkg/
            rm -f '"$MNT"'/pkg/fw.zip '"$MNT"'/pkg/many.zip '"$MNT"'/pkg/dir.zip
            "$bin" --config '"$MNT"'/cfg-resume.toml install '"$MNT"'/pkg/mixed2.zip >/dev/null 2>&1
            "$bin" --config '"$MNT"'/cfg-resume.toml install '"$MNT"'/pkg/mixed3.zip >/dev/null 2>&1
            rm -f '"$MNT"'/pkg/mixed2.zip '"$MNT"'/pkg/mixed3.zip
            sync' "$payload" "$BIN"
        # v1.img: factory, then 1.0.0 of the delta scenario installed (committed) from its full
        # package, and the delta package of 2.0.0.
        cp --sparse=always "$d/factory.img" "$d/v1.img"
        in_ns "$d/v1.img" "$fs" '
            set -e
            p=$1 bin=$2
            cp "$p/pkg/dv1.zip" "$p/pkg/dv2.zip" '"$MNT"'/pkg/
            rm -f '"$MNT"'/pkg/fw.zip '"$MNT"'/pkg/many.zip '"$MNT"'/pkg/dir.zip
            "$bin" --config '"$MNT"'/cfg-resume.toml install '"$MNT"'/pkg/dv1.zip >/dev/null 2>&1
            rm -f '"$MNT"'/pkg/dv1.zip
            sync' "$payload" "$BIN"
        # Expected states: before = the base image; after = the action run uncut on a copy.
        local scn
        for scn in "${SCENARIOS[@]}"; do
            local tmp=$d/expect/tmp.img
            cp --sparse=always "$d/$(scenario_base "$scn").img" "$tmp"
            in_ns "$tmp" "$fs" '
                set -e
                bin=$1 dump=$2 out=$3; shift 3
                c='"$MNT"'/cfg-resume.toml
                BB=busybox busybox sh "$dump" '"$MNT"' >"$out.before"
                v() { "$bin" --config $c status --json | sed -n "s/.*\"current\":{[^}]*\"version\":\"\([^\"]*\)\".*/\1/p"; }
                b=$(v); b=${b:-factory}
                "$bin" --config $c "$@" >"$out.log" 2>&1 || { cat "$out.log" >&2; exit 1; }
                BB=busybox busybox sh "$dump" '"$MNT"' >"$out.after"
                a=$(v); a=${a:-factory}
                echo "$b $a" >"$out.versions"' "$BIN" "$PCDIR/lib/dump.sh" "$d/expect/$scn" $(scenario_cmd "$scn") ||
                die "the uncut $scn action failed on $fs: $(cat "$d/expect/$scn.log")"
            mv "$tmp" "$d/expect/$scn.img"
            cmp -s "$d/expect/$scn.before" "$d/expect/$scn.after" && die "fixture error: $scn changes nothing"
            grep -q '^X ' "$d/expect/$scn.after" && die "the uncut $scn action left temporary files"
            # The cuts are judged against .before/.after: both must be what the package rules
            # say, not merely what this engine did (so the v3 base, made by the engine's own
            # installs of 2.0.0 and 3.0.0, must equal factory + mixed2 + mixed3 by the rules).
            local when what
            for when in before after; do
                what="$scn.$when on $fs (the $(scenario_base "$scn") image)"
                [ $when = after ] && what="$scn.$when on $fs (the $(scenario_base "$scn") image, then $(scenario_cmd "$scn"))"
                # shellcheck disable=SC2046 # the steps are words (paths without spaces)
                python3 "$PCDIR/lib/oracle.py" "$MNT/root" "$payload/factory" $(oracle_steps "$payload" "$scn" $when) \
                    >"$d/expect/$scn.oracle.$when" || die "lib/oracle.py failed for $what"
                oracle_check "$d/expect/$scn.$when" "$d/expect/$scn.oracle.$when" "$what"
            done
            # The post-cut operations from each side, run uncut by the engine natively, must
            # leave what the oracle says too; the guest compares against these hashes.
            local side steps ops k line
            : >"$d/expect/$scn.post"
            for side in old new; do
                when=before; [ $side = new ] && when=after
                read -r -a ops <<<"$(post_ops "$scn" $side)"
                tmp=$d/expect/tmp.img
                if [ $side = old ]; then cp --sparse=always "$d/$(scenario_base "$scn").img" "$tmp"
                else cp --sparse=always "$d/expect/$scn.img" "$tmp"; fi
                engine_ops "$tmp" "$fs" "$d/expect/$scn.post.$side" "${ops[@]}" ||
                    die "the post-cut operations ${ops[*]} failed on the uncut $scn.$when on $fs"
                rm -f "$tmp"
                # shellcheck disable=SC2046 # the steps are words (paths without spaces)
                steps=$(oracle_steps "$payload" "$scn" $when | tr '\n' ' ')
                line="post $scn $(sha "$d/expect/$scn.$when")"
                k=0
                for op in "${ops[@]}"; do
                    k=$((k + 1))
                    steps="$steps $(post_step "$payload" "$op")"
                    # shellcheck disable=SC2086
                    python3 "$PCDIR/lib/oracle.py" "$MNT/root" "$payload/factory" $steps \
                        >"$d/expect/$scn.post.$side.$k.oracle" || die "lib/oracle.py failed for $scn.$when + ${ops[*]:0:k}"
                    oracle_check "$d/expect/$scn.post.$side.$k" "$d/expect/$scn.post.$side.$k.oracle" \
                        "$scn.$when on $fs, then the post-cut ${ops[*]:0:k}"
                    line="$line $op=$(sha "$d/expect/$scn.post.$side.$k.oracle")"
                done
                echo "$line" >>"$d/expect/$scn.post"
            done
            rm -f "$d/expect/$scn.img"
        done
        log "$fs: the uncut runs of ${SCENARIOS[*]} equal the package rules (lib/oracle.py), before and after, and so do the post-cut operations from both sides"
        touch "$d/ready"
    )
}

prep_all() {
    local fslist=("$@")
    prep_kernel "${PC_KERNEL:-}"
    prep_initramfs
    prep_images "${fslist[@]}"
    # Mark what this run uses, so pruning keeps it.
    touch "$INITRD" "$IMGS" "${IMGS/images-/payload-}" 2>/dev/null || true
    prune_cache
}

# Every engine build makes its own initramfs and images: keep the 4 most recently used of
# each, and the 20 newest run directories (failures' evidence included).
prune_cache() {
    local prefix
    # `ls` fails when nothing matches (a fresh checkout has no output dir yet): that is not
    # an error here, and under `set -e -o pipefail` it must not become one.
    for prefix in initramfs- images- payload-; do
        { ls -dt "$CACHE/$prefix"* 2>/dev/null || true; } | tail -n +5 | xargs -r rm -rf
    done
    { ls -dt "$OUTROOT"/*-20[0-9][0-9]* 2>/dev/null || true; } | tail -n +21 | xargs -r rm -rf
}

# ------------------------------------------------------------------ QEMU

# qemu_start LOG CTLFILE DISK... : starts QEMU in the background, sets QPID.
# A disk argument is a path, optionally followed by ",snapshot=on".
qemu_start() {
    local logf=$1 ctl=$2
    shift 2
    local drives=(-drive "file=$ctl,format=raw,if=virtio,cache=unsafe")
    local d
    for d in "$@"; do
        local file=${d%%,*} extra=
        [ "$file" != "$d" ] && extra=,${d#*,}
        drives+=(-drive "file=$file,format=raw,if=virtio,cache=unsafe$extra")
    done
    local accel=(-accel tcg -cpu max)
    [ "$ACCEL" = kvm ] && accel=(-accel kvm -cpu host)
    : >"$logf"
    echo "qemu ${drives[*]}" >"$logf.qemu"
    qemu-system-x86_64 "${accel[@]}" -m 1G -smp 1 -M pc -bios /usr/share/qemu/qboot.rom \
        -display none -nodefaults -no-reboot -serial "file:$logf" \
        -kernel "$VMLINUX" -initrd "$INITRD" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off cryptomgr.notests nokaslr audit=0 tsc=reliable no_timer_check random.trust_cpu=on" \
        "${drives[@]}" </dev/null >>"$logf.qemu" 2>&1 &
    QPID=$!
}

# Ends the control disk FILE (written by the caller: not through a pipe, which would run the
# caller's block in a subshell and lose its variables).
end_ctl() {
    local f=$1
    echo end >>"$f"
    truncate -s 256K "$f"
}

# wait_for LOG REGEX TIMEOUT_S: 0 when a line matches, 1 on timeout or QEMU exit.
wait_for() {
    local logf=$1 re=$2 t=$3 end
    end=$(($(now_ms) + t * 1000))
    while [ "$(now_ms)" -lt $end ]; do
        grep -qE "$re" "$logf" 2>/dev/null && return 0
        kill -0 "$QPID" 2>/dev/null || { grep -qE "$re" "$logf" 2>/dev/null && return 0; return 1; }
        sleep 0.05
    done
    return 1
}

# wait_line LOG REGEX TIMEOUT_S: like wait_for, but reads the log as it grows (tail -f, no
# polling), so the caller acts within a millisecond or two of the guest's line: the kill that
# follows @@CUTNOW must come at the moment the guest chose. Sets LINE to the matching line.
wait_line() {
    local logf=$1 re=$2 t=$3 fd tpid rc=1 end
    LINE=
    exec {fd}< <(exec tail -n +1 -f --pid="$QPID" "$logf" 2>/dev/null)
    tpid=$!
    end=$((SECONDS + t))
    local buf='' st
    while [ $SECONDS -lt $end ]; do
        if IFS= read -r -t 1 -u "$fd" LINE; then
            LINE=$buf${LINE%$'\r'} buf=
            [[ $LINE =~ $re ]] && { rc=0; break; }
            continue
        fi
        st=$?
        # A timeout keeps the part of a line read so far.
        [ $st -gt 128 ] && buf+=$LINE
        if ! kill -0 "$QPID" 2>/dev/null; then
            LINE=$(tr -d '\r' <"$logf" | grep -m1 -E "$re") && rc=0
            break
        fi
        [ $st -gt 128 ] || sleep 0.05
    done
    kill "$tpid" 2>/dev/null || true
    exec {fd}<&-
    return $rc
}

qemu_kill() {
    kill -KILL "$QPID" 2>/dev/null || true
    wait "$QPID" 2>/dev/null || true
}

# ------------------------------------------------------------------ judging a check

# Expected states of a scenario on a filesystem: sets EXP_BEFORE, EXP_AFTER (dump files),
# H_BEFORE, H_AFTER (their hashes), V_BEFORE, V_AFTER (versions).
load_expect() {
    local scn=$1 fs=$2
    EXP_BEFORE=$IMGS/$fs/expect/$scn.before
    EXP_AFTER=$IMGS/$fs/expect/$scn.after
    H_BEFORE=$(sha "$EXP_BEFORE")
    H_AFTER=$(sha "$EXP_AFTER")
    read -r V_BEFORE V_AFTER <"$IMGS/$fs/expect/$scn.versions"
}

# The guest's `expect` and `post` lines for the images of filesystem $1 (lib/check.sh).
expect_lines() {
    local fs=$1 scn
    for scn in "${SCENARIOS[@]}"; do
        load_expect "$scn" "$fs"
        echo "expect $scn $H_BEFORE $H_AFTER"
        cat "$IMGS/$fs/expect/$scn.post"
    done
}

# Explains a dump that matches neither side: per path, old / new / neither.
explain_dump() {
    local live=$1
    awk -v B="$EXP_BEFORE" -v A="$EXP_AFTER" '
        function key(line,   n, f) { n = split(line, f, " "); return f[n] }
        BEGIN {
            while ((getline l < B) > 0) { if (l !~ /^X /) { b[key(l)] = l; all[key(l)] = 1 } }
            while ((getline l < A) > 0) { if (l !~ /^X /) { a[key(l)] = l; all[key(l)] = 1 } }
        }
        /^X / { left = left " " $2; next }
        { k = key($0); live[k] = $0; all[k] = 1 }
        END {
            for (k in all) {
                L = (k in live) ? live[k] : "absent"; O = (k in b) ? b[k] : "absent"; N = (k in a) ? a[k] : "absent"
                if (O == N) {
                    if (L != O) { other++; ex = ex "\n    " k ": " (k ~ /\.tope-/ ? "temporary file" : "untouched path changed: " L) }
                    continue
                }
                if (L == O) { old++; continue }
                if (L == N) { new++; continue }
                neither++
                split(L, f, " ")
                why = "neither old nor new"
                if (L == "absent") why = "absent"
                else if (f[1] == "F" && f[3] == 0) why = "ZERO-LENGTH"
                else if (k ~ /\.tope-/) why = "temporary file"
                else if (f[1] == "F") {
                    split(O, o, " "); split(N, nn, " ")
                    if (f[4] == o[4] || f[4] == nn[4]) why = "right content, wrong mode"
                    else why = "TORN or foreign content (size " f[3] ")"
                }
                if (shown++ < 12) ex = ex "\n    " k ": " why
            }
            printf "old=%d new=%d neither=%d untouched-changed=%d", old, new, neither, other
            if (old && new) printf " MIXED"
            if (left != "") printf " leftovers:%s", left
            printf "%s", ex
        }' "$live"
}

# The first differing lines between the oracle's dump $1 and the dump $2, on one line.
dump_diff() {
    { diff -u "$1" "$2" || true; } | tail -n +3 | grep '^[-+]' | head -n 6 | sed 's/^-/oracle: /; s/^+/engine: /' | paste -sd'|' - || true
}

# classify ID RESULTS_FILE SIDE [TWO]: where a cut fell, from what `recover` said after it
# (the @@OUT ID rec1 lines) and the side the tree ended on: in-flight when recover found a transaction begun and not ended
# (it finished or rolled back something), otherwise before (all old: it had not begun) or
# after (all new: it had ended). For a `…+recover` cut (TWO = 1): in-flight when the recovery
# itself was cut before it ended, otherwise after.
classify() {
    local id=$1 rf=$2 side=$3 two=${4:-0} r
    r=$(grep -m1 "^@@OUT $id rec1: recover: " "$rf" || true)
    if [[ $r == *"recover: nothing in flight"* ]]; then
        if [ "$two" = 1 ]; then echo after; return; fi
        case $side in old) echo before ;; new) echo after ;; *) echo '?' ;; esac
    elif [ -n "$r" ]; then
        echo in-flight
    else
        echo '?'
    fi
}

# judge ID RESULTS_FILE SCENARIO FS ACKED [SAME_AS_SIDE]
# RESULTS_FILE holds the @@ lines of that id. Appends a row to $RESULTS, prints a verdict.
# Sets SIDE (old|new|?) and CLASS (before|in-flight|after|?). Context from the caller: KIND,
# POLICY, LABEL (the scenario, or SCENARIO+recover), WHEN (the cut moment asked for), AIM
# (targeted: aimed at the transaction; free; retry; -), FIRST (for a +recover cut: whether the
# first cut left a transaction in flight), BATCH, HOW (how the guest cut: time, guard, exited,
# notrigger).
judge() {
    local id=$1 rf=$2 scn=$3 fs=$4 acked=$5 same=${6:-} kind=${KIND:-?} policy=${POLICY:-resume}
    load_expect "$scn" "$fs"
    local line reasons=() side='?' cls='?' post='-'
    line=$(grep -m1 "^@@CHECK $id " "$rf" || true)
    local rcs='-' mcs='-'
    if [ "${HOW:-}" = notrigger ]; then
        reasons+=("TRIGGER NEVER APPEARED: the engine exited without logging the line the cut waited for (${WHEN:-?}): the cut did not test what it was drawn to test")
    fi
    if [ -z "$line" ] && grep -q "^@@HANG $id " "$rf"; then
        reasons+=("THE CHECK HUNG in the guest: $(grep "^@@OUT $id hang: pid" "$rf" | head -3 | sed "s/^@@OUT $id hang: //" | tr '\n' ';') (blocked tasks: @@OUT $id dmesg lines)")
    elif [ -z "$line" ]; then
        reasons+=("no check result (guest died or hung?)")
    elif [[ $line == *mount=fail* ]]; then
        reasons+=("mount failed: $(grep "^@@OUT $id mount:" "$rf" | head -3 | tr '\n' ' ')")
    else
        local kv
        declare -A f=()
        for kv in ${line#@@CHECK $id }; do f[${kv%%=*}]=${kv#*=}; done
        rcs=${f[recover_cs]:-'-'} mcs=${f[mount_cs]:-'-'}
        case ${f[recover_rc]} in 0 | 4) ;; *) reasons+=("recover exited ${f[recover_rc]}") ;; esac
        # Recovery may roll back by policy, never because the journal lied: a phase is
        # journaled only after the effects of the earlier phases are durable (journal-format
        # §5.3), so what resuming needs must be there.
        if grep -q "^@@OUT $id [a-z0-9-]*: .*cannot resume" "$rf"; then
            reasons+=("WRITE-AHEAD VIOLATION: recovery found content the journal had declared durable missing: $(grep -m1 -o "cannot resume.*" "$rf")")
        fi
        # The same rule for the swap: a phase after Swapped is journaled only once the renames
        # are durable (syncfs), so a recovery that re-verifies the targets must find them new.
        if grep -q "^@@OUT $id [a-z0-9-]*: .*does not hold its new content after the swap" "$rf"; then
            reasons+=("WRITE-AHEAD VIOLATION: the journal said the swap was done, a target did not hold its new content: $(grep -m1 -o "[^ ]* does not hold its new content after the swap" "$rf")")
        fi
        if [ "${f[recover2_rc]}" != 0 ] || ! grep -q "^@@OUT $id rec2: recover: nothing in flight" "$rf"; then
            reasons+=("a second recover was not a no-op (rc ${f[recover2_rc]}): $(grep "^@@OUT $id rec2:" "$rf" | head -2 | tr '\n' ' ')")
        fi
        [ "${f[status_rc]}" = 0 ] || reasons+=("status exited ${f[status_rc]} (journal does not open?): $(grep "^@@OUT $id status-err:" "$rf" | head -2 | tr '\n' ' ')")
        local st
        st=$(grep -m1 "^@@STATUS $id " "$rf" || true)
        [[ $st == *'"in_flight":null'* ]] || reasons+=("a transaction is still in flight after recover")
        local cur
        cur=$(sed -n 's/.*"current":{[^}]*"version":"\([^"]*\)".*/\1/p' <<<"$st")
        cur=${cur:-factory}
        if [ "${f[dump]}" = "$H_BEFORE" ]; then
            side=old
            [ "$cur" = "$V_BEFORE" ] || reasons+=("files are all old but status says current $cur (expected $V_BEFORE)")
        elif [ "${f[dump]}" = "$H_AFTER" ]; then
            side=new
            [ "$cur" = "$V_AFTER" ] || reasons+=("files are all new but status says current $cur (expected $V_AFTER)")
        else
            local live
            live=$(mktemp)
            grep "^@@DUMP $id " "$rf" | sed "s/^@@DUMP $id //" >"$live"
            if [ -s "$live" ]; then
                reasons+=("NOT ALL-OLD-OR-ALL-NEW: $(explain_dump "$live")")
            else
                reasons+=("dump hash ${f[dump]} matches neither side and no dump was printed")
            fi
            rm -f "$live"
        fi
        case $acked in
            new) [ "$side" = new ] || [ "$side" = '?' ] || reasons+=("LOST AN ACKNOWLEDGED COMMIT: the engine had reported success, files are $side") ;;
            old) [ "$side" = old ] || [ "$side" = '?' ] || reasons+=("the engine had reported a completed rollback, files are $side") ;;
        esac
        if [ -n "$same" ] && [ "$same" != '?' ] && [ "$side" != '?' ] && [ "$side" != "$same" ]; then
            reasons+=("recovery cut and resumed ended $side, recovery of the same image uncut ended $same")
        fi
        # After the cut, the device must stay serviceable: verify, then the post-cut
        # operations (post_ops), each leaving lib/oracle.py's tree.
        if [ "$side" != '?' ]; then
            local v pl op want k=0 pline prc pdump ok=verify
            v=$(grep -m1 "^@@VERIFY $id " "$rf" || true)
            if [ -z "$v" ]; then
                reasons+=("no verify result after recover")
            elif [ "$(sed -n 's/.* rc=\([^ ]*\).*/\1/p' <<<"$v")" != 0 ]; then
                reasons+=("VERIFY FAILED after recover (rc $(sed -n 's/.* rc=\([^ ]*\).*/\1/p' <<<"$v")): $(grep "^@@OUT $id verify:" "$rf" | head -3 | sed "s/^@@OUT $id verify: //" | paste -sd'|' -)")
            fi
            pl=$(grep -m1 "^post $scn ${f[dump]} " "$IMGS/$fs/expect/$scn.post" || true)
            for op in ${pl#post $scn ${f[dump]} }; do
                k=$((k + 1))
                want=${op#*=} op=${op%%=*}
                local desc="\`$op\`"
                case $op in rollback) desc="\`rollback\`" ;; factory) desc="\`rollback --to factory\`" ;; install:*) desc="\`install ${op#install:}\`" ;; esac
                pline=$(grep -m1 "^@@POST $id op=$op " "$rf" || true)
                if [ -z "$pline" ]; then
                    reasons+=("POST-CUT $desc did not run"); break
                fi
                prc=$(sed -n 's/.* rc=\([^ ]*\) .*/\1/p' <<<"$pline")
                pdump=$(sed -n 's/.* dump=\([^ ]*\) .*/\1/p' <<<"$pline")
                if [ "$prc" != 0 ]; then
                    reasons+=("POST-CUT $desc FAILED (rc $prc): $(grep "^@@OUT $id post-$op:" "$rf" | grep -v ' INFO \| DEBUG ' | head -3 | sed "s/^@@OUT $id post-$op: //" | paste -sd'|' -)")
                    break
                fi
                if [ "$pdump" != "$want" ]; then
                    local got
                    got=$(mktemp)
                    grep "^@@PDUMP $id $op " "$rf" | sed "s/^@@PDUMP $id $op //" >"$got"
                    local ors=old
                    [ "${f[dump]}" = "$H_AFTER" ] && ors=new
                    reasons+=("POST-CUT $desc left a tree that is not lib/oracle.py's: $(dump_diff "$IMGS/$fs/expect/$scn.post.$ors.$k.oracle" "$got")")
                    rm -f "$got"
                    break
                fi
                ok="$ok+$op"
            done
            [ -n "$pl" ] || reasons+=("no post-cut operations known for $scn with this tree (harness error)")
            post=$ok
        fi
    fi
    local two=0
    [[ ${LABEL:-} == *+recover ]] && two=1
    cls=$(classify "$id" "$rf" "$side" "$two")
    SIDE=$side CLASS=$cls
    local verdict=PASS
    [ ${#reasons[@]} -eq 0 ] || verdict=FAIL
    local why
    why=$(printf '%s; ' "${reasons[@]}")
    local flat=${why%; }
    flat=${flat//$'\n'    / | }
    flat=${flat//$'\n'/ | }
    flat=${flat//$'\t'/ }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$id" "${LABEL:-$scn}" "$fs" "$policy" "$acked" "$side" "$verdict" "$rcs" "$mcs" "$flat" \
        "$cls" "${WHEN:--}" "${FIRST:--}" "$post" "${AIM:--}" "${BATCH:--}" >>"$RESULTS"
    if [ $verdict = PASS ]; then
        log "cut $id [$kind ${LABEL:-$scn} $fs $policy] PASS: $cls, $side (acked $acked, recover ${rcs}0 ms, then $post)"
    else
        log "cut $id [$kind ${LABEL:-$scn} $fs $policy] FAIL: ${why%; }"
    fi
    [ $verdict = PASS ]
}

keep() {
    # keep ID FILES...: copies evidence of a failure to $KEPT/ID/.
    local id=$1
    shift
    mkdir -p "$KEPT/$id"
    cp --sparse=always "$@" "$KEPT/$id/" 2>/dev/null || true
    log "kept $KEPT/$id"
}

# ------------------------------------------------------------------ random numbers and cut moments

# Deterministic from PC_SEED: rnd N -> 0..N-1 in R (a 64-bit LCG, high bits).
RNG=1
rnd() {
    RNG=$((RNG * 6364136223846793005 + 1442695040888963407))
    R=$((((RNG >> 33) & 0x7fffffff) % $1))
}

# Durations in ms, measured under TCG on the 2-core CI machine kind (load 1-3), per scenario;
# each run refines them (learn) from the engine's own timestamps. QEMU kill (DUR, WIN) and
# dm-flakey (FDUR, FWIN: a dm-snapshot under the filesystem) separately:
#   DUR, FDUR: the whole action, start to exit (free cuts: uniform over 9/8 of it);
#   WIN, FWIN: the transaction, from "transaction planned" (its begin commit is durable) to
#              "transaction committed" (its end commit is): what cuts aimed at it aim at;
#   RWIN:      a `recover` that finds a transaction in flight, start to exit (…+recover cuts).
declare -A DUR=([fw]=2600 [many]=1000 [dir]=500 [rollback]=1900 [factory]=1900 [gc]=1300 [delta]=1200 [recover]=600)
declare -A FDUR=([fw]=2800 [many]=1100 [dir]=600 [rollback]=2000 [factory]=2000 [gc]=1400 [delta]=1300 [recover]=600)
declare -A WIN=([fw]=900 [many]=330 [dir]=140 [rollback]=850 [factory]=1000 [gc]=550 [delta]=500)
declare -A FWIN=([fw]=1000 [many]=400 [dir]=160 [rollback]=950 [factory]=1050 [gc]=600 [delta]=550)
declare -A RWIN=([fw]=900 [many]=400 [dir]=300 [rollback]=700 [factory]=700 [gc]=600 [delta]=600)
declare -A DUR_SEEN=() FDUR_SEEN=() WIN_SEEN=() FWIN_SEEN=() RWIN_SEEN=()
# Where in the transaction (percent of WIN) the effects of a phase are done, from the
# measured runs (dir 45/55/64, many 48/60/76, factory 61/63/66).
declare -A PHASE_AT=([Staged]=50 [BackedUp]=58 [Swapped]=68)
# An aimed cut is drawn over this percentage of the window (or of what is left of it after
# the phase): the margin absorbs a faster machine or a lighter load than the measured one.
AIM_PCT=${PC_AIM_PCT:-70}

learn() { # learn ARRAY SEEN_ARRAY SCENARIO MS
    local -n arr=$1 seen=$2
    # The first duration seen replaces the default, later ones move the value a quarter of
    # the way (load spikes come and go). A duration far below the value is an action with
    # nothing to do (a `recover` that found nothing in flight): ignored.
    [ -n "$4" ] && [ "$4" -gt 0 ] || return 0
    [ $(($4 * 3)) -ge "${arr[$3]}" ] || return 0
    if [ -z "${seen[$3]:-}" ]; then arr[$3]=$4; else arr[$3]=$(((3 * arr[$3] + $4) / 4)); fi
    seen[$3]=1
}

# tx_ms FILE ID WHAT: ms from "transaction planned" to "transaction committed" in the engine
# lines `@@OUT ID WHAT: <ISO time> ...` of FILE (nothing if it did not get that far).
tx_ms() {
    tr -d '\r' <"$1" | awk -v p="@@OUT $2 $3:" '
        function ms(t,   a, h) { split(t, a, "T"); split(a[2], h, ":"); return ((h[1] * 60 + h[2]) * 60 + h[3]) * 1000 }
        $1 " " $2 " " $3 != p { next }
        /INFO transaction planned/ { b = ms($4) }
        /INFO transaction committed/ && b != "" { e = ms($4) }
        END { if (b != "" && e != "" && e >= b) printf "%d\n", e - b }'
}

# Learns from the check of cut ID in FILE: the post-cut operations that are a scenario's own
# action (a second install of fw/many/dir, `rollback` from 3.0.0) give that scenario's window;
# a recover that found a transaction in flight gives RWIN. $3: WIN or FWIN; $4: the scenario,
# $5: the side after recover, $6: the class, $7: recover wall time in cs.
learn_from_check() {
    local rf=$1 id=$2 win=$3 scn=$4 side=$5 cls=$6 rcs=$7 op w
    for op in install:fw.zip install:many.zip install:dir.zip install:dv2.zip rollback; do
        w=$(tx_ms "$rf" "$id" "post-$op")
        [ -n "$w" ] || continue
        case $op in
            install:dv2.zip) learn "$win" "${win/WIN/WIN_SEEN}" delta "$w" ;;
            install:*) learn "$win" "${win/WIN/WIN_SEEN}" "$(basename "${op#install:}" .zip)" "$w" ;;
            rollback) [ "$side" = old ] && [ "$(scenario_base "$scn")" = v3 ] && learn "$win" "${win/WIN/WIN_SEEN}" rollback "$w" ;;
        esac
    done
    if [ "$cls" = in-flight ] && [[ $rcs =~ ^[0-9]+$ ]]; then learn RWIN RWIN_SEEN "$scn" $((rcs * 10)); fi
}

# The scenarios of N cuts, balanced: rounds of a seeded shuffle of CUT_SCENARIOS, so each gets
# N/S cuts, give or take one. Sets PLAN.
plan_scenarios() {
    local n=$1 i j t s=("${CUT_SCENARIOS[@]}")
    PLAN=()
    while [ ${#PLAN[@]} -lt "$n" ]; do
        for ((i = ${#s[@]} - 1; i > 0; i--)); do rnd $((i + 1)); j=$R; t=${s[i]}; s[i]=${s[j]}; s[j]=$t; done
        for t in "${s[@]}"; do [ ${#PLAN[@]} -lt "$n" ] && PLAN+=("$t"); done
    done
    return 0
}

# Which of the planned cuts are free (a moment drawn over the whole action: before, inside or
# after the transaction) rather than aimed at the transaction: a quarter of them at most, and
# never so many that one missed aimed cut would break the floor (at least half of a scenario's
# cuts in flight): a scenario with N cuts gets at most (N-2)/2 free ones. Sets AIMS (parallel
# to PLAN: targeted or free).
plan_aims() {
    local -A cnt=() quota=()
    local s i
    for s in "${PLAN[@]}"; do cnt[$s]=$((${cnt[$s]:-0} + 1)); done
    for s in "${!cnt[@]}"; do quota[$s]=$(((cnt[$s] - 2) / 2)); done
    AIMS=()
    for ((i = 0; i < ${#PLAN[@]}; i++)); do
        s=${PLAN[i]}
        rnd 4
        if [ -z "${PC_TRIGGER:-}" ] && [ $R = 0 ] && [ "${quota[$s]}" -gt 0 ]; then
            AIMS+=(free); quota[$s]=$((quota[$s] - 1))
        else
            AIMS+=(targeted)
        fi
    done
}

# pick_when SCENARIO AIM WINDOW_ARRAY DURATION_ARRAY: sets WHEN (guest/init cut_wait):
#   targeted: half of the time "planned+MS", MS uniform over AIM_PCT % of the scenario's
#             window; otherwise "PHASE+MS" for a phase drawn from Staged, BackedUp, Swapped, MS
#             uniform over AIM_PCT % of what is left of the window after it (at most 150 ms):
#             cuts land all over the transaction and on every phase boundary. The guest cuts
#             at once if the effects of Verified are done first (the end commit is next).
#             PC_TRIGGER=PHASE forces the phase (planned: the begin), PC_TRIGGER=PHASE+MAX
#             also the bound of MS (instead of 150).
#   retry:    as targeted, with the moment of the missed cut ($5) halved.
#   free:     "MS", uniform over 9/8 of the whole action (about one in nine after it ends).
TRIG_PHASES=(Staged BackedUp Swapped)
pick_when() {
    local scn=$1 aim=$2 win dur
    local -n wa=$3 da=$4
    win=${wa[$scn]} dur=${da[$scn]}
    case $aim in
        free) rnd $((dur + dur / 8)); WHEN=$R; return ;;
        retry) WHEN=${5%+*}+$((${5#*+} / 2)); return ;;
    esac
    local ph='' left max=150
    if [ -n "${PC_TRIGGER:-}" ]; then
        ph=${PC_TRIGGER%+*}
        [[ $PC_TRIGGER == *+* ]] && max=${PC_TRIGGER#*+}
    else
        rnd 2
        [ $R = 1 ] && { rnd ${#TRIG_PHASES[@]}; ph=${TRIG_PHASES[$R]}; }
    fi
    if [ -z "$ph" ] || [ "$ph" = planned ]; then
        rnd $((win * AIM_PCT / 100 + 1)); WHEN=planned+$R
    else
        left=$((win * (100 - ${PHASE_AT[$ph]:-90}) / 100 * AIM_PCT / 100))
        [ $left -le "$max" ] || left=$max
        rnd $((left + 1)); WHEN=$ph+$R
    fi
}

# Lines every control file starts with: modules, the negative-control point, expectations.
ctl_head() {
    local mods=$1 f
    shift
    echo "mods $mods"
    [ -n "${NEG_POINT:-}" ] && echo "env TOPE_NEGATIVE_CONTROL=$NEG_POINT"
    # The guest's check watchdog (guest/init, CHECK_HANG_S); a small value tests it.
    [ -n "${PC_CHECK_HANG_S:-}" ] && echo "env PC_CHECK_HANG_S=$PC_CHECK_HANG_S"
    for f in "$@"; do expect_lines "$f"; done
}

# ------------------------------------------------------------------ kind 1: QEMU kill

# kill_run N FS... : N cuts (scenarios balanced, filesystems alternating per scenario), one
# boot each, plus extra ones: a `recover` cut now and then (on a copy of the previous cut
# image, while that cut was in flight), a retry of every aimed cut that missed the
# transaction, and a last boot that only checks.
kill_run() {
    local n=$1
    shift
    local fslist=("$@")
    KIND=kill
    local mods='' f
    for f in "${fslist[@]}"; do [ "$f" = xfs ] && mods=xfs; done
    plan_scenarios "$n"
    plan_aims
    local -A occ=() fsoff=() CLS_OF=() SIDE_OF=()
    local s i distinct=0
    # Filesystems: each scenario alternates between them, and the first cuts of the scenarios
    # alternate too (6 kills on ext4 and xfs: 3 and 3).
    rnd ${#fslist[@]}
    local off=$R
    for s in "${PLAN[@]}"; do
        [ -n "${fsoff[$s]:-}" ] && continue
        fsoff[$s]=$(((distinct + off) % ${#fslist[@]})) distinct=$((distinct + 1))
    done
    local PFS=() PPOL=()
    for ((i = 0; i < n; i++)); do
        s=${PLAN[i]}
        PFS+=("${fslist[$(((${occ[$s]:-0} + fsoff[$s]) % ${#fslist[@]}))]}")
        occ[$s]=$((${occ[$s]:-0} + 1))
        rnd 2; PPOL+=("$([ $R = 0 ] && echo resume || echo rollback)")
    done
    local qi=0 seq=0 retry=''
    # The previous cut, judged after the next boot (which checks its image).
    local prev='' p_img='' p_scn='' p_label='' p_fs='' p_pol='' p_acked='' p_same='' p_when='' p_aim='' p_how='' p_pred='' p_first='' p_what=''
    while :; do
        local id='' scn='' fs='' pol='' img='' aim='' label='' what=action first=- same='' src=''
        if [ -n "$retry" ]; then
            read -r scn fs pol p_retry_when <<<"$retry"
            retry='' aim=retry
            pick_when "$scn" retry WIN DUR "$p_retry_when"
        elif [ -n "$prev" ] && [ "$p_what" = action ] && [ "$p_pred" = in-flight ] && { rnd 6; [ $R = 0 ]; }; then
            # Cut `recover` itself, on a copy of the previous cut image (still unrecovered).
            what=recover scn=$p_scn fs=$p_fs pol=$p_pol aim=free src=$prev
            rnd $((RWIN[$scn] + RWIN[$scn] / 8)); WHEN=$R
        elif [ $qi -lt "$n" ]; then
            scn=${PLAN[qi]} fs=${PFS[qi]} pol=${PPOL[qi]} aim=${AIMS[qi]}
            qi=$((qi + 1))
            pick_when "$scn" "$aim" WIN DUR
        fi
        [ -z "$scn" ] && [ -z "$prev" ] && break
        if [ -n "$scn" ]; then
            seq=$((seq + 1)) id=${ID_PREFIX:-}k$seq img=$RUN/${ID_PREFIX:-}k$seq.img
            if [ $what = recover ]; then
                cp --sparse=always "$p_img" "$img"
                label=$scn+recover
            else
                cp --sparse=always "$IMGS/$fs/$(scenario_base "$scn").img" "$img"
                label=$scn
            fi
        fi
        local bid=${id:-${ID_PREFIX:-}k$seq-check} ctl logf disks=()
        ctl=$RUN/$bid.ctl logf=$RUN/$bid.log
        {
            ctl_head "$mods" "${fslist[@]}"
            [ -n "$prev" ] && { echo "check $prev /dev/vdb $p_fs $p_pol $p_scn"; disks+=("$p_img"); }
            if [ -n "$id" ]; then
                local dev=/dev/vdb cmd
                [ -n "$prev" ] && dev=/dev/vdc
                if [ $what = recover ]; then cmd=recover; else cmd=$(scenario_cmd "$scn"); fi
                echo "action $id $dev $fs $pol $WHEN $cmd"
                echo idle
                disks+=("$img")
            fi
        } >"$ctl"
        end_ctl "$ctl"
        local t0 how='' acked=none cw=$WHEN
        t0=$(now_ms)
        qemu_start "$logf" "$ctl" "${disks[@]}"
        if [ -z "$id" ]; then
            wait_for "$logf" '^@@(DONE|HANGDUMP )' 300 || true
            qemu_kill
        elif wait_line "$logf" "^@@(CUTNOW $id |ACTION-START $id mount=fail)" 300; then
            # The moment the guest chose: kill now, before anything else.
            qemu_kill
            how=$(sed -n 's/.* how=\([a-z]*\).*/\1/p' <<<"$LINE")
            acked=$(sed -n 's/.* acked=\([a-z]*\).*/\1/p' <<<"$LINE")
        else
            qemu_kill
            log "cut $id: the guest never reached the cut; log $logf"
            keep "$id-boot" "$logf" "$ctl"
            FAILS=$((FAILS + 1))
            how=none
        fi
        # Judge the previous cut: its action's output (its own boot), its check (this boot).
        if [ -n "$prev" ]; then
            cat "$RUN/$prev.log" "$logf" | tr -d "\r" | grep "^@@[A-Z-]* $prev " >"$RUN/$prev.result" || true
            KIND=kill POLICY=$p_pol LABEL=$p_label WHEN=$p_when AIM=$p_aim HOW=$p_how FIRST=$p_first
            if judge "$prev" "$RUN/$prev.result" "$p_scn" "$p_fs" "$p_acked" "$p_same"; then
                [ -n "${PC_KEEP_ALL:-}" ] || rm -f "$p_img"
            else
                FAILS=$((FAILS + 1))
                keep "$prev" "$p_img" "$RUN/$prev.log" "$RUN/$prev.ctl" "$logf" "$RUN/$prev.result"
            fi
            CLS_OF[$prev]=$CLASS SIDE_OF[$prev]=$SIDE
            local rcs
            rcs=$(sed -n 's/^@@CHECK .* recover_cs=\([0-9]*\).*/\1/p' "$RUN/$prev.result")
            learn_from_check "$RUN/$prev.result" "$prev" WIN "$p_scn" "$SIDE" "$CLASS" "$rcs"
            # An aimed cut that missed the transaction is made again, with half the delay.
            if [ "$p_aim" = targeted ] && [ "$CLASS" != in-flight ] && [ "$p_how" != notrigger ] && [ "$p_how" != none ]; then
                retry="$p_scn $p_fs $p_pol $p_when"
                log "cut $prev was aimed at the transaction but fell $CLASS it: once more, with half the delay"
            fi
            LABEL= WHEN= AIM= HOW= FIRST=
        fi
        if [ -z "$id" ]; then prev=''; continue; fi
        # This boot's cut.
        if [ -z "$acked" ] || [ "$acked" = none ]; then
            if grep -q "^@@OUT $id action: .*committed (tx" "$logf"; then acked=new
            elif grep -q "^@@OUT $id action: .*FAILED and rolled back" "$logf"; then acked=old; fi
        fi
        local d
        d=$(tr -d '\r' <"$logf" | sed -n "s/^@@ACTION-EXIT $id rc=[0-9]* cs=\([0-9]*\).*/\1/p" | head -1)
        if [ -n "$d" ]; then
            learn DUR DUR_SEEN "$([ $what = recover ] && echo recover || echo "$scn")" $((d * 10))
            [ $what = action ] && learn WIN WIN_SEEN "$scn" "$(tx_ms "$logf" "$id" action)"
        fi
        # Predicted from its output so far (judged for real after the next boot): in flight?
        local pred=other
        if grep -q "^@@OUT $id action: .*transaction planned" "$logf" && ! grep -q "^@@OUT $id action: .*transaction committed" "$logf" &&
            [ -z "$d" ]; then pred=in-flight; fi
        if [ $what = recover ]; then
            same=${SIDE_OF[$src]:-} first=${CLS_OF[$src]:-?}
        fi
        log "cut $id [kill $label $fs $pol $aim] power cut at $cw ($how), acked=$acked, boot+cut $((($(now_ms) - t0) / 100))ds"
        prev=$id p_img=$img p_scn=$scn p_label=$label p_fs=$fs p_pol=$pol p_acked=$acked p_same=$same p_when=$cw p_aim=$aim
        p_how=$how p_pred=$pred p_first=$first p_what=$what
        CUTS=$((CUTS + 1))
    done
}

# ------------------------------------------------------------------ kind 2: dm-flakey

# flakey_run N FS : one boot, N cuts made with dm-flakey drop_writes (scenarios balanced), plus
# now and then a cut of the `recover` that follows one (flakey2), plus the guest's retry of
# every aimed cut that missed the transaction.
flakey_run() {
    local n=$1 fs=$2
    KIND=flakey
    local ctl=$RUN/flakey-$fs${BATCH_TAG:-}.ctl logf=$RUN/flakey-$fs${BATCH_TAG:-}.log cow=$RUN/flakey-cow.img
    rm -f "$cow" && truncate -s 4G "$cow"
    local i plan=$RUN/flakey-$fs${BATCH_TAG:-}.plan pfx=${ID_PREFIX:-}f
    : >"$plan"
    plan_scenarios "$n"
    plan_aims
    {
        ctl_head "dm$([ "$fs" = xfs ] && echo ' xfs')" "$fs"
        for ((i = 1; i <= n; i++)); do
            local scn=${PLAN[i - 1]} aim=${AIMS[i - 1]} pol base
            rnd 2; pol=$([ $R = 0 ] && echo resume || echo rollback)
            case $(scenario_base "$scn") in factory) base=/dev/vdc ;; v3) base=/dev/vdd ;; v1) base=/dev/vde ;; esac
            pick_when "$scn" "$aim" FWIN FDUR
            echo "flakey $pfx$i $base $fs $pol $scn $WHEN $(scenario_cmd "$scn")"
            echo "$pfx$i $scn $pol 0 $WHEN $aim" >>"$plan"
            # One time in seven, an extra cut of the same scenario whose `recover` is cut too.
            rnd 7
            if [ $R = 0 ]; then
                pick_when "$scn" targeted FWIN FDUR
                local w1=$WHEN
                rnd $((RWIN[$scn] + RWIN[$scn] / 8))
                echo "flakey2 $pfx${i}x $base $fs $pol $scn $w1 $R $(scenario_cmd "$scn")"
                echo "$pfx${i}x $scn $pol 1 $w1+$R targeted" >>"$plan"
            fi
        done
    } >"$ctl"
    end_ctl "$ctl"
    local t0
    t0=$(now_ms)
    qemu_start "$logf" "$ctl" "$cow" "$IMGS/$fs/factory.img,snapshot=on" "$IMGS/$fs/v3.img,snapshot=on" "$IMGS/$fs/v1.img,snapshot=on"
    local timeout=$((120 + n * 60))
    # A check the guest's watchdog found stuck (@@HANG, then its dump) ends the batch at once:
    # its later cuts are judged as not done, and the log keeps where it hung.
    if wait_for "$logf" '^@@(DONE|HANGDUMP )' $timeout; then
        grep -q '^@@HANGDUMP ' "$logf" && log "flakey batch: a check hung in the guest (@@HANG in $logf); judging what it did"
    else
        log "flakey batch did not finish in ${timeout}s; judging what it did"
    fi
    qemu_kill
    local secs=$((($(now_ms) - t0) / 1000))
    rm -f "$cow"
    # The guest's retries, judged right after the cut they repeat.
    local full=$RUN/flakey-$fs${BATCH_TAG:-}.plan.all
    tr -d '\r' <"$logf" | awk -v planf="$plan" '
        BEGIN { while ((getline l < planf) > 0) { split(l, f, " "); order[++n] = f[1]; line[f[1]] = l } }
        /^@@RETRY / { r[$2] = $3 " " $4 }
        END {
            for (i = 1; i <= n; i++) {
                id = order[i]; print line[id]
                if (id in r) { split(line[id], f, " "); split(r[id], g, " "); print g[1], f[2], f[3], 0, g[2], "retry" }
            }
        }' >"$full"
    local id scn pol two when aim
    while read -r id scn pol two when aim; do
        tr -d "\r" <"$logf" | grep "^@@[A-Z-]* $id " >"$RUN/$id.result" || true
        # What the engine had reported when it was cut (dm_cut reads its output after
        # SIGSTOP, so that is everything it printed). In a double cut, the recover's report
        # is the later one.
        local acked a1 a2 how first=-
        a1=$(sed -n "s/^@@CUT $id what=action acked=\([a-z]*\).*/\1/p" "$RUN/$id.result")
        a2=$(sed -n "s/^@@CUT $id what=recover acked=\([a-z]*\).*/\1/p" "$RUN/$id.result")
        how=$(sed -n "s/^@@CUT $id what=action .*how=\([a-z]*\).*/\1/p" "$RUN/$id.result")
        acked=${a1:-none}
        [ -n "$a2" ] && [ "$a2" != none ] && acked=$a2
        local label=$scn
        if [ "$two" = 1 ]; then
            label=$scn+recover
            # Had the first cut left a transaction in flight? The cut `recover` says so when
            # it logged that it was recovering one, or finished it.
            if grep -qE "^@@OUT $id cut-recover: (.*INFO recovering|recover: (install|rollback) )" "$RUN/$id.result"; then first=in-flight
            elif grep -q "^@@OUT $id cut-recover: recover: nothing in flight" "$RUN/$id.result"; then first=not
            else first='?'; fi
        fi
        # Durations of actions that finished before their cut refine the next batch.
        local ran
        ran=$(sed -n "s/^@@CUT $id what=action .*ran_cs=\([0-9][0-9]*\).*/\1/p" "$RUN/$id.result")
        if [ -n "$ran" ]; then
            learn FDUR FDUR_SEEN "$scn" $((ran * 10))
            learn FWIN FWIN_SEEN "$scn" "$(tx_ms "$RUN/$id.result" "$id" cut-action)"
        fi
        [ -z "${a2}" ] || { ran=$(sed -n "s/^@@CUT $id what=recover .*ran_cs=\([0-9][0-9]*\).*/\1/p" "$RUN/$id.result"); [ -n "$ran" ] && learn FDUR FDUR_SEEN recover $((ran * 10)); }
        KIND=flakey POLICY=$pol LABEL=$label WHEN=$when AIM=$aim HOW=$how FIRST=$first
        if ! judge "$id" "$RUN/$id.result" "$scn" "$fs" "$acked"; then
            FAILS=$((FAILS + 1))
            keep "$id" "$logf" "$ctl" "$RUN/$id.result"
        fi
        local rcs
        rcs=$(sed -n 's/^@@CHECK .* recover_cs=\([0-9]*\).*/\1/p' "$RUN/$id.result")
        [ "$two" = 1 ] || learn_from_check "$RUN/$id.result" "$id" FWIN "$scn" "$SIDE" "$CLASS" "$rcs"
        LABEL= WHEN= AIM= HOW= FIRST=
        CUTS=$((CUTS + 1 + two))
    done <"$full"
    log "flakey batch on $fs: $(wc -l <"$full") cuts in ${secs}s (including the boot)"
}

# ------------------------------------------------------------------ kind 3: dm-log-writes

# Hook called by lwreplay.pl at each point: $LW_IMG holds the replayed device.
lw_point() {
    local point=$1 entry=$2 flags=$3 marks=$4
    local id=lw$LW_TAG-p$point scratch=$LW_SCRATCH
    cp --sparse=always "$LW_IMG" "$scratch"
    local rf=$RUN/$id.result
    host_check "$id" "$scratch" "$LW_FS" "$LW_POLICY" "$LW_SCN" >"$rf"
    local acked=none
    [[ $marks == *acked-new* ]] && acked=new
    KIND=lw POLICY=$LW_POLICY AIM=- BATCH=${BATCH:--}
    if judge "$id" "$rf" "$LW_SCN" "$LW_FS" "$acked" 2>>"$RUN/lw.log"; then
        rm -f "$rf"
        return 0
    fi
    tail -1 "$RESULTS" | cut -f11 | sed "s/^/    $id (entry $entry, $flags, marks $marks): /" >&2
    keep "$id" "$scratch" "$rf"
    return 1
}

# The same observations as the guest's check (lib/check.sh), on the host, for an image.
host_check() {
    local id=$1 img=$2 fs=$3 policy=$4 scn=$5 post=${PC_POST_FILE:-}
    if [ -z "$post" ]; then
        post=$(mktemp)
        cat "$IMGS/$fs/expect/"*.post >"$post"
    fi
    in_ns "$img" "$fs" '
        id=$1 pol=$2 scn=$3 BIN=$4 PC_DUMP=$5 PC_POST=$6
        PC_EXPECT=/dev/null BB=busybox MNT='"$MNT"'
        PC_TMP=$(mktemp -d)
        . "$7"
        pc_check "$id" "$pol" "$scn" 0
        rm -rf "$PC_TMP"' "$id" "$policy" "$scn" "$BIN" "$PCDIR/lib/dump.sh" "$post" "$PCDIR/lib/check.sh" ||
        echo "@@CHECK $id mount=fail"
    [ -n "${PC_POST_FILE:-}" ] || rm -f "$post"
}

# lw_run SCENARIO FS [POLICY] : record the action under dm-log-writes, replay every flush point.
lw_run() {
    lw_record "$@"
    lw_replay "$@"
}

# lw_record SCENARIOS FS [POLICY]: the QEMU part of lw_run, for one scenario or several
# (space-separated; one boot: each records on its own pair of disks, one after the other).
lw_record() {
    local scns=$1 fs=$2 pol=${3:-resume}
    local scn tag disks=() letters=(b c d e f g h i j k l m n o p q) k=0
    # One scenario: lw-TAG.ctl and .log, TAG as in lw_replay; several: lw-fw+delta-ext4-resume.log.
    local name=${LW_PREFIX:-}${scns// /+}-$fs-$pol
    local ctl=$RUN/lw-$name.ctl logf=$RUN/lw-$name.log
    {
        ctl_head "dm$([ "$fs" = xfs ] && echo ' xfs')"
        for scn in $scns; do
            tag=${LW_PREFIX:-}$scn-$fs-$pol
            local data=$RUN/lw-$tag-data.img logdev=$RUN/lw-$tag-log.img
            cp --sparse=always "$IMGS/$fs/$(scenario_base "$scn").img" "$data"
            rm -f "$logdev" && truncate -s 2G "$logdev"
            [ $((k + 2)) -lt ${#letters[@]} ] || die "lw_record: too many scenarios in one boot"
            echo "lw $tag /dev/vd${letters[k]} /dev/vd${letters[k + 1]} $fs $(scenario_cmd "$scn")"
            disks+=("$data" "$logdev") k=$((k + 2))
        done
    } >"$ctl"
    end_ctl "$ctl"
    local t0
    t0=$(now_ms)
    qemu_start "$logf" "$ctl" "${disks[@]}"
    wait_for "$logf" '^@@DONE' 900 || { qemu_kill; keep "lw-$name" "$logf"; die "log-writes recording did not finish; log $logf"; }
    wait "$QPID" 2>/dev/null || true
    local t1
    t1=$(now_ms)
    for scn in $scns; do
        tag=${LW_PREFIX:-}$scn-$fs-$pol
        grep -q "^@@ACTION-EXIT $tag rc=0" "$logf" || { keep "lw-$tag" "$logf"; die "the recorded $scn action failed: $(grep "^@@OUT $tag" "$logf" | tail -3)"; }
    done
    log "log-writes: $scns on $fs recorded in $(((t1 - t0) / 1000))s"
}

# lw_replay SCENARIO FS [POLICY]: the host part of lw_run (no QEMU: it can run beside one).
lw_replay() {
    local scn=$1 fs=$2 pol=${3:-resume}
    local tag=${LW_PREFIX:-}$scn-$fs-$pol
    local data=$RUN/lw-$tag-data.img logdev=$RUN/lw-$tag-log.img
    local base=$IMGS/$fs/$(scenario_base "$scn").img
    local replay=$RUN/lw-$tag-replay.img t1
    t1=$(now_ms)
    log "log-writes: replaying every flush/FUA point of $scn on $fs"
    cp --sparse=always "$base" "$replay"
    export LW_IMG=$replay LW_FS=$fs LW_SCN=$scn LW_POLICY=$pol LW_TAG=$tag BATCH
    export PC_POST_FILE=$RUN/lw-$tag.post LW_SCRATCH=$RUN/lw-$tag-scratch.img
    cat "$IMGS/$fs/expect/"*.post >"$PC_POST_FILE"
    # The engine runs natively here (recover and the post-cut operations): the same negative
    # control point as in the guest.
    [ -n "${NEG_POINT:-}" ] && export TOPE_NEGATIVE_CONTROL=$NEG_POINT
    local rc=0
    perl "$PCDIR/lib/lwreplay.pl" ${PC_LW_EVERY:+--every-entry} "$logdev" "$replay" "$0" __lw_point 2>>"$RUN/lw-$tag.replay.log" || rc=$?
    unset TOPE_NEGATIVE_CONTROL PC_POST_FILE
    local t2 pts inf
    t2=$(now_ms)
    pts=$(grep -c "^lw	lw$tag-p" "$RESULTS" || true)
    inf=$(awk -F'\t' -v p="lw$tag-p" '$1 == "lw" && index($2, p) == 1 && $12 == "in-flight"' "$RESULTS" | wc -l)
    tail -1 "$RUN/lw-$tag.replay.log" | sed 's/^/    /' >&2
    # The replayer must reproduce the recorded device exactly.
    if ! cmp -s "$replay" "$data"; then
        log "log-writes: the full replay differs from the recorded device: replayer bug or lost log entries"
        FAILS=$((FAILS + 1))
    fi
    if [ "$inf" -eq 0 ] && [ -z "${NEG_POINT:-}" ]; then
        # (A negative build may hide it: without journal syncs nothing is ever in flight.)
        log "log-writes: no replay point fell inside the transaction: the recording did not capture it"
        FAILS=$((FAILS + 1))
    fi
    FAILS=$((FAILS + rc))
    CUTS=$((CUTS + pts))
    log "log-writes: $pts points checked in $(((t2 - t1) / 1000))s ($inf inside the transaction), $rc failed"
    [ -n "${PC_KEEP_ALL:-}" ] || rm -f "$data" "$logdev" "$replay" "$LW_SCRATCH"
}

# ------------------------------------------------------------------ self-test of the checks

# Damages copies of an image in known ways and requires the checks to fail with the right
# diagnosis (and to pass on the undamaged copy): the checker cannot go blind either.
selftest() {
    local fs=ext4 payload=${IMGS/images-/payload-} img=$RUN/selftest.img
    # Its own results file: its rows are removed once judged, and other kinds may be
    # appending to $RESULTS meanwhile (bg_job).
    local RESULTS=$RUN/selftest.tsv
    : >"$RESULTS"
    # name|acked|damage|expected diagnosis|scenario (its base image; default fw: factory.img)
    local cases=(
        "pristine|none|:|PASS"
        "zero-length|none|: >root/fw/boot.bin|ZERO-LENGTH"
        "mixed|none|cp \$P/src/fw/fw/boot.bin root/fw/boot.bin|MIXED"
        "torn|none|dd if=/dev/zero of=root/fw/mcu.bin bs=4096 count=1 conv=notrunc status=none|TORN"
        "wrong-mode|none|chmod 600 root/fw/fpga.bin|wrong mode"
        "leftover|none|: >root/fw/.tope-9-0123456789abcdef.new|leftovers"
        "leftover-state|none|: >state/.tope-selftest.tmp|leftovers"
        "extra-dir|none|mkdir root/fw/new|untouched path changed"
        "lost-ack|new|:|LOST AN ACKNOWLEDGED"
        "journal|none|echo garbage >state/journal.redb|recover exited"
        "pristine-v3|none|:|PASS|rollback"
        "verify|none|chown 4321 root/fw/boot.bin|VERIFY FAILED|rollback"
        "lost-backups|none|rm -f state/backups/*|POST-CUT \`rollback\` FAILED|rollback"
        "post-tree|none|cp pkg/dir.zip pkg/fw.zip|POST-CUT \`install fw.zip\` left a tree that is not|fw"
        "pristine-v1|none|:|PASS|delta"
        "post-delta|none|truncate -s 4096 pkg/dv2.zip|POST-CUT \`install dv2.zip\` FAILED|delta"
    )
    local c name acked damage want scn ok=0 bad=0
    for c in "${cases[@]}"; do
        IFS='|' read -r name acked damage want scn <<<"$c"
        scn=${scn:-fw}
        cp --sparse=always "$IMGS/$fs/$(scenario_base "$scn").img" "$img"
        in_ns "$img" "$fs" "cd $MNT && P=$payload && $damage" || die "selftest $name: could not damage the image"
        local rf=$RUN/selftest-$name.result
        host_check "st-$name" "$img" "$fs" resume "$scn" >"$rf"
        KIND=selftest POLICY=resume LABEL=selftest-$name AIM=-
        local got=FAIL
        judge "st-$name" "$rf" "$scn" "$fs" "$acked" 2>>"$RUN/selftest.log" && got=PASS
        LABEL=
        local why
        why=$(tail -1 "$RESULTS" | cut -f11)
        sed -i '$d' "$RESULTS"
        if { [ "$want" = PASS ] && [ $got = PASS ]; } || { [ "$want" != PASS ] && [ $got = FAIL ] && [[ $why == *"$want"* ]]; }; then
            ok=$((ok + 1))
        else
            bad=$((bad + 1))
            log "selftest $name: expected ${want/#PASS/a pass}, got $got: $why"
        fi
    done
    rm -f "$img" "$RUN"/selftest-*.result "$RESULTS"
    log "selftest of the checks: $ok cases as expected, $bad not"
    FAILS=$((FAILS + bad))
}

# ------------------------------------------------------------------ runs and reports

start_run() {
    local mode=$1
    mkdir -p "$OUTROOT"
    RUN=$OUTROOT/$mode-$(date +%Y%m%d-%H%M%S)
    mkdir -p "$RUN"
    KEPT=$RUN/kept
    RESULTS=$RUN/results.tsv
    : >"$RESULTS"
    SEED=${PC_SEED:-$(((RANDOM << 15) | RANDOM))}
    RNG=$SEED
    CUTS=0 FAILS=0
    export RUN KEPT RESULTS
    log "mode $mode, seed $SEED (replay with PC_SEED=$SEED), output in $RUN"
}

# The floor: at least half of the QEMU-kill and of the dm-flakey cuts of each scenario must
# fall inside the transaction (class in-flight), or they did not test what they are for. Only
# the cuts of the action count (a …+recover cut is judged by whether it cut the recovery).
# Prints one line per group that misses it (batch, kind, scenario, in flight, cuts); $1: an
# awk regex of the batches to look at.
floor_misses() {
    awk -F'\t' -v b="${1:-.*}" '($1 == "kill" || $1 == "flakey") && $3 !~ /\+recover$/ && $17 ~ "^(" b ")$" {
            k = $17 "\t" $1 "\t" $3; n[k]++; if ($12 == "in-flight") i[k]++ }
        END { for (k in n) if (2 * i[k] < n[k]) printf "%s\t%d\t%d\n", k, i[k], n[k] }' "$RESULTS" | sort
}

check_floors() {
    local b k s i n
    while IFS=$'\t' read -r b k s i n; do
        log "FLOOR MISSED: $k $s${b:+ ($b)}: $i of $n cuts fell inside the transaction, fewer than half; the cut moments did not test the transaction (results.tsv, column class)"
        FAILS=$((FAILS + 1))
    done < <(floor_misses "${1:-.*}")
}

# Summary of $RESULTS: per kind and scenario, where the cuts fell and how they ended; floors;
# recovery times; failures.
report() {
    local title=$1 secs=$2
    {
        echo "# Power-cut run: $title"
        echo
        echo "- date: $(date -u +%Y-%m-%dT%H:%MZ), host $(uname -r), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
        echo "- engine: $(cd "$REPO" && git rev-parse --short HEAD 2>/dev/null || echo '?')$(cd "$REPO" && git diff --quiet -- src Cargo.toml 2>/dev/null || echo ' (+ uncommitted changes)'), binary sha256 $(sha "$BIN" | cut -c1-16)"
        echo "- guest: Debian kernel $KVER under QEMU TCG ($(qemu-system-x86_64 --version | head -1 | sed 's/QEMU emulator version //')), seed $SEED"
        echo "- wall time: ${secs}s"
        echo
        awk -F'\t' '
            { n++; if ($8 == "FAIL") f++; if ($12 == "in-flight") fl++ }
            END { printf "Checked states: %d, failures: %d; cuts inside the transaction: %d (%d%%)\n", n, f + 0, fl + 0, n ? 100 * fl / n : 0 }' "$RESULTS"
        echo
        echo "Where each cut fell (\`recover\` after it: in flight = it found a transaction begun and not"
        echo "ended; before / after = nothing in flight, all old / all new; for …+recover: in flight ="
        echo "the recovery itself was cut), and how the tree ended:"
        echo
        echo "| batch | kind | scenario | fs | checks | in flight | before | after | all-new | all-old | success reported before the cut | verify + post-cut operations passed |"
        echo "|---|---|---|---|---|---|---|---|---|---|---|---|"
        awk -F'\t' '
            { key = $17 "|" $1 "|" $3 "|" $4; s[key]++
              if ($12 == "in-flight") i[key]++; if ($12 == "before") b[key]++; if ($12 == "after") a[key]++
              if ($7 == "new") sn[key]++; if ($7 == "old") so[key]++; if ($6 == "new") an[key]++
              if ($15 != "-" && $8 == "PASS") p[key]++ }
            END { for (key in s) { split(key, q, "|")
                printf "| %s | %s | %s | %s | %d | %d (%d%%) | %d | %d | %d | %d | %d | %d |\n", q[1], q[2], q[3], q[4], s[key], i[key], 100 * i[key] / s[key], b[key], a[key], sn[key], so[key], an[key], p[key] } }' "$RESULTS" | sort
        echo
        echo "Floor (QEMU kill and dm-flakey: at least half of each scenario's cuts in flight):"
        echo
        echo "| batch | kind | scenario | in flight / cuts | floor |"
        echo "|---|---|---|---|---|"
        awk -F'\t' '($1 == "kill" || $1 == "flakey") && $3 !~ /\+recover$/ {
                k = $17 "|" $1 "|" $3; n[k]++; if ($12 == "in-flight") i[k]++ }
            END { for (k in n) { split(k, q, "|"); printf "| %s | %s | %s | %d / %d | %s |\n", q[1], q[2], q[3], i[k], n[k], (2 * i[k] >= n[k] ? "met" : "**MISSED**") } }' "$RESULTS" | sort
        echo
        echo "Recovery time (\`recover\` wall time; kill and flakey: inside the TCG guest, so about 10-30x"
        echo "slower than native; lw: on the host, native):"
        echo
        echo "| kind | n | min | median | p90 | max |"
        echo "|---|---|---|---|---|---|"
        local kind
        for kind in kill flakey lw; do
            awk -F'\t' -v k=$kind '$1 == k && $9 ~ /^[0-9]+$/ { print $9 * 10 }' "$RESULTS" | sort -n | awk -v k=$kind '
                { v[NR] = $1 }
                END { if (NR) printf "| %s | %d | %d ms | %d ms | %d ms | %d ms |\n", k, NR, v[1], v[int((NR + 1) / 2)], v[int(NR * 0.9 + 0.99)], v[NR] }'
        done
        if grep -q '	FAIL	' "$RESULTS"; then
            echo
            echo "Failures:"
            echo
            awk -F'\t' '$8 == "FAIL" { printf "- %s %s (%s, %s, %s, %s): %s\n", $1, $2, $3, $4, $5, $17, $11 }' "$RESULTS" | head -50
        fi
    } >"$RUN/report.md"
    cat "$RUN/report.md" >&2
}

# ------------------------------------------------------------------ host work beside QEMU

# bg_job NAME COMMAND...: runs a host-only part (a log-writes replay, the self-test) in the
# background while QEMU runs in the foreground: the machine has two cores and QEMU TCG keeps
# one busy. bg_wait adds their cuts and failures.
# At most BG_MAX of them at a time (bg_job waits).
BG_PIDS=() BG_NAMES=() BG_MAX=${BG_MAX:-2}
bg_job() {
    local name=$1 p n
    shift
    while :; do
        n=0
        for p in "${BG_PIDS[@]}"; do kill -0 "$p" 2>/dev/null && n=$((n + 1)); done
        [ $n -lt "$BG_MAX" ] && break
        sleep 0.5
    done
    ( CUTS=0 FAILS=0; "$@"; echo "$CUTS $FAILS" >"$RUN/.bg-$name" ) &
    BG_PIDS+=($!) BG_NAMES+=("$name")
}
bg_wait() {
    local i c f
    for i in "${!BG_PIDS[@]}"; do
        wait "${BG_PIDS[i]}" || true
        if read -r c f <"$RUN/.bg-${BG_NAMES[i]}" 2>/dev/null; then
            CUTS=$((CUTS + c)) FAILS=$((FAILS + f))
        else
            log "the background part ${BG_NAMES[i]} died (harness error)"
            FAILS=$((FAILS + 1))
        fi
        rm -f "$RUN/.bg-${BG_NAMES[i]}"
    done
    BG_PIDS=() BG_NAMES=()
}

# ------------------------------------------------------------------ negative controls

# The sync points a powercut-negative-control build can leave out (src/fsutil.rs), and what
# this harness is known to catch (README.md, "Negative controls"): a point in NEG_CAUGHT must
# be caught by at least one kind, or `negative` fails; the others are reported.
NEG_POINTS=(staging backups swap journal dirfsync)
NEG_CAUGHT=" staging backups swap journal "
# What counts as a durability failure: what a missing sync causes. A harness failure (no
# check result, a trigger that never appeared) counts for neither side.
NEG_DURABLE='WRITE-AHEAD|LOST AN ACK|ZERO-LENGTH|TORN|MIXED|neither old nor new|absent|but status says current|leftovers|temporary file|second recover was not a no-op|still in flight|recover exited|VERIFY FAILED|POST-CUT|completed rollback'

# Where the cuts aimed at the transaction go in a negative batch of QEMU kills or dm-flakey
# cuts: within MAX ms after the effects of the phase whose sync is left out are done (the
# fault's window is the next phase's commit and effects, up to the next syncfs: staging, the
# BackedUp commit and the store's syncfs of the 24 MiB staged; backups, the Swapped commit
# and the renames), or anywhere (random) for the others. PC_TRIGGER overrides it.
declare -A NEG_TRIGGER=([staging]=Staged+80 [backups]=BackedUp+10 [swap]=Swapped+80 [journal]= [dirfsync]= [none]=)

# neg_batch BATCH KINDS: runs the fw scenario on ext4 with each kind for the current binary and
# NEG_POINT, tagging every row with BATCH. The log-writes replay (host only) runs in the
# background (bg_job), beside the next QEMU runs.
neg_lw_replay() { LW_PREFIX=$1- lw_replay fw ext4 "$2"; }
neg_batch() {
    local batch=$1 k pol=${PC_NEG_POLICY:-resume}
    shift
    BATCH=$batch
    for k in "$@"; do
        case $k in
            lw)
                LW_PREFIX=$batch- lw_record fw ext4 "$pol"
                bg_job "lw-$batch" neg_lw_replay "$batch" "$pol" ;;
            flakey | kill)
                local keep_scn=("${CUT_SCENARIOS[@]}") trig=${PC_TRIGGER-${NEG_TRIGGER[${NEG_POINT:-none}]}}
                CUT_SCENARIOS=(fw)
                if [ "$k" = flakey ]; then PC_TRIGGER=$trig ID_PREFIX=$batch- BATCH_TAG=-$batch flakey_run "${PC_NEG_CUTS:-8}" ext4
                else PC_TRIGGER=$trig ID_PREFIX=$batch- kill_run "${PC_NEG_CUTS:-8}" ext4; fi
                CUT_SCENARIOS=("${keep_scn[@]}") ;;
            *) die "unknown kind $k" ;;
        esac
    done
    BATCH=
}

# ------------------------------------------------------------------ main

mode=${1:-quick}
shift || true
case $mode in
    __lw_point)
        # Internal: called by lwreplay.pl through "$0". Re-create the context from the environment.
        SEED=0
        prep_kernel() { :; }
        BIN=${PC_BIN_USED:?}
        IMGS=${PC_IMGS:?}
        lw_point "$@"
        exit $?
        ;;
esac

ensure_deps
mkdir -p "$CACHE"
T_START=$(now_ms)
CUTS=0 FAILS=0

finish() {
    local secs=$((($(now_ms) - T_START) / 1000))
    [ -n "${NO_FLOORS:-}" ] || check_floors
    report "$1" "$secs"
    log "$CUTS cuts, $FAILS failures, ${secs}s; results $RESULTS"
}

case $mode in
    prep)
        [ $# -gt 0 ] || set -- ext4 xfs
        build_bin normal
        prep_all "$@"
        log "ready: $VMLINUX $INITRD $IMGS"
        ;;
    kill)
        n=${1:-10}; shift || true
        [ $# -gt 0 ] || set -- ext4
        build_bin normal; prep_all "$@"
        start_run kill
        kill_run "$n" "$@"
        finish "kill $n on $*"
        ;;
    flakey)
        n=${1:-20}; fs=${2:-ext4}
        build_bin normal; prep_all "$fs"
        start_run flakey
        flakey_run "$n" "$fs"
        finish "flakey $n on $fs"
        ;;
    lw)
        scn=${1:-fw}; fs=${2:-ext4}; pol=${3:-resume}
        build_bin normal; prep_all "$fs"
        start_run lw
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        lw_run "$scn" "$fs" "$pol"
        finish "lw $scn on $fs"
        ;;
    selftest)
        build_bin normal; prep_all ext4
        start_run selftest
        selftest
        log "$FAILS unexpected results"
        ;;
    quick)
        build_bin normal; prep_all ext4 xfs
        start_run quick
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        # The host-only parts (the self-test, the log-writes replays) run beside the QEMU ones.
        # One kill per scenario (the first round of plan_scenarios holds every scenario once),
        # and the flakey batch holds every scenario at least once: delta included in each kind.
        bg_job selftest selftest
        lw_record "fw delta" ext4
        lw_replay_quick() { lw_replay fw ext4; lw_replay delta ext4; }
        bg_job lw lw_replay_quick
        kill_run "${PC_QUICK_KILLS:-${#SCENARIOS[@]}}" ext4 xfs
        flakey_run "${PC_QUICK_FLAKEY:-11}" ext4
        bg_wait
        finish quick
        ;;
    soak)
        n=${1:-100}
        build_bin normal; prep_all ext4 xfs
        start_run soak
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        # A third of the cuts by QEMU kills, the rest by dm-flakey batches of 25 (ext4 and
        # xfs in turn), plus one log-writes replay of every scenario on ext4 and of fw and delta
        # on xfs (those points are counted on top of N; recorded first, in one boot per
        # filesystem). The replays and the kills run in the background beside the flakey
        # batches (one QEMU each: on 2 cores the soak takes about half as long as in turn).
        nk=$((n / 3)); nf=$((n - nk)); b=0
        lw_record "${SCENARIOS[*]}" ext4
        lw_record "fw delta" xfs
        lw_replay_all() { for scn in "${SCENARIOS[@]}"; do lw_replay "$scn" ext4; done; lw_replay fw xfs; lw_replay delta xfs; }
        bg_job lw lw_replay_all
        bg_job kills kill_run "$nk" ext4 xfs
        # The flakey plans draw from another point of the seeded sequence than the kills'.
        RNG=$((RNG ^ 0x5DEECE66D))
        while [ $nf -gt 0 ]; do
            c=$((nf > 25 ? 25 : nf))
            BATCH_TAG=-$b flakey_run "$c" "$([ $((b % 2)) = 0 ] && echo ext4 || echo xfs)"
            nf=$((nf - c)); b=$((b + 1))
        done
        bg_wait
        finish "soak $n"
        cp "$RUN/report.md" "$OUTROOT/soak-report-latest.md"
        ;;
    negative)
        # run.sh negative [POINT...]: for each sync point (default: all five), the build that
        # leaves it out runs the fw scenario on ext4 with each kind of PC_NEG_KINDS; the normal
        # build runs the same kinds first, and must show no durability failure, or a failure
        # of the negative build would prove nothing. A point in NEG_CAUGHT must be caught by
        # at least one kind.
        points=("$@")
        [ ${#points[@]} -gt 0 ] || points=("${NEG_POINTS[@]}")
        for p in "${points[@]}"; do
            case " ${NEG_POINTS[*]} none " in *" $p "*) ;; *) die "unknown negative-control point $p (known: ${NEG_POINTS[*]} none)" ;; esac
        done
        read -r -a kinds <<<"${PC_NEG_KINDS:-lw}"
        build_bin normal; prep_all ext4
        start_run negative
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        normal_bin=$BIN normal_imgs=$IMGS
        NEG_POINT= neg_batch normal "${kinds[@]}"
        build_bin negative
        # The negative build shares the normal build's images (the same engine but for the
        # left-out sync); only the initramfs carries the other binary.
        prep_initramfs
        IMGS=$normal_imgs
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        for p in "${points[@]}"; do
            NEG_POINT=$p
            neg_batch "neg-$p" "${kinds[@]}"
        done
        NEG_POINT=
        bg_wait
        NO_FLOORS=1 finish "negative controls (${points[*]}; kinds ${kinds[*]}; fw, ext4)"
        # Floors: the normal build's batches must meet them (FAILS); a negative batch that
        # misses one cannot say "not caught" for that kind.
        check_floors normal
        {
            echo
            echo "Negative controls: durability failures per point and cut kind (failing checks / checks):"
            echo
            echo "| build | $(printf '%s | ' "${kinds[@]}")verdict |"
            echo "|---|$(printf -- '---|%.0s' "${kinds[@]}")---|"
        } >>"$RUN/report.md"
        verdict=0
        for b in normal "${points[@]/#/neg-}"; do
            row="| ${b#neg-} |" any=0
            for k in "${kinds[@]}"; do
                c=$(awk -F'\t' -v b="$b" -v k="$k" -v re="$NEG_DURABLE" '$17 == b && $1 == k { n++; if ($8 == "FAIL" && $11 ~ re) f++ } END { printf "%d/%d", f, n }' "$RESULTS")
                fl=''
                [ "$k" != lw ] && [ -n "$(floor_misses "$b" | awk -F'\t' -v k="$k" '$2 == k')" ] && fl=' (floor missed)'
                [ "${c%/*}" -gt 0 ] && any=1
                row="$row $([ "${c%/*}" -gt 0 ] && echo "**caught** $c" || echo "not caught $c")$fl |"
            done
            p=${b#neg-}
            if [ "$b" = normal ] || [ "$p" = none ]; then
                if [ $any = 1 ]; then v="FAILS: the build with every sync shows durability failures"; verdict=1; else v="clean (as it must be)"; fi
            elif [[ $NEG_CAUGHT == *" $p "* ]]; then
                if [ $any = 1 ]; then v="detected"; else v="**NOT DETECTED** (expected to be)"; verdict=1; fi
            else
                if [ $any = 1 ]; then v="detected (the README says no kind catches it: update it)"; else v="not detected (known blind spot: README.md)"; fi
            fi
            echo "$row $v |" >>"$RUN/report.md"
            log "negative control ${p}: $row $v"
        done
        cat "$RUN/report.md" | sed -n '/^Negative controls/,$p' >&2
        nfail=$(awk -F'\t' '$17 == "normal" && $8 == "FAIL"' "$RESULTS" | wc -l)
        if [ "$nfail" -gt 0 ]; then
            log "the normal build's control batches have $nfail failing checks (see the report): nothing can be concluded"
            verdict=1
        fi
        if [ $verdict = 0 ] && [ -z "$(floor_misses normal)" ]; then
            log "NEGATIVE CONTROL DETECTED: every point the harness claims to catch was caught, the normal build is clean"
            exit 0
        fi
        log "NEGATIVE CONTROL FAILED: see the table above ($RUN/report.md)"
        exit 1
        ;;
    *)
        sed -n '2,/^set -euo/p' "$0" | sed '$d' >&2
        exit 2
        ;;
esac
[ "$FAILS" -eq 0 ]
