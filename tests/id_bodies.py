"""Generated JSON bodies with token ids, plain and otherwise: what the fast paths of scoring by
token ids (kvcm/bodies.py, the scoring lane) are checked against the general path with."""

from hypothesis import strategies as st

MODEL = "fast-model"


def id_literal():
    """Token-id items as JSON text, plain and otherwise."""
    big = st.integers(min_value=2 ** 64 - 3, max_value=2 ** 64 + 3).map(str)
    plain = st.integers(min_value=0, max_value=200_000).map(str)
    return st.one_of(plain, plain, plain, big, st.integers(-5, -1).map(str),
                     st.sampled_from(["-0", "0", "00", "01", "1.0", "1e2", "1E2", "0.5", "true", "null", '"7"',
                                      "[1]", "{}", "NaN", "Infinity", "1_0", "0x10", "+1", "2 3", ""]))


_SPACE = st.sampled_from(["", " ", "\n", "\t", "\r\n  ", "\u00a0", "\v"])


@st.composite
def token_array(draw):
    items = draw(st.lists(id_literal(), max_size=40))
    gaps = [draw(_SPACE) for _ in range(2 * len(items) + 2)]
    inner = ",".join(gaps[2 * i] + item + gaps[2 * i + 1] for i, item in enumerate(items))
    return "[" + gaps[-2] + inner + gaps[-1] + "]" if items else "[" + gaps[-1] + "]"


_OTHER_FIELDS = st.sampled_from([
    '"model": "%s"' % MODEL, '"model_name": "%s"' % MODEL, '"model": 3', '"model": "other"', '"pods": ["pod-0"]',
    '"pods": [1]', '"cache_salt": "s"', '"cache_salt": 1', '"prompt": "hi"', '"x": {"token_ids": [1, 2]}',
    '"x": "a \\" ] } , \\"token_ids\\": [9]"', '"x": [[], {}, "]"]', '"token\\u005fids": [5]', '"token_ids": [1]',
    '"token_ids": null', '"token_ids": "12"', '"lora_name": "l"', '"routing_group": "g"', '"x": 1e400',
    '"x": tru', '"x": [1, 2', '"x": "\\ud800"', '"\xff": 1', '"x": 01'])


@st.composite
def body(draw):
    fields = draw(st.lists(_OTHER_FIELDS, max_size=4))
    if draw(st.booleans()) or not fields:
        fields.insert(draw(st.integers(0, len(fields))), '"token_ids"%s:%s%s' % (draw(_SPACE), draw(_SPACE),
                                                                               draw(token_array())))
    text = "{" + draw(_SPACE) + ("," + draw(_SPACE)).join(fields) + draw(_SPACE) + "}"
    text = draw(st.sampled_from(["", " ", "\n", "\ufeff", "[", "x"])) * draw(st.integers(0, 1)) + text
    text += draw(st.sampled_from(["", " ", "\n", "}", ",", "x", " []"])) * draw(st.integers(0, 1))
    raw = text.encode("utf-8", "surrogatepass")
    if draw(st.integers(0, 4)) == 0:          # a byte-level mutation: cut, drop or change one byte
        at = draw(st.integers(0, max(0, len(raw) - 1)))
        kind = draw(st.sampled_from(["cut", "drop", "set"]))
        if kind == "cut":
            raw = raw[:at]
        elif kind == "drop":
            raw = raw[:at] + raw[at + 1:]
        else:
            raw = raw[:at] + bytes([draw(st.integers(0, 255))]) + raw[at + 1:]
    return raw
