"""The `kvcm` command line: one sub-command per job.

Bad arguments print one line on stderr and exit with status 2, so scripts can tell usage
errors from failures.
"""

import argparse
import json
import sys

from kvcm import __version__

EXIT_USAGE = 2


class UsageError(Exception):
    """A bad argument value found after parsing; reported like an argparse error."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        sys.stderr.write("%s: error: %s\n" % (self.prog, message))
        raise SystemExit(EXIT_USAGE)


def _as_tuples(value):
    """JSON lists stand for Python tuples in vLLM's extra keys."""
    if isinstance(value, list):
        return tuple(_as_tuples(v) for v in value)
    return value


def _parse_token_list(text, source):
    text = text.strip()
    try:
        if text.startswith("["):
            tokens = json.loads(text)
        else:
            tokens = [int(t) for t in text.replace(",", " ").split()]
    except ValueError as exc:
        raise UsageError("%s: not a list of integers (%s)" % (source, exc)) from None
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise UsageError("%s: expected a list of integers" % source)
    return tokens


def _read_tokens(args):
    if args.tokens is not None:
        return _parse_token_list(args.tokens, "--tokens")
    if args.tokens_file is not None:
        try:
            with open(args.tokens_file, encoding="utf-8") as f:
                return _parse_token_list(f.read(), args.tokens_file)
        except OSError as exc:
            raise UsageError("--tokens-file: %s" % exc.strerror) from None
        except UnicodeDecodeError:
            raise UsageError("--tokens-file: not UTF-8 text") from None
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("give --tokens, --tokens-file, or a JSON list of token ids on stdin")
    return _parse_token_list(sys.stdin.read(), "stdin")


def _read_extra_keys(text):
    if text is None:
        return None
    try:
        extra = json.loads(text)
    except ValueError as exc:
        raise UsageError("--extra-keys: invalid JSON (%s)" % exc) from None
    if not isinstance(extra, list) or not all(e is None or isinstance(e, list) for e in extra):
        raise UsageError("--extra-keys: expected a JSON list with one entry per block: null or a list")
    return [_as_tuples(e) for e in extra]


def add_hash_options(parser):
    """The hashing flags kvcm serve, sim and hash share (DESIGN.md §7)."""
    from kvcm._core import ALGORITHMS

    parser.add_argument("--hash-algo", default="sha256", choices=ALGORITHMS,
                        help="the engines' --prefix-caching-hash-algo (default: sha256)")
    parser.add_argument("--hash-seed", default=None,
                        help="the engines' PYTHONHASHSEED; unset = vLLM >= 0.29's default "
                             "('vllm-none-hash'); --hash-seed '' is the empty-string seed")
    parser.add_argument("--block-size", type=int, default=16, help="tokens per block (default: 16)")


def cmd_hash(args):
    from kvcm._core import BlockHasher

    if args.block_size <= 0:
        raise UsageError("--block-size must be positive, got %d" % args.block_size)
    tokens = _read_tokens(args)
    if not tokens:
        raise UsageError("no token ids given")
    extra = _read_extra_keys(args.extra_keys)
    try:
        hasher = BlockHasher(args.hash_algo, args.hash_seed, args.block_size, namespace=args.model)
        keys = hasher.keys(tokens, extra)
        digests = hasher.digests(tokens, extra)
    except UnicodeEncodeError:
        raise UsageError("--hash-seed and --model must be valid Unicode text") from None
    except (ValueError, TypeError, OverflowError) as exc:
        raise UsageError(str(exc)) from None
    json.dump({"keys": list(keys), "digests": [d.hex() for d in digests]}, sys.stdout)
    sys.stdout.write("\n")
    return 0


def cmd_version(args):
    import platform

    from kvcm import _build_info
    from kvcm._core import sha256_backend

    info = _build_info.info()
    build = [info["build"], "Python %s" % sys.version.split()[0]]
    if _build_info.GLIBC_FLOOR:
        build.append("needs glibc >= %s" % _build_info.GLIBC_FLOOR)
    print("kvcm %s" % info["version"])
    print("build date: %s" % info["build_date"])
    print("git revision: %s" % info["git_revision"])
    print("build: %s" % ", ".join(build))
    # the SHA-256 kernel the CPU allows (KVCM_SHA256=portable forces the portable one)
    print("cpu: %s, sha256 kernel %s" % (platform.machine(), sha256_backend()))
    return 0


def cmd_serve(args):
    from kvcm import serve

    return serve.main(args)


def cmd_sim(args):
    from kvcm.sim import app

    return app.main(args)


def cmd_bench(args):
    from kvcm.bench import cli

    args.argv = args.argv[2:]          # what follows `bench index` / `bench routing`
    return cli.main(args, UsageError)


def cmd_doctor(args):
    from kvcm import doctor

    return doctor.main(args)


def _post(url, path, payload):
    """POSTs JSON to a running kvcm; (status, parsed body)."""
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url.rstrip("/") + path, data=json.dumps(payload).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, json.loads(response.read() or b"null")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"null")
    except (urllib.error.URLError, OSError) as e:
        raise UsageError("cannot reach %s: %s" % (url, getattr(e, "reason", e))) from None


def _client_request(args, with_tokens):
    body = {"model": args.model}
    if args.messages is not None:
        try:
            body["messages"] = json.loads(args.messages)
        except ValueError as exc:
            raise UsageError("--messages: invalid JSON (%s)" % exc) from None
    elif args.prompt is not None:
        body["prompt"] = args.prompt
    elif with_tokens and args.tokens is not None:
        body["token_ids"] = _parse_token_list(args.tokens, "--tokens")
    else:
        raise UsageError("give --prompt, --messages%s" % (" or --tokens" if with_tokens else ""))
    if getattr(args, "pods", None):
        body["pods"] = args.pods.split(",")
    return body


def _print_reply(status, reply):
    json.dump(reply, sys.stdout)
    sys.stdout.write("\n")
    return 0 if status < 400 else 1


def cmd_score(args):
    return _print_reply(*_post(args.url, "/v1/score", _client_request(args, True)))


def cmd_tokenize(args):
    return _print_reply(*_post(args.url, "/v1/tokenize", _client_request(args, False)))


def build_parser():
    parser = _Parser(prog="kvcm", description="KV-cache-aware routing index for LLM inference clusters")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True

    p = sub.add_parser("hash", help="print the block keys of a token list",
                       description="Print the block keys (the uint64 values vLLM publishes in KV "
                                   "events) and full digests of every full block of a token list.")
    add_hash_options(p)
    p.add_argument("--model", default=None, help="namespace for --hash-algo kvcm, and the model llmd_fnv64a keys are salted with (model or LoRA name)")
    p.add_argument("--extra-keys", default=None,
                   help='JSON list, one entry per block: null or vLLM\'s tagged extra keys, '
                        'e.g. \'[[["cache_salt","tenant-a"]]]\'')
    src = p.add_mutually_exclusive_group()
    src.add_argument("--tokens", default=None, help="token ids: 1,2,3 or a JSON list")
    src.add_argument("--tokens-file", default=None, help="file holding the token ids")
    p.set_defaults(func=cmd_hash)

    from kvcm.config import LLMD_EPILOG, add_serve_arguments

    p = sub.add_parser("serve", help="run the service: ZMQ event ingest and the HTTP scoring API",
                       description="Run kvcm: ingest vLLM KV events over ZMQ and answer scoring requests "
                                   "over HTTP. Every option also reads KVCM_<NAME> from the environment "
                                   "and a key of the --config TOML file (flags > env > file > defaults).",
                       epilog=LLMD_EPILOG, allow_abbrev=False)
    add_serve_arguments(p)
    p.set_defaults(func=cmd_serve)

    from kvcm.sim.config import add_sim_arguments

    p = sub.add_parser("sim", help="simulate a vLLM engine that publishes real KV events",
                       description="Run a vLLM-compatible engine simulator: the OpenAI API, a KV block "
                                   "pool with prefix caching, and vLLM's KV events over ZMQ.")
    add_sim_arguments(p)
    p.set_defaults(func=cmd_sim)

    from kvcm.bench.cli import add_bench_arguments

    p = sub.add_parser("bench", help="profile an index (and Dynamo's) or routing policies on this machine",
                       description="Local performance profiling: `kvcm bench index` measures a KV-cache index "
                                   "(kvcm, NVIDIA Dynamo's indexer, an llm-d server) side by side; `kvcm bench "
                                   "routing` compares routing policies on simulated engines.")
    add_bench_arguments(p)
    p.set_defaults(func=cmd_bench)

    from kvcm.doctor import add_doctor_arguments

    p = sub.add_parser("doctor", help="check an engine's KV events (or a running kvcm's streams) against kvcm's settings",
                       description="Listen to an engine's KV-event stream (or read a running kvcm's streams) and "
                                   "say in plain sentences whether it suits kvcm's hash settings and what to change. "
                                   "Exit status 0 when healthy, 1 with problems.")
    add_doctor_arguments(p)
    add_hash_options(p.add_argument_group("kvcm serve's hash settings to check against (its defaults)"))
    p.set_defaults(func=cmd_doctor)

    for name, func, text, with_tokens in (
            ("score", cmd_score, "ask a running kvcm which pods cache a prompt's prefix", True),
            ("tokenize", cmd_tokenize, "tokenize a prompt with a running kvcm's tokenizers", False)):
        p = sub.add_parser(name, help=text, description=text[0].upper() + text[1:] + "; prints its JSON reply.")
        p.add_argument("--url", default="http://127.0.0.1:8080", help="kvcm's HTTP address (default: %(default)s)")
        p.add_argument("--model", required=True, help="model (or LoRA) name")
        src = p.add_mutually_exclusive_group()
        src.add_argument("--prompt", help="completion prompt text")
        src.add_argument("--messages", help="chat messages as a JSON list")
        if with_tokens:
            src.add_argument("--tokens", help="token ids: 1,2,3 or a JSON list")
            p.add_argument("--pods", help="only score these pods (comma-separated)")
        p.set_defaults(func=func)

    p = sub.add_parser("version", help="print the version, build date and git revision")
    p.set_defaults(func=cmd_version)
    parser.subcommand = sub.choices.get
    return parser


def main(argv=None):
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith("_"):     # hidden: kvcm's own child processes
        from kvcm import template_pool

        if argv[0] == template_pool.WORKER_COMMAND:
            return template_pool.worker_main(argv[1:])
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        # argparse would blame the top-level parser ("kvcm: error"): name the sub-command
        parser.subcommand(args.command).error("unrecognized arguments: %s" % " ".join(unknown))
    args.argv = argv
    try:
        return args.func(args)
    except UsageError as exc:
        sys.stderr.write("kvcm %s: error: %s\n" % (args.command, exc))
        return EXIT_USAGE
