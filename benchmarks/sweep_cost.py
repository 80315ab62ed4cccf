"""The cost of `modal run sweep.py`, estimated from its inputs, each printed with where it comes from.

    python benchmarks/sweep_cost.py                              # the rate measured by the GPU check
    python benchmarks/sweep_cost.py --pairs-per-s 2500 --gpus-per-run 1

A run trains dataset_size x epochs pair-passes at the training rate, but never longer than the
sweep's time budget (FIXED["max_minutes"]): a run the budget would cut is counted at the budget and
listed. Every container also pays a fixed overhead (start, model load, tokenising, evaluation).
It stays an estimate until a sweep records its own rate (each result holds pairs_per_s).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from embed_ft import sweep  # noqa: E402

# pair-class has 404,290 rows (the Quora release; the dataset viewer shows 404k); the sweep splits
# 5,000 validation and 10,000 test pairs off it (sweep.FIXED), whole duplicate clusters at a time.
HUB_PAIRS = 404_290
H100_PER_HOUR = 3.9492          # Modal's list price, May 2026 (per second: $0.001097)
CPU_CORE_PER_HOUR = 0.0472      # Modal's $0.0000131 per physical core and second
MEASURED = "results/gpu/steps-without-cudnn-attention-h200.json"
OVERHEAD_MINUTES = 2.0          # start, model load, tokenising, 3 validations and the test: assumed, not measured


def estimate(rate: float, gpus_per_run: int, overhead_minutes: float) -> dict:
    configs = sweep.grid(sweep.MODELS, sweep.SIZES, sweep.DIMS)
    full_split = HUB_PAIRS - sweep.FIXED["val_size"] - sweep.FIXED["test_size"]
    budget = 60 * sweep.FIXED["max_minutes"]
    gpu_seconds, cut = 0.0, []
    for config in configs:
        processes = sweep.processes_for(config, gpus_per_run)
        pairs = (config["dataset_size"] or full_split) * config["epochs"]
        seconds = pairs / (rate * processes)  # data-parallel: each GPU keeps the recipe's batch
        if seconds > budget:
            cut.append((config["model"], config["dense_out_features"], config["dataset_size"] or full_split,
                        budget * rate * processes / pairs * config["epochs"]))
        gpu_seconds += (min(seconds, budget) + 60 * overhead_minutes) * processes
    evaluations = len(sweep.zero_shot_configs(configs))
    gpu_seconds += evaluations * 60 * overhead_minutes
    cpu_core_hours = gpu_seconds / 3600 * sweep.CPUS_PER_GPU
    return {"runs": len(configs), "evaluations": evaluations, "full_split": full_split, "gpu_hours": gpu_seconds / 3600,
            "dollars": gpu_seconds / 3600 * H100_PER_HOUR + cpu_core_hours * CPU_CORE_PER_HOUR, "cut": cut}


def main() -> None:
    measured = json.loads((ROOT / MEASURED).read_text())  # train.py's step on a GPU: no sync, 1 group, no cuDNN attention
    batch32 = next(r for r in measured["steps"] if r["batch"] == 32 and r["variant"] == "no-sync, 1 group")
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pairs-per-s", type=float, default=batch32["pairs_per_s"],
                        help="training rate of one GPU at the recipe's batch (default: the GPU check's)")
    parser.add_argument("--gpus-per-run", type=int, default=1)
    parser.add_argument("--overhead-minutes", type=float, default=OVERHEAD_MINUTES)
    args = parser.parse_args()
    e = estimate(args.pairs_per_s, args.gpus_per_run, args.overhead_minutes)
    rows = [
        ("runs", f"{e['runs']}", "sweep.grid: 3 models x 12 sizes x 2 widths"),
        ("zero-shot evaluations", f"{e['evaluations']}", "one per (model, width)"),
        ("full training split", f"{e['full_split']:,} pairs", f"pair-class's {HUB_PAIRS:,} rows less val and test"),
        ("epochs", f"{sweep.FIXED['epochs']}", "train.py's recipe (sweep.FIXED)"),
        ("time budget a run", f"{sweep.FIXED['max_minutes']} min", "sweep.FIXED['max_minutes']"),
        ("training rate", f"{args.pairs_per_s:,.0f} pairs/s", f"train.py's step, bge-base shapes, batch 32, bf16, on an "
         f"H200 ({MEASURED}), priced as an H100" if args.pairs_per_s == batch32["pairs_per_s"]
         else "given with --pairs-per-s"),
        ("GPUs a large run", f"{args.gpus_per_run}", "--gpus-per-run (runs of 51,200 pairs or more)"),
        ("overhead a container", f"{args.overhead_minutes:g} min", "assumed, not measured"),
        ("H100 price", f"${H100_PER_HOUR}/h", "Modal's list price"),
        ("CPU", f"{sweep.CPUS_PER_GPU:g} cores a GPU at ${CPU_CORE_PER_HOUR}/core-h", "sweep.CPUS_PER_GPU, Modal's list price"),
        ("**GPU-hours**", f"**{e['gpu_hours']:.1f}**", "the sum over runs and evaluations"),
        ("**cost**", f"**${e['dollars']:.0f}**", "an estimate"),
    ]
    print("| input | value | from |\n| --- | --- | --- |")
    print("\n".join(f"| {a} | {b} | {c} |" for a, b, c in rows))
    for model, dim, pairs, epochs in e["cut"]:
        print(f"\ncut by the time budget: {model}, {dim}-d, {pairs:,} pairs: {epochs:.2f} of {sweep.FIXED['epochs']} epochs")


if __name__ == "__main__":
    main()
