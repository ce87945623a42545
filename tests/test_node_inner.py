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
