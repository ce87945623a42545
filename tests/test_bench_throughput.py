"""bench/throughput.py stays runnable: both optimizers (Muon in both precisions), a few
small steps each."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "throughput.py"


@pytest.mark.parametrize(
    "optimizer, precision", [("adamw", "auto"), ("muon", "auto"), ("muon", "bf16")]
)
def test_throughput_benchmark_times_both_loops_as_json(optimizer: str, precision: str) -> None:
    command = [sys.executable, str(BENCH), "--model", "tiny", "--steps", "2", "--repeats", "1"]
    command += ["--batch-tokens", "512", "--micro-batch-size", "4", "--seq-len", "64"]
    command += ["--optimizer", optimizer, "--precision", precision, "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert (report["optimizer"], report["precision"]) == (optimizer, precision)
    assert report["steps_timed"] == 2
    assert report["starling_tokens_per_s"] > 0 and report["bare_tokens_per_s"] > 0
    share = report["orthogonalize_share"]
    # Newton–Schulz is part of a Muon step: timed alone, a share of it under the whole.
    assert share is None if optimizer == "adamw" else 0 < share < 1
