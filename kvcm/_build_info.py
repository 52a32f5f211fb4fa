"""Version, build date and git revision, for `kvcm version`.

This file is what a source checkout runs. When packaging/kvcm.spec freezes the binary, it
puts a copy of this module with the constants below filled in (packaging/build_info.py)
in its place, so the binary reports how it was built without a `.git` beside it.

From source the revision comes from git when kvcm runs from its own checkout, else from the
`$Format:...$` placeholder that `git archive` fills in (export-subst in .gitattributes),
else it is "unknown".
"""

import os
import subprocess
import sys

from kvcm import __version__

# Set by the generated module of a frozen build; None when running from source.
BUILD_DATE = None        # "2026-01-31T12:00:00Z" (UTC; SOURCE_DATE_EPOCH when set)
GIT_REVISION = None      # "1234abcd5678" or "1234abcd5678-dirty"
GLIBC_FLOOR = None       # "2.28": the newest glibc symbol version the bundle needs, the
                         # oldest glibc it runs on (packaging/glibc_floor.py)

_ARCHIVE_REVISION = "$Format:%H$"
UNKNOWN = "unknown"


def _git_revision(root):
    """The short revision (+ "-dirty") of the git checkout at `root`, or None."""
    def git(*args):
        return subprocess.run(["git", "-C", root, *args], capture_output=True, text=True,
                              timeout=5, stdin=subprocess.DEVNULL)
    try:
        top = git("rev-parse", "--show-toplevel")
        if top.returncode != 0 or os.path.realpath(top.stdout.strip()) != os.path.realpath(root):
            return None             # not a checkout, or kvcm sits inside some other repository
        head = git("rev-parse", "--short=12", "HEAD")
        if head.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None                 # no git installed, or it hung
    return head.stdout.strip() + ("-dirty" if dirty else "")


def source_revision(root=None):
    """The git revision of the source tree at `root` (default: the one holding kvcm/)."""
    root = root or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    revision = _git_revision(root)
    if revision:
        return revision
    if not _ARCHIVE_REVISION.startswith("$"):
        return _ARCHIVE_REVISION[:12]   # a `git archive` copy
    return None


def build_kind():
    """"source", or the PyInstaller layout: "onefile" unpacks into a _MEI* directory."""
    if not getattr(sys, "frozen", False):
        return "source"
    return "onefile" if os.path.basename(getattr(sys, "_MEIPASS", "")).startswith("_MEI") else "onedir"


def info():
    """{"version", "build_date", "git_revision", "build"}: all strings, "unknown" when unknown."""
    kind = build_kind()
    if kind == "source":
        return {"version": __version__, "build_date": UNKNOWN,
                "git_revision": source_revision() or UNKNOWN, "build": kind}
    return {"version": __version__, "build_date": BUILD_DATE or UNKNOWN,
            "git_revision": GIT_REVISION or UNKNOWN, "build": kind}
