#!/usr/bin/env bash
# Builds the Debian package with deploy/build-deb.sh and inspects it: the files, their modes, the
# conffile, the maintainer scripts, and that the packaged units parse (systemd-analyze verify
# when available), the man page and the completions. tests/systemd/run.sh installs it on a real
# systemd (dpkg -i, upgrades, remove, purge).
set -euo pipefail
cd "$(dirname "$0")/../.."
fail() { echo "deb: FAIL: $*" >&2; exit 1; }
command -v dpkg-deb >/dev/null || fail "dpkg-deb missing"
deb=$(deploy/build-deb.sh | tail -1)
[ -f "$deb" ] || fail "deploy/build-deb.sh printed no package ($deb)"
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
expect usr/share/man/man1/tope-updater.1.gz -rw-r--r--
expect usr/share/bash-completion/completions/tope-updater -rw-r--r--
expect usr/share/zsh/vendor-completions/_tope-updater -rw-r--r--
expect usr/share/fish/vendor_completions.d/tope-updater.fish -rw-r--r--
grep -qx /etc/tope-updater/config.toml "$work/control/conffiles" || fail "config.toml is not a conffile"
for s in postinst prerm postrm; do [ -x "$work/control/$s" ] || fail "no executable $s"; done
grep -q 'systemctl enable tope-updater-recover.service tope-updater.service' "$work/control/postinst" || fail "postinst does not enable the units"
grep -q '^Package: tope-updater$' "$work/control/control" || fail "control: package name"
# The packaged binary runs and the packaged config parses.
dpkg-deb -x "$deb" "$work/root"
"$work/root/usr/bin/tope-updater" --version | grep -q tope-updater || fail "the binary does not run"
sed "s#/var/lib/tope-updater#$work/state#" "$work/root/etc/tope-updater/config.toml" > "$work/config.toml"
"$work/root/usr/bin/tope-updater" --config "$work/config.toml" config >/dev/null || fail "the packaged config.toml does not parse"
# The man page and completions are the binary's own (generated from the same clap definitions).
r=$work/root
gzip -t "$r/usr/share/man/man1/tope-updater.1.gz" || fail "the man page is not gzip"
zcat "$r/usr/share/man/man1/tope-updater.1.gz" | cmp -s - <("$r/usr/bin/tope-updater" man) || fail "the man page is not what the packaged binary prints"
zcat "$r/usr/share/man/man1/tope-updater.1.gz" | grep -q '^\.SS rollback' || fail "the man page has no rollback section"
for sh in bash zsh fish; do
    case $sh in bash) f=usr/share/bash-completion/completions/tope-updater ;; zsh) f=usr/share/zsh/vendor-completions/_tope-updater ;;
        fish) f=usr/share/fish/vendor_completions.d/tope-updater.fish ;; esac
    cmp -s "$r/$f" <("$r/usr/bin/tope-updater" completions $sh) || fail "$f is not what the packaged binary prints"
done
bash -n "$r/usr/share/bash-completion/completions/tope-updater" || fail "the bash completion does not parse"
# The bash completion completes a subcommand.
out=$(bash -c 'source "$1"; COMP_WORDS=(tope-updater roll); COMP_CWORD=1; COMP_LINE="tope-updater roll"; COMP_POINT=${#COMP_LINE}; _tope__updater tope-updater roll tope-updater; echo "${COMPREPLY[*]}"' _ "$r/usr/share/bash-completion/completions/tope-updater")
[[ " $out " == *" rollback "* ]] || fail "the bash completion does not complete 'roll' to rollback (got: $out)"
head -1 "$r/usr/share/zsh/vendor-completions/_tope-updater" | grep -qx '#compdef tope-updater' || fail "the zsh completion has no #compdef line"
if command -v systemd-analyze >/dev/null; then
    systemd-analyze verify "$work/root/lib/systemd/system/"*.service 2>&1 | grep -v 'Failed to prepare filename\|not executable\|No such file' || true
fi
echo "deb: PASS ($(grep -c . "$work/contents") entries)"
