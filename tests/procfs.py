"""What /proc says about a process: its children, and sizes from its status file."""

import os


def children(pid):
    """The live (not zombie) child processes of pid, sorted."""
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid and fields[0] != "Z":
                found.append(int(entry))
    return sorted(found)


def status_mib(pid, field):
    """A size from /proc/PID/status in MiB: VmRSS (resident now), VmHWM (its peak), ..."""
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no %s for process %d" % (field, pid))
