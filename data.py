"""Labelled text pairs: load them, split them without leakage, subsample, tokenise and batch.

A pair is `(text1, text2, label)`, label 1 when the two texts mean the same thing (a duplicate) and
0 otherwise. Pairs come from the Hugging Face hub (Quora duplicates by default) or from a local
CSV/TSV (optionally gzipped), JSONL or Parquet file: bring your own pairs.
"""
from __future__ import annotations

import csv
import gzip
import json
import random
import re
from pathlib import Path
from typing import Iterator

import numpy as np

Pair = tuple[str, str, int]

HUB_DEFAULT = "sentence-transformers/quora-duplicates"
# Column names we recognise without being told, as (text1, text2, label).
KNOWN_COLUMNS = [
    ("question1", "question2", "is_duplicate"),
    ("sentence1", "sentence2", "label"),
    ("text1", "text2", "label"),
]
LOCAL_SUFFIXES = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".gz")


class DataError(ValueError):
    """Bad input data. The command-line tools print its message on one line, not a traceback."""


# ---------------------------------------------------------------------------------------- loading

def load_pairs(source: str, columns: tuple[str, str, str] | None = None,
               hub_config: str = "pair-class", hub_split: str = "train") -> list[Pair]:
    """Read labelled pairs from a local file or, if `source` is no file, a Hugging Face dataset."""
    path = Path(source)
    if path.is_file():
        table = read_table(path)
    elif path.suffix in LOCAL_SUFFIXES or ("/" in source and not _looks_like_hub_id(source)):
        raise DataError(f"file not found: {source}")
    else:
        table = read_hub(source, hub_config, hub_split)
    return table_to_pairs(table, columns, source)


def _looks_like_hub_id(source: str) -> bool:
    return re.fullmatch(r"[\w.-]+/[\w.-]+", source) is not None and not source.startswith(".")


def read_table(path: Path) -> dict[str, list]:
    """A local file as {column: values}. CSV/TSV (optionally .gz), JSONL or Parquet."""
    name = path.name.removesuffix(".gz")
    if name.endswith(".parquet"):
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pydict()
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8", newline="") as f:
        if name.endswith((".jsonl", ".json")):
            rows = [json.loads(line) for line in f if line.strip()]
        elif name.endswith((".tsv", ".csv")):
            rows = list(csv.DictReader(f, delimiter="\t" if name.endswith(".tsv") else ","))
        else:
            raise DataError(f"unknown file type: {path} (use .csv, .tsv, .jsonl or .parquet, optionally .gz)")
    if not rows:
        raise DataError(f"no rows in {path}")
    return {key: [row.get(key) for row in rows] for key in rows[0]}


def read_hub(name: str, config: str, split: str) -> dict[str, list]:
    """A Hugging Face dataset split as {column: values}."""
    from datasets import load_dataset
    try:
        dataset = load_dataset(name, config, split=split)
    except Exception as e:  # network, unknown name or config: one line is enough for the user
        raise DataError(f"could not load '{name}' ({config}, {split}) from the Hugging Face hub: {e}") from e
    return dataset.to_dict()


def table_to_pairs(table: dict[str, list], columns: tuple[str, str, str] | None, source: str) -> list[Pair]:
    """Pick the text and label columns and check that every label is 0 or 1."""
    found = list(table)
    if columns is None:
        columns = next((c for c in KNOWN_COLUMNS if set(c) <= set(found)), None)
        if columns is None:
            raise DataError(f"{source}: no known pair columns; found {found}; name them with --columns TEXT1,TEXT2,LABEL")
    missing = [c for c in columns if c not in table]
    if missing:
        raise DataError(f"{source}: missing columns {missing}; found {found}")
    text1, text2, label = (table[c] for c in columns)
    labels = [parse_label(y) for y in label]
    bad = sorted({str(y) for y, parsed in zip(label, labels) if parsed is None})
    if bad:
        raise DataError(f"{source}: labels must be 0 or 1; column '{columns[2]}' also holds {bad[:5]}")
    return [(str(a or ""), str(b or ""), y) for a, b, y in zip(text1, text2, labels)]


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


# --------------------------------------------------------------------------------------- splitting

def normalise(text: str) -> str:
    """The form under which two texts count as the same: lower-cased, white space folded."""
    return " ".join(text.lower().split())


def connected_components(pairs: list[Pair]) -> list[list[int]]:
    """Group pair indices so that pairs sharing a (normalised) text land in the same group."""
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        parent.setdefault(x, x)
        while parent[x] != x:
            parent[x] = parent[parent[x]]  # path halving keeps the trees flat
            x = parent[x]
        return x

    for a, b, _ in pairs:
        parent[find(normalise(a))] = find(normalise(b))
    groups: dict[str, list[int]] = {}
    for i, (a, _, _) in enumerate(pairs):
        groups.setdefault(find(normalise(a)), []).append(i)
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
        raise DataError(f"validation ({want_val}) and test ({want_test}) leave no training pairs out of {len(pairs)}")
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


def subsample(pairs: list[Pair], n: int, seed: int = 0) -> list[Pair]:
    """The first n pairs of one seeded shuffle: nested, so the 100-pair sample lies inside the 200."""
    if n > len(pairs):
        raise DataError(f"--dataset-size {n} is more than the {len(pairs)} training pairs available")
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order[:n]]


# -------------------------------------------------------------------------- tokenising and batching

class TokenizedPairs:
    """Pairs tokenised once: each distinct text is tokenised a single time, pairs point at them."""

    def __init__(self, pairs: list[Pair], tokenizer, max_length: int):
        texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
        index = {t: i for i, t in enumerate(texts)}
        self.input_ids: list[list[int]] = tokenizer(texts, truncation=True, max_length=max_length)["input_ids"]
        self.pairs = np.array([(index[a], index[b]) for a, b, _ in pairs], dtype=np.int64).reshape(-1, 2)
        self.labels = np.array([y for _, _, y in pairs], dtype=np.int64)
        self.tokenizer = tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def batches(self, batch_size: int, rng: np.random.Generator,
                length_groups: int = 1) -> Iterator[tuple[list[dict], "torch.Tensor", "torch.Tensor"]]:
        """Shuffled batches of B pairs as (feature groups, restore, labels).

        The batch's 2B texts (all first texts, then all second texts) are sorted by length and cut
        into `length_groups` groups, each padded only to its own longest text: Quora questions vary
        in length, and one group pads about 2.8x the real tokens where four groups pad 1.4x.
        `torch.cat(embeddings of the groups)[restore]` puts the embeddings back in batch order.
        """
        import torch
        order = rng.permutation(len(self))
        for start in range(0, len(order), batch_size):
            chosen = order[start:start + batch_size]
            text_ids = np.concatenate([self.pairs[chosen, 0], self.pairs[chosen, 1]])
            by_length = np.argsort([len(self.input_ids[i]) for i in text_ids], kind="stable")
            groups = [self.tokenizer.pad({"input_ids": [self.input_ids[i] for i in text_ids[group]]},
                                         return_tensors="pt")
                      for group in np.array_split(by_length, min(length_groups, len(by_length)))]
            yield [dict(g) for g in groups], torch.from_numpy(np.argsort(by_length)), torch.from_numpy(self.labels[chosen])
