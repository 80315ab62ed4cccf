"""Results on disk: JSON Lines, one result a line, appended and flushed to disk as each run ends,
so an interrupted sweep (or comparison, or flywheel) loses nothing that finished.
"""
from __future__ import annotations

import json
import os
from pathlib import Path


def read(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def append(path: Path, row: dict) -> None:
    """Append one line and make sure it is on disk before going on."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())
