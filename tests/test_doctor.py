"""`kvcm doctor` against real engines: `kvcm sim` (in-process on a uvloop thread, and as a
process) publishing over real ZMQ sockets, configured right and wrong in every way the doctor
diagnoses; a vLLM-compatible publisher for what the simulator cannot get wrong (clock skew,
malformed messages); and a running `kvcm serve` for --url. The doctor runs through the real
command line (kvcm.cli.main, and `python -m kvcm doctor` once for its exit status).

While the doctor listens, a feeder thread sends the simulator new prompts, so every run from
block 0 is fresh. Nothing is timed: the doctor stops early once it has seen enough, and
--duration only bounds a test that is broken."""

import subprocess
import sys
import threading
import time

import pytest

from aio import free_port
from conftest import ROOT, SHARED
from kvcm import cli
from kvcm.publisher import Publisher, block_stored
from serving import HASHER, tokens
from sim_harness import InProcessSim, Serve, Sim, clean_env, connect, until

MODEL = "Qwen/Qwen3-0.6B"
TOKENIZERS = SHARED / "fixtures" / "tokenizers"
DURATION = "60"      # the doctor stops as soon as it can judge; this only bounds a broken test
# what a loaded machine may take to pass a batch on or answer a replay; tests of the clock and
# of a silent replay endpoint give their own
PATIENCE = ("--max-skew", "30", "--replay-timeout", "30")


class Feeder:
    """Sends the simulator's ranks a prompt nobody sent before, every few milliseconds, until
    stopped: each becomes a BlockStored from block 0."""

    def __init__(self, clients, words=80):
        self.clients, self.words = clients, words
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        n = 0
        while not self.stop.wait(0.02):
            n += 1
            prompt = " ".join("w%dx%d" % (n, i) for i in range(self.words))
            for client in self.clients:
                client.complete(model=MODEL, prompt=prompt, max_tokens=1)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def doctor(capsys, *args):
    """(exit status, {kind: [sentences]}, the whole output) of `kvcm doctor ARGS`."""
    status = cli.main(["doctor", "--duration", DURATION, *PATIENCE, *args])
    out = capsys.readouterr().out
    lines = {}
    for line in out.splitlines():
        kind, _, text = line.strip().partition(" ")
        if kind in ("ok", "note", "PROBLEM"):
            lines.setdefault(kind, []).append(text.strip())
    return status, lines, out


def line(lines, kind, start):
    found = [t for t in lines.get(kind, []) if t.startswith(start)]
    assert len(found) == 1, (kind, start, lines)
    return found[0]


def sim_endpoint(sim, rank=0):
    """The connectable address of a rank's bound PUB (bound on every interface)."""
    return sim.ranks[rank].events.endpoint.replace("0.0.0.0", "127.0.0.1")


@pytest.fixture
def engine():
    """engine(*sim flags) -> an in-process `kvcm sim` publishing on a bound PUB (vLLM's default
    topology), with a feeder; closed after the test."""
    made = []

    def make(*args):
        sim = InProcessSim("--zmq-endpoint", "tcp://*:*", "--mode", "echo", *args)
        made.append(sim)
        return sim, sim_endpoint(sim), Feeder([sim.client_of(r) for r in range(len(sim.ranks))])
    yield make
    for sim in made:
        sim.close()


def diagnose(engine, capsys, *sim_flags, doctor_flags=()):
    """(endpoint, exit status, lines, output) of the doctor on a fresh engine with sim_flags."""
    _, endpoint, feeder = engine(*sim_flags)
    with feeder:
        return (endpoint,) + doctor(capsys, "--engine", endpoint, *doctor_flags)


# -- configured right --------------------------------------------------------------------------------

def test_an_engine_configured_as_kvcm_is_healthy(capsys, engine):
    sim, endpoint, feeder = engine()
    with feeder:
        status, lines, out = doctor(capsys, "--engine", endpoint)
    assert status == 0, out
    assert "PROBLEM" not in lines, out
    pod = sim.ranks[0].pod
    line(lines, "ok", "Events arrive from %s:" % endpoint)
    assert line(lines, "ok", "Format:").startswith("Format: map events (vLLM 0.24 or later); block hashes as integers")
    assert line(lines, "ok", "Topic") == ("Topic 'kv@%s@%s': pod '%s', model '%s' (llm-d's kv@POD@MODEL: kvcm's "
                                          "bind mode takes both from it)." % (pod, MODEL, pod, MODEL))
    line(lines, "ok", "Data-parallel rank: 0 only")
    assert line(lines, "ok", "Block size:") == "Block size: 16 tokens, as --block-size 16."
    assert line(lines, "ok", "Block hashes match --hash-algo sha256 --hash-seed (unset) --block-size 16 (")
    line(lines, "ok", "Token ids: present in every GPU BlockStored event")
    line(lines, "ok", "Clock: event timestamps are")
    # no replay endpoint is reported, and is not a failure
    line(lines, "note", "Replay: no replay endpoint given")
    assert out.rstrip().endswith("No problems found.")


def test_matching_non_default_settings_are_healthy(capsys, engine):
    settings = ("--hash-algo", "sha256_cbor", "--hash-seed", "42", "--block-size", "32")
    endpoint, status, lines, out = diagnose(engine, capsys, *settings, doctor_flags=settings)
    assert status == 0, out
    line(lines, "ok", "Block hashes match --hash-algo sha256_cbor --hash-seed '42' --block-size 32 (")


def test_array_events_are_named_with_their_vllm_versions(capsys, engine):
    endpoint, status, lines, out = diagnose(engine, capsys, "--event-format", "array")
    assert status == 0, out
    assert line(lines, "ok", "Format:").startswith("Format: array events of 10 elements (vLLM 0.20 to 0.21)")
    line(lines, "ok", "Block hashes match")


# -- configured wrong, one way at a time -----------------------------------------------------------------

@pytest.mark.parametrize("sim_flags, names", [
    (("--hash-seed", "42"), "--hash-algo sha256 --hash-seed '42'"),
    (("--hash-seed", "0"), "--hash-algo sha256 --hash-seed '0'"),
    (("--hash-algo", "sha256_cbor"), "--hash-algo sha256_cbor --hash-seed (unset)"),
    (("--hash-algo", "sha256_cbor", "--hash-seed", ""), "--hash-algo sha256_cbor --hash-seed ''"),
])
def test_a_hash_mismatch_names_the_engines_setting(capsys, engine, sim_flags, names):
    endpoint, status, lines, out = diagnose(engine, capsys, *sim_flags)
    assert status == 1, out
    problem = line(lines, "PROBLEM", "Block hashes do not match:")
    # the event sink's own diagnosis, as kvcm serve logs it
    assert ("the engines' block hashes match %s, not kvcm's --hash-algo sha256 --hash-seed (unset)" % names) in problem
    assert "ok" in lines and not any(t.startswith("Block hashes match") for t in lines["ok"])
    assert out.rstrip().endswith("1 problem found.")


def test_a_seed_nobody_uses_is_reported_as_unrecognised(capsys, engine):
    endpoint, status, lines, out = diagnose(engine, capsys, "--hash-seed", "a-seed-of-their-own")
    assert status == 1, out
    assert "match neither kvcm's --hash-algo sha256 --hash-seed (unset) nor any likely setting" in \
        line(lines, "PROBLEM", "Block hashes do not match:")


def test_the_doctor_checks_against_the_settings_it_is_given(capsys, engine):
    # the engine is vLLM's default; the doctor is told kvcm runs with seed 42
    endpoint, status, lines, out = diagnose(engine, capsys, doctor_flags=("--hash-seed", "42"))
    assert status == 1, out
    assert ("match --hash-algo sha256 --hash-seed (unset), not kvcm's --hash-algo sha256 --hash-seed '42'"
            in line(lines, "PROBLEM", "Block hashes do not match:"))


def test_a_block_size_mismatch_names_the_size_and_checks_the_hashes_at_it(capsys, engine):
    endpoint, status, lines, out = diagnose(engine, capsys, "--block-size", "32")
    assert status == 1, out
    assert line(lines, "PROBLEM", "Block size:") == (
        "Block size: the engine uses 32-token blocks but --block-size is 16: kvcm would key this model with its "
        "own hashes (decoupled mode) instead of the engine's. Set --block-size 32.")
    line(lines, "ok", "With --block-size 32, block hashes match --hash-algo sha256 --hash-seed (unset) --block-size 32")


def test_a_block_size_and_a_seed_mismatch_are_both_reported(capsys, engine):
    endpoint, status, lines, out = diagnose(engine, capsys, "--block-size", "32", "--hash-seed", "0")
    assert status == 1, out
    line(lines, "PROBLEM", "Block size: the engine uses 32-token blocks")
    assert "match --hash-algo sha256 --hash-seed '0'" in line(lines, "PROBLEM", "With --block-size 32, block hashes "
                                                                                  "do not match:")
    assert out.rstrip().endswith("2 problems found.")


def test_a_topic_without_a_model_needs_one_given(capsys, engine):
    _, endpoint, feeder = engine("--topic", "")
    with feeder:
        status, lines, out = doctor(capsys, "--engine", endpoint)
        assert status == 1, out
        assert line(lines, "PROBLEM", "Topic ''").startswith("Topic '' names no model: kvcm must connect to this "
                                                            "engine with the model given (--engine NAME=%s,model=MODEL"
                                                            % endpoint)
        status, lines, out = doctor(capsys, "--engine", endpoint, "--model", MODEL)
    assert status == 0, out
    line(lines, "ok", "Topic '' is not kv@POD@MODEL: kvcm must connect to this engine (--engine NAME=%s,model=%s)"
         % (endpoint, MODEL))
    line(lines, "ok", "Block hashes match")


# -- replay -----------------------------------------------------------------------------------------

def test_a_replay_endpoint_that_holds_the_stream_is_healthy(capsys, engine):
    replay = "tcp://127.0.0.1:%d" % free_port()
    endpoint, status, lines, out = diagnose(engine, capsys, "--replay-endpoint", replay,
                                            doctor_flags=("--replay-endpoint", replay))
    assert status == 0, out
    assert "answers (vLLM 0.26 or later layout) and holds the live stream's batch" in line(lines, "ok", "Replay:")
    assert "note" not in lines or not any(t.startswith("Replay") for t in lines["note"])


def test_the_replay_layout_before_vllm_0_26_is_named(capsys, engine):
    replay = "tcp://127.0.0.1:%d" % free_port()
    endpoint, status, lines, out = diagnose(engine, capsys, "--replay-endpoint", replay, "--event-format", "array",
                                            doctor_flags=("--replay-endpoint", replay))
    assert status == 0, out
    assert "answers (before vLLM 0.26 layout) and holds" in line(lines, "ok", "Replay:")


def test_a_replay_endpoint_that_does_not_answer_is_a_problem(capsys, engine):
    nobody = "tcp://127.0.0.1:%d" % free_port()
    endpoint, status, lines, out = diagnose(engine, capsys, doctor_flags=("--replay-endpoint", nobody,
                                                                           "--replay-timeout", "0.5"))
    assert status == 1, out
    assert line(lines, "PROBLEM", "Replay:").startswith("Replay: %s did not answer within 0.5 s" % nobody)


def test_another_engines_replay_endpoint_is_a_problem(capsys, engine):
    replay = "tcp://127.0.0.1:%d" % free_port()
    engine("--replay-endpoint", replay)       # an engine of its own, which never published
    endpoint, status, lines, out = diagnose(engine, capsys, doctor_flags=("--replay-endpoint", replay))
    assert status == 1, out
    assert "but does not hold batch" in line(lines, "PROBLEM", "Replay:")


# -- data-parallel ranks -----------------------------------------------------------------------------

def test_every_data_parallel_rank_is_checked_on_its_port(capsys):
    port = free_port(2)
    sim = InProcessSim("--zmq-endpoint", "tcp://*:%d" % port, "--mode", "echo", "--data-parallel-size", "2")
    try:
        endpoint = "tcp://127.0.0.1:%d" % port
        with Feeder([sim.client_of(0), sim.client_of(1)]):
            status, lines, out = doctor(capsys, "--engine", endpoint, "--data-parallel-size", "2")
            assert status == 0, out
            line(lines, "ok", "Data-parallel rank 0 publishes on %s." % endpoint)
            line(lines, "ok", "Data-parallel rank 1 publishes on tcp://127.0.0.1:%d." % (port + 1))
            line(lines, "ok", "Events arrive from tcp://127.0.0.1:%d (rank 1)" % (port + 1))
            # rank 1's endpoint alone: the doctor says the engine runs data parallel
            status, lines, out = doctor(capsys, "--engine", "tcp://127.0.0.1:%d" % (port + 1))
        assert status == 0, out
        assert "carries data-parallel rank(s) 1: the engine runs data parallel" in line(lines, "note", "tcp://")
    finally:
        sim.close()


def test_a_rank_listened_to_at_the_wrong_port_is_a_problem(capsys):
    # two engines of one rank each stand where a data-parallel engine's ranks would
    port = free_port(2)
    sims = [InProcessSim("--zmq-endpoint", "tcp://*:%d" % (port + r), "--mode", "echo") for r in range(2)]
    try:
        with Feeder([s.client for s in sims]):
            status, lines, out = doctor(capsys, "--engine", "tcp://127.0.0.1:%d" % port, "--data-parallel-size", "2")
        assert status == 1, out
        assert line(lines, "PROBLEM", "tcp://").startswith(
            "tcp://127.0.0.1:%d carries batches of data-parallel rank(s) 0, not 1" % (port + 1))
    finally:
        for s in sims:
            s.close()


# -- topologies and transports ---------------------------------------------------------------------------

def test_bind_mode_engines_connect_to_the_doctor(capsys):
    # llm-d's topology: the engine connects to kvcm's bound SUB; the doctor binds in its place
    port = free_port()
    sim = InProcessSim("--zmq-endpoint", "tcp://127.0.0.1:%d" % port, "--mode", "echo")
    try:
        with Feeder([sim.client]):
            status, lines, out = doctor(capsys, "--engine", "tcp://*:%d" % port)
        assert status == 0, out
        line(lines, "ok", "Block hashes match")
    finally:
        sim.close()


def test_an_ipc_endpoint_works(capsys, tmp_path):
    endpoint = "ipc://%s" % (tmp_path / "engine.sock")
    sim = InProcessSim("--zmq-endpoint", endpoint, "--mode", "echo")
    try:
        with Feeder([sim.client]):
            status, lines, out = doctor(capsys, "--engine", endpoint)
        assert status == 0, out
        line(lines, "ok", "Events arrive from %s:" % endpoint)
    finally:
        sim.close()


def test_silence_is_a_problem(capsys):
    endpoint = "tcp://127.0.0.1:%d" % free_port()
    status = cli.main(["doctor", "--engine", endpoint, "--duration", "0.3"])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "No events arrived from %s in" % endpoint in out
    assert "send it a request while the doctor listens" in out


# -- token ids and the tokenizer ---------------------------------------------------------------------------

def test_the_tokenizer_the_engine_uses_matches(capsys, engine):
    qwen = str(TOKENIZERS / "qwen2.5-instruct")
    _, endpoint, feeder = engine("--tokenizer", qwen)
    with feeder:
        status, lines, out = doctor(capsys, "--engine", endpoint, "--tokenizer", qwen)
        assert status == 0, out
        line(lines, "ok", "Tokenizer: %s encodes the text of the" % qwen)
        llama = str(TOKENIZERS / "llama-3.2-instruct")
        status, lines, out = doctor(capsys, "--engine", endpoint, "--tokenizer", llama)
    assert status == 1, out
    assert "the engine uses another tokenizer" in line(lines, "PROBLEM", "Tokenizer:")


def test_token_ids_outside_the_tokenizer_are_a_problem(capsys, engine):
    # the simulator's word tokenizer has ids far beyond gpt2's vocabulary
    endpoint, status, lines, out = diagnose(engine, capsys, doctor_flags=("--tokenizer", str(TOKENIZERS / "gpt2")))
    assert status == 1, out
    assert "past the 50257 ids of" in line(lines, "PROBLEM", "Tokenizer:")


class Looping:
    """A vLLM-compatible publisher bound on a free port, sending batches from a thread until
    closed: what the simulator cannot get wrong."""

    def __init__(self, make_batch, **publisher):
        self.pub = Publisher("tcp://*:%d" % free_port(), topic="kv@pod-x@%s" % MODEL, **publisher)
        self.endpoint = self.pub.endpoint.replace("0.0.0.0", "127.0.0.1")
        self.make_batch = make_batch
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self):
        n = 0
        while not self.stop.wait(0.02):
            n += 1
            self.make_batch(self.pub, n)

    def close(self):
        self.stop.set()
        self.thread.join(30)
        self.pub.close()


def diagnose_publisher(capsys, send, *flags):
    """(exit status, lines, output) of the doctor on a Looping publisher calling send(pub, n)."""
    looping = Looping(send)
    try:
        return doctor(capsys, "--engine", looping.endpoint, *flags)
    finally:
        looping.close()


def fresh_run(n):
    ids = tokens(n, 2)
    return block_stored(list(HASHER.keys(ids)), None, ids, 16)


@pytest.mark.parametrize("offset, healthy", [(-30.0, False), (45.0, False), (0.0, True)])
def test_clock_skew_of_event_timestamps(capsys, offset, healthy):
    def send(pub, n):
        pub.publish([fresh_run(n)], ts=time.time() + offset)
    status, lines, out = diagnose_publisher(capsys, send, "--max-skew", "10")
    assert status == (0 if healthy else 1), out
    if healthy:
        line(lines, "ok", "Clock: event timestamps are")
    else:
        problem = line(lines, "PROBLEM", "Clock:")
        assert ("%s this host's clock" % ("behind" if offset < 0 else "ahead of")) in problem
        assert "more than --max-skew 10 s" in problem


def test_malformed_messages_and_token_less_stores_are_problems(capsys):
    def send(pub, n):
        pub.send_frames([b"kv@pod-x@m", b"\x00" * 8])                 # two frames
        pub.publish([block_stored([n + 1], None, [], 16)])           # a GPU store without token ids
        pub.publish([fresh_run(n)])
    status, lines, out = diagnose_publisher(capsys, send)
    assert status == 1, out
    assert "GPU BlockStored events carry none, so kvcm can neither check their hashes" in \
        line(lines, "PROBLEM", "Token ids:")
    assert "had 2 frames instead of 3; kvcm drops them." in out


def test_bytes_hashes_are_described(capsys):
    def send(pub, n):
        ids = tokens(n, 2)
        digests = [d for d in HASHER.digests(ids)]
        pub.publish([block_stored(digests, None, ids, 16)])
    status, lines, out = diagnose_publisher(capsys, send)
    assert status == 0, out
    assert "block hashes as bytes (VLLM_KV_EVENTS_USE_INT_BLOCK_HASHES=0" in line(lines, "ok", "Format:")
    line(lines, "ok", "Block hashes match")


# -- the command line ---------------------------------------------------------------------------------

def test_the_exit_status_and_output_of_the_command(tmp_path):
    """`python -m kvcm doctor` against a `kvcm sim` process configured with another seed."""
    port = free_port()
    sim = Sim("--zmq-endpoint", "tcp://*:%d" % port, "--mode", "echo", "--hash-seed", "42")
    try:
        with Feeder([sim.client]):
            done = subprocess.run([sys.executable, "-m", "kvcm", "doctor", "--engine", "tcp://127.0.0.1:%d" % port,
                                   "--duration", DURATION], cwd=ROOT, env=clean_env(), capture_output=True,
                                  text=True, timeout=120)
    finally:
        sim.stop()
        sim.close()
    assert done.returncode == 1, done
    assert done.stderr == "", done.stderr      # the sink's warning is the report's, not a log line
    assert "PROBLEM  Block hashes do not match: model 'Qwen/Qwen3-0.6B': the engines' block hashes match " \
           "--hash-algo sha256 --hash-seed '42'" in done.stdout


@pytest.mark.parametrize("args, message", [
    (["--engine", "tcp://nowhere"], "--engine 'tcp://nowhere': expected tcp://HOST:PORT"),
    (["--engine", "tcp://127.0.0.1:1", "--block-size", "0"], "--block-size must be positive"),
    (["--engine", "tcp://127.0.0.1:1", "--duration", "0"], "--duration must be positive"),
    (["--engine", "tcp://127.0.0.1:1", "--replay-timeout", "-1"], "--replay-timeout must be positive"),
    (["--engine", "tcp://127.0.0.1:1", "--hash-algo", "kvcm"], "cannot be an engine's"),
])
def test_bad_arguments_are_usage_errors(capsys, args, message):
    assert cli.main(["doctor", *args]) == 2
    assert message in capsys.readouterr().err


def test_engine_or_url_is_required(capsys):
    with pytest.raises(SystemExit) as exit:
        cli.main(["doctor"])
    assert exit.value.code == 2
    assert "one of the arguments --engine --url is required" in capsys.readouterr().err


# -- a running kvcm --------------------------------------------------------------------------------------

def test_url_reports_the_streams_of_a_running_kvcm(capsys):
    serve = Serve()
    good = Sim("--zmq-endpoint", serve.zmq_endpoint, "--mode", "echo")
    try:
        pod = "127.0.0.1:%d" % good.port
        connect(serve, good.client, pod, MODEL)
        good.client.complete(model=MODEL, prompt="a b c d e f g h i j k l m n o p q r s t", max_tokens=1)
        until(lambda: any(s["blocks"].get("gpu") for s in serve.streams()), "blocks in kvcm")
        status, lines, out = doctor(capsys, "--url", serve.client.url)
        assert status == 0, out
        line(lines, "ok", "Ready.")
        assert line(lines, "ok", "Stream %s / %s / rank 0:" % (pod, MODEL)).startswith(
            "Stream %s / %s / rank 0: ok, last seq" % (pod, MODEL))
        assert "kvcm at %s (version " % serve.client.url in out

        # an engine with another seed switches the model to kvcm's own hashes: the doctor says why
        bad = Sim("--zmq-endpoint", serve.zmq_endpoint, "--mode", "echo", "--hash-seed", "42")
        try:
            connect(serve, bad.client, "127.0.0.1:%d" % bad.port, MODEL)
            bad.client.complete(model=MODEL, prompt="another prompt of more than sixteen words " * 3, max_tokens=1)
            until(lambda: serve.client.ok("GET", "/v1/status")["namespaces"][0]["diagnosis"], "the mismatch")
            status, lines, out = doctor(capsys, "--url", serve.client.url)
        finally:
            bad.stop()
            bad.close()
        assert status == 1, out
        assert "the engines' block hashes match --hash-algo sha256 --hash-seed '42'" in \
            line(lines, "PROBLEM", "Model 'Qwen/Qwen3-0.6B' is keyed with kvcm's own hashes:")
    finally:
        good.stop()
        good.close()
        serve.stop()
        serve.close()


def test_url_reports_a_degraded_stream_and_drops(capsys):
    serve = Serve()
    pub = Publisher(serve.zmq_endpoint, topic="kv@pod-g@%s" % MODEL)
    try:
        def seen():
            pub.publish([])
            return any(s["pod"] == "pod-g" for s in serve.streams())
        until(seen, "kvcm to see pod-g")
        pub.publish([], seq=pub.next_seq + 5)                  # a gap, and no replay endpoint
        pub.send_frames([b"kv@no-model", b"\x00" * 8, b"\x90"])
        until(lambda: [s for s in serve.streams() if s["state"] == "degraded"], "the gap")
        until(lambda: serve.client.ok("GET", "/v1/status")["drops"]["messages"], "the drop")
        status, lines, out = doctor(capsys, "--url", serve.client.url)
    finally:
        pub.close()
        serve.stop()
        serve.close()
    assert status == 1, out
    assert "degraded" in line(lines, "PROBLEM", "Stream pod-g / %s / rank 0:" % MODEL)
    assert line(lines, "PROBLEM", "1 message dropped (topic)")


def test_url_without_kvcm_is_a_problem(capsys):
    url = "http://127.0.0.1:%d" % free_port()
    status, lines, out = doctor(capsys, "--url", url)
    assert status == 1, out
    assert line(lines, "PROBLEM", "kvcm does not answer at %s:" % url)
