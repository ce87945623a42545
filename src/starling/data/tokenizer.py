"""Tokenizers: a byte-level BPE trained offline, and a plain byte tokenizer.

Both are Hugging Face `tokenizers` objects saved as `tokenizer.json`, so a run ships one
file (identified by its SHA-256) and an HF export can include it as it is. The byte
tokenizer is a BPE with no merges whose ids are the byte values 0..255, plus EOS = 256.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from tokenizers.pre_tokenizers import ByteLevel

from .errors import ShardIntegrityError

EOS_TOKEN = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 8192


@dataclass(frozen=True)
class TokenizerSpec:
    """What `--tokenizer` asks for: `bpe:N` (train a vocabulary of N) or `bytes`."""

    kind: str  # "bpe" or "bytes"
    vocab_size: int

    @classmethod
    def parse(cls, text: str) -> TokenizerSpec:
        text = text.strip().lower()
        if text == "bytes":
            return cls("bytes", 257)
        if text == "bpe":
            return cls("bpe", DEFAULT_BPE_VOCAB)
        if text.startswith("bpe:"):
            try:
                size = int(text[4:])
            except ValueError:
                raise ValueError(
                    f"bad tokenizer {text!r}: the size in bpe:N must be an integer"
                ) from None
            # The byte alphabet (256) and EOS must fit; above 2^32 the shards cannot hold ids.
            if not 512 <= size <= 2**32:
                raise ValueError(f"bad tokenizer {text!r}: bpe vocabulary must be 512..2^32")
            return cls("bpe", size)
        raise ValueError(f"unknown tokenizer {text!r}: use bpe:N (e.g. bpe:8192) or bytes")

    def __str__(self) -> str:
        return "bytes" if self.kind == "bytes" else f"bpe:{self.vocab_size}"


def byte_tokenizer() -> Tokenizer:
    """Ids are raw byte values; EOS is 256."""
    # ByteLevel maps each byte to a printable unicode character; give that character the
    # id of its byte so that token ids are the bytes themselves.
    alphabet = ByteLevel.alphabet()
    byte_to_char = _bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)}
    assert set(vocab) == set(alphabet)
    vocab[EOS_TOKEN] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    _configure_byte_level(tok)
    tok.add_special_tokens([EOS_TOKEN])
    return tok


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Train a byte-level BPE. Deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    _configure_byte_level(tok)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS_TOKEN],
        initial_alphabet=ByteLevel.alphabet(),  # every byte encodable: no unknown tokens
        min_frequency=2,
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def _configure_byte_level(tok: Tokenizer) -> None:
    # GPT-2 style: split on the regex, map bytes to visible characters, no prefix space.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte → printable character map (the one ByteLevel uses)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(printable, chars, strict=True)}


def build_tokenizer(spec: TokenizerSpec, texts: Iterable[str]) -> Tokenizer:
    if spec.kind == "bytes":
        return byte_tokenizer()
    return train_bpe(texts, spec.vocab_size)


def tokenizer_bytes(tok: Tokenizer) -> bytes:
    """Canonical serialisation: the bytes of `tokenizer.json` (sorted keys, no padding)."""
    data = json.loads(tok.to_str())
    return json.dumps(data, sort_keys=True, ensure_ascii=False, indent=1).encode("utf-8")


def save_tokenizer(tok: Tokenizer, path: Path) -> str:
    """Write `tokenizer.json` atomically; returns its SHA-256 hex digest."""
    payload = tokenizer_bytes(tok)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(payload)
    os.replace(tmp, path)
    return hashlib.sha256(payload).hexdigest()


def load_tokenizer(path: Path, expected_sha256: str | None = None) -> Tokenizer:
    payload = path.read_bytes()
    if expected_sha256 is not None:
        actual = hashlib.sha256(payload).hexdigest()
        if actual != expected_sha256:
            raise ShardIntegrityError(
                f"{path}: SHA-256 {actual[:12]}… does not match the manifest's "
                f"{expected_sha256[:12]}…; the tokenizer file is corrupt or from another run"
            )
    return Tokenizer.from_str(payload.decode("utf-8"))


def eos_id(tok: Tokenizer) -> int:
    token_id = tok.token_to_id(EOS_TOKEN)
    if token_id is None:
        raise ValueError(f"tokenizer has no {EOS_TOKEN} token")
    return int(token_id)


def encode_batches(tok: Tokenizer, texts: Iterable[str], batch: int = 256) -> Iterator[list[int]]:
    """Token ids of each text, in order; encodes `batch` texts at a time in parallel."""
    buffer: list[str] = []
    for text in texts:
        buffer.append(text)
        if len(buffer) == batch:
            yield from (enc.ids for enc in tok.encode_batch(buffer, add_special_tokens=False))
            buffer = []
    if buffer:
        yield from (enc.ids for enc in tok.encode_batch(buffer, add_special_tokens=False))
