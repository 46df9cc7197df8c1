#!/usr/bin/env python3
"""A small spec-driven hawkBit DDI server for tests (stdlib http.server + jsonschema).

It covers what gooseBit lacks: `download` and `download-http` (+ `md5sum[-http]`) links, sha1/md5/
sha256 hashes, `maintenanceWindow` (switchable at runtime), download/update = skip|attempt|forced,
`cancelAction`, `installedBase`, `configData`, TargetToken/GatewayToken checking, Range downloads.

Every request body is validated against the schemas of hawkbit-ddi-openapi.json; a body that does
not conform gets 400 (ExceptionInfo) and is recorded as a violation. Every JSON answer is validated
too (templates at startup; each real answer before it is sent: a failure there is a 500 and a
"server" violation). Every DDI request is appended to a JSONL log: {seq, ts, method, path, query,
auth, range, body, status, violation}.

Run:   spec_server.py serve --state-dir DIR [--tenant DEFAULT] [--sleep 00:00:05]
                            [--target-token DEV=TOKEN ...] [--gateway-token TOKEN] [--no-auth]
       prints `url=http://127.0.0.1:PORT pid=PID` (also in DIR/server.env); log in DIR/requests.jsonl

Control (JSON over HTTP on the same port, never recorded in the DDI log; see README.md):
  POST /_ctl/deployment   {"controllerId", "actionId", "artifacts": [{"path", "filename"?}],
                           "download": "forced", "update": "forced", "maintenanceWindow": null|"available"|"unavailable",
                           "name", "version", "part", "links": ["download", "download-http", "md5sum", "md5sum-http"]}
  POST /_ctl/maintenance  {"actionId", "window": "available"|"unavailable"|null}
  POST /_ctl/cancel       {"actionId"}                    server asks the device to cancel that action
  POST /_ctl/withdraw     {"actionId", "answer": 404|"null"|null}   deploymentBase answers so while offered
  POST /_ctl/down         {"seconds": N} | {"down": true|false}   DDI requests get 503 meanwhile
  POST /_ctl/throttle     {"bytesPerSecond": N}             artifact bodies sent at about N B/s (0: unthrottled)
  POST /_ctl/controller   {"controllerId", "sleep"?, "requestConfigData"?: true, "targetToken"?}
  POST /_ctl/auth         {"required": bool, "gatewayToken": str|null, "targetTokens": {dev: token}}
  GET  /_ctl/log[?since=SEQ]   recorded requests;  GET /_ctl/violations;  GET /_ctl/state
  POST /_ctl/shutdown
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import os
import re
import sys
import threading
import time
import traceback
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

import jsonschema
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT7

HERE = Path(__file__).resolve().parent
SPEC_CANDIDATES = [
    os.environ.get("DDI_OPENAPI", ""),
    str(HERE.parent.parent.parent / "shared" / "contracts" / "hawkbit-ddi-openapi.json"),  # /work/shared beside worktrees
    "/work/shared/contracts/hawkbit-ddi-openapi.json",
    str(HERE / "hawkbit-ddi-openapi.json"),
]
SPEC_URI = "urn:hawkbit-ddi-openapi"

def find_spec() -> Path:
    for c in SPEC_CANDIDATES:
        if c and Path(c).is_file():
            return Path(c)
    raise SystemExit("spec_server: hawkbit-ddi-openapi.json not found (set DDI_OPENAPI)")


class Spec:
    """The OpenAPI document as a JSON-Schema registry. OpenAPI 3.0 schemas are close enough to
    draft 7 for what the DDI spec uses (type, required, enum, properties, items, $ref,
    additionalProperties, pattern). One fix-up: DdiPolling.sleep carries `"pattern": "HH:MM:SS"`,
    which as a regex would only match that literal text; it is replaced by ^\\d{2}:\\d{2}:\\d{2}$."""

    def __init__(self, path: Path):
        doc = json.loads(path.read_text())
        self.path = path
        sleep = doc["components"]["schemas"]["DdiPolling"]["properties"]["sleep"]
        if sleep.get("pattern") == "HH:MM:SS":
            sleep["pattern"] = r"^[0-9]{2}:[0-5][0-9]:[0-5][0-9]$"
        self.doc = doc
        self.registry = Registry().with_resource(SPEC_URI, Resource.from_contents(doc, default_specification=DRAFT7))
        self._validators: dict[str, jsonschema.Draft7Validator] = {}

    def validator(self, name: str) -> jsonschema.Draft7Validator:
        if name not in self._validators:
            if name not in self.doc["components"]["schemas"]:
                raise KeyError(name)
            self._validators[name] = jsonschema.Draft7Validator(
                {"$ref": f"{SPEC_URI}#/components/schemas/{name}"}, registry=self.registry
            )
        return self._validators[name]

    def errors(self, name: str, instance: object) -> list[str]:
        return [
            f"{'/'.join(str(p) for p in e.absolute_path) or '<root>'}: {e.message}"
            for e in sorted(self.validator(name).iter_errors(instance), key=lambda e: list(e.absolute_path))
        ]

    def request_schema(self, method: str, template: str) -> str | None:
        op = self.doc["paths"][template].get(method.lower(), {})
        content = op.get("requestBody", {}).get("content", {})
        ref = content.get("application/json", {}).get("schema", {}).get("$ref")
        return ref.rsplit("/", 1)[1] if ref else None

    def response_schema(self, method: str, template: str, status: int) -> tuple[str | None, bool]:
        """(schema name or None, whether a JSON body is expected at all)."""
        op = self.doc["paths"][template].get(method.lower(), {})
        resp = op.get("responses", {}).get(str(status), {})
        content = resp.get("content", {})
        for ctype in ("application/hal+json", "application/json"):
            if ctype in content:
                schema = content[ctype].get("schema", {})
                ref = schema.get("$ref")
                if ref:
                    return ref.rsplit("/", 1)[1], True
                if schema.get("type") == "array":
                    iref = schema.get("items", {}).get("$ref")
                    return (f"[]{iref.rsplit('/', 1)[1]}" if iref else None), True
                return None, True
        return None, False


def path_templates(spec: Spec) -> list[tuple[re.Pattern[str], str]]:
    out = []
    for t in spec.doc["paths"]:
        rx = re.escape(t)
        rx = rx.replace(r"\{fileName\}\.MD5SUM", r"(?P<fileName>[^/]+)\.MD5SUM")
        rx = re.sub(r"\\\{(\w+)\\\}", lambda m: f"(?P<{m.group(1)}>[^/]+)", rx)
        out.append((re.compile(f"^{rx}$"), t))
    # the .MD5SUM route must win over the plain {fileName} one
    out.sort(key=lambda p: (not p[1].endswith(".MD5SUM"), -len(p[1])))
    return out


class Artifact:
    def __init__(self, path: Path, filename: str | None):
        self.path = path.resolve()
        self.filename = filename or self.path.name
        data = self.path.read_bytes()
        self.size = len(data)
        self.sha1 = hashlib.sha1(data).hexdigest()
        self.md5 = hashlib.md5(data).hexdigest()
        self.sha256 = hashlib.sha256(data).hexdigest()


class Action:
    def __init__(self, cfg: dict, module_id: int):
        self.id = str(cfg["actionId"])
        self.controller = cfg["controllerId"]
        self.download = cfg.get("download", "forced")
        self.update = cfg.get("update", "forced")
        self.maintenance = cfg.get("maintenanceWindow")  # None: field omitted
        self.name = cfg.get("name", "tope-image")
        self.version = cfg.get("version", "1.0.0")
        self.part = cfg.get("part", "os")
        self.links = cfg.get("links", ["download", "download-http", "md5sum", "md5sum-http"])
        self.module_id = module_id
        self.artifacts = [Artifact(Path(a["path"]), a.get("filename")) for a in cfg.get("artifacts", [])]
        self.metadata = cfg.get("metadata", [])
        self.status = "RUNNING"  # RUNNING | CANCELING | CANCELED | FINISHED | ERROR
        self.active = True
        self.cancel_requested = False
        # While set, GET deploymentBase answers 404 (hawkBit: the assignment is gone) or `null`
        # (gooseBit 0.2.12 when the assignment changed between the poll and the fetch); the
        # poll still offers the action.
        self.withdrawn: int | str | None = None
        self.feedback: list[dict] = []
        self.cancel_feedback: list[dict] = []
        self.messages: list[str] = ["Assignment initiated by test"]

    def effective_update(self) -> str:
        # hawkBit: outside the maintenance window the device is told to download only.
        if self.maintenance == "unavailable":
            return "skip"
        return self.update


class State:
    def __init__(self, args: argparse.Namespace, spec: Spec):
        self.lock = threading.RLock()
        self.spec = spec
        self.tenant = args.tenant
        self.default_sleep = args.sleep
        self.state_dir = Path(args.state_dir).resolve()
        self.log_path = self.state_dir / "requests.jsonl"
        self.seq = 0
        self.auth_required = not args.no_auth
        self.gateway_token = args.gateway_token
        self.target_tokens: dict[str, str] = {}
        for item in args.target_token or []:
            dev, _, tok = item.partition("=")
            self.target_tokens[dev] = tok
        self.controllers: dict[str, dict] = {}
        self.actions: dict[str, Action] = {}
        self.next_module = 1
        self.down_until = 0.0
        self.down_forever = False
        self.artifact_rate = 0  # bytes per second for artifact bodies; 0 = as fast as possible
        self.violations: list[dict] = []
        self.log_lock = threading.Lock()

    def controller(self, cid: str) -> dict:
        c = self.controllers.get(cid)
        if c is None:
            c = {
                "id": cid,
                "configData": None,
                "requestConfigData": True,
                "sleep": None,
                "installed": None,  # action id of the last closed/success action
                "installedVersion": None,
                "polls": 0,
            }
            self.controllers[cid] = c
        return c

    def open_action(self, cid: str) -> Action | None:
        for a in self.actions.values():
            if a.controller == cid and a.active:
                return a
        return None

    def record(self, entry: dict) -> int:
        with self.log_lock:
            self.seq += 1
            entry = {"seq": self.seq, "ts": round(time.time(), 3), **entry}
            with self.log_path.open("a") as f:
                f.write(json.dumps(entry, sort_keys=True) + "\n")
            return self.seq

    def is_down(self) -> bool:
        return self.down_forever or time.time() < self.down_until


class Handler(BaseHTTPRequestHandler):
    server_version = "tope-ddi-spec-server/1"
    protocol_version = "HTTP/1.1"
    state: State
    templates: list[tuple[re.Pattern[str], str]]

    def log_message(self, fmt: str, *args: object) -> None:  # quiet; the JSONL log is the record
        if os.environ.get("DDI_SPEC_VERBOSE"):
            super().log_message(fmt, *args)

    # ---- plumbing -------------------------------------------------------------------------
    def base_url(self) -> str:
        host = self.headers.get("Host") or f"127.0.0.1:{self.server.server_address[1]}"
        return f"http://{host}"

    def read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n > 0 else b""

    def send_json(self, status: int, obj: object, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/hal+json" if status == 200 else "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def send_empty(self, status: int, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Length", "0")
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()

    def do_GET(self) -> None:
        self.dispatch()

    def do_HEAD(self) -> None:
        self.dispatch()

    def do_POST(self) -> None:
        self.dispatch()

    def do_PUT(self) -> None:
        self.dispatch()

    def do_DELETE(self) -> None:
        self.dispatch()

    def dispatch(self) -> None:
        parts = urlsplit(self.path)
        path = unquote(parts.path)
        query = parse_qs(parts.query)
        raw = self.read_body() if self.command in ("POST", "PUT") else b""
        if path.startswith("/_ctl/"):
            try:
                self.control(path, query, raw)
            except Exception as e:  # a test's mistake: say so
                traceback.print_exc()
                self.send_json(400, {"error": repr(e)})
            return
        self.ddi(path, query, raw)

    # ---- DDI ------------------------------------------------------------------------------
    def ddi(self, path: str, query: dict, raw: bytes) -> None:
        st = self.state
        entry: dict = {
            "method": self.command,
            "path": path,
            "query": {k: v[0] for k, v in query.items()},
            "auth": self.headers.get("Authorization"),
            "range": self.headers.get("Range"),
            "body": None,
        }
        if raw:
            try:
                entry["body"] = json.loads(raw)
            except ValueError:
                entry["body_raw"] = raw.decode(errors="replace")
        try:
            status, violation = self.ddi_inner(path, raw, entry)
        except (BrokenPipeError, ConnectionResetError):
            # The device went away before the answer was written (a test killed it): nginx's
            # 499, and no violation on either side. The request itself is recorded as handled.
            status, violation = 499, None
        except Exception as e:
            traceback.print_exc()
            status, violation = 500, {"kind": "server", "error": repr(e)}
            try:
                self.send_json(500, {"exceptionClass": type(e).__name__, "message": str(e)})
            except Exception:
                pass
        entry["status"] = status
        if violation:
            entry["violation"] = violation
            with st.lock:
                st.violations.append({**violation, "method": self.command, "path": path})
        st.record(entry)

    def bad_request(self, msg: str, errors: list[str]) -> tuple[int, dict]:
        body = {
            "exceptionClass": "org.springframework.http.converter.HttpMessageNotReadableException",
            "errorCode": "hawkbit.server.error.rest.body.notReadable",
            "message": f"{msg}: {'; '.join(errors)}",
        }
        self.send_json(400, body)
        return 400, {"kind": "request", "errors": errors}

    def answer(self, method: str, template: str, status: int, obj: object) -> tuple[int, dict | None]:
        """Send a JSON answer after validating it against the spec's response schema."""
        name, _ = self.state.spec.response_schema(method, template, status)
        errors: list[str] = []
        if name and name.startswith("[]"):
            for i, item in enumerate(obj if isinstance(obj, list) else [obj]):
                errors += [f"[{i}] {e}" for e in self.state.spec.errors(name[2:], item)]
        elif name:
            errors = self.state.spec.errors(name, obj)
        if errors:
            self.send_json(500, {"exceptionClass": "SpecServerBug", "message": "; ".join(errors)})
            return 500, {"kind": "server", "schema": name, "errors": errors}
        self.send_json(status, obj)
        return status, None

    def check_auth(self, cid: str) -> bool:
        st = self.state
        if not st.auth_required:
            return True
        auth = self.headers.get("Authorization") or ""
        scheme, _, token = auth.partition(" ")
        token = token.strip()
        with st.lock:
            expected = st.target_tokens.get(cid)
            if scheme == "TargetToken" and expected is not None and token == expected:
                return True
            if scheme == "GatewayToken" and st.gateway_token is not None and token == st.gateway_token:
                return True
        return False

    def ddi_inner(self, path: str, raw: bytes, entry: dict) -> tuple[int, dict | None]:
        st = self.state
        if st.is_down():
            retry = max(1, int(st.down_until - time.time())) if not st.down_forever else 5
            self.send_json(503, {"message": "server down (test)"}, {"Retry-After": str(retry)})
            return 503, None
        match = None
        for rx, template in self.templates:
            m = rx.match(path)
            if m:
                match = (m.groupdict(), template)
                break
        if match is None:
            self.send_json(404, {"message": f"no DDI resource {path}"})
            return 404, None
        params, template = match
        methods = st.spec.doc["paths"][template]
        if self.command.lower() not in methods and not (self.command == "HEAD" and "get" in methods):
            self.send_json(405, {"message": f"{self.command} not allowed on {template}"})
            return 405, None
        if params.get("tenant") != st.tenant:
            self.send_json(404, {"message": f"unknown tenant {params.get('tenant')}"})
            return 404, None
        cid = params["controllerId"]
        if not self.check_auth(cid):
            self.send_json(401, {"message": "missing or wrong TargetToken/GatewayToken"})
            return 401, None
        entry["template"] = template

        body = None
        schema = st.spec.request_schema(self.command, template)
        if schema:
            ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
            if ctype not in ("application/json", "application/hal+json"):
                return self.bad_request("unsupported Content-Type", [f"Content-Type {ctype!r}, expected application/json"])
            try:
                body = json.loads(raw or b"null")
            except ValueError as e:
                return self.bad_request("body is not JSON", [str(e)])
            errors = st.spec.errors(schema, body)
            if errors:
                return self.bad_request(f"body does not conform to {schema}", errors)

        base = f"{self.base_url()}/{st.tenant}/controller/v1/{quote(cid)}"
        with st.lock:
            ctrl = st.controller(cid)
            key = (self.command if self.command != "HEAD" else "GET", template.split("/v1/{controllerId}", 1)[1])
            return self.route(key, template, params, body, ctrl, base)

    def route(self, key: tuple[str, str], template: str, params: dict, body: object, ctrl: dict, base: str) -> tuple[int, dict | None]:
        st = self.state
        method = key[0]
        if key == ("GET", ""):
            ctrl["polls"] += 1
            links: dict[str, dict] = {}
            act = st.open_action(ctrl["id"])
            if act is not None and act.cancel_requested:
                links["cancelAction"] = {"href": f"{base}/cancelAction/{act.id}"}
            elif act is not None:
                links["deploymentBase"] = {"href": f"{base}/deploymentBase/{act.id}?c={zlib.crc32(repr((act.id, act.maintenance, act.download, act.update)).encode()) % 100000}"}
            if ctrl["installed"] is not None:
                links["installedBase"] = {"href": f"{base}/installedBase/{ctrl['installed']}"}
            if ctrl["requestConfigData"]:
                links["configData"] = {"href": f"{base}/configData"}
            out = {"config": {"polling": {"sleep": ctrl["sleep"] or st.default_sleep}}, "_links": links}
            return self.answer(method, template, 200, out)

        if key == ("PUT", "/configData"):
            mode = body.get("mode", "merge")  # type: ignore[union-attr]
            data = body["data"]  # type: ignore[index]
            cur = ctrl["configData"] or {}
            if mode == "replace":
                cur = dict(data)
            elif mode == "remove":
                cur = {k: v for k, v in cur.items() if k not in data}
            else:
                cur = {**cur, **data}
            ctrl["configData"] = cur
            ctrl["requestConfigData"] = False
            self.send_empty(200)
            return 200, None

        if key == ("GET", "/deploymentBase/{actionId}") or key == ("GET", "/installedBase/{actionId}"):
            act = st.actions.get(params["actionId"])
            if act is None or act.controller != ctrl["id"]:
                self.send_json(404, {"message": f"no action {params['actionId']}"})
                return 404, None
            if key[1].startswith("/deploymentBase") and act.withdrawn == 404:
                self.send_json(404, {"message": f"action {act.id} was withdrawn"})
                return 404, None
            if key[1].startswith("/deploymentBase") and act.withdrawn == "null":
                self.send_json(200, None)
                return 200, None
            if key[1].startswith("/installedBase") and ctrl["installed"] != act.id:
                self.send_json(404, {"message": f"action {act.id} is not the installed one"})
                return 404, None
            return self.answer(method, template, 200, self.deployment_base(act, base))

        if key == ("POST", "/deploymentBase/{actionId}/feedback"):
            act = st.actions.get(params["actionId"])
            if act is None or act.controller != ctrl["id"]:
                self.send_json(404, {"message": f"no action {params['actionId']}"})
                return 404, None
            if not act.active:
                # hawkBit answers 410 Gone to feedback on an action that is no longer active.
                self.send_json(410, {"message": f"action {act.id} is closed"})
                return 410, None
            act.feedback.append(body)  # type: ignore[arg-type]
            status = body["status"]  # type: ignore[index]
            act.messages.extend(status.get("details", []) or [])
            execution, finished = status["execution"], status["result"]["finished"]
            if execution == "closed":
                act.active = False
                if finished == "success":
                    act.status = "FINISHED"
                    ctrl["installed"] = act.id
                    ctrl["installedVersion"] = act.version
                    ctrl["requestConfigData"] = True  # hawkBit asks for configData after a success
                else:
                    act.status = "ERROR"
            elif execution == "rejected":
                act.status = "WARNING"  # hawkBit keeps the action open after a rejection
            elif execution == "canceled":
                act.active = False
                act.status = "CANCELED"
            self.send_empty(200)
            return 200, None

        if key == ("GET", "/cancelAction/{actionId}"):
            act = st.actions.get(params["actionId"])
            if act is None or act.controller != ctrl["id"] or not act.cancel_requested:
                self.send_json(404, {"message": f"no cancel for action {params['actionId']}"})
                return 404, None
            return self.answer(method, template, 200, {"id": act.id, "cancelAction": {"stopId": act.id}})

        if key == ("POST", "/cancelAction/{actionId}/feedback"):
            act = st.actions.get(params["actionId"])
            if act is None or act.controller != ctrl["id"] or not act.cancel_requested:
                self.send_json(404, {"message": f"no cancel for action {params['actionId']}"})
                return 404, None
            act.cancel_feedback.append(body)  # type: ignore[arg-type]
            status = body["status"]  # type: ignore[index]
            execution, finished = status["execution"], status["result"]["finished"]
            if execution == "closed" and finished == "success":
                act.active = False
                act.status = "CANCELED"
            elif execution == "rejected" or (execution == "closed" and finished == "failure"):
                act.cancel_requested = False  # cancel refused: the update goes on
                act.status = "RUNNING"
            self.send_empty(200)
            return 200, None

        if key == ("PUT", "/installedBase"):
            ctrl["installedVersion"] = body  # type: ignore[assignment]
            self.send_empty(200)
            return 200, None

        if key[1].startswith("/softwaremodules/"):
            return self.artifact(key, template, params, ctrl)

        # confirmationBase & co: not modelled (auto-confirm is what hawkBit does by default)
        self.send_json(404, {"message": f"{template} not modelled by spec_server"})
        return 404, None

    def deployment_base(self, act: Action, base: str) -> dict:
        artifacts = []
        for a in act.artifacts:
            href = f"{base}/softwaremodules/{act.module_id}/artifacts/{quote(a.filename)}"
            all_links = {
                # hawkBit's `download` is the https one; this server has only http, so both point here.
                "download": {"href": href},
                "download-http": {"href": href},
                "md5sum": {"href": href + ".MD5SUM"},
                "md5sum-http": {"href": href + ".MD5SUM"},
            }
            artifacts.append(
                {
                    "filename": a.filename,
                    "hashes": {"sha1": a.sha1, "md5": a.md5, "sha256": a.sha256},
                    "size": a.size,
                    "_links": {k: v for k, v in all_links.items() if k in act.links},
                }
            )
        deployment: dict = {
            "download": act.download,
            "update": act.effective_update(),
            "chunks": [
                {
                    "part": act.part,
                    "version": act.version,
                    "name": act.name,
                    "artifacts": artifacts,
                    **({"metadata": act.metadata} if act.metadata else {}),
                }
            ],
        }
        if act.maintenance is not None:
            deployment["maintenanceWindow"] = act.maintenance
        return {
            "id": act.id,
            "deployment": deployment,
            "actionHistory": {"status": act.status, "messages": list(reversed(act.messages))[:10]},
        }

    def artifact(self, key: tuple[str, str], template: str, params: dict, ctrl: dict) -> tuple[int, dict | None]:
        st = self.state
        act = next(
            (a for a in st.actions.values() if str(a.module_id) == params["softwareModuleId"] and a.controller == ctrl["id"]),
            None,
        )
        if act is None:
            self.send_json(404, {"message": "no such software module for this controller"})
            return 404, None
        if key[1].endswith("/artifacts"):
            lst = [
                {
                    "filename": a.filename,
                    "hashes": {"sha1": a.sha1, "md5": a.md5, "sha256": a.sha256},
                    "size": a.size,
                }
                for a in act.artifacts
            ]
            return self.answer("GET", template, 200, lst)
        art = next((a for a in act.artifacts if a.filename == params["fileName"]), None)
        if art is None:
            self.send_json(404, {"message": f"no artifact {params['fileName']}"})
            return 404, None
        if template.endswith(".MD5SUM"):
            data = f"{art.md5}  {art.filename}\n".encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)
            return 200, None
        return self.send_file(art), None

    def send_file(self, art: Artifact) -> int:
        size = art.size
        start, end = 0, size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)
            if not m or (m.group(1) == "" and m.group(2) == ""):
                rng = None  # unsupported (e.g. multiple ranges): RFC 7233 lets a server ignore it
            else:
                if m.group(1) == "":
                    n = int(m.group(2))
                    start, end = max(0, size - n), size - 1
                else:
                    start = int(m.group(1))
                    end = min(int(m.group(2)), size - 1) if m.group(2) else size - 1
                if start >= size or start > end:
                    self.send_empty(416, {"Content-Range": f"bytes */{size}"})
                    return 416
                status = 206
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("ETag", f'"{art.sha1}"')
        self.send_header("Content-Disposition", f'attachment;filename="{art.filename}"')
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{size}")
        self.end_headers()
        if self.command == "HEAD":
            return status
        with art.path.open("rb") as f:
            f.seek(start)
            left = end - start + 1
            while left > 0:
                chunk = f.read(min(left, 1 << 16))
                if not chunk:
                    break
                try:
                    self.wfile.write(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                left -= len(chunk)
                rate = self.state.artifact_rate
                if rate:
                    time.sleep(len(chunk) / rate)
        return status

    # ---- control --------------------------------------------------------------------------
    def control(self, path: str, query: dict, raw: bytes) -> None:
        st = self.state
        req = json.loads(raw) if raw else {}
        with st.lock:
            if path == "/_ctl/deployment" and self.command == "POST":
                if str(req["actionId"]) in st.actions:
                    raise ValueError(f"action {req['actionId']} exists")
                for v in ("download", "update"):
                    if req.get(v, "forced") not in ("skip", "attempt", "forced"):
                        raise ValueError(f"{v}={req.get(v)!r}")
                if req.get("maintenanceWindow") not in (None, "available", "unavailable"):
                    raise ValueError(f"maintenanceWindow={req.get('maintenanceWindow')!r}")
                st.controller(req["controllerId"])
                act = Action(req, st.next_module)
                st.next_module += 1
                st.actions[act.id] = act
                # answer what the device will see, so a test can compare hashes
                self.send_json(200, {"actionId": act.id, "softwareModuleId": act.module_id, "deploymentBase": self.deployment_base(act, f"{self.base_url()}/{st.tenant}/controller/v1/{quote(act.controller)}")})
                return
            if path == "/_ctl/maintenance" and self.command == "POST":
                window = req.get("window")
                if window not in (None, "available", "unavailable"):
                    raise ValueError(f"window={window!r}")
                st.actions[str(req["actionId"])].maintenance = window
                self.send_json(200, {"ok": True})
                return
            if path == "/_ctl/withdraw" and self.command == "POST":
                answer = req.get("answer")
                if answer not in (None, 404, "null"):
                    raise ValueError(f"answer={answer!r}")
                st.actions[str(req["actionId"])].withdrawn = answer
                self.send_json(200, {"ok": True})
                return
            if path == "/_ctl/cancel" and self.command == "POST":
                act = st.actions[str(req["actionId"])]
                if not act.active:
                    raise ValueError(f"action {act.id} is not active")
                act.cancel_requested = True
                act.status = "CANCELING"
                self.send_json(200, {"ok": True})
                return
            if path == "/_ctl/down" and self.command == "POST":
                if "seconds" in req:
                    st.down_until = time.time() + float(req["seconds"])
                    st.down_forever = False
                else:
                    st.down_forever = bool(req.get("down", True))
                    if not st.down_forever:
                        st.down_until = 0
                self.send_json(200, {"ok": True, "down": st.is_down()})
                return
            if path == "/_ctl/throttle" and self.command == "POST":
                st.artifact_rate = int(req.get("bytesPerSecond", 0))
                self.send_json(200, {"ok": True, "bytesPerSecond": st.artifact_rate})
                return
            if path == "/_ctl/controller" and self.command == "POST":
                c = st.controller(req["controllerId"])
                if "sleep" in req:
                    c["sleep"] = req["sleep"]
                if "requestConfigData" in req:
                    c["requestConfigData"] = bool(req["requestConfigData"])
                if "targetToken" in req:
                    st.target_tokens[req["controllerId"]] = req["targetToken"]
                self.send_json(200, {"ok": True})
                return
            if path == "/_ctl/auth" and self.command == "POST":
                if "required" in req:
                    st.auth_required = bool(req["required"])
                if "gatewayToken" in req:
                    st.gateway_token = req["gatewayToken"]
                st.target_tokens.update(req.get("targetTokens", {}))
                self.send_json(200, {"ok": True})
                return
            if path == "/_ctl/log" and self.command == "GET":
                since = int(query.get("since", ["0"])[0])
                lines = st.log_path.read_text().splitlines() if st.log_path.exists() else []
                recs = [json.loads(line) for line in lines]
                self.send_json(200, [r for r in recs if r["seq"] > since])
                return
            if path == "/_ctl/violations" and self.command == "GET":
                self.send_json(200, st.violations)
                return
            if path == "/_ctl/state" and self.command == "GET":
                self.send_json(
                    200,
                    {
                        "controllers": st.controllers,
                        "actions": {
                            a.id: {
                                "controllerId": a.controller,
                                "status": a.status,
                                "active": a.active,
                                "cancelRequested": a.cancel_requested,
                                "download": a.download,
                                "update": a.update,
                                "maintenanceWindow": a.maintenance,
                                "feedback": a.feedback,
                                "cancelFeedback": a.cancel_feedback,
                            }
                            for a in st.actions.values()
                        },
                        "down": st.is_down(),
                        "violations": len(st.violations),
                        "seq": st.seq,
                    },
                )
                return
            if path == "/_ctl/shutdown" and self.command == "POST":
                self.send_json(200, {"ok": True})
                threading.Thread(target=self.server.shutdown, daemon=True).start()
                return
        self.send_json(404, {"error": f"no control {self.command} {path}"})


def self_test(spec: Spec) -> None:
    """Every answer template must conform to the spec; bad request bodies must be caught."""
    link = {"href": "http://127.0.0.1:1/DEFAULT/controller/v1/d"}
    samples = {
        "DdiControllerBase": [
            {"config": {"polling": {"sleep": "00:00:05"}}, "_links": {"deploymentBase": link, "configData": link, "installedBase": link}},
            {"config": {"polling": {"sleep": "00:01:00"}}, "_links": {"cancelAction": link}},
            {"config": {"polling": {"sleep": "12:00:00"}}, "_links": {}},
        ],
        "DdiDeploymentBase": [
            {
                "id": "1",
                "deployment": {
                    "download": m,
                    "update": m,
                    "maintenanceWindow": w,
                    "chunks": [
                        {
                            "part": "os",
                            "version": "1.0.0",
                            "name": "img",
                            "artifacts": [
                                {"filename": "a.bin", "size": 3, "hashes": {"sha1": "a", "md5": "b", "sha256": "c"},
                                 "_links": {"download": link, "download-http": link, "md5sum": link, "md5sum-http": link}}
                            ],
                        }
                    ],
                },
                "actionHistory": {"status": "RUNNING", "messages": ["x"]},
            }
            for m in ("skip", "attempt", "forced")
            for w in ("available", "unavailable")
        ],
        "DdiCancel": [{"id": "1", "cancelAction": {"stopId": "1"}}],
        "ExceptionInfo": [{"exceptionClass": "x", "errorCode": "y", "message": "z"}],
        "DdiArtifact": [{"filename": "a.bin", "size": 3, "hashes": {"sha1": "a", "md5": "b", "sha256": "c"}}],
    }
    for name, objs in samples.items():
        for o in objs:
            errs = spec.errors(name, o)
            assert not errs, f"template for {name} does not conform: {errs}"
    bad = [
        ("DdiActionFeedback", {"status": {"execution": "downloading", "result": {"finished": "none"}}}),
        ("DdiActionFeedback", {"status": {"execution": "closed"}}),
        ("DdiActionFeedback", {"status": {"execution": "closed", "result": {"finished": "ok"}}}),
        ("DdiActionFeedback", {"status": {"execution": "proceeding", "result": {"finished": "none", "progress": {"of": 3}}}}),
        ("DdiControllerBase", {"config": {"polling": {"sleep": "5s"}}}),
        ("DdiConfigData", {"mode": "merge"}),
        ("DdiConfigData", {"data": {"n": 1}}),
    ]
    for name, o in bad:
        assert spec.errors(name, o), f"{name} accepted a bad instance: {o}"
    good = ("DdiActionFeedback", {"status": {"execution": "proceeding", "result": {"finished": "none", "progress": {"cnt": 1, "of": 3}}, "details": ["x"]}})
    assert not spec.errors(*good), spec.errors(*good)


def serve(args: argparse.Namespace) -> None:
    spec = Spec(find_spec())
    self_test(spec)
    st = State(args, spec)
    st.state_dir.mkdir(parents=True, exist_ok=True)
    if args.fresh_log and st.log_path.exists():
        st.log_path.unlink()
    Handler.state = st
    Handler.templates = path_templates(spec)
    httpd = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    httpd.daemon_threads = True
    url = f"http://127.0.0.1:{httpd.server_address[1]}"
    (st.state_dir / "server.env").write_text(f"url={url}\npid={os.getpid()}\nlog={st.log_path}\n")
    print(f"url={url} pid={os.getpid()}", flush=True)
    try:
        httpd.serve_forever(poll_interval=0.2)
    finally:
        httpd.server_close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--state-dir", required=True)
    s.add_argument("--port", type=int, default=0, help="0 (default): a free port")
    s.add_argument("--tenant", default="DEFAULT")
    s.add_argument("--sleep", default="00:00:05", help="config.polling.sleep for every controller")
    s.add_argument("--target-token", action="append", metavar="DEV=TOKEN")
    s.add_argument("--gateway-token")
    s.add_argument("--no-auth", action="store_true", help="accept requests without Authorization")
    s.add_argument("--fresh-log", action="store_true", help="truncate DIR/requests.jsonl at start")
    sub.add_parser("selftest")
    args = ap.parse_args()
    if args.cmd == "selftest":
        spec = Spec(find_spec())
        self_test(spec)
        print(f"spec_server selftest ok ({spec.path})")
        return
    serve(args)


if __name__ == "__main__":
    main()
