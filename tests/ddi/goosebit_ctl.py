#!/usr/bin/env python3
"""Seed and inspect a gooseBit test server (run inside the ddi venv; see goosebit.sh).

Reads go straight to gooseBit's database through its own ORM (goosebit.db.models with
goosebit.db.config.TORTOISE_CONF, so GOOSEBIT_DB_URI must be the server's, as goosebit.sh sets).

Writes that concern a *device* go through the running server's management API
(PUT/PATCH /api/v1/devices, logged in as a user this script creates): gooseBit caches Device rows
in memory for 10 minutes (aiocache in DeviceManager.get_device), so a device row changed behind
its back is not seen by the DDI endpoints. Software and Hardware rows are not cached and are
created through the ORM, because the upload API only accepts .swu/.raucb images.

  init                                   create the schema and the API user (goosebit.sh start does it)
  assign --device ID --file PATH --version V [--model M --revision R]
  force  --device ID [--off]             force_update: offer the assigned software again after an error
  token  --device ID --token T           set the device's TargetToken (creates the device if needed)
  device --device ID                     JSON of what the server stored about the device
  devices                                JSON list of all devices
"""
from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import secrets
import shutil
import sys
import urllib.parse
import urllib.request
from pathlib import Path

from tortoise import Tortoise

from goosebit.db.config import TORTOISE_CONF
from goosebit.db.models import Device, Hardware, Software, User, UpdateModeEnum, UpdateStateEnum
from goosebit.settings import PWD_CXT  # type: ignore[attr-defined]

API_USER = "ddi-test@localhost"


def fail(msg: str) -> None:
    print(f"goosebit_ctl: {msg}", file=sys.stderr)
    sys.exit(1)


def server_url(state_dir: Path) -> str:
    env = state_dir / "server.env"
    if not env.exists():
        fail(f"{env} missing: is the server started?")
    for line in env.read_text().splitlines():
        if line.startswith("url="):
            return line[4:]
    fail(f"no url= in {env}")
    return ""


def api_password(state_dir: Path) -> str:
    return (state_dir / "api_password").read_text().strip()


def http(method: str, url: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def api_login(state_dir: Path) -> str:
    url = server_url(state_dir)
    form = urllib.parse.urlencode({"username": API_USER, "password": api_password(state_dir)}).encode()
    code, body = http("POST", f"{url}/login", form, {"Content-Type": "application/x-www-form-urlencoded"})
    if code != 200:
        fail(f"login failed: {code} {body!r}")
    return str(json.loads(body)["access_token"])


def api_devices(state_dir: Path, method: str, payload: dict) -> None:
    url = server_url(state_dir)
    token = api_login(state_dir)
    code, body = http(
        method,
        f"{url}/api/v1/devices",
        json.dumps(payload).encode(),
        {"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
    )
    if code != 200:
        fail(f"{method} /api/v1/devices {payload} -> {code} {body!r}")


async def cmd_init(args: argparse.Namespace) -> dict:
    await Tortoise.generate_schemas(safe=True)
    pw_file = args.dir / "api_password"
    if not pw_file.exists():
        pw_file.write_text(secrets.token_hex(16) + "\n")
        pw_file.chmod(0o600)
    if await User.get_or_none(username=API_USER) is None:
        await User.create(username=API_USER, hashed_pwd=PWD_CXT.hash(api_password(args.dir)), permissions=["*"])
    return {"schema": "ok", "api_user": API_USER}


def file_hashes(path: Path) -> tuple[str, int]:
    h = hashlib.sha1()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


async def cmd_assign(args: argparse.Namespace) -> dict:
    src = Path(args.file).resolve()
    sha1, size = file_hashes(src)
    # Store the file the way gooseBit's own upload does: <artifacts>/<sha1>/<name>, file:// URI.
    dest = Path(os.environ["GOOSEBIT_ARTIFACTS_DIR"]) / sha1 / src.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    if not dest.exists():
        shutil.copyfile(src, dest)
    uri = dest.resolve().as_uri()

    device = await Device.get_or_none(id=args.device).prefetch_related("hardware")
    if args.model is not None or args.revision is not None:
        hw = (await Hardware.get_or_create(model=args.model or "default", revision=args.revision or "default"))[0]
    elif device is not None:
        hw = device.hardware
    else:
        # what gooseBit gives a device it registers without configData hw_boardname/hw_revision
        hw = (await Hardware.get_or_create(model="default", revision="default"))[0]

    software = await Software.get_or_none(uri=uri, version=args.version)
    if software is None:
        software = await Software.create(uri=uri, size=size, hash=sha1, version=args.version)
    await software.compatibility.add(hw)
    if device is not None and device.hardware.id != hw.id:
        # gooseBit refuses (422) to assign software not compatible with the device's hardware.
        await software.compatibility.add(device.hardware)
    await Tortoise.close_connections()

    # PUT creates the device if needed (DeviceManager.get_device), like its first poll would.
    api_devices(args.dir, "PUT", {"devices": [args.device], "software": str(software.id)})
    return {
        "device": args.device,
        "action_id": software.id,
        "software_id": software.id,
        "version": args.version,
        "sha1": sha1,
        "size": size,
        "uri": uri,
        "hardware": {"model": hw.model, "revision": hw.revision},
    }


async def cmd_force(args: argparse.Namespace) -> dict:
    await Tortoise.close_connections()
    api_devices(args.dir, "PATCH", {"devices": [args.device], "force_update": not args.off})
    return {"device": args.device, "force_update": not args.off}


async def cmd_token(args: argparse.Namespace) -> dict:
    await Tortoise.close_connections()
    api_devices(args.dir, "PUT", {"devices": [args.device], "auth_token": args.token})
    return {"device": args.device, "auth_token": args.token}


def access_log(state_dir: Path, dev_id: str) -> list[str]:
    """uvicorn's access lines (method, path, status) for this device, and gooseBit's own log lines
    naming it: the only per-request trace gooseBit keeps; the DB holds only the latest state."""
    log = state_dir / "server.log"
    if not log.exists():
        return []
    needle_path = f"/controller/v1/{dev_id}"
    needle_dev = f"device={dev_id}"
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if needle_path in line or needle_dev in line:
            out.append(line.strip())
    return out


async def device_json(dev: Device, state_dir: Path) -> dict:
    await dev.fetch_related("hardware", "assigned_software")
    sw = dev.assigned_software
    return {
        "id": dev.id,
        "exists": True,
        "last_state": int(dev.last_state),
        "last_state_name": UpdateStateEnum(dev.last_state).name.lower(),
        "update_mode": UpdateModeEnum(dev.update_mode).name.lower(),
        "force_update": dev.force_update,
        "sw_version": dev.sw_version,
        "progress": dev.progress,
        # gooseBit keeps no per-feedback history: each feedback's status.details are joined with
        # "\n" and appended here; the first `proceeding` of an update clears it.
        "last_log": dev.last_log,
        "last_log_lines": (dev.last_log or "").splitlines(),
        "hardware": {"model": dev.hardware.model, "revision": dev.hardware.revision} if dev.hardware else None,
        "assigned_software": (
            {"id": sw.id, "version": sw.version, "sha1": sw.hash, "size": sw.size, "uri": sw.uri} if sw else None
        ),
        "auth_token": dev.auth_token,
        "last_seen": dev.last_seen,
        "last_ip": dev.last_ip,
        "requests": access_log(state_dir, dev.id),
    }


async def cmd_device(args: argparse.Namespace) -> dict:
    dev = await Device.get_or_none(id=args.device)
    if dev is None:
        return {"id": args.device, "exists": False, "requests": access_log(args.dir, args.device)}
    return await device_json(dev, args.dir)


async def cmd_devices(args: argparse.Namespace) -> list:
    return [await device_json(d, args.dir) for d in await Device.all()]


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, required=True, help="the server's state dir (goosebit.sh start DIR)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("init")
    a = sub.add_parser("assign")
    a.add_argument("--device", required=True)
    a.add_argument("--file", required=True)
    a.add_argument("--version", required=True)
    a.add_argument("--model")
    a.add_argument("--revision")
    f = sub.add_parser("force")
    f.add_argument("--device", required=True)
    f.add_argument("--off", action="store_true")
    t = sub.add_parser("token")
    t.add_argument("--device", required=True)
    t.add_argument("--token", required=True)
    d = sub.add_parser("device")
    d.add_argument("--device", required=True)
    sub.add_parser("devices")
    args = ap.parse_args()
    args.dir = args.dir.resolve()

    await Tortoise.init(config=TORTOISE_CONF)
    try:
        handler = {
            "init": cmd_init,
            "assign": cmd_assign,
            "force": cmd_force,
            "token": cmd_token,
            "device": cmd_device,
            "devices": cmd_devices,
        }[args.cmd]
        result = await handler(args)
    finally:
        await Tortoise.close_connections()
    print(json.dumps(result, indent=2, sort_keys=True))


if __name__ == "__main__":
    asyncio.run(main())
