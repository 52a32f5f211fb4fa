"""The status page in a real browser: Debian's Chromium, headless, loads the page of a
`kvcm serve` process fed by `kvcm sim` engines. The test reads back the DOM Chromium built
(--dump-dom), compares its tables with /v1/status, and takes a screenshot, kept as an artifact
in artifacts/status-page.png (git ignores it).

Chromium comes from `make prereq-chromium` (tests/setup/chromium.sh); without it these tests
skip, and fail under CI=true."""

import os
import shutil
import struct
import subprocess
import zlib

import pytest

from conftest import ROOT
from sim_harness import Serve, Sim, connect, until
from status_page import Page

IN_CI = os.environ.get("CI") == "true"
MODEL = "Qwen/Qwen3-0.6B"
OTHER = "other/model"
HOSTILE_POD = '<img src="http://192.0.2.1/x.png">&pod'
ARTIFACTS = ROOT / "artifacts"
WINDOW = (1280, 900)


@pytest.fixture(scope="module")
def chromium():
    for name in ("chromium", "chromium-browser"):
        path = shutil.which(name)
        if path is not None:
            return path
    message = "no chromium on PATH (`make prereq-chromium` installs Debian's when run as root)"
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)


def browse(chromium, profile, url, *flags):
    """Runs headless Chromium on url; its stdout."""
    done = subprocess.run(
        [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
         "--no-default-browser-check", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-extensions", "--hide-scrollbars", "--user-data-dir=%s" % profile,
         *flags, url],
        stdin=subprocess.DEVNULL, capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    return done.stdout.decode()


def png_image(path):
    """(width, height, raw scanlines) of a non-interlaced 8-bit PNG."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, idat, header = 8, [], None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        pos += 12 + length
    width, height = header[:2]
    return width, height, zlib.decompress(b"".join(idat))


@pytest.fixture(scope="module")
def cluster():
    """kvcm serve and two simulated engines: one as kvcm expects, one of another model whose
    engine hashes with another seed and whose pod id is markup; some prompts served, one
    prompt scored warm and one cold."""
    serve = Serve()
    good = Sim("--zmq-endpoint", serve.zmq_endpoint, "--mode", "echo")
    odd = Sim("--zmq-endpoint", serve.zmq_endpoint, "--mode", "echo", "--model", OTHER, "--hash-seed", "42",
              "--pod-id", HOSTILE_POD)
    try:
        connect(serve, good.client, "127.0.0.1:%d" % good.port, MODEL)
        connect(serve, odd.client, HOSTILE_POD, OTHER)
        prompt = " ".join("doc%d" % i for i in range(100))
        good.client.complete(model=MODEL, prompt=prompt, max_tokens=1)
        good.client.complete(model=MODEL, prompt=" ".join("other%d" % i for i in range(40)), max_tokens=1)
        odd.client.complete(model=OTHER, prompt=" ".join("odd%d" % i for i in range(50)), max_tokens=1)
        held = {"127.0.0.1:%d" % good.port: len(good.client.kv_cache()["blocks"]),
                HOSTILE_POD: len(odd.client.kv_cache()["blocks"])}
        until(lambda: {s["pod"]: s["blocks"].get("gpu", 0) for s in serve.streams()} == held,
              "kvcm to hold the engines' blocks")
        serve.score(MODEL, good.client.tokens(prompt))
        serve.score(MODEL, good.client.tokens("never sent " * 20))
        yield serve
    finally:
        for process in (good, odd, serve):
            process.stop()
            process.close()


def test_chromium_shows_the_streams_and_figures_of_the_json(chromium, cluster, tmp_path):
    url = "http://127.0.0.1:%d/" % cluster.http_port
    status = cluster.client.ok("GET", "/v1/status")
    page = Page(browse(chromium, tmp_path / "profile", url, "--dump-dom"))

    assert set(page.streams) == {(s["pod"], s["model"], s["dp_rank"]) for s in status["streams"]}
    for stream in status["streams"]:
        cells = page.streams[(stream["pod"], stream["model"], stream["dp_rank"])]
        assert cells["pod"] == stream["pod"] and cells["model"] == stream["model"]
        assert cells["state"] == stream["state"] == "ok"
        assert cells["last_seq"] == "{:,}".format(stream["last_seq"])
        assert (cells["gaps"], cells["replays"], cells["restarts"]) == ("0", "0", "0")
        assert cells["hash_mode"] == stream["hash_mode"]
        assert cells["blocks_gpu"] == "{:,}".format(stream["blocks"]["gpu"])
    modes = {s["model"]: s["hash_mode"] for s in status["streams"]}
    assert modes == {MODEL: "parity", OTHER: "decoupled"}
    # the engine with another seed: the sink's diagnosis under its stream and its namespace
    diagnosis = next(ns["diagnosis"] for ns in status["namespaces"] if ns["name"] == OTHER)
    assert "--hash-seed '42'" in diagnosis
    assert page.diagnoses == [diagnosis] and page.namespaces[OTHER]["diagnosis"] == diagnosis
    assert page.figures["warm"] == "50.0 % of 2"
    assert page.figures["entries_gpu"] == "{:,}".format(status["index"]["entries_by_tier"]["gpu"])
    assert page.figures["blocks"].endswith("of 10,000,000 (< 0.1 %)")
    assert "version %s" % status["version"] in page.text and "ready" in page.text
    assert page.refresh == "5"

    # the pod id that is markup stayed text: no element came of it, nothing was loaded
    assert page.tags["img"] == 0 and page.tags["script"] == 0
    assert set(page.references) == {"/v1/status", "/metrics"}


def test_chromium_takes_a_screenshot_of_the_page(chromium, cluster, tmp_path):
    ARTIFACTS.mkdir(exist_ok=True)
    shot = ARTIFACTS / "status-page.png"
    if shot.exists():
        shot.unlink()
    url = "http://127.0.0.1:%d/?refresh=0" % cluster.http_port
    browse(chromium, tmp_path / "profile", url, "--screenshot=%s" % shot, "--window-size=%d,%d" % WINDOW)
    width, height, pixels = png_image(shot)
    assert (width, height) == WINDOW
    # a rendered page, not a blank one: many distinct byte values across the image
    assert len(set(pixels[::97])) > 16
