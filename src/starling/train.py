"""Inner training: AdamW or Muon, warmup + cosine / WSD schedules, clipping, gradient
accumulation.

`InnerTrainer.step()` is one optimizer step; `train()` is the plain single-machine loop
(`starling train`, the baseline every distributed run is compared with). DiLoCo wraps
the same `step()` in rounds: `for round: for h in range(H): trainer.step(); outer.step()`.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

Batch = tuple[torch.Tensor, torch.Tensor]  # inputs, targets: (B, T) int64 each

SCHEDULES = ("cosine", "wsd", "constant")
OPTIMIZERS = ("adamw", "muon")
PRECISIONS = ("auto", "fp32", "bf16")
DEVICES = ("auto", "cpu", "cuda", "mps")

# Warmup steps `starling simulate`, the bench and runs use unless told: a quarter of the
# schedule's steps, then its decay (WSD by default); TrainConfig's own default (50) is
# `starling train`'s. On the bench's setup (tiny, 4 workers, 600 steps, each strategy at
# its best lr) the two took DDP from 3.9278 (30 warmup steps, cosine) to 3.7621 and
# DiLoCo int2 at H = 30 from 4.1774 to 4.0560: DDP gains more, so the 30-step cosine
# baseline flattered DiLoCo. DDP alone does a little better with 100 warmup steps
# (3.7534), DiLoCo worse (4.0695). DiLoCo int4 at H = 30 (shuffled shards): 12 warmup
# steps 4.1133, 50 4.0793, 75 4.0586, 150 4.0605. A run's is written into its run.toml
# when it is made (RunConfig.with_warmup_pinned). docs/benchmarks.md "The schedule".
WARMUP_SHARE = 1 / 4


def default_warmup(steps: int) -> int:
    """Warmup steps of a `steps`-step schedule when none are given (WARMUP_SHARE)."""
    return round(steps * WARMUP_SHARE)


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 1000
    batch_tokens: int = 8192  # tokens per optimizer step (all micro-batches together)
    micro_batch_size: int = 8  # sequences per forward/backward pass
    seq_len: int = 256
    lr: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the schedule ends at lr * min_lr_ratio
    warmup_steps: int = 50
    # WSD (warmup-stable-decay): flat at the peak after the warmup, then a linear decay
    # over the last `decay_fraction` of the steps. It beat cosine for DDP and DiLoCo alike
    # in the simulator (bench/convergence.py: DDP 3.8226 against 3.9278, DiLoCo int2
    # 4.1011 against 4.1774 at 30 warmup steps) and in `starling demo` (3 real nodes,
    # 8 rounds: 4.6129 against 4.7220). docs/benchmarks.md "Convergence per byte".
    schedule: str = "wsd"
    decay_fraction: float = 0.2  # WSD: the last fraction of steps decays linearly
    weight_decay: float = 0.1
    beta1: float = 0.9
    # adamw: AdamW on every parameter. muon: Muon on the hidden weight matrices (MuonAdamW)
    # and AdamW on the rest, at the same lr, schedule and weight decay. On the bench's
    # setup (bench/convergence.py, docs/benchmarks.md "Convergence per byte"), each at its best lr,
    # muon took DDP from 3.7621 to 3.5636 (6e-3) and DiLoCo int2 from 4.0560 to 3.8482
    # (4.5e-3), both about −5%: the ratio between them stays 1.08×. The runs' screen
    # works on Muon's updates (bench/chaos.py --optimizer muon: 80/80 sign-flipped
    # caught, 0 of 240 honest cut), but runs keep AdamW: every tuned lr and figure is
    # AdamW's.
    optimizer: str = "adamw"
    # 0.99: each DiLoCo worker's AdamW sees a batch K times smaller than DDP's, and a
    # longer memory of squared gradients follows its noise less. On the tiny preset (4
    # workers, H = 5, 1,500 steps, GPU) 0.99 took DiLoCo from 3.90 (0.95) to 3.65
    # validation loss; on the CPU bench (bench/convergence.py, H = 30) int4 went from
    # 4.62 to 4.51 and DDP from 4.08 to 4.05. Runs screen updates by direction, and a
    # longer memory makes honest updates agree less: with the direction judged across
    # rounds too (starling.robust), bench/chaos.py's 8 nodes with 0.99 caught 150 of
    # 150 sign-flipped updates (1 of 8, 0 of 1,050 honest cut) and 336 of 340 (2 of 8,
    # 2 of 1,022 honest cut); 0.999, better still in the simulator (3.41 with 150
    # warmup steps), caught only 314 of 340 (2 of 8). docs/benchmarks.md, "Convergence per byte".
    beta2: float = 0.99
    # The inner AdamW's denominator estimates the squared gradient of a batch this many
    # times the step's own (1: plain AdamW). A DiLoCo worker sees a K-times smaller batch
    # than DDP's, so its √v holds K times the gradient noise variance and damps the noisy
    # coordinates more than DDP's does; with K here its steps are preconditioned like
    # DDP's. See BatchScaledAdamW; docs/benchmarks.md, "Convergence per byte".
    moment_batches: float = 1.0
    grad_clip: float = 1.0  # max global gradient L2 norm; 0 disables clipping
    eval_every: int = 100  # steps between validation evaluations; 0: only at the end
    eval_batches: int = 8
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"  # auto: bf16 autocast on CUDA when supported, else fp32
    compile: bool = False  # torch.compile the model (GPU speed-up; slow start)

    def __post_init__(self) -> None:
        checks = [
            (self.steps > 0, f"steps must be positive, got {self.steps}"),
            (self.seq_len > 0, f"seq len must be positive, got {self.seq_len}"),
            (self.micro_batch_size > 0, "micro batch size must be positive"),
            (
                math.isfinite(self.lr) and self.lr > 0,
                f"learning rate must be positive, got {self.lr}",
            ),
            (0 <= self.min_lr_ratio <= 1, "min lr ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup steps must be ≥ 0"),
            (0 < self.decay_fraction <= 1, "decay fraction must be in (0, 1]"),
            (self.weight_decay >= 0, "weight decay must be ≥ 0"),
            (0 <= self.beta1 < 1, f"beta1 must be in [0, 1), got {self.beta1}"),
            (0 <= self.beta2 < 1, f"beta2 must be in [0, 1), got {self.beta2}"),
            (
                self.moment_batches >= 1,
                f"moment batches must be ≥ 1, got {self.moment_batches}",
            ),
            (
                self.moment_batches == 1 or self.micro_batch_size >= 2,
                "moment batches > 1 splits each micro-batch in two: micro batch size must be ≥ 2",
            ),
            (self.grad_clip >= 0, "grad clip must be ≥ 0"),
            (self.eval_every >= 0, "eval every must be ≥ 0"),
            (self.eval_batches > 0, "eval batches must be positive"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (
                self.optimizer in OPTIMIZERS,
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}",
            ),
            (self.precision in PRECISIONS, f"precision must be one of {', '.join(PRECISIONS)}"),
            (self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)
        sequence_tokens = self.micro_batch_size * self.seq_len
        if self.batch_tokens <= 0 or self.batch_tokens % sequence_tokens:
            nearest = max(1, round(self.batch_tokens / sequence_tokens)) * sequence_tokens
            raise ValueError(
                f"batch tokens {self.batch_tokens} must be a positive multiple of "
                f"micro batch size × seq len = {sequence_tokens}; "
                f"try --batch-tokens {nearest}"
            )

    @property
    def accumulation_steps(self) -> int:
        return self.batch_tokens // (self.micro_batch_size * self.seq_len)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def lr_multiplier(step: int, cfg: TrainConfig) -> float:
    """Learning-rate factor for optimizer step `step` (0-based), in [0, 1]."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    floor = cfg.min_lr_ratio
    if cfg.schedule == "constant":
        return 1.0
    if cfg.schedule == "cosine":
        progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    # WSD (warmup-stable-decay): flat at the peak, then a linear decay over the tail.
    decay_start = cfg.steps - max(1, round(cfg.decay_fraction * cfg.steps))
    if step < decay_start:
        return 1.0
    progress = (step - decay_start) / max(1, cfg.steps - decay_start)
    return 1.0 - (1 - floor) * min(1.0, progress)


def round_lengths(steps: int, rounds: int, weights: list[float]) -> list[int]:
    """Inner steps of each of `rounds` rounds over `steps` steps, where round r ends at
    the first step by which the running sum of `weights` (one per step) reaches r/rounds
    of their total; every round gets at least one step."""
    if len(weights) != steps:
        raise ValueError(f"cannot split {steps} steps into {rounds} rounds")
    ends = _weighted_round_ends(steps, rounds, lambda: weights)
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


def lr_following_ends(schedule: TrainConfig, rounds: int, power: float) -> list[int]:
    """The step at which each of `rounds` rounds over the schedule's steps ends when rounds
    follow the inner lr (`sync_power`): round r ends where Σ lr_multiplier^power reaches
    r/rounds of the whole schedule's (round_lengths), so rounds are short while the lr is
    high and long as it decays. `starling simulate --sync-power` splits its steps so, and
    the coordinator sizes budget rounds so (coordinator.rounds.lr_following_budget). Two
    passes over the steps in O(rounds) memory: a run's schedule may have many millions."""
    return _weighted_round_ends(
        schedule.steps,
        rounds,
        lambda: (lr_multiplier(step, schedule) ** power for step in range(schedule.steps)),
    )


def _weighted_round_ends(
    steps: int, rounds: int, weights: Callable[[], Iterable[float]]
) -> list[int]:
    """round_lengths' rule as round ends, streaming `weights()` (one per step) twice: once
    for the total, once for the running sum (summed in the same order, so the same
    floats as a cumulative list would hold)."""
    if not 1 <= rounds <= steps:
        raise ValueError(f"cannot split {steps} steps into {rounds} rounds")
    total = 0.0
    for weight in weights():
        total += weight
    ends: list[int] = []
    running = 0.0
    for step, weight in enumerate(weights()):
        running += weight
        # Round r (1-based) ends at the first step whose running sum reaches r/rounds of
        # the total; several rounds can end at one step before the clamp spreads them.
        while len(ends) < rounds - 1 and running >= total * (len(ends) + 1) / rounds * (1 - 1e-12):
            r = len(ends) + 1
            ends.append(min(max(step + 1, (ends[-1] if ends else 0) + 1), steps - (rounds - r)))
        if len(ends) == rounds - 1:
            break
    ends.append(steps)
    return ends


def select_device(name: str) -> torch.device:
    if name not in DEVICES:
        raise ValueError(f"unknown device {name!r}; choose one of {', '.join(DEVICES)}")
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda asked for, but no CUDA GPU is visible to PyTorch")
    if name == "mps" and not torch.backends.mps.is_available():
        raise ValueError("--device mps asked for, but Apple's MPS backend is not available")
    return torch.device(name)


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """bf16 autocast on CUDA (weights and optimizer stay fp32); None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "bf16":
        return torch.bfloat16
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return None


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Decay matrices (and the embedding); never norms' gains."""
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class BatchScaledAdamW(torch.optim.Optimizer):
    """AdamW whose second moment estimates that of a batch `batches` times larger.

    Per coordinate, a batch's squared gradient is E[g²] = μ² + σ²/B (μ the true gradient,
    σ² the per-sequence variance). The two halves of a batch have independent noise, so
    E[g_a ⊙ g_b] = μ², and for a batch K times larger

        v_K = v / K + (1 − 1/K) · μ̂²,   v = EMA(g²),  μ̂² = clamp(EMA(g_a ⊙ g_b), 0, v)

    (bias-corrected like v). The update is AdamW's with √v_K in place of √v. With K = 1
    it is AdamW. The decoupled weight decay and ε are AdamW's.
    """

    def __init__(
        self,
        params: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        batches: float,
        eps: float = 1e-8,
    ) -> None:
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": 0.0})
        self.batches = batches

    @torch.no_grad()
    def step_with_halves(self, halves_product: dict[torch.Tensor, torch.Tensor]) -> None:
        """One step from each parameter's `.grad` (the whole batch's, clipped) and
        `halves_product[p]` = g_a ⊙ g_b of the batch's two halves (clipped alike), given
        for every parameter that AdamW steps (MuonAdamW's matrices need none). At one
        batch (plain AdamW) the product is not used and may be left out: a MuonAdamW
        on micro-batches of one sequence, which cannot be halved."""
        if self.batches != 1:
            adamw = [p for g in self.param_groups if not g.get("muon") for p in g["params"]]
            if any(p.grad is not None and p not in halves_product for p in adamw):
                raise ValueError("a batch-scaled step needs each parameter's halves' product")
        for group in self.param_groups:
            self._step_group(group, halves_product)

    def _step_group(
        self, group: dict[str, Any], halves_product: dict[torch.Tensor, torch.Tensor]
    ) -> None:
        share = 1.0 / self.batches
        beta1, beta2 = group["betas"]
        lr, eps, decay = group["lr"], group["eps"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = 0
                for key in ("exp_avg", "exp_avg_sq", "exp_avg_halves"):
                    state[key] = torch.zeros_like(p)
            state["step"] += 1
            t = state["step"]
            m, v, signal = state["exp_avg"], state["exp_avg_sq"], state["exp_avg_halves"]
            m.lerp_(p.grad, 1 - beta1)
            v.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
            if p in halves_product:  # absent only at one batch (step_with_halves)
                signal.mul_(beta2).add_(halves_product[p], alpha=1 - beta2)
            v_hat = v / (1 - beta2**t)
            signal_hat = torch.minimum(signal.clamp(min=0) / (1 - beta2**t), v_hat)
            denominator = (v_hat * share).add_(signal_hat, alpha=1 - share).sqrt_().add_(eps)
            if decay:
                p.mul_(1 - lr * decay)
            p.addcdiv_(m, denominator, value=-lr / (1 - beta1**t))


def orthogonalize(
    matrix: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """≈ U·Vᵀ of `matrix` = U·S·Vᵀ (every singular value pushed toward 1), by Muon's
    quintic Newton–Schulz iteration (Jordan et al., 2024). Its coefficients trade
    exactness for speed: five iterations leave every singular value down to a hundredth
    of the largest in about [0.7, 1.2] and lift smaller ones partway, which is all an
    update direction needs. (rows, cols) in, (rows, cols) out, in the matrix's dtype;
    the products run in `dtype` (bf16 where the step's own products do: it moves the
    result by about a tenth of its norm, within the iteration's own spread, and bf16
    products run many times faster on GPUs and on CPUs with AMX)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = (matrix / (matrix.norm() + 1e-7)).to(dtype)  # spectral norm ≤ Frobenius norm ≤ 1
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T  # iterate on the smaller Gram matrix x·xᵀ
    for _ in range(steps):
        gram = x @ x.T  # (s, s), s = the smaller side
        polynomial = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b·G + c·G²
        # a·x + (b·G + c·G²)·x, written out fresh in row-major order: `a * x` would keep a
        # tall matrix's transposed layout through every iteration, and bf16 products on
        # transposed operands ran at half the speed on this CPU.
        x = torch.addmm(x, polynomial, x, beta=a)
    return (x.T if tall else x).to(matrix.dtype)


def muon_param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """param_groups, with the hidden weight matrices (2-D, not an embedding: tied input
    and output embeddings stay with AdamW, as Muon's authors advise) in a group of their
    own marked `muon`."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    hidden = [
        p
        for p in model.parameters()
        if p.requires_grad and p.dim() == 2 and id(p) not in embeddings
    ]
    hidden_ids = {id(p) for p in hidden}
    groups = [
        {**group, "params": [p for p in group["params"] if id(p) not in hidden_ids]}
        for group in param_groups(model, weight_decay)
    ]
    return [{"params": hidden, "weight_decay": weight_decay, "muon": True}, *groups]


class MuonAdamW(BatchScaledAdamW):
    """Muon on the groups marked `muon`, BatchScaledAdamW on the others.

    Muon (Jordan et al., 2024) keeps a momentum buffer b ← μ·b + g and steps along the
    orthogonalized Nesterov direction, orthogonalize(g + μ·b). Scaled by 0.2·√max(rows,
    cols), its update has about AdamW's RMS (Liu et al., 2025, "Muon is scalable for LLM
    training"), so it takes AdamW's lr, schedule and decoupled weight decay as they are.
    """

    momentum = 0.95  # μ, Muon's default

    def __init__(
        self,
        params: list[dict[str, Any]],
        lr: float,
        betas: tuple[float, float],
        batches: float,
        sharded: bool = False,
        orthogonalize_dtype: torch.dtype = torch.float32,
    ) -> None:
        """`sharded`: the matrices are FSDP's DTensors (orthogonalize_sharded).
        `orthogonalize_dtype`: what Newton–Schulz's products run in."""
        super().__init__(params, lr, betas, batches)
        self.orthogonalize = orthogonalize_sharded if sharded else orthogonalize
        self.orthogonalize_dtype = orthogonalize_dtype

    def _step_group(
        self, group: dict[str, Any], halves_product: dict[torch.Tensor, torch.Tensor]
    ) -> None:
        if not group.get("muon"):
            super()._step_group(group, halves_product)
            return
        lr, decay = group["lr"], group["weight_decay"]
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["momentum_buffer"] = torch.zeros_like(p)
            buffer = state["momentum_buffer"]
            buffer.mul_(self.momentum).add_(p.grad)
            update = self.orthogonalize(
                p.grad + self.momentum * buffer, dtype=self.orthogonalize_dtype
            )
            if decay:
                p.mul_(1 - lr * decay)
            p.add_(update * (0.2 * max(p.shape) ** 0.5), alpha=-lr)


def orthogonalize_sharded(matrix: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """orthogonalize(matrix) for a matrix sharded by FSDP (a DTensor, each rank holding
    a block of its rows): Newton–Schulz needs the whole matrix, so every rank gathers
    it, orthogonalizes it and keeps its own block of the result. The node's ranks
    repeat each other's work on the matrices (small next to a step's forward and
    backward passes) for one all-gather of each matrix a step, about what FSDP's own
    forward pass costs; a rank holds one whole matrix at a time."""
    from torch.distributed.tensor import DTensor, Replicate

    assert isinstance(matrix, DTensor), "a sharded model's matrices are DTensors"
    mesh = matrix.device_mesh
    whole = DTensor.from_local(
        orthogonalize(matrix.full_tensor(), dtype=dtype), mesh, [Replicate()] * mesh.ndim
    )
    # Replicated to sharded: each rank cuts its own block, with no communication.
    return whole.redistribute(mesh, matrix.placements)


@dataclass(frozen=True)
class StepStats:
    step: int  # optimizer steps done, including this one
    loss: float  # mean training loss over the step's micro-batches
    tokens: int  # tokens this step consumed
    grad_norm: float  # global L2 norm before clipping
    lr: float


class InnerTrainer:
    """Owns the inner optimizer of one replica; one call to `step()` is one AdamW step."""

    def __init__(
        self,
        model: nn.Module,
        cfg: TrainConfig,
        device: torch.device,
        batch_scaled: bool = False,
        sharded: bool = False,
    ) -> None:
        """`batch_scaled`: use BatchScaledAdamW even while cfg.moment_batches is 1, so
        that set_moment_batches can change it later (a run's node follows the number of
        contributors to each round). `sharded`: the model is sharded by FSDP, whose
        hooks reduce each backward pass's gradient across the ranks; the two halves a
        BatchScaledAdamW needs are then differentiated by .backward(), which runs them."""
        self.model = model
        self.cfg = cfg
        self.device = device
        self.sharded = sharded
        self.optimizer: torch.optim.Optimizer
        if batch_scaled and cfg.micro_batch_size < 2:
            raise ValueError("a batch-scaled AdamW needs micro_batch_size ≥ 2 (two halves)")
        self.amp_dtype = autocast_dtype(device, cfg.precision)
        if cfg.optimizer == "muon":
            self.optimizer = MuonAdamW(
                muon_param_groups(model, cfg.weight_decay),
                lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2),
                batches=cfg.moment_batches,
                sharded=sharded,
                # Newton–Schulz in the step's own precision: bf16 under bf16 autocast.
                orthogonalize_dtype=self.amp_dtype or torch.float32,
            )
        elif cfg.moment_batches == 1 and not batch_scaled:
            self.optimizer = torch.optim.AdamW(
                param_groups(model, cfg.weight_decay),
                lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2),
                fused=device.type == "cuda",
            )
        else:
            self.optimizer = BatchScaledAdamW(
                param_groups(model, cfg.weight_decay),
                lr=cfg.lr,
                betas=(cfg.beta1, cfg.beta2),
                batches=cfg.moment_batches,
            )
        # Chosen once: whether a step differentiates its batch's halves apart (a
        # BatchScaledAdamW needs their product unless it stays at one batch: a MuonAdamW
        # not told to follow the contributors, or on micro-batches of one sequence, which
        # have no halves; halving cost its steps 9% on this CPU, bench/throughput.py), and
        # which parameters Muon steps on the gradient alone (they need no product).
        self.halved = (
            isinstance(self.optimizer, BatchScaledAdamW)
            and cfg.micro_batch_size >= 2
            and (batch_scaled or cfg.moment_batches != 1)
        )
        groups = self.optimizer.param_groups
        self.muon_ids = {id(p) for group in groups if group.get("muon") for p in group["params"]}
        self.steps_done = 0
        self.forward: Callable[[torch.Tensor], torch.Tensor] = (
            torch.compile(model) if cfg.compile else model
        )

    @property
    def optimizer_name(self) -> str:
        """What its steps run, read off the optimizer it built: "muon" or "adamw"."""
        return "muon" if isinstance(self.optimizer, MuonAdamW) else "adamw"

    @property
    def moment_batches(self) -> float:
        """The batch, in steps' batches, that the inner AdamW's second moment assumes."""
        if isinstance(self.optimizer, BatchScaledAdamW):
            return self.optimizer.batches
        return 1.0

    def reset_optimizer(self) -> None:
        """Forget the optimizer's moments and step counts (after a divergence left NaN in
        them); they start again, lazily, at the next step."""
        self.optimizer.state.clear()

    def set_moment_batches(self, batches: float) -> None:
        """From the next step on, precondition like a batch `batches` times the step's."""
        if not isinstance(self.optimizer, BatchScaledAdamW):
            raise ValueError("set_moment_batches needs a trainer built with batch_scaled=True")
        if not batches >= 1:
            raise ValueError(f"moment batches must be ≥ 1, got {batches}")
        if batches != 1 and not self.halved:  # its steps have no halves' product
            if self.cfg.micro_batch_size < 2:
                raise ValueError("moment batches > 1 needs micro_batch_size ≥ 2 (two halves)")
            raise ValueError("set_moment_batches needs a trainer built with batch_scaled=True")
        self.optimizer.batches = float(batches)

    def _autocast(self) -> contextlib.AbstractContextManager[Any]:
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.amp_dtype)

    def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with self._autocast():
            logits = self.forward(inputs)  # (B, T, V)
        # Cross-entropy in fp32 whatever the autocast dtype: stable for large vocabularies.
        return nn.functional.cross_entropy(
            logits.float().flatten(0, 1), targets.flatten(), reduction="mean"
        )

    def step(self, batches: Iterator[Batch]) -> StepStats:
        """Accumulate gradients over `accumulation_steps` micro-batches, clip, step."""
        self.model.train()
        lr = self.cfg.lr * lr_multiplier(self.steps_done, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        accumulation = self.cfg.accumulation_steps
        micro_batches = (
            tuple(t.to(self.device, non_blocking=True) for t in next(batches))
            for _ in range(accumulation)
        )
        # [parameters, first halves' gradients, second halves']: none unless halved.
        halves: list[list[torch.Tensor]] = [[], [], []]
        if self.halved and self.sharded:
            loss_sum, tokens, halves = self._backward_halves_by_passes(micro_batches, accumulation)
        elif self.halved:
            loss_sum, tokens, halves = self._backward_halves(micro_batches, accumulation)
        else:
            loss_sum, tokens = self._backward(micro_batches, accumulation)
        max_norm = self.cfg.grad_clip if self.cfg.grad_clip > 0 else float("inf")
        grad_norm = nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if isinstance(self.optimizer, BatchScaledAdamW):  # its product, or {} if not halved
            # clip_grad_norm_'s own coefficient, squared: the halves' product scales as g².
            clip = min(1.0, max_norm / (float(grad_norm) + 1e-6))
            params, first_half, second_half = halves
            self.optimizer.step_with_halves(
                {
                    p: first.mul_(second).mul_(clip * clip)
                    for p, first, second in zip(params, first_half, second_half, strict=True)
                    if id(p) not in self.muon_ids
                }
            )
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        # .item() is a host-device sync point: once per optimizer step, not per micro-batch.
        return StepStats(
            step=self.steps_done,
            loss=(loss_sum / accumulation).item(),
            tokens=tokens,
            grad_norm=float(grad_norm),
            lr=lr,
        )

    def _backward(
        self, micro_batches: Iterator[tuple[torch.Tensor, ...]], accumulation: int
    ) -> tuple[torch.Tensor, int]:
        """The batch's mean gradient into `.grad`; the summed loss and the tokens."""
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for inputs, targets in micro_batches:
            loss = self._loss(inputs, targets)
            (loss / accumulation).backward()
            loss_sum += loss.detach()
            tokens += targets.numel()
        return loss_sum, tokens

    def _backward_halves(
        self, micro_batches: Iterator[tuple[torch.Tensor, ...]], accumulation: int
    ) -> tuple[torch.Tensor, int, list[list[torch.Tensor]]]:
        """As _backward, for BatchScaledAdamW: each micro-batch's two halves are
        differentiated apart (the same work as one pass). Returns also [parameters,
        first halves' gradients, second halves' gradients]; `.grad` is their mean."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        halves = [[torch.zeros_like(p) for p in params] for _ in range(2)]
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        for inputs, targets in micro_batches:
            tokens += targets.numel()
            cut = inputs.shape[0] // 2
            for half, rows in zip(halves, (slice(0, cut), slice(cut, None)), strict=True):
                loss = self._loss(inputs[rows], targets[rows])
                grads = torch.autograd.grad(loss / accumulation, params)
                for total, grad in zip(half, grads, strict=True):
                    total.add_(grad)
                loss_sum += loss.detach() / 2
        first_half, second_half = halves
        for p, first, second in zip(params, first_half, second_half, strict=True):
            p.grad = (first + second) / 2
        return loss_sum, tokens, [params, first_half, second_half]

    def _backward_halves_by_passes(
        self, micro_batches: Iterator[tuple[torch.Tensor, ...]], accumulation: int
    ) -> tuple[torch.Tensor, int, list[list[torch.Tensor]]]:
        """As _backward_halves, by .backward() in two passes (the first halves of every
        micro-batch, then the second halves), for a model sharded by FSDP: its hooks
        reduce each pass's gradient across the node's ranks, so each half is the node's
        (every rank's first halves together), as its whole batch is. autograd.grad would
        bypass the hooks and leave each rank its own unreduced gradient."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        batches = list(micro_batches)
        loss_sum = torch.zeros((), device=self.device)
        halves: list[list[torch.Tensor]] = []
        for first in (True, False):
            for inputs, targets in batches:
                cut = inputs.shape[0] // 2
                rows = slice(0, cut) if first else slice(cut, None)
                loss = self._loss(inputs[rows], targets[rows])
                (loss / accumulation).backward()
                loss_sum += loss.detach() / 2
            grads = [p.grad for p in params]
            if any(g is None for g in grads):
                raise RuntimeError("a parameter got no gradient from half a batch")
            halves.append([g for g in grads if g is not None])
            for p in params:
                p.grad = None
        first_half, second_half = halves
        for p, first_grad, second_grad in zip(params, first_half, second_half, strict=True):
            p.grad = (first_grad + second_grad) / 2
        tokens = sum(targets.numel() for _, targets in batches)
        return loss_sum, tokens, [params, first_half, second_half]

    @torch.no_grad()
    def evaluate(self, batches: list[Batch]) -> float:
        """Mean cross-entropy (nats/token) over fixed validation batches."""
        self.model.eval()
        total = torch.zeros((), device=self.device)
        for inputs, targets in batches:
            total += self._loss(inputs.to(self.device), targets.to(self.device))
        return (total / len(batches)).item()


@dataclass
class TrainResult:
    steps: int
    tokens: int
    initial_val_loss: float
    final_val_loss: float
    wall_s: float
    tokens_per_s: float
    val_history: list[tuple[int, int, float]] = field(default_factory=list)  # step, tokens, loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# Called after every step with (stats, tokens so far, latest validation loss or None).
StepCallback = Callable[[StepStats, int, float | None], None]


def train(
    model: nn.Module,
    cfg: TrainConfig,
    train_batches: Iterator[Batch],
    val_batches: list[Batch],
    device: torch.device,
    on_step: StepCallback | None = None,
) -> TrainResult:
    """Single-replica training: the loop that DiLoCo runs inside every round."""
    trainer = InnerTrainer(model, cfg, device)
    initial_val = trainer.evaluate(val_batches)
    history = [(0, 0, initial_val)]
    tokens = 0
    start = time.perf_counter()
    for step in range(1, cfg.steps + 1):
        stats = trainer.step(train_batches)
        tokens += stats.tokens
        val_loss = None
        if step == cfg.steps or (cfg.eval_every and step % cfg.eval_every == 0):
            val_loss = trainer.evaluate(val_batches)
            history.append((step, tokens, val_loss))
        if on_step is not None:
            on_step(stats, tokens, val_loss)
    wall = time.perf_counter() - start
    return TrainResult(
        steps=cfg.steps,
        tokens=tokens,
        initial_val_loss=initial_val,
        final_val_loss=history[-1][2],
        wall_s=wall,
        tokens_per_s=tokens / wall if wall > 0 else 0.0,
        val_history=history,
    )
