"""The legacy service's manifest rules against our packages (issue 14, SPEC §2).

The Python service validated manifest.json with a schema of its own before deploying anything:
`version` matching ^\\d+\\.\\d+\\.\\d+$, `modules` a list of at least one module, each with a
`name`, a relative `src` and an absolute `dst` (SPEC §2; the shared contract's deploy flow).
Written here as a JSON Schema from those rules, it must accept every full package `pack`
makes and refuse every delta package (whose modules live under `delta`, leaving the top-level
list empty): a service that does not know deltas refuses the package before touching anything,
instead of deploying patch bytes as files.

    python legacy_manifest.py FULL.zip DELTA.zip   exit 0 iff FULL is accepted and DELTA refused
"""
import json
import sys
import zipfile

import jsonschema_rs

LEGACY_MANIFEST = {
    "type": "object",
    "required": ["version", "modules"],
    "properties": {
        "version": {"type": "string", "pattern": r"^\d+\.\d+\.\d+$"},
        "modules": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "src", "dst"],
                "properties": {
                    "name": {"type": "string"},
                    "src": {"type": "string", "pattern": "^[^/]"},
                    "dst": {"type": "string", "pattern": "^/"},
                    "process_name": {"type": ["string", "null"]},
                    "restart_order": {"type": ["integer", "null"]},
                },
            },
        },
    },
}


def errors(package):
    with zipfile.ZipFile(package) as z:
        manifest = json.loads(z.read("manifest.json"))
    return [e.message for e in jsonschema_rs.validator_for(LEGACY_MANIFEST).iter_errors(manifest)]


def main():
    full, delta = sys.argv[1], sys.argv[2]
    ok = True
    if errors(full):
        print(f"legacy_manifest: the legacy rules refuse the full package {full}: {errors(full)}")
        ok = False
    refused = errors(delta)
    if not refused:
        print(f"legacy_manifest: the legacy rules ACCEPT the delta package {delta}: a legacy service would deploy its patches as files")
        ok = False
    else:
        print(f"legacy_manifest: full package accepted; delta package refused by the legacy rules ({refused[0]})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
