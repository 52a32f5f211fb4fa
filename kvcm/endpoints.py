"""ZMQ endpoints: the syntax kvcm accepts from its operator (flags, the engines file), and the
stricter rule for engines registered at run time over HTTP (DESIGN.md §5).

An operator may point kvcm anywhere, `ipc://` sockets included. A client of the admin API
may only name a TCP engine by a resolvable host and a concrete port: kvcm must not be made
to connect to its own host's inproc or ipc sockets, to link-local addresses (cloud metadata
services live there), or to nowhere.
"""

import asyncio
import ipaddress
import re
import socket

TRANSPORTS = ("tcp", "ipc", "inproc")

_HOSTNAME = re.compile(r"(?=.{1,253}$)(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def check_endpoint(endpoint, what="endpoint", connect=False):
    """Returns endpoint if it is a usable ZMQ endpoint, else raises a ValueError naming `what`.
    An endpoint kvcm connects to needs a host and a port; one it binds may use `*` for either
    (and port 0)."""
    transport, sep, address = endpoint.partition("://")
    ok = bool(sep and transport in TRANSPORTS and address)
    if ok and transport == "tcp":
        host, colon, port = address.rpartition(":")
        if connect:
            ok = bool(colon and host) and host != "*" and _port(port) is not None
        else:
            ok = bool(colon and host) and (port == "*" or (port.isdigit() and int(port) < 65536))
    if not ok:
        raise ValueError("%s %r: expected tcp://HOST:PORT, ipc://PATH or inproc://NAME" % (what, endpoint))
    return endpoint


def _port(text):
    """The port number of `text` when it names one a peer can listen on, else None."""
    if not text.isdigit() or text.startswith("0"):
        return None
    port = int(text)
    return port if port < 65536 else None


def split_tcp(endpoint, what="endpoint"):
    """(host, port) of `tcp://HOST:PORT` with a host name or an IP address (IPv6 in brackets)
    and a port from 1 to 65535; ValueError for anything else, other transports included."""
    transport, sep, address = endpoint.partition("://")
    host, colon, port_text = address.rpartition(":")
    port = _port(port_text)
    if transport != "tcp" or not sep or not colon or port is None:
        raise ValueError("%s %r: engines registered over HTTP must be tcp://HOST:PORT with a port from 1 to 65535"
                         % (what, endpoint))
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError("%s %r: %r is not an IPv6 address" % (what, endpoint, host)) from None
        return host[1:-1], port
    if not _HOSTNAME.fullmatch(host):
        raise ValueError("%s %r: %r is not a host name or an IPv4 address" % (what, endpoint, host))
    return host, port


async def check_registered_endpoint(endpoint, what="endpoint"):
    """Returns endpoint if a client of the admin API may register it: `tcp://HOST:PORT`
    whose host resolves (off the event loop), and only to addresses kvcm may connect to —
    not link-local, unspecified or multicast. Raises ValueError otherwise. The endpoint is
    kept as given, so a host name follows its DNS records."""
    host, port = split_tcp(endpoint, what)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise ValueError("%s %r: cannot resolve %r (%s)" % (what, endpoint, host, exc)) from None
    for *_, sockaddr in infos:
        address = ipaddress.ip_address(sockaddr[0].split("%", 1)[0])
        address = getattr(address, "ipv4_mapped", None) or address
        if address.is_link_local or address.is_unspecified or address.is_multicast:
            raise ValueError("%s %r: %s is a link-local, unspecified or multicast address; kvcm does not "
                             "connect there" % (what, endpoint, address))
    if not infos:
        raise ValueError("%s %r: %r resolves to no address" % (what, endpoint, host))
    return endpoint
