#!/usr/bin/env bash
# Power-cut harness for tope-updater (SPEC §3, §8; issue 5). See README.md beside this file.
#
#   tests/powercut/run.sh quick          CI: QEMU kills + a dm-flakey batch + one log-writes replay
#   tests/powercut/run.sh soak N         N cuts over every kind, scenario and filesystem; writes a report
#   tests/powercut/run.sh negative       the negative-control build must be caught (exit 0 iff caught)
#   tests/powercut/run.sh kill N [FS..]  only QEMU kills          (FS: ext4 xfs; default ext4)
#   tests/powercut/run.sh flakey N [FS]  only one dm-flakey batch
#   tests/powercut/run.sh lw SCEN [FS]   only one log-writes recording + replay (SCEN: fw many dir rollback factory gc)
#   tests/powercut/run.sh selftest       only check the checks (damaged images must fail)
#   tests/powercut/run.sh prep [FS..]    only build and cache everything (FS default: ext4 xfs); the
#                                        uncut runs must equal lib/oracle.py's states, or it dies
#
# Environment: PC_SEED (default: random, always printed), PC_BIN (use this static binary
# instead of building one), PC_CACHE (default target/powercut-cache), PC_OUT (default
# target/powercut-out), PC_KEEP_ALL=1 (keep every cut image), PC_ACCEL (tcg|kvm; default tcg).
set -euo pipefail

PCDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$PCDIR/../.." && pwd)
CACHE=${PC_CACHE:-$REPO/target/powercut-cache}
OUTROOT=${PC_OUT:-$REPO/target/powercut-out}
ACCEL=${PC_ACCEL:-tcg}
SCENARIOS=(fw many dir rollback factory gc)
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

# Sets KVER, KMODDIR (a lib/modules/KVER with modules.dep), VMLINUX.
prep_kernel() {
    local vmlinuz=
    KVER=
    for f in /boot/vmlinuz-*-amd64; do
        [ "${PC_KERNEL:-}" = download ] && break
        [ -e "$f" ] || continue
        local v=${f#/boot/vmlinuz-}
        [ -e "/lib/modules/$v/modules.dep" ] && { KVER=$v; vmlinuz=$f; KMODDIR=/lib/modules/$v; }
    done
    if [ -z "$KVER" ]; then
        # No Debian kernel installed: fetch the package and unpack it in the cache (this does
        # not touch the host's /boot or its boot loader).
        local pkg
        pkg=$(apt-cache depends linux-image-amd64 2>/dev/null | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1)
        [ -n "$pkg" ] || { apt-get update >/dev/null; pkg=$(apt-cache depends linux-image-amd64 | sed -n 's/.*Depends: \(linux-image-[0-9].*-amd64\)$/\1/p' | head -1); }
        [ -n "$pkg" ] || die "cannot find the Debian kernel package"
        local kdir=$CACHE/kernel-$pkg
        if [ ! -d "$kdir/lib/modules" ]; then
            log "downloading $pkg"
            rm -rf "$kdir.tmp" && mkdir -p "$kdir.tmp"
            (cd "$kdir.tmp" && apt-get -o APT::Sandbox::User=root download "$pkg" >/dev/null && dpkg-deb -x ./*.deb root)
            KVER=$(ls "$kdir.tmp/root/lib/modules")
            depmod -b "$kdir.tmp/root" "$KVER"
            mv "$kdir.tmp/root" "$kdir" && rm -rf "$kdir.tmp"
        fi
        KVER=$(ls "$kdir/lib/modules")
        vmlinuz=$(ls "$kdir"/boot/vmlinuz-*)
        KMODDIR=$kdir/lib/modules/$KVER
    fi
    local key
    key=$(sha "$vmlinuz" | cut -c1-16)
    VMLINUX=$CACHE/vmlinux-$KVER-$key
    if [ ! -s "$VMLINUX" ]; then
        log "extracting vmlinux from $vmlinuz"
        # As scripts/extract-vmlinux: find the xz stream and decompress it.
        local off
        for off in $(LC_ALL=C grep -obUaP '\xfd\x37\x7a\x58\x5a\x00' "$vmlinuz" | cut -d: -f1); do
            tail -c +$((off + 1)) "$vmlinuz" | xz -dc >"$VMLINUX.tmp" 2>/dev/null || true
            if [ "$(head -c4 "$VMLINUX.tmp" | od -An -tx1 | tr -d ' ')" = 7f454c46 ]; then
                mv "$VMLINUX.tmp" "$VMLINUX"
                break
            fi
        done
        rm -f "$VMLINUX.tmp"
        [ -s "$VMLINUX" ] || die "could not extract vmlinux from $vmlinuz"
    fi
}

# ------------------------------------------------------------------ initramfs

# Sets INITRD for the current BIN.
prep_initramfs() {
    local bb=/bin/busybox dm
    dm=$(command -v dmsetup)
    local inputs=("$bb" "$dm" "$BIN" "$PCDIR/guest/init" "$PCDIR/lib/dump.sh")
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
    cp "$PCDIR/guest/init" "$d/init"
    chmod 755 "$d/init"
    # Module groups, each in load order (modprobe --show-depends prints dependencies first).
    local group mods m
    for group in base xfs dm; do
        case $group in
            base) mods="virtio_pci virtio_blk crc32c_generic ext4" ;;
            xfs) mods="xfs" ;;
            dm) mods="dm_mod dm_snapshot dm_flakey dm_log_writes" ;;
        esac
        : >"$d/modules/$group.list"
        for m in $mods; do
            modprobe -d "${KMODDIR%/lib/modules/*}" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
        done | awk '!seen[$0]++' | while read -r ko; do
            local name
            name=$(basename "$ko")
            case $name in *.xz) xz -dc "$ko" >"$d/modules/${name%.xz}"; name=${name%.xz} ;; *) cp "$ko" "$d/modules/$name" ;; esac
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
    mkdir -p "$p/pkg"
    for s in fw many dir mixed2 mixed3 mixed4; do
        "$BIN" pack "$p/src/$s" -o "$p/pkg/$s.zip" >/dev/null
    done
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
        *) die "unknown scenario $1" ;;
    esac
}
scenario_base() { case $1 in fw | many | dir) echo factory ;; *) echo v3 ;; esac; }

# scenario_base + scenario_cmd told to lib/oracle.py: the steps from the factory tree to the
# base of scenario $2 ($3 = before) or to its end ($3 = after). $1: the payload directory.
oracle_steps() {
    local p=$1 scn=$2 when=$3
    [ "$(scenario_base "$scn")" = v3 ] && echo "$p/pkg/mixed2.zip" "$p/pkg/mixed3.zip"
    [ "$when" = after ] || return 0
    case $scn in
        fw | many | dir) echo "$p/pkg/$scn.zip" ;;
        gc) echo "$p/pkg/mixed4.zip" ;;
        rollback) echo rollback ;;
        factory) echo factory ;;
        *) die "unknown scenario $scn" ;;
    esac
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
        declare -f gen_payload write_configs mkfs_img scenario_cmd scenario_base oracle_steps oracle_check prep_images in_ns
        echo "${SCENARIOS[*]}"; mkfs.ext4 -V 2>&1 | sed -n 1p; mkfs.xfs -V; } | sha | cut -c1-16)
    IMGS=$CACHE/images-$key
    local payload=$CACHE/payload-$key
    local fs
    for fs in "${fslist[@]}"; do
        [ -e "$IMGS/$fs/ready" ] && continue
        [ -e "$payload/ready" ] || { log "generating payloads"; gen_payload "$payload"; touch "$payload/ready"; }
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
            rm -f "$tmp"
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
        done
        log "$fs: the uncut runs of ${SCENARIOS[*]} equal the package rules (lib/oracle.py), before and after"
        touch "$d/ready"
    done
}

prep_all() {
    local fslist=("$@")
    prep_kernel
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

expect_lines() {
    local fs=$1 scn
    for scn in "${SCENARIOS[@]}"; do
        load_expect "$scn" "$fs"
        echo "expect $scn $H_BEFORE $H_AFTER"
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

# judge ID RESULTS_FILE SCENARIO FS ACKED [SAME_AS_SIDE]
# RESULTS_FILE holds the @@ lines of that id. Appends a row to $RESULTS, prints a verdict.
# Sets SIDE (old|new|?).
judge() {
    local id=$1 rf=$2 scn=$3 fs=$4 acked=$5 same=${6:-} kind=${KIND:-?} policy=${POLICY:-resume}
    load_expect "$scn" "$fs"
    local line reasons=() side='?'
    line=$(grep -m1 "^@@CHECK $id " "$rf" || true)
    local rcs='-' mcs='-'
    if [ -z "$line" ]; then
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
    fi
    SIDE=$side
    local verdict=PASS
    [ ${#reasons[@]} -eq 0 ] || verdict=FAIL
    local why
    why=$(printf '%s; ' "${reasons[@]}")
    local flat=${why%; }
    flat=${flat//$'\n'    / | }
    flat=${flat//$'\n'/ | }
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$kind" "$id" "${LABEL:-$scn}" "$fs" "$policy" "$acked" "$side" "$verdict" "$rcs" "$mcs" "$flat" "${DURING:--}" "${WHEN:--}" >>"$RESULTS"
    if [ $verdict = PASS ]; then
        log "cut $id [$kind ${LABEL:-$scn} $fs $policy] PASS: $side (acked $acked, recover ${rcs}0 ms)"
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

# ------------------------------------------------------------------ random numbers

# Deterministic from PC_SEED: rnd N -> 0..N-1 in R (a 64-bit LCG, high bits).
RNG=1
rnd() {
    RNG=$((RNG * 6364136223846793005 + 1442695040888963407))
    R=$((((RNG >> 33) & 0x7fffffff) % $1))
}

# Cut windows: ms after the action starts, uniform over [0, 9/8 of the window], so about one
# cut in nine lands after the engine reported success. The defaults are measured action
# durations under TCG on a loaded 2-core machine; each run refines them from the actions
# that finished before their cut (the first one seen replaces the default).
declare -A DUR=([fw]=4000 [many]=1800 [dir]=1000 [rollback]=3000 [factory]=3500 [gc]=3000 [recover]=3000)
declare -A DUR_SEEN=()
declare -A FDUR=([fw]=5000 [many]=3000 [dir]=1600 [rollback]=3300 [factory]=3500 [gc]=3300 [recover]=3000)
declare -A FDUR_SEEN=()
learn() { # learn ARRAY SEEN_ARRAY SCENARIO MS
    local -n arr=$1 seen=$2
    # The first duration seen replaces the default, later ones move the window a quarter of
    # the way (load spikes come and go). A duration far below the window is an action with
    # nothing to do (a `recover` that found nothing in flight): ignored.
    [ $(($4 * 3)) -ge "${arr[$3]}" ] || return 0
    if [ -z "${seen[$3]:-}" ]; then arr[$3]=$4; else arr[$3]=$(((3 * arr[$3] + $4) / 4)); fi
    seen[$3]=1
}

# When to cut: sets WHEN to "MS" (ms after the action started, uniform over the scenario's
# window) or, half of the time, "PHASE+MS" (MS uniform over 1/16 of the window, at least
# 100 ms, after the engine logged that the effects of PHASE are done, i.e. while the next
# phase is journaled and performed). Random times mostly land in the longest phase
# (staging); phase triggers spread the cuts over every phase boundary. PC_TRIGGER=PHASE
# forces the trigger.
TRIG_PHASES=(Planned Staged BackedUp Swapped Verified)
pick_when() { # pick_when WINDOW_MS
    local w=$1
    if [ -n "${PC_TRIGGER:-}" ]; then
        rnd 600; WHEN=$PC_TRIGGER+$R
        return
    fi
    rnd 2
    if [ $R = 0 ]; then
        rnd $((w + w / 8)); WHEN=$R
    else
        rnd ${#TRIG_PHASES[@]}; local ph=${TRIG_PHASES[$R]}
        local after=$((w / 16))
        [ $after -ge 100 ] || after=100
        rnd $after; WHEN=$ph+$R
    fi
}

# ------------------------------------------------------------------ kind 1: QEMU kill

# kill_run N FS... : N cuts, one boot each (plus a last boot that only checks).
kill_run() {
    local n=$1
    shift
    local fslist=("$@")
    KIND=kill
    local prev='' prev_during='' prev_when='' cut_when='' prev_img='' prev_scn='' prev_label='' prev_fs='' prev_pol='' prev_acked='' prev_same=''
    local i mods=''
    local f
    for f in "${fslist[@]}"; do [ "$f" = xfs ] && mods=xfs; done
    local sides_file=$RUN/kill-sides
    : >"$sides_file"
    for ((i = 1; i <= n + 1; i++)); do
        local id=k$i scn='' fs='' pol='' img='' src_side='' last=0
        [ $i -gt $n ] && last=1
        if [ $last = 0 ]; then
            rnd 6
            if [ -n "$prev" ] && [ $R = 0 ] && [ "$prev_during" = yes ]; then
                # Cut `recover` itself, on a copy of the previous cut image.
                scn=recover fs=$prev_fs pol=$prev_pol
                img=$RUN/$id.img
                cp --sparse=always "$prev_img" "$img"
            else
                rnd ${#CUT_SCENARIOS[@]}; scn=${CUT_SCENARIOS[$R]}
                rnd ${#fslist[@]}; fs=${fslist[$R]}
                rnd 2; pol=$([ $R = 0 ] && echo resume || echo rollback)
                img=$RUN/$id.img
                cp --sparse=always "$IMGS/$fs/$(scenario_base "$scn").img" "$img"
            fi
        fi
        local ctl=$RUN/$id.ctl logf=$RUN/$id.log disks=()
        {
            [ -n "$mods" ] && echo "mods $mods"
            for f in "${fslist[@]}"; do expect_lines "$f"; done
            [ -n "$prev" ] && { echo "check $prev /dev/vdb $prev_fs $prev_pol"; disks+=("$prev_img"); }
            if [ $last = 0 ]; then
                local dev=/dev/vdb
                [ -n "$prev" ] && dev=/dev/vdc
                local cmd
                if [ $scn = recover ]; then cmd=recover; else cmd=$(scenario_cmd "$scn"); fi
                echo "action $id $dev $fs $pol $cmd"
                echo idle
                disks+=("$img")
            fi
        } >"$ctl"
    end_ctl "$ctl"
        local t0
        t0=$(now_ms)
        qemu_start "$logf" "$ctl" "${disks[@]}"
        if [ $last = 1 ]; then
            wait_for "$logf" '^@@DONE' 300 || true
            qemu_kill
        else
            if ! wait_for "$logf" "^@@ACTION-START $id" 300; then
                qemu_kill
                log "cut $id: the guest never started the action; log $logf"
                keep "$id-boot" "$logf" "$ctl"
                FAILS=$((FAILS + 1))
            else
                local ts delay trig=''
                ts=$(now_ms)
                pick_when "${DUR[$scn]}"
                cut_when=$WHEN
                delay=${WHEN#*+}
                [[ $WHEN == *+* ]] && trig=${WHEN%+*}
                # Cut at the chosen moment, or soon after the action ended if that came first
                # (drawn now, so the plan does not depend on timing).
                local extra=-1 extra_ms
                rnd 400; extra_ms=$R
                while :; do
                    local el=$(($(now_ms) - ts))
                    if [ -n "$trig" ]; then
                        # The moment counts from the engine's "effects of PHASE done" line.
                        if grep -q "^@@OUT $id action: .*phase effects done.*$trig" "$logf"; then
                            ts=$(now_ms) el=0 trig=''
                        fi
                    fi
                    [ -z "$trig" ] && [ $el -ge $delay ] && break
                    if [ $extra -lt 0 ] && grep -q "^@@ACTION-EXIT $id" "$logf"; then
                        extra=$((el + extra_ms))
                        local d
                        d=$(sed -n "s/^@@ACTION-EXIT $id cs=\([0-9]*\).*/\1/p" "$logf" | head -1)
                        [ -n "$d" ] && learn DUR DUR_SEEN "$scn" $((d * 10))
                    fi
                    [ $extra -ge 0 ] && [ $el -ge $extra ] && break
                    sleep 0.02
                done
                qemu_kill
                CUT_AT=$(($(now_ms) - ts))
            fi
        fi
        # Judge the previous cut from this boot's log.
        if [ -n "$prev" ]; then
            # Its action's output (its own boot) and its check (this boot).
            cat "$RUN/$prev.log" "$logf" | tr -d "\r" | grep "^@@[A-Z-]* $prev " >"$RUN/$prev.result" || true
            KIND=kill POLICY=$prev_pol LABEL=$prev_label DURING=$prev_during WHEN=$prev_when
            if judge "$prev" "$RUN/$prev.result" "$prev_scn" "$prev_fs" "$prev_acked" "$prev_same"; then
                [ -n "${PC_KEEP_ALL:-}" ] || rm -f "$prev_img"
            else
                FAILS=$((FAILS + 1))
                keep "$prev" "$prev_img" "$RUN/$prev.log" "$RUN/$prev.ctl" "$logf" "$RUN/$prev.result"
            fi
            echo "$prev $SIDE" >>"$sides_file"
            LABEL= DURING= WHEN=
        fi
        [ $last = 1 ] && break
        # This boot's action: was its success printed before the cut?
        local acked=none
        if grep -q "^@@OUT $id action: .*committed (tx" "$logf"; then acked=new
        elif grep -q "^@@OUT $id action: .*FAILED and rolled back" "$logf"; then acked=old; fi
        local same=''
        if [ "$scn" = recover ]; then
            # Same end as the uncut recovery of the same image (SPEC §3).
            same=$(awk -v p="$prev" '$1 == p { print $2 }' "$sides_file" | tail -1)
            # prev_scn stays: a recover cut inherits the expectations of its source.
            prev_label=$prev_scn+recover
        else
            prev_scn=$scn prev_label=$scn
        fi
        log "cut $id [kill $scn $fs $pol] power cut at $cut_when (${CUT_AT:-?} ms), acked=$acked, boot+cut $((($(now_ms) - t0) / 100))ds"
        local during=yes
        grep -q "^@@ACTION-EXIT $id" "$logf" && during=no
        prev=$id prev_img=$img prev_fs=$fs prev_pol=$pol prev_acked=$acked prev_same=$same prev_during=$during prev_when=$cut_when
        CUTS=$((CUTS + 1))
    done
}

# ------------------------------------------------------------------ kind 2: dm-flakey

# flakey_run N FS : one boot, N cuts made with dm-flakey drop_writes.
flakey_run() {
    local n=$1 fs=$2
    KIND=flakey
    local ctl=$RUN/flakey-$fs.ctl logf=$RUN/flakey-$fs.log cow=$RUN/flakey-cow.img
    rm -f "$cow" && truncate -s 4G "$cow"
    local i plan=$RUN/flakey-$fs.plan
    : >"$plan"
    {
        echo "mods dm$([ "$fs" = xfs ] && echo ' xfs')"
        expect_lines "$fs"
        for ((i = 1; i <= n; i++)); do
            local scn pol base delay
            # One time in (scenarios + 1), cut `recover` too after the first cut.
            rnd $((${#CUT_SCENARIOS[@]} + 1))
            local two=0
            [ $R = ${#CUT_SCENARIOS[@]} ] && two=1
            rnd ${#CUT_SCENARIOS[@]}; scn=${CUT_SCENARIOS[$R]}
            rnd 2; pol=$([ $R = 0 ] && echo resume || echo rollback)
            base=/dev/vdc; [ "$(scenario_base "$scn")" = v3 ] && base=/dev/vdd
            pick_when "${FDUR[$scn]}"
            delay=$WHEN
            if [ $two = 1 ]; then
                local d2
                rnd ${FDUR[recover]}; d2=$R
                echo "flakey2 f$i $base $fs $pol $delay $d2 $(scenario_cmd "$scn")"
            else
                echo "flakey f$i $base $fs $pol $delay $(scenario_cmd "$scn")"
            fi
            echo "f$i $scn $pol $two $delay" >>"$plan"
        done
    } >"$ctl"
    end_ctl "$ctl"
    local t0
    t0=$(now_ms)
    qemu_start "$logf" "$ctl" "$cow" "$IMGS/$fs/factory.img,snapshot=on" "$IMGS/$fs/v3.img,snapshot=on"
    local timeout=$((90 + n * 45))
    wait_for "$logf" '^@@DONE' $timeout || log "flakey batch did not finish in ${timeout}s; judging what it did"
    qemu_kill
    local secs=$((($(now_ms) - t0) / 1000))
    rm -f "$cow"
    local id scn pol two delay
    while read -r id scn pol two delay; do
        tr -d "\r" <"$logf" | grep "^@@[A-Z]* $id " >"$RUN/$id.result" || true
        # What the engine had reported when it was cut (dm_cut reads its output after
        # SIGSTOP, so that is everything it printed). In a double cut, the recover's report
        # is the later one.
        local acked a1 a2
        a1=$(sed -n "s/^@@CUT $id what=action acked=\([a-z]*\).*/\1/p" "$RUN/$id.result")
        a2=$(sed -n "s/^@@CUT $id what=recover acked=\([a-z]*\).*/\1/p" "$RUN/$id.result")
        acked=${a1:-none}
        [ -n "$a2" ] && [ "$a2" != none ] && acked=$a2
        local label=$scn
        [ "$two" = 1 ] && label=$scn+recover
        # Durations of actions that finished before their cut refine the next batch.
        local ran
        ran=$(sed -n "s/^@@CUT $id what=action .*ran_cs=\([0-9][0-9]*\).*/\1/p" "$RUN/$id.result")
        [ -n "$ran" ] && learn FDUR FDUR_SEEN "$scn" $((ran * 10))
        ran=$(sed -n "s/^@@CUT $id what=recover .*ran_cs=\([0-9][0-9]*\).*/\1/p" "$RUN/$id.result")
        [ -n "$ran" ] && learn FDUR FDUR_SEEN recover $((ran * 10))
        # Was the engine still running when the (last) cut came?
        local during=no
        grep -q "^@@CUT $id .*running=1" "$RUN/$id.result" && during=yes
        grep -q "^@@NOTRIGGER $id" "$RUN/$id.result" && log "cut $id: the engine never logged the trigger phase ($delay) before it exited"
        KIND=flakey POLICY=$pol LABEL=$label DURING=$during WHEN=$delay
        if ! judge "$id" "$RUN/$id.result" "$scn" "$fs" "$acked"; then
            FAILS=$((FAILS + 1))
            keep "$id" "$logf" "$ctl" "$RUN/$id.result"
        fi
        LABEL= DURING= WHEN=
        CUTS=$((CUTS + 1 + two))
    done <"$plan"
    log "flakey batch on $fs: $n scenarios in ${secs}s (including the boot)"
}

# ------------------------------------------------------------------ kind 3: dm-log-writes

# Hook called by lwreplay.pl at each point: $LW_IMG holds the replayed device.
lw_point() {
    local point=$1 entry=$2 flags=$3 marks=$4
    local id=lw$LW_TAG-p$point scratch=$RUN/lw-scratch.img
    cp --sparse=always "$LW_IMG" "$scratch"
    local rf=$RUN/$id.result
    host_check "$id" "$scratch" "$LW_FS" "$LW_POLICY" >"$rf"
    local acked=none
    [[ $marks == *acked-new* ]] && acked=new
    KIND=lw POLICY=$LW_POLICY DURING=yes
    [ $acked = new ] && DURING=no
    if judge "$id" "$rf" "$LW_SCN" "$LW_FS" "$acked" 2>>"$RUN/lw.log"; then
        rm -f "$rf"
        return 0
    fi
    tail -1 "$RESULTS" | cut -f11 | sed "s/^/    $id (entry $entry, $flags, marks $marks): /" >&2
    keep "$id" "$scratch" "$rf"
    return 1
}

# The same observations as the guest's check(), on the host, for a replayed image.
host_check() {
    local id=$1 img=$2 fs=$3 policy=$4
    in_ns "$img" "$fs" '
        id=$1 bin=$2 dump=$3 pol=$4
        c='"$MNT"'/cfg-$pol.toml
        t1=$(date +%s%N)
        "$bin" --config $c recover >/tmp/pc-rec.$$ 2>&1; rrc=$?
        t2=$(date +%s%N)
        "$bin" --config $c recover >/tmp/pc-rec2.$$ 2>&1; rrc2=$?
        "$bin" --config $c status --json >/tmp/pc-st.$$ 2>/tmp/pc-ste.$$; src=$?
        BB=busybox busybox sh "$dump" '"$MNT"' >/tmp/pc-dump.$$
        h=$(sha256sum /tmp/pc-dump.$$ | cut -d" " -f1)
        echo "@@CHECK $id mount=ok mount_cs=0 recover_rc=$rrc recover_cs=$(( (t2 - t1) / 10000000 )) recover2_rc=$rrc2 status_rc=$src check_cs=0 dump=$h"
        sed "s/^/@@OUT $id rec1: /" /tmp/pc-rec.$$
        sed "s/^/@@OUT $id rec2: /" /tmp/pc-rec2.$$
        sed "s/^/@@OUT $id status-err: /" /tmp/pc-ste.$$
        echo "@@STATUS $id $(tr -d "\n" </tmp/pc-st.$$)"
        sed "s/^/@@DUMP $id /" /tmp/pc-dump.$$
        rm -f /tmp/pc-rec.$$ /tmp/pc-rec2.$$ /tmp/pc-st.$$ /tmp/pc-ste.$$ /tmp/pc-dump.$$' \
        "$id" "$BIN" "$PCDIR/lib/dump.sh" "$policy" || echo "@@CHECK $id mount=fail"
}

# lw_run SCENARIO FS [POLICY] : record the action under dm-log-writes, replay every flush point.
lw_run() {
    local scn=$1 fs=$2 pol=${3:-resume}
    local tag=${LW_PREFIX:-}$scn-$fs-$pol
    local data=$RUN/lw-$tag-data.img logdev=$RUN/lw-$tag-log.img ctl=$RUN/lw-$tag.ctl logf=$RUN/lw-$tag.log
    local base=$IMGS/$fs/$(scenario_base "$scn").img
    cp --sparse=always "$base" "$data"
    rm -f "$logdev" && truncate -s 2G "$logdev"
    {
        echo "mods dm$([ "$fs" = xfs ] && echo ' xfs')"
        echo "lw $tag /dev/vdb /dev/vdc $fs $(scenario_cmd "$scn")"
    } >"$ctl"
    end_ctl "$ctl"
    local t0
    t0=$(now_ms)
    qemu_start "$logf" "$ctl" "$data" "$logdev"
    wait_for "$logf" '^@@DONE' 900 || { qemu_kill; keep "lw-$tag" "$logf"; die "log-writes recording did not finish; log $logf"; }
    wait "$QPID" 2>/dev/null || true
    local t1
    t1=$(now_ms)
    grep -q "^@@ACTION-EXIT $tag rc=0" "$logf" || { keep "lw-$tag" "$logf"; die "the recorded $scn action failed: $(grep "^@@OUT $tag" "$logf" | tail -3)"; }
    log "log-writes: $scn on $fs recorded in $(((t1 - t0) / 1000))s; replaying every flush/FUA point"
    local replay=$RUN/lw-$tag-replay.img
    cp --sparse=always "$base" "$replay"
    local before_fail=$FAILS
    export LW_IMG=$replay LW_FS=$fs LW_SCN=$scn LW_POLICY=$pol LW_TAG=$tag
    local rc=0
    perl "$PCDIR/lib/lwreplay.pl" ${PC_LW_EVERY:+--every-entry} "$logdev" "$replay" "$0" __lw_point 2>>"$RUN/lw.log" || rc=$?
    local t2 pts
    t2=$(now_ms)
    pts=$(grep -c "^lw	lw$tag-p" "$RESULTS" || true)
    tail -1 "$RUN/lw.log" | sed 's/^/    /' >&2
    # The replayer must reproduce the recorded device exactly.
    if ! cmp -s "$replay" "$data"; then
        log "log-writes: the full replay differs from the recorded device: replayer bug or lost log entries"
        FAILS=$((FAILS + 1))
    fi
    FAILS=$((FAILS + rc))
    CUTS=$((CUTS + pts))
    log "log-writes: $pts points checked in $(((t2 - t1) / 1000))s, $rc failed"
    [ -n "${PC_KEEP_ALL:-}" ] || rm -f "$data" "$logdev" "$replay" "$RUN/lw-scratch.img"
}

# ------------------------------------------------------------------ self-test of the checks

# Damages copies of the factory image in known ways and requires the checks to fail with the
# right diagnosis (and to pass on the undamaged copy): the checker cannot go blind either.
selftest() {
    local fs=ext4 payload=${IMGS/images-/payload-} img=$RUN/selftest.img
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
    )
    local c name acked damage want ok=0 bad=0
    for c in "${cases[@]}"; do
        IFS='|' read -r name acked damage want <<<"$c"
        cp --sparse=always "$IMGS/$fs/factory.img" "$img"
        in_ns "$img" "$fs" "cd $MNT && P=$payload && $damage" || die "selftest $name: could not damage the image"
        local rf=$RUN/selftest-$name.result
        host_check "st-$name" "$img" "$fs" resume >"$rf"
        KIND=selftest POLICY=resume LABEL=selftest-$name
        local got=FAIL
        judge "st-$name" "$rf" fw "$fs" "$acked" 2>>"$RUN/selftest.log" && got=PASS
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
    rm -f "$img" "$RUN"/selftest-*.result
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

# Summary of $RESULTS: counts per kind and scenario, sides, recovery times.
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
            { n++; k[$1]++; if ($8 == "FAIL") { f++; kf[$1]++ }
              key = $1 " " $3 " " $4; s[key]++; if ($7 == "new") sn[key]++; if ($7 == "old") so[key]++
              if ($6 == "new") an[key]++
              if ($12 == "yes") du[key]++
              if ($9 != "-" && $9 != "") { r[$1] = r[$1] " " $9 } }
            END {
                printf "Checked states: %d, failures: %d\n\n", n, f + 0
                printf "| kind | scenario | fs | checks | cut while the engine ran | all-new after recover | all-old after recover | success reported before the cut |\n|---|---|---|---|---|---|---|---|\n"
                for (key in s) { split(key, p, " "); printf "| %s | %s | %s | %d | %d | %d | %d | %d |\n", p[1], p[2], p[3], s[key], du[key], sn[key], so[key], an[key] }
            }' "$RESULTS" | { read -r head; echo "$head"; read -r; echo; read -r h1; read -r h2; echo "$h1"; echo "$h2"; sort; }
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
            awk -F'\t' '$8 == "FAIL" { printf "- %s %s (%s, %s, %s): %s\n", $1, $2, $3, $4, $5, $11 }' "$RESULTS" | head -50
        fi
    } >"$RUN/report.md"
    cat "$RUN/report.md" >&2
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
        selftest
        kill_run "${PC_QUICK_KILLS:-10}" ext4 xfs
        flakey_run "${PC_QUICK_FLAKEY:-12}" ext4
        lw_run fw ext4
        finish quick
        ;;
    soak)
        n=${1:-100}
        build_bin normal; prep_all ext4 xfs
        start_run soak
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        # A third of the cuts by QEMU kills, the rest by dm-flakey batches of 25 (ext4 and
        # xfs in turn), plus one log-writes replay of every scenario on ext4 and of fw on xfs
        # (those points are counted on top of N).
        nk=$((n / 3)); nf=$((n - nk)); b=0
        kill_run "$nk" ext4 xfs
        while [ $nf -gt 0 ]; do
            c=$((nf > 25 ? 25 : nf))
            flakey_run "$c" "$([ $((b % 2)) = 0 ] && echo ext4 || echo xfs)"
            nf=$((nf - c)); b=$((b + 1))
        done
        for scn in "${SCENARIOS[@]}"; do lw_run "$scn" ext4; done
        lw_run fw xfs
        finish "soak $n"
        cp "$RUN/report.md" "$OUTROOT/soak-report-latest.md"
        ;;
    negative)
        # The build without the staging syncfs must be caught. Only failures of the kinds that
        # missing durability causes count (a known, unrelated failure must not make the
        # control look detected). PC_NEG_KINDS adds flakey/kill batches of the fw scenario.
        # The same log-writes replay with the normal build first: it must show no durability
        # failure, or a failure of the negative build would prove nothing.
        build_bin normal; prep_all ext4
        start_run negative
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        LW_PREFIX=ctl- lw_run fw ext4
        normal_bin=$BIN
        build_bin negative; prep_all ext4
        export PC_BIN_USED=$BIN PC_IMGS=$IMGS
        for k in ${PC_NEG_KINDS:-lw}; do
            case $k in
                lw) LW_PREFIX=neg- lw_run fw ext4 ;;
                flakey) CUT_SCENARIOS=(fw); flakey_run "${PC_NEG_CUTS:-20}" ext4 ;;
                kill) CUT_SCENARIOS=(fw); kill_run "${PC_NEG_CUTS:-20}" ext4 ;;
                *) die "unknown kind $k" ;;
            esac
        done
        finish "negative control (normal build: lw; negative build: ${PC_NEG_KINDS:-lw}; fw, ext4)"
        durable='WRITE-AHEAD|LOST AN ACK|ZERO-LENGTH|TORN|MIXED|neither old nor new'
        control=$(awk -F'\t' -v re="$durable" '$8 == "FAIL" && $2 ~ /^lwctl-/ && $11 ~ re' "$RESULTS" | wc -l)
        caught=$(awk -F'\t' -v re="$durable" '$8 == "FAIL" && $2 !~ /^lwctl-/ && $11 ~ re { n[$1]++ }
            END { for (k in n) printf "%s%s: %d", (s++ ? ", " : ""), k, n[k] }' "$RESULTS")
        if [ "$control" -gt 0 ]; then
            log "NEGATIVE CONTROL INCONCLUSIVE: the normal build ($normal_bin) has $control durability failures itself"
            exit 1
        fi
        if [ -n "$caught" ]; then
            log "NEGATIVE CONTROL DETECTED: durability failures with the negative build (by cut kind: $caught), none with the normal build"
            exit 0
        fi
        log "NEGATIVE CONTROL NOT DETECTED: the harness is blind to the missing syncfs"
        exit 1
        ;;
    *)
        sed -n '2,20p' "$0" >&2
        exit 2
        ;;
esac
[ "$FAILS" -eq 0 ]
