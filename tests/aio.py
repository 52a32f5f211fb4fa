"""Running tests on uvloop, waiting for conditions without timing assertions, free ports."""

import asyncio
import functools
import socket
import time

import uvloop

TEST_DEADLINE = 60.0   # a whole test; only hit when something hangs
WAIT_DEADLINE = 10.0   # one condition


def on_uvloop(fn):
    """Runs an async test function to completion on a fresh uvloop loop."""
    @functools.wraps(fn)
    def run(*args, **kwargs):
        return uvloop.run(asyncio.wait_for(fn(*args, **kwargs), TEST_DEADLINE))
    return run


async def until(condition, what, deadline=WAIT_DEADLINE):
    """Waits until condition() is true; fails naming `what` after `deadline` seconds."""
    loop = asyncio.get_running_loop()
    end = loop.time() + deadline
    while not condition():
        if loop.time() > end:
            raise AssertionError("timed out waiting for %s" % what)
        await asyncio.sleep(0.002)


def poll_until(condition, what, deadline=20.0, interval=0.005):
    """The first truthy value of condition(), polled every `interval` seconds from synchronous
    code (subprocesses, servers on other threads); fails naming `what` after `deadline`
    seconds."""
    end = time.monotonic() + deadline
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError("timed out after %gs waiting for %s" % (deadline, what))
        time.sleep(interval)


def free_port(span=1):
    """A TCP port P on 127.0.0.1 with P .. P+span-1 free a moment ago (for endpoints that
    cannot say *, and data-parallel ranks that offset the port)."""
    for _ in range(200):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port + span > 65536:
            continue
        try:
            for off in range(1, span):
                with socket.socket() as s:
                    s.bind(("127.0.0.1", port + off))
        except OSError:
            continue
        return port
    raise RuntimeError("no free ports")
