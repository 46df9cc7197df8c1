#!/usr/bin/env python3
"""Check that openapi.yaml still describes the legacy updater contract, unchanged.

Usage:
    check_legacy.py LEGACY_CONTRACT [OPENAPI]
    check_legacy.py --self-test LEGACY_CONTRACT [OPENAPI]

LEGACY_CONTRACT is the shared contract (e.g. /work/shared/contracts/updater-api.yaml);
OPENAPI defaults to openapi.yaml at the repository root.

For every path and method of the legacy contract, openapi.yaml must have the same path and
method, and the same parameters, request body (required flag, media types, schema) and
responses (status codes, media types, headers, schemas). Every component schema of the legacy
contract must exist under the same name with the same content. The base path of the servers
must be the same (the paths are relative to it).

Schemas are compared after resolving $ref and dropping documentation-only keywords
(description, summary, example, examples, title, externalDocs): every property, type, enum,
pattern, format, bound, nullable, required list and combinator (oneOf/anyOf/allOf) must be
equal. Keys present in only one of the two documents are differences too (adding
`additionalProperties: false` or a property to a legacy schema changes the contract). Order
does not matter in `required`, `enum`, `type` lists and combinators.

--self-test: first checks that openapi.yaml passes, then perturbs in-memory copies of it (an
enum value dropped, a pattern changed, a required field dropped, a path removed, ...) and
checks that every perturbation is caught, and that changes to documentation only are not.

Exit status: 0 same contract (or self-test passed), 1 differences (or self-test failed),
2 usage or unreadable file. Needs Python 3 and PyYAML only.
"""

import copy
import json
import os
import subprocess
import sys
import tempfile
from urllib.parse import urlparse

try:
    import yaml
except ImportError:  # pragma: no cover
    sys.stderr.write("check_legacy.py: PyYAML is required (pip install pyyaml)\n")
    sys.exit(2)

HTTP_METHODS = ("get", "put", "post", "delete", "options", "head", "patch", "trace")
# Keywords that document but do not constrain.
DOC_KEYS = frozenset({"description", "summary", "example", "examples", "title", "externalDocs"})
# Lists whose order carries no meaning.
UNORDERED_LISTS = frozenset({"required", "enum", "type", "oneOf", "anyOf", "allOf"})


def load(path):
    try:
        with open(path, encoding="utf-8") as f:
            doc = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        sys.stderr.write(f"check_legacy.py: cannot read {path}: {e}\n")
        sys.exit(2)
    if not isinstance(doc, dict):
        sys.stderr.write(f"check_legacy.py: {path} is not an OpenAPI document (not a mapping)\n")
        sys.exit(2)
    return doc


def pointer(doc, ref):
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    node = doc
    for part in ref[2:].split("/"):
        part = part.replace("~1", "/").replace("~0", "~")
        if not isinstance(node, dict) or part not in node:
            raise KeyError(ref)
        node = node[part]
    return node


def resolve(doc, node, seen=()):
    """`node` with every $ref inlined (a cycle is kept as its $ref)."""
    if isinstance(node, dict):
        if "$ref" in node and isinstance(node["$ref"], str):
            ref = node["$ref"]
            if ref in seen:
                return {"$ref": ref}
            try:
                target = pointer(doc, ref)
            except KeyError:
                return {"$ref (unresolvable)": ref}
            merged = resolve(doc, target, seen + (ref,))
            rest = {k: v for k, v in node.items() if k != "$ref"}
            if rest and isinstance(merged, dict):
                merged = dict(merged, **resolve(doc, rest, seen))
            return merged
        return {k: resolve(doc, v, seen) for k, v in node.items()}
    if isinstance(node, list):
        return [resolve(doc, v, seen) for v in node]
    return node


def canonical(node):
    return json.dumps(node, sort_keys=True, default=str)


def normalize(node):
    """Drops documentation keywords; sorts lists whose order carries no meaning."""
    if isinstance(node, dict):
        out = {}
        for k, v in node.items():
            if k in DOC_KEYS:
                continue
            v = normalize(v)
            if k in UNORDERED_LISTS and isinstance(v, list):
                v = sorted(v, key=canonical)
            out[k] = v
        return out
    if isinstance(node, list):
        return [normalize(v) for v in node]
    return node


def diff(a, b, where, out):
    """Appends to `out` one line per difference between legacy `a` and new `b`."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in a:
            if k not in b:
                out.append(f"{where}.{k}: missing in openapi.yaml (legacy: {short(a[k])})")
            else:
                diff(a[k], b[k], f"{where}.{k}", out)
        for k in b:
            if k not in a:
                out.append(f"{where}.{k}: only in openapi.yaml ({short(b[k])}), not in the legacy contract")
        return
    if isinstance(a, list) and isinstance(b, list) and a != b:
        if len(a) == len(b) and all(isinstance(x, (dict, list)) for x in a + b):
            for i, (x, y) in enumerate(zip(a, b)):
                diff(x, y, f"{where}[{i}]", out)
            return
        if len(a) != len(b) and any(isinstance(x, (dict, list)) for x in a + b):
            out.append(f"{where}: legacy has {len(a)} items, openapi.yaml {len(b)}: legacy {short(a)}, openapi.yaml {short(b)}")
            return
    # type(True) == bool but True == 1: compare types as well as values.
    if canonical(a) != canonical(b):
        out.append(f"{where}: legacy {short(a)}, openapi.yaml {short(b)}")


def short(v, limit=160):
    s = canonical(v)
    return s if len(s) <= limit else s[: limit - 3] + "..."


def base_paths(doc):
    servers = doc.get("servers") or [{"url": "/"}]
    return sorted({(urlparse(s.get("url", "/")).path.rstrip("/") or "/") for s in servers if isinstance(s, dict)})


def params(doc, path_item, op):
    """Effective parameters of an operation, keyed by (in, name), resolved."""
    out = {}
    for p in (path_item.get("parameters") or []) + (op.get("parameters") or []):
        p = resolve(doc, p)
        out[(p.get("in"), p.get("name"))] = p
    return out


def compare(legacy, new):
    """The list of differences (empty: openapi.yaml holds the legacy contract)."""
    problems = []

    if legacy.get("openapi") != new.get("openapi"):
        problems.append(f"openapi version: legacy {legacy.get('openapi')!r}, openapi.yaml {new.get('openapi')!r}")
    lb, nb = base_paths(legacy), base_paths(new)
    if not set(lb) <= set(nb):
        problems.append(f"servers: base path(s) {lb} of the legacy contract, openapi.yaml has {nb}")

    lpaths = legacy.get("paths") or {}
    npaths = new.get("paths") or {}
    for path, litem in lpaths.items():
        litem = resolve(legacy, litem)
        if path not in npaths:
            problems.append(f"{path}: path missing in openapi.yaml")
            continue
        nitem = resolve(new, npaths[path])
        for method in HTTP_METHODS:
            if method not in litem:
                continue
            name = f"{method.upper()} {path}"
            if method not in nitem:
                problems.append(f"{name}: operation missing in openapi.yaml")
                continue
            lop, nop = litem[method], nitem[method]

            lp, np_ = params(legacy, litem, lop), params(new, nitem, nop)
            for key in lp:
                if key not in np_:
                    problems.append(f"{name}: parameter {key[1]!r} in {key[0]} missing in openapi.yaml")
                else:
                    diff(normalize(lp[key]), normalize(np_[key]), f"{name} parameter {key[1]}", problems)
            for key in np_:
                if key not in lp and np_[key].get("required"):
                    problems.append(f"{name}: required parameter {key[1]!r} in {key[0]} only in openapi.yaml")

            lbody, nbody = lop.get("requestBody"), nop.get("requestBody")
            if lbody is None and nbody is not None:
                problems.append(f"{name}: requestBody only in openapi.yaml")
            elif lbody is not None and nbody is None:
                problems.append(f"{name}: requestBody missing in openapi.yaml")
            elif lbody is not None:
                if bool(lbody.get("required", False)) != bool(nbody.get("required", False)):
                    problems.append(
                        f"{name} requestBody.required: legacy {bool(lbody.get('required', False))}, "
                        f"openapi.yaml {bool(nbody.get('required', False))}"
                    )
                compare_content(lbody.get("content") or {}, nbody.get("content") or {}, f"{name} requestBody", problems)

            lresp, nresp = lop.get("responses") or {}, nop.get("responses") or {}
            for status in lresp:
                if str(status) not in {str(s) for s in nresp}:
                    problems.append(f"{name}: response {status} missing in openapi.yaml")
            for status in nresp:
                if str(status) not in {str(s) for s in lresp}:
                    problems.append(f"{name}: response {status} only in openapi.yaml, not in the legacy contract")
            for status, lr in lresp.items():
                nr = next((v for s, v in nresp.items() if str(s) == str(status)), None)
                if nr is None:
                    continue
                where = f"{name} response {status}"
                compare_content(lr.get("content") or {}, nr.get("content") or {}, where, problems)
                lh, nh = lr.get("headers") or {}, nr.get("headers") or {}
                diff(normalize(lh), normalize(nh), f"{where} headers", problems)

    lschemas = (legacy.get("components") or {}).get("schemas") or {}
    nschemas = (new.get("components") or {}).get("schemas") or {}
    for cname, lschema in lschemas.items():
        if cname not in nschemas:
            problems.append(f"components.schemas.{cname}: missing in openapi.yaml")
            continue
        diff(
            normalize(resolve(legacy, lschema)),
            normalize(resolve(new, nschemas[cname])),
            f"components.schemas.{cname}",
            problems,
        )
    return problems


def compare_content(lcontent, ncontent, where, problems):
    for media in lcontent:
        if media not in ncontent:
            problems.append(f"{where}: media type {media} missing in openapi.yaml")
    for media in ncontent:
        if media not in lcontent:
            problems.append(f"{where}: media type {media} only in openapi.yaml")
    for media, lm in lcontent.items():
        if media in ncontent:
            diff(
                normalize((lm or {}).get("schema")),
                normalize((ncontent[media] or {}).get("schema")),
                f"{where} {media} schema",
                problems,
            )


# ---------------------------------------------------------------------------------------------
# Self-test


def _op(doc, path, method):
    return doc["paths"][path][method]


def _schemas(doc):
    return doc["components"]["schemas"]


def _p_drop_enum(doc):
    _schemas(doc)["ProgressResponse"]["properties"]["data"]["properties"]["stage"]["enum"].remove("rebooting")


def _p_pattern(doc):
    _schemas(doc)["DownloadRequest"]["properties"]["package_md5"]["pattern"] = "^[a-fA-F0-9]{32}$"


def _p_required(doc):
    _schemas(doc)["DownloadRequest"]["required"].remove("package_size")


def _p_type(doc):
    _schemas(doc)["DownloadRequest"]["properties"]["package_size"]["type"] = "number"


def _p_minimum(doc):
    _schemas(doc)["DownloadRequest"]["properties"]["package_size"]["minimum"] = 0


def _p_format(doc):
    del _schemas(doc)["DownloadRequest"]["properties"]["package_url"]["format"]


def _p_drop_property(doc):
    del _schemas(doc)["UpdateRequest"]["properties"]["version"]


def _p_add_property(doc):
    _schemas(doc)["SuccessResponse"]["properties"]["request_id"] = {"type": "string"}


def _p_closed(doc):
    _schemas(doc)["DownloadRequest"]["additionalProperties"] = False


def _p_nullable(doc):
    _schemas(doc)["ProgressResponse"]["properties"]["data"]["properties"]["error"]["nullable"] = False


def _p_code_enum(doc):
    _schemas(doc)["ErrorResponse"]["properties"]["code"]["enum"].remove(410)


def _p_code_type(doc):
    _schemas(doc)["SuccessResponse"]["properties"]["code"]["enum"] = ["200"]


def _p_progress_bound(doc):
    _schemas(doc)["ProgressResponse"]["properties"]["data"]["properties"]["progress"]["maximum"] = 1000


def _p_rename_component(doc):
    s = _schemas(doc)
    s["ErrorResponseV2"] = s.pop("ErrorResponse")
    text = json.dumps(doc).replace("#/components/schemas/ErrorResponse\"", "#/components/schemas/ErrorResponseV2\"")
    doc.clear()
    doc.update(json.loads(text))


def _p_drop_path(doc):
    del doc["paths"]["/progress"]


def _p_method(doc):
    doc["paths"]["/update"]["put"] = doc["paths"]["/update"].pop("post")


def _p_body_optional(doc):
    _op(doc, "/download", "post")["requestBody"]["required"] = False


def _p_body_schema(doc):
    media = _op(doc, "/update", "post")["requestBody"]["content"]["application/json"]
    media["schema"] = {"$ref": "#/components/schemas/DownloadRequest"}


def _p_response_oneof(doc):
    schema = _op(doc, "/download", "post")["responses"]["200"]["content"]["application/json"]["schema"]
    schema["oneOf"] = schema["oneOf"][:1]


def _p_response_code(doc):
    _op(doc, "/update", "post")["responses"]["400"] = {"description": "Bad request"}


def _p_media(doc):
    r = _op(doc, "/progress", "get")["responses"]["200"]
    r["content"] = {"text/plain": r["content"]["application/json"]}


def _p_param(doc):
    _op(doc, "/progress", "get")["parameters"] = [
        {"name": "verbose", "in": "query", "required": True, "schema": {"type": "boolean"}}
    ]


def _p_base_path(doc):
    doc["servers"] = [{"url": "http://localhost:12315/api/v2.0"}]


def _p_inline_component(doc):
    # The same schema inlined into the operation instead of referenced: still equal there,
    # but then changed: the operation's schema must be compared after resolution.
    media = _op(doc, "/update", "post")["requestBody"]["content"]["application/json"]
    inline = copy.deepcopy(_schemas(doc)["UpdateRequest"])
    inline["properties"]["version"]["pattern"] = "^.+$"
    media["schema"] = inline


PERTURBATIONS = [
    ("drop enum value 'rebooting' of ProgressResponse.data.stage", _p_drop_enum, "enum"),
    ("widen the package_md5 pattern", _p_pattern, "pattern"),
    ("drop package_size from DownloadRequest.required", _p_required, "required"),
    ("package_size integer -> number", _p_type, "type"),
    ("package_size minimum 1 -> 0", _p_minimum, "minimum"),
    ("drop package_url format: uri", _p_format, "format"),
    ("drop UpdateRequest.version", _p_drop_property, "version"),
    ("add a property to SuccessResponse", _p_add_property, "request_id"),
    ("DownloadRequest additionalProperties: false", _p_closed, "additionalProperties"),
    ("ProgressResponse.data.error not nullable", _p_nullable, "nullable"),
    ("drop 410 from ErrorResponse.code", _p_code_enum, "enum"),
    ("SuccessResponse.code enum 200 -> '200' (string)", _p_code_type, "enum"),
    ("progress maximum 100 -> 1000", _p_progress_bound, "maximum"),
    ("rename the ErrorResponse component", _p_rename_component, "ErrorResponse"),
    ("remove the /progress path", _p_drop_path, "/progress"),
    ("POST /update -> PUT /update", _p_method, "POST /update"),
    ("/download requestBody not required", _p_body_optional, "requestBody.required"),
    ("/update body schema replaced", _p_body_schema, "POST /update requestBody"),
    ("/download response oneOf without ErrorResponse", _p_response_oneof, "oneOf"),
    ("/update gains a 400 response", _p_response_code, "response 400"),
    ("/progress answers text/plain", _p_media, "text/plain"),
    ("/progress gains a required query parameter", _p_param, "verbose"),
    ("base path /api/v1.0 -> /api/v2.0", _p_base_path, "servers"),
    ("/update body schema inlined and changed", _p_inline_component, "pattern"),
]


def _d_description(doc):
    _schemas(doc)["DownloadRequest"]["properties"]["version"]["description"] = "changed"
    _op(doc, "/progress", "get")["summary"] = "changed"
    _op(doc, "/download", "post")["responses"]["200"]["content"]["application/json"]["examples"] = {}


def _d_order(doc):
    _schemas(doc)["ProgressResponse"]["properties"]["data"]["properties"]["stage"]["enum"].reverse()
    _schemas(doc)["DownloadRequest"]["required"].reverse()


def _d_new_endpoint(doc):
    doc["paths"]["/extra"] = {"get": {"responses": {"200": {"description": "ok"}}}}
    _schemas(doc)["Extra"] = {"type": "object"}


HARMLESS = [
    ("change descriptions, summaries and examples", _d_description),
    ("reorder an enum and a required list", _d_order),
    ("add a path and a component", _d_new_endpoint),
]


def self_test(legacy, new, legacy_path):
    failures = []
    base = compare(legacy, new)
    if base:
        failures.append("openapi.yaml itself differs from the legacy contract:\n    " + "\n    ".join(base))
    for label, mutate, expect in PERTURBATIONS:
        doc = copy.deepcopy(new)
        mutate(doc)
        found = compare(legacy, doc)
        if not found:
            failures.append(f"perturbation not caught: {label}")
        elif not any(expect in p for p in found):
            failures.append(f"perturbation {label!r} caught, but no message mentions {expect!r}: {found}")
        else:
            print(f"ok   caught: {label}: {found[0]}")
    for label, mutate in HARMLESS:
        doc = copy.deepcopy(new)
        mutate(doc)
        found = compare(legacy, doc)
        if found:
            failures.append(f"harmless change reported as a difference: {label}: {found}")
        else:
            print(f"ok   accepted: {label}")
    # End to end: a perturbed copy on disk makes the command exit 1 and say why.
    doc = copy.deepcopy(new)
    _p_drop_enum(doc)
    with tempfile.TemporaryDirectory() as tmp:
        perturbed = os.path.join(tmp, "openapi.yaml")
        with open(perturbed, "w", encoding="utf-8") as f:
            yaml.safe_dump(doc, f, sort_keys=False)
        run = subprocess.run(
            [sys.executable, os.path.abspath(__file__), legacy_path, perturbed], capture_output=True, text=True
        )
    if run.returncode != 1 or "FAIL" not in run.stderr or "rebooting" not in run.stderr:
        failures.append(f"perturbed copy on disk: exit {run.returncode}, stderr {run.stderr!r}")
    else:
        print(f"ok   perturbed copy on disk: exit 1, {run.stderr.splitlines()[1].strip()}")
    if failures:
        print("\nSELF-TEST FAILED:", file=sys.stderr)
        for f in failures:
            print(f"  - {f}", file=sys.stderr)
        return 1
    print(f"\nself-test passed: {len(PERTURBATIONS)} perturbations caught, {len(HARMLESS)} harmless changes accepted")
    return 0


def main(argv):
    args = list(argv[1:])
    test = "--self-test" in args
    args = [a for a in args if a != "--self-test"]
    if any(a.startswith("-") for a in args) or not 1 <= len(args) <= 2:
        sys.stderr.write(__doc__.split("\n\n")[1] + "\n")
        return 2
    legacy_path = args[0]
    new_path = args[1] if len(args) == 2 else os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "openapi.yaml")
    legacy, new = load(legacy_path), load(new_path)
    if test:
        return self_test(legacy, new, legacy_path)
    problems = compare(legacy, new)
    if problems:
        print(f"FAIL: {new_path} does not hold the legacy contract {legacy_path}:", file=sys.stderr)
        for p in problems:
            print(f"  - {p}", file=sys.stderr)
        return 1
    n_ops = sum(1 for item in (legacy.get("paths") or {}).values() for m in HTTP_METHODS if m in item)
    n_schemas = len(((legacy.get("components") or {}).get("schemas") or {}))
    print(f"ok: {new_path} holds the legacy contract ({n_ops} operations, {n_schemas} component schemas identical)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
