"""Running tests on uvloop, and waiting for conditions without timing assertions."""

import asyncio
import functools
import socket

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


def free_port():
    """A TCP port on 127.0.0.1 that was free a moment ago (for endpoints that cannot say *)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
