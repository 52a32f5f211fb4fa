"""Prints the glibc the kvcm binary needs: the newest GLIBC_x.y symbol version any file in
the bundle (or the bootloader) references, next to the build host's glibc.

    python packaging/glibc_floor.py dist/kvcm.bundle.json dist/kvcm

libc itself is never bundled, so the binary runs on a system whose glibc is at least the
printed floor. The floor is at most the build host's glibc, and usually equal to it in
practice (libpython and the host libraries bundled with it are built against it); build on
an older distribution (manylinux_2_28: glibc 2.28) for a lower floor. README.md
"Single binary" explains.
"""

import json
import platform
import re
import subprocess
import sys

VERSION = re.compile(r"\bGLIBC_(\d+)\.(\d+)(?:\.(\d+))?\b")


def required(paths):
    """{version tuple: [files needing it]} over the dynamic symbols of ELF files."""
    needs = {}
    for path in paths:
        out = subprocess.run(["objdump", "-T", path], capture_output=True, text=True).stdout
        for match in set(VERSION.findall(out)):
            version = tuple(int(x) for x in match if x)
            needs.setdefault(version, []).append(path)
    return needs


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 2:
        sys.exit(__doc__)
    with open(argv[0], encoding="utf-8") as f:
        bundle = json.load(f)
    files = [argv[1]] + [src for _, src in bundle["binaries"]]
    needs = required(files)
    floor = max(needs) if needs else None
    host = platform.libc_ver()[1]
    culprits = sorted({p.rsplit("/", 1)[-1] for p in needs.get(floor, ())})
    print("glibc: build host %s; the binary needs >= %s (newest symbol version, from %s)" % (
        host, ".".join(map(str, floor)) if floor else "?", ", ".join(culprits[:4]) or "-"))


if __name__ == "__main__":
    main()
