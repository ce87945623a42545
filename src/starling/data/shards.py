"""Token shards on disk: the manifest, integrity checks, memory-mapped reading, batching.

A prepared data directory holds
  tokenizer.json              the run's tokenizer
  train/000000.bin, ...       raw little-endian token ids (uint16 or uint32), no header
  val/000000.bin, ...         the held-out split (whole documents never seen in training)
  manifest.json               per-shard token counts and SHA-256, the tokenizer's SHA-256

These shards are what the coordinator leases to nodes; a node reads one by memory map.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer

from .errors import ShardIntegrityError
from .tokenizer import load_tokenizer

MANIFEST_FILE = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "starling-shards/1"
SPLITS = ("train", "val")


@dataclass(frozen=True)
class ShardInfo:
    file: str  # relative to the data directory
    tokens: int
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return {"file": self.file, "tokens": self.tokens, "sha256": self.sha256}


@dataclass(frozen=True)
class Manifest:
    source: str
    seed: int
    val_fraction: float
    shard_tokens: int
    dtype: str  # "uint16" or "uint32"
    tokenizer_sha256: str
    tokenizer_kind: str
    vocab_size: int
    eos_id: int
    documents: dict[str, int]
    shards: dict[str, list[ShardInfo]]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.shards[split])

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "source": self.source,
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "shard_tokens": self.shard_tokens,
            "dtype": self.dtype,
            "tokenizer": {
                "file": TOKENIZER_FILE,
                "sha256": self.tokenizer_sha256,
                "kind": self.tokenizer_kind,
                "vocab_size": self.vocab_size,
                "eos_id": self.eos_id,
            },
            "documents": dict(self.documents),
            "tokens": {split: self.tokens(split) for split in SPLITS},
            "splits": {split: [s.to_dict() for s in self.shards[split]] for split in SPLITS},
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        if data.get("format") != FORMAT:
            raise ShardIntegrityError(f"unsupported manifest format {data.get('format')!r}")
        try:
            tok = data["tokenizer"]
            return cls(
                source=str(data["source"]),
                seed=int(data["seed"]),
                val_fraction=float(data["val_fraction"]),
                shard_tokens=int(data["shard_tokens"]),
                dtype=_checked_dtype(data["dtype"]),
                tokenizer_sha256=str(tok["sha256"]),
                tokenizer_kind=str(tok["kind"]),
                vocab_size=int(tok["vocab_size"]),
                eos_id=int(tok["eos_id"]),
                documents={k: int(v) for k, v in data["documents"].items()},
                shards={
                    split: [
                        ShardInfo(_safe_relative(s["file"]), int(s["tokens"]), str(s["sha256"]))
                        for s in data["splits"][split]
                    ]
                    for split in SPLITS
                },
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ShardIntegrityError(f"malformed manifest: {err}") from None


def _checked_dtype(name: Any) -> str:
    if name not in ("uint16", "uint32"):
        raise ShardIntegrityError(f"unsupported token dtype {name!r}")
    return str(name)


def _safe_relative(name: Any) -> str:
    """Shard paths come from a file another machine may have written: no escaping the dir."""
    path = Path(str(name))
    if path.is_absolute() or ".." in path.parts:
        raise ShardIntegrityError(f"shard path {name!r} leaves the data directory")
    return str(name)


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_manifest(data_dir: Path) -> Manifest:
    path = data_dir / MANIFEST_FILE
    if not path.is_file():
        raise ShardIntegrityError(
            f"{data_dir} has no {MANIFEST_FILE}: prepare it with `starling data prepare`"
        )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ShardIntegrityError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ShardIntegrityError(f"{path} is not a JSON object")
    return Manifest.from_dict(data)


def verify_shard(data_dir: Path, info: ShardInfo, dtype: str, full: bool = True) -> None:
    """Size always; SHA-256 too when `full`. Raises ShardIntegrityError on any mismatch."""
    path = data_dir / info.file
    if not path.is_file():
        raise ShardIntegrityError(f"missing shard {info.file}")
    expected_bytes = info.tokens * np.dtype(dtype).itemsize
    if path.stat().st_size != expected_bytes:
        raise ShardIntegrityError(
            f"shard {info.file} has {path.stat().st_size} bytes, manifest says {expected_bytes}"
        )
    if full:
        actual = sha256_file(path)
        if actual != info.sha256:
            raise ShardIntegrityError(
                f"shard {info.file} is corrupt: SHA-256 {actual[:12]}… != manifest "
                f"{info.sha256[:12]}…"
            )


class TokenDataset:
    """A prepared, verified data directory."""

    def __init__(self, data_dir: Path, verify: bool = True) -> None:
        self.dir = Path(data_dir)
        self.manifest = read_manifest(self.dir)
        self.tokenizer: Tokenizer = load_tokenizer(
            self.dir / TOKENIZER_FILE,
            expected_sha256=self.manifest.tokenizer_sha256 if verify else None,
        )
        for split in SPLITS:
            for info in self.manifest.shards[split]:
                verify_shard(self.dir, info, self.manifest.dtype, full=verify)

    def shard(self, info: ShardInfo) -> np.ndarray:
        """Memory-mapped, read-only: pages are read from disk only as batches touch them."""
        return np.memmap(self.dir / info.file, dtype=self.manifest.dtype, mode="r")

    def split(self, split: str) -> list[np.ndarray]:
        return [self.shard(info) for info in self.manifest.shards[split]]


class SequenceBatcher:
    """Endless (inputs, targets) batches of shape (B, T) from token shards.

    Each shard is cut into non-overlapping windows of T+1 tokens (stride T); each epoch
    visits every window once in an order shuffled by (seed, epoch), so a run covers its
    data exactly and can be resumed from `state_dict()`.
    """

    def __init__(
        self,
        shards: list[np.ndarray],
        seq_len: int,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
    ) -> None:
        self.shards = shards
        self.shuffle = shuffle
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.seed = seed
        windows = [
            (shard_index, start)
            for shard_index, shard in enumerate(shards)
            for start in range(0, len(shard) - seq_len, seq_len)
        ]
        if not windows:
            total = sum(len(s) for s in shards)
            raise ValueError(
                f"{total} tokens cannot fill one sequence of {seq_len + 1}: "
                "use a shorter --seq-len or more data"
            )
        self.windows = np.array(windows, dtype=np.int64)  # (N, 2): shard index, start
        self.epoch = 0
        self.cursor = 0
        self._order = self._shuffled(0)

    def _shuffled(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(len(self.windows))
        return np.random.default_rng([self.seed, epoch]).permutation(len(self.windows))

    @property
    def tokens_per_epoch(self) -> int:
        return len(self.windows) * self.seq_len

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        rows = []
        for _ in range(self.batch_size):
            if self.cursor == len(self._order):
                self.epoch += 1
                self.cursor = 0
                self._order = self._shuffled(self.epoch)
            shard_index, start = self.windows[self._order[self.cursor]]
            self.cursor += 1
            rows.append(self.shards[shard_index][start : start + self.seq_len + 1])
        batch = torch.from_numpy(np.stack(rows).astype(np.int64))  # (B, T+1)
        return batch[:, :-1], batch[:, 1:]

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._shuffled(self.epoch)


def evaluation_batches(
    shards: list[np.ndarray], seq_len: int, batch_size: int, max_batches: int
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A fixed set of validation batches, the same every call so validation losses are
    comparable across steps and runs: windows spread evenly over the whole split. (The
    first windows alone would measure one region of the corpus — a few chapters of one
    book of the embedded Bible — and favour whoever trained on that region.)"""
    windows = SequenceBatcher(shards, seq_len, batch_size, seed=0, shuffle=False).windows
    count = max(1, min(max_batches, len(windows) // batch_size))
    rows = count * batch_size
    # Evenly spaced window indices; a split with fewer windows than one batch repeats them.
    picks = (np.arange(rows) * len(windows)) // rows if rows <= len(windows) else np.arange(rows)
    batches = []
    for first in range(0, rows, batch_size):
        chosen = windows[picks[first : first + batch_size] % len(windows)]
        stacked = np.stack([shards[i][start : start + seq_len + 1] for i, start in chosen])
        batch = torch.from_numpy(stacked.astype(np.int64))  # (B, T+1)
        batches.append((batch[:, :-1], batch[:, 1:]))
    return batches
