"""Snapshot files that cannot be trusted, and writes that fail: a damaged, truncated,
foreign or empty file, one from other hash settings, or a directory in its place, is moved
aside and kvcm starts empty, never half-loaded; a full disk or an unwritable directory
leaves the previous snapshot as it was. An Indexer per start, on a real event loop, and one
`kvcm serve` to show that a bad file never stops the service."""

import asyncio
import os

import pytest

from serving import serve  # noqa: F401  (a fixture)

from kvcm.config import load_config
from kvcm.indexer import Indexer

SNAPSHOT = "index.snapshot"


def indexer(state_dir, *flags):
    return Indexer(load_config(["--state-dir", str(state_dir), "--zmq-bind", "tcp://127.0.0.1:0", *flags]))


def run(coro):
    return asyncio.run(coro)


def filled(state_dir, *flags):
    ix = indexer(state_dir, *flags)
    for i in range(200):
        ix.index.store("m", "pod-%d" % (i % 3), "gpu" if i % 2 else "cpu", [i, i + 1000])
    ix.sink.adopt_namespace("m", "parity")
    return ix


@pytest.fixture
def good(tmp_path):
    """A state directory holding a good snapshot; returns (dir, its bytes)."""
    assert run(filled(tmp_path).state.write())
    return tmp_path, (tmp_path / SNAPSHOT).read_bytes()


def restored(state_dir, *flags):
    ix = indexer(state_dir, *flags)
    source = run(ix.state.restore())
    return ix, source


def test_a_good_snapshot_restores_everything(good):
    state_dir, _ = good
    ix, source = restored(state_dir)
    assert source == str(state_dir / SNAPSHOT)
    assert ix.index.stats() == filled(state_dir / "other").index.stats()
    assert ix.state.last["entries_restored"] == 400


def damaged_variants(data):
    out = {"tenth-%d" % k: data[:len(data) * k // 10] for k in range(1, 10)}
    out["empty"] = b""
    out["last-byte-short"] = data[:-1]
    for name, where in (("version", 9), ("third", len(data) // 3), ("half", len(data) // 2),
                        ("end-frame", len(data) - 35), ("checksum", len(data) - 1)):
        flipped = bytearray(data)
        flipped[where] ^= 0x01
        out["flipped-" + name] = bytes(flipped)
    out["foreign"] = b"PK\x03\x04" + data[4:]
    out["other-version"] = data[:8] + (99).to_bytes(4, "little") + data[12:]
    out["trailing"] = data + b"\x00"
    return out


@pytest.mark.parametrize("variant", sorted(damaged_variants(b"x" * 100)))
def test_a_damaged_file_is_moved_aside_and_kvcm_starts_empty(good, variant):
    state_dir, data = good
    bad = damaged_variants(data)[variant]
    (state_dir / SNAPSHOT).write_bytes(bad)
    ix, source = restored(state_dir)
    assert source is None
    assert len(ix.index) == 0 and ix.index.stats()["entries"] == 0 and ix.ingest.streams() == []
    assert not (state_dir / SNAPSHOT).exists()
    assert (state_dir / (SNAPSHOT + ".rejected")).read_bytes() == bad
    assert ix.state.counters["snapshots_rejected"] == 1


@pytest.mark.parametrize("flags", [("--hash-seed", "42"), ("--block-size", "32"), ("--hash-algo", "sha256_cbor"),
                                   ("--hash-mode", "kvcm")])
def test_a_snapshot_of_other_hash_settings_is_refused(good, flags):
    state_dir, data = good
    ix, source = restored(state_dir, *flags)
    assert source is None and len(ix.index) == 0
    assert (state_dir / (SNAPSHOT + ".rejected")).read_bytes() == data


def test_a_directory_where_the_file_should_be(tmp_path):
    (tmp_path / SNAPSHOT).mkdir()
    (tmp_path / SNAPSHOT / "junk").write_text("x")
    ix, source = restored(tmp_path)
    assert source is None and len(ix.index) == 0
    assert (tmp_path / (SNAPSHOT + ".rejected") / "junk").exists()
    assert run(filled(tmp_path).state.write())    # and the next snapshot lands where it belongs
    assert restored(tmp_path)[1] == str(tmp_path / SNAPSHOT)


def test_a_full_disk_keeps_the_previous_snapshot(good):
    state_dir, data = good
    os.symlink("/dev/full", state_dir / (SNAPSHOT + ".tmp"))   # every write: ENOSPC
    ix = filled(state_dir)
    ix.index.store("m", "pod-new", "gpu", [5555])
    assert not run(ix.state.write())
    assert ix.state.counters["snapshot_failures"] == 1 and ix.state.counters["snapshots_written"] == 0
    assert (state_dir / SNAPSHOT).read_bytes() == data
    assert not os.path.lexists(state_dir / (SNAPSHOT + ".tmp"))
    assert run(ix.state.write())    # the space is back: the next one is written
    assert (state_dir / SNAPSHOT).read_bytes() != data


def test_an_unwritable_state_directory_is_counted(tmp_path):
    ix = filled(tmp_path / "state")
    os.makedirs(tmp_path / "state")
    run(ix.state.restore())
    os.rmdir(tmp_path / "state")
    (tmp_path / "state").write_text("a file now")      # ENOTDIR, as root too
    assert not run(ix.state.write())
    assert ix.state.counters["snapshot_failures"] == 1


def test_kvcm_serve_starts_on_a_truncated_snapshot(good, serve):
    state_dir, data = good
    (state_dir / SNAPSHOT).write_bytes(data[:len(data) // 2])
    server = serve("--state-dir", str(state_dir))
    assert server.client.ok("GET", "/v1/pods")["pods"] == []
    assert server.client.metrics()[("kvcm_snapshots_rejected_total", ())] == 1
    assert server.stop() == 0
    assert "moved to" in server.stderr()
    assert restored(state_dir)[1] is not None   # SIGTERM wrote a fresh, good one
