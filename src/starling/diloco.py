"""DiLoCo's outer loop: global fp32 state, pseudo-gradients, token-weighted means, the
outer Nesterov step, and a fingerprint of the global state.

Everything here runs on the CPU in fp32 with plain, unfused operations (one IEEE rounding
per op, no fused multiply-add), so nodes on different hardware that apply the same
committed mean reach bit-identical global weights.

Flat layout: a model's parameters (in `named_parameters` order, tied ones once) are
concatenated into one 1-D fp32 vector of n values; shards of the exchange are slices of it.
"""

from __future__ import annotations

import hashlib
import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

# Recommended settings, measured by bench/convergence.py (docs/benchmarks.md): the defaults of
# `starling simulate --strategy diloco` and of new runs. int4 matched fp32's loss at 1/8
# of the bytes; outer momentum 0.5 beat the DiLoCo paper's 0.9 by 4% over 20 rounds (0.9
# needs many more rounds to pay off: revisit for long runs). For slow links int2 (half
# int4's bytes) cost 0.4% more loss: 427x fewer bytes than DDP at H = 30.
DEFAULT_INNER_STEPS = 30
DEFAULT_CODEC = "int4"


@dataclass(frozen=True)
class OuterConfig:
    lr: float = 0.7
    momentum: float = 0.5
    nesterov: bool = True

    def __post_init__(self) -> None:
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"outer lr must be a positive number, got {self.lr}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"outer momentum must be in [0, 1), got {self.momentum}")


def flatten_parameters(model: nn.Module) -> torch.Tensor:
    """(n,) fp32 CPU copy of the model's parameters."""
    return torch.cat([p.detach().to("cpu", torch.float32).reshape(-1) for p in model.parameters()])


@torch.no_grad()
def load_flat_parameters(model: nn.Module, flat: torch.Tensor) -> None:
    """Copy a flat (n,) vector into the model's parameters (any device / dtype)."""
    offset = 0
    for p in model.parameters():
        n = p.numel()
        p.copy_(flat[offset : offset + n].view_as(p))
        offset += n
    if offset != flat.numel():
        raise ValueError(f"flat vector has {flat.numel()} values, model has {offset}")


class GlobalState:
    """θ (the committed global weights) and the outer momentum, fp32 on the CPU, kept
    apart from the training replica (which may be bf16 or on a GPU)."""

    def __init__(self, params: torch.Tensor, momentum: torch.Tensor | None = None) -> None:
        if params.dim() != 1 or (momentum is not None and momentum.shape != params.shape):
            # The fingerprint covers n and the values, not a shape; the outer step would
            # broadcast a momentum of another shape.
            raise ValueError(
                f"global state takes two vectors of one length, got {tuple(params.shape)} and "
                f"{None if momentum is None else tuple(momentum.shape)}"
            )
        self.params = params.detach().to("cpu", torch.float32).clone()
        self.momentum = (
            torch.zeros_like(self.params)
            if momentum is None
            else momentum.detach().to("cpu", torch.float32).clone()
        )

    @classmethod
    def from_model(cls, model: nn.Module) -> GlobalState:
        return cls(flatten_parameters(model))

    def pseudo_gradient(self, replica: nn.Module) -> torch.Tensor:
        """Δ_i = θ − θ_i: the direction the replica moved, as a gradient (descent = −Δ)."""
        return self.params - flatten_parameters(replica)

    def outer_step(
        self, mean_delta: torch.Tensor, cfg: OuterConfig, span: slice = slice(None)
    ) -> None:
        """SGD with (Nesterov) momentum on the mean pseudo-gradient:
        m ← μ·m + Δ̄;  u ← Δ̄ + μ·m (Nesterov) or m;  θ ← θ − lr·u.
        With `span`, on θ[span] and m[span] only (a fragment's range, synced on its own
        schedule); the step is elementwise, so stepping ranges one by one gives the bits
        of one step on the whole."""
        params, momentum = self.params[span], self.momentum[span]
        if mean_delta.shape != params.shape or mean_delta.dtype != torch.float32:
            raise ValueError("mean pseudo-gradient must be fp32 with the state's shape")
        mu = torch.tensor(cfg.momentum, dtype=torch.float32)
        lr = torch.tensor(cfg.lr, dtype=torch.float32)
        momentum = torch.mul(momentum, mu).add(mean_delta)  # two roundings, no FMA
        update = torch.add(mean_delta, torch.mul(momentum, mu)) if cfg.nesterov else momentum
        params = torch.sub(params, torch.mul(update, lr))
        if params.numel() == self.params.numel():
            self.params, self.momentum = params, momentum
        else:
            self.params[span], self.momentum[span] = params, momentum

    def fingerprint(self) -> str:
        """SHA-256 over a canonical layout: b"starling-state-v1", n (u64 LE), then θ and m
        as little-endian fp32."""
        digest = hashlib.sha256(b"starling-state-v1")
        digest.update(struct.pack("<Q", self.params.numel()))
        digest.update(self.params.numpy().astype("<f4").tobytes())
        digest.update(self.momentum.numpy().astype("<f4").tobytes())
        return digest.hexdigest()

    def copy(self) -> GlobalState:
        return GlobalState(self.params, self.momentum)


def flat_ranges(model: nn.Module, chosen: Sequence[torch.Tensor]) -> tuple[tuple[int, int], ...]:
    """The [start, end) ranges the `chosen` parameters take in the model's flat layout
    (`flatten_parameters`), adjacent ones merged, in order."""
    wanted = {id(p) for p in chosen}
    ranges: list[tuple[int, int]] = []
    offset = 0
    for p in model.parameters():
        if id(p) in wanted:
            if ranges and ranges[-1][1] == offset:
                ranges[-1] = (ranges[-1][0], offset + p.numel())
            else:
                ranges.append((offset, offset + p.numel()))
        offset += p.numel()
    return tuple(ranges)


def weighted_mean(deltas: Sequence[torch.Tensor], tokens: Sequence[int]) -> torch.Tensor:
    """Σ n_i·Δ_i / Σ n_i, summed in the given order (fixed order ⇒ reproducible bits)."""
    if not deltas or len(deltas) != len(tokens):
        raise ValueError("need one token count per contribution, and at least one")
    if any(not (math.isfinite(n) and n > 0) for n in tokens):
        raise ValueError(f"token counts must be positive, got {list(tokens)}")
    if any(delta.shape != deltas[0].shape for delta in deltas):
        raise ValueError(f"contributions differ in shape: {[tuple(d.shape) for d in deltas]}")
    total = float(sum(tokens))
    acc = torch.zeros_like(deltas[0], dtype=torch.float32)
    for delta, n in zip(deltas, tokens, strict=True):
        acc = acc.add(torch.mul(delta.float(), torch.tensor(n / total, dtype=torch.float32)))
    return acc
