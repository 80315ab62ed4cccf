"""Between the published model and a fine-tuned one: both views of (1 - a) x published + a x fine-tuned.

Averaging the weights of a model and its fine-tuned copy (Wortsman et al. 2022, "WiSE-FT";
BAAI's LM-Cocktail for embedding models) can keep what each is good at. Here it asks whether some
mix keeps the fine-tune's lower pair error without its retrieval loss. The run must have kept the
encoder's width (--dense-out-features 0), so that both models have the same weights to average.

    python benchmarks/weight_interpolation.py --model DIR --runs out-seed0 out-seed1 \\
        --val val.tsv.gz --test test.tsv.gz --alphas 0 0.25 0.5 0.75 1

Prints one row a run and weight: the pair error (threshold tuned on val) and the retrieval view on
both splits, and the sign test over test queries against the published model (a = 0).
"""
import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, evaluate, paired, jsonl# noqa: E402
from embed_ft.model import Embedder, load_model, mix_weights# noqa: E402


def mixed(published: dict, tuned: dict, alpha: float) -> dict:
    """(1 - alpha) x published + alpha x tuned (train.py --merge does the same with the start it kept)."""
    if set(published) != set(tuned):
        sys.exit(f"the models differ in their weights ({sorted(set(published) ^ set(tuned))[:3]} ...): "
                 "train with --dense-out-features 0")
    return mix_weights(published, tuned, alpha)


def both_views(encoder, val: list[data.Pair], test: list[data.Pair]) -> dict:
    remembered = evaluate.Remembered(encoder)
    pairs = evaluate.evaluate(remembered, val, test)
    ranks = {split: evaluate.retrieval_metrics(remembered, p, per_query=split == "test")
             for split, p in (("val", val), ("test", test))}
    return {"val_error": pairs["val"]["error_rate"], "test_error": pairs["test"]["error_rate"],
            **{f"{split}_{k}": ranks[split][k] for split in ranks for k in ("recall@1", "mrr")},
            "reciprocal_ranks": np.array(ranks["test"]["reciprocal_ranks"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the published model the runs started from")
    parser.add_argument("--runs", nargs="+", required=True, help="fine-tuned model folders (train.py --out)")
    parser.add_argument("--val", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    parser.add_argument("--results", default="", help="append each row to this JSONL file")
    args = parser.parse_args()
    val, test = data.load_pairs(args.val), data.load_pairs(args.test)
    model = load_model(args.model)
    published = {k: v.clone() for k, v in model.state_dict().items()}
    print(f"{'run':28} {'a':>5} {'val err':>8} {'test err':>8} {'val MRR':>8} {'test R@1':>8} {'test MRR':>8} "
          f"{'better/worse':>13} {'p':>6}")
    reference = report(both_views(model, val, test), "published", 0.0, None, args.results)
    for run in args.runs:
        tuned = Embedder.load(run).state_dict()
        for alpha in args.alphas:
            model.load_state_dict(mixed(published, tuned, alpha))
            report(both_views(model, val, test), Path(run).name, alpha, reference, args.results)


def report(row: dict, run: str, alpha: float, reference: np.ndarray | None, results: str) -> np.ndarray:
    """Print (and append to `results`) one row, with the sign test against the reference's
    reciprocal ranks; returns this row's."""
    ours = row.pop("reciprocal_ranks")
    theirs = ours if reference is None else reference
    better, worse = int((ours > theirs).sum()), int((ours < theirs).sum())
    row |= {"run": run, "alpha": alpha, "better_queries": better, "worse_queries": worse,
            "p_value": paired.sign_test(better, worse)}
    print(f"{run:28} {alpha:5.2f} {row['val_error']:8.2%} {row['test_error']:8.2%} {row['val_mrr']:8.4f} "
          f"{row['test_recall@1']:8.4f} {row['test_mrr']:8.4f} {better:6d}/{worse:<6d} {row['p_value']:6.2g}", flush=True)
    if results:
        jsonl.append(Path(results), row)
    return ours


if __name__ == "__main__":
    main()
