"""The vLLM wire captures in ../shared/vectors/vllm_events (README §2 there), and a plain
Python model of what events mean for the index (DESIGN.md §4: set semantics; parity keys,
so a kvcm key is the event hash)."""

import collections
import dataclasses
import json

ARRAY_FIELDS = {  # vLLM 0.9-0.23 array-form events: field order after the tag
    "BlockStored": ("block_hashes", "parent_block_hash", "token_ids", "block_size", "lora_id",
                    "medium", "lora_name", "extra_keys", "group_idx"),
    "BlockRemoved": ("block_hashes", "medium", "group_idx"),
    "AllBlocksCleared": (),
}


@dataclasses.dataclass
class Message:
    topic: bytes
    seq: bytes       # the 8-byte frame
    payload: bytes
    decoded: list    # [ts, events, dp_rank] as the Python msgpack package decodes it


@dataclasses.dataclass
class Capture:
    dir: str
    version: str
    topic: str
    dp_rank: int
    hash_config: dict
    messages: list
    replay_start: int = None
    replay_request: list = None   # frames the DEALER sent
    replay_replies: list = None   # frames of each reply message, end marker last

    @property
    def pod(self):
        return self.topic.split("@")[1]

    @property
    def model(self):
        return self.topic.split("@")[2]


def load_captures(shared):
    root = shared / "vectors" / "vllm_events"
    manifest = json.loads((root / "MANIFEST.json").read_text())
    captures = []
    for stream in manifest["streams"]:
        messages = []
        for m in stream["messages"]:
            base = root / m["files"].split(".{")[0]
            messages.append(Message(base.with_suffix(".topic").read_bytes(), base.with_suffix(".seq").read_bytes(),
                                    base.with_suffix(".payload").read_bytes(), m["decoded"]))
        capture = Capture(stream["dir"], stream["vllm_version"], stream["topics"][0], stream["dp_rank"],
                          stream["hash_config"], messages)
        for replay in stream.get("replay", ()):
            capture.replay_start = replay["start_seq"]
            capture.replay_request = [(root / replay["dir"] / ("request.%d" % i)).read_bytes() for i in range(2)]
            capture.replay_replies = [[(root / f).read_bytes() for f in reply["files"]]
                                      for reply in replay["messages_received_by_dealer"]]
        captures.append(capture)
    return captures


def hash_value(h):
    """An event hash as the uint64 kvcm indexes: ints modulo 2**64, bytes (or the manifest's
    {"bin_hex": ...}) by their last 8 bytes, big-endian."""
    if isinstance(h, dict):
        h = bytes.fromhex(h["bin_hex"])
    if isinstance(h, bytes):
        return int.from_bytes(h[-8:], "big")
    return h % (1 << 64)


def event_fields(event):
    """(tag, {field: value}) of a map- or array-form event."""
    if isinstance(event, dict):
        return event["type"], event
    return event[0], dict(zip(ARRAY_FIELDS[event[0]], event[1:]))


def _tier(medium):
    return (medium or "GPU").lower()


class IndexModel:
    """(namespace, key) -> {(pod, tier)}, updated the way DESIGN.md §4 says events act.

    Base-model namespaces are in parity (key = event hash). LoRA namespaces are decoupled
    (vLLM hashes the adapter's path, which events do not carry): their keys come from
    `lora_keys(lora_name, token_ids)` for runs that start at block 0, and a BlockRemoved
    finds them through the engine hashes they were stored under.
    """

    def __init__(self, lora_keys=None):
        self.entries = collections.defaultdict(set)
        self._lora_keys = lora_keys
        self._engine_map = {}                        # (namespace, engine hash) -> kvcm keys
        self._fed = collections.defaultdict(list)    # (pod, model) -> LoRA namespaces stored into

    def apply(self, pod, model, events):
        for event in events:
            tag, fields = event_fields(event)
            tier = _tier(fields.get("medium"))
            hashes = [hash_value(h) for h in fields.get("block_hashes", ())]
            if tag == "BlockStored" and fields.get("lora_name"):
                lora = fields["lora_name"]
                assert fields["parent_block_hash"] is None, "only block-0 runs of LoRA blocks are modelled"
                keys = list(self._lora_keys(lora, fields["token_ids"]))
                per = len(keys) // len(hashes)
                for i, h in enumerate(hashes):
                    self._engine_map[(lora, h)] = keys[i * per:(i + 1) * per]
                self._holders(lora, keys, set.add, (pod, tier))
                if lora not in self._fed[(pod, model)]:
                    self._fed[(pod, model)].append(lora)
            elif tag == "BlockStored":
                self._holders(model, hashes, set.add, (pod, tier))
            elif tag == "BlockRemoved":
                for h in hashes:
                    ns = next((ns for ns in self._fed[(pod, model)] if (ns, h) in self._engine_map), None)
                    if ns is None:
                        self._holders(model, [h], set.discard, (pod, tier))
                    else:
                        self._holders(ns, self._engine_map[(ns, h)], set.discard, (pod, tier))
            elif tag == "AllBlocksCleared":
                for holders in self.entries.values():
                    holders.discard((pod, "gpu"))

    def _holders(self, ns, keys, op, holder):
        for key in keys:
            op(self.entries[(ns, key)], holder)

    def clear_pod(self, pod):
        for holders in self.entries.values():
            holders -= {h for h in holders if h[0] == pod}

    def holders(self):
        return {k: v for k, v in self.entries.items() if v}

    def assert_matches(self, index):
        """The index holds exactly the model's entries: per key, and per pod and tier overall."""
        for (ns, key), expected in self.entries.items():
            got = {(pod, tier) for pod, (_, tiers) in index.lookup_prefix(ns, [key]).items() for tier in tiers}
            assert got == expected, "namespace %r key %d: index has %s, events say %s" % (ns, key, got, expected)
        per_pod = collections.defaultdict(collections.Counter)
        for holders in self.entries.values():
            for pod, tier in holders:
                per_pod[pod][tier] += 1
        assert index.stats()["pods"] == {pod: dict(tiers) for pod, tiers in per_pod.items()}
