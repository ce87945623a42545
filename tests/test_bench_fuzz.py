"""bench/fuzz.py in CI size: every gRPC method of the coordinator and of two peers gets
malformed messages of every kind while three honest nodes run rounds; the servers
answer each with a precise status, none crashes or logs an unexpected exception, and a
round commits meanwhile. (The 1 s answer bar is measured by the benchmark, not here.)"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "fuzz.py"
sys.path.insert(0, str(BENCH.parent))
from fuzz import KINDS  # noqa: E402


def test_malformed_messages_get_precise_answers_while_a_round_commits(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--messages", "2000", "--seed", "1"]
    command += ["--work-dir", str(tmp_path), "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["messages"] == 2000
    assert report["methods"] == 24 and len(report["by_method"]) == 24
    assert set(report["by_kind"]) == set(KINDS)
    assert set(report["max_latency_s_by_kind"]) == set(KINDS)
    assert report["imprecise"] == 0, report["examples"]
    assert report["max_latency_s"] < 5.0  # the client's deadline: every call was answered
    assert report["crashes"] == []
    assert report["unhandled"] == 0, report["unhandled_lines"]
    assert report["rounds_committed_during"] >= 1
    # The absurd, re-signed requests reach the handlers' own checks.
    assert report["statuses"].get("FAILED_PRECONDITION", 0) > 0
    assert report["statuses"].get("INVALID_ARGUMENT", 0) > report["messages"] // 4


def test_fuzz_benchmark_rejects_bad_options() -> None:
    for options in (["--messages", "0"], ["--nodes", "1"], ["--concurrency", "0"]):
        run = subprocess.run(
            [sys.executable, str(BENCH), *options], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 2 and "error" in run.stderr, (options, run.stderr)
