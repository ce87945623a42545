"""Inner-loop throughput: Starling's InnerTrainer against a bare PyTorch loop.

Same model, batch, data and device, in one run; prints one JSON object as its last line:
  {"model", "device", "batch_tokens", "optimizer", "starling_tokens_per_s",
   "bare_tokens_per_s", "ratio", "orthogonalize_share"}
The goal (issue 6) is ratio >= 0.97: our loop adds no overhead a user would notice.
`--optimizer muon` times MuonAdamW against torch.optim.Muon on the hidden matrices and
AdamW on the rest, and orthogonalize_share is the part of our median step spent in
Newton–Schulz (every hidden matrix orthogonalized once, timed alone; null for AdamW):
its cost does not shrink with the step's tokens. torch.optim.Muon always runs
Newton–Schulz in bf16, ours in the step's precision (`--precision bf16`: bf16 autocast
for both loops, and our Newton–Schulz in bf16).

    python bench/throughput.py --model tiny --steps 20 --json
    python bench/throughput.py --model 125m --optimizer muon --json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from starling.model import build_model, model_config
from starling.train import (
    PRECISIONS,
    InnerTrainer,
    TrainConfig,
    autocast_dtype,
    muon_param_groups,
    orthogonalize,
    select_device,
)


def synthetic_batches(vocab: int, batch: int, seq_len: int, seed: int):
    gen = torch.Generator().manual_seed(seed)
    while True:
        chunk = torch.randint(0, vocab, (batch, seq_len + 1), generator=gen)
        yield chunk[:, :-1], chunk[:, 1:]


def time_starling(cfg: TrainConfig, preset: str, device: torch.device, steps: int) -> list[float]:
    model = build_model(model_config(preset, max_seq_len=cfg.seq_len), seed=0, device=device)
    trainer = InnerTrainer(model, cfg, device)
    batches = synthetic_batches(model.config.vocab_size, cfg.micro_batch_size, cfg.seq_len, 0)
    trainer.step(batches)  # warm-up: allocator, kernels, compile
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        trainer.step(batches)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def bare_optimizers(
    model: torch.nn.Module, cfg: TrainConfig, device: torch.device
) -> list[torch.optim.Optimizer]:
    """AdamW on everything; for Muon, torch.optim.Muon (its update scaled to AdamW's RMS,
    as MuonAdamW's) on the hidden matrices and AdamW on the rest."""
    fused = device.type == "cuda"
    if cfg.optimizer != "muon":
        return [torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=fused)]
    hidden, *rest = muon_param_groups(model, cfg.weight_decay)
    muon = torch.optim.Muon(
        hidden["params"], lr=cfg.lr, weight_decay=cfg.weight_decay, adjust_lr_fn="match_rms_adamw"
    )
    return [muon, torch.optim.AdamW(rest, lr=cfg.lr, fused=fused)]


def time_orthogonalize(preset: str, cfg: TrainConfig, device: torch.device, steps: int) -> float:
    """Median seconds to orthogonalize every hidden matrix once, as a Muon step does."""
    model = build_model(model_config(preset, max_seq_len=cfg.seq_len), seed=0, device=device)
    matrices = [torch.randn_like(p) for p in muon_param_groups(model, 0.0)[0]["params"]]
    dtype = autocast_dtype(device, cfg.precision) or torch.float32  # as MuonAdamW's
    times = []
    for _ in range(steps + 1):  # the first is a warm-up
        start = time.perf_counter()
        for matrix in matrices:
            orthogonalize(matrix, dtype=dtype)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times[1:])


def time_bare(cfg: TrainConfig, preset: str, device: torch.device, steps: int) -> list[float]:
    """The loop a PyTorch user writes by hand: no schedule, no stats."""
    model = build_model(model_config(preset, max_seq_len=cfg.seq_len), seed=0, device=device)
    optimizers = bare_optimizers(model, cfg, device)
    batches = synthetic_batches(model.config.vocab_size, cfg.micro_batch_size, cfg.seq_len, 0)
    amp = autocast_dtype(device, cfg.precision)

    def step() -> None:
        for _ in range(cfg.accumulation_steps):
            x, y = next(batches)
            x, y = x.to(device), y.to(device)
            with torch.autocast(device.type, dtype=amp or torch.float32, enabled=amp is not None):
                logits = model(x)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), y.flatten())
            (loss / cfg.accumulation_steps).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        for opt in optimizers:
            opt.step()
            opt.zero_grad(set_to_none=True)

    step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--batch-tokens", type=int, default=8192)
    parser.add_argument("--micro-batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--optimizer", default="adamw", choices=["adamw", "muon"])
    parser.add_argument(
        "--precision",
        default="auto",
        choices=PRECISIONS,
        help="auto: bf16 autocast on CUDA; bf16 also runs our Newton–Schulz in bf16",
    )
    parser.add_argument("--repeats", type=int, default=2, help="alternating runs of each loop")
    parser.add_argument("--json", action="store_true", help="only the JSON line")
    args = parser.parse_args()

    cfg = TrainConfig(
        batch_tokens=args.batch_tokens,
        micro_batch_size=args.micro_batch_size,
        seq_len=args.seq_len,
        warmup_steps=0,
        steps=args.steps + 1,
        device=args.device,
        optimizer=args.optimizer,
        precision=args.precision,
    )
    device = select_device(cfg.device)
    ours: list[float] = []
    bare: list[float] = []
    # Alternate the two loops so drift (thermal, other load) hits both alike.
    for _ in range(args.repeats):
        ours += time_starling(cfg, args.model, device, args.steps)
        bare += time_bare(cfg, args.model, device, args.steps)
    result = {
        "model": args.model,
        "device": str(device),
        "batch_tokens": cfg.batch_tokens,
        "optimizer": cfg.optimizer,
        "precision": cfg.precision,
        "steps_timed": len(ours),
        "starling_tokens_per_s": cfg.batch_tokens / statistics.median(ours),
        "bare_tokens_per_s": cfg.batch_tokens / statistics.median(bare),
    }
    result["ratio"] = result["starling_tokens_per_s"] / result["bare_tokens_per_s"]
    result["orthogonalize_share"] = (
        time_orthogonalize(args.model, cfg, device, args.steps) / statistics.median(ours)
        if cfg.optimizer == "muon"
        else None
    )
    if not args.json:
        for key, value in result.items():
            print(f"{key:>24}: {value}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
