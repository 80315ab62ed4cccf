"""Few labels, many texts: all-MiniLM-L6-v2 (the student) taught by all-mpnet-base-v2 (the teacher)
on the shared Quora splits, against the student on its gold pairs alone.

    python benchmarks/distill.py --models MODELS_DIR               # every run not yet done, then the table
    python benchmarks/distill.py --table                            # the table again, from results/distill.jsonl

Gold pairs: the first 400 and 4,000 of the training split's seeded sample (seed 0; nested, as
`--dataset-size` draws them). Unlabelled texts: about 20,000 of the training split's texts, labels
dropped, none of them a text of the 4,000 gold pairs, drawn by pair (both texts of random training
pairs): all 476,608 would take the teacher 45 minutes to embed on a 2-core CPU, and texts drawn one
by one would rarely hold a text's near-duplicates (a first try: docs/distillation.md). Teachers: all-mpnet-base-v2 fine-tuned with
the default recipe on the same gold pairs (and on 100 and 1,600, for its curve), or as published for
0 gold pairs. Students: 3 seeds each (the seed draws the data order, the projection and the silver
sample; the gold pairs stay the same). Every run is `python train.py ...` as a user types it, in its
own folder under --runs; a run already done is skipped and an interrupted one resumed, so the
command can be stopped and started again. Each student is paired with its gold-only run of the same
seed on the same test pairs (McNemar). Prints a Markdown table; writes results/distill.jsonl.
"""
from __future__ import annotations

import argparse
import gzip
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import data, jsonl, paired  # noqa: E402
import silver  # noqa: E402

SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"
STUDENT, TEACHER = "sentence-transformers-all-MiniLM-L6-v2", "sentence-transformers-all-mpnet-base-v2"
GOLD, SEEDS, TEACHER_CURVE = (0, 400, 4000), (0, 1, 2), (100, 400, 1600, 4000)
UNLABELLED_TEXTS = 20_000
# Each taught run takes one pass over gold + silver: 12,000 silver pairs of the about 64,000 mined.
EPOCHS, SILVER_SIZE = 1, 12_000


def prepare(runs: Path) -> None:
    """The gold files and the unlabelled texts, written once."""
    if (runs / "unlabelled.txt.gz").exists():
        return
    runs.mkdir(parents=True, exist_ok=True)
    train = data.load_pairs(str(SPLITS / "train.tsv.gz"))
    for n in TEACHER_CURVE:
        data.write_pairs(data.subsample(train, n, seed=0), runs / f"gold-{n}.tsv.gz")
    gold = {data.normalise(t) for a, b, _ in data.subsample(train, max(GOLD), seed=0) for t in (a, b)}
    sample: dict[str, str] = {}
    for i in np.random.default_rng(0).permutation(len(train)):  # by pair: both texts, labels dropped
        a, b, _ = train[i]
        if len(sample) >= UNLABELLED_TEXTS:
            break
        if data.normalise(a) not in gold and data.normalise(b) not in gold:
            sample.setdefault(data.normalise(a), a)
            sample.setdefault(data.normalise(b), b)
    with gzip.open(runs / "unlabelled.txt.gz", "wt") as f:
        f.write("\n".join(sample.values()) + "\n")


def plan(models: Path, runs: Path) -> list[tuple[str, dict, list[str]]]:
    """(name, what it is, train.py's flags) for every run, in the order they run: each teacher before
    its students, the labels' choice (decision or score, on seed 0's validation error) at 4,000 gold
    pairs before the rest, the teacher's curve last."""
    splits = ["--val", str(SPLITS / "val.tsv.gz"), "--test", str(SPLITS / "test.tsv.gz"), "--device", "cpu"]

    def teacher(n: int) -> tuple[str, dict, list[str]]:
        return (f"teacher-{n}", {"kind": "teacher", "gold": n, "seed": 0},
                ["--model", str(models / TEACHER), "--data", str(runs / f"gold-{n}.tsv.gz"), "--no-zero-shot"] + splits)

    def student(kind: str, n: int, seed: int) -> tuple[str, dict, list[str]]:
        flags = ["--model", str(models / STUDENT), "--seed", str(seed)] + splits
        if kind == "gold":
            flags += ["--data", str(runs / f"gold-{n}.tsv.gz")] + ([] if seed == 0 else ["--no-zero-shot"])
        else:  # gold + silver, written by silver_data() before the run
            flags += ["--data", str(silver_file(runs, n, seed)), "--epochs", str(EPOCHS)]
        return f"{kind}-{n}-seed-{seed}", {"kind": kind, "gold": n, "seed": seed}, flags

    return ([teacher(4000), teacher(400)]
            + [student("gold", 4000, s) for s in SEEDS]
            + [student("taught-decision", 4000, s) for s in SEEDS]
            # The teacher's cosines as soft targets (CoSENT) and its embeddings as targets each ran once, at 4,000 gold
            # pairs (seed 0, commits 89a8dad and 974234b), and lost on validation: the options are gone, their rows stay.
            + [student(kind, 400, s) for kind in ("gold", "taught-decision") for s in SEEDS]
            + [student("taught-decision", 0, s) for s in SEEDS]
            + [teacher(100), teacher(1600)])


def silver_file(runs: Path, n: int, seed: int) -> Path:
    return runs / f"gold-{n}-silver-seed-{seed}.tsv.gz"


def silver_data(models: Path, runs: Path, n: int, seed: int) -> dict:
    """A taught run's training pairs: the gold pairs, then a seeded sample of the silver pairs that
    the teacher of that many gold pairs labels (silver.py; for 0 gold, the published teacher). The
    report goes into the run's row."""
    val, test = (data.load_pairs(str(SPLITS / f"{s}.tsv.gz")) for s in ("val", "test"))
    teacher = runs / f"teacher-{n}" if n else models / TEACHER
    pairs, report = silver.silver_pairs(str(teacher), str(runs / "unlabelled.txt.gz"), val, test,
                                        size=SILVER_SIZE, seed=seed, device="cpu")
    gold = data.load_pairs(str(runs / f"gold-{n}.tsv.gz")) if n else []
    data.write_pairs(gold + pairs, silver_file(runs, n, seed))
    return report


def run(name: str, flags: list[str], runs: Path) -> dict:
    """train.py in its own process, resumed if an earlier one was interrupted; its metrics."""
    out = runs / name
    finished = jsonl.read_json(out / "metrics.json")
    if finished and "fine_tuned" in finished:
        return finished
    resume = ["--resume"] if (out / "checkpoint.pt").exists() else ["--overwrite"]
    started = time.perf_counter()
    subprocess.run([sys.executable, str(ROOT / "train.py"), *flags, "--out", str(out), *resume], check=True)
    metrics = jsonl.read_json(out / "metrics.json")
    return metrics | {"wall_seconds": time.perf_counter() - started}


def row_of(name: str, what: dict, metrics: dict) -> dict:
    taught = metrics.get("silver", {})
    return what | {"name": name, "val_error": metrics["fine_tuned"]["val"]["error_rate"],
                   "test_error": metrics["fine_tuned"]["test"]["error_rate"], "test_correct": metrics["test_correct"],
                   "zero_shot_test_error": metrics.get("zero_shot", {}).get("test", {}).get("error_rate"),
                   "training_seconds": metrics["training"]["seconds"], "pairs_per_s": metrics["training"]["pairs_per_s"],
                   "wall_seconds": metrics.get("wall_seconds"), "best_epoch": metrics["training"]["best_epoch"],
                   "silver_pairs": taught.get("pairs"), "mining_seconds": taught.get("encode_seconds"),
                   "teacher_texts_per_s": taught.get("teacher_texts_per_s"),
                   "vs_published": metrics.get("verdict", {}).get("pairs")}


def published_teacher(models: Path) -> dict:
    """The teacher of 0 gold pairs, all-mpnet-base-v2 as published, evaluated as train.py evaluates."""
    from embed_ft import evaluate
    val, test = (data.load_pairs(str(SPLITS / f"{s}.tsv.gz")) for s in ("val", "test"))
    encoder = evaluate.Remembered(evaluate.open_encoder(str(models / TEACHER), device="cpu"))
    result = evaluate.evaluate(encoder, val, test)
    right = evaluate.correct(encoder, test, result["val"]["threshold"])
    return {"name": "teacher-0", "kind": "teacher", "gold": 0, "seed": 0, "val_error": result["val"]["error_rate"],
            "test_error": result["test"]["error_rate"], "test_correct": paired.pack(right)}


def encode_cost(models: Path, rounds: int = 3) -> dict:
    """Texts per second of the student and the teacher on the same 2,000 validation texts, in turn."""
    from embed_ft.model import load_model
    texts = list(dict.fromkeys(t for a, b, _ in data.load_pairs(str(SPLITS / "val.tsv.gz")) for t in (a, b)))[:2000]
    encoders = {name: load_model(str(models / name)).eval() for name in (STUDENT, TEACHER)}
    speeds = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, encoder in encoders.items():
            started = time.perf_counter()
            encoder.encode(texts, progress=False)
            speeds[name].append(len(texts) / (time.perf_counter() - started))
    student, teacher = (statistics.median(speeds[n]) for n in (STUDENT, TEACHER))
    return {"name": "encode-cost", "kind": "encode-cost", "student_texts_per_s": student,
            "teacher_texts_per_s": teacher, "ratio": student / teacher}


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def verdicts(taught: list[dict], gold: list[dict]) -> str:
    """McNemar of each taught seed against the gold-only run of the same seed (without gold pairs,
    against the student as published: train.py's own verdict)."""
    cells = []
    for t in sorted(taught, key=lambda r: r["seed"]):
        partner = next((g for g in gold if g["seed"] == t["seed"]), None)
        v = paired.compare_pairs(paired.unpack(t["test_correct"]), paired.unpack(partner["test_correct"])) if partner \
            else t["vs_published"]
        if v:
            cells.append(f"{v['verdict'].split(' on ')[0]} ({v['only_a_right']} vs {v['only_b_right']}, "
                         f"p = {paired.p_of_verdict(v):.2g})")
    return "; ".join(cells) or "-"


def table(rows: list[dict]) -> None:
    """By gold pairs and labels: zero-shot, gold only, gold + silver, the teacher, the share of the
    gap between gold only and the teacher that the silver pairs closed, and McNemar by seed."""
    def runs_of(kind: str, n: int) -> list[dict]:
        return [r for r in rows if r["kind"] == kind and r["gold"] == n]

    def cell(group: list[dict]) -> str:
        seeds = f"{len(group)} seed{'s' if len(group) > 1 else ''}"
        return f"{median(group, 'test_error'):.2%} ({median(group, 'val_error'):.2%}, {seeds})" if group else "-"

    zero_shot = next(r["zero_shot_test_error"] for r in rows if r["kind"] == "gold" and r["zero_shot_test_error"])
    print("\nShared Quora splits: test error on the 10,002 test pairs, median over seeds (validation error, 5,011 pairs)\n")
    print("| gold pairs | labels | zero-shot | gold only | gold + silver | teacher | gap closed | vs gold only (at 0: vs "
          "zero-shot), by seed (McNemar) |")
    print("| ---: | --- | ---: | ---: | ---: | ---: | ---: | --- |")
    for n in GOLD:
        for kind in ("taught-decision", "taught-score", "taught-embedding"):
            taught, gold, teacher = runs_of(kind, n), runs_of("gold", n), runs_of("teacher", n)
            if not taught:
                continue
            base = median(gold, "test_error") if gold else zero_shot
            top = teacher[0]["test_error"] if teacher else None
            closed = f"{(base - median(taught, 'test_error')) / (base - top):.0%}" if top is not None and base > top else "-"
            print(f"| {n:,} | {kind.removeprefix('taught-')} | {zero_shot:.2%} | {cell(gold) if n else '(zero-shot)'} | "
                  f"{cell(taught)} | {cell(teacher)} | {closed} | {verdicts(taught, gold)} |")
    curve = [(n, runs_of("teacher", n)[0]["test_error"]) for n in TEACHER_CURVE if runs_of("teacher", n)]
    print("\nall-mpnet-base-v2 fine-tuned (default recipe, seed 0), test error: "
          + ", ".join(f"{n:,} pairs {e:.2%}" for n, e in curve))


def figure(rows: list[dict], path: Path) -> None:
    """Test error against gold pairs (medians over seeds): the teacher fine-tuned, the student on gold
    alone and taught; at 0, the published models. Gold sizes are spaced evenly."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    sizes = sorted({0, *TEACHER_CURVE, *GOLD})
    x = {n: i for i, n in enumerate(sizes)}
    fig, ax = plt.subplots(figsize=(6, 4.2))
    lines = [("teacher", "all-mpnet-base-v2 fine-tuned (seed 0)", "s-", "C1"),
             ("gold", "all-MiniLM-L6-v2, gold only", "o-", "C0"),
             ("taught-decision", "all-MiniLM-L6-v2, gold + silver (teacher's decisions)", "o--", "C2"),
             ("taught-embedding", "all-MiniLM-L6-v2, gold + teacher's embeddings", "o-", "C3")]
    for kind, name, style, colour in lines:
        points = sorted((n, 100 * statistics.median(r["test_error"] for r in rows if r["kind"] == kind and r["gold"] == n))
                        for n in {r["gold"] for r in rows if r["kind"] == kind})
        if not points:
            continue
        if kind == "gold" and any(r["zero_shot_test_error"] for r in rows):  # 0 gold pairs: the model as published
            points = [(0, 100 * next(r["zero_shot_test_error"] for r in rows if r.get("zero_shot_test_error")))] + points
        ax.plot([x[n] for n, _ in points], [e for _, e in points], style, color=colour, label=name)
    ax.set_xticks(range(len(sizes)), [f"{n:,}" for n in sizes])
    ax.set_xlabel("gold (labelled) pairs; 0 = as published")
    ax.set_ylabel("test error rate (%), 10,002 shared Quora test pairs")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", type=Path, help="the folder ../shared/fetch-models wrote")
    parser.add_argument("--runs", type=Path, default=ROOT / "runs" / "distill")
    parser.add_argument("--results", type=Path, default=ROOT / "results" / "distill.jsonl")
    parser.add_argument("--only", help="run only the runs whose name starts with this")
    parser.add_argument("--table", action="store_true", help="only print the table of an earlier --results")
    args = parser.parse_args()
    if not args.table:
        prepare(args.runs)
        done = {r["name"] for r in jsonl.read(args.results)} if args.results.exists() else set()
        for name, what, flags in plan(args.models, args.runs):
            if name in done or (args.only and not name.startswith(args.only)):
                continue
            report = silver_data(args.models, args.runs, what["gold"], what["seed"]) if what["kind"].startswith("taught") \
                else {}
            jsonl.append(args.results, row_of(name, what, run(name, flags, args.runs) | {"silver": report}))
        for name, measure in [("teacher-0", published_teacher), ("encode-cost", encode_cost)]:
            if name not in done and not args.only:
                jsonl.append(args.results, measure(args.models))
    table(jsonl.read(args.results))
    figure(jsonl.read(args.results), args.results.with_suffix(".png"))


if __name__ == "__main__":
    main()
