"""The README's runnable blocks, run as written: the walkthrough (kvcm serve, a kvcm sim
engine, a chat request, its token ids piped into /v1/score) and the Python examples. Each
block follows the marker below. The walkthrough's ports are swapped for free ones (the
README shows kvcm's defaults; tests never take fixed ports), and `.venv/bin/kvcm` is this
environment's kvcm; nothing else changes."""

import json
import os
import pathlib
import re
import signal
import subprocess
import sys

from aio import free_port
from conftest import ROOT
from serving import clean_env

MARKER = "<!-- tests/test_readme.py runs the next block as written -->"
KVCM = pathlib.Path(sys.executable).parent / "kvcm"


def runnable_blocks(language):
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(re.escape(MARKER) + r"\n```(\w+)\n(.*?)\n```", text, re.S)
    return [code for lang, code in blocks if lang == language]


def test_the_readme_marks_its_walkthrough_and_library_examples():
    assert len(runnable_blocks("sh")) == 1
    assert len(runnable_blocks("python")) == 2


def test_the_walkthrough_scores_the_prompt_the_engine_served():
    [script] = runnable_blocks("sh")
    ports = {"8080": str(free_port()), "5557": str(free_port()), "8001": str(free_port())}
    for default, port in ports.items():
        script = re.sub(r"\b%s\b" % default, port, script)
    script = script.replace(".venv/bin/kvcm", str(KVCM))
    proc = subprocess.Popen(["bash", "-e", "-c", script], cwd=ROOT, env=clean_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)      # the servers it started, if it hung
            proc.wait()
    assert proc.returncode == 0, (out, err)
    replies = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    ready, chat, score = replies                     # the engine's /health answers an empty 200
    assert ready == {"status": "ready"}
    assert chat["object"] == "chat.completion" and chat["usage"]["prompt_tokens"] == 32
    pod = "127.0.0.1:%s" % ports["8001"]
    assert score["scores"] == {pod: 2.0} and score["blocks"] == 2 and score["tokens"] == 32, score
    assert "Traceback" not in err, err


def run_python(code, tmp_path):
    script = tmp_path / "example.py"
    script.write_text(code)
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=clean_env(), capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_the_library_example_runs_as_written(tmp_path):
    embed = next(code for code in runnable_blocks("python") if "asyncio.run" in code)
    out = run_python(embed, tmp_path).splitlines()
    assert re.fullmatch(r"engines publish to tcp://127\.0\.0\.1:\d+", out[0]), out
    assert out[1:] == ["best pod: None {}", "[]"]


def test_the_core_example_runs_as_written(tmp_path):
    core = next(code for code in runnable_blocks("python") if "kvcm._core" in code)
    assert run_python(core, tmp_path) == "{'10.0.0.1': 4.0}\n"


def test_the_first_loopback_url_is_make_runs_own():
    text = (ROOT / "README.md").read_text()
    first = re.search(r"(?:https?://)?(?:127\.0\.0\.1|localhost):\d+\S*", text).group(0)
    assert first == "http://127.0.0.1:8080/ready"
    assert text.index("make run") < text.index(first)


def test_the_readme_lists_llmd_variables_with_their_kvcm_names_and_leaves_internals_to_contributing():
    from kvcm.config import LLMD_ENV, LLMD_IGNORED

    text = (ROOT / "README.md").read_text()
    for variable, option in LLMD_ENV.items():
        assert re.search(r"\| `%s` \| `%s` \(`%s`\)" % (variable, re.escape(option.flag), option.env), text), variable
    for variable in LLMD_IGNORED:
        assert "| `%s` | – | accepted and ignored" % variable in text
    assert "--served-model-name" in text                   # the alias quirk
    assert "## Layout" not in text and "KVCM_ANNOTATE" not in text and "(CONTRIBUTING.md)" in text
    contributing = (ROOT / "CONTRIBUTING.md").read_text()
    for section in ("## Layout", "## Build switches", "### Test prerequisites"):
        assert section in contributing
