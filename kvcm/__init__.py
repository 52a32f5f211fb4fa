"""kvcm: a KV-cache-aware routing index for LLM inference clusters.

The library API is `kvcm.Indexer` (see kvcm.indexer) configured by `kvcm.load_config`; they
are imported on first use, so `import kvcm` stays cheap for the CLI and the core.
"""

__version__ = "0.1.0"

_LAZY = {"Indexer": "kvcm.indexer", "load_config": "kvcm.config", "Config": "kvcm.config",
         "ConfigError": "kvcm.config"}


def __getattr__(name):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError("module 'kvcm' has no attribute %r" % name)
    import importlib

    return getattr(importlib.import_module(module), name)


def __dir__():
    return sorted(list(globals()) + list(_LAZY))


__all__ = ["Config", "ConfigError", "Indexer", "load_config", "__version__"]
