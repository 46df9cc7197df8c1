#!/usr/bin/env python3
"""The whole legacy flow against a running `tope-updater serve`, every answer checked against
openapi.yaml and the envelope rules of hooks.py. Run by run.sh (needs the venv: requests,
schemathesis); the daemon must be fresh (empty state dir) and configured with
`confirm_required = true`, `download.allow_http = true`, `api.result_hold_s = 2` and
`reporter.url` on --sink-port.

    scenario.py --url http://127.0.0.1:PORT/api/v1.0 --openapi openapi.yaml \
        --packages DIR --target FILE --sink-port N

DIR holds app-1.0.0.zip, app-2.0.0.zip and app-3.0.0.zip, whose only module installs FILE
with the content "app VERSION\\n" (FILE does not exist before the first install). The script
serves DIR over HTTP (a `/hold/NAME` path sends half the file, then waits until released, so
that requests made during a download are deterministic) and receives the reports
(device-api's `POST /api/v1.0/ota/report`). Prints one line per check; exit 1 if any failed.
"""

import argparse
import hashlib
import json
import os
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests
import schemathesis

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hooks  # noqa: E402  (the envelope rules, shared with the schemathesis run)

FAILURES = []
HOLD = threading.Event()
REPORTS = []
REPORT_STAGES = {"idle", "downloading", "verifying", "toInstall", "installing", "rebooting", "success", "failed"}


def ok(what):
    print(f"ok    {what}", flush=True)


def fail(what):
    print(f"FAIL  {what}", flush=True)
    FAILURES.append(what)


def expect(cond, what):
    (ok if cond else fail)(what)
    return cond


class Fixture(BaseHTTPRequestHandler):
    """Packages for the daemon to download, and device-api's report endpoint."""

    packages = "."
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass

    def do_GET(self):
        hold = self.path.startswith("/hold/")
        name = os.path.basename(self.path)
        path = os.path.join(self.packages, name)
        if not os.path.isfile(path):
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = open(path, "rb").read()
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        try:
            if hold:
                self.wfile.write(data[: len(data) // 2])
                self.wfile.flush()
                HOLD.wait(60)
                self.wfile.write(data[len(data) // 2 :])
            else:
                self.wfile.write(data)
        except OSError:
            pass

    def do_POST(self):
        n = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(n)
        try:
            REPORTS.append(json.loads(raw))
        except ValueError:
            REPORTS.append(raw)
        body = json.dumps({"code": 200, "msg": "success", "data": {"status": "received"}}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


class Api:
    def __init__(self, url, openapi):
        self.url = url.rstrip("/")
        self.transactions = 0
        self.schema = schemathesis.openapi.from_path(openapi)

    def call(self, method, path, what, json_body=None, data=None, headers=None, params=None):
        """One request; the answer checked against openapi.yaml and the envelope rules."""
        r = requests.request(method, self.url + path, json=json_body, data=data, headers=headers, params=params, timeout=10)
        try:
            body = r.json()
        except ValueError:
            body = None
        problems = []
        if r.status_code != 200:
            problems.append(f"HTTP {r.status_code}")
        if not isinstance(body, dict):
            problems.append(f"body not a JSON object: {r.text[:200]!r}")
        else:
            try:
                self.schema[path][method.upper()].validate_response(r)
            except BaseException as e:  # schemathesis raises an exception group of failures
                subs = getattr(e, "exceptions", None) or [e]
                problems += [str(x).strip().splitlines()[0] + ": " + json.dumps(body)[:300] for x in subs]
            code, msg = body.get("code"), body.get("msg")
            if code == 200 and msg != "success":
                problems.append(f"code 200 with msg {msg!r}")
            elif code != 200 and isinstance(msg, str):
                try:
                    hooks.check_coded_msg(code, msg, mapped=path != "/progress")
                except AssertionError as e:
                    problems.append(str(e))
        if problems:
            fail(f"{method} {path} ({what}): " + "; ".join(problems))
            return body if isinstance(body, dict) else {}
        return body

    def newest_tx(self):
        h = self.call("GET", "/history", "newest", params={"limit": 1}).get("data") or []
        return h[0].get("id") if h else 0

    def not_stale(self, before, command, stage):
        """Right after a command was accepted, /progress must not still show the previous
        result: the GUI would take it for the outcome of the command it just sent."""
        first = self.progress(f"right after {command}")[3]
        if before.get("code") == 500 or (before.get("data") or {}).get("stage") not in (stage, "installing", "downloading", "verifying"):
            expect(first != before, f"right after {command} answered 200 ({stage}), GET /progress no longer shows the previous state {json.dumps(before)[:160]}")

    def command(self, method, path, body, what, before):
        """A command sent when /progress shows a result (nothing runs from the caller's point
        of view): 409 OPERATION_IN_PROGRESS then is a finding; retried once after 0.5 s so that
        the scenario goes on. Returns the answer and the /progress answer before it."""
        b = self.call(method, path, what, json_body=body)
        if b.get("code") == 409 and b.get("msg", "").startswith("OPERATION_IN_PROGRESS: "):
            fail(f"{method} {path} ({what}) when /progress showed {json.dumps(before.get('data') or before)[:120]}: "
                 f"409 OPERATION_IN_PROGRESS, the previous job had not let go yet (retrying in 0.5 s)")
            time.sleep(0.5)
            before = self.progress(f"before {what}")[3]
            b = self.call(method, path, what, json_body=body)
        return b, before

    def transaction(self, method, path, body, what, want):
        """A command that runs a transaction (install, rollback): 200 {status: installing},
        then the transaction ends (it appears in /history and /status has nothing in flight),
        then /progress shows its result."""
        prev = self.newest_tx()
        before = self.progress(f"before {what}")[3]
        b, before = self.command(method, path, body, what, before)
        if not expect(b.get("code") == 200 and b.get("data") == {"status": "installing"}, f"{method} {path} ({what}): 200 installing (got {b})"):
            return None
        self.transactions += 1
        self.not_stale(before, f"{method} {path}", "installing")
        deadline = time.time() + 60
        seen = []
        while time.time() < deadline:
            stage, _, error, _ = self.progress(what)
            if not seen or seen[-1] != stage:
                seen.append(stage)
            st = self.call("GET", "/status", what).get("data") or {}
            if self.newest_tx() > prev and st.get("in_flight") is None:
                break
            time.sleep(0.05)
        else:
            fail(f"{what}: the transaction did not end within 60 s (stages seen {seen})")
            return None
        stage, _, error, _, seen2 = self.wait_stage({"success", "failed"}, what, timeout=5)
        return expect(stage == want, f"{what}: {want} (stages seen {seen + seen2}, error {error!r})")

    def progress(self, what="poll"):
        b = self.call("GET", "/progress", what)
        if b.get("code") == 200:
            return b["data"]["stage"], b["data"]["progress"], b["data"]["error"], b
        return b.get("stage"), b.get("progress"), b.get("msg"), b

    def wait_stage(self, stages, what, timeout=60):
        seen = []
        deadline = time.time() + timeout
        while time.time() < deadline:
            stage, progress, error, body = self.progress(what)
            if not seen or seen[-1] != stage:
                seen.append(stage)
            if stage in stages:
                return stage, progress, error, body, seen
            time.sleep(0.05)
        fail(f"{what}: stage {stages} not reached within {timeout} s (stages seen: {seen})")
        return None, None, None, {}, seen


def md5(path):
    return hashlib.md5(open(path, "rb").read()).hexdigest()


def read(path):
    try:
        return open(path).read()
    except FileNotFoundError:
        return None


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--openapi", required=True)
    ap.add_argument("--packages", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--sink-port", type=int, required=True)
    a = ap.parse_args()

    Fixture.packages = a.packages
    srv = ThreadingHTTPServer(("127.0.0.1", a.sink_port), Fixture)
    srv.daemon_threads = True
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    files = f"http://127.0.0.1:{a.sink_port}"
    api = Api(a.url, a.openapi)
    pkg = {v: os.path.join(a.packages, f"app-{v}.zip") for v in ("1.0.0", "2.0.0", "3.0.0")}

    def dl(version, url=None, md5sum=None, name=None):
        p = pkg[version]
        return {
            "version": version,
            "package_url": url or f"{files}/app-{version}.zip",
            "package_name": name or f"app-{version}.zip",
            "package_size": os.path.getsize(p),
            "package_md5": md5sum or md5(p),
        }

    print("-- fresh daemon")
    stage, progress, error, _ = api.progress("fresh")
    expect((stage, progress, error) == ("idle", 0, None), f"GET /progress: idle, 0, no error (got {stage}, {progress}, {error!r})")
    s = api.call("GET", "/status", "fresh").get("data") or {}
    expect(s.get("current") is None and s.get("generations") == [], f"GET /status: nothing installed (got {s})")
    h = api.call("GET", "/history", "fresh")
    expect(h.get("data") == [], f"GET /history: empty (got {h})")
    c = api.call("POST", "/confirm", "nothing")
    expect(c.get("data") == {"result": "nothing_to_confirm"}, f"POST /confirm: nothing_to_confirm (got {c})")
    r = api.call("POST", "/rollback", "nothing")
    expect(r.get("code") == 404 and r.get("msg", "").startswith("NOTHING_TO_ROLL_BACK: "), f"POST /rollback, nothing installed: 404 NOTHING_TO_ROLL_BACK (got {r})")
    u = api.call("POST", "/update", "nothing downloaded", json_body={"version": "1.0.0"})
    expect(u.get("code") == 409 and u.get("msg", "").startswith("DOWNLOAD_INCOMPLETE: "), f"POST /update, nothing downloaded: 409 DOWNLOAD_INCOMPLETE (got {u})")

    print("-- validation: code 400 VALIDATION_ERROR in the envelope, HTTP 200")
    good = dl("1.0.0")
    bad_downloads = {
        "md5 not hex": dict(good, package_md5="a1b2c3d4e5f6g7h8i9j0k1l2m3n4o5p6"),
        "md5 upper case": dict(good, package_md5=good["package_md5"].upper()),
        "md5 too short": dict(good, package_md5="abc"),
        "version not x.y.z": dict(good, version="1.2"),
        "package_size 0": dict(good, package_size=0),
        "package_size negative": dict(good, package_size=-5),
        "package_size a string": dict(good, package_size="100"),
        "ftp url": dict(good, package_url="ftp://127.0.0.1/app.zip"),
        "package_name with a slash": dict(good, package_name="../app.zip"),
        "package_name ..": dict(good, package_name=".."),
        "package_md5 missing": {k: v for k, v in good.items() if k != "package_md5"},
        "empty object": {},
    }
    for what, body in bad_downloads.items():
        b = api.call("POST", "/download", what, json_body=body)
        expect(b.get("code") == 400 and b.get("msg", "").startswith("VALIDATION_ERROR: "), f"POST /download, {what}: 400 (got {b})")
    for what, raw in {"not JSON": b"version=1.0.0", "a JSON array": b"[]", "no body": b"", "truncated JSON": b'{"version": "1.0'}.items():
        b = api.call("POST", "/download", what, data=raw, headers={"Content-Type": "application/json"})
        expect(b.get("code") == 400 and b.get("msg", "").startswith("VALIDATION_ERROR: "), f"POST /download, {what}: 400 (got {b})")
    for what, body in {"version not x.y.z": {"version": "v1"}, "version a number": {"version": 1}, "no version": {}}.items():
        b = api.call("POST", "/update", what, json_body=body)
        expect(b.get("code") == 400 and b.get("msg", "").startswith("VALIDATION_ERROR: "), f"POST /update, {what}: 400 (got {b})")
    for what, body in {"to sideways": {"to": "sideways"}, "to a number": {"to": 3}, "to 1.2": {"to": "1.2"}, "an array": []}.items():
        b = api.call("POST", "/rollback", what, json_body=body)
        expect(b.get("code") == 400 and b.get("msg", "").startswith("VALIDATION_ERROR: "), f"POST /rollback, {what}: 400 (got {b})")
    b = api.call("POST", "/rollback", "not JSON", data=b"to=factory", headers={"Content-Type": "application/json"})
    expect(b.get("code") == 400, f"POST /rollback, not JSON: 400 (got {b})")
    big = json.dumps(dict(good, package_name="a" * (3 << 20))).encode()
    b = api.call("POST", "/download", "a 3 MiB body", data=big, headers={"Content-Type": "application/json"})
    expect(b.get("code") == 400 and b.get("msg", "").startswith("VALIDATION_ERROR: "), f"POST /download, a 3 MiB body: 400 VALIDATION_ERROR in the envelope (got {str(b)[:200]})")
    stage, *_ = api.progress("after rejected requests")
    expect(stage == "idle", f"rejected requests change nothing: stage idle (got {stage})")

    print("-- download 1.0.0 (held half way), requests while it runs")
    HOLD.clear()
    before = api.progress("before download")[3]
    b = api.call("POST", "/download", "1.0.0 held", json_body=dl("1.0.0", url=f"{files}/hold/app-1.0.0.zip"))
    expect(b.get("code") == 200 and b.get("data") == {"status": "downloading"}, f"POST /download: 200 downloading (got {b})")
    api.not_stale(before, "POST /download", "downloading")
    stage, progress, *_ = api.wait_stage({"downloading"}, "download started", timeout=10)
    expect(stage == "downloading", f"GET /progress: downloading ({progress} %)")
    time.sleep(0.3)
    for method, path, body, what in [
        ("POST", "/update", {"version": "1.0.0"}, "update"),
        ("POST", "/confirm", None, "confirm"),
        ("POST", "/rollback", None, "rollback"),
        ("POST", "/download", dl("2.0.0"), "another download"),
    ]:
        b = api.call(method, path, f"{what} while downloading", json_body=body)
        expect(b.get("code") == 409 and b.get("msg", "").startswith("OPERATION_IN_PROGRESS: "), f"{method} {path} during a download: 409 OPERATION_IN_PROGRESS (got {b})")
    s = api.call("GET", "/status", "while downloading")
    expect(s.get("code") == 200, "GET /status answers during a download")
    HOLD.set()
    stage, progress, error, _, seen = api.wait_stage({"toInstall", "failed"}, "download 1.0.0")
    expect(stage == "toInstall" and progress == 100 and error is None, f"download 1.0.0: toInstall, 100 (stages seen {seen}, error {error!r})")
    expect(set(seen) <= {"downloading", "verifying", "toInstall"}, f"download stages in contract order: {seen}")

    print("-- install 1.0.0")
    b = api.call("POST", "/update", "wrong version", json_body={"version": "9.9.9"})
    expect(b.get("code") not in (None, 200), f"POST /update with another version than downloaded: refused (got {b})")
    api.transaction("POST", "/update", {"version": "1.0.0"}, "install 1.0.0", "success")
    expect(read(a.target) == "app 1.0.0\n", f"the target file holds 1.0.0 (got {read(a.target)!r})")
    s = api.call("GET", "/status", "after 1.0.0").get("data") or {}
    expect((s.get("current") or {}).get("version") == "1.0.0", f"GET /status: current 1.0.0 (got {s.get('current')})")
    expect((s.get("trial") or {}).get("version") == "1.0.0", f"GET /status: trial 1.0.0 awaiting confirmation (got {s.get('trial')})")
    c = api.call("POST", "/confirm", "trial 1.0.0").get("data") or {}
    expect(c.get("result") == "confirmed" and c.get("version") == "1.0.0", f"POST /confirm: confirmed 1.0.0 (got {c})")
    c = api.call("POST", "/confirm", "again").get("data") or {}
    expect(c == {"result": "nothing_to_confirm"}, f"POST /confirm again: nothing_to_confirm (got {c})")

    def install(v):
        print(f"-- download and install {v}")
        before = api.progress("before download")[3]
        b, before = api.command("POST", "/download", dl(v), v, before)
        expect(b.get("code") == 200, f"POST /download {v}: 200 (got {b})")
        api.not_stale(before, "POST /download", "downloading")
        stage, progress, error, _, seen = api.wait_stage({"toInstall", "failed"}, f"download {v}")
        expect(stage == "toInstall", f"download {v}: toInstall (stages seen {seen}, error {error!r})")
        api.transaction("POST", "/update", {"version": v}, f"install {v}", "success")
        expect(read(a.target) == f"app {v}\n", f"the target file holds {v} (got {read(a.target)!r})")

    install("2.0.0")
    install("3.0.0")

    print("-- a download with the wrong MD5 (held), rollback and confirm while it runs")
    HOLD.clear()
    wrong = "0" * 32
    before = api.progress("before download")[3]
    b = api.call("POST", "/download", "wrong md5", json_body=dl("1.0.0", url=f"{files}/hold/app-1.0.0.zip", md5sum=wrong, name="app-1.0.0-again.zip"))
    expect(b.get("code") == 200, f"POST /download (wrong md5): 200, checked after the download (got {b})")
    api.not_stale(before, "POST /download", "downloading")
    api.wait_stage({"downloading"}, "wrong-md5 download started", timeout=10)
    time.sleep(0.3)
    for path, body in (("/rollback", {}), ("/rollback", {"to": "factory"}), ("/rollback", {"to": "9.9.9"}), ("/confirm", None)):
        b = api.call("POST", path, "while downloading", json_body=body)
        expect(b.get("code") == 409 and b.get("msg", "").startswith("OPERATION_IN_PROGRESS: "), f"POST {path} {body} during a download: 409 OPERATION_IN_PROGRESS (got {b})")
    HOLD.set()
    stage, progress, error, body, seen = api.wait_stage({"failed", "toInstall"}, "wrong-md5 download")
    expect(stage == "failed" and isinstance(error, str) and error.startswith("MD5_MISMATCH: "), f"wrong md5: stage failed, MD5_MISMATCH (got {stage}, {error!r}, stages seen {seen})")
    data = body.get("data") or {}
    expect(
        body.get("code") == 500 and data.get("stage") == "failed" and data.get("message") == body.get("msg") and "error" not in data,
        f"GET /progress failed shape: code 500, stage/progress at the root, data for the GUI without error (got {body})",
    )
    b = api.call("POST", "/update", "after md5 mismatch", json_body={"version": "1.0.0"})
    expect(b.get("code") not in (None, 200), f"POST /update after an MD5 mismatch: refused (got {b})")
    expect(read(a.target) == "app 3.0.0\n", "the target file still holds 3.0.0")

    print("-- rollbacks")
    api.transaction("POST", "/rollback", None, "rollback to previous (no body)", "success")
    expect(read(a.target) == "app 2.0.0\n", f"the target file holds 2.0.0 (got {read(a.target)!r})")
    s = api.call("GET", "/status", "after rollback").get("data") or {}
    expect((s.get("current") or {}).get("version") == "2.0.0", f"GET /status: current 2.0.0 (got {s.get('current')})")
    expect("Rollback" in ((s.get("last") or {}).get("kind") or {}), f"GET /status: last is the rollback (got {(s.get('last') or {}).get('kind')})")

    api.transaction("POST", "/rollback", {"to": "1.0.0"}, "rollback to 1.0.0 (a kept generation, by version)", "success")
    expect(read(a.target) == "app 1.0.0\n", f"the target file holds 1.0.0 (got {read(a.target)!r})")

    for to in ("7.7.7", "3.0.0"):
        b = api.call("POST", "/rollback", f"to {to}", json_body={"to": to})
        expect(b.get("code") == 404 and b.get("msg", "").startswith("NOTHING_TO_ROLL_BACK: "), f"POST /rollback to {to} (not a kept generation): 404 NOTHING_TO_ROLL_BACK (got {b})")

    api.transaction("POST", "/rollback", {"to": "factory"}, "rollback to factory", "success")
    expect(read(a.target) is None, f"rollback to factory: the target file is gone (got {read(a.target)!r})")
    s = api.call("GET", "/status", "after factory").get("data") or {}
    expect(s.get("current") is None, f"GET /status after the factory rollback: current null (got {s.get('current')})")
    b = api.call("POST", "/rollback", "at factory", json_body={})
    expect(b.get("code") == 404 and b.get("msg", "").startswith("NOTHING_TO_ROLL_BACK: "), f"POST /rollback at the factory state: 404 NOTHING_TO_ROLL_BACK (got {b})")

    # Something to roll back to for the generated requests that follow (run.sh).
    install("1.0.0")
    install("2.0.0")

    print("-- result hold, history, router")
    stage, *_ = api.wait_stage({"idle"}, "success returns to idle after result_hold_s", timeout=15)
    expect(stage == "idle", "stage success returns to idle after result_hold_s")
    h = api.call("GET", "/history", "all").get("data") or []
    ids = [t.get("id") for t in h]
    expect(len(h) == api.transactions and ids == sorted(ids, reverse=True), f"GET /history: the {api.transactions} transactions, newest first (ids {ids})")
    h2 = api.call("GET", "/history", "limit=2", params={"limit": 2}).get("data") or []
    expect([t.get("id") for t in h2] == ids[:2], f"GET /history?limit=2: the 2 newest (got ids {[t.get('id') for t in h2]})")
    r = requests.get(a.url.rstrip("/") + "/no-such-endpoint", timeout=10)
    expect(r.status_code == 404, f"unknown path: HTTP 404 (got HTTP {r.status_code})")
    r = requests.put(a.url.rstrip("/") + "/progress", timeout=10)
    expect(r.status_code == 405 and "GET" in r.headers.get("Allow", ""), f"PUT /progress: HTTP 405, Allow: GET (got HTTP {r.status_code}, Allow {r.headers.get('Allow')!r})")

    print("-- reports received by the device-api stand-in (callback contract)")
    deadline = time.time() + 10
    while time.time() < deadline and not any(isinstance(x, dict) and x.get("stage") == "success" for x in REPORTS[-3:]):
        time.sleep(0.2)
    bad = [
        x for x in REPORTS
        if not isinstance(x, dict)
        or not {"stage", "progress", "message", "error"} <= set(x)
        or x.get("stage") not in REPORT_STAGES
        or type(x.get("progress")) is not int or not 0 <= x["progress"] <= 100
        or not isinstance(x.get("message"), str)
        or not (x.get("error") is None or isinstance(x.get("error"), str))
        or (x.get("stage") == "failed") != (x.get("error") is not None)
    ]
    stages = [x.get("stage") for x in REPORTS if isinstance(x, dict)]
    expect(REPORTS and not bad, f"{len(REPORTS)} reports, each a valid ReportPayload (invalid: {bad[:3]})")
    expect("success" in stages and "failed" in stages and "toInstall" in stages, f"reports include toInstall, success and failed (stages: {sorted(set(stages))})")

    srv.shutdown()
    print()
    if FAILURES:
        print(f"scenario: {len(FAILURES)} check(s) failed", file=sys.stderr)
        for f in FAILURES:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print("scenario: every check passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
