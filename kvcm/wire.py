"""vLLM's KV-event transport conventions, shared by the side that receives events (ingest,
`kvcm doctor`) and the side that sends them (the publisher of tests, `kvcm sim` and
`kvcm bench`). Wire format: specs/vllm-kv-events.md."""

END_SEQ = b"\xff" * 8      # the seq of the marker that ends a replay


def dp_endpoint(endpoint, dp_rank):
    """The endpoint vLLM's data-parallel rank `dp_rank` uses for `endpoint`: a numeric TCP
    port offset by the rank (`*` ports are left alone), ipc/inproc paths suffixed `_dp<rank>`."""
    if not dp_rank:
        return endpoint
    transport, sep, address = endpoint.partition("://")
    if transport in ("ipc", "inproc"):
        return "%s_dp%d" % (endpoint, dp_rank)
    host, colon, port = address.rpartition(":")
    if transport == "tcp" and colon and port.isdigit():
        return "%s://%s:%d" % (transport, host, int(port) + dp_rank)
    return endpoint


def binds(endpoint):
    """vLLM binds its PUB socket for wildcard and local endpoints and connects otherwise."""
    return "*" in endpoint or "::" in endpoint or endpoint.startswith(("ipc://", "inproc://"))
