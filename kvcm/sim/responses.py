"""What completion and chat responses look like, whole and as stream chunks (vLLM's shapes).

Logprobs are placeholders with the right shape, computed as llm-d's simulator does: token i
has logprob -1 - 0.1 x (i mod 3); its k-th alternative, the token's text with `_k` appended,
0.5 x k less. Tool calls are the chat message's `tool_calls` (content null); streamed, a
call's first chunk carries its id, type and name, every chunk a piece of its arguments. A
prefill request of disaggregated serving (`kv_transfer_params.do_remote_decode`) answers with
the `kv_transfer_params` its decode pod needs, finish reason `remote_decode`.
"""

import time

TOOL_CALL_OVERHEAD = 3    # tokens a tool call costs beyond its arguments (name, id, type), as llm-d counts


def _logprob(position, alternative=0):
    return -1.0 - (position % 3) * 0.1 - alternative * 0.5


def chat_logprob(token, position, top):
    """One entry of a chat choice's logprobs.content."""
    return {"token": token, "logprob": _logprob(position), "bytes": list(token.encode()),
            "top_logprobs": [{"token": t, "logprob": _logprob(position, j), "bytes": list(t.encode())}
                             for j, t in enumerate(([token] + ["%s_%d" % (token, j) for j in range(1, top)])[:top])]}


def text_logprobs(tokens, top, first_position=0, offset=0):
    """A completion choice's logprobs of `tokens` (texts), the first at `first_position`."""
    out = {"tokens": list(tokens), "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for i, token in enumerate(tokens):
        position = first_position + i
        out["token_logprobs"].append(_logprob(position))
        out["top_logprobs"].append({t: _logprob(position, j) for j, t in
                                    enumerate([token] + ["%s_%d" % (token, j) for j in range(1, max(top, 1))])})
        out["text_offset"].append(offset)
        offset += len(token)
    return out


class Shape:
    """What one request's response and stream chunks look like. `transfer` is the
    kv_transfer_params of a prefill request's answer (or None)."""

    object = chunk_object = prefix = None

    def __init__(self, model, params, seqs, request_id, transfer=None):
        self.model = model
        self.params = params
        self.seqs = seqs
        self.created = int(time.time())
        self.id = self.prefix + request_id
        self.transfer = transfer

    def _chunk(self, choices):
        chunk = {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                 "choices": choices}
        if self.params.include_usage:
            chunk["usage"] = None
        return chunk

    def usage(self):
        # a prompt counts once for its n choices, as vLLM counts it; its cached tokens are
        # those of its first choice (the others find the blocks it computed)
        firsts = self.seqs[::self.params.n]
        prompt = sum(len(s.prompt) for s in firsts)
        completion = sum(s.generated + TOOL_CALL_OVERHEAD * len(s.output.tool_calls or ()) for s in self.seqs)
        return {"prompt_tokens": prompt, "total_tokens": prompt + completion, "completion_tokens": completion,
                "prompt_tokens_details": {"cached_tokens": sum(s.cached_tokens for s in firsts)}}

    def usage_chunk(self):
        return {"id": self.id, "object": self.chunk_object, "created": self.created, "model": self.model,
                "choices": [], "usage": self.usage()}

    def whole(self, choices, **extra):
        out = {"id": self.id, "object": self.object, "created": self.created, "model": self.model,
               "choices": choices, "usage": self.usage(), **extra}
        if self.transfer is not None:
            out["kv_transfer_params"] = self.transfer
        return out

    def opening(self):
        return ()

    @staticmethod
    def text(seq):
        return "".join(seq.output.pieces[:seq.generated])


class Completion(Shape):
    prefix = "cmpl-"
    object = chunk_object = "text_completion"

    def _logprobs(self, seq, start, count):
        top = self.params.top_logprobs
        if top is None:
            return None
        offset = sum(len(p) for p in seq.output.pieces[:start])
        return text_logprobs(seq.output.pieces[start:start + count], top, start, offset)

    def response(self):
        return self.whole([{"index": s.choice, "text": self.text(s), "logprobs": self._logprobs(s, 0, s.generated),
                            "finish_reason": s.finish_reason, "stop_reason": None, "prompt_logprobs": None}
                           for s in self.seqs])

    def token(self, seq, index):
        return self._chunk([{"index": seq.choice, "text": seq.output.pieces[index],
                             "logprobs": self._logprobs(seq, index, 1), "finish_reason": None, "stop_reason": None}])

    def finish(self, seq):
        return self._chunk([{"index": seq.choice, "text": "", "logprobs": None,
                             "finish_reason": seq.finish_reason, "stop_reason": None}])


class Chat(Shape):
    prefix = "chatcmpl-"
    object = "chat.completion"
    chunk_object = "chat.completion.chunk"

    def _logprobs(self, seq, start, count):
        top = self.params.top_logprobs
        if top is None or seq.output.tool_calls:
            return None
        return {"content": [chat_logprob(seq.output.pieces[i], i, top) for i in range(start, start + count)]}

    def _message(self, seq):
        calls = seq.output.tool_calls
        if calls:
            return {"role": "assistant", "content": None, "tool_calls": [c.as_json() for c in calls]}
        return {"role": "assistant", "content": self.text(seq), "tool_calls": []}

    def response(self):
        return self.whole([{"index": s.choice, "message": self._message(s), "logprobs": self._logprobs(s, 0, s.generated),
                            "finish_reason": s.finish_reason, "stop_reason": None} for s in self.seqs],
                          prompt_logprobs=None)

    def opening(self):
        return [self._chunk([{"index": s.choice, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None}]) for s in self.seqs]

    def token(self, seq, index):
        piece = seq.output.pieces[index]
        if seq.output.tool_calls:
            call = seq.output.tool_calls[seq.output.call_of[index]]
            delta = {"index": call.index, "function": {"arguments": piece}}
            if index == 0 or seq.output.call_of[index - 1] != call.index:
                delta = {"index": call.index, "id": call.id, "type": "function",
                         "function": {"name": call.name, "arguments": piece}}
            return self._chunk([{"index": seq.choice, "delta": {"tool_calls": [delta]}, "logprobs": None,
                                 "finish_reason": None}])
        return self._chunk([{"index": seq.choice, "delta": {"content": piece},
                             "logprobs": self._logprobs(seq, index, 1), "finish_reason": None}])

    def finish(self, seq):
        return self._chunk([{"index": seq.choice, "delta": {}, "logprobs": None,
                             "finish_reason": seq.finish_reason}])


class Generate(Shape):
    """vLLM's /inference/v1/generate: token ids in, token ids out; a streamed token's chunk
    carries the finish reason of the last one."""

    prefix = ""

    def response(self):
        out = {"request_id": self.id,
               "choices": [{"index": s.choice, "finish_reason": s.finish_reason,
                            "token_ids": s.output.ids[:s.generated]} for s in self.seqs],
               "ec_transfer_params": None}
        if self.transfer is not None:
            out["kv_transfer_params"] = self.transfer
        return out

    def token(self, seq, index):
        last = index == len(seq.output.ids) - 1
        return {"request_id": self.id, "choices": [{"index": seq.choice, "token_ids": [seq.output.ids[index]],
                                                    "finish_reason": seq.output.finish_reason if last else None}]}

    def finish(self, seq):
        """Only an answer that ended early (no tokens, or aborted) needs a chunk of its own."""
        if seq.generated == len(seq.output.ids) and seq.generated:
            return None
        return {"request_id": self.id, "choices": [{"index": seq.choice, "token_ids": [],
                                                    "finish_reason": seq.finish_reason}]}

    def usage_chunk(self):
        return {"request_id": self.id, "choices": [], "usage": self.usage()}
