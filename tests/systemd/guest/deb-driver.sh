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
# httpd serves www/ on loopback, wget talks to the API), www/v2.zip .. v5.zip (update packages
# made by the .deb's own `tope-updater pack`; v5.zip carries tens of MiB of random data, its
# size and MD5 in params), src/vN/ (what their files hold, but 5.0.0's big.bin: its MD5 is in
# params), report-receiver.sh (the reports' receiver, a CGI), phase, last-phase.
#
# Boots: deb1 h, i, j, k's install and reboot; deb2 the end of k, n, o and p up to a power cut
# mid-download; deb3 the end of o and p, q up to a power cut mid-install; deb4 the end of q, l,
# m, then power off. A power cut is `echo b >/proc/sysrq-trigger`: no sync, no unmount; QEMU
# ends (-no-reboot) and run.sh boots the same root disk again. What the driver itself needs
# after a cut it writes and `sync`s before the cut's scenario starts its work; from then on
# only the daemon's (and the receiver's) own durability counts.
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
jprogress() { sed -n 's/.*"progress":\([0-9]*\).*/\1/p'; }
# The id of the newest transaction.
newest_id() { newest_tx | sed -n 's/^{"id":\([0-9]*\),.*/\1/p'; }

# powercut [DRAIN]: the end of this boot's steps, then the power is cut at once (sysrq b: no
# sync, no unmount, the page cache lost). DRAIN seconds (default 0.3) let the serial console
# take the last lines first.
powercut() {
    say "INFO $SCN power cut at $(up)"
    say "END $PHASE"
    sleep "${1:-0.3}"
    echo b >/proc/sysrq-trigger
    sleep 60
}

# The reports' receiver (n-q): device-api's stand-in, report-receiver.sh as a CGI of busybox
# httpd (tope-st-rx.service). Its log: one line per report received, "<receiver's boot id>
# <body>", durable before the answer.
RX=$ST/reports.log
RXURL=http://127.0.0.1:18081/cgi-bin/report
# wait_rx ERE SECONDS: until a line of the receiver's log matches.
wait_rx() {
    end=$(($(date +%s) + $2))
    until grep -Eq "$1" $RX 2>/dev/null; do
        [ "$(date +%s)" -lt $end ] || return 1
        sleep 0.3
    done
}
# check_reports: the whole receiver log against the journal's history. Seqs contiguous from 1
# (every report ever pushed arrived: none lost, none dropped); a seq received again only right
# after itself and with the identical body (at-least-once); for every transaction of `history`
# exactly one final report, whose stage is its outcome (Committed: success, RolledBack:
# failed), and no final report for anything else.
check_reports() {
    want=$("$T" history --json 2>/dev/null | sed 's/^\[//; s/\]$//; s/},{"id":/}\n{"id":/g' |
        sed -n 's/^{"id":\([0-9]*\),.*"phase":"\([A-Za-z]*\)".*/\1 \2/p' | while read -r id ph; do
        case $ph in Committed | Confirmed) echo "$id:success" ;; RolledBack | RollbackFailed) echo "$id:failed" ;; *) echo "$id:$ph" ;; esac
    done | tr '\n' ' ')
    say "INFO $SCN transactions (history, id:outcome): $want"
    awk -v want="$want" '
        function num(b, k) { if (match(b, "\"" k "\":[0-9]+")) return substr(b, RSTART + length(k) + 3, RLENGTH - length(k) - 3) + 0; return -1 }
        function str(b, k) { if (match(b, "\"" k "\":\"[^\"]*\"")) return substr(b, RSTART + length(k) + 4, RLENGTH - length(k) - 5); return "null" }
        {
            rx = $1; body = substr($0, length($1) + 2); seq = num(body, "seq")
            if (rx !~ /^[0-9a-f-]+$/ || body !~ /^\{.*\}$/ || seq < 1) { print "BAD line " NR " of the receiver log is not a report: " $0; next }
            if (seq == last) {
                if (body != lastbody) print "BAD seq " seq " received twice with different bodies: " lastbody " / " body
                rep++; if (rx != lastrx) repx++
                next
            }
            if (seq != last + 1) print "BAD seq " seq " received after seq " last ": " (seq > last + 1 ? "seq " (last + 1) ".." (seq - 1) " never arrived" : "out of order")
            last = seq; lastbody = body; lastrx = rx; n++
            if (str(body, "boot_id") != rx) later++
            if (body ~ /"final":true/) { t = num(body, "tx_id"); fin[t]++; fst[t] = str(body, "stage"); nf++ }
        }
        END {
            k = split(want, w, " ")
            for (i = 1; i <= k; i++) {
                split(w[i], p, ":"); known[p[1]] = 1
                if (fin[p[1]] + 0 != 1) print "BAD transaction " p[1] ": " (fin[p[1]] + 0) " final reports received, expected exactly one"
                else if (fst[p[1]] != p[2]) print "BAD transaction " p[1] ": its final report says " fst[p[1]] ", its journal record " p[2]
            }
            for (t in fin) if (!(t in known)) print "BAD a final report for transaction " t ", which history does not list"
            print "INFO receiver log: " NR " lines, seq 1.." (last + 0) " (" (n + 0) " distinct reports), " (rep + 0) " received again (" (repx + 0) " of them in a later boot), " (later + 0) " delivered in a later boot than made, " (nf + 0) " final"
        }' $RX >/tmp/rxcheck
    sed -n "s/^BAD /@@BAD $SCN /p; s/^INFO /@@INFO $SCN /p" /tmp/rxcheck
    BADS=$((BADS + $(grep -c '^BAD ' /tmp/rxcheck)))
}

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
    echo $v >$ST/version # the version installed now (q changes it; l checks tope-a runs it)
    expect_daemon
    case $PSTAGE in idle | success) ;; *) bad "GET /progress after the boot: stage '$PSTAGE', expected idle or success" ;; esac
    [ "$(pkg_status)" = "ii $deb_v2" ] || bad "dpkg-query: '$(pkg_status)', expected 'ii $deb_v2'"
    expect_version "$v"
    [ $BADS = 0 ] || journalctl -b -q --no-pager -o short-monotonic | grep -E 'tope-|systemd\[1\]: (Reached|Starting|Started|Finished)' | sed "s/^/@@JOURNAL k /"
    done_scn
}

# ------------------------------------------------------------------ the daemon under power cuts

# n (deb2): the package server and the reports' receiver become services of the device
# (units written here, enabled: they come back at every boot, the package server before the
# daemon, so that a download interrupted by a power cut can resume as the daemon starts).
scenario_n() {
    begin n "the reports' receiver (busybox httpd + CGI, each report durable before its answer) set as [reporter] url in the edited config: the outbox's backlog since h (nobody listened: two upgrades, an upgrade mid-install, a reboot) arrives complete, in order, one final report per transaction"
    mkdir -p $ST/rx/cgi-bin
    install -m 755 /data/report-receiver.sh $ST/rx/cgi-bin/report
    : >$RX
    : >$ST/rx-held
    cat >/etc/systemd/system/tope-st-pkgs.service <<'UNIT'
[Unit]
Description=tope systemd test: the package server (busybox httpd, /data/www on 127.0.0.1:18080; logs each URL and status)
Requires=tope-st-setup.service
After=tope-st-setup.service
Before=tope-updater.service

[Service]
ExecStart=/data/busybox httpd -f -vv -p 127.0.0.1:18080 -h /data/www
# IOReadBytes: what it read from the data disk (o: only the rest of v5.zip after the cut).
IOAccounting=yes

[Install]
WantedBy=multi-user.target
UNIT
    cat >/etc/systemd/system/tope-st-rx.service <<'UNIT'
[Unit]
Description=tope systemd test: the reports' receiver, device-api's stand-in (busybox httpd on 127.0.0.1:18081, /cgi-bin/report)
Requires=tope-st-setup.service
After=tope-st-setup.service

[Service]
ExecStart=/data/busybox httpd -f -vv -p 127.0.0.1:18081 -h /var/lib/tope-st/rx

[Install]
WantedBy=multi-user.target
UNIT
    systemctl daemon-reload
    systemctl enable --now tope-st-pkgs.service tope-st-rx.service 2>&1 | prefix systemctl
    for u in tope-st-pkgs tope-st-rx; do
        [ "$(systemctl is-active $u)" = active ] || bad "$u.service is $(systemctl is-active $u)"
    done
    # The operator's second edit: reports go to the receiver; the restart reads it.
    sed -i "s|^url = \"http://127.0.0.1:9080/api/v1.0/ota/report\"|url = \"$RXURL\"|" $CFG
    "$T" config 2>&1 | grep -q "^url = \"$RXURL\" *# file" || bad "tope-updater config does not show the receiver's url from the file: $("$T" config 2>&1 | grep '^url')"
    md5sum $CFG | cut -d' ' -f1 >$ST/config.md5
    sync
    old=$(prop tope-updater.service MainPID)
    systemctl restart tope-updater.service || bad "systemctl restart tope-updater.service failed"
    expect_daemon
    [ "$DPID" != "$old" ] || bad "the restart did not change the daemon's MainPID ($old)"
    # Every report since h waited in the outbox (the default url had no listener); the newest
    # transaction's final report is the last one pushed.
    id=$(newest_id)
    t0=$(up)
    wait_rx "\"tx_id\":$id,.*\"final\":true" 120 || bad "the final report of transaction $id did not arrive within 120 s"
    say "INFO n the backlog arrived in $(echo "$(up) $t0" | awk '{ printf "%.1f", $1 - $2 }') s"
    sleep 1
    check_reports
    [ $BADS = 0 ] || journalctl -b -q --no-pager -o short-monotonic -u tope-updater.service | tail -40 | sed "s/^/@@JOURNAL n /"
    done_scn
}

# o and p, first half (deb2): POST /download of 5.0.0 (v5.zip, tens of MiB: seconds under
# TCG). The receiver is armed to hold the first `downloading` report at 5 % or more: it logs
# it durably and never answers (nor any retry of it). Once it holds one and /progress has
# passed a random 20..60 %, the power is cut at once: in the middle of the download and of
# that report's delivery. What /progress said just before goes to $ST/o-cut (made durable by
# its own fsync, as the receiver does with each report): the next boot checks the resumed
# offset against it. The console's last lines come before the loop: the cut does not wait.
scenario_o1() {
    begin o "power cut in the middle of a download ($v5_size bytes, served in the guest): at the next boot the daemon resumes it with Range from its journaled offset (above 0, at most one checkpoint below the progress seen at the cut), the server sends only the rest, the MD5 matches: toInstall"
    say "TITLE p a report in delivery at that power cut (the receiver logged it durably, its answer never came): after the reboot the same report, byte for byte, is the first one delivered; no seq missing, one final report per transaction"
    cut=$(($(od -An -N2 -tu2 /dev/urandom) % 41 + 20))
    echo 5 >/run/tope-st-rx-hold
    rm -f /run/tope-st-rx-held
    boot_id >$ST/o-boot-id
    : >$ST/o-cut
    sync # what the next boot's checks need; from here on only the daemon's and the receiver's own writes
    body="{\"version\":\"5.0.0\",\"package_url\":\"http://127.0.0.1:18080/v5.zip\",\"package_name\":\"v5.zip\",\"package_size\":$v5_size,\"package_md5\":\"$v5_md5\"}"
    a=$(post /download "$body")
    say "INFO o POST /download 5.0.0 at $(up): $a"
    [ "$(echo "$a" | jcode)" = 200 ] || bad "POST /download 5.0.0 answered '$a', expected code 200 ($(cat /tmp/wget.err))"
    say "INFO o power cut once the receiver holds a report and /progress shows >= $cut %, from $(up)"
    say "END $PHASE"
    # As fast as the guest can poll: no sleep, the stage and progress taken apart without a fork.
    end=$(($(date +%s) + 180)) stage= pct=
    while :; do
        P=$(get /progress)
        stage=${P#*\"stage\":\"} pct=${P#*\"progress\":}
        stage=${stage%%\"*} pct=${pct%%,*}
        if [ -e /run/tope-st-rx-held ] && [ "$stage" = downloading ] && [ "${pct:-0}" -ge $cut ] 2>/dev/null; then
            echo "$stage $pct" | dd of=$ST/o-cut conv=fsync status=none
            echo b >/proc/sysrq-trigger
        fi
        [ "$stage" = downloading ] || [ "$stage" = "$P" ] || break
        [ "$(date +%s)" -lt $end ] || break
    done
    bad "no power cut in the middle of the download: /progress $P; the receiver holds '$(cat /run/tope-st-rx-held 2>/dev/null)'"
    powercut
}

# o, second half (deb3): the resumed download, from what the boot after the cut saw.
scenario_o2() {
    SCN=o BADS=0
    say "INFO o after the power cut at $(up)"
    [ "$(boot_id)" != "$(cat $ST/o-boot-id 2>/dev/null)" ] || bad "the boot id did not change: not a new boot"
    wait_stage "toInstall failed" 300 || true
    say "INFO o download after the boot: stages$SEEN at $(up): $PROGRESS"
    [ "$STAGE" = toInstall ] || bad "the download after the power cut: stage '$STAGE' (stages seen:$SEEN; $PROGRESS), expected toInstall"
    # Every byte through loopback since this boot started (lo's counters start at 0 with the
    # kernel; IP and TCP headers included, ACKs too): the rest of the package, the API polls,
    # the reports.
    lo=$(sed -n 's/^ *lo: *\([0-9]*\) .*/\1/p' /proc/net/dev)
    lop=$(sed -n 's/^ *lo: *[0-9]* *\([0-9]*\) .*/\1/p' /proc/net/dev)
    retr=$(awk '$1 == "Tcp:" { if (h == "") { for (i = 1; i <= NF; i++) if ($i == "RetransSegs") h = i } else print $h }' /proc/net/snmp)
    # What the package server read from its disk in this boot (a new boot: nothing of v5.zip
    # cached), so all it can have sent.
    iorb=$(prop tope-st-pkgs.service IOReadBytes)
    dj=$(journalctl -b -q --no-pager -o cat -u tope-updater.service)
    res=$(echo "$dj" | grep 'resuming the interrupted download' | head -1)
    off=$(echo "$res" | sed -n 's/.* offset=\([0-9]*\).*/\1/p')
    say "INFO o the daemon: $res"
    if [ -n "$off" ] && [ "$off" -gt 0 ] && [ "$off" -lt "$v5_size" ]; then
        say "INFO o resumed at byte $off of $v5_size ($((off * 100 / v5_size)) %), $((v5_size - off)) bytes to go"
    else
        bad "the daemon did not resume the download from a journaled offset in (0, $v5_size): '$res'"
        off=0
    fi
    # /progress said C % just before the cut: the bytes up to C % had been written, and every
    # 5 % of the package (plus at most one 256 KiB read) a checkpoint had made them durable and
    # committed the offset. A lower offset means a committed checkpoint was lost.
    read -r cs c <$ST/o-cut
    if [ "$cs" = downloading ] && [ -n "$c" ]; then
        floor=$((v5_size / 100 * c - v5_size / 20 - 262144))
        say "INFO o /progress right before the cut: $cs $c %: the journaled offset must be >= $floor"
        [ "$off" -ge "$floor" ] || bad "resumed at byte $off, more than a checkpoint below the $c % seen before the cut (>= $floor): a committed offset was lost"
    else
        bad "no progress recorded before the cut ($ST/o-cut empty)"
    fi
    echo "$dj" | grep -E 'starting over|ignored Range|shorter than its journaled offset' | sed "s/^/@@JOURNAL o /"
    echo "$dj" | grep -qE 'starting over|ignored Range|shorter than its journaled offset' && bad "the daemon started the download over"
    # What the server sent in this boot, request by request (busybox httpd -vv: "IP:PORT: url:X",
    # then "IP:PORT: response:N").
    hl=$(journalctl -b -q --no-pager -o cat -u tope-st-pkgs.service | awk '
        / url:\/v5\.zip$/ { c[$1] = 1; n++ }
        / response:[0-9]+$/ { if ($1 in c) { sub(/^response:/, "", $2); r = r " " $2; delete c[$1] } }
        END { print n + 0 ":" r }')
    say "INFO o GET /v5.zip in this boot (count: statuses): $hl; the server read $iorb bytes from its disk; loopback since boot: $lo bytes in $lop packets, $retr TCP segments retransmitted"
    case $hl in
        0:*) bad "the server got no request for v5.zip in this boot" ;;
        *) [ "$(echo "${hl#*:}" | tr ' ' '\n' | grep -v '^$' | grep -cv '^206$')" = 0 ] || bad "a v5.zip request in this boot got another answer than 206: $hl" ;;
    esac
    # The server read the rest and at most 4 MiB more (1 MiB measured: the pages of its own
    # binary, which lives on the same disk, and readahead); loopback carried at least the rest
    # and at most 12.5 % more (2-4 % measured: TCP retransmissions of 64 KiB segments under
    # TCG, the API polls, the reports) and 512 KiB: never a second copy of the bytes before
    # the offset (the cut is at 20 % or more).
    rest=$((v5_size - off))
    case $iorb in
        '' | *[!0-9]*) bad "no IOReadBytes for tope-st-pkgs.service: '$iorb'" ;;
        *) [ "$iorb" -ge "$rest" ] && [ "$iorb" -le $((rest + 4194304)) ] ||
            bad "the package server read $iorb bytes from its disk in this boot, expected the $rest bytes still missing plus at most 4 MiB" ;;
    esac
    [ "${lo:-0}" -ge "$rest" ] && [ "${lo:-0}" -le $((rest + rest / 8 + 524288)) ] ||
        bad "$lo bytes went through loopback in this boot, expected the $rest bytes still missing plus at most 12.5 % and 512 KiB"
    f=$STATE/downloads/v5.zip
    m=$(md5sum $f 2>/dev/null | cut -d' ' -f1)
    [ "$m" = "$v5_md5" ] || bad "$f: MD5 '$m', expected $v5_md5"
    [ $BADS = 0 ] || echo "$dj" | sed "s/^/@@JOURNAL o /"
    done_scn
}

# p, second half (deb3): the report held at the cut, delivered again.
scenario_p2() {
    SCN=p BADS=0
    read -r hseq hpct <$ST/rx-held
    me=$(boot_id) prev=$(cat $ST/o-boot-id)
    if [ -z "$hseq" ]; then bad "the receiver held no report before the cut"; done_scn; return; fi
    # The last report this boot's download pushes: toInstall.
    wait_rx "^$me .*\"stage\":\"toInstall\".*\"boot_id\":\"$me\"" 90 || bad "the toInstall report of this boot did not arrive within 90 s"
    # Lines with the held seq: in the boot of the cut (once, more if the daemon's 5 s timeout
    # sent it again while held), then the first line of this boot; all the same bytes.
    awk -v s="$hseq" -v prev="$prev" -v me="$me" '
        { rx = $1; body = substr($0, length($1) + 2) }
        rx == prev { lbody = body }
        first == "" && rx == me { first = NR; fbody = body }
        body ~ ("\"seq\":" s ",") { if (hbody == "") { hbody = body; hrx = rx } else if (body != hbody) print "BAD seq " s " received with another body: " body; if (rx == prev) before++ }
        END {
            if (hbody == "") { print "BAD no report seq " s " in the receiver log"; exit }
            if (hrx != prev) print "BAD the held report seq " s " was first received in boot " hrx ", not in the boot of the cut (" prev ")"
            if (lbody != hbody) print "BAD the last report received before the cut is not the held seq " s ": " lbody
            if (fbody != hbody) print "BAD the first report received after the cut (line " first ") is not the held seq " s " again: " fbody
            print "INFO the held report seq " s " was received " before + 0 " time(s) before the cut (never answered), then again as the first report after it (line " first "): " hbody
        }' $RX >/tmp/pcheck
    sed -n "s/^BAD /@@BAD $SCN /p; s/^INFO /@@INFO $SCN /p" /tmp/pcheck
    BADS=$((BADS + $(grep -c '^BAD ' /tmp/pcheck)))
    say "INFO p reports the resumed download made (seq stage progress): $(grep "\"boot_id\":\"$me\"" $RX | sed 's/.*"stage":"\([^"]*\)","progress":\([0-9]*\),.*"seq":\([0-9]*\),.*/\3 \1 \2/' | tr '\n' ';')"
    check_reports
    done_scn
}

# q, first half (deb3): the receiver stopped (and disabled: it stays down over the cut), the
# downloaded 5.0.0 installed through the API, the power cut while its second post command
# runs (the files swapped, tope-a stopped).
scenario_q1() {
    begin q "power cut inside an install through the API (in its post commands), the receiver down: the boot unit's recover finishes or rolls it back, the tree all old or all new; the receiver back, every report from before the cut arrives, and exactly one final report for the transaction, matching the tree"
    systemctl disable --now tope-st-rx.service 2>&1 | prefix systemctl
    [ "$(systemctl is-active tope-st-rx.service)" != active ] || bad "the receiver is still active"
    cat $ST/version >$ST/q-from
    boot_id >$ST/q-boot-id
    wc -l <$RX >$ST/q-rx-lines
    rm -f /run/tope-st-cut-here
    touch /run/tope-st-cut
    sync # as in o
    a=$(post /update '{"version":"5.0.0"}')
    say "INFO q POST /update 5.0.0 at $(up): $a"
    [ "$(echo "$a" | jcode)" = 200 ] || bad "POST /update 5.0.0 answered '$a', expected code 200 ($(cat /tmp/wget.err))"
    end=$(($(date +%s) + 300))
    until [ -e /run/tope-st-cut-here ] || [ "$(date +%s)" -ge $end ]; do sleep 0.2; done
    if [ -e /run/tope-st-cut-here ]; then
        say "INFO q the second post command waits (daemon PID, uptime: $(cat /run/tope-st-cut-here)); GET /progress: $(get /progress)"
        s=$("$T" status --json 2>&1)
        say "INFO q status --json: $s"
        case $s in *'"in_flight":null'*) bad "status shows no transaction in flight in the post commands: $s" ;; esac
    else
        bad "the install's second post command never ran: $(get /progress)"
    fi
    powercut 1
}

# q, second half (deb4).
scenario_q2() {
    SCN=q BADS=0
    say "INFO q after the power cut at $(up)"
    [ "$(boot_id)" != "$(cat $ST/q-boot-id 2>/dev/null)" ] || bad "the boot id did not change: not a new boot"
    r=tope-updater-recover.service
    res=$(prop $r Result) st=$(prop $r ExecMainStatus)
    [ "$res" = success ] || bad "$r: result $res, exit status $st"
    rl=$(journalctl -b -q --no-pager -o short-monotonic -u $r)
    echo "$rl" | sed "s/^/@@JOURNAL q /"
    id=$(newest_id)
    echo "$rl" | grep -q "recovering tx=$id " || bad "$r found no transaction $id in flight: the power cut did not land inside the install"
    h=$(newest_tx)
    say "INFO q $r: result $res, exit $st; newest transaction: $h"
    case $h in
        *'"Install"'*'"to_version":"5.0.0","phase":"Committed"'*) v=5 ;;
        *'"Install"'*'"to_version":"5.0.0","phase":"RolledBack"'*) v=$(cat $ST/q-from) ;;
        *) v=$(cat $ST/q-from); bad "the newest transaction is not the 5.0.0 install, committed or rolled back: $h" ;;
    esac
    say "INFO q outcome: $([ "$v" = 5 ] && echo 'finished at boot: all files 5.0.0' || echo "rolled back at boot: all files $v.0.0")"
    say "INFO q post commands (step, PID, uptime): $(tr '\n' ';' <$ST/post-5.0.0 2>/dev/null)"
    expect_version "$v"
    m=$(md5sum /opt/tope/deb/big.bin 2>/dev/null | cut -d' ' -f1)
    if [ "$v" = 5 ]; then
        [ "$m" = "$big_md5" ] || bad "/opt/tope/deb/big.bin: MD5 '$m', expected 5.0.0's $big_md5"
    else
        [ ! -e /opt/tope/deb/big.bin ] || bad "/opt/tope/deb/big.bin (new in 5.0.0) is there after the rollback"
    fi
    ran=$(cut -d' ' -f1 /run/tope-a.starts 2>/dev/null | sort -u | tr '\n' ' ')
    [ "$ran" = "$v.0.0 " ] || bad "tope-a ran '$ran' in this boot, expected only $v.0.0"
    echo $v >$ST/version
    [ "$(wc -l <$RX)" = "$(cat $ST/q-rx-lines)" ] || bad "the receiver got reports while it was down"
    # The receiver comes back: the outbox, kept over the cut, is delivered.
    systemctl enable --now tope-st-rx.service 2>&1 | prefix systemctl
    t0=$(up)
    wait_rx "\"tx_id\":$id,.*\"final\":true" 120 || bad "the final report of transaction $id did not arrive within 120 s of the receiver's start"
    say "INFO q the outbox was delivered $(echo "$(up) $t0" | awk '{ printf "%.1f", $1 - $2 }') s after the receiver started"
    sleep 1
    check_reports
    qb=$(cat $ST/q-boot-id) me=$(boot_id)
    c=$(awk -v qb="$qb" -v me="$me" '$1 == me && index($0, "\"boot_id\":\"" qb "\"") { n++; if (index($0, "\"stage\":\"installing\"") && index($0, "\"version\":\"v5.0.0\"")) i++ } END { print n + 0, i + 0 }' $RX)
    say "INFO q reports made in the boot of the cut and received after it: ${c% *} (${c#* } installing 5.0.0); final: $(grep -E "\"tx_id\":$id,.*\"final\":true" $RX | head -1)"
    [ "${c#* }" -ge 1 ] || bad "no 5.0.0 installing report from before the cut arrived"
    [ $BADS = 0 ] || journalctl -b -q --no-pager -o short-monotonic -u tope-updater.service | sed "s/^/@@JOURNAL q /"
    done_scn
}

scenario_l() {
    begin l "dpkg -r: the daemon stopped, both units disabled and gone, binary gone; state dir (journal, backups) and config kept; applications untouched"
    old=$(prop tope-updater.service MainPID)
    apid=$(prop tope-a.service MainPID)
    v=$(cat $ST/version)
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
        scenario_n
        scenario_o1 # ends with a power cut
        ;;
    deb3)
        scenario_o2
        scenario_p2
        scenario_q1 # ends with a power cut
        ;;
    deb4)
        scenario_q2
        scenario_l
        scenario_m
        ;;
esac
say "END $PHASE"
sync
if [ "$PHASE" = "$(cat /data/last-phase)" ]; then systemctl poweroff 2>/dev/null; else systemctl reboot 2>/dev/null; fi
