"""The release binary runs on every supported host: glibc >= 2.28 and any x86_64 CPU.

- In a minimal Debian 11 root (glibc 2.31, `make prereq-bullseye`: debootstrap, cached in
  .cache/bullseye), as an unprivileged user, through packaging/in-root.sh: `kvcm version`,
  `kvcm hash` with both SHA-256 kernels against the in-tree core, and `kvcm serve` fed by a
  publisher outside the root over real ZMQ on 127.0.0.1 and answering /v1/score.
- glibc 2.28 (RHEL 8; Debian 10 is not on the reachable archive): every ELF file in the
  binary, each file of the onefile's archive extracted, needs no glibc symbol version newer
  than the floor `kvcm version` declares, which is 2.28 at most (readelf; the checker is
  itself shown to catch a newer requirement).
- CPU (x86-64 baseline, "v1"): the parts compiled for the bundle (CPython, the core)
  record -march=x86-64, and disassembled they use no newer instruction outside the core's
  SHA-NI kernel, which CPUID guards; in the rest of the bundle only libraries that choose
  their SIMD code by CPUID hold any. `KVCM_SHA256=portable` makes the binary hash with the
  portable kernel (above, in Debian 11) and `kvcm version` says which kernel it uses.

The tests skip, naming what is missing, without root or the prerequisites; under CI=true
they fail instead.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

import pytest

from captures import load_captures
from conftest import ROOT
from frozen import (ONEDIR, ONEFILE, TOKENIZER, WAIT, Server, bare_env, built, expected_scores,
                    leftovers, prerequisite, publish)
from kvcm._core import BlockHasher

sys.path.insert(0, str(ROOT / "packaging"))
import cpu_extensions  # noqa: E402  (tests/cpu_extensions.py)
import glibc_floor  # noqa: E402  (packaging/glibc_floor.py)

SUPPORTED_FLOOR = (2, 28)
BULLSEYE = ROOT / ".cache" / "bullseye"
IN_ROOT = ROOT / "packaging" / "in-root.sh"
NOBODY = 65534
HASH_ARGS = ["hash", "--hash-algo", "sha256", "--hash-seed", "0", "--block-size", "16"]
TOKENS = list(range(1000, 1100))


def version_fields(stdout):
    lines = stdout.decode().splitlines()
    return dict(line.split(": ", 1) for line in lines[1:])


def declared_floor(binary, env):
    proc = subprocess.run([str(binary), "version"], env=env, capture_output=True, timeout=WAIT)
    assert proc.returncode == 0, proc.stderr
    return glibc_floor.parse_version(version_fields(proc.stdout)["build"].rsplit("needs glibc >= ", 1)[1])


def in_tree_hash():
    hasher = BlockHasher("sha256", "0", 16)
    return {"keys": list(hasher.keys(TOKENS)), "digests": [d.hex() for d in hasher.digests(TOKENS)]}


@pytest.fixture
def bare(tmp_path):
    return bare_env(tmp_path)


# -- glibc: the symbol versions every file of the bundle needs -----------------------------------

@pytest.mark.parametrize("kind", ["onefile", "onedir"])
def test_no_file_in_the_bundle_needs_a_glibc_newer_than_the_declared_floor(kind, bare):
    binary = built(ONEFILE if kind == "onefile" else ONEDIR)
    found = glibc_floor.requirements_of(str(binary if kind == "onefile" else binary.parent))
    names = [name for version, files in found.items() for name in files]
    assert any("libpython" in n for n in names) and any("_core" in n for n in names), \
        "the check read the bundle's own files: %s" % sorted(set(names))[:20]
    newest = glibc_floor.newest(found)
    too_new = {glibc_floor.version_text(v): files for v, files in found.items() if v > SUPPORTED_FLOOR}
    assert not too_new, "these need a glibc newer than %s: %s" % (glibc_floor.version_text(SUPPORTED_FLOOR), too_new)
    assert declared_floor(binary, bare) == newest, "`kvcm version` declares the floor the files set"


def test_the_floor_check_catches_a_newer_requirement_and_the_pins_avoid_it(tmp_path):
    """A library calling exp() built here (glibc 2.36) needs exp@GLIBC_2.29; built with
    packaging/glibc-floor.h, as everything in the build root is, only the base version."""
    if not shutil.which("gcc"):
        pytest.skip("gcc is not installed")
    source = tmp_path / "exp.c"
    source.write_text("#include <math.h>\ndouble grow(double x) { return exp(x); }\n")
    plain, pinned = tmp_path / "plain.so", tmp_path / "pinned.so"
    compile = ["gcc", "-O0", "-fno-builtin", "-shared", "-fPIC"]
    subprocess.run([*compile, "-o", str(plain), str(source), "-lm"], check=True)
    subprocess.run([*compile, "-include", str(ROOT / "packaging" / "glibc-floor.h"), "-o", str(pinned),
                    str(source), "-lm"], check=True)
    assert glibc_floor.newest(glibc_floor.requirements([("plain", str(plain))])) == (2, 29)
    assert glibc_floor.newest(glibc_floor.requirements([("pinned", str(pinned))])) == (2, 2, 5)
    assert glibc_floor.main(["--at-most", "2.28", str(tmp_path)]) == 1
    assert glibc_floor.main(["--at-most", "2.29", str(tmp_path)]) == 0


# -- Debian 11 -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bullseye():
    """The Debian 11 root with the onefile binary and the fixture tokenizer installed in
    /opt/kvcm (removed afterwards, so the cached root stays as debootstrap made it)."""
    prerequisite(os.geteuid() == 0, "running a program in the Debian 11 root needs root (chroot)")
    prerequisite((BULLSEYE / ".kvcm-debian-root").is_file(),
                 "%s is missing: `make prereq-bullseye` makes it as root (`make test` does)" % BULLSEYE)
    binary = built(ONEFILE)
    install = BULLSEYE / "opt" / "kvcm"
    shutil.rmtree(install, ignore_errors=True)
    install.mkdir(parents=True)
    shutil.copy(binary, install / "kvcm")
    shutil.copytree(TOKENIZER, install / "tokenizer")
    for base, dirs, files in os.walk(install):
        os.chmod(base, 0o755)
        for name in files:
            os.chmod(os.path.join(base, name), 0o755 if name == "kvcm" else 0o644)
    yield BULLSEYE
    shutil.rmtree(install, ignore_errors=True)


@pytest.fixture
def root_tmp(bullseye):
    """A TMPDIR inside the root, writable by the unprivileged user kvcm runs as there."""
    path = tempfile.mkdtemp(prefix="kvcm-test-", dir=str(bullseye / "tmp"))
    os.chown(path, NOBODY, NOBODY)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def root_env(root, root_tmp):
    inside = "/" + os.path.relpath(root_tmp, root)
    return {"PATH": "/usr/bin:/bin", "HOME": inside, "TMPDIR": inside, "LANG": "C.UTF-8"}


def in_root(root, *command, env, stdin=None):
    return subprocess.run([str(IN_ROOT), str(root), "--user", str(NOBODY), "--", *command], env=env,
                          input=stdin, capture_output=True, timeout=WAIT)


def test_version_in_debian_11_names_the_floor(bullseye, root_tmp):
    proc = in_root(bullseye, "/opt/kvcm/kvcm", "version", env=root_env(bullseye, root_tmp))
    assert proc.returncode == 0 and proc.stderr == b"", proc.stderr
    fields = version_fields(proc.stdout)
    assert fields["build"].startswith("onefile, Python 3.")
    assert glibc_floor.parse_version(fields["build"].rsplit("needs glibc >= ", 1)[1]) <= SUPPORTED_FLOOR
    libc = in_root(bullseye, "/usr/bin/ldd", "--version", env=root_env(bullseye, root_tmp))
    assert b"2.31" in libc.stdout.splitlines()[0], "the root's glibc is Debian 11's: %r" % libc.stdout[:80]
    assert leftovers({"TMPDIR": root_tmp}) == []


@pytest.mark.parametrize("kernel", ["default", "portable"])
def test_hash_in_debian_11_equals_the_in_tree_core(bullseye, root_tmp, kernel):
    env = root_env(bullseye, root_tmp)
    if kernel == "portable":
        env["KVCM_SHA256"] = "portable"
    version = in_root(bullseye, "/opt/kvcm/kvcm", "version", env=env)
    if kernel == "portable":
        assert version_fields(version.stdout)["cpu"].endswith("sha256 kernel portable"), version.stdout
    proc = in_root(bullseye, "/opt/kvcm/kvcm", *HASH_ARGS, env=env, stdin=json.dumps(TOKENS).encode())
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == in_tree_hash()


def test_serve_in_debian_11_ingests_events_from_outside_and_scores(bullseye, root_tmp, shared):
    captures = [c for c in load_captures(shared) if c.version == "0.33.0"]
    seed = captures[0].hash_config["seed"]
    server = Server("/opt/kvcm/kvcm", root_env(bullseye, root_tmp), *([] if seed is None else ["--hash-seed", seed]),
                    prefix=[IN_ROOT, bullseye, "--user", NOBODY, "--"], notify_mode=0o666,
                    tokenizer="/opt/kvcm/tokenizer", root=str(bullseye))
    try:
        server.wait_for("READY=1")
        publish(server, captures)       # a pyzmq PUB socket of this host, outside the root
        cases = [case for case in expected_scores(captures) if case[2]]
        assert cases, "the captures leave some prompt cached somewhere"
        for name, tokens, scores in cases:
            reply = server.ok("POST", "/v1/score", {"model": name, "token_ids": tokens})
            assert reply["scores"] == pytest.approx(scores), (tokens[:4], reply)
        text = "Route this request to the pod that holds its prefix."
        assert server.ok("POST", "/v1/tokenize", {"model": "Qwen/Qwen3-0.6B", "prompt": text})["count"] > 5
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(WAIT) == 0, server.stderr()
        assert leftovers({"TMPDIR": root_tmp}) == []
    finally:
        server.close()


# -- the x86-64 baseline CPU ---------------------------------------------------------------------

def bundle_files(tmp_path, wanted):
    """{name: extracted path} of the onefile archive's files whose name `wanted` accepts."""
    from PyInstaller.archive.readers import CArchiveReader

    archive = CArchiveReader(str(built(ONEFILE)))
    out = {}
    for index, name in enumerate(sorted(archive.toc)):
        if wanted(name):
            path = tmp_path / ("%d.so" % index)
            path.write_bytes(archive.extract(name))
            out[name] = path
    return out


def compiled_here(name):
    """What the build root compiles: CPython (libpython, its extension modules) and the core."""
    return name.startswith(("libpython3", "kvcm/_core", "python3.11/lib-dynload/"))


def test_compiled_parts_of_the_bundle_target_the_x86_64_baseline(tmp_path):
    """CPython and the core are compiled in the build root with -march=x86-64 (no
    -march=native, no -mavx...) and record their switches (-frecord-gcc-switches)."""
    files = bundle_files(tmp_path, compiled_here)
    assert any(n.startswith("libpython3") for n in files) and any(n.startswith("kvcm/_core") for n in files)
    for name, path in files.items():
        switches = subprocess.run(["readelf", "-p", ".GCC.command.line", str(path)], capture_output=True,
                                  text=True).stdout.split()
        assert "-march=x86-64" in switches, (name, switches[:40])
        assert not [s for s in switches if s == "-march=native" or s.startswith(("-mavx", "-msse4", "-mtune=native"))], \
            (name, switches)


def test_nothing_compiled_for_the_bundle_uses_newer_instructions_outside_the_cpuid_kernels(tmp_path):
    """Disassembled, CPython and the core use only x86-64 baseline instructions, except the
    core's SHA-NI kernels (the compression and the block chain built on it), which run only
    after CPUID reports SHA (kvcm/sha256.h, kvcm/block_chain.h), and its AVX-512 reader of
    token ids, only after CPUID reports AVX-512 VBMI2 (kvcm/json_ids.h)."""
    files = bundle_files(tmp_path, compiled_here)
    found = {}
    for name, path in files.items():
        for function, mnemonic in cpu_extensions.newer_than_baseline(str(path)):
            found.setdefault(name, set()).add((function, mnemonic))
    core = [n for n in found if n.startswith("kvcm/_core")]
    assert len(core) == 1, "the SHA-NI kernel is found (the scan works): %s" % sorted(found)
    assert {f for f, _ in found.pop(core[0])} == {"kvcm_sha256_compress_shani", "kvcm_chain_shani",
                                                 "kj_u64_runs_vbmi"}
    assert not found, found


# Libraries that choose their SIMD code at run time, by CPUID: OpenSSL (its ia32cap), in
# libcrypto and statically inside cryptography's Rust library, libsodium, orjson and the Rust
# crates inside tokenizers (memchr, aho-corasick, rand_chacha: is_x86_feature_detected),
# libstdc++ (rdrand for std::random_device). The core's kernels are checked on their own.
DISPATCHING = ("libcrypto.so", "cryptography/hazmat/bindings/_rust.", "libsodium-", "orjson/orjson.",
               "tokenizers/tokenizers.", "libstdc++.so", "kvcm/_core.")


def test_only_libraries_that_dispatch_by_cpuid_hold_newer_instructions():
    """Every other ELF file of the bundle (libpython, libzmq, uvloop, msgpack, hiredis, zlib,
    ...) is plain x86-64 baseline code: a dependency built for a newer CPU would show here."""
    top = built(ONEDIR).parent / "_internal"
    newer = []
    for name, path in glibc_floor.directory_members(str(top)):
        if glibc_floor.is_elf(path) and cpu_extensions.newer_than_baseline(path):
            newer.append(name)
    assert any("libsodium-" in n for n in newer), "the scan sees libsodium's AES-NI code: %s" % newer
    assert [n for n in newer if not any(d in n for d in DISPATCHING)] == []
