"""`kvcm sim`: one process, one uvloop event loop, `--data-parallel-size` ranks.

Each rank is a whole engine: its HTTP server on `--port` + rank, its KV cache, its event
publisher (the ZMQ endpoint's and the replay endpoint's ports offset by the rank, the rank
in every batch, as vLLM's data-parallel ranks do) and its metrics. With the default pod id
(`127.0.0.1:<the rank's HTTP port>`) every rank is a pod of its own, which is what a router
needs to send requests to it; an explicit `--pod-id` makes the ranks one pod with a stream
per rank.

Lifecycle: HTTP listeners, then the publishers; `/health/ready` answers 200 once every rank
is up. SIGTERM/SIGINT: readiness drops, listeners stop accepting, in-flight requests get
`SHUTDOWN_GRACE` seconds, what is left is aborted, the last events are sent, exit 0.
"""

import asyncio
import logging
import signal
import sys

from kvcm._core import BlockHasher
from kvcm.http import HttpServer
from kvcm.sim.config import ConfigError, SimConfig
from kvcm.sim.engine import Engine
from kvcm.sim.events import EventStream
from kvcm.sim.kvcache import KVCache
from kvcm.sim.metrics import SimMetrics
from kvcm.sim.server import LoraRegistry, SimServer
from kvcm.sim.text import load_tokenizer

log = logging.getLogger("kvcm.sim")

SHUTDOWN_GRACE = 5.0


class Rank:
    """One data-parallel rank: engine, KV cache, metrics, LoRAs, HTTP server, publisher."""

    def __init__(self, config, rank, tokenizer, ready):
        self.config = config
        self.rank = rank
        hasher = BlockHasher(config.hash_algo, config.hash_seed, config.block_size, namespace=config.model)
        self.cache = KVCache(config.kv_cache_size, hasher, form=config.event_format)
        self.metrics = SimMetrics(config, rank)
        self.engine = Engine(config, self.cache, metrics=self.metrics)
        self.loras = LoraRegistry(config.served_model_names)
        for name, path in config.lora_modules:
            self.loras.load(name, path)
        self.metrics.attach(self.engine, self.loras)
        self.server = SimServer(config, rank, self.engine, tokenizer, self.loras, self.metrics, pod=None, ready=ready)
        self.http = HttpServer(self.server.router)
        self.events = None
        self.pod = None

    @property
    def port(self):
        return self.http.port

    async def start(self):
        c = self.config
        await self.http.start(c.host, c.port + self.rank if c.port else 0)
        self.pod = self.server.pod = c.pod_for(self.port)
        if c.zmq_endpoint:
            self.events = EventStream(c.zmq_endpoint, topic=c.topic_for(self.pod), dp_rank=self.rank,
                                      replay_endpoint=c.replay_endpoint, form=c.event_format)
            self.engine.events = self.events

    def describe(self):
        where = "rank %d: http %s:%d, pod %s" % (self.rank, self.config.host, self.port, self.pod)
        if self.events is None:
            return where + ", no KV events"
        where += ", KV events (%s) to %s topic %r" % (self.config.event_format, self.events.endpoint, self.events.topic)
        if self.events.replay_endpoint:
            where += ", replay %s" % self.events.replay_endpoint
        return where

    async def close(self, grace):
        await self.http.close(grace)
        await self.engine.close()
        if self.events is not None:
            self.events.close()


class Simulator:
    """Every rank of one `kvcm sim`; `run()` returns when it has stopped."""

    def __init__(self, config):
        self.config = config
        self.tokenizer = load_tokenizer(config.tokenizer, config.model)
        self._ready = False
        self.ranks = [Rank(config, r, self.tokenizer, lambda: self._ready) for r in range(config.data_parallel_size)]
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
        config = SimConfig.from_args(args)
    except ConfigError as exc:
        sys.stderr.write("kvcm sim: error: %s\n" % exc)
        return 2
    configure_logging(config.log_level, "text")
    try:
        simulator = Simulator(config)
    except (ValueError, TokenizerLoadError) as exc:
        sys.stderr.write("kvcm sim: error: %s\n" % exc)
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
