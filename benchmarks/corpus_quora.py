"""Every distinct question of the shared Quora file (about 500,000), embedded, indexed, searched and
de-duplicated, as a user runs it: `corpus.py embed`, then search, then `dedup.py`, each a process.

    python benchmarks/corpus_quora.py --model DIR [--model DIR256 ...]     # results/corpus_quora.jsonl, a table

For each model: the embedding job's time, texts/s and peak memory (its manifest); the index's kind,
build time, size and recall@10 against exact search (its manifest); search on 1,000 questions of the
test split: queries/s of the index alone and end to end (embedding the queries included), and
recall@10 against exact search on those queries; then dedup.py: time, groups, the largest, and its
precision and recall on labelled pairs beside the exact pairwise decisions at the same threshold,
on the test split's pairs (no model here trained on them; the threshold of a published model is
tuned on the validation split, --tune-on) and on all the file's pairs.

dedup.py as it was before the index (every pair, connected components) has its own benchmark:
benchmarks/dedup_before_index.py.
"""
from __future__ import annotations

import argparse
import csv
import gzip
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import corpus_folder, corpus_search, jsonl, vector_index# noqa: E402
from embed_ft.model import load_model# noqa: E402

QUORA = ROOT.parent / "shared" / "data" / "quora"


def write_questions(path: Path) -> int:
    """Each question of the file once, by its qid: a table of id and text."""
    seen: dict[str, str] = {}
    with gzip.open(QUORA / "quora_duplicate_questions.tsv.gz", "rt", encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f, delimiter="\t"):
            for qid, text in ((row["qid1"], row["question1"]), (row["qid2"], row["question2"])):
                if text and text.strip():
                    seen.setdefault(qid, " ".join(text.split()))
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["id", "text"])
        writer.writerows(seen.items())
    return len(seen)


def run(argv: list[str], log: Path) -> float:
    """A command as a user runs it; its seconds. Its output goes to `log`."""
    started = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run([sys.executable, *argv], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT).returncode
    if code:
        raise SystemExit(f"{' '.join(argv)} failed ({code}): see {log}")
    return time.perf_counter() - started


def search_figures(folder: Path, model_dir: str, queries: list[str]) -> dict:
    """Queries/s of the index alone and end to end, and recall@10 against exact search on these queries."""
    manifest = corpus_folder.read_manifest(folder)
    model = load_model(model_dir).eval()
    index = vector_index.load(folder / corpus_folder.INDEX)
    corpus_search.search_corpus(folder, queries[:10], model, k=10)  # warm: the model's first pass, the index read
    started = time.perf_counter()
    corpus_search.search_corpus(folder, queries, model, k=10)
    end_to_end = time.perf_counter() - started
    ids, skip = model.tokenize(queries, prompt=model.layout.prompt_chosen("query", None))
    vectors = model.encode_ids(ids, 128, False, manifest["dtype"] == "bf16", skip)
    started = time.perf_counter()
    _, found = vector_index.search(index, vectors, 10)
    alone = time.perf_counter() - started
    truth = vector_index.exact_neighbours(corpus_folder.all_vectors(folder), vectors, 10)
    recall = vector_index.share_found(truth, found)
    return {"queries": len(queries), "index_queries_per_second": round(len(queries) / alone, 1),
            "end_to_end_queries_per_second": round(len(queries) / end_to_end, 1), "recall_at_10_queries": round(recall, 4)}


def dedup_figures(folder: Path, out: Path, model_dir: str, labels: list[Path]) -> dict:
    tune = [] if load_model(model_dir).decision.get("threshold") is not None else ["--tune-on", str(QUORA / "splits" / "val.tsv.gz")]
    checks = [a for path in labels for a in ("--labels", str(path))]
    seconds = run(["dedup.py", str(folder), "--out", str(out), "--overwrite", *checks, *tune], out.with_suffix(".log"))
    summary = json.loads((out / "summary.json").read_text())
    summary["labels"] = {str(Path(path).relative_to(QUORA.parent.parent)): check for path, check in summary.get("labels", {}).items()}
    return {"seconds_whole_command": round(seconds, 1), **summary, "model": Path(summary["model"]).name}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", required=True, help="a model folder (repeat for several)")
    parser.add_argument("--work", default="runs/corpus_quora")
    parser.add_argument("--results", default="results/corpus_quora.jsonl")
    args = parser.parse_args()
    work = Path(args.work)
    questions = work / "questions.tsv"
    if not questions.is_file():
        print(f"{write_questions(questions):,} distinct questions written to {questions}")
    test_pairs = QUORA / "splits" / "test.tsv.gz"
    queries = [r["question1"] for r in csv.DictReader(gzip.open(test_pairs, "rt", encoding="utf-8"), delimiter="\t")][:1000]
    for model_dir in args.model:
        name = Path(model_dir).name
        folder = work / name
        embed_seconds = run(["corpus.py", "embed", str(questions), "--model", model_dir, "--out", str(folder)],
                            work / f"{name}-embed.log")
        manifest = corpus_folder.read_manifest(folder)
        row = {"model": Path(model_dir).name, "width": manifest["width"], "texts": manifest["texts"], "dtype": manifest["dtype"],
               "embed_seconds_whole_command": round(embed_seconds, 1), "embed": manifest["last_run"], "index": manifest["index"],
               "search": search_figures(folder, model_dir, queries),
               "dedup": dedup_figures(folder, work / f"{name}-dedup", model_dir,
                                      [test_pairs, QUORA / "quora_duplicate_questions.tsv.gz"])}
        jsonl.append(Path(args.results), row)
        print(json.dumps(row, indent=1))


if __name__ == "__main__":
    main()
