from __future__ import annotations

import re
import struct

import numpy as np
import pytest
import torch

from starling.codecs import (
    CODEC_NAMES,
    HEADER_BYTES,
    CodecError,
    ErrorFeedback,
    make_codec,
)

SIZES = [1, 5, 4097, 10_001]
SPECS = [
    *CODEC_NAMES,
    *("int8:128", "int4:32", "int2:16", "topk:8/16", "topk:32/1024", "topk2:8/16", "topk2:32/1024"),
]


def sample(n: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    # Heavy-tailed like real pseudo-gradients: mostly small, a few large values.
    return torch.randn(n, generator=gen) * torch.rand(n, generator=gen) ** 4


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("n", SIZES)
def test_round_trip_within_bound_and_exact_size(spec: str, n: int) -> None:
    codec = make_codec(spec)
    x = sample(n)
    payload = codec.encode(x)
    assert len(payload) == codec.encoded_size(n)
    y = codec.decode(payload, n)
    assert y.shape == (n,) and y.dtype == torch.float32
    assert float((x - y).abs().max()) <= codec.error_bound(x)
    if not codec.lossy:
        assert torch.equal(x, y)


@pytest.mark.parametrize(
    "spec, bytes_per_param",
    [
        ("fp32", 4.0),
        ("bf16", 2.0),
        ("int8", 1.03125),
        ("int4", 0.53125),
        ("int2", 0.28125),
        ("topk", 64 * 3 / 4096 + 2 / 4096),
        # 12-bit indices, 2-bit values, two f32 magnitudes a chunk: 0.0293 B.
        ("topk2", 64 * (12 + 2) / 8 / 4096 + 8 / 4096),
    ],
)
def test_stated_bytes_per_parameter(spec: str, bytes_per_param: float) -> None:
    n = 4096 * 64
    size = make_codec(spec).encoded_size(n)
    k_field = 4 if spec.startswith("topk") else 0
    assert size == pytest.approx(n * bytes_per_param + HEADER_BYTES + k_field)


@pytest.mark.parametrize(
    "spec", ["bf16", "int8", "int4", "int2", "topk", "topk2", "hivemind-fp16", "hivemind-uint8"]
)
def test_error_feedback_loses_nothing_in_the_sum(spec: str) -> None:
    """Σ decoded messages + final residual = Σ inputs."""
    feedback = ErrorFeedback(make_codec(spec))
    inputs, decoded = [], []
    for round_ in range(6):
        x = sample(3000, seed=round_)
        inputs.append(x)
        decoded.append(feedback.encode(x)[1])
    assert feedback.residual is not None
    total_in = torch.stack(inputs).double().sum(0)
    total_out = torch.stack(decoded).double().sum(0) + feedback.residual.double()
    torch.testing.assert_close(total_out, total_in, rtol=0, atol=1e-5)


def test_error_feedback_slices_must_tile_the_vector() -> None:
    # One payload per shard, one residual over the whole vector: a gap or an overlap
    # would leave part of the residual undefined, so such ranges are refused.
    feedback = ErrorFeedback(make_codec("int4"))
    x = sample(300, seed=0)
    payloads, decoded = feedback.encode_slices(x, [(0, 100), (100, 100), (100, 300)])
    assert len(payloads) == 3 and feedback.residual is not None
    torch.testing.assert_close(decoded + feedback.residual, x)
    for bad in ([(0, 100), (150, 300)], [(0, 200), (100, 300)], [(0, 100)], [(100, 300)]):
        with pytest.raises(ValueError, match="do not tile"):
            feedback.encode_slices(x, bad)
    with pytest.raises(ValueError, match="do not tile"):
        feedback.encode_slices(x, [(0, 200), (200, 100), (100, 300)])


def test_decayed_error_feedback_forgets_what_it_did_not_send() -> None:
    """With decay β each round sends encode(x + β·r): what was sent plus what is left
    equals the input plus β times what was left before."""
    feedback = ErrorFeedback(make_codec("topk2:8/64"), decay=0.5)
    residual = torch.zeros(3000)
    for round_ in range(5):
        x = sample(3000, seed=round_)
        sent = feedback.encode(x)[1]
        assert feedback.residual is not None
        torch.testing.assert_close(sent + feedback.residual, x + 0.5 * residual)
        residual = feedback.residual
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            ErrorFeedback(make_codec("topk2"), decay=bad)


def test_top_k_with_feedback_eventually_sends_every_coordinate() -> None:
    codec = make_codec("topk:4/64")
    feedback = ErrorFeedback(codec)
    x = torch.linspace(0.1, 1.0, 64)
    seen = torch.zeros(64, dtype=torch.bool)
    for _ in range(400):  # the smallest needs ~10x the rounds of the largest
        seen |= feedback.encode(x)[1] != 0
    assert seen.all()  # small coordinates accumulate until they are large enough to go


@pytest.mark.parametrize("spec", ["topk", "topk:8/16", "topk:32/1024"])
def test_top_k_keeps_the_largest_magnitudes_and_breaks_ties_towards_the_lower_index(
    spec: str,
) -> None:
    """A mean of sparse contributions is full of ties (zeros, equal steps), and the
    owner and verifier must encode it to the same bytes on any hardware: the kept
    indices are defined, not whatever order the topk kernel happens to leave."""
    codec = make_codec(spec)
    gen = torch.Generator().manual_seed(3)
    for n in (1, 15, 16, 4097, 10_001):
        x = torch.randint(-2, 3, (n,), generator=gen).float() * 0.25  # 5 levels: ties
        x[torch.rand(n, generator=gen) < 0.5] = 0.0
        payload = codec.encode(x)
        expected = []
        for start in range(0, n, codec.chunk):
            chunk = x[start : start + codec.chunk].abs().numpy()
            k = min(codec.k, len(chunk))
            by_magnitude_then_index = np.lexsort((np.arange(len(chunk)), -chunk))[:k]
            expected.append(np.sort(by_magnitude_then_index))
        indices = np.concatenate(expected)
        kept = len(indices)
        at = len(payload) - 3 * kept  # u16 indices, then int8 codes, at the end
        got = np.frombuffer(payload, dtype="<u2", offset=at, count=kept)
        np.testing.assert_array_equal(got, indices)
        decoded = codec.decode(payload, n)
        assert torch.count_nonzero(decoded) <= kept


@pytest.mark.parametrize("spec", ["topk2", "topk2:8/16", "topk2:32/1024"])
def test_two_bit_top_k_keeps_signs_and_sends_two_magnitudes_of_the_kept_ones(spec: str) -> None:
    """Each kept value decodes to its sign times its chunk's low or high magnitude, both
    magnitudes of kept values (order statistics: no arithmetic, so any machine encodes
    the same bytes); the larger half of the kept take the high one. The kept are those
    top-k keeps, ties towards the lower index."""
    codec = make_codec(spec)
    gen = torch.Generator().manual_seed(4)
    for n in (1, 15, 16, 4097, 10_001):
        x = sample(n, seed=n)
        x[torch.rand(n, generator=gen) < 0.2] = 0.25  # ties
        decoded = codec.decode(codec.encode(x), n)
        kept = torch.zeros(n, dtype=torch.bool)
        for start in range(0, n, codec.chunk):
            chunk = x[start : start + codec.chunk].abs().numpy()
            order = np.lexsort((np.arange(len(chunk)), -chunk))[: codec.k]
            kept[start + torch.from_numpy(order)] = True
        assert torch.equal(decoded != 0, kept)  # x has no zeros: every kept one decodes ≠ 0
        for start in range(0, n, codec.chunk):
            got = decoded[start : start + codec.chunk]
            was = x[start : start + codec.chunk]
            here = got != 0
            if not here.any():
                continue
            assert torch.equal(got[here].sign(), was[here].sign())
            magnitudes = got[here].abs().unique()
            assert len(magnitudes) <= 2 and set(magnitudes.tolist()) <= set(was.abs().tolist())
            if len(magnitudes) == 2:
                high = got[here].abs() == magnitudes.max()
                assert was[here].abs()[high].min() >= was[here].abs()[~high].max()


@pytest.mark.parametrize("spec", SPECS)
def test_encoding_does_not_depend_on_the_thread_count(spec: str) -> None:
    """The verifier's hash check assumes an encoding is a function of the values alone."""
    codec = make_codec(spec)
    x = sample(300_001, seed=5)
    x[7::7] = x[: len(x[7::7])]  # ties
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = codec.encode(x)
        torch.set_num_threads(max(2, threads))
        assert codec.encode(x) == single
    finally:
        torch.set_num_threads(threads)


def tamper(payload: bytes, kind: str) -> bytes:
    data = bytearray(payload)
    if kind == "truncated":
        return bytes(data[:-1])
    if kind == "extended":
        return bytes(data) + b"\x00"
    if kind == "magic":
        data[0] ^= 0xFF
    elif kind == "codec_id":
        data[3] = (data[3] % 7) + 1 if data[3] != 7 else 1
    elif kind == "numel":
        struct.pack_into("<Q", data, 4, 1 << 62)
    elif kind == "empty":
        return b""
    return bytes(data)


@pytest.mark.parametrize("spec", CODEC_NAMES)
@pytest.mark.parametrize("kind", ["truncated", "extended", "magic", "codec_id", "numel", "empty"])
def test_malformed_payloads_are_refused(spec: str, kind: str) -> None:
    codec = make_codec(spec)
    payload = codec.encode(sample(1000))
    with pytest.raises(CodecError):
        codec.decode(tamper(payload, kind), 1000)


@pytest.mark.parametrize("spec", CODEC_NAMES)
def test_random_bytes_never_crash(spec: str) -> None:
    codec = make_codec(spec)
    gen = torch.Generator().manual_seed(1)
    for trial in range(200):
        n = 100
        size = (
            codec.encoded_size(n) if trial % 2 else int(torch.randint(0, 600, (1,), generator=gen))
        )
        junk = bytes(torch.randint(0, 256, (size,), generator=gen, dtype=torch.uint8).tolist())
        if trial % 4 == 1:  # a valid header over random content: the body's checks must hold
            junk = codec.encode(torch.zeros(n))[:HEADER_BYTES] + junk[HEADER_BYTES:]
        try:
            out = codec.decode(junk, n)
        except CodecError:
            continue
        assert out.shape == (n,) and torch.isfinite(out).all()


def test_non_finite_values_in_a_payload_are_refused() -> None:
    codec = make_codec("fp32")
    payload = bytearray(codec.encode(torch.ones(4)))
    struct.pack_into("<f", payload, HEADER_BYTES + 4, float("nan"))
    with pytest.raises(CodecError, match="NaN"):
        codec.decode(bytes(payload), 4)


def test_top_k_repeated_or_out_of_range_indices_are_refused() -> None:
    codec = make_codec("topk:4/16")
    payload = bytearray(codec.encode(sample(32)))
    index_offset = HEADER_BYTES + 4 + 2 * 2  # header, k, two fp16 scales
    repeated = bytearray(payload)
    repeated[index_offset + 2 : index_offset + 4] = repeated[index_offset : index_offset + 2]
    out_of_range = bytearray(payload)
    struct.pack_into("<H", out_of_range, index_offset + 6, 16)
    for bad in (repeated, out_of_range):
        with pytest.raises(CodecError, match="indices"):
            codec.decode(bytes(bad), 32)


def test_two_bit_top_k_bad_indices_magnitudes_and_padding_are_refused() -> None:
    codec = make_codec("topk2:4/16")  # 4-bit indices: two a byte
    x = sample(32, seed=2)
    payload = bytearray(codec.encode(x))
    levels = HEADER_BYTES + 4  # header, k
    indices = levels + 2 * 8  # two chunks of (f32 low, f32 high)
    repeated = bytearray(payload)
    repeated[indices] = (repeated[indices] & 0x0F) | ((repeated[indices] & 0x0F) << 4)
    swapped = bytearray(payload)
    low, high = struct.unpack_from("<ff", swapped, levels)
    struct.pack_into("<ff", swapped, levels, high + 1.0, high)
    nan = bytearray(payload)
    struct.pack_into("<f", nan, levels + 4, float("nan"))
    padded = codec.encode(sample(18, seed=2))  # 4 + 2 kept: 12 bits of codes, 4 of padding
    padding = bytearray(padded)
    padding[-1] |= 0x80
    cases = [(repeated, 32, "indices"), (swapped, 32, "low magnitude above")]
    cases += [(nan, 32, "bad magnitude"), (padding, 18, "padding")]
    for bad, n, match in cases:
        with pytest.raises(CodecError, match=match):
            codec.decode(bytes(bad), n)
    assert codec.decode(padded, 18).shape == (18,)


@pytest.mark.parametrize(
    "spec", ["int3", "topk:0/16", "topk:a/b", "topk2:17/16", "int8:7", "zstd", "fp32:2"]
)
def test_bad_codec_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError, match="codec"):
        make_codec(spec)


def test_int2_sends_the_nearest_of_four_levels_and_no_zero() -> None:
    """int2's grid is ±0.5 and ±1.5 scales, the scale a block's absmax / 1.5: a block
    whose absmax is 3 has levels ±1 and ±3, and every value goes to the nearest."""
    codec = make_codec("int2:8")
    x = torch.tensor([3.0, -3.0, 0.9, -1.1, 2.1, -1.9, 0.0, 0.2])
    y = codec.decode(codec.encode(x), 8)
    assert y.tolist() == [3.0, -3.0, 1.0, -1.0, 3.0, -1.0, 1.0, 1.0]  # 0 is a tie: to even
    assert len(codec.encode(torch.zeros(8))) == HEADER_BYTES + 2 + 2
    assert torch.equal(codec.decode(codec.encode(torch.zeros(8)), 8), torch.zeros(8))


def test_int2_padding_bits_must_be_zero() -> None:
    codec = make_codec("int2:8")
    payload = bytearray(codec.encode(torch.linspace(-1, 1, 5)))  # 10 code bits, 6 padding
    payload[-1] |= 0x80
    with pytest.raises(CodecError, match="padding"):
        codec.decode(bytes(payload), 5)


@pytest.mark.parametrize("spec", CODEC_NAMES)
def test_nan_input_never_comes_back_as_a_finite_tensor(spec: str) -> None:
    """A NaN in a pseudo-gradient (a diverged replica) is refused: by Starling's lossy
    encoders themselves, and for fp32 (which sends what it is given) and hivemind's
    codecs by every decoder; never encoded into finite values."""
    x = sample(1000)
    x[17] = float("nan")
    codec = make_codec(spec)
    if spec == "fp32" or spec.startswith("hivemind"):
        payload = codec.encode(x)
        with pytest.raises(CodecError, match="NaN"):
            codec.decode(payload, 1000)
    else:
        with pytest.raises(CodecError, match="NaN"):
            codec.encode(x)


@pytest.mark.parametrize(
    "spec, limit", [("int2", 65504 * 1.5), ("int4", 65504 * 7), ("int8", 65504 * 127)]
)
def test_values_beyond_the_fp16_scales_are_refused_when_encoding(spec: str, limit: float) -> None:
    """A block's scale is fp16: a larger absmax would overflow it to Inf and make a
    payload every decoder refuses, so the encoder refuses it first, saying the range."""
    codec = make_codec(spec)
    x = torch.zeros(100)
    x[3] = limit * 0.99
    assert torch.isfinite(codec.decode(codec.encode(x), 100)).all()
    x[3] = limit * 1.01
    with pytest.raises(CodecError, match=re.escape(f"|x| ≤ {limit:g})")):
        codec.encode(x)
    for other, big in (("topk", 65504 * 127 * 1.01), ("bf16", 3.4e38)):
        x[3] = big
        with pytest.raises(CodecError, match="too large"):
            make_codec(other).encode(x)
    # topk2's levels are quantiles of the kept magnitudes (an outlier is clipped to the
    # high one): only a chunk of large values makes a level too large.
    with pytest.raises(CodecError, match="too large"):
        make_codec("topk2").encode(torch.full((100,), 65504 * 127 * 1.01))


def test_a_topk2_level_its_mean_could_not_hold_is_refused() -> None:
    """A mean of topk2 messages is encoded as topk, with fp16 scales: a contribution
    whose level is beyond them would make its owner's mean unencodable, so the decoder
    refuses it (an offence of its sender) rather than the owner failing at the commit."""
    codec = make_codec("topk2:4/16")
    payload = bytearray(codec.encode(sample(16, seed=3)))
    struct.pack_into("<ff", payload, HEADER_BYTES + 4, 1.0, 65504 * 127 * 2)
    with pytest.raises(CodecError, match="beyond what a mean can hold"):
        codec.decode(bytes(payload), 16)


def test_int4_padding_nibble_must_be_code_zero() -> None:
    codec = make_codec("int4:8")
    payload = bytearray(codec.encode(torch.tensor([1.0, -0.5, 0.25])))  # 3 codes, 1 padding
    assert codec.decode(bytes(payload), 3).tolist() == pytest.approx([1.0, -0.5, 0.25], abs=0.08)
    payload[-1] = (payload[-1] & 0x0F) | 0x30
    with pytest.raises(CodecError, match="padding"):
        codec.decode(bytes(payload), 3)


def test_error_bounds_of_nothing_are_zero() -> None:
    for spec in CODEC_NAMES:
        assert make_codec(spec).error_bound(torch.zeros(0)) == 0.0
