"""The node's inner loop: one process, or FSDP across the node's own GPUs under torchrun.

    torchrun --nproc-per-node 4 -m starling node join URL      # a 4-GPU node

Under torchrun only rank 0 talks to the network: it runs the whole daemon (join, leases,
exchange, outer step) and drives the other ranks through a small command protocol of
collectives on a gloo group: SETUP (the run's model and inner-optimizer settings as
JSON), DATA (a leased shard's path in the shared work dir), LOAD (θ into the sharded
model), SCHEDULE (the learning rate's position), MOMENTS (the batch the inner AdamW's
second moment assumes), STEP (one inner optimizer step), GATHER (the full parameters
back to rank 0), RESET (forget the optimizer's state), STOP. The inner model is sharded with FSDP
(`fully_shard` per decoder layer, then the root); every rank trains on its own windows
of the leased shard, so one inner step of a W-rank node consumes W × batch_tokens
tokens, and the node's contribution is weighted by them like any other node's. On a
CPU the same code runs with gloo (what the tests use).

Nothing crosses between ranks but tensors: commands and JSON as int64 / uint8 tensors,
parameters through torch.distributed.checkpoint's full state dicts (no pickle).
"""

from __future__ import annotations

import json
import os
import signal
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from starling.data.shards import SequenceBatcher
from starling.diloco import flatten_parameters, load_flat_parameters
from starling.model import ModelConfig, build_model
from starling.train import InnerTrainer, StepStats, TrainConfig

SETUP, DATA, LOAD, STEP, GATHER, STOP, SCHEDULE, RESET, MOMENTS = range(1, 10)


class InnerLoop(Protocol):
    """What the daemon needs of its inner loop; θ is always a flat fp32 CPU vector."""

    def set_data(self, path: Path, dtype: str, seed: int) -> None: ...

    def load(self, flat: torch.Tensor) -> None: ...

    def restart(self, flat: torch.Tensor) -> None:
        """Load θ and forget the optimizer's state: after a divergence, whose NaN or Inf
        would stay in the moments."""

    def set_schedule_step(self, step: int) -> None:
        """Where the inner learning-rate schedule is (in optimizer steps of
        batch_tokens): the run's progress, not this node's own step count."""

    def set_moment_batches(self, batches: float) -> float:
        """Precondition the inner AdamW like a batch `batches` times the step's, where
        the loop can; returns the factor it assumes from now on."""

    def step(self) -> StepStats: ...

    @property
    def optimizer_name(self) -> str:
        """What the inner steps run ("adamw" or "muon"), read off the optimizer built."""
        ...

    def flat(self) -> torch.Tensor: ...

    def close(self) -> None: ...


class LocalInnerLoop:
    """The plain case: one process, one device."""

    def __init__(self, model: nn.Module, trainer: InnerTrainer, cfg: TrainConfig) -> None:
        self.model, self.trainer, self.cfg = model, trainer, cfg
        self.batches: SequenceBatcher | None = None

    def set_data(self, path: Path, dtype: str, seed: int) -> None:
        self.batches = _shard_batches(self.cfg, str(path), dtype, seed)

    def load(self, flat: torch.Tensor) -> None:
        load_flat_parameters(self.model, flat)

    def restart(self, flat: torch.Tensor) -> None:
        self.trainer.reset_optimizer()
        self.load(flat)

    def set_schedule_step(self, step: int) -> None:
        self.trainer.steps_done = step

    def set_moment_batches(self, batches: float) -> float:
        self.trainer.set_moment_batches(batches)
        return batches

    def step(self) -> StepStats:
        assert self.batches is not None, "set_data first"
        return self.trainer.step(self.batches)

    @property
    def optimizer_name(self) -> str:
        return self.trainer.optimizer_name

    def flat(self) -> torch.Tensor:
        return flatten_parameters(self.model)

    def close(self) -> None:
        pass


# --- torchrun ---------------------------------------------------------------------------


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


class NodeGroup:
    """The node's processes under torchrun: rank 0's commands to the other ranks, over a
    gloo group (CPU tensors, whatever backend FSDP uses)."""

    def __init__(self, device: torch.device) -> None:
        """Joins torchrun's process group (NCCL on CUDA, gloo on a CPU); `self.device`
        is the device this rank trains on (its local GPU under CUDA)."""
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        self.device = device
        self.rank = dist.get_rank()
        self.world = dist.get_world_size()
        self.group = dist.new_group(backend="gloo")
        self._stopped = False

    def stop(self) -> None:
        """Releases the other ranks (rank 0), then leaves the group; idempotent. The
        barrier makes every rank tear its process group down only once all of them are
        done with it (one rank destroying it under another's last collective aborts
        the process)."""
        if not self._stopped:
            self._stopped = True
            if self.rank == 0:
                self.send(STOP)
            dist.barrier(group=self.group)
            dist.destroy_process_group()

    def send(self, command: int, payload: dict[str, Any] | None = None) -> None:
        body = json.dumps(payload or {}).encode()
        dist.broadcast(torch.tensor([command, len(body)], dtype=torch.int64), 0, self.group)
        if body:
            dist.broadcast(torch.frombuffer(bytearray(body), dtype=torch.uint8), 0, self.group)

    def receive(self) -> tuple[int, dict[str, Any]]:
        header = torch.zeros(2, dtype=torch.int64)
        dist.broadcast(header, 0, self.group)
        command, size = (int(v) for v in header)
        payload: dict[str, Any] = {}
        if size:
            body = torch.zeros(size, dtype=torch.uint8)
            dist.broadcast(body, 0, self.group)
            payload = json.loads(body.numpy().tobytes())
        return command, payload

    def mean(self, value: float) -> float:
        total = torch.tensor([value], dtype=torch.float64)
        dist.all_reduce(total, group=self.group)
        return float(total.item()) / dist.get_world_size()


def _sharded_replica(setup: dict[str, Any], device: torch.device) -> tuple[nn.Module, InnerTrainer]:
    from torch.distributed.fsdp import fully_shard

    model_cfg = ModelConfig.from_dict(setup["model"])
    model = build_model(model_cfg, seed=int(setup["seed"]), device=device)
    layers = getattr(model, "layers", [])
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    train_cfg = replace(TrainConfig(), **setup["train"])
    batch_scaled = bool(setup["batch_scaled"])
    return model, InnerTrainer(model, train_cfg, device, batch_scaled, sharded=True)


def _full_state_options(cpu_offload: bool = False, broadcast_from_rank0: bool = False) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(
        full_state_dict=True, cpu_offload=cpu_offload, broadcast_from_rank0=broadcast_from_rank0
    )


class ShardedInnerLoop:
    """Rank 0's side: the same calls as LocalInnerLoop, each one a collective with the
    other ranks. A plain CPU replica of the model converts between the flat θ the daemon
    works with and the full state dict FSDP loads and gathers."""

    def __init__(
        self,
        group: NodeGroup,
        model_cfg: ModelConfig,
        train_cfg: TrainConfig,
        seed: int,
        batch_scaled: bool = False,
    ) -> None:
        """`batch_scaled`: as InnerTrainer's (set_moment_batches will follow the run).
        Muon trains here too: each rank gathers a matrix whole to orthogonalize it
        (starling.train.orthogonalize_sharded)."""
        self.channel = group
        self.world = group.world
        device = group.device
        train = {**train_cfg.to_dict(), "device": device.type}
        setup = {
            "model": model_cfg.to_dict(),
            "train": train,
            "seed": seed,
            "batch_scaled": batch_scaled,
        }
        self.channel.send(SETUP, setup)
        self.model, self.trainer = _sharded_replica(setup, device)
        self.cfg = self.trainer.cfg
        self.mirror = build_model(model_cfg, seed=seed, device=torch.device("cpu"))
        self.batches: SequenceBatcher | None = None
        self._moment_batches: float | None = None  # set_moment_batches's, sent at a step

    def set_data(self, path: Path, dtype: str, seed: int) -> None:
        self.channel.send(DATA, {"path": str(path), "dtype": dtype, "seed": seed})
        self.batches = _rank_batches(self.cfg, str(path), dtype, seed)

    def load(self, flat: torch.Tensor) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        load_flat_parameters(self.mirror, flat)
        self.channel.send(LOAD)
        options = _full_state_options(broadcast_from_rank0=True)
        set_model_state_dict(self.model, self.mirror.state_dict(), options=options)

    def restart(self, flat: torch.Tensor) -> None:
        self.channel.send(RESET)  # each rank holds its shard of the optimizer's state
        self.trainer.reset_optimizer()
        self.load(flat)

    def set_schedule_step(self, step: int) -> None:
        self.channel.send(SCHEDULE, {"step": step})
        self.trainer.steps_done = step

    def set_moment_batches(self, batches: float) -> float:
        # In overlap mode this comes from the exchange worker, while the training thread
        # may be inside a collective with the other ranks: the ranks hear it before the
        # next step, from the thread that steps (commands never interleave).
        self._moment_batches = batches
        return batches

    def step(self) -> StepStats:
        assert self.batches is not None, "set_data first"
        wanted = self._moment_batches  # read once: a newer value waits for the next step
        if wanted is not None and wanted != self.trainer.moment_batches:
            self.channel.send(MOMENTS, {"batches": wanted})
            self.trainer.set_moment_batches(wanted)
        self.channel.send(STEP)
        stats = self.trainer.step(self.batches)
        # Every rank trained its own micro-batches: the node's step is all of them.
        loss = self.channel.mean(stats.loss)
        return replace(stats, loss=loss, tokens=stats.tokens * self.world)

    @property
    def optimizer_name(self) -> str:
        return self.trainer.optimizer_name  # rank 0's; every rank built the same one

    def flat(self) -> torch.Tensor:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        self.channel.send(GATHER)
        full = get_model_state_dict(self.model, options=_full_state_options(cpu_offload=True))
        self.mirror.load_state_dict(full)
        return flatten_parameters(self.mirror)

    def close(self) -> None:
        self.channel.stop()


def _shard_batches(cfg: TrainConfig, path: str, dtype: str, seed: int) -> SequenceBatcher:
    """Endless batches from one leased shard (read by memory map)."""
    tokens = np.memmap(path, dtype=dtype, mode="r")
    return SequenceBatcher([tokens], cfg.seq_len, cfg.micro_batch_size, seed)


def _rank_batches(
    cfg: TrainConfig, path: str, dtype: str, seed: int, rank: int | None = None
) -> SequenceBatcher:
    """A rank's windows of the shard (default: this rank's): its own shuffle (seed, rank)."""
    rank = dist.get_rank() if rank is None else rank
    return _shard_batches(cfg, path, dtype, seed * 1009 + rank)


def run_follower(channel: NodeGroup) -> None:
    """Ranks 1..W−1: carry out rank 0's commands until STOP. Signals are rank 0's to
    handle (torchrun forwards Ctrl-C to every rank): it finishes, leaves, then stops us."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    device = channel.device
    model: nn.Module | None = None
    trainer: InnerTrainer | None = None
    batches: SequenceBatcher | None = None
    while True:
        command, payload = channel.receive()
        if command == SETUP:
            model, trainer = _sharded_replica(payload, device)
        elif command == DATA:
            assert trainer is not None
            batches = _rank_batches(trainer.cfg, payload["path"], payload["dtype"], payload["seed"])
        elif command == LOAD:
            assert model is not None
            options = _full_state_options(broadcast_from_rank0=True)
            set_model_state_dict(model, {}, options=options)
        elif command == SCHEDULE:
            assert trainer is not None
            trainer.steps_done = int(payload["step"])
        elif command == RESET:
            assert trainer is not None
            trainer.reset_optimizer()
        elif command == MOMENTS:
            assert trainer is not None
            trainer.set_moment_batches(float(payload["batches"]))
        elif command == STEP:
            assert trainer is not None and batches is not None
            channel.mean(trainer.step(batches).loss)
        elif command == GATHER:
            assert model is not None
            get_model_state_dict(model, options=_full_state_options(cpu_offload=True))
        elif command == STOP:
            return
        else:
            raise RuntimeError(f"unknown command {command} from rank 0")
