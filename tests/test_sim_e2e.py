"""End to end with real processes: `kvcm sim` engines publishing to one `kvcm serve`. kvcm's
/v1/score ranks the engine that served a prompt first, its scores are the blocks the
simulator reports as cached, and after every phase (stores, hits, evictions, LoRA, resets)
kvcm's index equals each simulator's own cache contents. Also the CLI: flags, defaults,
one-line errors, SIGTERM."""

import subprocess
import sys

import pytest

from conftest import ROOT
from kvcm._core import BlockHasher
from sim_harness import Serve, Sim, clean_env, connect, until

MODEL = "Qwen/Qwen3-0.6B"
BLOCK = 16
HASHER = BlockHasher("sha256", None, BLOCK)


def words(tag, count):
    return " ".join("%s%d" % (tag, i) for i in range(count))


class Engine:
    """One simulator process and what kvcm should know about it."""

    def __init__(self, serve, *args, span=1, lora=None):
        self.sim = Sim("--zmq-endpoint", serve.zmq_endpoint, *args, span=span)
        self.serve = serve
        self.pods = ["127.0.0.1:%d" % (self.sim.port + r) for r in range(span)]
        for client, pod in zip(self.sim.clients, self.pods):
            connect(serve, client, pod, MODEL)

    def contents(self, rank=0):
        return self.sim.clients[rank].kv_cache()["blocks"]

    def close(self):
        assert self.sim.stop() == 0, self.sim.stderr()
        self.sim.close()


def chains(blocks):
    """{hash: token ids from block 0 through that block} for every cached block whose every
    ancestor is cached too (the ones a lookup from block 0 can reach), base model only."""
    by_hash = {b["hash"]: b for b in blocks if b["lora_name"] is None}
    out = {}
    for h, block in by_hash.items():
        tokens, cur = [], block
        while cur is not None:
            tokens[:0] = cur["token_ids"]
            if cur["parent"] is None:
                out[h] = tokens
                break
            cur = by_hash.get(cur["parent"])
    return out


def index_equals_caches(serve, engines):
    """Waits until kvcm's per-pod block counts are the simulators', then checks every
    reachable chain scores, per pod, exactly the run of it the pod holds."""
    held = {}
    for engine in engines:
        for rank, pod in enumerate(engine.pods):
            held[pod] = engine.contents(rank)

    def counts_match():
        counts = {s["pod"]: s["blocks"].get("gpu", 0) for s in serve.streams() if s["model"] == MODEL}
        return all(counts.get(pod, 0) == len(blocks) for pod, blocks in held.items())
    until(counts_match, "kvcm's block counts to equal the simulators' caches")
    hashes = {pod: {b["hash"] for b in blocks} for pod, blocks in held.items()}
    checked = 0
    for pod, blocks in held.items():
        for tokens in chains(blocks).values():
            keys = list(HASHER.keys(tokens))
            result = serve.score(MODEL, tokens)
            for other, have in hashes.items():
                run = next((i for i, k in enumerate(keys) if k not in have), len(keys))
                got = result["matched"].get(other, {}).get("blocks", 0)
                assert got == run, (other, got, run, result)
            checked += 1
    return checked


@pytest.fixture
def serve():
    server = Serve("--tier-weights", "gpu=1.0")
    yield server
    server.close()


@pytest.mark.parametrize("form", ["map", "array"])
def test_kvcm_routes_to_the_engine_that_served_a_prompt(serve, form):
    a = Engine(serve, "--event-format", form, "--mode", "echo", "--kv-cache-size", "24")
    b = Engine(serve, "--event-format", form, "--mode", "echo", "--kv-cache-size", "24")
    try:
        pa, pb = a.pods[0], b.pods[0]
        doc = words("doc", 100)                    # 6 full blocks + 4 tokens
        a.sim.client.complete(prompt=doc, max_tokens=2)
        b.sim.client.complete(prompt=doc[:len(words("doc", 40))], max_tokens=1)    # 2 full blocks of it
        assert index_equals_caches(serve, [a, b]) > 0
        ids = a.sim.client.tokens(doc)
        result = serve.score(MODEL, ids)
        assert max(result["scores"], key=result["scores"].get) == pa
        assert result["scores"] == {pa: 6.0, pb: 2.0}
        # the scores are what each engine reports as cached when the prompt comes again
        for engine, pod in ((a, pa), (b, pb)):
            usage = engine.sim.client.complete(prompt=doc, max_tokens=1)["usage"]
            assert usage["prompt_tokens_details"]["cached_tokens"] == result["scores"][pod] * BLOCK
        index_equals_caches(serve, [a, b])

        # fill a's cache past its 24 blocks: LRU evictions reach kvcm as BlockRemoved
        for i in range(5):
            a.sim.client.complete(prompt=words("fill%d" % i, 70), max_tokens=1)
        assert index_equals_caches(serve, [a, b]) > 0
        assert serve.score(MODEL, ids)["scores"].get(pa, 0) < 6

        # a LoRA request: its own namespace, named by the adapter
        assert a.sim.client.post("/v1/load_lora_adapter", {"lora_name": "sql", "lora_path": "/a/sql"}).status == 200
        a.sim.client.complete(model="sql", prompt=doc, max_tokens=1)
        lora_blocks = [blk for blk in a.contents() if blk["lora_name"] == "sql"]
        until(lambda: serve.score("sql", ids)["scores"].get(pa) == len(lora_blocks), "the LoRA blocks in kvcm")
        assert serve.score("sql", ids)["scores"] == {pa: 6.0}

        # a reset clears the pod in kvcm
        assert a.sim.client.post("/reset_prefix_cache").status == 200
        until(lambda: pa not in serve.score(MODEL, ids)["scores"], "the reset to reach kvcm")
        index_equals_caches(serve, [a, b])
        assert serve.score(MODEL, ids)["scores"] == {pb: 6.0}      # b served the whole prompt since
    finally:
        a.close()
        b.close()


def test_data_parallel_ranks_are_pods_of_their_own():
    serve = Serve(zmq_span=2)
    engine = Engine(serve, "--data-parallel-size", "2", "--mode", "echo", span=2)
    try:
        p0, p1 = engine.pods
        doc = words("dp", 50)
        engine.sim.clients[1].complete(prompt=doc, max_tokens=1)
        index_equals_caches(serve, [engine])
        ids = engine.sim.clients[1].tokens(doc)
        assert serve.score(MODEL, ids)["scores"] == {p1: 3.0}
        engine.sim.clients[0].complete(prompt=doc, max_tokens=1)
        until(lambda: serve.score(MODEL, ids)["scores"] == {p0: 3.0, p1: 3.0}, "rank 0's blocks in kvcm")
        ranks = {(s["pod"], s["dp_rank"]) for s in serve.streams()}
        assert {(p0, 0), (p1, 1)} <= ranks
    finally:
        engine.close()
        serve.close()


def test_a_real_tokenizer_scores_by_prompt_in_kvcm(shared):
    qwen = shared / "fixtures" / "tokenizers" / "qwen2.5-instruct"
    serve = Serve("--tokenizer", "%s=%s" % (MODEL, qwen))
    engine = Engine(serve, "--tokenizer", str(qwen), "--mode", "echo")
    try:
        messages = [{"role": "system", "content": "You answer questions about geography. " * 8},
                    {"role": "user", "content": "Which river flows through Paris?"}]
        engine.sim.client.chat(messages=messages, max_tokens=3)
        index_equals_caches(serve, [engine])
        # kvcm renders and tokenizes the chat itself and finds the engine's blocks
        result = serve.client.ok("POST", "/v1/score", {"model": MODEL, "messages": messages})
        assert result["scores"] == {engine.pods[0]: float(result["blocks"])} and result["blocks"] > 0
    finally:
        engine.close()
        serve.close()


# -- the command line ---------------------------------------------------------------------------

def run(*args, timeout=60):
    proc = subprocess.run([sys.executable, "-m", "kvcm", *args], cwd=ROOT, env=clean_env(),
                          stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def test_help_lists_designs_flags_and_defaults():
    status, out, _ = run("sim", "--help")
    assert status == 0
    text = " ".join(out.split())
    for flag in ("--port", "--model", "--served-model-name", "--tokenizer", "--max-model-len", "--max-num-seqs",
                 "--max-waiting-queue-length", "--mode", "--seed", "--time-to-first-token",
                 "--prefill-time-per-token", "--inter-token-latency", "--block-size", "--kv-cache-size",
                 "--hash-algo", "--hash-seed", "--zmq-endpoint", "--topic", "--pod-id", "--replay-endpoint",
                 "--event-format", "--data-parallel-size", "--failure-injection-rate"):
        assert flag + " " in text, flag
    for default in ("8000", "Qwen/Qwen3-0.6B", "4096", "5", "1000", "random", "16", "1024", "sha256",
                    "tcp://127.0.0.1:5557", "kv@{pod}@{model}", "<POD_IP or 127.0.0.1>:<the rank's HTTP port>", "map",
                    "1"):
        assert "default: %s" % default in text, default


@pytest.mark.parametrize("args, message", [
    (("--block-size", "0"), "kvcm sim: error: --block-size must be at least 1, got 0"),
    (("--zmq-endpoint", "nowhere"), "kvcm sim: error: --zmq-endpoint 'nowhere': expected tcp://HOST:PORT"),
    (("--kv-cache-size", "0"), "argument --kv-cache-size: '0': must be at least 1"),
    (("--time-to-first-token", "soon"), "argument --time-to-first-token: 'soon': not a duration"),
    (("--event-format", "json"), "argument --event-format: invalid choice: 'json'"),
    (("--failure-types", "meteor"), "unknown failure type"),
    (("--tokenizer", "/nonexistent"), "kvcm sim: error: --tokenizer /nonexistent: no tokenizer.json there"),
])
def test_bad_flags_fail_with_one_line(args, message):
    status, _, err = run("sim", "--port", "0", *args)
    assert status == 2 and message in err and len(err.strip().splitlines()) <= 2, err


def test_ports_in_use_fail_with_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        status, _, err = run("sim", "--host", "127.0.0.1", "--port", str(port), "--zmq-endpoint", "")
        assert status == 1 and "kvcm sim: error: cannot listen:" in err, err
        status, _, err = run("sim", "--host", "127.0.0.1", "--port", "0", "--zmq-endpoint",
                             "tcp://127.0.0.1:%d" % port, "--replay-endpoint", "tcp://127.0.0.1:%d" % port)
        assert status == 1 and "kvcm sim: error: cannot open the KV event sockets:" in err, err


def test_sigterm_stops_with_status_zero(serve):
    engine = Engine(serve, "--mode", "echo")
    engine.sim.client.complete(prompt=words("bye", 20), max_tokens=1)
    assert engine.sim.stop() == 0
    assert "kvcm sim ready" in engine.sim.stderr() and "stopping" in engine.sim.stderr()
    engine.sim.close()
