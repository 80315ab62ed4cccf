"""A nearest-neighbour index over a corpus's vectors (unit rows, so inner product is cosine).

    index = build(vectors)                       # exact up to EXACT_UP_TO vectors, HNSW above
    index = extend(index, new_vectors)           # a grown corpus's new vectors added
    recall = recall_at_10(index)                 # against exact search, on a sample of the index's own vectors
    scores, rows = search(index, queries, k=10)  # rows: positions in the corpus's order
    save(index, path); index = load(path)      # corpus_folder.write_whole makes the save whole or nothing

Exact search (FAISS's flat index: one matrix product a batch of queries) answers every query right
and needs no build, but each query reads every vector: at 10^5 vectors a query takes about a
millisecond on a core, at 10^7 a tenth of a second. Above EXACT_UP_TO the index is a graph (HNSW,
Malkov and Yashunin 2018): a query walks to its neighbours through a few thousand vectors instead of
all of them, at the price of a build and of a recall below 1, which `recall_at_10` measures at build
time so that it is a number, not a hope. FAISS rather than usearch: docs/corpus.md has the
measurement (benchmarks/index_choice.py), build time, queries/s and recall side by side.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

EXACT_UP_TO = 100_000   # vectors; above this an approximate index
HNSW_LINKS = 32         # neighbours a vector keeps in the graph ("M"): more links, higher recall, more memory
BUILD_DEPTH = 80        # candidates looked at while linking a new vector ("efConstruction")
SEARCH_DEPTH = 128      # candidates looked at per query ("efSearch"): the recall/speed lever at query time


def build(vectors: np.ndarray, exact: bool | None = None, progress: bool = False):
    """An exact index for a small corpus, an HNSW graph for a large one (or as `exact` says)."""
    import faiss
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    exact = len(vectors) <= EXACT_UP_TO if exact is None else exact
    if exact:
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(vectors)
        return index
    index = faiss.IndexHNSWFlat(vectors.shape[1], HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = BUILD_DEPTH
    index.verbose = progress
    index.add(vectors)
    return index


def extend(index, vectors: np.ndarray):
    """The index with `vectors` added after those it holds (a graph links each new vector in as a build
    would); an exact index that grows past EXACT_UP_TO is built again as a graph."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind(index) == "exact" and index.ntotal + len(vectors) > EXACT_UP_TO:
        return build(np.concatenate([index.reconstruct_n(0, index.ntotal), vectors]))
    index.add(vectors)
    return index


def kind(index) -> str:
    return "exact" if type(index).__name__ == "IndexFlatIP" else f"hnsw (M={HNSW_LINKS}, efSearch={SEARCH_DEPTH})"


def search(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest vectors of each query: (scores, rows), each (queries, k), best first; a row of -1
    where the corpus has fewer than k vectors."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(SEARCH_DEPTH, k)
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, max(index.ntotal, 1)))


def recall_at_10(index, sample: int = 1000, seed: int = 0) -> float:
    """Of the 10 true nearest neighbours of `sample` of the indexed vectors (exact search over the
    vectors the graph stores, so no shard is read again), the share the index finds: 1.0 for an exact index."""
    if kind(index) == "exact":
        return 1.0
    import faiss
    stored = faiss.downcast_index(index.storage)
    rows = np.sort(np.random.default_rng(seed).choice(index.ntotal, min(sample, index.ntotal), replace=False))
    queries = np.stack([stored.reconstruct(int(r)) for r in rows])
    _, truth = stored.search(queries, 10)
    _, found = search(index, queries, 10)
    return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth.tolist(), found.tolist())]))


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 50_000) -> np.ndarray:
    """The rows of the k best inner products of each query, best first, by brute force a chunk of
    vectors at a time; each chunk's k best are picked by partition (a full sort of a million scores a
    query is what made this the slow part of a grown corpus's index)."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(vectors), chunk):
        new = queries @ vectors[start:start + chunk].T
        scores = np.hstack([best_scores, new])
        rows = np.hstack([best_rows, np.broadcast_to(np.arange(start, start + new.shape[1]), new.shape)])
        keep = np.argpartition(-scores, k - 1, axis=1)[:, :k] if scores.shape[1] > k else np.arange(scores.shape[1])[None]
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    order = np.argsort(-best_scores, axis=1, kind="stable")
    return np.take_along_axis(best_rows, order, 1)


def save(index, path: Path) -> None:
    import faiss
    faiss.write_index(index, str(path))


def load(path: Path):
    import faiss
    return faiss.read_index(str(path))
