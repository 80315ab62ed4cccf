"""Which loss (and learning rate) to use by default: the same run for each, one table.

Chosen on the validation error; test error is printed for the record, not for choosing.

    python benchmarks/losses.py --model DIR --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz \\
        --dataset-size 4000 --losses ocl cosent contrastive cosine --lrs 5e-5
"""
import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "data", "val", "test"):
        parser.add_argument("--" + name, required=True)
    parser.add_argument("--dataset-size", type=int, default=4000)
    parser.add_argument("--dense-out-features", type=int, default=256)
    parser.add_argument("--losses", nargs="+", default=["ocl", "cosent", "contrastive", "cosine"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[2e-5])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = parser.parse_args()
    rows = []
    for loss in args.losses:
        for lr in args.lrs:
            for seed in args.seeds:
                with tempfile.TemporaryDirectory() as out:
                    config = train.Config(model=args.model, data=args.data, val=args.val, test=args.test,
                                          dataset_size=args.dataset_size, dense_out_features=args.dense_out_features,
                                          loss=loss, lr=lr, seed=seed, device="cpu", out=out)
                    m = train.train(config)
                rows.append((loss, lr, seed, m["zero_shot"]["val"]["error_rate"], m["fine_tuned"]["val"]["error_rate"],
                             m["fine_tuned"]["test"]["error_rate"], m["fine_tuned"]["test"]["roc_auc"],
                             m["training"]["pairs_per_s"]))
    print(f"\n{'loss':12} {'lr':>8} {'seed':>4} {'val 0-shot':>10} {'val error':>9} {'test error':>10} "
          f"{'test AUC':>8} {'pairs/s':>8}")
    for loss, lr, seed, zs, val, test, auc, speed in rows:
        print(f"{loss:12} {lr:8.0e} {seed:4d} {zs:10.2%} {val:9.2%} {test:10.2%} {auc:8.4f} {speed:8.1f}")


if __name__ == "__main__":
    main()
