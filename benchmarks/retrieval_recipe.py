"""Does fine-tuning with `--objective retrieval` beat the published model at retrieval? Over seeds,
with a paired test over the same queries, not only two means.

    python benchmarks/retrieval_recipe.py --model DIR --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz \\
        --base "dataset_size=4000 device=cpu" --seeds 0 1 2 --runs runs/retrieval --results results/retrieval.jsonl

Each seed trains one model into RUNS/seed-N (kept: rerunning skips a finished seed). Then the
published model (as it is, no projection) and each fine-tuned one rank the test split: every text
with a duplicate searches every other text. The table gives recall@1 and MRR on validation (where
the recipe is chosen) and test, and the sign test over test queries: how many queries the
fine-tuned model ranks their first duplicate higher than the published one, how many lower, and
the one-sided p-value.
"""
import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, evaluate, paired, jsonl, run_folder, train# noqa: E402
from embed_ft.model import Embedder, load_model# noqa: E402
from embed_ft.options import Config, parse_overrides# noqa: E402


def ranks(encoder, pairs: list[data.Pair]) -> dict:
    return evaluate.retrieval_metrics(encoder, pairs, per_query=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "data", "val", "test"):
        parser.add_argument("--" + name, required=True)
    parser.add_argument("--base", default="dataset_size=4000 device=cpu", help="option=value ... for every run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--runs", default="runs/retrieval")
    parser.add_argument("--results", default="results/retrieval.jsonl")
    args = parser.parse_args()
    base = parse_overrides(args.base) | {"objective": "retrieval"}
    val, test = data.load_pairs(args.val), data.load_pairs(args.test)
    published = load_model(args.model)
    reference = {"val": ranks(published, val), "test": ranks(published, test)}
    rows = []
    for seed in args.seeds:
        out = Path(args.runs) / f"seed-{seed}"
        if run_folder.finished_metrics(out) is None:
            train.train(Config(**base | {"model": args.model, "data": args.data, "val": args.val, "test": args.test,
                                         "seed": seed, "out": str(out), "zero_shot": False, "overwrite": True}))
        tuned = Embedder.load(out)
        mine = {"val": ranks(tuned, val), "test": ranks(tuned, test)}
        ours, theirs = (np.array(r["test"]["reciprocal_ranks"]) for r in (mine, reference))
        better, worse = int((ours > theirs).sum()), int((ours < theirs).sum())
        row = {"seed": seed, "setting": args.base, **{f"{split}_{k}": mine[split][k] for split in ("val", "test")
                                                       for k in ("recall@1", "mrr")},
               "better_queries": better, "worse_queries": worse, "p_value": paired.sign_test(better, worse)}
        jsonl.append(Path(args.results), row)
        rows.append(row)
    print(f"{'model':28} {'val R@1':>8} {'val MRR':>8} {'test R@1':>9} {'test MRR':>9} {'better/worse':>13} {'p':>9}")
    ref = {f"{s}_{k}": reference[s][k] for s in ("val", "test") for k in ("recall@1", "mrr")}
    print(f"{'published, as it is':28} {ref['val_recall@1']:8.4f} {ref['val_mrr']:8.4f} {ref['test_recall@1']:9.4f} "
          f"{ref['test_mrr']:9.4f}")
    for r in rows:
        print(f"{'retrieval objective, seed ' + str(r['seed']):28} {r['val_recall@1']:8.4f} {r['val_mrr']:8.4f} "
              f"{r['test_recall@1']:9.4f} {r['test_mrr']:9.4f} {r['better_queries']:6d}/{r['worse_queries']:<6d} "
              f"{r['p_value']:9.2g}")
    median = {k: statistics.median(r[k] for r in rows) for k in ("val_mrr", "test_mrr", "test_recall@1")}
    print(f"median over {len(rows)} seeds: val MRR {median['val_mrr']:.4f}, test MRR {median['test_mrr']:.4f}, "
          f"test recall@1 {median['test_recall@1']:.4f}")


if __name__ == "__main__":
    main()
