"""The `starling` command line: one sub-app per group, top-level commands for the rest.

Bad input ends with one `error: ...` line on stderr and exit code 2, never a traceback.
Environment variables are read here (and only here), never deep in the library.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import sys
import tomllib
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.markup import escape

from . import __version__
from .checkpoint import CheckpointError
from .data import (
    DataSourceError,
    PrepareConfig,
    ShardIntegrityError,
    TokenDataset,
    cache_name,
    prepare,
)
from .data.shards import TOKENIZER_FILE
from .progress import PrepareProgress, SimProgress, TrainProgress

app = typer.Typer(
    name="starling",
    help="Pretrain one language model together over the ordinary internet.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
data_app = typer.Typer(help="Prepare and check training data.", no_args_is_help=True)
app.add_typer(data_app, name="data")

err_console = Console(stderr=True)

EXIT_BAD_INPUT = 2


def json_line(value: Any) -> str:
    """`value` as one line of JSON, every NaN or infinite float (a diverged loss, a ratio
    to one) as null: JSON has no such numbers, and strict parsers refuse Python's NaN."""

    def finite(item: Any) -> Any:
        if isinstance(item, float) and not math.isfinite(item):
            return None
        if isinstance(item, dict):
            return {key: finite(inner) for key, inner in item.items()}
        if isinstance(item, list | tuple):
            return [finite(inner) for inner in item]
        return item

    return json.dumps(finite(value), allow_nan=False)


class UsageError(ValueError):
    """Bad input found by the CLI itself."""


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "starling"


def _version(value: bool) -> None:
    if value:
        print(f"starling {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print version.")
    ] = False,
) -> None:
    pass


# --------------------------------------------------------------------------- data


@data_app.command("prepare")
def data_prepare(
    source: Annotated[
        str,
        typer.Option(
            help="embedded (King James Bible), embedded:pydoc, a file / directory / glob "
            "of .txt .jsonl .parquet, or hf:DATASET[:CONFIG]."
        ),
    ],
    out: Annotated[Path, typer.Option(help="Output directory (created).")],
    tokenizer: Annotated[
        str, typer.Option(help="bpe:N trains a byte-level BPE of N tokens; bytes: raw bytes.")
    ] = "bpe:8192",
    seed: Annotated[int, typer.Option(help="Seed of the train/validation split.")] = 0,
    val_fraction: Annotated[float, typer.Option(help="Documents held out.")] = 0.02,
    shard_tokens: Annotated[int, typer.Option(help="Tokens per shard file.")] = 262_144,
    text_field: Annotated[str, typer.Option(help="Field / column of jsonl, parquet, hf.")] = "text",
    max_documents: Annotated[
        int | None, typer.Option(help="hf: stop after this many documents.")
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an earlier prepared dataset.")] = False,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print the manifest summary as JSON.")
    ] = False,
) -> None:
    """Tokenize a text source into fixed-size token shards with a manifest."""
    cfg = PrepareConfig(
        source=source,
        tokenizer=tokenizer,
        seed=seed,
        val_fraction=val_fraction,
        shard_tokens=shard_tokens,
        text_field=text_field,
        hf_max_documents=max_documents,
    )
    with PrepareProgress(err_console) as progress:
        manifest = prepare(cfg, out, progress=progress.update, overwrite=overwrite)
    train_tokens, val_tokens = manifest.tokens("train"), manifest.tokens("val")
    summary: dict[str, Any] = {
        "out": str(out),
        "tokenizer": cfg.tokenizer,
        "vocab_size": manifest.vocab_size,
        "tokenizer_sha256": manifest.tokenizer_sha256,
        "documents": manifest.documents,
        "tokens": {split: manifest.tokens(split) for split in ("train", "val")},
        "shards": {split: len(manifest.shards[split]) for split in ("train", "val")},
    }
    if json_output:
        print(json_line(summary))
    else:
        print(
            f"prepared {out}: {train_tokens:,} train tokens in "
            f"{len(manifest.shards['train'])} shards, {val_tokens:,} validation "
            f"tokens; vocabulary {manifest.vocab_size:,} ({manifest.tokenizer_sha256[:12]}…)"
        )


@data_app.command("verify")
def data_verify(
    data_dir: Annotated[Path, typer.Argument(help="A prepared data directory.")],
) -> None:
    """Check every shard and the tokenizer against the manifest's SHA-256."""
    dataset = TokenDataset(data_dir, verify=True)
    m = dataset.manifest
    n = len(m.shards["train"]) + len(m.shards["val"])
    print(f"ok: {n} shards, {m.tokens('train') + m.tokens('val'):,} tokens, tokenizer verified")


def resolve_data(
    data: str, cache_dir: Path, tokenizer: str, seed: int, sources: bool = False
) -> Path:
    """A prepared directory as given; else the embedded corpus (or, with `sources`, a
    text file / directory / glob) prepared once into the cache."""
    if (Path(data) / "manifest.json").is_file():
        return Path(data)
    if data.startswith("embedded") or sources:
        target = cache_dir / "data" / cache_name(data, tokenizer, seed)
        if not (target / "manifest.json").is_file():
            err_console.print(f"preparing {data} into {target} (once)")
            with PrepareProgress(err_console) as progress:
                prepare(
                    PrepareConfig(source=data, tokenizer=tokenizer, seed=seed),
                    target,
                    progress=progress.update,
                    overwrite=True,
                )
        return target
    raise UsageError(
        f"--data {data!r} is neither a prepared directory nor 'embedded': "
        "run `starling data prepare` first"
    )


# -------------------------------------------------------------------------- train


def _load_toml(path: Path | None) -> dict[str, Any]:
    if path is None:
        return {}
    try:
        with path.open("rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as err:
        raise UsageError(f"config file {path}: {err}") from None
    unknown = set(data) - {"model", "train", "data"}
    if unknown:
        raise UsageError(f"config file {path}: unknown sections {sorted(unknown)}")
    return data


def _merged(toml_section: dict[str, Any], cli: dict[str, Any]) -> dict[str, Any]:
    """TOML values, overridden by the options given on the command line."""
    return {**toml_section, **{k: v for k, v in cli.items() if v is not None}}


@app.command("train")
def train_command(
    data: Annotated[
        str | None, typer.Option(help="Prepared data directory, or 'embedded'.")
    ] = None,
    model: Annotated[str | None, typer.Option(help="Preset: tiny small 125m 350m 1b.")] = None,
    steps: Annotated[int | None, typer.Option(help="Optimizer steps.")] = None,
    config: Annotated[
        Path | None, typer.Option(help="TOML file with [model] [train] [data]; options override.")
    ] = None,
    dim: Annotated[int | None, typer.Option(help="Override the preset's width.")] = None,
    layers: Annotated[int | None, typer.Option(help="Override the preset's depth.")] = None,
    heads: Annotated[int | None, typer.Option(help="Override the attention heads.")] = None,
    kv_heads: Annotated[int | None, typer.Option(help="Key/value heads (GQA).")] = None,
    ffn_dim: Annotated[int | None, typer.Option(help="SwiGLU hidden width.")] = None,
    batch_tokens: Annotated[int | None, typer.Option(help="Tokens per optimizer step.")] = None,
    micro_batch_size: Annotated[int | None, typer.Option(help="Sequences per pass.")] = None,
    seq_len: Annotated[int | None, typer.Option(help="Tokens per sequence.")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate.")] = None,
    warmup_steps: Annotated[int | None, typer.Option(help="Linear warmup steps.")] = None,
    schedule: Annotated[str | None, typer.Option(help="cosine, wsd or constant.")] = None,
    optimizer: Annotated[
        str | None, typer.Option(help="adamw, or muon (Muon on the hidden matrices).")
    ] = None,
    weight_decay: Annotated[float | None, typer.Option(help="AdamW weight decay.")] = None,
    grad_clip: Annotated[float | None, typer.Option(help="Max gradient norm (0: off).")] = None,
    eval_every: Annotated[int | None, typer.Option(help="Steps between evaluations.")] = None,
    eval_batches: Annotated[int | None, typer.Option(help="Validation batches.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed of weights and data order.")] = None,
    device: Annotated[str | None, typer.Option(help="auto, cpu, cuda or mps.")] = None,
    precision: Annotated[str | None, typer.Option(help="auto, fp32 or bf16.")] = None,
    compile_model: Annotated[
        bool | None, typer.Option("--compile/--no-compile", help="torch.compile the model.")
    ] = None,
    activation_checkpointing: Annotated[
        bool | None,
        typer.Option(
            "--activation-checkpointing/--no-activation-checkpointing",
            help="Recompute activations in backward to save memory.",
        ),
    ] = None,
    out: Annotated[Path, typer.Option(help="Checkpoint directory.")] = Path("runs/train"),
    cache_dir: Annotated[
        Path | None, typer.Option(help="Where 'embedded' data is prepared once.")
    ] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Last output line: a JSON summary.")
    ] = False,
) -> None:
    """Train on one machine: the single-node baseline that distributed runs are compared with."""
    import torch

    from .checkpoint import save_checkpoint
    from .data import SequenceBatcher, evaluation_batches
    from .model import build_model, model_config
    from .train import TrainConfig, select_device, train

    file_cfg = _load_toml(config)
    model_section = _merged(
        file_cfg.get("model", {}),
        {
            "preset": model,
            "dim": dim,
            "n_layers": layers,
            "n_heads": heads,
            "n_kv_heads": kv_heads,
            "ffn_dim": ffn_dim,
            "activation_checkpointing": activation_checkpointing,
        },
    )
    train_section = _merged(
        file_cfg.get("train", {}),
        {
            "steps": steps,
            "batch_tokens": batch_tokens,
            "micro_batch_size": micro_batch_size,
            "seq_len": seq_len,
            "lr": lr,
            "warmup_steps": warmup_steps,
            "schedule": schedule,
            "optimizer": optimizer,
            "weight_decay": weight_decay,
            "grad_clip": grad_clip,
            "eval_every": eval_every,
            "eval_batches": eval_batches,
            "seed": seed,
            "device": device,
            "precision": precision,
            "compile": compile_model,
        },
    )
    data_section = _merged(file_cfg.get("data", {}), {"path": data})
    try:
        train_cfg = TrainConfig(**train_section)
    except TypeError as err:
        raise UsageError(f"[train] config: {err}") from None
    data_spec = str(data_section.get("path", "embedded"))
    tokenizer_spec = str(data_section.get("tokenizer", "bpe:8192"))

    data_dir = resolve_data(data_spec, cache_dir or default_cache_dir(), tokenizer_spec, 0)
    dataset = TokenDataset(data_dir)
    preset = str(model_section.pop("preset", "tiny"))
    # The model's vocabulary is the tokenizer's; its context at least the training length.
    model_section["vocab_size"] = dataset.manifest.vocab_size
    try:
        mcfg = model_config(preset, **model_section)
    except TypeError as err:
        raise UsageError(f"[model] config: {err}") from None
    if train_cfg.seq_len > mcfg.max_seq_len:
        mcfg = dataclasses.replace(mcfg, max_seq_len=train_cfg.seq_len)

    torch_device = select_device(train_cfg.device)
    torch.manual_seed(train_cfg.seed)
    net = build_model(mcfg, seed=train_cfg.seed, device=torch_device)
    batches = SequenceBatcher(
        dataset.split("train"), train_cfg.seq_len, train_cfg.micro_batch_size, train_cfg.seed
    )
    val = evaluation_batches(
        dataset.split("val"), train_cfg.seq_len, train_cfg.micro_batch_size, train_cfg.eval_batches
    )
    err_console.print(
        f"model {preset}: {net.num_parameters():,} parameters on {torch_device}; "
        f"{train_cfg.steps} steps × {train_cfg.batch_tokens:,} tokens "
        f"({train_cfg.accumulation_steps} micro-batches of {train_cfg.micro_batch_size}×"
        f"{train_cfg.seq_len}); data {data_dir}"
    )
    with TrainProgress(err_console, train_cfg.steps) as progress:
        result = train(net, train_cfg, batches, val, torch_device, on_step=progress.update)

    sha = save_checkpoint(
        out,
        net,
        {
            "kind": "train",
            "preset": preset,
            "step": result.steps,
            "tokens": result.tokens,
            "train": train_cfg.to_dict(),
            "data": {"dir": str(data_dir), "tokenizer_sha256": dataset.manifest.tokenizer_sha256},
            "val_history": result.val_history,
        },
    )
    shutil.copyfile(data_dir / TOKENIZER_FILE, out / TOKENIZER_FILE)
    summary = {
        **{k: v for k, v in result.to_dict().items() if k != "val_history"},
        "model": preset,
        "parameters": net.num_parameters(),
        "device": str(torch_device),
        "checkpoint": str(out),
        "checkpoint_sha256": sha,
    }
    err_console.print(
        f"validation loss {result.initial_val_loss:.4f} → {result.final_val_loss:.4f} "
        f"after {result.tokens:,} tokens ({result.tokens_per_s:,.0f} tokens/s); "
        f"checkpoint {out}"
    )
    if json_output:
        print(json_line(summary))


# ----------------------------------------------------------------------- simulate


@app.command("simulate")
def simulate_command(
    strategy: Annotated[str, typer.Option(help="ddp or diloco.")] = "diloco",
    workers: Annotated[int, typer.Option(help="Virtual workers (K).")] = 4,
    steps: Annotated[int, typer.Option(help="Optimizer steps per worker.")] = 600,
    inner_steps: Annotated[
        int | None, typer.Option(help="DiLoCo H: inner steps per round.")
    ] = None,
    round_tokens: Annotated[
        int | None, typer.Option(help="Close rounds on this many tokens (all workers), not H.")
    ] = None,
    codec: Annotated[
        str | None,
        typer.Option(
            help="fp32 bf16 int8[:B] int4[:B] int2[:B] topk[:K/CHUNK] topk2[:K/CHUNK] "
            "hivemind-fp16 hivemind-uint8"
        ),
    ] = None,
    model: Annotated[str, typer.Option(help="Model preset.")] = "tiny",
    data: Annotated[
        str, typer.Option(help="Text file, directory, prepared dir, or embedded.")
    ] = "embedded",
    tokenizer: Annotated[str, typer.Option(help="Tokenizer when --data is text.")] = "bpe:8192",
    seq_len: Annotated[int, typer.Option(help="Tokens per sequence.")] = 64,
    batch_size: Annotated[int, typer.Option(help="Sequences per worker step.")] = 8,
    lr: Annotated[
        float | None,
        typer.Option(help="Inner AdamW peak lr (default: tuned for the preset and strategy)."),
    ] = None,
    warmup_steps: Annotated[
        int | None, typer.Option(help="Inner warmup steps (default: a quarter of --steps).")
    ] = None,
    schedule: Annotated[
        str | None,
        typer.Option(help="Inner lr schedule after the warmup: wsd (default), cosine, constant."),
    ] = None,
    decay_fraction: Annotated[
        float | None,
        typer.Option(help="wsd: the last fraction of steps, where the lr decays (default 0.2)."),
    ] = None,
    beta2: Annotated[
        float | None, typer.Option(help="Inner AdamW β2 (default: the runs' default).")
    ] = None,
    optimizer: Annotated[
        str | None,
        typer.Option(help="Inner optimizer: adamw (default), or muon on the hidden matrices."),
    ] = None,
    moment_batches: Annotated[
        float | None,
        typer.Option(
            help="The inner AdamW's second moment assumes a batch this many times the "
            "step's (default: --workers for diloco, so its steps are preconditioned like "
            "DDP's; 1 for ddp; 1 is plain AdamW)."
        ),
    ] = None,
    outer_lr: Annotated[float | None, typer.Option(help="Outer learning rate.")] = None,
    outer_momentum: Annotated[float | None, typer.Option(help="Outer Nesterov momentum.")] = None,
    feedback_decay: Annotated[
        float, typer.Option(help="Error feedback's decay (1: plain; topk2 wants 0.95).")
    ] = 1.0,
    speeds: Annotated[
        str | None, typer.Option(help="Relative worker speeds, e.g. 1,1,0.5,0.25.")
    ] = None,
    dropout: Annotated[float, typer.Option(help="Chance a worker misses a round.")] = 0.0,
    overlap: Annotated[
        bool, typer.Option("--overlap/--no-overlap", help="One-round-delayed outer update.")
    ] = False,
    overlap_steps: Annotated[
        int | None,
        typer.Option(
            help="With --overlap: the previous round's mean arrives after this many inner "
            "steps of the next (default: at its end, a whole round late)."
        ),
    ] = None,
    sync_power: Annotated[
        float,
        typer.Option(
            help="Round lengths follow the inner lr: each round spans an equal share of "
            "Σ lr^P (0: every round H steps; 1: rounds lengthen as the lr decays)."
        ),
    ] = 0.0,
    embedding_rounds: Annotated[
        int,
        typer.Option(
            help="The vocabulary matrices (embedding and output head) sync only every N-th "
            "round, the rest of the model every round (1: all together)."
        ),
    ] = 1,
    embedding_codec: Annotated[
        str | None, typer.Option(help="The vocabulary matrices' codec (default: --codec).")
    ] = None,
    fragment: Annotated[
        list[str] | None,
        typer.Option(
            help="diloco: PATTERN@EVERY[@CODEC]: parameters whose name matches the regex (no "
            "'@' in it) sync only every N-th round (with their own codec); repeat it, the "
            "first match wins, after --embedding-rounds; the rest syncs every round. E.g. "
            "'mlp@3' or 'self_attn@1@int4'."
        ),
    ] = None,
    eval_every: Annotated[int, typer.Option(help="Rounds (ddp: steps) between evals.")] = 0,
    eval_batches: Annotated[int, typer.Option(help="Validation batches.")] = 8,
    seed: Annotated[int, typer.Option(help="Seed of weights, data and dropouts.")] = 0,
    device: Annotated[
        str,
        typer.Option(
            help="Where the replicas train: cpu (bit-reproducible), cuda, mps or auto. The "
            "outer step runs on the CPU either way."
        ),
    ] = "cpu",
    plot_path: Annotated[
        Path | None, typer.Option("--plot", help="Write a PNG of loss vs tokens and bytes.")
    ] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Where text data is prepared.")] = None,
    json_output: Annotated[
        bool, typer.Option("--json", help="Last output line: a JSON summary.")
    ] = False,
) -> None:
    """Compare strategies (DDP, DiLoCo, codecs, H, speeds, dropouts) on this machine."""
    from .diloco import DEFAULT_CODEC, DEFAULT_INNER_STEPS, OuterConfig
    from .simulate import (
        FragmentSpec,
        SimConfig,
        Simulation,
        fragment_label,
        plot,
        simulation_lr,
        simulation_moment_batches,
    )
    from .train import TrainConfig, default_warmup

    try:
        speed_values = tuple(float(x) for x in speeds.split(",")) if speeds else ()
    except ValueError:
        raise UsageError(f"--speeds {speeds!r}: give comma-separated numbers") from None
    if strategy == "ddp":
        # DDP averages every step's gradients with every worker present: these would be
        # ignored, and a comparison that seemed to include them would not.
        diloco_only = {
            "--inner-steps": inner_steps is not None,
            "--round-tokens": round_tokens is not None,
            "--codec": codec is not None,
            "--outer-lr": outer_lr is not None,
            "--outer-momentum": outer_momentum is not None,
            "--feedback-decay": feedback_decay != 1.0,
            "--speeds": bool(speeds),
            "--dropout": dropout != 0.0,
            "--overlap": overlap,
            "--overlap-steps": overlap_steps is not None,
            "--sync-power": sync_power != 0.0,
            "--embedding-rounds": embedding_rounds != 1,
            "--embedding-codec": embedding_codec is not None,
            "--fragment": bool(fragment),
        }
        given = [flag for flag, is_set in diloco_only.items() if is_set]
        if given:
            raise UsageError(f"{', '.join(given)}: only for --strategy diloco")
    defaults = OuterConfig()
    sim_cfg = SimConfig(
        strategy=strategy,
        workers=workers,
        steps=steps,
        inner_steps=DEFAULT_INNER_STEPS if inner_steps is None else inner_steps,
        round_tokens=round_tokens,
        codec=DEFAULT_CODEC if codec is None else codec,
        outer=OuterConfig(
            lr=defaults.lr if outer_lr is None else outer_lr,
            momentum=defaults.momentum if outer_momentum is None else outer_momentum,
        ),
        feedback_decay=feedback_decay,
        speeds=speed_values,
        dropout=dropout,
        overlap=overlap,
        overlap_steps=overlap_steps,
        sync_power=sync_power,
        embedding_rounds=embedding_rounds,
        embedding_codec=embedding_codec,
        fragments=tuple(FragmentSpec.parse(f) for f in fragment or ()),
        eval_every=eval_every,
        model=model,
    )
    train_cfg = TrainConfig(
        steps=steps,
        batch_tokens=batch_size * seq_len,
        micro_batch_size=batch_size,
        seq_len=seq_len,
        lr=simulation_lr(model, strategy, overlap) if lr is None else lr,
        warmup_steps=default_warmup(steps) if warmup_steps is None else warmup_steps,
        schedule=schedule or TrainConfig.schedule,
        decay_fraction=TrainConfig.decay_fraction if decay_fraction is None else decay_fraction,
        beta2=TrainConfig.beta2 if beta2 is None else beta2,
        optimizer=optimizer or TrainConfig.optimizer,
        moment_batches=simulation_moment_batches(strategy, workers)
        if moment_batches is None
        else moment_batches,
        eval_batches=eval_batches,
        seed=seed,
        device=device,
    )
    data_dir = resolve_data(data, cache_dir or default_cache_dir(), tokenizer, 0, sources=True)
    simulation = Simulation(sim_cfg, train_cfg, TokenDataset(data_dir))
    err_console.print(
        f"simulating {strategy} with {workers} workers"
        + (f", H={sim_cfg.inner_steps}, codec {sim_cfg.codec}" if strategy == "diloco" else "")
        + "".join(
            f", {escape(fragment_label(f.pattern))} "
            + (f"every {f.every} rounds" if f.every > 1 else "every round")
            + (f" ({f.codec})" if f.codec else "")
            for f in sim_cfg.fragment_specs()
            if strategy == "diloco"
        )
        + f": {steps} steps × {train_cfg.batch_tokens:,} tokens per worker, "
        f"model {model} ({simulation.n_params:,} parameters), inner lr {train_cfg.lr:g} "
        f"({train_cfg.warmup_steps} warmup steps, {train_cfg.schedule}), {train_cfg.optimizer}"
        + (f", moment batches {train_cfg.moment_batches:g}" if train_cfg.moment_batches > 1 else "")
    )
    with SimProgress(err_console, steps) as progress:
        result = simulation.run(progress.update)
    if plot_path is not None:
        plot([result], str(plot_path))
    err_console.print(
        f"validation loss {result.initial_val_loss:.4f} → {result.final_val_loss:.4f}; "
        f"{result.bytes_per_worker:,} bytes per worker over {result.rounds} rounds "
        f"in {result.wall_s:.0f} s"
    )
    if result.diverged_at is not None:
        unit = "step" if strategy == "ddp" else "round"
        err_console.print(
            f"diverged in {unit} {result.diverged_at}: training reached NaN or Inf, and the "
            "run stopped there (try a lower --lr or --outer-lr)"
        )
    if json_output:
        summary = {k: v for k, v in result.to_dict().items() if k != "history"}
        extra = {
            "lr": train_cfg.lr,
            "warmup_steps": train_cfg.warmup_steps,
            "schedule": train_cfg.schedule,
            "optimizer": train_cfg.optimizer,
            "moment_batches": train_cfg.moment_batches,
        }
        print(
            json_line(
                {**summary, **extra, "sync_power": sync_power, "overlap_steps": overlap_steps}
            )
        )


# ------------------------------------------------------------------------- status


@app.command("status")
def status_command(
    url: Annotated[
        str,
        typer.Argument(
            help="The run's join URL (starling://host:port?fp=...) or its dashboard "
            "(http://host:port/)."
        ),
    ],
    json_output: Annotated[bool, typer.Option("--json", help="One JSON object.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the coordinator.")] = 10.0,
) -> None:
    """Show a run's summary, as the dashboard's header does: model, state, round, tokens
    of the target with the ETA, loss, join URL; then its peers and latest rounds."""
    if url.startswith(("http://", "https://")):
        summary, recent = _status_over_http(url, timeout)
    elif url.startswith("starling://"):
        summary, recent = _status_over_grpc(url, timeout), None
    else:
        raise UsageError(
            f"{url!r}: give the join URL (starling://...) or the dashboard (http://...)"
        )
    if json_output:
        print(json_line(summary))
        return
    for line in _status_lines(summary, recent):
        print(line)


def _status_over_grpc(url: str, timeout: float) -> dict[str, Any]:
    """The summary the coordinator's gRPC status gives (no loss: see status_json)."""
    import grpc

    from .coordination import CoordinatorClient, status_json

    try:
        with CoordinatorClient(url, timeout=timeout, connect_timeout=timeout) as client:
            return status_json(client.get_status(), client.get_run())
    except grpc.RpcError as err:
        code = err.code().name if hasattr(err, "code") else "UNKNOWN"
        raise ConnectionError(f"coordinator at {url}: {code}") from None


def _status_over_http(url: str, timeout: float) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The dashboard's own /api/status and its latest rounds."""
    import urllib.error
    import urllib.request

    base = url.rstrip("/")

    def get(path: str) -> Any:
        try:
            with urllib.request.urlopen(base + path, timeout=timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as err:
            raise ConnectionError(f"dashboard at {url}: HTTP {err.code} for {path}") from None
        except (urllib.error.URLError, TimeoutError, ValueError) as err:
            raise ConnectionError(f"dashboard at {url}: {err}") from None

    return get("/api/status"), get("/api/rounds?limit=5")["rounds"]


def _status_lines(s: dict[str, Any], recent: list[dict[str, Any]] | None) -> list[str]:
    """The summary for a terminal: the dashboard's header, then peers and rounds."""

    def duration(seconds: float | None) -> str:
        if seconds is None:
            return "-"
        seconds = max(0.0, seconds)
        if seconds < 60:
            return f"{seconds:.1f} s"
        hours, rest = divmod(int(seconds), 3600)
        return f"{hours}h {rest // 60:02d}m" if hours else f"{rest // 60}m {rest % 60:02d}s"

    def loss(value: float | None) -> str:
        return "-" if value is None else f"{value:.4f}"

    lines = [f"run      {s['run']} ({s['run_id']})  {s['state']}"]
    model = s["model"]
    if model is not None:
        layers = f"{model['layers']} layer{'s' if model['layers'] != 1 else ''}"
        lines.append(
            f"model    {model['preset']} · {model['parameters']:,} parameters · "
            f"{layers} × {model['dim']} · codec {s['codec']}"
        )
    share = s["progress"] or 0.0
    filled = round(24 * share)
    pace = s["tokens_per_s"]
    lines.append(
        f"tokens   {'█' * filled}{'░' * (24 - filled)} {s['tokens_trained']:,} of "
        f"{s['target_tokens']:,} ({share:.1%})  ETA {duration(s['eta_s'])}"
        + (f" at {pace:,.0f} tokens/s" if pace else "")
    )
    lines.append(f"round    {s['round']} ({s['phase']}) · {s['rounds_committed']} committed")
    if s["val_loss"] is not None or s["train_loss"] is not None:
        val, train = loss(s["val_loss"]), loss(s["train_loss"])
        lines.append(f"loss     validation {val} · training {train}")
    nodes = s["nodes"]
    lines.append(
        f"peers    {nodes['active']} active ({nodes['owners']} owners, "
        f"{nodes['client_only']} client-only)"
    )
    for peer in s["peers"]:
        role = "owner" if peer["reachable"] else "client-only"
        state = "resyncing" if peer["resync"] else peer["state"]
        lines.append(
            f"  {peer['node_id'][:12]}  {peer['device'] or '?':<12} {role:<11} "
            f"{peer['rounds_contributed']} rounds  {peer['tokens_trained']:,} tokens  {state}"
        )
    commit = s["last_commit"]
    if recent:
        lines.append("rounds   (newest first)")
        for r in recent:
            ratio = r["compression_ratio"]
            excluded = f", {len(r['excluded'])} excluded" if r["excluded"] else ""
            lines.append(
                f"  {r['round']:>5}  {duration(r['duration_s']):>8}  {r['tokens']:,} tokens  "
                f"{len(r['contributors'])} contributors{excluded}  {r['bytes']:,} bytes"
                + (f" ({ratio:.1f}× smaller than fp32)" if ratio else "")
                + f"  val {loss(r['val_loss'])}"
            )
    elif commit is not None:
        excluded = f", {len(commit['excluded'])} excluded" if commit["excluded"] else ""
        lines.append(
            f"commit   round {commit['round']}: {len(commit['contributors'])} contributors"
            f"{excluded}, {commit['tokens']:,} tokens, {commit['bytes']:,} bytes, "
            f"fingerprint {(commit['fingerprint'] or '-')[:16]}"
        )
    ckpt = s["latest_checkpoint"]
    if ckpt is not None:
        lines.append(f"ckpt     round {ckpt['round']} sha256 {ckpt['sha256'][:16]}…")
    lines.append(f"join     starling node join '{s['join_url']}'")
    return lines


# ------------------------------------------------------------------------- export


@app.command("export")
def export_command(
    source: Annotated[Path, typer.Argument(help="A run directory or one checkpoint folder.")],
    out: Annotated[Path, typer.Option(help="Output folder.")],
    format_: Annotated[str, typer.Option("--format", help="Only 'hf' (Hugging Face).")] = "hf",
    tokenizer: Annotated[
        Path | None, typer.Option(help="tokenizer.json (default: the run's data/).")
    ] = None,
) -> None:
    """Export the latest checkpoint as a Hugging Face Llama model (LlamaForCausalLM)."""
    from .export import export_hf

    if format_ != "hf":
        raise UsageError(f"unknown format {format_!r}: only 'hf' is supported")
    if not source.exists():
        raise UsageError(f"{source} does not exist")
    summary = export_hf(source, out, tokenizer)
    err_console.print(
        f"exported checkpoint {summary['round']} ({summary['parameters']:,} parameters) to {out}"
    )
    print(json_line(summary))


# --------------------------------------------------------------------------- main


def _register_command_groups() -> None:
    """The node's and the coordinator's command groups, declared as entry points
    (`starling.commands`) so that the core never imports them."""
    from importlib.metadata import entry_points

    for entry in entry_points(group="starling.commands"):
        app.add_typer(entry.load(), name=entry.name)


def main() -> None:
    try:
        _register_command_groups()
        app()
    except (
        ConnectionError,
        UsageError,
        DataSourceError,
        ShardIntegrityError,
        CheckpointError,
        ValueError,
        OSError,
    ) as err:
        # One plain line (no rich wrapping or markup): scripts and people both read it.
        print(f"error: {err}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
