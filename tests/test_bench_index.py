"""`kvcm bench index` against real targets on a tiny workload: `kvcm serve` started by bench,
NVIDIA Dynamo's standalone indexer (`python -m dynamo.indexer` from the venv `make
prereq-dynamo` caches in .cache/dynamo-venv), and a kvcm with a real tokenizer asked
through llm-d's `/score_completions`. Every answer is compared with the workload's own; no
assertion depends on how fast anything is.

Without Dynamo's venv the Dynamo tests skip, naming `make prereq-dynamo`; under CI=true they
fail instead."""

import json
import os
import re
import subprocess
import sys

import pytest

from conftest import ROOT, SHARED
from kvcm.bench import phases, summary, targets
from kvcm.bench.engines import Engines
from kvcm.bench.index import Context
from kvcm.bench.progress import Progress
from kvcm.bench.workload import Spec, Workload

DYNAMO_PYTHON = ROOT / ".cache" / "dynamo-venv" / "bin" / "python"
IN_CI = os.environ.get("CI") == "true"
TINY = ["--engines", "3", "--blocks", "450", "--prompt-tokens", "64,256", "--system-tokens", "32",
        "--queries", "60", "--warmup", "5", "--probes", "6", "--open-seconds", "0.2", "--open-rate", "200",
        "--ingest-rate", "20000", "--swi-seconds", "0.3", "--repeats", "1"]


@pytest.fixture(scope="module")
def dynamo_python():
    if not DYNAMO_PYTHON.exists():
        message = "Dynamo's indexer venv is missing: run `make prereq-dynamo` (%s)" % DYNAMO_PYTHON
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return str(DYNAMO_PYTHON)


def bench(*args, check=True):
    proc = subprocess.run([sys.executable, "-m", "kvcm", "bench", "index", *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240,
                          env={k: v for k, v in os.environ.items() if not k.startswith("KVCM_")})
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_kvcm_target_every_phase_reports_and_every_answer_is_right(tmp_path):
    report = tmp_path / "report.html"
    proc = bench(*TINY, "--json", "--report", str(report))
    result = json.loads(proc.stdout)
    t = result["targets"]["kvcm"]
    w = result["workload"]
    assert w["blocks"] >= 450 and w["engines"] == 3
    assert t["runs"] == 1 and t["ingest_blocks_per_s"]["median"] > 0
    assert t["rss_bytes_per_block"]["median"] is not None
    assert t["publish_to_visible"]["probes"] == 6
    assert set(t["query"]) == {"64", "256"}
    for q in t["query"].values():
        assert q["mismatches"] == 0, q["first_mismatch"]
        assert q["requests"] == 60 and q["warmup"]["requests"] == 5
        assert q["p50_us"]["median"] <= q["p99_us"]["median"] <= q["p999_us"]["median"]
        assert q["open_loop"]["requests"] == 40               # 200/s for 0.2 s
    assert t["score_while_ingesting"]["length"] in (64, 256)
    assert t["score_while_ingesting"]["catch_up_seconds"]["median"] is not None
    page = report.read_text()
    assert page.count("<svg") >= 6
    # self-contained: no URL, no file, no script, nothing loaded from anywhere
    assert not re.search(r"://|<script|\bhref=|\bsrc=|@import|url\(", page, re.I)


def test_the_summary_table_and_plain_progress_lines():
    proc = bench(*TINY, "--ingest-rate", "0", "--probes", "0", "--open-rate", "0", "--query-tokens", "128,256")
    assert re.search(r"^ingest, blocks/s +[\d,]+ +1 run", proc.stdout, re.M), proc.stdout
    assert re.search(r"^query 256 tokens p99, µs +[\d.,]+", proc.stdout, re.M), proc.stdout
    assert re.search(r"^query 128 tokens p50, µs +[\d.,]+", proc.stdout, re.M), proc.stdout   # prefixes of 256
    assert "query 64 tokens" not in proc.stdout
    assert "generator sent everything" in proc.stdout
    assert re.search(r"^  kvcm +ingest [\d,]+ blocks/s", proc.stderr, re.M), proc.stderr    # not a terminal


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="--placement split needs 2 CPUs (CI has them)")
def test_placement_split_places_kvcm_and_says_so():
    proc = bench(*TINY, "--placement", "split", "--probes", "0", "--open-rate", "0", "--query-tokens", "256")
    assert re.search(r"^scoring while ingesting, placed: the client and kvcm's event loop on CPU \S+, "
                     r"the engines and kvcm's ingest on CPU \S+", proc.stdout, re.M), proc.stdout
    assert re.search(r"^query 256 tokens p99 while ingesting", proc.stdout, re.M), proc.stdout
    proc = bench(*TINY, "--placement", "split", "--probes", "0", "--open-rate", "0", "--query-tokens", "256",
                 "--json")
    result = json.loads(proc.stdout)
    assert set(result["workload"]["placement"]) == {"name", "scoring_cpus", "ingest_cpus"}
    assert result["targets"]["kvcm"]["score_while_ingesting"]["loaded_p99_us"]["median"] > 0


def test_placement_colocate_measures_the_same_answers_and_says_so():
    proc = bench(*TINY, "--placement", "colocate", "--ingest-rate", "0", "--probes", "0", "--open-rate", "0",
                 "--query-tokens", "256", "--json")
    result = json.loads(proc.stdout)
    assert result["workload"]["placement"] == {"name": "colocate", "cpu": str(max(os.sched_getaffinity(0)))}
    q = result["targets"]["kvcm"]["query"]["256"]
    assert q["mismatches"] == 0 and q["requests"] == 60
    assert "floor and queries colocated: the client and every thread of each target on CPU" in \
        summary.index_text(result)


def test_a_spinning_client_measures_the_same_answers_and_says_so():
    proc = bench(*TINY, "--client-spin", "--ingest-rate", "0", "--probes", "0", "--open-rate", "0",
                 "--query-tokens", "256", "--json")
    result = json.loads(proc.stdout)
    assert result["workload"]["client_spin"] is True
    q = result["targets"]["kvcm"]["query"]["256"]
    assert q["mismatches"] == 0 and q["requests"] == 60
    assert result["targets"]["kvcm"]["floor_us"]["p50"]["median"] > 0
    assert "polls for each answer (--client-spin)" in summary.index_text(result)


def test_distinct_sets_how_many_prompts_are_asked():
    proc = bench(*TINY, "--distinct", "3", "--ingest-rate", "0", "--probes", "0", "--open-rate", "0",
                 "--query-tokens", "64", "--json")
    q = json.loads(proc.stdout)["targets"]["kvcm"]["query"]["64"]
    assert q["distinct_queries"] == 3 and q["mismatches"] == 0 and q["requests"] == 60


@pytest.mark.parametrize("args, message", [
    (["--target", "nope"], "--target: unknown nope"),
    (["--distinct", "0"], "invalid"),
    (["--target", "dynamo"], "needs --dynamo-python"),
    (["--target", "kvcm,dynamo", "--url", "http://127.0.0.1:1"], "one --target"),
    (["--target", "llmd", "--url", "http://127.0.0.1:1"], "--tokenizer"),
    (["--prompt-tokens", "12x"], "not TOKENS"),
    (["--engines", "0"], "invalid"),
    (["--placement", "everywhere"], "invalid choice"),
    (["--client-spin", "--concurrency", "2"], "--client-spin drives one connection"),
    (["--placement", "colocate", "--url", "http://127.0.0.1:1"], "needs a target bench starts"),
    (["--placement", "colocate", "--client-spin"], "would spin on the target's CPU"),
])
def test_bad_flags_exit_2_with_one_line(args, message):
    proc = bench(*args, check=False)
    assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_a_target_that_does_not_answer_is_named():
    proc = bench("--url", "http://127.0.0.1:%d" % targets.free_port(), "--zmq", "tcp://127.0.0.1:1", *TINY,
                 check=False)
    assert proc.returncode != 0 and "nothing answers GET /health" in proc.stderr


def _answers(spec, w, queries):
    """Starts the target, ingests the workload and returns its answer to every query."""
    target = spec.start()
    ctx = Context(target, w, Progress(0, quiet=True), type("S", (), {"open_seconds": 1})())
    try:
        ctx.engines = Engines(w, target)
        ctx.engines.connect(ctx.conn)
        result = phases.ingest(ctx)
        assert result["blocks"] == sum(s.blocks for s in w.streams)
        return [target.api.matched(ctx.conn.call(target.api.query(q))[1]) for q in queries]
    finally:
        ctx.close()
        target.close()


@pytest.mark.parametrize("event_format, capacity", [("map", 0), ("mixed", 150)])
def test_kvcm_and_dynamo_agree_on_every_match(dynamo_python, event_format, capacity):
    w = Workload(Spec(engines=3, blocks=600, prompt_tokens=((64, 1.0), (256, 1.0)), system_tokens=32,
                      engine_capacity=capacity, event_format=event_format))
    w.build()
    queries = w.queries(64, 30) + w.queries(256, 30)
    kvcm = targets.TargetSpec("kvcm", targets.NativeApi("bench", 16), start=targets.start_kvcm)
    dynamo = targets.TargetSpec("dynamo", targets.DynamoApi("bench", 16),
                                start=lambda spec: targets.start_dynamo(spec, dynamo_python))
    got_kvcm, got_dynamo = _answers(kvcm, w, queries), _answers(dynamo, w, queries)
    assert got_kvcm == got_dynamo == [q.expected for q in queries]
    assert any(len(a) > 1 for a in got_kvcm)                 # shared system prompts: several engines match


def test_kvcm_and_dynamo_side_by_side_in_one_run(dynamo_python):
    proc = bench(*TINY, "--target", "kvcm,dynamo", "--dynamo-python", dynamo_python, "--json")
    result = json.loads(proc.stdout)
    assert list(result["targets"]) == ["kvcm", "dynamo"]
    for label, t in result["targets"].items():
        assert t["ingest_blocks_per_s"]["median"] > 0, label
        assert t["rss_bytes_per_block"]["median"] is not None, label
        for q in t["query"].values():
            assert q["mismatches"] == 0, (label, q["first_mismatch"])
    ratios = result["ratios"]["dynamo / kvcm"]
    assert set(ratios) >= {"ingest_blocks_per_s", "rss_bytes_per_block", "query_p50_64", "query_p99_256"}


def test_llmd_api_by_prompt_text_against_kvcm_with_a_tokenizer():
    tokenizer = SHARED / "fixtures" / "tokenizers" / "qwen2.5-instruct"
    if not tokenizer.is_dir():
        pytest.skip("../shared fixtures are not beside the project")
    model = "Qwen/Qwen2.5-0.5B-Instruct"
    spec = targets.TargetSpec("kvcm", targets.NativeApi(model, 16),
                              start=lambda s: targets.start_kvcm(s, ["--tokenizer", "%s=%s" % (model, tokenizer)]))
    server = spec.start()
    try:
        proc = bench("--target", "llmd", "--url", "http://%s:%d" % server.address, "--zmq", server.zmq,
                     "--tokenizer", str(tokenizer), "--model", model, *TINY, "--json")
    finally:
        server.close()
    result = json.loads(proc.stdout)
    t = result["targets"]["llmd"]
    assert "rss_bytes_per_block" not in t                     # not started by bench: no process to read
    for q in t["query"].values():
        assert q["requests"] == 60 and q["mismatches"] == 0, q["first_mismatch"]
