#!/bin/sh
# The scenario steps of one boot of the systemd guest (tope-st-driver.service runs it from
# the data disk, /data, which run.sh rebuilds for every boot; it is not part of the cached
# image). Everything it reports goes to the serial console as `@@` lines:
#
#   @@BOOTED <uptime> <boot id>     systemd reached its default target
#   @@TITLE <s> <text>              what scenario <s> proves
#   @@BAD <s> <text>                a failed check of scenario <s> (any one fails it)
#   @@RESULT <s> PASS               scenario <s> ran to its end (passes if it has no @@BAD)
#   @@SKIP <s> <why>
#   @@INFO <s> <text>, @@OUT <s> <text>, @@JOURNAL <s> <text>   for diagnosis
#   @@END <phase>                   this boot's steps are done (then reboot or power off)
#
# Ordering is judged from what systemd logged (journalctl), never from the updater's output;
# the version a service runs is what its running process wrote (/run/tope-X.version, "VERSION
# PID", with PID = systemd's MainPID).
#
# Boots (/data/phase): boot1 a, b, c, d's trial install; boot2 the end of d, e's confirmed
# trial; boot3 the end of e, f, g's killed install; boot4 the end of g. Each but the last
# (/data/last-phase) ends with `systemctl reboot`, boot3 with a power cut (sysrq b).
exec >/dev/ttyS0 2>&1
export PATH=/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin NO_COLOR=1 SYSTEMD_COLORS=0 SYSTEMD_PAGER=
T=/usr/local/bin/tope-updater
CFG=/etc/tope-updater/config.toml
PHASE=$(cat /data/phase)
. /data/params
ST=/var/lib/tope-st
mkdir -p $ST

up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "@@$*"; }
SCN=-
begin() { SCN=$1; shift; say "TITLE $SCN $*"; say "INFO $SCN begin at $(up)"; }
bad() { say "BAD $SCN $*"; BADS=$((BADS + 1)); }
BADS=0
done_scn() { say "INFO $SCN end at $(up)"; say "RESULT $SCN PASS"; }

# tu ARGS...: runs the updater; sets RC, keeps stdout in /tmp/out, stderr in /tmp/err.
tu() {
    t0=$(up)
    "$T" --config "$CFG" "$@" >/tmp/out 2>/tmp/err
    RC=$?
    say "INFO $SCN tope-updater $* -> exit $RC ($t0 .. $(up))"
    sed "s/^/@@OUT $SCN stdout: /" /tmp/out
    sed "s/^/@@OUT $SCN stderr: /" /tmp/err
    return 0
}

# The journal position now; events() then reads what came after it. Also starts a new record
# of the services' stops (/run/tope-X.stops, see stopped.sh).
mark() {
    rm -f /run/tope-a.stops /run/tope-b.stops /run/tope-c.stops
    journalctl --sync 2>/dev/null
    CUR=$(journalctl -q -n 1 --show-cursor -o cat --no-pager | sed -n 's/^-- cursor: //p')
}
# The start/stop events systemd logged for the test units since mark(), one per line:
# "Stopping c", "Stopped c", "Started a", "FAILED b" (the main process exited non-zero).
# systemd 252 logs no "Starting" line for Type=simple units (the job completes at once).
# No -u filter here: journalctl 252 skips the first match after --after-cursor when a
# match is given (seen: "Stopping c" was missing); the sed below selects the units.
raw_events() {
    journalctl --sync 2>/dev/null
    journalctl -q --no-pager -o short-monotonic --after-cursor="$CUR" | grep -E 'tope-([abc]|updater-recover)\.service'
}
events() {
    raw_events | sed -n \
        -e 's/.* systemd\[1\]: \(Stopping\|Stopped\|Started\) tope-\([abc]\)\.service.*/\1 \2/p' \
        -e 's/.* systemd\[1\]: tope-\([abc]\)\.service: Main process exited, code=exited, status=[1-9].*/FAILED \1/p'
}
# ev: events on one line, comma-separated, e.g. "Stopping c,Stopped c,...".
ev() { events | tr '\n' ',' | sed 's/,$//'; }
show_journal() { raw_events | sed "s/^/@@JOURNAL $SCN /"; }

# running X: the version tope-X's main process runs, or why not.
running() {
    st=$(systemctl is-active "tope-$1")
    pid=$(systemctl show -p MainPID --value "tope-$1")
    v=- p=-
    [ -r "/run/tope-$1.version" ] && read -r v p <"/run/tope-$1.version"
    if [ "$st" = active ] && [ "$pid" = "$p" ] && [ -d "/proc/$pid" ]; then echo "$v"
    else echo "not-running(state=$st MainPID=$pid file=$v/$p)"; fi
}
expect_running() {
    for x in a b c; do
        r=$(running $x)
        [ "$r" = "$1" ] || bad "tope-$x runs $r, expected $1"
    done
}
# expect_files N: /opt/tope/{a,b,c}/run.sh hold version N's content (data/src/vN), mode 755.
expect_files() {
    for x in a b c; do
        f=/opt/tope/$x/run.sh
        cmp -s "$f" "/data/src/v$1/$x/run.sh" || bad "$f is not version $1.0.0: $(sed -n 2p "$f" 2>&1)"
        m=$(stat -c %a "$f" 2>/dev/null)
        [ "$m" = 755 ] || bad "$f has mode $m, expected 755"
    done
}
# expect_stops [X...]: since mark(), every stop of a test service happened while its file on
# disk still was the version it ran (stopped before the swap, the swap undone only after
# stopping it again); each X given was stopped at least once.
expect_stops() {
    for x in a b c; do
        [ -e "/run/tope-$x.stops" ] || continue
        while read -r ran file t; do
            [ "${ran#ran=}" = "${file#file=}" ] || bad "tope-$x stopped at $t running ${ran#ran=} while its file on disk was ${file#file=}"
        done <"/run/tope-$x.stops"
        say "INFO $SCN tope-$x stops: $(tr '\n' ';' <"/run/tope-$x.stops")"
    done
    for x in "$@"; do
        [ -s "/run/tope-$x.stops" ] || bad "tope-$x was never stopped"
    done
}
# status_version: the current version per `status --json` ("factory" when nothing installed).
status_json() { "$T" --config "$CFG" status --json 2>/dev/null; }
status_version() {
    s=$(status_json)
    v=$(echo "$s" | sed -n 's/.*"current":{[^}]*"version":"\([^"]*\)".*/\1/p')
    if [ -z "$v" ]; then echo "$s" | grep -q '"current":null' && v=factory || v="?"; fi
    echo "$v"
}
expect_status() {
    v=$(status_version)
    [ "$v" = "$1" ] || bad "status --json: current version $v, expected $1 ($(status_json))"
    # The human form too.
    case $1 in
        factory) want='current:     factory' ;;
        *) want="current:     $1 " ;;
    esac
    "$T" --config "$CFG" status 2>&1 | grep -q "^$want" || bad "status does not show '$want': $("$T" --config "$CFG" status 2>&1 | head -1)"
}
# The trial object of status --json: "null" or {"tx":..,"version":..,"boots":..,"max_boots":..}.
trial() { status_json | sed -n 's/.*"trial":\(null\|{[^}]*}\).*/\1/p'; }
boot_id() { cat /proc/sys/kernel/random/boot_id; }

# expect_boot VERSION: in this boot, the boot-time recovery began before any test service
# started (from the journal), its unit succeeded (exit 0, or 4 = rolled back), and every
# test service process started in this boot ran VERSION (/run/tope-X.starts): no service
# ever ran other code, not even briefly before recovery put the files right.
expect_boot() {
    j=$(journalctl -b -q --no-pager -o short-monotonic | grep -E 'tope-([abc]|updater-recover)\.service')
    rec=$(echo "$j" | grep -n -m1 -E 'systemd\[1\]: Starting tope-updater-recover' | cut -d: -f1)
    first=$(echo "$j" | grep -n -m1 -E 'systemd\[1\]: (Starting|Started) tope-[abc]\.service' | cut -d: -f1)
    if [ -z "$rec" ]; then bad "tope-updater-recover.service did not run in this boot"
    elif [ -z "$first" ]; then bad "no test service was started in this boot"
    elif [ "$rec" -gt "$first" ]; then bad "a test service started before the boot-time recovery began"; fi
    res=$(systemctl show -p Result --value tope-updater-recover.service)
    st=$(systemctl show -p ExecMainStatus --value tope-updater-recover.service)
    say "INFO $SCN tope-updater-recover.service: result $res, exit status $st"
    [ "$res" = success ] || bad "tope-updater-recover.service: result $res (exit status $st)"
    for x in a b c; do
        ran=$(cut -d' ' -f1 "/run/tope-$x.starts" 2>/dev/null | sort -u | tr '\n' ' ')
        [ "$ran" = "$1 " ] || bad "tope-$x ran '$ran' in this boot, expected only $1"
    done
    echo "$j" | sed "s/^/@@JOURNAL $SCN boot: /"
    recover_log | sed "s/^/@@OUT $SCN recover: /"
}

# The boot unit's log, one line per entry: the message and the updater's structured fields
# (under systemd it logs to journald natively, so `-o cat` would show only the messages).
recover_log() {
    journalctl -b -q --no-pager -o verbose -u tope-updater-recover.service | awk '
        function flush() { if (m != "") print m f; m = ""; f = "" }
        /^[^ ]/ { flush(); next }
        /^    MESSAGE=/ { m = substr($0, 13); next }
        /^    [A-Z0-9_]+=/ {
            sub(/^    /, "")
            if ($0 !~ /^(_|PRIORITY|SYSLOG_|CODE_|INVOCATION_ID|USER_INVOCATION_ID|UNIT|MESSAGE_ID|JOB_|TID|TARGET)/) f = f " " $0
        }
        END { flush() }'
}

write_config() { # write_config [extra toml lines]
    { cat /data/config.toml; for l in "$@"; do echo "$l"; done; } >"$CFG"
}

STOP_CBA="Stopping c,Stopped c,Stopping b,Stopped b,Stopping a,Stopped a"
START_ABC="Started a,Started b,Started c"

systemctl is-system-running --wait >/dev/null 2>&1
say "BOOTED $(up) $(boot_id) $PHASE"
say "INFO - $(systemd-analyze 2>&1 | head -1)"
failed_units=$(systemctl --failed --no-legend --plain | awk '{ print $1 }' | tr '\n' ' ')
[ -n "$failed_units" ] && say "INFO - failed units: $failed_units"

# ------------------------------------------------------------------ boot 1

scenario_a() {
    begin a "install 2.0.0: systemd stops c,b,a and starts a,b,c; all three run 2.0.0"
    expect_running 1.0.0
    expect_files 1
    mark
    tu install /data/pkgs/v2.zip
    [ $RC = 0 ] || bad "install 2.0.0 exited $RC"
    e=$(ev)
    say "INFO a events: $e"
    [ "$e" = "$STOP_CBA,$START_ABC" ] || bad "systemd saw '$e', expected '$STOP_CBA,$START_ABC'"
    expect_stops a b c
    expect_files 2
    expect_running 2.0.0
    expect_status 2.0.0
    [ $BADS = 0 ] || show_journal
    done_scn
}

scenario_b() {
    BADS=0
    begin b "install 3.0.0 whose tope-b cannot start: exit 4, SERVICE_START_FAILED, back on 2.0.0 with all three running it"
    mark
    tu install /data/pkgs/v3.zip
    [ $RC = 4 ] || bad "install 3.0.0 exited $RC, expected 4"
    grep -q '^error: SERVICE_START_FAILED' /tmp/err || bad "stderr has no 'error: SERVICE_START_FAILED': $(tail -1 /tmp/err)"
    e=$(ev)
    say "INFO b events: $e"
    # The install: c,b,a stopped; a then b started on 3.0.0; b's process exits 3.
    case $e in
        "$STOP_CBA,Started a,Started b,FAILED b,"*) ;;
        *) bad "the install's part is not '$STOP_CBA,Started a,Started b,FAILED b,...': '$e'" ;;
    esac
    # The rollback: whatever ran is stopped (a last), then a,b,c started on 2.0.0.
    case $e in
        *",Stopping a,Stopped a,$START_ABC") ;;
        *) bad "the rollback's part does not end with 'Stopping a,Stopped a,$START_ABC': '$e'" ;;
    esac
    # c was never started on 3.0.0: its only start is the last event.
    [ "$(echo "$e" | grep -o 'Started c' | wc -l)" = 1 ] || bad "tope-c was started more than once: '$e'"
    expect_stops a b c
    expect_files 2
    expect_running 2.0.0
    expect_status 2.0.0
    # The failed package is remembered: the same bytes again are refused, nothing touched.
    mark
    tu install /data/pkgs/v3.zip
    [ $RC = 3 ] || bad "a second install of the failed 3.0.0 exited $RC, expected 3 (refused, nothing touched)"
    e=$(ev)
    [ -z "$e" ] || bad "the refused install touched services: '$e'"
    [ $BADS = 0 ] || show_journal
    done_scn
}

scenario_c() {
    BADS=0
    begin c "rollback from 2.0.0 to 1.0.0 (the factory content): systemd stops c,b,a and starts a,b,c; all run 1.0.0"
    mark
    tu rollback
    [ $RC = 0 ] || bad "rollback exited $RC"
    e=$(ev)
    say "INFO c events: $e"
    [ "$e" = "$STOP_CBA,$START_ABC" ] || bad "systemd saw '$e', expected '$STOP_CBA,$START_ABC'"
    expect_stops a b c
    expect_files 1
    expect_running 1.0.0
    expect_status factory
    [ $BADS = 0 ] || show_journal
    done_scn
}

scenario_d1() {
    BADS=0
    begin d "trial install (confirm_required, max_trial_boots = 1) not confirmed: the next boot's recover rolls it back before the services start"
    write_config "confirm_required = true" "max_trial_boots = 1"
    mark
    tu install /data/pkgs/v2.zip
    [ $RC = 0 ] || bad "trial install of 2.0.0 exited $RC"
    e=$(ev)
    [ "$e" = "$STOP_CBA,$START_ABC" ] || bad "systemd saw '$e', expected '$STOP_CBA,$START_ABC'"
    expect_stops a b c
    expect_files 2
    expect_running 2.0.0
    t=$(trial)
    say "INFO d trial before the reboot: $t"
    case $t in
        *'"version":"2.0.0"'*'"boots":1'*'"max_boots":1'*) ;;
        *) bad "status --json trial is '$t', expected version 2.0.0, boots 1, max_boots 1" ;;
    esac
    boot_id >$ST/d-boot-id
    "$T" --config "$CFG" history --json >$ST/d-history-before 2>/dev/null
    say "INFO d rebooting at $(up)"
    # No RESULT yet: boot 2 ends the scenario.
}

# ------------------------------------------------------------------ boot 2

scenario_d2() {
    SCN=d BADS=0
    say "INFO d after the reboot at $(up)"
    [ "$(boot_id)" != "$(cat $ST/d-boot-id 2>/dev/null)" ] || bad "the boot id did not change: not a new boot"
    expect_boot 1.0.0
    expect_files 1
    expect_running 1.0.0
    expect_status factory
    t=$(trial)
    [ "$t" = null ] || bad "status --json trial is '$t' after the rollback, expected null"
    h=$("$T" --config "$CFG" history --json 2>/dev/null)
    say "INFO d history: $h"
    # The newest transaction is a rollback from 2.0.0 that is complete.
    last=$(echo "$h" | tr '\n' ' ' | sed 's/^ *\[//; s/\] *$//' | sed 's/},{"id"/}\n{"id"/g' | awk 'BEGIN{m=-1} { if (match($0, /"id":[0-9]+/)) { id=substr($0, RSTART+5, RLENGTH-5)+0; if (id > m) { m=id; l=$0 } } } END { print l }')
    case $last in
        *'"Rollback"'*|*'"rollback"'*) ;;
        *) bad "the newest transaction in history --json is not a rollback: $last" ;;
    esac
    case $last in
        *'"from_version":"2.0.0"'*) ;;
        *) bad "the newest transaction in history --json is not from 2.0.0: $last" ;;
    esac
    case $last in
        *'"phase":"Committed"'*) ;;
        *) bad "the newest transaction in history --json (the trial's rollback) did not complete: $last" ;;
    esac
    # A trial rolled back is a failed package: installing the same bytes needs --force.
    mark
    tu install /data/pkgs/v2.zip
    [ $RC = 3 ] || bad "installing the rolled-back trial package again without --force exited $RC, expected 3 (refused, nothing touched)"
    e=$(ev)
    [ -z "$e" ] || bad "the refused install touched services: '$e'"
    if [ $RC = 0 ]; then tu rollback; fi
    [ $BADS = 0 ] || show_journal
    # Whatever happened, leave no transaction in flight, so that e and f test their own thing.
    if status_json | grep -q '"in_flight":{'; then
        say "INFO d a transaction is still in flight after the boot: recover --retry, so that e and f can run"
        tu recover --retry
        say "INFO d after recover --retry: $(status_json)"
    fi
    done_scn
}

scenario_e1() {
    BADS=0
    begin e "trial install confirmed with 'tope-updater confirm' survives the reboot"
    # Still confirm_required = true, max_trial_boots = 1 (the config of scenario d).
    mark
    tu install --force /data/pkgs/v2.zip
    [ $RC = 0 ] || bad "trial install --force of 2.0.0 exited $RC"
    e=$(ev)
    [ "$e" = "$STOP_CBA,$START_ABC" ] || bad "systemd saw '$e', expected '$STOP_CBA,$START_ABC'"
    expect_stops a b c
    t=$(trial)
    case $t in *'"version":"2.0.0"'*) ;; *) bad "no trial of 2.0.0 before confirm: '$t'" ;; esac
    tu confirm
    [ $RC = 0 ] || bad "confirm exited $RC"
    t=$(trial)
    [ "$t" = null ] || bad "status --json trial is '$t' after confirm, expected null"
    tu confirm
    [ $RC = 0 ] || bad "a second confirm exited $RC"
    grep -qi 'nothing to confirm' /tmp/out /tmp/err || bad "a second confirm does not say 'nothing to confirm'"
    expect_running 2.0.0
    boot_id >$ST/e-boot-id
    say "INFO e rebooting at $(up)"
}

# ------------------------------------------------------------------ boot 3

scenario_e2() {
    SCN=e BADS=0
    say "INFO e after the reboot at $(up)"
    [ "$(boot_id)" != "$(cat $ST/e-boot-id 2>/dev/null)" ] || bad "the boot id did not change: not a new boot"
    expect_boot 2.0.0
    expect_files 2
    expect_running 2.0.0
    expect_status 2.0.0
    t=$(trial)
    [ "$t" = null ] || bad "status --json trial is '$t', expected null"
    h=$("$T" --config "$CFG" history --json 2>/dev/null)
    say "INFO e history: $h"
    [ $BADS = 0 ] || show_journal
    done_scn
}

# kill_case LABEL SPEC N [--fail]: installs package vN (with --force --allow-downgrade: f
# goes back and forth between 2.0.0 and 4.0.0, and some packages were rolled back before)
# with FAILPOINTS=SPEC, which SIGKILLs the updater at that point inside the service steps,
# then runs `recover` as the boot unit would. The files must then be all old or all new
# (all new only when the package can succeed), and all three services running that
# version, stopped only while their files were the ones they ran.
kill_case() {
    label=$1 spec=$2 n=$3 can_succeed=1
    [ "${4:-}" = --fail ] && can_succeed=0
    old=$(status_version)
    mark
    t0=$(up)
    FAILPOINTS=$spec "$T" --config "$CFG" install --force --allow-downgrade "/data/pkgs/v$n.zip" >/tmp/out 2>/tmp/err
    krc=$?
    sed "s/^/@@OUT f $label: /" /tmp/err
    [ $krc = 137 ] || bad "$label: install --force v$n.zip with FAILPOINTS=$spec exited $krc, expected 137 (SIGKILL)"
    tu recover
    rrc=$RC
    [ $rrc = 0 ] || [ $rrc = 4 ] || bad "$label: recover exited $rrc"
    tu recover
    grep -q 'nothing in flight' /tmp/out || bad "$label: a second recover is not a no-op"
    v=$(status_version)
    if [ "$v" = "$old" ]; then :
    elif [ "$v" = "$n.0.0" ] && [ $can_succeed = 1 ]; then :
    else bad "$label: status says $v after recover, expected $old$([ $can_succeed = 1 ] && echo " or $n.0.0")"; fi
    expect_files "${v%%.*}"
    expect_running "$v"
    expect_stops
    say "INFO f $label: killed at $spec, recover exit $rrc, $old -> $v ($t0 .. $(up)); systemd saw: $(ev)"
    [ $BADS = 0 ] || show_journal
}

# The next package for a kill case: 4.0.0 when 2.0.0 is installed, else 2.0.0.
other() { [ "$(status_version)" = 2.0.0 ] && echo 4 || echo 2; }

scenario_f() {
    BADS=0
    begin f "SIGKILL inside the service steps (FAILPOINTS), then recover: files all old or all new, all three services running that version"
    if [ "$failpoints" != 1 ]; then say "SKIP f the binary was built without the failpoints feature"; return; fi
    write_config
    kill_case enter-stopped 'enter.ServicesStopped=return' "$(other)"
    kill_case stopped-one-2 'services.stopped_one=1*off->return' "$(other)"
    kill_case enter-started 'enter.ServicesStarted=return' "$(other)"
    kill_case started-one-2 'services.started_one=1*off->return' "$(other)"
    # 3.0.0's tope-b cannot start: killed once the rollback has restarted the services.
    kill_case rollback-started 'rollback.services_started=return' 3 --fail
    done_scn
}

scenario_g1() {
    BADS=0
    begin g "SIGKILL inside the service steps, then a power cut: the boot unit's recover finishes or undoes it before the services start"
    if [ "$failpoints" != 1 ]; then say "SKIP g the binary was built without the failpoints feature"; return; fi
    write_config
    old=$(status_version)
    n=$(other)
    echo "$old $n" >$ST/g-versions
    boot_id >$ST/g-boot-id
    sync # what the driver needs after the cut; from here on only the updater's own writes
    mark
    # c and b stopped, a still running: the updater is killed there, and then the power is
    # cut (an immediate reset by sysrq at the end of this boot: no sync, no unmount, the
    # guest's page cache is lost); the next boot's tope-updater-recover.service must sort
    # it out.
    FAILPOINTS='services.stopped_one=1*off->return' "$T" --config "$CFG" install --force --allow-downgrade "/data/pkgs/v$n.zip" >/tmp/out 2>/tmp/err
    krc=$?
    sed "s/^/@@OUT g install: /" /tmp/err
    [ $krc = 137 ] || bad "install of v$n.zip with FAILPOINTS exited $krc, expected 137 (SIGKILL)"
    say "INFO g killed ($old -> $n.0.0); systemd saw: $(ev); power cut at $(up)"
    POWERCUT=1
}

scenario_g2() {
    SCN=g BADS=0
    say "INFO g after the reboot at $(up)"
    [ "$(boot_id)" != "$(cat $ST/g-boot-id 2>/dev/null)" ] || bad "the boot id did not change: not a new boot"
    read -r old n <$ST/g-versions
    v=$(status_version)
    [ "$v" = "$old" ] || [ "$v" = "$n.0.0" ] || bad "status says $v after the boot, expected $old or $n.0.0"
    case $v in [0-9]*) ;; *) v=$old ;; esac
    expect_boot "$v"
    expect_files "${v%%.*}"
    expect_running "$v"
    status_json | grep -q '"in_flight":null' || bad "a transaction is still in flight after the boot: $(status_json)"
    [ $BADS = 0 ] || show_journal
    done_scn
}

case $PHASE in
    boot1)
        write_config
        scenario_a
        scenario_b
        scenario_c
        scenario_d1
        ;;
    boot2)
        scenario_d2
        scenario_e1
        ;;
    boot3)
        scenario_e2
        scenario_f
        scenario_g1
        ;;
    boot4)
        scenario_g2
        ;;
esac
say "END $PHASE"
if [ "${POWERCUT:-0}" = 1 ]; then
    sleep 1 # for the serial console to drain
    echo b >/proc/sysrq-trigger
fi
sync
# A clean reboot/poweroff through systemd (its "Failed to connect to bus" is the logind check:
# there is no D-Bus in this image; systemctl then asks systemd directly). With -no-reboot,
# QEMU exits at the reboot and run.sh starts the next boot on the same root disk.
if [ "$PHASE" = "$(cat /data/last-phase)" ]; then systemctl poweroff 2>/dev/null; else systemctl reboot 2>/dev/null; fi
