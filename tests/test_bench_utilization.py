"""bench/utilization.py stays runnable: a real coordinator and two capped nodes for
one measured round, figures consistent with each other."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "utilization.py"


def test_utilization_benchmark_reports_per_node_figures() -> None:
    command = [sys.executable, str(BENCH), "--nodes", "2", "--upload-mbps", "50"]
    command += ["--rounds", "1", "--inner-steps", "3", "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 2
    for node in report["nodes"]:
        assert node["rounds"] == 1
        assert 0 < node["compute_s"] <= node["wall_s"]
        assert 0 < node["utilization"] <= 1
        # A GPU computes faster, so the same exposed time weighs more.
        assert node["gpu_equivalent_utilization"] < node["utilization"]
        assert node["bytes_sent_per_round"] > 0
    assert report["overall"]["parameters"] > 1_000_000
    assert report["overall"]["overlap"] is False
