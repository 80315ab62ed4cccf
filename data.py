"""Labelled text pairs: load them, split them without leakage, subsample, add the pairs they imply.
(Tokenising and batching them for training is batching.py.)

A pair is `(text1, text2, label)`, label 1 when the two texts mean the same thing (a duplicate) and
0 otherwise. Pairs come from the Hugging Face hub (Quora duplicates by default) or from a local
CSV/TSV (optionally gzipped), JSONL or Parquet file: bring your own pairs.
"""
from __future__ import annotations

import csv
import gzip
import itertools
import json
import random
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator

import numpy as np

from embed_ft.errors import InputError
from embed_ft.sources import is_hub_id

Pair = tuple[str, str, int]

HUB_DEFAULT = "sentence-transformers/quora-duplicates"
# Column names we recognise without being told, as (text1, text2, label).
KNOWN_COLUMNS = [
    ("question1", "question2", "is_duplicate"),
    ("sentence1", "sentence2", "label"),
    ("text1", "text2", "label"),
]
LOCAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".gz", ".txt")


# ---------------------------------------------------------------------------------------- loading

def load_pairs(source: str, columns: tuple[str, str, str] | None = None,
               hub_config: str = "pair-class", hub_split: str = "train") -> list[Pair]:
    """Labelled pairs from a local file or, if `source` is no file, a Hugging Face dataset. Pairs
    with an empty text, or of a text with itself, teach nothing: they are dropped, and counted."""
    path = Path(source)
    if path.is_dir():
        raise InputError(f"{source} is a folder, not a file of pairs: give a CSV, TSV, JSONL or Parquet file "
                         f"(or a hub dataset name)")
    if path.is_file():
        rows, label_column = read_file(path, columns)
    elif path.suffix in LOCAL_SUFFIXES or ("/" in source and not is_hub_id(source)):
        raise InputError(f"file not found: {source}")
    else:
        rows, label_column = read_hub(source, columns, hub_config, hub_split)
    return drop_useless(to_pairs(rows, label_column, source), source)


def read_file(path: Path, columns: tuple[str, str, str] | None) -> tuple[list[tuple], str]:
    """The (text1, text2, label) columns of a CSV/TSV (optionally .gz), JSONL or Parquet file, and
    the label column's name. Only those three columns are kept in memory. A file that is cut short,
    or whose contents are not what its name says, is named as such."""
    name = path.name.removesuffix(".gz")
    if not name.endswith((".jsonl", ".json", ".tsv", ".csv", ".parquet")):
        raise InputError(f"unknown file type: {path} (use .csv, .tsv, .jsonl or .parquet, optionally .gz)")
    check_contents(path)
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        try:
            table = pq.read_table(path).to_pydict()
        except OSError as e:  # pyarrow's ArrowInvalid is an OSError too
            raise InputError(f"{path} is a damaged Parquet file ({str(e).strip().splitlines()[0]})") from None
        return select(itertools.chain([list(table)], zip(*table.values())), columns, str(path))
    with open_text(path) as f:
        try:
            rows = (json_rows(f, path) if name.endswith((".jsonl", ".json"))
                    else delimited_rows(f, path, "\t" if name.endswith(".tsv") else ","))
            return select(rows, columns, str(path))
        except UnicodeDecodeError:
            raise InputError(describe_bad_utf8(path)) from None
        except EOFError:
            raise InputError(f"{path} is cut short (the compressed data ends early: a download or copy that "
                             f"stopped?); fetch or copy it again") from None
        except OSError as e:  # a corrupt .gz
            raise InputError(f"{path} is damaged: {e}; fetch or copy it again") from None


MAGIC = {b"PAR1": "a Parquet file", b"\x1f\x8b": "gzip-compressed", b"PK\x03\x04": "a zip archive"}


def sniff(path: Path) -> str | None:
    """What a file's first bytes say it is, when they say it clearly."""
    with open(path, "rb") as f:
        head = f.read(4)
    return next((kind for magic, kind in MAGIC.items() if head.startswith(magic)), None)


def check_contents(path: Path) -> None:
    """The name says one format, the first bytes another: say which, before a parser trips on it."""
    actual, name = sniff(path), path.name
    expected = "gzip-compressed" if name.endswith(".gz") else "a Parquet file" if name.endswith(".parquet") else None
    if actual == expected:
        return
    if actual is None and expected == "a Parquet file":
        raise InputError(f"{path} is not a Parquet file (it does not start with PAR1; text, CSV or TSV?): "
                         f"name it after its real format")
    if actual is None and expected == "gzip-compressed":
        raise InputError(f"{path} is not gzip-compressed: drop the .gz from its name")
    if actual is not None:
        raise InputError(f"{path} is {actual}, not what its name says: name it after its real format "
                         f"(.parquet, or .gz after the text format)")


def select(rows: Iterator, columns: tuple[str, str, str] | None, source: str) -> tuple[list[tuple], str]:
    """From a header row and data rows, the three pair columns of each row."""
    header = next(rows, None)
    if header is None:
        raise InputError(f"no rows in {source}")
    wanted = pick_columns(list(header), columns, source)
    i, j, k = (list(header).index(c) for c in wanted)
    picked = [(row[i], row[j], row[k]) for row in rows]
    if not picked:
        raise InputError(f"no rows in {source}")
    return picked, wanted[2]


def open_text(path: Path):
    """UTF-8 text (a byte order mark is skipped), split into lines at line feeds only: a carriage
    return is a line end only right before one (Windows' CRLF)."""
    opener = gzip.open if path.name.endswith(".gz") else open
    return opener(path, "rt", encoding="utf-8-sig", newline="\n")


def without_bare_carriage_returns(lines: Iterable[str], path: Path) -> Iterator[str]:
    """Lines with CRLF made LF, and any other carriage return (some public corpora have them inside
    fields) read as a space, with a note of how many there were."""
    bare = 0
    for line in lines:
        if line.endswith("\r\n"):
            line = line[:-2] + "\n"
        if "\r" in line:
            bare += line.count("\r")
            line = line.replace("\r", " ")
        yield line
    if bare:
        print(f"note: {path}: {bare} carriage return(s) inside fields, read as spaces", file=sys.stderr)


def delimited_rows(f, path: Path, delimiter: str) -> Iterator[list[str]]:
    """The header, then each row, checked to have as many fields as the header."""
    reader = csv.reader(without_bare_carriage_returns(f, path), delimiter=delimiter)
    header = next(reader, None)
    if header is None:
        return
    yield header
    for row in reader:
        if len(row) != len(header) and row:  # a blank line is no row
            raise InputError(f"{path} line {reader.line_num}: {len(row)} field(s) where the header has "
                             f"{len(header)}; a stray {'tab' if delimiter == chr(9) else 'comma'} or quote?")
        if row:
            yield row


def json_rows(f, path: Path) -> Iterator[list]:
    """JSON Lines: the first object's keys as the header, then each object's values in that order."""
    header = None
    for number, line in enumerate(f, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path} line {number}: not valid JSON ({e.msg}, column {e.colno})") from None
        if not isinstance(row, dict):
            raise InputError(f"{path} line {number}: expected a JSON object, found {type(row).__name__}")
        if header is None:
            header = list(row)
            yield header
        yield [row.get(key) for key in header]


def describe_bad_utf8(path: Path) -> str:
    """Where a file stops being UTF-8: read its raw bytes again to name the line and byte."""
    raw = (gzip.open if path.name.endswith(".gz") else open)(path, "rb").read()
    try:
        raw.decode("utf-8")
        return f"{path} is not UTF-8 text"
    except UnicodeDecodeError as e:
        line = raw.count(b"\n", 0, e.start) + 1
        return (f"{path} is not UTF-8 text: byte 0x{raw[e.start]:02x} at line {line} (byte {e.start} of the "
                f"{'uncompressed ' if path.name.endswith('.gz') else ''}file); re-save it as UTF-8")


def read_hub(name: str, columns: tuple[str, str, str] | None, config: str, split: str) -> tuple[list[tuple], str]:
    """The pair columns of a Hugging Face dataset split, as `read_file` gives them."""
    from datasets import load_dataset
    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name or config: one line is enough for the user
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise InputError(f"could not load '{name}' ({config}, {split}) from the Hugging Face hub "
                         f"(offline, or no such dataset?): {first_line}") from e
    table = dataset.to_dict()
    return select(itertools.chain([list(table)], zip(*table.values())), columns, name)


def pick_columns(found: list[str], columns: tuple[str, str, str] | None, source: str) -> tuple[str, str, str]:
    """The (text1, text2, label) column names: as given, or the first known triple present."""
    if columns is None:
        columns = next((c for c in KNOWN_COLUMNS if set(c) <= set(found)), None)
        if columns is None:
            raise InputError(f"{source}: no known pair columns; found {found}; name them with --columns TEXT1,TEXT2,LABEL")
    missing = [c for c in columns if c not in found]
    if missing:
        raise InputError(f"{source}: missing columns {missing}; found {found}")
    return columns


def to_pairs(rows: list[tuple], label_column: str, source: str) -> list[Pair]:
    """(text1, text2, label) rows as pairs, checking that every label is 0 or 1."""
    labels = [parse_label(y) for _, _, y in rows]
    bad = sorted({str(row[2]) for row, parsed in zip(rows, labels) if parsed is None})
    if bad:
        raise InputError(f"{source}: labels must be 0 or 1; column '{label_column}' also holds {bad[:5]}")
    return [(str(a or ""), str(b or ""), y) for (a, b, _), y in zip(rows, labels)]


def parse_label(value) -> int | None:
    """0 or 1 from ints, floats, bools or their strings; None for anything else."""
    if isinstance(value, str):
        value = value.strip().lower()
        value = {"true": 1, "false": 0}.get(value, value)
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return int(number) if number in (0.0, 1.0) else None


REPORTED: set[str] = set()  # files whose dropped pairs were already named: once per file, not per read


def drop_useless(pairs: list[Pair], source: str) -> list[Pair]:
    """Without pairs that have an empty text or pair a text with itself (as normalised)."""
    empty = sum(1 for a, b, _ in pairs if not a.strip() or not b.strip())
    kept = [p for p in pairs if p[0].strip() and p[1].strip() and normalise(p[0]) != normalise(p[1])]
    if len(kept) < len(pairs) and source not in REPORTED:
        REPORTED.add(source)
        print(f"{source}: dropped {empty} pair(s) with an empty text and {len(pairs) - len(kept) - empty} "
              f"pair(s) of a text with itself; {len(kept)} left")
    if not kept:
        raise InputError(f"{source}: no usable pairs")
    return kept


def write_pairs(pairs: list[Pair], path: Path) -> Path:
    """Pairs as a gzipped TSV that `load_pairs` reads back (question1, question2, is_duplicate)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["question1", "question2", "is_duplicate"])
        writer.writerows(pairs)
    return path


# --------------------------------------------------------------------------------------- splitting

def normalise(text: str) -> str:
    """The form under which two texts count as the same: lower-cased, white space folded."""
    return " ".join(text.lower().split())


def union_find(edges: Iterable[tuple[str, str]]) -> Callable[[str], str]:
    """Join the two ends of every edge; returns `root(x)`, equal for texts joined by a path."""
    parent: dict[str, str] = {}

    def root(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    for a, b in edges:
        parent[root(a)] = root(b)
    return root


def connected_components(pairs: list[Pair]) -> list[list[int]]:
    """Group pair indices so that pairs sharing a (normalised) text land in the same group."""
    root = union_find((normalise(a), normalise(b)) for a, b, _ in pairs)
    groups: dict[str, list[int]] = {}
    for i, (a, _, _) in enumerate(pairs):
        groups.setdefault(root(normalise(a)), []).append(i)
    return list(groups.values())


def split_pairs(pairs: list[Pair], val_size: float, test_size: float,
                seed: int = 0) -> tuple[list[Pair], list[Pair], list[Pair]]:
    """Train/validation/test splits in which no text appears in two splits.

    A random split of Quora leaks: its questions recur across pairs, so a test question would be
    seen in training. We split whole connected components of the "shares a text" graph instead.
    Sizes are fractions (< 1) or pair counts (>= 1); a component goes to validation or test only if
    it fits in what that split still needs, so the sizes are upper bounds, met closely in practice.
    """
    want_val, want_test = (int(s * len(pairs)) if s < 1 else int(s) for s in (val_size, test_size))
    if want_val + want_test >= len(pairs):
        raise InputError(f"validation ({want_val}) and test ({want_test}) leave no training pairs out of {len(pairs)}")
    components = connected_components(pairs)
    random.Random(seed).shuffle(components)
    val, test, train = [], [], []
    for component in components:
        if len(val) + len(component) <= want_val:
            val += component
        elif len(test) + len(component) <= want_test:
            test += component
        else:
            train += component
    return tuple([pairs[i] for i in sorted(part)] for part in (train, val, test))


def drop_overlap(train: list[Pair], *held_out: list[Pair], remedy: str = "give training pairs that do not, or "
                 "leave out --val/--test to split them off --data") -> list[Pair]:
    """Training pairs without those that share a (normalised) text with the held-out pairs, which
    would otherwise leak into the evaluation. Separate files can overlap; splits made here do not.
    Nothing left is an error that says so, and what to do (`remedy`)."""
    seen = {normalise(t) for pairs in held_out for a, b, _ in pairs for t in (a, b)}
    kept = [p for p in train if normalise(p[0]) not in seen and normalise(p[1]) not in seen]
    if train and not kept:
        raise InputError(f"all {len(train)} training pairs share a text with the validation or test pairs: {remedy}")
    if len(kept) < len(train):
        print(f"dropped {len(train) - len(kept)} training pair(s) sharing a text with validation or test")
    return kept


def parse_columns(text: str | None) -> tuple[str, str, str] | None:
    """--columns TEXT1,TEXT2,LABEL: three names, or None to recognise them."""
    if not text:
        return None
    names = tuple(name.strip() for name in text.split(","))
    if len(names) != 3 or not all(names):
        raise InputError(f"--columns {text}: give three column names, TEXT1,TEXT2,LABEL (for example question1,question2,"
                         "is_duplicate)")
    return names


def subsample(pairs: list[Pair], n: int, seed: int = 0) -> list[Pair]:
    """The first n pairs of one seeded shuffle: nested, so the 100-pair sample lies inside the 200."""
    if n > len(pairs):
        raise InputError(f"--dataset-size {n} is more than the {len(pairs)} training pairs available")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order[:n]]


def duplicate_clusters(pairs: list[Pair]) -> list[list[str]]:
    """Texts joined by duplicate labels: A~B and B~C put A, B and C in one cluster. Each text once,
    in its first spelling; texts without any duplicate are left out."""
    root = union_find((normalise(a), normalise(b)) for a, b, y in pairs if y == 1)
    clusters: dict[str, dict[str, str]] = {}
    for a, b, y in pairs:
        if y == 1:
            for text in (a, b):
                clusters.setdefault(root(normalise(text)), {}).setdefault(normalise(text), text)
    return [list(members.values()) for members in clusters.values() if len(members) > 1]


def add_implied_pairs(pairs: list[Pair], negatives: bool = False) -> list[Pair]:
    """The pairs, and the pairs their labels imply: duplicates are transitive (A~B, B~C: A~C), and,
    with `negatives`, a non-duplicate between two clusters holds for all their members. A labelled
    pair is never relabelled. Call it on training pairs only: it never looks outside them."""
    clusters = duplicate_clusters(pairs)
    cluster_of = {normalise(t): i for i, members in enumerate(clusters) for t in members}
    labelled = {frozenset((normalise(a), normalise(b))) for a, b, _ in pairs}
    implied: dict[frozenset, Pair] = {}
    for members in clusters:
        for a, b in itertools.combinations(members, 2):
            implied.setdefault(frozenset((normalise(a), normalise(b))), (a, b, 1))
    if negatives:
        for a, b, y in pairs:
            ca, cb = cluster_of.get(normalise(a)), cluster_of.get(normalise(b))
            if y == 0 and ca != cb:
                for x, z in itertools.product(clusters[ca] if ca is not None else [a], clusters[cb] if cb is not None else [b]):
                    implied.setdefault(frozenset((normalise(x), normalise(z))), (x, z, 0))
    new = [pair for key, pair in implied.items() if key not in labelled]
    print(f"implied pairs: {len(pairs)} labelled + {sum(y for *_, y in new)} duplicates "
          f"+ {sum(1 - y for *_, y in new)} non-duplicates")
    return pairs + new
