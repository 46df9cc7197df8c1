#!/usr/bin/env bash
# Run gooseBit (a real hawkBit-DDI server from PyPI) headless on 127.0.0.1 for tests.
#
#   goosebit.sh venv                      create/refresh the cached venv (idempotent)
#   goosebit.sh start DIR                 start a server whose DB/artifacts/logs live in DIR
#   goosebit.sh stop DIR                  stop it
#   goosebit.sh seed DIR ARGS...          goosebit_ctl.py ARGS (e.g. assign --device D --file F --version V)
#   goosebit.sh show DIR ARGS...          goosebit_ctl.py ARGS (e.g. device --device D)
#   goosebit.sh ctl DIR ARGS...           same, any subcommand
#   goosebit.sh python ARGS...            the venv's python (for spec_server.py)
#
# Environment:
#   DDI_VENV            venv location (default <repo>/target/ddi-venv)
#   DDI_NICE            niceness of the server and its helpers (default 19: beside other work;
#                       the Rust tests set 0, or a loaded machine starves the server past
#                       their patience)
#   GOOSEBIT_POLL_TIME  polling.sleep gooseBit gives registered devices (its default 00:01:00)
#   GOOSEBIT_DEVICE_AUTH__ENABLE=true GOOSEBIT_DEVICE_AUTH__MODE=setup|lax|strict
#                       device TargetToken checking (off by default in gooseBit); any other
#                       GOOSEBIT_* variable is passed through as well.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
VENV="${DDI_VENV:-$REPO/target/ddi-venv}"
PY="$VENV/bin/python"
GOOSEBIT_VERSION=0.2.12
# Everything the DDI test helpers need, pinned loosely; the marker records the set.
PIP_SET="goosebit==$GOOSEBIT_VERSION jsonschema>=4.18"
MARKER="$VENV/.ddi-venv-ok"
NICE="${DDI_NICE:-19}"

die() { echo "goosebit.sh: $*" >&2; exit 1; }

cmd_venv() {
    if [[ -x "$PY" && -f "$MARKER" && "$(cat "$MARKER")" == "$PIP_SET" ]]; then
        return 0
    fi
    mkdir -p "$(dirname "$VENV")"
    [[ -x "$PY" ]] || nice -n 19 python3 -m venv "$VENV"
    # shellcheck disable=SC2086
    nice -n 19 "$PY" -m pip install -q --disable-pip-version-check $PIP_SET >&2
    "$PY" -c "import importlib.metadata as m, jsonschema; assert m.version('goosebit') == '$GOOSEBIT_VERSION'"
    echo "$PIP_SET" > "$MARKER"
}

abs_dir() { mkdir -p "$1" && (cd "$1" && pwd); }

free_port() {
    "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

# The environment gooseBit reads. It looks for a config in $GOOSEBIT_SETTINGS, ./goosebit.yaml,
# <site-packages>/goosebit.yaml and /etc/goosebit.yaml (first found wins, env vars override it):
# we point GOOSEBIT_SETTINGS at DIR/goosebit.yaml and run in DIR so no stray file is picked up.
goosebit_env() {
    local dir="$1"
    export GOOSEBIT_SETTINGS="$dir/goosebit.yaml"
    export GOOSEBIT_DB_URI="sqlite://$dir/db.sqlite3"
    export GOOSEBIT_ARTIFACTS_DIR="$dir/artifacts"
    # Without a fixed key gooseBit makes a new one per process: API logins would not survive a restart.
    if [[ -s "$dir/secret_key" ]]; then export GOOSEBIT_SECRET_KEY="$(cat "$dir/secret_key")"; fi
    export GOOSEBIT_PORT="${GOOSEBIT_PORT:-0}"
    export PYTHONDONTWRITEBYTECODE=1
    # gooseBit's logging.config.dictConfig() disables loggers configured before it, i.e. uvicorn's
    # access log: keep them, so DIR/server.log has one line per request (method, path, status).
    export GOOSEBIT_LOGGING='{"version": 1, "disable_existing_loggers": false,
      "formatters": {"simple": {"format": "%(asctime)s - %(name)s - %(levelname)s - %(message)s"}},
      "handlers": {"console": {"class": "logging.StreamHandler", "formatter": "simple", "level": "DEBUG"}},
      "loggers": {"tortoise": {"level": "WARNING"}, "aiosqlite": {"level": "WARNING"}, "multipart": {"level": "INFO"}},
      "root": {"level": "INFO", "handlers": ["console"]}}'
}

cmd_start() {
    local dir; dir="$(abs_dir "${1:?usage: start DIR}")"
    cmd_venv
    if [[ -f "$dir/server.env" ]]; then
        # shellcheck disable=SC1091
        local pid; pid="$(. "$dir/server.env"; echo "${pid:-}")"
        if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
            die "already running in $dir (pid $pid)"
        fi
    fi
    mkdir -p "$dir/artifacts"
    [[ -s "$dir/secret_key" ]] || "$PY" -c 'import secrets; print(secrets.token_hex(32))' > "$dir/secret_key"
    [[ -f "$dir/goosebit.yaml" ]] || printf '# written by tests/ddi/goosebit.sh; env GOOSEBIT_* overrides\ntrack_device_ip: true\n' > "$dir/goosebit.yaml"
    goosebit_env "$dir"
    # Schema through tortoise (gooseBit itself only checks for it and refuses to serve without),
    # plus an API user for goosebit_ctl.py (assignments must go through the running server).
    (cd "$dir" && nice -n "$NICE" "$PY" "$HERE/goosebit_ctl.py" --dir "$dir" init >/dev/null)

    local port pid url attempt
    for attempt in 1 2 3; do
        port="$(free_port)"
        url="http://127.0.0.1:$port"
        (cd "$dir" && exec setsid nice -n "$NICE" "$VENV/bin/uvicorn" goosebit:app --host 127.0.0.1 --port "$port" \
            --no-server-header >>"$dir/server.log" 2>&1 < /dev/null) &
        pid=$!
        local i code
        for i in $(seq 1 150); do
            if ! kill -0 "$pid" 2>/dev/null; then break; fi
            code="$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$url/login" || true)"
            # Ours, not another gooseBit that took the port between free_port and the bind
            # (its answer would look the same): the listening socket must be this pid's.
            if [[ "$code" =~ ^[23] ]] && ss -ltnpH "sport = :$port" | grep -q "pid=$pid,"; then
                printf 'url=%s\npid=%s\n' "$url" "$pid" > "$dir/server.env"
                echo "url=$url pid=$pid"
                return 0
            fi
            sleep 0.2
        done
        kill "$pid" 2>/dev/null || true
        echo "goosebit.sh: start attempt $attempt failed (port $port), see $dir/server.log" >&2
    done
    tail -n 30 "$dir/server.log" >&2 || true
    die "gooseBit did not come up"
}

cmd_stop() {
    local dir; dir="$(abs_dir "${1:?usage: stop DIR}")"
    [[ -f "$dir/server.env" ]] || { echo "goosebit.sh: nothing running in $dir" >&2; return 0; }
    local pid; pid="$(. "$dir/server.env"; echo "${pid:-}")"
    if [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        local i
        for i in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" || true
    fi
    sed -i 's/^pid=/stopped_pid=/' "$dir/server.env"
}

cmd_ctl() {
    local dir; dir="$(abs_dir "${1:?usage: $0 seed|show|ctl DIR ARGS...}")"; shift
    [[ -x "$PY" ]] || die "no venv at $VENV: run '$0 venv'"
    goosebit_env "$dir"
    (cd "$dir" && "$PY" "$HERE/goosebit_ctl.py" --dir "$dir" "$@")
}

sub="${1:-}"; shift || true
case "$sub" in
    venv) cmd_venv; echo "venv=$VENV" ;;
    start) cmd_start "$@" ;;
    stop) cmd_stop "$@" ;;
    seed|show|ctl) cmd_ctl "$@" ;;
    python) exec "$PY" "$@" ;;
    *) sed -n '2,20p' "$0" >&2; exit 2 ;;
esac
