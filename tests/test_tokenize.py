"""kvcm.tokenize against transformers (the oracle) on the real fixture tokenizers.

transformers is loaded offline from local paths only; every comparison is with what
``AutoTokenizer.from_pretrained(dir)`` does, since that is what vLLM runs.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import json
import pathlib
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import pytest

from kvcm.tokenize import (
    Tokenizer,
    TokenizerLoadError,
    TokenizerRegistry,
    UnknownModel,
    discover,
    parse_tokenizer_spec,
)

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("KVCM_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "tokenizers"

pytestmark = pytest.mark.skipif(not (FIXTURES / "gpt2" / "tokenizer.json").is_file(),
                                reason="../shared/fixtures/tokenizers is not beside the project")

MODELS = ["llama-3.2-instruct", "qwen2.5-instruct", "mistral-nemo-instruct-2407", "gpt2",
          "all-minilm-l6-v2"]

LONG = ("KV-cache aware routing sends each request to the engine that already holds its "
        "prefix. Ünïcödé façade, 日本語の文章、😀👍🏽; numbers 1234567 and code `x += 1`\n\n") * 300

TEXTS = {
    "ascii": "Hello, world! This is a test of KV-cache aware routing.",
    "unicode": "Ünïcödé: Café, naïve, façade — Ελληνικά, русский, 日本語のテキスト, 中文字符, العربية, हिन्दी",
    "nfd": "Cafe\u0301 man\u0303ana A\u030a decomposed forms",
    "emoji": "😀 👍🏽 👨‍👩‍👧‍👦 🇯🇵 ❤️‍🔥 🤖🤖🤖",
    "whitespace": "  leading\tand   inner   runs\n\n\n  trailing   \r\n\u00a0nbsp\u3000ideographic ",
    "only_spaces": "     ",
    "newlines": "\n\n\n\n",
    "code": "def f(x):\n    return x**2  # square\n\n\tif a <= b and c != d:\n\t\tpass\n",
    "numbers": "1234567890 3.14159 1,000,000 2024-07-26 0x1F 1e-9",
    "contractions": "I'm sure you're right, it's what we'll do; they'd agree. DON'T, I'VE",
    "special_literals": ("<|begin_of_text|>hi<|eot_id|> <s>[INST] x [/INST]</s> <|im_start|>user\n"
                         "<|im_end|> <|endoftext|> [CLS] a [SEP] [MASK] <unk>"),
    "control": "a\x00b\x1fc\u200bd\ufeffe\u00adf",
    "long": LONG,
    "empty": "",
    "single_char": "x",
}


@lru_cache(maxsize=None)
def ours(model: str) -> Tokenizer:
    return Tokenizer(FIXTURES / model)


@lru_cache(maxsize=None)
def oracle(path: str):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def hf(model: str):
    return oracle(str(FIXTURES / model))


def backend_state(tokenizer_json: str) -> dict:
    # transformers keeps truncation/padding in its backend and switches them off per call
    state = json.loads(tokenizer_json)
    state.pop("truncation", None)
    state.pop("padding", None)
    return state


# --------------------------------------------------------------------------------------
# encode parity


@pytest.mark.parametrize("add_special_tokens", [True, False], ids=["special", "plain"])
@pytest.mark.parametrize("text_id", list(TEXTS))
@pytest.mark.parametrize("model", MODELS)
def test_encode_matches_transformers(model, text_id, add_special_tokens):
    text = TEXTS[text_id]
    expected = hf(model)(text, add_special_tokens=add_special_tokens)["input_ids"]
    assert ours(model).encode(text, add_special_tokens=add_special_tokens) == expected


@pytest.mark.parametrize("model", MODELS)
def test_backend_configured_like_transformers(model):
    """The whole serialized pipeline (normalizer, pre-tokenizer, model, post-processor,
    added tokens with their flags) equals the one transformers builds."""
    assert backend_state(ours(model).backend.to_str()) == \
        backend_state(hf(model).backend_tokenizer.to_str())
    assert ours(model).backend.encode_special_tokens == hf(model).backend_tokenizer.encode_special_tokens


@pytest.mark.parametrize("model", MODELS)
def test_special_tokens_match_transformers(model):
    tok, ref = ours(model), hf(model)
    assert tok.special_tokens == ref.special_tokens_map
    assert tok.bos_token_id == (ref.bos_token_id if ref.bos_token else None)
    assert tok.eos_token_id == ref.eos_token_id


def test_bos_rules_of_the_fixture_families():
    # the facts vLLM users rely on: Llama 3 and Mistral add BOS, Qwen and GPT-2 add nothing
    assert ours("llama-3.2-instruct").encode("hi")[0] == 128000
    assert ours("llama-3.2-instruct").encode("hi", add_special_tokens=False)[0] != 128000
    assert ours("mistral-nemo-instruct-2407").encode("hi")[0] == 1
    assert ours("qwen2.5-instruct").encode("hi") == ours("qwen2.5-instruct").encode("hi", False)
    assert ours("gpt2").encode("") == []
    assert ours("all-minilm-l6-v2").encode("") == [101, 102]


def test_minilm_truncation_and_padding_are_off():
    # tokenizer.json pins truncation and padding to 128; a plain call does neither
    tok = ours("all-minilm-l6-v2")
    assert len(tok.encode(LONG)) > 1000
    assert tok.encode("hello") == [101, 7592, 102]


@pytest.mark.parametrize("model", MODELS)
def test_encode_paths_agree(model):
    """encode() uses the offsets-free fast path; the classic path and batches give the same ids."""
    tok = ours(model)
    texts = list(TEXTS.values())
    for special in (True, False):
        classic = [e.ids for e in tok.backend.encode_batch(texts, add_special_tokens=special)]
        assert [tok.encode(t, special) for t in texts] == classic
        assert tok.encode_batch(texts, add_special_tokens=special) == classic
        assert [tok.backend.encode(t, add_special_tokens=special).ids for t in texts] == classic


def test_encode_rejects_non_strings():
    with pytest.raises(TypeError):
        ours("gpt2").encode(b"bytes")
    with pytest.raises(TypeError):
        ours("gpt2").encode_batch(["ok", 3])


# --------------------------------------------------------------------------------------
# tokenizer_config.json rules, on modified copies of the fixtures


def _config(model):
    return json.loads((FIXTURES / model / "tokenizer_config.json").read_text("utf-8"))


def _variant_dir(tmp_path, model, config, extra_files=None):
    d = tmp_path / "m"  # transformers guesses classes from substrings of the path ("variant" → aria)
    d.mkdir()
    (d / "tokenizer.json").symlink_to(FIXTURES / model / "tokenizer.json")
    if config is not None:
        (d / "tokenizer_config.json").write_text(json.dumps(config), "utf-8")
    for name, text in (extra_files or {}).items():
        (d / name).write_text(text, "utf-8")
    return d


def _gpt2(**changes):
    cfg = _config("gpt2")
    cfg.update(changes)
    return cfg


_ADDED_DECODER = {
    "50256": {"content": "<|endoftext|>", "lstrip": False, "normalized": False, "rstrip": False,
              "single_word": False, "special": True},
    "50257": {"content": "<|kvcm|>", "lstrip": False, "normalized": False, "rstrip": True,
              "single_word": False, "special": True},
}

# name → (fixture model, tokenizer_config.json or None, extra files); built lazily because the
# fixture files may be absent (then every test here skips)
VARIANTS = {
    # LlamaTokenizerFast rebuilds the post-processor from add_bos_token/add_eos_token
    "llama_class_bos_eos": lambda: (
        "gpt2", _gpt2(tokenizer_class="LlamaTokenizerFast", add_bos_token=True, add_eos_token=True,
                      add_prefix_space=None), None),
    "llama_class_no_bos": lambda: (
        "mistral-nemo-instruct-2407",
        dict(_config("mistral-nemo-instruct-2407"), tokenizer_class="LlamaTokenizerFast",
             add_bos_token=False, add_prefix_space=None), None),
    # ... but PreTrainedTokenizerFast ignores add_bos_token (transformers 4.x)
    "generic_class_ignores_add_bos": lambda: (
        "mistral-nemo-instruct-2407",
        dict(_config("mistral-nemo-instruct-2407"), add_bos_token=False), None),
    "gemma_class": lambda: (
        "gpt2", {"tokenizer_class": "GemmaTokenizer", "bos_token": "<|endoftext|>",
                 "eos_token": "<|endoftext|>", "add_eos_token": True}, None),
    "gptneox_class": lambda: ("gpt2", {"tokenizer_class": "GPTNeoXTokenizer"}, None),
    # class defaults for special tokens missing from the vocabulary get added (<s>, <unk>)
    "model_type_from_config_json": lambda: (
        "gpt2", None, {"config.json": json.dumps({"model_type": "llama"})}),
    "qwen2_class_defaults": lambda: ("gpt2", {"tokenizer_class": "Qwen2Tokenizer"}, None),
    "prefix_space": lambda: ("gpt2", _gpt2(add_prefix_space=True), None),
    "added_tokens_decoder": lambda: (
        "gpt2", _gpt2(added_tokens_decoder=_ADDED_DECODER, additional_special_tokens=["<|extra|>"]),
        None),
    "split_special_tokens": lambda: ("gpt2", _gpt2(split_special_tokens=True), None),
    "special_token_object": lambda: (
        "gpt2", _gpt2(eos_token={"__type": "AddedToken", "content": "<|end|>", "lstrip": True,
                                 "rstrip": False, "normalized": False, "single_word": False,
                                 "special": True}), None),
    # a special token object naming a known added token takes that token's flags
    "special_token_object_known": lambda: (
        "gpt2", _gpt2(bos_token={"__type": "AddedToken", "content": "<|endoftext|>", "lstrip": True,
                                 "rstrip": False, "normalized": False, "single_word": False,
                                 "special": True}), None),
    "extra_special_tokens": lambda: (
        "gpt2", _gpt2(extra_special_tokens={"image_token": "<|image|>"}), None),
    "legacy_special_tokens_map": lambda: (
        "gpt2", {"tokenizer_class": "GPT2Tokenizer"},
        {"special_tokens_map.json": json.dumps({"pad_token": "<|pad|>",
                                                "additional_special_tokens": ["<|a|>"]})}),
    "bert_cased": lambda: (
        "all-minilm-l6-v2",
        dict(_config("all-minilm-l6-v2"), do_lower_case=False, strip_accents=False), None),
}

VARIANT_TEXTS = ["Hello world", " Hello <|endoftext|> x", "<|kvcm|>  y <|extra|> <|image|> <s>",
                 "ÀÉÎ Café HELLO", "<unk> <bos> <pad> <|pad|> <|a|>", "a <|end|> b", "", " "]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_config_rules_match_transformers(tmp_path, variant):
    model, config, extra = VARIANTS[variant]()
    d = _variant_dir(tmp_path, model, config, extra)
    ref = oracle(str(d))
    tok = Tokenizer(d)
    assert backend_state(tok.backend.to_str()) == backend_state(ref.backend_tokenizer.to_str())
    assert tok.special_tokens == ref.special_tokens_map
    for text in VARIANT_TEXTS:
        for special in (True, False):
            assert tok.encode(text, special) == ref(text, add_special_tokens=special)["input_ids"], \
                (text, special)


def test_config_rules_change_the_ids(tmp_path):
    """The rules above are not no-ops: each changes what the plain tokenizer.json gives."""
    plain = ours("gpt2")
    d = _variant_dir(tmp_path, "gpt2", VARIANTS["llama_class_bos_eos"]()[1])
    assert Tokenizer(d).encode("hi") == [50256] + plain.encode("hi") + [50256]
    (tmp_path / "b").mkdir()
    d2 = _variant_dir(tmp_path / "b", "gpt2", _gpt2(split_special_tokens=True))
    assert plain.encode("<|endoftext|>") == [50256]
    assert Tokenizer(d2).encode("<|endoftext|>") != [50256]


# --------------------------------------------------------------------------------------
# loading errors and the registry


def test_parse_tokenizer_spec():
    assert parse_tokenizer_spec("meta-llama/Llama-3.2-1B=/models/llama") == \
        ("meta-llama/Llama-3.2-1B", pathlib.Path("/models/llama"))
    assert parse_tokenizer_spec("m=/a=b") == ("m", pathlib.Path("/a=b"))
    assert parse_tokenizer_spec(" m = ~/x ")[1] == pathlib.Path(os.path.expanduser("~/x"))
    for bad, words in [("no-equals", "MODEL=DIR"), ("=/dir", "model name"), ("m=", "directory"),
                       ("", "MODEL=DIR")]:
        with pytest.raises(ValueError, match=words):
            parse_tokenizer_spec(bad)


def _link_model(dst: pathlib.Path, model: str, files=("tokenizer.json", "tokenizer_config.json")):
    dst.mkdir(parents=True, exist_ok=True)
    for f in files:
        if (FIXTURES / model / f).exists():
            (dst / f).symlink_to(FIXTURES / model / f)
    return dst


def test_registry_explicit_models_and_lazy_cached_load(tmp_path):
    reg = TokenizerRegistry({"meta-llama/Llama-3.2-1B-Instruct": FIXTURES / "llama-3.2-instruct",
                             "gpt2": str(FIXTURES / "gpt2" / "tokenizer.json")})
    assert reg.models() == ["gpt2", "meta-llama/Llama-3.2-1B-Instruct"]
    assert not any(d["loaded"] for d in reg.describe())
    tok = reg.get("gpt2")
    assert reg.get("gpt2") is tok
    assert tok.name == "gpt2" and tok.encode("Hello world") == ours("gpt2").encode("Hello world")
    assert reg.get("meta-llama/Llama-3.2-1B-Instruct").encode("hi")[0] == 128000
    assert "gpt2" in reg and "gpt3" not in reg


def test_unknown_model_lists_known_ones():
    reg = TokenizerRegistry({"b-model": FIXTURES / "gpt2", "a-model": FIXTURES / "gpt2"})
    with pytest.raises(UnknownModel) as info:
        reg.get("nope")
    err = info.value
    assert isinstance(err, LookupError)
    assert err.model == "nope" and err.known == ["a-model", "b-model"]
    assert str(err) == "unknown model 'nope': no tokenizer for it (known models: a-model, b-model)"
    with pytest.raises(UnknownModel, match="known models: none"):
        TokenizerRegistry().get("x")


@pytest.mark.parametrize("bad", ["missing", "no_tokenizer_json", "file_not_json"])
def test_explicit_misconfiguration_fails_at_construction(tmp_path, bad):
    target = {"missing": tmp_path / "nowhere", "no_tokenizer_json": tmp_path,
              "file_not_json": tmp_path / "x.txt"}[bad]
    if bad == "file_not_json":
        target.write_text("x")
    with pytest.raises(ValueError, match="--tokenizer m="):
        TokenizerRegistry({"m": target})
    with pytest.raises(ValueError, match="--tokenizers-dir"):
        TokenizerRegistry(tokenizers_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("broken", ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
                                    "tokenizer_model"])
def test_broken_files_raise_load_error_and_others_keep_working(tmp_path, broken):
    bad = _link_model(tmp_path / "bad", "gpt2", files=("tokenizer_config.json",))
    if broken == "tokenizer.json":
        (bad / "tokenizer.json").write_text('{"version": "1.0", "truncated...', "utf-8")
    else:
        (bad / "tokenizer.json").symlink_to(FIXTURES / "gpt2" / "tokenizer.json")
    if broken == "tokenizer_config.json":
        (bad / "tokenizer_config.json").unlink()
        (bad / "tokenizer_config.json").write_text("{not json", "utf-8")
    if broken == "chat_template.jinja":
        (bad / "chat_template.jinja").write_bytes(b"\xff\xfe not utf-8")
    if broken == "tokenizer_model":
        (bad / "tokenizer.json").unlink()
        (bad / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "Nope"}}))
    reg = TokenizerRegistry({"bad": bad, "good": FIXTURES / "gpt2"})
    with pytest.raises(TokenizerLoadError) as info:
        reg.get("bad")
    err = info.value
    expected_file = "tokenizer.json" if broken == "tokenizer_model" else broken
    assert err.model == "bad" and err.path.name == expected_file
    assert str(bad / expected_file) in str(err) and "'bad'" in str(err)
    # the failure is remembered (no re-read per request) and the other model is unaffected
    t0 = time.perf_counter()
    with pytest.raises(TokenizerLoadError) as again:
        reg.get("bad")
    assert again.value is err and time.perf_counter() - t0 < 0.05
    assert reg.get("good").encode("ok") == ours("gpt2").encode("ok")
    assert reg.load_all().keys() == {"bad"}
    assert [d["error"] is not None for d in reg.describe()] == [True, False]


def test_fixed_file_loads_without_reload(tmp_path):
    d = tmp_path / "m"
    d.mkdir()
    (d / "tokenizer.json").write_text("garbage", "utf-8")
    reg = TokenizerRegistry({"m": d})
    with pytest.raises(TokenizerLoadError):
        reg.get("m")
    (d / "tokenizer.json").unlink()
    (d / "tokenizer.json").symlink_to(FIXTURES / "gpt2" / "tokenizer.json")
    assert reg.get("m").encode("hi") == ours("gpt2").encode("hi")


def _hf_cache_repo(hub: pathlib.Path, repo: str, model: str, revs: list[str], main: str | None):
    """A Hugging Face cache folder: blobs/ + snapshots/<rev>/file -> ../../blobs/<x>."""
    org_name = "models--" + repo.replace("/", "--")
    base = hub / org_name
    (base / "blobs").mkdir(parents=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        blob = base / "blobs" / f"blob-{name}"
        blob.symlink_to(FIXTURES / model / name)
    for i, rev in enumerate(revs):
        snap = base / "snapshots" / rev
        snap.mkdir(parents=True)
        for name in ("tokenizer.json", "tokenizer_config.json"):
            (snap / name).symlink_to(os.path.join("..", "..", "blobs", f"blob-{name}"))
        os.utime(snap, (1_700_000_000 + i * 1000, 1_700_000_000 + i * 1000))
    if main is not None:
        (base / "refs").mkdir()
        (base / "refs" / "main").write_text(main)
    return base


def test_discovery_directories_and_hf_cache(tmp_path):
    root = tmp_path / "models"
    _link_model(root / "Qwen" / "Qwen2.5-7B-Instruct", "qwen2.5-instruct")
    _link_model(root / "gpt2", "gpt2")
    _link_model(root / ".hidden" / "secret", "gpt2")
    (root / "empty" / "deeper").mkdir(parents=True)
    (root / "loop").symlink_to(root)  # a symlink cycle must not hang discovery
    hub = root / "hf" / "hub"
    _hf_cache_repo(hub, "meta-llama/Llama-3.2-1B-Instruct", "llama-3.2-instruct",
                   ["aaaa", "bbbb"], main="aaaa")  # refs/main wins over the newer snapshot
    newest = _hf_cache_repo(hub, "mistralai/Mistral-Nemo-Instruct-2407", "mistral-nemo-instruct-2407",
                            ["old1", "new2"], main=None)  # no refs: newest snapshot
    _hf_cache_repo(hub, "gpt2", "gpt2", ["r1"], main="r1")  # same name as a plain dir: plain wins
    (hub / "datasets--x--y" / "snapshots" / "r").mkdir(parents=True)

    found = discover(root)
    assert sorted(found) == ["Qwen/Qwen2.5-7B-Instruct", "gpt2", "meta-llama/Llama-3.2-1B-Instruct",
                             "mistralai/Mistral-Nemo-Instruct-2407"]
    assert found["gpt2"] == (root / "gpt2", "directory")
    assert found["meta-llama/Llama-3.2-1B-Instruct"][0].name == "aaaa"
    assert found["mistralai/Mistral-Nemo-Instruct-2407"] == (newest / "snapshots" / "new2", "hf-cache")

    reg = TokenizerRegistry({"gpt2": FIXTURES / "gpt2"}, tokenizers_dir=root)
    assert reg.models() == sorted(found)
    assert reg.path("gpt2") == FIXTURES / "gpt2"  # explicit entries override discovery
    llama = reg.get("meta-llama/Llama-3.2-1B-Instruct")
    assert llama.encode(TEXTS["unicode"]) == ours("llama-3.2-instruct").encode(TEXTS["unicode"])
    assert reg.get("Qwen/Qwen2.5-7B-Instruct").chat_template == ours("qwen2.5-instruct").chat_template


def test_discovery_names_a_root_that_is_itself_a_model(tmp_path):
    root = _link_model(tmp_path / "just-one", "gpt2")
    assert discover(root) == {"just-one": (root, "directory")}


def test_reload_adds_removes_and_keeps_unchanged(tmp_path):
    root = tmp_path / "models"
    _link_model(root / "org" / "a", "gpt2")
    _link_model(root / "org" / "b", "gpt2")
    reg = TokenizerRegistry(tokenizers_dir=root)
    a, b = reg.get("org/a"), reg.get("org/b")

    _link_model(root / "org" / "c", "gpt2")
    shutil.rmtree(root / "org" / "b")
    (root / "org" / "a" / "chat_template.jinja").write_text("{{ messages[0].content }}")
    assert reg.reload() == {"added": ["org/c"], "removed": ["org/b"], "changed": ["org/a"]}
    assert reg.models() == ["org/a", "org/c"]
    with pytest.raises(UnknownModel, match="org/a, org/c"):
        reg.get("org/b")
    a2 = reg.get("org/a")
    assert a2 is not a and a2.chat_template == "{{ messages[0].content }}"
    assert b.encode("still usable") == a.encode("still usable")  # old objects stay valid

    c = reg.get("org/c")
    assert reg.reload() == {"added": [], "removed": [], "changed": []}
    assert reg.get("org/c") is c and reg.get("org/a") is a2


def test_concurrent_first_use_loads_once(tmp_path):
    reg = TokenizerRegistry({"m": FIXTURES / "qwen2.5-instruct"})
    barrier = threading.Barrier(4)

    def use(_):
        barrier.wait()
        return reg.get("m")

    with ThreadPoolExecutor(4) as pool:
        toks = list(pool.map(use, range(4)))
    assert all(t is toks[0] for t in toks)
