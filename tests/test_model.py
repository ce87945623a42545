from __future__ import annotations

from pathlib import Path

import pytest
import torch

from starling.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from starling.model import PRESETS, ModelConfig, Transformer, build_model, model_config


def expected_parameters(cfg: ModelConfig) -> int:
    """Closed-form count: embedding (+ head if untied), per-layer attention, SwiGLU, norms."""
    hs = cfg.head_dim
    attention = cfg.dim * cfg.n_heads * hs * 2 + cfg.dim * cfg.n_kv_heads * hs * 2
    mlp = 3 * cfg.dim * cfg.ffn_dim
    norms = 2 * cfg.dim
    embedding = cfg.vocab_size * cfg.dim * (1 if cfg.tie_embeddings else 2)
    return embedding + cfg.n_layers * (attention + mlp + norms) + cfg.dim


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_shapes_and_parameter_counts(preset: str) -> None:
    cfg = model_config(preset)
    with torch.device("meta"):  # no memory for the 1b preset's weights
        model = Transformer(cfg)
        tokens = torch.zeros(2, 16, dtype=torch.long)
        logits = model(tokens)
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert model.num_parameters() == expected_parameters(cfg)


def test_preset_sizes_are_as_named() -> None:
    def millions(preset: str, vocab: int = 8192) -> float:
        return expected_parameters(model_config(preset, vocab_size=vocab)) / 1e6

    assert 0.8 < millions("tiny") < 1.5  # "about 1M": trains on a laptop CPU
    assert millions("small") < millions("125m") < millions("350m") < millions("1b")
    assert 0.95 < millions("1b", vocab=32_000) / 1000 < 1.15


def test_tiny_parameter_count_is_exact() -> None:
    model = build_model(model_config("tiny"))
    assert model.num_parameters() == 1_229_664
    assert model.lm_head.weight is model.embed_tokens.weight


def test_untied_head_adds_one_embedding_matrix() -> None:
    tied = build_model(model_config("tiny"))
    untied = build_model(model_config("tiny", tie_embeddings=False))
    assert untied.num_parameters() - tied.num_parameters() == 8192 * 96


@pytest.mark.parametrize("kv_heads", [4, 2, 1])
def test_changing_a_future_token_never_changes_past_logits(kv_heads: int) -> None:
    model = build_model(model_config("tiny", n_kv_heads=kv_heads, vocab_size=512), seed=3).eval()
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, 512, (2, 32), generator=gen)
    changed = tokens.clone()
    t = 20
    changed[:, t] = (changed[:, t] + 7) % 512
    with torch.no_grad():
        before, after = model(tokens), model(changed)
    torch.testing.assert_close(before[:, :t], after[:, :t], rtol=0, atol=1e-6)
    # ...while the changed position and everything after it do see the change.
    assert (before[:, t:] - after[:, t:]).abs().amax(dim=-1).min() > 1e-4


def test_same_seed_same_weights_other_seed_other_weights() -> None:
    cfg = model_config("tiny", vocab_size=256)
    a, b, c = build_model(cfg, seed=7), build_model(cfg, seed=7), build_model(cfg, seed=8)
    for (name, pa), pb, pc in zip(
        a.state_dict().items(), b.state_dict().values(), c.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
        if not name.endswith("norm.weight"):
            assert not torch.equal(pa, pc), name


def test_activation_checkpointing_gives_the_same_gradients() -> None:
    cfg = model_config("tiny", vocab_size=256)
    tokens = torch.randint(0, 256, (2, 24), generator=torch.Generator().manual_seed(1))
    grads = []
    for checkpointing in (False, True):
        model = build_model(
            model_config("tiny", vocab_size=256, activation_checkpointing=checkpointing), seed=1
        )
        model(tokens).float().logsumexp(-1).mean().backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    assert cfg.activation_checkpointing is False
    for g0, g1 in zip(*grads, strict=True):
        torch.testing.assert_close(g0, g1)


def test_sequence_longer_than_context_is_refused() -> None:
    model = build_model(model_config("tiny", vocab_size=256, max_seq_len=16))
    with pytest.raises(ValueError, match="exceeds max_seq_len"):
        model(torch.zeros(1, 17, dtype=torch.long))


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"dim": 100, "n_heads": 3}, "divisible by n_heads"),
        ({"n_kv_heads": 3}, "multiple of n_kv_heads"),
        ({"n_layers": 0}, "n_layers must be positive"),
        ({"dim": 36, "n_heads": 4}, "must be even"),
    ],
)
def test_bad_dimensions_are_refused_with_a_reason(overrides: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        model_config("tiny", **overrides)


def test_unknown_preset_lists_the_choices() -> None:
    with pytest.raises(ValueError, match="tiny, small, 125m, 350m, 1b"):
        model_config("huge")


def test_checkpoint_round_trip_and_a_flipped_byte_is_refused(tmp_path: Path) -> None:
    model = build_model(model_config("tiny", vocab_size=300), seed=5)
    sha = save_checkpoint(tmp_path, model, {"step": 3})
    loaded, manifest = load_checkpoint(tmp_path)
    assert manifest["step"] == 3 and manifest["sha256"] == sha
    assert loaded.lm_head.weight is loaded.embed_tokens.weight  # tie survives the trip
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name

    weights = tmp_path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt"):
        load_checkpoint(tmp_path)


def test_a_state_checkpoint_with_any_one_flipped_byte_is_refused(tmp_path: Path) -> None:
    from starling.checkpoint import read_state_checkpoint, save_state_checkpoint, state_blob

    blob = state_blob(torch.randn(1000), torch.randn(1000))
    save_state_checkpoint(tmp_path, blob, {"round": 4, "model": {"preset": "tiny"}})
    assert read_state_checkpoint(tmp_path)[0] == blob
    path = tmp_path / "state.safetensors"
    for position in (0, 8, len(blob) // 2, len(blob) - 1):  # header length, header, data
        data = bytearray(blob)
        data[position] ^= 0x01
        path.write_bytes(bytes(data))
        with pytest.raises(CheckpointError, match="corrupt"):
            read_state_checkpoint(tmp_path)
