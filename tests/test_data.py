from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from starling.data import (
    PREPARE_VERSION,
    DataSourceError,
    PrepareConfig,
    SequenceBatcher,
    ShardIntegrityError,
    Source,
    TokenDataset,
    TokenizerSpec,
    cache_name,
    evaluation_batches,
    prepare,
    read_manifest,
)
from starling.data.tokenizer import byte_tokenizer, tokenizer_bytes, train_bpe

from .conftest import run_cli

SAMPLE = "Ünïcödé ✓ — tabs\tand\nnewlines, emoji 🐦, and plain ASCII. 1234567890"


def split_documents(dataset: TokenDataset, split: str) -> list[tuple[int, ...]]:
    """The split's token stream cut at EOS: one tuple per document."""
    stream = np.concatenate([np.asarray(s) for s in dataset.split(split)])
    ends = np.flatnonzero(stream == dataset.manifest.eos_id)
    starts = np.concatenate([[0], ends[:-1] + 1])
    return [tuple(stream[a:b].tolist()) for a, b in zip(starts, ends, strict=True)]


def write_paragraphs(path: Path, count: int, prefix: str) -> list[str]:
    paragraphs = [f"{prefix} paragraph {i}: " + "word " * (5 + i % 7) for i in range(count)]
    path.write_text("\n\n".join(paragraphs) + "\n", encoding="utf-8")
    return paragraphs


# ------------------------------------------------------------------ tokenizers


def test_byte_tokenizer_round_trips_any_text_with_ids_equal_to_bytes() -> None:
    tok = byte_tokenizer()
    ids = tok.encode(SAMPLE).ids
    assert ids == list(SAMPLE.encode("utf-8"))
    assert tok.decode(ids) == SAMPLE
    assert tok.get_vocab_size() == 257 and tok.token_to_id("<|endoftext|>") == 256


def test_bpe_round_trips_and_compresses(pydoc_dir: Path) -> None:
    tok = TokenDataset(pydoc_dir).tokenizer
    ids = tok.encode(SAMPLE).ids
    assert tok.decode(ids) == SAMPLE  # byte-level: nothing is unknown
    prose = "The return statement leaves the current function call with the expression list."
    assert len(tok.encode(prose).ids) < len(prose.encode()) / 2


def test_bpe_training_is_deterministic() -> None:
    texts = list(Source("embedded:pydoc").documents())
    a, b = train_bpe(texts, 1024), train_bpe(texts, 1024)
    assert tokenizer_bytes(a) == tokenizer_bytes(b)
    assert tokenizer_bytes(a) != tokenizer_bytes(train_bpe(texts, 900))


@pytest.mark.parametrize(
    "spec, kind, size",
    [("bytes", "bytes", 257), ("bpe", "bpe", 8192), ("bpe:4096", "bpe", 4096)],
)
def test_tokenizer_spec_parses(spec: str, kind: str, size: int) -> None:
    parsed = TokenizerSpec.parse(spec)
    assert (parsed.kind, parsed.vocab_size) == (kind, size)


@pytest.mark.parametrize("spec", ["bpe:ten", "bpe:10", "wordpiece", ""])
def test_bad_tokenizer_specs_are_refused(spec: str) -> None:
    with pytest.raises(ValueError):
        TokenizerSpec.parse(spec)


# ---------------------------------------------------------------- preparation


def test_embedded_corpus_prepares_identically_into_any_two_directories(
    kjv_dir: Path, tmp_path: Path
) -> None:
    again = tmp_path / "elsewhere" / "again"
    prepare(PrepareConfig(source="embedded"), again)
    files = sorted(p.relative_to(kjv_dir) for p in kjv_dir.rglob("*") if p.is_file())
    assert Path("tokenizer.json") in files and len(files) >= 4
    for rel in files:
        assert (kjv_dir / rel).read_bytes() == (again / rel).read_bytes(), rel
    manifest = read_manifest(kjv_dir)
    assert manifest.vocab_size == 8192 and manifest.dtype == "uint16"
    assert manifest.tokens("train") > 900_000 and manifest.tokens("val") > 10_000
    assert manifest.documents["train"] + manifest.documents["val"] == 1189  # chapters


def test_embedded_text_is_clean_english(kjv_dir: Path) -> None:
    dataset = TokenDataset(kjv_dir)
    documents = split_documents(dataset, "train")
    texts = [dataset.tokenizer.decode(list(document)) for document in documents]
    # Chapters, each headed by its book and number, in a shuffled order.
    genesis_1 = next(text for text in texts if text.startswith("Genesis 1\n\n"))
    assert genesis_1.startswith("Genesis 1\n\nIn the beginning God created")
    assert not texts[0].startswith("Genesis 1\n\n")


def test_training_documents_are_shuffled_across_the_shards(tmp_path: Path) -> None:
    """A run leases each node its own shards: in corpus order each node would train on
    its own stretch of the corpus. Every training document lands once, in an order the
    seed fixes; the validation documents keep the corpus order."""
    # One document a JSON line (a text file's paragraphs group into 4 KiB documents).
    records = [{"text": f"record {i}: " + "word " * (5 + i % 7)} for i in range(600)]
    source = tmp_path / "records.jsonl"
    source.write_text("\n".join(json.dumps(r) for r in records) + "\n", encoding="utf-8")
    small = dict(tokenizer="bpe:600", shard_tokens=2048, val_fraction=0.1)
    prepared = tmp_path / "prepared"
    prepared.mkdir()

    def order(seed: int, split: str) -> list[int]:
        """The record numbers of the split's documents, in the order they came."""
        out = prepared / str(len(list(prepared.iterdir())))
        prepare(PrepareConfig(source=str(source), seed=seed, **small), out)
        dataset = TokenDataset(out)
        texts = [dataset.tokenizer.decode(list(d)) for d in split_documents(dataset, split)]
        return [int(text.split(":")[0].removeprefix("record ")) for text in texts]

    train, val = order(0, "train"), order(0, "val")
    assert sorted(train + val) == list(range(600))  # each document once
    assert val == sorted(val) and len(val) > 20
    assert train != sorted(train)
    # The first tenth of the training documents draws from the whole corpus.
    first_tenth = train[: len(train) // 10]
    assert min(first_tenth) < 100 and max(first_tenth) > 500
    assert order(0, "train") == train  # the seed fixes the order
    assert order(1, "train") != train
    assert sorted(order(-1, "train") + order(-1, "val")) == list(range(600))  # any seed


def test_a_cached_dataset_of_an_older_version_is_prepared_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Caches are keyed on PREPARE_VERSION: data prepared in corpus order (version 1) is
    not reused once the training documents are shuffled."""
    import importlib

    import starling.cli

    # The module, not the function `starling.data.prepare` that shadows its name.
    prepare_module = importlib.import_module("starling.data.prepare")
    monkeypatch.setattr(prepare_module, "PREPARE_VERSION", PREPARE_VERSION - 1)
    older = starling.cli.resolve_data("embedded:pydoc", tmp_path, "bytes", 0)
    monkeypatch.undo()
    current = starling.cli.resolve_data("embedded:pydoc", tmp_path, "bytes", 0)
    assert older != current
    assert (older / "manifest.json").is_file() and (current / "manifest.json").is_file()
    assert starling.cli.resolve_data("embedded:pydoc", tmp_path, "bytes", 0) == current


def test_a_cache_name_tells_apart_files_of_one_name(tmp_path: Path) -> None:
    """`starling simulate` and bench/convergence.py cache a prepared source under this
    name: two different corpora called corpus.txt must not share one dataset."""
    a, b = tmp_path / "a" / "corpus.txt", tmp_path / "b" / "corpus.txt"
    for path, text in ((a, "In the beginning."), (b, "Call me Ishmael.")):
        path.parent.mkdir()
        path.write_text(text)
    names = {cache_name(str(path), "bytes", 0) for path in (a, b)}
    assert len(names) == 2 and all(name.startswith("corpus.txt-bytes-") for name in names)
    assert cache_name(str(a), "bytes", 0) == cache_name(str(a), "bytes", 0)
    assert cache_name(str(a), "bytes", 1) != cache_name(str(a), "bytes", 0)
    assert cache_name(str(a), "bpe:512", 0) != cache_name(str(a), "bytes", 0)
    a.write_text("In the beginning was the Word.")  # changed in place: size and time
    assert cache_name(str(a), "bytes", 0) not in names
    assert cache_name("embedded", "bpe:8192", 0).startswith("embedded-bpe8192-")
    # Nothing local to stamp: the spec alone (a dataset name holds a slash).
    assert cache_name("hf:roneneldan/TinyStories", "bytes", 0).startswith(
        "hf-roneneldan_TinyStories-bytes-"
    )


def test_another_seed_gives_another_split(pydoc_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "seed1"
    prepare(
        PrepareConfig(
            source="embedded:pydoc",
            tokenizer="bpe:1024",
            val_fraction=0.1,
            shard_tokens=16_384,
            seed=1,
        ),
        other,
    )
    assert read_manifest(other).shards["val"] != read_manifest(pydoc_dir).shards["val"]


def test_train_and_validation_documents_are_disjoint(pydoc_dir: Path) -> None:
    dataset = TokenDataset(pydoc_dir)
    train, val = split_documents(dataset, "train"), split_documents(dataset, "val")
    assert len(train) == dataset.manifest.documents["train"]
    assert len(val) == dataset.manifest.documents["val"] > 0
    assert not set(train) & set(val)


def test_shards_have_the_declared_size_and_hash(pydoc_dir: Path) -> None:
    manifest = read_manifest(pydoc_dir)
    train = manifest.shards["train"]
    assert len(train) > 1
    assert all(s.tokens == 16_384 for s in train[:-1]) and 0 < train[-1].tokens <= 16_384
    for info in train:
        assert (pydoc_dir / info.file).stat().st_size == 2 * info.tokens  # uint16


@pytest.mark.parametrize("damage", ["flip", "truncate", "tokenizer"])
def test_damaged_data_is_detected(pydoc_dir: Path, tmp_path: Path, damage: str) -> None:
    copy = tmp_path / "copy"
    shutil.copytree(pydoc_dir, copy)
    if damage == "tokenizer":
        target = copy / "tokenizer.json"
        target.write_bytes(target.read_bytes().replace(b'"the"', b'"teh"', 1))
    else:
        target = copy / read_manifest(copy).shards["train"][1].file
        data = bytearray(target.read_bytes())
        if damage == "flip":
            data[len(data) // 3] ^= 0x40
        else:
            del data[-2:]
        target.write_bytes(bytes(data))
    with pytest.raises(ShardIntegrityError):
        TokenDataset(copy)
    result = run_cli("data", "verify", str(copy))
    assert result.returncode == 2
    assert result.stderr.startswith("error:") and "Traceback" not in result.stderr


def test_verify_accepts_intact_data(pydoc_dir: Path) -> None:
    result = run_cli("data", "verify", str(pydoc_dir))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ok:")


def test_local_text_file_directory_and_glob(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "sub").mkdir(parents=True)
    # Paragraphs larger than a document's 4 KiB so each file yields several documents.
    write_paragraphs(corpus / "a.txt", 400, "alpha")
    records = [{"text": f"json record {i} " + "token " * 20, "id": i} for i in range(100)]
    (corpus / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    table = pa.table({"text": [f"parquet row {i} " + "cell " * 15 for i in range(80)]})
    pq.write_table(table, corpus / "sub" / "c.parquet")
    (corpus / "notes.bin").write_bytes(b"\x00\x01 ignored: not a text suffix")

    small = dict(tokenizer="bpe:600", shard_tokens=2048, val_fraction=0.1)
    from_file = prepare(PrepareConfig(source=str(corpus / "a.txt"), **small), tmp_path / "f")
    from_dir = prepare(PrepareConfig(source=str(corpus), **small), tmp_path / "d")
    from_glob = prepare(PrepareConfig(source=str(corpus / "**" / "*.*l"), **small), tmp_path / "g")
    assert from_file.documents["train"] >= 2 and from_file.documents["val"] >= 1
    assert sum(from_dir.documents.values()) == sum(from_file.documents.values()) + 180
    assert sum(from_glob.documents.values()) == 100  # only b.jsonl matches *.*l
    text = TokenDataset(tmp_path / "d").tokenizer.decode(
        np.concatenate(TokenDataset(tmp_path / "d").split("train")).tolist()
    )
    assert "alpha paragraph" in text and "json record" in text and "parquet row" in text


def test_cli_prepare_on_a_text_file(tmp_path: Path) -> None:
    write_paragraphs(tmp_path / "book.txt", 300, "chapter")
    out = tmp_path / "prepared"
    result = run_cli(
        "data",
        "prepare",
        "--source",
        str(tmp_path / "book.txt"),
        "--tokenizer",
        "bytes",
        "--out",
        str(out),
        "--shard-tokens",
        "4096",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["vocab_size"] == 257 and summary["tokens"]["train"] > 4096
    assert TokenDataset(out).manifest.tokenizer_kind == "bytes"
    # A second prepare into the same place needs --overwrite; it never deletes silently.
    again = run_cli("data", "prepare", "--source", str(tmp_path / "book.txt"), "--out", str(out))
    assert again.returncode == 2 and "--overwrite" in again.stderr


def binary_file(tmp_path: Path) -> str:
    path = tmp_path / "garbage.dat"
    path.write_bytes(bytes(range(256)) * 64)
    return str(path)


def empty_file(tmp_path: Path) -> str:
    path = tmp_path / "empty.txt"
    path.write_text("  \n\n ")
    return str(path)


def not_utf8_txt(tmp_path: Path) -> str:
    path = tmp_path / "latin1.txt"
    path.write_bytes("café au lait\n\nsecond paragraph".encode("latin-1"))
    return str(path)


def bad_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{"text": \n')
    return str(path)


def wrong_field_jsonl(tmp_path: Path) -> str:
    path = tmp_path / "other.jsonl"
    path.write_text('{"body": "a"}\n{"body": "b"}\n')
    return str(path)


def fake_parquet(tmp_path: Path) -> str:
    path = tmp_path / "fake.parquet"
    path.write_bytes(b"PAR1 this is not a parquet file")
    return str(path)


@pytest.mark.parametrize(
    "make_source, message",
    [
        (lambda p: str(p / "missing.txt"), "is not a file, directory, glob"),
        (empty_file, "no text found"),
        (binary_file, "is not text"),
        (not_utf8_txt, "not UTF-8"),
        (bad_jsonl, "not valid JSON"),
        (wrong_field_jsonl, "--text-field"),
        (fake_parquet, "not a readable parquet file"),
        (lambda p: str(p / "nothing-*.txt"), "no files match"),
        (lambda p: "embedded:klingon", "unknown embedded corpus"),
    ],
)
def test_bad_sources_give_one_clear_line_and_exit_2(tmp_path: Path, make_source, message) -> None:
    out = tmp_path / "out"
    result = run_cli("data", "prepare", "--source", make_source(tmp_path), "--out", str(out))
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr
    assert not out.exists()  # nothing half-written


def test_huggingface_source_offline_is_a_clear_error(tmp_path: Path) -> None:
    result = run_cli(
        "data",
        "prepare",
        "--source",
        "hf:roneneldan/TinyStories",
        "--out",
        str(tmp_path / "o"),
        env={"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"},
    )
    assert result.returncode == 2
    assert "cannot stream hf:roneneldan/TinyStories" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_options_exit_2(tmp_path: Path) -> None:
    for args, message in [
        (["--tokenizer", "bpe:abc"], "bpe:N"),
        (["--val-fraction", "0.9"], "val fraction"),
        (["--shard-tokens", "10"], "shard tokens"),
    ]:
        result = run_cli(
            "data", "prepare", "--source", "embedded:pydoc", "--out", str(tmp_path / "x"), *args
        )
        assert result.returncode == 2 and message in result.stderr, result.stderr


def test_output_that_is_not_a_dataset_is_never_overwritten(tmp_path: Path) -> None:
    precious = tmp_path / "home"
    precious.mkdir()
    (precious / "thesis.txt").write_text("do not delete")
    with pytest.raises(DataSourceError, match="holds no prepared dataset"):
        prepare(PrepareConfig(source="embedded:pydoc"), precious, overwrite=True)
    assert (precious / "thesis.txt").read_text() == "do not delete"


# --------------------------------------------------------------------- batching


def test_batcher_visits_every_window_once_per_epoch_and_resumes() -> None:
    shards = [np.arange(0, 1001, dtype=np.uint16), np.arange(2000, 2500, dtype=np.uint16)]
    seq_len, batch = 10, 3
    batcher = SequenceBatcher(shards, seq_len, batch, seed=4)
    windows = len(batcher.windows)
    assert windows == 100 + 49  # stride 10, windows of 11 tokens
    starts = []
    for _ in range(windows // batch):
        inputs, targets = next(batcher)
        assert inputs.shape == targets.shape == (batch, seq_len)
        assert torch_equal(inputs[:, 1:], targets[:, :-1])  # targets are inputs shifted by one
        starts.extend(inputs[:, 0].tolist())
    assert len(set(starts)) == len(starts)  # no window twice within an epoch

    state = batcher.state_dict()
    expected = [next(batcher)[0] for _ in range(5)]
    resumed = SequenceBatcher(shards, seq_len, batch, seed=4)
    resumed.load_state_dict(state)
    for want in expected:
        assert torch_equal(next(resumed)[0], want)


def torch_equal(a, b) -> bool:
    import torch

    return bool(torch.equal(a, b))


def test_evaluation_batches_are_fixed(pydoc_dir: Path) -> None:
    dataset = TokenDataset(pydoc_dir)
    a = evaluation_batches(dataset.split("val"), 64, 4, 3)
    b = evaluation_batches(dataset.split("val"), 64, 4, 3)
    assert len(a) == 3 and all(torch_equal(x[0], y[0]) for x, y in zip(a, b, strict=True))
    # They sample the whole split, not its first windows: each batch's rows come from
    # the split's first, middle and last windows alike (12 rows, evenly spaced).
    shards = dataset.split("val")
    windows = SequenceBatcher(shards, 64, 4, seed=0, shuffle=False).windows
    assert len(windows) >= 48, "the test needs a split of several batches"

    def index_of(row) -> int:
        for index, (shard, start) in enumerate(windows):
            if np.array_equal(np.asarray(shards[shard][start : start + 64]), row.numpy()):
                return index
        raise AssertionError("a row that is no window of the split")

    rows = [index_of(row) for inputs, _ in a for row in inputs]
    assert rows == sorted(rows) and rows[0] == 0
    assert rows[-1] >= len(windows) * 11 // 12
    assert (a[0][1][0][:-1] == a[0][0][0][1:]).all()  # targets are inputs shifted by one


def test_too_little_data_for_a_sequence_is_refused() -> None:
    with pytest.raises(ValueError, match="shorter --seq-len"):
        SequenceBatcher([np.arange(10, dtype=np.uint16)], 64, 1, seed=0)
