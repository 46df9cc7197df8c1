#!/bin/sh
# ExecStopPost of the test services (stopped.sh NAME): once tope-NAME has stopped (by
# systemctl stop or because it exited), appends "ran=VERSION file=VERSION UPTIME" to
# /run/tope-NAME.stops: the version the stopped process ran, and the version of its
# ExecStart file on disk at that moment. The updater must stop a service before it swaps
# its files, and swap them back only after stopping it again, so the two must be equal.
name=$1
file=$(sed -n 's/^# tope systemd test service tope-[a-z]*, version \([0-9.]*\).*/\1/p' "/opt/tope/$name/run.sh" 2>/dev/null)
ran=$(cut -d' ' -f1 "/run/tope-$name.version" 2>/dev/null)
echo "ran=${ran:--} file=${file:--} $(cut -d' ' -f1 /proc/uptime)" >>"/run/tope-$name.stops"
