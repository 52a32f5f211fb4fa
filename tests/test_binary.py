"""Smoke tests of the frozen binary (packaging/, DESIGN.md §8): dist/kvcm (onefile) and
dist/kvcm-onedir/kvcm, run in a bare environment (system PATH only, fresh HOME and TMPDIR).

`serve` on free ports with a fixture tokenizer; vLLM's wire captures published through a
real pyzmq PUB socket as the raw frames they are; /v1/score must name the pods the events
say hold each prompt; READY=1, WATCHDOG=1 and STOPPING=1 arrive on a fake NOTIFY_SOCKET
from the interpreter process (the onefile bootloader's child); SIGHUP reloads; SIGTERM
exits 0 and leaves no _MEI* directory in TMPDIR. `kvcm hash` through the binary equals the
in-tree core.

The tests skip when the binary is not built (`make binary`; `make binary ONEDIR=1` for the
onedir one), except under CI=true, where .ci/run builds both and a missing one fails.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import tempfile

import pytest

from captures import load_captures
from conftest import ROOT
from frozen import (IN_CI, ONEDIR, ONEFILE, QWEN, TOKENIZER, WAIT, Server, bare_env, built,
                    check_template_workers, expected_scores, leftovers, parent_of, publish, run, until)
from kvcm import __version__
from kvcm._build_info import source_revision
from kvcm._core import BlockHasher


@pytest.fixture(params=["onefile", "onedir"])
def binary(request):
    return built(ONEFILE if request.param == "onefile" else ONEDIR)


@pytest.fixture
def onefile():
    return built(ONEFILE)


@pytest.fixture
def bare(tmp_path):
    return bare_env(tmp_path)


# -- version and hash ----------------------------------------------------------------------------

def test_version_reports_version_build_date_and_revision(binary, bare):
    proc = run(binary, "version", env=bare)
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    lines = proc.stdout.decode().splitlines()
    assert lines[0] == "kvcm %s" % __version__
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", fields["build date"]), lines
    assert re.fullmatch(r"[0-9a-f]{7,40}(-dirty)?|unknown", fields["git revision"]), lines
    kind = "onefile" if binary == ONEFILE else "onedir"
    assert re.fullmatch(r"%s, Python 3\.\d+\.\d+, needs glibc >= \d+\.\d+" % kind, fields["build"]), lines
    if IN_CI and source_revision(str(ROOT)):
        assert fields["git revision"] == source_revision(str(ROOT)), "CI built the binary from this tree"
    assert leftovers(bare) == []


HASH_CASES = [
    ("sha256", None, 16, list(range(64)), None),
    ("sha256", "0", 16, list(range(1000, 1040)), None),
    ("sha256", "", 4, [1, 2, 3, 4, 5, 6, 7, 8], None),
    ("sha256_cbor", "42", 16, [(i * 104729) % 151000 for i in range(100)], None),
    ("sha256_cbor_64bit", None, 8, list(range(24)), None),
    ("sha256", None, 16, list(range(64)), [[["cache_salt", "tenant-a"]], None, None, None]),
]


@pytest.mark.parametrize("algo, seed, block_size, tokens, extra", HASH_CASES)
def test_hash_through_the_binary_equals_the_in_tree_core(onefile, bare, algo, seed, block_size, tokens, extra):
    args = ["hash", "--hash-algo", algo, "--block-size", str(block_size)]
    if seed is not None:
        args += ["--hash-seed", seed]
    if extra is not None:
        args += ["--extra-keys", json.dumps(extra)]
    proc = run(onefile, *args, env=bare, stdin=json.dumps(tokens).encode())
    assert proc.returncode == 0, proc.stderr
    hasher = BlockHasher(algo, seed, block_size)
    extra_tuples = None if extra is None else [None if e is None else tuple(tuple(x) for x in e) for e in extra]
    assert json.loads(proc.stdout) == {"keys": list(hasher.keys(tokens, extra_tuples)),
                                       "digests": [d.hex() for d in hasher.digests(tokens, extra_tuples)]}


def test_bench_index_from_the_binary_starts_the_binary_s_serve_and_draws_a_report(onefile, bare, tmp_path):
    """`kvcm bench index` frozen: it starts `kvcm serve` as the binary itself, and the report's
    plots need pygal's stylesheets inside the bundle."""
    report = tmp_path / "report.html"
    proc = run(onefile, "bench", "index", "--engines", "2", "--blocks", "300", "--prompt-tokens", "64,128",
               "--queries", "20", "--warmup", "2", "--probes", "2", "--repeats", "1", "--open-rate", "0",
               "--ingest-rate", "0", "--json", "--quiet", "--report", str(report), env=bare, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert {n: q["mismatches"] for n, q in result["targets"]["kvcm"]["query"].items()} == {"64": 0, "128": 0}
    assert report.read_text().count("<svg") >= 5
    assert leftovers(bare) == []


def test_every_sub_command_answers_help(onefile, bare):
    """--help of each sub-command the binary lists (their argument setup imports their modules)."""
    proc = run(onefile, "--help", env=bare)
    assert proc.returncode == 0, proc.stderr
    commands = re.findall(r"^    (\w+)\s", proc.stdout.decode(), re.M)
    assert {"hash", "serve", "score", "tokenize", "version"} <= set(commands), proc.stdout
    for command in commands:
        sub = run(onefile, command, "--help", env=bare)
        assert sub.returncode == 0 and sub.stdout.startswith(b"usage: kvcm " + command.encode()), sub.stderr


def test_bad_arguments_exit_2_with_one_line(onefile, bare):
    proc = run(onefile, "serve", "--block-size", "0", env=bare)
    assert proc.returncode == 2
    assert proc.stderr.decode().count("\n") == 1 and "block" in proc.stderr.decode(), proc.stderr


# -- what is inside -------------------------------------------------------------------------------

REQUIRED = ["kvcm.cli", "kvcm.serve", "kvcm.systemd", "kvcm._build_info", "kvcm.template_pool",
            "kvcm.template_sandbox", "kvcm.inflight", "zmq", "zmq.backend.cython", "uvloop", "orjson",
            "msgpack", "tokenizers", "jinja2", "jinja2.sandbox", "prometheus_client", "tomllib", "ssl",
            "kvcm.sim.app", "yaml", "cryptography.x509"]
REQUIRED_BINARIES = ["kvcm/_core", "zmq/backend/cython/_zmq", "pyzmq.libs/libzmq", "uvloop/loop",
                     "orjson/orjson", "msgpack/_cmsgpack", "tokenizers/tokenizers", "libpython3"]
FORBIDDEN = ["Cython", "cython", "setuptools", "pkg_resources", "distutils", "numpy", "torch",
             "transformers", "huggingface_hub", "pytest", "hypothesis", "cbor2", "tests", "kvcm._reference",
             "zmq.tests", "tornado", "cffi"]


@pytest.fixture(scope="module")
def contents():
    """(python module names, other entry names) inside the onefile binary."""
    built(ONEFILE)
    try:
        from PyInstaller.archive.readers import CArchiveReader, ZlibArchiveReader
    except ImportError:
        if IN_CI:
            raise
        pytest.skip("PyInstaller is not installed here (make binary installs it into .venv)")
    archive = CArchiveReader(str(ONEFILE))
    names = set(archive.toc)
    pyz = next(n for n in names if n.endswith(".pyz") or n == "PYZ-00.pyz")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "PYZ.pyz")
        with open(path, "wb") as f:
            f.write(archive.extract(pyz))
        modules = set(ZlibArchiveReader(path).toc)
    return modules, names


def test_the_bundle_holds_what_kvcm_needs(contents):
    modules, names = contents
    missing = [m for m in REQUIRED if m not in modules]
    assert not missing, "modules missing from the binary: %s" % missing
    for prefix in REQUIRED_BINARIES:
        assert any(n.startswith(prefix) for n in names), "%s* is not in the binary" % prefix


def test_the_bundle_leaves_out_build_tools_and_test_oracles(contents):
    modules, names = contents
    found = sorted(m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN
                   or any(m.startswith(f + ".") for f in FORBIDDEN))
    found += sorted(n for n in names if n.split("/")[0] in FORBIDDEN)
    assert not found, "in the binary but should not be: %s" % found[:20]


def test_bundled_libraries_need_no_executable_stack_or_text_relocations(contents, tmp_path):
    """MemoryDenyWriteExecute=yes refuses mprotect(PROT_EXEC): a library with an executable
    stack (GNU_STACK RWE) or text relocations would fail to load under the unit."""
    if not shutil.which("readelf"):
        pytest.skip("readelf (binutils) is not installed")
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(str(ONEFILE))
    bad = []
    for name in contents[1]:
        if ".so" not in name:
            continue
        path = tmp_path / "lib"
        data = archive.extract(name)
        if data is None or data[:4] != b"\x7fELF":
            continue
        path.write_bytes(data)
        program = subprocess.run(["readelf", "-lW", str(path)], capture_output=True, text=True).stdout
        dynamic = subprocess.run(["readelf", "-dW", str(path)], capture_output=True, text=True).stdout
        if re.search(r"GNU_STACK.*RWE", program):
            bad.append(name + " (executable stack)")
        if "TEXTREL" in dynamic:
            bad.append(name + " (text relocations)")
    assert not bad, bad


# -- serve ----------------------------------------------------------------------------------------

@pytest.fixture
def serve(bare):
    made = []

    def start(binary, *args):
        made.append(Server(binary, bare, *args))
        return made[-1]
    yield start
    for server in made:
        server.close()


@pytest.mark.parametrize("version", ["0.33.0", "0.20.0"])
def test_serve_ingests_vllm_captures_and_scores_them(binary, serve, bare, shared, version):
    captures = [c for c in load_captures(shared) if c.version == version]
    seed = captures[0].hash_config["seed"]
    server = serve(binary, *([] if seed is None else ["--hash-seed", seed]))
    pid, ready = server.wait_for("READY=1")

    # READY=1 comes from the interpreter: the onefile bootloader's child, or the process itself.
    if binary == ONEFILE:
        assert pid != server.proc.pid and parent_of(pid) == server.proc.pid, (pid, server.proc.pid)
    else:
        assert pid == server.proc.pid
    assert "STATUS=serving: http 127.0.0.1:%d" % server.http_port in ready

    publish(server, captures)
    cases = expected_scores(captures)
    assert any(scores for _, _, scores in cases), "the captures leave some prompt cached somewhere"
    for name, tokens, scores in cases:
        reply = server.ok("POST", "/v1/score", {"model": name, "token_ids": tokens})
        assert reply["scores"] == pytest.approx(scores), (tokens[:4], len(tokens), reply)
    # the status page, from the bundle too
    streams = server.ok("GET", "/v1/status")["streams"]
    assert {s["pod"] for s in streams} == {c.pod for c in captures}
    status, page = server.request("GET", "/")
    assert status == 200 and all(("<td data-key=\"pod\" class=\"\">%s</td>" % c.pod).encode() in page
                                 for c in captures)

    # The watchdog pings come from the interpreter too, WATCHDOG_PID being its parent's pid.
    until(lambda: server.notify.count("WATCHDOG=1") >= 2, "two WATCHDOG=1 pings")
    assert {p for p, text in server.notify.receive() if "WATCHDOG=1" in text.split("\n")} == {pid}

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(WAIT) == 0, server.stderr()
    assert server.notify.find("STOPPING=1") is not None
    assert leftovers(bare) == [], "the onefile bootloader leaves its unpacked directory behind"


def test_two_binaries_share_one_redis_index(binary, serve, bare, shared, redis_server):
    """The frozen binary carries the Redis client (and its hiredis parser): captures ingested
    by one replica are scored by another that received no event."""
    captures = [c for c in load_captures(shared) if c.version == "0.33.0"]
    seed = captures[0].hash_config["seed"]
    seed_args = [] if seed is None else ["--hash-seed", seed]
    ingesting = serve(binary, "--index", redis_server.url, *seed_args)
    scoring = serve(binary, "--index", redis_server.url, *seed_args)
    for server in (ingesting, scoring):
        server.wait_for("READY=1")
    publish(ingesting, captures)
    cases = [case for case in expected_scores(captures) if case[2]]
    assert cases, "the captures leave some prompt cached somewhere"
    for name, tokens, scores in cases:
        def scored():
            reply = scoring.ok("POST", "/v1/score", {"model": name, "token_ids": tokens})
            return reply["scores"] == pytest.approx(scores)
        until(scored, "the second replica to score what the first ingested")
    assert scoring.ok("GET", "/ready") == {"status": "ready"}
    for server in (ingesting, scoring):
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(WAIT) == 0, server.stderr()


def test_serve_tokenizes_renders_chat_templates_and_reloads_on_sighup(onefile, serve, bare, shared):
    from kvcm.tokenize import Tokenizer

    server = serve(onefile)
    pid, _ = server.wait_for("READY=1")
    reference = Tokenizer(TOKENIZER, name=QWEN)
    text = "Route this request to the pod that holds its prefix. " * 3
    assert server.ok("POST", "/v1/tokenize", {"model": QWEN, "prompt": text})["token_ids"] == reference.encode(text)
    messages = [{"role": "system", "content": "You route requests."}, {"role": "user", "content": text}]
    rendered, ids = reference.encode_chat(messages)
    reply = server.ok("POST", "/v1/tokenize", {"model": QWEN, "messages": messages})
    assert (reply["prompt"], reply["token_ids"]) == (rendered, ids)
    status, metrics = server.request("GET", "/metrics")
    assert status == 200 and b"# TYPE " in metrics

    server.proc.send_signal(signal.SIGHUP)      # to the bootloader, which forwards it
    until(lambda: "SIGHUP: reloaded" in server.stderr(), "the SIGHUP reload in kvcm's log")
    until(lambda: any(p == pid and text.startswith("STATUS=reloaded") for p, text in server.notify.receive()),
          "STATUS=reloaded (sent just after the log line)")
    assert server.proc.poll() is None
    assert server.ok("GET", "/health") == {"status": "ok"}

    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(WAIT) == 0, server.stderr()
    assert leftovers(bare) == []


def test_request_templates_render_in_workers_the_binary_starts_and_kills(binary, serve, bare, shared):
    server = serve(binary, "--trust-request-chat-template")
    pid, _ = server.wait_for("READY=1")
    workers = check_template_workers(server, pid)
    server.proc.send_signal(signal.SIGTERM)
    assert server.proc.wait(WAIT) == 0, server.stderr()
    for worker in workers:
        until(lambda: not os.path.exists("/proc/%d/stat" % worker), "template worker %d to end" % worker)
    assert leftovers(bare) == []


# -- version from a plain copy of the tree (DESIGN.md §8) -----------------------------------------

def _copy_runs_version(copy):
    """`python -m kvcm version` in a copy of the tree, with the built core copied in."""
    import glob
    import sys

    for so in glob.glob(str(ROOT / "kvcm" / "_core*.so")):
        shutil.copy(so, copy / "kvcm")
    proc = subprocess.run([sys.executable, "-m", "kvcm", "version"], cwd=copy, capture_output=True,
                          text=True, timeout=WAIT, env={"PATH": "/usr/bin:/bin", "HOME": str(copy)})
    assert proc.returncode == 0, proc.stderr
    return dict(line.split(": ", 1) for line in proc.stdout.splitlines()[1:])


def test_version_from_a_git_archive_copy_names_the_archived_revision(tmp_path):
    if not shutil.which("git") or source_revision(str(ROOT)) is None:
        pytest.skip("not a git checkout")
    tree = subprocess.run(["git", "ls-tree", "--name-only", "HEAD", ".gitattributes", "kvcm/_build_info.py"],
                          cwd=ROOT, capture_output=True, text=True).stdout.split()
    if len(tree) != 2:
        pytest.skip("HEAD predates kvcm/_build_info.py and its export-subst attribute")
    archive = subprocess.run(["git", "archive", "--format=tar", "HEAD"], cwd=ROOT, capture_output=True,
                             check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(tmp_path)], input=archive, check=True)
    head = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, capture_output=True,
                          text=True, check=True).stdout.strip()
    fields = _copy_runs_version(tmp_path)
    assert fields["git revision"] == head and fields["build date"] == "unknown"


def test_version_from_a_copy_without_git_information_says_unknown(tmp_path):
    shutil.copytree(ROOT / "kvcm", tmp_path / "kvcm", ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    text = (tmp_path / "kvcm" / "_build_info.py").read_text()
    assert '_ARCHIVE_REVISION = "$Format:%H$"' in text       # as in a checkout: not substituted
    assert _copy_runs_version(tmp_path)["git revision"] == "unknown"


def test_sim_takes_an_llmd_yaml_file_and_serves_https(onefile, bare, tmp_path):
    import ssl
    import urllib.request

    from aio import free_port

    (tmp_path / "sim.yaml").write_text("mode: echo\nself-signed-certs: true\nzmq-endpoint: ''\n")
    port = free_port()
    proc = subprocess.Popen([str(onefile), "sim", "--host", "127.0.0.1", "--port", str(port), "--config",
                             str(tmp_path / "sim.yaml"), "--enable-prefix-caching"], env=bare,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    loose = ssl.create_default_context()
    loose.check_hostname, loose.verify_mode = False, ssl.CERT_NONE

    def completion():
        request = urllib.request.Request("https://127.0.0.1:%d/v1/completions" % port, method="POST",
                                         data=b'{"prompt": "frozen words", "max_tokens": 2}')
        try:
            with urllib.request.urlopen(request, context=loose, timeout=5) as reply:
                return json.loads(reply.read())
        except OSError:
            assert proc.poll() is None, proc.stderr.read().decode()
            return None
    try:
        assert until(completion, "the frozen kvcm sim to answer over HTTPS")["choices"][0]["text"] == "frozen words"
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
    err = proc.stderr.read().decode()
    assert "--enable-prefix-caching is accepted and has no effect" in err and "configuration: {" in err
    assert leftovers(bare) == []
