"""Tokenizers, text sources, and the token shards that nodes train on."""

from .errors import DataSourceError, ShardIntegrityError
from .prepare import PREPARE_VERSION, PrepareConfig, cache_name, prepare
from .shards import (
    Manifest,
    SequenceBatcher,
    TokenDataset,
    evaluation_batches,
    read_manifest,
)
from .sources import Source
from .tokenizer import TokenizerSpec, load_tokenizer

__all__ = [
    "PREPARE_VERSION",
    "DataSourceError",
    "Manifest",
    "PrepareConfig",
    "SequenceBatcher",
    "ShardIntegrityError",
    "Source",
    "TokenDataset",
    "TokenizerSpec",
    "cache_name",
    "evaluation_batches",
    "load_tokenizer",
    "prepare",
    "read_manifest",
]
