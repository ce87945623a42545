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
          (sync_power: short rounds while the lr is high, long ones as it decays),
          rounds by fragment (parameters chosen by name sync every N-th round with their
          own codec, the rest of the model every round: fragments, embedding_rounds).

Bytes per worker count the exact encoded payloads one worker sends plus the means it
receives back, for both strategies alike.
"""

from __future__ import annotations

import itertools
import math
import random
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import torch

from .codecs import Codec, CodecError, ErrorFeedback, make_codec, mean_codec
from .data import SequenceBatcher, TokenDataset, evaluation_batches
from .diloco import (
    DEFAULT_CODEC,
    DEFAULT_INNER_STEPS,
    GlobalState,
    OuterConfig,
    flat_ranges,
    flatten_parameters,
    load_flat_parameters,
    weighted_mean,
)
from .model import build_model, model_config
from .train import InnerTrainer, TrainConfig, lr_following_ends, select_device

STRATEGIES = ("ddp", "diloco")

# The vocabulary matrices' parameter names: the token embedding and the output head (tied
# in every preset, so one tensor under two names).
VOCABULARY_PATTERN = r"^(embed_tokens|lm_head)\."

# The inner AdamW's peak lr per model preset and strategy, swept at the simulator's
# default geometry and schedule (bench/convergence.py: tiny, 4 workers, 600 steps of 8 ×
# 64 tokens per worker, 150 warmup steps, WSD; docs/benchmarks.md "Convergence per byte"; one run
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


def simulation_moment_batches(strategy: str, workers: int) -> float:
    """TrainConfig.moment_batches for `starling simulate` and the bench when none is
    given: a DiLoCo worker's AdamW assumes the K-worker batch DDP steps on."""
    return float(workers) if strategy == "diloco" else 1.0


def simulation_lr(preset: str, strategy: str, overlap: bool = False) -> float:
    """The inner peak lr `starling simulate` and the bench use when none is given."""
    key = f"{strategy}-overlap" if overlap and strategy == "diloco" else strategy
    return SIMULATION_LR.get(preset, {}).get(key, TrainConfig.lr)


@dataclass(frozen=True)
class FragmentSpec:
    """Parameters whose name `pattern` matches (re.search over the model's parameter
    names, tied ones under each of their names) sync only every `every`-th round, encoded
    with `codec` (None: the run's codec). Given as PATTERN@EVERY or PATTERN@EVERY@CODEC,
    e.g. `self_attn|^layers\\.0\\.@1` or `embed_tokens@4@int2`."""

    pattern: str
    every: int
    codec: str | None = None

    def __post_init__(self) -> None:
        if not self.pattern:
            raise ValueError('a fragment needs a pattern ("." matches every parameter)')
        try:
            re.compile(self.pattern)
        except re.error as err:
            raise ValueError(f"fragment {self}: bad pattern ({err})") from None
        if self.every < 1:
            raise ValueError(f"fragment {self}: rounds must be at least 1 (1: every round)")
        if self.codec is not None:
            make_codec(self.codec)

    @classmethod
    def parse(cls, text: str) -> FragmentSpec:
        parts = text.split("@")
        if len(parts) not in (2, 3) or not parts[0]:
            raise ValueError(f"fragment {text!r}: give PATTERN@EVERY or PATTERN@EVERY@CODEC")
        try:
            every = int(parts[1])
        except ValueError:
            raise ValueError(f"fragment {text!r}: EVERY must be a whole number") from None
        return cls(parts[0], every, parts[2] if len(parts) == 3 else None)

    def __str__(self) -> str:
        return f"{self.pattern}@{self.every}" + (f"@{self.codec}" if self.codec else "")


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
    # worker's H is the fewest steps at which all workers together reach the budget, and
    # in a round that some workers miss the others train longer, as in a run.
    round_tokens: int | None = None
    speeds: tuple[float, ...] = ()  # relative speeds in (0, 1]; empty: all equal
    # The probability that a worker misses a round (a round none trains is drawn again).
    dropout: float = 0.0
    overlap: bool = False
    # With overlap: the inner steps of round r after which round r−1's mean arrives and is
    # folded into each worker's replica (its progress since the round began kept on top
    # of the new θ). None: at the end of round r, a whole round late. A run folds a mean
    # in as soon as its exchange ends, so τ is the exchange's duration in inner steps.
    overlap_steps: int | None = None
    # Round lengths: 0, every round H steps; p > 0, round r spans an equal share of
    # Σ lr_multiplier(step)^p over the run (lr_following_ends), so rounds are short while the
    # inner lr is high (workers drift apart fastest) and long as it decays. The number of
    # rounds, and so the bytes, stay those of a fixed H. p = 2 is the Quadratic
    # Synchronization Rule's H ∝ 1/lr² (Gu et al., 2023).
    sync_power: float = 0.0
    # Rounds by fragment: the vocabulary matrices (the token embedding and the output head,
    # tied in every preset: 64% of tiny's parameters) send their pseudo-gradient only every
    # `embedding_rounds`-th round (and in the last), encoded with `embedding_codec` (None:
    # `codec`); the rest of the model every round. Each fragment keeps its own error
    # feedback and weighs its mean by the tokens trained since its last sync; between its
    # syncs a worker's replica keeps its own copy of it. The drift between workers costs
    # most in the hidden layers (docs/benchmarks.md, "Where the gap lives"), so spending
    # the bytes there pays: on the bench's setup H = 15 with the embedding every 4th
    # round (60 steps) took int2 from 1.076× DDP's loss to 1.065× at 410× fewer bytes
    # (four seeds). The same as the fragment `embed_tokens@N` (see FragmentSpec).
    embedding_rounds: int = 1
    embedding_codec: str | None = None
    # Fragments by name, after the vocabulary's (if any): the first that matches a
    # parameter takes it; what none takes syncs every round with `codec`.
    fragments: tuple[FragmentSpec, ...] = ()
    eval_every: int = 0  # rounds (diloco) or steps (ddp) between evaluations; 0: ~10 evals
    model: str = "tiny"

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}")
        if self.workers < 1:
            raise ValueError("workers must be at least 1")
        if self.steps < 1 or self.inner_steps < 1:
            raise ValueError("steps and inner steps must be positive")
        if self.eval_every < 0:
            raise ValueError("eval every must be ≥ 0 (0: about ten evaluations)")
        if self.speeds and len(self.speeds) != self.workers:
            raise ValueError(f"--speeds needs {self.workers} values, one per worker")
        if any(not 0 < s <= 1 for s in self.speeds):
            raise ValueError("speeds must be in (0, 1] (1 = the fastest worker)")
        if self.round_tokens is not None and self.round_tokens < 1:
            raise ValueError("round tokens must be positive")
        if not 0 <= self.dropout < 1:
            raise ValueError("dropout must be in [0, 1)")
        if self.overlap_steps is not None and (self.overlap_steps < 1 or not self.overlap):
            raise ValueError("overlap steps must be ≥ 1, and only with overlap")
        make_codec(self.codec)  # fail early on a bad codec
        if not 0 < self.feedback_decay <= 1:
            raise ValueError("feedback decay must be in (0, 1]")
        if not 0 <= self.sync_power <= 4:
            raise ValueError("sync power must be in [0, 4]")
        if self.embedding_rounds < 1:
            raise ValueError("embedding rounds must be at least 1 (1: every round)")
        if self.embedding_rounds > 1 and self.overlap:
            # The overlapped update applies every fragment's mean one round late; a
            # fragment that skips rounds would need its own delayed schedule.
            raise ValueError("embedding rounds > 1 does not combine with overlap")
        if self.embedding_codec is not None:
            make_codec(self.embedding_codec)
        if self.overlap and any(f.every > 1 for f in self.fragments):
            raise ValueError("fragments that skip rounds do not combine with overlap")

    def fragment_specs(self) -> tuple[FragmentSpec, ...]:
        """The vocabulary's fragment (embedding_rounds, embedding_codec), if any, then
        `fragments`."""
        if self.embedding_rounds == 1 and self.embedding_codec is None:
            return self.fragments
        vocabulary = FragmentSpec(VOCABULARY_PATTERN, self.embedding_rounds, self.embedding_codec)
        return (vocabulary, *self.fragments)


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
    embedding_rounds: int = 1  # rounds between the vocabulary matrices' syncs
    embedding_codec: str = ""  # their codec (diloco)
    # diloco: each fragment's pattern ("" for the rest), rounds between its syncs, codec
    # and share of the parameters, the rest first (if any is left); ddp: none.
    fragments: list[dict[str, Any]] = field(default_factory=list)
    # The round (ddp: step) whose training reached NaN or Inf: the run stopped there, and
    # its final_val_loss is NaN. None: it did not diverge.
    diverged_at: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


ProgressFn = Callable[[int, int, float | None], None]  # steps done, steps in all, val loss


@dataclass(eq=False)  # compared by identity
class Fragment:
    """Ranges of the flat parameter vector that sync on their own schedule, with their own
    codec, each worker's error feedback, and each worker's tokens since the last sync."""

    pattern: str  # the name pattern that chose its parameters ("": the rest)
    ranges: tuple[tuple[int, int], ...]  # [start, end) in the flat layout
    every: int  # rounds between syncs
    codec_spec: str  # as given, e.g. "int2:256"
    codec: Codec
    feedback: list[ErrorFeedback]  # one per worker
    tokens: list[int]  # one per worker: tokens trained since this fragment last synced

    def syncs(self, round_number: int, rounds: int) -> bool:
        """Round numbers start at 1; every fragment syncs in the last round."""
        return round_number % self.every == 0 or round_number == rounds

    @property
    def size(self) -> int:
        return sum(end - start for start, end in self.ranges)

    def take(self, flat: torch.Tensor) -> torch.Tensor:
        """(size,) this fragment's values of a flat vector, its ranges concatenated."""
        return torch.cat([flat[start:end] for start, end in self.ranges])

    def copy(self, source: torch.Tensor, target: torch.Tensor) -> None:
        """Overwrite this fragment's ranges of the flat vector `target` with `source`'s."""
        for start, end in self.ranges:
            target[start:end] = source[start:end]

    def outer_step(self, state: GlobalState, mean: torch.Tensor, cfg: OuterConfig) -> None:
        """The outer step on this fragment's ranges of θ, `mean` being (size,)."""
        offset = 0
        for start, end in self.ranges:
            state.outer_step(mean[offset : offset + end - start], cfg, slice(start, end))
            offset += end - start


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
        self.fragment_ranges = self._fragment_ranges()  # fails early on an unmatched pattern
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
        diverged_at = None
        for step in range(1, cfg.steps + 1):
            stats = trainer.step(batches)
            tokens += stats.tokens
            sent += step_bytes
            val = None
            if not math.isfinite(stats.loss):
                diverged_at = step
                history.append({"tokens": tokens, "bytes": sent, "val_loss": math.nan})
                break
            if step % eval_every == 0 or step == cfg.steps:
                val = trainer.evaluate(self.val)
                history.append({"tokens": tokens, "bytes": sent, "val_loss": val})
            if progress:
                progress(step, cfg.steps, val)
        if diverged_at is None and not math.isfinite(history[-1]["val_loss"]):
            diverged_at = cfg.steps  # the last step left the weights non-finite
        state = GlobalState.from_model(model)
        return SimResult(
            "ddp",
            "fp32",
            k,
            cfg.steps,
            1,
            diverged_at or cfg.steps,  # a "round" a step
            tokens,
            initial,
            history[-1]["val_loss"],
            sent,
            0.0,
            False,
            state.fingerprint(),
            history,
            1,
            "fp32",
            diverged_at=diverged_at,
        )

    # --------------------------------------------------------------- DiLoCo

    def _fragment_ranges(self) -> list[tuple[FragmentSpec, tuple[tuple[int, int], ...]]]:
        """Each fragment spec with the flat ranges of the parameters it takes: those whose
        name it matches and no spec before it took."""
        named = list(self.initial.named_parameters(remove_duplicate=False))
        taken: set[int] = set()
        out = []
        for spec in self.cfg.fragment_specs():
            pattern = re.compile(spec.pattern)
            chosen = {id(p): p for n, p in named if pattern.search(n) and id(p) not in taken}
            if not chosen:
                raise ValueError(
                    f"fragment {spec} matches no parameter that an earlier one left (names "
                    f"look like {named[0][0]}, {named[1][0]}, {named[-1][0]})"
                )
            taken |= chosen.keys()
            out.append((spec, flat_ranges(self.initial, list(chosen.values()))))
        return out

    def _fragments(self) -> list[Fragment]:
        """The rest of the model (the whole of it without fragment specs; none if the
        specs take every parameter), synced every round with the run's codec, then one
        fragment per spec."""
        cfg, workers = self.cfg, self.cfg.workers

        def fragment(
            pattern: str, ranges: tuple[tuple[int, int], ...], every: int, spec: str
        ) -> Fragment:
            codec = make_codec(spec)
            feedback = [ErrorFeedback(codec, cfg.feedback_decay) for _ in range(workers)]
            return Fragment(pattern, ranges, every, spec, codec, feedback, [0] * workers)

        chosen = sorted(r for _, ranges in self.fragment_ranges for r in ranges)
        edges = [0, *itertools.chain.from_iterable(chosen), self.n_params]
        rest = tuple((a, b) for a, b in zip(edges[::2], edges[1::2], strict=True) if a < b)
        return [fragment("", rest, 1, cfg.codec)] * bool(rest) + [
            fragment(spec.pattern, ranges, spec.every, spec.codec or cfg.codec)
            for spec, ranges in self.fragment_ranges
        ]

    def _present(self, rng: random.Random) -> list[int]:
        """The workers that train a round: each misses it with probability `dropout`. A
        round that every worker would miss is drawn again: a run's round closes only
        once a node trains it, so it waits for one and the schedule does not move."""
        while True:
            present = [i for i in range(self.cfg.workers) if rng.random() >= self.cfg.dropout]
            if present:
                return present

    def _diloco(self, progress: ProgressFn | None) -> SimResult:
        cfg = self.cfg
        speeds = cfg.speeds or (1.0,) * cfg.workers
        state = GlobalState.from_model(self.initial)
        replicas = [
            build_model(self.initial.config, seed=self.train_cfg.seed, device=self.device)
            for _ in range(cfg.workers)
        ]
        inner_cfg = replace(self.train_cfg, steps=cfg.steps)
        trainers = [InnerTrainer(m, inner_cfg, self.device) for m in replicas]
        batchers = [self._batcher(i, inner_cfg.micro_batch_size) for i in range(cfg.workers)]
        fragments = self._fragments()
        anchors = [state.params.clone() for _ in replicas]  # θ each replica started from
        rng = random.Random(self.train_cfg.seed)

        inner_steps = cfg.inner_steps
        if cfg.round_tokens is not None:
            per_step = self.train_cfg.batch_tokens * sum(speeds)  # tokens/step, all workers
            inner_steps = max(1, math.ceil(cfg.round_tokens / per_step))
        rounds = math.ceil(cfg.steps / inner_steps)
        # The last round takes what is left: the run trains `steps`, as DDP does.
        lengths = [inner_steps] * (rounds - 1) + [cfg.steps - inner_steps * (rounds - 1)]
        if cfg.sync_power:
            # The coordinator ends a run's budget rounds by the same rule.
            ends = lr_following_ends(inner_cfg, rounds, cfg.sync_power)
            lengths = [end - start for start, end in zip([0, *ends[:-1]], ends, strict=True)]
        eval_every = cfg.eval_every or max(1, rounds // 10)
        initial = self._eval(state.params)
        history = [{"tokens": 0, "bytes": 0, "val_loss": initial}]
        tokens = sent = steps_done = 0
        pending: dict[int, torch.Tensor] = {}  # overlap: each fragment's mean still on the wire
        diverged_at = None

        for r, length in enumerate(lengths, start=1):
            syncing = [f for f in fragments if f.syncs(r, rounds)]
            deltas: list[list[torch.Tensor]] = [[] for _ in fragments]
            token_weights: list[list[int]] = [[] for _ in fragments]
            present = self._present(rng)
            # `length` is the round's share of the run's schedule, in steps of the fastest
            # worker with every worker present. A round that closes on a token budget
            # closes once the workers present reach it: as in a run, the rest train
            # longer to make up for the missing, and the schedule advances by the
            # budget's tokens. A round of fixed H closes after H steps whoever missed it.
            worker_length = length
            if cfg.round_tokens is not None:
                worker_length = math.ceil(length * sum(speeds) / sum(speeds[i] for i in present))
            # Overlap with `overlap_steps`: round r−1's means reach every worker after that
            # many of this round's steps; θ moves now, and each replica folds it in then.
            folded: torch.Tensor | None = None
            if cfg.overlap_steps is not None and pending:
                for k, mean in pending.items():
                    fragments[k].outer_step(state, mean, cfg.outer)
                pending = {}
                folded = state.params.clone()
            for i, replica in enumerate(replicas):
                if i not in present:
                    # Missed the round: it trains nothing, and what it trained since a
                    # syncing fragment's last sync is discarded below.
                    for f in syncing:
                        f.tokens[i] = 0
                    if folded is not None:  # it still takes the new θ
                        anchors[i] = folded.clone()
                        load_flat_parameters(replica, anchors[i])
                    continue
                h = max(1, round(worker_length * speeds[i]))
                # τ is a time, counted in the fastest worker's steps: a slower worker has
                # taken fewer of its own by then (none, perhaps).
                fold_at = h
                if folded is not None and cfg.overlap_steps is not None:
                    fold_at = min(h, round(cfg.overlap_steps * speeds[i]))
                # Every worker's inner schedule follows the run's progress (the fastest
                # worker's step count), not its own: a slow worker decays on time too.
                trainers[i].steps_done = steps_done
                worker_tokens = sum(trainers[i].step(batchers[i]).tokens for _ in range(fold_at))
                if folded is not None:
                    # Its progress since the round began, on top of the new θ; this
                    # round's pseudo-gradient is measured from there.
                    trained = flatten_parameters(replica) - anchors[i]
                    anchors[i] = folded.clone()
                    load_flat_parameters(replica, folded + trained)
                worker_tokens += sum(
                    trainers[i].step(batchers[i]).tokens for _ in range(h - fold_at)
                )
                tokens += worker_tokens
                local = flatten_parameters(replica)
                if not bool(torch.isfinite(local).all()):
                    diverged_at = r
                    break
                for k, f in enumerate(fragments):
                    f.tokens[i] += worker_tokens
                    if f not in syncing:
                        continue
                    try:
                        payload, decoded = f.feedback[i].encode(f.take(anchors[i]) - f.take(local))
                    except CodecError:  # finite, but beyond what the codec can represent
                        diverged_at = r
                        break
                    sent += len(payload) if i == 0 else 0  # bytes of worker 0, the reference
                    deltas[k].append(decoded)
                    token_weights[k].append(f.tokens[i])
                    f.tokens[i] = 0
                if diverged_at is not None:
                    break
            steps_done += length

            means: dict[int, torch.Tensor] = {}
            for k, f in enumerate(fragments):
                if deltas[k] and diverged_at is None:
                    owner_codec = mean_codec(f.codec, len(deltas[k]))
                    try:
                        payload = owner_codec.encode(weighted_mean(deltas[k], token_weights[k]))
                    except CodecError:
                        diverged_at = r
                        break
                    sent += len(payload)  # every worker downloads the re-encoded mean
                    means[k] = owner_codec.decode(payload, f.size)
            if diverged_at is not None:  # NaN or Inf, or an update no codec can hold
                history.append({"tokens": tokens, "bytes": sent, "val_loss": math.nan})
                rounds = r
                break

            if cfg.overlap:
                # The means of round r−1 arrive only now (every fragment syncs every round
                # here); each replica keeps its own round-r progress on the new global state.
                for k, mean in pending.items():
                    fragments[k].outer_step(state, mean, cfg.outer)
                pending = means
                for i, replica in enumerate(replicas):
                    local = flatten_parameters(replica)
                    if cfg.overlap_steps is not None:
                        anchors[i] = local  # it carries on; the next mean is folded mid-round
                        continue
                    anchors[i] = state.params + (local - anchors[i])
                    load_flat_parameters(replica, anchors[i])
            else:
                for k, mean in means.items():
                    fragments[k].outer_step(state, mean, cfg.outer)
                # Replicas restart the synced fragments from θ and keep their own copy of
                # the others until those sync.
                for i, replica in enumerate(replicas):
                    local = flatten_parameters(replica)
                    for f in syncing:
                        f.copy(state.params, anchors[i])
                        f.copy(state.params, local)
                    load_flat_parameters(replica, local)

            last = r == rounds
            if last:
                for k, mean in pending.items():
                    fragments[k].outer_step(state, mean, cfg.outer)  # flush: the final means
            val = None
            if r % eval_every == 0 or last:
                val = self._eval(state.params)
                history.append({"tokens": tokens, "bytes": sent, "val_loss": val})
            if progress:
                progress(steps_done, cfg.steps, val)
        if diverged_at is None and not math.isfinite(history[-1]["val_loss"]):
            diverged_at = rounds  # the last outer step left θ non-finite

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
            cfg.embedding_rounds,
            cfg.embedding_codec or cfg.codec,
            [
                {
                    "pattern": f.pattern,
                    "every": f.every,
                    "codec": f.codec_spec,
                    "share": round(f.size / self.n_params, 4),
                }
                for f in fragments
            ],
            diverged_at,
        )


def fragment_label(pattern: str) -> str:
    """A fragment's pattern as a plot or a banner shows it."""
    return "vocabulary" if pattern == VOCABULARY_PATTERN else repr(pattern)


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
            + "".join(
                f", {fragment_label(f['pattern'])} every {f['every']}"
                for f in res.fragments
                if f["pattern"]
            )
            + (" overlap" if res.overlap else "")
        ).replace("$", r"\$")  # matplotlib reads $...$ as mathtext
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
