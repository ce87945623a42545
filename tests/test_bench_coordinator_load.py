"""bench/coordinator_load.py stays runnable: a few simulated nodes against a real
coordinator process, every request answered."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "coordinator_load.py"


def test_coordinator_load_benchmark_reports_latencies_as_json() -> None:
    command = [sys.executable, str(BENCH), "--nodes", "20", "--heartbeat-s", "1"]
    command += ["--duration", "3", "--procs", "1", "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["errors"] == {}
    # 20 nodes, a heartbeat and a progress report each per second, for 3 s.
    assert 80 <= report["requests"] <= 140
    assert 0 < report["p50_ms"] <= report["p99_ms"] <= report["max_ms"]


def test_coordinator_load_benchmark_rejects_bad_options() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--nodes", "0", "--json"], capture_output=True, text=True
    )
    assert run.returncode == 2 and "--nodes" in run.stderr
