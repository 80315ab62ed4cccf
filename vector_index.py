"""A nearest-neighbour index over a corpus's vectors (unit rows, so inner product is cosine).

    index = build(vectors)                       # exact, a graph or lists, by the number of vectors
    index = extend(index, new_vectors)           # vectors added after those it holds (a corpus built shard by shard)
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

Above GRAPH_UP_TO the graph costs too much: at 10^7 vectors of 384 dimensions it holds 15 GB of
float32 vectors and 2.6 GB of links, and takes hours to build on a few cores. There the index is
lists (IVF with 8-bit scalar quantisation, Jegou et al. 2011): k-means cuts the space into about
sqrt(n) cells, each vector is kept in its cell's list as one byte a dimension (a quarter of the
memory), and a query reads the PROBES cells nearest to it. docs/corpus.md measures it at 10^6 and
10^7 vectors.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

EXACT_UP_TO = 100_000   # vectors; above this an approximate index
GRAPH_UP_TO = 2_000_000  # vectors; above this, lists of 8-bit vectors instead of a graph
HNSW_LINKS = 32         # neighbours a vector keeps in the graph ("M"): more links, higher recall, more memory
BUILD_DEPTH = 80        # candidates looked at while linking a new vector ("efConstruction")
SEARCH_DEPTH = 128      # candidates looked at per query ("efSearch"): the recall/speed lever at query time
PROBES = 32             # cells a query reads in the lists ("nprobe"): their recall/speed lever
TRAINING_PER_CELL = 50  # vectors k-means sees a cell (FAISS warns under 39)


def kind_for(vectors: int) -> str:
    return "exact" if vectors <= EXACT_UP_TO else "hnsw" if vectors <= GRAPH_UP_TO else "ivf"


def empty(kind: str, width: int, vectors: int = 0, training: np.ndarray | None = None):
    """An index of `kind` that holds nothing yet: `extend` fills it. Lists are made for `vectors`
    vectors and their cells found by k-means on `training` (a sample of them)."""
    import faiss
    if kind == "exact":
        return faiss.IndexFlatIP(width)
    if kind == "hnsw":
        index = faiss.IndexHNSWFlat(width, HNSW_LINKS, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = BUILD_DEPTH
        return index
    cells = max(1, int(np.sqrt(vectors)))
    index = faiss.IndexIVFScalarQuantizer(faiss.IndexFlatIP(width), width, cells, faiss.ScalarQuantizer.QT_8bit,
                                          faiss.METRIC_INNER_PRODUCT)
    index.sq.rangestat_arg = 0.2  # each dimension's range, trained on the sample, widened by a fifth a side: a vector
    index.train(np.ascontiguousarray(training, dtype=np.float32))  # the sample missed is then rarely clipped
    index.make_direct_map()  # so that a stored vector can be read back by its row (recall_at_10)
    return index


def build(vectors: np.ndarray, kind: str | None = None):
    """The index over `vectors`: exact for a small corpus, a graph for a large one, lists above that
    (or the `kind` asked for)."""
    kind = kind or kind_for(len(vectors))
    training = vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), training_size(len(vectors))),
                                                       replace=False)] if kind == "ivf" else None
    return extend(empty(kind, vectors.shape[1], len(vectors), training), vectors)


def training_size(vectors: int) -> int:
    return TRAINING_PER_CELL * max(1, int(np.sqrt(vectors)))


def extend(index, vectors: np.ndarray):
    """The index with `vectors` added after those it holds (a graph links each new vector in as a build
    would, lists file it in its cell); an exact index that grows past EXACT_UP_TO is built again as a graph."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    if kind(index) == "exact" and index.ntotal + len(vectors) > EXACT_UP_TO:
        return build(np.concatenate([index.reconstruct_n(0, index.ntotal), vectors]))
    index.add(vectors)
    return index


def kind(index) -> str:
    name = type(index).__name__
    if name == "IndexFlatIP":
        return "exact"
    if name == "IndexHNSWFlat":
        return f"hnsw (M={HNSW_LINKS}, efSearch={SEARCH_DEPTH})"
    return f"ivf-sq8 ({index.nlist} cells, nprobe={PROBES})"


def search(index, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """The `k` nearest vectors of each query: (scores, rows), each (queries, k), best first; a row of -1
    where the corpus has fewer than k vectors."""
    if hasattr(index, "hnsw"):
        index.hnsw.efSearch = max(SEARCH_DEPTH, k)
    if hasattr(index, "nprobe"):
        index.nprobe = PROBES
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, max(index.ntotal, 1)))


def recall_at_10(index, sample: int = 1000, seed: int = 0) -> float:
    """Of the 10 true nearest neighbours of `sample` of the indexed vectors (exact search over the
    vectors the index stores, read back a chunk at a time, so no shard is read again), the share the
    index finds: 1.0 for an exact index."""
    if kind(index) == "exact":
        return 1.0
    rows = np.sort(np.random.default_rng(seed).choice(index.ntotal, min(sample, index.ntotal), replace=False))
    queries = np.stack([index.reconstruct(int(r)) for r in rows])
    chunk = 200_000
    truth = best_of_chunks(((start, index.reconstruct_n(start, min(chunk, index.ntotal - start)))
                            for start in range(0, index.ntotal, chunk)), queries, 10)
    _, found = search(index, queries, 10)
    return share_found(truth, found)


def exact_neighbours(vectors: np.ndarray, queries: np.ndarray, k: int, chunk: int = 50_000) -> np.ndarray:
    """The rows of the k best inner products of each query, best first, by brute force."""
    return best_of_chunks(((start, vectors[start:start + chunk]) for start in range(0, len(vectors), chunk)), queries, k)


def best_of_chunks(chunks, queries: np.ndarray, k: int) -> np.ndarray:
    """exact_neighbours over (first row, vectors) chunks: each chunk's k best by FAISS's brute force (a
    BLAS product and a heap; partitioning every score in numpy was ten times slower, the slow part of
    a grown corpus's index), merged with the best so far."""
    import faiss
    queries = np.ascontiguousarray(queries, dtype=np.float32)
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_rows = np.zeros((len(queries), 0), np.int64)
    for start, vectors in chunks:
        scores, rows = faiss.knn(queries, np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(vectors)),
                                 metric=faiss.METRIC_INNER_PRODUCT)
        scores, rows = np.hstack([best_scores, scores]), np.hstack([best_rows, rows + start])
        keep = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        best_scores, best_rows = np.take_along_axis(scores, keep, 1), np.take_along_axis(rows, keep, 1)
    return best_rows


def share_found(truth: np.ndarray, found: np.ndarray) -> float:
    """Recall: the mean share of each query's true neighbours (rows of `truth`) that `found` holds."""
    return float(np.mean([len(set(t) & set(f)) / len(t) for t, f in zip(truth.tolist(), found.tolist())]))


def save(index, path: Path) -> None:
    import faiss
    faiss.write_index(index, str(path))


def load(path: Path):
    import faiss
    return faiss.read_index(str(path))
