"""bench/utilization.py stays runnable: a real coordinator and two capped nodes for
two measured rounds, figures consistent with each other, and the GPU model's rules."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "utilization.py"


def _bench_module():
    spec = importlib.util.spec_from_file_location("utilization_bench", BENCH)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_model_hides_the_exchange_only_behind_enough_compute() -> None:
    bench = _bench_module()
    # 10 ms steps, 0.1 s exposed per round, a 2 s exchange.
    args = {"step_s": 0.01, "exposed_s": 0.1, "exchange_s": 2.0}
    # Overlap, 100 steps = 1 s of compute: 1 s of the exchange shows on top.
    assert bench.gpu_utilization(steps=100, overlap=True, **args) == 1.0 / (1.0 + 1.1)
    # 400 steps = 4 s: the exchange is hidden, only the measured exposed time is left.
    assert bench.gpu_utilization(steps=400, overlap=True, **args) == 4.0 / 4.1
    # Without overlap the measured exposed time already holds the exchange.
    assert bench.gpu_utilization(steps=100, overlap=False, **args) == 1.0 / 1.1
    # 95% needs compute ≥ 19 × 0.1 s and ≥ the exchange: 200 steps.
    assert bench.steps_for(0.95, overlap=True, **args) == 200
    assert bench.gpu_utilization(steps=199, overlap=True, **args) < 0.95


def test_utilization_benchmark_reports_per_node_figures() -> None:
    command = [sys.executable, str(BENCH), "--nodes", "2", "--upload-mbps", "50"]
    command += ["--rounds", "2", "--inner-steps", "3", "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert len(report["nodes"]) == 2
    for node in report["nodes"]:
        assert node["rounds"] == 1  # two measured rounds: one whole period
        assert 0 < node["compute_s"] <= node["wall_s"]
        assert 0 < node["utilization"] <= 1
        # A GPU computes faster, so the same exposed time weighs more.
        assert node["gpu_equivalent_utilization"] < node["utilization"]
        assert node["bytes_sent_per_round"] > 0
        assert node["folded_at_step"] == [None]  # no overlap: nothing to fold in
    assert report["overall"]["parameters"] > 1_000_000
    assert report["overall"]["overlap"] is False
    assert report["overall"]["gpu_overlap_steps"] is None
