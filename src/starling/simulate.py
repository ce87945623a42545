"""`starling simulate`: K virtual workers in one process, through the same model, data,
inner trainer, codecs and outer step that real nodes run.

Strategies (chosen once, up front):
  ddp     every step, the K workers' gradients are averaged (fp32 out, fp32 mean back):
          one AdamW step on a global batch of K × the per-worker batch.
  diloco  each worker takes H inner AdamW steps from θ, sends its encoded pseudo-gradient
          (with error feedback); the token-weighted mean is re-encoded by its owner, and
          every worker applies the same outer Nesterov step. Optional: heterogeneous
          speeds (slow workers take fewer inner steps and weigh by their tokens), dropouts
          (a worker misses a round), overlap (the mean of round r is applied one round
          late, while round r+1 trains), round lengths that follow the inner lr
          (sync_power: short rounds while the lr is high, long ones as it decays).

Bytes per worker count the exact encoded payloads one worker sends plus the means it
receives back, for both strategies alike.
"""

from __future__ import annotations

import bisect
import itertools
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .codecs import ErrorFeedback, make_codec, mean_codec
from .data import SequenceBatcher, TokenDataset, evaluation_batches
from .diloco import (
    DEFAULT_CODEC,
    DEFAULT_INNER_STEPS,
    GlobalState,
    OuterConfig,
    flatten_parameters,
    load_flat_parameters,
    weighted_mean,
)
from .model import build_model, model_config
from .train import InnerTrainer, TrainConfig, lr_multiplier, select_device

STRATEGIES = ("ddp", "diloco")

# The inner AdamW's peak lr per model preset and strategy, swept at the simulator's
# default geometry and schedule (bench/convergence.py: tiny, 4 workers, 600 steps of 8 ×
# 64 tokens per worker, 150 warmup steps, WSD; README "Convergence per byte"; one run
# each). DDP (plain AdamW): 3.7790 at 3e-3, 3.7621 at 4.5e-3, 3.7636 at 6e-3. DiLoCo
# int2 at H = 30, workers whose AdamW assumes DDP's batch (simulation_moment_batches):
# 4.0703 at 2e-3, 4.0560 at 3e-3, 4.0752 at 4.5e-3. With 30 warmup steps and cosine the
# same lrs were best (DDP 3.9278, DiLoCo 4.1774); with overlap (the mean applied a round
# late) int4 reached 4.3328 at 2e-3 and 4.3239 at 3e-3 there. With plain AdamW DiLoCo
# wanted 6e-3, because the mean of K AdamW steps, each normalised by its own small
# batch's noise, is shorter than one step on their mean. None of it carries over to
# other geometries: the demo (3 nodes, 2,048-token steps, 160 steps) ends at 4.92 with
# 6e-3 against 4.80 with 3e-3, so runs keep TrainConfig.lr. Presets not listed keep it
# too (not measured).
SIMULATION_LR: dict[str, dict[str, float]] = {
    "tiny": {"ddp": 4.5e-3, "diloco": 3e-3, "diloco-overlap": 3e-3}
}


def round_lengths(steps: int, rounds: int, weights: list[float]) -> list[int]:
    """Inner steps of each of `rounds` rounds over `steps` steps, where round r ends at
    the first step by which the running sum of `weights` (one per step) reaches r/rounds
    of their total; every round gets at least one step."""
    if not 1 <= rounds <= steps or len(weights) != steps:
        raise ValueError(f"cannot split {steps} steps into {rounds} rounds")
    cumulative = list(itertools.accumulate(weights))
    ends: list[int] = []
    for r in range(1, rounds):
        end = bisect.bisect_left(cumulative, cumulative[-1] * r / rounds * (1 - 1e-12)) + 1
        ends.append(min(max(end, (ends[-1] if ends else 0) + 1), steps - (rounds - r)))
    ends.append(steps)
    return [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]


# Warmup steps `starling simulate` and the bench use unless told: a quarter of the steps,
# then TrainConfig's schedule (WSD). On the bench's setup (tiny, 4 workers, 600 steps,
# each strategy at its best lr) the two took DDP from 3.9278 (30 warmup steps, cosine) to
# 3.7621 and DiLoCo int2 at H = 30 from 4.1774 to 4.0560: DDP gains more, so the 30-step
# cosine baseline flattered DiLoCo. DDP alone does a little better with 100 warmup steps
# (3.7534), DiLoCo worse (4.0695). README "Convergence per byte" has the sweep.
SIMULATION_WARMUP_SHARE = 1 / 4


def simulation_warmup(steps: int) -> int:
    """Warmup steps `starling simulate` and the bench use when none are given."""
    return round(steps * SIMULATION_WARMUP_SHARE)


def simulation_moment_batches(strategy: str, workers: int) -> float:
    """TrainConfig.moment_batches for `starling simulate` and the bench when none is
    given: a DiLoCo worker's AdamW assumes the K-worker batch DDP steps on."""
    return float(workers) if strategy == "diloco" else 1.0


def simulation_lr(preset: str, strategy: str, overlap: bool = False) -> float:
    """The inner peak lr `starling simulate` and the bench use when none is given."""
    key = f"{strategy}-overlap" if overlap and strategy == "diloco" else strategy
    return SIMULATION_LR.get(preset, {}).get(key, TrainConfig.lr)


@dataclass(frozen=True)
class SimConfig:
    strategy: str = "diloco"
    workers: int = 4
    steps: int = 500  # optimizer steps per worker (the fastest, with speeds)
    inner_steps: int = DEFAULT_INNER_STEPS  # H: inner steps per round (fastest worker)
    codec: str = DEFAULT_CODEC
    outer: OuterConfig = field(default_factory=OuterConfig)
    feedback_decay: float = 1.0  # error feedback's β (codecs.ErrorFeedback)
    # Rounds close on a global token budget instead of a fixed H, when set: the fastest
    # worker's H is the fewest steps at which all workers together reach the budget.
    round_tokens: int | None = None
    speeds: tuple[float, ...] = ()  # relative speeds in (0, 1]; empty: all equal
    dropout: float = 0.0  # probability that a worker misses a round
    overlap: bool = False
    # Round lengths: 0, every round H steps; p > 0, round r spans an equal share of
    # Σ lr_multiplier(step)^p over the run (round_lengths), so rounds are short while the
    # inner lr is high (workers drift apart fastest) and long as it decays. The number of
    # rounds, and so the bytes, stay those of a fixed H. p = 2 is the Quadratic
    # Synchronization Rule's H ∝ 1/lr² (Gu et al., 2023).
    sync_power: float = 0.0
    eval_every: int = 0  # rounds (diloco) or steps (ddp) between evaluations; 0: ~10 evals
    model: str = "tiny"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.steps < 1 or self.inner_steps < 1:
            raise ValueError("steps and inner steps must be positive")
        if self.speeds and len(self.speeds) != self.workers:
            raise ValueError(f"--speeds needs {self.workers} values, one per worker")
        if any(not 0 < s <= 1 for s in self.speeds):
            raise ValueError("speeds must be in (0, 1] (1 = the fastest worker)")
        if self.round_tokens is not None and self.round_tokens < 1:
            raise ValueError("round tokens must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        make_codec(self.codec)  # fail early on a bad codec
        if not 0 < self.feedback_decay <= 1:
            raise ValueError("feedback decay must be in (0, 1]")
        if not 0 <= self.sync_power <= 4:
            raise ValueError("sync power must be in [0, 4]")


@dataclass
class SimResult:
    strategy: str
    codec: str
    workers: int
    steps: int
    inner_steps: int
    rounds: int
    tokens: int
    initial_val_loss: float
    final_val_loss: float
    bytes_per_worker: int
    wall_s: float
    overlap: bool
    fingerprint: str
    history: list[dict[str, float]] = field(default_factory=list)  # tokens, bytes, val_loss

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[int, int, float | None], None]  # steps done, steps in all, val loss


class Simulation:
    def __init__(self, cfg: SimConfig, train_cfg: TrainConfig, dataset: TokenDataset) -> None:
        self.cfg = cfg
        self.train_cfg = train_cfg
        self.dataset = dataset
        self.device = select_device(train_cfg.device)
        mcfg = model_config(
            cfg.model,
            vocab_size=dataset.manifest.vocab_size,
            max_seq_len=max(train_cfg.seq_len, model_config(cfg.model).max_seq_len),
        )
        self.initial = build_model(mcfg, seed=train_cfg.seed)  # stays on the CPU: θ's source
        self.n_params = self.initial.num_parameters()
        self.val = evaluation_batches(
            dataset.split("val"),
            train_cfg.seq_len,
            train_cfg.micro_batch_size,
            train_cfg.eval_batches,
        )

    def _batcher(self, worker: int, batch: int) -> SequenceBatcher:
        # Each worker draws its own i.i.d. stream over the training split.
        seed = self.train_cfg.seed * 1000 + worker
        return SequenceBatcher(self.dataset.split("train"), self.train_cfg.seq_len, batch, seed)

    def _eval(self, params: torch.Tensor) -> float:
        model = build_model(self.initial.config, device=self.device)
        load_flat_parameters(model, params)
        return InnerTrainer(model, self.train_cfg, self.device).evaluate(self.val)

    def run(self, progress: ProgressFn | None = None) -> SimResult:
        start = time.perf_counter()
        result = self._ddp(progress) if self.cfg.strategy == "ddp" else self._diloco(progress)
        result.wall_s = time.perf_counter() - start
        return result

    # ------------------------------------------------------------------ DDP

    def _ddp(self, progress: ProgressFn | None) -> SimResult:
        cfg, k = self.cfg, self.cfg.workers
        # K workers' batches averaged each step ≡ one replica on a K× batch.
        global_cfg = replace(
            self.train_cfg, batch_tokens=self.train_cfg.batch_tokens * k, steps=cfg.steps
        )
        model = build_model(self.initial.config, seed=self.train_cfg.seed, device=self.device)
        trainer = InnerTrainer(model, global_cfg, self.device)
        batches = self._batcher(0, global_cfg.micro_batch_size)
        fp32 = make_codec("fp32")
        step_bytes = 2 * fp32.encoded_size(self.n_params)  # gradient out + mean in
        eval_every = cfg.eval_every or max(1, cfg.steps // 10)
        initial = trainer.evaluate(self.val)
        history = [{"tokens": 0, "bytes": 0, "val_loss": initial}]
        tokens = sent = 0
        for step in range(1, cfg.steps + 1):
            tokens += trainer.step(batches).tokens
            sent += step_bytes
            val = None
            if step % eval_every == 0 or step == cfg.steps:
                val = trainer.evaluate(self.val)
                history.append({"tokens": tokens, "bytes": sent, "val_loss": val})
            if progress:
                progress(step, cfg.steps, val)
        state = GlobalState.from_model(model)
        return SimResult(
            "ddp",
            "fp32",
            k,
            cfg.steps,
            1,
            cfg.steps,
            tokens,
            initial,
            history[-1]["val_loss"],
            sent,
            0.0,
            False,
            state.fingerprint(),
            history,
        )

    # --------------------------------------------------------------- DiLoCo

    def _diloco(self, progress: ProgressFn | None) -> SimResult:
        cfg = self.cfg
        codec = make_codec(cfg.codec)
        speeds = cfg.speeds or (1.0,) * cfg.workers
        state = GlobalState.from_model(self.initial)
        replicas = [
            build_model(self.initial.config, seed=self.train_cfg.seed, device=self.device)
            for _ in range(cfg.workers)
        ]
        inner_cfg = replace(self.train_cfg, steps=cfg.steps)
        trainers = [InnerTrainer(m, inner_cfg, self.device) for m in replicas]
        batchers = [self._batcher(i, inner_cfg.micro_batch_size) for i in range(cfg.workers)]
        feedback = [ErrorFeedback(codec, cfg.feedback_decay) for _ in replicas]
        anchors = [state.params.clone() for _ in replicas]  # θ each replica started from
        rng = random.Random(self.train_cfg.seed)

        inner_steps = cfg.inner_steps
        if cfg.round_tokens is not None:
            per_step = self.train_cfg.batch_tokens * sum(speeds)  # tokens/step, all workers
            inner_steps = max(1, math.ceil(cfg.round_tokens / per_step))
        rounds = math.ceil(cfg.steps / inner_steps)
        lengths = [inner_steps] * rounds
        if cfg.sync_power:
            weights = [lr_multiplier(s, inner_cfg) ** cfg.sync_power for s in range(cfg.steps)]
            lengths = round_lengths(cfg.steps, rounds, weights)
        eval_every = cfg.eval_every or max(1, rounds // 10)
        initial = self._eval(state.params)
        history = [{"tokens": 0, "bytes": 0, "val_loss": initial}]
        tokens = sent = steps_done = 0
        pending: torch.Tensor | None = None  # overlap: the mean still on the wire

        for r, length in enumerate(lengths, start=1):
            deltas, token_weights = [], []
            for i, replica in enumerate(replicas):
                if rng.random() < cfg.dropout:
                    continue  # missed the round: its work is discarded below
                h = max(1, round(length * speeds[i]))
                # Every worker's inner schedule follows the run's progress (the fastest
                # worker's step count), not its own: a slow worker decays on time too.
                trainers[i].steps_done = steps_done
                worker_tokens = sum(trainers[i].step(batchers[i]).tokens for _ in range(h))
                payload, decoded = feedback[i].encode(anchors[i] - flatten_parameters(replica))
                sent += len(payload) if i == 0 else 0  # bytes of worker 0, the reference
                deltas.append(decoded)
                token_weights.append(worker_tokens)
                tokens += worker_tokens
            steps_done += length

            mean = None
            if deltas:
                owner_codec = mean_codec(codec, len(deltas))
                payload = owner_codec.encode(weighted_mean(deltas, token_weights))
                sent += len(payload)  # every worker downloads the re-encoded mean
                mean = owner_codec.decode(payload, self.n_params)

            if cfg.overlap:
                # The mean of round r−1 arrives only now; each replica keeps its own round-r
                # progress on top of the new global state.
                if pending is not None:
                    state.outer_step(pending, cfg.outer)
                pending = mean
                for i, replica in enumerate(replicas):
                    local = flatten_parameters(replica)
                    anchors[i] = state.params + (local - anchors[i])
                    load_flat_parameters(replica, anchors[i])
            else:
                if mean is not None:
                    state.outer_step(mean, cfg.outer)
                for i, replica in enumerate(replicas):
                    anchors[i] = state.params.clone()
                    load_flat_parameters(replica, state.params)

            last = r == rounds
            if last and pending is not None:
                state.outer_step(pending, cfg.outer)  # flush: apply the final mean
            val = None
            if r % eval_every == 0 or last:
                val = self._eval(state.params)
                history.append({"tokens": tokens, "bytes": sent, "val_loss": val})
            if progress:
                progress(min(steps_done, cfg.steps), cfg.steps, val)

        return SimResult(
            "diloco",
            cfg.codec,
            cfg.workers,
            cfg.steps,
            inner_steps,
            rounds,
            tokens,
            initial,
            history[-1]["val_loss"],
            sent,
            0.0,
            cfg.overlap,
            state.fingerprint(),
            history,
        )


def plot(results: list[SimResult], path: str) -> None:
    """Validation loss against tokens and against bytes per worker, one line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tokens, ax_bytes) = plt.subplots(1, 2, figsize=(11, 4.2))
    for res in results:
        label = (
            f"{res.strategy} {res.codec}"
            + (f" H={res.inner_steps}" if res.strategy == "diloco" else "")
            + (" overlap" if res.overlap else "")
        )
        xs = [h["tokens"] for h in res.history]
        ys = [h["val_loss"] for h in res.history]
        ax_tokens.plot(xs, ys, marker="o", ms=3, label=label)
        # Log scale: leave out the starting point, which has sent nothing yet.
        ax_bytes.plot([h["bytes"] for h in res.history[1:]], ys[1:], marker="o", ms=3, label=label)
    ax_tokens.set(xlabel="tokens trained (all workers)", ylabel="validation loss (nats/token)")
    ax_bytes.set(xlabel="bytes sent + received per worker", xscale="log")
    ax_tokens.set_title("loss per token")
    ax_bytes.set_title("loss per byte on the wire")
    for ax in (ax_tokens, ax_bytes):
        ax.grid(alpha=0.3)
    ax_tokens.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
