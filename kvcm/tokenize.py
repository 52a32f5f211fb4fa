"""Tokenizers from local files, encoding exactly as vLLM (i.e. Hugging Face transformers) does.

kvcm's block keys are hashes of token ids, so a prompt must become the very ids the engine
computed. vLLM loads ``AutoTokenizer.from_pretrained(model_dir)`` and calls
``tokenizer(text, add_special_tokens=…)``; this module rebuilds that tokenizer from the same
files with the ``tokenizers`` library alone (transformers is a test-only oracle):

- ``tokenizer.json`` is the backend; its truncation and padding are switched off (a plain
  ``tokenizer(text)`` call does not truncate or pad);
- ``tokenizer_config.json`` adds what transformers applies on top: the special tokens
  (class defaults, then the file's values, strings or ``{"content": …}`` objects), the
  ``added_tokens_decoder`` entries (re-added, so their flags win), special tokens missing
  from the vocabulary, ``split_special_tokens``, ``add_prefix_space`` on the pre-tokenizer,
  and the per-class rules (Llama/Gemma/Cohere/GPT-NeoX classes rebuild the post-processor
  from ``add_bos_token``/``add_eos_token``; BERT classes re-derive the normalizer from
  ``do_lower_case``/``strip_accents``/``tokenize_chinese_chars``). The class comes from
  ``tokenizer_class``, else from ``config.json``'s ``model_type``; for
  ``PreTrainedTokenizerFast`` (Llama 3, Mistral Nemo, …) ``add_bos_token`` is ignored, as
  transformers 4.x ignores it;
- chat templates come from ``chat_template.jinja`` (+ ``additional_chat_templates/*.jinja``),
  else ``tokenizer_config.json``'s ``chat_template`` (a string or a ``[{"name",
  "template"}]`` list), else ``chat_template.json``.

:class:`TokenizerRegistry` maps model names to directories (explicit ``MODEL=DIR`` entries
and auto-discovery, including the Hugging Face cache layout), loads lazily and keeps a
broken model from affecting the others. Nothing here touches the network.

``tokenizers`` releases the GIL while encoding, so long encodes can run in a thread pool
(``loop.run_in_executor``) without blocking the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import chat as _chat
from .segment_cache import SegmentCache

__all__ = [
    "Tokenizer",
    "TokenizerRegistry",
    "UnknownModel",
    "TokenizerLoadError",
    "parse_tokenizer_spec",
]

log = logging.getLogger("kvcm.tokenize")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"
SPECIAL_TOKENS_MAP_FILE = "special_tokens_map.json"
MODEL_CONFIG_FILE = "config.json"
TEMPLATE_FILE = "chat_template.jinja"
TEMPLATE_DIR = "additional_chat_templates"
LEGACY_TEMPLATE_FILE = "chat_template.json"

# transformers' SPECIAL_TOKENS_ATTRIBUTES, in its order (the template variables).
_SPECIAL_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token",
                  "mask_token")
_ADDED_TOKEN_FIELDS = ("content", "single_word", "lstrip", "rstrip", "normalized", "special")


class UnknownModel(LookupError):
    """No tokenizer is configured for this model name (the API answers 404)."""

    def __init__(self, model: str, known: Sequence[str]):
        self.model = model
        self.known = sorted(known)
        listed = ", ".join(self.known) if self.known else "none"
        super().__init__(f"unknown model {model!r}: no tokenizer for it (known models: {listed})")

    def __str__(self) -> str:  # LookupError would quote the message like a key
        return self.args[0]


class TokenizerLoadError(RuntimeError):
    """A model's tokenizer files exist but cannot be loaded; names the model and the file."""

    def __init__(self, model: str, path: os.PathLike | str, reason: str):
        self.model = model
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"cannot load the tokenizer of model {model!r} from {self.path}: {reason}")


def parse_tokenizer_spec(spec: str) -> tuple[str, Path]:
    """``"MODEL=DIR"`` (the ``--tokenizer`` flag) → ``(model, Path(DIR))``.

    The model name is everything before the first ``=``; it may contain ``/`` and ``:``.
    """
    if not isinstance(spec, str) or "=" not in spec:
        raise ValueError(f"--tokenizer expects MODEL=DIR, got {spec!r}")
    model, _, path = spec.partition("=")
    model, path = model.strip(), path.strip()
    if not model:
        raise ValueError(f"--tokenizer {spec!r}: the model name before '=' is empty")
    if not path:
        raise ValueError(f"--tokenizer {spec!r}: the directory after '=' is empty")
    return model, Path(os.path.expanduser(path))


# ----------------------------------------------------------------------------------------
# Per-class behaviour of the transformers fast tokenizers (tokenizer_class → rules)


@dataclass(frozen=True)
class _ClassRules:
    defaults: Mapping[str, Any] = field(default_factory=dict)  # special tokens + flags
    rebuild_post_processor: bool = False   # Llama-style update_post_processor()
    bert_normalizer: bool = False          # BertTokenizerFast's normalizer sync
    add_prefix_space_default: bool | None = False


_LLAMA_STYLE = {"add_bos_token": True, "add_eos_token": False}
_CLASS_RULES: dict[str, _ClassRules] = {
    "PreTrained": _ClassRules(),  # PreTrainedTokenizerFast: tokenizer.json as is
    "Llama": _ClassRules({"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>", **_LLAMA_STYLE},
                         rebuild_post_processor=True, add_prefix_space_default=None),
    "Gemma": _ClassRules({"unk_token": "<unk>", "bos_token": "<bos>", "eos_token": "<eos>",
                          "pad_token": "<pad>", **_LLAMA_STYLE}, rebuild_post_processor=True),
    "Cohere": _ClassRules({"unk_token": "<UNK>", "bos_token": "<BOS_TOKEN>",
                           "eos_token": "<|END_OF_TURN_TOKEN|>", **_LLAMA_STYLE},
                          rebuild_post_processor=True),
    "GPTNeoX": _ClassRules({"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                            "eos_token": "<|endoftext|>", "add_bos_token": False,
                            "add_eos_token": False}, rebuild_post_processor=True),
    "GPT2": _ClassRules({"unk_token": "<|endoftext|>", "bos_token": "<|endoftext|>",
                         "eos_token": "<|endoftext|>"}),
    "Qwen2": _ClassRules({"unk_token": "<|endoftext|>", "bos_token": None,
                          "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}),
    "Bert": _ClassRules({"unk_token": "[UNK]", "sep_token": "[SEP]", "pad_token": "[PAD]",
                         "cls_token": "[CLS]", "mask_token": "[MASK]", "do_lower_case": True,
                         "tokenize_chinese_chars": True, "strip_accents": None},
                        bert_normalizer=True),
}
# config.json model_type → class, for tokenizer_config.json files without tokenizer_class
_MODEL_TYPE_CLASS = {
    "llama": "Llama", "mistral": "Llama", "mixtral": "Llama", "gemma": "Gemma",
    "gemma2": "Gemma", "cohere": "Cohere", "gpt_neox": "GPTNeoX", "gpt2": "GPT2",
    "qwen2": "Qwen2", "qwen2_moe": "Qwen2", "qwen3": "Qwen2", "qwen3_moe": "Qwen2",
    "bert": "Bert",
}
# Qwen2TokenizerFast wraps its string special tokens as special, non-normalized tokens
_SPECIAL_AS_ADDED = {"Qwen2"}


def _class_key(tokenizer_class: str | None) -> str | None:
    if not tokenizer_class:
        return None
    base = tokenizer_class[:-4] if tokenizer_class.endswith("Fast") else tokenizer_class
    base = base[:-9] if base.endswith("Tokenizer") else base
    return base or None


def _read_json(path: Path, model: str) -> Any:
    try:
        with open(path, "rb") as f:
            return json.loads(f.read().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise TokenizerLoadError(model, path, f"{type(exc).__name__}: {exc}") from None


def _read_text(path: Path, model: str) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise TokenizerLoadError(model, path, f"{type(exc).__name__}: {exc}") from None


def _added_token(value: Any, tokenizers_mod: Any) -> Any:
    """A special-token value from the config (str or AddedToken dict) → str or AddedToken."""
    if isinstance(value, Mapping):
        kwargs = {k: value[k] for k in _ADDED_TOKEN_FIELDS if k in value}
        if not isinstance(kwargs.get("content"), str):
            raise ValueError(f"added token without string content: {value!r}")
        return tokenizers_mod.AddedToken(**kwargs)
    return value


def _files_signature(paths: Sequence[Path]) -> tuple:
    sig = []
    for p in paths:
        try:
            st = p.stat()
            sig.append((str(p), st.st_mtime_ns, st.st_size))
        except OSError:
            sig.append((str(p), None, None))
    return tuple(sig)


class Tokenizer:
    """One model's tokenizer and chat templates, loaded from a local directory."""

    def __init__(self, path: os.PathLike | str, *, name: str | None = None):
        import tokenizers  # a runtime dependency; imported here so `kvcm` imports without it

        path = Path(path)
        if path.is_file():  # a path to tokenizer.json itself
            tokenizer_file, path = path, path.parent
        else:
            tokenizer_file = path / TOKENIZER_FILE
        self.path = path
        self.name = name or path.name
        model = self.name

        if not tokenizer_file.is_file():
            raise TokenizerLoadError(model, tokenizer_file, "file not found")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as exc:  # tokenizers raises a bare Exception on bad JSON or models
            raise TokenizerLoadError(model, tokenizer_file, f"not a valid tokenizer.json ({exc})") \
                from None

        config_file = path / CONFIG_FILE
        config: dict[str, Any] = {}
        if config_file.is_file():
            config = _read_json(config_file, model)
            if not isinstance(config, dict):
                raise TokenizerLoadError(model, config_file, "expected a JSON object")
        self.config = config

        tokenizer_class = config.get("tokenizer_class")
        if not isinstance(tokenizer_class, str):
            tokenizer_class = None
        key = _class_key(tokenizer_class)
        if key is None and (path / MODEL_CONFIG_FILE).is_file():
            try:
                model_type = json.loads((path / MODEL_CONFIG_FILE).read_text("utf-8")).get("model_type")
            except (OSError, ValueError, AttributeError, UnicodeDecodeError):
                model_type = None
            key = _MODEL_TYPE_CLASS.get(model_type) if isinstance(model_type, str) else None
        if key is not None and key not in _CLASS_RULES:
            log.debug("model %s: tokenizer class %s has no specific rules; using the generic "
                      "fast-tokenizer behaviour", model, tokenizer_class)
        rules = _CLASS_RULES.get(key or "PreTrained", _CLASS_RULES["PreTrained"])
        self.tokenizer_class = tokenizer_class or (key and key + "TokenizerFast") or \
            "PreTrainedTokenizerFast"

        try:
            self._configure(backend, config, rules, key, tokenizers, path)
        except TokenizerLoadError:
            raise
        except Exception as exc:
            raise TokenizerLoadError(model, config_file if config_file.is_file() else tokenizer_file,
                                     f"inconsistent tokenizer configuration ({exc})") from None
        self._backend = backend
        # encode_batch_fast (tokenizers >= 0.21) skips the character offsets, ~15% faster
        # on long prompts; the ids are the same (tests compare both and transformers).
        self._encode_fast = getattr(backend, "encode_batch_fast", None)
        self.segment_cache = SegmentCache.for_backend(backend, self._encode_pieces)
        self._load_templates(config, model)

    # -- construction -------------------------------------------------------------------

    def _configure(self, backend: Any, config: dict[str, Any], rules: _ClassRules,
                   key: str | None, tokenizers: Any, path: Path) -> None:
        settings = dict(rules.defaults)
        settings.update(config)
        from_map_file: set[str] = set()

        # legacy special_tokens_map.json is read only when the config has no added_tokens_decoder
        if "added_tokens_decoder" not in config and (path / SPECIAL_TOKENS_MAP_FILE).is_file():
            stm = _read_json(path / SPECIAL_TOKENS_MAP_FILE, self.name)
            if isinstance(stm, dict):
                for k, v in stm.items():
                    if k == "additional_special_tokens" and isinstance(v, list):
                        have = list(settings.get("additional_special_tokens") or [])
                        for t in v:
                            if isinstance(t, dict):
                                t = dict(t, special=True)
                            if t not in have:
                                have.append(t)
                        settings[k] = have
                    elif k in _SPECIAL_NAMES:
                        from_map_file.add(k)
                        if isinstance(v, dict):
                            v = dict(v, special=True)
                        settings[k] = v

        # 1. the config's added_tokens_decoder (or, without it, tokenizer.json's added tokens)
        #    and the special tokens: name → str | AddedToken. A special token given in the
        #    config whose text names one of those added tokens becomes that AddedToken
        #    (its own flags are dropped, as transformers drops them).
        decoder_tokens: list[Any] = []
        decoder = settings.get("added_tokens_decoder")
        if "added_tokens_decoder" in config:
            if not isinstance(decoder, Mapping):
                raise ValueError("added_tokens_decoder must be an object")
            for _, tok in sorted(((int(i), t) for i, t in decoder.items()), key=lambda x: x[0]):
                tok = _added_token(tok, tokenizers)
                if not isinstance(tok, tokenizers.AddedToken):
                    raise ValueError("added_tokens_decoder entries must be objects")
                decoder_tokens.append(tok)
            added_map = {t.content: t for t in decoder_tokens}
        else:
            added_map = {t.content: t for t in backend.get_added_tokens_decoder().values()}

        special: dict[str, Any] = {}
        for name in _SPECIAL_NAMES:
            if name in config or name in from_map_file:
                value = _added_token(settings.get(name), tokenizers)
                content = value if isinstance(value, str) else getattr(value, "content", None)
                if content is not None and content in added_map:
                    value = added_map[content]
            else:
                value = rules.defaults.get(name)
            if value is None:
                continue
            if isinstance(value, str) and key in _SPECIAL_AS_ADDED:
                value = tokenizers.AddedToken(value, lstrip=False, rstrip=False, special=True,
                                              normalized=False)
            if not isinstance(value, (str, tokenizers.AddedToken)):
                raise ValueError(f"special token {name} must be a string or an AddedToken")
            special[name] = value
        additional = []
        for value in settings.get("additional_special_tokens") or []:
            value = _added_token(value, tokenizers)
            if not isinstance(value, (str, tokenizers.AddedToken)):
                raise ValueError("additional_special_tokens must hold strings or AddedTokens")
            additional.append(value)
        extra_named: dict[str, Any] = {}
        extra = settings.get("extra_special_tokens")
        if isinstance(extra, Mapping):
            for name, value in extra.items():
                value = _added_token(value, tokenizers)
                if isinstance(name, str) and isinstance(value, (str, tokenizers.AddedToken)):
                    extra_named[name] = value
        elif isinstance(extra, list):
            for value in extra:
                value = _added_token(value, tokenizers)
                if isinstance(value, (str, tokenizers.AddedToken)) and value not in additional:
                    additional.append(value)

        def text(v: Any) -> str:
            return v if isinstance(v, str) else v.content

        # what templates see: transformers' special_tokens_map (non-empty values only)
        stmap: dict[str, Any] = {n: text(v) for n, v in special.items() if text(v)}
        if additional:
            stmap["additional_special_tokens"] = [text(v) for v in additional]
        for n, v in extra_named.items():
            if text(v):
                stmap[n] = text(v)
        self.special_tokens: dict[str, Any] = stmap

        # 2. the backend as transformers leaves it
        backend.no_truncation()
        backend.no_padding()
        backend.encode_special_tokens = bool(settings.get("split_special_tokens", False))

        # all_special_tokens_extended: every special token once (by text), in attribute order
        all_special: list[Any] = []
        seen: set[str] = set()
        for v in [*special.values(), *additional, *extra_named.values()]:
            if v and text(v) not in seen:
                seen.add(text(v))
                all_special.append(v)
        all_special_text = {text(v) for v in all_special}

        # transformers re-adds every added_tokens_decoder entry (its flags then win over
        # tokenizer.json's) plus the special tokens it cannot find; an AddedToken never
        # compares equal to a string, so AddedToken specials are re-added unless equal to
        # a decoder entry.
        to_add: list[Any] = list(decoder_tokens)
        encoder = [t.content for t in backend.get_added_tokens_decoder().values()]
        encoder += [t.content for t in to_add]
        for tok in all_special:
            if tok not in encoder and tok not in to_add:
                to_add.append(tok)
        if to_add:
            final = []
            for tok in to_add:
                if isinstance(tok, str):
                    tok = tokenizers.AddedToken(tok, special=tok in all_special_text)
                else:
                    tok.special = bool(tok.special or tok.content in all_special_text)
                final.append(tok)
            backend.add_tokens(final)

        # 3. add_prefix_space on a pre-tokenizer that has the flag at top level
        aps = settings.get("add_prefix_space", rules.add_prefix_space_default)
        if key == "Llama" and config.get("add_prefix_space") is not None:
            log.warning("model %s: add_prefix_space with a Llama tokenizer makes transformers "
                        "rebuild it from the sentencepiece model; kvcm uses tokenizer.json as is",
                        self.name)
        elif aps is not None and backend.pre_tokenizer is not None:
            try:
                state = json.loads(backend.pre_tokenizer.__getstate__())
            except Exception:
                state = None
            if isinstance(state, dict) and "add_prefix_space" in state \
                    and state["add_prefix_space"] != aps:
                import tokenizers.pre_tokenizers as pre

                kind = state.pop("type")
                state["add_prefix_space"] = aps
                try:
                    backend.pre_tokenizer = getattr(pre, kind)(**state)
                except Exception:
                    pass  # transformers ignores pre-tokenizers it cannot rebuild, so do we

        # 4. class rules
        if rules.rebuild_post_processor:
            add_bos = bool(settings.get("add_bos_token"))
            add_eos = bool(settings.get("add_eos_token"))
            bos = text(special["bos_token"]) if "bos_token" in special else None
            eos = text(special["eos_token"]) if "eos_token" in special else None
            if add_bos and bos is None:
                raise ValueError("add_bos_token = True but bos_token = None")
            if add_eos and eos is None:
                raise ValueError("add_eos_token = True but eos_token = None")
            single = (f"{bos}:0 " if add_bos else "") + "$A:0" + (f" {eos}:0" if add_eos else "")
            pair = single + (f" {bos}:1" if add_bos else "") + " $B:1" + (f" {eos}:1" if add_eos else "")
            unk = text(special["unk_token"]) if "unk_token" in special else None

            def token_id(tok: str) -> int | None:
                i = backend.token_to_id(tok)
                return i if i is not None else (backend.token_to_id(unk) if unk else None)

            pairs = []
            if add_bos:
                pairs.append((bos, token_id(bos)))
            if add_eos:
                pairs.append((eos, token_id(eos)))
            import tokenizers.processors as proc

            backend.post_processor = proc.TemplateProcessing(single=single, pair=pair,
                                                             special_tokens=pairs)
        if rules.bert_normalizer and backend.normalizer is not None:
            state = json.loads(backend.normalizer.__getstate__())
            lower = settings.get("do_lower_case", True)
            accents = settings.get("strip_accents")
            chinese = settings.get("tokenize_chinese_chars", True)
            if (state.get("lowercase", lower) != lower or state.get("strip_accents", accents) != accents
                    or state.get("handle_chinese_chars", chinese) != chinese):
                import tokenizers.normalizers as norm

                kind = state.pop("type")
                state.update(lowercase=lower, strip_accents=accents, handle_chinese_chars=chinese)
                backend.normalizer = getattr(norm, kind)(**state)

        self.bos_token_id = backend.token_to_id(stmap["bos_token"]) if "bos_token" in stmap else None
        self.eos_token_id = backend.token_to_id(stmap["eos_token"]) if "eos_token" in stmap else None

    def _load_templates(self, config: dict[str, Any], model: str) -> None:
        templates: dict[str, str] = {}
        single: str | None = None
        tfile = self.path / TEMPLATE_FILE
        tdir = self.path / TEMPLATE_DIR
        if tfile.is_file():
            templates["default"] = _read_text(tfile, model)
        if tdir.is_dir():
            for f in sorted(tdir.glob("*.jinja")):
                templates[f.name[:-len(".jinja")]] = _read_text(f, model)
        if not templates:
            raw = config.get("chat_template")
            where = self.path / CONFIG_FILE
            if raw is None and (self.path / LEGACY_TEMPLATE_FILE).is_file():
                where = self.path / LEGACY_TEMPLATE_FILE
                doc = _read_json(where, model)
                raw = doc.get("chat_template") if isinstance(doc, dict) else None
            if isinstance(raw, str):
                single = raw
            elif isinstance(raw, list):
                for item in raw:
                    if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                            and isinstance(item.get("template"), str)):
                        raise TokenizerLoadError(model, where, 'chat_template list entries must be '
                                                 '{"name": str, "template": str}')
                    templates[item["name"]] = item["template"]
            elif isinstance(raw, dict):
                templates = {k: v for k, v in raw.items() if isinstance(k, str) and isinstance(v, str)}
            elif raw is not None:
                raise TokenizerLoadError(model, where, "chat_template must be a string or a list")
        elif list(templates) == ["default"]:
            single = templates.pop("default")
        self._single_template = single
        self._templates = templates

    # -- encoding -----------------------------------------------------------------------

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer`` (configured; do not mutate)."""
        return self._backend

    @property
    def vocab_size(self) -> int:
        return self._backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of ``text``, as ``AutoTokenizer(...)(text, add_special_tokens=…)["input_ids"]``.
        Without special tokens added (chat prompts), pieces between special tokens that
        earlier texts had are not encoded again (kvcm/segment_cache.py)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, not {type(text).__name__}")
        if not add_special_tokens and self.segment_cache is not None:
            return self.segment_cache.encode(text)
        return self._encode_plain(text, add_special_tokens)

    def _encode_plain(self, text: str, add_special_tokens: bool) -> list[int]:
        if self._encode_fast is not None:
            return self._encode_fast([text], add_special_tokens=add_special_tokens)[0].ids
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def _encode_pieces(self, texts: list[str]) -> list[list[int]]:
        return self._ids_batch(texts, False)

    def _ids_batch(self, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
        encode = self._encode_fast or self._backend.encode_batch
        return [e.ids for e in encode(texts, add_special_tokens=add_special_tokens)]

    def encode_batch(self, texts: Sequence[str], add_special_tokens: bool = True) -> list[list[int]]:
        """``encode`` for several texts at once (parallel inside ``tokenizers``)."""
        texts = list(texts)
        if not all(isinstance(t, str) for t in texts):
            raise TypeError("texts must be strings")
        return self._ids_batch(texts, add_special_tokens)

    # -- chat ---------------------------------------------------------------------------

    @property
    def chat_template(self) -> str | None:
        """The default chat template (``None`` when the model has none)."""
        if self._single_template is not None:
            return self._single_template
        return self._templates.get("default")

    @property
    def chat_templates(self) -> dict[str, str]:
        """Named templates (``{"default": …, "tool_use": …}``); a single template is ``"default"``."""
        if self._single_template is not None:
            return {"default": self._single_template}
        return dict(self._templates)

    def resolve_chat_template(self, chat_template: str | None = None,
                              tools: Sequence[Any] | None = None) -> str:
        """The template source to render, as transformers' ``get_chat_template`` picks it.

        With several named templates, ``chat_template`` may be a name (``"tool_use"``) and
        the default is ``tool_use`` when tools are given, else ``default``. Any other string
        is the template source itself (a request-supplied template).
        """
        if chat_template is not None and not isinstance(chat_template, str):
            raise _chat.TemplateError("chat_template must be a string")
        if self._templates:
            if chat_template is not None and chat_template in self._templates:
                return self._templates[chat_template]
            if chat_template is None:
                if tools is not None and "tool_use" in self._templates:
                    return self._templates["tool_use"]
                if "default" in self._templates:
                    return self._templates["default"]
                raise _chat.TemplateError(
                    f"model {self.name!r} has several chat templates and none is the default; "
                    f"pass chat_template as one of {sorted(self._templates)}")
            return chat_template
        if chat_template is not None:
            return chat_template
        if self._single_template is None:
            raise _chat.TemplateError(
                f"model {self.name!r} has no chat template: supply one with chat_template")
        return self._single_template

    def is_template_source(self, chat_template: str | None) -> bool:
        """True when ``chat_template`` is template source (a request's own template); False
        when it is None or the name of one of the model's templates."""
        return chat_template is not None and chat_template not in self._templates

    def render_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = True,
        chat_template: str | None = None,
        chat_template_kwargs: Mapping[str, Any] | None = None,
        tools: Sequence[Mapping[str, Any]] | None = None,
        documents: Sequence[Mapping[str, Any]] | None = None,
        continue_final_message: bool = False,
        vllm_compat: bool = True,
        limits: _chat.Limits | None = None,
    ) -> str:
        """The prompt text vLLM renders for a chat request (raises ``chat.TemplateError``).

        With ``vllm_compat`` (the default) messages and tools are first reshaped as vLLM's
        OpenAI server reshapes them (:func:`kvcm.chat.vllm_messages`, :func:`kvcm.chat.vllm_tools`);
        for plain string contents and complete tool definitions that is the identity, and
        the result equals ``apply_chat_template(messages, tokenize=False, …)``. ``limits``
        meter the render (:class:`kvcm.chat.TemplateLimitExceeded`).
        """
        source = self.resolve_chat_template(chat_template, _chat.vllm_tools(tools) if vllm_compat else tools)
        return _chat.render_chat(
            source, messages,
            add_generation_prompt=add_generation_prompt,
            tools=tools, documents=documents,
            continue_final_message=continue_final_message,
            special_tokens=self.special_tokens,
            chat_template_kwargs=chat_template_kwargs,
            vllm_compat=vllm_compat, limits=limits,
        )

    def encode_chat(self, messages: Sequence[Mapping[str, Any]], **kwargs: Any) -> tuple[str, list[int]]:
        """``(rendered prompt, token ids)``; the prompt is encoded without adding special
        tokens, as vLLM does for chat requests (the template already wrote BOS if any)."""
        text = self.render_chat(messages, **kwargs)
        return text, self.encode(text, add_special_tokens=False)

    def __repr__(self) -> str:
        return f"Tokenizer({self.name!r}, path={str(self.path)!r}, class={self.tokenizer_class})"


# ----------------------------------------------------------------------------------------
# The registry


@dataclass
class _Entry:
    name: str
    path: Path
    source: str  # "explicit", "directory" or "hf-cache"
    tokenizer: Tokenizer | None = None
    error: TokenizerLoadError | None = None
    signature: tuple | None = None  # of the files when tokenizer/error was produced
    lock: threading.Lock = field(default_factory=threading.Lock)


def _entry_files(path: Path) -> list[Path]:
    names = (TOKENIZER_FILE, CONFIG_FILE, SPECIAL_TOKENS_MAP_FILE, TEMPLATE_FILE, LEGACY_TEMPLATE_FILE)
    files = [path / n for n in names]
    tdir = path / TEMPLATE_DIR
    if tdir.is_dir():
        files.extend(sorted(tdir.glob("*.jinja")))
    return files


_MAX_DEPTH = 8


def _hf_snapshot(repo_dir: Path) -> Path | None:
    """The snapshot of a ``models--org--name`` cache folder to use: refs/main, else the newest."""
    snaps = repo_dir / "snapshots"
    if not snaps.is_dir():
        return None
    ref = repo_dir / "refs" / "main"
    try:
        commit = ref.read_text("utf-8").strip()
    except (OSError, UnicodeDecodeError):
        commit = ""
    if commit and "/" not in commit and (snaps / commit / TOKENIZER_FILE).is_file():
        return snaps / commit
    best, best_mtime = None, None
    try:
        children = list(snaps.iterdir())
    except OSError:
        return None
    for child in children:
        if (child / TOKENIZER_FILE).is_file():
            try:
                mtime = child.stat().st_mtime
            except OSError:
                continue
            if best_mtime is None or mtime > best_mtime or (mtime == best_mtime and child.name > best.name):
                best, best_mtime = child, mtime
    return best


def discover(root: os.PathLike | str) -> dict[str, tuple[Path, str]]:
    """Model directories under ``root``: ``{name: (dir, "directory" | "hf-cache")}``.

    A folder holding ``tokenizer.json`` is named by its path relative to ``root``
    (``Qwen/Qwen2.5-7B-Instruct``; ``root`` itself by its own name). A Hugging Face cache
    folder ``models--org--name`` is named ``org/name`` and resolved to its ``refs/main``
    snapshot, else its newest one. Hidden folders are skipped, symlinks followed (once).
    A plain directory wins over a cache entry of the same name; otherwise the first in
    sorted order wins.
    """
    root = Path(root)
    plain: dict[str, Path] = {}
    cached: dict[str, Path] = {}
    seen: set[str] = set()

    def walk(d: Path, rel: tuple[str, ...]) -> None:
        try:
            real = os.path.realpath(d)
        except OSError:
            return
        if real in seen or len(rel) > _MAX_DEPTH:
            return
        seen.add(real)
        if (d / TOKENIZER_FILE).is_file():
            name = "/".join(rel) if rel else root.resolve().name
            if name in plain:
                log.warning("tokenizer dir %s: name %r already used by %s; ignored", d, name, plain[name])
            else:
                plain[name] = d
        try:
            children = sorted(c for c in d.iterdir() if not c.name.startswith("."))
        except OSError:
            return
        for child in children:
            try:
                if not child.is_dir():
                    continue
            except OSError:
                continue
            if child.name.startswith(("models--", "datasets--", "spaces--")):
                if child.name.startswith("models--"):
                    parts = child.name.split("--")[1:]
                    snap = _hf_snapshot(child)
                    if snap is not None and all(parts):
                        name = "/".join(parts)
                        cached.setdefault(name, snap)
                continue
            walk(child, rel + (child.name,))

    if root.is_dir():
        walk(root, ())
    found = {name: (p, "directory") for name, p in plain.items()}
    for name, p in cached.items():
        if name in found:
            log.warning("tokenizer cache entry %s: name %r already used by %s; ignored",
                        p, name, found[name][0])
        else:
            found[name] = (p, "hf-cache")
    return found


class TokenizerRegistry:
    """Model name → :class:`Tokenizer`, from explicit entries and a discovery directory.

    Explicit ``models`` (``--tokenizer MODEL=DIR``) must point at a directory holding a
    ``tokenizer.json`` (or at the file itself); anything else is a configuration error
    raised here as ``ValueError``. Tokenizers load on first use and stay cached; a model
    whose files are broken raises :class:`TokenizerLoadError` from :meth:`get` (again
    on later calls, cheaply, until its files change) while other models keep working.
    Thread-safe: encodes may run in worker threads.
    """

    def __init__(self, models: Mapping[str, os.PathLike | str] | None = None,
                 tokenizers_dir: os.PathLike | str | None = None):
        explicit: dict[str, Path] = {}
        for name, p in (models or {}).items():
            if not isinstance(name, str) or not name:
                raise ValueError(f"tokenizer model name must be a non-empty string, got {name!r}")
            p = Path(os.path.expanduser(str(p)))
            if p.is_file():
                if p.name != TOKENIZER_FILE:
                    raise ValueError(f"--tokenizer {name}={p}: expected a directory or a tokenizer.json")
                p = p.parent
            elif not p.is_dir():
                raise ValueError(f"--tokenizer {name}={p}: no such directory")
            elif not (p / TOKENIZER_FILE).is_file():
                raise ValueError(f"--tokenizer {name}={p}: the directory has no tokenizer.json")
            explicit[name] = p
        if tokenizers_dir is not None:
            tokenizers_dir = Path(os.path.expanduser(str(tokenizers_dir)))
            if not tokenizers_dir.is_dir():
                raise ValueError(f"--tokenizers-dir {tokenizers_dir}: no such directory")
        self._explicit = explicit
        self._dir = tokenizers_dir
        self._lock = threading.Lock()
        self._entries: dict[str, _Entry] = {}
        self.reload()

    @property
    def tokenizers_dir(self) -> Path | None:
        return self._dir

    def _scan(self) -> dict[str, tuple[Path, str]]:
        found = discover(self._dir) if self._dir is not None else {}
        for name, p in self._explicit.items():
            found[name] = (p, "explicit")
        return found

    def reload(self) -> dict[str, list[str]]:
        """Re-scan the discovery directory (SIGHUP). Loaded tokenizers whose directory and
        files did not change are kept; the others load again on next use. Returns
        ``{"added": [...], "removed": [...], "changed": [...]}`` (model names)."""
        found = self._scan()
        with self._lock:
            old = self._entries
            new: dict[str, _Entry] = {}
            added, changed = [], []
            for name, (p, source) in sorted(found.items()):
                prev = old.get(name)
                entry = _Entry(name, p, source)
                if prev is None:
                    added.append(name)
                elif prev.path != p:
                    changed.append(name)
                elif prev.tokenizer is not None or prev.error is not None:
                    if prev.signature == _files_signature(_entry_files(p)):
                        entry.tokenizer, entry.error = prev.tokenizer, prev.error
                        entry.signature = prev.signature
                    else:
                        changed.append(name)
                new[name] = entry
            removed = sorted(set(old) - set(new))
            self._entries = new
        if added or removed or changed:
            log.info("tokenizers: %d models (added %s, removed %s, changed %s)", len(new),
                     ", ".join(added) or "-", ", ".join(removed) or "-", ", ".join(changed) or "-")
        return {"added": added, "removed": removed, "changed": changed}

    def models(self) -> list[str]:
        """Known model names, sorted (loaded or not)."""
        with self._lock:
            return sorted(self._entries)

    def __contains__(self, model: object) -> bool:
        with self._lock:
            return model in self._entries

    def path(self, model: str) -> Path:
        with self._lock:
            entry = self._entries.get(model)
            known = list(self._entries) if entry is None else None
        if entry is None:
            raise UnknownModel(model, known)
        return entry.path

    def loaded(self, model: str) -> Tokenizer | None:
        """The model's tokenizer when it is loaded already, else None: :meth:`get` would read
        and compile its files (hundreds of milliseconds), or fail."""
        with self._lock:
            entry = self._entries.get(model)
            return entry.tokenizer if entry is not None else None

    def get(self, model: str) -> Tokenizer:
        """The model's tokenizer; ``UnknownModel`` or ``TokenizerLoadError`` otherwise."""
        with self._lock:
            entry = self._entries.get(model)
            if entry is None:
                raise UnknownModel(model, list(self._entries))
            if entry.tokenizer is not None:
                return entry.tokenizer
        with entry.lock:
            if entry.tokenizer is not None:
                return entry.tokenizer
            signature = _files_signature(_entry_files(entry.path))
            if entry.error is not None and signature == entry.signature:
                raise entry.error  # still broken: do not re-read megabytes per request
            try:
                tok = Tokenizer(entry.path, name=model)
            except TokenizerLoadError as exc:
                err = exc
            except Exception as exc:  # anything unexpected is still a load error of this model
                err = TokenizerLoadError(model, entry.path, f"{type(exc).__name__}: {exc}")
            else:
                entry.tokenizer, entry.error, entry.signature = tok, None, signature
                return tok
            entry.error, entry.signature = err, signature
            log.error("%s", err)
            raise err

    def load_all(self, configured_only: bool = False) -> dict[str, TokenizerLoadError]:
        """Load every model now (e.g. at start), or only those named explicitly (not found in
        the directory); returns the errors by model name."""
        errors = {}
        for name in (sorted(self._explicit) if configured_only else self.models()):
            try:
                self.get(name)
            except TokenizerLoadError as exc:
                errors[name] = exc
            except UnknownModel:
                pass  # removed by a concurrent reload
        return errors

    def describe(self) -> list[dict[str, Any]]:
        """One line per model for logs and status endpoints."""
        with self._lock:
            entries = list(self._entries.values())
        return [{"model": e.name, "path": str(e.path), "source": e.source,
                 "loaded": e.tokenizer is not None,
                 "error": str(e.error) if e.error is not None else None} for e in entries]
