"""Admits ZMQ publishers by their address (`--zmq-allow CIDR`), through libzmq's ZAP protocol
(ZMQ RFC 27).

libzmq asks the ZAP handler of a socket's context about every connection of a socket that
has a ZAP domain, before a message of that connection is delivered: the request names the
peer's IP address, and a reply of 200 admits the connection while 400 closes it. kvcm's
handler is a ROUTER socket served on the event loop like the ingest sockets (pyzmq's own
authenticator takes single addresses and runs a thread of its own); a decision is one test
of the address against a few networks, so it never holds the loop.

It guards the SUB sockets: in bind mode the peer is the engine that connected, in connect
mode the engine kvcm connects to (a registered engine outside the networks stays refused).
"""

import ipaddress
import logging

import zmq

from kvcm.ratelog import RateLimitedLog

log = logging.getLogger("kvcm.ingest")

ZAP_ENDPOINT = "inproc://zeromq.zap.01"   # where libzmq looks for a context's handler
DOMAIN = b"kvcm-ingest"
_BUDGET = 256                             # requests answered per loop turn


def parse_network(text):
    """An IPv4 or IPv6 network (`10.0.0.0/8`, `::1`; host bits may be set); ValueError otherwise."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError("%r is not an IP network such as 10.0.0.0/8 or fd00::/8" % text) from None


class SourceFilter:
    """The ZAP handler of one ZMQ context: admits peers whose address is in `networks`;
    on_refused() is called for every connection refused."""

    def __init__(self, networks, on_refused=lambda: None):
        self.networks = tuple(parse_network(n) if isinstance(n, str) else n for n in networks)
        self._on_refused = on_refused
        self._sock = None
        self._loop = None
        self._handle = None
        self._log = RateLimitedLog(log)

    def allows(self, address):
        try:
            ip = ipaddress.ip_address(address.split("%", 1)[0])
        except ValueError:
            return False
        ip = getattr(ip, "ipv4_mapped", None) or ip   # a dual-stack socket's view of an IPv4 peer
        return any(ip in net for net in self.networks)

    def start(self, ctx, loop):
        """Serves the context's ZAP requests on `loop`. Must run before a guarded socket
        binds or connects."""
        self._loop = loop
        self._sock = ctx.socket(zmq.ROUTER)
        self._sock.linger = 0
        self._sock.bind(ZAP_ENDPOINT)
        loop.add_reader(self._sock.FD, self._on_readable)
        self._handle = loop.call_soon(self._drain)

    def guard(self, sock):
        """Makes libzmq ask this handler about every connection of sock."""
        sock.zap_domain = DOMAIN

    def stop(self):
        if self._sock is None:
            return
        if self._handle is not None:
            self._handle.cancel()
        self._loop.remove_reader(self._sock.FD)
        self._sock.close(linger=0)
        self._sock = None

    def _on_readable(self):
        if self._handle is None:
            self._drain()

    def _drain(self):
        self._handle = None
        for _ in range(_BUDGET):
            try:
                frames = self._sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            self._answer(frames)
        self._handle = self._loop.call_soon(self._drain)   # the FD's edge may be spent

    def _answer(self, frames):
        # [routing id, b"", version, request id, domain, address, identity, mechanism, *credentials]
        if len(frames) < 8 or frames[1] or frames[2] != b"1.0":
            return
        address = frames[5].decode("ascii", "replace")
        if self.allows(address):
            status, text = b"200", b"OK"
        else:
            status, text = b"400", b"address not allowed"
            self._on_refused()
            self._log.warning("refused", "refused a ZMQ connection from %s: not in --zmq-allow", address)
        self._sock.send_multipart([frames[0], b"", b"1.0", frames[3], status, text, b"kvcm", b""])
