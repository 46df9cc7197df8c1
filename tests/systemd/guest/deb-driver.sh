#!/bin/sh
# The Debian package part of the systemd guest (run.sh puts this file on the data disk as
# /data/driver.sh for the boots deb1 and deb2, on its own copy of the root image). An operator
# installs the .deb with dpkg, upgrades it (idle, and while the daemon is in the middle of an
# install), reboots, removes and purges it; the checks look at what dpkg, systemd and the
# daemon's API say. Same `@@` protocol as driver.sh:
#
#   @@BOOTED <uptime> <boot id> <phase>   @@TITLE <s> <text>   @@BAD <s> <text>
#   @@RESULT <s> PASS   @@INFO/@@OUT/@@JOURNAL <s> <text>   @@END <phase>
#
# The device is the image as an operator gets it: run.sh removed the image's own
# /etc/systemd/system/tope-updater-recover.service (it would shadow the package's unit of the
# same name), and this data disk carries no tope-updater binary and no config (setup.sh then
# installs neither), so everything comes from the package.
#
# /data: debs/ (the three .deb files; names and versions in /data/params), busybox (static:
# httpd serves www/ on loopback, wget talks to the API), www/v2.zip .. v4.zip (update packages
# made by the .deb's own `tope-updater pack`), src/vN/ (what their files hold), phase,
# last-phase.
#
# Boots: deb1 h, i, j, k's install and reboot; deb2 the end of k, l, m, then power off.
exec >/dev/ttyS0 2>&1
# No /usr/local/bin: the operator's PATH finds /usr/bin/tope-updater (h checks that nothing
# else is there anyway).
export PATH=/usr/sbin:/usr/bin:/sbin:/bin NO_COLOR=1 SYSTEMD_COLORS=0 SYSTEMD_PAGER=
T=/usr/bin/tope-updater
CFG=/etc/tope-updater/config.toml
STATE=/var/lib/tope-updater
BB=/data/busybox
API=http://127.0.0.1:12315/api/v1.0
PHASE=$(cat /data/phase)
. /data/params
ST=/var/lib/tope-st
mkdir -p $ST

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "@@$*"; }
SCN=-
BADS=0
begin() { SCN=$1; shift; BADS=0; say "TITLE $SCN $*"; say "INFO $SCN begin at $(up)"; }
bad() { say "BAD $SCN $*"; BADS=$((BADS + 1)); }
done_scn() { say "INFO $SCN end at $(up)"; say "RESULT $SCN PASS"; }
boot_id() { cat /proc/sys/kernel/random/boot_id; }
prefix() { sed "s/^/@@OUT $SCN $1: /"; }

# deb FILE|-r|-P: dpkg as an operator runs it (stdin not a terminal, nothing preset: a
# conffile prompt would show up as a failure), bounded in time. Sets RC; output in /tmp/dpkg.
deb() {
    t0=$(up)
    case $1 in
        -r | -P) timeout 600 dpkg "$1" tope-updater </dev/null >/tmp/dpkg 2>&1 ;;
        *) timeout 600 dpkg -i "$1" </dev/null >/tmp/dpkg 2>&1 ;;
    esac
    RC=$?
    say "INFO $SCN dpkg $1 -> exit $RC ($t0 .. $(up))"
    prefix dpkg </tmp/dpkg
}
pkg_status() { dpkg-query -W -f='${db:Status-Abbrev}${Version}' tope-updater 2>/dev/null; }

# The API through busybox wget (the guest has no curl). POSTs carry the JSON content type
# the request guard wants.
# wget's complaint (when there is no answer) is in /tmp/wget.err. (Not wget -T: busybox
# 1.35 static wget crashes with it; coreutils timeout bounds it instead.)
get() { timeout 30 $BB wget -q -O - "$API$1" 2>/tmp/wget.err; }
post() { timeout 30 $BB wget -q -O - --header 'Content-Type: application/json' --post-data "$2" "$API$1" 2>/tmp/wget.err; }
jcode() { sed -n 's/.*"code":\([0-9]*\).*/\1/p'; }
jstage() { sed -n 's/.*"stage":"\([^"]*\)".*/\1/p'; }
# wait_stage "S1 S2" SECONDS: polls /progress until its stage is one of them; sets STAGE,
# PROGRESS (the last answer) and SEEN (the stages seen, in order).
wait_stage() {
    end=$(($(date +%s) + $2)) SEEN=
    while :; do
        PROGRESS=$(get /progress)
        STAGE=$(echo "$PROGRESS" | jstage)
        case " $SEEN " in *" ${STAGE:-none} ") ;; *) SEEN="$SEEN ${STAGE:-none}" ;; esac
        case " $1 " in *" $STAGE "*) return 0 ;; esac
        [ "$(date +%s)" -lt $end ] || return 1
        sleep 0.3
    done
}
# install_api N: POST /download of www/vN.zip (served by busybox httpd), wait for toInstall,
# POST /update; returns once the update was accepted (code 200), else reports why.
install_api() {
    v=$1.0.0 f=/data/www/v$1.zip
    body="{\"version\":\"$v\",\"package_url\":\"http://127.0.0.1:18080/v$1.zip\",\"package_name\":\"v$1.zip\",\"package_size\":$(stat -c %s $f),\"package_md5\":\"$(md5sum $f | cut -d' ' -f1)\"}"
    a=$(post /download "$body")
    say "INFO $SCN POST /download $v: $a"
    [ "$(echo "$a" | jcode)" = 200 ] || { bad "POST /download $v answered '$a', expected code 200 ($(cat /tmp/wget.err))"; return 1; }
    wait_stage "toInstall failed" 120 || true
    say "INFO $SCN download $v: stages$SEEN"
    [ "$STAGE" = toInstall ] || { bad "download $v: stage '$STAGE' (stages seen:$SEEN; $PROGRESS), expected toInstall"; return 1; }
    a=$(post /update "{\"version\":\"$v\"}")
    say "INFO $SCN POST /update $v at $(up): $a"
    [ "$(echo "$a" | jcode)" = 200 ] || { bad "POST /update $v answered '$a', expected code 200 ($(cat /tmp/wget.err))"; return 1; }
}
httpd_up() {
    [ -e /run/tope-st-httpd ] && return
    $BB httpd -p 127.0.0.1:18080 -h /data/www && touch /run/tope-st-httpd || bad "busybox httpd did not start"
}

# expect_daemon: tope-updater.service is active, its MainPID runs the installed
# /usr/bin/tope-updater (not a deleted older binary) and GET /progress answers code 200.
# Sets DPID and PSTAGE.
expect_daemon() {
    st=$(systemctl is-active tope-updater.service)
    DPID=$(systemctl show -p MainPID --value tope-updater.service)
    [ "$st" = active ] || bad "tope-updater.service is '$st', expected active"
    exe=$(readlink "/proc/$DPID/exe" 2>/dev/null)
    [ "$DPID" != 0 ] && [ "$exe" = "$T" ] || bad "the daemon's MainPID $DPID runs '$exe', expected $T"
    a=$(get /progress)
    PSTAGE=$(echo "$a" | jstage)
    say "INFO $SCN daemon: $st, MainPID $DPID, GET /progress: $a"
    [ "$(echo "$a" | jcode)" = 200 ] || bad "GET /progress answered '$a', expected code 200 ($(cat /tmp/wget.err))"
}
# running X: the version tope-X's main process runs (see driver.sh), or why not.
running() {
    st=$(systemctl is-active "tope-$1")
    pid=$(systemctl show -p MainPID --value "tope-$1")
    v=- p=-
    [ -r "/run/tope-$1.version" ] && read -r v p <"/run/tope-$1.version"
    if [ "$st" = active ] && [ "$pid" = "$p" ] && [ -d "/proc/$pid" ]; then echo "$v"
    else echo "not-running(state=$st MainPID=$pid file=$v/$p)"; fi
}
# expect_version N (2..4): both files of the update packages hold version N (tope-a's script
# and /opt/tope/deb/x.txt), tope-a runs it, `status --json` shows it as current and nothing
# in flight.
expect_version() {
    cmp -s /opt/tope/a/run.sh "/data/src/v$1/a/run.sh" || bad "/opt/tope/a/run.sh is not version $1.0.0: $(sed -n 2p /opt/tope/a/run.sh 2>&1)"
    cmp -s /opt/tope/deb/x.txt "/data/src/v$1/x.txt" || bad "/opt/tope/deb/x.txt is not version $1.0.0: $(cat /opt/tope/deb/x.txt 2>&1)"
    r=$(running a)
    [ "$r" = "$1.0.0" ] || bad "tope-a runs $r, expected $1.0.0"
    s=$("$T" status --json 2>&1)
    cur=$(echo "$s" | sed -n 's/.*"current":{[^}]*"version":"\([^"]*\)".*/\1/p')
    [ "$cur" = "$1.0.0" ] || bad "status --json: current version '$cur', expected $1.0.0: $s"
    case $s in *'"in_flight":null'*) ;; *) bad "status --json: a transaction is in flight: $s" ;; esac
}
# The newest transaction of `history --json` (newest first: the first object).
newest_tx() { "$T" history --json 2>/dev/null | sed 's/^\[//; s/},{"id":/}\n{"id":/g' | head -1; }
# A unit property, e.g. prop tope-updater.service MainPID.
prop() { systemctl show -p "$2" --value "$1"; }

systemctl is-system-running --wait >/dev/null 2>&1
say "BOOTED $(up) $(boot_id) $PHASE"
say "INFO - $(systemd-analyze 2>&1 | head -1)"
failed_units=$(systemctl --failed --no-legend --plain | awk '{ print $1 }' | tr '\n' ' ')
[ -n "$failed_units" ] && say "INFO - failed units: $failed_units"

# ------------------------------------------------------------------ boot deb1

scenario_h() {
    begin h "dpkg -i the operator's .deb: both units enabled, the daemon up (MainPID, /progress idle), state dir 0700; config edited, restart, an install through the API"
    # The device before: no updater anywhere, no unit of that name (the image's own recover
    # unit was removed by run.sh), nothing in /usr/local that could shadow /usr/bin.
    for f in /etc/systemd/system/tope-updater-recover.service /etc/systemd/system/tope-updater.service \
        /usr/local/bin/tope-updater /usr/local/sbin/tope-updater "$T" $STATE; do
        [ ! -e "$f" ] || bad "$f exists before the package is installed"
    done
    ls /etc/systemd/system/*.wants/ 2>/dev/null | grep -q tope-updater && bad "a tope-updater unit is enabled before the package is installed: $(ls /etc/systemd/system/*.wants/ | grep tope-updater)"
    deb "$deb_f0"
    [ $RC = 0 ] || bad "dpkg -i $deb_f0 exited $RC"
    s=$(pkg_status)
    [ "$s" = "ii $deb_v0" ] || bad "dpkg-query: '$s', expected 'ii $deb_v0'"
    for u in tope-updater-recover.service tope-updater.service; do
        e=$(systemctl is-enabled $u 2>&1)
        [ "$e" = enabled ] || bad "$u is '$e', expected enabled"
        p=$(prop $u FragmentPath)
        [ "$p" = "/lib/systemd/system/$u" ] || bad "$u is loaded from '$p', expected /lib/systemd/system/$u (the package's)"
    done
    [ -L /etc/systemd/system/sysinit.target.wants/tope-updater-recover.service ] || bad "tope-updater-recover.service is not wanted by sysinit.target"
    [ -L /etc/systemd/system/multi-user.target.wants/tope-updater.service ] || bad "tope-updater.service is not wanted by multi-user.target"
    expect_daemon
    [ "$PSTAGE" = idle ] || bad "GET /progress: stage '$PSTAGE', expected idle"
    m=$(stat -c '%a %U' $STATE 2>&1)
    [ "$m" = "700 root" ] || bad "$STATE: '$m', expected '700 root'"
    [ "$(command -v tope-updater)" = "$T" ] || bad "tope-updater on PATH is '$(command -v tope-updater)', expected $T"
    v=$("$T" --version 2>&1)
    [ "$v" = "tope-updater $upstream" ] || bad "tope-updater --version: '$v', expected 'tope-updater $upstream'"
    for f in /usr/share/man/man1/tope-updater.1.gz /usr/share/bash-completion/completions/tope-updater \
        /usr/share/zsh/vendor-completions/_tope-updater /usr/share/fish/vendor_completions.d/tope-updater.fish \
        /usr/share/doc/tope-updater/README.md; do
        [ -s "$f" ] || bad "$f missing or empty"
    done
    zcat /usr/share/man/man1/tope-updater.1.gz | grep -q '^\.TH' || bad "the man page is not a gzipped roff page"
    [ "$(dpkg-query -W -f='${Conffiles}' tope-updater | awk '{ print $1 }' | tr -d '\n')" = $CFG ] || bad "$CFG is not the package's conffile: $(dpkg-query -W -f='${Conffiles}' tope-updater)"
    say "INFO h $(prop tope-updater.service NRestarts) restarts, $(systemctl show -p ExecMainStartTimestamp tope-updater.service)"

    # The operator's edit: plain http:// package URLs (the packages come from a loopback
    # server here), then a restart so that the daemon reads it.
    sed -i 's/^allow_http = false /allow_http = true  /' $CFG
    "$T" config 2>&1 | grep -q '^allow_http = true  # file' || bad "tope-updater config does not show allow_http = true from the file: $("$T" config 2>&1 | grep allow_http)"
    md5sum $CFG | cut -d' ' -f1 >$ST/config.md5
    old=$DPID
    systemctl restart tope-updater.service || bad "systemctl restart tope-updater.service failed"
    expect_daemon
    [ "$DPID" != "$old" ] || bad "the restart did not change the daemon's MainPID ($old)"

    # An install through the API, under the packaged unit's hardening: the daemon stops
    # tope-a through systemd, swaps, runs a post command (as its child: the command records
    # $PPID), starts tope-a again.
    httpd_up
    rm -f /run/tope-h.marks
    if install_api 2; then
        wait_stage "success failed" 180 || true
        say "INFO h install 2.0.0: stages$SEEN at $(up)"
        [ "$STAGE" = success ] || bad "install 2.0.0 through the API: stage '$STAGE' (stages seen:$SEEN; $PROGRESS), expected success"
    fi
    expect_version 2
    m=$(cat /run/tope-h.marks 2>/dev/null)
    [ "$m" = "h $DPID" ] || bad "the post command's record is '$m', expected 'h $DPID' (run once, by the daemon)"
    [ $BADS = 0 ] || journalctl -b -q --no-pager -o short-monotonic -u tope-updater.service | sed "s/^/@@JOURNAL h /"
    done_scn
}

scenario_i() {
    begin i "upgrade the .deb while the daemon is idle: dpkg exit 0, daemon restarted on the new binary, edited conffile, state and history kept, applications untouched"
    old=$(prop tope-updater.service MainPID)
    apid=$(prop tope-a.service MainPID)
    "$T" history --json >$ST/i-history 2>&1
    "$T" status --json >$ST/i-status 2>&1
    deb "$deb_f1"
    [ $RC = 0 ] || bad "dpkg -i $deb_f1 exited $RC"
    grep -qi 'conffile\|configuration file' /tmp/dpkg && bad "dpkg said something about the conffile (a prompt?)"
    s=$(pkg_status)
    [ "$s" = "ii $deb_v1" ] || bad "dpkg-query: '$s', expected 'ii $deb_v1'"
    expect_daemon
    [ "$DPID" != "$old" ] || bad "the upgrade did not restart the daemon (MainPID still $old)"
    for u in tope-updater-recover.service tope-updater.service; do
        e=$(systemctl is-enabled $u 2>&1)
        [ "$e" = enabled ] || bad "$u is '$e' after the upgrade, expected enabled"
    done
    [ "$(md5sum $CFG | cut -d' ' -f1)" = "$(cat $ST/config.md5)" ] || bad "the upgrade changed the edited $CFG: $(grep allow_http $CFG)"
    [ ! -e $CFG.dpkg-new ] && [ ! -e $CFG.dpkg-dist ] || bad "the upgrade left $(ls $CFG.dpkg-* 2>/dev/null)"
    [ "$(stat -c %a $STATE)" = 700 ] && [ -s $STATE/journal.redb ] || bad "$STATE or its journal.redb is not as before: $(ls -la $STATE 2>&1 | tr '\n' ';')"
    "$T" history --json 2>&1 | cmp -s - $ST/i-history || bad "history --json changed with the upgrade: $("$T" history --json 2>&1)"
    "$T" status --json 2>&1 | cmp -s - $ST/i-status || bad "status --json changed with the upgrade: $("$T" status --json 2>&1)"
    expect_version 2
    [ "$(prop tope-a.service MainPID)" = "$apid" ] || bad "tope-a was restarted by the upgrade (MainPID $apid -> $(prop tope-a.service MainPID))"
    [ $BADS = 0 ] || journalctl -b -q --no-pager -o short-monotonic -u tope-updater.service | sed "s/^/@@JOURNAL i /"
    done_scn
}

# The post commands of 3.0.0 and 4.0.0 (see run.sh deb_packages): (1) records that they
# started, (2) waits until systemd is stopping the daemon that runs it (ActiveState
# deactivating: it got SIGTERM) and records that, (3) records the end. Each line: step, the
# PID of the daemon that ran it, uptime[, the state seen]. In /var/lib/tope-st/post-VERSION.
# wait_post FILE: until step 1 is recorded (the transaction is then past the swap).
wait_post() {
    end=$(($(date +%s) + 120))
    until grep -q '^1 ' "$1" 2>/dev/null || [ "$(date +%s)" -ge $end ]; do sleep 0.2; done
    grep -q '^1 ' "$1" 2>/dev/null && return 0
    bad "the install's first post command never ran: $(get /progress)"
    return 1
}
# check_post FILE: each step ran once, in order, and the stop came while step 2 ran.
check_post() {
    marks=$(cat "$1" 2>/dev/null)
    say "INFO $SCN post commands (step, daemon PID, uptime, state seen): $(echo "$marks" | tr '\n' ';')"
    [ "$(echo "$marks" | cut -d' ' -f1 | tr '\n' ' ')" = "1 2 3 " ] || bad "post commands ran '$(echo "$marks" | tr '\n' ';')', expected 1, 2, 3 once each"
    [ "$(sed -n 's/^2 [0-9]* [0-9.]* //p' "$1")" = deactivating ] || bad "the daemon was not stopped while the second post command ran: '$(sed -n '/^2 /p' "$1")'"
}

scenario_j() {
    begin j "upgrade the .deb while the daemon is mid-install (in a post command): the install is finished (or rolled back), nothing lost, nothing run twice"
    httpd_up
    P=$ST/post-3.0.0
    rm -f $P
    install_api 3 || { done_scn; return; }
    wait_post $P || { done_scn; return; }
    old=$(prop tope-updater.service MainPID)
    say "INFO j the install is in its post commands at $(up) (daemon $old): $(get /progress); upgrading"
    # dpkg unpacks, then its postinst restarts the daemon: systemd sends SIGTERM and waits
    # until the daemon has finished its step (the post commands) and exited, then starts the
    # new binary, whose recovery must finish the install before it says READY.
    deb "$deb_f2"
    [ $RC = 0 ] || bad "dpkg -i $deb_f2 exited $RC"
    s=$(pkg_status)
    [ "$s" = "ii $deb_v2" ] || bad "dpkg-query: '$s', expected 'ii $deb_v2'"
    expect_daemon
    [ "$DPID" != "$old" ] || bad "the upgrade did not restart the daemon (MainPID still $old)"
    check_post $P
    # The outcome: resumed to 3.0.0 (recovery = "resume", the default) or rolled back to 2.0.0.
    h=$(newest_tx)
    say "INFO j newest transaction: $h"
    case $h in
        *'"Install"'*'"to_version":"3.0.0","phase":"Committed"'*) v=3 PWANT=success ;;
        *'"Install"'*'"to_version":"3.0.0","phase":"RolledBack"'*) v=2 PWANT=failed ;;
        *) v=none PWANT=none; bad "the newest transaction is not the 3.0.0 install, committed or rolled back: $h" ;;
    esac
    say "INFO j outcome: $([ $v = 3 ] && echo 'finished: all files 3.0.0' || echo "rolled back: all files 2.0.0")"
    [ "$v" = none ] || expect_version $v
    echo $v >$ST/j-version
    [ "$PSTAGE" = "$PWANT" ] || bad "GET /progress after the upgrade: stage '$PSTAGE', expected $PWANT"
    # What the daemons logged: the old one stopped after its step, the new one recovered.
    j=$(journalctl -b -q --no-pager -o short-monotonic -u tope-updater.service)
    echo "$j" | grep -q "tope-updater\[$old\]: .*shutdown requested" || bad "the old daemon ($old) did not log the shutdown request"
    echo "$j" | grep -q "tope-updater\[$old\]: .*stopped" || bad "the old daemon ($old) did not log that it stopped"
    echo "$j" | grep -q "tope-updater\[$DPID\]: .*recovering" || bad "the new daemon ($DPID) did not log a recovery"
    echo "$j" | sed -n "/tope-updater\[$old\]: .*transaction planned/,\$p" | sed "s/^/@@JOURNAL j /"
    done_scn
}

scenario_k1() {
    begin k "systemctl reboot while the daemon is in an install's post commands: the daemon stops after its step, the package's tope-updater-recover.service finishes the install at boot, before the daemon and the applications start"
    httpd_up
    P=$ST/post-4.0.0
    rm -f $P
    cat $ST/j-version >$ST/k-from 2>/dev/null
    if install_api 4 && wait_post $P; then
        say "INFO k the install is in its post commands at $(up) (daemon $(prop tope-updater.service MainPID)): $(get /progress)"
    fi
    boot_id >$ST/k-boot-id
    say "INFO k rebooting at $(up)"
}

# ------------------------------------------------------------------ boot deb2

scenario_k2() {
    SCN=k BADS=0
    say "INFO k after the reboot at $(up)"
    [ "$(boot_id)" != "$(cat $ST/k-boot-id 2>/dev/null)" ] || bad "the boot id did not change: not a new boot"
    r=tope-updater-recover.service d=tope-updater.service
    p=$(prop $r FragmentPath)
    [ "$p" = /lib/systemd/system/$r ] || bad "$r came from '$p', expected the package's /lib/systemd/system/$r"
    res=$(prop $r Result) st=$(prop $r ExecMainStatus) act=$(prop $r ActiveState)
    rs=$(prop $r ExecMainStartTimestampMonotonic) rx=$(prop $r ExecMainExitTimestampMonotonic)
    ds=$(prop $d ExecMainStartTimestampMonotonic) da=$(prop $d ActiveEnterTimestampMonotonic)
    ba=$(prop basic.target ActiveEnterTimestampMonotonic) as=$(prop tope-a.service ExecMainStartTimestampMonotonic)
    say "INFO k $r: $act, result $res, exit $st, ran $rs..$rx us; $d started $ds, active $da; basic.target $ba; tope-a started $as"
    [ "$res" = success ] && [ "$st" = 0 ] && [ "$act" = active ] || bad "$r: $act, result $res, exit status $st; expected active, success, 0"
    [ "${rs:-0}" -gt 0 ] && [ "${rx:-0}" -ge "$rs" ] || bad "$r did not run in this boot (start $rs, exit $rx)"
    [ "${ds:-0}" -gt 0 ] && [ "${rx:-0}" -le "$ds" ] || bad "$d started ($ds) before $r had finished ($rx)"
    [ "${rx:-0}" -le "${ba:-0}" ] || bad "basic.target was reached ($ba) before $r finished ($rx)"
    [ "${rx:-0}" -le "${as:-0}" ] || bad "tope-a started ($as) before $r finished ($rx)"
    rl=$(journalctl -b -q --no-pager -o short-monotonic -u $r)
    echo "$rl" | sed "s/^/@@JOURNAL k /"
    # The install the reboot interrupted: finished by the boot unit (recovery = "resume"),
    # each post command run once; the applications started on 4.0.0 only, after it.
    echo "$rl" | grep -q 'recovering tx=' || bad "$r had nothing to recover: the reboot did not interrupt the install"
    check_post $ST/post-4.0.0
    h=$(newest_tx)
    say "INFO k newest transaction: $h"
    case $h in
        *'"Install"'*'"to_version":"4.0.0","phase":"Committed"'*) v=4 ;;
        *'"Install"'*'"to_version":"4.0.0","phase":"RolledBack"'*) v=$(cat $ST/k-from) ;;
        *) v=$(cat $ST/k-from); bad "the newest transaction is not the 4.0.0 install, committed or rolled back: $h" ;;
    esac
    say "INFO k outcome: $([ "$v" = 4 ] && echo 'finished at boot: all files 4.0.0' || echo "rolled back at boot: all files $v.0.0")"
    ran=$(cut -d' ' -f1 /run/tope-a.starts 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$ran" = "$v.0.0 " ] || bad "tope-a ran '$ran' in this boot, expected only $v.0.0"
    echo $v >$ST/k-version
    expect_daemon
    case $PSTAGE in idle | success) ;; *) bad "GET /progress after the boot: stage '$PSTAGE', expected idle or success" ;; esac
    [ "$(pkg_status)" = "ii $deb_v2" ] || bad "dpkg-query: '$(pkg_status)', expected 'ii $deb_v2'"
    expect_version "$v"
    [ $BADS = 0 ] || journalctl -b -q --no-pager -o short-monotonic | grep -E 'tope-|systemd\[1\]: (Reached|Starting|Started|Finished)' | sed "s/^/@@JOURNAL k /"
    done_scn
}

scenario_l() {
    begin l "dpkg -r: the daemon stopped, both units disabled and gone, binary gone; state dir (journal, backups) and config kept; applications untouched"
    old=$(prop tope-updater.service MainPID)
    apid=$(prop tope-a.service MainPID)
    v=$(cat $ST/k-version)
    find $STATE/backups -type f | sort >$ST/l-backups
    deb -r
    [ $RC = 0 ] || bad "dpkg -r tope-updater exited $RC"
    s=$(pkg_status)
    [ "$s" = "rc $deb_v2" ] || bad "dpkg-query: '$s', expected 'rc $deb_v2' (removed, config files kept)"
    a=$(systemctl is-active tope-updater.service)
    [ "$a" != active ] || bad "tope-updater.service is still active"
    [ ! -d "/proc/$old" ] || bad "the daemon's process $old still runs"
    j=$(journalctl -b -q --no-pager -o short-monotonic -u tope-updater.service)
    echo "$j" | grep -q "tope-updater\[$old\]: .*stopped" || bad "the daemon ($old) did not log a clean stop"
    echo "$j" | tail -5 | sed "s/^/@@JOURNAL l /"
    get /progress >/dev/null && bad "the API still answers after dpkg -r"
    for u in tope-updater-recover.service tope-updater.service; do
        ls=$(prop $u LoadState)
        [ "$ls" = not-found ] || bad "$u: LoadState '$ls' after dpkg -r, expected not-found"
        [ ! -e /lib/systemd/system/$u ] || bad "/lib/systemd/system/$u is still there"
    done
    w=$(ls -d /etc/systemd/system/*/tope-updater* 2>/dev/null | tr '\n' ' ')
    [ -z "$w" ] || bad "enablement links left behind: $w"
    [ ! -e $T ] || bad "$T is still there"
    [ -d $STATE ] && [ -s $STATE/journal.redb ] || bad "$STATE or its journal.redb is gone after dpkg -r: $(ls -la $STATE 2>&1 | tr '\n' ';')"
    [ -s $ST/l-backups ] || bad "no backup blobs in $STATE/backups before dpkg -r (the 1.0.0 factory script should be there)"
    find $STATE/backups -type f 2>/dev/null | sort | cmp -s - $ST/l-backups || bad "$STATE/backups changed with dpkg -r: $(find $STATE/backups -type f | wc -l) blobs, $(wc -l <$ST/l-backups) before"
    say "INFO l $STATE after dpkg -r: $(ls $STATE | tr '\n' ' '), $(wc -l <$ST/l-backups) backup blobs"
    [ "$(md5sum $CFG 2>/dev/null | cut -d' ' -f1)" = "$(cat $ST/config.md5)" ] || bad "$CFG is gone or changed after dpkg -r"
    [ "$(prop tope-a.service MainPID)" = "$apid" ] || bad "tope-a was restarted or stopped by dpkg -r"
    [ "$(running a)" = "$v.0.0" ] || bad "tope-a runs $(running a) after dpkg -r, expected $v.0.0"
    done_scn
}

scenario_m() {
    begin m "dpkg -P: the state dir and the conffile gone, the package unknown to dpkg"
    deb -P
    [ $RC = 0 ] || bad "dpkg -P tope-updater exited $RC"
    [ ! -e $STATE ] || bad "$STATE is still there after dpkg -P: $(ls -la $STATE 2>&1 | tr '\n' ';')"
    [ ! -e $CFG ] || bad "$CFG is still there after dpkg -P"
    [ ! -e /etc/tope-updater ] || bad "/etc/tope-updater is still there after dpkg -P: $(ls -la /etc/tope-updater | tr '\n' ';')"
    s=$(dpkg-query -W -f='${db:Status-Status}' tope-updater 2>/dev/null)
    [ -z "$s" ] || [ "$s" = not-installed ] || bad "dpkg-query: status '$s', expected not-installed"
    l=$(dpkg -L tope-updater 2>&1)
    case $l in *"is not installed"*) ;; *) bad "dpkg -L still lists files: $l" ;; esac
    done_scn
}

case $PHASE in
    deb1)
        scenario_h
        scenario_i
        scenario_j
        scenario_k1
        ;;
    deb2)
        scenario_k2
        scenario_l
        scenario_m
        ;;
esac
say "END $PHASE"
sync
if [ "$PHASE" = "$(cat /data/last-phase)" ]; then systemctl poweroff 2>/dev/null; else systemctl reboot 2>/dev/null; fi
