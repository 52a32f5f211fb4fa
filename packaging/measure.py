"""Measures the frozen binary: size, start to READY=1 (onefile, onedir, and `python -m kvcm`
from the venv for comparison) and RSS at idle; prints a Markdown section for
benchmarks/RESULTS.md.

    .venv/bin/python packaging/measure.py [--runs 9] [--tokenizer DIR]

Each start runs `kvcm serve` on free loopback ports in a bare environment (system PATH,
fresh HOME and TMPDIR) with a fake NOTIFY_SOCKET, and times from spawning the process to
receiving READY=1 (kvcm sends it once its ZMQ and HTTP sockets listen). RSS is read from
/proc after 2 s of idling, summed over the bootloader and the interpreter for onefile: once
with no tokenizer, once after a request has loaded the Qwen2.5 fixture tokenizer.
One warm-up start precedes the timed ones (page cache).
"""

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONEFILE = os.path.join(ROOT, "dist", "kvcm")
ONEDIR = os.path.join(ROOT, "dist", "kvcm-onedir", "kvcm")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_kib(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return [int(p) for p in f.read().split()]
    except FileNotFoundError:
        return []


def tokenize(port):
    """One /v1/tokenize request: tokenizers load on first use."""
    import json
    import urllib.request

    request = urllib.request.Request("http://127.0.0.1:%d/v1/tokenize" % port, method="POST",
                                     data=json.dumps({"model": "Qwen/Qwen3-0.6B", "prompt": "hello"}).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        response.read()


def start_once(command, extra_args, idle=0.0):
    """(seconds to READY=1, RSS KiB after `idle` s or None). With a --tokenizer in
    extra_args, one tokenize request loads it before idling."""
    workdir = tempfile.mkdtemp(prefix="kvcm-measure-", dir="/tmp")
    os.mkdir(os.path.join(workdir, "home"))
    os.mkdir(os.path.join(workdir, "tmp"))
    notify_path = os.path.join(workdir, "notify")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(notify_path)
    sock.settimeout(60)
    env = {"PATH": "/usr/bin:/bin", "HOME": os.path.join(workdir, "home"),
           "TMPDIR": os.path.join(workdir, "tmp"), "NOTIFY_SOCKET": notify_path}
    port = free_port()
    args = ["serve", "--http-host", "127.0.0.1", "--http-port", str(port),
            "--zmq-bind", "tcp://127.0.0.1:%d" % free_port(), "--log-level", "warning", *extra_args]
    begin = time.perf_counter()
    proc = subprocess.Popen([*command, *args], env=env, cwd=ROOT, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        while True:
            message = sock.recv(65536).decode()
            if "READY=1" in message.split("\n"):
                break
        elapsed = time.perf_counter() - begin
        rss = None
        if idle:
            if "--tokenizer" in extra_args:
                tokenize(port)
            time.sleep(idle)
            rss = rss_kib(proc.pid) + sum(rss_kib(c) for c in children(proc.pid))
        proc.terminate()
        if proc.wait(30) != 0:
            raise RuntimeError("%s exited with %s" % (command, proc.returncode))
        return elapsed, rss
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        shutil.rmtree(workdir, ignore_errors=True)


def measure(command, runs, extra_args):
    start_once(command, extra_args)                 # warm-up
    times = [start_once(command, extra_args)[0] for _ in range(runs)]
    _, rss = start_once(command, extra_args, idle=2.0)
    _, rss_tok = start_once(command, extra_args + tokenizer_args, idle=2.0) if tokenizer_args else (None, None)
    return times, rss, rss_tok


def du(path):
    total = 0
    for base, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(base, name))
    return total


tokenizer_args = []


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--tokenizer", default=os.path.join(ROOT, "..", "shared", "fixtures", "tokenizers",
                                                           "qwen2.5-instruct"),
                        help="a tokenizer directory for the RSS-with-tokenizer figure")
    args = parser.parse_args()
    if os.path.isdir(args.tokenizer):
        tokenizer_args[:] = ["--tokenizer", "Qwen/Qwen3-0.6B=%s" % os.path.abspath(args.tokenizer)]

    rows = []
    for label, command in (("onefile `dist/kvcm`", [ONEFILE]), ("onedir `dist/kvcm-onedir/kvcm`", [ONEDIR]),
                           ("`python -m kvcm` (venv, for comparison)", [sys.executable, "-m", "kvcm"])):
        if not os.path.exists(command[0]):
            print("skipping %s: not built" % label, file=sys.stderr)
            continue
        times, rss, rss_tok = measure(command, args.runs, [])
        rows.append((label, times, rss, rss_tok))
        print("%s: median %.3f s" % (label, statistics.median(times)), file=sys.stderr)

    size = os.path.getsize(ONEFILE)
    out = ["| what | value |", "|---|---|",
           "| `dist/kvcm` (onefile) size | %.1f MiB (%d bytes) |" % (size / 2**20, size)]
    if os.path.isdir(os.path.dirname(ONEDIR)):
        out.append("| `dist/kvcm-onedir/` size | %.1f MiB |" % (du(os.path.dirname(ONEDIR)) / 2**20))
    out += ["", "| start → READY=1 (%d runs) | median | min | max | RSS idle | RSS idle, Qwen tokenizer loaded |" % args.runs,
            "|---|---|---|---|---|---|"]
    for label, times, rss, rss_tok in rows:
        out.append("| %s | **%.0f ms** | %.0f ms | %.0f ms | %.1f MiB | %s |" % (
            label, statistics.median(times) * 1e3, min(times) * 1e3, max(times) * 1e3, rss / 1024,
            "%.1f MiB" % (rss_tok / 1024) if rss_tok else "-"))
    out += ["", "Machine: %s, %d CPUs, Linux %s, glibc %s." % (
        platform.processor() or platform.machine(), os.cpu_count(), platform.release(), platform.libc_ver()[1])]
    print("\n".join(out))


if __name__ == "__main__":
    main()
