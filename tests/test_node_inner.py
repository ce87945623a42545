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
    # A node that joins when the run is 600 steps in trains at step 600's rate, then on.
    inner.set_schedule_step(600)
    first, second = inner.step(), inner.step()
    assert first.lr == cfg.lr * lr_multiplier(600, cfg)
    assert second.lr == cfg.lr * lr_multiplier(601, cfg)
    assert first.lr < 0.7 * cfg.lr  # well into the cosine decay, not in warm-up
    assert first.tokens == 256
