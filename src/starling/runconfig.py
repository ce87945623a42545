"""A run's configuration: what `starling coordinator init --config run.toml` reads, what
the coordinator stores in the run directory and serves to every node.

    [run]         name, seed, target_tokens, join_policy ("open" or "token")
    [model]       preset, plus any ModelConfig field to override it
    [data]        source ("embedded", a text file or directory), tokenizer, val_fraction,
                  shard_tokens
    [train]       the inner loop every node runs (starling.train.TrainConfig fields;
                  moment_batches may also be "contributors", the default)
    [round]       tokens (global budget per round; 0: fixed inner_steps), inner_steps,
                  deadline_s (training), exchange_deadline_s, shards_per_owner,
                  sync_power (budgets that follow the inner lr)
    [outer]       codec, lr, momentum, nesterov, overlap, feedback_decay
    [checkpoints] every (rounds), keep
    [membership]  heartbeat_s, lease_s, data_lease_s, min_nodes

Unknown sections or keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import tomllib
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from .codecs import HARDWARE_DEPENDENT, make_codec
from .diloco import DEFAULT_CODEC, DEFAULT_INNER_STEPS, OuterConfig
from .model import PRESETS, ModelConfig, model_config
from .train import TrainConfig, default_warmup

JOIN_POLICIES = ("open", "token")
# [train] moment_batches = "contributors" (the default): each node's inner AdamW assumes
# the batch of all the round's contributors, the number of them in the last committed
# round (starling.train.BatchScaledAdamW), as `starling simulate` does with its workers.
CONTRIBUTORS = "contributors"


class RunConfigError(ValueError):
    """A run config that cannot be used, with the key at fault."""


@dataclass(frozen=True)
class RunSection:
    name: str = "starling-run"
    seed: int = 0
    target_tokens: int = 20_000_000
    join_policy: str = "open"


@dataclass(frozen=True)
class ModelSection:
    preset: str = "tiny"
    overrides: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class DataSection:
    source: str = "embedded"
    tokenizer: str = "bpe:8192"
    val_fraction: float = 0.02
    # Tokens per data shard: the unit of a lease (starling.data.PrepareConfig).
    shard_tokens: int = 262_144


@dataclass(frozen=True)
class RoundSection:
    # A global token budget per round (faster nodes do more inner steps); 0 closes a
    # round when every participant did `inner_steps` steps.
    tokens: int = 0
    inner_steps: int = DEFAULT_INNER_STEPS
    deadline_s: float = 600.0  # the training phase ends here at the latest
    exchange_deadline_s: float = 120.0
    shards_per_owner: int = 1
    # With a budget: 0 keeps it for every round; p > 0 sizes each round's budget so that
    # it spans an equal share of Σ lr^p of the inner schedule (coordinator.rounds.
    # lr_following_budget): short rounds while the lr is high, long ones as it decays,
    # about as many rounds as with a fixed budget. docs/benchmarks.md "Convergence per byte".
    sync_power: float = 0.0


@dataclass(frozen=True)
class OuterSection:
    codec: str = DEFAULT_CODEC
    lr: float = 0.7
    momentum: float = 0.5
    nesterov: bool = True
    overlap: bool = False
    # Error feedback's decay β: each round sends encode(Δ + β·residual) (codecs.
    # ErrorFeedback). 1 carries everything a lossy codec dropped; SparseLoCo's recipe
    # (codec topk2, momentum 0, lr 1) takes 0.95, the residual standing in for momentum.
    feedback_decay: float = 1.0


@dataclass(frozen=True)
class CheckpointSection:
    every: int = 10  # rounds between checkpoints
    keep: int = 3  # newest checkpoints kept besides checkpoint 0


@dataclass(frozen=True)
class MembershipSection:
    heartbeat_s: float = 5.0
    lease_s: float = 30.0  # a node silent this long is expired
    data_lease_s: float = 120.0  # a data shard returns to the pool this long after
    min_nodes: int = 1  # nodes needed before the first round opens


@dataclass(frozen=True)
class DefencesSection:
    # Shard owners screen contributions (starling.robust) before the mean. Off only for
    # a control run that shows what poisoned updates do.
    screen: bool = True
    # The direction check (the only one that catches a sign-flipped update), judged by
    # the coordinator over each contributor's whole pseudo-gradient from the Gram
    # matrices the owners report (starling.robust.direction_outliers). It needs at least
    # four contributions and skips those trained on under half the median tokens. It
    # cut no honest contribution in 1,050 over 150 rounds of the micro model and 600
    # over 100 rounds of the tiny preset (bench/chaos.py --direction on), where the
    # per-shard check it replaced cut 16–22% of honest updates in long runs. Each owner
    # pays n² dot products over its shard (n contributions) a round.
    screen_direction: bool = True
    # Every shard is reduced by two owners (the second, its verifier, gets the same
    # contributions) whose means must agree by hash; a disagreement is resolved by the
    # coordinator recomputing the mean, and the owner that lied is banned. Costs each
    # contributor a second upload of its pseudo-gradient; off only where every peer is
    # trusted. Needs at least two reachable owners.
    verify_means: bool = True
    # A shard owner or verifier that alone loses contributions other reducers received
    # (in 3 of the last 50 rounds, from 2 or more contributors) owns no shard while
    # that record stands: censorship by omission cannot be proven, but it can be kept
    # from recurring (coordinator.rounds.unreliable_reducers). Nobody is banned for it.
    demote_reducers: bool = True
    # A node rejected as poisoned in this many rounds is banned; 0: never banned.
    ban_after_offences: int = 3
    # Requests per second one peer (one address; each connection on loopback) may make
    # of the coordinator on average, and at once after being idle; beyond that it is
    # answered RESOURCE_EXHAUSTED (starling.serving). Honest nodes make a few a second.
    requests_per_s: float = 50.0
    request_burst: float = 200.0


@dataclass(frozen=True)
class RunConfig:
    run: RunSection = field(default_factory=RunSection)
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: dict[str, Any] = field(default_factory=dict)  # TrainConfig overrides
    round: RoundSection = field(default_factory=RoundSection)
    outer: OuterSection = field(default_factory=OuterSection)
    checkpoints: CheckpointSection = field(default_factory=CheckpointSection)
    membership: MembershipSection = field(default_factory=MembershipSection)
    defences: DefencesSection = field(default_factory=DefencesSection)

    def __post_init__(self) -> None:
        checks = [
            (self.run.target_tokens > 0, "run.target_tokens must be positive"),
            (self.run.join_policy in JOIN_POLICIES, "run.join_policy must be open or token"),
            (self.model.preset in PRESETS, f"model.preset must be one of {', '.join(PRESETS)}"),
            (0 < self.data.val_fraction < 0.5, "data.val_fraction must be in (0, 0.5)"),
            (self.data.shard_tokens >= 1024, "data.shard_tokens must be at least 1024"),
            (self.round.tokens >= 0, "round.tokens must be ≥ 0"),
            (self.round.inner_steps > 0, "round.inner_steps must be positive"),
            (self.round.deadline_s > 0, "round.deadline_s must be positive"),
            (self.round.exchange_deadline_s > 0, "round.exchange_deadline_s must be positive"),
            (self.round.shards_per_owner > 0, "round.shards_per_owner must be positive"),
            (0 <= self.round.sync_power <= 4, "round.sync_power must be in [0, 4]"),
            (
                self.round.sync_power == 0 or self.round.tokens > 0,
                "round.sync_power needs budget rounds (round.tokens > 0)",
            ),
            (self.checkpoints.every > 0, "checkpoints.every must be positive"),
            (self.checkpoints.keep > 0, "checkpoints.keep must be positive"),
            (self.membership.heartbeat_s > 0, "membership.heartbeat_s must be positive"),
            (
                self.membership.lease_s > self.membership.heartbeat_s,
                "membership.lease_s must exceed membership.heartbeat_s",
            ),
            (self.membership.data_lease_s > 0, "membership.data_lease_s must be positive"),
            (self.membership.min_nodes > 0, "membership.min_nodes must be positive"),
            (0 < self.outer.feedback_decay <= 1, "outer.feedback_decay must be in (0, 1]"),
            (self.defences.ban_after_offences >= 0, "defences.ban_after_offences must be ≥ 0"),
            (self.defences.requests_per_s > 0, "defences.requests_per_s must be positive"),
            (self.defences.request_burst >= 1, "defences.request_burst must be at least 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise RunConfigError(message)
        moments = self._moment_batches()
        if isinstance(moments, str | bool) and moments != CONTRIBUTORS:
            raise RunConfigError(
                f'train.moment_batches must be a number ≥ 1 or "{CONTRIBUTORS}", got {moments!r}'
            )
        try:
            codec = make_codec(self.outer.codec)
            OuterConfig(self.outer.lr, self.outer.momentum, self.outer.nesterov)
            model_config(self.model.preset, **self.model.overrides)
            self.train_config()
        except (TypeError, ValueError) as err:
            raise RunConfigError(str(err)) from None
        if self.defences.verify_means and codec.name in HARDWARE_DEPENDENT:
            raise RunConfigError(
                f"outer.codec {codec.name} cannot be used with defences.verify_means: its "
                "bytes depend on the machine that encodes, so two honest reducers of a "
                "shard would disagree; use int8 or int4, or set verify_means = false "
                "where every peer is trusted"
            )

    def model_config(self, vocab_size: int) -> ModelConfig:
        return model_config(self.model.preset, **{"vocab_size": vocab_size, **self.model.overrides})

    def outer_config(self) -> OuterConfig:
        return OuterConfig(self.outer.lr, self.outer.momentum, self.outer.nesterov)

    def train_config(self) -> TrainConfig:
        """The nodes' TrainConfig. Where moment batches follow the contributors, its
        moment_batches is 1 and the node raises it each round (follows_contributors)."""
        seq = model_config(self.model.preset, **self.model.overrides).max_seq_len
        train = dict(self.train)
        if self._moment_batches() == CONTRIBUTORS:
            train["moment_batches"] = 1.0
        return TrainConfig(**{"seq_len": seq, "seed": self.run.seed, **train})

    def follows_contributors(self) -> bool:
        """Whether each node's inner AdamW assumes the batch of the last committed
        round's contributors ([train] moment_batches = "contributors", the default).
        A micro-batch of one sequence cannot be split in halves: plain AdamW then."""
        return self._moment_batches() == CONTRIBUTORS and self.train_config().micro_batch_size >= 2

    def _moment_batches(self) -> Any:
        """[train] moment_batches as written: a number, or "contributors" if unset."""
        return self.train.get("moment_batches", CONTRIBUTORS)

    def inner_schedule(self) -> TrainConfig:
        """The train config whose steps span the run's target tokens: the inner lr
        schedule's position is the run's progress (tokens // batch tokens), the same on
        every node whatever its speed."""
        base = self.train_config()
        return replace(base, steps=max(1, self.run.target_tokens // base.batch_tokens))

    def with_warmup_pinned(self) -> RunConfig:
        """This config with its warmup written into [train]: where none is given, the
        first quarter of the run's schedule, as `starling simulate` warms up over a
        quarter of its steps (starling.train.default_warmup). `coordinator init` writes
        it into the run's run.toml, so that a run's schedule is fixed when it is created:
        a run whose run.toml names no warmup (created before 2026-12-07) keeps
        TrainConfig's 50 steps on every node, whatever the node's version."""
        if "warmup_steps" in self.train:
            return self
        warmup = default_warmup(self.inner_schedule().steps)
        return replace(self, train={**self.train, "warmup_steps": warmup})

    # --- TOML ---------------------------------------------------------------------

    @classmethod
    def from_toml(cls, text: str) -> RunConfig:
        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as err:
            raise RunConfigError(f"run config is not valid TOML: {err}") from None
        return cls.from_dict(data)

    @classmethod
    def load(cls, path: Path) -> RunConfig:
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise RunConfigError(f"run config {path} does not exist") from None
        except UnicodeDecodeError:
            raise RunConfigError(f"run config {path} is not UTF-8 text") from None
        try:
            return cls.from_toml(text)
        except RunConfigError as err:
            raise RunConfigError(f"{path}: {err}") from None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunConfig:
        sections: dict[str, type] = {
            "run": RunSection,
            "data": DataSection,
            "round": RoundSection,
            "outer": OuterSection,
            "checkpoints": CheckpointSection,
            "membership": MembershipSection,
            "defences": DefencesSection,
        }
        unknown = set(data) - set(sections) - {"model", "train"}
        if unknown:
            raise RunConfigError(f"unknown sections {sorted(unknown)}")
        kwargs: dict[str, Any] = {}
        for name, section in sections.items():
            values = data.get(name, {})
            if not isinstance(values, dict):
                raise RunConfigError(f"[{name}] must be a table")
            known = {f.name for f in fields(section)}
            bad = set(values) - known
            if bad:
                raise RunConfigError(f"unknown keys in [{name}]: {sorted(bad)}")
            kwargs[name] = _typed(section, name, values)
        model = dict(data.get("model", {}))
        preset = model.pop("preset", ModelSection.preset)
        model_keys = set(ModelConfig.__dataclass_fields__) - {"vocab_size"}
        bad = set(model) - model_keys
        if bad:
            raise RunConfigError(f"unknown keys in [model]: {sorted(bad)}")
        kwargs["model"] = ModelSection(str(preset), model)
        train = dict(data.get("train", {}))
        bad = (set(train) - set(TrainConfig.__dataclass_fields__)) | (
            {"seed", "seq_len"} & set(train)
        )
        if bad:
            raise RunConfigError(
                f"bad keys in [train]: {sorted(bad)} (seed comes from [run], "
                "seq_len from the model's max_seq_len)"
            )
        kwargs["train"] = train
        return cls(**kwargs)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["model"] = {"preset": self.model.preset, **self.model.overrides}
        return data

    def to_toml(self) -> str:
        lines = ["# Starling run config (see starling.runconfig)."]
        for section, values in self.to_dict().items():
            lines.append(f"\n[{section}]")
            lines.extend(f"{key} = {_toml_value(value)}" for key, value in values.items())
        return "\n".join(lines) + "\n"


def _typed(section: type, name: str, values: dict[str, Any]) -> Any:
    """The section with each value checked against its field's type (ints may be
    written where floats are expected)."""
    defaults = section()
    for key, value in values.items():
        expected = type(getattr(defaults, key))
        ok = isinstance(value, expected) and not (expected is int and isinstance(value, bool))
        if expected is float and isinstance(value, int) and not isinstance(value, bool):
            values = {**values, key: float(value)}
            ok = True
        if not ok:
            raise RunConfigError(
                f"[{name}] {key} must be {expected.__name__}, got {type(value).__name__}"
            )
    return section(**values)


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    raise TypeError(f"cannot write {value!r} as TOML")
