"""JSON request bodies of the API, with the fast path of scoring by token ids.

A scheduler scores by token ids on every request it routes. When a body's "token_ids" is a
plain array of integers, the core parses that array from the body's bytes into one
array('Q') (kvcm._core.json_token_ids), which the hasher then reads in place, and only the
other fields go through orjson: no Python int is made per token. Any other body (a bad id,
invalid JSON, anything unusual) goes the general way, which words every error, so both ways
give the same answers and the same errors (tests/test_fast_ids.py).
"""

from array import array

import orjson

from kvcm._core import json_token_ids
from kvcm.http import BadRequest

TOKEN_ID_TYPES = (list, array)


def json_object(request, fast_ids=False):
    """The body as a JSON object (400 otherwise, 415 for a wrong Content-Type); with fast_ids,
    its token_ids is an array('Q') when the core could read it straight from the bytes."""
    if fast_ids and request.body and request.json_type_ok():
        split = json_token_ids(request.body)
        if split is not None:
            ids, rest = split
            try:
                body = orjson.loads(rest)
            except orjson.JSONDecodeError:
                body = None          # the general path words the error, on the whole body
            if isinstance(body, dict):
                body["token_ids"] = ids
                return body
    body = request.json()
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object")
    return body


__all__ = ["TOKEN_ID_TYPES", "json_object"]
