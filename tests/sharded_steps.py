"""Inner steps of a node sharded by torchrun: `python -m torch.distributed.run
--standalone --nproc-per-node W tests/sharded_steps.py SHARD OUT STEPS BATCHES
OPTIMIZER` has rank 0 drive a ShardedInnerLoop (the others run_follower, as under
`starling node join`) through STEPS inner steps on SHARD (uint16 tokens) with OPTIMIZER
(adamw or muon), the inner AdamW's second moment assuming BATCHES batches (0: plain
AdamW), then write θ to OUT as a .npy of float32."""

from __future__ import annotations

import os
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from starling.model import ModelConfig
from starling.node.distributed import NodeGroup, ShardedInnerLoop, run_follower
from starling.train import TrainConfig

# The layout tests/test_node_inner.py rebuilds in one process: keep the two in step. An
# odd MLP width: the gate and up matrices' 37 rows split unevenly over two ranks (19, 18).
MODEL = ModelConfig(vocab_size=256, dim=32, n_layers=2, n_heads=2, n_kv_heads=2, ffn_dim=37)
# Two micro-batches of 4 sequences a step on each rank: each half of the node's batch is
# accumulated over them before FSDP reduces it.
TRAIN = TrainConfig(
    steps=100, batch_tokens=512, micro_batch_size=4, seq_len=64, lr=3e-3, warmup_steps=0
)
SEED = 1


def main() -> None:
    shard, out, steps, batches, optimizer = (
        Path(sys.argv[1]),
        Path(sys.argv[2]),
        int(sys.argv[3]),
        float(sys.argv[4]),
        sys.argv[5],
    )
    group = NodeGroup(torch.device("cpu"))
    try:
        if group.rank != 0:
            run_follower(group)
            return
        train = replace(TRAIN, optimizer=optimizer)
        inner = ShardedInnerLoop(group, MODEL, train, seed=0, batch_scaled=batches > 0)
        if batches > 0:
            inner.set_moment_batches(batches)
        inner.set_data(shard, "uint16", SEED)
        for _ in range(steps):
            inner.step()
        np.save(out, inner.flat().numpy(), allow_pickle=False)
    finally:
        group.stop()
    # As `starling node join` under torchrun: skip the interpreter's finalization, which
    # can race gloo's threads (pytorch/pytorch#179291).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
