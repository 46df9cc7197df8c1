#!/usr/bin/env python3
"""The expected tree of a power-cut scenario, from the package rules alone (issue 18).

    oracle.py ROOT FACTORY_DIR [STEP...]

Prints what `dump.sh` would print for the tree under ROOT (the engine's path of the test
root, e.g. /mnt/pc/root: every manifest `dst` lies under it) once the STEPs have been
applied, in order, to the factory tree FACTORY_DIR (read from disk: the payload's
`factory/`). No `X` lines: a correct engine leaves no temporary file. A STEP is

  PKG.zip    install that package (its manifest.json and entries) over the current state. It
             must be a full package: a delta package (`pack --delta-from`, manifest with a
             `delta` object) is refused. The delta scenario installs a delta package of 2.0.0
             on the device; its expected tree is computed from the full package `pack` made of
             the same source tree (run.sh, oracle_pkg), never from the patches or the engine:
             a delta install must give exactly the tree the full install gives (issue 14);
  rollback   `rollback`: back to the previous generation. After a chain of installs from
             the factory, that is exactly the state before the last install (SPEC §3:
             generations record each managed path, paths the last install touched for the
             first time go back to the factory baseline, directories it created are removed);
  factory    `rollback --to factory`: every managed file as the factory had it, files and
             directories the installs created removed. Files no module names are never
             changed, so that is exactly the factory tree.

Install rules (SPEC §2-§3, README "Build and sign a package"):
  * every file a module names gets the package's bytes;
  * its mode is the module's `mode`, else the mode of the file it replaces, else its ZIP
    entry's unix mode, else 0644;
  * a directory an install creates is 0755; existing directories keep their mode;
  * paths no module names are untouched.

Directory modules (`src` ending in `/`). SPEC §2 says only "every file under it is deployed
under dst, keeping the relative layout". The exact rule, from src/package.rs
(resolve_files) and src/driver/planning.rs (Updater::install): the module deploys every
file entry of the ZIP whose name starts with `src`, entry `src + REL` to `dst + "/" + REL`,
each with the file rule above (the module's `mode` applies to every one); its `files` map
must name exactly those RELs (else the package is refused); files already under `dst` that
the package does not hold are left alone, not deleted.
"""
import hashlib
import json
import os
import stat
import sys
import zipfile


def factory_tree(top):
    """{./path: entry} of the tree on disk; an entry is ('F', mode, size, md5) or ('D', mode)."""
    tree = {}
    for d, dirs, files in os.walk(top):
        for name in dirs + files:
            p = os.path.join(d, name)
            st = os.lstat(p)
            rel = "./" + os.path.relpath(p, top)
            if stat.S_ISDIR(st.st_mode):
                tree[rel] = ("D", stat.S_IMODE(st.st_mode))
            elif stat.S_ISREG(st.st_mode):
                with open(p, "rb") as f:
                    data = f.read()
                tree[rel] = ("F", stat.S_IMODE(st.st_mode), len(data), hashlib.md5(data).hexdigest())
            else:
                sys.exit(f"oracle: {p}: neither a file nor a directory")
    return tree


def install(tree, root, pkg):
    """The tree after installing the package file pkg over it (a new dict)."""
    new = dict(tree)
    z = zipfile.ZipFile(pkg)
    entries = {i.filename: i for i in z.infolist() if not i.is_dir()}
    manifest = json.loads(z.read("manifest.json"))
    if "delta" in manifest:
        sys.exit(f"oracle: {pkg} is a delta package: give the full package of the same version")
    for m in manifest["modules"]:
        src, dst = m["src"], m["dst"]
        if src.endswith("/"):
            rels = sorted(n[len(src):] for n in entries if n.startswith(src))
            if "files" in m and sorted(m["files"]) != rels:
                sys.exit(f"oracle: {pkg}: module {m['name']}: files map differs from the entries")
            pairs = [(src + r, dst + "/" + r) for r in rels]
        else:
            pairs = [(src, dst)]
        for name, d in pairs:
            if not d.startswith(root + "/"):
                sys.exit(f"oracle: {pkg}: {d} is not under {root}")
            path = "./" + d[len(root) + 1:]
            parent = os.path.dirname(path)
            while parent != "." and parent not in new:
                new[parent] = ("D", 0o755)
                parent = os.path.dirname(parent)
            if new.get(parent, ("D",))[0] != "D":
                sys.exit(f"oracle: {pkg}: {path} lies under a file")
            old = tree.get(path)
            info = entries[name]
            zip_mode = (info.external_attr >> 16) & 0o7777 if info.create_system == 3 else 0
            if "mode" in m:
                mode = int(m["mode"], 8)
            elif old is not None:
                mode = old[1]
            else:
                mode = zip_mode or 0o644
            data = z.read(name)
            new[path] = ("F", mode, len(data), hashlib.md5(data).hexdigest())
    return new


def dump(tree):
    """dump.sh's lines: `F mode size md5 path` / `D mode path`, sorted as `sort` sorts
    "path<TAB>line" in the C locale."""
    lines = []
    for path, e in tree.items():
        if e[0] == "F":
            lines.append(f"F {e[1]:o} {e[2]} {e[3]} {path}")
        else:
            lines.append(f"D {e[1]:o} {path}")
    lines.sort(key=lambda l: (l.rsplit(" ", 1)[1] + "\t" + l).encode())
    return "".join(l + "\n" for l in lines)


def main(argv):
    if len(argv) < 3:
        sys.exit(__doc__)
    root, factory = argv[1].rstrip("/"), factory_tree(argv[2])
    history, tree = [], factory
    for step in argv[3:]:
        if step == "rollback":
            if not history:
                sys.exit("oracle: rollback with nothing installed")
            tree = history.pop()
        elif step == "factory":
            history, tree = [], factory
        else:
            history.append(tree)
            tree = install(tree, root, step)
    sys.stdout.write(dump(tree))


if __name__ == "__main__":
    main(sys.argv)
