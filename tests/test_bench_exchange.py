"""bench/exchange.py stays runnable: a small Starling-only run, checked end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "exchange.py"


def test_exchange_benchmark_reports_checked_results_as_json() -> None:
    command = [sys.executable, str(BENCH), "--systems", "starling", "--peers", "2"]
    command += ["--megabytes", "2", "--codecs", "fp32,int4", "--rounds", "1", "--warmup", "0"]
    command += ["--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    rows = report["results"]
    assert [(r["system"], r["codec"], r["tls"]) for r in rows] == [
        ("starling", "fp32", False),
        ("starling", "fp32", True),
        ("starling", "int4", False),
        ("starling", "int4", True),
    ]
    payload = 2_000_000
    for row in rows:
        assert row["peers"] == 2 and row["median_s"] > 0
        if row["codec"] == "fp32":
            assert row["max_abs_err"] <= 1e-6
            # Two peers: each sends half its vector and serves its half of the mean.
            assert payload <= row["bytes_sent_per_peer"] <= payload * 1.001
        else:
            assert row["bytes_sent_per_peer"] < payload / 7  # int4: ~0.53 bytes a value


def test_exchange_benchmark_rejects_bad_options() -> None:
    run = subprocess.run(
        [sys.executable, str(BENCH), "--systems", "starling,mpi", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 2 and "unknown systems" in run.stderr
