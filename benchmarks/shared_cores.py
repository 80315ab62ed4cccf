"""Training on cores that other work shares: train.py alone, and beside a process that keeps one core
busy, with its threads picked step by step (the default, cpu_threads.py) and with every core (torch's
default, the behaviour before). Same pairs, same seed; the arms alternate, their order reversed every
other repeat; medians of pairs/s (training steps only) and of each repeat's ratio.

    python benchmarks/shared_cores.py --model DIR --repeats 3     # results/shared_cores.jsonl, prints a table
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import data  # noqa: E402

SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"
ARMS = {"picked step by step": "0", "every core": str(os.cpu_count())}


def pairs_files(folder: Path, n: int) -> list[str]:
    """The first n training pairs, 300 validation and 300 test pairs of the shared split."""
    out = []
    for name, size in (("train", n), ("val", 300), ("test", 300)):
        out.append(str(data.write_pairs(data.load_pairs(str(SPLITS / f"{name}.tsv.gz"))[:size], folder / f"{name}.tsv.gz")))
    return out


def train_rate(model: str, files: list[str], threads: str, out: Path) -> float:
    """One run of train.py (1 epoch, no zero-shot, no epoch choice); its training pairs/s."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", model, "--data", files[0], "--val", files[1],
                    "--test", files[2], "--epochs", "1", "--no-zero-shot", "--no-select-best", "--device", "cpu",
                    "--threads", threads, "--out", str(out), "--overwrite"], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return json.loads((out / "metrics.json").read_text())["training"]["pairs_per_s"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder (all-MiniLM-L6-v2 from ../shared/fetch-models)")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    rows, work = [], Path(tempfile.mkdtemp())
    files = pairs_files(work, args.pairs)
    for repeat in range(args.repeats):
        for busy in (False, True):
            spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
            try:
                arms = list(ARMS.items())[::1 if repeat % 2 == 0 else -1]
                for arm, threads in arms:
                    rate = train_rate(args.model, files, threads, work / "out")
                    rows.append({"repeat": repeat, "busy": busy, "arm": arm, "pairs_per_s": rate})
                    print(f"repeat {repeat} {'beside a busy core' if busy else 'alone'}: {arm} {rate:.1f} pairs/s", flush=True)
            finally:
                if spinner:
                    spinner.kill()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    with open(ROOT / "results" / "shared_cores.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row | {"cpu": cpu, "cores": os.cpu_count(), "pairs": args.pairs}) + "\n")
    rate = {(a, b): statistics.median(r["pairs_per_s"] for r in rows if r["arm"] == a and r["busy"] == b)
            for a in ARMS for b in (False, True)}
    print(f"\n{args.pairs} pairs, 1 epoch, {cpu}, {os.cpu_count()} cores, medians of {args.repeats}")
    print("| threads | alone (pairs/s) | beside a busy core | busy / alone (median of repeats) |\n| --- | ---: | ---: | ---: |")
    for arm in ARMS:
        ratios = [next(r["pairs_per_s"] for r in rows if r["arm"] == arm and r["busy"] and r["repeat"] == k)
                  / next(r["pairs_per_s"] for r in rows if r["arm"] == arm and not r["busy"] and r["repeat"] == k)
                  for k in range(args.repeats)]
        print(f"| {arm} | {rate[arm, False]:.1f} | {rate[arm, True]:.1f} | {statistics.median(ratios):.2f}x |")


if __name__ == "__main__":
    main()
