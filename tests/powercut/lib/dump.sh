# Canonical state of one power-cut test filesystem, for the all-old-or-all-new check.
#
#   busybox sh dump.sh MNT
#
# Runs unchanged in the guest (busybox is the only userland there) and on the host (always
# through `busybox`, the same binary that goes into the initramfs, so both sides print the
# same bytes). Prints, sorted by path, one line per entry under MNT/root:
#
#   F <mode> <size> <md5> <path>        regular file (md5: a tree in 0.35 s under TCG, 0.6 s
#                                       with sha256; it only has to tell contents apart)
#   D <mode> <path>                     directory (no size: it differs between filesystems)
#   O <type> <path>                     anything else (symlink, fifo...)
#
# then one `X <path>` line per leftover temporary file (`.tope-*`) anywhere under MNT
# (targets' directories and the backup store). Paths are relative (`./...`) and contain no
# spaces in the test scenarios.
BB=${BB:-busybox}
mnt=$1
if ! cd "$mnt/root" 2>/dev/null; then
    echo "O missing ./"
    exit 0
fi
{
    $BB find . -mindepth 1 -exec $BB stat -c 'S|%F|%a|%s|%n' {} +
    $BB find . -type f -exec $BB md5sum {} +
} | LC_ALL=C $BB awk '
    /^S\|/ {
        n = split($0, a, "|")
        p = a[5]; for (i = 6; i <= n; i++) p = p "|" a[i]
        type[p] = a[2]; mode[p] = a[3]; size[p] = a[4]
        next
    }
    { h = $1; p = substr($0, length(h) + 3); hash[p] = h }
    END {
        for (p in type) {
            t = type[p]
            if (t == "regular file" || t == "regular empty file") {
                printf "F %s %s %s %s\n", mode[p], size[p], (p in hash ? hash[p] : "unreadable"), p
            } else if (t == "directory") {
                printf "D %s %s\n", mode[p], p
            } else {
                gsub(/ /, "_", t)
                printf "O %s %s\n", t, p
            }
        }
    }' | LC_ALL=C $BB awk '{ print $NF "\t" $0 }' | LC_ALL=C $BB sort | LC_ALL=C $BB cut -f2-
cd "$mnt" && $BB find . -name '.tope-*' | LC_ALL=C $BB sort | LC_ALL=C $BB sed 's/^/X /'
