"""`kvcm sim`: one process, one uvloop event loop, one or more data-parallel ranks.

Each rank is a whole engine: its HTTP server on `--port` + rank, its KV cache, LoRA slots,
event publisher (the ZMQ endpoint's and the replay endpoint's ports offset by the rank, the
rank in every batch, as vLLM's data-parallel ranks do) and its metrics. With the default pod
id (`<POD_IP or 127.0.0.1>:<the rank's HTTP port>`) every rank is a pod of its own, which is
what a router needs to send requests to it; an explicit `--pod-id` makes the ranks one pod
with a stream per rank. `--data-parallel-rank R` runs rank R alone (one process per rank, as
llm-d deploys them).

Lifecycle: the configuration is printed (as JSON, one line), HTTP listeners start (HTTPS with
`--ssl-certfile` or `--self-signed-certs`), then the publishers; `/health/ready` answers 200
once every rank is up and `--startup-duration` has passed. SIGTERM/SIGINT: readiness drops,
listeners stop accepting, in-flight requests get `SHUTDOWN_GRACE` seconds, what is left is
aborted, the last events are sent, exit 0.
"""

import asyncio
import logging
import signal
import ssl
import sys
import uuid

import orjson

from kvcm.http import HttpServer, Router
from kvcm.sim.admin import AdminRoutes
from kvcm.sim.config import config_from, notes
from kvcm.sim.engine import Engine
from kvcm.sim.events import EventBatcher, EventStream
from kvcm.sim.httplog import LoggingRouter
from kvcm.sim.kvcache import KVCache, Keying
from kvcm.sim.loras import LoraRegistry, LoraSlots
from kvcm.sim.metrics import SimMetrics
from kvcm.sim.server import SimServer
from kvcm.sim.settings import ConfigError
from kvcm.sim.text import WordTokenizer, load_tokenizer
from kvcm.sim.tls import server_context

log = logging.getLogger("kvcm.sim")

SHUTDOWN_GRACE = 5.0


class Rank:
    """One data-parallel rank: engine, KV cache, LoRA adapters, metrics, HTTP server, events."""

    def __init__(self, config, index, tokenizer, ready, tls=None):
        self.config = config
        self.index = index
        self.tokenizer = tokenizer
        self.engine_id = str(uuid.uuid4())
        self.loras = LoraRegistry(config.served_model_names)
        self.slots = LoraSlots(config.max_loras, self.loras)
        keying = Keying(config.hash_algo, config.hash_seed, config.block_size, config.model, config.served_model_name)
        self.cache = KVCache(config.kv_cache_size, keying, enabled=config.enable_kvcache,
                             loaded_loras=self.slots.loaded)
        self.metrics = SimMetrics(config, index)
        self.engine = Engine(config, self.cache, self.slots, metrics=self.metrics)
        for module in config.lora_modules:
            self.loras.load(module.name, module.path)
        self.metrics.attach(self.engine, self.loras)
        router = Router()
        routes = LoggingRouter(router) if config.log_http else router
        self.server = SimServer(self, routes)
        self.admin = AdminRoutes(self, routes, ready)
        self.http = HttpServer(router, max_body=config.max_request_body_size_mb << 20, ssl=tls)
        self.batcher = EventBatcher(self.cache, None, config.event_batch_size)
        self.events = None
        self.pod = None

    @property
    def port(self):
        return self.http.port

    @property
    def host(self):
        """The address peers reach this rank at."""
        host = self.config.host
        return "127.0.0.1" if host in ("0.0.0.0", "::", "") else host

    def set_config(self, config):
        """A configuration changed at run time (POST /admin/config)."""
        self.config = self.engine.config = self.metrics.config = config

    async def start(self):
        c = self.config
        await self.http.start(c.host, c.http_port_of(self.index))
        self.pod = c.pod_for(self.port)
        if c.zmq_endpoint and c.enable_kvcache:
            self.events = EventStream(c.zmq_endpoint, topic=c.topic_for(self.pod), dp_rank=self.index,
                                      replay_endpoint=c.replay_endpoint, form=c.event_format,
                                      replay_batches=c.kv_events_replay_queue_size)
            self.batcher.stream = self.events

    def describe(self):
        where = "rank %d: %s %s:%d, pod %s" % (self.index, "https" if self.config.tls else "http", self.config.host,
                                               self.port, self.pod)
        if self.events is None:
            return where + ", no KV events"
        where += ", KV events (%s) to %s topic %r" % (self.config.event_format, self.events.endpoint, self.events.topic)
        if self.events.replay_endpoint:
            where += ", replay %s" % self.events.replay_endpoint
        return where

    async def close(self, grace):
        await self.http.close(grace)
        await self.engine.close()
        self.batcher.flush()
        if self.events is not None:
            self.events.close()


class Simulator:
    """Every rank of one `kvcm sim`; `run()` returns when it has stopped."""

    def __init__(self, config):
        self.config = config
        if config.force_dummy_tokenizer:
            self.tokenizer = WordTokenizer()
        else:
            self.tokenizer = load_tokenizer(config.tokenizer, config.model)
        self.tls = server_context(config)
        self._ready = False
        self.ranks = [Rank(config, r, self.tokenizer, lambda: self._ready, self.tls) for r in config.ranks]
        self._stop = None

    async def start(self):
        try:
            for rank in self.ranks:
                await rank.start()
        except BaseException:
            await self.close(0.0)
            raise
        self._ready = True
        for rank in self.ranks:
            log.info("kvcm sim %s", rank.describe())
        log.info("kvcm sim ready: model %s, %s tokenizer, mode %s, %d KV blocks of %d tokens per rank",
                 self.config.model, self.tokenizer.name, self.config.mode, self.config.kv_cache_size,
                 self.config.block_size)

    async def close(self, grace=SHUTDOWN_GRACE):
        self._ready = False
        await asyncio.gather(*(rank.close(grace) for rank in self.ranks))

    async def run(self):
        loop = asyncio.get_running_loop()
        self._stop = asyncio.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stop.set)
        try:
            await self.start()
            await self._stop.wait()
            log.info("stopping")
            await self.close()
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    def stop(self):
        if self._stop is not None:
            self._stop.set()


def main(args):
    """`kvcm sim` with parsed arguments; returns the exit status."""
    import uvloop
    import zmq

    from kvcm.serve import configure_logging
    from kvcm.tokenize import TokenizerLoadError

    try:
        config, ignored = config_from(args)
    except ConfigError as exc:
        sys.stderr.write("kvcm sim: error: %s\n" % exc)
        return 2
    for line in notes(ignored):
        sys.stderr.write(line + "\n")
    configure_logging(config.log_level, "text")
    log.info("configuration: %s", orjson.dumps(config.as_json()).decode())
    try:
        simulator = Simulator(config)
    except (ValueError, TokenizerLoadError) as exc:
        sys.stderr.write("kvcm sim: error: %s\n" % exc)
        return 2
    except (OSError, ssl.SSLError) as exc:
        sys.stderr.write("kvcm sim: error: cannot load the TLS certificate: %s\n" % exc)
        return 2
    except ImportError as exc:
        sys.stderr.write("kvcm sim: error: --self-signed-certs needs the cryptography package (%s)\n" % exc)
        return 2
    try:
        uvloop.run(simulator.run())
    except OSError as exc:
        sys.stderr.write("kvcm sim: error: cannot listen: %s\n" % exc)
        return 1
    except zmq.ZMQError as exc:
        sys.stderr.write("kvcm sim: error: cannot open the KV event sockets: %s\n" % exc)
        return 1
    return 0
