"""Schemathesis checks for the legacy `{code, msg, data}` envelope (loaded by run.sh through
SCHEMATHESIS_HOOKS; written for the schemathesis version pinned in run.sh).

The legacy contract answers every request with HTTP 200 and puts the outcome in the body, so
the HTTP-status based checks of schemathesis either hold trivially or cannot hold by design.
These checks say the same things about the envelope instead:

- legacy_envelope: every answer to a documented operation (even a malformed request, a
  missing or wrong Content-Type) is HTTP 200, `application/json`, an object with an integer
  `code` in {200, 400, 404, 409, 410, 500} and a string `msg`; `msg` is "success" when
  `code` is 200, otherwise "CODE: message" with CODE one of SPEC §6 and `code` the one the
  contract gives that CODE (VALIDATION_ERROR 400, REQUEST_REFUSED 400 (a body that is not
  application/json, refused before any handler: SECURITY.md), NOTHING_TO_ROLL_BACK 404,
  OPERATION_IN_PROGRESS / DOWNLOAD_INCOMPLETE / MD5_NOT_VERIFIED 409, PACKAGE_EXPIRED 410,
  the others 500; GET /progress reports any failure with code 500). INTERNAL_ERROR and JOURNAL_CORRUPT are findings (a bug, in a test
  environment that has nothing wrong with it): the envelope's "not a server error".
- envelope_negative_data_rejection: a request that violates the schema must be rejected as
  such: `code` 400 VALIDATION_ERROR or REQUEST_REFUSED, or 409 OPERATION_IN_PROGRESS; any
  other answer (200, a failed download, an internal error) fails. GET /progress's failed shape
  (code 500) is the state it reports, judged like a 200. Except an http://
  package_url, which run.sh's `download.allow_http = true` allows on purpose: exempt only when
  the same case with https:// is valid. It reuses schemathesis' own negative_data_rejection logic (which knows when a
  generated "negative" case turns valid after serialization) with the envelope `code` in
  place of the HTTP status.
- progress_semantics: GET /progress as the contract describes it: `error` non-null only in
  stage "failed"; the failed shape (code 500, `stage` "failed" and `progress` at the root);
  progress 100 in stages toInstall and success.
- status_semantics: GET /status: `current` is one of `generations`.
"""

import copy
import json
import os
import re

import jsonschema_rs
import yaml

import schemathesis
from schemathesis.core.failures import AcceptedNegativeData
from schemathesis.generation.meta import CoverageScenario, coverage_scenario
from schemathesis.specs.openapi import checks as openapi_checks

SPEC_CODES = (
    "VALIDATION_ERROR OPERATION_IN_PROGRESS DOWNLOAD_INCOMPLETE MD5_NOT_VERIFIED PACKAGE_EXPIRED "
    "MD5_MISMATCH HASH_MISMATCH SIGNATURE_INVALID DISK_FULL INVALID_PACKAGE INVALID_MANIFEST "
    "PATH_NOT_ALLOWED VERSION_MISMATCH INCOMPATIBLE DOWNLOAD_FAILED SERVICE_STOP_FAILED "
    "PROCESS_KILL_FAILED SERVICE_START_FAILED POST_CMD_FAILED DEPLOYMENT_FAILED ROLLBACK_FAILED "
    "NOTHING_TO_ROLL_BACK JOURNAL_CORRUPT INTERNAL_ERROR REQUEST_REFUSED PACKAGE_SIZE_MISMATCH"
).split()
APP_CODE = {
    "VALIDATION_ERROR": 400,
    "REQUEST_REFUSED": 400,
    "NOTHING_TO_ROLL_BACK": 404,
    "OPERATION_IN_PROGRESS": 409,
    "DOWNLOAD_INCOMPLETE": 409,
    "MD5_NOT_VERIFIED": 409,
    "PACKAGE_EXPIRED": 410,
}
NOT_EXPECTED_HERE = ("INTERNAL_ERROR", "JOURNAL_CORRUPT")
# The contract's /download body, to tell a case whose one violation is an http:// URL.
with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "openapi.yaml")) as f:
    DOWNLOAD_REQUEST = jsonschema_rs.validator_for(yaml.safe_load(f)["components"]["schemas"]["DownloadRequest"])
# (envelope code, SPEC code) pairs that reject a schema-violating request.
REJECTIONS = {(400, "VALIDATION_ERROR"), (400, "REQUEST_REFUSED"), (409, "OPERATION_IN_PROGRESS")}
CODED_MSG = re.compile(r"^(%s): \S" % "|".join(SPEC_CODES))
PROGRESS_STAGES = {"idle", "downloading", "verifying", "toInstall", "installing", "rebooting", "success", "failed"}


def envelope_of(response):
    """The decoded JSON object, or None (legacy_envelope reports why)."""
    try:
        body = json.loads(response.content)
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def check_coded_msg(code, msg, what="msg", mapped=True):
    """Shared by the envelope and the progress checks. `mapped`: the code must be the one the
    contract gives the CODE (not for /progress, whose failed shape is always code 500)."""
    m = CODED_MSG.match(msg)
    if not m:
        raise AssertionError(f"code {code} but {what} {msg!r} does not start with a SPEC §6 code and ': '")
    name = m.group(1)
    want = APP_CODE.get(name, 500)
    if mapped and code != want:
        raise AssertionError(f"{what} {msg!r} carries {name}, which the contract answers with code {want}, not {code}")
    if name in NOT_EXPECTED_HERE:
        raise AssertionError(f"{name} answered: {msg!r} (a bug or a broken environment, never expected in this test)")


@schemathesis.check
def legacy_envelope(ctx, response, case):
    # A probe with an undocumented method is not an operation of the contract: the router
    # answers 405 (checked by unsupported_method / allow_header_conformance).
    if coverage_scenario(case) == CoverageScenario.UNSPECIFIED_HTTP_METHOD:
        return None
    if response.status_code != 200:
        raise AssertionError(
            f"HTTP {response.status_code} for {case.method} {case.path}: the legacy contract answers every "
            f"request with HTTP 200 and the outcome in the body (body: {response.content[:200]!r})"
        )
    ctype = (response.headers.get("content-type") or [""])[0]
    if not ctype.split(";")[0].strip().lower() == "application/json":
        raise AssertionError(f"Content-Type {ctype!r}, expected application/json")
    body = envelope_of(response)
    if body is None:
        raise AssertionError(f"body is not a JSON object: {response.content[:200]!r}")
    code, msg = body.get("code"), body.get("msg")
    if type(code) is not int or code not in (200, 400, 404, 409, 410, 500):
        raise AssertionError(f"envelope code {code!r} is not one of 200, 400, 404, 409, 410, 500")
    if not isinstance(msg, str):
        raise AssertionError(f"envelope msg {msg!r} is not a string")
    if code == 200:
        if msg != "success":
            raise AssertionError(f"code 200 with msg {msg!r}, expected 'success'")
        return None
    check_coded_msg(code, msg, mapped=not case.path.endswith("/progress"))
    return None


@schemathesis.check
def envelope_negative_data_rejection(ctx, response, case):
    meta = case.meta
    if meta is None or not meta.generation.mode.is_negative:
        return None
    body = envelope_of(response)
    if body is None:
        return None  # legacy_envelope reports it
    code, msg = body.get("code"), body.get("msg") or ""
    if case.method.upper() == "GET" and case.path.endswith("/progress") and code == 500 and body.get("stage") == "failed":
        # /progress's failed shape (code 500, stage at the root) reports the last job's
        # failure (progress_semantics checks it); the request itself was answered like any
        # other: judged as an accepted one below.
        code = 200
    if code != 200:
        # A rejection of a schema-violating request names the violation: VALIDATION_ERROR (or
        # REQUEST_REFUSED, the guard's answer to a body that is not JSON), or the daemon was
        # busy (OPERATION_IN_PROGRESS, checked before the body). Any other code (a download
        # that failed, an internal error) means the request was acted on, not rejected.
        if (code, msg.split(":")[0]) in REJECTIONS:
            return None
        raise AssertionError(
            f"schema-violating request answered {code} {msg[:120]!r}: expected a rejection, "
            f"one of {sorted(REJECTIONS)}"
        )
    sent = case.body if isinstance(case.body, dict) else {}
    url = sent.get("package_url")
    if case.path.endswith("/download") and isinstance(url, str) and url.lower().startswith("http://"):
        # run.sh configures download.allow_http = true (SPEC §5: tests, LAN servers), so the
        # contract's '^https://' pattern is deliberately wider on this daemon. Exempt only a
        # case whose one violation that is: the same case with https:// must be valid.
        if DOWNLOAD_REQUEST.is_valid(dict(sent, package_url="https://" + url[len("http://"):])):
            return None
    # Accepted. Let schemathesis' negative_data_rejection decide whether the request really was
    # invalid as sent (a negated value can become valid after serialization): it sees the
    # envelope code as the status, and only the envelope's rejection codes count as rejections.
    enveloped = copy.copy(response)
    enveloped.status_code = 200
    try:
        return openapi_checks._openapi_negative_data_rejection(ctx, enveloped, case)
    except AcceptedNegativeData as e:
        detail = "\n".join(line for line in e.message.splitlines()[1:] if not line.startswith("Expected:"))
        raise AssertionError(
            "Schema-violating request accepted: envelope code 200, expected a rejection "
            "(code 400 VALIDATION_ERROR, or 409 when busy)\n" + detail.strip()
        ) from None


@schemathesis.check
def progress_semantics(ctx, response, case):
    if case.method.upper() != "GET" or not case.path.endswith("/progress"):
        return None
    body = envelope_of(response)
    if body is None:
        return None
    if body.get("code") == 200:
        data = body.get("data")
        if not isinstance(data, dict):
            return None  # response_schema_conformance reports it
        stage, progress, error = data.get("stage"), data.get("progress"), data.get("error")
        if stage == "failed":
            if not isinstance(error, str):
                raise AssertionError(f"stage 'failed' with error {error!r}: the contract gives the error code and message")
            check_coded_msg(500, error, "error", mapped=False)
        elif error is not None:
            raise AssertionError(f"stage {stage!r} with error {error!r}: error is null unless the stage is 'failed'")
        if stage in ("toInstall", "success") and progress != 100:
            raise AssertionError(f"stage {stage!r} with progress {progress!r}, the contract says 100")
    elif body.get("code") == 500:
        # The contract's failed shape: error in msg, stage and progress at the root.
        if body.get("stage") != "failed":
            raise AssertionError(f"code 500 from /progress with stage {body.get('stage')!r}, expected 'failed' at the root")
        p = body.get("progress")
        if type(p) is not int or not 0 <= p <= 100:
            raise AssertionError(f"code 500 from /progress with progress {p!r} at the root, expected 0..100")
        # `data` as the legacy GUI reads it (stage, progress, and the error text as message),
        # without `error`: with it the body would match both oneOf branches of the schema.
        data = body.get("data")
        if not isinstance(data, dict) or data.get("stage") != "failed" or data.get("progress") != p or data.get("message") != body.get("msg"):
            raise AssertionError(f"code 500 from /progress: data {data!r} should repeat stage 'failed', progress and msg for the GUI")
        if "error" in data:
            raise AssertionError("code 500 from /progress with data.error: matches both oneOf branches of the legacy schema")
    return None


@schemathesis.check
def status_semantics(ctx, response, case):
    if case.method.upper() != "GET" or not case.path.endswith("/status"):
        return None
    body = envelope_of(response)
    if body is None or body.get("code") != 200 or not isinstance(body.get("data"), dict):
        return None
    data = body["data"]
    current, gens = data.get("current"), data.get("generations")
    if current is not None and isinstance(gens, list) and current not in gens:
        raise AssertionError(f"current {current!r} is not one of the generations {gens!r}")
    return None
