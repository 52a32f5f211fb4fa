"""kvcm.chat and Tokenizer.render_chat/encode_chat against transformers' apply_chat_template.

Rendered text and token ids must be identical to what transformers produces (that is what
vLLM sends to the engine), for the fixture models' templates and the extra jinja templates.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import copy
import datetime
import json
import pathlib
from functools import lru_cache

import pytest

from kvcm import chat
from kvcm.chat import TemplateError
from kvcm.tokenize import Tokenizer

ROOT = pathlib.Path(__file__).resolve().parent.parent
SHARED = pathlib.Path(os.environ.get("KVCM_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "fixtures" / "tokenizers"
HAVE_FIXTURES = (FIXTURES / "gpt2" / "tokenizer.json").is_file()
needs_fixtures = pytest.mark.skipif(not HAVE_FIXTURES,
                                    reason="../shared/fixtures/tokenizers is not beside the project")

LLAMA, QWEN, MISTRAL, GPT2 = ("llama-3.2-instruct", "qwen2.5-instruct",
                              "mistral-nemo-instruct-2407", "gpt2")
DATE = {"date_string": "26 Jul 2024"}
ALTERNATION = ("After the optional system message, conversation roles must alternate "
               "user/assistant/user/assistant/...")


@lru_cache(maxsize=None)
def ours(path: str) -> Tokenizer:
    return Tokenizer(path)


@lru_cache(maxsize=None)
def oracle(path: str):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)


def extra_template(name: str) -> str:
    return (FIXTURES / "chat_templates" / name).read_text("utf-8")


# name → (tokenizer folder, template file from chat_templates/ or None for the model's own)
TEMPLATES = {
    "llama-3.2": (LLAMA, None),
    "qwen2.5": (QWEN, None),
    "mistral-nemo": (MISTRAL, None),
    "llama-3.0-jinja": (LLAMA, "llama-3-instruct.jinja"),
    "qwen3-jinja": (QWEN, "qwen3.jinja"),
}

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city — <b>HTML</b> & “quotes” stay raw",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "description": "City name, e.g. Zürich"},
                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
            "required": ["city"],
        },
    },
}
TOOL_CALL = {"id": "call12345", "type": "function",
             "function": {"name": "get_weather", "arguments": {"city": "Zürich", "unit": "celsius"}}}

CONVERSATIONS = {
    "user_only": ([{"role": "user", "content": "Hello! Wie geht's? 日本語 😀"}], None),
    "system_user": ([{"role": "system", "content": "You are a terse assistant."},
                     {"role": "user", "content": "What is 2+2?"}], None),
    "multi_turn": ([{"role": "system", "content": "Be nice."},
                    {"role": "user", "content": "Hello"},
                    {"role": "assistant", "content": "Hi! How can I help?"},
                    {"role": "user", "content": "Tell me a joke about caches."}], None),
    "multi_turn_no_system": ([{"role": "user", "content": "one"},
                              {"role": "assistant", "content": "two"},
                              {"role": "user", "content": "three"},
                              {"role": "assistant", "content": "four"}], None),
    "markup_and_whitespace": ([{"role": "user",
                                "content": "  <b>bold</b> & {\"json\": [1, 2]} {{ not jinja }}  \n\n"}],
                              None),
    "tools_offered": ([{"role": "user", "content": "What's the weather in Zürich?"}], [WEATHER_TOOL]),
    "tool_round_trip": ([{"role": "system", "content": "Use tools when needed."},
                         {"role": "user", "content": "What's the weather in Zürich?"},
                         {"role": "assistant", "content": "", "tool_calls": [TOOL_CALL]},
                         {"role": "tool", "tool_call_id": "call12345", "name": "get_weather",
                          "content": "{\"temperature\": 21, \"sky\": \"☀️\"}"}],
                        [WEATHER_TOOL]),
    "roles_do_not_alternate": ([{"role": "user", "content": "first"},
                                {"role": "user", "content": "second"}], None),
}


GENEROUS = chat.Limits(600.0, 10**8)


def render_both(template_id, conv_id, add_generation_prompt, **kwargs):
    """(kvcm result, transformers result): text or ("error", message)."""
    model, tfile = TEMPLATES[template_id]
    messages, tools = CONVERSATIONS[conv_id]
    tok, ref = ours(str(FIXTURES / model)), oracle(str(FIXTURES / model))
    source = extra_template(tfile) if tfile else None
    kw = dict(DATE, **kwargs)
    try:
        # metered, as kvcm serve renders: the meter must not change a single character
        mine = tok.encode_chat(copy.deepcopy(messages), add_generation_prompt=add_generation_prompt,
                               chat_template=source, chat_template_kwargs=kw, tools=tools, limits=GENEROUS)
    except TemplateError as exc:
        mine = ("error", exc.message)
    try:
        text = ref.apply_chat_template(copy.deepcopy(messages), tools=tools, chat_template=source,
                                       add_generation_prompt=add_generation_prompt, tokenize=False, **kw)
        ids = ref.apply_chat_template(copy.deepcopy(messages), tools=tools, chat_template=source,
                                      add_generation_prompt=add_generation_prompt, tokenize=True, **kw)
        theirs = (text, list(ids))
    except Exception as exc:  # jinja2.TemplateError from raise_exception
        theirs = ("error", getattr(exc, "message", None) or str(exc))
    return mine, theirs


@needs_fixtures
@pytest.mark.parametrize("add_generation_prompt", [True, False], ids=["gen", "nogen"])
@pytest.mark.parametrize("conv_id", list(CONVERSATIONS))
@pytest.mark.parametrize("template_id", list(TEMPLATES))
def test_render_and_ids_match_transformers(template_id, conv_id, add_generation_prompt):
    mine, theirs = render_both(template_id, conv_id, add_generation_prompt)
    assert mine == theirs
    if mine[0] != "error":
        text, ids = mine
        assert text and ids
        tok = ours(str(FIXTURES / TEMPLATES[template_id][0]))
        assert ids == tok.encode(text, add_special_tokens=False)


@needs_fixtures
def test_parity_matrix_is_not_vacuous():
    """The matrix above must exercise real renders and real template errors."""
    results = {(t, c): render_both(t, c, True)[0] for t in TEMPLATES for c in CONVERSATIONS}
    errors = {k for k, v in results.items() if v[0] == "error"}
    assert ("mistral-nemo", "roles_do_not_alternate") in errors
    assert len(errors) < len(results) // 4
    text = results[("qwen2.5", "tools_offered")][0]
    assert '"description": "Current weather for a city — <b>HTML</b> & “quotes” stay raw"' in text
    assert "Zürich" in results[("llama-3.2", "tool_round_trip")][0]


@needs_fixtures
def test_mistral_alternation_error_is_the_templates_message():
    tok = ours(str(FIXTURES / MISTRAL))
    with pytest.raises(TemplateError) as info:
        tok.render_chat(CONVERSATIONS["roles_do_not_alternate"][0])
    assert info.value.message == ALTERNATION and str(info.value) == ALTERNATION
    assert info.value.raised_by_template
    import jinja2

    with pytest.raises(jinja2.TemplateError, match="conversation roles must alternate"):
        oracle(str(FIXTURES / MISTRAL)).apply_chat_template(
            CONVERSATIONS["roles_do_not_alternate"][0], tokenize=False)


@needs_fixtures
def test_mistral_has_no_generation_prompt_branch():
    tok = ours(str(FIXTURES / MISTRAL))
    msgs = CONVERSATIONS["system_user"][0]
    assert tok.render_chat(msgs, add_generation_prompt=True) == \
        tok.render_chat(msgs, add_generation_prompt=False)
    assert tok.render_chat(msgs).startswith("<s>[INST]You are a terse assistant.\n\nWhat is 2+2?")


@needs_fixtures
def test_llama_date_string_and_strftime_now():
    tok = ours(str(FIXTURES / LLAMA))
    msgs = CONVERSATIONS["user_only"][0]
    fixed = tok.render_chat(msgs, chat_template_kwargs=DATE)
    assert "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n" in fixed
    before = datetime.datetime.now().strftime("%d %b %Y")
    today = tok.render_chat(msgs)
    after = datetime.datetime.now().strftime("%d %b %Y")
    assert f"Today Date: {before}" in today or f"Today Date: {after}" in today
    ref = oracle(str(FIXTURES / LLAMA)).apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert today == ref or before != after


@needs_fixtures
def test_encode_chat_does_not_double_the_bos():
    tok = ours(str(FIXTURES / LLAMA))
    text, ids = tok.encode_chat(CONVERSATIONS["user_only"][0], chat_template_kwargs=DATE)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system")
    assert ids[0] == 128000 and ids[1] == 128006 and ids.count(128000) == 1
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")


@needs_fixtures
@pytest.mark.parametrize("enable_thinking", [True, False, None])
def test_qwen3_enable_thinking_kwarg(enable_thinking):
    source = extra_template("qwen3.jinja")
    tok, ref = ours(str(FIXTURES / QWEN)), oracle(str(FIXTURES / QWEN))
    msgs = CONVERSATIONS["multi_turn"][0]
    kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
    text = tok.render_chat(msgs, chat_template=source, chat_template_kwargs=kwargs)
    assert text == ref.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                           add_generation_prompt=True, **kwargs)
    assert text.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") == (enable_thinking is False)


@needs_fixtures
def test_qwen3_reasoning_in_history_matches_transformers():
    source = extra_template("qwen3.jinja")
    msgs = [{"role": "user", "content": "2+2?"},
            {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
            {"role": "user", "content": "3+3?"}]
    tok, ref = ours(str(FIXTURES / QWEN)), oracle(str(FIXTURES / QWEN))
    mine = tok.encode_chat(msgs, chat_template=source)
    assert mine[0] == ref.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                              add_generation_prompt=True)
    assert mine[1] == ref.apply_chat_template(msgs, chat_template=source, add_generation_prompt=True)
    assert "add them" not in mine[0]  # the template drops old reasoning


@needs_fixtures
@pytest.mark.parametrize("model", [LLAMA, QWEN, MISTRAL])
def test_continue_final_message_matches_transformers(model):
    msgs = [{"role": "user", "content": "Write a haiku."},
            {"role": "assistant", "content": "Blocks of cached keys"}]
    tok, ref = ours(str(FIXTURES / model)), oracle(str(FIXTURES / model))
    text = tok.render_chat(msgs, add_generation_prompt=False, continue_final_message=True,
                           chat_template_kwargs=DATE)
    assert text == ref.apply_chat_template(msgs, continue_final_message=True, tokenize=False, **DATE)
    assert text.endswith("Blocks of cached keys")
    with pytest.raises(TemplateError, match="not compatible"):
        tok.render_chat(msgs, add_generation_prompt=True, continue_final_message=True)


@needs_fixtures
def test_request_supplied_template_on_a_model_without_one():
    tok, ref = ours(str(FIXTURES / GPT2)), oracle(str(FIXTURES / GPT2))
    assert tok.chat_template is None and tok.chat_templates == {}
    with pytest.raises(TemplateError, match="has no chat template"):
        tok.render_chat(CONVERSATIONS["user_only"][0])
    with pytest.raises(ValueError):
        ref.apply_chat_template(CONVERSATIONS["user_only"][0], tokenize=False)
    source = ("{{ bos_token }}{% for m in messages %}[{{ m.role | upper }}] {{ m.content }}\n"
              "{% endfor %}{% if add_generation_prompt %}[ASSISTANT]{% endif %}")
    msgs = CONVERSATIONS["multi_turn"][0]
    text, ids = tok.encode_chat(msgs, chat_template=source)
    assert text == ref.apply_chat_template(msgs, chat_template=source, tokenize=False,
                                           add_generation_prompt=True)
    assert ids == ref.apply_chat_template(msgs, chat_template=source, add_generation_prompt=True)
    assert text.startswith("<|endoftext|>[SYSTEM] Be nice.\n")
    # a request template also overrides a model's own template
    llama = ours(str(FIXTURES / LLAMA))
    assert llama.render_chat(msgs, chat_template=source).startswith("<|begin_of_text|>[SYSTEM]")


def _model_dir(tmp_path, model, config_changes=None, files=None):
    d = tmp_path / "model"
    d.mkdir()
    (d / "tokenizer.json").symlink_to(FIXTURES / model / "tokenizer.json")
    cfg = json.loads((FIXTURES / model / "tokenizer_config.json").read_text("utf-8"))
    for k, v in (config_changes or {}).items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "tokenizer_config.json").write_text(json.dumps(cfg), "utf-8")
    for name, text in (files or {}).items():
        (d / name).parent.mkdir(parents=True, exist_ok=True)
        (d / name).write_text(text, "utf-8")
    return d


NAMED = [{"name": "default", "template": "D:{% for m in messages %}{{ m.content }}{% endfor %}"},
         {"name": "tool_use", "template": "T:{{ tools | length }}:{{ messages[0].content }}"},
         {"name": "rag", "template": "R:{{ documents | map(attribute='title') | join(',') }}"}]


@needs_fixtures
def test_named_templates_from_the_config_list(tmp_path):
    d = _model_dir(tmp_path, QWEN, {"chat_template": NAMED})
    tok, ref = Tokenizer(d), oracle(str(d))
    msgs = [{"role": "user", "content": "hi"}]
    docs = [{"title": "a", "text": "x"}, {"title": "b", "text": "y"}]
    cases = [dict(), dict(tools=[WEATHER_TOOL]), dict(chat_template="rag", documents=docs),
             dict(chat_template="tool_use", tools=[WEATHER_TOOL, WEATHER_TOOL])]
    outputs = []
    for kw in cases:
        text = tok.render_chat(msgs, **kw)
        assert text == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kw)
        outputs.append(text)
    assert outputs == ["D:hi", "T:1:hi", "R:a,b", "T:2:hi"]
    assert tok.chat_template == NAMED[0]["template"]
    assert set(tok.chat_templates) == {"default", "tool_use", "rag"}
    # a template's name is the model's own template; anything else is a request's own
    assert not tok.is_template_source(None) and not tok.is_template_source("rag")
    assert tok.is_template_source("R:{{ 1 }}")


@needs_fixtures
def test_named_templates_without_default_need_a_name(tmp_path):
    d = _model_dir(tmp_path, QWEN, {"chat_template": NAMED[1:]})
    tok = Tokenizer(d)
    with pytest.raises(TemplateError, match=r"\['rag', 'tool_use'\]"):
        tok.render_chat([{"role": "user", "content": "hi"}])
    assert tok.render_chat([{"role": "user", "content": "hi"}], tools=[WEATHER_TOOL]) == "T:1:hi"
    with pytest.raises(ValueError, match="no default"):
        oracle(str(d)).apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False)


@needs_fixtures
def test_jinja_files_take_priority_over_the_config(tmp_path):
    qwen3 = extra_template("qwen3.jinja")
    d = _model_dir(tmp_path, QWEN, files={"chat_template.jinja": qwen3,
                                           "additional_chat_templates/short.jinja": "S{{ messages|length }}"})
    tok, ref = Tokenizer(d), oracle(str(d))
    msgs = CONVERSATIONS["multi_turn"][0]
    assert tok.chat_template == qwen3
    assert tok.render_chat(msgs, chat_template_kwargs={"enable_thinking": False}) == \
        ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, enable_thinking=False)
    assert tok.render_chat(msgs, chat_template="short") == "S4" == \
        ref.apply_chat_template(msgs, chat_template="short", tokenize=False)


@needs_fixtures
def test_single_jinja_file_replaces_config_template(tmp_path):
    source = extra_template("llama-3-instruct.jinja")
    d = _model_dir(tmp_path, LLAMA, files={"chat_template.jinja": source})
    tok, ref = Tokenizer(d), oracle(str(d))
    msgs = CONVERSATIONS["multi_turn"][0]
    mine = tok.encode_chat(msgs)
    assert mine[0] == ref.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert mine[1] == ref.apply_chat_template(msgs, add_generation_prompt=True)
    assert "Cutting Knowledge" not in mine[0]  # the 3.0 template, not the 3.2 one


@needs_fixtures
def test_chat_template_json_is_the_last_resort(tmp_path):
    d = _model_dir(tmp_path, QWEN, {"chat_template": None},
                   files={"chat_template.json": json.dumps({"chat_template": "J{{ messages[0].content }}"})})
    assert Tokenizer(d).render_chat([{"role": "user", "content": "x"}]) == "Jx"
    d2 = tmp_path / "both"
    d2.mkdir()
    for f in ("tokenizer.json", "tokenizer_config.json"):
        (d2 / f).symlink_to(FIXTURES / QWEN / f)
    (d2 / "chat_template.json").write_text(json.dumps({"chat_template": "J"}))
    assert Tokenizer(d2).chat_template == ours(str(FIXTURES / QWEN)).chat_template


@needs_fixtures
def test_special_token_variables(tmp_path):
    source = ("{{ bos_token }}|{{ eos_token }}|{{ pad_token is defined }}|{{ unk_token is defined }}"
              "|{{ additional_special_tokens | length if additional_special_tokens is defined else '-' }}")
    cases = {
        LLAMA: "<|begin_of_text|>|<|eot_id|>|False|False|-",
        QWEN: "|<|im_end|>|True|False|13",  # Qwen has no BOS: the variable is undefined
        MISTRAL: "<s>|</s>|False|True|-",
    }
    for model, expected in cases.items():
        tok, ref = ours(str(FIXTURES / model)), oracle(str(FIXTURES / model))
        one = [{"role": "user", "content": "x"}]
        assert tok.render_chat(one, chat_template=source) == expected
        assert ref.apply_chat_template(one, chat_template=source, tokenize=False) == expected
    # {"content": ...} objects in tokenizer_config.json become their strings
    d = _model_dir(tmp_path, GPT2, {"bos_token": {"__type": "AddedToken", "content": "<|endoftext|>",
                                                  "lstrip": False, "normalized": True, "rstrip": False,
                                                  "single_word": False}})
    assert Tokenizer(d).render_chat([], chat_template="{{ bos_token }}") == "<|endoftext|>"
    # chat_template_kwargs may override a special token, as in transformers
    assert ours(str(FIXTURES / LLAMA)).render_chat(
        [], chat_template="{{ bos_token }}", chat_template_kwargs={"bos_token": "X"}) == "X"


# --------------------------------------------------------------------------------------
# the environment itself (no fixtures needed)


def test_tojson_is_not_html_escaped_and_takes_transformers_options():
    value = {"b": "<b>&'\"", "a": "日本 😀", "n": [1, 2.5, None, True]}
    assert chat.render("{{ x | tojson }}", [], chat_template_kwargs={"x": value}) == \
        json.dumps(value, ensure_ascii=False)
    assert chat.render("{{ x | tojson(indent=2) }}", [], chat_template_kwargs={"x": value}) == \
        json.dumps(value, ensure_ascii=False, indent=2)
    assert chat.render("{{ x | tojson(separators=(',', ':'), sort_keys=true) }}", [],
                       chat_template_kwargs={"x": value}) == \
        json.dumps(value, ensure_ascii=False, separators=(",", ":"), sort_keys=True)
    escaped = chat.render("{{ x | tojson(ensure_ascii=true) }}", [], chat_template_kwargs={"x": "é"})
    assert escaped == '"\\u00e9"'
    assert chat.render("{{ '<&>' }}", []) == "<&>"  # no autoescape


def test_trim_blocks_lstrip_blocks_and_loop_controls():
    source = ("{% for m in messages %}\n    {% if m == 'skip' %}{% continue %}{% endif %}\n"
              "    {% if m == 'stop' %}{% break %}{% endif %}\n{{ m }},\n{% endfor %}")
    assert chat.render(source, ["a", "skip", "b", "stop", "c"]) == "a,\nb,\n"


def test_generation_tag_renders_its_body():
    source = "{% for m in messages %}{% generation %}<{{ m }}>{% endgeneration %}{% endfor %}"
    assert chat.render(source, ["x", "y"]) == "<x><y>"


def test_strftime_now_and_raise_exception():
    before = datetime.datetime.now().strftime("%Y-%m-%d")
    out = chat.render("{{ strftime_now('%Y-%m-%d') }}", [])
    assert out in (before, datetime.datetime.now().strftime("%Y-%m-%d"))
    with pytest.raises(TemplateError) as info:
        chat.render("{{ raise_exception('Only user and assistant roles are supported!') }}", [])
    assert info.value.message == "Only user and assistant roles are supported!"
    assert info.value.raised_by_template


@pytest.mark.parametrize("source, words", [
    ("{% for m in messages %}{{ m }", "syntax error at line 1"),
    ("line one\n{% if %}", "syntax error at line 2"),
    ("{% endfor %}", "syntax error"),
    ("{{ x | no_such_filter }}", "no_such_filter"),
])
def test_syntax_errors_are_template_errors(source, words):
    with pytest.raises(TemplateError, match=words) as info:
        chat.render(source, [])
    assert not info.value.raised_by_template


@pytest.mark.parametrize("source, words", [
    ("{{ ''.__class__.__mro__ }}", "sandbox"),
    ("{% set _ = messages.append(1) %}", "sandbox"),
    ("{{ messages[0].content + 1 }}", "TypeError"),
    ("{{ messages[5]['content'] | trim }}", "no element 5"),
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursion"),
])
def test_runtime_errors_are_template_errors(source, words):
    with pytest.raises(TemplateError, match=words):
        chat.render(source, [{"role": "user", "content": "x"}])


def test_kwargs_override_flags_and_reserved_names_are_refused():
    source = "{{ add_generation_prompt }}|{{ tools | tojson }}|{{ documents | tojson }}|{{ extra }}"
    assert chat.render(source, [], add_generation_prompt=True) == "True|null|null|"
    assert chat.render(source, [], add_generation_prompt=True,
                       chat_template_kwargs={"add_generation_prompt": False, "extra": 7,
                                             "tools": [{"a": 1}]}) == 'False|[{"a": 1}]|null|7'
    for key in ("messages", "chat_template", "tokenize"):
        with pytest.raises(TemplateError, match=key):
            chat.render(source, [], chat_template_kwargs={key: 1})
    with pytest.raises(TemplateError, match="tools must be a list"):
        chat.render(source, [], tools="nope")
    with pytest.raises(TemplateError, match="messages must be a list"):
        chat.render(source, "nope")


def test_compiled_templates_are_cached_and_bounded():
    source = "cached {{ messages | length }}"
    assert chat.compile_template(source) is chat.compile_template(source)
    for i in range(chat._CACHE_SIZE + 10):
        chat.compile_template(f"t{i}")
    assert len(chat._compiled) <= chat._CACHE_SIZE
    # bounded by the length of the sources too: a request template may be megabytes long
    big = "{# %s #}" % ("x" * (chat._CACHE_CHARS // 3))
    for i in range(4):
        chat.compile_template(big + str(i))
    assert chat._compiled.chars <= chat._CACHE_CHARS and len(chat._compiled) >= 2
    chat.compile_template(big * 4)            # larger than the whole cache: not kept
    assert chat._compiled.get(big * 4) is None and chat._compiled.get(big + "3") is not None
    with pytest.raises(TemplateError, match="must be a string"):
        chat.compile_template(None)


# --------------------------------------------------------------------------------------
# vLLM's reshaping of request messages and tools


def test_vllm_messages_string_format():
    msgs = [
        {"role": "system", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}],
         "extra_key": "dropped"},
        {"role": "user", "content": ["plain part", {"type": "input_text", "text": "typed"},
                                     {"type": "text", "text": None}], "name": "bob"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call12345", "type": "function",
             "function": {"name": "f", "arguments": "{\"x\": [1, \"é\"]}"}},
            {"id": "call67890", "type": "function", "function": {"name": "g", "arguments": "not json"}},
            {"id": "callabcde", "type": "function", "function": {"name": "h"}}],
         "reasoning": "hmm"},
        {"role": "assistant", "content": "done", "tool_calls": []},
        {"role": "tool", "tool_call_id": "call12345", "content": [{"type": "text", "text": "r1"},
                                                                 {"type": "text", "text": "r2"}]},
    ]
    original = copy.deepcopy(msgs)
    out = chat.vllm_messages(msgs, "string")
    assert msgs == original  # the input is not modified
    assert out == [
        {"role": "system", "content": "a\nb"},
        {"role": "user", "content": "plain part\ntyped", "name": "bob"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"id": "call12345", "type": "function", "function": {"name": "f", "arguments": {"x": [1, "é"]}}},
            {"id": "call67890", "type": "function", "function": {"name": "g", "arguments": {}}},
            {"id": "callabcde", "type": "function", "function": {"name": "h", "arguments": {}}}],
         "reasoning": "hmm", "reasoning_content": "hmm"},
        {"role": "assistant", "content": "done"},
        {"role": "tool", "content": "r1\nr2", "tool_call_id": "call12345"},
    ]


def test_vllm_messages_openai_format_and_rejections():
    out = chat.vllm_messages([{"role": "user", "content": "hi"},
                              {"role": "tool", "content": [{"type": "text", "text": "r"}]}], "openai")
    assert out == [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                   {"role": "tool", "content": "r"}]
    with pytest.raises(TemplateError, match="image_url"):
        chat.vllm_messages([{"role": "user", "content": [{"type": "image_url",
                                                          "image_url": {"url": "x"}}]}])
    for bad in ([{"content": "no role"}], ["not an object"], [{"role": "user", "content": 5}],
                [{"role": "assistant", "content": "", "tool_calls": [{"no": "function"}]}]):
        with pytest.raises(TemplateError):
            chat.vllm_messages(bad)


def test_vllm_tools_shape():
    assert chat.vllm_tools(None) is None and chat.vllm_tools([]) is None
    out = chat.vllm_tools([{"function": {"parameters": {"type": "object"}, "name": "f", "strict": True},
                            "type": "function", "x-extra": 1}])
    assert out == [{"type": "function", "function": {"name": "f", "description": None,
                                                     "parameters": {"type": "object"}, "strict": True},
                    "x-extra": 1}]
    assert list(out[0]) == ["type", "function", "x-extra"]
    assert list(out[0]["function"]) == ["name", "description", "parameters", "strict"]
    with pytest.raises(TemplateError, match="'name'"):
        chat.vllm_tools([{"type": "function", "function": {}}])


@needs_fixtures
@pytest.mark.parametrize("model", [LLAMA, QWEN, MISTRAL])
def test_content_parts_render_like_strings(model):
    tok = ours(str(FIXTURES / model))
    as_strings = CONVERSATIONS["multi_turn"][0]
    as_parts = [dict(m, content=[{"type": "text", "text": m["content"]}]) for m in as_strings]
    assert tok.render_chat(as_parts, chat_template_kwargs=DATE) == \
        tok.render_chat(as_strings, chat_template_kwargs=DATE)


@needs_fixtures
def test_tool_call_arguments_as_json_string_render_like_objects():
    tok = ours(str(FIXTURES / QWEN))
    msgs, tools = CONVERSATIONS["tool_round_trip"]
    as_string = copy.deepcopy(msgs)
    as_string[2]["tool_calls"][0]["function"]["arguments"] = json.dumps(TOOL_CALL["function"]["arguments"])
    assert tok.render_chat(as_string, tools=tools) == tok.render_chat(msgs, tools=tools)
    # without vLLM's reshaping the string would be rendered as a JSON string literal
    assert tok.render_chat(as_string, tools=tools, vllm_compat=False) != tok.render_chat(msgs, tools=tools)


@needs_fixtures
def test_incomplete_tool_definitions_render_with_nulls_as_vllm_does():
    tok = ours(str(FIXTURES / QWEN))
    text = tok.render_chat([{"role": "user", "content": "x"}],
                           tools=[{"type": "function", "function": {"name": "ping"}}])
    assert ('{"type": "function", "function": {"name": "ping", "description": null, '
            '"parameters": null}}') in text
    assert "# Tools" not in tok.render_chat([{"role": "user", "content": "x"}], tools=[])


def test_content_format_detection():
    loops_over_parts = ("{% for message in messages %}{% for part in message['content'] %}"
                        "{{ part.text }}{% endfor %}{% endfor %}")
    aliased = ("{% set loop_messages = messages[1:] %}{% for m in loop_messages | reverse %}"
               "{% for c in m.content %}{{ c.text }}{% endfor %}{% endfor %}")
    assert chat.content_format(loops_over_parts) == "openai"
    assert chat.content_format(aliased) == "openai"
    assert chat.content_format("{% for m in messages %}{{ m.content }}{% endfor %}") == "string"
    assert chat.content_format("{% for x in other.content %}{% endfor %}") == "string"
    assert {"messages", "enable_thinking"} <= chat.template_variables(
        "{% if enable_thinking %}{% endif %}{{ messages }}")
    with pytest.raises(TemplateError, match="syntax error"):
        chat.content_format("{% for %}")


@needs_fixtures
def test_fixture_templates_take_string_content_and_openai_templates_get_parts():
    for model in (LLAMA, QWEN, MISTRAL):
        assert chat.content_format(ours(str(FIXTURES / model)).chat_template) == "string"
    assert chat.content_format(extra_template("qwen3.jinja")) == "string"
    source = ("{% for message in messages %}{% for part in message.content %}"
              "[{{ part.type }}:{{ part.text }}]{% endfor %}{% endfor %}")
    tok = ours(str(FIXTURES / QWEN))
    assert tok.render_chat([{"role": "user", "content": "a"},
                            {"role": "user", "content": [{"type": "text", "text": "b"}, "c"]}],
                           chat_template=source) == "[text:a][text:b][text:c]"


# --------------------------------------------------------------------------------------
# Metered rendering (kvcm/template_sandbox.py): limits stop a render from inside


def limited(timeout=5.0, max_output=10_000):
    return chat.Limits(timeout, max_output)


@pytest.mark.parametrize("source, expected", [
    ("{% for m in messages %}{{ loop.index }}/{{ loop.length }}{% if loop.last %}!{% endif %},{% endfor %}",
     "1/3,2/3,3/3!,"),
    ("{% for m in messages | reverse %}{{ loop.revindex }}{{ m }}{% else %}none{% endfor %}", "3c2b1a"),
    ("{% for m in [] %}x{% else %}none{% endfor %}", "none"),
    ("{% for m in messages if m != 'b' %}{{ loop.previtem or '-' }}{{ m }}{% endfor %}", "-aac"),
    ("{% for item in [{'n': 'a', 'c': [{'n': 'b', 'c': []}]}, {'n': 'd', 'c': []}] recursive %}{{ item.n }}"
     "{% if item.c %}({{ loop(item.c) }}){% endif %}{% endfor %}", "a(b)d"),
    ("{% set ns = namespace(n=0) %}{% for m in messages %}{% set ns.n = ns.n + 1 %}{% endfor %}{{ ns.n }}", "3"),
    ("{{ messages | join('+') }}{{ 'ab' * 2 }}{{ [1] + [2] }}{{ 2 ** 10 }}", "a+b+cabab[1, 2]1024"),
])
def test_metering_leaves_loops_and_operators_as_they_are(source, expected):
    messages = ["a", "b", "c"]
    unmetered = chat.render(source, messages)
    assert chat.render(source, messages, limits=limited()) == unmetered
    if expected:
        assert unmetered == expected


@pytest.mark.parametrize("source", [
    # loops whose bodies call nothing and print nothing: only the loop itself can be metered
    "{% for a in range(100000) %}{% for b in range(100000) %}{% for c in range(100000) %}{% endfor %}"
    "{% endfor %}{% endfor %}",
    "{% for a in range(100000) %}{% for b in messages * 5000 %}{% endfor %}{% endfor %}",
    "{% macro f() %}{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}{% endmacro %}"
    "{{ f() }}",
])
def test_a_runaway_loop_stops_at_the_deadline(source):
    with pytest.raises(chat.TemplateLimitExceeded, match="longer than 0.2 s") as info:
        chat.render(source, ["m"], limits=limited(timeout=0.2))
    assert info.value.limit == "time"


@pytest.mark.parametrize("source, size", [
    ("{{ 'hello ' * 100000000 }}", 600_000_000),
    ("{{ 100000000 * 'hello ' }}", 600_000_000),
    ("{{ (messages * 100000) | length }}", 200_000),
    ("{% set s = 'x' * 6000 %}{{ s + s }}", 12_000),
    ("{% for i in range(100) %}{{ 'y' * 500 }}{% endfor %}", 10_500),
])
def test_output_and_oversized_operators_are_refused_at_the_cap(source, size):
    with pytest.raises(chat.TemplateLimitExceeded, match="over the limit of 10000") as info:
        chat.render(source, ["a", "b"], limits=limited())
    assert info.value.limit == "output" and "would be %d characters" % size in info.value.message


def test_a_huge_power_is_refused_before_it_is_computed():
    with pytest.raises(chat.TemplateLimitExceeded, match="integer of more than"):
        chat.render("{{ 9 ** (9 ** 9) }}", [], limits=limited())
    assert chat.render("{{ 2 ** 64 }}", [], limits=limited()) == str(2 ** 64)


@pytest.mark.parametrize("source, words", [
    ("{{ messages | no_such_filter }}", "No filter named 'no_such_filter'"),
    ("{% if messages is no_such_test %}{% endif %}", "No test named 'no_such_test'"),
    ("{% if x %}" * 3000 + "{% endif %}" * 3000, "nest too deeply"),
])
def test_unknown_filters_tests_and_deep_nesting_are_template_errors(source, words):
    # render_chat reads the template's content format first: that analysis must not let a
    # jinja error through either
    for call in (lambda: chat.render(source, []), lambda: chat.render_chat(source, [{"role": "user", "content": "x"}])):
        with pytest.raises(TemplateError, match=words):
            call()
