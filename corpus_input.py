"""A corpus file, read as a stream of (id, text): what `corpus.py embed` reads, one row at a time, so
that a million texts never sit in memory at once.

    one text a line            questions.txt (or .txt.gz)          ids derived from each text
    a table with a text column corpus.csv / .tsv / .jsonl / .parquet (optionally .gz, not Parquet)

A table's text column is `text` (or one of TEXT_COLUMNS, or --text-column), its id column `id` (or
one of ID_COLUMNS, or --id-column); without an id column each text's id is derived from the text
itself (`text_id`: the first 16 hex digits of its SHA-1), so that the same text gets the same id in
every run and the same text twice is one row. Bad input is one line naming the file and the line: a
missing column, a file that is not UTF-8, one id given two texts (`check_ids`), no text at all.
"""
from __future__ import annotations

import csv
import hashlib
import json
import sys
from pathlib import Path
from typing import Iterator, NamedTuple

import numpy as np

from embed_ft import data
from embed_ft.errors import InputError

TEXT_COLUMNS = ("text", "sentence", "question", "content", "body", "passage", "document")
ID_COLUMNS = ("id", "_id", "doc_id", "qid")
TABLES = (".csv", ".tsv", ".jsonl", ".json", ".parquet")


class Row(NamedTuple):
    line: int   # where a person finds it: the line of a text file, the row of a table (1 = first data row)
    id: str
    text: str


def text_id(text: str) -> str:
    """An id derived from the text alone: the same in every run, on every machine."""
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:16]


def hash64(values: list[str]) -> np.ndarray:
    """A 64-bit hash of each string (the first 8 bytes of its BLAKE2b): how ids and texts are compared
    without keeping a million strings in memory (two of a million collide with odds near 1 in 10^7)."""
    return np.array([int.from_bytes(hashlib.blake2b(v.encode("utf-8"), digest_size=8).digest(), "little")
                     for v in values], dtype=np.uint64)


def rows(path: Path, id_column: str | None = None, text_column: str | None = None, start_line: int = 1) -> Iterator[Row]:
    """Every (id, text) of the file in order, from `start_line` on; empty texts are skipped (and counted
    on stderr). A Parquet file's row groups before `start_line` are not read at all."""
    name = path.name.removesuffix(".gz")
    if not (name.endswith(".txt") or name.endswith(TABLES)):
        raise InputError(f"unknown corpus file type: {path} (use .txt, .csv, .tsv, .jsonl or .parquet)")
    data.check_contents(path)
    empty = 0
    try:
        for row in (text_lines(path) if name.endswith(".txt") else table_rows(path, name, id_column, text_column, start_line)):
            if row.line < start_line:
                continue
            if row.text.strip():
                yield row
            else:
                empty += 1
    except UnicodeDecodeError:
        raise InputError(data.describe_bad_utf8(path)) from None
    except EOFError:
        raise InputError(f"{path} is cut short (the compressed data ends early); fetch or copy it again") from None
    if empty:
        print(f"note: {path}: {empty:,} empty text(s) skipped", file=sys.stderr)


def text_lines(path: Path) -> Iterator[Row]:
    with data.open_text(path) as f:
        for number, line in enumerate(data.without_bare_carriage_returns(f, path), 1):
            text = line.rstrip("\n").strip()
            yield Row(number, text_id(text), text)


def table_rows(path: Path, name: str, id_column: str | None, text_column: str | None, start_line: int = 1) -> Iterator[Row]:
    """A table's rows: the header picks the columns, then each row's id (or the text's) and text."""
    if name.endswith(".parquet"):
        yield from parquet_rows(path, id_column, text_column, start_line)
        return
    with data.open_text(path) as f:
        reader = (data.json_rows(f, path) if name.endswith((".jsonl", ".json"))
                  else csv.reader(data.without_bare_carriage_returns(f, path), delimiter="\t" if name.endswith(".tsv") else ","))
        header = next(reader, None)
        if header is None:
            return
        id_at, text_at = pick(list(header), id_column, text_column, path)
        for number, row in enumerate(reader, 1):
            if not row:
                continue
            if len(row) <= max(text_at, id_at if id_at is not None else 0):
                raise InputError(f"{path} row {number}: {len(row)} field(s) where the header has {len(header)}")
            text = "" if row[text_at] is None else str(row[text_at]).strip()
            yield Row(number, str(row[id_at]) if id_at is not None and row[id_at] is not None else text_id(text), text)


def parquet_rows(path: Path, id_column: str | None, text_column: str | None, start_line: int = 1) -> Iterator[Row]:
    """A Parquet file a batch of rows at a time, only the two columns read, from the row group that
    holds `start_line` on."""
    import pyarrow.parquet as pq
    try:
        table = pq.ParquetFile(path)
    except OSError as e:  # pyarrow's ArrowInvalid is an OSError
        raise InputError(f"{path} is a damaged Parquet file ({str(e).strip().splitlines()[0]})") from None
    names = table.schema_arrow.names
    id_at, text_at = pick(names, id_column, text_column, path)
    wanted = [names[text_at]] + ([names[id_at]] if id_at is not None else [])
    ends = np.cumsum([table.metadata.row_group(g).num_rows for g in range(table.num_row_groups)])
    first_group = int(np.searchsorted(ends, start_line - 1, side="right"))
    number = int(ends[first_group - 1]) if first_group else 0
    groups = list(range(first_group, table.num_row_groups))
    for batch in table.iter_batches(batch_size=10_000, columns=wanted, row_groups=groups) if groups else []:
        columns = batch.to_pydict()
        for i, text in enumerate(columns[names[text_at]]):
            number += 1
            text = "" if text is None else str(text).strip()
            given = columns[names[id_at]][i] if id_at is not None else None
            yield Row(number, str(given) if given is not None else text_id(text), text)


def header(path: Path) -> list[str]:
    """A table's column names, its first line alone read (a .txt file's one column is its text)."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".txt"):
        return ["text"]
    data.check_contents(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            return pq.ParquetFile(path).schema_arrow.names
        except OSError as e:  # pyarrow's ArrowInvalid is an OSError
            raise InputError(f"{path} is a damaged Parquet file ({str(e).strip().splitlines()[0]})") from None
    with data.open_text(path) as f:
        line = f.readline()
    if name.endswith((".jsonl", ".json")):
        return list(json.loads(line)) if line.strip() else []
    return next(csv.reader([line], delimiter="\t" if name.endswith(".tsv") else ","), [])


def pick(header: list[str], id_column: str | None, text_column: str | None, path: Path) -> tuple[int | None, int]:
    """The positions of the id column (None: ids from the texts) and the text column."""
    lowered = [str(h).strip().lower() for h in header]
    def find(given: str | None, known: tuple[str, ...], what: str) -> int | None:
        if given is not None:
            if given.lower() not in lowered:
                raise InputError(f"{path} has no column {given!r} (--{what}-column); its columns: {', '.join(map(str, header))}")
            return lowered.index(given.lower())
        return next((lowered.index(c) for c in known if c in lowered), None)
    text_at = find(text_column, TEXT_COLUMNS, "text")
    if text_at is None:
        raise InputError(f"{path} has no text column (looked for {', '.join(TEXT_COLUMNS)}); its columns: "
                         f"{', '.join(map(str, header))}: name one with --text-column")
    return find(id_column, ID_COLUMNS, "id"), text_at


def check_ids(path: Path, id_hashes: np.ndarray, text_hashes: np.ndarray, **columns) -> None:
    """One id given two different texts is an error that names the id and both rows (the file is read
    again to find them, only then)."""
    order = np.lexsort((text_hashes, id_hashes))
    same_id = id_hashes[order][1:] == id_hashes[order][:-1]
    other_text = text_hashes[order][1:] != text_hashes[order][:-1]
    clash = np.nonzero(same_id & other_text)[0]
    if not len(clash):
        return
    wanted = id_hashes[order][clash[0]]
    seen = [row for row in rows(path, **columns) if hash64([row.id])[0] == wanted][:2]
    raise InputError(f"{path}: id {seen[0].id!r} has two different texts (row {seen[0].line}: {seen[0].text[:60]!r}; "
                     f"row {seen[1].line}: {seen[1].text[:60]!r}); give each text its own id")
