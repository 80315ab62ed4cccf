"""Which way should a flywheel round train its candidate? Measured at round 2 (a first file of pairs
already learned, a second one arriving), over seeds, on validation error:

- scratch: the base model, trained on all the pairs (first + second file);
- continue: the round-1 model (trained on the first file), trained further on the second file only.

    python benchmarks/flywheel_modes.py --base DIR --first incoming/01.tsv.gz --second incoming/02.tsv.gz \\
        --val val.tsv.gz --test test.tsv.gz --results results/flywheel_modes.jsonl

Test error is printed for the record only. Each run is appended to --results as it ends.
"""
import argparse
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, jsonl, train# noqa: E402
from embed_ft.options import Config, parse_overrides# noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("base", "first", "second", "val", "test", "results"):
        parser.add_argument("--" + name, required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", default="device=cpu", help="training options, option=value ...")
    args = parser.parse_args()
    path, common = Path(args.results), parse_overrides(args.set) | {"val": args.val, "test": args.test}
    with tempfile.TemporaryDirectory() as tmp:
        both = data.write_pairs(data.load_pairs(args.first) + data.load_pairs(args.second), Path(tmp) / "both.tsv.gz")
        for seed in args.seeds:
            done = {r["mode"] for r in jsonl.read(path) if r["seed"] == seed}
            if {"scratch", "continue"} <= done:
                continue
            round1 = Path(tmp) / f"round1-{seed}"
            train.train(Config(**common, model=args.base, data=args.first, seed=seed, out=str(round1), zero_shot=False))
            for mode, model, pairs in [("scratch", args.base, both), ("continue", str(round1), args.second)]:
                m = train.train(Config(**common, model=model, data=str(pairs), seed=seed, out=f"{tmp}/{mode}-{seed}",
                                       save=False, zero_shot=False))
                jsonl.append(path, {"mode": mode, "seed": seed, "val_error": m["fine_tuned"]["val"]["error_rate"],
                                      "test_error": m["fine_tuned"]["test"]["error_rate"],
                                      "train_seconds": m["training"]["seconds"], "pairs": m["training"]["pairs"]})
    rows = jsonl.read(path)
    print(f"{'mode':9} {'val error (median)':>18} {'by seed':>26} {'test (median)':>13} {'train min':>9}")
    for mode in ("scratch", "continue"):
        mine = sorted((r for r in rows if r["mode"] == mode), key=lambda r: r["seed"])
        if mine:
            by_seed = " / ".join(f"{r['val_error']:.2%}" for r in mine)
            print(f"{mode:9} {statistics.median(r['val_error'] for r in mine):18.2%} {by_seed:>26} "
                  f"{statistics.median(r['test_error'] for r in mine):13.2%} "
                  f"{statistics.median(r['train_seconds'] for r in mine) / 60:9.1f}")


if __name__ == "__main__":
    main()
