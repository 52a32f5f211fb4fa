"""Durable state of the in-memory index: snapshots to `--state-dir`, restore on start, and
bootstrap from a running replica (`--bootstrap-from`). The format is kvcm/snapshot.py's.

- Writing: the stream positions, then the index dump in slices (kvcm/_dump.pxi) with a
  yield to the event loop between slices, into `index.snapshot.tmp`, fsync, rename over
  `index.snapshot`, fsync the directory. A failure (disk full, unwritable directory, a dump
  that had to stop) is logged and counted and leaves the previous snapshot as it was.
- Restoring: the file is verified whole before anything is loaded; one that cannot be
  loaded (corrupt, truncated, empty, foreign, other hash settings, a directory) is renamed
  to `index.snapshot.rejected`, logged, and kvcm starts empty. After a load, every stream
  resumes through its replay endpoint (kvcm/ingest.py) or is cleared.
- With `--index redis://…` the store keeps the state; the two do not mix (Indexer refuses).
"""

import asyncio
import logging
import os
import shutil
import time
import urllib.error
import urllib.request

from kvcm import snapshot
from kvcm._core import DUMP_EMAP_RESET, DumpAborted

log = logging.getLogger("kvcm.state")

SNAPSHOT_FILE = "index.snapshot"
SLICE_ITEMS = 4096           # blocks (or engine-map entries) per slice: about 0.1 ms
BOOTSTRAP_TIMEOUT = 60.0     # seconds a peer may take to start sending, and between reads
MAX_BOOTSTRAP_BYTES = 64 << 30
WRITE_BYTES = 1 << 20        # bytes per write call
DUMP_WAIT = 30.0             # seconds a snapshot waits for another one in progress


class StateKeeper:
    """Snapshots of an Indexer's in-memory index, and their restore."""

    def __init__(self, indexer, state_dir=None, interval=60.0, bootstrap_from=None, admin_token=None):
        self.indexer = indexer
        self.dir = state_dir
        self.interval = interval
        self.bootstrap_from = bootstrap_from
        self.admin_token = admin_token
        self.path = None if state_dir is None else os.path.join(state_dir, SNAPSHOT_FILE)
        self._writing = None     # the write in progress (one at a time)
        self._task = None
        self.counters = {"snapshots_written": 0, "snapshot_failures": 0, "snapshots_rejected": 0,
                         "snapshots_streamed": 0}
        self.last = {"duration_s": None, "size_bytes": None, "good_at": None,
                     "restore_duration_s": None, "entries_restored": 0, "restored_from": None}

    # -- the byte stream ---------------------------------------------------------------------

    async def stream(self, slice_items=SLICE_ITEMS):
        """The snapshot as an async iterator of byte strings, taken while ingest goes on.
        DumpAborted when the index cannot be dumped consistently now (another dump runs,
        names were freed or a namespace changed its hash mode meanwhile)."""
        indexer = self.indexer
        writer = snapshot.Writer()
        dump = await self._dump()
        # the positions in the same loop turn as the cut's start: replaying from them
        # reaches the truth
        engines = [{"name": e.name, "endpoint": e.endpoint, "replay": e.replay, "model": e.model}
                   for e in indexer.ingest.engines]
        head = snapshot.header(indexer.config, engines, indexer.ingest.positions())
        contracts = _contracts(indexer.sink)
        try:
            yield writer.preamble()
            yield writer.json_frame(snapshot.HEADER, head)
            while True:
                chunk = dump.next(slice_items)
                if chunk is None:
                    break
                if chunk[1] or chunk[0] == DUMP_EMAP_RESET:
                    yield writer.frame(*chunk)
                await asyncio.sleep(0)
            tables = dump.tables()
            now = _contracts(indexer.sink)
            if any(now.get(name, info)[0] != info[0] for name, info in contracts.items()):
                # a namespace switched to decoupled mode: slices before the switch hold keys
                # of the old contract, which no replay removes
                raise DumpAborted("a namespace changed its hash mode during the dump")
            tables["contracts"] = now
            yield writer.json_frame(snapshot.TABLES, tables)
            yield writer.end()
        finally:
            dump.close()

    async def _dump(self):
        """Starts a dump, waiting for one in progress (another client's, or the periodic
        write) to finish first."""
        for _ in range(int(DUMP_WAIT / 0.05)):
            try:
                return self.indexer.backend.dump()
            except DumpAborted:
                await asyncio.sleep(0.05)
        return self.indexer.backend.dump()

    # -- writing -------------------------------------------------------------------------------

    async def write(self):
        """Writes a snapshot atomically; True when it did. A write already in progress is
        waited for instead of starting a second."""
        if self._writing is None:
            self._writing = asyncio.ensure_future(self._write())
            self._writing.add_done_callback(self._written)
        return await asyncio.shield(self._writing)

    def _written(self, task):
        self._writing = None

    async def _write(self):
        loop = asyncio.get_running_loop()
        tmp = self.path + ".tmp"
        started = time.monotonic()
        size = 0
        try:
            # File calls run off the loop: a write can wait on the kernel's dirty-page
            # throttling, a truncate or a rename on freeing pages, for milliseconds.
            fd = await loop.run_in_executor(None, os.open, tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb", buffering=0) as f:
                pending = []    # parts gathered into writes of WRITE_BYTES: fewer thread hops
                async for part in self.stream():
                    pending.append(part)
                    size += len(part)
                    if sum(map(len, pending)) >= WRITE_BYTES:
                        await loop.run_in_executor(None, _write_all, f, b"".join(pending))
                        pending = []
                await loop.run_in_executor(None, _write_all, f, b"".join(pending))
                await loop.run_in_executor(None, os.fsync, f.fileno())
            # replacing frees the old file's pages, which takes milliseconds: off the loop
            await loop.run_in_executor(None, _replace_synced, tmp, self.path, self.dir)
        except (OSError, DumpAborted) as exc:
            self.counters["snapshot_failures"] += 1
            log.error("snapshot to %s failed, the previous one is kept: %s", self.path, exc)
            try:
                os.unlink(tmp)
            except OSError:
                pass
            return False
        duration = time.monotonic() - started
        self.counters["snapshots_written"] += 1
        self.last.update(duration_s=duration, size_bytes=size, good_at=time.time())
        log.info("snapshot: %d bytes in %.3f s to %s", size, duration, self.path)
        return True

    async def _periodic(self):
        while True:
            await asyncio.sleep(self.interval)
            await self.write()

    def start_periodic(self):
        if self.path is not None and self._task is None:
            self._task = asyncio.ensure_future(self._periodic())

    async def close(self):
        """Stops the periodic snapshots and writes a last one (SIGTERM)."""
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self.path is not None:
            await self.write()

    # -- restoring -------------------------------------------------------------------------------

    async def restore(self):
        """Before ingest starts: loads the snapshot in --state-dir, else the peer's of
        --bootstrap-from, if any. Returns where it came from, or None (empty start)."""
        if self.path is not None:
            os.makedirs(self.dir, exist_ok=True)
            data = self._read_file()
            if data is not None and self._load(data, self.path):
                return self.path
        if self.bootstrap_from is not None:
            data = await asyncio.get_running_loop().run_in_executor(None, self._fetch_peer)
            if data is not None and self._load(data, self.bootstrap_from):
                return self.bootstrap_from
        return None

    def _read_file(self):
        if not os.path.lexists(self.path):
            return None
        try:
            with open(self.path, "rb") as f:
                return f.read()
        except OSError as exc:   # a directory in its place, unreadable
            self._reject("cannot be read: %s" % (exc.strerror or exc))
            return None

    def _load(self, data, source):
        started = time.monotonic()
        try:
            snap = snapshot.read(data, self.indexer.config)
            self.indexer.backend.load(snap.tables, snap.chunks)
        except (snapshot.SnapshotError, ValueError) as exc:
            if source == self.path:
                self._reject(str(exc))
            else:
                self.counters["snapshots_rejected"] += 1
                log.error("the snapshot from %s cannot be loaded, starting empty: %s", source, exc)
            return False
        except MemoryError:
            self.counters["snapshots_rejected"] += 1
            log.error("the snapshot from %s does not fit in memory, starting empty", source)
            return False
        sink, ingest = self.indexer.sink, self.indexer.ingest
        for name, info in snap.tables.get("contracts", {}).items():
            try:
                mode, style, lora, base = info
                sink.adopt_namespace(name, mode, style, bool(lora), base)
            except (TypeError, ValueError):
                continue
        known = {e.name for e in ingest.engines}
        for engine in snap.header.get("engines", ()):
            try:
                if engine["name"] not in known:
                    ingest.add_engine(engine["name"], engine["endpoint"], replay=engine.get("replay"),
                                      model=engine.get("model"))
            except (KeyError, TypeError, ValueError) as exc:
                log.warning("snapshot: engine %r not registered again: %s", engine, exc)
        restored = ingest.restore_streams(snap.header.get("streams", ()))
        duration = time.monotonic() - started
        entries = self.indexer.index.stats()["entries"]
        self.last.update(restore_duration_s=duration, entries_restored=entries, restored_from=source)
        log.info("restored %d entries and %d streams from %s (written by kvcm %s) in %.3f s",
                 entries, restored, source, snap.header.get("kvcm_version"), duration)
        return True

    def _reject(self, why):
        """Moves the snapshot aside (it stays for a post-mortem; the one rejected before it
        goes) and logs why."""
        self.counters["snapshots_rejected"] += 1
        aside = self.path + ".rejected"
        try:
            if os.path.isdir(aside) and not os.path.islink(aside):
                shutil.rmtree(aside)
            elif os.path.lexists(aside):
                os.unlink(aside)
            os.replace(self.path, aside)
            log.error("snapshot %s %s; moved to %s, starting empty", self.path, why, aside)
        except OSError as exc:
            log.error("snapshot %s %s, and cannot be moved aside (%s); starting empty", self.path, why, exc)

    def _fetch_peer(self):
        url = self.bootstrap_from.rstrip("/") + "/v1/snapshot"
        request = urllib.request.Request(url)
        if self.admin_token is not None:
            request.add_header("Authorization", "Bearer " + self.admin_token)
        try:
            with urllib.request.urlopen(request, timeout=BOOTSTRAP_TIMEOUT) as response:
                data = response.read(MAX_BOOTSTRAP_BYTES + 1)
        except (OSError, urllib.error.URLError, ValueError) as exc:
            self.counters["snapshots_rejected"] += 1
            log.error("cannot bootstrap from %s, starting empty: %s", url, exc)
            return None
        if len(data) > MAX_BOOTSTRAP_BYTES:
            self.counters["snapshots_rejected"] += 1
            log.error("the snapshot from %s is larger than %d bytes, starting empty", url, MAX_BOOTSTRAP_BYTES)
            return None
        return data


def _contracts(sink):
    return {name: [info["mode"], info["extra_style"], info["lora"], sink.base_model(name)]
            for name, info in sink.namespaces().items()}


def _write_all(f, data):
    view = memoryview(data)
    while view:
        view = view[f.write(view):]


def _replace_synced(tmp, path, directory):
    os.replace(tmp, path)
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
