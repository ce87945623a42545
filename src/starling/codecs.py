"""Codecs: a flat fp32 tensor (a shard of a pseudo-gradient) ⇄ the bytes put on the wire.

A codec is a small object with `encode`, `decode` and `encoded_size` (exact bytes for n
values, header included) — the bytes it returns are what the exchange sends, so wire
bytes are counted, never estimated. Every payload starts with a fixed header:

    magic b"SLC" | codec id (u8) | numel (u64 LE) | param (u32 LE: block or chunk size)

`decode` validates header, length and values and raises `CodecError` on anything
malformed: never a crash, never a silently wrong tensor.

Lossy codecs are used through `ErrorFeedback`, which carries each round's quantisation
residual into the next, so that Σ decoded messages + final residual = Σ inputs.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar, Protocol

import numpy as np
import torch

MAGIC = b"SLC"
HEADER = struct.Struct("<3sBQI")  # magic, codec id, numel, param
HEADER_BYTES = HEADER.size  # 16
MAX_NUMEL = 1 << 40  # refuses absurd declared sizes before allocating anything
FP16_MAX = 65504.0  # the largest finite fp16: the block and chunk scales' limit


# What decoders take: received bytes, or a bytearray the receiver assembled from chunks
# and hands over (fp32 then decodes it in place).
Payload = bytes | bytearray


class CodecError(ValueError):
    """Malformed or mismatched codec payload."""


class Codec(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def codec_id(self) -> int:
        """The id byte in the payload header."""
        ...

    @property
    def lossy(self) -> bool: ...

    def encode(self, values: torch.Tensor) -> bytes:
        """values: 1-D float32 on the CPU."""
        ...

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        """Exactly `numel` float32 values, or CodecError."""
        ...

    def encoded_size(self, numel: int) -> int: ...

    def error_bound(self, values: torch.Tensor) -> float:
        """Largest absolute per-element error that encode→decode may introduce."""
        ...


def _header(codec_id: int, numel: int, param: int) -> bytes:
    return HEADER.pack(MAGIC, codec_id, numel, param)


def _check_header(payload: Payload, codec_id: int, numel: int, param: int, size: int) -> None:
    if len(payload) < HEADER_BYTES:
        raise CodecError(f"payload of {len(payload)} bytes is shorter than the header")
    magic, got_id, got_numel, got_param = HEADER.unpack_from(payload)
    if magic != MAGIC:
        raise CodecError("bad magic: not a Starling codec payload")
    if got_id != codec_id:
        raise CodecError(f"payload is codec {got_id}, expected {codec_id}")
    if got_numel != numel or got_numel > MAX_NUMEL:
        raise CodecError(f"payload declares {got_numel} values, expected {numel}")
    if got_param != param:
        raise CodecError(f"payload block/chunk size {got_param}, expected {param}")
    if len(payload) != size:
        raise CodecError(f"payload has {len(payload)} bytes, expected {size} for {numel} values")


def _flat_f32(values: torch.Tensor) -> torch.Tensor:
    if values.dim() != 1:
        raise ValueError(f"codecs take 1-D tensors, got shape {tuple(values.shape)}")
    return values.detach().to("cpu", torch.float32).contiguous()


def _finite(values: torch.Tensor, what: str) -> torch.Tensor:
    # A NaN or Inf anywhere makes the sum NaN or Inf, so a finite sum (one vectorized
    # pass, no temporary) proves every value finite; only a non-finite sum, which
    # finite values can also reach by overflow, needs the element-wise check (20x slower).
    if not torch.isfinite(values.sum()) and not torch.isfinite(values).all():
        raise CodecError(f"{what} contains NaN or Inf")
    return values


def _representable(scales: torch.Tensor, what: str) -> torch.Tensor:
    """fp16 scales (or bf16 values) that overflowed to Inf, or came from NaN input, make a
    payload that every decoder refuses: refuse to encode it instead, saying why."""
    if not torch.isfinite(scales).all():
        raise CodecError(f"{what}: the values hold NaN or Inf, or are too large to encode")
    return scales


@dataclass(frozen=True)
class Float32Codec:
    name: ClassVar[str] = "fp32"
    codec_id: ClassVar[int] = 1
    lossy: ClassVar[bool] = False

    def encoded_size(self, numel: int) -> int:
        return HEADER_BYTES + 4 * numel

    def encode(self, values: torch.Tensor) -> bytes:
        v = _flat_f32(values).numpy().astype("<f4", copy=False)
        return b"".join((_header(self.codec_id, v.size, 0), v.data))  # one copy

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        """A writable buffer (bytearray) is decoded in place, without a copy: the caller
        hands it over. Anything else is copied."""
        _check_header(payload, self.codec_id, numel, 0, self.encoded_size(numel))
        out = np.frombuffer(payload, dtype="<f4", offset=HEADER_BYTES, count=numel)
        if not isinstance(payload, bytearray) or out.dtype != np.float32:
            out = out.astype(np.float32)
        return _finite(torch.from_numpy(out), "fp32 payload")

    def error_bound(self, values: torch.Tensor) -> float:
        return 0.0


@dataclass(frozen=True)
class BFloat16Codec:
    """Round-to-nearest-even to bfloat16: 8 exponent bits, 7 mantissa bits."""

    name: ClassVar[str] = "bf16"
    codec_id: ClassVar[int] = 2
    lossy: ClassVar[bool] = True

    def encoded_size(self, numel: int) -> int:
        return HEADER_BYTES + 2 * numel

    def encode(self, values: torch.Tensor) -> bytes:
        v = _representable(_flat_f32(values).to(torch.bfloat16), "bf16").view(torch.int16)
        return _header(self.codec_id, v.numel(), 0) + v.numpy().astype("<i2").tobytes()

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        _check_header(payload, self.codec_id, numel, 0, self.encoded_size(numel))
        raw = np.frombuffer(payload, dtype="<i2", offset=HEADER_BYTES, count=numel).copy()
        out = torch.from_numpy(raw).view(torch.bfloat16).float()
        return _finite(out, "bf16 payload")

    def error_bound(self, values: torch.Tensor) -> float:
        # Half an ulp of bf16 (2^-8 relative), plus slack for the smallest normals.
        if values.numel() == 0:
            return 0.0
        return float(values.abs().max()) * 2.0**-8 + 1e-38


@dataclass(frozen=True)
class BlockQuantCodec:
    """Per-block absmax quantisation to signed `bits` integers with an fp16 scale per block.

    int8 and int4 use the symmetric integers ±(2^(bits−1) − 1) (zero included). int2 has
    four codes and spends none on zero: its levels are ±0.5 and ±1.5 scales (a midrise
    grid, the scale the block's absmax / 1.5). On Gaussian blocks of 64 its error is 51%
    of the values' norm, where a {−1, 0, 1} grid's is 72%.

    Layout after the header: fp16 scales (one per block), then the codes (int8: one byte
    each; int4: two per byte, low nibble first, offset by 8 into 0..15; int2: four per
    byte, least significant bits first, code c standing for (c − 1.5) scales, padded with
    zero bits to a whole byte).
    """

    bits: int = 8
    block: int = 64

    @property
    def name(self) -> str:
        return f"int{self.bits}"

    @property
    def codec_id(self) -> int:
        return {8: 3, 4: 4, 2: 9}[self.bits]

    lossy: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if self.bits not in (2, 4, 8):
            raise ValueError("block quantisation supports 8, 4 or 2 bits")
        if not 8 <= self.block <= 1 << 20 or self.block % 2:
            raise ValueError(f"block size must be even and in [8, 2^20], got {self.block}")

    @property
    def levels(self) -> float:
        """The largest code's magnitude in scales: 127 (int8), 7 (int4), 1.5 (int2)."""
        return 1.5 if self.bits == 2 else 2 ** (self.bits - 1) - 1

    def _n_blocks(self, numel: int) -> int:
        return math.ceil(numel / self.block)

    def _code_bytes(self, numel: int) -> int:
        return -(-numel * self.bits // 8)

    def encoded_size(self, numel: int) -> int:
        return HEADER_BYTES + 2 * self._n_blocks(numel) + self._code_bytes(numel)

    def _blocks(self, v: torch.Tensor) -> torch.Tensor:
        pad = self._n_blocks(v.numel()) * self.block - v.numel()
        return torch.nn.functional.pad(v, (0, pad)).view(-1, self.block)  # (blocks, block)

    def encode(self, values: torch.Tensor) -> bytes:
        v = _flat_f32(values)
        blocks = self._blocks(v)
        # fp16 scale, rounded up so that |x| / scale never exceeds `levels`.
        scale = (blocks.abs().amax(dim=1) / self.levels).to(torch.float16)
        too_small = scale.float() * self.levels < blocks.abs().amax(dim=1)
        scale = torch.where(
            too_small, torch.nextafter(scale, torch.full_like(scale, FP16_MAX)), scale
        )
        _representable(scale, f"{self.name} (fp16 scales: |x| ≤ {FP16_MAX * self.levels:g})")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(scale, dtype=torch.float32))
        if self.bits == 2:
            # x / scale ∈ [−1.5, 1.5] → the nearest of −1.5, −0.5, 0.5, 1.5 → code 0..3.
            grid = torch.round(blocks / safe[:, None] + 1.5).clamp_(0, 3)
            packed = _pack_bits(grid.to(torch.int64).flatten()[: v.numel()].numpy(), 2)
        else:
            rounded = torch.round(blocks / safe[:, None]).clamp_(-self.levels, self.levels)
            codes = rounded.to(torch.int8).flatten()[: v.numel()].numpy()
            if self.bits == 4:
                nibbles = (codes.astype(np.int16) + 8).astype(np.uint8)
                if len(nibbles) % 2:
                    nibbles = np.append(nibbles, np.uint8(8))
                packed = (nibbles[0::2] | (nibbles[1::2] << 4)).astype(np.uint8).tobytes()
            else:
                packed = codes.tobytes()
        return (
            _header(self.codec_id, v.numel(), self.block)
            + scale.numpy().astype("<f2").tobytes()
            + packed
        )

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        _check_header(payload, self.codec_id, numel, self.block, self.encoded_size(numel))
        n_blocks = self._n_blocks(numel)
        scales = np.frombuffer(payload, dtype="<f2", offset=HEADER_BYTES, count=n_blocks)
        scales32 = torch.from_numpy(scales.astype(np.float32))
        _finite(scales32, f"{self.name} scales")
        if (scales32 < 0).any():
            raise CodecError(f"{self.name} payload has negative scales")
        offset = HEADER_BYTES + 2 * n_blocks
        if self.bits == 8:
            codes = np.frombuffer(payload, dtype=np.int8, offset=offset, count=numel)
            if (codes == -128).any():
                raise CodecError("int8 payload has code -128, outside the symmetric range")
            values = codes.astype(np.float32)
        elif self.bits == 2:
            packed = np.frombuffer(payload, dtype=np.uint8, offset=offset)
            values = _unpack_bits(packed, numel, 2).astype(np.float32) - np.float32(1.5)
        else:
            packed = np.frombuffer(payload, dtype=np.uint8, offset=offset)
            nibbles = np.empty(2 * len(packed), dtype=np.int16)
            nibbles[0::2] = packed & 0x0F
            nibbles[1::2] = packed >> 4
            codes4 = nibbles[:numel] - 8
            if (codes4 < -7).any():
                raise CodecError("int4 payload has code -8, outside the symmetric range")
            if numel % 2 and nibbles[numel] != 8:  # the encoder pads with code 0
                raise CodecError("payload has a non-zero padding nibble")
            values = codes4.astype(np.float32)
        padded = np.zeros(n_blocks * self.block, dtype=np.float32)
        padded[:numel] = values
        out = torch.from_numpy(padded).view(n_blocks, self.block) * scales32[:, None]
        return out.flatten()[:numel].contiguous()

    def error_bound(self, values: torch.Tensor) -> float:
        # Rounding to the grid costs ≤ half a step; the fp16 scale's own rounding (2^-11
        # relative, applied to ≤ `levels` steps) adds a little more.
        v = _flat_f32(values)
        if v.numel() == 0:
            return 0.0
        step = self._blocks(v).abs().amax(dim=1) / self.levels
        return float((step * (0.5 + self.levels * 2.0**-10)).max()) + 1e-7


def _top_k_indices(chunks: torch.Tensor, k: int) -> torch.Tensor:
    """chunks (C, L) → (C, k) int64: each row's k largest magnitudes, ascending.

    Ties are broken towards the lower index. `topk` alone breaks them as its kernel
    happens to (it differs between CPU architectures and builds), and ties are common in
    a mean of sparse contributions (zeros, repeated steps); two honest reducers must
    encode one mean to the same bytes, or the coordinator takes their disagreement for
    a lie."""
    magnitude = chunks.abs().nan_to_num_(nan=math.inf)  # NaN kept, as topk would
    kth = magnitude.topk(k, dim=1, sorted=False).values.amin(dim=1, keepdim=True)  # (C, 1)
    above = magnitude > kth
    ties = magnitude == kth
    room = k - above.sum(dim=1, keepdim=True)  # (C, 1): ties still to keep, ≥ 1
    keep = above | (ties & (ties.cumsum(dim=1) <= room))
    return keep.nonzero()[:, 1].view(-1, k)  # row-major: each row's indices ascending


def _pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Non-negative integers below 2**bits, `bits` bits each, least significant first,
    the last byte padded with zero bits."""
    shifts = np.arange(bits, dtype=np.int64)
    matrix = (values.astype(np.int64)[:, None] >> shifts) & 1  # (n, bits)
    return np.packbits(matrix.astype(np.uint8).reshape(-1), bitorder="little").tobytes()


def _unpack_bits(buffer: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The inverse of _pack_bits: `count` integers of `bits` bits from uint8 `buffer`;
    CodecError if a padding bit is set (every value has exactly one encoding)."""
    flat = np.unpackbits(buffer, bitorder="little")
    if flat[count * bits :].any():
        raise CodecError("payload has non-zero padding bits")
    matrix = flat[: count * bits].reshape(count, bits).astype(np.int64)
    return (matrix << np.arange(bits, dtype=np.int64)).sum(axis=1)


@dataclass(frozen=True)
class _ChunkedTopK:
    """What the top-k codecs share: in every chunk of `chunk` values the k of largest
    magnitude are kept (_top_k_indices), a last partial chunk keeping min(k, its length);
    the payload declares k after the header, and each chunk's indices must be strictly
    increasing and inside it."""

    chunk: int = 4096
    k: int = 64

    codec_id: ClassVar[int]
    lossy: ClassVar[bool] = True

    def __post_init__(self) -> None:
        if not 2 <= self.chunk <= 65536:
            raise ValueError(f"top-k chunk must be in [2, 65536], got {self.chunk}")
        if not 1 <= self.k <= self.chunk:
            raise ValueError(f"top-k k must be in [1, chunk], got {self.k}")

    def _layout(self, numel: int) -> tuple[int, int, int]:
        """(full chunks, length of the partial last chunk, entries it keeps)."""
        full, rest = divmod(numel, self.chunk)
        return full, rest, min(self.k, rest)

    def _counts(self, numel: int) -> tuple[int, int]:
        """(chunks, entries kept in all)."""
        full, rest, tail_k = self._layout(numel)
        return full + (1 if rest else 0), full * self.k + tail_k

    def _select(self, chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """chunks (C, L) → (per-chunk values, indices (C, k), per-entry codes (C, k))."""
        raise NotImplementedError

    def _selected(self, v: torch.Tensor) -> list[tuple[torch.Tensor, ...]]:
        """_select over the full chunks of v, then over its partial last one."""
        full, rest, tail_k = self._layout(v.numel())
        groups = [self._select(v[: full * self.chunk].view(full, self.chunk), self.k)]
        if rest:
            groups.append(self._select(v[full * self.chunk :].view(1, rest), tail_k))
        return groups

    def _check_k(self, payload: Payload, numel: int, size: int) -> None:
        """The header and the declared k: CodecError unless both are this codec's."""
        _check_header(payload, self.codec_id, numel, self.chunk, size)
        (k_declared,) = struct.unpack_from("<I", payload, HEADER_BYTES)
        if k_declared != self.k:
            raise CodecError(f"top-k payload keeps {k_declared} per chunk, expected {self.k}")

    def _positions(self, idx: np.ndarray, numel: int) -> tuple[np.ndarray, np.ndarray]:
        """idx (kept,) offsets within their chunks → (flat positions, chunk of each);
        CodecError unless every chunk's are strictly increasing and inside it."""
        full, rest, tail_k = self._layout(numel)
        body = idx[: full * self.k].reshape(full, self.k)
        tail = idx[full * self.k :]
        bad = (body >= self.chunk).any() or (np.diff(body, axis=1) <= 0).any()
        bad = bad or (tail >= rest).any() or (np.diff(tail) <= 0).any()
        if bad:
            raise CodecError("top-k payload has out-of-range or repeated indices")
        chunk_of = np.concatenate([np.repeat(np.arange(full), self.k), np.full(tail_k, full)])
        return chunk_of * self.chunk + idx, chunk_of

    def error_bound(self, values: torch.Tensor) -> float:
        # A dropped value is at most its chunk's largest magnitude, and a kept one keeps
        # its sign and at most that magnitude: no tighter general bound.
        v = _flat_f32(values)
        return float(v.abs().max()) if v.numel() else 0.0

    @property
    def density(self) -> float:
        return self.k / self.chunk


@dataclass(frozen=True)
class TopKCodec(_ChunkedTopK):
    """Chunked top-k (SparseLoCo-style), values quantised to int8 with one fp16 scale per
    chunk, indices as u16 offsets within their chunk (hence chunk ≤ 65536).

    Layout after the header: u32 k | fp16 scale per chunk | u16 indices (each chunk's
    strictly increasing) | int8 values.
    """

    name: ClassVar[str] = "topk"
    codec_id: ClassVar[int] = 5

    def encoded_size(self, numel: int) -> int:
        n_chunks, kept = self._counts(numel)
        return HEADER_BYTES + 4 + 2 * n_chunks + 3 * kept

    def _select(self, chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """chunks (C, L) → scales (C,) fp16, indices (C, k) sorted, codes (C, k) int8."""
        idx = _top_k_indices(chunks, k)
        kept = chunks.gather(1, idx)
        peak = kept.abs().amax(dim=1)
        scale = (peak / 127).to(torch.float16)
        # Round the fp16 scale up where rounding made it too small for the peak.
        short = scale.float() * 127 < peak
        scale = torch.where(short, torch.nextafter(scale, torch.full_like(scale, FP16_MAX)), scale)
        _representable(scale, f"topk (fp16 scales: |x| ≤ {FP16_MAX * 127:g})")
        safe = torch.where(scale > 0, scale.float(), torch.ones_like(peak))
        codes = torch.round(kept / safe[:, None]).clamp_(-127, 127).to(torch.int8)
        return scale, idx, codes

    def encode(self, values: torch.Tensor) -> bytes:
        v = _flat_f32(values)
        groups = self._selected(v)
        scales = torch.cat([g[0] for g in groups])
        idx = torch.cat([g[1].flatten() for g in groups])
        codes = torch.cat([g[2].flatten() for g in groups])
        return b"".join(
            (
                _header(self.codec_id, v.numel(), self.chunk),
                struct.pack("<I", self.k),
                scales.numpy().astype("<f2").tobytes(),
                idx.numpy().astype("<u2").tobytes(),
                codes.numpy().tobytes(),
            )
        )

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        self._check_k(payload, numel, self.encoded_size(numel))
        n_chunks, kept = self._counts(numel)
        offset = HEADER_BYTES + 4
        scales = np.frombuffer(payload, dtype="<f2", offset=offset, count=n_chunks)
        offset += 2 * n_chunks
        idx = np.frombuffer(payload, dtype="<u2", offset=offset, count=kept).astype(np.int64)
        offset += 2 * kept
        codes = np.frombuffer(payload, dtype=np.int8, offset=offset, count=kept)
        scales32 = scales.astype(np.float32)
        if not np.isfinite(scales32).all() or (scales32 < 0).any():
            raise CodecError("top-k payload has a bad scale")
        if (codes == -128).any():
            raise CodecError("top-k payload has code -128, outside the symmetric range")
        positions, chunk_of = self._positions(idx, numel)
        values = codes.astype(np.float32) * scales32[chunk_of]
        out = torch.zeros(numel, dtype=torch.float32)
        out[torch.from_numpy(positions)] = torch.from_numpy(values)
        return out


@dataclass(frozen=True)
class TopK2BitCodec(_ChunkedTopK):
    """Chunked top-k with 2-bit values (SparseLoCo's compression): each kept value is
    sent as its sign and one bit that picks its chunk's low or high magnitude. The two
    magnitudes are order statistics of the kept ones (the k/4-th and 3k/4-th smallest,
    split at the median): values of the input, no arithmetic, so every machine encodes
    the same bytes. Indices take ⌈log2 chunk⌉ bits each (12 for 4,096). Very lossy by
    itself: it relies on error feedback to carry what it rounds and drops into the next
    rounds.

    Layout after the header: u32 k | f32 low and f32 high per chunk | the indices, each
    chunk's strictly increasing, packed least significant bit first | one 2-bit code per
    index (bit 0: negative, bit 1: high), packed the same way; each bit field is padded
    with zero bits to a whole byte.
    """

    name: ClassVar[str] = "topk2"
    codec_id: ClassVar[int] = 8
    # A mean of topk2 messages is encoded as topk (mean_codec), whose fp16 scales of
    # 127 steps hold no larger magnitude: a level beyond it could not be averaged.
    MAX_LEVEL: ClassVar[float] = FP16_MAX * 127

    @property
    def index_bits(self) -> int:
        return max(1, (self.chunk - 1).bit_length())

    def encoded_size(self, numel: int) -> int:
        n_chunks, kept = self._counts(numel)
        return HEADER_BYTES + 4 + 8 * n_chunks + -(-kept * self.index_bits // 8) + -(-kept // 4)

    def _select(self, chunks: torch.Tensor, k: int) -> tuple[torch.Tensor, ...]:
        """chunks (C, L) → levels (C, 2) f32 [low, high], indices (C, k), codes (C, k)."""
        idx = _top_k_indices(chunks, k)
        kept = chunks.gather(1, idx)
        magnitude = kept.abs()
        ordered = magnitude.sort(dim=1).values  # (C, k): NaN last
        low, split, high = ordered[:, k // 4], ordered[:, k // 2], ordered[:, (3 * k) // 4]
        is_high = magnitude >= split[:, None]
        codes = (kept < 0).long() | (is_high.long() << 1)
        return torch.stack([low, high], dim=1), idx, codes

    def encode(self, values: torch.Tensor) -> bytes:
        # NaN would rank first and go out as a finite level: refused instead.
        v = _finite(_flat_f32(values), "topk2 input")
        groups = self._selected(v)
        levels = torch.cat([g[0] for g in groups])
        if levels.numel() and float(levels.max()) > self.MAX_LEVEL:
            raise CodecError(f"topk2: values too large to encode (|x| ≤ {self.MAX_LEVEL:g})")
        idx = torch.cat([g[1].flatten() for g in groups]).numpy()
        codes = torch.cat([g[2].flatten() for g in groups]).numpy()
        return b"".join(
            (
                _header(self.codec_id, v.numel(), self.chunk),
                struct.pack("<I", self.k),
                levels.numpy().astype("<f4").tobytes(),
                _pack_bits(idx, self.index_bits),
                _pack_bits(codes, 2),
            )
        )

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        self._check_k(payload, numel, self.encoded_size(numel))
        n_chunks, kept = self._counts(numel)
        offset = HEADER_BYTES + 4
        levels = np.frombuffer(payload, dtype="<f4", offset=offset, count=2 * n_chunks)
        levels = levels.astype(np.float32).reshape(n_chunks, 2)
        offset += 8 * n_chunks
        if not np.isfinite(levels).all() or (levels[:, 0] < 0).any():
            raise CodecError("top-k payload has a bad magnitude")
        if (levels[:, 1] > self.MAX_LEVEL).any():
            raise CodecError("top-k payload has a bad magnitude (beyond what a mean can hold)")
        if (levels[:, 0] > levels[:, 1]).any():
            raise CodecError("top-k payload has a low magnitude above its high one")
        index_bytes = -(-kept * self.index_bits // 8)
        raw = np.frombuffer(payload, dtype=np.uint8, offset=offset)
        idx = _unpack_bits(raw[:index_bytes], kept, self.index_bits)
        codes = _unpack_bits(raw[index_bytes:], kept, 2)
        positions, chunk_of = self._positions(idx, numel)
        magnitude = levels[chunk_of, codes >> 1]
        values = np.where(codes & 1, -magnitude, magnitude).astype(np.float32)
        out = torch.zeros(numel, dtype=torch.float32)
        out[torch.from_numpy(positions)] = torch.from_numpy(values)
        return out


class HivemindCodec:
    """hivemind's own compression (a serialised `runtime_pb2.Tensor`), for comparison:
    `fp16` (Float16Compression) and `uint8` (Uniform8BitQuantization: 256 buckets over
    ±3σ around the mean, each value replaced by its bucket's average).

    Wrapped in our header, and the protobuf checked (compression type, dtype, shape)
    before hivemind's extractor runs, so garbage is refused like every other codec's.
    """

    lossy = True

    def __init__(self, kind: str) -> None:
        from hivemind.compression import Float16Compression, Uniform8BitQuantization
        from hivemind.proto import runtime_pb2

        self._pb = runtime_pb2
        self._impl: Float16Compression | Uniform8BitQuantization
        if kind == "fp16":
            self.name, self.codec_id, self._impl = "hivemind-fp16", 6, Float16Compression()
        elif kind == "uint8":
            self.name, self.codec_id, self._impl = "hivemind-uint8", 7, Uniform8BitQuantization()
        else:
            raise ValueError(f"unknown hivemind codec {kind!r}")

    def encode(self, values: torch.Tensor) -> bytes:
        from hivemind.compression import CompressionInfo

        v = _flat_f32(values)
        message = self._impl.compress(v, CompressionInfo.from_tensor(v)).SerializeToString()
        return _header(self.codec_id, v.numel(), 0) + message

    def encoded_size(self, numel: int) -> int:
        # The protobuf's fields have sizes fixed by n alone (buffer length, shape), so an
        # encoding of n zeros has the size of every encoding of n values.
        return len(self.encode(torch.zeros(numel)))

    def decode(self, payload: Payload, numel: int) -> torch.Tensor:
        _check_header(payload, self.codec_id, numel, 0, len(payload))
        message = self._pb.Tensor()
        try:
            message.ParseFromString(payload[HEADER_BYTES:])
        except Exception:  # protobuf's DecodeError and friends
            raise CodecError(f"{self.name}: payload is not a hivemind tensor") from None
        if message.compression != self._impl.compression_type or message.dtype != "float32":
            raise CodecError(f"{self.name}: payload has another compression or dtype")
        if list(message.size) != [numel]:
            raise CodecError(f"{self.name}: payload holds shape {list(message.size)}")
        if self.name == "hivemind-uint8":
            buffer = message.buffer
            cb = int(np.frombuffer(buffer[:8], dtype="<i8")[0]) if len(buffer) >= 8 else -1
            if not 0 < cb <= 256 or len(buffer) != 8 + 4 * cb + numel:
                raise CodecError(f"{self.name}: codebook or buffer length is wrong")
            indices = np.frombuffer(buffer, dtype=np.uint8, offset=8 + 4 * cb)
            if numel and int(indices.max()) >= cb:
                raise CodecError(f"{self.name}: index outside the codebook")
        elif len(message.buffer) != 2 * numel:
            raise CodecError(f"{self.name}: buffer length is wrong")
        out = self._impl.extract(message)
        return _finite(out.detach().float().contiguous(), f"{self.name} payload")

    def error_bound(self, values: torch.Tensor) -> float:
        v = _flat_f32(values)
        if not v.numel():
            return 0.0
        if self.name == "hivemind-fp16":
            return float(v.abs().max()) * 2.0**-11 + 6e-8
        # A bucket's average can be as far as the bucket's spread; the outer buckets
        # collect everything beyond ±3σ, so only the whole range bounds them.
        return float(v.max() - v.min())


def make_codec(spec: str) -> Codec:
    """fp32, bf16, int8[:BLOCK], int4[:BLOCK], int2[:BLOCK], topk[:K/CHUNK], topk2[:K/CHUNK],
    hivemind-fp16, hivemind-uint8."""
    name, _, arg = spec.strip().lower().partition(":")
    try:
        if name == "fp32" and not arg:
            return Float32Codec()
        if name == "bf16" and not arg:
            return BFloat16Codec()
        if name in ("int8", "int4", "int2"):
            return BlockQuantCodec(bits=int(name[3:]), block=int(arg) if arg else 64)
        if name in ("topk", "topk2"):
            kind = TopKCodec if name == "topk" else TopK2BitCodec
            if arg:
                k, _, chunk = arg.partition("/")
                return kind(chunk=int(chunk or 4096), k=int(k))
            return kind()
        if name in ("hivemind-fp16", "hivemind-uint8") and not arg:
            return HivemindCodec(name.split("-")[1])
    except ValueError as err:
        raise ValueError(f"bad codec {spec!r}: {err}") from None
    raise ValueError(
        f"unknown codec {spec!r}: use fp32, bf16, int8[:BLOCK], int4[:BLOCK], int2[:BLOCK], "
        "topk[:K/CHUNK], topk2[:K/CHUNK], hivemind-fp16 or hivemind-uint8"
    )


def mean_codec(codec: Codec, contributors: int) -> Codec:
    """The codec a shard's mean of `contributors` contributions is encoded with, by its
    owner, and decoded with, by every receiver: the run's codec, except top-k. A mean of
    that many top-k messages has up to contributors × k non-zeros per chunk; keeping
    them all costs as many times the bytes but loses nothing of the support, where
    re-selecting k would drop most of every contributor's update (and the error feedback
    that could carry it lives with the contributors, not with the owner)."""
    if isinstance(codec, _ChunkedTopK):
        # 2-bit values too: their weighted sums take many values, kept at 8 bits.
        return TopKCodec(chunk=codec.chunk, k=min(codec.chunk, codec.k * max(1, contributors)))
    return codec


CODEC_NAMES = (
    "fp32",
    "bf16",
    "int8",
    "int4",
    "int2",
    "topk",
    "topk2",
    "hivemind-fp16",
    "hivemind-uint8",
)
# Codecs whose bytes for the same values can differ between machines. hivemind's
# Uniform8BitQuantization sums the tensor (its mean, its norm, each bucket's average) in
# an order that the CPU and the torch version pick (not the thread count: each machine
# gave the same bytes at one thread and at several). bench/bit_identity.py got other
# bytes for the same means on an Intel Xeon with torch 2.11 than on an AMD EPYC with
# torch 2.13 (the other six codecs matched bit for bit). The two reducers of a shard
# must encode its mean to the same bytes, or the coordinator takes the honest one for a
# liar, so runs that verify means refuse these (starling.runconfig).
HARDWARE_DEPENDENT = frozenset({"hivemind-uint8"})


class ErrorFeedback:
    """Carries what a lossy codec dropped into the next message:
    send encode(Δ + β·r); r ← (Δ + β·r) − decode(sent).

    β (`decay`) is 1 for plain error feedback. Below 1 the residual is an accumulator
    that forgets what it has not sent: with aggressive sparsity (topk2) SparseLoCo
    uses 0.95 and no outer momentum, the accumulator standing in for it."""

    def __init__(self, codec: Codec, decay: float = 1.0) -> None:
        if not 0 < decay <= 1:
            raise ValueError(f"error feedback decay must be in (0, 1], got {decay}")
        self.codec = codec
        self.decay = decay
        self.residual: torch.Tensor | None = None

    def encode(self, values: torch.Tensor) -> tuple[bytes, torch.Tensor]:
        """The payload and its decoded value (what every receiver will reconstruct)."""
        payloads, decoded = self.encode_slices(values, [(0, values.numel())])
        return payloads[0], decoded

    def encode_slices(
        self, values: torch.Tensor, ranges: Sequence[tuple[int, int]]
    ) -> tuple[list[bytes], torch.Tensor]:
        """One payload per [start, end) range of the flat values (one per shard of the
        exchange), with one residual carried over the whole vector, and the decoded
        vector as the receivers will see it. The ranges must tile the vector in order
        (a gap would leave the residual undefined there)."""
        v = _flat_f32(values)
        ends = [end for _, end in ranges]
        tiled = [start for start, _ in ranges] == [0, *ends[:-1]] and ends[-1:] == [v.numel()]
        if not tiled or any(start > end for start, end in ranges):
            raise ValueError(f"ranges {list(ranges)} do not tile {v.numel()} values in order")
        # β = 1 changes no bit: a product with 1.0 is exact.
        target = v if self.residual is None else v + self.residual * self.decay
        if not self.codec.lossy:
            return [self.codec.encode(target[a:b]) for a, b in ranges], target
        decoded = torch.empty_like(target)
        payloads = []
        for start, end in ranges:
            payload = self.codec.encode(target[start:end])
            decoded[start:end] = self.codec.decode(payload, end - start)
            payloads.append(payload)
        self.residual = target - decoded
        return payloads, decoded
