"""`kvcm bench routing` for real: `kvcm serve` and two `kvcm sim` engines started by bench, a
short multi-turn chat through every policy. Assertions are on counts and on what the
engines' usage reports, never on how fast anything was."""

import json
import os
import re
import subprocess
import sys

from conftest import ROOT
from kvcm.bench import routing


def test_every_policy_runs_every_request_and_reports_engine_usage(tmp_path):
    report = tmp_path / "routing.html"
    proc = subprocess.run([sys.executable, "-m", "kvcm", "bench", "routing", "--engines", "2", "--requests", "24",
                           "--rate", "40", "--users", "4", "--turns", "3", "--system-words", "64", "--repeats", "1",
                           "--json", "--report", str(report)],
                          cwd=ROOT, capture_output=True, text=True, timeout=240,
                          env={k: v for k, v in os.environ.items() if not k.startswith("KVCM_")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout)
    assert list(result["policies"]) == list(routing.POLICIES)
    for name, p in result["policies"].items():
        assert p["requests"] == 24, name
        assert sum(p["per_engine_last_run"].values()) == 24, name
        assert 0 <= p["hit_rate"] <= 1, name
        assert p["ttft_ms"]["p50"] <= p["ttft_ms"]["p99"] and p["ttft_ms"]["p50"] <= p["e2e_ms"]["p50"], name
    assert result["policies"]["round-robin"]["imbalance"] == 1.0          # 12 and 12
    # later turns extend earlier prompts: routed by kvcm's scores, they find them cached
    assert result["policies"]["kvcm"]["hit_rate"] > 0
    page = report.read_text()
    assert page.count("<svg") == 4
    assert not re.search(r"://|<script|\bhref=|\bsrc=|@import|url\(", page, re.I)


class _Args:
    requests, users, turns, system_prompts, system_words, message_words, max_tokens = 10, 2, 3, 2, 8, 4, 2


def test_the_chat_workload_grows_each_user_s_prompt_turn_by_turn():
    turns = routing.chat_workload(_Args, seed=1)
    assert [t.prompt for t in turns] == [t.prompt for t in routing.chat_workload(_Args, seed=1)]
    assert len(turns) == 10
    by_user = {}
    for i, t in enumerate(turns):
        if t.previous is not None:
            before = turns[t.previous]
            assert before.user == t.user and before.turn == t.turn - 1
            assert t.prompt.startswith(before.prompt) and t.tokens[:len(before.tokens)] == before.tokens
        else:
            assert t.turn == 0
        by_user.setdefault(t.user, []).append(t.turn)
    assert all(ts == list(range(len(ts))) and len(ts) <= 3 for ts in by_user.values())
    assert len(by_user) > 2                                   # finished users are replaced by new ones
