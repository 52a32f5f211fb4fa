"""KV-event batches, byte for byte as vLLM writes them, sent through kvcm.publisher.

vLLM encodes with msgspec, which writes a struct as a map (vLLM >= 0.24) whose header width
follows the number of fields the struct *declares*, not how many it writes: 0.33's
BlockStored declares 16 keys, so its map always has a map16 header (`de 00 0b` for the 11
keys it writes), while BlockRemoved and AllBlocksCleared get fixmaps. Arrays (vLLM 0.20),
ints, strings and the float64 timestamp are the shortest msgpack forms, which is also what
the `msgpack` package writes. `encode_batch` reproduces exactly that, so a simulated batch
equals vLLM's capture of the same pool operations (tests/test_sim_kvcache.py checks it).
"""

import time

import msgpack

from kvcm.publisher import Publisher

_packer = msgpack.Packer()
_MAP16 = b"\xde"


def encode_batch(events, *, ts=None, dp_rank=0):
    """The msgpack payload `[ts, events, dp_rank]` of one batch, as vLLM's encoder writes it."""
    pack = _packer.pack
    parts = [_packer.pack_array_header(3), pack(time.time() if ts is None else float(ts)),
             _packer.pack_array_header(len(events))]
    for event in events:
        if type(event) is dict and event.get("type") == "BlockStored":
            parts.append(_MAP16 + len(event).to_bytes(2, "big"))
            for key, value in event.items():
                parts.append(pack(key))
                parts.append(pack(value))
        else:
            parts.append(pack(event))
    parts.append(pack(dp_rank))
    return b"".join(parts)


class EventStream:
    """One rank's KV events: a vLLM-compatible publisher (PUB bound or connected as vLLM
    decides from the endpoint, the rank's port offset, an optional replay ROUTER) sending one
    batch per call. The replay layout follows the event format: vLLM >= 0.26 for maps,
    0.20's (no topic frame) for arrays."""

    def __init__(self, endpoint, *, topic, dp_rank, replay_endpoint=None, form="map"):
        self.dp_rank = dp_rank
        self.form = form
        self.publisher = Publisher(endpoint, topic=topic, dp_rank=dp_rank, replay_endpoint=replay_endpoint,
                                   replay_layout="v26" if form == "map" else "v25")

    @property
    def endpoint(self):
        return self.publisher.endpoint

    @property
    def replay_endpoint(self):
        return self.publisher.replay_endpoint

    @property
    def topic(self):
        return self.publisher.topic

    def publish(self, events):
        """Sends one batch; returns its seq."""
        return self.publisher.publish_raw(encode_batch(events, dp_rank=self.dp_rank))

    def close(self):
        self.publisher.close()
