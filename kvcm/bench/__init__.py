"""`kvcm bench`: local performance profiling of a KV-cache index and of routing policies.

- workload: the engines' events (deterministic vLLM KV events) and the queries, with the
  answers a correct index gives;
- engines: the simulated engines' ZMQ publishers;
- targets: the indexes measured (kvcm, Dynamo's indexer, llm-d-style servers) and their APIs;
- load: raw keep-alive HTTP, closed and open loop;
- phases: ingest, publish -> visible, queries, scoring while ingesting;
- stats: percentiles (HdrHistogram) and the spread of repeated runs;
- index / routing: the two benches; summary, report, progress: their output; cli: flags.
"""
