"""Runs a command inside the kernel-level sandbox a systemd unit would give it, without a
systemd manager: the unit's SystemCallFilter= (sets expanded by `systemd-analyze
syscall-filter`, in systemd's add/remove order) with SystemCallErrorNumber=,
SystemCallArchitectures=native, MemoryDenyWriteExecute=, RestrictAddressFamilies=,
RestrictRealtime=, an empty CapabilityBoundingSet=, NoNewPrivileges=, a
UID/GID without a passwd entry (as DynamicUser= allocates) and UMask=.

    python tests/sandbox.py UNIT_FILE UID -- COMMAND [ARGS...]

The seccomp filters are built with libseccomp (through ctypes) the way systemd 252 builds
them: one filter per setting, the allow list loaded last. Mount namespaces (ProtectSystem=,
PrivateTmp=, ...) and LockPersonality= are not reproduced.
"""

import ctypes
import ctypes.util
import errno
import functools
import os
import shlex
import subprocess
import sys

SCMP_ACT_ALLOW = 0x7FFF0000
SCMP_CMP_EQ, SCMP_CMP_MASKED_EQ = 4, 7
PROT_WRITE, PROT_EXEC = 0x2, 0x4
SHM_EXEC = 0o100000
PR_CAPBSET_DROP, PR_SET_NO_NEW_PRIVS = 24, 38
AF_MAX = 46
SCHED_FIFO, SCHED_RR, SCHED_DEADLINE = 1, 2, 6
ADDRESS_FAMILIES = {"AF_UNIX": 1, "AF_LOCAL": 1, "AF_INET": 2, "AF_INET6": 10, "AF_NETLINK": 16,
                    "AF_PACKET": 17}


def SCMP_ACT_ERRNO(code):
    return 0x00050000 | (code & 0xFFFF)


class _ArgCmp(ctypes.Structure):
    _fields_ = [("arg", ctypes.c_uint), ("op", ctypes.c_int),
                ("datum_a", ctypes.c_uint64), ("datum_b", ctypes.c_uint64)]


def service_settings(path):
    """{key: [values in order]} of a unit file's [Service] section."""
    settings, section = {}, None
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.strip()
            if not line or line.startswith(("#", ";")):
                continue
            if line.startswith("["):
                section = line.strip("[]")
            elif section == "Service" and "=" in line:
                key, _, value = line.partition("=")
                settings.setdefault(key.strip(), []).append(value.strip())
    return settings


@functools.lru_cache(maxsize=None)
def syscall_sets():
    """{"@set": [members]} from `systemd-analyze syscall-filter`."""
    out = subprocess.run(["systemd-analyze", "syscall-filter"], capture_output=True, text=True,
                         check=True).stdout
    sets, current = {}, None
    for line in out.splitlines():
        if not line.strip() or line.strip().startswith("#"):
            continue
        if not line[0].isspace():
            current = sets.setdefault(line.strip(), [])
        elif current is not None:
            current.append(line.strip())
    return sets


def expand(names):
    """The system calls named by a list of names and @sets."""
    result = set()
    for name in names:
        name = name.split(":")[0]      # name:errno
        if name.startswith("@"):
            result |= expand(syscall_sets()[name])
        else:
            result.add(name)
    return result


def allowed_syscalls(values):
    """The allow list SystemCallFilter= lines give (None when they make a deny list).
    systemd adds @default to an allow list, and the first line decides the mode."""
    allow, mode = set(), None
    for value in values:
        if not value:
            allow, mode = set(), None
            continue
        deny = value.startswith("~")
        names = expand(value.lstrip("~").split())
        if mode is None:
            mode = "deny" if deny else "allow"
            allow = names | (expand(["@default"]) if not deny else set())
        elif mode == "allow":
            allow = allow - names if deny else allow | names
        else:
            raise NotImplementedError("deny-list SystemCallFilter= is not emulated")
    return allow if mode == "allow" else None


class _Seccomp:
    def __init__(self):
        path = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
        self.lib = ctypes.CDLL(path, use_errno=True)
        self.lib.seccomp_init.restype = ctypes.c_void_p
        self.lib.seccomp_init.argtypes = [ctypes.c_uint32]
        self.lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
        self.lib.seccomp_rule_add_array.argtypes = [ctypes.c_void_p, ctypes.c_uint32, ctypes.c_int,
                                                    ctypes.c_uint, ctypes.POINTER(_ArgCmp)]
        self.lib.seccomp_load.argtypes = [ctypes.c_void_p]
        self.lib.seccomp_release.argtypes = [ctypes.c_void_p]

    def number(self, name):
        nr = self.lib.seccomp_syscall_resolve_name(name.encode())
        return nr if nr >= 0 else None     # not a system call of this architecture

    def load(self, default, rules):
        """rules: (action, syscall name, [(arg, op, a, b), ...])."""
        ctx = self.lib.seccomp_init(default)
        if not ctx:
            raise OSError("seccomp_init failed")
        try:
            for action, name, cmps in rules:
                nr = self.number(name)
                if nr is None:
                    continue
                array = (_ArgCmp * max(1, len(cmps)))(*[_ArgCmp(*c) for c in cmps])
                rc = self.lib.seccomp_rule_add_array(ctx, action, nr, len(cmps), array)
                if rc < 0:
                    raise OSError(-rc, "seccomp_rule_add %s: %s" % (name, os.strerror(-rc)))
            rc = self.lib.seccomp_load(ctx)
            if rc < 0:
                raise OSError(-rc, "seccomp_load: %s" % os.strerror(-rc))
        finally:
            self.lib.seccomp_release(ctx)


def _yes(settings, key):
    return settings.get(key, ["no"])[-1].lower() in ("yes", "true", "1", "on")


def apply(settings, uid):
    """Turns this process into what the unit's main process would be; call right before exec."""
    libc = ctypes.CDLL(None, use_errno=True)
    if settings.get("CapabilityBoundingSet", [None])[-1] == "":
        with open("/proc/sys/kernel/cap_last_cap") as f:
            last = int(f.read())
        for cap in range(last + 1):
            if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
                raise OSError(ctypes.get_errno(), "PR_CAPBSET_DROP %d" % cap)
    os.setgroups([])
    os.setgid(uid)
    os.setuid(uid)
    if settings.get("UMask"):
        os.umask(int(settings["UMask"][-1], 8))
    if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "PR_SET_NO_NEW_PRIVS")

    seccomp = _Seccomp()
    eperm = SCMP_ACT_ERRNO(errno.EPERM)
    if _yes(settings, "MemoryDenyWriteExecute"):     # systemd 252: seccomp, not PR_SET_MDWE
        wx = PROT_WRITE | PROT_EXEC
        seccomp.load(SCMP_ACT_ALLOW, [
            (eperm, "mmap", [(2, SCMP_CMP_MASKED_EQ, wx, wx)]),
            (eperm, "mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "pkey_mprotect", [(2, SCMP_CMP_MASKED_EQ, PROT_EXEC, PROT_EXEC)]),
            (eperm, "shmat", [(2, SCMP_CMP_MASKED_EQ, SHM_EXEC, SHM_EXEC)]),
        ])
    if settings.get("RestrictAddressFamilies"):
        allowed = {ADDRESS_FAMILIES[f] for v in settings["RestrictAddressFamilies"] for f in v.split()}
        seccomp.load(SCMP_ACT_ALLOW, [(SCMP_ACT_ERRNO(errno.EAFNOSUPPORT), "socket",
                                       [(0, SCMP_CMP_EQ, family, 0)])
                                      for family in range(AF_MAX) if family not in allowed])
    if _yes(settings, "RestrictRealtime"):
        seccomp.load(SCMP_ACT_ALLOW, [(eperm, call, [(1, SCMP_CMP_MASKED_EQ, 0xFF, policy)])
                                      for call in ("sched_setscheduler",)
                                      for policy in (SCHED_FIFO, SCHED_RR, SCHED_DEADLINE)])
    allow = allowed_syscalls(settings.get("SystemCallFilter", []))
    if allow is not None:
        code = settings.get("SystemCallErrorNumber", [None])[-1]
        default = SCMP_ACT_ERRNO(getattr(errno, code)) if code else 0x80000000   # KILL_PROCESS
        seccomp.load(default, [(SCMP_ACT_ALLOW, name, []) for name in sorted(allow)])


def main(argv):
    if len(argv) < 4 or argv[2] != "--":
        sys.exit(__doc__)
    unit, uid, command = argv[0], int(argv[1]), argv[3:]
    settings = service_settings(unit)
    apply(settings, uid)
    try:
        os.execv(command[0], command)
    except OSError as exc:
        sys.stderr.write("sandbox: cannot run %s: %s\n" % (shlex.join(command), exc))
        os._exit(127)


if __name__ == "__main__":
    main(sys.argv[1:])
