"""Token ids of text between special tokens, remembered: multi-turn chat encodes only what is new.

Each turn of a conversation renders the whole conversation again, and encoding is what a
chat request costs (about 1 µs per token, a hundred times the hashing). `tokenizers` splits
its input at added tokens before anything else and normalizes, pre-tokenizes and encodes each
piece between them on its own, so the ids of a text are the ids of its pieces with the added
tokens' ids between them. A rendered chat has a special token around every message, so the
pieces of earlier turns come back unchanged and their ids can be remembered (llm-d's token
prefix store, made exact).

That holds only where the split is the one `tokenizers` makes and a piece is encoded the same
wherever it stands; the cache is used only when (`SegmentCache.for_backend`):
- special tokens in the text are matched as such (not `encode_special_tokens`);
- the cut tokens are special added tokens matched on the raw text, that strip no whitespace,
  begin and end with a non-word character (single-word tokens look at their neighbours), and
  that no other added token overlaps (a longer match could win);
- no pre-tokenizer treats the text's first piece differently from the others (Metaspace with
  `prepend_scheme: "first"`);
- and the encoding adds no special tokens (add_special_tokens=False: what chat uses).
tests/test_segment_cache.py compares it with plain encoding on every fixture tokenizer.
"""

import json
import re
import threading
from collections import OrderedDict

MAX_TOKENS = 1_000_000      # ids remembered, all pieces together (~40 MB as Python lists)
MIN_PIECE_CHARS = 64        # shorter pieces are encoded every time: not worth an entry


def _overlaps(a, b):
    """True when a and b (different strings) could share characters in a text: one inside
    the other, or a suffix of one is a prefix of the other."""
    if a in b or b in a:
        return True
    return any(a.endswith(b[:k]) or b.endswith(a[:k]) for k in range(1, min(len(a), len(b))))


def _first_piece_differs(node):
    """A pre-tokenizer (or one nested in it) that treats the text's first piece on its own."""
    if isinstance(node, dict):
        if node.get("type") == "Metaspace" and node.get("prepend_scheme", "always") == "first":
            return True
        return any(_first_piece_differs(v) for v in node.values())
    if isinstance(node, list):
        return any(_first_piece_differs(v) for v in node)
    return False


class SegmentCache:
    """Encodes text as `encode_batch(pieces)` would, remembering the ids of long pieces."""

    def __init__(self, cuts, encode_batch, max_tokens=MAX_TOKENS):
        """cuts: {special token text: id}; encode_batch(list of str) -> list of id lists."""
        self._ids = cuts
        # longest first: re takes the first alternative that matches at a position
        self._split = re.compile("(%s)" % "|".join(re.escape(c) for c in sorted(cuts, key=len, reverse=True))).split
        self._encode_batch = encode_batch
        self._max_tokens = max_tokens
        self._pieces = OrderedDict()    # piece -> ids, least recently used first
        self._tokens = 0
        self._lock = threading.Lock()   # encodes run in worker threads
        self.hits = self.misses = 0

    @classmethod
    def for_backend(cls, backend, encode_batch, max_tokens=MAX_TOKENS):
        """The cache for a configured `tokenizers.Tokenizer`, or None when its pieces are not
        encoded independently (module docstring)."""
        if getattr(backend, "encode_special_tokens", False):
            return None     # special tokens in the text are encoded as text: no split at them
        if _first_piece_differs(json.loads(backend.to_str()).get("pre_tokenizer")):
            return None
        added = {tok.content: (tid, tok) for tid, tok in backend.get_added_tokens_decoder().items()}
        cuts = {}
        for text, (tid, tok) in added.items():
            if (not tok.special or tok.normalized or tok.lstrip or tok.rstrip or tok.single_word
                    or not text or text[0].isalnum() or text[-1].isalnum() or text[0] == "_"
                    or text[-1] == "_"):
                continue
            if any(other != text and _overlaps(text, other) for other in added):
                continue
            cuts[text] = tid
        if not cuts:
            return None
        return cls(cuts, encode_batch, max_tokens)

    def encode(self, text):
        """The ids of text, encoded without adding special tokens."""
        parts = self._split(text)    # piece, cut, piece, cut, ..., piece
        if len(parts) == 1:
            return self._encode_batch([text])[0]
        pieces = parts[0::2]
        found = [None] * len(pieces)
        missing = []
        with self._lock:
            for i, piece in enumerate(pieces):
                if len(piece) >= MIN_PIECE_CHARS:
                    ids = self._pieces.get(piece)
                    if ids is not None:
                        self._pieces.move_to_end(piece)
                        found[i] = ids
                        self.hits += 1
                        continue
                    self.misses += 1
                if piece:
                    missing.append(i)
        if missing:
            for i, ids in zip(missing, self._encode_batch([pieces[i] for i in missing])):
                found[i] = ids
            self._remember([(pieces[i], found[i]) for i in missing if len(pieces[i]) >= MIN_PIECE_CHARS])
        out = []
        cut_ids = self._ids
        for i, piece in enumerate(pieces):
            if found[i] is not None:
                out += found[i]
            if 2 * i + 1 < len(parts):
                out.append(cut_ids[parts[2 * i + 1]])
        return out

    def _remember(self, entries):
        with self._lock:
            for piece, ids in entries:
                if len(ids) > self._max_tokens or piece in self._pieces:
                    continue
                self._pieces[piece] = ids
                self._tokens += len(ids)
                while self._tokens > self._max_tokens:
                    _, old = self._pieces.popitem(last=False)
                    self._tokens -= len(old)

    def __len__(self):
        return len(self._pieces)


__all__ = ["SegmentCache"]
