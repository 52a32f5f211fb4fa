"""`kvcm sim`: a vLLM-compatible engine simulator that publishes real KV events.

It answers the OpenAI-compatible API like one vLLM engine (per data-parallel rank), keeps a
KV block pool with vLLM's prefix-cache semantics, and publishes the pool's changes over ZMQ
exactly as vLLM does, so that `kvcm serve` (or any consumer of vLLM's KV events) can be
exercised end to end without GPUs.

Modules, one job each:

- ``config``   the flags (DESIGN.md §7) and the validated ``SimConfig``;
- ``text``     the tokenizers (a real one from a directory, or the word-level one) and the
               echo / random responses;
- ``kvcache``  the block pool: reference counts, longest cached prefix, LRU eviction, events;
- ``events``   batches encoded byte for byte as vLLM writes them, and their publisher;
- ``engine``   the scheduler (``--max-num-seqs``, the bounded waiting queue) and the
               latency model;
- ``metrics``  ``/metrics`` under vLLM's metric names;
- ``server``   the HTTP routes;
- ``app``      one process: every rank, startup and shutdown (``kvcm sim``);
- ``demo``     ``make demo``: kvcm-routed against randomly routed traffic.
"""
