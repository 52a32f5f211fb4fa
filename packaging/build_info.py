"""Writes the kvcm._build_info module that goes into the frozen binary: the source module
(kvcm/_build_info.py) with its build constants filled in.

    python packaging/build_info.py OUT.py [GLIBC_FLOOR]

Build date: SOURCE_DATE_EPOCH when set (reproducible builds), else now, in UTC.
Git revision: KVCM_GIT_REVISION when set, else the checkout's (short, "-dirty" when the
tracked files differ from HEAD), else the one `git archive` wrote into the source module,
else "unknown". glibc floor: what packaging/glibc_floor.py found the bundle needs.
"""

import argparse
import datetime
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_values(glibc_floor=None):
    sys.path.insert(0, ROOT)
    from kvcm import _build_info

    epoch = os.environ.get("SOURCE_DATE_EPOCH", "").strip()
    when = (datetime.datetime.fromtimestamp(int(epoch), datetime.timezone.utc) if epoch
            else datetime.datetime.now(datetime.timezone.utc))
    revision = os.environ.get("KVCM_GIT_REVISION", "").strip() or _build_info.source_revision(ROOT)
    return {
        "BUILD_DATE": when.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "GIT_REVISION": revision or _build_info.UNKNOWN,
        "GLIBC_FLOOR": glibc_floor,
    }


def module_text(glibc_floor=None):
    with open(os.path.join(ROOT, "kvcm", "_build_info.py"), encoding="utf-8") as f:
        source = f.read()
    values = build_values(glibc_floor)
    lines = [source.rstrip("\n"), "", "", "# -- filled in by packaging/build_info.py at freeze time --"]
    lines += ["%s = %r" % item for item in values.items()]
    return "\n".join(lines) + "\n", values


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out")
    parser.add_argument("glibc_floor", nargs="?")
    args = parser.parse_args(argv)
    text, values = module_text(args.glibc_floor)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w", encoding="utf-8") as f:
        f.write(text)
    print(" ".join("%s=%s" % item for item in values.items()))


if __name__ == "__main__":
    main()
