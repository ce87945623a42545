from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from starling.data import SequenceBatcher, TokenDataset
from starling.diloco import (
    GlobalState,
    OuterConfig,
    flat_ranges,
    flatten_parameters,
    load_flat_parameters,
    weighted_mean,
)
from starling.model import build_model, model_config
from starling.simulate import (
    SIMULATION_LR,
    FragmentSpec,
    SimConfig,
    Simulation,
    simulation_lr,
)
from starling.train import (
    InnerTrainer,
    TrainConfig,
    default_warmup,
    lr_multiplier,
    round_lengths,
)

from .conftest import run_cli

CPU = torch.device("cpu")
SMALL = dict(
    steps=12,
    batch_tokens=256,
    micro_batch_size=4,
    seq_len=64,
    warmup_steps=2,
    eval_batches=2,
    lr=3e-3,
)


def test_one_worker_h1_outer_lr1_no_momentum_is_plain_adamw(pydoc_dir: Path) -> None:
    dataset = TokenDataset(pydoc_dir)
    cfg = TrainConfig(**SMALL)
    mcfg = model_config("tiny", vocab_size=dataset.manifest.vocab_size)

    plain = build_model(mcfg, seed=0)
    plain_trainer = InnerTrainer(plain, cfg, CPU)
    batches = SequenceBatcher(dataset.split("train"), cfg.seq_len, cfg.micro_batch_size, seed=1)
    for _ in range(cfg.steps):
        plain_trainer.step(batches)

    replica = build_model(mcfg, seed=0)
    trainer = InnerTrainer(replica, cfg, CPU)
    state = GlobalState.from_model(replica)
    batches = SequenceBatcher(dataset.split("train"), cfg.seq_len, cfg.micro_batch_size, seed=1)
    degenerate = OuterConfig(lr=1.0, momentum=0.0)
    for _ in range(cfg.steps):  # rounds of H = 1
        trainer.step(batches)
        state.outer_step(state.pseudo_gradient(replica), degenerate)
        load_flat_parameters(replica, state.params)
    # θ − (θ − θ_i) = θ_i holds up to one fp32 rounding per round, which AdamW then carries.
    torch.testing.assert_close(state.params, flatten_parameters(plain), rtol=0, atol=1e-5)


def test_ddp_equals_one_worker_with_k_times_the_batch() -> None:
    """K replicas averaging gradients every step == one replica on the K× batch."""
    k, micro = 3, 2
    mcfg = model_config("tiny", vocab_size=256)
    gen = torch.Generator().manual_seed(0)
    steps = [torch.randint(0, 256, (k * micro, 33), generator=gen) for _ in range(3)]

    big = build_model(mcfg, seed=4)
    cfg = TrainConfig(
        batch_tokens=k * micro * 32,
        micro_batch_size=micro,
        seq_len=32,
        steps=3,
        warmup_steps=0,
        grad_clip=0.0,
        schedule="constant",
    )
    trainer = InnerTrainer(big, cfg, CPU)
    norms = [
        trainer.step(iter([(c[:, :-1], c[:, 1:]) for c in data.split(micro)])).grad_norm
        for data in steps
    ]

    replicas = [build_model(mcfg, seed=4) for _ in range(k)]
    leader = replicas[0]
    opt = torch.optim.AdamW(
        [
            {"params": [p for p in leader.parameters() if p.dim() >= 2], "weight_decay": 0.1},
            {"params": [p for p in leader.parameters() if p.dim() < 2], "weight_decay": 0.0},
        ],
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
    )
    for step, data in enumerate(steps):
        grads = []
        for replica, chunk in zip(replicas, data.split(micro), strict=True):
            logits = replica(chunk[:, :-1])
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chunk[:, 1:].flatten())
            grads.append(torch.autograd.grad(loss, list(replica.parameters())))
        for p, *gs in zip(leader.parameters(), *grads, strict=True):
            p.grad = torch.stack(gs).mean(0)  # the all-reduce
        mean_norm = torch.cat([p.grad.flatten() for p in leader.parameters()]).norm()
        # The gradient norm is scale-sensitive (AdamW's step is not): a sum instead of a
        # mean, or a lost micro-batch, shows here.
        assert norms[step] == pytest.approx(float(mean_norm), rel=1e-4)
        opt.step()
        opt.zero_grad()
        for replica in replicas[1:]:
            load_flat_parameters(replica, flatten_parameters(leader))
    # AdamW divides by √v, which magnifies summation-order roundings where gradients are
    # near zero: agreement to a few % of one step (lr = 3e-3) is all fp32 can promise.
    torch.testing.assert_close(
        flatten_parameters(big), flatten_parameters(leader), rtol=0, atol=1e-4
    )


def test_weighted_mean_weighs_by_tokens() -> None:
    a, b = torch.full((4,), 1.0), torch.full((4,), 5.0)
    assert torch.equal(weighted_mean([a, b], [1, 3]), torch.full((4,), 4.0))
    with pytest.raises(ValueError):
        weighted_mean([a, b], [1, 0])
    with pytest.raises(ValueError, match="token counts"):
        weighted_mean([a, b], [1, float("nan")])
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_mean([a, torch.ones(1)], [1, 1])  # would broadcast to a wrong mean


def test_global_state_takes_two_vectors_of_one_length() -> None:
    """The fingerprint covers n and the values, not a shape, and the outer step would
    broadcast a momentum of another shape: both are refused up front."""
    p = torch.arange(6.0)
    for params, momentum in ((p.view(2, 3), None), (p, torch.zeros(1)), (p, p.view(2, 3))):
        with pytest.raises(ValueError, match="two vectors of one length"):
            GlobalState(params, momentum)
    tracked = torch.zeros(6, dtype=torch.float64, requires_grad=True)
    state = GlobalState(p, tracked)  # detached, fp32, and its own copy
    assert state.momentum.dtype == torch.float32 and not state.momentum.requires_grad
    assert state.fingerprint() == GlobalState(p).fingerprint()


def test_outer_step_is_torch_sgd_with_nesterov() -> None:
    gen = torch.Generator().manual_seed(2)
    theta = torch.randn(1000, generator=gen)
    state = GlobalState(theta)
    reference = torch.nn.Parameter(theta.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    for _ in range(5):
        delta = torch.randn(1000, generator=gen) * 0.01
        state.outer_step(delta, OuterConfig(lr=0.7, momentum=0.9))
        reference.grad = delta.clone()
        sgd.step()
    torch.testing.assert_close(state.params, reference.detach(), rtol=1e-6, atol=1e-7)


def test_same_mean_same_bits_and_fingerprint() -> None:
    theta = torch.randn(5000, generator=torch.Generator().manual_seed(3))
    mean = torch.randn(5000, generator=torch.Generator().manual_seed(4)) * 1e-3
    a, b = GlobalState(theta), GlobalState(theta.clone())
    for _ in range(3):
        a.outer_step(mean, OuterConfig())
        b.outer_step(mean.clone(), OuterConfig())
    assert torch.equal(a.params, b.params) and a.fingerprint() == b.fingerprint()


@pytest.mark.parametrize("which", ["params", "momentum"])
def test_fingerprint_changes_with_one_ulp_anywhere(which: str) -> None:
    state = GlobalState(torch.randn(777), torch.randn(777))
    before = state.fingerprint()
    for index in (0, 388, 776):
        other = state.copy()
        tensor = getattr(other, which)
        tensor[index] = torch.nextafter(tensor[index], torch.tensor(float("inf")))
        assert other.fingerprint() != before
    assert state.copy().fingerprint() == before


def simulate(pydoc_dir: Path, **overrides) -> dict:
    sim = SimConfig(**{"workers": 2, "steps": 24, "inner_steps": 6, "codec": "int8", **overrides})
    result = Simulation(sim, TrainConfig(**{**SMALL, "steps": 24}), TokenDataset(pydoc_dir)).run()
    return result.to_dict()


@pytest.mark.parametrize("overlap", [False, True])
def test_diloco_converges_with_and_without_overlap(pydoc_dir: Path, overlap: bool) -> None:
    # Four rounds are too few for momentum 0.9 to settle (it overshoots either way).
    result = simulate(pydoc_dir, overlap=overlap, outer=OuterConfig(lr=0.7, momentum=0.5))
    assert result["rounds"] == 4 and result["overlap"] is overlap
    assert result["final_val_loss"] < result["initial_val_loss"] - 0.5
    assert result["tokens"] == 2 * 24 * 256


def test_a_last_partial_round_trains_only_the_steps_left(pydoc_dir: Path) -> None:
    """24 steps at H = 10: rounds of 10, 10 and 4 steps, the tokens of 24 steps a worker
    (as DDP trains), not of three whole rounds."""
    result = simulate(pydoc_dir, inner_steps=10)
    assert result["rounds"] == 3 and result["tokens"] == 2 * 24 * 256
    assert result["tokens"] == simulate(pydoc_dir, strategy="ddp")["tokens"]


def test_a_diverging_run_stops_and_says_where(pydoc_dir: Path) -> None:
    """An outer lr of 1e30 throws θ out to ~1e27 in the first outer step, and the second
    round's training reaches NaN: the simulation stops there with NaN as its loss (null in
    the JSON) and says which round, instead of carrying NaN through every later round or
    failing in a codec."""
    result = simulate(pydoc_dir, codec="fp32", outer=OuterConfig(lr=1e30, momentum=0.5))
    assert result["diverged_at"] == 2 and result["rounds"] == 2
    assert result["final_val_loss"] != result["final_val_loss"]  # NaN
    assert simulate(pydoc_dir)["diverged_at"] is None
    cli = run_cli(
        "simulate", "--data", str(pydoc_dir), "--steps", "2", "--workers", "2",
        "--inner-steps", "1", "--outer-lr", "1e30", "--codec", "int4", "--json",
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert "diverged in round 2" in cli.stderr
    line = cli.stdout.strip().splitlines()[-1]
    summary = json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in {line}"))
    assert summary["final_val_loss"] is None and summary["diverged_at"] == 2
    ddp = run_cli(
        "simulate", "--data", str(pydoc_dir), "--steps", "4", "--workers", "2",
        "--strategy", "ddp", "--lr", "1e30", "--json",
    )  # fmt: skip
    assert ddp.returncode == 0 and "diverged in step" in ddp.stderr, ddp.stderr
    assert json.loads(ddp.stdout.strip().splitlines()[-1])["final_val_loss"] is None


def test_an_update_beyond_the_codecs_range_stops_the_run_as_divergence(pydoc_dir: Path) -> None:
    """An inner lr of 1e6 moves the weights by ~1e6 in one step: finite, but beyond what
    int2's fp16 scales hold (98,256). The run stops there, as a diverged one does,
    rather than end in a codec's error."""
    sim = SimConfig(workers=2, steps=4, inner_steps=1, codec="int2")
    train_cfg = TrainConfig(**{**SMALL, "steps": 4, "lr": 1e6, "warmup_steps": 0})
    result = Simulation(sim, train_cfg, TokenDataset(pydoc_dir)).run()
    assert result.diverged_at == 1 and result.rounds == 1
    assert result.final_val_loss != result.final_val_loss  # NaN


def test_slow_workers_do_fewer_steps_and_dropouts_skip_rounds(pydoc_dir: Path) -> None:
    even = simulate(pydoc_dir, speeds=(1.0, 1.0))
    uneven = simulate(pydoc_dir, speeds=(1.0, 0.5))
    assert uneven["tokens"] == even["tokens"] * 3 // 4
    dropped = simulate(pydoc_dir, dropout=0.5)
    assert dropped["tokens"] < even["tokens"]
    assert dropped["final_val_loss"] < dropped["initial_val_loss"]


def test_rounds_can_close_on_a_token_budget(pydoc_dir: Path) -> None:
    # 2 workers at speeds 1 and 0.5 make 384 tokens per step of the fast one: 1000 tokens
    # need 3 steps (H = 3), so 24 steps are 8 rounds.
    result = simulate(pydoc_dir, round_tokens=1000, speeds=(1.0, 0.5))
    assert result["inner_steps"] == 3 and result["rounds"] == 8
    assert result["tokens"] == 8 * (3 + 2) * 256  # the slow worker rounds 1.5 steps to 2


def test_a_round_some_workers_miss_lasts_longer_for_the_rest_on_a_token_budget(
    pydoc_dir: Path,
) -> None:
    # 2 workers of 256 tokens a step and a budget of 3,072 tokens: 6 steps each, or 12
    # for the one left when the other misses the round, as a run's round closes only on
    # its budget. With fixed H the same draws (the seed's) lose those tokens.
    budget = simulate(pydoc_dir, round_tokens=3072, dropout=0.5)
    assert budget["inner_steps"] == 6 and budget["rounds"] == 4
    assert budget["tokens"] == 4 * 3072
    assert simulate(pydoc_dir, dropout=0.5)["tokens"] < 4 * 3072
    assert budget["final_val_loss"] < budget["initial_val_loss"] - 0.5


def test_a_round_every_worker_would_miss_is_drawn_again(pydoc_dir: Path) -> None:
    # At p = 0.9 both of 2 workers miss a round 81% of the time; a run's round waits for
    # a node, so every one of the 4 rounds is trained, by one worker or both.
    result = simulate(pydoc_dir, dropout=0.9)
    assert result["rounds"] == 4 and result["tokens"] >= 4 * 6 * 256
    assert result["final_val_loss"] < result["initial_val_loss"] - 0.5


def test_round_lengths_split_the_steps_by_their_weights() -> None:
    assert round_lengths(600, 20, [1.0] * 600) == [30] * 20
    cosine = TrainConfig(steps=600, warmup_steps=0, batch_tokens=512, seq_len=64, schedule="cosine")
    lengths = round_lengths(600, 20, [lr_multiplier(s, cosine) for s in range(600)])
    assert sum(lengths) == 600 and len(lengths) == 20
    assert max(lengths[:5]) < min(lengths[-5:]) and lengths[-1] > 4 * lengths[0]  # lr decays
    # One step outweighing several rounds' shares: every round still gets a step.
    assert round_lengths(20, 5, [1.0] * 10 + [1000.0] + [1.0] * 9) == [11, 1, 1, 1, 6]
    for steps, rounds in ((10, 0), (10, 11)):
        with pytest.raises(ValueError, match="cannot split"):
            round_lengths(steps, rounds, [1.0] * steps)


def test_rounds_can_follow_the_inner_lr_at_the_same_bytes(pydoc_dir: Path) -> None:
    fixed = simulate(pydoc_dir)
    following = simulate(pydoc_dir, sync_power=1.0)
    for key in ("rounds", "tokens", "bytes_per_worker"):
        assert following[key] == fixed[key], key
    assert following["fingerprint"] != fixed["fingerprint"]  # other rounds, other weights
    assert following["final_val_loss"] < following["initial_val_loss"] - 0.5
    with pytest.raises(ValueError, match="sync power"):
        SimConfig(sync_power=-1)


def test_bytes_per_worker_are_the_encoded_payloads(pydoc_dir: Path) -> None:
    from starling.codecs import make_codec

    int8, fp32 = simulate(pydoc_dir, codec="int8"), simulate(pydoc_dir, codec="fp32")
    n = build_model(model_config("tiny", vocab_size=1024)).num_parameters()
    rounds = 4
    assert fp32["bytes_per_worker"] == rounds * 2 * make_codec("fp32").encoded_size(n)
    assert int8["bytes_per_worker"] == rounds * 2 * make_codec("int8").encoded_size(n)
    ddp = simulate(pydoc_dir, strategy="ddp")
    assert ddp["bytes_per_worker"] == 24 * 2 * make_codec("fp32").encoded_size(n)


def test_outer_step_on_ranges_is_bitwise_the_whole_step() -> None:
    params, momentum, mean = torch.randn(777), torch.randn(777), torch.randn(777)
    whole, ranged = GlobalState(params, momentum), GlobalState(params, momentum)
    cfg = OuterConfig(lr=0.7, momentum=0.5)
    whole.outer_step(mean, cfg)
    for start, end in ((300, 777), (0, 120), (120, 300)):  # any order: elementwise
        ranged.outer_step(mean[start:end], cfg, slice(start, end))
    assert torch.equal(whole.params, ranged.params)
    assert torch.equal(whole.momentum, ranged.momentum)
    assert whole.fingerprint() == ranged.fingerprint()
    one_range = GlobalState(params, momentum)
    one_range.outer_step(mean[:120], cfg, slice(0, 120))
    assert torch.equal(one_range.params[120:], params[120:])  # the rest does not move
    assert not torch.equal(one_range.params[:120], params[:120])
    with pytest.raises(ValueError, match="state's shape"):
        one_range.outer_step(mean[:100], cfg, slice(0, 120))


@pytest.mark.parametrize("tied", [True, False])
def test_flat_ranges_locate_the_vocabulary_matrices(tied: bool) -> None:
    model = build_model(model_config("tiny", vocab_size=300, tie_embeddings=tied))
    flat, n, vocab = flatten_parameters(model), model.num_parameters(), 300 * 96
    ranges = flat_ranges(model, [model.embed_tokens.weight, model.lm_head.weight])
    expected = ((0, vocab),) if tied else ((0, vocab), (n - vocab, n))
    assert ranges == expected
    assert torch.equal(flat[:vocab], model.embed_tokens.weight.detach().reshape(-1))
    start, end = ranges[-1]
    assert torch.equal(flat[start:end], model.lm_head.weight.detach().reshape(-1))
    layers = model.layers[0].mlp.down_proj.weight
    assert flat_ranges(model, [layers, model.embed_tokens.weight])[0] == (0, vocab)


def test_embedding_rounds_send_the_vocabulary_matrices_less_often(pydoc_dir: Path) -> None:
    from starling.codecs import make_codec

    n = build_model(model_config("tiny", vocab_size=1024)).num_parameters()
    vocab = 1024 * 96
    int8, int2 = make_codec("int8"), make_codec("int2")
    together = simulate(pydoc_dir)
    # 4 rounds of H = 6; the vocabulary matrices sync in rounds 3 and 4 (the last).
    apart = simulate(pydoc_dir, embedding_rounds=3)
    assert (apart["embedding_rounds"], apart["embedding_codec"]) == (3, "int8")
    assert apart["bytes_per_worker"] == 4 * 2 * int8.encoded_size(n - vocab) + 2 * 2 * (
        int8.encoded_size(vocab)
    )
    assert apart["tokens"] == together["tokens"]
    assert apart["fingerprint"] != together["fingerprint"]
    assert apart["final_val_loss"] < apart["initial_val_loss"] - 0.5
    cheaper = simulate(pydoc_dir, embedding_codec="int2")
    assert cheaper["bytes_per_worker"] == 4 * 2 * (
        int8.encoded_size(n - vocab) + int2.encoded_size(vocab)
    )
    dropped = simulate(pydoc_dir, embedding_rounds=2, dropout=0.5)
    assert dropped["tokens"] < together["tokens"]
    assert dropped["final_val_loss"] < dropped["initial_val_loss"]


def test_one_worker_with_embedding_rounds_is_still_plain_training(pydoc_dir: Path) -> None:
    # With one worker, fp32 and outer lr 1 without momentum, each sync hands the worker
    # back its own weights: the result is plain AdamW only if a fragment that does not
    # sync keeps training on the worker's own copy, and one that does restarts from θ.
    degenerate = dict(workers=1, codec="fp32", outer=OuterConfig(lr=1.0, momentum=0.0))
    plain = simulate(pydoc_dir, **degenerate, inner_steps=24)  # one round: plain AdamW
    apart = simulate(pydoc_dir, **degenerate, inner_steps=2, embedding_rounds=5)
    assert apart["rounds"] == 12
    assert abs(apart["final_val_loss"] - plain["final_val_loss"]) < 1e-5  # 5e-7 seen
    # The tolerance tells runs apart: outer momentum moves the loss by 0.2.
    moving = {**degenerate, "outer": OuterConfig(lr=1.0, momentum=0.5)}
    pushed = simulate(pydoc_dir, **moving, inner_steps=2, embedding_rounds=5)
    assert abs(pushed["final_val_loss"] - plain["final_val_loss"]) > 1e-2


def test_a_mean_that_arrives_mid_round_is_folded_into_the_replicas(pydoc_dir: Path) -> None:
    # One worker, fp32, outer lr 1 without momentum: θ trails the replica by a round, and
    # folding the mean in (its progress kept on top) moves nothing, whenever it arrives.
    degenerate = dict(workers=1, codec="fp32", outer=OuterConfig(lr=1.0, momentum=0.0))
    plain = simulate(pydoc_dir, **degenerate, inner_steps=24)  # one round: plain AdamW
    for steps in (None, 1, 5):
        folded = simulate(pydoc_dir, **degenerate, overlap=True, overlap_steps=steps)
        assert folded["rounds"] == 4
        assert abs(folded["final_val_loss"] - plain["final_val_loss"]) < 1e-5, steps
    # Two workers: a mean that arrives after all 6 steps of the next round is the whole
    # round late of the default; one that arrives after 1 is another run.
    late = simulate(pydoc_dir, overlap=True)
    at_end = simulate(pydoc_dir, overlap=True, overlap_steps=6)
    early = simulate(pydoc_dir, overlap=True, overlap_steps=1)
    assert abs(at_end["final_val_loss"] - late["final_val_loss"]) < 1e-4
    assert abs(early["final_val_loss"] - late["final_val_loss"]) > 1e-3
    assert early["final_val_loss"] < early["initial_val_loss"] - 0.5


def test_fragments_by_name_sync_on_their_own_rounds(pydoc_dir: Path) -> None:
    from starling.codecs import make_codec

    n = build_model(model_config("tiny", vocab_size=1024)).num_parameters()
    mlp, attention = 4 * 3 * 96 * 256, 4 * 4 * 96 * 96  # 4 layers of the tiny preset
    int8, int2 = make_codec("int8"), make_codec("int2")
    together = simulate(pydoc_dir)
    assert together["fragments"] == [{"pattern": "", "every": 1, "codec": "int8", "share": 1.0}]
    # 4 rounds of H = 6: the MLPs sync in rounds 2 and 4, attention (int2) in round 4
    # only (the last); `self_attn|mlp` also matches the MLPs, which the first took.
    specs = (FragmentSpec("mlp", 2), FragmentSpec("self_attn|mlp", 4, "int2"))
    apart = simulate(pydoc_dir, fragments=specs)
    rest = n - mlp - attention
    assert apart["bytes_per_worker"] == 2 * (
        4 * int8.encoded_size(rest) + 2 * int8.encoded_size(mlp) + int2.encoded_size(attention)
    )
    assert [(f["pattern"], f["every"], f["codec"]) for f in apart["fragments"]] == [
        ("", 1, "int8"),
        ("mlp", 2, "int8"),
        ("self_attn|mlp", 4, "int2"),
    ]
    assert [f["share"] for f in apart["fragments"]] == [
        round(x / n, 4) for x in (rest, mlp, attention)
    ]
    assert apart["tokens"] == together["tokens"]
    assert apart["final_val_loss"] < apart["initial_val_loss"] - 0.5
    # --embedding-rounds is the vocabulary's fragment by name: the same bits.
    by_name = simulate(pydoc_dir, fragments=(FragmentSpec("embed_tokens", 3),))
    assert by_name["fingerprint"] == simulate(pydoc_dir, embedding_rounds=3)["fingerprint"]
    assert by_name["fingerprint"] != together["fingerprint"]
    # The tied output head, by its own name, is the same fragment.
    head = simulate(pydoc_dir, fragments=(FragmentSpec("lm_head", 3),))
    assert head["fingerprint"] == by_name["fingerprint"]
    # Specs that take every parameter leave no rest to sync.
    every = (FragmentSpec("mlp", 2), FragmentSpec(".", 1, "int2"))
    covered = simulate(pydoc_dir, fragments=every)
    assert [(f["pattern"], f["codec"]) for f in covered["fragments"]] == [
        ("mlp", "int8"),
        (".", "int2"),
    ]
    assert covered["bytes_per_worker"] == 2 * (
        2 * int8.encoded_size(mlp) + 4 * int2.encoded_size(n - mlp)
    )
    # A pattern left with nothing to match fails before any training, also after the
    # vocabulary's fragment took the embedding.
    with pytest.raises(ValueError, match="matches no parameter"):
        simulate(pydoc_dir, fragments=(FragmentSpec("mlp", 2), FragmentSpec("mlp", 3)))
    with pytest.raises(ValueError, match="matches no parameter"):
        simulate(pydoc_dir, embedding_rounds=4, fragments=(FragmentSpec("embed_tokens", 2),))


def test_one_worker_with_fragments_by_name_is_still_plain_training(pydoc_dir: Path) -> None:
    # As above: each fragment that does not sync keeps training on the worker's copy.
    degenerate = dict(workers=1, codec="fp32", outer=OuterConfig(lr=1.0, momentum=0.0))
    plain = simulate(pydoc_dir, **degenerate, inner_steps=24)
    specs = (FragmentSpec("self_attn", 5), FragmentSpec(r"^layers\.0\.", 3))
    apart = simulate(pydoc_dir, **degenerate, inner_steps=2, fragments=specs)
    assert abs(apart["final_val_loss"] - plain["final_val_loss"]) < 1e-5


def test_simulate_cli_json_and_plot(pydoc_dir: Path, tmp_path: Path) -> None:
    png = tmp_path / "loss.png"
    result = run_cli(
        "simulate",
        "--data",
        str(pydoc_dir),
        "--workers",
        "2",
        "--steps",
        "8",
        "--inner-steps",
        "4",
        "--codec",
        "topk",
        "--seq-len",
        "32",
        "--batch-size",
        "4",
        "--speeds",
        "1,0.5",
        "--overlap",
        "--json",
        "--plot",
        str(png),
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    for key in (
        "strategy",
        "codec",
        "workers",
        "steps",
        "inner_steps",
        "tokens",
        "final_val_loss",
        "bytes_per_worker",
        "wall_s",
    ):
        assert key in summary
    assert summary["codec"] == "topk" and summary["rounds"] == 2
    assert summary["lr"] == SIMULATION_LR["tiny"]["diloco-overlap"]  # --overlap's tuned lr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_simulate_cli_takes_each_strategys_tuned_lr_unless_given(pydoc_dir: Path) -> None:
    def summary(*args: str) -> dict:
        result = run_cli(
            "simulate", "--data", str(pydoc_dir), "--steps", "2", "--workers", "2", "--json", *args
        )
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout.strip().splitlines()[-1])

    default = summary()
    assert default["lr"] == SIMULATION_LR["tiny"]["diloco"] == 3e-3  # the bench's best
    assert default["moment_batches"] == 2.0  # a worker's AdamW assumes DDP's batch
    ddp = summary("--strategy", "ddp")
    assert ddp["lr"] == SIMULATION_LR["tiny"]["ddp"] and ddp["moment_batches"] == 1.0
    assert summary("--moment-batches", "1")["moment_batches"] == 1.0
    assert summary("--overlap")["lr"] == SIMULATION_LR["tiny"]["diloco-overlap"] == 3e-3
    assert summary("--lr", "1e-3")["lr"] == 1e-3
    # Warmup over a quarter of the steps, then warmup-stable-decay, unless told.
    assert (default["warmup_steps"], default["schedule"]) == (default_warmup(2), "wsd")
    assert default_warmup(600) == 150
    told = summary("--warmup-steps", "1", "--schedule", "cosine")
    assert (told["warmup_steps"], told["schedule"]) == (1, "cosine")
    # AdamW unless told; Muon trains to another state from the same start.
    muon = summary("--optimizer", "muon")
    assert (default["optimizer"], muon["optimizer"]) == ("adamw", "muon")
    assert muon["fingerprint"] != default["fingerprint"]
    # A preset without a sweep keeps TrainConfig's lr.
    assert simulation_lr("small", "diloco") == simulation_lr("tiny", "none") == TrainConfig.lr


@pytest.mark.parametrize(
    "args, message",
    [
        (["--strategy", "fsdp"], "strategy must be one of"),
        (["--codec", "zstd"], "unknown codec"),
        (["--speeds", "1,fast"], "comma-separated"),
        (["--speeds", "1,1,1"], "needs 4 values"),
        (["--outer-momentum", "1.5"], "outer momentum"),
        (["--beta2", "1"], "beta2 must be in [0, 1)"),
        (["--schedule", "linear"], "schedule must be one of"),
        (["--optimizer", "sgd"], "optimizer must be one of adamw, muon"),
        (["--decay-fraction", "0"], "decay fraction must be in (0, 1]"),
        (["--warmup-steps", "-1"], "warmup steps must be ≥ 0"),
        (["--moment-batches", "0"], "moment batches must be ≥ 1"),
        (["--feedback-decay", "0"], "feedback decay must be in (0, 1]"),
        (["--sync-power", "-1"], "sync power must be in [0, 4]"),
        (["--embedding-rounds", "0"], "embedding rounds must be at least 1"),
        (["--embedding-rounds", "2", "--overlap"], "does not combine with overlap"),
        (["--embedding-codec", "int3"], "unknown codec"),
        (["--fragment", "mlp"], "give PATTERN@EVERY or PATTERN@EVERY@CODEC"),
        (["--fragment", "mlp@often"], "EVERY must be a whole number"),
        (["--fragment", "mlp@0"], "rounds must be at least 1"),
        (["--fragment", "@2"], "give PATTERN@EVERY"),
        (["--fragment", "mlp(@2"], "bad pattern"),
        (["--fragment", "mlp@2@int3"], "unknown codec"),
        (["--fragment", "mlp@2", "--overlap"], "do not combine with overlap"),
        (["--overlap-steps", "3"], "only with overlap"),
        (["--overlap", "--overlap-steps", "0"], "overlap steps must be ≥ 1"),
        (["--fragment", "mlp@2", "--fragment", "mlp@3"], "matches no parameter"),
        (["--fragment", "decoder@2"], "matches no parameter"),
        (["--device", "tpu"], "device must be one of"),
        (["--device", "mps"], "MPS backend is not available"),
        (["--inner-steps", "0"], "inner steps must be positive"),
        (["--codec", ""], "unknown codec ''"),
        (["--outer-lr", "nan"], "outer lr must be a positive number"),
        (["--outer-lr", "inf"], "outer lr must be a positive number"),
        (["--eval-every", "-1"], "eval every must be ≥ 0"),
        (["--strategy", "ddp", "--dropout", "0.5"], "--dropout: only for --strategy diloco"),
        (
            ["--strategy", "ddp", "--codec", "int2", "--overlap", "--speeds", "1,1,1,0.5"],
            "--codec, --speeds, --overlap: only for --strategy diloco",
        ),
    ],
)
def test_simulate_cli_bad_input(pydoc_dir: Path, args: list[str], message: str) -> None:
    result = run_cli("simulate", "--data", str(pydoc_dir), "--steps", "2", *args)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_sim_config_defaults_are_the_recommended_diloco() -> None:
    cfg = SimConfig()
    assert cfg.strategy == "diloco" and cfg.outer == OuterConfig(lr=0.7, momentum=0.5)
    assert (cfg.inner_steps, cfg.codec) == (30, "int4")
    assert replace(cfg, overlap=True).overlap
    assert (cfg.embedding_rounds, cfg.embedding_codec) == (1, None)  # one fragment
    assert cfg.fragments == () and cfg.fragment_specs() == ()
