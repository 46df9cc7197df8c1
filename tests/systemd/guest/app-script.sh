#!/bin/sh
# Prints the ExecStart script of test service tope-NAME at VERSION (the factory content in
# the image and the module content of the packages). `fail` makes a version that exits 3
# at once, as a broken release would.
#   app-script.sh NAME VERSION [fail]
name=$1 version=$2 mode=${3:-ok}
echo '#!/bin/sh'
echo "# tope systemd test service tope-$name, version $version"
# The running process says which version it is and that it is the unit's main process
# (exec keeps the PID, so systemd's MainPID must equal it), and every start of this boot is
# logged (/run is a tmpfs: one boot's history).
echo "echo \"$version \$\$\" >/run/tope-$name.version"
echo "echo \"$version \$\$ \$(cut -d' ' -f1 /proc/uptime)\" >>/run/tope-$name.starts"
if [ "$mode" = fail ]; then
    echo "echo \"tope-$name $version: cannot start\" >&2"
    echo 'exit 3'
else
    echo 'exec sleep infinity'
fi
