"""The `kvcm` command line, run as a real subprocess (python -m kvcm and the console script)."""

import json
import os
import platform
import pathlib
import subprocess
import sys

import pytest

import kvcm
from kvcm import _core
from kvcm._core import BlockHasher

CONSOLE_SCRIPT = pathlib.Path(sys.executable).parent / "kvcm"


def run(*args, stdin=None, cmd=None):
    cmd = cmd or [sys.executable, "-m", "kvcm"]
    return subprocess.run(cmd + list(args), input=stdin, capture_output=True,
                          stdin=None if stdin is not None else subprocess.DEVNULL)


def run_ok(*args, stdin=None):
    proc = run(*args, stdin=stdin)
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")
    assert proc.stderr == b""
    return json.loads(proc.stdout)


def expected(tokens, algo="sha256", seed=None, block_size=16, extra=None, namespace=None):
    hasher = BlockHasher(algo, seed, block_size, namespace=namespace)
    return {"keys": list(hasher.keys(tokens, extra)),
            "digests": [d.hex() for d in hasher.digests(tokens, extra)]}


TOKENS = list(range(100, 170))


@pytest.mark.parametrize("algo", ["sha256", "sha256_cbor", "sha256_cbor_64bit", "kvcm"])
@pytest.mark.parametrize("seed", [None, "0"])
def test_hash_with_tokens_flag_matches_block_hasher(algo, seed):
    args = ["hash", "--hash-algo", algo, "--block-size", "8", "--tokens", ",".join(map(str, TOKENS))]
    if seed is not None:
        args += ["--hash-seed", seed]
    out = run_ok(*args)
    assert out == expected(TOKENS, algo, seed, 8)
    assert len(out["keys"]) == len(TOKENS) // 8


TOKEN_TEXTS = {"commas": ",".join(map(str, TOKENS)), "spaces": " ".join(map(str, TOKENS)),
               "json": json.dumps(TOKENS), "lines": "\n".join(map(str, TOKENS)) + "\n"}
SOURCES = [(src, fmt) for src in ("tokens", "tokens-file") for fmt in TOKEN_TEXTS] + [("stdin", "json")]


@pytest.mark.parametrize("source, fmt", SOURCES, ids=["%s-%s" % s for s in SOURCES])
def test_hash_token_sources_and_formats_agree(tmp_path, source, fmt):
    text = TOKEN_TEXTS[fmt]
    if source == "tokens":
        out = run_ok("hash", "--tokens", text)
    elif source == "tokens-file":
        path = tmp_path / "tokens.txt"
        path.write_text(text)
        out = run_ok("hash", "--tokens-file", str(path))
    else:
        out = run_ok("hash", stdin=text.encode())
    assert out == expected(TOKENS)


def test_hash_of_readme_example_has_four_keys():
    out = run_ok("hash", "--hash-algo", "sha256", "--block-size", "16", "--tokens", ",".join(map(str, range(64))))
    assert out == expected(list(range(64)))
    assert len(out["keys"]) == 4 and all(len(d) == 64 for d in out["digests"])


def test_hash_partial_block_gives_no_keys():
    assert run_ok("hash", "--tokens", ",".join(map(str, range(15)))) == {"keys": [], "digests": []}


def test_hash_seed_empty_string_differs_from_unset():
    unset = run_ok("hash", "--tokens", json.dumps(TOKENS))
    empty = run_ok("hash", "--hash-seed", "", "--tokens", json.dumps(TOKENS))
    assert unset == expected(TOKENS, seed=None)
    assert empty == expected(TOKENS, seed="")
    assert unset["keys"] != empty["keys"]


def test_hash_model_names_the_kvcm_namespace():
    out = run_ok("hash", "--hash-algo", "kvcm", "--model", "Qwen/Qwen3-0.6B", "--tokens", json.dumps(TOKENS))
    assert out == expected(TOKENS, "kvcm", namespace="Qwen/Qwen3-0.6B")
    assert out != expected(TOKENS, "kvcm")


@pytest.fixture(scope="module")
def salt_cases(shared):
    cases = json.loads((shared / "vectors" / "vllm_hashes.json").read_text())
    return [c for c in cases if c.get("cache_salt")]


def test_extra_keys_reproduce_the_cache_salt_vectors(salt_cases):
    assert len(salt_cases) == 2
    for case in salt_cases:
        args = ["hash", "--hash-algo", case["algo"], "--block-size", str(case["block_size"]),
                "--tokens", json.dumps(case["token_ids"]), "--extra-keys", json.dumps(case["extra_keys_per_block"])]
        if case["seed"] is not None:
            args += ["--hash-seed", case["seed"]]
        out = run_ok(*args)
        assert out["keys"] == case["event_ints"], case["id"]
        assert out["digests"] == case["digests_hex"], case["id"]


@pytest.mark.parametrize("cmd", ["module", "console-script"])
def test_version_prints_package_version(cmd):
    if cmd == "console-script":
        assert CONSOLE_SCRIPT.is_file() and os.access(CONSOLE_SCRIPT, os.X_OK)
    proc = run("version", cmd=[str(CONSOLE_SCRIPT)] if cmd == "console-script" else None)
    assert proc.returncode == 0 and proc.stderr == b""
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "kvcm %s" % kvcm.__version__
    assert [line.split(":")[0] for line in lines[1:]] == ["build date", "git revision", "build", "cpu"]
    assert lines[1] == "build date: unknown" and lines[3].startswith("build: source, Python ")
    assert lines[4] == "cpu: %s, sha256 kernel %s" % (platform.machine(), _core.sha256_backend())


def test_version_names_the_sha256_kernel_the_environment_forces(monkeypatch):
    monkeypatch.setenv("KVCM_SHA256", "portable")
    proc = run("version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.decode().splitlines()[-1].endswith(", sha256 kernel portable")


def test_console_script_hashes_like_the_module():
    proc = run("hash", "--block-size", "4", "--hash-algo", "sha256_cbor", "--hash-seed", "0",
               stdin=b"[1,2,3,4,5,6,7,8]", cmd=[str(CONSOLE_SCRIPT)])
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == expected(list(range(1, 9)), "sha256_cbor", "0", 4)


BAD_ARGS = {
    "unknown-algo": ["hash", "--hash-algo", "xxhash", "--tokens", "1,2"],
    "block-size-0": ["hash", "--block-size", "0", "--tokens", "1,2"],
    "block-size-negative": ["hash", "--block-size", "-4", "--tokens", "1,2"],
    "block-size-not-int": ["hash", "--block-size", "x", "--tokens", "1,2"],
    "block-size-huge": ["hash", "--block-size", "9" * 25, "--tokens", "1,2"],
    "tokens-not-ints": ["hash", "--tokens", "a,b"],
    "tokens-float": ["hash", "--tokens", "1.5,2"],
    "tokens-json-nested": ["hash", "--tokens", "[[1],[2]]"],
    "tokens-json-bool": ["hash", "--tokens", "[true, 1]"],
    "tokens-json-broken": ["hash", "--tokens", "[1, 2"],
    "token-negative": ["hash", "--block-size", "1", "--tokens", "1,-2"],
    "token-too-big": ["hash", "--block-size", "1", "--tokens", str(2 ** 64)],
    "extra-keys-malformed-json": ["hash", "--tokens", "1,2", "--extra-keys", "[[\"cache_salt\""],
    "extra-keys-not-a-list": ["hash", "--tokens", "1,2", "--extra-keys", "{\"a\": 1}"],
    "extra-keys-entry-not-list": ["hash", "--tokens", "1,2", "--extra-keys", "[\"salt\"]"],
    "extra-keys-float": ["hash", "--block-size", "1", "--tokens", "1", "--extra-keys", "[[1.5]]"],
    "tokens-and-file": ["hash", "--tokens", "1", "--tokens-file", "x"],
    "tokens-file-missing": ["hash", "--tokens-file", "/nonexistent/kvcm-tokens"],
    "unknown-sub-command": ["bogus"],
    "no-sub-command": [],
    "unknown-option": ["hash", "--frobnicate", "--tokens", "1"],
    "seed-not-utf8-cbor": ["hash", "--hash-algo", "sha256_cbor", "--hash-seed", b"a\xff", "--tokens", "1"],
}


@pytest.mark.parametrize("args", BAD_ARGS.values(), ids=BAD_ARGS.keys())
def test_bad_arguments_exit_2_with_one_stderr_line(args):
    proc = run(*args)
    assert proc.returncode == 2, proc.stderr.decode(errors="replace")
    assert proc.stdout == b""
    lines = proc.stderr.decode(errors="replace").splitlines()
    assert len(lines) == 1 and lines[0].startswith("kvcm"), lines


@pytest.mark.parametrize("args", [["--tokens", ""], ["--tokens", "[]"], ["--tokens", " , "]],
                         ids=["empty", "empty-json", "only-separators"])
def test_hash_without_tokens_is_a_usage_error(args):
    proc = run("hash", *args)
    assert (proc.returncode, proc.stdout) == (2, b"")
    assert proc.stderr == b"kvcm hash: error: no token ids given\n"
    assert run("hash", stdin=b"").stderr == b"kvcm hash: error: no token ids given\n"


@pytest.mark.parametrize("command", ["serve", "hash", "sim", "version"])
def test_an_unknown_option_names_its_sub_command(command):
    proc = run(command, "--no-such-option")
    assert proc.returncode == 2
    assert proc.stderr.decode().splitlines() == [
        "kvcm %s: error: unrecognized arguments: --no-such-option" % command]


def test_serve_options_take_no_abbreviations():
    # were --http-p taken for --http-port, kvcm would serve (on free loopback ports) until the timeout
    proc = subprocess.run([sys.executable, "-m", "kvcm", "serve", "--http-host", "127.0.0.1", "--zmq-bind",
                           "tcp://127.0.0.1:*", "--http-p", "0"], capture_output=True, timeout=30)
    assert proc.returncode == 2 and b"kvcm serve: error: unrecognized arguments: --http-p 0" in proc.stderr


@pytest.mark.parametrize("content", [b"[1, 2, 3]x", b"\xff\xfe[1,2]", b"{}"], ids=["junk", "not-utf8", "object"])
@pytest.mark.parametrize("via", ["tokens-file", "stdin"])
def test_bad_token_input_exits_2_with_one_stderr_line(tmp_path, content, via):
    if via == "stdin":
        proc = run("hash", stdin=content)
    else:
        path = tmp_path / "tokens"
        path.write_bytes(content)
        proc = run("hash", "--tokens-file", str(path))
    assert proc.returncode == 2, proc.stderr.decode(errors="replace")
    assert proc.stdout == b""
    assert len(proc.stderr.decode(errors="replace").splitlines()) == 1
