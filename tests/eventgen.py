"""KV-event payloads byte by byte, for what kvcm.publisher's helpers (which build well-formed
events in both encodings) cannot say: a given msgpack width for an integer, bin hashes,
invalid UTF-8, lying length headers, reserved bytes. `Raw` bytes go into a payload verbatim;
everything else is packed with the `msgpack` package."""

import msgpack

_PACKER = msgpack.Packer()


class Raw(bytes):
    """An exact msgpack encoding, written as is."""


def pack(obj):
    """msgpack of obj, with Raw parts verbatim (lists/tuples -> arrays, dicts -> maps)."""
    if isinstance(obj, Raw):
        return bytes(obj)
    if isinstance(obj, (list, tuple)):
        return _PACKER.pack_array_header(len(obj)) + b"".join(pack(x) for x in obj)
    if isinstance(obj, dict):
        return _PACKER.pack_map_header(len(obj)) + b"".join(pack(k) + pack(v) for k, v in obj.items())
    return msgpack.packb(obj)


_UINT = {1: 0xCC, 2: 0xCD, 4: 0xCE, 8: 0xCF}
_SINT = {1: 0xD0, 2: 0xD1, 4: 0xD2, 8: 0xD3}


def uint(value, width):
    """value as a msgpack unsigned int of `width` bytes (0 = positive fixint)."""
    if width == 0:
        assert 0 <= value < 128
        return Raw(bytes([value]))
    return Raw(bytes([_UINT[width]]) + value.to_bytes(width, "big"))


def sint(value, width):
    """value as a msgpack signed int of `width` bytes (0 = negative fixint)."""
    if width == 0:
        assert -32 <= value < 0
        return Raw(bytes([value & 0xFF]))
    return Raw(bytes([_SINT[width]]) + value.to_bytes(width, "big", signed=True))


def raw_str(data):
    """A msgpack str whose payload is `data` (which need not be UTF-8)."""
    n = len(data)
    head = bytes([0xA0 | n]) if n < 32 else b"\xd9" + bytes([n]) if n < 256 else b"\xda" + n.to_bytes(2, "big")
    return Raw(head + data)


def batch(events, ts=1.0, dp_rank=0):
    """A batch payload [ts, events, dp_rank]; dp_rank=None leaves it out (vLLM 0.9.0)."""
    return pack([ts, events] if dp_rank is None else [ts, events, dp_rank])


def mutate(payload, edits):
    """payload with edits applied in turn: (kind, position, byte), kind one of flip, set,
    insert, delete and truncate (at the position, taken modulo the length)."""
    data = bytearray(payload)
    for kind, position, byte in edits:
        if not data:
            break
        i = position % len(data)
        if kind == "flip":
            data[i] ^= byte or 1
        elif kind == "set":
            data[i] = byte
        elif kind == "insert":
            data.insert(i, byte)
        elif kind == "delete":
            del data[i]
        else:
            del data[i:]
    return bytes(data)
