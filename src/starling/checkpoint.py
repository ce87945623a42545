"""Model checkpoints: safetensors weights + a JSON manifest with their SHA-256.

A checkpoint directory holds
  model.safetensors   the weights (a tied output head is stored once, as the embedding)
  checkpoint.json     {"model": ModelConfig, "sha256": of model.safetensors, ...metadata}
No pickle: loading never executes code from the file, and a flipped byte is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .model import ModelConfig, Transformer

WEIGHTS_FILE = "model.safetensors"
MANIFEST_FILE = "checkpoint.json"
TIED_HEAD = "lm_head.weight"


class CheckpointError(ValueError):
    """A checkpoint that is missing, malformed or does not match its manifest."""


def _atomic_write(path: Path, payload: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with tmp.open("wb") as f:
        f.write(payload)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(out_dir: Path, model: Transformer, metadata: dict[str, Any]) -> str:
    """Write weights and manifest (weights first, so a manifest never names missing
    weights); returns the weights' SHA-256."""
    out_dir.mkdir(parents=True, exist_ok=True)
    tensors = {
        name: tensor.detach().to("cpu", copy=True).contiguous()
        for name, tensor in model.state_dict().items()
        if not (model.config.tie_embeddings and name == TIED_HEAD)
    }
    weights = out_dir / WEIGHTS_FILE
    tmp = weights.with_name(f".{weights.name}.tmp")
    save_file(tensors, str(tmp))
    os.replace(tmp, weights)
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    manifest = {**metadata, "model": model.config.to_dict(), "sha256": sha}
    _atomic_write(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    return sha


def read_checkpoint_manifest(ckpt_dir: Path) -> dict[str, Any]:
    path = ckpt_dir / MANIFEST_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {MANIFEST_FILE}: not a Starling checkpoint")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not valid JSON: {err}") from None
    if not isinstance(data, dict) or "model" not in data or "sha256" not in data:
        raise CheckpointError(f"{path} lacks the model config or the weights' SHA-256")
    return data


def load_checkpoint(
    ckpt_dir: Path, device: torch.device | str = "cpu"
) -> tuple[Transformer, dict[str, Any]]:
    """The model (verified against the manifest's SHA-256) and the manifest."""
    manifest = read_checkpoint_manifest(ckpt_dir)
    weights = ckpt_dir / WEIGHTS_FILE
    if not weights.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {WEIGHTS_FILE}")
    actual = hashlib.sha256(weights.read_bytes()).hexdigest()
    if actual != manifest["sha256"]:
        raise CheckpointError(
            f"{weights} is corrupt: SHA-256 {actual[:12]}… != manifest {manifest['sha256'][:12]}…"
        )
    try:
        cfg = ModelConfig.from_dict(manifest["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt_dir}: bad model config: {err}") from None
    model = Transformer(cfg)
    tensors = load_file(str(weights))
    if cfg.tie_embeddings:
        tensors[TIED_HEAD] = tensors["embed_tokens.weight"]
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"{ckpt_dir}: weights do not fit the model: {err}") from None
    return model.to(device), manifest


# --- global DiLoCo state (θ and the outer momentum) ---------------------------------

STATE_FILE = "state.safetensors"
STATE_MANIFEST_FORMAT = "starling-state/1"


def state_blob(params: torch.Tensor, momentum: torch.Tensor) -> bytes:
    """The global state as one safetensors file: fp32 tensors "params" and "momentum"
    of shape (n,), the flat layout of starling.diloco (what peers and checkpoints hold)."""
    from safetensors.torch import save

    return save({"params": params.float().contiguous(), "momentum": momentum.float().contiguous()})


def state_from_blob(blob: bytes, numel: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(params, momentum) of a state file, refused unless it holds exactly those two
    fp32 vectors of equal length (and `numel` values when given)."""
    from safetensors import SafetensorError
    from safetensors.torch import load

    try:
        tensors = load(blob)
    except (SafetensorError, ValueError, RuntimeError) as err:
        raise CheckpointError(f"not a safetensors state file: {err}") from None
    if set(tensors) != {"params", "momentum"}:
        raise CheckpointError(f"a state holds params and momentum, got {sorted(tensors)}")
    params, momentum = tensors["params"], tensors["momentum"]
    for name, tensor in tensors.items():
        if tensor.dtype != torch.float32 or tensor.dim() != 1:
            raise CheckpointError(f"state tensor {name} must be a fp32 vector")
    if params.numel() != momentum.numel() or (numel is not None and params.numel() != numel):
        raise CheckpointError(
            f"state has {params.numel()} params and {momentum.numel()} momentum values, "
            f"the run's model has {numel}"
        )
    return params, momentum


def save_state_checkpoint(out_dir: Path, blob: bytes, metadata: dict[str, Any]) -> dict[str, Any]:
    """Writes state.safetensors then checkpoint.json (so a manifest never names missing
    weights); returns the manifest."""
    out_dir.mkdir(parents=True, exist_ok=True)
    _atomic_write(out_dir / STATE_FILE, blob)
    manifest = {
        "format": STATE_MANIFEST_FORMAT,
        **metadata,
        "sha256": hashlib.sha256(blob).hexdigest(),
        "size": len(blob),
    }
    _atomic_write(out_dir / MANIFEST_FILE, (json.dumps(manifest, indent=1) + "\n").encode())
    return manifest


def read_state_checkpoint(ckpt_dir: Path) -> tuple[bytes, dict[str, Any]]:
    """The verified state file and its manifest."""
    manifest = read_checkpoint_manifest(ckpt_dir)
    if manifest.get("format") != STATE_MANIFEST_FORMAT:
        raise CheckpointError(f"{ckpt_dir} is not a global-state checkpoint")
    path = ckpt_dir / STATE_FILE
    if not path.is_file():
        raise CheckpointError(f"{ckpt_dir} has no {STATE_FILE}")
    blob = path.read_bytes()
    if hashlib.sha256(blob).hexdigest() != manifest["sha256"]:
        raise CheckpointError(f"{path} is corrupt: its SHA-256 differs from the manifest")
    return blob, manifest
