"""Held-out pairs grown from the traffic: each text's split is decided once, when it is first seen.

A home made from a base model alone has no test set: its first labels are its traffic. So each
round, before it trains, gives every text that no round has seen yet a split (train, validation,
test or audit) and keeps it for good: in the home's database (`state/home_db.py`), or, in a home made
before there was one, in HOME/splits.jsonl, one line a text, appended and never rewritten:

    {"text": "how do i learn python?", "split": "test"}

A pair belongs to the split of its two texts. A pair whose texts lie in different splits (it joins
a training text to a test text, say) is used by none, and counted: training on it would leak. That
keeps the one rule that matters, no text in two splits, for the whole life of the home.

How a new text gets its split:
- paired with a text that has one, it takes that split (so a pair is usable whenever it can be);
- paired with another new text, the pair draws one, from a hash of its two texts (sha256, so the
  same pairs give the same splits on any machine, in any process): validation, test and audit take
  their `fractions` of the new pairs until each holds `caps` groups, then their `after_caps` share
  (the test set alone keeps growing, slowly: a test that grows with a home's age resolves smaller
  gains as the home's life-long level shrinks, `gate.py`); everything else trains.

A cap counts groups (pairs connected by shared texts, as `paired.groups_of` makes them), not pairs:
the pairs of one popular question share its difficulty, so it is the number of groups that sets how
precisely a held-out set measures an error (docs/evaluation.md: on real Quora traffic 20,000 pairs
made 11,545 groups and a design effect of 4.5). A cap in pairs would stop a test set that a few large
groups fill long before it can resolve a point of error.

Texts of a curated --val/--test (kept beside the traffic's, reported apart) have the split
"curated": a traffic pair that touches one trains nothing, as train.py drops such pairs.

The held-out pairs are written as ordinary pair files, HOME/heldout/{validation,test,audit}.tsv.gz,
so that a person can read them and `evaluate.py --val ... --test ...` can take them.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from embed_ft import data, jsonl

HELD_OUT = ("validation", "test", "audit")
CURATED = "curated"
# Chosen by reasoning about power and checked on real streams, not swept (docs/flywheel.md): early
# on, half of the new pairs are held out, most of them to decide promotions; once the test set
# holds 5,000 groups (enough to resolve about a point of error), 90% of what is new trains and the
# test set grows by the other 10% (the simulation in docs/flywheel.md: without it, the power of a
# home's 100th round fell to a third of its 16th's).
FRACTIONS = {"validation": 0.1, "test": 0.3, "audit": 0.1}
CAPS = {"validation": 1000, "test": 5000, "audit": 2000}
AFTER_CAPS = {"validation": 0.0, "test": 0.1, "audit": 0.0}


def draw(key: tuple[str, str], counts: dict, fractions: dict, caps: dict, after_caps: dict = AFTER_CAPS) -> str:
    """The split of a pair of two new texts: a point in [0, 1) from its hash, against the held-out
    fractions in order; a held-out split that is full (`counts`: its groups so far) keeps its
    `after_caps` share of them and gives the rest to training."""
    point = int.from_bytes(hashlib.sha256("\t".join(key).encode()).digest()[:8], "big") / 2 ** 64
    edge = 0.0
    for split in HELD_OUT:
        share = fractions[split] if counts[split] < caps[split] else min(after_caps.get(split, 0.0), fractions[split])
        if edge <= point < edge + share:
            return split
        edge += fractions[split]
    return "train"


class SplitsFile:
    """HOME/splits.jsonl, the ledger of a home whose state is in files (a database home keeps it in
    its `splits` table: `home_db.HomeDB` has the same two methods)."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def splits_after(self, offset: int) -> tuple[list[tuple[str, str]], int]:
        """The (text, split) rows appended after byte `offset`, and the offset to read on from."""
        if not self.path.is_file():
            return [], offset
        with open(self.path, "rb") as f:
            f.seek(offset)
            chunk = f.read()
        complete = chunk[:chunk.rfind(b"\n") + 1]  # a line being appended right now is read next time
        rows = []
        for line in complete.decode("utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line torn by a crash: its text is decided again, the same way
                continue
            rows.append((row["text"], row["split"]))
        return rows, offset + len(complete)

    def add_splits(self, rows: list[tuple[str, str]]) -> None:
        jsonl.append_rows(self.path, [{"text": text, "split": split} for text, split in rows])


class Ledger:
    """Each normalised text's split, read into memory from HOME/splits.jsonl or a home's database.
    `refresh()` reads only what was added since the last read (a server calls it on every batch of
    pairs)."""

    def __init__(self, source):
        self.source = SplitsFile(source) if isinstance(source, (str, Path)) else source
        self.split_of, self.offset = {}, 0
        self.refresh()

    def refresh(self) -> None:
        rows, self.offset = self.source.splits_after(self.offset)
        for text, split in rows:
            self.split_of.setdefault(text, split)

    def assign(self, pairs: list[data.Pair], curated: set[str] = frozenset(), fractions: dict = FRACTIONS,
               caps: dict = CAPS, after_caps: dict = AFTER_CAPS) -> dict[str, list[data.Pair]]:
        """Every pair's split, in the order given (arrival order), deciding the texts seen for the first
        time and keeping them. Returns {"train": [...], "validation": ..., "test", "audit", "curated",
        "unusable": [...]}."""
        self.refresh()
        decided: dict[str, str] = {}
        known = lambda text: self.split_of.get(text) or decided.get(text) or (CURATED if text in curated else None)
        out = {split: [] for split in ("train", *HELD_OUT, CURATED, "unusable")}
        groups = Groups()
        for pair in pairs:
            a, b = data.normalise(pair[0]), data.normalise(pair[1])
            split_a, split_b = known(a), known(b)
            if split_a is None and split_b is None:
                split_a = split_b = draw(tuple(sorted((a, b))), groups.count, fractions, caps, after_caps)
            for text, split in ((a, split_a or split_b), (b, split_b or split_a)):
                if known(text) is None:
                    decided[text] = split
            split_a, split_b = known(a), known(b)
            out[split_a if split_a == split_b else "unusable"].append(pair)
            if split_a == split_b:
                groups.join(a, b, split_a)
        self.source.add_splits(list(decided.items()))
        self.refresh()
        return out

    def split(self, text: str) -> str | None:
        """A text's split (normalised here), None for a text no round has seen yet."""
        return self.split_of.get(data.normalise(text))


class Groups:
    """Each split's number of groups (connected components of texts joined by its pairs), kept as
    pairs are added: a union-find over the normalised texts."""

    def __init__(self):
        self.parent: dict[str, str] = {}
        self.count: dict[str, int] = {split: 0 for split in ("train", *HELD_OUT, CURATED)}

    def root(self, text: str) -> str:
        while self.parent[text] != text:
            self.parent[text] = self.parent[self.parent[text]]  # halve the path as we go
            text = self.parent[text]
        return text

    def join(self, a: str, b: str, split: str) -> None:
        for text in (a, b):
            if text not in self.parent:
                self.parent[text] = text
                self.count[split] += 1
        root_a, root_b = self.root(a), self.root(b)
        if root_a != root_b:
            self.parent[root_a] = root_b
            self.count[split] -= 1


def write_held_out(home: Path, splits: dict[str, list[data.Pair]]) -> dict[str, Path]:
    """HOME/heldout/{validation,test,audit}.tsv.gz, each rewritten whole (through a temporary file)."""
    files = {}
    for split in HELD_OUT:
        path = home / "heldout" / f"{split}.tsv.gz"
        tmp = data.write_pairs(splits[split], path.with_name(f".{path.name}.tmp"))
        tmp.replace(path)
        files[split] = path
    return files
