"""`kvcm serve`: one process, one uvloop event loop running the ZMQ ingest and the HTTP
server together, with systemd's notify protocol and graceful shutdown.

Lifecycle: sockets first (ZMQ, then HTTP, or the socket systemd passed), READY=1 only once
both listen; SIGTERM/SIGINT stop accepting, let in-flight requests finish (bounded),
STOPPING=1, exit 0; SIGHUP re-reads the configuration for the log level and rescans the
tokenizer directory.
"""

import asyncio
import json
import logging
import signal
import ssl
import sys
import time

from kvcm import systemd
from kvcm._core import ilock_configure_spin
from kvcm.api import Api, RequestTimer
from kvcm.config import ConfigError, load_config
from kvcm.http import HttpServer
from kvcm.indexer import Indexer, TemplatesUnavailable
from kvcm.metrics import Metrics
from kvcm.placement import available_cpus, pin_this_thread, set_scheduler_slice
from kvcm.ratelog import RateLimitedLog

log = logging.getLogger("kvcm.serve")

SHUTDOWN_GRACE = 10.0  # seconds in-flight requests get after SIGTERM
SCORING_SLICE_S = 100e-6  # a busy-polling event loop's scheduler slice, the shortest Linux takes (set_scheduler_slice)


class _JsonFormatter(logging.Formatter):
    def format(self, record):
        line = {"ts": round(record.created, 3), "level": record.levelname.lower(),
                "logger": record.name, "msg": record.getMessage()}
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, ensure_ascii=False)


def configure_logging(level, fmt):
    """Log lines on stderr (journald collects them under systemd): text or JSON."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(_JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())


def _tls(config):
    if config.tls_cert is None and config.tls_key is None:
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ValueError("--tls-cert and --tls-key go together: give both, or neither")
    return tls_context(config.tls_cert, config.tls_key)


def tls_context(cert, key):
    """The server-side TLS context of --tls-cert/--tls-key (TLS 1.2 or later, HTTP/1.1 by
    ALPN); ValueError naming the files when they cannot be loaded."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as e:
        raise ValueError("cannot load the TLS certificate %s and key %s: %s"
                         % (cert, key, getattr(e, "strerror", None) or e)) from None
    return context


def _rate_limited_exception_handler():
    """The loop's handler for errors nothing else caught (a transport failing on a client's
    bad bytes, say): logged like asyncio's default handler does, at most one line per kind
    of error per interval."""
    limited = RateLimitedLog(logging.getLogger("kvcm.loop"))

    def handle(loop, context):
        message = context.get("message") or "unhandled error in the event loop"
        exception = context.get("exception")
        reason = "%s: %s" % (type(exception).__name__, message) if exception is not None else message
        limited.error(reason[:120], "%s", message, exc_info=exception)
    return handle


class IngestFailed(RuntimeError):
    """The ingest stopped while kvcm was serving."""


class Service:
    """The running service; `run()` returns when it has stopped."""

    def __init__(self, config, args=None):
        self.config = config
        self._args = args  # to re-read the configuration on SIGHUP
        self.indexer = Indexer(config)
        self.metrics = Metrics(self.indexer)
        self._ready = False
        self.api = Api(self.indexer, self.metrics, admin_token=config.admin_token,
                       ready=lambda: self._ready)
        self.http = HttpServer(self.api.router, max_body=config.max_body,
                               header_timeout=config.header_timeout, body_timeout=config.body_timeout,
                               idle_timeout=config.idle_timeout, max_connections=config.max_connections,
                               on_response=RequestTimer(self.metrics), ssl=_tls(config), lane=self.api.lane(),
                               busy_poll=config.busy_poll_us / 1e6)
        if self.http.lane is not None:
            self.metrics.watch_lane(self.http.lane)
        if config.busy_poll_us:
            self.metrics.watch_busy_polls(self.http)
        self._stop = None
        self._failure = None
        if hasattr(self.indexer.ingest, "on_fatal"):   # the ingest runs on a thread of its own
            self.indexer.ingest.on_fatal = self._ingest_failed

    def _ingest_failed(self, exc):
        """The ingest thread ended: kvcm stops, and exits non-zero, rather than serve an
        index nobody feeds."""
        self._failure = "the ingest thread stopped (%r); see the log above" % (exc,)
        self.stop()

    async def start(self):
        if self.config.http_cpus is not None:
            # first: the ingest thread and the workers started from here inherit these CPUs
            # (the ingest thread then moves to --ingest-cpus, if given)
            pin_this_thread(self.config.http_cpus, "--http-cpus")
        if self.config.busy_poll_us:
            # a loop tuned for latency: woken, it preempts what holds its CPU (measured: it
            # helps a busy-polling loop, and costs a loop that shares its CPU with its
            # clients; benchmarks/RESULTS.md)
            set_scheduler_slice(SCORING_SLICE_S)
        # a waiter for the index lock spins only where its holder may run on another CPU
        http = set(self.config.http_cpus or available_cpus() or ())
        ilock_configure_spin(http | set(self.config.ingest_cpus or http))
        await self.indexer.start()
        inherited = systemd.listen_fds()
        if inherited:
            await self.http.start_on_socket(inherited[0])
        else:
            await self.http.start(self.config.http_host, self.config.http_port)
        self._ready = True
        where = "http %s%s, zmq %s" % (self.http_addresses(), " (TLS)" if self.http.ssl is not None else "",
                                       ", ".join(self.indexer.ingest.bound) or "connect mode")
        log.info("kvcm serving: %s", where)
        systemd.ready("serving: " + where)

    def http_addresses(self):
        return ", ".join("%s:%d" % s.getsockname()[:2] for s in self.http.sockets)

    async def run(self):
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(_rate_limited_exception_handler())
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        try:
            await self.start()
            watchdog = asyncio.ensure_future(systemd.watchdog_task(lambda: self.indexer.started))
            await self._stop.wait()
            log.info("stopping")
            systemd.stopping()
            watchdog.cancel()
            self._ready = False
            await self.http.close(SHUTDOWN_GRACE)
        finally:
            await self.indexer.close()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)
        if self._failure is not None:
            raise IngestFailed(self._failure)

    def stop(self):
        if self._stop is not None:
            self._stop.set()

    def reload(self):
        """SIGHUP: log level (from a fresh read of flags, env and file) and tokenizers."""
        try:
            fresh = load_config(self._args)
            configure_logging(fresh.log_level, fresh.log_format)
        except ConfigError as e:
            log.error("SIGHUP: configuration not reloaded: %s", e)
        changes = self.indexer.tokenizers.reload()
        log.info("SIGHUP: reloaded; tokenizers %s", {k: v for k, v in changes.items() if v} or "unchanged")
        systemd.status("reloaded at %s" % time.strftime("%H:%M:%S"))


def main(args):
    """`kvcm serve` with parsed arguments; returns the exit status."""
    try:
        config = load_config(args)
    except ConfigError as e:
        sys.stderr.write("kvcm serve: error: %s\n" % e)
        return 2
    configure_logging(config.log_level, config.log_format)
    for note in config.notes:
        log.info(note)
    try:
        service = Service(config, args)
    except ValueError as e:  # e.g. a tokenizer directory that does not exist
        sys.stderr.write("kvcm serve: error: %s\n" % e)
        return 2
    import uvloop

    try:
        uvloop.run(service.run())
    except OSError as e:
        # a port in use or an address kvcm cannot bind: a setting to change, like a bad value
        sys.stderr.write("kvcm serve: error: cannot listen: %s\n" % e)
        return 2
    except ValueError as e:   # CPUs the system would not let kvcm run on
        sys.stderr.write("kvcm serve: error: %s\n" % e)
        return 2
    except (TemplatesUnavailable, IngestFailed) as e:
        sys.stderr.write("kvcm serve: error: %s\n" % e)
        return 1
    return 0
