"""A node whose training diverges once: `python tests/diverging_node.py N <the arguments
of starling>` runs the starling CLI with the replica's weights and its optimizer's moments
set to NaN right after its N-th inner step — what an unstable learning rate or a faulty
GPU does. The node must sit that round out, restart from θ with a fresh optimizer (NaN
moments would poison every later step) and contribute again from the next round."""

from __future__ import annotations

import sys
from typing import Any

import torch

from starling.cli import main
from starling.train import InnerTrainer

diverge_at = int(sys.argv.pop(1))
step = InnerTrainer.step
steps = 0


def diverging_step(self: InnerTrainer, *args: Any, **kwargs: Any) -> Any:
    global steps
    stats = step(self, *args, **kwargs)
    steps += 1
    if steps == diverge_at:
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
            for state in self.optimizer.state.values():
                for value in state.values():
                    if isinstance(value, torch.Tensor) and value.is_floating_point():
                        value.fill_(float("nan"))
    return stats


InnerTrainer.step = diverging_step  # type: ignore[method-assign]
sys.argv[0] = "starling"
main()
