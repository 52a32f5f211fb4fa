"""A client on another host, on any machine: a network namespace made by the test, joined to
this one by a veth pair, each end with an address of its own in 198.18.0.0/15 (RFC 2544's
benchmarking range, which no real network routes). A server listening on 0.0.0.0 here sees
requests from the namespace coming from a non-loopback address.

Needs root and `ip` (Debian's iproute2); ExternalHost.skip_reason() says why not otherwise.
Everything made is removed by close(), the veth pair with the namespace.
"""

import base64
import json
import os
import random
import shutil
import subprocess
import sys

import httpclient

# Runs inside the namespace: one request, the reply as JSON on stdout.
_CLIENT = r"""
import base64, http.client, json, sys
host, port, method, path, body, headers = json.loads(sys.argv[1])
conn = http.client.HTTPConnection(host, port, timeout=60)
conn.request(method, path, body=None if body is None else base64.b64decode(body), headers=headers)
r = conn.getresponse()
print(json.dumps({"status": r.status, "headers": {k.lower(): v for k, v in r.getheaders()},
                  "body": base64.b64encode(r.read()).decode()}))
"""


def _ip(*args, check=True):
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=check, timeout=30)


class ExternalHost:
    """A namespace whose client reaches this host at `server_address` from `address`."""

    @staticmethod
    def skip_reason():
        if os.geteuid() != 0:
            return "a client on another address needs a network namespace, and creating one needs root"
        if shutil.which("ip") is None:
            return "`ip` is not installed (Debian package iproute2)"
        return None

    def __init__(self):
        tag = "%05x%s" % (os.getpid() & 0xFFFFF, random.randbytes(2).hex())
        self.name = "kvcm-test-" + tag
        self._link = "kvh" + tag
        used = _ip("-4", "-o", "addr", "show").stdout + _ip("-4", "route", "show").stdout
        while True:
            net = "198.%d.%d.%d" % (random.choice((18, 19)), random.randrange(256), 4 * random.randrange(64))
            prefix = net.rsplit(".", 1)[0] + "."
            if prefix not in used:
                break
        base = int(net.rsplit(".", 1)[1])
        self.server_address, self.address = prefix + str(base + 1), prefix + str(base + 2)
        try:
            _ip("netns", "add", self.name)
            _ip("link", "add", self._link, "type", "veth", "peer", "name", "kvn" + tag)
            _ip("link", "set", "kvn" + tag, "netns", self.name)
            _ip("addr", "add", self.server_address + "/30", "dev", self._link)
            _ip("link", "set", self._link, "up")
            _ip("-n", self.name, "addr", "add", self.address + "/30", "dev", "kvn" + tag)
            _ip("-n", self.name, "link", "set", "kvn" + tag, "up")
            _ip("-n", self.name, "link", "set", "lo", "up")
        except BaseException:
            self.close()
            raise

    def request(self, port, method, path, body=None, headers=None):
        """One HTTP request from inside the namespace to this host's `port`: an httpclient.Reply."""
        data = None
        headers = dict(headers or {})
        if body is not None:
            data = body if isinstance(body, bytes) else json.dumps(body).encode()
            headers.setdefault("Content-Type", "application/json")
        elif method == "POST":
            data = b""
        job = [self.server_address, port, method, path, None if data is None else base64.b64encode(data).decode(),
               headers]
        proc = subprocess.run(["ip", "netns", "exec", self.name, sys.executable, "-c", _CLIENT, json.dumps(job)],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        reply = json.loads(proc.stdout)
        return httpclient.Reply(reply["status"], reply["headers"], base64.b64decode(reply["body"]))

    def close(self):
        _ip("netns", "del", self.name, check=False)
        _ip("link", "del", self._link, check=False)      # gone with the namespace, normally
