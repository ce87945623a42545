"""The node's inner loop in one process: the learning-rate schedule follows the run's
progress (set by the daemon from the run's tokens), not the node's own step count."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from node.distributed import LocalInnerLoop
from starling.model import ModelConfig, build_model
from starling.train import InnerTrainer, TrainConfig, lr_multiplier


def test_the_schedule_position_is_the_runs(tmp_path: Path) -> None:
    shard = tmp_path / "shard.bin"
    np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint16).tofile(shard)
    cfg = TrainConfig(steps=1000, batch_tokens=256, micro_batch_size=4, seq_len=64)
    cfg = TrainConfig(**{**cfg.to_dict(), "warmup_steps": 10, "lr": 1e-3})
    model_cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=2)
    model = build_model(model_cfg, seed=0, device=torch.device("cpu"))
    inner = LocalInnerLoop(model, InnerTrainer(model, cfg, torch.device("cpu")), cfg)
    inner.set_data(shard, "uint16", seed=1)
    # A node that joins when the run is 900 steps in trains at step 900's rate, then on.
    inner.set_schedule_step(900)
    first, second = inner.step(), inner.step()
    assert first.lr == cfg.lr * lr_multiplier(900, cfg)
    assert second.lr == cfg.lr * lr_multiplier(901, cfg)
    assert first.lr < 0.7 * cfg.lr  # well into the decay, not in warm-up
    assert first.tokens == 256


def test_a_restart_loads_theta_and_forgets_the_optimizers_nan_moments(tmp_path: Path) -> None:
    """After a divergence the node restarts its replica: θ again, and moments that no
    longer hold the NaN, so the next steps train (a plain load would keep them)."""
    shard = tmp_path / "shard.bin"
    np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint16).tofile(shard)
    cfg = TrainConfig(steps=100, batch_tokens=256, micro_batch_size=4, seq_len=64, lr=1e-3)
    model_cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=2)
    model = build_model(model_cfg, seed=0, device=torch.device("cpu"))
    trainer = InnerTrainer(model, cfg, torch.device("cpu"), batch_scaled=True)
    inner = LocalInnerLoop(model, trainer, cfg)
    inner.set_data(shard, "uint16", seed=1)
    theta = inner.flat()
    inner.step()
    for state in trainer.optimizer.state.values():
        state["exp_avg_sq"].fill_(float("nan"))
    inner.load(theta)
    inner.step()
    assert not torch.isfinite(inner.flat()).all()  # the NaN moments survive a load
    inner.restart(theta)
    assert torch.equal(inner.flat(), theta) and not trainer.optimizer.state
    stats = inner.step()
    assert torch.isfinite(inner.flat()).all() and stats.loss == stats.loss


def test_after_a_commit_the_node_waits_for_the_next_round_to_open() -> None:
    """A committed round never changes again: waiting for *it* to change sat out the
    whole 2 s long poll between rounds (seen as rounds of 2.2 s instead of 0.4 s)."""
    from node.daemon import NodeDaemon
    from starling.v1 import coordinator_pb2 as pb

    asked: list[tuple[int | None, int]] = []

    class Client:
        def get_round(
            self, round_: int | None = None, known_version: int = 0, wait_s: float = 0.0
        ) -> pb.RoundState:
            asked.append((round_, known_version))
            return pb.RoundState()

    daemon = object.__new__(NodeDaemon)  # only the waiting logic: no run, no network
    daemon.client = Client()  # type: ignore[assignment]
    daemon._retry = lambda call, rejoin=True: call()  # type: ignore[method-assign]
    daemon._set = lambda **changes: None  # type: ignore[method-assign]
    daemon._wait_for_change(pb.RoundState(round=4, phase="committed", version=7))
    daemon._wait_for_change(pb.RoundState(round=4, phase="exchange", version=7))
    daemon._wait_for_change(pb.RoundState())  # no round yet
    assert asked == [(5, 0), (4, 7), (None, 0)]


def test_token_reports_are_paced_and_lose_nothing() -> None:
    """A report per inner step of a tiny model would be hundreds of requests a second:
    reports go at most every MIN_INTERVAL_S, the tokens trained meanwhile ride on the
    next one, and the last (`done`) goes at once."""
    from node.reporting import TokenReporter
    from starling.v1 import coordinator_pb2 as pb

    sent: list[tuple[str, int, bool]] = []

    def send(file: str, tokens: int, done: bool) -> pb.ReportTokensResponse:
        sent.append((file, tokens, done))
        return pb.ReportTokensResponse()

    reporter = TokenReporter(send)
    for step in range(200):
        reporter.add("train/000000.bin", 512, done=step == 199)
    reporter.flush(10.0)
    reporter.close()
    assert sum(tokens for _, tokens, _ in sent) == 200 * 512
    assert len(sent) <= 10  # 200 steps in a few milliseconds: batched
    assert sent[-1][2] is True and not any(done for _, _, done in sent[:-1])


def _sharded_steps(
    tmp_path: Path, shard: Path, steps: int, moment_batches: float, optimizer: str
) -> torch.Tensor:
    """θ after `steps` inner steps of a node of two ranks under torchrun (FSDP, gloo)."""
    import subprocess
    import sys

    out = tmp_path / f"sharded-{optimizer}-{moment_batches}.npy"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    launched = subprocess.run(
        [*torchrun, "--nproc-per-node", "2", str(Path(__file__).parent / "sharded_steps.py"),
         str(shard), str(out), str(steps), str(moment_batches), optimizer],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert launched.returncode == 0, launched.stderr[-3000:]
    return torch.from_numpy(np.load(out, allow_pickle=False))


def _one_process_steps(
    shard: Path, steps: int, moment_batches: float, optimizer: str
) -> torch.Tensor:
    """θ after the same steps in one process on the node's whole batch: each step's 16
    rows are the first halves of both ranks' two micro-batches of 4, then their second
    halves."""
    from node.distributed import _rank_batches
    from starling.diloco import flatten_parameters

    from .sharded_steps import MODEL, SEED, TRAIN

    ranks = [_rank_batches(TRAIN, str(shard), "uint16", SEED, rank) for rank in range(2)]

    def whole() -> object:
        while True:
            micro = [next(ranks[rank]) for rank in range(2) for _ in range(2)]
            yield tuple(
                torch.cat([part[:2] for part in parts] + [part[2:] for part in parts])
                for parts in zip(*micro, strict=True)
            )

    cfg = TrainConfig(
        **{**TRAIN.to_dict(), "batch_tokens": 1024, "micro_batch_size": 16, "optimizer": optimizer}
    )
    model = build_model(MODEL, seed=0, device=torch.device("cpu"))
    trainer = InnerTrainer(model, cfg, torch.device("cpu"), batch_scaled=moment_batches > 0)
    if moment_batches > 0:
        trainer.set_moment_batches(moment_batches)
    node_batches = whole()
    for _ in range(steps):
        trainer.step(node_batches)  # type: ignore[arg-type]
    return flatten_parameters(model)


def _apart(a: torch.Tensor, b: torch.Tensor) -> float:
    """How far update a is from update b (both from the test model's θ₀), relative to
    b's norm."""
    from starling.diloco import flatten_parameters

    from .sharded_steps import MODEL

    theta = flatten_parameters(build_model(MODEL, seed=0, device=torch.device("cpu")))
    return float(((a - theta) - (b - theta)).norm() / (b - theta).norm())


def test_a_sharded_node_preconditions_like_one_process_on_its_whole_batch(tmp_path: Path) -> None:
    """A node of two ranks under torchrun (FSDP, gloo) whose inner AdamW assumes 4
    batches steps as one process does on the node's whole batch, where each half of
    that batch is both ranks' halves together: its halves are the node's, reduced across
    the ranks, not each rank's own (autograd.grad would bypass FSDP's reduce)."""
    shard = tmp_path / "shard.bin"
    np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint16).tofile(shard)
    steps, batches = 3, 4.0
    expected = _one_process_steps(shard, steps, batches, "adamw")
    plain = _one_process_steps(shard, steps, 0, "adamw")
    # 6.0e-6 apart here, plain AdamW 9.9e-5: the ranks' reduce sums in another order, and
    # AdamW's first steps (≈ g/|g|) magnify that where a gradient is near zero, in one
    # coordinate of the embedding here. Halves each rank took alone: 0.1 or more.
    assert _apart(_sharded_steps(tmp_path, shard, steps, batches, "adamw"), expected) < 1e-3
    assert _apart(_sharded_steps(tmp_path, shard, steps, 0, "adamw"), plain) < 1e-3
    assert _apart(plain, expected) > 0.1  # 0.46: the discount moves the update


def test_a_sharded_node_trains_muon_as_one_process_on_its_whole_batch(tmp_path: Path) -> None:
    """Muon orthogonalizes whole matrices, where each rank of a node sharded by FSDP
    holds a block of rows: every rank gathers the matrix, orthogonalizes it and keeps
    its block. Two ranks then step as one process on the node's whole batch (Muon on the
    hidden matrices, the batch-scaled AdamW on the rest); a rank that orthogonalized only
    its own block would move each matrix another way."""
    shard = tmp_path / "shard.bin"
    np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint16).tofile(shard)
    steps, batches = 3, 4.0
    expected = _one_process_steps(shard, steps, batches, "muon")
    adamw = _one_process_steps(shard, steps, batches, "adamw")
    # 8.5e-6 apart here; each rank orthogonalizing only its own block: 0.14 (even blocks).
    assert _apart(_sharded_steps(tmp_path, shard, steps, batches, "muon"), expected) < 1e-3
    assert _apart(adamw, expected) > 0.1  # Muon moves the hidden matrices its own way


def test_a_folded_mean_keeps_the_replicas_progress_on_top_of_the_new_theta(
    tmp_path: Path,
) -> None:
    """Overlap: round r−1's mean reaches θ while round r trains. The node folds it in
    between two steps: the replica goes on from θ plus what it trained since `anchor`,
    and round r's Δ (θ minus the replica at the close) is measured from θ."""
    import threading

    from node.daemon import NodeDaemon
    from starling.diloco import GlobalState

    shard = tmp_path / "shard.bin"
    np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint16).tofile(shard)
    cfg = TrainConfig(steps=100, batch_tokens=256, micro_batch_size=4, seq_len=64, lr=1e-3)
    model_cfg = ModelConfig(vocab_size=256, dim=32, n_layers=1, n_heads=2, n_kv_heads=2)
    model = build_model(model_cfg, seed=0, device=torch.device("cpu"))
    inner = LocalInnerLoop(model, InnerTrainer(model, cfg, torch.device("cpu")), cfg)
    inner.set_data(shard, "uint16", seed=1)
    anchor = inner.flat()
    for _ in range(2):
        inner.step()
    trained = inner.flat() - anchor
    theta = anchor + 0.01 * torch.randn(anchor.shape, generator=torch.Generator().manual_seed(0))
    daemon = NodeDaemon.__new__(NodeDaemon)  # only what _fold touches
    daemon.inner, daemon.state, daemon._timings = inner, GlobalState(theta), {7: {}}
    daemon._theta_lock = threading.Lock()
    new_anchor = daemon._fold(7, anchor, steps_done=2)
    assert torch.equal(new_anchor, theta) and new_anchor is not daemon.state.params
    assert torch.equal(inner.flat(), theta + trained)
    assert daemon._timings[7]["folded_at_step"] == 2
