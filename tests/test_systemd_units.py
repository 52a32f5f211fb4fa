"""The systemd units (systemd/, DESIGN.md §8) against the built binary and the systemd tools
of the Debian `systemd` package, with no systemd manager running:

- `systemd-analyze verify` on copies of the units whose ExecStart= is the built binary: any
  output on stderr fails (verify exits 0 even for a misspelt setting);
- `systemd-analyze security --offline=yes`: exposure at most 2.0;
- `systemd-socket-activate` passes a listening socket, and the binary serves HTTP on it;
- the unit's kernel-level sandbox (system call filter, W^X, address families, no
  capabilities, a UID without a passwd entry; tests/sandbox.py) around the binary, which
  must still start, ingest, score, reload and stop cleanly;
- the ExecStartPre= clean-up removes the directory a killed onefile run leaves behind;
- systemd/kvcm.env is exactly what kvcm.config.Config.as_env_file() generates.

Without the tools or the binary the tests skip, naming what is missing; under CI=true
(.ci/run installs both) they fail instead.
"""

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile

import pytest

from captures import load_captures
from conftest import ROOT
from frozen import (IN_CI, ONEFILE, TOKENIZER, WAIT, Notify, Server, bare_env, built, check_template_workers,
                    expected_scores, free_port, leftovers, parent_of, publish, until)
from kvcm.config import Config, load_config

UNITS = ROOT / "systemd"
INSTALLED_BINARY = "/usr/local/bin/kvcm"
MAX_EXPOSURE = 2.0
SANDBOX_UID = 61234          # in DynamicUser='s range (61184-65519), with no passwd entry


def tool(name):
    path = shutil.which(name)
    if path is None:
        message = "%s is not installed (Debian package systemd; .ci/run installs it)" % name
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path


def service_settings():
    sys.path.insert(0, os.path.dirname(__file__))
    from sandbox import service_settings as parse

    return parse(UNITS / "kvcm.service")


@pytest.fixture
def units(tmp_path):
    """Copies of the units with ExecStart= pointing at the built binary."""
    binary = built(ONEFILE)
    out = tmp_path / "units"
    out.mkdir()
    for name in ("kvcm.service", "kvcm.socket"):
        text = (UNITS / name).read_text()
        if name == "kvcm.service":
            assert INSTALLED_BINARY in text
            text = text.replace(INSTALLED_BINARY, str(binary))
        (out / name).write_text(text)
    return out


# -- static checks ------------------------------------------------------------------------------

def test_env_file_is_the_generated_one():
    committed = (UNITS / "kvcm.env").read_text()
    assert committed == Config.as_env_file(), (
        "systemd/kvcm.env is stale; regenerate it: .venv/bin/python -c "
        "'from kvcm.config import Config; print(Config.as_env_file(), end=\"\")' > systemd/kvcm.env")


def test_env_file_defaults_are_the_defaults():
    """Uncommenting every line of the example file changes nothing."""
    environ = {}
    for line in (UNITS / "kvcm.env").read_text().splitlines():
        match = re.fullmatch(r"#(KVCM_[A-Z_]+)=(.*)", line)
        if match:
            environ[match.group(1)] = match.group(2)
    assert "KVCM_HTTP_PORT" in environ and "KVCM_ZMQ_BIND" in environ
    assert load_config([], environ=environ) == load_config([], environ={})


REQUIRED = {
    "Type": "notify", "NotifyAccess": "all", "KillMode": "mixed", "Restart": "on-failure",
    "DynamicUser": "yes", "StateDirectory": "kvcm", "CacheDirectory": "kvcm",
    "ConfigurationDirectory": "kvcm", "EnvironmentFile": "-/etc/kvcm/kvcm.env",
    "ExecReload": "/bin/kill -HUP $MAINPID", "Environment": "TMPDIR=%C/kvcm",
    "ProtectSystem": "strict", "PrivateTmp": "yes", "MemoryDenyWriteExecute": "yes",
    "CapabilityBoundingSet": "", "SystemCallErrorNumber": "EPERM",
}


def test_the_service_has_the_settings_the_binary_relies_on():
    settings = service_settings()
    for key, value in REQUIRED.items():
        assert settings.get(key, [None])[-1] == value, "%s=%s expected, got %s" % (key, value, settings.get(key))
    assert settings["ExecStart"] == [INSTALLED_BINARY + " serve"]
    assert "KVCM_STATE_DIR=%S/kvcm" in settings["Environment"]   # snapshots in StateDirectory=
    assert "WatchdogSec" in settings and "LimitNOFILE" in settings
    assert settings["SystemCallFilter"][0] == "@system-service"
    assert "sched_setscheduler" in " ".join(settings["SystemCallFilter"][1:])
    assert settings["RestrictAddressFamilies"][-1].split()[:3] == ["AF_INET", "AF_INET6", "AF_UNIX"]


# -- systemd-analyze ----------------------------------------------------------------------------

def verify(directory, *names):
    return subprocess.run([tool("systemd-analyze"), "verify", *names], cwd=directory,
                          capture_output=True, text=True, timeout=60)


def test_verify_prints_nothing(units):
    proc = verify(units, "kvcm.service", "kvcm.socket")
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
    assert proc.stdout == "", proc.stdout


def test_verify_would_catch_a_typo(units):
    """The check above is worth something: verify reports unknown settings only on stderr."""
    path = units / "kvcm.service"
    path.write_text(path.read_text().replace("ProtectSystem=strict", "ProtectSytem=strict"))
    proc = verify(units, "kvcm.service")
    assert "ProtectSytem" in proc.stderr, (proc.returncode, proc.stderr)


def exposure(path):
    proc = subprocess.run([tool("systemd-analyze"), "security", "--offline=yes", "--no-pager",
                           "--threshold=%d" % (MAX_EXPOSURE * 10), str(path)],
                          capture_output=True, text=True, timeout=60)
    match = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", proc.stdout)
    assert match, (proc.returncode, proc.stdout[-2000:], proc.stderr)
    failed = [line for line in proc.stdout.splitlines() if line.startswith("✗")]
    return float(match.group(1)), proc.returncode, failed


def test_security_exposure_is_at_most_2(units):
    value, returncode, failed = exposure(units / "kvcm.service")
    assert value <= MAX_EXPOSURE and returncode == 0, "exposure %.1f; not met:\n%s" % (value, "\n".join(failed))


def test_security_measure_sees_the_hardening(units):
    """A unit without the hardening scores far worse: the measure above is not vacuous."""
    plain = units / "plain.service"
    plain.write_text("[Service]\nExecStart=%s serve\n" % ONEFILE)
    assert exposure(plain)[0] > 9.0


# -- socket activation --------------------------------------------------------------------------

def test_socket_activation_serves_http_on_the_passed_socket(tmp_path):
    activate = tool("systemd-socket-activate")
    binary = built(ONEFILE)
    env = bare_env(tmp_path)
    notify = Notify()
    port, unused_port, zmq_port = free_port(), free_port(), free_port()
    log = open(tmp_path / "stderr", "w+")
    proc = subprocess.Popen(
        [activate, "-l", "127.0.0.1:%d" % port, "--fdname=http",
         *("-E%s=%s" % kv for kv in dict(env, NOTIFY_SOCKET=notify.path).items()),
         str(binary), "serve", "--http-host", "127.0.0.1", "--http-port", str(unused_port),
         "--zmq-bind", "tcp://127.0.0.1:%d" % zmq_port],
        env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    try:
        # systemd-socket-activate listens first and starts kvcm on the first connection,
        # which waits in the backlog until kvcm serves it.
        until(lambda: _can_connect(port), "systemd-socket-activate to listen")
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as conn:
            conn.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            reply = _read_all(conn)
        assert reply.startswith(b"HTTP/1.1 200") and reply.endswith(b'{"status":"ok"}'), reply
        pid, ready = until(lambda: notify.find("READY=1"), "READY=1")
        assert parent_of(pid) == proc.pid          # the interpreter, child of the bootloader
        assert "http 127.0.0.1:%d" % port in ready
        assert not _can_connect(unused_port), "kvcm bound its own port although it was given one"
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT) == 0
        log.seek(0)
        assert "kvcm serving: http 127.0.0.1:%d" % port in log.read()
        assert leftovers(env) == []
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        log.close()
        notify.close()


def _can_connect(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
        return True
    except OSError:
        return False


def _read_all(conn):
    chunks = []
    while True:
        data = conn.recv(65536)
        if not data:
            return b"".join(chunks)
        chunks.append(data)


# -- the unit's sandbox around the binary --------------------------------------------------------

@pytest.fixture
def sandbox_env(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("the sandbox test switches to another UID: run it as root (CI does)")
    try:
        import ctypes.util

        if not ctypes.util.find_library("seccomp"):
            raise OSError
    except OSError:
        pytest.skip("libseccomp is not installed (Debian package libseccomp2, a dependency of systemd)")
    tool("systemd-analyze")
    env = bare_env(tmp_path)
    # As systemd does for DynamicUser=: the cache directory (TMPDIR=%C/kvcm) and the state
    # directory (KVCM_STATE_DIR=%S/kvcm) belong to the service's UID; HOME is /. (Not under tmp_path: pytest's directories are private.)
    cache = tempfile.mkdtemp(prefix="kvcm-cache-", dir="/tmp")
    state = tempfile.mkdtemp(prefix="kvcm-state-", dir="/tmp")
    for directory in (cache, state):
        os.chown(directory, SANDBOX_UID, SANDBOX_UID)
    yield dict(env, HOME="/", TMPDIR=cache, CACHE_DIRECTORY=cache, STATE_DIRECTORY=state, KVCM_STATE_DIR=state)
    shutil.rmtree(cache, ignore_errors=True)
    shutil.rmtree(state, ignore_errors=True)


def _thread_cpus(pid, name):
    """Cpus_allowed_list of process pid's thread called name."""
    for tid in os.listdir("/proc/%d/task" % pid):
        with open("/proc/%d/task/%s/comm" % (pid, tid)) as f:
            if f.read().strip() == name:
                with open("/proc/%d/task/%s/status" % (pid, tid)) as f:
                    return re.search(r"^Cpus_allowed_list:\s+(\S+)", f.read(), re.M).group(1)
    raise AssertionError("no thread %r in process %d" % (name, pid))


def test_the_binary_works_inside_the_units_sandbox(sandbox_env, tmp_path, shared):
    """SystemCallFilter= (with SystemCallErrorNumber=EPERM), MemoryDenyWriteExecute=,
    RestrictAddressFamilies=, RestrictRealtime=, CapabilityBoundingSet= and another UID,
    enforced by the kernel as systemd 252 sets them up. Without sched_setscheduler libzmq
    aborts at start; without AF_NETLINK it aborts binding tcp://127.0.0.1:PORT; without
    sched_setaffinity kvcm refuses --http-cpus and --ingest-cpus."""
    # The binary and the tokenizer as an installation has them: readable by any UID, wherever
    # this checkout lives.
    installed = tempfile.mkdtemp(prefix="kvcm-installed-", dir="/tmp")
    os.chmod(installed, 0o755)
    binary = shutil.copy(built(ONEFILE), os.path.join(installed, "kvcm"))
    tokenizer = shutil.copytree(TOKENIZER, os.path.join(installed, "tokenizer"))
    for base, dirs, files in os.walk(installed):
        for name in dirs + files:
            os.chmod(os.path.join(base, name), 0o755 if name in dirs or name == "kvcm" else 0o644)
    captures = [c for c in load_captures(shared) if c.version == "0.33.0"]
    prefix = [sys.executable, ROOT / "tests" / "sandbox.py", UNITS / "kvcm.service", SANDBOX_UID, "--"]
    server = Server(binary, sandbox_env, "--trust-request-chat-template", prefix=prefix, notify_mode=0o666,
                    tokenizer=tokenizer)
    try:
        pid, _ = server.wait_for("READY=1")
        with open("/proc/%d/status" % pid) as f:
            status = f.read()
        assert re.search(r"^Uid:\s+%d\b" % SANDBOX_UID, status, re.M), status
        assert re.search(r"^Seccomp:\s+2\b", status, re.M) and re.search(r"^CapBnd:\s+0+$", status, re.M)
        assert re.search(r"^NoNewPrivs:\s+1\b", status, re.M)

        publish(server, captures)
        for name, tokens, scores in expected_scores(captures):
            assert server.ok("POST", "/v1/score", {"model": name, "token_ids": tokens})["scores"] == \
                pytest.approx(scores)
        # template workers: started, limited (setrlimit is prlimit64, which the filter allows),
        # killed and replaced under the same filter
        for worker in check_template_workers(server, pid):
            with open("/proc/%d/status" % worker) as f:
                assert re.search(r"^Seccomp:\s+2\b", f.read(), re.M)
        until(lambda: server.notify.count("WATCHDOG=1") >= 1, "a WATCHDOG=1 ping")
        server.proc.send_signal(signal.SIGHUP)
        until(lambda: "SIGHUP: reloaded" in server.stderr(), "the SIGHUP reload")
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(WAIT) == 0, server.stderr()
        assert leftovers(sandbox_env) == []
        assert "Operation not permitted" not in server.stderr(), server.stderr()
        # StateDirectory=: SIGTERM wrote a snapshot (fsync, rename, the directory's fsync under
        # the filter) and the next start loads it
        assert os.path.getsize(os.path.join(sandbox_env["STATE_DIRECTORY"], "index.snapshot")) > 0
        # placed (sched_setaffinity, which the filter allows): the loop and the ingest apart
        cpus = sorted(os.sched_getaffinity(0))
        again = Server(binary, sandbox_env, "--http-cpus", str(cpus[0]), "--ingest-cpus", str(cpus[-1]),
                       prefix=prefix, notify_mode=0o666, tokenizer=tokenizer)
        try:
            again_pid, _ = again.wait_for("READY=1")
            assert _thread_cpus(again_pid, "kvcm-ingest") == str(cpus[-1])
            # the captures' streams come back; without replay endpoints they are cleared
            assert re.search(r"restored \d+ entries and [1-9]\d* streams", again.stderr()), again.stderr()
            assert "cannot be resumed from its snapshot (it has no replay endpoint)" in again.stderr()
            again.proc.send_signal(signal.SIGTERM)
            assert again.proc.wait(WAIT) == 0, again.stderr()
            assert "Operation not permitted" not in again.stderr(), again.stderr()
        finally:
            again.close()
    finally:
        server.close()
        shutil.rmtree(installed, ignore_errors=True)


# -- ExecStartPre: stale extraction directories ---------------------------------------------------

def test_exec_start_pre_removes_what_a_killed_onefile_run_left(tmp_path):
    """SIGKILL to the bootloader and the interpreter (systemd's last resort, or a watchdog
    abort) leaves $TMPDIR/_MEIxxxxxx behind; the unit's ExecStartPre= removes it and only
    it, through the /var/cache/kvcm -> private/kvcm symlink DynamicUser= makes."""
    binary = built(ONEFILE)
    root = tmp_path / "var-cache"
    (root / "private" / "kvcm").mkdir(parents=True)
    (root / "kvcm").symlink_to("private/kvcm")
    cache = root / "kvcm"
    (cache / "keep.txt").write_text("not ours to remove")
    (cache / "_MEI-stale-file").write_text("x")

    env = dict(bare_env(tmp_path), TMPDIR=str(cache))
    notify = Notify()
    proc = subprocess.Popen([str(binary), "serve", "--http-host", "127.0.0.1", "--http-port", "0",
                             "--zmq-bind", "tcp://127.0.0.1:%d" % free_port()],
                            env=dict(env, NOTIFY_SOCKET=notify.path), stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid, _ = until(lambda: notify.find("READY=1"), "READY=1")
        os.kill(pid, signal.SIGKILL)
        proc.kill()
        proc.wait()
        until(lambda: not os.path.exists("/proc/%d/stat" % pid) or _zombie(pid), "the interpreter to die")
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    stale = leftovers(env)
    assert any(os.path.isdir(cache / d) for d in stale), "a SIGKILLed run leaves its directory: %s" % stale

    (pre,) = service_settings()["ExecStartPre"]
    command = shlex.split(pre.lstrip("-").replace("%C", str(root)))
    subprocess.run(command, check=True, timeout=30)
    assert sorted(os.listdir(cache)) == ["keep.txt"]
    assert (root / "kvcm").is_symlink()


def _zombie(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True
