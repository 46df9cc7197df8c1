#!/bin/sh
# Turns a copy of the debootstrap tree (minbase + systemd) into the test guest's root fs.
# Run by run.sh on the host, as root, on a scratch directory:  mkimage.sh ROOTFS GUESTDIR
# Everything here is part of the image cache key (run.sh hashes this file, units/, setup.sh,
# stopped.sh and app-script.sh), so changing any of them rebuilds the image (a few seconds:
# the debootstrap tree itself is cached separately).
set -eu
R=$1 G=$2
S=$R/etc/systemd/system

# Smaller image, faster mkfs: nothing here is needed at run time.
rm -rf "$R"/var/cache/apt/archives/*.deb "$R"/var/lib/apt/lists/* "$R"/usr/share/doc/* \
    "$R"/usr/share/man/* "$R"/usr/share/locale/* "$R"/usr/share/info/*

echo tope-st >"$R/etc/hostname"
# No line for / : it would make systemd wait for /dev/vda's device unit, i.e. for udev
# coldplug (not even installed). The initramfs mounts / read-write.
echo '# root is mounted rw by the initramfs; nothing else to mount' >"$R/etc/fstab"
# A fixed machine id: not a "first boot" (no systemd-firstboot, no preset run).
echo 5e7b5e7b5e7b5e7b5e7b5e7b5e7b5e7b >"$R/etc/machine-id"

# journald: keep everything in memory (one boot at a time is all we read), no rate limit
# (the updater's systemctl calls and the services' lines must all be there).
mkdir -p "$R/etc/systemd/journald.conf.d"
cat >"$R/etc/systemd/journald.conf.d/tope-st.conf" <<'EOF'
[Journal]
Storage=volatile
RateLimitIntervalSec=0
ForwardToConsole=no
EOF
# Quick shutdown: nothing in this guest needs 90 s to stop.
mkdir -p "$R/etc/systemd/system.conf.d"
cat >"$R/etc/systemd/system.conf.d/tope-st.conf" <<'EOF'
[Manager]
DefaultTimeoutStopSec=15s
ShowStatus=no
EOF

# Units that only cost boot time here (research/powercut.md §7; `systemd-analyze blame`
# under TCG). No getty at all: the serial console is the result channel. No kmod in the
# image (the initramfs loaded what the kernel needs), so no modprobe units either.
for u in getty.target getty@.service serial-getty@.service getty-static.service \
    systemd-user-sessions.service e2scrub_reap.service e2scrub_all.timer fstrim.timer \
    apt-daily.timer apt-daily-upgrade.timer dpkg-db-backup.timer systemd-pstore.service \
    systemd-tmpfiles-clean.timer remote-fs.target modprobe@.service systemd-modules-load.service \
    dev-hugepages.mount dev-mqueue.mount sys-kernel-debug.mount sys-kernel-tracing.mount \
    sys-kernel-config.mount sys-fs-fuse-connections.mount systemd-update-utmp.service \
    systemd-update-utmp-runlevel.service systemd-remount-fs.service systemd-journal-flush.service \
    systemd-sysusers.service systemd-random-seed.service systemd-binfmt.service \
    proc-sys-fs-binfmt_misc.automount systemd-journal-catalog-update.service \
    systemd-update-done.service ldconfig.service; do
    rm -f "$S"/*.wants/"$u"
    ln -sf /dev/null "$S/$u"
done

ln -sf /lib/systemd/system/multi-user.target "$S/default.target"

# The test units, enabled by hand (no systemctl on the host, no need to chroot).
mkdir -p "$S/multi-user.target.wants"
for f in "$G"/units/*.service; do
    u=$(basename "$f")
    install -m 644 "$f" "$S/$u"
    ln -sf "/etc/systemd/system/$u" "$S/multi-user.target.wants/$u"
done
mkdir -p "$R/usr/local/lib/tope-st"
install -m 755 "$G/setup.sh" "$G/stopped.sh" "$R/usr/local/lib/tope-st/"

# Factory content: version 1.0.0 of every test service.
for x in a b c; do
    mkdir -p "$R/opt/tope/$x"
    sh "$G/app-script.sh" "$x" 1.0.0 >"$R/opt/tope/$x/run.sh"
    chmod 755 "$R/opt/tope/$x/run.sh"
done
