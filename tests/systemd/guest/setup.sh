#!/bin/sh
# tope-st-setup.service: mounts this run's data disk (/dev/vdb, made by run.sh) at /data
# and installs the updater binary from it. The root image stays independent of the code
# under test. The first boot of an image also gets the base config.
set -e
mkdir -p /data
mountpoint -q /data || mount -t ext4 -o ro,noload /dev/vdb /data
install -m 755 /data/tope-updater /usr/local/bin/tope-updater
mkdir -p /etc/tope-updater
[ -e /etc/tope-updater/config.toml ] || install -m 644 /data/config.toml /etc/tope-updater/config.toml
