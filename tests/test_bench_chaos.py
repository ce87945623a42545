"""bench/chaos.py in CI size: three real node processes, one killed -9 at a random
point; every round commits, and every committed mean equals the token-weighted mean of
exactly the contributions its commit lists (fp32, checked from what nodes sent)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "chaos.py"


def test_a_node_killed_at_a_random_point_leaves_every_mean_exact(tmp_path: Path) -> None:
    command = [sys.executable, str(BENCH), "--nodes", "3", "--kill", "1", "--rounds", "4"]
    command += ["--inner-steps", "3", "--seed", "3", "--work-dir", str(tmp_path), "--json"]
    run = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    assert report["kills"] and report["kills"][0]["node"] in (1, 2)
    assert report["rounds_committed"] >= report["rounds_planned"]
    assert report["baseline_rounds_committed"] >= report["rounds_planned"]
    assert report["max_round_s"] <= report["deadline_s"] + 5.0  # + the owners' report grace
    assert report["mean_exact"] is True and report["mean_max_abs_err"] <= 1e-6
    assert report["false_exclusions"] == 0 and report["baseline_false_exclusions"] == 0
    assert report["final_val_loss"] < 5.0 and report["baseline_val_loss"] < 5.0  # ln 256 = 5.5


def test_chaos_benchmark_rejects_bad_options() -> None:
    for options in (["--nodes", "1"], ["--nodes", "3", "--kill", "3"], ["--poison", "bogus"]):
        run = subprocess.run(
            [sys.executable, str(BENCH), *options], capture_output=True, text=True, timeout=60
        )
        assert run.returncode == 2 and "error" in run.stderr, (options, run.stderr)
