"""dedup.py as it was before the index (every pair of texts compared, groups as connected components),
taken from git, on the first N questions of the shared Quora file: the largest corpus it finishes in
30 minutes, beside today's dedup.py (benchmarks/corpus_quora.py).

    python benchmarks/dedup_before_index.py --model DIR --threshold 0.838 --sizes 100000,300000

Each size is one process as a user ran it then, stopped at 30 minutes. Prints each run's time, what
it said, and its peak memory (the largest of the runs so far: give the sizes in increasing order);
appends to results/dedup_before_index.jsonl.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import jsonl  # noqa: E402

OLD_DEDUP = "d3945ac"  # the last commit with dedup.py over all pairs
LIMIT = 1800           # seconds


def old_script(work: Path) -> Path:
    """The old dedup.py, from git: fetched before any run, so that a missing commit stops at once."""
    script = work / "dedup_all_pairs.py"
    script.write_text(subprocess.run(["git", "show", f"{OLD_DEDUP}:dedup.py"], cwd=ROOT, capture_output=True, text=True,
                                     check=True).stdout)
    return script


def run_once(script: Path, texts: Path, model: str, threshold: float, out: Path) -> dict:
    """One run, limited to LIMIT seconds: its seconds, whether it finished, its summary lines, its peak memory."""
    started = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, str(script), str(texts), "--model", model, "--threshold", str(threshold),
                               "--out", str(out)], cwd=ROOT, timeout=LIMIT, env=os.environ | {"PYTHONPATH": str(ROOT)},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    except subprocess.TimeoutExpired:
        return {"seconds": LIMIT, "finished": False, "said": [f"stopped at {LIMIT // 60} minutes"]}
    lines = done.stdout.strip().splitlines()
    return {"seconds": round(time.perf_counter() - started, 1), "finished": done.returncode == 0,
            "said": [line for line in lines if "groups holding" in line or line.startswith(("time:", "error"))],
            "peak_memory_mib": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--threshold", type=float, required=True, help="the one today's dedup.py used (its summary.json)")
    parser.add_argument("--sizes", default="100000,300000", help="N,N,...: the first N questions")
    parser.add_argument("--questions", default="runs/corpus_quora/questions.tsv", help="benchmarks/corpus_quora.py writes it")
    parser.add_argument("--work", default="runs/corpus_quora")
    parser.add_argument("--results", default="results/dedup_before_index.jsonl")
    args = parser.parse_args()
    work = Path(args.work)
    script = old_script(work)
    texts = [row[1] for row in csv.reader(open(args.questions, encoding="utf-8"), delimiter="\t")][1:]
    for n in [int(n) for n in args.sizes.split(",")]:
        subset = work / f"first-{n}.txt"
        subset.write_text("\n".join(texts[:n]) + "\n", encoding="utf-8")
        row = {"model": Path(args.model).name, "texts": n, "threshold": args.threshold,
               **run_once(script, subset, args.model, args.threshold, work / f"old-groups-{n}.jsonl")}
        jsonl.append(Path(args.results), row)
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
