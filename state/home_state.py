"""A flywheel home's state: where it lives, and the few things every process must agree on.

A home is a folder (flywheel.json, the model folders under rounds/, history.jsonl) and, for everything
that servers and rounds share, a database (`state/home_db.py`): the pairs, the conflicts, each text's split,
the versions served and the base model's threshold. flywheel.json's `database` names it:

    sqlite:///pairs.db                           the default: a file in the home, one machine, nothing to install
    postgresql://embed@db.internal:5432/fw       several machines (Modal containers) serving one home

A home made before there was a database keeps its state in files (pairs/, splits.jsonl,
current.json, base.json) and opens as it did; `migrate` moves it into a database once. Every reader
here answers for both kinds, so the round and the server never ask which kind they have.
"""
from __future__ import annotations

import functools
import hashlib
import json
import time
from pathlib import Path

from embed_ft import data, jsonl
from embed_ft.state import heldout
from embed_ft.errors import InputError
from embed_ft.state.home_db import HomeDB
from embed_ft.state.pair_store import PairStore

DEFAULT_DATABASE = "sqlite:///pairs.db"  # relative: inside the home
BASE_POINTER = {"version": "base", "path": None, "promoted_at": None}


@functools.cache
def open_database(url: str, home: Path) -> HomeDB:
    """One connection (or pool) a process for each home's database."""
    return HomeDB(url, home)


def database(home: Path) -> HomeDB | None:
    """The home's database, or None for a home whose state is in files."""
    url = (jsonl.read_json(home / "flywheel.json") or {}).get("database")
    return open_database(url, home.resolve()) if url else None


def pair_store(home: Path) -> HomeDB | PairStore:
    """Where `POST /v1/pairs` stores: both kinds answer add() and count() alike."""
    return database(home) or PairStore(home / "pairs")


def ledger(home: Path) -> heldout.Ledger:
    return heldout.Ledger(database(home) or home / "splits.jsonl")


# --------------------------------------------------------------------------- the versions served

def served(home: Path) -> dict:
    """{"current": pointer, "previous": pointer or None}; a pointer is {"version", "path", "promoted_at"},
    the path relative to the home ("base" before any promotion)."""
    db = database(home)
    if db is not None:
        return db.state("served") or {"current": BASE_POINTER, "previous": None}
    current = jsonl.read_json(home / "current.json") or BASE_POINTER
    promoted = [r for r in jsonl.read(home / "history.jsonl") if r.get("decision") == "promoted"]
    earlier = [{"version": Path(r["candidate"]).name, "path": r["candidate"], "promoted_at": r["time"]} for r in promoted]
    earlier = [BASE_POINTER] + [p for p in earlier if p["version"] != current["version"]]
    return {"current": current, "previous": earlier[-1] if current["version"] != "base" else None}


def current_version(home: Path) -> dict:
    """The current version's pointer: {"version", "path", "promoted_at"}."""
    return served(home)["current"]


class LostRace(Exception):
    """The home's served version changed since this round started: another round promoted meanwhile
    (this one lost its lock: an idle connection dropped, its backend terminated)."""


def round_number(home: Path, history: list[dict]) -> int:
    """The number of the round that starts now, holding the round lock: one past the history's last.
    On PostgreSQL a round can lose its lock and go on (an idle connection dropped, its backend
    terminated) while another takes the lock, so the number comes from the database, where every
    round takes its own and none is taken twice: two rounds never write one folder. (A round
    interrupted there starts again under a new number; on SQLite, one machine whose kernel lock a
    living round cannot lose, it keeps its number and resumes its checkpoint.)"""
    by_history = max((row["round"] for row in history), default=0) + 1
    db = database(home)
    return db.take_round_number(by_history) if db is not None and db.dialect == "postgresql" else by_history


def switch_current(home: Path, target: Path, expected: dict | None = None, number: int | None = None,
                   fingerprint: str | None = None) -> None:
    """Make the model folder `target` (complete, under the home) current; the one before stays served.
    One row (or, in a file home, one small file renamed over the old one): a reader sees the old
    pointer or the new one, never half of one. With `expected` (the current pointer when round
    `number` started) the switch is a compare-and-set in the writers' turn, a fencing token: if
    another round has switched or taken a number since, nothing changes and LostRace says so. The
    pointer keeps the model's `fingerprint` (fingerprint.py), so that a server that finds another
    model in the folder refuses it."""
    pointer = {"version": target.name, "path": str(target.relative_to(home)),
               "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")} | ({"fingerprint": fingerprint} if fingerprint else {})
    db = database(home)
    if db is None:
        jsonl.write_json(home / "current.json", pointer)
        return
    with db.transaction(writing=True) as cursor:
        now = (db.read_state(cursor, "served") or {"current": BASE_POINTER})["current"]
        if expected is not None and now != expected:
            raise LostRace(f"the home serves {now['version']} now, not {expected['version']} as when this round began")
        taken = db.read_state(cursor, "round_taken")
        if number is not None and taken is not None and taken != number:
            raise LostRace(f"round {taken} has started since this one (round {number}) did")
        db.write_state(cursor, "served", {"current": pointer, "previous": now})


def name_corpus(home: Path, corpus: Path, version: str) -> None:
    """A corpus folder (corpus.py embed --home) was embedded with `version`: every server keeps that
    version loaded while a corpus names it, so that a client whose index was built with it can embed
    its queries with it, however many promotions come before the corpus moves on. One entry a corpus
    folder: re-embedding it with a newer version lets the older one go."""
    named = corpora(home) | {str(corpus.resolve()): version}
    db = database(home)
    if db is not None:
        db.set_state("corpora", named)
    else:
        jsonl.write_json(home / "corpora.json", named)


def corpora(home: Path) -> dict[str, str]:
    """{corpus folder: the version it was embedded with}."""
    db = database(home)
    return (db.state("corpora") if db is not None else jsonl.read_json(home / "corpora.json")) or {}


def pointer_of(home: Path, version: str) -> dict | None:
    """The pointer of a version the home has promoted (or the base model's), from its history."""
    if version == "base":
        return BASE_POINTER
    promoted = [r for r in jsonl.read(home / "history.jsonl") if r.get("decision") == "promoted"
                and Path(r["candidate"]).name == version]
    return {"version": version, "path": promoted[-1]["candidate"], "promoted_at": promoted[-1]["time"]} if promoted else None


def base_threshold(home: Path) -> float | None:
    """The base model's threshold, as the last round (or a curated --val) tuned it on validation."""
    db = database(home)
    kept = db.state("base") if db is not None else jsonl.read_json(home / "base.json")
    return (kept or {}).get("threshold")


def keep_base_threshold(home: Path, threshold: float, validation_pairs: int, round_number: int | None) -> None:
    row = {"threshold": threshold, "round": round_number, "validation_pairs": validation_pairs}
    db = database(home)
    if db is not None:
        db.set_state("base", row)
    else:
        jsonl.write_json(home / "base.json", row)


# --------------------------------------------------------------------------------- the pairs

def pair_files(sources: list[str]) -> list[Path]:
    """The pair files in the given files and folders, in name order (files are read as train.py does)."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.name.endswith(data.LOCAL_SUFFIXES) and p.is_file())
        elif source.is_file():
            files.append(source)
        else:
            raise InputError(f"--pairs: {source} is neither a file nor a folder")
    return files


def file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def files_read(history: list[dict]) -> set[str]:
    """The fingerprints of the pair files that the rounds of a file home have read."""
    return {digest for row in history for digest in row.get("files", {}).values()}


def pairs_read(home: Path) -> int:
    """The seq of the last stored pair that a round has read (a database home)."""
    through = [r["pairs_through"] for r in jsonl.read(home / "history.jsonl") if "pairs_through" in r]
    return through[-1] if through else (database(home).state("migrated_through") or 0)


def new_pair_count(home: Path) -> int:
    """Pairs stored that no round has read yet: what a scheduler weighs before it starts a round."""
    db = database(home)
    if db is not None:
        return db.count(after=pairs_read(home))
    seen = files_read(jsonl.read(home / "history.jsonl"))
    folder = home / "pairs"
    files = pair_files([str(folder)]) if folder.is_dir() else []
    return sum(len(data.load_pairs(str(p))) for p in files if file_digest(p) not in seen)


# ------------------------------------------------------------------------------ the migration

def migrate(home: Path, url: str) -> dict:
    """Move a file home's state into the database at `url`, once: the pairs that rounds have read
    first (so a contradiction keeps the label the rounds trained on), then the unread ones, then the
    conflicts; each text's split as it was; the versions served and the base threshold. The files
    stay where they are; flywheel.json names the database last, so an interrupted migration leaves
    the home as it was and can run again (a pair already moved is a duplicate)."""
    db = HomeDB(url, home)
    seen = files_read(jsonl.read(home / "history.jsonl"))
    files = pair_files([str(home / "pairs")]) if (home / "pairs").is_dir() else []
    read = [f for f in files if file_digest(f) in seen]
    counts = {"read": 0, "unread": 0, "duplicates": 0, "conflicts": 0}
    for kind, group in (("read", read), ("unread", [f for f in files if f not in read]),
                        ("conflicts", sorted((home / "pairs" / "conflicts").glob("batch-*.jsonl")))):
        for path in group:
            outcome = db.add(*stored_rows(path))
            counts["read" if kind == "read" else "unread"] += outcome["accepted"]
            counts["duplicates"] += outcome["duplicates"]
            counts["conflicts"] += outcome["conflicts"]
        if kind == "read":
            db.set_state("migrated_through", db.last_seq())
    splits, _ = heldout.SplitsFile(home / "splits.jsonl").splits_after(0)
    db.add_splits(splits)
    db.set_state("served", served(home))
    base = jsonl.read_json(home / "base.json")
    if base:
        db.set_state("base", base)
    if corpora(home):
        db.set_state("corpora", corpora(home))
    settings = jsonl.read_json(home / "flywheel.json") or {}
    jsonl.write_json(home / "flywheel.json", settings | {"database": url})
    return counts | {"texts": len({t for t, _ in splits}), "version": served(home)["current"]["version"]}


def stored_rows(path: Path) -> tuple[list[dict], str]:
    """A pair file's rows as /v1/pairs takes them, and when they arrived: a store batch keeps its id
    and source, and its name says when it came; another pair file is named as its source."""
    received = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(path.stat().st_mtime))
    if path.name.startswith("batch-") and path.name.endswith(".jsonl"):
        stamp = path.name.removeprefix("batch-")[:15]
        received = f"{stamp[:4]}-{stamp[4:6]}-{stamp[6:8]}T{stamp[9:11]}:{stamp[11:13]}:{stamp[13:15]}Z"
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        return [{k: r.get(k) for k in ("text1", "text2", "label", "id", "source")} for r in rows], received
    return [{"text1": a, "text2": b, "label": y, "source": path.name} for a, b, y in data.load_pairs(str(path))], received
