"""The systemd service protocol, without libsystemd: sd_notify (READY / STATUS / WATCHDOG /
STOPPING) and socket activation (DESIGN.md §8).

Every function is a no-op outside systemd, so the service calls them unconditionally.

The PyInstaller onefile binary runs as two processes: a bootloader parent that systemd
started and our interpreter as its child. systemd then sets WATCHDOG_PID and LISTEN_PID to
the parent's pid, so both checks accept our own pid or our parent's; the unit needs
`NotifyAccess=all` for the child's messages to count.
"""

import asyncio
import logging
import os
import socket

log = logging.getLogger("kvcm.systemd")

LISTEN_FDS_START = 3
_SEND_TIMEOUT = 1.0     # a stuck manager must not stall the event loop for long


def notify(state: str) -> bool:
    """Sends one sd_notify message ("READY=1", "KEY=VALUE\\nKEY=VALUE", ...) to $NOTIFY_SOCKET.
    True when it was sent; False when there is no socket or sending failed (never raises)."""
    address = os.environ.get("NOTIFY_SOCKET", "")
    if address.startswith("@"):
        address = "\0" + address[1:]          # Linux abstract namespace
    elif not address.startswith("/"):
        return False                          # unset, or a transport we do not speak (vsock)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.settimeout(_SEND_TIMEOUT)
            sock.sendto(state.encode("utf-8", "replace"), address)
    except OSError as exc:
        log.debug("sd_notify %r failed: %s", state, exc)
        return False
    return True


def _one_line(text):
    # A newline would start another assignment: a status must not be able to send READY=1.
    return " ".join(str(text).splitlines())


def ready(status: str = None) -> bool:
    """READY=1: call once the HTTP and ZMQ sockets are listening."""
    return notify("READY=1" if status is None else "READY=1\nSTATUS=" + _one_line(status))


def status(text: str) -> bool:
    """STATUS=: the one line `systemctl status` shows."""
    return notify("STATUS=" + _one_line(text))


def stopping() -> bool:
    return notify("STOPPING=1")


def watchdog() -> bool:
    return notify("WATCHDOG=1")


def _is_for_us(pid_text):
    """Whether a WATCHDOG_PID / LISTEN_PID value names this process or its parent."""
    try:
        pid = int(pid_text)
    except ValueError:
        return False
    return pid > 0 and pid in (os.getpid(), os.getppid())


def watchdog_interval() -> "float | None":
    """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when systemd does not
    watch this process."""
    try:
        usec = int(os.environ.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if usec <= 0:
        return None
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and not _is_for_us(pid):
        return None
    return usec / 2e6


async def watchdog_task(alive) -> None:
    """Pings WATCHDOG=1 every watchdog_interval() while alive() returns True, and withholds
    the ping while it returns False (or raises), so that systemd restarts a process whose
    ingest loop is stuck. Returns at once when the watchdog is off; run it as a task and
    cancel it on shutdown."""
    period = watchdog_interval()
    if period is None:
        return
    healthy = True
    while True:
        try:
            ok = bool(alive())
        except Exception:
            log.exception("watchdog health check failed")
            ok = False
        if ok:
            watchdog()
        elif healthy:
            log.error("the ingest loop is not alive: withholding watchdog pings, systemd will restart kvcm")
        healthy = ok
        await asyncio.sleep(period)


_LISTEN_VARS = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def listen_fds_with_names() -> "list[tuple[str, socket.socket]]":
    """The sockets systemd passed (socket activation) with their FileDescriptorName= names
    ("unknown" when LISTEN_FDNAMES does not name them), in fd order. The fds become
    close-on-exec and the LISTEN_* variables are removed, so a second call, or a child
    process, gets none. Fds that are not sockets are skipped (and stay open)."""
    pid = os.environ.get("LISTEN_PID", "")
    count = os.environ.get("LISTEN_FDS", "")
    names = os.environ.get("LISTEN_FDNAMES", "")
    for name in _LISTEN_VARS:
        os.environ.pop(name, None)
    if not count or not _is_for_us(pid):
        return []
    try:
        n = int(count)
    except ValueError:
        n = -1
    if n < 0:
        log.warning("ignoring LISTEN_FDS=%r: not a count of fds", count)
        return []
    names = names.split(":") if names else []
    if len(names) != n:
        names = ["unknown"] * n
    sockets = []
    for fd, name in zip(range(LISTEN_FDS_START, LISTEN_FDS_START + n), names):
        try:
            os.set_inheritable(fd, False)
            sock = socket.socket(fileno=fd)
        except OSError as exc:
            log.warning("ignoring passed fd %d (%s): %s", fd, name, exc)
            continue
        sockets.append((name, sock))
    return sockets


def listen_fds() -> "list[socket.socket]":
    """The sockets systemd passed, in fd order; see listen_fds_with_names."""
    return [sock for _, sock in listen_fds_with_names()]
