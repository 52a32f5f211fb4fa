"""`kvcm sim`: a vLLM-compatible engine simulator that publishes real KV events.

It answers the OpenAI-compatible API like one vLLM engine (per data-parallel rank), keeps a
KV block pool with vLLM's prefix-cache semantics, and publishes the pool's changes over ZMQ
exactly as vLLM does, so that `kvcm serve` (or any consumer of vLLM's KV events) can be
exercised end to end without GPUs. It also takes llm-d's inference simulator's command
lines, YAML files, headers and endpoints (docs/sim-compatibility.md).

Modules, one job each:

- ``config``      the flags, the --config YAML file and the environment -> ``SimConfig``;
- ``settings``    ``SimConfig``: validated settings, run-time changes, the JSON view;
- ``durations``   durations written as llm-d writes them;
- ``text``        the tokenizers (a real one from a directory, or the word-level one) and the
                  echo / random / tool-call answers;
- ``lengths``     how long a random answer is;
- ``tools``       tool schemas checked, tool calls made up;
- ``kvcache``     the block pool: reference counts, longest cached prefix, eviction, events;
- ``events``      event batches in vLLM's or llm-d's wire format, batched, published;
- ``latency``     the latency model (TTFT, inter-token, KV transfer);
- ``loras``       LoRA adapters registered and their GPU slots (``--max-loras``);
- ``engine``      the scheduler (``--max-num-seqs``, the bounded waiting queue);
- ``requests``    request fields read and checked; ``errors`` the API's error replies;
- ``responses``   completion and chat answers and stream chunks;
- ``server``      the generation routes; ``admin`` health, metrics, sleep, configuration;
- ``metrics``     ``/metrics`` under vLLM's names; ``fakemetrics`` ``--fake-metrics``;
  ``histograms`` their buckets;
- ``tls``         HTTPS; ``httplog`` ``--log-http``;
- ``app``         one process: every rank, startup and shutdown (``kvcm sim``);
- ``demo``        ``make demo``: kvcm-routed against randomly routed traffic.
"""
