"""Export a run's global state as a Hugging Face Llama checkpoint.

Starling's model is Llama's architecture with Llama's parameter names (RMSNorm in
fp32, SwiGLU, rotary embeddings in the rotate-half layout, grouped-query attention), so
the export is a renaming under `model.` plus a config.json; `LlamaForCausalLM` then
computes the same logits. Written: config.json, generation_config.json,
model.safetensors (fp32), tokenizer.json and tokenizer_config.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from .checkpoint import CheckpointError, read_state_checkpoint, state_from_blob
from .diloco import load_flat_parameters
from .model import ModelConfig, Transformer, build_model

CHECKPOINTS_DIR = "checkpoints"


def resolve_checkpoint(path: Path) -> Path:
    """A state checkpoint folder: `path` itself, or the newest one of a run directory."""
    if (path / "checkpoint.json").is_file():
        return path
    folder = path / CHECKPOINTS_DIR
    candidates = sorted(p for p in folder.glob("[0-9]*") if (p / "checkpoint.json").is_file())
    if not candidates:
        raise CheckpointError(f"{path} is neither a checkpoint nor a run directory with one")
    return candidates[-1]


def load_state_model(ckpt_dir: Path) -> tuple[Transformer, dict[str, Any]]:
    """The model holding a checkpoint's θ (verified against its SHA-256)."""
    blob, manifest = read_state_checkpoint(ckpt_dir)
    params, _ = state_from_blob(blob)
    try:
        config = ModelConfig.from_dict(manifest["model"])
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{ckpt_dir}: bad model config: {err}") from None
    model = build_model(config)
    load_flat_parameters(model, params)
    return model, manifest


def hf_config(config: ModelConfig) -> dict[str, Any]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": config.vocab_size,
        "hidden_size": config.dim,
        "intermediate_size": config.ffn_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_seq_len,
        "rms_norm_eps": config.norm_eps,
        "rope_theta": config.rope_theta,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": config.tie_embeddings,
        "initializer_range": config.init_std,
        "torch_dtype": "float32",
        "use_cache": True,
    }


def export_hf(source: Path, out_dir: Path, tokenizer: Path | None = None) -> dict[str, Any]:
    """Writes the HF checkpoint of `source` (a checkpoint folder or a run directory) to
    `out_dir`; the tokenizer comes from the run directory's data/ unless given."""
    ckpt_dir = resolve_checkpoint(source)
    model, manifest = load_state_model(ckpt_dir)
    config = model.config
    tensors = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight":
            if config.tie_embeddings:
                continue  # HF ties it to the embedding itself
            tensors[name] = tensor.contiguous()
        else:
            tensors[f"model.{name}"] = tensor.contiguous()
    if tokenizer is None:
        run_dir = ckpt_dir.parent.parent
        tokenizer = run_dir / "data" / "tokenizer.json"
    if not tokenizer.is_file():
        raise CheckpointError(f"no tokenizer at {tokenizer}: pass the run directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    (out_dir / "config.json").write_text(json.dumps(hf_config(config), indent=2) + "\n")
    eos = _eos_token(tokenizer)
    (out_dir / "generation_config.json").write_text(
        json.dumps({"eos_token_id": eos[1]} if eos else {}, indent=2) + "\n"
    )
    shutil.copyfile(tokenizer, out_dir / "tokenizer.json")
    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": config.max_seq_len,
        "clean_up_tokenization_spaces": False,
    }
    if eos:
        tokenizer_config["eos_token"] = eos[0]
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
    return {
        "checkpoint": str(ckpt_dir),
        "round": manifest.get("round"),
        "fingerprint": manifest.get("fingerprint"),
        "parameters": model.num_parameters(),
        "out": str(out_dir),
    }


def _eos_token(tokenizer: Path) -> tuple[str, int] | None:
    """(text, id) of the tokenizer's end-of-sequence special token, if it has one."""
    data = json.loads(tokenizer.read_text(encoding="utf-8"))
    for token in data.get("added_tokens", []):
        if token.get("special"):
            return str(token["content"]), int(token["id"])
    return None
