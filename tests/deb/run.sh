#!/usr/bin/env bash
# Builds the Debian package with `cargo deb` and inspects it: the files, their modes, the
# conffile, the maintainer scripts, and that the packaged units parse (systemd-analyze verify
# when available). Installs cargo-deb (pinned) if missing.
set -euo pipefail
cd "$(dirname "$0")/../.."
CARGO_DEB_VERSION=3.8.0
fail() { echo "deb: FAIL: $*" >&2; exit 1; }
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "deb: installing cargo-deb $CARGO_DEB_VERSION"
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" --no-default-features
fi
command -v dpkg-deb >/dev/null || fail "dpkg-deb missing"
deb=$(cargo deb --quiet 2>&1 | tail -1)
[ -f "$deb" ] || deb=$(ls -t target/debian/tope-updater_*.deb | head -1)
echo "deb: built $deb ($(stat -c %s "$deb") bytes)"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
dpkg-deb -c "$deb" > "$work/contents"
dpkg-deb -e "$deb" "$work/control"
expect() { # path mode
    grep -E "^$2 .* \./$1\$" "$work/contents" >/dev/null || { cat "$work/contents"; fail "no ./$1 with mode $2"; }
}
expect usr/bin/tope-updater -rwxr-xr-x
expect lib/systemd/system/tope-updater.service -rw-r--r--
expect lib/systemd/system/tope-updater-recover.service -rw-r--r--
expect etc/tope-updater/config.toml -rw-r--r--
grep -qx /etc/tope-updater/config.toml "$work/control/conffiles" || fail "config.toml is not a conffile"
for s in postinst prerm postrm; do [ -x "$work/control/$s" ] || fail "no executable $s"; done
grep -q 'systemctl enable tope-updater-recover.service tope-updater.service' "$work/control/postinst" || fail "postinst does not enable the units"
grep -q '^Package: tope-updater$' "$work/control/control" || fail "control: package name"
# The packaged binary runs and the packaged config parses.
dpkg-deb -x "$deb" "$work/root"
"$work/root/usr/bin/tope-updater" --version | grep -q tope-updater || fail "the binary does not run"
sed "s#/var/lib/tope-updater#$work/state#" "$work/root/etc/tope-updater/config.toml" > "$work/config.toml"
"$work/root/usr/bin/tope-updater" --config "$work/config.toml" config >/dev/null || fail "the packaged config.toml does not parse"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$work/root/lib/systemd/system/"*.service 2>&1 | grep -v 'Failed to prepare filename\|not executable\|No such file' || true
fi
echo "deb: PASS ($(grep -c . "$work/contents") entries)"
