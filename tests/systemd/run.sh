#!/usr/bin/env bash
# Service orchestration against a real systemd (SPEC §3 trial installs, §4 services). See
# README.md beside this file.
#
#   tests/systemd/run.sh [test]     prep if needed, then every scenario (exit 0 iff all pass)
#   tests/systemd/run.sh deb        prep if needed, then only the Debian package part (h-q, l, m)
#   tests/systemd/run.sh prep       only build and cache the kernel, initramfs and root image
#
# Environment: ST_BIN (use this static tope-updater instead of building one; ST_FEATURES
# must then say whether it has failpoints), ST_FEATURES
# (cargo features of the build; default "failpoints", needed by scenarios f and g), ST_CACHE
# (default target/systemd-cache), ST_OUT (default target/systemd-out), ST_KEEP=1 (keep the
# root image of a passing run), ST_EXTRA_CONFIG (TOML lines added to every config the
# updater gets in the guest), ST_BOOT_TIMEOUT (seconds per boot, default 420),
# ST_MIRROR (Debian mirror for debootstrap), ST_KERNEL=download (ignore /boot).
# The Debian package part: ST_DEB=0 (skip it in `test`), ST_DEBS (three .deb files, the
# operator's package and two upgrades of it, instead of building them with deploy/build-deb.sh),
# ST_BIG_MIB (MiB of random data in the 5.0.0 package that scenario o cuts mid-download,
# default 48).
# For debugging the harness: ST_DRIVER (another guest driver script), ST_PHASES (which boots
# of scenarios a-g to run, default "boot1 boot2 boot3 boot4").
set -euo pipefail

STDIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
REPO=$(cd "$STDIR/../.." && pwd)
CACHE=${ST_CACHE:-$REPO/target/systemd-cache}
OUTROOT=${ST_OUT:-$REPO/target/systemd-out}
SUITE=bookworm
MIRROR=${ST_MIRROR:-http://deb.debian.org/debian}
INCLUDE=systemd,systemd-sysv
BOOT_TIMEOUT=${ST_BOOT_TIMEOUT:-420}
FEATURES=${ST_FEATURES-failpoints}
# Scenario letters, in the order the guest runs them: guest/driver.sh on the image as it is,
# then guest/deb-driver.sh on a fresh copy, with the updater installed from the .deb (n-q, the
# daemon and its report outbox under power cuts, run between k and l: l and m remove the
# package).
SCENARIOS=(a b c d e f g)
DEB_SCENARIOS=(h i j k n o p q l m)
BIG_MIB=${ST_BIG_MIB:-48}

log() { printf '[systemd-test %(%H:%M:%S)T] %s\n' -1 "$*" >&2; }
die() { log "ERROR: $*"; exit 2; }
now_ms() { local t; t=$(date +%s%N); echo $((t / 1000000)); }
sha() { sha256sum "$@" | cut -d' ' -f1; }

# ------------------------------------------------------------------ dependencies

ensure_deps() {
    [ "$(id -u)" = 0 ] || die "run as root (debootstrap, and the image is made from a root-owned tree)"
    local need=()
    command -v debootstrap >/dev/null || need+=(debootstrap)
    command -v qemu-system-x86_64 >/dev/null || need+=(qemu-system-x86)
    [ -e /usr/share/qemu/qboot.rom ] || need+=(qemu-system-data)
    # (grep -c, not -q: under pipefail an early exit of grep would fail the pipeline)
    [ -x /bin/busybox ] && [ "$(/bin/busybox --list | grep -cx switch_root)" = 1 ] &&
        [ "$(ldd /bin/busybox 2>&1 | grep -cE 'statically|not a dynamic')" = 1 ] || need+=(busybox-static)
    command -v mkfs.ext4 >/dev/null || need+=(e2fsprogs)
    command -v xz >/dev/null || need+=(xz-utils)
    command -v modprobe >/dev/null || need+=(kmod)
    if [ ${#need[@]} -gt 0 ]; then
        log "installing ${need[*]}"
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y --no-install-recommends "${need[@]}" >/dev/null 2>&1 ||
            { apt-get update >/dev/null && apt-get install -y --no-install-recommends "${need[@]}" >/dev/null; }
    fi
}

# ------------------------------------------------------------------ the engine binary

# Sets BIN: a static tope-updater built from this tree into its own target dir.
build_bin() {
    if [ -n "${ST_BIN:-}" ]; then BIN=$ST_BIN; return; fi
    local dir=target/systemd-bin feat=()
    [ -n "$FEATURES" ] && feat=(--features "$FEATURES")
    log "building the static tope-updater (features: ${FEATURES:-none}) in $dir"
    local t0; t0=$(now_ms)
    (cd "$REPO" && RUSTFLAGS='-C target-feature=+crt-static' cargo build --quiet --release \
        --target x86_64-unknown-linux-gnu --target-dir "$dir" "${feat[@]}") >&2
    BIN=$REPO/$dir/x86_64-unknown-linux-gnu/release/tope-updater
    [ "$(ldd "$BIN" 2>&1 | grep -cE 'statically linked|not a dynamic')" = 1 ] || die "$BIN is not statically linked"
    TIMES+=("build $(( ($(now_ms) - t0) / 1000 )) s")
}

# ------------------------------------------------------------------ kernel

# prep_kernel (sets KVER, KMODDIR, VMLINUX) and copy_modules: shared with tests/powercut.
# shellcheck source=../guest/kernel.sh
. "$STDIR/../guest/kernel.sh"

# ------------------------------------------------------------------ initramfs

# Sets INITRD: busybox + the virtio/ext4 modules + guest/init (mount /dev/vda, switch_root).
prep_initramfs() {
    local bb=/bin/busybox key
    key=$( { echo "$KVER"; sha "$bb" "$STDIR/guest/init"; } | sha | cut -c1-16)
    INITRD=$CACHE/initramfs-$key.cpio
    [ -s "$INITRD" ] && return
    log "building the initramfs ($INITRD)"
    local d
    d=$(mktemp -d "$CACHE/initramfs.XXXXXX")
    mkdir -p "$d"/{bin,proc,sys,dev,newroot,modules}
    cp "$bb" "$d/bin/busybox"
    local a
    for a in $("$bb" --list); do [ "$a" = busybox ] || ln -s busybox "$d/bin/$a"; done
    install -m 755 "$STDIR/guest/init" "$d/init"
    # In load order (modprobe --show-depends prints dependencies first).
    copy_modules "$d/modules" virtio_pci virtio_blk crc32c_generic ext4 | while read -r name; do
        echo "/modules/$name" >>"$d/modules.list"
    done
    # Uncompressed: the guest spends no time on gunzip under TCG.
    (cd "$d" && find . | LC_ALL=C sort | "$bb" cpio -o -H newc 2>/dev/null) >"$INITRD.tmp"
    mv "$INITRD.tmp" "$INITRD"
    rm -rf "$d"
}

# ------------------------------------------------------------------ root image

# The debootstrap tree (minbase + systemd), cached on its own: it only changes with the
# suite, the package list or debootstrap itself. Sets BASE.
prep_base() {
    local key
    key=$( { echo "$SUITE $INCLUDE"; debootstrap --version 2>/dev/null || dpkg-query -W debootstrap; } | sha | cut -c1-16)
    BASE=$CACHE/debootstrap-$SUITE-$key
    [ -e "$BASE/ready" ] && return
    log "debootstrap $SUITE minbase + $INCLUDE into $BASE (about 40-100 s)"
    local t0; t0=$(now_ms)
    rm -rf "$BASE" && mkdir -p "$BASE"
    if ! debootstrap --variant=minbase --include="$INCLUDE" "$SUITE" "$BASE/rootfs" "$MIRROR" >"$BASE/debootstrap.log" 2>&1; then
        tail -20 "$BASE/debootstrap.log" >&2
        die "debootstrap failed (log: $BASE/debootstrap.log)"
    fi
    touch "$BASE/ready"
    TIMES+=("debootstrap $(( ($(now_ms) - t0) / 1000 )) s")
}

# The bootable root image: the debootstrap tree + guest/mkimage.sh (units, masks, factory
# content). Keyed by everything that shapes it; the updater binary is NOT in it. Sets IMAGE.
prep_image() {
    prep_base
    local key
    key=$( { echo "$BASE"; sha "$STDIR/guest/mkimage.sh" "$STDIR/guest/setup.sh" "$STDIR/guest/stopped.sh" "$STDIR/guest/app-script.sh" "$STDIR"/guest/units/*;
        declare -f prep_image; mkfs.ext4 -V 2>&1 | sed -n 1p; } | sha | cut -c1-16)
    IMAGE=$CACHE/root-$key.img
    [ -s "$IMAGE" ] && return
    log "making the root image $IMAGE"
    local t0 d; t0=$(now_ms)
    d=$(mktemp -d "$CACHE/rootfs.XXXXXX")
    cp -a "$BASE/rootfs/." "$d/"
    sh "$STDIR/guest/mkimage.sh" "$d" "$STDIR/guest"
    rm -f "$IMAGE.tmp"
    mkfs.ext4 -q -F -b 4096 -L tope-st-root -E lazy_itable_init=0,lazy_journal_init=0 -d "$d" "$IMAGE.tmp" 1G >/dev/null
    mv "$IMAGE.tmp" "$IMAGE"
    rm -rf "$d"
    TIMES+=("image $(( ($(now_ms) - t0) / 1000 )) s")
}

# Keep the 3 most recently used images, initramfs and base trees; the 5 newest runs.
prune_cache() {
    local prefix
    for prefix in root- initramfs- debootstrap-; do
        { ls -dt "$CACHE/$prefix"* 2>/dev/null || true; } | tail -n +4 | xargs -r rm -rf
    done
    { ls -dt "$OUTROOT"/run-* 2>/dev/null || true; } | tail -n +6 | xargs -r rm -rf
}

prep_all() {
    mkdir -p "$CACHE"
    prep_kernel "${ST_KERNEL:-}"
    prep_initramfs
    prep_image
    touch "$INITRD" "$IMAGE" "$BASE"
    prune_cache
}

# ------------------------------------------------------------------ packages and data disk

# manifest VERSION: a manifest template (pack fills in the hashes). The modules are listed
# b, c, a on purpose: the order of stops and starts must come from restart_order; c's
# process_name has the unit suffix, a's and b's not.
manifest() {
    local v=$1
    cat <<EOF
{"version": "$v", "modules": [
 {"name": "b", "src": "b/run.sh", "dst": "/opt/tope/b/run.sh", "mode": "0755", "process_name": "tope-b", "restart_order": 2},
 {"name": "c", "src": "c/run.sh", "dst": "/opt/tope/c/run.sh", "mode": "0755", "process_name": "tope-c.service", "restart_order": 3},
 {"name": "a", "src": "a/run.sh", "dst": "/opt/tope/a/run.sh", "mode": "0755", "process_name": "tope-a", "restart_order": 1}]}
EOF
}

# Package sources and packages into $1 (the data disk's tree):
#   src/vN/{a,b,c}/run.sh   what each version's files hold (the guest compares against them)
#   pkgs/vN.zip             1.0.0 (= the factory content; not installed), 2.0.0, 3.0.0
#                           (b cannot start), 4.0.0 (for the kill scenarios)
make_packages() {
    local data=$1 n x mode
    for n in 1 2 3 4; do
        local s=$data/src/v$n
        mkdir -p "$s"
        for x in a b c; do
            mkdir -p "$s/$x"
            mode=ok
            [ $n = 3 ] && [ $x = b ] && mode=fail
            sh "$STDIR/guest/app-script.sh" "$x" "$n.0.0" "$mode" >"$s/$x/run.sh"
            chmod 755 "$s/$x/run.sh"
        done
        manifest "$n.0.0" >"$s/manifest.json"
        mkdir -p "$data/pkgs"
        "$BIN" pack "$s" -o "$data/pkgs/v$n.zip" >/dev/null || die "tope-updater pack $s failed"
    done
}

# The base config: the one the image gets at its first boot (scenarios d and e write their own).
base_config() {
    cat <<'EOF'
state_dir = "/var/lib/tope-updater"
allowed_roots = ["/opt/tope"]
service_manager = "systemd"
EOF
    if [ -n "${ST_EXTRA_CONFIG:-}" ]; then printf '%s\n' "$ST_EXTRA_CONFIG"; fi
}

has_failpoints() { [[ ",$FEATURES," == *,failpoints,* ]]; }

# make_data_disk DIR PHASE LAST IMG: the per-boot data disk (/dev/vdb in the guest, mounted
# read-only at /data): the binary, the driver, packages, config and which boot this is.
make_data_disk() {
    local dir=$1 phase=$2 last=$3 img=$4
    install -m 755 "$BIN" "$dir/tope-updater"
    install -m 644 "${ST_DRIVER:-$STDIR/guest/driver.sh}" "$dir/driver.sh"
    base_config >"$dir/config.toml"
    echo "$phase" >"$dir/phase"
    echo "$last" >"$dir/last-phase"
    { echo "failpoints=$(has_failpoints && echo 1 || echo 0)"; } >"$dir/params"
    rm -f "$img"
    mkfs.ext4 -q -F -b 4096 -L tope-st-data -d "$dir" "$img" 64M >/dev/null
}

# ------------------------------------------------------------------ QEMU

# boot LOG ROOT DATA: one boot of the guest, until it powers off or reboots (-no-reboot
# makes a reboot end QEMU; the next boot is a new QEMU on the same root disk: a real
# reboot, new kernel boot id, same disk). Returns 1 on timeout.
boot() {
    local logf=$1 root=$2 data=$3
    : >"$logf"
    qemu-system-x86_64 -accel tcg -cpu max -m 1G -smp 1 -M pc -bios /usr/share/qemu/qboot.rom \
        -display none -nodefaults -no-reboot -serial "file:$logf" \
        -kernel "$VMLINUX" -initrd "$INITRD" \
        -append "console=ttyS0 quiet loglevel=3 panic=-1 mitigations=off cryptomgr.notests nokaslr audit=0 tsc=reliable no_timer_check random.trust_cpu=on systemd.show_status=0 rw" \
        -drive "file=$root,format=raw,if=virtio,cache=unsafe" \
        -drive "file=$data,format=raw,if=virtio,cache=unsafe" </dev/null >"$logf.qemu" 2>&1 &
    QPID=$!
    local end=$(($(now_ms) + BOOT_TIMEOUT * 1000)) rc=0
    while kill -0 "$QPID" 2>/dev/null; do
        if [ "$(now_ms)" -gt $end ]; then
            log "boot timed out after $BOOT_TIMEOUT s: killing QEMU"
            kill -KILL "$QPID" 2>/dev/null || true
            rc=1
            break
        fi
        sleep 0.2
    done
    wait "$QPID" 2>/dev/null || true
    QPID=
    # The serial console is a tty: strip the \r of its line ends.
    sed -i 's/\r$//' "$logf"
    return $rc
}

cleanup() {
    if [ -n "${QPID:-}" ]; then kill -KILL "$QPID" 2>/dev/null || true; fi
}

# ------------------------------------------------------------------ the Debian package part

# build_debs DIR: the operator's package (Cargo.toml's version, as deploy/build-deb.sh makes
# it) and two upgrades of it (VERSION+st1, VERSION+st2: the same files, higher versions) into
# DIR/debs, their names and versions into DIR/params (read by the guest). cargo deb empties
# target/debian on every run, so each one is copied out at once. ST_DEBS: three existing
# files instead. Sets DEB0 (the operator's package).
build_debs() {
    local dir=$1 t0 i f v upstream= debs=()
    t0=$(now_ms)
    rm -rf "$dir/debs" && mkdir -p "$dir/debs"
    if [ -n "${ST_DEBS:-}" ]; then
        read -r -a debs <<<"$ST_DEBS"
        [ ${#debs[@]} = 3 ] || die "ST_DEBS must name three .deb files (the package and two upgrades)"
        for i in 0 1 2; do
            [ -f "${debs[$i]}" ] || die "no such .deb: ${debs[$i]}"
            cp "${debs[$i]}" "$dir/debs/"
            debs[$i]=$dir/debs/$(basename "${debs[$i]}")
        done
    else
        for i in 0 1 2; do
            local args=()
            [ $i = 0 ] || args=(--deb-version "$upstream+st$i")
            log "building the .deb ${args[*]:-(the version in Cargo.toml)} with deploy/build-deb.sh"
            f=$("$REPO/deploy/build-deb.sh" "${args[@]}" | tail -1) || die "deploy/build-deb.sh ${args[*]} failed"
            [ -f "$f" ] || die "deploy/build-deb.sh ${args[*]} printed no package ($f)"
            cp "$f" "$dir/debs/"
            debs+=("$dir/debs/$(basename "$f")")
            if [ $i = 0 ]; then v=$(dpkg-deb -f "$f" Version); upstream=${v%-*}; fi
        done
        TIMES+=("debs $(( ($(now_ms) - t0) / 1000 )) s")
    fi
    : >"$dir/params"
    for i in 0 1 2; do
        f=${debs[$i]}
        [ "$(dpkg-deb -f "$f" Package)" = tope-updater ] || die "$f is not a tope-updater package"
        v=$(dpkg-deb -f "$f" Version)
        [ $i = 0 ] && upstream=${v%-*}
        echo "deb_f$i=/data/debs/$(basename "$f")" >>"$dir/params"
        echo "deb_v$i=$v" >>"$dir/params"
    done
    echo "upstream=$upstream" >>"$dir/params"
    { dpkg --compare-versions "$(dpkg-deb -f "${debs[0]}" Version)" lt "$(dpkg-deb -f "${debs[1]}" Version)" &&
        dpkg --compare-versions "$(dpkg-deb -f "${debs[1]}" Version)" lt "$(dpkg-deb -f "${debs[2]}" Version)"; } ||
        die "the three packages are not in ascending version order: ${debs[*]}"
    log "packages: $(sed -n 's/^deb_v[0-9]=//p' "$dir/params" | tr '\n' ' ')"
    DEB0=${debs[0]}
}

# The update packages the daemon installs in the deb part, made by the .deb's own binary
# (`pack`; the host runs the same Debian release as the guest): DIR/www/v2.zip .. v5.zip,
# their content in DIR/src/vN/ (the guest compares the files against it). Each replaces
# tope-a's script (the daemon stops and starts tope-a through systemd) and writes
# /opt/tope/deb/x.txt, whose post commands (run by /bin/sh -c, each completion journaled)
# record which daemon ran them ($PPID) and when. In 3.0.0 and 4.0.0 the second of three
# waits until systemd is stopping the daemon that runs it (at most about 2 min): the .deb
# upgrade of scenario j and the reboot of k come in the middle of the install, whatever the
# machine's speed. Their records go to /var/lib/tope-st/post-VERSION (they must outlive k's
# reboot; TOPE_VERSION is the post commands' environment).
# 5.0.0 (scenarios o-q) also carries BIG_MIB MiB of random data (/opt/tope/deb/big.bin), so
# that its download takes seconds under TCG and scenario o can cut the power in the middle of
# it. Its second post command, while /run/tope-st-cut exists (scenario q arms it; a tmpfs: the
# boot after the cut finds none), says so in /run/tope-st-cut-here and sleeps: the driver cuts
# the power there, in the middle of the transaction. The big file stays off the data disk
# (only its MD5 goes to DIR/params, with the size and MD5 of v5.zip).
deb_packages() {
    local dir=$1 n tmp post big
    tmp=$(mktemp -d)
    dpkg-deb -x "$DEB0" "$tmp"
    rm -rf "$dir/www" "$dir/src" && mkdir -p "$dir/www"
    for n in 2 3 4 5; do
        local s=$dir/src/v$n
        mkdir -p "$s/a"
        sh "$STDIR/guest/app-script.sh" a "$n.0.0" >"$s/a/run.sh"
        chmod 755 "$s/a/run.sh"
        echo "tope systemd test, Debian package part: x version $n.0.0" >"$s/x.txt"
        post='"echo h $PPID >>/run/tope-h.marks"'
        [ $n -ge 3 ] && post='"read -r u _ </proc/uptime; echo 1 $PPID $u >>/var/lib/tope-st/post-$TOPE_VERSION",
   "n=0; while [ $n -lt 1200 ]; do s=$(systemctl show -p ActiveState --value tope-updater.service); [ \"$s\" = deactivating ] && break; sleep 0.1; n=$((n + 1)); done; read -r u _ </proc/uptime; echo 2 $PPID $u $s >>/var/lib/tope-st/post-$TOPE_VERSION",
   "read -r u _ </proc/uptime; echo 3 $PPID $u >>/var/lib/tope-st/post-$TOPE_VERSION"'
        [ $n = 5 ] && post='"read -r u _ </proc/uptime; echo 1 $PPID $u >>/var/lib/tope-st/post-$TOPE_VERSION",
   "if [ -e /run/tope-st-cut ]; then read -r u _ </proc/uptime; echo $PPID $u >/run/tope-st-cut-here; sleep 240; fi; read -r u _ </proc/uptime; echo 2 $PPID $u >>/var/lib/tope-st/post-$TOPE_VERSION",
   "read -r u _ </proc/uptime; echo 3 $PPID $u >>/var/lib/tope-st/post-$TOPE_VERSION"'
        big=
        if [ $n = 5 ]; then
            head -c $((BIG_MIB * 1024 * 1024)) /dev/urandom >"$s/big.bin"
            big='
 {"name": "big", "src": "big.bin", "dst": "/opt/tope/deb/big.bin"},'
        fi
        cat >"$s/manifest.json" <<MANIFEST
{"version": "$n.0.0", "modules": [
 {"name": "a", "src": "a/run.sh", "dst": "/opt/tope/a/run.sh", "mode": "0755", "process_name": "tope-a", "restart_order": 1},$big
 {"name": "x", "src": "x.txt", "dst": "/opt/tope/deb/x.txt", "post_cmds": [
   $post]}]}
MANIFEST
        "$tmp/usr/bin/tope-updater" pack "$s" -o "$dir/www/v$n.zip" >/dev/null || die "tope-updater pack $s failed"
    done
    {
        echo "big_md5=$(md5sum "$dir/src/v5/big.bin" | cut -d' ' -f1)"
        echo "v5_size=$(stat -c %s "$dir/www/v5.zip")"
        echo "v5_md5=$(md5sum "$dir/www/v5.zip" | cut -d' ' -f1)"
    } >>"$dir/params"
    rm -f "$dir/src/v5/big.bin"
    rm -rf "$tmp"
}

# The deb part's root disk: a copy of the cached image without the image's own
# tope-updater-recover.service (in /etc/systemd/system it would shadow the package's unit of
# the same name; an operator's device has none), removed with debugfs (no mount needed).
make_deb_root() {
    local img=$1 cmds
    cp --sparse=always "$IMAGE" "$img"
    cmds=$(mktemp)
    printf 'rm %s\n' /etc/systemd/system/multi-user.target.wants/tope-updater-recover.service \
        /etc/systemd/system/tope-updater-recover.service >"$cmds"
    debugfs -w -f "$cmds" "$img" >/dev/null 2>&1 || die "debugfs on $img failed"
    rm -f "$cmds"
    local f
    for f in /etc/systemd/system/multi-user.target.wants/tope-updater-recover.service /etc/systemd/system/tope-updater-recover.service; do
        if debugfs -R "stat $f" "$img" 2>&1 | grep -q 'Inode:'; then
            die "could not remove $f from $img"
        fi
    done
    e2fsck -fn "$img" >/dev/null 2>&1 || die "$img does not pass e2fsck after the debugfs edit"
}

# make_deb_data_disk DIR PHASE LAST IMG: as make_data_disk, but no tope-updater binary and no
# config (setup.sh then installs neither: everything comes from the .deb); instead the .deb
# files, busybox (httpd, wget), the update packages, guest/deb-driver.sh as the driver and
# guest/report-receiver.sh (the reports' receiver, a CGI). Sized for what it holds (v5.zip
# carries BIG_MIB MiB).
make_deb_data_disk() {
    local dir=$1 phase=$2 last=$3 img=$4 mib
    install -m 755 /bin/busybox "$dir/busybox"
    install -m 644 "$STDIR/guest/deb-driver.sh" "$dir/driver.sh"
    install -m 755 "$STDIR/guest/report-receiver.sh" "$dir/report-receiver.sh"
    echo "$phase" >"$dir/phase"
    echo "$last" >"$dir/last-phase"
    rm -f "$img"
    mib=$(du -sm "$dir" | cut -f1)
    mkfs.ext4 -q -F -b 4096 -L tope-st-data -d "$dir" "$img" $((mib + 48))M >/dev/null
}

# run_deb RUN: the Debian package part, on its own copy of the root image (RUN/root-deb.img).
# Boot deb1: h (dpkg -i), i (upgrade, idle), j (upgrade mid-install), k (reboot mid-install).
# Boot deb2: the end of k (the boot after it), n (the reports' receiver), o and p (download,
# power cut mid-download while a report is being delivered). Boot deb3: the end of o and p,
# q (install, power cut mid-transaction with the receiver down). Boot deb4: the end of q, l
# (dpkg -r), m (dpkg -P), power off. The boots after a power cut run on the same root disk,
# as after a reboot. Sets DEB_OK=0 when a boot did not finish.
run_deb() {
    local run=$1 phase t0 secs up
    DEB_OK=1
    mkdir -p "$run/deb-data"
    build_debs "$run/deb-data"
    deb_packages "$run/deb-data"
    make_deb_root "$run/root-deb.img"
    for phase in deb1 deb2 deb3 deb4; do
        make_deb_data_disk "$run/deb-data" "$phase" deb4 "$run/data-deb.img"
        log "$phase: starting the guest"
        t0=$(now_ms)
        if ! boot "$run/$phase.log" "$run/root-deb.img" "$run/data-deb.img"; then DEB_OK=0; fi
        secs=$(( ($(now_ms) - t0) / 1000 ))
        TIMES+=("$phase $secs s")
        grep -q "^@@END $phase\$" "$run/$phase.log" || { log "$phase did not finish (see $run/$phase.log)"; DEB_OK=0; }
        up=$(sed -n 's/^@@BOOTED //p' "$run/$phase.log" | head -1)
        log "$phase: ${secs} s (guest: ${up:-no boot line})"
        [ $DEB_OK = 1 ] || break
    done
}

# summarize RUN LETTERS...: one PASS/FAIL/SKIP line per scenario from RUN/results.txt (failed
# checks listed under it); adds the failed ones to FAILS.
summarize() {
    local run=$1 s title
    shift
    for s in "$@"; do
        title=$(sed -n "s/^@@TITLE $s //p" "$run/results.txt" | head -1)
        if grep -q "^@@BAD $s " "$run/results.txt"; then
            echo "FAIL  $s  ${title}"
            sed -n "s/^@@BAD $s /        /p" "$run/results.txt"
            FAILS=$((FAILS + 1))
        elif grep -q "^@@RESULT $s PASS" "$run/results.txt"; then
            echo "PASS  $s  ${title}"
        elif grep -q "^@@SKIP $s" "$run/results.txt"; then
            echo "SKIP  $s  $(sed -n "s/^@@SKIP $s //p" "$run/results.txt" | head -1)"
        else
            echo "FAIL  $s  ${title:-(no result: the guest never finished this scenario)}"
            FAILS=$((FAILS + 1))
        fi
    done
}

# ------------------------------------------------------------------ the test

# run_test [deb]: every scenario, or with "deb" only the Debian package part.
run_test() {
    local only=${1:-}
    TIMES=()
    local t_all; t_all=$(now_ms)
    prep_all
    [ "$only" = deb ] || build_bin
    local run; run=$OUTROOT/run-$(date +%Y%m%d-%H%M%S)
    mkdir -p "$run"
    trap cleanup EXIT
    log "run directory $run"
    local phase ok=1 t0 phases letters=()
    if [ "$only" != deb ]; then
        letters=("${SCENARIOS[@]}")
        mkdir -p "$run/data"
        cp --sparse=always "$IMAGE" "$run/root.img"
        make_packages "$run/data"
        # Boot 1: a, b, c, then the trial install of d, reboot. Boot 2: the end of d, the
        # confirmed trial of e, reboot. Boot 3: the end of e, f, the killed install of g,
        # reboot. Boot 4: the end of g; power off. (Without failpoints: no f and g, no boot 4.)
        phases="boot1 boot2 boot3"
        has_failpoints && phases="$phases boot4"
        phases=${ST_PHASES:-$phases}
        for phase in $phases; do
            make_data_disk "$run/data" "$phase" "${phases##* }" "$run/data.img"
            log "$phase: starting the guest"
            t0=$(now_ms)
            if ! boot "$run/$phase.log" "$run/root.img" "$run/data.img"; then ok=0; fi
            local secs=$(( ($(now_ms) - t0) / 1000 ))
            TIMES+=("$phase $secs s")
            grep -q "^@@END $phase\$" "$run/$phase.log" || { log "$phase did not finish (see $run/$phase.log)"; ok=0; }
            local up; up=$(sed -n 's/^@@BOOTED //p' "$run/$phase.log" | head -1)
            log "$phase: ${secs} s (guest: ${up:-no boot line})"
            [ $ok = 1 ] || break
        done
    fi
    # The Debian package part, on its own root disk: it runs whatever happened above.
    if [ "$only" = deb ] || [ "${ST_DEB:-1}" != 0 ]; then
        letters+=("${DEB_SCENARIOS[@]}")
        run_deb "$run"
        [ $DEB_OK = 1 ] || ok=0
    fi
    cat "$run"/boot*.log "$run"/deb*.log 2>/dev/null | grep '^@@' >"$run/results.txt" || true
    echo
    FAILS=0
    summarize "$run" "${letters[@]}"
    TIMES+=("total $(( ($(now_ms) - t_all) / 1000 )) s")
    echo
    log "timings: ${TIMES[*]}"
    log "serial logs and results: $run"
    if [ $FAILS = 0 ] && [ $ok = 1 ]; then
        [ "${ST_KEEP:-0}" = 1 ] || rm -f "$run/root.img" "$run/root-deb.img"
        log "systemd scenarios: all passed"
        return 0
    fi
    log "systemd scenarios: $FAILS failed (the root disks are kept: $(ls "$run"/root*.img 2>/dev/null | tr '\n' ' '))"
    return 1
}

mode=${1:-test}
case $mode in
    prep) TIMES=(); ensure_deps; prep_all; log "ready: $IMAGE ${TIMES[*]}" ;;
    test) ensure_deps; run_test ;;
    deb) ensure_deps; run_test deb ;;
    *) echo "usage: $0 [test|deb|prep]" >&2; exit 2 ;;
esac
