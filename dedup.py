"""Semantic de-duplication: group the texts of a file that mean the same thing.

    python dedup.py questions.txt --model out --out groups.jsonl          # one text per line
    python dedup.py test.tsv.gz --model out                               # every distinct text of a pairs file

Two texts are near-duplicates when the cosine of their embeddings is above the model's stored
threshold (the one train.py tuned on validation; or --threshold); groups are the connected
components of that relation, so A~B and B~C group A, B and C. Similarities are computed a chunk of
rows at a time (chunk x n), so 100k+ texts fit in memory. Groups of two or more are written as JSON
Lines, largest first. Given a pairs file, the found pairs that are labelled are checked against
their labels: the precision (and recall) of the de-duplication where the truth is known.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import data
import errors
import paths
from errors import InputError


def near_duplicate_pairs(vectors: np.ndarray, threshold: float, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Index pairs (i < j) whose cosine is above the threshold; rows are unit length."""
    left, right = [], []
    for start in range(0, len(vectors), chunk):
        scores = vectors[start:start + chunk] @ vectors.T
        rows, cols = np.nonzero(scores > threshold)
        keep = cols > rows + start  # each pair once, no text with itself
        left.append(rows[keep] + start)
        right.append(cols[keep])
    return np.concatenate(left or [np.zeros(0, int)]), np.concatenate(right or [np.zeros(0, int)])


def group(n: int, left: np.ndarray, right: np.ndarray) -> list[list[int]]:
    """Connected components with two or more members, largest first."""
    root = data.union_find(zip(left.tolist(), right.tolist()))
    groups: dict[int, list[int]] = {}
    for i in set(left.tolist()) | set(right.tolist()):
        groups.setdefault(root(i), []).append(i)
    return sorted((sorted(g) for g in groups.values()), key=lambda g: (-len(g), g[0]))


def read_texts(path: Path, columns: tuple[str, str, str] | None) -> tuple[list[str], list[data.Pair]]:
    """Distinct texts, and the labelled pairs if the file holds pairs (a .txt file: one text a line)."""
    if path.name.removesuffix(".gz").endswith(".txt") and path.is_file():
        data.check_contents(path)
        with data.open_text(path) as f:
            texts = [line.strip() for line in f if line.strip()]
        return list(dict.fromkeys(texts)), []
    pairs = data.load_pairs(str(path), columns)
    return list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b))), pairs


def check_against_labels(texts: list[str], left: np.ndarray, right: np.ndarray, pairs: list[data.Pair]) -> dict:
    """Of the found pairs that the file labels, how many are duplicates (precision); of the labelled
    duplicates, how many were found (recall)."""
    label = {frozenset((a, b)): y for a, b, y in pairs}
    found = {frozenset((texts[i], texts[j])) for i, j in zip(left.tolist(), right.tolist())}
    labelled = [label[p] for p in found if p in label]
    duplicates = sum(label.values())
    return {"found_pairs_labelled": len(labelled), "precision": sum(labelled) / len(labelled) if labelled else None,
            "labelled_duplicates": duplicates, "recall": sum(labelled) / duplicates if duplicates else None}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", metavar="FILE", help="a .txt file (one text a line) or a pairs file (CSV/TSV/JSONL/Parquet)")
    parser.add_argument("--model", required=True, metavar="MODEL", help="a folder written by train.py (it holds the threshold)")
    parser.add_argument("--threshold", type=float, help="cosine above which two texts are duplicates "
                        "(default: the model's stored threshold)")
    parser.add_argument("--columns", help="TEXT1,TEXT2,LABEL column names if not recognised")
    parser.add_argument("--out", default="groups.jsonl", metavar="OUT", help="where the groups go (JSON Lines)")
    parser.add_argument("--chunk", type=int, default=1024, help="rows of the similarity matrix at a time")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    if args.chunk < 1 or args.batch_size < 1:
        raise InputError("--chunk and --batch-size must be at least 1")
    texts, pairs = read_texts(Path(args.file), data.parse_columns(args.columns))
    import evaluate
    model = evaluate.open_encoder(args.model, device=args.device)
    threshold = args.threshold if args.threshold is not None else model.decision.get("threshold")
    if threshold is None:
        raise InputError(f"{args.model} stores no threshold (it was not saved by train.py); pass --threshold")
    started = time.perf_counter()
    # the model's default prompt for every text: the one its threshold was tuned with
    vectors = evaluate.unit_rows(model.encode(texts, batch_size=args.batch_size, progress=True))
    encoded = time.perf_counter()
    left, right = near_duplicate_pairs(vectors, threshold, args.chunk)
    groups = group(len(texts), left, right)
    searched = time.perf_counter()
    with open(args.out, "w") as f:
        for members in groups:
            f.write(json.dumps({"size": len(members), "texts": [texts[i] for i in members]}) + "\n")
    print(f"{len(texts):,} distinct texts, threshold {threshold:.4f}: {len(left):,} near-duplicate pairs, "
          f"{len(groups):,} groups holding {sum(map(len, groups)):,} texts (largest {len(groups[0]) if groups else 0}) "
          f"written to {Path(args.out).resolve()}")
    print(f"time: encode {encoded - started:.1f} s, search and group {searched - encoded:.1f} s")
    if pairs:
        check = check_against_labels(texts, left, right, pairs)
        precision = f"{check['precision']:.2%}" if check["precision"] is not None else "-"
        print(f"against the file's labels: {check['found_pairs_labelled']:,} found pairs are labelled, precision "
              f"{precision}; recall {check['recall']:.2%} of {check['labelled_duplicates']:,} labelled duplicates")


if __name__ == "__main__":
    errors.run(main)
