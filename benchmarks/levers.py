"""Which recipe to make the default: the same fine-tune with one lever changed at a time, over seeds,
in one table. Chosen on the median validation error; test error is printed for the record only.

    python benchmarks/levers.py --model DIR --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz \\
        --results results/levers.jsonl --set "epochs=1" --set "epochs=4" --set "epochs=4 in_batch_weight=0.5"

Each --set is a list of option=value (the fields of options.Config) over the base recipe (--base,
also option=value). Every run appends a line to --results as it ends, so an interrupted comparison
loses only the run in flight and a rerun skips what is done. `--table` only prints the table.
"""
import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import jsonl, train# noqa: E402
from embed_ft.options import Config, parse_overrides# noqa: E402


def run(base: dict, changes: dict, seed: int) -> dict:
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        m = train.train(Config(**base | changes | {"seed": seed, "out": out, "save": False, "zero_shot": False}))
    t = m["training"]
    tuned = m["fine_tuned"]
    return {"val_error": tuned["val"]["error_rate"], "test_error": tuned["test"]["error_rate"],
            "val_mrr": tuned["retrieval"]["val"]["mrr"], "test_mrr": tuned["retrieval"]["test"]["mrr"],
            "val_history": t.get("val_errors") or t.get("val_mrr"), "best_epoch": t["best_epoch"], "train_seconds": t["seconds"],
            "pairs_per_s": t["pairs_per_s"], "wall_seconds": time.perf_counter() - started,
            "environment": m["environment"]}


def table(rows: list[dict], markdown: bool = False) -> str:
    """One row per setting: median and per-seed validation error, median test error, the epochs kept.
    (Training times are in the JSONL; they are not compared here: comparisons may run side by side.)"""
    by_setting: dict[str, list[dict]] = {}
    for r in rows:
        by_setting.setdefault(r["setting"], []).append(r)
    header = ["setting", "seeds", "val error (median)", "val error by seed", "test error (median)", "epoch kept"]
    lines = []
    for setting, runs in by_setting.items():
        runs = sorted(runs, key=lambda r: r["seed"])
        median = {key: statistics.median(r[key] for r in runs) for key in ("val_error", "test_error")}
        lines.append([setting or "(base)", str(len(runs)), f"{median['val_error']:.2%}",
                      " / ".join(f"{r['val_error']:.2%}" for r in runs), f"{median['test_error']:.2%}",
                      ",".join(str(r["best_epoch"]) for r in runs)])
    if markdown:
        return "\n".join("| " + " | ".join(row) + " |" for row in [header, ["---"] + ["---:"] * 5] + lines)
    widths = [max(len(row[i]) for row in [header] + lines) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
                     for row in [header] + lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    for name in ("model", "data", "val", "test"):
        parser.add_argument("--" + name)
    parser.add_argument("--base", default="dataset_size=4000 device=cpu", help="option=value ... for every run")
    parser.add_argument("--set", action="append", default=[], help="option=value ... changed in one setting")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--results", default="results/levers.jsonl")
    parser.add_argument("--table", action="store_true", help="only print the table of --results")
    parser.add_argument("--markdown", action="store_true", help="print the table as Markdown")
    args = parser.parse_args()
    path = Path(args.results)
    if not args.table:
        base = parse_overrides(args.base) | {"model": args.model, "data": args.data, "val": args.val, "test": args.test}
        for setting in args.set:
            for seed in args.seeds:
                done = {(r["setting"], r["seed"]) for r in jsonl.read(path)}
                if (setting, seed) not in done:
                    print(f"--- {setting or '(base)'}, seed {seed}", flush=True)
                    row = run(base, parse_overrides(setting), seed)
                    jsonl.append(path, {"setting": setting, "seed": seed, "base": args.base} | row)
    print(table(jsonl.read(path), args.markdown))


if __name__ == "__main__":
    main()
