"""Endurance benchmark: thousands of updates of one application, with flash-wear measurement.

    bench/run.sh --endurance [--quick] [--updates N] [--rollback-every K] [--report-every M]
                             [--keep-generations G] [--md] [--strict] [--seed S]

The application: a 200 KiB binary (a single-file module) and a directory module of 40 pages
of 1-8 KiB. Every update changes every file (version-stamped pseudo-random content,
deterministic by seed; each file keeps its size, so every version has the same content size).
Before the first install the device holds a factory version of the same files. Versions go
1.0.0, 1.0.1, ..., 1.0.999, 1.1.0, ... Every K-th install is followed by `rollback`.

Every M updates it prints a row: the state dir's size (allocated, st_blocks * 512, and
apparent, each inode once), journal.redb, the backup store as `status --json` shows it, what
the interval's transactions freed (`history --json`), the interval's median install and
rollback wall time, `recover` with nothing in flight (median of 3), and the write
amplification of the interval: bytes the filesystem wrote to the block device (the loop
device's /sys/block/loopN/stat sectors written, read after `sync`) per byte of new file content
installed. The interval's rollbacks are in the numerator, not in the denominator (the
summary also gives the figure with the rolled-back-to content counted as payload). Packages
are generated and packed outside the measured filesystem (in the workspace's temp dir), each
just before its install, and deleted after it, so the device counter sees only the updater.
Once at the start, `cp` of the same new files over the old ones + `sync` on the same
filesystem gives the baseline amplification.

At the end: first vs last interval, the largest state dir seen, and the stated bound: the
state dir stays under factory + keep_generations x one version's content + one more version
(collection runs after the commit) + 4 MiB (a generous journal ceiling). PASS/FAIL; the exit
status is 0 either way unless --strict. SIGINT/SIGTERM stop after the current step and print
the summary of what ran.

Without root there is no loop device: the run works in a temporary directory and the write
amplification reads "n/a (not root)".
"""

import argparse, json, os, random, signal, statistics, subprocess, sys, time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import MiB, Workspace, sh  # noqa: E402

KiB = 1024
BLOCK = 4096  # the workspace's ext4 block size (bench.Workspace: mkfs.ext4 -b 4096)
JOURNAL_CEILING = 4 * MiB

STOP = False
DONE = 0  # updates installed so far (for the summary of a run cut short)


def _stop(signum, _frame):
    global STOP
    STOP = True


def version_of(i):
    return f"1.{i // 1000}.{i % 1000}"


def rounded(n):
    return (n + BLOCK - 1) // BLOCK * BLOCK


class App:
    """The application's files: paths relative to the app root and their (fixed) sizes."""

    def __init__(self, seed):
        self.seed = seed
        r = random.Random(seed)
        self.files = [("bin/app", 200 * KiB)] + [(f"pages/p{i:02d}.html", r.randint(1 * KiB, 8 * KiB)) for i in range(40)]
        self.bytes = sum(s for _, s in self.files)
        self.alloc = sum(rounded(s) for _, s in self.files)

    def content(self, version, rel, size):
        stamp = f"{rel} version {version}\n".encode()
        return stamp + random.Random(f"{self.seed}/{version}/{rel}").randbytes(size - len(stamp))

    def write(self, root, version, replace=False):
        """The files of `version` under `root`. `replace`: unlink each old file first (package
        sources; rewriting by truncation makes ext4 flush it on close, auto_da_alloc)."""
        for rel, size in self.files:
            p = os.path.join(root, rel)
            os.makedirs(os.path.dirname(p), exist_ok=True)
            if replace and os.path.exists(p):
                os.unlink(p)
            with open(p, "wb") as f:
                f.write(self.content(version, rel, size))

    def check(self, root, version):
        """Names the first file at `root` that does not hold `version`'s content, or None."""
        for rel, size in self.files:
            with open(os.path.join(root, rel), "rb") as f:
                if f.read() != self.content(version, rel, size):
                    return rel
        return None


class Device:
    """The device (state dir, app dir) on the measured filesystem; package sources outside it."""

    def __init__(self, ws, scratch, binary, app, keep):
        self.bin, self.app = binary, app
        self.root = os.path.join(ws.dir, "endurance")
        self.state = os.path.join(self.root, "state")
        self.target = os.path.join(self.root, "device", "app")
        self.cfg = os.path.join(self.root, "config.toml")
        # Package sources and the package itself: in the scratch dir (a tmpfs inside the
        # workspace when root), not on the measured filesystem, so generating them is neither
        # counted nor flushed by the updater's syncs.
        self.pkgsrc = os.path.join(scratch, "pkgsrc")
        self.pkg = os.path.join(scratch, "pkg.zip")
        os.makedirs(self.pkgsrc)
        with open(os.path.join(self.pkgsrc, "manifest.json.in"), "w") as f:
            json.dump({"modules": [
                {"name": "app-bin", "src": "modules/bin/app", "dst": os.path.join(self.target, "bin", "app")},
                {"name": "app-pages", "src": "modules/pages/", "dst": os.path.join(self.target, "pages")},
            ]}, f)
        os.makedirs(self.root)
        with open(self.cfg, "w") as f:
            f.write(f'state_dir = "{self.state}"\nallowed_roots = ["{self.root}/device"]\nservice_manager = "none"\nkeep_generations = {keep}\n')
        app.write(self.target, "factory")
        self.tu("recover")  # creates the journal

    def tu(self, *args):
        """Runs the CLI; returns its stdout. Its own writes (write_bytes: pages it dirtied,
        before the filesystem's metadata and journal) go to self.last_write_bytes: a reaped
        child's I/O counts are added to its parent's, so this process's /proc/self/io grows by
        the child's (works without root too)."""
        w0 = self_write_bytes()
        r = subprocess.run([self.bin, "--config", self.cfg, "--log-level", "warn", *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        w1 = self_write_bytes()
        self.last_write_bytes = None if w0 is None or w1 is None else w1 - w0
        if r.returncode != 0:
            raise RuntimeError(f"tope-updater {' '.join(args)} exited {r.returncode}:\n{r.stdout}{r.stderr}")
        return r.stdout

    def timed(self, *args):
        """(wall time, the process's write_bytes)."""
        t = time.perf_counter()
        self.tu(*args)
        return time.perf_counter() - t, self.last_write_bytes

    def make_package(self, version):
        self.app.write(os.path.join(self.pkgsrc, "modules"), version, replace=True)
        with open(os.path.join(self.pkgsrc, "manifest.json.in")) as f:
            m = json.load(f)
        m["version"] = version
        with open(os.path.join(self.pkgsrc, "manifest.json"), "w") as f:
            json.dump(m, f)
        sh([self.bin, "pack", self.pkgsrc, "-o", self.pkg])

    def status(self):
        return json.loads(self.tu("status", "--json"))

    def history(self, limit):
        return json.loads(self.tu("history", "--limit", str(limit), "--json"))


def self_write_bytes():
    try:
        with open("/proc/self/io") as f:
            return int(next(line for line in f if line.startswith("write_bytes:")).split()[1])
    except (OSError, StopIteration, ValueError):
        return None


def tree_size(path):
    """(allocated, apparent) bytes of everything under `path`, each inode once, like du."""
    seen, alloc, apparent = set(), 0, 0
    for d, _, files in os.walk(path):
        for p in [d, *(os.path.join(d, f) for f in files)]:
            st = os.lstat(p)
            if (st.st_dev, st.st_ino) in seen:
                continue
            seen.add((st.st_dev, st.st_ino))
            alloc += st.st_blocks * 512
            apparent += st.st_size
    return alloc, apparent


class DeviceCounter:
    """Bytes written to the loop device under the workspace (after `sync`), or None."""

    def __init__(self, ws):
        self.stat = None
        if ws.mount:
            src = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--target", ws.mount], capture_output=True, text=True).stdout.strip()
            name = os.path.basename(src)
            if name.startswith("loop") and os.path.exists(f"/sys/block/{name}/stat"):
                self.stat, self.dev = f"/sys/block/{name}/stat", src

    def read(self):
        if self.stat is None:
            return None
        sh("sync")
        with open(self.stat) as f:
            return int(f.read().split()[6]) * 512


def cp_baseline(ws, scratch, app, counter, rounds):
    """`cp` of a new version's files over the old ones + `sync`: device bytes per payload byte."""
    if counter.stat is None:
        return None
    dst = os.path.join(ws.dir, "cp-baseline")
    src = os.path.join(scratch, "cp-src")
    app.write(dst, "factory")
    written = payload = 0
    for r in range(rounds):
        app.write(src, f"cp-{r}", replace=True)
        before = counter.read()
        sh(["cp", "-r", f"{src}/.", f"{dst}/"])
        written += counter.read() - before
        payload += app.bytes
    assert app.check(dst, f"cp-{rounds - 1}") is None
    sh(["rm", "-rf", dst, src])
    sh("sync")
    return written / payload


def fmt_b(n):
    if n >= MiB:
        return f"{n / MiB:.2f} MiB"
    return f"{n / KiB:.0f} KiB"


def fmt_ms(x):
    return "–" if x is None else f"{x * 1000:.1f}"


def main():
    ap = argparse.ArgumentParser(description="tope-updater endurance benchmark (see the module docstring)")
    ap.add_argument("--bin", required=True)
    ap.add_argument("--updates", type=int, default=10000)
    ap.add_argument("--quick", action="store_true", help="300 updates (CI)")
    ap.add_argument("--rollback-every", type=int, default=10, help="after every K-th install, `rollback` (0: never)")
    ap.add_argument("--report-every", type=int, default=None, help="a row every M updates (default updates/20)")
    ap.add_argument("--keep-generations", type=int, default=3)
    ap.add_argument("--md", action="store_true")
    ap.add_argument("--strict", action="store_true", help="exit 1 when the state dir exceeds the bound")
    ap.add_argument("--seed", type=int, default=1)
    a = ap.parse_args()
    if a.quick:
        a.updates = 300
    if a.keep_generations < 2 and a.rollback_every:
        print("keep_generations 1 keeps no version to roll back to: no rollbacks", flush=True)
        a.rollback_every = 0
    n = a.updates
    every = max(1, a.report_every if a.report_every else n // 20)
    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)

    app = App(a.seed)
    # The state dir may hold: the factory content, keep_generations versions, one more version
    # until the collection at the end of a transaction, and the journal.
    bound_app = app.bytes * (1 + a.keep_generations + 1) + JOURNAL_CEILING
    bound_alloc = app.alloc * (1 + a.keep_generations + 1) + JOURNAL_CEILING

    t_setup = time.perf_counter()
    ws = Workspace(1, prefill=True)
    sh("sync")  # mkfs's buffered writes to the image, so that no install waits on them
    # Package generation happens here: a tmpfs inside the workspace when root (off the measured
    # device and off the host's disk, whose journal commits the loop device's flushes trigger).
    scratch, scratch_mounted = os.path.join(ws.base, "scratch"), False
    rows, failed, cp_wa = [], None, None
    t_start = time.perf_counter()
    try:
        os.mkdir(scratch)
        if ws.mount:
            sh(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", scratch])
            scratch_mounted = True
        counter = DeviceCounter(ws)
        cp_wa = cp_baseline(ws, scratch, app, counter, 5 if a.quick else 20)
        dev = Device(ws, scratch, a.bin, app, a.keep_generations)
        print(f"filesystem: {ws.kind}; device counter: {counter.dev if counter.stat else 'n/a (not root)'}; "
              f"setup {time.perf_counter() - t_setup:.0f} s", flush=True)
        print(f"app: {len(app.files)} files, {app.bytes} bytes per version ({fmt_b(app.alloc)} in 4 KiB blocks); "
              f"factory the same; keep_generations {a.keep_generations}; {n} updates, "
              + (f"a rollback after every {a.rollback_every}-th install" if a.rollback_every else "no rollbacks") + f", a row every {every}", flush=True)
        print(f"bound on the state dir: factory + {a.keep_generations} + 1 versions + {fmt_b(JOURNAL_CEILING)} journal = "
              f"{fmt_b(bound_app)} apparent, {fmt_b(bound_alloc)} allocated", flush=True)
        stack = []  # installed versions, as a rollback to "previous" walks them back
        done = rollbacks = 0
        while done < n and not STOP:
            ins_t, rb_t, own = [], [], 0
            payload = rb_payload = 0
            hist = {"pending": 0, "freed": 0, "freed_blobs": 0, "paused_bytes": 0, "paused_s": 0.0}

            def drain_history(in_window):
                """The pending transactions' records (the journal keeps the last 200: read every
                100): all committed, what they freed. In the window: its device bytes and time
                taken out of the interval's."""
                if not hist["pending"]:
                    return
                t0, b0 = time.perf_counter(), counter.read() if in_window else None
                recs = dev.history(hist["pending"])
                if len(recs) != hist["pending"] or any(h["phase"] != "Committed" for h in recs):
                    raise RuntimeError(f"of the last {hist['pending']} transactions, not committed: "
                                       f"{[(h['id'], h['phase']) for h in recs if h['phase'] != 'Committed']} ({len(recs)} records)")
                hist["freed"] += sum(h.get("freed_bytes", 0) for h in recs)
                hist["freed_blobs"] += sum(h.get("freed_blobs", 0) for h in recs)
                hist["pending"] = 0
                if b0 is not None:
                    hist["paused_bytes"] += counter.read() - b0
                if in_window:
                    hist["paused_s"] += time.perf_counter() - t0

            before = counter.read()
            t_int = time.perf_counter()
            while done < n and not STOP:
                v = version_of(done)
                dev.make_package(v)
                t, w = dev.timed("install", dev.pkg)
                ins_t.append(t)
                own = None if w is None or own is None else own + w
                os.remove(dev.pkg)
                stack.append(v)
                done += 1
                global DONE
                DONE = done
                hist["pending"] += 1
                payload += app.bytes
                if a.rollback_every and done % a.rollback_every == 0 and len(stack) >= 2:
                    t, w = dev.timed("rollback")
                    rb_t.append(t)
                    own = None if w is None or own is None else own + w
                    stack.pop()
                    rollbacks += 1
                    hist["pending"] += 1
                    rb_payload += app.bytes
                if done % every == 0:
                    break
                if hist["pending"] >= 100:
                    drain_history(in_window=True)
            wall = time.perf_counter() - t_int - hist["paused_s"]
            after = counter.read()
            written = None if before is None else after - before - hist["paused_bytes"]
            # What the interval left: checked, then measured (none of this is in `written`).
            bad = app.check(dev.target, stack[-1])
            st = dev.status()
            if bad or st["current"]["version"] != stack[-1]:
                raise RuntimeError(f"after {done} updates the device should hold {stack[-1]}: status says "
                                   f"{st['current']['version']}, {bad or 'files fine'}")
            drain_history(in_window=False)
            b = counter.read()
            rec = statistics.median([dev.timed("recover")[0] for _ in range(3)])
            rec_written = None if b is None else (counter.read() - b) / 3
            alloc, apparent = tree_size(dev.state)
            journal = os.path.getsize(os.path.join(dev.state, "journal.redb"))
            rows.append({
                "updates": done, "rollbacks": rollbacks, "alloc": alloc, "apparent": apparent, "journal": journal,
                "blobs": st["backups"]["blobs"], "blob_bytes": st["backups"]["bytes"],
                "freed": hist["freed"], "freed_blobs": hist["freed_blobs"],
                "ins": statistics.median(ins_t), "ins_max": max(ins_t), "rb": statistics.median(rb_t) if rb_t else None,
                "own": own, "rec": rec, "rec_written": rec_written, "written": written, "payload": payload, "rb_payload": rb_payload, "wall": wall, "n": len(ins_t),
            })
            print_row(rows[-1], a.md, header=len(rows) == 1)
    except Exception as e:  # noqa: BLE001 - reported, then the summary of what ran
        failed = e
    finally:
        if scratch_mounted:
            subprocess.run(["umount", scratch])
        ws.close()
    total = time.perf_counter() - t_start
    summarize(rows, a, app, cp_wa, bound_app, bound_alloc, total, failed)


COLS = [
    ("updates", lambda r: f"{r['updates']}"),
    ("rollbacks", lambda r: f"{r['rollbacks']}"),
    ("state dir (alloc / apparent)", lambda r: f"{fmt_b(r['alloc'])} / {fmt_b(r['apparent'])}"),
    ("journal.redb", lambda r: fmt_b(r["journal"])),
    ("backups (blobs, bytes)", lambda r: f"{r['blobs']}, {fmt_b(r['blob_bytes'])}"),
    ("freed in interval", lambda r: f"{r['freed_blobs']}, {fmt_b(r['freed'])}"),
    ("install ms (median / max)", lambda r: f"{fmt_ms(r['ins'])} / {fmt_ms(r['ins_max'])}"),
    ("rollback ms", lambda r: fmt_ms(r["rb"])),
    ("recover ms / written", lambda r: f"{fmt_ms(r['rec'])} / " + ("n/a" if r["rec_written"] is None else fmt_b(r["rec_written"]))),
    ("write ampl.", lambda r: "n/a (not root)" if r["written"] is None else f"{r['written'] / r['payload']:.2f} ×"),
    ("device written", lambda r: "n/a" if r["written"] is None else fmt_b(r["written"])),
    ("updater's own writes", lambda r: "n/a" if r["own"] is None else f"{r['own'] / r['payload']:.2f} ×"),
    ("s / update", lambda r: f"{r['wall'] / r['n']:.3f}"),
]
WIDTHS = [7, 9, 28, 12, 22, 18, 25, 11, 20, 11, 14, 20, 10]


def print_row(r, md, header):
    cells = [f(r) for _, f in COLS]
    if md:
        if header:
            print("\n| " + " | ".join(c for c, _ in COLS) + " |\n|" + "---|" * len(COLS))
        print("| " + " | ".join(cells) + " |", flush=True)
    else:
        if header:
            print("\n" + "  ".join(f"{c:>{w}}" for (c, _), w in zip(COLS, WIDTHS)))
        print("  ".join(f"{c:>{w}}" for c, w in zip(cells, WIDTHS)), flush=True)


def summarize(rows, a, app, cp_wa, bound_app, bound_alloc, total, failed):
    out = []
    if failed is not None:
        out.append(("run", f"FAILED after {DONE} updates: {failed}", ""))
    elif STOP:
        out.append(("run", f"stopped by a signal after {DONE} of {a.updates} updates", ""))
    if not rows:
        for r in out:
            print(" ".join(r))
        sys.exit(1)
    first, last = rows[0], rows[-1]
    out.append(("updates / rollbacks / wall time", f"{last['updates']} / {last['rollbacks']} / {total:.0f} s",
                f"{last['updates'] / total:.1f} updates/s including package generation"))
    out.append(("install median, first vs last interval", f"{fmt_ms(first['ins'])} ms → {fmt_ms(last['ins'])} ms", f"{last['ins'] / first['ins']:.2f} ×"))
    if first["rb"] and last["rb"]:
        out.append(("rollback median, first vs last interval", f"{fmt_ms(first['rb'])} ms → {fmt_ms(last['rb'])} ms", f"{last['rb'] / first['rb']:.2f} ×"))
    out.append(("recover, first vs last report", f"{fmt_ms(first['rec'])} ms → {fmt_ms(last['rec'])} ms",
                f"{last['rec'] / first['rec']:.2f} ×" + ("" if last["rec_written"] is None else
                f"; device bytes written per recover with nothing in flight {fmt_b(first['rec_written'])} → {fmt_b(last['rec_written'])}")))
    mx = max(rows, key=lambda r: r["alloc"])
    mxa = max(rows, key=lambda r: r["apparent"])
    out.append(("largest state dir (allocated / apparent)", f"{fmt_b(mx['alloc'])} (at {mx['updates']}) / {fmt_b(mxa['apparent'])} (at {mxa['updates']})",
                f"bound {fmt_b(bound_alloc)} / {fmt_b(bound_app)}"))
    span = last["updates"] - first["updates"]
    if span:
        grow = lambda k: (last[k] - first[k]) / span * 1000  # noqa: E731
        out.append(("growth per 1000 updates, first → last report", f"state dir {grow('alloc') / KiB:+.1f} KiB, journal {grow('journal') / KiB:+.1f} KiB",
                    f"journal {fmt_b(first['journal'])} → {fmt_b(last['journal'])}; backups {first['blobs']} → {last['blobs']} blobs"))
    ok = all(r["alloc"] <= bound_alloc and r["apparent"] <= bound_app for r in rows)
    out.append(("state dir within the bound at every report", "PASS" if ok else "FAIL",
                f"factory + {a.keep_generations} + 1 versions ({fmt_b(app.bytes)} each) + {fmt_b(JOURNAL_CEILING)} journal ceiling; "
                f"journal at the end {fmt_b(last['journal'])}"))
    if last["written"] is not None:
        w = sum(r["written"] for r in rows)
        p = sum(r["payload"] for r in rows)
        rp = sum(r["rb_payload"] for r in rows)
        was = [r["written"] / r["payload"] for r in rows]
        out.append(("write amplification, all intervals", f"{w / p:.2f} × (intervals {min(was):.2f}–{max(was):.2f})",
                    f"{fmt_b(w)} written for {fmt_b(p)} installed; {w / (p + rp):.2f} × counting rolled-back-to content as payload too"))
        out.append(("write amplification, cp + sync (baseline)", f"{cp_wa:.2f} ×" if cp_wa is not None else "n/a",
                    f"tope-updater / cp: {w / p / cp_wa:.2f} ×" if cp_wa else ""))
    else:
        out.append(("write amplification", "n/a (not root)", ""))
    if last["own"] is not None:
        o = sum(r["own"] for r in rows)
        p = sum(r["payload"] for r in rows)
        out.append(("updater's own writes (/proc/PID/io write_bytes)", f"{o / p:.2f} × the installed content",
                    f"{fmt_b(o)}: install + rollback processes; the rest of the device bytes is the filesystem's metadata and journal"))
    print(f"\nsummary (interval = {max(1, a.report_every or a.updates // 20)} updates):")
    if a.md:
        print("\n| what | measured | notes |\n|---|---|---|")
        for r in out:
            print(f"| {r[0]} | {r[1]} | {r[2]} |")
    else:
        wd = max(len(r[0]) for r in out)
        for r in out:
            print(f"{r[0]:<{wd}}  {r[1]:<40}  {r[2]}")
    if failed is not None:
        sys.exit(1)
    if a.strict and not ok:
        sys.exit(1)


if __name__ == "__main__":
    main()
