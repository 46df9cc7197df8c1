"""The benchmark behind bench/run.sh. See the README's Performance section.

Every timed run starts from the same state: the target holds the old version, the page
cache is warm, and nothing is dirty (a `sync` before the clock starts). Each timing includes
a final `sync`, as the peers' numbers in ../shared/research/peers.md do. Ratios are taken
against `cp` + `sync` measured in the same invocation, on the same filesystem.

"written MiB" / "written / changed" (install and rollback rows, as root): the bytes the loop
device under the workspace's filesystem received during each timed command, its final `sync`
included (field 7 of /sys/block/<loopN>/stat, 512-byte sectors, read after the first `sync`
and after the last): file data, the filesystem's metadata and its journal, and for
tope-updater its state dir (journal.redb, the plan copy, the backup store), which the bench
keeps on the same filesystem. The median over the runs (range if they differ), and that over
the changed content: the summed sizes of the new version's files whose content differs from
the old version's (all of them in both profiles). 1.00 × is the floor for a full-file update.

Free page reporting (as root, for the run, restored after): this machine is a VM whose
virtio-balloon reports the guest's free memory to the host in 2 MiB blocks, which the host then
takes back; the next write into such memory (a new page-cache page for a file being written)
waits for the host to fault it in again. Measured on this machine kind (firmware profile,
2026-12-06): with reporting on, every other install took 0.73 s instead of 0.10 s in staging
(`perf`: the time in copy_folio_from_iter_atomic, the copy into fresh page-cache pages), and
OSTree's runs split the same way, depending on whether the host had taken back the memory the
previous row freed; cp, which overwrites files and so reuses the pages it just freed, barely
did. A device has no hypervisor under it, so the bench turns reporting off
(`page_reporting.page_reporting_order` above the largest buddy order) and touches 2 GiB once,
so that every row allocates memory the host already backs. The report's first line says
whether it could.
"""

import argparse, hashlib, http.server, json, os, random, re, shutil, socketserver, statistics, subprocess, tempfile, threading, time, urllib.request, zipfile

MiB = 1024 * 1024
SETTLE_S = 1.0


PAGE_REPORTING_ORDER = "/sys/module/page_reporting/parameters/page_reporting_order"


def no_reporting_order():
    """An order above the kernel's largest buddy order (MAX_PAGE_ORDER, 10 on x86 but a build
    option), so that no free block is ever large enough to be reported: /proc/buddyinfo has
    one count per order, 0 to MAX_PAGE_ORDER."""
    with open("/proc/buddyinfo") as f:
        counts = f.readline().split(",", 1)[1].split()[2:]  # "zone", its name, then the counts
    return str(len(counts))


class HostMemoryPinned:
    """Free page reporting off for the bench's lifetime (see the module docstring), then back
    to its old order. `state` is what the report says about it."""

    def __init__(self):
        self.old = None
        try:
            with open(PAGE_REPORTING_ORDER) as f:
                self.old = f.read().strip()
        except OSError:
            self.state = "free page reporting: not in this kernel"
            return
        try:
            order = no_reporting_order()
            with open(PAGE_REPORTING_ORDER, "w") as f:
                f.write(order)
        except OSError as e:
            self.old, self.state = None, f"free page reporting: on (could not turn it off: {e.strerror}; new files' timings may swing)"
            return
        # 2 GiB touched and freed: host-backed pages at the head of the free lists.
        sh(["dd", "if=/dev/zero", "of=/dev/null", "bs=2G", "count=1", "iflag=fullblock", "status=none"])
        self.state = f"free page reporting: off for the run (order {order}; {self.old} restored after)"

    def close(self):
        if self.old is not None:
            with open(PAGE_REPORTING_ORDER, "w") as f:
                f.write(self.old)


def sh(cmd):
    return subprocess.run(cmd, shell=isinstance(cmd, str), check=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def timed(cmd):
    """Wall time of `cmd` followed by `sync`, starting with nothing dirty, after a pause that
    lets the shared host's disk absorb what the previous command wrote (without it, whichever
    command ran right after a large write paid for it). Also leaves in LAST_WRITTEN the bytes
    the workspace's block device received from the start of `cmd` to the end of its `sync`
    (None without a loop device): everything the command wrote, the filesystem's metadata
    and journal included, and nothing its setup wrote (flushed by the first `sync`)."""
    global LAST_WRITTEN
    sh("sync")
    time.sleep(SETTLE_S)
    before = DEVICE.written() if DEVICE else None
    t = time.perf_counter()
    sh(cmd)
    sh("sync")
    dt = time.perf_counter() - t
    LAST_WRITTEN = DEVICE.written() - before if DEVICE else None
    return dt


class DeviceCounter:
    """Bytes written so far to the block device a filesystem is mounted from: field 7 of
    /sys/block/<loopN>/stat (sectors written, 512-byte units). The device is found from the
    mount itself (/proc/self/mountinfo: the mount point's device number, which must be the
    one stat() gives for it) and must be a loop device backed by `image`, so that nothing
    but the workspace's filesystem is counted."""

    def __init__(self, mount, image):
        mount = os.path.realpath(mount)
        dev = os.stat(mount).st_dev
        majmin = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo") as f:
            found = [l.split() for l in f if l.split()[4] == mount]
        if not found or found[-1][2] != majmin:
            raise SystemExit(f"bench: {mount} is not a mount point of device {majmin} (mountinfo: {found})")
        self.name = os.path.basename(os.path.realpath(f"/sys/dev/block/{majmin}"))
        if not self.name.startswith("loop"):
            raise SystemExit(f"bench: {mount} is on {self.name}, not a loop device")
        with open(f"/sys/block/{self.name}/loop/backing_file") as f:
            backing = f.read().strip()
        if os.path.realpath(backing) != os.path.realpath(image):
            raise SystemExit(f"bench: /dev/{self.name} is backed by {backing}, not {image}")
        self.st_dev, self.stat = dev, f"/sys/block/{self.name}/stat"

    def written(self):
        with open(self.stat) as f:
            return int(f.read().split()[6]) * 512


DEVICE = None  # the workspace's DeviceCounter (main sets it), None when not on a loop device
LAST_WRITTEN = None


class Workspace:
    """A loop-mounted ext4 (root) or a temporary directory."""

    def __init__(self, size_gib, prefill):
        self.base = tempfile.mkdtemp(prefix="tope-bench.")
        self.mount = self.counter = None
        if os.geteuid() == 0 and shutil.which("mkfs.ext4"):
            img = os.path.join(self.base, "fs.img")
            if prefill:
                # Every block of the image written once. Over a sparse file, the first write to
                # each block pays the host's block allocation, which made timings of the same
                # command swing 4× from run to run. nodiscard keeps mkfs from punching the
                # blocks out again.
                sh(["dd", "if=/dev/zero", f"of={img}", "bs=8M", f"count={size_gib * 128}", "oflag=direct", "status=none"])
            else:
                sh(["truncate", "-s", f"{size_gib}G", img])
            sh(["mkfs.ext4", "-q", "-F", "-b", "4096", "-E", "lazy_itable_init=0,lazy_journal_init=0,nodiscard", img])
            self.dir = os.path.join(self.base, "mnt")
            os.mkdir(self.dir)
            sh(["mount", "-o", "loop", img, self.dir])
            self.mount = self.dir
            self.counter = DeviceCounter(self.dir, img)
            self.kind = f"ext4 on a loop device ({size_gib} GiB image)"
        else:
            self.dir = os.path.join(self.base, "dir")
            os.mkdir(self.dir)
            self.kind = "temporary directory (not root: no loop mount)"

    def close(self):
        if self.mount:
            subprocess.run(["umount", self.mount])
        shutil.rmtree(self.base, ignore_errors=True)


def tree_digest(root):
    """Relative path -> sha256 of every file under root: a row counts only if it installed the
    new content (as ../shared/research/peers.md checks every peer's run)."""
    out = {}
    for d, _, fs in os.walk(root):
        for f in fs:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.file_digest(fh, "sha256").hexdigest()
    return out


def changed_bytes(old, new, after=None):
    """The changed content of an update: the sizes of the new version's files whose content
    differs from the old version's file at the same path (or that have none), their count, and
    the number of files. `after`: tree_digest(new), when already taken."""
    before, after = tree_digest(old), after or tree_digest(new)
    changed = [rel for rel, h in after.items() if before.get(rel) != h]
    return sum(os.path.getsize(os.path.join(new, rel)) for rel in changed), len(changed), len(after)


def make_legacy(src, dst):
    """The same package as the Python service's packages were: no blake3 in its manifest
    (nothing pinned), so planning reads and hashes the whole package before staging."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename == "manifest.json":
                m = json.loads(data)
                for mod in m["modules"]:
                    mod.pop("blake3", None)
                    mod.pop("files", None)
                data = json.dumps(m).encode()
            zout.writestr(info, data)


# The atomic-copy floor: every file copied into a new file beside its target, then every one
# renamed over it (readers never see a torn file), then the timed `sync`. No journal, no backup.
CP_RENAME = """import os, shutil, sys
src, dst = sys.argv[1:3]
done = []
for d, _, fs in os.walk(src):
    for f in fs:
        t = os.path.join(dst, os.path.relpath(os.path.join(d, f), src))
        os.makedirs(os.path.dirname(t), exist_ok=True)
        shutil.copyfile(os.path.join(d, f), t + ".new")
        done.append(t)
for t in done:
    os.rename(t + ".new", t)
"""


def gen_many(dirpath, n, seed):
    r = random.Random(seed)
    for i in range(n):
        p = os.path.join(dirpath, f"d{i % 10}", f"e{(i // 10) % 10}", f"f{i}.bin")
        os.makedirs(os.path.dirname(p), exist_ok=True)
        with open(p, "wb") as f:
            f.write(r.randbytes(r.randint(4096, 65536)))


def gen_big(dirpath, count, size):
    os.makedirs(dirpath, exist_ok=True)
    for i in range(count):
        with open(os.path.join(dirpath, f"img{i}"), "wb") as f, open("/dev/urandom", "rb") as u:
            left = size
            while left:
                chunk = u.read(min(left, 8 * MiB))
                f.write(chunk)
                left -= len(chunk)


class Profile:
    """One payload: old and new versions at the same paths, a package, a device config."""

    def __init__(self, ws, binary, name, make_old, make_new, layout="dir-module"):
        self.bin, self.name = binary, name
        self.root = os.path.join(ws.dir, name)
        self.old = os.path.join(self.root, "old")  # pristine copy of the old version
        self.src = os.path.join(self.root, "src")  # pack input: manifest + modules/app/...
        self.target = os.path.join(self.root, "device", "app")
        self.baseline = os.path.join(self.root, "baseline", "app")
        self.atomic = os.path.join(self.root, "atomic", "app")
        self.unzip_dir = os.path.join(self.root, "unzipdir")
        self.pkg = os.path.join(self.root, "pkg.zip")
        self.cfg = os.path.join(self.root, "config.toml")
        make_old(self.old)
        make_new(os.path.join(self.src, "modules", "app"))
        if layout == "dir-module":
            mods = [{"name": "app", "src": "modules/app/", "dst": self.target}]
        else:
            mods = []
            base = os.path.join(self.src, "modules", "app")
            for d, _, files in os.walk(base):
                for f in files:
                    rel = os.path.relpath(os.path.join(d, f), base)
                    mods.append({"name": rel, "src": "modules/app/" + rel, "dst": os.path.join(self.target, rel)})
        with open(os.path.join(self.src, "manifest.json"), "w") as f:
            json.dump({"version": "2.0.0", "modules": mods}, f)
        with open(self.cfg, "w") as f:
            f.write(f'state_dir = "{self.root}/state"\nallowed_roots = ["{self.root}/device"]\nservice_manager = "none"\n')
        sh([binary, "pack", self.src, "-o", self.pkg])
        self.legacy_pkg = os.path.join(self.root, "pkg-legacy.zip")
        make_legacy(self.pkg, self.legacy_pkg)
        self.has_ostree = self.ostree_setup()
        self.reset_copy(self.target)
        self.tu("recover")  # creates the journal: a one-time cost, not part of an install
        # The journal, the plan copy and the backups are part of what an install writes: the
        # state dir must be on the counted device, as the targets and the staged files are.
        if ws.counter:
            for d in (os.path.join(self.root, "state"), self.target):
                if os.stat(d).st_dev != ws.counter.st_dev:
                    raise SystemExit(f"bench: {d} is not on the measured filesystem {ws.dir}")

    def remove(self):
        """Frees its space for the next profile (the 1 GiB ones need it)."""
        shutil.rmtree(self.root, ignore_errors=True)

    def tu(self, *args):
        return sh([self.bin, "--config", self.cfg, "--log-level", "warn", *args])

    def reset_copy(self, dest):
        shutil.rmtree(dest, ignore_errors=True)
        shutil.copytree(self.old, dest)

    def run_cp(self):
        self.reset_copy(self.baseline)
        return timed(f"cp -r '{self.src}/modules/app/.' '{self.baseline}/'")

    def run_cp_rename(self):
        self.reset_copy(self.atomic)
        return timed(["python3", "-c", CP_RENAME, f"{self.src}/modules/app", self.atomic])

    def ostree_setup(self):
        """OSTree as a device would use it (peers.md, "pull-checkout"): the update is a
        repository holding the new tree's commit (an archive repo, as servers publish); the
        device's bare repo already holds the old tree's commit."""
        if not shutil.which("ostree"):
            return False
        self.os_src = os.path.join(self.root, "ostree-src")
        self.os_dev0 = os.path.join(self.root, "ostree-dev0")  # pristine: the old commit only
        self.os_dev = os.path.join(self.root, "ostree-dev")
        self.os_co = os.path.join(self.root, "ostree-checkout")
        sh(["ostree", f"--repo={self.os_src}", "init", "--mode=archive"])
        sh(["ostree", f"--repo={self.os_src}", "commit", "-b", "app", f"--tree=dir={self.src}/modules/app"])
        sh(["ostree", f"--repo={self.os_dev0}", "init", "--mode=bare"])
        sh(["ostree", f"--repo={self.os_dev0}", "commit", "-b", "app", f"--tree=dir={self.old}"])
        return True

    def run_ostree(self):
        """Timed: `ostree pull-local` of the new commit into the device's repo, then a
        (hardlink) checkout of it, then `sync`."""
        for d in (self.os_dev, self.os_co):
            shutil.rmtree(d, ignore_errors=True)
        sh(["cp", "-a", self.os_dev0, self.os_dev])
        return timed(f"ostree --repo='{self.os_dev}' pull-local '{self.os_src}' app && ostree --repo='{self.os_dev}' checkout app '{self.os_co}'")

    def run_unzip(self):
        self.reset_copy(os.path.join(self.unzip_dir, "modules", "app"))
        return timed(f"unzip -o -q '{self.pkg}' -d '{self.unzip_dir}'")

    def reset_device(self):
        """The device back at the old version, the store emptied."""
        st = json.loads(self.tu("status", "--json").stdout)
        if st["current"] is not None:
            self.tu("rollback", "--to", "factory")
        self.tu("gc")

    def run_install(self, cold=False, legacy=False):
        """An update of the old version. Warm (the default, a device's steady state): the old
        files are ones tope-updater verified (here: restored by the rollback), so their hashes
        come from the known-file records. Cold: the old files are fresh copies nobody
        verified (a device's first update), so every old file is read and hashed. Legacy: the
        package pins no hash (as every package the Python service took)."""
        self.reset_device()
        if cold:
            self.reset_copy(self.target)
        pkg = self.legacy_pkg if legacy else self.pkg
        return timed([self.bin, "--config", self.cfg, "--log-level", "warn", "install", pkg])

    def run_rollback(self):
        """Rollback of the install, timed (the install itself is not)."""
        self.reset_device()
        self.tu("install", self.pkg)
        return timed([self.bin, "--config", self.cfg, "--log-level", "warn", "rollback"])

    def syscalls(self):
        self.reset_device()
        sh("sync")
        trace = os.path.join(self.root, "strace.txt")
        sh(["strace", "-f", "-c", "-o", trace, "-e", "trace=fsync,fdatasync,syncfs,sync,sync_file_range,rename,renameat,renameat2,link,linkat",
            self.bin, "--config", self.cfg, "--log-level", "warn", "install", self.pkg])
        counts = {}
        for line in open(trace):
            parts = line.split()
            if len(parts) >= 5 and parts[-1].isidentifier() and parts[3].isdigit():
                counts[parts[-1]] = int(parts[3])
        hist = json.loads(self.tu("history", "--json").stdout)
        return {
            "fsync": counts.get("fsync", 0),
            "fdatasync": counts.get("fdatasync", 0),
            "syncfs": counts.get("syncfs", 0) + counts.get("sync", 0),
            "rename": sum(counts.get(k, 0) for k in ("rename", "renameat", "renameat2")),
            "link": sum(counts.get(k, 0) for k in ("link", "linkat")),
            "commits": hist[0]["commits"],
        }


SERVICES = ("tbsvc-a", "tbsvc-b", "tbsvc-c")
# A service as the process backend sees it (its comm is the script's name): it logs when it
# starts and when SIGTERM stops it, then exits. The time comes from bash's $EPOCHREALTIME, not
# from `$(date)`: the fork of a command substitution has the service's comm until it execs,
# so the engine's stop (every process of that comm) could kill it and leave "stop" without a
# time (seen on a loaded machine).
SERVICE_SCRIPT = """#!/bin/bash
LC_ALL=C  # a decimal point in $EPOCHREALTIME
echo "start $EPOCHREALTIME" >>'{log}'
trap 'echo "stop $EPOCHREALTIME" >>"{log}"; exit 0' TERM
while :; do sleep 0.02; done
"""


def downtime_bench(ws, binary, runs, settle_ms, size):
    """Service downtime, the number a device's users feel: from the first service stopped to
    the last one running again (from the services' own logs), for an install of three modules
    each owned by a service (process backend, real processes), against stopping and starting
    the same three services by hand with nothing installed. Both wait `settle_ms` after each
    start, as the engine's `start_settle_ms` does. Returns (install downtimes, baseline)."""
    root = os.path.join(ws.dir, "downtime")
    logs, bindir = os.path.join(root, "log"), os.path.join(root, "bin")
    os.makedirs(logs)
    os.makedirs(bindir)
    old, src = os.path.join(root, "old"), os.path.join(root, "src")
    device = os.path.join(root, "device")
    mods, services_cfg = [], ""
    for i, svc in enumerate(SERVICES):
        gen_big(os.path.join(old, svc), 1, size)
        gen_big(os.path.join(src, svc), 1, size)
        script = os.path.join(bindir, svc)
        with open(script, "w") as f:
            f.write(SERVICE_SCRIPT.format(log=os.path.join(logs, svc)))
        os.chmod(script, 0o755)
        mods.append({"name": svc, "src": f"{svc}/", "dst": os.path.join(device, svc), "process_name": svc, "restart_order": i + 1})
        services_cfg += f'[services.{svc}]\nstart = "{script}"\n'
    with open(os.path.join(src, "manifest.json"), "w") as f:
        json.dump({"version": "2.0.0", "modules": mods}, f)
    cfg = os.path.join(root, "config.toml")
    with open(cfg, "w") as f:
        f.write(f'state_dir = "{root}/state"\nallowed_roots = ["{device}"]\nservice_manager = "process"\n'
                f"start_settle_ms = {settle_ms}\n{services_cfg}")
    pkg = os.path.join(root, "pkg.zip")
    sh([binary, "pack", src, "-o", pkg])
    shutil.copytree(old, device)
    tu = lambda *args: sh([binary, "--config", cfg, "--log-level", "warn", *args])

    def pids(svc):
        out = []
        for p in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{p}/stat") as f:
                    stat = f.read()
            except OSError:
                continue  # exited while we looked
            # "PID (COMM) STATE ...": a zombie has stopped (as the engine's backend counts it).
            comm, state = stat[stat.index("(") + 1 : stat.rindex(")")], stat[stat.rindex(")") + 2]
            if comm == svc and state != "Z":
                out.append(int(p))
        return out

    def running(svc):
        return bool(pids(svc))

    def signal_all(svc, sig):
        for p in pids(svc):
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass

    def launch(svc):
        # Detached through a shell that exits at once: init reaps the service, not us.
        sh(f"setsid '{os.path.join(bindir, svc)}' </dev/null >/dev/null 2>&1 &")

    def start_all():
        for svc in SERVICES:
            if not running(svc):
                launch(svc)
        while not all(running(s) for s in SERVICES):
            time.sleep(0.01)

    def downtime():
        stops, starts = [], []
        for svc in SERVICES:
            for line in open(os.path.join(logs, svc)):
                what, t = line.split()
                (stops if what == "stop" else starts).append(float(t))
        if len(stops) != len(SERVICES) or len(starts) != len(SERVICES):
            raise SystemExit(f"bench: downtime: expected one stop and one start per service, got {len(stops)} and {len(starts)}")
        return max(starts) - min(stops)

    def fresh_logs():
        for svc in SERVICES:
            open(os.path.join(logs, svc), "w").close()

    def install():
        st = json.loads(tu("status", "--json").stdout)
        if st["current"] is not None:
            tu("rollback", "--to", "factory")
        start_all()
        sh("sync")
        fresh_logs()
        tu("install", pkg)
        return downtime()

    def by_hand():
        start_all()
        sh("sync")
        fresh_logs()
        for svc in reversed(SERVICES):  # stops in reverse restart order, as the engine does
            signal_all(svc, 15)
            while running(svc):
                time.sleep(0.02)
        for svc in SERVICES:
            launch(svc)
            while not running(svc):
                time.sleep(0.02)
            time.sleep(settle_ms / 1000)
        return downtime()

    tu("recover")
    ins, base = [], []
    try:
        for r in range(runs):
            for out, step in ([(ins, install), (base, by_hand)] if r % 2 == 0 else [(base, by_hand), (ins, install)]):
                out.append(step())
    finally:
        for svc in SERVICES:
            signal_all(svc, 9)
    return ins, base


def api(port, method, path, body=None):
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if data is not None else {}
    req = urllib.request.Request(f"http://127.0.0.1:{port}/api/v1.0{path}", data=data, method=method, headers=headers)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def wait_stage(port, want, limit_s=600):
    end = time.time() + limit_s
    while time.time() < end:
        r = api(port, "GET", "/progress")
        stage = r.get("data", {}).get("stage") or r.get("stage")
        if stage in want:
            return stage, r
        time.sleep(0.05)
    raise RuntimeError(f"stage never reached {want}")


def daemon_bench(ws, binary, load_bin, size):
    """The daemon downloads and installs a `size` package under /usr/bin/time -v while a load
    client polls GET /progress at 1000 req/s: latency while installing, and peak RSS."""
    prof = Profile(ws, binary, "daemon", lambda d: os.makedirs(d, exist_ok=True), lambda d: gen_big(d, 4, size // 4))
    shutil.rmtree(prof.target, ignore_errors=True)
    md5 = hashlib.md5()
    with open(prof.pkg, "rb") as f:
        for chunk in iter(lambda: f.read(8 * MiB), b""):
            md5.update(chunk)
    pkg_dir, pkg_name = os.path.split(prof.pkg)
    handler = lambda *a, **k: http.server.SimpleHTTPRequestHandler(*a, directory=pkg_dir, **k)
    http.server.SimpleHTTPRequestHandler.log_message = lambda *a: None
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with open(prof.cfg, "a") as f:
        f.write('[api]\nlisten = "127.0.0.1:0"\n[download]\nallow_http = true\n[reporter]\nurl = "http://127.0.0.1:9/none"\n')
    d = subprocess.Popen(["/usr/bin/time", "-v", binary, "--config", prof.cfg, "--log-level", "warn", "serve"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = d.stdout.readline()
        port = int(re.search(r":(\d+)", line).group(1))
        req = {"version": "2.0.0", "package_url": f"http://127.0.0.1:{server.server_address[1]}/{pkg_name}", "package_name": pkg_name, "package_size": os.path.getsize(prof.pkg), "package_md5": md5.hexdigest()}
        t = time.perf_counter()
        assert api(port, "POST", "/download", req)["code"] == 200
        stage, progress = wait_stage(port, {"toInstall", "failed"})
        assert stage == "toInstall", f"the download ended in {progress}"
        download_s = time.perf_counter() - t
        load = subprocess.Popen([load_bin, f"127.0.0.1:{port}", "1000", "600"], stdout=subprocess.PIPE, text=True)
        upd = api(port, "POST", "/update", {"version": "2.0.0"})
        assert upd["code"] == 200, f"POST /update answered {upd}"
        stats = json.loads(load.communicate(timeout=900)[0])
        stage, _ = wait_stage(port, {"success", "failed"})
        install_s = time.perf_counter() - t - download_s
    finally:
        # SIGTERM to the daemon itself (the child of /usr/bin/time), which then exits 0.
        subprocess.run(["pkill", "-TERM", "-P", str(d.pid)])
        err = d.communicate(timeout=120)[1]
        server.shutdown()
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    return stats, kib, stage, download_s, install_s


def slow_clients_bench(ws, binary, stalled=1100, polls=20):
    """SPEC §7 "the daemon under slow clients": `serve` under a 1024-fd limit (as the unit sets
    it), `stalled` connections that send half a request head and stall, then GET /progress on
    fresh connections: how long each took, the daemon's open fds and peak RSS, and how long
    SIGTERM takes with the stalled connections still open."""
    import resource
    import socket
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < stalled + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, stalled + 200), hard))
    prof = Profile(ws, binary, "slow-clients", lambda d: os.makedirs(d, exist_ok=True), lambda d: gen_many(d, 1, 1))
    with open(prof.cfg, "a") as f:
        f.write('[api]\nlisten = "127.0.0.1:0"\n[reporter]\nurl = "http://127.0.0.1:9/none"\n')
    d = subprocess.Popen(["/usr/bin/time", "-v", "prlimit", "--nofile=1024:1024", "--", binary, "--config", prof.cfg, "--log-level", "error", "serve"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    socks = []
    try:
        port = int(re.search(r":(\d+)", d.stdout.readline()).group(1))
        for _ in range(stalled):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.sendall(b"GET /api/v1.0/progress HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            socks.append(s)
        answer_ms = []
        for _ in range(polls):
            t = time.perf_counter()
            assert api(port, "GET", "/progress")["code"] == 200
            answer_ms.append((time.perf_counter() - t) * 1000)
        daemon_pid = int(subprocess.run(["pgrep", "-P", str(d.pid)], capture_output=True, text=True).stdout.split()[0])
        fds = len(os.listdir(f"/proc/{daemon_pid}/fd"))
        t = time.perf_counter()
        os.kill(daemon_pid, 15)
        err = d.communicate(timeout=120)[1]
        term_ms = (time.perf_counter() - t) * 1000
    finally:
        for s in socks:
            s.close()
        if d.poll() is None:
            d.kill()
            d.communicate()
    kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", err).group(1))
    return answer_ms, fds, kib, term_ms, d.returncode


def wcols(written, changed):
    """The "written MiB" and "written / changed" cells of a row: the median of the bytes the
    device received per run (with the range when the runs differ), over the changed content."""
    if not written or written[0] is None:
        return "n/a", "n/a"
    lo, med, hi = min(written) / MiB, statistics.median(written) / MiB, max(written) / MiB
    span = f" ({lo:.1f}–{hi:.1f})" if f"{lo:.1f}" != f"{hi:.1f}" else ""
    return f"{med:.1f}{span}", f"{statistics.median(written) / changed:.2f} ×"


def fmt_s(xs):
    return f"{statistics.median(xs):.3f} s ({min(xs):.3f}–{max(xs):.3f})"


def main():
    global SETTLE_S
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--runs", type=int, default=11)
    ap.add_argument("--md", action="store_true")
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--daemon-only", action="store_true", help="only the daemon rows (GET /progress latency, peak RSS)")
    a = ap.parse_args()
    if a.quick:
        SETTLE_S = 0.0
    runs = 2 if a.quick else a.runs
    big = 8 * MiB if a.quick else 64 * MiB
    many = 200 if a.quick else 2000
    rss_bytes = 64 * MiB if a.quick else 1024 * MiB
    global DEVICE
    memory = HostMemoryPinned() if os.geteuid() == 0 else None
    try:
        ws = Workspace(2, prefill=False) if a.quick else Workspace(8, prefill=True)
    except BaseException:
        if memory:
            memory.close()
        raise
    ws.memory = memory.state if memory else "free page reporting: left as it is (not root)"
    DEVICE = ws.counter
    rows = []
    try:
        if a.daemon_only:
            daemon_rows(ws, a, rss_bytes, rows)
            return report(ws, runs, rows, a.md)
        fw = Profile(ws, a.bin, "firmware", lambda d: gen_big(d, 3, big), lambda d: gen_big(d, 3, big))
        sm = Profile(ws, a.bin, "many-small", lambda d: gen_many(d, many, 1), lambda d: gen_many(d, many, 2))
        for prof, label in ((fw, f"3 × {big // MiB} MiB"), (sm, f"{many} files of 4–64 KiB")):
            cp, unz, ins, cold, legacy, cpr, ost = [], [], [], [], [], [], []
            steps = [(cp, prof.run_cp), (unz, prof.run_unzip), (ins, prof.run_install), (cold, lambda: prof.run_install(cold=True)),
                     (legacy, lambda: prof.run_install(legacy=True)), (cpr, prof.run_cp_rename)]
            if prof.has_ostree:
                steps.append((ost, prof.run_ostree))
            written = {id(out): [] for out, _ in steps}  # bytes the device received, per run
            for r in range(runs):
                # Interleaved, so drift hits all of them alike, and in a rotating order, so no
                # command always follows the same one.
                k = r % len(steps)
                for out, step in steps[k:] + steps[:k]:
                    out.append(step())
                    written[id(out)].append(LAST_WRITTEN)
            new_dir = os.path.join(prof.src, "modules", "app")
            want = tree_digest(new_dir)
            checked = [("cp into new files + rename", prof.atomic)] + ([("OSTree checkout", prof.os_co)] if ost else [])
            for what, where in checked:
                if tree_digest(where) != want:
                    raise SystemExit(f"bench: the {what} row did not leave the new content in {where}")
            changed, n_changed, n_files = changed_bytes(prof.old, new_dir, want)
            prof.changed = changed
            base = statistics.median(cp)
            # The ratio of the medians; the range of each run over the baseline's median; the
            # median of each run over the cp run of the same round (slow spells of the shared
            # host's disk hit both); and best over best (the runs least disturbed, as
            # ../shared/research/peers.md compares the peers).
            def ratio(xs):
                paired = statistics.median(x / c for x, c in zip(xs, cp))
                return (
                    f"{statistics.median(xs) / base:.2f} × (runs {min(xs) / base:.2f}–{max(xs) / base:.2f}; "
                    f"paired {paired:.2f} ×; best {min(xs) / min(cp):.2f} ×)"
                )
            w = lambda xs: wcols(written[id(xs)], changed)
            rows.append((f"{label}: changed content (new files whose content differs from the old)", f"{changed / MiB:.1f} MiB in {n_changed} of {n_files} files", "", "", ""))
            rows.append((f"{label}: cp + sync (baseline)", fmt_s(cp), "1.00 ×", *w(cp)))
            rows.append((f"{label}: unzip -o + sync", fmt_s(unz), f"{statistics.median(unz) / base:.2f} ×", *w(unz)))
            rows.append((f"{label}: tope-updater install", fmt_s(ins), ratio(ins), *w(ins)))
            rows.append((f"{label}: tope-updater install, old files never verified", fmt_s(cold), ratio(cold), *w(cold)))
            rows.append((f"{label}: tope-updater install, legacy package (no hashes pinned)", fmt_s(legacy), ratio(legacy), *w(legacy)))
            rows.append((f"{label}: cp into new files + rename + sync (atomic-copy floor)", fmt_s(cpr), ratio(cpr), *w(cpr)))
            if ost:
                rows.append((f"{label}: OSTree pull-local + checkout + sync", fmt_s(ost), ratio(ost), *w(ost)))
            else:
                rows.append((f"{label}: OSTree pull-local + checkout + sync", "n/a (ostree not installed)", ""))
        fw.remove()
        settle = 200
        dt_ins, dt_base = downtime_bench(ws, a.bin, runs, settle, big // 4)
        rows.append((f"service downtime, install of 3 modules × {big // 4 // MiB} MiB owned by 3 services", fmt_s(dt_ins),
                     f"stop + start by hand {fmt_s(dt_base)}; difference {statistics.median(dt_ins) - statistics.median(dt_base):+.3f} s (start_settle_ms = {settle}, both)"))
        rb, rb_w = [], []
        for _ in range(runs):
            rb.append(sm.run_rollback())
            rb_w.append(LAST_WRITTEN)
        rows.append((f"rollback of the {many}-file install", fmt_s(rb), "target < 2 s", *wcols(rb_w, sm.changed)))

        if shutil.which("strace"):
            profiles = [
                (Profile(ws, a.bin, "sys-200", lambda d: gen_many(d, 200, 3), lambda d: gen_many(d, 200, 4)), "200 files, 1 dir module"),
                (sm, f"{many} files, 1 dir module"),
                (Profile(ws, a.bin, "sys-200-mods", lambda d: gen_many(d, 200, 3), lambda d: gen_many(d, 200, 4), layout="file-modules"), "200 single-file modules"),
                (Profile(ws, a.bin, "sys-many-mods", lambda d: gen_many(d, many, 3), lambda d: gen_many(d, many, 4), layout="file-modules"), f"{many} single-file modules"),
            ]
            for prof, label in profiles:
                c = prof.syscalls()
                if prof is not sm:
                    prof.remove()
                rows.append((f"per install, {label}", f"fsync {c['fsync']}, fdatasync {c['fdatasync']}, syncfs {c['syncfs']}, commits {c['commits']}", f"renames {c['rename']}, links {c['link']}"))
        else:
            rows.append(("syscalls per install", "n/a (strace not installed)", ""))

        rec = []
        for _ in range(max(runs, 20)):
            t = time.perf_counter()
            sm.tu("recover")
            rec.append((time.perf_counter() - t) * 1000)
        rows.append(("recover, nothing in flight", f"{statistics.median(rec):.1f} ms ({min(rec):.1f}–{max(rec):.1f})", "target < 20 ms"))

        if os.path.exists("/usr/bin/time"):
            mem = Profile(ws, a.bin, "rss", lambda d: os.makedirs(d, exist_ok=True), lambda d: gen_big(d, 4, rss_bytes // 4))
            shutil.rmtree(mem.target, ignore_errors=True)
            out = subprocess.run(["/usr/bin/time", "-v", a.bin, "--config", mem.cfg, "--log-level", "warn", "install", mem.pkg], stderr=subprocess.PIPE, stdout=subprocess.PIPE, text=True, check=True)
            kib = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", out.stderr).group(1))
            rows.append((f"peak RSS installing a {rss_bytes // MiB} MiB package", f"{kib / 1024:.1f} MiB", "target < 32 MiB"))
            mem.remove()
        else:
            rows.append(("peak RSS", "n/a (/usr/bin/time not installed)", ""))
        rows.append(("release binary (stripped by the profile)", f"{os.path.getsize(a.bin) / MiB:.2f} MiB", "target < 10 MiB"))
        daemon_rows(ws, a, rss_bytes, rows)
    finally:
        ws.close()
        if memory:
            memory.close()
    report(ws, runs, rows, a.md)


def daemon_rows(ws, a, rss_bytes, rows):
    load_bin = os.path.join(os.path.dirname(a.bin), "examples", "progress_load")
    if os.path.exists("/usr/bin/time") and os.path.exists(load_bin):
        stats, kib, stage, dl_s, in_s = daemon_bench(ws, a.bin, load_bin, rss_bytes)
        rows.append((f"GET /progress while installing {rss_bytes // MiB} MiB", f"p50 {stats['p50_us']:.0f} µs, p99 {stats['p99_us']:.0f} µs, max {stats['max_us']:.0f} µs", f"{stats['installing']} requests at {stats['rate']:.0f}/s; target p99 < 1 ms"))
        rows.append((f"daemon peak RSS, {rss_bytes // MiB} MiB download + install", f"{kib / 1024:.1f} MiB", f"download {dl_s:.1f} s, install {in_s:.1f} s ({stage}); target < 32 MiB"))
    else:
        rows.append(("GET /progress under load", "n/a (/usr/bin/time or the progress_load example missing)", ""))
    if os.path.exists("/usr/bin/time") and shutil.which("prlimit"):
        ms, fds, kib, term_ms, rc = slow_clients_bench(ws, a.bin)
        rows.append(("GET /progress with 1100 stalled connections, fd limit 1024", f"{statistics.median(ms):.1f} ms (max {max(ms):.1f}), {len(ms)} polls", f"daemon fds {fds}; target: answers (within the 5 s header timeout)"))
        rows.append(("daemon peak RSS / SIGTERM with 1100 stalled connections", f"{kib / 1024:.1f} MiB / {term_ms:.0f} ms (exit {rc})", "target < 32 MiB / promptly"))
    else:
        rows.append(("daemon under slow clients", "n/a (/usr/bin/time or prlimit missing)", ""))


def report(ws, runs, rows, md):
    dev = (f"bytes written: /sys/block/{ws.counter.name}/stat, from the start of each timed command to the end of its sync"
           if ws.counter else "bytes written: n/a (no loop device)")
    print(f"\nfilesystem: {ws.kind}; {ws.memory}; {runs} runs per timing; median (min–max); every timing ends with sync; {dev}")
    head = ("what", "measured", "written MiB", "written / changed", "ratio / target")
    # Rows are (what, measured, ratio / target[, written MiB, written / changed]); the written
    # columns come before the ratio, whose text is the longest.
    cells = [(r[0], r[1], *(tuple(r[3:5]) + ("", ""))[:2], r[2]) for r in rows]
    if md:
        print("\n| " + " | ".join(head) + " |\n|---|---|---|---|---|")
        for c in cells:
            print("| " + " | ".join(c) + " |")
    else:
        w = [max(len(c[i]) for c in cells + [head]) for i in range(4)]
        for c in [head] + cells:
            print(f"{c[0]:<{w[0]}}  {c[1]:<{w[1]}}  {c[2]:>{w[2]}}  {c[3]:>{w[3]}}  {c[4]}")


if __name__ == "__main__":
    main()
