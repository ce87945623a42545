"""Shared fixtures: prepared corpora (made once per session) and a CLI runner."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from starling.data import PrepareConfig, prepare


@pytest.fixture(scope="session")
def kjv_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The embedded default corpus (King James Bible), BPE 8192, prepared once."""
    out = tmp_path_factory.mktemp("kjv") / "data"
    prepare(PrepareConfig(source="embedded"), out)
    return out


@pytest.fixture(scope="session")
def pydoc_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small corpus (CPython's help topics) with a small BPE, for fast tests."""
    out = tmp_path_factory.mktemp("pydoc") / "data"
    prepare(
        PrepareConfig(
            source="embedded:pydoc", tokenizer="bpe:1024", val_fraction=0.1, shard_tokens=16_384
        ),
        out,
    )
    return out


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    """Run `starling ARGS` as a real process, the way a user does."""
    return subprocess.run(
        [sys.executable, "-m", "starling", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
