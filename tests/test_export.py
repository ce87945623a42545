"""`starling export --format hf`: transformers' LlamaForCausalLM loads the export and
computes the same logits as Starling's model, tied or untied, with or without GQA."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from starling.checkpoint import save_state_checkpoint, state_blob
from starling.data.tokenizer import byte_tokenizer, save_tokenizer
from starling.diloco import GlobalState
from starling.export import export_hf
from starling.model import build_model, model_config

from .conftest import run_cli


def make_run(root: Path, **dims) -> tuple[Path, torch.nn.Module]:
    config = model_config("tiny", vocab_size=257, **dims)
    model = build_model(config, seed=3)
    state = GlobalState.from_model(model)
    state.params += 0.01 * torch.randn(
        state.params.shape, generator=torch.Generator().manual_seed(1)
    )
    from starling.diloco import load_flat_parameters

    load_flat_parameters(model, state.params)
    save_state_checkpoint(
        root / "checkpoints" / "000007",
        state_blob(state.params, state.momentum),
        {"round": 7, "fingerprint": state.fingerprint(), "model": config.to_dict()},
    )
    (root / "data").mkdir(parents=True)
    save_tokenizer(byte_tokenizer(), root / "data" / "tokenizer.json")
    return root, model


@pytest.mark.parametrize(
    "dims",
    [
        {"dim": 64, "n_heads": 4, "n_kv_heads": 4},
        {"dim": 64, "n_heads": 4, "n_kv_heads": 2, "tie_embeddings": False},
    ],
    ids=["tied", "gqa-untied"],
)
def test_transformers_loads_the_export_with_matching_logits(tmp_path: Path, dims) -> None:
    from transformers import AutoTokenizer, LlamaForCausalLM

    run_dir, model = make_run(tmp_path / "run", **dims)
    summary = export_hf(run_dir, tmp_path / "hf")
    assert summary["round"] == 7
    hf = LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([tokenizer.encode("The starling sings at dawn over the fields.")])
    assert ids.shape[1] > 10
    with torch.no_grad():
        expected = model.eval()(ids)
        got = hf.eval()(ids).logits
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= 1e-4
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["num_key_value_heads"] == dims["n_kv_heads"]


def test_cli_export_and_its_errors(tmp_path: Path) -> None:
    run_dir, _ = make_run(tmp_path / "run", dim=64, n_heads=4, n_kv_heads=4)
    ok = run_cli("export", str(run_dir), "--format", "hf", "--out", str(tmp_path / "out"))
    assert ok.returncode == 0, ok.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()
    bad = run_cli("export", str(run_dir), "--format", "gguf", "--out", str(tmp_path / "x"))
    assert bad.returncode == 2 and "only 'hf'" in bad.stderr
    missing = run_cli("export", str(tmp_path / "nope"), "--out", str(tmp_path / "y"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    (run_dir / "checkpoints" / "000007" / "state.safetensors").write_bytes(b"corrupt")
    corrupt = run_cli("export", str(run_dir), "--out", str(tmp_path / "z"))
    assert corrupt.returncode == 2 and "corrupt" in corrupt.stderr
