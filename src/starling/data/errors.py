"""Errors of the data layer; both are ValueErrors, so the CLI reports them as bad input."""


class DataSourceError(ValueError):
    """A source that cannot be read; the message says what to do."""


class ShardIntegrityError(ValueError):
    """A shard, manifest or tokenizer whose bytes do not match what the manifest declares."""
