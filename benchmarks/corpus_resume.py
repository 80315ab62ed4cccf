"""The corpus job killed and resumed, and grown, on real texts: `corpus.py embed` as a user runs it.

    python benchmarks/corpus_resume.py --model DIR --texts runs/corpus_quora/questions.tsv --n 100000

1. An uninterrupted run over the first N texts (its seconds).
2. The same command into another folder, killed with SIGKILL --kills times, each at a moment drawn
   at random within its share of the uninterrupted run's length, started again each time, then left
   to finish.
   Then: every id exactly once, the same ids, texts and shards as the uninterrupted run, and the
   largest difference between their vectors.
3. The corpus grown by 5% (the next texts of the file): the same command again on the first
   folder; its seconds against the first run's.
Prints a table; appends to results/corpus_resume.jsonl.
"""
from __future__ import annotations

import argparse
import csv
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import corpus_folder, jsonl  # noqa: E402


def command(source: Path, model: str, out: Path) -> list[str]:
    return [sys.executable, str(ROOT / "corpus.py"), "embed", str(source), "--model", model, "--out", str(out)]


def run(argv: list[str], log: Path) -> float:
    started = time.perf_counter()
    with open(log, "a") as f:
        subprocess.run(argv, stdout=f, stderr=subprocess.STDOUT, check=True)
    return time.perf_counter() - started


def contents(folder: Path) -> tuple[list[tuple], np.ndarray]:
    rows, vectors = [], []
    for path in corpus_folder.shards(folder):
        table = corpus_folder.read_columns(path, ["id", "text"])
        rows += [(path.name, i, t) for i, t in zip(table["id"], table["text"])]
        vectors.append(corpus_folder.read_vectors(path))
    return rows, np.concatenate(vectors)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="a table of id and text (benchmarks/corpus_quora.py writes one)")
    parser.add_argument("--n", type=int, default=100_000)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--work", default="runs/corpus_resume")
    parser.add_argument("--results", default="results/corpus_resume.jsonl")
    args = parser.parse_args()
    work = Path(args.work)
    for folder in (work / "whole", work / "killed"):  # an earlier run's folders: this run starts from nothing
        shutil.rmtree(folder, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    rows = list(csv.reader(open(args.texts, encoding="utf-8"), delimiter="\t"))
    header, body = rows[0], rows[1:]
    first, grown = work / "first.tsv", work / "grown.tsv"
    for path, count in ((first, args.n), (grown, args.n + args.n // 20)):
        with open(path, "w", encoding="utf-8", newline="") as f:
            csv.writer(f, delimiter="\t", lineterminator="\n").writerows([header] + body[:count])
    log = work / "log.txt"
    whole = run(command(first, args.model, work / "whole"), log)

    rng, moments = random.Random(0), []
    for _ in range(args.kills):  # each kill within the first part of what is left, so that every one lands mid-run
        moment = rng.uniform(0.1, 0.8) * whole / args.kills
        process = subprocess.Popen(command(first, args.model, work / "killed"), stdout=open(log, "a"), stderr=subprocess.STDOUT)
        time.sleep(moment)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.wait()
        moments.append({"after_seconds": round(moment, 1), "shards_then": len(corpus_folder.shards(work / "killed"))})
    run(command(first, args.model, work / "killed"), log)
    killed_rows, killed_vectors = contents(work / "killed")
    whole_rows, whole_vectors = contents(work / "whole")
    ids = [i for _, i, _ in killed_rows]

    grow_seconds = run(command(grown, args.model, work / "whole"), log)
    manifest = corpus_folder.read_manifest(work / "whole")
    result = {"model": Path(args.model).name, "texts": args.n, "whole_seconds": round(whole, 1), "kills": moments,
              "every_id_once": len(ids) == len(set(ids)), "same_rows_and_shards": killed_rows == whole_rows,
              "max_abs_vector_difference": float(np.abs(killed_vectors - whole_vectors).max()),
              "dtype": manifest["dtype"], "grown_to": manifest["texts"], "grown_seconds": round(grow_seconds, 1),
              "grown_embedded": manifest["last_run"]["embedded"], "index_after_growth": manifest["index"]["built"],
              "grown_over_first": round(grow_seconds / whole, 3)}
    jsonl.append(Path(args.results), result)
    print(f"| texts | first run | kills (s) | every id once | same rows and shards | max |diff| | grown by 5% | its time / first |\n"
          f"| ---: | ---: | --- | --- | --- | ---: | ---: | ---: |\n"
          f"| {args.n:,} | {whole:.0f} s | {', '.join(str(m['after_seconds']) for m in moments)} | {result['every_id_once']} | "
          f"{result['same_rows_and_shards']} | {result['max_abs_vector_difference']:.1e} | {grow_seconds:.0f} s "
          f"({result['grown_embedded']:,} embedded, index {result['index_after_growth']}) | {result['grown_over_first']:.3f} |")


if __name__ == "__main__":
    main()
