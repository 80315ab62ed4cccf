"""Results on disk. JSON Lines: one result a line, appended and flushed to disk as each run ends,
so an interrupted sweep (or comparison, or flywheel) loses nothing that finished; a line cut short
by a crash mid-write is skipped with a warning, and the next result starts on a line of its own.
JSON files (metrics.json, a model's configuration) are written whole or not at all.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path


def read(path: Path) -> list[dict]:
    """Every complete row; a torn line (a crash mid-write) is named on stderr and skipped."""
    if not Path(path).exists():
        return []
    rows = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except ValueError:
            print(f"warning: {path}:{number} is not a complete JSON line (cut short by a crash?): skipped",
                  file=sys.stderr)
    return rows


def append(path: Path, row: dict) -> None:
    """Append one line and make sure it is on disk before going on."""
    append_rows(path, [row])


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append a line a row in one write, on disk before going on (nothing to do for no rows)."""
    if not rows:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("ab") as f:
        torn = f.tell() > 0 and not ends_with_newline(path)
        f.write(("\n" if torn else "").encode() + "".join(json.dumps(row) + "\n" for row in rows).encode())
        f.flush()
        os.fsync(f.fileno())


def ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def read_json(path: Path):
    """A JSON file written by `write_json`, or None where there is none yet."""
    path = Path(path)
    return json.loads(path.read_text()) if path.is_file() else None


def write_json(path: Path, obj) -> None:
    """Write through a temporary file and rename it, so an interruption never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
