# cython: language_level=3
"""kvcm's hot core: SHA-256, the CBOR and pickle-5 encoders used for block hashing, the
block hasher, the block index and the scorer.

Python objects appear only at the boundary: hashing runs over C arrays of token ids and the
index stores C structs. `kvcm._reference` is the slow, obviously correct twin of everything
here; the tests run the same cases against both.
"""

import os

cimport cython
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING, PyBytes_GET_SIZE
from libc.stdint cimport uint8_t, uint32_t, uint64_t, int64_t
from libc.stdlib cimport malloc, calloc, realloc, free
from libc.string cimport memcmp, memcpy, memmove, memset
from cpython.buffer cimport PyBUF_SIMPLE

from collections import OrderedDict

include "_buffer.pxi"
include "_sha.pxi"
include "_encode.pxi"
include "_tokens.pxi"
include "_json_ids.pxi"
include "_hasher.pxi"
include "_index.pxi"
include "_dump.pxi"
include "_msgpack.pxi"
include "_decode.pxi"
include "_events.pxi"
include "_ingest_lane.pxi"
include "_busy_poll.pxi"
include "_score_lane.pxi"
include "_histogram.pxi"
