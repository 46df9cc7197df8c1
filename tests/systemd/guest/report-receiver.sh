#!/bin/sh
# device-api's stand-in in the Debian package part of the systemd guest (scenarios n-q): a CGI
# of busybox httpd (tope-st-rx.service, 127.0.0.1:18081, /cgi-bin/report), where the daemon's
# `[reporter] url` points. deb-driver.sh installs it as /var/lib/tope-st/rx/cgi-bin/report.
#
# Each POSTed report is appended as one line "<receiver's boot id> <body>" to
# /var/lib/tope-st/reports.log and made durable (dd conv=fsync; the file and its directory entry
# were made durable by the driver when it created it) BEFORE the answer
# {"code":200,"msg":"success","data":{"status":"received"}}: a power cut never loses a report
# the daemon saw acknowledged. The body is the daemon's JSON (one line, as sent).
#
# Holding reports (scenario p): while /run/tope-st-rx-hold holds a number P, the first
# `downloading` report with progress >= P is logged as usual, then "SEQ PROGRESS" goes to
# /var/lib/tope-st/rx-held (durable) and /run/tope-st-rx-held, and the answer never comes: this
# and every later request (the daemon's retries of the same report after its 5 s timeout) is
# logged and left waiting until the driver cuts the power. Received, never acknowledged.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
L=/var/lib/tope-st/reports.log
read -r boot </proc/sys/kernel/random/boot_id
body=$(head -c "${CONTENT_LENGTH:-0}")
printf '%s %s\n' "$boot" "$body" | dd of=$L oflag=append conv=notrunc,fsync bs=65536 status=none
if [ -e /run/tope-st-rx-held ]; then
    exec sleep 600
fi
if [ -e /run/tope-st-rx-hold ]; then
    read -r want </run/tope-st-rx-hold
    case $body in
        *'"stage":"downloading"'*)
            p=${body#*\"progress\":} seq=${body#*\"seq\":}
            p=${p%%,*} seq=${seq%%,*}
            if [ "$p" -ge "$want" ] 2>/dev/null; then
                echo "$seq $p" | dd of=/var/lib/tope-st/rx-held conv=fsync status=none
                echo "$seq $p" >/run/tope-st-rx-held
                exec sleep 600
            fi
            ;;
    esac
fi
printf 'Content-Type: application/json\r\n\r\n{"code":200,"msg":"success","data":{"status":"received"}}'
