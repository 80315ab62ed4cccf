"""A corpus folder on disk: vectors in Parquet shards that other tools read as they are, and a manifest
that names everything that made them.

    DIR/manifest.json           the model (its fingerprint), pooling, prompt, width, dtype, counts, rate
    DIR/shard-00000.parquet     columns id (string), text (string), vector (fixed_size_list<float32>[width])
    DIR/shard-00001.parquet     ...
    DIR/index.faiss             the nearest-neighbour index over every shard's vectors, in shard order

DuckDB (`SELECT * FROM 'DIR/shard-*.parquet'`), LanceDB, pandas and Qdrant's and pgvector's loaders
take the shards as they are. A shard is written whole or not at all (a temporary name, flushed to
disk, then renamed), so a run killed at any moment leaves only whole shards, which a rerun keeps,
and a temporary file, which it removes: no torn shard is ever read.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import numpy as np

from embed_ft.errors import InputError
from embed_ft.jsonl import write_json

MANIFEST = "manifest.json"
INDEX = "index.faiss"
SHARD = re.compile(r"shard-(\d{5})\.parquet")


def shard_path(folder: Path, number: int) -> Path:
    return folder / f"shard-{number:05d}.parquet"


def shards(folder: Path) -> list[Path]:
    """The folder's whole shards, in order."""
    return sorted(p for p in folder.glob("shard-*.parquet") if SHARD.fullmatch(p.name)) if folder.is_dir() else []


def remove_leftovers(folder: Path) -> int:
    """Temporary files a killed run left behind: never read, removed before a run goes on."""
    leftovers = list(folder.glob("*.tmp"))
    for path in leftovers:
        path.unlink()
    return len(leftovers)


def write_shard(path: Path, ids: list[str], texts: list[str], vectors: np.ndarray) -> None:
    """One shard, whole or not at all (`write_whole`)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    width = vectors.shape[1]
    table = pa.table({"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string()),
                      "vector": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), pa.float32()), width)})
    write_whole(path, lambda temporary: pq.write_table(table, temporary))


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """`write(temporary)`, flushed to disk, then renamed to `path`: a reader sees the whole file or none.
    A disk that fills mid-write leaves nothing behind but a one-line error."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        write(temporary)
        with open(temporary, "rb+") as f:
            os.fsync(f.fileno())
        temporary.replace(path)
    except (OSError, RuntimeError) as e:  # FAISS reports a failed write as a RuntimeError
        temporary.unlink(missing_ok=True)
        reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e).strip().splitlines()[-1][-120:]
        raise InputError(f"could not write {path.name} in {path.parent} ({reason}); nothing half-written is left: "
                         f"free some space and run the same command again to go on") from None


def read_columns(path: Path, columns: list[str]) -> dict:
    import pyarrow.parquet as pq
    return pq.read_table(path, columns=columns).to_pydict()


def read_column(folder: Path, column: str) -> list:
    """One column of every shard, in shard order."""
    return [value for path in shards(folder) for value in read_columns(path, [column])[column]]


def read_vectors(path: Path) -> np.ndarray:
    """A shard's vectors as a float32 array (rows, width), without going through Python lists."""
    import pyarrow.parquet as pq
    column = pq.read_table(path, columns=["vector"]).column("vector").combine_chunks()
    return column.values.to_numpy(zero_copy_only=False).reshape(len(column), column.type.list_size).astype(np.float32)


def all_vectors(folder: Path) -> np.ndarray:
    """Every shard's vectors, in shard order: what the index is built over (rows x width x 4 bytes)."""
    parts = [read_vectors(p) for p in shards(folder)]
    return np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)


def rows_of(folder: Path, rows: np.ndarray, columns: tuple[str, ...] = ("id", "text")) -> list[dict]:
    """The id and text of each corpus row (a position in shard order), reading only the shards they fall in."""
    counts = [count_rows(p) for p in shards(folder)]
    starts = np.cumsum([0] + counts)
    out: dict[int, dict] = {}
    wanted = sorted(set(int(r) for r in np.ravel(rows) if r >= 0))
    for number, path in enumerate(shards(folder)):
        inside = [r for r in wanted if starts[number] <= r < starts[number + 1]]
        if inside:
            table = read_columns(path, list(columns))
            for r in inside:
                out[r] = {c: table[c][r - starts[number]] for c in columns}
    return [out.get(int(r), {}) for r in np.ravel(rows)]


def count_rows(path: Path) -> int:
    import pyarrow.parquet as pq
    return pq.ParquetFile(path).metadata.num_rows


def read_manifest(folder: Path) -> dict | None:
    path = folder / MANIFEST
    return json.loads(path.read_text()) if path.is_file() else None


def write_manifest(folder: Path, manifest: dict) -> None:
    write_json(folder / MANIFEST, manifest)
