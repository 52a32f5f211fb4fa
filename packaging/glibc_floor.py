"""The glibc a frozen kvcm needs: the newest GLIBC_x.y symbol version that any ELF file in it
requires (readelf's version-needs section), the PyInstaller bootloader included.

    python packaging/glibc_floor.py [--at-most 2.28] dist/kvcm [dist/kvcm-onedir ...]

A onefile binary is read as its bootloader plus every file of its embedded archive (each
one extracted and checked, whatever its name); a directory, as every file under it. Prints
the floor and the files that set it; with --at-most, exits 1 when the floor is newer.
glibc itself is never bundled: the binary runs on any system whose glibc is at least the
floor. packaging/kvcm.spec writes the same figure into the binary (`kvcm version`).
"""

import argparse
import os
import platform
import re
import subprocess
import sys
import tempfile

ELF_MAGIC = b"\x7fELF"
# readelf -V: "  0x0010:   Name: GLIBC_2.14  Flags: none  Version: 3"
NEEDED = re.compile(r"Name: GLIBC_(\d+)\.(\d+)(?:\.(\d+))?\b")


def version_text(version):
    return ".".join(map(str, version)) if version else "?"


def parse_version(text):
    return tuple(int(x) for x in text.split("."))


def needed_versions(path):
    """The GLIBC_x.y versions an ELF file requires, as tuples."""
    out = subprocess.run(["readelf", "-V", "-W", path], capture_output=True, text=True, check=True).stdout
    needs = out.split("Version needs section", 1)
    if len(needs) < 2:
        return set()            # static, or needs no versioned symbol
    return {tuple(int(x) for x in match if x) for match in NEEDED.findall(needs[1])}


def is_elf(path):
    with open(path, "rb") as f:
        return f.read(4) == ELF_MAGIC


def requirements(paths):
    """{version: [file names needing it]} over ELF files given as (name, path) pairs."""
    found = {}
    for name, path in paths:
        if is_elf(path):
            for version in needed_versions(path):
                found.setdefault(version, []).append(name)
    return found


def newest(found):
    return max(found) if found else None


def onefile_members(binary, workdir):
    """(name, extracted path) of every file in a onefile binary's archive, and the binary."""
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(binary)
    members = [("(bootloader) " + os.path.basename(binary), binary)]
    for index, name in enumerate(sorted(archive.toc)):
        data = archive.extract(name)
        if not data or data[:4] != ELF_MAGIC:
            continue
        path = os.path.join(workdir, "%d.elf" % index)
        with open(path, "wb") as f:
            f.write(data)
        members.append((name, path))
    return members


def directory_members(top):
    for base, _, files in os.walk(top):
        for name in sorted(files):
            path = os.path.join(base, name)
            if not os.path.islink(path):
                yield os.path.relpath(path, top), path


def requirements_of(target):
    """requirements() of a onefile binary or of an unpacked (onedir) bundle."""
    if os.path.isdir(target):
        return requirements(directory_members(target))
    with tempfile.TemporaryDirectory(prefix="kvcm-glibc-") as workdir:
        return requirements(onefile_members(target, workdir))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--at-most", type=parse_version, metavar="X.Y",
                        help="fail when the bundle needs a newer glibc than this")
    parser.add_argument("targets", nargs="+", help="onefile binaries or onedir directories")
    args = parser.parse_args(argv)
    worst = None
    for target in args.targets:
        found = requirements_of(target)
        floor = newest(found)
        culprits = sorted({os.path.basename(n) for n in found.get(floor, ())})
        print("glibc: %s needs >= %s (newest symbol version, from %s%s); built on glibc %s" % (
            target, version_text(floor), ", ".join(culprits[:4]) or "-",
            ", ..." if len(culprits) > 4 else "", platform.libc_ver()[1] or "?"))
        worst = floor if worst is None or (floor and floor > worst) else worst
    if args.at_most and worst and worst > args.at_most:
        print("glibc: the bundle needs %s, newer than the supported floor %s" % (
            version_text(worst), version_text(args.at_most)), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
