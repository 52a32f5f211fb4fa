"""Tokenizers and responses of the simulator.

Two tokenizers with one interface:

- `FileTokenizer`: a real tokenizer from a local directory (kvcm.tokenize, which encodes and
  renders chat templates exactly as vLLM does), so the simulator's block hashes are the ones
  a vLLM engine serving that model would publish;
- `WordTokenizer`, used without `--tokenizer`: deterministic and dependency-free. A token is
  a run of word characters (`\\w+`) or any other single non-space character; its id is the
  first 4 bytes of the SHA-256 of its UTF-8 text, big-endian, shifted right by one bit (a
  31-bit id, the same in every process). There are no special tokens. Chat messages render
  as one `role: content` line each, then `assistant:` when a generation prompt is asked for.
  Decoding joins known tokens with spaces (ids it never encoded decode as `<id>`).

Responses are `Output`s: token ids and the text of each token (their concatenation is the
response text), in `echo` mode the prompt (chat: the last message), in `random` mode
sentences drawn from a fixed list, or the arguments of tool calls (their tokens, call after
call).
"""

import collections
import dataclasses
import hashlib
import os
import re
from typing import List, Optional

from kvcm import tokenize

_WORD = re.compile(r"\w+|[^\w\s]")
_MAX_KNOWN_WORDS = 1 << 16   # the word tokenizer's id -> text memory, for decoding

SENTENCES = (
    "The simulator answers without a model and without a GPU.",
    "Every prompt is cut into blocks of tokens, and every full block gets a hash.",
    "A block that is already cached is reused instead of computed again.",
    "When the cache is full, the block released longest ago is evicted first.",
    "Routers send a request where its prefix is already cached.",
    "Time to first token grows with the number of tokens that are not cached.",
    "Events tell the index which blocks each engine holds.",
    "A shared system prompt is computed once and then reused by many requests.",
    "Tokens arrive one at a time, a little while apart.",
    "Nothing here is learned; the words are chosen at random.",
    "Long conversations keep growing their prefix turn after turn.",
    "An engine that restarts forgets everything it had cached.",
    "Two engines with the same prompt cached are equally good choices.",
    "The waiting queue is bounded, so an overloaded engine says so.",
    "Each data-parallel rank keeps its own cache and its own events.",
    "A LoRA adapter changes the hashes of every block it touches.",
)


def word_token_id(word):
    """The word tokenizer's id of one token."""
    return int.from_bytes(hashlib.sha256(word.encode("utf-8", "surrogatepass")).digest()[:4], "big") >> 1


class WordTokenizer:
    """The documented deterministic word-level tokenizer (see the module docstring)."""

    name = "word-level"
    max_token_id = (1 << 31) - 1

    def __init__(self):
        self._words = collections.OrderedDict()   # id -> text, bounded

    def encode_spans(self, text):
        """(ids, end offsets): token i is text[ends[i-1]:ends[i]] with the space before it."""
        ids, ends = [], []
        words = self._words
        for match in _WORD.finditer(text):
            word = match.group()
            token = word_token_id(word)
            ids.append(token)
            ends.append(match.end())
            if token not in words:
                words[token] = word
                if len(words) > _MAX_KNOWN_WORDS:
                    words.popitem(last=False)
        return ids, ends

    def encode(self, text, add_special_tokens=True):
        return self.encode_spans(text)[0]

    def token_strs(self, ids):
        return [self._words.get(token, "<%d>" % token) for token in ids]

    def decode(self, ids):
        return " ".join(self.token_strs(ids))

    def render_chat(self, messages, *, add_generation_prompt=True, continue_final_message=False, **_):
        """`role: content` lines; chat templates and their options do not apply."""
        lines = ["%s: %s" % (m.get("role", ""), message_text(m.get("content"))) for m in messages]
        if continue_final_message:
            return "\n".join(lines)
        text = "".join(line + "\n" for line in lines)
        return text + "assistant:" if add_generation_prompt else text


class FileTokenizer:
    """A tokenizer directory, through kvcm.tokenize (vLLM's encoding and chat templates)."""

    def __init__(self, path):
        path = os.path.expanduser(path)
        if not os.path.isfile(os.path.join(path, tokenize.TOKENIZER_FILE)):
            raise ValueError("--tokenizer %s: no %s there" % (path, tokenize.TOKENIZER_FILE))
        self._tokenizer = tokenize.Tokenizer(path)
        self.name = self._tokenizer.name
        self.max_token_id = self._tokenizer.vocab_size - 1

    def encode(self, text, add_special_tokens=True):
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def encode_spans(self, text):
        encoding = self._tokenizer.backend.encode(text, add_special_tokens=False)
        ends, last = [], 0
        for _, end in encoding.offsets:
            last = max(last, end)      # byte-level pieces of one character share its span
            ends.append(last)
        return encoding.ids, ends

    def token_strs(self, ids):
        backend = self._tokenizer.backend
        return [backend.id_to_token(token) for token in ids]

    def decode(self, ids):
        return self._tokenizer.backend.decode(ids, skip_special_tokens=True)

    def render_chat(self, messages, **options):
        return self._tokenizer.render_chat(messages, **options)


def load_tokenizer(directory, model):
    """FileTokenizer(directory); without one, the model when it is a tokenizer directory;
    else the WordTokenizer."""
    if directory is not None:
        return FileTokenizer(directory)
    if os.path.isfile(os.path.join(os.path.expanduser(model), tokenize.TOKENIZER_FILE)):
        return FileTokenizer(model)
    return WordTokenizer()


def message_text(content):
    """A chat message's text: a string, or its text parts joined with newlines (as vLLM)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "\n".join(part.get("text", "") for part in content
                     if isinstance(part, dict) and part.get("type", "text") == "text")


@dataclasses.dataclass
class Output:
    """A response: its token ids, the text of each, and why it ended; for tool calls, the
    calls and the index of the call each token belongs to."""
    ids: List[int]
    pieces: List[str]
    finish_reason: str
    tool_calls: Optional[list] = None
    call_of: Optional[List[int]] = None

    @property
    def text(self):
        return "".join(self.pieces)


def _cut(text, ids, ends, limit):
    """(ids, pieces) of the first `limit` tokens; the last piece keeps the text after it
    when nothing was cut."""
    count = min(limit, len(ids))
    if count <= 0:
        return [], []
    starts = [0] + ends[:count - 1]
    pieces = [text[a:b] for a, b in zip(starts, ends[:count])]
    if count == len(ids) and pieces:
        pieces[-1] += text[ends[-1]:]
    return ids[:count], pieces


def echo_output(tokenizer, text, limit):
    """The text itself, cut to `limit` tokens ("length") or whole ("stop")."""
    ids, ends = tokenizer.encode_spans(text)
    ids, pieces = _cut(text, ids, ends, limit)
    return Output(ids, pieces, "length" if len(ids) < len(ends) else "stop")


def random_output(tokenizer, rng, count, finish_reason):
    """`count` tokens of random sentences."""
    text, ids, ends = "", [], []
    while len(ids) < count:
        more = max(1, (count - len(ids)) // 8 + 1)
        text = " ".join(filter(None, [text] + [rng.choice(SENTENCES) for _ in range(more)]))
        ids, ends = tokenizer.encode_spans(text)
    ids, pieces = _cut(text, ids, ends, count)
    return Output(ids, pieces, finish_reason)


def tool_output(tokenizer, calls):
    """The tokens of the calls' arguments, call after call ("tool_calls")."""
    ids, pieces, call_of = [], [], []
    for call in calls:
        call_ids, ends = tokenizer.encode_spans(call.arguments)
        call_ids, call_pieces = _cut(call.arguments, call_ids, ends, len(call_ids))
        ids += call_ids
        pieces += call_pieces
        call_of += [call.index] * len(call_ids)
    return Output(ids, pieces, "tool_calls", tool_calls=calls, call_of=call_of)
