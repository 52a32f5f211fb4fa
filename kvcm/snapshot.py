"""The snapshot format: what `--state-dir` keeps on disk and `GET /v1/snapshot` streams.

    magic  b"KVCMSNAP"
    u32 LE format version
    frames: u8 kind, u32 LE length, payload
        HEADER  JSON: kvcm version, byte order, hash settings, block size, when it was
                taken, the engines registered, each stream's position (last applied seq, a
                digest of that batch, the namespaces it fed)
        1..4    index dump chunks (kvcm/_dump.pxi: blocks in LRU order, engine map)
        TABLES  JSON: the names the chunks' ids stand for, namespace contracts
        END     SHA-256 of every byte before this frame

The stream positions are taken before the first chunk and the dump is a cut in slices
(kvcm/_dump.pxi), so a loader replays each stream from its position to reach the truth.

Reading verifies the whole file before anything is loaded: a wrong magic, a different
format version, a short or damaged file, a checksum that does not match or hash settings
other than the running ones raise SnapshotError, and the caller starts empty. A newer kvcm
reads an older one's snapshot as long as the format version is the same.
"""

import hashlib
import json
import struct
import sys

import kvcm
from kvcm._core import DUMP_KINDS

MAGIC = b"KVCMSNAP"
FORMAT_VERSION = 1
HEADER, TABLES, END = 0x10, 0x11, 0x7F
_FRAME = struct.Struct("<BI")
_PREAMBLE = MAGIC + struct.pack("<I", FORMAT_VERSION)
MAX_JSON_FRAME = 256 << 20   # the name tables of a full index fit many times over


class SnapshotError(Exception):
    """A snapshot that cannot be loaded; `reason` is a short word for metrics and logs."""

    def __init__(self, reason, message):
        super().__init__(message)
        self.reason = reason


def hash_settings(config):
    """What decides how keys are computed: a snapshot taken under other settings holds keys
    that the running kvcm would never compute, so it is refused."""
    return {"algo": config.hash_algo, "seed": config.hash_seed, "block_size": config.block_size,
            "mode": config.hash_mode}


class Writer:
    """Frames a snapshot and keeps its running checksum: feed header(), the dump chunks,
    tables(), then end(); each returns the bytes to write or send."""

    def __init__(self):
        self._sha = hashlib.sha256(_PREAMBLE)
        self.size = len(_PREAMBLE)

    @staticmethod
    def preamble():
        return _PREAMBLE

    def frame(self, kind, payload):
        head = _FRAME.pack(kind, len(payload))
        self._sha.update(head)
        self._sha.update(payload)
        self.size += len(head) + len(payload)
        return head + payload

    def json_frame(self, kind, value):
        return self.frame(kind, json.dumps(value, separators=(",", ":")).encode())

    def end(self):
        digest = self._sha.digest()
        self.size += _FRAME.size + len(digest)
        return _FRAME.pack(END, len(digest)) + digest


def header(config, engines, streams):
    return {"kvcm_version": kvcm.__version__, "byteorder": sys.byteorder,
            "hash": hash_settings(config), "engines": engines, "streams": streams}


class Snapshot:
    """A verified snapshot: header, tables and the dump chunks (memoryviews into the data)."""

    __slots__ = ("header", "tables", "chunks", "size")

    def __init__(self, header, tables, chunks, size):
        self.header, self.tables, self.chunks, self.size = header, tables, chunks, size


def read(data, config):
    """Parses and verifies a whole snapshot (bytes-like); SnapshotError when it cannot be
    loaded as it is."""
    data = memoryview(data)
    if len(data) == 0:
        raise SnapshotError("empty", "the snapshot is empty")
    if len(data) < len(_PREAMBLE) or bytes(data[:len(MAGIC)]) != MAGIC:
        raise SnapshotError("foreign", "not a kvcm snapshot (no KVCMSNAP magic)")
    version = struct.unpack_from("<I", data, len(MAGIC))[0]
    if version != FORMAT_VERSION:
        raise SnapshotError("version", "snapshot format version %d, this kvcm reads version %d"
                            % (version, FORMAT_VERSION))
    at, head, tables, chunks, sha = len(_PREAMBLE), None, None, [], hashlib.sha256(data[:len(_PREAMBLE)])
    while True:
        if len(data) - at < _FRAME.size:
            raise SnapshotError("truncated", "the snapshot ends before its checksum")
        kind, length = _FRAME.unpack_from(data, at)
        if length > len(data) - at - _FRAME.size:
            raise SnapshotError("truncated", "the snapshot ends inside a frame")
        payload = data[at + _FRAME.size:at + _FRAME.size + length]
        if kind == END:
            if bytes(payload) != sha.digest():
                raise SnapshotError("checksum", "the snapshot's checksum does not match its contents")
            if at + _FRAME.size + length != len(data):
                raise SnapshotError("trailing", "bytes follow the snapshot's checksum")
            break
        sha.update(data[at:at + _FRAME.size])
        sha.update(payload)
        at += _FRAME.size + length
        if kind == HEADER:
            head = _json(payload, "header")
        elif kind == TABLES:
            tables = _json(payload, "tables")
        elif kind in DUMP_KINDS:
            chunks.append((kind, payload))
        else:
            raise SnapshotError("malformed", "unknown frame kind %d" % kind)
    if not isinstance(head, dict) or not isinstance(tables, dict):
        raise SnapshotError("malformed", "the snapshot lacks its header or its tables")
    if head.get("byteorder") != sys.byteorder:
        raise SnapshotError("settings", "the snapshot was written on a %s-endian machine" % head.get("byteorder"))
    theirs, ours = head.get("hash"), hash_settings(config)
    if theirs != ours:
        raise SnapshotError("settings", "the snapshot's hash settings %s differ from the running ones %s: its "
                            "keys were computed another way" % (_settings(theirs), _settings(ours)))
    return Snapshot(head, tables, chunks, len(data))


def _json(payload, what):
    if len(payload) > MAX_JSON_FRAME:
        raise SnapshotError("malformed", "the snapshot's %s is too large" % what)
    try:
        value = json.loads(bytes(payload))
    except (ValueError, UnicodeDecodeError):
        raise SnapshotError("malformed", "the snapshot's %s is not JSON" % what) from None
    if not isinstance(value, dict):
        raise SnapshotError("malformed", "the snapshot's %s is not an object" % what)
    return value


def _settings(settings):
    if not isinstance(settings, dict):
        return repr(settings)
    return ", ".join("%s=%r" % item for item in sorted(settings.items()))
