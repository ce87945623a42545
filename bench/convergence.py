"""Convergence per byte: DDP against DiLoCo with each codec, same seed, data and tokens.

Prints one JSON line per finished run as it goes (so a cut-off run still reports), then
a last line: {"config": {...}, "results": [{"strategy", "codec", "final_val_loss",
"loss_ratio_to_ddp", "bytes_per_worker", "ddp_bytes_ratio", "wall_s", ...}, ...]}.

    python bench/convergence.py --workers 4 --steps 600 --inner-steps 30 --json

Each strategy trains at its own best inner learning rate (`--lr` for DiLoCo, `--ddp-lr`
for DDP, `--overlap-lr` for the overlapped rows; defaults from starling.simulate.
SIMULATION_LR), measured on these defaults: comparing all at one lr would flatter
whichever that lr suits. Both share one inner schedule: warmup over a quarter of the steps,
then warmup-stable-decay (`--warmup-steps`, `--schedule`, `--decay-fraction`; the 30-step
cosine schedule used before flattered DiLoCo). `--sync-power P` makes DiLoCo's rounds
follow the inner lr. `--embedding-rounds N` syncs the vocabulary matrices only every N-th
round (`--embedding-codec` theirs), the rest of the model every round (SimConfig).
DiLoCo workers' AdamW assumes a batch `--moment-batches` times theirs (default: --workers,
DDP's batch; starling.train.BatchScaledAdamW); `--ddp-moment-batches` does the same for
DDP (default 1, plain AdamW). `--optimizer muon` trains every run with Muon on the hidden
weight matrices (starling.train.MuonAdamW).
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import torch

from starling.cli import json_line
from starling.codecs import make_codec
from starling.data import PrepareConfig, TokenDataset, cache_name, prepare
from starling.diloco import DEFAULT_INNER_STEPS, OuterConfig
from starling.simulate import (
    FragmentSpec,
    SimConfig,
    SimResult,
    Simulation,
    plot,
    simulation_lr,
    simulation_moment_batches,
)
from starling.train import OPTIMIZERS, SCHEDULES, TrainConfig, default_warmup

ALL_CODECS = "fp32,bf16,int8,int4,int2,topk,hivemind-fp16,hivemind-uint8"


def kind_of(run: SimConfig | SimResult) -> str:
    """Which of the bench's three lrs a run trains at: ddp, diloco or overlap."""
    return "overlap" if run.overlap and run.strategy == "diloco" else run.strategy


def dataset_for(source: str, cache: Path) -> TokenDataset:
    if (Path(source) / "manifest.json").is_file():
        return TokenDataset(Path(source))
    # Keyed as `starling simulate` keys its cache: the source's files (paths, sizes and
    # times), tokenizer, seed and PREPARE_VERSION.
    cfg = PrepareConfig(source=source)
    target = cache / f"bench-{cache_name(source, cfg.tokenizer, cfg.seed)}"
    if not (target / "manifest.json").is_file():
        prepare(cfg, target, overwrite=True)
    return TokenDataset(target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--steps", type=int, default=600, help="optimizer steps per worker")
    parser.add_argument("--inner-steps", type=int, default=DEFAULT_INNER_STEPS, help="DiLoCo H")
    parser.add_argument("--codecs", default=ALL_CODECS)
    parser.add_argument(
        "--overlap-codecs", default="int4", help="also run these with the one-round-delayed update"
    )
    parser.add_argument(
        "--overlap-steps",
        type=int,
        help="the overlapped rows' mean arrives after this many inner steps of the next "
        "round (default: at its end)",
    )
    parser.add_argument("--data", default="embedded")
    parser.add_argument("--model", default="tiny")
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8, help="sequences per worker step")
    # Each strategy trains at its own best lr (starling.simulate.SIMULATION_LR has the sweeps).
    parser.add_argument(
        "--lr", type=float, help="DiLoCo's inner AdamW peak lr (default: the model's tuned one)"
    )
    parser.add_argument(
        "--ddp-lr", type=float, help="DDP's AdamW peak lr (default: the model's tuned one)"
    )
    parser.add_argument(
        "--overlap-lr", type=float, help="the overlapped rows' inner lr (default: tuned)"
    )
    parser.add_argument(
        "--warmup-steps", type=int, help="inner warmup steps (default: a quarter of --steps)"
    )
    parser.add_argument(
        "--schedule",
        default=TrainConfig.schedule,
        help=f"inner lr after warmup: {', '.join(SCHEDULES)}",
    )
    parser.add_argument(
        "--decay-fraction",
        type=float,
        default=TrainConfig.decay_fraction,
        help="wsd: the last fraction of steps, where the lr decays",
    )
    parser.add_argument("--beta2", type=float, default=TrainConfig().beta2, help="inner AdamW β2")
    parser.add_argument(
        "--optimizer",
        default=TrainConfig.optimizer,
        help=f"every run's inner optimizer: {', '.join(OPTIMIZERS)}",
    )
    parser.add_argument(
        "--moment-batches",
        type=float,
        help="DiLoCo workers' AdamW assumes a batch this many times their step's "
        "(default: --workers, DDP's batch; 1: plain AdamW)",
    )
    parser.add_argument(
        "--ddp-moment-batches", type=float, default=1.0, help="the same for DDP (1: AdamW)"
    )
    parser.add_argument("--outer-lr", type=float, default=OuterConfig().lr)
    parser.add_argument("--outer-momentum", type=float, default=OuterConfig().momentum)
    parser.add_argument(
        "--feedback-decay", type=float, default=1.0, help="error feedback's decay (codecs)"
    )
    parser.add_argument(
        "--sync-power",
        type=float,
        default=0.0,
        help="DiLoCo round lengths follow the inner lr^P (0: fixed H; see SimConfig)",
    )
    parser.add_argument(
        "--embedding-rounds",
        type=int,
        default=1,
        help="DiLoCo's vocabulary matrices sync every N-th round, the rest every round",
    )
    parser.add_argument(
        "--embedding-codec", help="the vocabulary matrices' codec (default: the row's codec)"
    )
    parser.add_argument(
        "--fragment",
        action="append",
        default=[],
        help="PATTERN@EVERY[@CODEC], repeatable: DiLoCo's parameters whose name matches "
        "the regex (no '@' in it) sync every N-th round (see SimConfig.fragments)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu", help="where replicas train (cpu, cuda)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    parser.add_argument("--cache-dir", default=str(Path.home() / ".cache" / "starling"))
    parser.add_argument("--plot", default=None, help="PNG of loss vs tokens and vs bytes")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.lr is None:
        args.lr = simulation_lr(args.model, "diloco")
    if args.ddp_lr is None:
        args.ddp_lr = simulation_lr(args.model, "ddp")
    if args.overlap_lr is None:
        args.overlap_lr = simulation_lr(args.model, "diloco", overlap=True)
    if args.moment_batches is None:
        args.moment_batches = simulation_moment_batches("diloco", args.workers)
    if args.warmup_steps is None:
        args.warmup_steps = default_warmup(args.steps)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        train_cfg = TrainConfig(
            steps=args.steps,
            batch_tokens=args.batch_size * args.seq_len,
            micro_batch_size=args.batch_size,
            seq_len=args.seq_len,
            lr=args.lr,
            warmup_steps=args.warmup_steps,
            schedule=args.schedule,
            decay_fraction=args.decay_fraction,
            beta2=args.beta2,
            optimizer=args.optimizer,
            seed=args.seed,
            device=args.device,
        )
        lr_of = {"ddp": args.ddp_lr, "diloco": args.lr, "overlap": args.overlap_lr}
        moments_of = {
            "ddp": args.ddp_moment_batches,
            "diloco": args.moment_batches,
            "overlap": args.moment_batches,
        }
        train_cfgs = {
            kind: replace(train_cfg, lr=lr, moment_batches=moments_of[kind])
            for kind, lr in lr_of.items()
        }
        outer = OuterConfig(lr=args.outer_lr, momentum=args.outer_momentum)
        fragments = tuple(FragmentSpec.parse(f) for f in args.fragment)
        runs = [SimConfig(strategy="ddp", workers=args.workers, steps=args.steps, model=args.model)]
        variants = [(codec, False) for codec in args.codecs.split(",")]
        variants += [(codec, True) for codec in filter(None, args.overlap_codecs.split(","))]
        for codec, _ in variants:
            make_codec(codec)  # an unknown codec fails here, before any run
        runs += [
            SimConfig(
                strategy="diloco",
                workers=args.workers,
                steps=args.steps,
                inner_steps=args.inner_steps,
                codec=codec,
                outer=outer,
                feedback_decay=args.feedback_decay,
                model=args.model,
                overlap=overlap,
                overlap_steps=args.overlap_steps if overlap else None,
                sync_power=args.sync_power,
                embedding_rounds=args.embedding_rounds,
                embedding_codec=args.embedding_codec,
                fragments=fragments,
            )
            for codec, overlap in variants
        ]
    except ValueError as err:
        parser.error(str(err))
    dataset = dataset_for(args.data, Path(args.cache_dir))
    try:  # a fragment pattern that matches no parameter fails here, before any run
        Simulation(runs[-1], train_cfgs[kind_of(runs[-1])], dataset)
    except ValueError as err:
        parser.error(str(err))
    results = []
    for sim_cfg in runs:
        result = Simulation(sim_cfg, train_cfgs[kind_of(sim_cfg)], dataset).run()
        results.append(result)
        row = {k: v for k, v in result.to_dict().items() if k != "history"}
        print(json_line(row), flush=True)
        print(
            f"# {result.strategy} {result.codec}: val {result.final_val_loss:.4f}, "
            f"{result.bytes_per_worker:,} B/worker, {result.wall_s:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    ddp = results[0]
    table = [
        {
            "strategy": r.strategy,
            "codec": r.codec,
            "overlap": r.overlap,
            "overlap_steps": args.overlap_steps if r.overlap else None,
            "inner_steps": r.inner_steps,
            "lr": lr_of[kind_of(r)],
            "moment_batches": moments_of[kind_of(r)],
            "sync_power": args.sync_power if r.strategy == "diloco" else 0.0,
            "rounds": r.rounds,
            "embedding_rounds": r.embedding_rounds,
            "embedding_codec": r.embedding_codec,
            # PATTERN@EVERY@CODEC of every fragment but the rest (SimResult.fragments), the
            # vocabulary's from --embedding-rounds included
            "fragments": [
                f"{f['pattern']}@{f['every']}@{f['codec']}" for f in r.fragments if f["pattern"]
            ],
            "tokens": r.tokens,
            "final_val_loss": round(r.final_val_loss, 4),
            "loss_ratio_to_ddp": round(r.final_val_loss / ddp.final_val_loss, 4),
            "bytes_per_worker": r.bytes_per_worker,
            # None for a run that diverged before its first message
            "ddp_bytes_ratio": round(ddp.bytes_per_worker / r.bytes_per_worker, 1)
            if r.bytes_per_worker
            else None,
            "wall_s": round(r.wall_s, 1),
        }
        for r in results
    ]
    if args.plot:
        plot(results, args.plot)
    config = {k: v for k, v in vars(args).items() if k not in ("json", "plot", "cache_dir")}
    print(json_line({"config": config, "results": table}))


if __name__ == "__main__":
    main()
