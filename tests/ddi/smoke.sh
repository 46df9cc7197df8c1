#!/usr/bin/env bash
# Device-side smoke test of the two DDI test servers, with curl + python only (no Rust):
# gooseBit (real server, PyPI) and spec_server.py (the spec-driven one). Exits non-zero on any
# unexpected answer. With DDI_SAVE_FIXTURES=1 (the default) it rewrites tests/ddi/fixtures/*.json
# from what it observed (ports normalised to 127.0.0.1:8080, the work dir to /tmp/ddi-smoke).
#
#   tests/ddi/smoke.sh            [DDI_SMOKE_DIR=/tmp/x] [DDI_SAVE_FIXTURES=0] [DDI_SMOKE_ONLY=goosebit|spec]
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
GB="$HERE/goosebit.sh"
FIX="$HERE/fixtures"
WORK="${DDI_SMOKE_DIR:-$(mktemp -d /tmp/ddi-smoke.XXXXXX)}"
SAVE="${DDI_SAVE_FIXTURES:-1}"
ONLY="${DDI_SMOKE_ONLY:-}"
mkdir -p "$WORK" "$FIX"
PY="$("$GB" venv | sed -n 's/^venv=//p')/bin/python"
SPEC_PID=""
CHECKS=0

cleanup() {
    local rc=$?
    [[ -f "$WORK/gb/server.env" ]] && "$GB" stop "$WORK/gb" || true
    [[ -f "$WORK/gb-auth/server.env" ]] && "$GB" stop "$WORK/gb-auth" || true
    if [[ -n "$SPEC_PID" ]] && kill -0 "$SPEC_PID" 2>/dev/null; then kill "$SPEC_PID" 2>/dev/null || true; wait "$SPEC_PID" 2>/dev/null || true; fi
    if [[ $rc -ne 0 ]]; then
        echo "smoke: FAILED (rc=$rc); work dir kept: $WORK" >&2
        [[ -f "$WORK/gb/server.log" ]] && { echo "--- gooseBit log tail" >&2; tail -n 20 "$WORK/gb/server.log" >&2; }
    fi
    exit $rc
}
trap cleanup EXIT

fail() { echo "smoke: FAIL: $*" >&2; [[ -f "$WORK/resp" ]] && { echo "--- last answer:" >&2; head -c 2000 "$WORK/resp" >&2; echo >&2; }; exit 1; }
ok() { CHECKS=$((CHECKS + 1)); echo "ok $CHECKS - $*"; }

# req METHOD URL [JSON-BODY] [curl args...]: answer body in $WORK/resp, headers in $WORK/hdr, status in $CODE
req() {
    local method="$1" url="$2" body="${3:-}"; shift 3 || shift $#
    local args=(-s -S --max-time 20 -X "$method" -o "$WORK/resp" -D "$WORK/hdr" -w '%{http_code}')
    [[ "$method" == HEAD ]] && args=(-s -S --max-time 20 -I -o "$WORK/resp" -D "$WORK/hdr" -w '%{http_code}')
    if [[ -n "$body" ]]; then args+=(-H 'Content-Type: application/json' --data-binary "$body"); fi
    CODE="$(curl "${args[@]}" "$@" "$url")" || fail "curl $method $url failed"
}
expect() { # expect CODE description
    [[ "$CODE" == "$1" ]] || fail "$2: expected HTTP $1, got $CODE"
    ok "$2 (HTTP $CODE)"
}
# j 'python expression over d (the answer JSON)' -> prints the value
j() { "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); r=eval(sys.argv[2]); print(json.dumps(r) if not isinstance(r,str) else r)' "${2:-$WORK/resp}" "$1"; }
# check 'python boolean over d' description [file]
check() {
    "$PY" -c 'import json,sys; d=json.load(open(sys.argv[1])); sys.exit(0 if eval(sys.argv[2]) else 1)' "${3:-$WORK/resp}" "$1" \
        || fail "$2: not true: $1"
    ok "$2"
}
fixture() { # fixture NAME [FILE]: save the (normalised) answer as fixtures/NAME.json
    [[ "$SAVE" == 1 ]] || return 0
    "$PY" - "${2:-$WORK/resp}" "$FIX/$1.json" "$WORK" <<'EOF'
import json, re, sys
src, dst, work = sys.argv[1:4]
text = open(src).read()
text = re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:8080", text).replace(work, "/tmp/ddi-smoke")
obj = json.loads(text)
for k in ("last_seen", "requests", "ts"):
    if isinstance(obj, dict):
        obj.pop(k, None)
open(dst, "w").write(json.dumps(obj, indent=2, sort_keys=True) + "\n")
EOF
}
sha1() { sha1sum "$1" | cut -d' ' -f1; }

# deterministic artifacts (stable hashes in the fixtures)
"$PY" -c 'import sys; open(sys.argv[1],"wb").write(bytes((i*7+i//251)%256 for i in range(300000)))' "$WORK/update-1.1.0.bin"
"$PY" -c 'import sys; open(sys.argv[1],"wb").write(bytes((i*13+5)%256 for i in range(50000)))' "$WORK/update-bad.bin"
ART="$WORK/update-1.1.0.bin"

# =====================================================================================
goosebit_story() {
    echo "# gooseBit $("$PY" -c 'import importlib.metadata as m; print(m.version("goosebit"))')"
    eval "$("$GB" start "$WORK/gb" | tr ' ' '\n')"   # sets url=, pid=
    local U="$url/DEFAULT/controller/v1" DEV=tope-smoke-ok BAD=tope-smoke-fail
    local TOK=(-H 'Authorization: TargetToken tok-ignored')

    # -- registration
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "gooseBit: first poll of a new controller id"
    check 'd["config"]["polling"]["sleep"] == "00:00:10" and list(d["_links"]) == ["configData"]' \
        "gooseBit: unregistered device gets sleep 00:00:10 and only a configData link"
    fixture goosebit-poll-unregistered
    req GET "$U/$DEV/deploymentBase/1" "" "${TOK[@]}"
    [[ "$CODE" == 200 && "$(cat "$WORK/resp")" == null ]] || fail "deploymentBase with nothing assigned: $CODE $(cat "$WORK/resp")"
    ok "gooseBit: deploymentBase with nothing assigned is 200 with body 'null' (not 404)"

    req PUT "$U/$DEV/configData" '{"mode":"merge","data":{"hw_boardname":"qemu-x86_64","hw_revision":"1","sw_version":"1.0.0","serial":"42"}}' "${TOK[@]}"
    expect 200 "gooseBit: PUT configData"
    fixture goosebit-configdata-response
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "gooseBit: poll after configData"
    check 'd["config"]["polling"]["sleep"] == "00:01:00" and d["_links"] == {}' \
        "gooseBit: registered idle device: sleep 00:01:00, no links"
    fixture goosebit-poll-idle

    # -- assignment
    "$GB" seed "$WORK/gb" assign --device "$DEV" --file "$ART" --version 1.1.0 > "$WORK/assign.json" 2>>"$WORK/ctl.log"
    local ACTION; ACTION="$(j 'd["action_id"]' "$WORK/assign.json")"
    ok "gooseBit: software 1.1.0 assigned (action id $ACTION = software id)"
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "gooseBit: poll with software assigned"
    check "d['_links']['deploymentBase']['href'].endswith('/$DEV/deploymentBase/$ACTION') and list(d['_links']) == ['deploymentBase']" \
        "gooseBit: poll links deploymentBase/$ACTION only"
    fixture goosebit-poll-deployment
    local DB_URL; DB_URL="$(j 'd["_links"]["deploymentBase"]["href"]')"
    req GET "$DB_URL" "" "${TOK[@]}"; expect 200 "gooseBit: GET deploymentBase"
    check "d['id'] == '$ACTION' and d['deployment']['download'] == 'forced' and d['deployment']['update'] == 'forced' and 'maintenanceWindow' not in d['deployment']" \
        "gooseBit: deployment forced/forced, no maintenanceWindow"
    check "[a['hashes'] for a in d['deployment']['chunks'][0]['artifacts']] == [{'sha1': '$(sha1 "$ART")'}] and list(d['deployment']['chunks'][0]['artifacts'][0]['_links']) == ['download']" \
        "gooseBit: one artifact, sha1 only, only a 'download' link (no download-http, no md5sum)"
    check "d['deployment']['chunks'][0]['artifacts'][0]['size'] == $(stat -c %s "$ART") and d['deployment']['chunks'][0]['part'] == 'os'" \
        "gooseBit: artifact size and chunk part"
    fixture goosebit-deploymentbase
    local DL; DL="$(j 'd["deployment"]["chunks"][0]["artifacts"][0]["_links"]["download"]["href"]')"

    # -- download with Range
    CODE="$(curl -s -S -o "$WORK/part" -D "$WORK/hdr" -w '%{http_code}' -r 0-1023 "${TOK[@]}" "$DL")"
    expect 206 "gooseBit: download with Range: bytes=0-1023"
    [[ "$(stat -c %s "$WORK/part")" == 1024 ]] || fail "range answer is $(stat -c %s "$WORK/part") bytes"
    grep -qi '^content-range: bytes 0-1023/300000' "$WORK/hdr" || fail "no Content-Range: $(cat "$WORK/hdr")"
    ok "gooseBit: 1024 bytes with Content-Range bytes 0-1023/300000"
    CODE="$(curl -s -S -o "$WORK/rest" -w '%{http_code}' -r 1024- "${TOK[@]}" "$DL")"
    expect 206 "gooseBit: resume with Range: bytes=1024-"
    cat "$WORK/part" "$WORK/rest" > "$WORK/whole"
    [[ "$(sha1 "$WORK/whole")" == "$(sha1 "$ART")" ]] || fail "resumed download differs"
    ok "gooseBit: resumed download has the announced sha1"
    CODE="$(curl -s -o /dev/null -w '%{http_code}' -r 300000- "${TOK[@]}" "$DL")"
    expect 416 "gooseBit: Range past the end"

    # -- feedback: proceeding with progress, then closed/success
    local FB="$U/$DEV/deploymentBase/$ACTION/feedback"
    req POST "$FB" '{"status":{"execution":"proceeding","result":{"finished":"none","progress":{"cnt":1,"of":3}},"details":["Downloaded 40%"]}}' "${TOK[@]}"
    expect 200 "gooseBit: feedback proceeding with progress"
    check "d == {'id': '$ACTION'}" "gooseBit: feedback answer is {\"id\": \"$ACTION\"}"
    fixture goosebit-feedback-response
    req POST "$FB" '{"status":{"execution":"download","result":{"finished":"none"},"details":["download started"]}}' "${TOK[@]}"
    expect 200 "gooseBit: feedback execution=download accepted (not interpreted)"
    req POST "$FB" '{"status":{"execution":"downloading","result":{"finished":"none"}}}' "${TOK[@]}"
    expect 422 "gooseBit: feedback execution=downloading (not in the spec) refused"
    fixture goosebit-feedback-422
    "$GB" show "$WORK/gb" device --device "$DEV" > "$WORK/dev.json" 2>>"$WORK/ctl.log"
    check 'd["last_state_name"] == "running" and d["progress"] == 40 and d["last_log_lines"] == ["Downloaded 40%", "download started"]' \
        "gooseBit: running, progress from details text 'Downloaded 40%' (progress.cnt/of ignored), details in last_log" "$WORK/dev.json"
    fixture goosebit-device-running "$WORK/dev.json"
    req POST "$FB" '{"status":{"execution":"closed","result":{"finished":"success"},"details":["installed, rebooted, confirmed"]}}' "${TOK[@]}"
    expect 200 "gooseBit: feedback closed/success"
    "$GB" show "$WORK/gb" device --device "$DEV" > "$WORK/dev.json" 2>>"$WORK/ctl.log"
    check 'd["last_state"] == 5 and d["sw_version"] == "1.1.0" and d["progress"] == 100 and d["last_log_lines"][-1] == "installed, rebooted, confirmed"' \
        "gooseBit: device finished, sw_version 1.1.0, progress 100" "$WORK/dev.json"
    fixture goosebit-device-after-success "$WORK/dev.json"
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "gooseBit: poll after success"
    check 'd["_links"] == {}' "gooseBit: after success: no deploymentBase, no installedBase, no configData"
    fixture goosebit-poll-after-success
    req GET "$DB_URL" "" "${TOK[@]}"
    [[ "$CODE" == 200 && "$(cat "$WORK/resp")" == null ]] || fail "deploymentBase after success: $CODE"
    ok "gooseBit: deploymentBase after success is 'null'"
    req POST "$FB" '{"status":{"execution":"closed","result":{"finished":"success"}}}' "${TOK[@]}"
    expect 200 "gooseBit: a repeated closed/success is accepted again (no 410)"

    # -- failure story on a second device
    req GET "$U/$BAD" ""; expect 200 "gooseBit: poll without any Authorization header (auth off by default)"
    req PUT "$U/$BAD/configData" '{"data":{"hw_boardname":"qemu-x86_64","hw_revision":"1","sw_version":"1.0.0"}}'
    expect 200 "gooseBit: configData without mode"
    "$GB" seed "$WORK/gb" assign --device "$BAD" --file "$WORK/update-bad.bin" --version 2.0.0 > "$WORK/assign2.json" 2>>"$WORK/ctl.log"
    local A2; A2="$(j 'd["action_id"]' "$WORK/assign2.json")"
    req GET "$U/$BAD"; expect 200 "gooseBit: poll (failing device)"
    check "'deploymentBase' in d['_links']" "gooseBit: failing device offered deploymentBase/$A2"
    local FB2="$U/$BAD/deploymentBase/$A2/feedback"
    req POST "$FB2" '{"status":{"execution":"proceeding","result":{"finished":"none"}}}'; expect 200 "gooseBit: proceeding (failing device)"
    req POST "$FB2" '{"status":{"execution":"closed","result":{"finished":"failure"},"details":["verification failed: sha256 mismatch"]}}'
    expect 200 "gooseBit: feedback closed/failure"
    "$GB" show "$WORK/gb" device --device "$BAD" > "$WORK/dev.json" 2>>"$WORK/ctl.log"
    check 'd["last_state_name"] == "error" and d["sw_version"] == "1.0.0" and d["force_update"] is False' \
        "gooseBit: after closed/failure the device is in state error (4), sw_version unchanged" "$WORK/dev.json"
    fixture goosebit-device-after-failure "$WORK/dev.json"
    req GET "$U/$BAD"; expect 200 "gooseBit: poll after failure"
    check 'd["_links"] == {} and d["config"]["polling"]["sleep"] == "00:01:00"' \
        "gooseBit: after failure the deployment is NOT offered again"
    fixture goosebit-poll-after-failure
    req GET "$U/$BAD/deploymentBase/$A2"
    [[ "$CODE" == 200 && "$(cat "$WORK/resp")" == null ]] || fail "deploymentBase after failure: $CODE"
    ok "gooseBit: deploymentBase after failure is 'null'"
    for ex in canceled rejected scheduled resumed downloaded; do
        req POST "$FB2" "{\"status\":{\"execution\":\"$ex\",\"result\":{\"finished\":\"none\"},\"details\":[\"sent $ex\"]}}"
        expect 200 "gooseBit: feedback execution=$ex accepted"
    done
    "$GB" show "$WORK/gb" device --device "$BAD" > "$WORK/dev.json" 2>>"$WORK/ctl.log"
    check 'd["last_state_name"] == "error" and d["last_log_lines"][-5:] == ["sent canceled", "sent rejected", "sent scheduled", "sent resumed", "sent downloaded"]' \
        "gooseBit: canceled/rejected/scheduled/resumed/downloaded change no state; only their details are appended" "$WORK/dev.json"
    grep -q "unhandled execution state, state=canceled" "$WORK/gb/server.log" || fail "no 'unhandled execution state' log line"
    ok "gooseBit: logs 'Device reported unhandled execution state' for them"
    "$GB" ctl "$WORK/gb" force --device "$BAD" >/dev/null 2>>"$WORK/ctl.log"
    req GET "$U/$BAD"; expect 200 "gooseBit: poll after force_update"
    check "d['_links']['deploymentBase']['href'].endswith('/deploymentBase/$A2')" "gooseBit: force_update offers the failed deployment again"
    req POST "$FB2" '{"status":{"execution":"proceeding","result":{"finished":"none"}}}'; expect 200 "gooseBit: proceeding after force"
    req POST "$FB2" '{"status":{"execution":"closed","result":{"finished":"success"}}}'; expect 200 "gooseBit: closed/success after force"
    "$GB" show "$WORK/gb" device --device "$BAD" > "$WORK/dev.json" 2>>"$WORK/ctl.log"
    check 'd["last_state_name"] == "finished" and d["sw_version"] == "2.0.0" and d["force_update"] is False and d["last_log"] == ""' \
        "gooseBit: finished 2.0.0, force_update cleared; last_log was cleared by the new proceeding" "$WORK/dev.json"
    "$GB" stop "$WORK/gb"

    # -- TargetToken checking (off by default; strict mode here)
    eval "$(GOOSEBIT_DEVICE_AUTH__ENABLE=true GOOSEBIT_DEVICE_AUTH__MODE=strict "$GB" start "$WORK/gb-auth" | tr ' ' '\n')"
    U="$url/DEFAULT/controller/v1"
    req GET "$U/tope-auth" "" -H 'Authorization: TargetToken t0k3n'; expect 401 "gooseBit strict: unknown device with a token"
    fixture goosebit-401
    "$GB" ctl "$WORK/gb-auth" token --device tope-auth --token t0k3n >/dev/null 2>>"$WORK/ctl.log"
    req GET "$U/tope-auth" "" -H 'Authorization: TargetToken t0k3n'; expect 200 "gooseBit strict: provisioned device with its TargetToken"
    req GET "$U/tope-auth" "" -H 'Authorization: TargetToken wrong'; expect 401 "gooseBit strict: wrong token"
    req GET "$U/tope-auth" ""; expect 401 "gooseBit strict: no token"
    req GET "$U/tope-auth" "" -H 'Authorization: GatewayToken t0k3n'; expect 401 "gooseBit strict: GatewayToken is not supported"
    "$GB" stop "$WORK/gb-auth"
}

# =====================================================================================
spec_story() {
    echo "# spec_server.py"
    local SD="$WORK/spec"
    mkdir -p "$SD"; rm -f "$SD/server.env"
    nice -n 19 "$PY" "$HERE/spec_server.py" serve --state-dir "$SD" --fresh-log --sleep 00:00:02 \
        --target-token tope-spec=tok-1 --gateway-token gw-secret > "$SD/stdout.log" 2>&1 &
    SPEC_PID=$!
    local i; for i in $(seq 1 100); do [[ -f "$SD/server.env" ]] && break; sleep 0.1; done
    [[ -f "$SD/server.env" ]] || fail "spec_server did not start: $(cat "$SD/stdout.log")"
    local url; url="$(sed -n 's/^url=//p' "$SD/server.env")"
    local C="$url/_ctl" U="$url/DEFAULT/controller/v1" DEV=tope-spec
    local TOK=(-H 'Authorization: TargetToken tok-1')

    req GET "$U/$DEV" ""; expect 401 "spec: poll without Authorization"
    req GET "$U/$DEV" "" -H 'Authorization: TargetToken nope'; expect 401 "spec: wrong TargetToken"
    req GET "$U/$DEV" "" -H 'Authorization: GatewayToken gw-secret'; expect 200 "spec: GatewayToken"
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "spec: TargetToken"
    check 'd == {"config": {"polling": {"sleep": "00:00:02"}}, "_links": {"configData": {"href": d["_links"]["configData"]["href"]}}}' \
        "spec: new controller: configData link only"
    fixture spec-poll-unregistered
    req PUT "$U/$DEV/configData" '{"mode":"merge","data":{"hw_revision":2}}' "${TOK[@]}"
    expect 400 "spec: configData with a non-string value refused"
    fixture spec-400-configdata
    req PUT "$U/$DEV/configData" '{"mode":"merge","data":{"hw_boardname":"qemu-x86_64","sw_version":"1.0.0"}}' "${TOK[@]}"
    expect 200 "spec: PUT configData"
    req GET "$U/$DEV" "" "${TOK[@]}"; check 'd["_links"] == {}' "spec: registered idle: no links"

    # -- deployment with maintenance window unavailable
    req POST "$C/deployment" "{\"controllerId\":\"$DEV\",\"actionId\":7,\"artifacts\":[{\"path\":\"$ART\"}],\"download\":\"forced\",\"update\":\"forced\",\"maintenanceWindow\":\"unavailable\",\"version\":\"1.1.0\",\"name\":\"tope-image\"}"
    expect 200 "spec: control: add deployment 7"
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "spec: poll with deployment"
    check '"/deploymentBase/7?c=" in d["_links"]["deploymentBase"]["href"]' "spec: deploymentBase/7 link"
    fixture spec-poll-deployment
    local DB_URL; DB_URL="$(j 'd["_links"]["deploymentBase"]["href"]')"
    req GET "$DB_URL" "" "${TOK[@]}"; expect 200 "spec: GET deploymentBase (window unavailable)"
    check 'd["deployment"]["maintenanceWindow"] == "unavailable" and d["deployment"]["update"] == "skip" and d["deployment"]["download"] == "forced"' \
        "spec: unavailable window: download forced, update skip"
    local A="d['deployment']['chunks'][0]['artifacts'][0]"
    check "$A['hashes'] == {'sha1': '$(sha1 "$ART")', 'md5': '$(md5sum "$ART" | cut -d' ' -f1)', 'sha256': '$(sha256sum "$ART" | cut -d' ' -f1)'}" \
        "spec: sha1 + md5 + sha256"
    check "sorted($A['_links']) == ['download', 'download-http', 'md5sum', 'md5sum-http']" "spec: download, download-http, md5sum links"
    fixture spec-deploymentbase-window-unavailable
    local DL; DL="$(j "$A['_links']['download-http']['href']")"
    CODE="$(curl -s -S -o "$WORK/part" -D "$WORK/hdr" -w '%{http_code}' -r 0-99 "${TOK[@]}" "$DL")"
    expect 206 "spec: Range bytes=0-99"
    grep -qi '^content-range: bytes 0-99/300000' "$WORK/hdr" || fail "Content-Range: $(cat "$WORK/hdr")"
    CODE="$(curl -s -S -o "$WORK/rest" -w '%{http_code}' -r 100- "${TOK[@]}" "$DL")"; expect 206 "spec: Range bytes=100-"
    cat "$WORK/part" "$WORK/rest" > "$WORK/whole"
    [[ "$(sha256sum < "$WORK/whole")" == "$(sha256sum < "$ART")" ]] || fail "resumed spec download differs"; ok "spec: resumed download matches sha256"
    CODE="$(curl -s -o /dev/null -w '%{http_code}' -r 300000- "${TOK[@]}" "$DL")"; expect 416 "spec: Range past the end"
    CODE="$(curl -s -o /dev/null -w '%{http_code}' "$DL")"; expect 401 "spec: artifact without token"
    CODE="$(curl -s -o "$WORK/md5" -w '%{http_code}' "${TOK[@]}" "$DL.MD5SUM")"; expect 200 "spec: .MD5SUM"
    (cd "$WORK" && sed "s/ .*update-1.1.0.bin/  whole/" md5 | md5sum -c --quiet -) || fail "MD5SUM file"

    local FB="$U/$DEV/deploymentBase/7/feedback"
    req POST "$FB" '{"status":{"execution":"download","result":{"finished":"none"},"details":["downloading"]}}' "${TOK[@]}"; expect 200 "spec: feedback download"
    req POST "$FB" '{"status":{"execution":"downloading","result":{"finished":"none"}}}' "${TOK[@]}"
    expect 400 "spec: feedback execution=downloading (not in the spec) refused"
    fixture spec-400-feedback
    req POST "$FB" '{"status":{"execution":"proceeding","result":{"progress":{"cnt":1}}}}' "${TOK[@]}"
    expect 400 "spec: feedback without result.finished refused"
    req POST "$FB" '{"status":{"execution":"downloaded","result":{"finished":"none"}},"timestamp":1700000000000}' "${TOK[@]}"
    expect 200 "spec: feedback downloaded"
    req POST "$C/maintenance" '{"actionId":7,"window":"available"}'; expect 200 "spec: control: window available"
    req GET "$DB_URL" "" "${TOK[@]}"
    check 'd["deployment"]["maintenanceWindow"] == "available" and d["deployment"]["update"] == "forced"' "spec: window available: update forced"
    fixture spec-deploymentbase-window-available
    req POST "$FB" '{"status":{"execution":"proceeding","result":{"finished":"none","progress":{"cnt":1,"of":2}},"details":["installing"]}}' "${TOK[@]}"
    expect 200 "spec: feedback proceeding with progress"
    req POST "$FB" '{"status":{"execution":"closed","result":{"finished":"success"},"details":["rebooted and confirmed"]}}' "${TOK[@]}"
    expect 200 "spec: feedback closed/success"
    req POST "$FB" '{"status":{"execution":"closed","result":{"finished":"success"}}}' "${TOK[@]}"
    expect 410 "spec: feedback on a closed action is 410 Gone (as hawkBit)"
    req GET "$U/$DEV" "" "${TOK[@]}"
    check 'sorted(d["_links"]) == ["configData", "installedBase"] and d["_links"]["installedBase"]["href"].endswith("/installedBase/7")' \
        "spec: after success: installedBase/7 and configData links"
    fixture spec-poll-after-success
    req GET "$U/$DEV/installedBase/7" "" "${TOK[@]}"; expect 200 "spec: GET installedBase/7"
    check 'd["id"] == "7" and d["actionHistory"]["status"] == "FINISHED"' "spec: installedBase shows the finished action"
    fixture spec-installedbase

    # -- cancel
    req POST "$C/deployment" "{\"controllerId\":\"$DEV\",\"actionId\":8,\"artifacts\":[{\"path\":\"$ART\",\"filename\":\"update-1.2.0.bin\"}],\"download\":\"attempt\",\"update\":\"attempt\",\"version\":\"1.2.0\"}"
    expect 200 "spec: control: add deployment 8 (attempt/attempt)"
    req GET "$U/$DEV/deploymentBase/8" "" "${TOK[@]}"
    check 'd["deployment"]["download"] == "attempt" and d["deployment"]["update"] == "attempt" and "maintenanceWindow" not in d["deployment"]' \
        "spec: attempt/attempt, no maintenanceWindow field"
    fixture spec-deploymentbase-attempt
    req POST "$U/$DEV/deploymentBase/8/feedback" '{"status":{"execution":"proceeding","result":{"finished":"none"}}}' "${TOK[@]}"; expect 200 "spec: proceeding on 8"
    req POST "$C/cancel" '{"actionId":8}'; expect 200 "spec: control: cancel 8"
    req GET "$U/$DEV" "" "${TOK[@]}"
    check '"deploymentBase" not in d["_links"] and d["_links"]["cancelAction"]["href"].endswith("/cancelAction/8")' "spec: poll shows cancelAction/8 instead of deploymentBase"
    fixture spec-poll-cancel
    req GET "$U/$DEV/cancelAction/8" "" "${TOK[@]}"; expect 200 "spec: GET cancelAction/8"
    check 'd == {"id": "8", "cancelAction": {"stopId": "8"}}' "spec: cancelAction body"
    fixture spec-cancelaction
    req POST "$U/$DEV/cancelAction/8/feedback" '{"status":{"execution":"proceeding"}}' "${TOK[@]}"; expect 400 "spec: cancel feedback without result refused"
    req POST "$U/$DEV/cancelAction/8/feedback" '{"status":{"execution":"closed","result":{"finished":"success"}}}' "${TOK[@]}"; expect 200 "spec: cancel feedback closed/success"
    req GET "$U/$DEV" "" "${TOK[@]}"; check '"cancelAction" not in d["_links"] and "deploymentBase" not in d["_links"]' "spec: canceled action gone from poll"

    # -- failure
    req POST "$C/deployment" "{\"controllerId\":\"$DEV\",\"actionId\":9,\"artifacts\":[{\"path\":\"$WORK/update-bad.bin\"}],\"download\":\"forced\",\"update\":\"forced\",\"version\":\"2.0.0\",\"links\":[\"download\"]}"
    expect 200 "spec: control: add deployment 9 (download link only)"
    req POST "$U/$DEV/deploymentBase/9/feedback" '{"status":{"execution":"closed","result":{"finished":"failure"},"details":["hash mismatch"]}}' "${TOK[@]}"
    expect 200 "spec: feedback closed/failure"
    req GET "$U/$DEV" "" "${TOK[@]}"; check '"deploymentBase" not in d["_links"]' "spec: failed action not offered again"

    # -- server down
    req POST "$C/down" '{"seconds":1.5}'; expect 200 "spec: control: down 1.5 s"
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 503 "spec: poll while down"
    grep -qi '^retry-after:' "$WORK/hdr" || fail "no Retry-After"
    sleep 1.7
    req GET "$U/$DEV" "" "${TOK[@]}"; expect 200 "spec: poll after it came back"

    # -- what was recorded
    req GET "$C/log" ""; expect 200 "spec: control: read the request log"
    check '[ (r["body"]["status"]["execution"], r["body"]["status"]["result"].get("finished"), r["status"]) for r in d if r["path"].endswith("/deploymentBase/7/feedback") and r["status"] == 200] == [("download","none",200), ("downloaded","none",200), ("proceeding","none",200), ("closed","success",200)]' \
        "spec: the log has the exact accepted feedback sequence of action 7"
    check 'sum(1 for r in d if r.get("violation", {}).get("kind") == "request") == 4 and not any(r.get("violation", {}).get("kind") == "server" for r in d)' \
        "spec: 4 request violations recorded, no server-side (answer) violation"
    check 'all(set(r) >= {"seq","ts","method","path","body","status","auth"} for r in d)' "spec: every record has method, path, body, status"
    req GET "$C/state" ""; fixture spec-state-final
    [[ "$(wc -l < "$SD/requests.jsonl")" -ge 30 ]] || fail "requests.jsonl too short"
    ok "spec: requests.jsonl written ($(wc -l < "$SD/requests.jsonl") lines)"
    req POST "$C/shutdown" ''; expect 200 "spec: control: shutdown"
    wait "$SPEC_PID" || true; SPEC_PID=""
}

[[ "$ONLY" == spec ]] || goosebit_story
[[ "$ONLY" == goosebit ]] || spec_story
echo "smoke: $CHECKS passed, 0 failed"
