"""Screening of a shard's contributions before any of them touches the mean.

A shard owner holds the decoded contributions of one round (each finite, of the right
length: the codec checked that). What is left to catch is a well-formed but poisoned
update: a copy of another node's, one scaled up, one pointing the wrong way (sign
flipped), or noise. The screen uses only the round's own robust statistics:

- copies: a payload identical to one that arrived earlier (same BLAKE3 hash);
- norm: more than NORM_RATIO × the median norm of the round's contributions;
- direction: the cosine between a contribution and the sum of the others' unit vectors
  (each other contribution counts once, whatever its norm, so no single update can
  steer the reference). The lowest is excluded when it is below COSINE_RATIO × the
  median cosine the others show among themselves (with three contributions, one
  flipped update would pull the honest ones' cosines to 0 and hide itself if it
  counted), and the statistics are taken again.

The bar follows the round: honest pseudo-gradients agree less as training goes on
(median cosine 0.77 in the first rounds of the tiny preset with 8 workers, 0.4 after
600 steps) but stay close to each other (the lowest at ≥ 0.8 × the median in every
round measured), while noise sits at 0 and a flipped update below it. A round whose
honest median is within noise of 0 has no common direction to judge by, and the
check is skipped.

A contribution trained on far fewer tokens than the round's median is not judged by
direction (LIGHT_TOKEN_SHARE): it is noisy, and light in the mean.

Runs do not judge direction per shard (late in a run honest pseudo-gradients share
little direction per shard, and the check cut honest ones): the coordinator judges each
contributor's whole update (direction_outliers) from the Gram matrices owners report
(gram), and owners screen with direction=False. The per-shard check stays for the
exchange harness and its tests.

One round can say too little late in a run, when honest updates barely agree: the
coordinator also keeps each node's whole-update cosine in the commit and cuts a node
whose cosines over the last rounds point against the others on average
(persistent_direction_outliers). A round with too few contributions to judge at all
leans on that history alone (history_direction_outliers).

The norm needs at least MIN_FOR_STATISTICS contributions (with two, nobody can tell
which one is wrong), the direction MIN_FOR_DIRECTION. Honest pseudo-gradients of one
round agree in direction (they descend the same loss from the same θ); see
bench/chaos.py for the measured cosines and rates.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from statistics import median

import numpy as np
import torch

NORM_RATIO = 10.0
MIN_FOR_STATISTICS = 3
# The direction check wants one more: with three, "the others' median" is the cosine of
# a single pair, and an honest contribution has been measured at 0.064 against 0.817.
MIN_FOR_DIRECTION = 4
# A tenth, not more: with three or four contributions the others' median rests on one or
# a few pairwise cosines, and honest ones measured at 0.17 against a median of 0.68 on
# the end-to-end test's tiny model; flipped updates sit below 0 and noise at 0.
COSINE_RATIO = 0.1
# Random noise of n values has cosine ~ N(0, 1/√n) with any fixed direction: a cosine
# below NOISE_SIGMAS/√n tells nothing.
NOISE_SIGMAS = 6.0
# A contribution trained on less than this share of the round's median tokens is not
# judged by direction: a pseudo-gradient of a few inner steps is mostly noise (an
# honest node at ~1/6 of the others' tokens measured cosine −0.2 against their 0.4),
# and its weight in the token-weighted mean, hence the harm it can do, is as small.
# It still counts in the others' reference, and its norm is still checked.
LIGHT_TOKEN_SHARE = 0.5
BLOCK = 1 << 16  # values per block: statistics in float64 without a full-size copy
# The whole-update direction check (the coordinator's: direction_outliers). A contribution
# is cut when its leave-one-out cosine is below −max(WHOLE_COSINE_SHARE × the others'
# median, WHOLE_COSINE_FLOOR). Measured over 80 rounds of 8 nodes (micro model, H = 10,
# one sign-flipping node): honest cosines fall from a median of 0.78 (rounds 0–9) to
# 0.08 (60–79) with the lowest at −0.052; flipped ones stay at ≤ −0.29, and early on
# reach −0.57 against an honest median of 0.78.
WHOLE_COSINE_SHARE = 0.5
WHOLE_COSINE_FLOOR = 0.1
# Evidence across rounds (persistent_direction_outliers). Late in a run one round tells
# too little: honest whole-update cosines fall to ~0.05-0.15, a flipped update sits at
# −0.02 to −0.15 (above the floor), and with two flippers the second, counted among "the
# others", can pull their median under noise so that the check stands down. Over rounds
# the picture is plain. Measured on 170 rounds of 8 nodes (micro model, 2 sign-flipping,
# data leases that move on): the mean of a node's cosines over the last 12 rounds was
# ≥ −0.05 for every honest node (≥ 0.04 in the run without faults) and ≤ −0.12 for
# every flipper. A node is cut when that mean is below −WHOLE_COSINE_FLOOR, over at
# least DIRECTION_WINDOW_MIN judged rounds, and it points against the others this round.
DIRECTION_WINDOW = 12  # rounds: this one and the 11 before
DIRECTION_WINDOW_MIN = 6  # rounds of the window the node was judged in


def screen(
    values: Mapping[str, torch.Tensor],
    hashes: Mapping[str, bytes] | None = None,
    direction: bool = True,
    tokens: Mapping[str, int] | None = None,
) -> dict[str, str]:
    """Node id → why it is excluded, for the contributions in `values` (node id →
    fp32 tensor of shape (numel,), in arrival order; `hashes`: node id → payload hash,
    for the copy check; `direction`: False skips the direction check; `tokens`: node
    id → its weight, so that light contributions are not judged by direction)."""
    excluded: dict[str, str] = {}
    if hashes is not None:
        first: dict[bytes, str] = {}
        for node_id in values:
            digest = hashes[node_id]
            if digest in first:
                excluded[node_id] = f"a copy of {first[digest]}'s contribution"
            else:
                first[digest] = node_id
    kept = [n for n in values if n not in excluded]
    if len(kept) < MIN_FOR_STATISTICS:
        return excluded
    norms = {n: _norm(values[n]) for n in kept}
    typical_norm = median([norms[n] for n in kept])
    if typical_norm == 0.0:
        return excluded
    for node_id in kept:
        ratio = norms[node_id] / typical_norm
        if ratio > NORM_RATIO:
            excluded[node_id] = f"norm {ratio:.1f}x the round's median (limit {NORM_RATIO:g}x)"
    kept = [n for n in kept if n not in excluded and norms[n] > 0.0]
    if not direction:
        return excluded
    numel = next(iter(values.values())).numel()
    noise = NOISE_SIGMAS / math.sqrt(max(numel, 1))
    judged = set(kept)
    if tokens is not None:
        typical_tokens = median([tokens[n] for n in kept])
        judged = {n for n in kept if tokens[n] >= LIGHT_TOKEN_SHARE * typical_tokens}
    while len(kept) >= MIN_FOR_DIRECTION and judged & set(kept):
        cosines = leave_one_out_cosines({n: values[n] for n in kept}, norms)
        worst = min((n for n in kept if n in judged), key=lambda n: cosines[n])
        rest = [n for n in kept if n != worst]
        typical = median(list(leave_one_out_cosines({n: values[n] for n in rest}, norms).values()))
        if typical <= noise:
            break  # no common direction: nothing to measure against
        if cosines[worst] >= COSINE_RATIO * typical:
            break
        excluded[worst] = (
            f"direction disagrees with the others' (cosine {cosines[worst]:.3f}; "
            f"the others' median {typical:.3f})"
        )
        kept.remove(worst)
    return excluded


def leave_one_out_cosines(
    values: Mapping[str, torch.Tensor], norms: Mapping[str, float]
) -> dict[str, float]:
    """For each contribution i: cos(v_i, Σ_{j≠i} v_j/|v_j|). With S = Σ_j u_j:
    v_i·(S − u_i) = |v_i|(u_i·S − 1) and |S − u_i|² = |S|² − 2 u_i·S + 1."""
    ids = list(values)
    numel = values[ids[0]].numel()
    total = torch.zeros(numel, dtype=torch.float64)
    for n in ids:
        total.add_(values[n].to(torch.float64), alpha=1.0 / norms[n])
    total_sq = float(total.dot(total))
    cosines = {}
    for n in ids:
        along = _dot(values[n], total) / norms[n]  # u_i·S
        rest = math.sqrt(max(total_sq - 2.0 * along + 1.0, 0.0))
        cosines[n] = (along - 1.0) / rest if rest > 0.0 else 1.0
    return cosines


def _norm(v: torch.Tensor) -> float:
    return math.sqrt(sum(float(b.double().square().sum()) for b in v.split(BLOCK)))


def _dot(v: torch.Tensor, total: torch.Tensor) -> float:
    return sum(
        float(b.double().dot(t)) for b, t in zip(v.split(BLOCK), total.split(BLOCK), strict=True)
    )


def gram(values: Sequence[torch.Tensor]) -> list[float]:
    """The Gram matrix of `values` (each fp32, shape (numel,)): every dot product in
    float64, row-major, n × n. What an owner reports of a shard so that the coordinator
    can judge direction over the whole update (dot products add up over shards)."""
    n = len(values)
    out = np.zeros((n, n))
    if n == 0:
        return []
    # Block by block: n slices of BLOCK values in float64 at a time (not one float64 copy
    # per pair, nor of every whole contribution), one matrix product each.
    for start in range(0, values[0].numel(), BLOCK):
        block = torch.stack([v[start : start + BLOCK] for v in values]).double()  # (n, BLOCK)
        out += (block @ block.T).numpy()
    return [float(x) for x in out.reshape(-1)]


def direction_outliers(
    ids: Sequence[str], gram_matrix: np.ndarray, tokens: Mapping[str, int], numel: int
) -> dict[str, str]:
    """Node id → why, for the contributions whose whole update points against the
    others': `gram_matrix` (n × n, float64) holds the dot products of the whole
    pseudo-gradients of `ids` (the sum of the owners' per-shard Gram matrices). The
    lowest leave-one-out cosine (cos(v_i, Σ_{j≠i} v_j/|v_j|)) is cut while it is below
    −max(WHOLE_COSINE_SHARE × the others' median, WHOLE_COSINE_FLOOR), at least
    MIN_FOR_DIRECTION remain, and the others share a direction (median above noise).
    Light contributions (LIGHT_TOKEN_SHARE) are not judged."""
    norms, alive, judged = _judged(ids, gram_matrix, tokens)
    noise = NOISE_SIGMAS / math.sqrt(max(numel, 1))
    excluded: dict[str, str] = {}
    while len(alive) >= MIN_FOR_DIRECTION and judged & set(alive):
        cosines = _gram_cosines(gram_matrix, norms, alive)
        worst = min((i for i in alive if i in judged), key=lambda i: cosines[i])
        rest = [i for i in alive if i != worst]
        typical = median(list(_gram_cosines(gram_matrix, norms, rest).values()))
        if typical <= noise:
            break  # no common direction: nothing to measure against
        bar = -max(WHOLE_COSINE_SHARE * typical, WHOLE_COSINE_FLOOR)
        if cosines[worst] >= bar:
            break
        excluded[ids[worst]] = (
            f"direction disagrees with the others' over the whole update (cosine "
            f"{cosines[worst]:.3f}; the others' median {typical:.3f}, limit {bar:.3f})"
        )
        alive = rest
    return excluded


def whole_update_cosines(
    ids: Sequence[str], gram_matrix: np.ndarray, tokens: Mapping[str, int]
) -> dict[str, float]:
    """Node id → the leave-one-out cosine of its whole update against all the others',
    for the contributions direction_outliers judges (not light, not zero); empty with
    fewer than MIN_FOR_DIRECTION. What a commit records for the evidence across rounds."""
    norms, alive, judged = _judged(ids, gram_matrix, tokens)
    if len(alive) < MIN_FOR_DIRECTION:
        return {}
    cosines = _gram_cosines(gram_matrix, norms, alive)
    return {ids[i]: cosines[i] for i in alive if i in judged}


def persistent_direction_outliers(
    cosines: Mapping[str, float], history: Sequence[Mapping[str, float]]
) -> dict[str, str]:
    """Node id → why, for the nodes of this round's `cosines` (whole_update_cosines) that
    point against the others now (cosine < 0) and did over the last rounds too: their
    mean cosine over this round and the DIRECTION_WINDOW − 1 before (`history`, one
    mapping per round, oldest first; a node absent from a round was not judged there) is
    below −WHOLE_COSINE_FLOOR, over at least DIRECTION_WINDOW_MIN judged rounds."""
    excluded = {}
    for node_id, cosine in cosines.items():
        seen = _recent_cosines(node_id, history) + [cosine]
        mean = _mean_against(seen)
        if cosine < 0.0 and mean is not None:
            excluded[node_id] = (
                f"direction disagrees with the others' round after round (cosine "
                f"{cosine:.3f}; mean {mean:.3f} over its last {len(seen)} rounds, limit "
                f"{-WHOLE_COSINE_FLOOR:.3f})"
            )
    return excluded


def history_direction_outliers(
    ids: Sequence[str], history: Sequence[Mapping[str, float]]
) -> dict[str, str]:
    """Node id → why, for the contributors `ids` of a round too small to judge by
    direction (fewer than MIN_FOR_DIRECTION: whole_update_cosines is empty) whose mean
    cosine over the DIRECTION_WINDOW − 1 rounds before (`history`, as for
    persistent_direction_outliers) is below −WHOLE_COSINE_FLOOR, over at least
    DIRECTION_WINDOW_MIN judged rounds. In such a round the majority sets the direction:
    two flippers left with one honest node point the same way (both −g) and would carry
    every round (measured: 2 of 8 sign-flipping, the last rounds of a 170-round run with 3
    contributors took the loss from 1.30 to 2.12 in two rounds). Their history shows them
    (mean −0.12 to −0.16 over 12 rounds; every honest node's ≥ −0.05)."""
    excluded = {}
    for node_id in ids:
        seen = _recent_cosines(node_id, history)
        mean = _mean_against(seen)
        if mean is not None:
            excluded[node_id] = (
                f"direction disagreed with the others' round after round (mean {mean:.3f} "
                f"over its last {len(seen)} judged rounds, limit {-WHOLE_COSINE_FLOOR:.3f}); "
                f"this round has too few contributions to judge"
            )
    return excluded


def _mean_against(seen: Sequence[float]) -> float | None:
    """The mean of a node's cosines over the window when they are enough to judge by
    (DIRECTION_WINDOW_MIN) and point against the others' (below −WHOLE_COSINE_FLOOR)."""
    if len(seen) < DIRECTION_WINDOW_MIN:
        return None
    mean = sum(seen) / len(seen)
    return mean if mean < -WHOLE_COSINE_FLOOR else None


def _recent_cosines(node_id: str, history: Sequence[Mapping[str, float]]) -> list[float]:
    """The node's whole-update cosines over the last DIRECTION_WINDOW − 1 rounds of
    `history` (oldest first), those it was judged in."""
    recent = list(history)[-(DIRECTION_WINDOW - 1) :] if DIRECTION_WINDOW > 1 else []
    return [round_[node_id] for round_ in recent if node_id in round_]


def _judged(
    ids: Sequence[str], gram_matrix: np.ndarray, tokens: Mapping[str, int]
) -> tuple[np.ndarray, list[int], set[int]]:
    """(norms, the indices of non-zero contributions, those of them heavy enough to be
    judged by direction: LIGHT_TOKEN_SHARE of the median tokens or more)."""
    norms = np.sqrt(np.maximum(np.diag(gram_matrix), 0.0))
    alive = [i for i in range(len(ids)) if norms[i] > 0.0]
    typical_tokens = median([tokens[ids[i]] for i in alive]) if alive else 0
    judged = {i for i in alive if tokens[ids[i]] >= LIGHT_TOKEN_SHARE * typical_tokens}
    return norms, alive, judged


def _gram_cosines(gram_matrix: np.ndarray, norms: np.ndarray, keep: list[int]) -> dict[int, float]:
    """Leave-one-out cosines over the contributions `keep` from their Gram matrix: with
    U the cosine matrix and r_i its row sums over `keep`, cos_i = (r_i − 1) /
    √(ΣU − 2 r_i + 1) (as leave_one_out_cosines)."""
    sub = gram_matrix[np.ix_(keep, keep)] / np.outer(norms[keep], norms[keep])
    rows = sub.sum(axis=1)
    total = float(sub.sum())
    out = {}
    for position, i in enumerate(keep):
        rest = math.sqrt(max(total - 2.0 * rows[position] + 1.0, 0.0))
        out[i] = float((rows[position] - 1.0) / rest) if rest > 0.0 else 1.0
    return out
