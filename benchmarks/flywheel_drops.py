"""Pair files that arrive over time, for trying the flywheel on the shared Quora training split:
disjoint seeded samples, one file per round; `--shuffle-last` permutes the labels of the last file
(labels gone wrong: a round that must be refused).

    python benchmarks/flywheel_drops.py --train ../shared/data/quora/splits/train.tsv.gz \\
        --sizes 1000 3000 3000 --shuffle-last --out incoming     # incoming/01.tsv.gz, 02..., 03-shuffled...
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--train", required=True)
    parser.add_argument("--sizes", type=int, nargs="+", required=True, help="pairs in each file, in order")
    parser.add_argument("--shuffle-last", action="store_true", help="permute the labels of the last file")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pairs = data.subsample(data.load_pairs(args.train), sum(args.sizes), seed=args.seed)  # disjoint, in one draw
    start = 0
    for i, size in enumerate(args.sizes, 1):
        chunk, start = pairs[start:start + size], start + size
        shuffled = args.shuffle_last and i == len(args.sizes)
        if shuffled:
            labels = np.random.default_rng(args.seed).permutation([y for *_, y in chunk])
            chunk = [(a, b, int(y)) for (a, b, _), y in zip(chunk, labels)]
        path = data.write_pairs(chunk, Path(args.out) / f"{i:02d}{'-shuffled' if shuffled else ''}.tsv.gz")
        print(f"{path}: {len(chunk)} pairs, {sum(y for *_, y in chunk)} duplicates")


if __name__ == "__main__":
    main()
