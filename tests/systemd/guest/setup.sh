#!/bin/sh
# tope-st-setup.service: mounts this run's data disk (/dev/vdb, made by run.sh) at /data
# and installs the updater binary from it. The root image stays independent of the code
# under test. The first boot of an image also gets the base config. The data disk of the
# Debian package part (deb-driver.sh) carries neither: there the updater comes from the
# .deb, as on an operator's device, and nothing in /usr/local may shadow it.
set -e
mkdir -p /data
mountpoint -q /data || mount -t ext4 -o ro,noload /dev/vdb /data
if [ -e /data/tope-updater ]; then
    install -m 755 /data/tope-updater /usr/local/bin/tope-updater
fi
if [ -e /data/config.toml ] && [ ! -e /etc/tope-updater/config.toml ]; then
    mkdir -p /etc/tope-updater
    install -m 644 /data/config.toml /etc/tope-updater/config.toml
fi
