from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from starling.checkpoint import load_checkpoint
from starling.data import SequenceBatcher, TokenDataset, evaluation_batches
from starling.model import build_model, model_config
from starling.train import (
    BatchScaledAdamW,
    InnerTrainer,
    MuonAdamW,
    TrainConfig,
    lr_multiplier,
    orthogonalize,
    train,
)

from .conftest import run_cli

CPU = torch.device("cpu")


def test_warmup_then_cosine_to_the_floor() -> None:
    cfg = TrainConfig(steps=110, warmup_steps=10, min_lr_ratio=0.1, schedule="cosine")
    assert lr_multiplier(0, cfg) == pytest.approx(0.1)
    assert lr_multiplier(9, cfg) == pytest.approx(1.0)
    assert lr_multiplier(60, cfg) == pytest.approx(0.55)  # halfway: mean of peak and floor
    assert lr_multiplier(110, cfg) == pytest.approx(0.1)
    values = [lr_multiplier(s, cfg) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(values, values[1:], strict=False))


def test_wsd_is_flat_then_decays_over_its_tail() -> None:
    cfg = TrainConfig(
        steps=100, warmup_steps=5, schedule="wsd", decay_fraction=0.2, min_lr_ratio=0.0
    )
    assert [lr_multiplier(s, cfg) for s in (5, 50, 79)] == [1.0, 1.0, 1.0]
    assert lr_multiplier(90, cfg) == pytest.approx(0.5)
    assert lr_multiplier(100, cfg) == pytest.approx(0.0)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"batch_tokens": 1000}, "multiple of micro batch size"),
        ({"schedule": "linear"}, "schedule must be one of"),
        ({"steps": 0}, "steps must be positive"),
        ({"device": "tpu"}, "device must be one of"),
        ({"moment_batches": 0.5}, "moment batches must be ≥ 1"),
        (
            {"moment_batches": 4, "micro_batch_size": 1, "batch_tokens": 256},
            "micro batch size must be ≥ 2",
        ),
        ({"optimizer": "sgd"}, "optimizer must be one of adamw, muon"),
    ],
)
def test_bad_train_configs_say_what_to_do(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        TrainConfig(**kwargs)


def test_gradient_accumulation_equals_one_large_batch() -> None:
    """Two micro-batches of 4 must give the same step as one batch of 8."""
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, 256, (8, 33), generator=gen)
    results = []
    for micro in (4, 8):
        model = build_model(model_config("tiny", vocab_size=256), seed=0)
        cfg = TrainConfig(
            batch_tokens=8 * 32, micro_batch_size=micro, seq_len=32, steps=1, warmup_steps=0
        )
        trainer = InnerTrainer(model, cfg, CPU)
        grads: list[torch.Tensor] = []  # the accumulated gradients the optimizer steps on
        params = list(model.parameters())
        trainer.optimizer.register_step_pre_hook(
            lambda *_, grads=grads, params=params: grads.extend(
                p.grad.detach().clone() for p in params
            )
        )
        chunks = iter([(c[:, :-1], c[:, 1:]) for c in data.split(micro)])
        stats = trainer.step(chunks)
        results.append((stats, grads, [p.detach().clone() for p in model.parameters()]))
    (s4, g4, p4), (s8, g8, p8) = results
    assert s4.tokens == s8.tokens == 256
    assert s4.loss == pytest.approx(s8.loss, rel=1e-5)
    assert s4.grad_norm == pytest.approx(s8.grad_norm, rel=1e-4)
    assert len(g4) == len(g8) == len(p4)
    for a, b in zip(g4, g8, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-8)
    # AdamW's first step moves every entry by about lr · g / (|g| + eps): where |g| is near
    # eps (1e-8) a rounding difference in g (summation order differs between CPUs) moves
    # the update by a visible share of lr, so the weights agree to a small share of lr.
    for a, b in zip(p4, p8, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=cfg.lr * 1e-2)


def exact_step_config(**settings: Any) -> TrainConfig:
    """A config whose steps can be written out by hand: 16-token sequences, lr 1e-2 from
    the first step on (no warmup, no schedule) and no clipping."""
    return TrainConfig(
        seq_len=16, lr=1e-2, warmup_steps=0, schedule="constant", grad_clip=0.0, **settings
    )


def test_trainer_matches_plain_torch_adamw() -> None:
    """Our step (no clipping, constant lr) is exactly torch.optim.AdamW on the same loss."""
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 256, (2, 17), generator=gen) for _ in range(3)]
    cfg = exact_step_config(batch_tokens=32, micro_batch_size=2, steps=3, weight_decay=0.0)
    ours = build_model(model_config("tiny", vocab_size=256), seed=2)
    trainer = InnerTrainer(ours, cfg, CPU)
    for b in batches:
        trainer.step(iter([(b[:, :-1], b[:, 1:])]))

    reference = build_model(model_config("tiny", vocab_size=256), seed=2)
    opt = torch.optim.AdamW(
        reference.parameters(), lr=1e-2, betas=(cfg.beta1, cfg.beta2), weight_decay=0.0
    )
    for b in batches:
        logits = reference(b[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), b[:, 1:].flatten()).backward()
        opt.step()
        opt.zero_grad()
    for a, b in zip(ours.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batches", [2.0, 4.0, 16.0])
def test_batch_scaled_adamw_steps_like_the_larger_batch(batches: float) -> None:
    # One coordinate whose halves agree (pure signal: g_a·g_b = g²) and one whose halves
    # cancel (pure noise: g_a·g_b = −g², clamped to 0). After one step AdamW moves both
    # by lr; the larger batch's second moment keeps the signal's step and grows the
    # noise's by √K, since its squared gradient would be K times smaller.
    param = torch.nn.Parameter(torch.zeros(2))
    opt = BatchScaledAdamW([{"params": [param], "weight_decay": 0.0}], 0.1, (0.9, 0.99), batches)
    param.grad = torch.tensor([0.5, 0.5])
    opt.step_with_halves({param: torch.tensor([0.25, -0.25])})
    expected = torch.tensor([-0.1, -0.1 * math.sqrt(batches)])
    torch.testing.assert_close(param.detach(), expected, rtol=1e-5, atol=0.0)


def test_batch_scaled_adamw_is_adamw_when_the_halves_agree() -> None:
    # Each sequence twice, once in each half of the micro-batch: the halves' gradients are
    # equal, the product is g², so any K gives AdamW's step (weight decay, clipping and
    # accumulation included).
    gen = torch.Generator().manual_seed(3)
    batches = []
    for _ in range(4):
        half = torch.randint(0, 256, (2, 17), generator=gen)
        both = torch.cat([half, half])
        batches.append((both[:, :-1], both[:, 1:]))
    cfg = TrainConfig(
        batch_tokens=128, micro_batch_size=4, seq_len=16, steps=2, lr=1e-2, warmup_steps=0
    )
    plain = build_model(model_config("tiny", vocab_size=256), seed=2)
    scaled = build_model(model_config("tiny", vocab_size=256), seed=2)
    plain_trainer = InnerTrainer(plain, cfg, CPU)
    scaled_trainer = InnerTrainer(scaled, replace(cfg, moment_batches=8), CPU)
    assert isinstance(scaled_trainer.optimizer, BatchScaledAdamW)
    plain_stats = [plain_trainer.step(iter(batches[i : i + 2])) for i in (0, 2)]
    scaled_stats = [scaled_trainer.step(iter(batches[i : i + 2])) for i in (0, 2)]
    assert plain_stats[0].grad_norm > cfg.grad_clip  # the clip is exercised
    for a, b in zip(plain_stats, scaled_stats, strict=True):
        assert b.tokens == a.tokens == 128
        assert b.loss == pytest.approx(a.loss, rel=1e-5)
    # Within 1% of one step (lr 1e-2): float order differs where a gradient is ~ε.
    for a, b in zip(plain.parameters(), scaled.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_a_trainer_can_follow_a_changing_number_of_batches() -> None:
    # A run's node starts from one guess of the contributors and follows each commit:
    # switching K between steps must give exactly the steps of a trainer built with
    # that K, and K = 1 (a lone contributor) AdamW's step.
    gen = torch.Generator().manual_seed(5)
    batches = []
    for _ in range(3):
        b = torch.randint(0, 256, (4, 17), generator=gen)
        batches.append((b[:, :-1], b[:, 1:]))
    cfg = TrainConfig(
        batch_tokens=64, micro_batch_size=4, seq_len=16, steps=3, lr=1e-2, warmup_steps=0
    )

    def trained(schedule: list[float]) -> list[torch.Tensor]:
        model = build_model(model_config("tiny", vocab_size=256), seed=2)
        trainer = InnerTrainer(model, cfg, CPU, batch_scaled=True)
        assert isinstance(trainer.optimizer, BatchScaledAdamW) and trainer.moment_batches == 1
        for batch, k in zip(batches, schedule, strict=True):
            trainer.set_moment_batches(k)
            assert trainer.moment_batches == k
            trainer.step(iter([batch]))
        return [p.detach().clone() for p in model.parameters()]

    def built_with(k: float, steps: int) -> list[torch.Tensor]:
        model = build_model(model_config("tiny", vocab_size=256), seed=2)
        trainer = InnerTrainer(model, replace(cfg, moment_batches=k), CPU)
        for batch in batches[:steps]:
            trainer.step(iter([batch]))
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trained([4.0, 4.0, 4.0]), built_with(4.0, 3), strict=True):
        assert torch.equal(a, b)
    followed, constant = trained([1.0, 1.0, 4.0]), trained([1.0, 1.0, 1.0])
    assert any(not torch.equal(a, b) for a, b in zip(followed, constant, strict=True))
    plain = build_model(model_config("tiny", vocab_size=256), seed=2)
    plain_trainer = InnerTrainer(plain, cfg, CPU)
    for batch in batches:
        plain_trainer.step(iter([batch]))
    for a, b in zip(constant, plain.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)  # K = 1: AdamW
    with pytest.raises(ValueError, match="batch_scaled=True"):
        plain_trainer.set_moment_batches(2.0)
    with pytest.raises(ValueError, match="moment batches must be ≥ 1"):
        InnerTrainer(plain, cfg, CPU, batch_scaled=True).set_moment_batches(0.5)
    with pytest.raises(ValueError, match="micro_batch_size ≥ 2"):
        InnerTrainer(plain, replace(cfg, micro_batch_size=1, batch_tokens=16), CPU, True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(96, 96), (256, 96), (96, 256), (7, 300)])
def test_orthogonalize_pushes_every_singular_value_toward_one(
    shape: tuple[int, int], dtype: torch.dtype
) -> None:
    gen = torch.Generator().manual_seed(7)
    # Singular values spread over four orders of magnitude, as a gradient's are.
    u, _ = torch.linalg.qr(torch.randn(shape[0], shape[0], generator=gen))
    v, _ = torch.linalg.qr(torch.randn(shape[1], shape[1], generator=gen))
    rank = min(shape)
    spread = torch.logspace(0, -4, rank)
    matrix = u[:, :rank] @ torch.diag(spread) @ v[:, :rank].T * 3.0
    result = orthogonalize(matrix, dtype=dtype)
    # Products in bf16 (8 bits of mantissa) keep the band: the result comes back fp32.
    assert result.shape == matrix.shape and result.dtype == torch.float32
    singular = torch.linalg.svdvals(result)
    # Five quintic iterations leave every value down to a hundredth of the largest in
    # [0.65, 1.21]; smaller ones are lifted only partway (the coefficients trade exactness
    # for speed), never past the top.
    assert singular[spread >= 1e-2].min() > 0.65 and singular.max() < 1.21
    assert singular.min() > 10 * spread.min()  # the smallest lifted a hundredfold or more
    # The directions are the matrix's own: U·Vᵀ weighted by those values.
    alignment = (result * (u[:, :rank] @ v[:, :rank].T)).sum() / rank
    assert alignment > 0.5


def test_muon_steps_the_hidden_matrices_and_adamw_the_rest() -> None:
    """One step of MuonAdamW on a model, against the same step written out: the hidden
    matrices move by lr·0.2·√max(rows, cols)·orthogonalize(g + μ·b) (b = g after the first
    step) after the weight decay; the embedding and the norms' gains take AdamW's step."""
    gen = torch.Generator().manual_seed(4)
    tokens = torch.randint(0, 256, (4, 17), generator=gen)
    cfg = exact_step_config(batch_tokens=64, micro_batch_size=4, steps=1, optimizer="muon")
    muon_model = build_model(model_config("tiny", vocab_size=256), seed=2)
    trainer = InnerTrainer(muon_model, cfg, CPU)
    assert isinstance(trainer.optimizer, MuonAdamW)
    trainer.step(iter([(tokens[:, :-1], tokens[:, 1:])]))

    # The batch's gradient, by a plain backward pass (the trainer differentiates its two
    # halves apart: the same mean up to float rounding).
    reference = build_model(model_config("tiny", vocab_size=256), seed=2)
    logits = reference(tokens[:, :-1])
    torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    grads = {name: p.grad for name, p in reference.named_parameters() if p.grad is not None}

    adamw_model = build_model(model_config("tiny", vocab_size=256), seed=2)
    InnerTrainer(adamw_model, replace(cfg, optimizer="adamw"), CPU).step(
        iter([(tokens[:, :-1], tokens[:, 1:])])
    )
    initial = dict(build_model(model_config("tiny", vocab_size=256), seed=2).named_parameters())
    adamw = dict(adamw_model.named_parameters())
    hidden = 0
    for name, param in muon_model.named_parameters():
        if param.dim() == 2 and "embed" not in name:
            hidden += 1
            start = initial[name].detach() * (1 - cfg.lr * cfg.weight_decay)
            step = orthogonalize(grads[name] * 1.95) * (0.2 * max(param.shape) ** 0.5)
            torch.testing.assert_close(param.detach(), start - cfg.lr * step, rtol=1e-4, atol=1e-6)
            assert not torch.allclose(param, adamw[name], atol=1e-4)
        else:
            torch.testing.assert_close(param, adamw[name], rtol=1e-4, atol=1e-4)
    assert hidden == 4 * 7  # q, k, v, o, gate, up, down in each of the tiny preset's 4 layers


def test_muon_orthogonalizes_in_the_steps_precision() -> None:
    """Newton–Schulz's products run in bf16 where the step's run under bf16 autocast
    (CUDA by default, or asked for), in fp32 otherwise, and the step really uses that
    dtype: bf16 moves an fp32 step by about a tenth of its norm, along the same way.
    (Orthogonalizing lifts a gradient's weakest directions, rounding's included.)"""
    cfg = exact_step_config(batch_tokens=64, micro_batch_size=4, steps=1, optimizer="muon")
    gen = torch.Generator().manual_seed(6)
    tokens = torch.randint(0, 256, (4, 17), generator=gen)
    for precision, dtype in (
        ("auto", torch.float32),
        ("fp32", torch.float32),
        ("bf16", torch.bfloat16),
    ):
        model = build_model(model_config("tiny", vocab_size=256), seed=2)
        trainer = InnerTrainer(model, replace(cfg, precision=precision), CPU)  # on a CPU
        assert isinstance(trainer.optimizer, MuonAdamW)
        assert trainer.optimizer.orthogonalize_dtype == dtype, precision

    def step_taken(orthogonalize_dtype: torch.dtype) -> torch.Tensor:
        model = build_model(model_config("tiny", vocab_size=256), seed=2)
        trainer = InnerTrainer(model, replace(cfg, precision="fp32"), CPU)
        assert isinstance(trainer.optimizer, MuonAdamW)
        trainer.optimizer.orthogonalize_dtype = orthogonalize_dtype
        before = model.layers[0].mlp.up_proj.weight.detach().clone()
        trainer.step(iter([(tokens[:, :-1], tokens[:, 1:])]))
        return model.layers[0].mlp.up_proj.weight.detach() - before

    fp32_step, bf16_step = step_taken(torch.float32), step_taken(torch.bfloat16)
    relative = float((bf16_step - fp32_step).norm() / fp32_step.norm())
    cosine = float((bf16_step * fp32_step).sum() / (bf16_step.norm() * fp32_step.norm()))
    assert 0.01 < relative < 0.3 and cosine > 0.98, (relative, cosine)


def test_muon_trains_on_micro_batches_of_one_sequence() -> None:
    """A micro-batch of one sequence cannot be halved: Muon then steps with plain AdamW
    on its AdamW part, as a batch of four sequences in one pass does at one batch."""
    gen = torch.Generator().manual_seed(5)
    batches = [torch.randint(0, 256, (4, 17), generator=gen) for _ in range(3)]
    cfg = exact_step_config(batch_tokens=64, micro_batch_size=4, steps=3, optimizer="muon")

    def trained(micro_batch_size: int) -> list[torch.Tensor]:
        model = build_model(model_config("tiny", vocab_size=256), seed=2)
        trainer = InnerTrainer(model, replace(cfg, micro_batch_size=micro_batch_size), CPU)
        for batch in batches:
            rows = batch.split(micro_batch_size)
            trainer.step(iter([(part[:, :-1], part[:, 1:]) for part in rows]))
        return [p.detach().clone() for p in model.parameters()]

    assert TrainConfig(optimizer="muon", micro_batch_size=1, batch_tokens=256).optimizer == "muon"
    one_sequence, whole = trained(1), trained(4)
    initial = list(build_model(model_config("tiny", vocab_size=256), seed=2).parameters())
    for a, b, start in zip(one_sequence, whole, initial, strict=True):
        assert not torch.equal(b, start)
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    model = build_model(model_config("tiny", vocab_size=256), seed=2)
    trainer = InnerTrainer(model, replace(cfg, micro_batch_size=1, batch_tokens=16), CPU)
    with pytest.raises(ValueError, match="micro_batch_size ≥ 2"):
        trainer.set_moment_batches(2.0)


def test_a_batch_scaled_step_without_the_halves_product_changes_nothing() -> None:
    """Past one batch every parameter AdamW steps needs its halves' product: a step
    without them is refused before any group (Muon's first) has moved a weight."""
    cfg = TrainConfig(batch_tokens=64, micro_batch_size=4, seq_len=16, optimizer="muon")
    model = build_model(model_config("tiny", vocab_size=256), seed=2)
    trainer = InnerTrainer(model, cfg, CPU, batch_scaled=True)
    trainer.set_moment_batches(2.0)
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    before = [p.detach().clone() for p in model.parameters()]
    assert isinstance(trainer.optimizer, MuonAdamW)
    with pytest.raises(ValueError, match="halves' product"):
        trainer.optimizer.step_with_halves({})
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))
    assert not trainer.optimizer.state


def test_muon_follows_the_number_of_batches_on_its_adamw_part() -> None:
    """Built batch-scaled, a MuonAdamW halves every step's batch and follows the
    number of batches; built for one batch, it does not halve (it needs no product)
    and refuses to follow."""
    cfg = TrainConfig(batch_tokens=64, micro_batch_size=4, seq_len=16, optimizer="muon")
    model = build_model(model_config("tiny", vocab_size=256), seed=2)
    trainer = InnerTrainer(model, cfg, CPU, batch_scaled=True)
    assert trainer.moment_batches == 1 and trainer.halved
    trainer.set_moment_batches(4.0)
    assert trainer.moment_batches == 4.0
    one_batch = InnerTrainer(model, cfg, CPU)
    assert not one_batch.halved and trainer.halved
    with pytest.raises(ValueError, match="batch_scaled=True"):
        one_batch.set_moment_batches(4.0)
    assert InnerTrainer(model, replace(cfg, moment_batches=4.0), CPU).halved


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_training_on_the_embedded_corpus_lowers_validation_loss(
    kjv_dir: Path, optimizer: str
) -> None:
    dataset = TokenDataset(kjv_dir)
    cfg = TrainConfig(
        steps=40,
        batch_tokens=2048,
        micro_batch_size=16,
        seq_len=64,
        lr=3e-3,
        warmup_steps=5,
        eval_every=20,
        eval_batches=4,
        optimizer=optimizer,
    )
    model = build_model(model_config("tiny", vocab_size=dataset.manifest.vocab_size), seed=0)
    batches = SequenceBatcher(dataset.split("train"), cfg.seq_len, cfg.micro_batch_size, seed=0)
    val = evaluation_batches(dataset.split("val"), cfg.seq_len, cfg.micro_batch_size, 4)
    result = train(model, cfg, batches, val, CPU)
    assert result.initial_val_loss == pytest.approx(math.log(8192), abs=0.3)  # uniform start
    assert result.final_val_loss < result.initial_val_loss - 2.0
    losses = [loss for _, _, loss in result.val_history]
    assert losses == sorted(losses, reverse=True)  # falls at every evaluation
    assert result.tokens == 40 * 2048


def test_cli_train_saves_a_loadable_checkpoint(pydoc_dir: Path, tmp_path: Path) -> None:
    config = tmp_path / "run.toml"
    config.write_text('[train]\nlr = 0.004\nsteps = 999\n[model]\npreset = "tiny"\ndim = 64\n')
    out = tmp_path / "ckpt"
    result = run_cli(
        "train",
        "--data",
        str(pydoc_dir),
        "--config",
        str(config),
        "--steps",
        "12",
        "--batch-tokens",
        "1024",
        "--micro-batch-size",
        "8",
        "--seq-len",
        "64",
        "--eval-every",
        "6",
        "--out",
        str(out),
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["steps"] == 12  # the command line overrides the file's 999
    assert summary["final_val_loss"] < summary["initial_val_loss"]
    model, manifest = load_checkpoint(out)
    assert model.config.dim == 64 and model.config.vocab_size == 1024
    assert manifest["train"]["lr"] == 0.004 and manifest["step"] == 12
    assert (out / "tokenizer.json").read_bytes() == (pydoc_dir / "tokenizer.json").read_bytes()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "huge"], "unknown model preset"),
        (["--data", "/nonexistent/dir"], "neither a prepared directory"),
        (["--batch-tokens", "1000"], "multiple of micro batch size"),
        (["--device", "cuda"], "no CUDA GPU"),
        (["--heads", "5"], "divisible by n_heads"),
        (["--optimizer", "sgd"], "optimizer must be one of adamw, muon"),
    ],
)
def test_cli_train_bad_input_exits_2(pydoc_dir: Path, tmp_path: Path, args, message) -> None:
    base = ["train", "--data", str(pydoc_dir), "--steps", "1", "--out", str(tmp_path / "o")]
    if args[0] == "--data":
        base = ["train", "--steps", "1"]
    result = run_cli(*base, *args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


def test_cli_train_bad_config_file_exits_2(pydoc_dir: Path, tmp_path: Path) -> None:
    for text, message in [
        ("[train]\nsteps = \n", "config file"),
        ("[train]\nstepz = 3\n", "stepz"),
        ("[optimizer]\n", "unknown sections"),
    ]:
        config = tmp_path / "bad.toml"
        config.write_text(text)
        result = run_cli("train", "--data", str(pydoc_dir), "--config", str(config))
        assert result.returncode == 2 and message in result.stderr, result.stderr
