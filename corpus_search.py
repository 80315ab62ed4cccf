"""A corpus folder's index, and search: the nearest texts of a query, as a user asks them.

    python corpus.py search corpus "how do I learn python" -k 5
    python corpus.py search corpus --queries questions.txt --out hits.jsonl
    python corpus.py search corpus --home fw "how do I learn python"      # the served version's folder
    python corpus.py index corpus [--kind exact|hnsw|ivf]                   # build the index again

`corpus.py embed` builds the index when it has written the shards (`index_corpus`); a grown corpus's
new vectors are added to it. The index itself (exact; a graph above 100,000 vectors; lists of
8-bit vectors above 2,000,000) is vector_index.py; the folder, corpus_folder.py. A query takes the
model's query prompt, the corpus its document prompt, as `evaluate.py --retrieval` embeds them, and
the model must be the one whose fingerprint the manifest names (and an int8 corpus's queries are
embedded in int8).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embed_ft import corpus_folder, corpus_input, errors, evaluate, fingerprint, paths, vector_index
from embed_ft.errors import InputError
from embed_ft.int8 import quantised

SHARDS_AT_ONCE = 10  # shards whose vectors are read and added to the index at a time


# ------------------------------------------------------------------------------------------ the index

def index_corpus(folder: Path, kind: str | None = None) -> dict:
    """The index over every shard's vectors, its recall@10 against exact search, build time and size
    kept in the manifest. Where the shards it was built over are all still there as they were (a grown
    corpus, nothing dropped), the new shards' vectors are added to it instead of building it again.
    Vectors are read SHARDS_AT_ONCE shards at a time, so memory holds the index and one such chunk."""
    manifest = corpus_folder.read_manifest(folder)
    if manifest is None:
        raise InputError(f"{folder} is not a corpus folder (no {corpus_folder.MANIFEST}): run corpus.py embed first")
    counts = {p.name: corpus_folder.count_rows(p) for p in corpus_folder.shards(folder)}
    before = manifest.get("index", {}).get("shards", {})
    grown = (kind is None and before and (folder / corpus_folder.INDEX).is_file()
             and list(counts.items())[:len(before)] == list(before.items()))
    started = time.perf_counter()
    if grown:  # only the new shards are read
        index, new = vector_index.load(folder / corpus_folder.INDEX), list(counts)[len(before):]
    else:
        total = sum(counts.values())
        kind = kind or vector_index.kind_for(total)
        training = training_sample(folder, list(counts), manifest, vector_index.training_size(total)) if kind == "ivf" else None
        index, new = vector_index.empty(kind, manifest["width"], total, training), list(counts)
    for at in tqdm(range(0, len(new), SHARDS_AT_ONCE), desc="index", unit="chunk", disable=len(new) <= SHARDS_AT_ONCE):
        index = vector_index.extend(index, unit_vectors(folder, new[at:at + SHARDS_AT_ONCE], manifest))
    built = time.perf_counter() - started
    recall = vector_index.recall_at_10(index)
    corpus_folder.write_whole(folder / corpus_folder.INDEX, lambda temporary: vector_index.save(index, temporary))
    manifest["index"] = {"kind": vector_index.kind(index), "vectors": index.ntotal, "build_seconds": round(built, 1),
                         "built": "extended" if grown else "built", "bytes": (folder / corpus_folder.INDEX).stat().st_size,
                         "recall_at_10": round(recall, 4), "recall_measured_on": min(1000, index.ntotal), "shards": counts}
    corpus_folder.write_manifest(folder, manifest)
    print(f"index: {manifest['index']['kind']} over {index.ntotal:,} vectors, {manifest['index']['built']} in "
          f"{built:.1f} s, recall@10 {recall:.3f} against exact search", file=sys.stderr)
    return manifest


def training_sample(folder: Path, names: list[str], manifest: dict, size: int) -> np.ndarray:
    """About `size` vectors for the lists' k-means, from shards spread evenly over the corpus (the
    first shards alone would train the cells on whatever the source put first)."""
    per_shard = corpus_folder.count_rows(folder / names[0])
    step = max(1, len(names) * per_shard // size)
    return unit_vectors(folder, names[::step], manifest)[:size]


def unit_vectors(folder: Path, names: list[str], manifest: dict) -> np.ndarray:
    """The vectors of the named shards, in order, at unit length: a model published without Normalize
    gives rows of any length, and the index compares cosines all the same."""
    parts = [corpus_folder.read_vectors(folder / name) for name in names]
    return evaluate.unit_rows(np.concatenate(parts) if parts else np.zeros((0, manifest["width"]), np.float32))


def search_corpus(folder: Path, queries: list[str], model, k: int = 10, query_prompt: str | None = None,
                  bf16: bool | None = None) -> list[list[dict]]:
    """The `k` nearest texts of each query: [{id, text, score}], best first. Each query takes the
    model's query prompt (or the one chosen), as retrieval does; the model must be the corpus's."""
    manifest = corpus_folder.read_manifest(folder)
    if manifest is None or not (folder / corpus_folder.INDEX).is_file():
        raise InputError(f"{folder} has no index: run corpus.py embed (or corpus.py index) first")
    if fingerprint.of(model) != manifest["fingerprint"]:
        raise InputError(f"the corpus in {folder} was embedded with {manifest['model']} (version "
                         f"{manifest.get('version') or '-'}); search it with that model")
    if manifest["dtype"] == "int8":  # queries embedded as the corpus was
        model = quantised(model)
    input_ids, skip = model.tokenize(queries, prompt=model.layout.prompt_chosen("query", query_prompt))
    vectors = model.encode_ids(input_ids, 128, False, manifest["dtype"] == "bf16" if bf16 is None else bf16, skip)
    scores, rows = vector_index.search(vector_index.load(folder / corpus_folder.INDEX), evaluate.unit_rows(vectors), k)
    found = corpus_folder.rows_of(folder, rows)
    return [[{**found[q * rows.shape[1] + j], "score": round(float(scores[q, j]), 4)}
             for j in range(rows.shape[1]) if rows[q, j] >= 0] for q in range(len(queries))]


def corpus_of(out: Path, home: Path | None) -> Path:
    """The folder to search: OUT itself, or, for a home, the folder of the version it serves now."""
    if home is None:
        return out
    from embed_ft.state import home_state
    served = home_state.current_version(home)["version"]
    if not (out / served / corpus_folder.MANIFEST).is_file():
        held = sorted(p.parent.name for p in out.glob(f"*/{corpus_folder.MANIFEST}"))
        raise InputError(f"{home} serves {served} and {out} holds {', '.join(held) or 'no version'}: run corpus.py embed "
                         f"--home {home} --out {out} again (meanwhile, search {out}/{held[-1] if held else '...'} itself)")
    return out / served


def index_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="corpus.py index", description="Build a corpus folder's index again.")
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("--kind", choices=["exact", "hnsw", "ivf"], help=f"default: exact up to "
                        f"{vector_index.EXACT_UP_TO:,} vectors, a graph (hnsw) up to {vector_index.GRAPH_UP_TO:,}, "
                        f"lists of 8-bit vectors (ivf) above")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    index_corpus(Path(args.folder), args.kind)


def search_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="corpus.py search", description="The nearest texts of a query, or of "
                                     "each line of a file.")
    parser.add_argument("folder", metavar="DIR")
    parser.add_argument("query", nargs="?")
    parser.add_argument("--queries", metavar="FILE", help="one query a line")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--home", metavar="DIR", help="a flywheel home: search its served version's folder in DIR")
    parser.add_argument("--query-prompt", help="a prompt name of the model's, or none (default: its query prompt)")
    parser.add_argument("--out", metavar="OUT", help="the hits as JSON Lines, one query a line (default: printed)")
    parser.add_argument("--device", default="auto")
    errors.add_debug_flag(parser)
    search_command(paths.parse(parser, argv))


def search_command(args) -> None:
    if (args.query is None) == (args.queries is None):
        raise InputError("give one query, or --queries FILE")
    if args.k < 1:
        raise InputError("-k must be at least 1")
    folder = corpus_of(Path(args.folder), Path(args.home) if args.home else None)
    manifest = corpus_folder.read_manifest(folder)
    if manifest is None:
        raise InputError(f"{folder} is not a corpus folder (no {corpus_folder.MANIFEST}): run corpus.py embed first")
    from embed_ft.model import load_model, pick_device
    model = load_model(manifest["model"]).to(pick_device(args.device)).eval()
    queries = [args.query] if args.query is not None else [r.text for r in corpus_input.rows(Path(args.queries))]
    hits = search_corpus(folder, queries, model, args.k, args.query_prompt)
    print(f"answering with {manifest['model']} (version {manifest.get('version') or '-'}), "
          f"{manifest['index']['kind']} index over {manifest['index']['vectors']:,} texts", file=sys.stderr)
    if args.out:
        with open(args.out, "w") as f:
            for query, found in zip(queries, hits):
                f.write(json.dumps({"query": query, "hits": found}, ensure_ascii=False) + "\n")
        return
    for query, found in zip(queries, hits):
        print(f"{query}")
        for hit in found:
            print(f"  {hit['score']:.3f}  {hit['id']}  {hit['text']}")
