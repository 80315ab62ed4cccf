"""Do the error intervals cover the truth when pairs share texts? Draws of whole groups from a real split.

    python benchmarks/clustered_coverage.py --model MINILM      # prints the tables, writes results/clustered_coverage.json

A model (as published, its threshold tuned on the shared validation split) decides every pair of the
shared Quora test split; the whole file's error is the truth. Then, 2,000 times for each size, whole
groups of pairs (paired.groups_of: pairs that share a text) are drawn at random until the draw holds
that many pairs, as a small held-out set grown by the flywheel would be, and each draw's 95% interval
is checked against the truth: as if pairs were independent (Wilson), and counted by groups
(paired.error_interval). Also the groups and design effects of the shared splits.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, evaluate, jsonl, paired  # noqa: E402

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "quora" / "splits"


def group_sizes(groups: np.ndarray) -> dict:
    sizes = np.bincount(groups)
    return {"pairs": int(len(groups)), "groups": int(len(sizes)), "largest": int(sizes.max()),
            "pairs_alone": int(np.sum(sizes == 1)), "pairs_in_groups_over_10": int(sizes[sizes > 10].sum())}


def draw(groups: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
    """Pairs of whole groups, in a random order of groups, until at least `size` pairs."""
    members = np.split(np.argsort(groups, kind="stable"), np.cumsum(np.bincount(groups))[:-1])
    order = rng.permutation(len(members))
    counts = np.cumsum([len(members[g]) for g in order])
    return np.concatenate([members[g] for g in order[:int(np.searchsorted(counts, size)) + 1]])


def coverage(errors: np.ndarray, groups: np.ndarray, size: int, draws: int, seed: int) -> dict:
    truth, rng = float(errors.mean()), np.random.default_rng(seed)
    covered = {"independent": 0, "by groups": 0}
    widths = {"independent": [], "by groups": []}
    for _ in range(draws):
        chosen = draw(groups, size, rng)
        e, g = errors[chosen], np.unique(groups[chosen], return_inverse=True)[1]
        for name, (low, high) in [("independent", paired.wilson_interval(int(e.sum()), len(e))),
                                  ("by groups", paired.error_interval(e, g))]:
            covered[name] += low <= truth <= high
            widths[name].append(high - low)
    return {"size": size, "draws": draws, "truth": truth,
            **{f"coverage {k}": v / draws for k, v in covered.items()},
            **{f"median width {k}": float(np.median(v)) for k, v in widths.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder or hub name, as published")
    parser.add_argument("--sizes", type=int, nargs="+", default=[300, 500, 2000], help="pairs a draw")
    parser.add_argument("--draws", type=int, default=2000)
    parser.add_argument("--results", default="results/clustered_coverage.json")
    args = parser.parse_args()
    splits = {name: data.load_pairs(str(SPLITS / f"{name}.tsv.gz")) for name in ("train", "val", "test")}
    encoder = evaluate.Remembered(evaluate.open_encoder(args.model, device="cpu"))
    threshold = evaluate.evaluate(encoder, splits["val"])["val"]["threshold"]
    report = {"model": Path(args.model).name, "threshold": threshold, "splits": {}, "coverage": []}
    for name, pairs in splits.items():
        groups = paired.groups_of(pairs)
        report["splits"][name] = group_sizes(groups)
        if name != "train":  # the training split's errors would take an hour of encoding on a CPU
            errors = ~evaluate.correct(encoder, pairs, threshold)
            report["splits"][name] |= {"error": float(errors.mean()), "design_effect": paired.design_effect(errors, groups)}
    test = splits["test"]
    errors, groups = ~evaluate.correct(encoder, test, threshold), paired.groups_of(test)
    report["coverage"] = [coverage(errors, groups, size, args.draws, seed=size) for size in args.sizes]
    jsonl.write_json(Path(args.results), report)
    print("| split | pairs | groups | largest | pairs alone | pairs in groups of more than 10 | error | design effect |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, s in report["splits"].items():
        extra = f"{s['error']:.2%} | {s['design_effect']:.2f}" if "error" in s else "- | -"
        print(f"| {name} | {s['pairs']:,} | {s['groups']:,} | {s['largest']:,} | {s['pairs_alone']:,} | "
              f"{s['pairs_in_groups_over_10']:,} | {extra} |")
    print("\n| pairs a draw | draws | coverage, independent | coverage, by groups | median width, independent | by groups |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for c in report["coverage"]:
        print(f"| {c['size']:,} | {c['draws']:,} | {c['coverage independent']:.1%} | {c['coverage by groups']:.1%} | "
              f"{c['median width independent']:.2%} | {c['median width by groups']:.2%} |")


if __name__ == "__main__":
    main()
