"""What a person does to a flywheel home besides its rounds: see the conflicts and settle them, correct
or withdraw a label, export every pair, prune old rounds' folders, move the home to another database.
`flywheel.py` parses the flags and calls these; each prints what it did in a line or two.

    python flywheel.py --home fw --conflicts                       # show_data
    python flywheel.py --home fw --correct "Q1" "Q2" 0 --why WHY   # correct
    python flywheel.py --home fw --export out/                     # show_data
    python flywheel.py --home fw --prune 3                         # prune
    python flywheel.py --home fw --migrate [--database URL]        # migrate
"""
from __future__ import annotations

import shutil
from pathlib import Path

from embed_ft import jsonl
from embed_ft.state import home_state
from embed_ft.errors import InputError
from embed_ft.state.file_lock import FileLock


def show_data(home: Path, conflicts: bool, export: str | None) -> None:
    """--conflicts and --export: what a person needs to see and take."""
    db = home_state.database(home)
    if db is None:
        raise InputError(f"{home} keeps its pairs in files (pairs/, made before the database): run "
                         f"python flywheel.py --home {home} --migrate first")
    if conflicts:
        rows = db.conflicts()
        for c in rows:
            why = "another label" if c["reason"] == "label" else f"id {c['id']!r} names another pair"
            settled = ("not settled" if c["settled_by"] is None else f"settled by {c['settled_by']}: " +
                       ("withdrawn" if c["withdrawn"] else f"label {c['label_now']}"))
            print(f"{c['received']}  {why}: posted label {c['label']} (id {c['id']}, source {c['source']}) for "
                  f"{c['text1']!r} / {c['text2']!r}; stored label {c['stored_label']} (id {c['stored_id']}, "
                  f"{c['stored_received']}) for {c['stored_text1']!r} / {c['stored_text2']!r}; {settled}")
        open_ = sum(c["settled_by"] is None for c in rows)
        print(f"{len(rows)} conflicts, {open_} not settled (a conflicting post never trains; settle one with "
              f"python flywheel.py --home {home} --correct TEXT1 TEXT2 LABEL --why WHY, LABEL 0, 1 or withdraw)")
    if export:
        written = db.export(Path(export))
        print(f"{export}: pairs.tsv ({written['pairs']} pairs, each once, as corrected), conflicts.tsv "
              f"({written['conflicts']}), corrections.tsv ({written['corrections']}); "
              f"python train.py --data {Path(export) / 'pairs.tsv'} reads them")


def correct(home: Path, given: list[str], why: str | None, by: str) -> None:
    """--correct TEXT1 TEXT2 LABEL --why WHY: a person's correction, kept; the next round trains on it."""
    text1, text2, label = given
    if label not in ("0", "1", "withdraw"):
        raise InputError(f"--correct: LABEL is 0, 1 or withdraw (got {label!r})")
    if not why or not why.strip():
        raise InputError("--correct needs --why: the reason is kept beside the correction")
    db = home_state.database(home)
    if db is None:
        raise InputError(f"{home} keeps its pairs in files (made before the database): run --migrate first")
    db.correct([{"text1": text1, "text2": text2, "label": None if label == "withdraw" else int(label), "by": by, "why": why}])
    print(f"{text1!r} / {text2!r}: " + ("withdrawn" if label == "withdraw" else f"label {label}") +
          f", by {by} ({why}); the next round trains on it, its texts keep their splits")


def prune(home: Path, keep: int) -> None:
    """--prune KEEP: every round's model folder and training files go, but the versions the home serves
    (current, previous, and any a corpus folder names: a client pinned to one keeps working) and the
    last KEEP rounds'. Under
    the round lock, so no round writes meanwhile. The history, which keeps every round's numbers, stays."""
    if keep < 0:
        raise InputError("--prune KEEP: a number of rounds, 0 or more")
    served = {pointer["path"] for pointer in home_state.served(home).values() if pointer and pointer["path"]}
    served |= {p["path"] for p in map(lambda v: home_state.pointer_of(home, v), home_state.corpora(home).values())
               if p and p["path"]}  # a version a corpus folder names is still served
    db = home_state.database(home)
    freed, removed = 0, []
    with db.round_lock(wait=False) if db is not None else FileLock(home / "round.lock", wait=False):
        rounds = sorted({p.name for kind in ("rounds", "work") for p in (home / kind).glob("round-*") if p.is_dir()})
        for name in rounds[:max(0, len(rounds) - keep)]:
            for folder in (home / "rounds" / name, home / "work" / name):
                if folder.is_dir() and str(folder.relative_to(home)) not in served:
                    freed += sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
                    shutil.rmtree(folder)
                    removed.append(str(folder.relative_to(home)))
    print(f"{len(removed)} folders removed ({freed / 2 ** 20:.0f} MiB): {', '.join(removed) or 'none'}; kept the versions "
          f"served ({', '.join(sorted(served)) or 'the base model'}) and the last {keep} rounds")


def migrate(home: Path, url: str) -> None:
    """--migrate: a file home's pairs, splits and versions into the database, once; or a database
    home's into another database (SQLite to PostgreSQL when a second server is needed, or back for
    a test copy), the old one kept."""
    if not (home / "flywheel.json").is_file():
        raise InputError(f"{home} is not a flywheel home (no flywheel.json)")
    db = home_state.database(home)
    if db is not None:
        return move_database(home, db, url)
    with FileLock(home / "round.lock", wait=False):  # no round of the file home reads while it moves
        counts = home_state.migrate(home, url)
    print(f"{home} now keeps its state in {url}: {counts['read']} pairs that rounds have read and {counts['unread']} "
          f"not yet read, {counts['duplicates']} repeats dropped, {counts['conflicts']} conflicts kept apart, "
          f"{counts['texts']} texts keep their splits, serving {counts['version']}. The files stay as they were; "
          "restart the servers of this home.")


def move_database(home: Path, db, url: str) -> None:
    """Every pair, conflict, split, version and threshold of the home's database into the one at
    `url`, holding the round lock; flywheel.json names the new one last, so a move that fails leaves
    the home as it was. Servers must be stopped first: a pair posted to the old database meanwhile
    would stay there (the counts are compared after the copy to catch one)."""
    if url == db.url:
        raise InputError(f"{home} keeps its state in {url} already: give --database another URL to move it")
    target = home_state.open_database(url, home.resolve())
    with db.round_lock(wait=False):
        counts = db.copy_into(target)
        if db.count() != counts["pairs"]:
            raise InputError(f"pairs arrived at {db.url} during the move: stop this home's servers, empty {url} and "
                             "run --migrate again")
        settings = jsonl.read_json(home / "flywheel.json")
        jsonl.write_json(home / "flywheel.json", settings | {"database": url})
    print(f"{home} now keeps its state in {url}: {counts['pairs']} pairs, {counts['conflicts']} conflicts, "
          f"{counts['splits']} texts' splits, {counts['state']} state rows (versions served, base threshold), each seq "
          f"kept. {db.url} is left as it was until you remove it; start this home's servers again.")
