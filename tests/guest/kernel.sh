# shellcheck shell=bash
# The guest kernel for the QEMU harnesses (tests/powercut/run.sh, tests/systemd/run.sh): a
# Debian kernel, booted as an ELF vmlinux, and its modules for an initramfs. Sourced by
# both harnesses (not run on its own); it only defines functions.
#
# Expects from the caller:
#   set -euo pipefail     the harnesses' shell options; the functions rely on them to stop
#                         on errors (a failing modprobe, xz or cp fails the pipeline)
#   CACHE                 an existing directory: the kernel package (when downloaded) and the
#                         extracted vmlinux are kept there, and reused by the next run
#   log MSG, die MSG      progress messages, and a fatal error (die must not return)
#   sha FILE...           the sha256 hex of each file, one a line
#   the tools             apt-cache, apt-get, dpkg-deb, depmod, modprobe (kmod), xz, grep -P
#
# prep_kernel [download]
#   Sets KVER (the kernel version), KMODDIR (a lib/modules/KVER with modules.dep) and
#   VMLINUX ($CACHE/vmlinux-KVER-KEY, KEY from the vmlinuz's hash). Takes the last (in
#   glob order) /boot/vmlinuz-*-amd64 whose /lib/modules/VERSION/modules.dep exists; with
#   none (or with the argument "download": the harnesses pass PC_KERNEL / ST_KERNEL) it
#   downloads the package linux-image-amd64 depends on and unpacks it in
#   $CACHE/kernel-PACKAGE. The download and the extraction are skipped when their result is
#   already in $CACHE.
#
# copy_modules DIR MODULE...
#   Resolves MODULE... and their dependencies against KVER/KMODDIR (modprobe --show-depends:
#   dependencies first), copies each .ko once into DIR (an .xz one decompressed) and prints
#   the file names it copied, in load order, one a line. What the initramfs does with them
#   (lists, groups) is the caller's.

# Sets KVER, KMODDIR (a lib/modules/KVER with modules.dep), VMLINUX. $1: "download" to
# ignore /boot.
prep_kernel() {
    local source=${1:-} vmlinuz= f v
    KVER=
    for f in /boot/vmlinuz-*-amd64; do
        [ "$source" = download ] && break
        [ -e "$f" ] || continue
        v=${f#/boot/vmlinuz-}
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
        # As scripts/extract-vmlinux: find the xz stream and decompress it. QEMU boots the
        # ELF through its PVH entry point: no real-mode setup, no in-guest decompression.
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

# copy_modules DIR MODULE...: copies MODULE... and their dependencies (each once, .xz
# decompressed) into DIR; prints the copied file names in load order (modprobe
# --show-depends prints dependencies first).
copy_modules() {
    local dir=$1 m
    shift
    for m in "$@"; do
        modprobe -d "${KMODDIR%/lib/modules/*}" -S "$KVER" --show-depends "$m" | awk '$1 == "insmod" { print $2 }'
    done | awk '!seen[$0]++' | while read -r ko; do
        local name
        name=$(basename "$ko")
        case $name in *.xz) xz -dc "$ko" >"$dir/${name%.xz}"; name=${name%.xz} ;; *) cp "$ko" "$dir/$name" ;; esac
        echo "$name"
    done
}
