"""The labelled pairs that users send to `POST /v1/pairs`, kept where the flywheel's round reads them.

    store = PairStore(Path("fw/pairs"))
    store.add([{"text1": "How do I learn Python?", "text2": "Best way to learn Python?", "label": 1}])
    # -> {"accepted": 1, "duplicates": 0, "conflicts": 0}

Layout: one JSON Lines file per accepted batch, written to a temporary name, flushed to disk and
renamed, so a file is either whole or absent; `add` returns only after that, so an acknowledged pair
survives a `kill -9` the moment after. Pairs whose label contradicts a stored one go to
`conflicts/` instead, and are counted: a contradiction is a question for a person, never a silent
overwrite.

    fw/pairs/batch-20261201T204500.123456-3f2a9c....jsonl   {"text1", "text2", "label", "id", "source"} a line
    fw/pairs/conflicts/batch-....jsonl                  the contradicting ones, kept apart

Why a file per batch, not one file appended to: several server processes, or several containers on a
Modal Volume (where concurrent writes to one file are last-write-wins), each write files of their
own, and no write can clobber another. The name starts with the time (so name order is arrival
order) and ends with a hash of the content (so two writers never pick one name). Within one machine
a lock file serialises the writers, so a pair is stored once; across containers two of them can
each store the same pair in the same instant: `settle`, which the round applies to everything it
reads, keeps the first and sets later contradictions aside, so training sees each pair once.

A pair is identified by its two texts, normalised as everywhere else (`data.normalise`) and in
either order (a duplicate relation is symmetric), and, if the client gives one, by its `id`.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from pathlib import Path

from embed_ft import data
from embed_ft.state.file_lock import FileLock

FIELDS = ("text1", "text2", "label", "id", "source")


def pair_key(text1: str, text2: str) -> tuple[str, str]:
    """The same key for (a, b) and (b, a), however each is spelled or spaced."""
    return tuple(sorted((data.normalise(text1), data.normalise(text2))))


def settle(pairs: list[data.Pair]) -> tuple[list[data.Pair], int, int]:
    """Each pair once, in the order given: (kept, repeats dropped, contradictions dropped). A later
    pair whose label contradicts an earlier one is dropped, as the store would have kept it apart."""
    labels: dict[tuple[str, str], int] = {}
    kept, repeats, conflicts = [], 0, 0
    for a, b, y in pairs:
        key = pair_key(a, b)
        if key not in labels:
            labels[key] = y
            kept.append((a, b, y))
        elif labels[key] == y:
            repeats += 1
        else:
            conflicts += 1
    return kept, repeats, conflicts


def pair_sources(files: list[Path]) -> dict[tuple[str, str], str]:
    """The `source` a client named for each pair (by `pair_key`), from the store's JSON Lines files:
    what lets a round break its errors down by domain. Files without the field name none."""
    sources: dict[tuple[str, str], str] = {}
    for path in files:
        if not path.name.endswith(".jsonl"):
            continue
        for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                row = json.loads(line)
            except ValueError:
                continue
            if isinstance(row, dict) and row.get("source") and row.get("text1") and row.get("text2"):
                sources.setdefault(pair_key(str(row["text1"]), str(row["text2"])), str(row["source"]))
    return sources


class PairStore:
    """The store in one folder. Thread-safe, and safe across processes on one machine."""

    def __init__(self, folder: Path):
        self.folder, self.conflicts = Path(folder), Path(folder) / "conflicts"
        self.conflicts.mkdir(parents=True, exist_ok=True)
        self.labels: dict[tuple[str, str], int] = {}   # every stored pair's label
        self.ids: dict[str, tuple[str, str]] = {}      # every stored client id, and the pair it names
        self.read_files: set[str] = set()
        self.conflicting = 0
        self.lock = threading.Lock()

    def add(self, pairs: list[dict]) -> dict:
        """Store the new pairs of a batch (already validated: text1, text2, label 0/1, optional id and
        source), durably, before returning the counts of accepted, duplicate, conflicting and dropped
        pairs, and how many the store holds now. Once means once within a batch as across batches. An
        id seen before names the same pair or is a conflict, kept apart (never a silent duplicate); a
        pair of a text with itself teaches nothing and is dropped and counted, as train.py drops it."""
        with self.lock, self.exclusive():
            self.refresh()  # what other processes stored since the last call
            fresh, contradicting, duplicates, itself = [], [], 0, 0
            batch_labels: dict[tuple[str, str], int] = {}
            batch_ids: dict[str, tuple[str, str]] = {}
            for pair in pairs:
                key = pair_key(pair["text1"], pair["text2"])
                if key[0] == key[1]:
                    itself += 1
                    continue
                pair_id = None if pair.get("id") is None else str(pair["id"])
                named = self.ids.get(pair_id, batch_ids.get(pair_id)) if pair_id is not None else None
                known = self.labels.get(key, batch_labels.get(key))
                if named is not None and named != key:  # one id, two different pairs: a question for a person
                    contradicting.append(pair)
                elif named is not None or known == pair["label"]:
                    duplicates += 1
                elif known is not None:
                    contradicting.append(pair)
                else:
                    batch_labels[key] = pair["label"]
                    if pair_id is not None:
                        batch_ids[pair_id] = key
                    fresh.append(pair)
            for rows, folder in ((fresh, self.folder), (contradicting, self.conflicts)):
                if rows:
                    self.read_files.add(write_batch(folder, rows).name)
            self.index(fresh)
            self.conflicting += len(contradicting)
            return {"accepted": len(fresh), "duplicates": duplicates, "conflicts": len(contradicting),
                    "dropped_self_pairs": itself, "stored": len(self.labels)}

    def refresh(self) -> None:
        """Read the batch files that this process has not read yet (a torn one cannot exist)."""
        for folder, conflicting in ((self.folder, False), (self.conflicts, True)):
            for path in sorted(folder.glob("batch-*.jsonl")):
                if path.name in self.read_files:
                    continue
                rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                if conflicting:
                    self.conflicting += len(rows)
                else:
                    self.index(rows)
                self.read_files.add(path.name)

    def index(self, rows: list[dict]) -> None:
        for row in rows:
            key = pair_key(row["text1"], row["text2"])
            self.labels.setdefault(key, row["label"])
            if row.get("id") is not None:
                self.ids.setdefault(str(row["id"]), key)

    def count(self) -> int:
        """Pairs stored (each once), after reading what other processes added."""
        with self.lock, self.exclusive():
            self.refresh()
            return len(self.labels)

    def exclusive(self):
        """An advisory lock on the folder's lock file: one writer at a time on this machine."""
        return FileLock(self.folder / ".lock")


def write_batch(folder: Path, rows: list[dict]) -> Path:
    """One file, durably: written under a temporary name, fsynced, renamed, and the folder fsynced
    (the rename itself must reach the disk before the client hears "stored")."""
    text = "".join(json.dumps({k: row.get(k) for k in FIELDS}, ensure_ascii=False) + "\n" for row in rows)
    digest = hashlib.sha256(text.encode()).hexdigest()[:16]
    now = time.time_ns()  # to the microsecond: batches that arrive within one second keep their order by name
    path = folder / f"batch-{time.strftime('%Y%m%dT%H%M%S', time.gmtime(now // 10**9))}.{now // 1000 % 10**6:06d}-{digest}.jsonl"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
    return path
