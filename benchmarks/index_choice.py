"""Which approximate index: FAISS's HNSW, usearch's HNSW, FAISS's IVF, beside exact search, measured side
by side on the same vectors in one process: build time, size, queries/s and recall@10 against exact.

    python benchmarks/index_choice.py --corpus runs/corpus_quora/MODEL       # a corpus folder's real vectors
    python benchmarks/index_choice.py --random 1000000 --width 384           # random unit vectors, to plan
    python benchmarks/index_choice.py --random 10000000 --stream --kind ivf  # the corpus job's index, built as it builds it

Queries are 1,000 of the corpus's own vectors (random ones for --random), searched as one batch, k=10.
Each library gets the threads torch would (every core). Prints a table; appends to results/index_choice.jsonl.
--stream never holds the vectors at once (10^7 of them are 15 GB): they are drawn 100,000 at a time
from seeded generators, added to vector_index's index of --kind as corpus_search.index_corpus adds
shards, and drawn again for the exact neighbours; the build time counts training and adding only.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import corpus_folder, jsonl, vector_index  # noqa: E402


def faiss_hnsw(vectors):
    return vector_index.build(vectors, "hnsw")


def faiss_ivf(vectors):
    import faiss
    lists = int(4 * np.sqrt(len(vectors)))
    quantizer = faiss.IndexFlatIP(vectors.shape[1])
    index = faiss.IndexIVFFlat(quantizer, vectors.shape[1], lists, faiss.METRIC_INNER_PRODUCT)
    index.train(vectors[np.random.default_rng(0).choice(len(vectors), min(len(vectors), 50 * lists), replace=False)])
    index.add(vectors)
    index.nprobe = 32
    return index


def ivf_sq8(vectors):
    return vector_index.build(vectors, "ivf")


def faiss_exact(vectors):
    return vector_index.build(vectors, "exact")


class Usearch:
    """usearch's HNSW at the same links and depths as ours, in f32 (its default on this CPU may be lower)."""

    def __init__(self, vectors, dtype="f32"):
        from usearch.index import Index
        self.index = Index(ndim=vectors.shape[1], metric="ip", dtype=dtype, connectivity=vector_index.HNSW_LINKS // 2,
                           expansion_add=vector_index.BUILD_DEPTH, expansion_search=vector_index.SEARCH_DEPTH)
        self.index.add(np.arange(len(vectors)), vectors, threads=os.cpu_count())

    def search(self, queries, k):
        found = self.index.search(queries, k, threads=os.cpu_count())
        return found.distances, found.keys.astype(np.int64)

    def size(self) -> int:
        with tempfile.TemporaryDirectory() as d:
            self.index.save(f"{d}/i.usearch")
            return os.path.getsize(f"{d}/i.usearch")


def faiss_size(index) -> int:
    import faiss
    return len(faiss.serialize_index(index))


def measure(name: str, build, vectors: np.ndarray, queries: np.ndarray, truth: np.ndarray) -> dict:
    started = time.perf_counter()
    index = build(vectors)
    built = time.perf_counter() - started
    searcher = index.search if isinstance(index, Usearch) else (lambda q, k: vector_index.search(index, q, k))
    searcher(queries[:10], 10)
    started = time.perf_counter()
    _, found = searcher(queries, 10)
    seconds = time.perf_counter() - started
    recall = vector_index.share_found(truth, found)
    size = index.size() if isinstance(index, Usearch) else faiss_size(index)
    return {"index": name, "vectors": len(vectors), "width": vectors.shape[1], "build_seconds": round(built, 1),
            "bytes": size, "queries_per_second": round(len(queries) / seconds, 1), "recall_at_10": round(recall, 4)}


def random_chunks(vectors: int, width: int, chunk: int = 100_000):
    """(first row, unit vectors) chunks, the same ones on every call."""
    for start in range(0, vectors, chunk):
        block = np.random.default_rng([0, start]).standard_normal((min(chunk, vectors - start), width), dtype=np.float32)
        yield start, block / np.linalg.norm(block, axis=1, keepdims=True)


def measure_streamed(vectors: int, width: int, kind: str) -> dict:
    """The corpus job's index over random unit vectors, never all in memory; recall against exact
    search over the float vectors (so an 8-bit index's rounding counts too)."""
    sample = vector_index.training_size(vectors)  # the first vectors: random ones are all alike
    training = np.concatenate([block for _, block in random_chunks(min(vectors, sample), width)])
    queries = training[:1000]
    started = time.perf_counter()
    index = vector_index.empty(kind, width, vectors, training if kind == "ivf" else None)
    built = time.perf_counter() - started
    for _, block in random_chunks(vectors, width):
        tick = time.perf_counter()
        index = vector_index.extend(index, block)
        built += time.perf_counter() - tick
    truth = vector_index.best_of_chunks(random_chunks(vectors, width), queries, 10)
    vector_index.search(index, queries[:10], 10)
    started = time.perf_counter()
    _, found = vector_index.search(index, queries, 10)
    seconds = time.perf_counter() - started
    with tempfile.TemporaryDirectory() as folder:
        vector_index.save(index, Path(folder) / "index")
        size = (Path(folder) / "index").stat().st_size
    recall = vector_index.share_found(truth, found)
    return {"index": vector_index.kind(index), "vectors": vectors, "width": width, "build_seconds": round(built, 1),
            "bytes": size, "queries_per_second": round(len(queries) / seconds, 1), "recall_at_10": round(recall, 4),
            "source": f"random unit vectors, width {width}, streamed", "peak_memory_mib": peak_mib()}


def peak_mib() -> int:
    import resource
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--corpus", help="a corpus folder (corpus.py embed)")
    parser.add_argument("--random", type=int, default=0, help="this many random unit vectors instead")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--only", default="", help="comma-separated names to run (default: all)")
    parser.add_argument("--results", default="results/index_choice.jsonl")
    parser.add_argument("--stream", action="store_true", help="with --random: vector_index's --kind, streamed")
    parser.add_argument("--kind", choices=["hnsw", "ivf"], default="ivf")
    args = parser.parse_args()
    if args.stream:
        row = measure_streamed(args.random, args.width, args.kind)
        jsonl.append(Path(args.results), row)
        print("| index | vectors | build s | MiB | peak MiB | queries/s | recall@10 |\n| --- |" + " ---: |" * 6)
        print(f"| {row['index']} | {row['vectors']:,} | {row['build_seconds']} | {row['bytes'] / 2**20:,.0f} | "
              f"{row['peak_memory_mib']:,} | {row['queries_per_second']:,.0f} | {row['recall_at_10']:.3f} |")
        return
    rng = np.random.default_rng(0)
    if args.corpus:
        vectors, source = corpus_folder.all_vectors(Path(args.corpus)), args.corpus
        queries = vectors[rng.choice(len(vectors), 1000, replace=False)]
    else:
        vectors = rng.standard_normal((args.random, args.width), dtype=np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        queries, source = vectors[rng.choice(len(vectors), 1000, replace=False)], f"random unit vectors, width {args.width}"
    truth = vector_index.exact_neighbours(vectors, queries, 10)
    builders = {"exact (FAISS flat)": faiss_exact, "FAISS HNSW": faiss_hnsw, "usearch HNSW f32": Usearch,
                "FAISS IVF-Flat (nprobe 32)": faiss_ivf, "IVF-SQ8 (vector_index above 2,000,000)": ivf_sq8}
    wanted = [n for n in builders if not args.only or any(o.strip().lower() in n.lower() for o in args.only.split(","))]
    print(f"{source}: {len(vectors):,} vectors; 1,000 queries, k=10; {os.cpu_count()} cores")
    print("| index | build s | MiB | queries/s | recall@10 |\n| --- | ---: | ---: | ---: | ---: |")
    for name in wanted:
        row = measure(name, builders[name], vectors, queries, truth) | {"source": source}
        jsonl.append(Path(args.results), row)
        print(f"| {name} | {row['build_seconds']} | {row['bytes'] / 2**20:,.0f} | {row['queries_per_second']:,.0f} | "
              f"{row['recall_at_10']:.3f} |", flush=True)


if __name__ == "__main__":
    main()
