"""`starling data prepare`: source → tokenizer → fixed-size token shards + manifest.

Deterministic for a given (source, tokenizer spec, seed, shard size, validation
fraction): the same inputs prepared into any two directories give byte-identical
`tokenizer.json` and shards. The output directory appears only when complete (it is
built beside the target and renamed into place), so a crash never leaves half a dataset.
The training documents go into the shards in an order shuffled by the seed; the
validation documents keep the corpus's order.
"""

from __future__ import annotations

import array
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .shards import (
    MANIFEST_FILE,
    SPLITS,
    TOKENIZER_FILE,
    Manifest,
    ShardInfo,
    token_dtype,
)
from .sources import DataSourceError, Source, resolve_paths
from .tokenizer import (
    TokenizerSpec,
    build_tokenizer,
    encode_batches,
    eos_id,
    save_tokenizer,
)

# (stage, documents done, documents in all or None while unknown)
ProgressFn = Callable[[str, int, int | None], None]

# What a prepared dataset holds changed with: 2, the training documents shuffled across the
# shards (before, corpus order). Caches of prepared data are keyed on it, so that a
# dataset prepared by an older version is prepared again rather than reused.
PREPARE_VERSION = 2


@dataclass(frozen=True)
class PrepareConfig:
    source: str
    tokenizer: str = "bpe:8192"
    seed: int = 0
    val_fraction: float = 0.02
    # 256 Ki tokens (512 KiB as uint16): small enough that a corpus yields many leasable
    # shards, large enough that per-shard bookkeeping stays negligible.
    shard_tokens: int = 262_144
    text_field: str = "text"
    # The BPE learns its merges from at most this many characters of the training split.
    bpe_train_chars: int = 200_000_000
    hf_max_documents: int | None = None

    def __post_init__(self) -> None:
        if not 0.0 < self.val_fraction < 0.5:
            raise ValueError(f"val fraction must be in (0, 0.5), got {self.val_fraction}")
        if self.shard_tokens < 1024:
            raise ValueError(f"shard tokens must be at least 1024, got {self.shard_tokens}")
        TokenizerSpec.parse(self.tokenizer)  # fail early on a bad spec


def cache_name(data: str, tokenizer: str, seed: int) -> str:
    """The folder name a cache keeps a prepared `data` source under: its spec, and for
    local files their paths, sizes and times, the tokenizer, seed and PREPARE_VERSION
    (so that a dataset prepared by an older version is prepared again). The embedded
    corpora and Hugging Face datasets (`hf:`) go by their spec alone."""
    stamp = data
    remote = data.startswith(("embedded", "hf:"))
    if not remote:
        stamp += "".join(
            f"|{p.resolve()}:{p.stat().st_size}:{p.stat().st_mtime_ns}" for p in resolve_paths(data)
        )
    key = f"{stamp}|{tokenizer}|{seed}|{PREPARE_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    name = data.replace(":", "-").replace("/", "_") if remote else Path(data).name or "data"
    return f"{name}-{tokenizer.replace(':', '')}-{digest}"


def is_validation(seed: int, document_index: int, val_fraction: float) -> bool:
    """Whole documents go to one split, chosen by a hash of (seed, index): stable,
    independent of the rest of the corpus, and the same in every pass."""
    digest = hashlib.sha256(f"{seed}:{document_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") / 2**64 < val_fraction


def prepare(
    cfg: PrepareConfig,
    out_dir: Path,
    progress: ProgressFn | None = None,
    overwrite: bool = False,
) -> Manifest:
    report = progress or (lambda stage, done, total: None)
    out_dir = Path(out_dir)
    _check_output(out_dir, overwrite)
    source = Source(cfg.source, text_field=cfg.text_field, hf_max_documents=cfg.hf_max_documents)
    spec = TokenizerSpec.parse(cfg.tokenizer)

    # Pass 1: count documents, fix the split, and (for BPE) learn merges from train text.
    n_documents, val_indices = _plan_split(source, cfg, report)
    if n_documents == 0:
        raise DataSourceError(f"{cfg.source}: no text found (empty or whitespace only)")
    if n_documents == 1:
        raise DataSourceError(
            f"{cfg.source}: only one document; a held-out split needs at least two "
            "(separate paragraphs with blank lines, or give more files)"
        )
    if not val_indices:
        val_indices = {n_documents - 1}  # tiny corpora: hold out the last document
    if len(val_indices) == n_documents:
        val_indices.discard(0)

    def train_texts() -> Iterator[str]:
        budget = cfg.bpe_train_chars
        for index, text in enumerate(source.documents()):
            if index in val_indices:
                continue
            if budget <= 0:
                break
            budget -= len(text)
            report("training tokenizer", index + 1, n_documents)
            yield text

    tokenizer = build_tokenizer(spec, train_texts())
    eos = eos_id(tokenizer)
    vocab_size = tokenizer.get_vocab_size()
    dtype = token_dtype(vocab_size)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        tokenizer_sha = save_tokenizer(tokenizer, staging / TOKENIZER_FILE)
        writers = {split: _ShardWriter(staging, split, cfg.shard_tokens, dtype) for split in SPLITS}
        # Pass 2: tokenize every document, EOS after each. Validation documents go into
        # their shards as they come; training documents are staged on disk, with their
        # lengths, and go into theirs in a shuffled order (_write_shuffled).
        staged = staging / "train-documents.tmp"
        lengths = array.array("q")
        with staged.open("wb") as out:
            for index, ids in enumerate(encode_batches(tokenizer, source.documents())):
                if index in val_indices:
                    writers["val"].add(ids + [eos])
                else:
                    out.write(np.asarray(ids + [eos], dtype=writers["train"].dtype).tobytes())
                    lengths.append(len(ids) + 1)
                report("tokenizing", index + 1, n_documents)
        _write_shuffled(writers["train"], staged, lengths, cfg.seed, report)
        staged.unlink()
        shards = {split: writers[split].finish() for split in SPLITS}
        manifest = Manifest(
            source=cfg.source,
            seed=cfg.seed,
            val_fraction=cfg.val_fraction,
            shard_tokens=cfg.shard_tokens,
            dtype=dtype,
            tokenizer_sha256=tokenizer_sha,
            tokenizer_kind=spec.kind,
            vocab_size=vocab_size,
            eos_id=eos,
            documents={"train": n_documents - len(val_indices), "val": len(val_indices)},
            shards=shards,
        )
        (staging / MANIFEST_FILE).write_text(
            json.dumps(manifest.to_dict(), indent=1, sort_keys=True) + "\n", encoding="utf-8"
        )
        staging.chmod(0o755)  # mkdtemp makes it private; a dataset is meant to be shared
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(staging, out_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _write_shuffled(
    writer: _ShardWriter,
    staged: Path,
    lengths: array.array[int],
    seed: int,
    report: ProgressFn,
) -> None:
    """The staged training documents (token ids back to back, `lengths` each) into
    `writer` in an order shuffled by `seed`. A run leases each node shards of its own:
    in corpus order (a book's chapters, a repository's files, one source after another)
    each node would train on its own stretch of the corpus and the nodes' updates would
    pull apart: a real run of 4 nodes on the embedded corpus in corpus order ended 2%
    above the same run on shuffled shards (README, "Data")."""
    if not lengths:
        return
    tokens = np.memmap(staged, dtype=writer.dtype, mode="r")
    starts = np.cumsum(lengths) - np.asarray(lengths)
    # Seeded with the version too: the order is part of what a version's dataset is. numpy
    # takes no negative seed; any other seed is itself modulo 2^63.
    rng = np.random.default_rng([seed % 2**63, PREPARE_VERSION])
    for done, index in enumerate(rng.permutation(len(lengths)), start=1):
        writer.add(tokens[starts[index] : starts[index] + lengths[index]].tolist())
        report("shuffling", done, len(lengths))
    del tokens  # unmapped before the file goes


def _check_output(out_dir: Path, overwrite: bool) -> None:
    """Never delete what is not ours: only a previous prepared dataset may be replaced."""
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise DataSourceError(f"output {out_dir} exists and is not a directory")
    if not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST_FILE).is_file():
        raise DataSourceError(
            f"output {out_dir} is a non-empty directory that holds no prepared dataset; "
            "choose a new --out"
        )
    if not overwrite:
        raise DataSourceError(
            f"output {out_dir} already holds a prepared dataset; pass --overwrite to replace it"
        )


def _plan_split(source: Source, cfg: PrepareConfig, report: ProgressFn) -> tuple[int, set[int]]:
    n_documents = 0
    val_indices: set[int] = set()
    for index, _ in enumerate(source.documents()):
        n_documents = index + 1
        if is_validation(cfg.seed, index, cfg.val_fraction):
            val_indices.add(index)
        if index % 1000 == 0:
            report("reading", n_documents, None)
    report("reading", n_documents, n_documents)
    return n_documents, val_indices


class _ShardWriter:
    """Cuts one split's token stream into files of exactly `shard_tokens` (the last shorter)."""

    def __init__(self, root: Path, split: str, shard_tokens: int, dtype: str) -> None:
        self.root = root
        self.split = split
        self.shard_tokens = shard_tokens
        self.dtype = np.dtype(dtype).newbyteorder("<")
        self.buffer: list[int] = []
        self.shards: list[ShardInfo] = []
        (root / split).mkdir()

    def add(self, ids: list[int]) -> None:
        self.buffer.extend(ids)
        while len(self.buffer) >= self.shard_tokens:
            self._write(self.buffer[: self.shard_tokens])
            del self.buffer[: self.shard_tokens]

    def finish(self) -> list[ShardInfo]:
        if self.buffer:
            self._write(self.buffer)
            self.buffer = []
        return self.shards

    def _write(self, ids: list[int]) -> None:
        name = f"{self.split}/{len(self.shards):06d}.bin"
        payload = np.asarray(ids, dtype=self.dtype).tobytes()
        (self.root / name).write_bytes(payload)
        self.shards.append(ShardInfo(name, len(ids), hashlib.sha256(payload).hexdigest()))
