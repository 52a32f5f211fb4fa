"""Chat-template rendering, configured the way Hugging Face transformers renders templates.

kvcm must produce, byte for byte, the prompt that vLLM renders for a chat request, because
the token ids of that prompt are what the engine hashed into KV blocks. vLLM delegates to
``tokenizer.apply_chat_template``, so this module reproduces that environment with jinja2
alone (transformers is never imported here):

- ``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
  ``loopcontrols`` extension and a ``{% generation %}`` block tag (transformers uses it to
  track assistant tokens; here it just renders its body);
- a ``tojson`` filter that does not HTML-escape and keeps non-ASCII characters
  (``json.dumps(x, ensure_ascii=False, indent=…, separators=…, sort_keys=…)``);
- globals ``raise_exception(msg)`` and ``strftime_now(fmt)``;
- variables: ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special
  tokens (``bos_token`` …, as strings), then the request's ``chat_template_kwargs`` (which
  override everything but ``messages``).

Every failure — a syntax error, ``raise_exception`` in the template, a Python error raised
while rendering, a sandbox violation — comes out as :class:`TemplateError`, whose message
is what the API returns with status 400. A render given :class:`Limits` is metered
(kvcm/template_sandbox.py) and raises :class:`TemplateLimitExceeded` when it runs past its
time or output budget.

:func:`vllm_messages` and :func:`vllm_tools` reshape request data the way vLLM's OpenAI
server does before it renders (text content parts joined, tool-call arguments parsed,
tool definitions in pydantic's field order with ``null`` for absent fields).
"""

from __future__ import annotations

import copy
import json
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import datetime
from threading import Lock
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.sandbox

from .template_sandbox import LimitExceeded, Limits, MeteredEnvironment
from .template_sandbox import render as _render_metered

__all__ = [
    "Limits",
    "TemplateError",
    "TemplateLimitExceeded",
    "compile_template",
    "render",
    "render_chat",
    "template_variables",
    "content_format",
    "vllm_messages",
    "vllm_tools",
    "token_content",
]

# Variables the renderer sets itself; chat_template_kwargs may override the flags and
# tools/documents (vLLM merges them into the same dict) but not these.
_RESERVED_KWARGS = frozenset({"messages", "chat_template", "tokenize"})

# A request may supply its own template: compiled templates (and what a template reads) are
# kept in LRUs bounded by count and by the characters of their sources.
_CACHE_SIZE = 64
_CACHE_CHARS = 4 * 2**20


class TemplateError(ValueError):
    """A chat template could not be compiled or rendered.

    ``message`` is the human-readable text (for ``raise_exception`` it is exactly the
    template's own message); ``raised_by_template`` tells a deliberate
    ``raise_exception`` apart from syntax and runtime errors.
    """

    def __init__(self, message: str, *, raised_by_template: bool = False):
        super().__init__(message)
        self.message = message
        self.raised_by_template = raised_by_template


class TemplateLimitExceeded(TemplateError):
    """A metered render ran past its time (``limit == "time"``) or output (``"output"``)
    budget."""

    def __init__(self, message: str, limit: str):
        super().__init__(message)
        self.limit = limit


class _TemplateRaised(jinja2.exceptions.TemplateError):
    """What ``raise_exception`` throws inside jinja; converted to TemplateError outside."""


def _raise_exception(message: Any = "") -> None:
    raise _TemplateRaised(str(message))


def _tojson(value: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Same signature and defaults as transformers' override of jinja's tojson: no HTML
    # escaping (the result is not markup-safe-wrapped either) and non-ASCII kept as is.
    if isinstance(separators, list):
        separators = tuple(separators)
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}…{% endgeneration %}``: renders its body unchanged.

    transformers registers this tag to compute assistant-token masks; templates that use it
    fail to compile without it, and the rendered text is the body either way.
    """

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _SourceCache:
    """source → value, least recently used first out, bounded by entries and by the total
    length of the sources (a request template may be megabytes long). Thread-safe."""

    def __init__(self, entries: int = _CACHE_SIZE, chars: int = _CACHE_CHARS):
        self._entries, self._chars = entries, chars
        self._items: OrderedDict[str, Any] = OrderedDict()
        self._size = 0
        self._lock = Lock()

    def __len__(self) -> int:
        return len(self._items)

    @property
    def chars(self) -> int:
        return self._size

    def get(self, source: str) -> Any:
        with self._lock:
            value = self._items.get(source)
            if value is not None:
                self._items.move_to_end(source)
            return value

    def put(self, source: str, value: Any) -> None:
        if len(source) > self._chars:
            return
        with self._lock:
            if source not in self._items:
                self._size += len(source)
            self._items[source] = value
            self._items.move_to_end(source)
            while len(self._items) > self._entries or self._size > self._chars:
                old, _ = self._items.popitem(last=False)
                self._size -= len(old)


def _make_environment() -> MeteredEnvironment:
    env = MeteredEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationBlock, jinja2.ext.loopcontrols],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


_ENV = _make_environment()
_compiled = _SourceCache()


_TOO_DEEP = "chat template error: its blocks nest too deeply"


def _syntax_message(exc: jinja2.exceptions.TemplateSyntaxError) -> str:
    where = f"line {exc.lineno}" if exc.lineno else "unknown line"
    return f"chat template syntax error at {where}: {exc.message}"


def compile_template(source: str) -> jinja2.Template:
    """Compile (or fetch from the bounded cache) a chat template; TemplateError on bad syntax."""
    if not isinstance(source, str):
        raise TemplateError(f"chat template must be a string, not {type(source).__name__}")
    tpl = _compiled.get(source)
    if tpl is not None:
        return tpl
    try:
        tpl = _ENV.from_string(source)
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc)) from None
    except jinja2.exceptions.TemplateError as exc:  # e.g. unknown filter/test at compile time
        raise TemplateError(f"chat template error: {exc.message or exc}") from None
    except RecursionError:
        raise TemplateError(_TOO_DEEP) from None
    _compiled.put(source, tpl)
    return tpl


def token_content(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a plain string or an AddedToken object."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping):
        content = value.get("content")
        return content if isinstance(content, str) else None
    content = getattr(value, "content", None)  # a tokenizers.AddedToken
    return content if isinstance(content, str) else None


def render(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool = False,
    special_tokens: Mapping[str, Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    limits: Limits | None = None,
) -> str:
    """Render ``source`` for one conversation, as ``apply_chat_template(tokenize=False)`` does.

    ``special_tokens`` are the template variables from the tokenizer (``bos_token`` …);
    ``chat_template_kwargs`` are merged on top of them and of the named flags (vLLM merges
    the request's kwargs into the same dict, so ``{"add_generation_prompt": false}`` there
    wins). ``continue_final_message`` leaves the last message open for the model to
    continue, exactly like transformers (incompatible with ``add_generation_prompt``).
    With ``limits`` the render is metered (:class:`TemplateLimitExceeded`); the template's
    compilation is not.
    """
    template = compile_template(source)

    options: dict[str, Any] = {
        "add_generation_prompt": add_generation_prompt,
        "continue_final_message": continue_final_message,
        "tools": tools,
        "documents": documents,
    }
    extra: dict[str, Any] = {}
    if chat_template_kwargs:
        if not isinstance(chat_template_kwargs, Mapping):
            raise TemplateError("chat_template_kwargs must be an object")
        for key, value in chat_template_kwargs.items():
            if not isinstance(key, str):
                raise TemplateError("chat_template_kwargs keys must be strings")
            if key in _RESERVED_KWARGS:
                raise TemplateError(f"chat_template_kwargs may not set {key!r}")
            if key in options:
                options[key] = value
            else:
                extra[key] = value

    add_generation_prompt = bool(options["add_generation_prompt"])
    continue_final_message = bool(options["continue_final_message"])
    tools, documents = options["tools"], options["documents"]
    if continue_final_message and add_generation_prompt:
        raise TemplateError(
            "continue_final_message and add_generation_prompt are not compatible: use "
            "continue_final_message to continue the last message, add_generation_prompt to "
            "start a new assistant turn")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TemplateError("messages must be a list of objects")
    if tools is not None and (not isinstance(tools, Sequence) or isinstance(tools, (str, bytes))
                              or not all(isinstance(t, Mapping) for t in tools)):
        raise TemplateError("tools must be a list of JSON objects")
    if documents is not None and (not isinstance(documents, Sequence)
                                  or isinstance(documents, (str, bytes))
                                  or not all(isinstance(d, Mapping) for d in documents)):
        raise TemplateError("documents must be a list of objects")

    variables: dict[str, Any] = {}
    for key, value in (special_tokens or {}).items():
        if value is not None:
            variables[key] = value
    variables.update(extra)
    variables["add_generation_prompt"] = add_generation_prompt
    variables["tools"] = list(tools) if tools is not None else None
    variables["documents"] = list(documents) if documents is not None else None

    tag = "CONTINUE_FINAL_MESSAGE_TAG "
    final_text = None
    if continue_final_message:
        if not messages:
            raise TemplateError("continue_final_message is set but there are no messages")
        messages = copy.deepcopy(list(messages))
        last = messages[-1]
        if not isinstance(last, dict):
            raise TemplateError("messages must be a list of objects")
        content = last.get("content")
        if isinstance(content, str):
            final_text = content
            last["content"] = content + tag
        elif isinstance(content, list):
            for block in reversed(content):
                if isinstance(block, dict) and isinstance(block.get("text"), str):
                    final_text = block["text"]
                    block["text"] = final_text + tag
                    break
        if final_text is None:
            raise TemplateError("continue_final_message is set but the final message has no text "
                                "to continue")
    variables["messages"] = messages

    try:
        text = _render_metered(template, variables, limits)
    except LimitExceeded as exc:
        raise TemplateLimitExceeded(exc.message, exc.limit) from None
    except _TemplateRaised as exc:
        raise TemplateError(exc.message or "", raised_by_template=True) from None
    except jinja2.exceptions.TemplateSyntaxError as exc:  # from an {% include %}-like path
        raise TemplateError(_syntax_message(exc)) from None
    except jinja2.exceptions.SecurityError as exc:
        raise TemplateError(f"chat template rejected by the sandbox: {exc}") from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template error: {exc.message or exc}") from None
    except RecursionError:
        raise TemplateError("chat template error: recursion too deep") from None
    except MemoryError:
        raise TemplateLimitExceeded("chat template rendering ran out of memory", "memory") from None
    except Exception as exc:  # the template did something the data does not allow
        raise TemplateError(f"chat template error: {type(exc).__name__}: {exc}") from None

    if continue_final_message:
        stripped_tag = tag.strip()
        if final_text.strip() not in text or stripped_tag not in text:
            raise TemplateError(
                "continue_final_message is set but the final message does not appear in the "
                "rendered chat: the template alters it")
        at = text.rindex(stripped_tag)
        if text[at:at + len(tag)] == tag:
            text = text[:at]
        else:
            text = text[:at].rstrip()
    return text


# --------------------------------------------------------------------------------------
# What a template reads: undeclared variables (for chat_template_kwargs) and content format


_analysis = _SourceCache()


def _analyse(source: str) -> tuple[frozenset[str], str]:
    hit = _analysis.get(source)
    if hit is not None:
        return hit
    from jinja2 import meta

    try:
        ast = _ENV.parse(source)
        # generating code checks that every filter and test exists
        names = frozenset(meta.find_undeclared_variables(ast))
    except jinja2.exceptions.TemplateSyntaxError as exc:
        raise TemplateError(_syntax_message(exc)) from None
    except jinja2.exceptions.TemplateError as exc:
        raise TemplateError(f"chat template error: {exc.message or exc}") from None
    except RecursionError:
        raise TemplateError(_TOO_DEEP) from None
    result = (names, _detect_content_format(ast))
    _analysis.put(source, result)
    return result


def template_variables(source: str) -> frozenset[str]:
    """Names a template reads without defining them (``messages``, ``enable_thinking`` …)."""
    return _analyse(source)[0]


def content_format(source: str) -> str:
    """``"openai"`` if the template loops over a message's ``content`` (it expects a list of
    parts), else ``"string"`` — the two formats vLLM's ``auto`` setting chooses between."""
    return _analyse(source)[1]


def _strip_wrappers(node: jinja2.nodes.Node) -> jinja2.nodes.Node:
    # `messages | reverse`, `messages[1:]`, `x is defined` all still mean "the same list".
    while True:
        if isinstance(node, (jinja2.nodes.Filter, jinja2.nodes.Test)) and node.node is not None:
            node = node.node
        elif isinstance(node, jinja2.nodes.Getitem) and isinstance(node.arg, jinja2.nodes.Slice):
            node = node.node
        else:
            return node


def _is_name(node: jinja2.nodes.Node, names: set[str]) -> bool:
    node = _strip_wrappers(node)
    return isinstance(node, jinja2.nodes.Name) and node.name in names


def _is_content_of(node: jinja2.nodes.Node, names: set[str]) -> bool:
    node = _strip_wrappers(node)
    if isinstance(node, jinja2.nodes.Getattr):
        return node.attr == "content" and _is_name(node.node, names)
    if isinstance(node, jinja2.nodes.Getitem):
        return (isinstance(node.arg, jinja2.nodes.Const) and node.arg.value == "content"
                and _is_name(node.node, names))
    return False


def _detect_content_format(ast: jinja2.nodes.Template) -> str:
    # 1. every name bound to `messages` or a slice/filter of it (`set loop_messages = …`)
    lists = {"messages"}
    assigns = list(ast.find_all(jinja2.nodes.Assign))
    changed = True
    while changed:
        changed = False
        for a in assigns:
            if isinstance(a.target, jinja2.nodes.Name) and a.target.name not in lists \
                    and _is_name(a.node, lists):
                lists.add(a.target.name)
                changed = True
    # 2. loop variables over those lists (`for message in loop_messages`)
    loops = list(ast.find_all(jinja2.nodes.For))
    items = {lp.target.name for lp in loops
             if isinstance(lp.target, jinja2.nodes.Name) and _is_name(lp.iter, lists)}
    # 3. a loop over `message.content` / `message['content']` means list-of-parts content
    for lp in loops:
        if _is_content_of(lp.iter, items):
            return "openai"
    return "string"


# --------------------------------------------------------------------------------------
# Request data as vLLM hands it to the template

_TEXT_PART_FIELDS = {
    "text": "text",
    "input_text": "text",
    "output_text": "text",
    "refusal": "refusal",
    "thinking": "thinking",
}


def _content_texts(role: str, content: Any) -> list[str]:
    if content is None:
        return []
    if isinstance(content, str):
        return [content]
    if not isinstance(content, list):
        raise TemplateError(f"message content must be a string or a list of parts "
                            f"(role {role!r})")
    texts: list[str] = []
    for part in content:
        if isinstance(part, str):
            texts.append(part)
            continue
        if not isinstance(part, Mapping):
            raise TemplateError("a content part must be a string or an object")
        kind = part.get("type")
        field = _TEXT_PART_FIELDS.get(kind) if isinstance(kind, str) else None
        if field is None:
            raise TemplateError(
                f"content part type {kind!r} is not supported: kvcm scores text prompts only "
                "(multimodal blocks carry extra hash keys)")
        text = part.get(field)
        if text is None:
            continue  # vLLM skips text/refusal parts without text
        if not isinstance(text, str):
            raise TemplateError(f"content part {field!r} must be a string")
        texts.append(text)
    return texts


def vllm_messages(messages: Sequence[Mapping[str, Any]], fmt: str = "string") -> list[dict[str, Any]]:
    """The conversation as vLLM's OpenAI server passes it to the chat template.

    Each message is rebuilt from ``role``, ``content`` and the fields vLLM keeps
    (``tool_calls`` on assistant turns, ``reasoning``, ``tool_call_id`` on tool turns,
    ``name``, ``task``, ``tools`` on developer turns); other keys are dropped. Content is
    joined text (``fmt="string"``; parts joined with ``"\\n"``, ``None`` → ``""``) or a
    list of ``{"type": "text", "text": …}`` parts (``fmt="openai"``). Tool-call
    ``arguments`` given as a JSON string are parsed into an object (``{}`` if invalid), and
    an empty ``tool_calls`` list is dropped. Non-text parts raise :class:`TemplateError`.
    """
    if fmt not in ("string", "openai"):
        raise ValueError(f"content format must be 'string' or 'openai', not {fmt!r}")
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)):
        raise TemplateError("messages must be a list of objects")
    out: list[dict[str, Any]] = []
    for m in messages:
        if not isinstance(m, Mapping):
            raise TemplateError("each message must be an object")
        role = m.get("role")
        if not isinstance(role, str):
            raise TemplateError("each message needs a string 'role'")
        texts = _content_texts(role, m.get("content"))
        msg: dict[str, Any] = {"role": role}
        if fmt == "openai" and role != "tool":
            msg["content"] = [{"type": "text", "text": t} for t in texts]
        else:
            # vLLM flattens text-only tool results to a string in both formats
            msg["content"] = "\n".join(texts)
        if role == "assistant":
            calls = m.get("tool_calls")
            if calls is not None:
                if not isinstance(calls, list):
                    raise TemplateError("tool_calls must be a list")
                if calls:
                    msg["tool_calls"] = [_vllm_tool_call(c) for c in calls]
            reasoning = m.get("reasoning")
            if reasoning is not None:
                msg["reasoning"] = reasoning
                msg["reasoning_content"] = reasoning
        elif role == "tool":
            if "tool_call_id" in m:
                msg["tool_call_id"] = m["tool_call_id"]
        if isinstance(m.get("name"), str):
            msg["name"] = m["name"]
        if isinstance(m.get("task"), str):
            msg["task"] = m["task"]
        if role == "developer":
            msg["tools"] = m.get("tools")
        out.append(msg)
    return out


def _vllm_tool_call(call: Any) -> dict[str, Any]:
    if not isinstance(call, Mapping) or not isinstance(call.get("function"), Mapping):
        raise TemplateError("each tool call needs a 'function' object")
    call = copy.deepcopy(dict(call))
    fn = dict(call["function"])
    args = fn.get("arguments")
    if isinstance(args, str):
        try:
            fn["arguments"] = json.loads(args)
        except ValueError:
            fn["arguments"] = {}
    elif not isinstance(args, (dict, list)):
        fn["arguments"] = {}
    call["function"] = fn
    return call


def vllm_tools(tools: Sequence[Mapping[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Tool definitions as vLLM renders them (``ChatCompletionToolsParam.model_dump()``):
    ``{"type", "function": {"name", "description", "parameters", …extra}, …extra}`` with
    ``None`` for a missing description or parameters. ``None`` or ``[]`` → ``None``."""
    if tools is None:
        return None
    if not isinstance(tools, Sequence) or isinstance(tools, (str, bytes)):
        raise TemplateError("tools must be a list of JSON objects")
    if not tools:
        return None
    out = []
    for tool in tools:
        if not isinstance(tool, Mapping):
            raise TemplateError("tools must be a list of JSON objects")
        fn = tool.get("function")
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TemplateError("each tool needs a 'function' object with a string 'name'")
        f = {"name": fn["name"], "description": fn.get("description"),
             "parameters": fn.get("parameters")}
        f.update((k, v) for k, v in fn.items() if k not in f)
        t = {"type": tool.get("type", "function"), "function": f}
        t.update((k, v) for k, v in tool.items() if k not in t)
        out.append(t)
    return out


def render_chat(
    source: str,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = True,
    tools: Sequence[Mapping[str, Any]] | None = None,
    documents: Sequence[Mapping[str, Any]] | None = None,
    continue_final_message: bool = False,
    special_tokens: Mapping[str, Any] | None = None,
    chat_template_kwargs: Mapping[str, Any] | None = None,
    vllm_compat: bool = True,
    limits: Limits | None = None,
) -> str:
    """The prompt vLLM renders for a chat request with template ``source``: with
    ``vllm_compat`` messages and tools are first reshaped as vLLM's OpenAI server reshapes
    them (:func:`vllm_messages`, :func:`vllm_tools`), then :func:`render`."""
    if vllm_compat:
        tools = vllm_tools(tools)
        messages = vllm_messages(messages, content_format(source))
    return render(source, messages, add_generation_prompt=add_generation_prompt, tools=tools,
                  documents=documents, continue_final_message=continue_final_message,
                  special_tokens=special_tokens, chat_template_kwargs=chat_template_kwargs,
                  limits=limits)
