"""Writes THIRD_PARTY_LICENSES for the kvcm binary: every distribution and system library
that went into it, with its declared licence and the licence texts the installed packages
ship. Run with the interpreter that built the binary (its installed package metadata is the
source of truth):

    .venv/bin/python packaging/licenses.py dist/kvcm.bundle.json dist/THIRD_PARTY_LICENSES

The bundle manifest comes from packaging/kvcm.spec: the modules (name, source path) and
binaries (name in the bundle, source path) PyInstaller collected. Each file is attributed to
the distribution whose RECORD lists it; the standard library and libpython to CPython; the
PyInstaller bootloader to PyInstaller; shared libraries of the build host to their Debian
(dpkg) or RPM package, whose copyright file is included when the system has it.
"""

import argparse
import collections
import importlib.metadata
import json
import os
import subprocess
import sys
import textwrap

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RULE = "=" * 92
LICENSE_NAMES = ("LICENSE", "LICENCE", "COPYING", "NOTICE", "AUTHORS", "COPYRIGHT")


def _real(path):
    return os.path.realpath(path) if path else path


def _file_owners():
    """{real path of an installed file: Distribution}."""
    owners = {}
    for dist in importlib.metadata.distributions():
        for f in dist.files or ():
            owners.setdefault(_real(str(dist.locate_file(f))), dist)
    return owners


def _license_of(dist):
    meta = dist.metadata
    if meta.get("License-Expression"):
        return meta["License-Expression"]
    text = (meta.get("License") or "").strip()
    classifiers = [c.split("::")[-1].strip() for c in meta.get_all("Classifier") or ()
                   if c.startswith("License ::")]
    if text and "\n" not in text and len(text) <= 80 and text.upper() != "UNKNOWN":
        return text
    return " / ".join(classifiers) or "not declared"


def _home_of(dist):
    meta = dist.metadata
    if meta.get("Home-page"):
        return meta["Home-page"]
    urls = dict(u.split(",", 1) for u in meta.get_all("Project-URL") or () if "," in u)
    for key in ("Homepage", "homepage", "Source", "source", "Repository", "Source Code"):
        if key in urls:
            return urls[key].strip()
    return next(iter(urls.values()), "").strip() or "-"


def _license_files(dist):
    """Licence texts a distribution ships in its .dist-info: (relative name, text)."""
    found = []
    for f in dist.files or ():
        parts = f.parts
        if not parts or not parts[0].endswith(".dist-info"):
            continue
        name = parts[-1].upper()
        if (len(parts) > 2 and parts[1] == "licenses") or name.startswith(LICENSE_NAMES):
            path = dist.locate_file(f)
            if os.path.isfile(path):
                with open(path, encoding="utf-8", errors="replace") as fh:
                    found.append(("/".join(parts[1:]), fh.read()))
    return found


def _sbom_components(dist):
    """Components of CycloneDX SBOMs a wheel ships (.dist-info/sboms/*.json): the Rust
    crates compiled into orjson, for example."""
    components = []
    for f in dist.files or ():
        if len(f.parts) > 2 and f.parts[1] == "sboms" and f.name.endswith(".json"):
            try:
                with open(dist.locate_file(f), encoding="utf-8") as fh:
                    bom = json.load(fh)
            except (OSError, ValueError):
                continue
            for c in bom.get("components", ()):
                lic = " AND ".join(x.get("expression") or x.get("license", {}).get("id", "?")
                                   for x in c.get("licenses", ())) or "?"
                components.append("%s %s (%s)" % (c.get("name"), c.get("version"), lic))
    return components


def _system_package(path):
    """(package, copyright file or None) of a host library, or (None, None)."""
    real = _real(path)
    candidates = {path, real}
    for p in list(candidates):           # merged-/usr systems record /usr/lib paths
        if p.startswith("/lib"):
            candidates.add("/usr" + p)
        elif p.startswith("/usr/lib"):
            candidates.add(p[4:])
    for p in sorted(candidates):
        try:
            out = subprocess.run(["dpkg", "-S", p], capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            break
        if out.returncode == 0 and ":" in out.stdout:
            package = out.stdout.split(":")[0].strip()
            for name in (package, package.split(":")[0]):
                copyright = "/usr/share/doc/%s/copyright" % name
                if os.path.isfile(copyright):
                    return package, copyright
            return package, None
    try:
        out = subprocess.run(["rpm", "-qf", "--qf", "%{NAME} %{LICENSE}\n", real],
                             capture_output=True, text=True, timeout=30)
        if out.returncode == 0 and out.stdout.strip():
            return out.stdout.strip().splitlines()[0], None
    except (OSError, subprocess.SubprocessError):
        pass
    return None, None


def attribute(bundle):
    """{group key: {"kind", "name", "modules": [...], "binaries": [...], ...}}."""
    owners = _file_owners()
    base = _real(bundle.get("base_prefix") or sys.base_prefix)
    groups = collections.OrderedDict()

    def group(key, **fields):
        g = groups.setdefault(key, dict(fields, modules=[], binaries=[]))
        return g

    pyinstaller = importlib.metadata.distribution("pyinstaller")
    group("dist:pyinstaller", kind="dist", dist=pyinstaller,
          note="Only the bootloader (the executable's start-up code) is in the binary; PyInstaller's "
               "licence (GPL 2.0 or later with the bootloader exception) allows distributing it "
               "with any program.")["binaries"].append("(bootloader)")
    for kind, entries in (("modules", bundle["modules"]), ("binaries", bundle["binaries"])):
        for name, path in entries:
            real = _real(path)
            if real and real.startswith(os.path.join(ROOT, "kvcm") + os.sep) or \
                    (path and os.path.basename(path) == "_build_info.py") or name == "kvcm_main" \
                    or name.startswith("kvcm."):
                group("kvcm", kind="self", name="kvcm")[kind].append(name)
            elif real in owners:
                dist = owners[real]
                group("dist:" + dist.metadata["Name"].lower(), kind="dist", dist=dist)[kind].append(name)
            elif not real or real.startswith(base + os.sep) or "libpython" in name:
                group("cpython", kind="cpython", name="CPython")[kind].append(name)
            else:
                package, copyright = _system_package(path)
                key = "system:%s" % (package or name)
                group(key, kind="system", name=package or "unknown package", copyright=copyright,
                      path=real)[kind].append(name)
    return groups


def render(bundle, groups):
    info = bundle.get("build_info", {})
    out = ["Third-party software in the kvcm binary",
           "",
           "kvcm %s, built %s from git revision %s with Python %s (glibc >= %s)." % (
               _kvcm_version(), info.get("BUILD_DATE", "?"), info.get("GIT_REVISION", "?"),
               bundle.get("python", "?"), info.get("GLIBC_FLOOR", "?")),
           "Generated by packaging/licenses.py from the build environment's installed package",
           "metadata and the PyInstaller bundle manifest (kvcm.bundle.json). kvcm itself is",
           "Apache-2.0.",
           "",
           "%-28s %-14s %s" % ("component", "version", "licence"),
           "%-28s %-14s %s" % ("-" * 28, "-" * 14, "-" * 40)]
    sections = []
    for key, g in groups.items():
        if g["kind"] == "self":
            continue
        if g["kind"] == "dist":
            dist = g["dist"]
            name, version, lic = dist.metadata["Name"], dist.version, _license_of(dist)
            header = ["%s %s" % (name, version), "Licence: %s" % lic, "Home: %s" % _home_of(dist)]
            texts = _license_files(dist)
            extra = _sbom_components(dist)
        elif g["kind"] == "cpython":
            name, version, lic = "CPython", bundle.get("python", "?"), "PSF-2.0"
            header = ["CPython %s (the interpreter, libpython and the standard library)" % version,
                      "Licence: Python Software Foundation License Version 2 (PSF-2.0)",
                      "Home: https://www.python.org/"]
            lic_path = os.path.join(bundle.get("base_prefix") or sys.base_prefix, "lib",
                                    "python%d.%d" % sys.version_info[:2], "LICENSE.txt")
            texts = [("LICENSE.txt", open(lic_path, encoding="utf-8").read())] if os.path.isfile(lic_path) else []
            extra = []
        else:
            name, version, lic = g["name"], "(host)", "see its copyright file"
            header = ["%s: a shared library of the build host (%s)" % (g["name"], g["path"])]
            texts = []
            if g.get("copyright"):
                texts = [(g["copyright"], open(g["copyright"], encoding="utf-8", errors="replace").read())]
            extra = []
        out.append("%-28s %-14s %s" % (name, version, lic))
        what = []
        if g["modules"]:
            what.append("%d Python modules" % len(g["modules"]))
        if g["binaries"]:
            what.append("binaries: " + ", ".join(sorted(g["binaries"])))
        body = [RULE] + header + textwrap.wrap("In the binary: " + "; ".join(what), width=92,
                                               subsequent_indent="  ", break_long_words=False)
        if g.get("note"):
            body += textwrap.wrap(g["note"], width=92)
        if extra:
            body += ["Compiled in (from the wheel's SBOM): " + ", ".join(extra)]
        if not texts:
            body += ["(No licence text is shipped with it; the licence above is what its metadata "
                     "declares.)"]
        for fname, text in texts:
            body += ["", "---- %s ----" % fname, text.rstrip("\n")]
        sections.append("\n".join(body))
    return "\n".join(out) + "\n\n" + "\n\n".join(sections) + "\n"


def _kvcm_version():
    sys.path.insert(0, ROOT)
    from kvcm import __version__
    return __version__


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("bundle", help="kvcm.bundle.json written by packaging/kvcm.spec")
    parser.add_argument("out", help="where to write THIRD_PARTY_LICENSES")
    args = parser.parse_args(argv)
    with open(args.bundle, encoding="utf-8") as f:
        bundle = json.load(f)
    groups = attribute(bundle)
    text = render(bundle, groups)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    listed = sum(1 for g in groups.values() if g["kind"] != "self")
    print("%s: %d components, %d KiB" % (args.out, listed, len(text) // 1024))


if __name__ == "__main__":
    main()
