#!/usr/bin/env bash
# Builds the Debian package: the release binary, then the man page and the bash, zsh and fish
# completions generated from the clap definitions by that binary (`tope-updater man`,
# `tope-updater completions SHELL`) into target/deb-assets/, then `cargo deb --no-build`.
# Prints the path of the .deb on its last line.
#
#   deploy/build-deb.sh [--deb-version V]     (V: the package version, default Cargo.toml's)
#
# Installs cargo-deb (pinned) if missing.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DEB_VERSION=3.8.0
deb_version=()
case ${1:-} in
    --deb-version) deb_version=(--deb-version "$2") ;;
    "") ;;
    *) echo "usage: $0 [--deb-version V]" >&2; exit 2 ;;
esac
if ! cargo deb --version 2>/dev/null | grep -q "$CARGO_DEB_VERSION"; then
    echo "build-deb: installing cargo-deb $CARGO_DEB_VERSION" >&2
    cargo install --quiet --locked cargo-deb --version "$CARGO_DEB_VERSION" --no-default-features
fi
cargo build --quiet --release
bin=target/release/tope-updater
assets=target/deb-assets
rm -rf "$assets" && mkdir -p "$assets"
# gzip -n: no name or time stamp in the header, so the same binary gives the same package.
"$bin" man | gzip -9n >"$assets/tope-updater.1.gz"
"$bin" completions bash >"$assets/tope-updater.bash"
"$bin" completions zsh >"$assets/_tope-updater"
"$bin" completions fish >"$assets/tope-updater.fish"
for f in "$assets"/*; do [ -s "$f" ] || { echo "build-deb: $f is empty" >&2; exit 1; }; done
out=$(cargo deb --no-build --quiet "${deb_version[@]}" 2>&1 | tail -1)
[ -f "$out" ] || out=$(ls -t target/debian/tope-updater_*.deb | head -1)
echo "$out"
