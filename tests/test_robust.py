"""The owners' screen of a shard's contributions (starling.robust), on synthetic
pseudo-gradients that share a direction the way one round's do."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from starling.robust import (
    DIRECTION_WINDOW,
    DIRECTION_WINDOW_MIN,
    _gram_cosines,
    direction_outliers,
    gram,
    history_direction_outliers,
    leave_one_out_cosines,
    persistent_direction_outliers,
    screen,
    whole_update_cosines,
)

NUMEL = 50_000


def honest_round(k: int, seed: int = 0, shared: float = 0.6) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(NUMEL, generator=gen)
    return {f"n{i}": common * shared + torch.randn(NUMEL, generator=gen) for i in range(k)}


def poisoned(values: dict[str, torch.Tensor], name: str, kind: str) -> dict[str, torch.Tensor]:
    v = values[name]
    noise = torch.randn(NUMEL, generator=torch.Generator().manual_seed(99))
    changed = {"scale": v * 100, "sign_flip": -v, "noise": noise * v.norm() / noise.norm()}
    return {**values, name: changed[kind]}


@pytest.mark.parametrize("k", [3, 4, 8])
@pytest.mark.parametrize("kind", ["scale", "sign_flip", "noise"])
def test_one_poisoned_update_is_excluded_and_no_honest_one(k: int, kind: str) -> None:
    if k == 3 and kind != "scale":  # direction needs four (one pair is no median)
        assert screen(poisoned(honest_round(k), "n1", kind)) == {}
        return
    values = poisoned(honest_round(k), "n1", kind)
    excluded = screen(values)
    assert list(excluded) == ["n1"]
    expected = "norm" if kind == "scale" else "direction"
    assert excluded["n1"].startswith(expected)


def test_two_of_eight_poisoned_are_both_excluded() -> None:
    values = poisoned(poisoned(honest_round(8), "n2", "sign_flip"), "n5", "noise")
    assert sorted(screen(values)) == ["n2", "n5"]


def test_honest_rounds_keep_everyone() -> None:
    for seed in range(20):
        for shared in (0.2, 0.6, 2.0):  # weak to strong agreement
            assert screen(honest_round(8, seed, shared)) == {}


def test_copies_are_excluded_by_hash_and_the_original_kept() -> None:
    values = honest_round(4)
    values["n3"] = values["n0"]  # a copy arrives after its original
    hashes = {n: bytes([i]) * 32 for i, n in enumerate(values)}
    hashes["n3"] = hashes["n0"]
    assert screen(values, hashes) == {"n3": "a copy of n0's contribution"}


def test_two_contributions_cannot_be_judged_and_unrelated_ones_are_not() -> None:
    assert screen(poisoned(honest_round(2), "n0", "sign_flip")) == {}
    gen = torch.Generator().manual_seed(5)
    unrelated = {f"n{i}": torch.randn(NUMEL, generator=gen) for i in range(6)}
    assert screen(unrelated) == {}  # no common direction: the check does not apply


def test_leave_one_out_cosines_match_a_direct_computation() -> None:
    values = honest_round(5, seed=3)
    norms = {n: float(v.double().norm()) for n, v in values.items()}
    cosines = leave_one_out_cosines(values, norms)
    for name, v in values.items():
        rest = sum(u.double() / norms[n] for n, u in values.items() if n != name)
        direct = float(torch.nn.functional.cosine_similarity(v.double(), rest, dim=0))
        assert cosines[name] == pytest.approx(direct, abs=1e-9)


def test_a_light_contribution_is_not_judged_by_direction_but_by_its_norm() -> None:
    """An honest node that trained a sixth of the others' tokens can point away from
    them; with the tokens in view it is kept (its weight is as small), while a full-weight
    flipped update in the same round is still cut, and a light one scaled ×100 too."""
    values = poisoned(poisoned(honest_round(5), "n4", "sign_flip"), "n1", "sign_flip")
    tokens = {"n0": 6000, "n1": 6000, "n2": 6000, "n3": 6000, "n4": 1000}
    excluded = screen(values, tokens=tokens)
    assert list(excluded) == ["n1"] and excluded["n1"].startswith("direction")
    assert sorted(screen(values)) == ["n1", "n4"]  # without tokens both are judged
    scaled = poisoned(honest_round(5), "n4", "scale")
    assert list(screen(scaled, tokens=tokens)) == ["n4"]


def test_the_whole_update_direction_check_adds_up_the_shards_gram_matrices() -> None:
    """Owners report per-shard Gram matrices; their sum is the whole updates' Gram, from
    which the coordinator's leave-one-out cosines equal the direct ones; a flipped update
    is cut, and honest ones that barely agree (cosines near 0.03) are all kept."""
    numel, bounds = 30_000, (0, 10_000, 30_000)

    def judged(agreement: float, flip: bool, light: bool = False) -> dict[str, str]:
        gen = torch.Generator().manual_seed(3)
        common = torch.randn(numel, generator=gen)
        values = {f"n{i}": agreement * common + torch.randn(numel, generator=gen) for i in range(8)}
        if flip:
            values["n7"] = -values["n7"]  # its own update, sign-flipped
        ids = sorted(values)
        total = np.zeros((len(ids), len(ids)))
        for start, end in zip(bounds, bounds[1:], strict=False):
            shard = gram([values[n][start:end] for n in ids])
            total += np.asarray(shard).reshape(len(ids), len(ids))
        norms = {n: float(values[n].double().norm()) for n in ids}
        direct = leave_one_out_cosines(values, norms)
        via_gram = _gram_cosines(total, np.sqrt(np.diag(total)), list(range(len(ids))))
        for index, node_id in enumerate(ids):
            assert via_gram[index] == pytest.approx(direct[node_id], abs=1e-9)
        tokens = dict.fromkeys(ids, 100) | ({"n7": 10} if light else {})
        return direction_outliers(ids, total, tokens, numel)

    assert set(judged(0.4, flip=True)) == {"n7"}
    assert judged(0.4, flip=False) == {}
    assert judged(0.12, flip=False) == {}  # barely agreeing honest updates all kept
    assert judged(0.4, flip=True, light=True) == {}  # light: not judged by direction


def _updates_gram(agreement: float, flipped: int, seed: int, numel: int = 20_000):
    """The Gram matrix of 8 updates that share `agreement` of a common direction, the
    first `flipped` of them sign-flipped."""
    gen = torch.Generator().manual_seed(seed)
    common = torch.randn(numel, generator=gen)
    values = [agreement * common + torch.randn(numel, generator=gen) for _ in range(8)]
    values = [-v if i < flipped else v for i, v in enumerate(values)]
    ids = [f"n{i}" for i in range(8)]
    return ids, np.asarray(gram(values)).reshape(8, 8), dict.fromkeys(ids, 100), numel


def test_flipped_updates_that_one_round_cannot_tell_are_cut_by_their_history() -> None:
    """Two of eight flip their update while honest ones barely agree: the second
    flipper, among "the others", pulls their median under noise and the single-round
    check stands down in most rounds. Over DIRECTION_WINDOW_MIN rounds both stand out
    (mean cosine below the floor) and are cut from then on; no honest node ever is."""
    history: list[dict[str, float]] = []
    single, persistent = [], []
    for round_ in range(DIRECTION_WINDOW + 4):
        ids, matrix, tokens, numel = _updates_gram(0.28, flipped=2, seed=round_, numel=2_000)
        cosines = whole_update_cosines(ids, matrix, tokens)
        assert set(cosines) == set(ids)
        single.append(set(direction_outliers(ids, matrix, tokens, numel)))
        persistent.append(set(persistent_direction_outliers(cosines, history)))
        history.append(cosines)
    assert sum(cut == {"n0", "n1"} for cut in single) < len(single) // 2  # it needs help
    assert all(not cut for cut in persistent[: DIRECTION_WINDOW_MIN - 1])  # too little yet
    assert all(cut == {"n0", "n1"} for cut in persistent[DIRECTION_WINDOW_MIN - 1 :])


def test_history_judges_only_recent_rounds_and_a_node_that_agrees_now() -> None:
    bad, slight = -0.15, -0.05  # below the floor on average; above it
    now = {"a": -0.12, "b": 0.02, "c": -0.12, "d": -0.12}
    history = [{"a": bad, "b": bad, "c": slight, "d": bad}] * (DIRECTION_WINDOW - 1)
    cut = persistent_direction_outliers(now, history)
    # a and d: against the others now and on average; b: agrees now; c: slightly below
    # 0 on average only.
    assert set(cut) == {"a", "d"} and f"over its last {DIRECTION_WINDOW} rounds" in cut["a"]
    # Rounds older than the window do not count; nor does a window with too few rounds.
    old = [{"a": -1.0}] * 20 + [{"a": 0.05}] * (DIRECTION_WINDOW - 1)
    assert persistent_direction_outliers({"a": -0.12}, old) == {}
    few = [{"a": bad}] * (DIRECTION_WINDOW_MIN - 2)
    assert persistent_direction_outliers({"a": bad}, few) == {}
    assert set(persistent_direction_outliers({"a": bad}, few + [{"a": bad}])) == {"a"}


def test_a_round_too_small_to_judge_cuts_by_history_alone() -> None:
    """Two flippers and one honest node left: the round has too few contributions for a
    cosine (the two flippers would outvote the honest one), so their history decides."""
    ids, matrix, tokens, _ = _updates_gram(0.4, flipped=2, seed=1)
    three = ["n0", "n1", "n2"]
    keep = [ids.index(n) for n in three]
    assert whole_update_cosines(three, matrix[np.ix_(keep, keep)], tokens) == {}
    history = [{"n0": -0.15, "n1": -0.13, "n2": 0.04, "n3": 0.06}] * (DIRECTION_WINDOW - 1)
    cut = history_direction_outliers(three, history)
    assert set(cut) == {"n0", "n1"} and "too few contributions to judge" in cut["n0"]
    # A node absent from the history, or judged in too few rounds of the window, stays.
    few = [{"n0": -0.5}] * (DIRECTION_WINDOW_MIN - 1)
    assert history_direction_outliers(["n0", "n9"], few) == {}
    # Only the window counts: a flipper that has agreed for the last rounds stays.
    reformed = [{"n0": -1.0}] * 20 + [{"n0": 0.05}] * (DIRECTION_WINDOW - 1)
    assert history_direction_outliers(["n0"], reformed) == {}
    assert history_direction_outliers(three, []) == {}


def test_whole_update_cosines_leave_out_light_and_too_few() -> None:
    ids, matrix, tokens, _ = _updates_gram(0.4, flipped=1, seed=0)
    cosines = whole_update_cosines(ids, matrix, tokens | {"n7": 10})
    assert "n7" not in cosines and cosines["n0"] < 0 < min(cosines[f"n{i}"] for i in range(1, 7))
    few = ids[:3]
    assert whole_update_cosines(few, matrix[:3, :3], tokens) == {}
