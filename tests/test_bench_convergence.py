"""bench/convergence.py stays runnable: DDP and DiLoCo rows on the same tokens, each
strategy at its own learning rate, bytes ratios computed from the payloads."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "bench" / "convergence.py"


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(BENCH), *args], capture_output=True, text=True, timeout=600
    )


def test_convergence_benchmark_reports_each_strategy_at_its_own_lr(pydoc_dir: Path) -> None:
    run = bench(
        "--data", str(pydoc_dir), "--steps", "8", "--inner-steps", "4", "--workers", "2",
        "--seq-len", "32", "--batch-size", "4", "--codecs", "fp32,int4",
        "--overlap-codecs", "int4", "--lr", "5e-3", "--ddp-lr", "2e-3", "--overlap-lr", "4e-3",
        "--threads", "1", "--json",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads(run.stdout.strip().splitlines()[-1])
    rows = report["results"]
    assert [(r["strategy"], r["codec"], r["overlap"]) for r in rows] == [
        ("ddp", "fp32", False),
        ("diloco", "fp32", False),
        ("diloco", "int4", False),
        ("diloco", "int4", True),
    ]
    assert [r["lr"] for r in rows] == [2e-3, 5e-3, 5e-3, 4e-3]
    assert [r["overlap_steps"] for r in rows] == [None] * 4  # a whole round late
    # DiLoCo workers' AdamW assumes DDP's batch (--workers × theirs) unless told.
    assert [r["moment_batches"] for r in rows] == [1.0, 2.0, 2.0, 2.0]
    assert len({r["tokens"] for r in rows}) == 1  # the same token budget for every row
    # One fragment unless told: the vocabulary matrices sync with the rest, on the row's codec.
    assert [(r["embedding_rounds"], r["embedding_codec"]) for r in rows] == [
        (1, "fp32"),
        (1, "fp32"),
        (1, "int4"),
        (1, "int4"),
    ]
    assert all(r["fragments"] == [] for r in rows)
    # Both strategies share the inner schedule: a quarter of the steps of warmup, then WSD.
    config = report["config"]
    assert (config["warmup_steps"], config["schedule"], config["decay_fraction"]) == (2, "wsd", 0.2)
    ddp, fp32, int4, _ = rows
    assert ddp["loss_ratio_to_ddp"] == 1.0 and ddp["ddp_bytes_ratio"] == 1.0
    # DDP sends fp32 gradients out and gets the fp32 mean back every step (8 steps);
    # DiLoCo fp32 does the same once a round (2 rounds of H = 4): 4× fewer bytes.
    assert fp32["rounds"] == 2 and fp32["ddp_bytes_ratio"] == 4.0
    assert int4["bytes_per_worker"] < fp32["bytes_per_worker"] / 6
    for row in rows:
        expected = round(row["final_val_loss"] / ddp["final_val_loss"], 4)
        assert abs(row["loss_ratio_to_ddp"] - expected) < 2e-4


def test_convergence_benchmark_rejects_bad_options(pydoc_dir: Path) -> None:
    for args, words in [
        (("--codecs", "int3"), "int3"),
        (("--steps", "0"), "steps"),
        (("--lr", "-1"), "learning rate"),
        (("--overlap-lr", "0"), "learning rate"),
        (("--moment-batches", "0.5"), "moment batches"),
        (("--ddp-moment-batches", "0"), "moment batches"),
        (("--schedule", "linear"), "schedule must be one of"),
        (("--decay-fraction", "1.5"), "decay fraction"),
        (("--embedding-rounds", "0"), "embedding rounds must be at least 1"),
        (("--embedding-rounds", "2"), "does not combine with overlap"),  # --overlap-codecs int4
        (("--embedding-codec", "int3"), "int3"),
        (("--fragment", "mlp"), "give PATTERN@EVERY"),
        (("--fragment", "mlp@2"), "do not combine with overlap"),  # --overlap-codecs int4
        (("--fragment", "decoder@2", "--overlap-codecs", ""), "matches no parameter"),
        (("--overlap-steps", "0"), "overlap steps must be ≥ 1"),  # --overlap-codecs int4
    ]:
        run = bench("--data", str(pydoc_dir), *args, "--json")
        assert run.returncode == 2, (args, run.stderr[-2000:])
        assert words in run.stderr, (args, run.stderr[-2000:])
        assert run.stdout == ""
