"""The index backend `--index` names: `memory`, or the URL of a Redis-protocol store."""

from kvcm.memory_backend import MemoryBackend
from kvcm.shared_index import SharedIndex


def open_backend(cfg, index):
    """The backend of a Config. `index` is this process's kvcm._core Index, the in-memory
    backend's whole index (a shared store's backend reaches its own, which keeps only the
    names and the engine-hash map, through the event sink it is started with)."""
    if cfg.index == "memory":
        return MemoryBackend(index)
    return SharedIndex(cfg.index, timeout=cfg.redis_timeout, ttl=cfg.redis_ttl,
                       backlog_events=cfg.redis_backlog, fail_open=cfg.redis_fail_open)
