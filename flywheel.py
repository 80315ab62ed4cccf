"""The data flywheel: as labelled pairs keep arriving, retrain, and promote a model only if it wins.

    python flywheel.py --home fw --base DIR --pairs drops/ --val val.tsv.gz --test test.tsv.gz
    python flywheel.py --plot fw/history.jsonl

One call is one round. The pairs collected so far are every file in --pairs (a folder that files are
dropped into, or files). The round trains a candidate, from the base model on all the pairs
(`--mode scratch`, the default: measured better, see docs/flywheel.md) or from the current model on
the files no earlier round has seen (`--mode continue`), evaluates it and the current model on the
same fixed validation and test pairs, and promotes it only if it classifies significantly more test
pairs correctly: McNemar's exact test, one-sided, at --alpha. Each model's threshold is its own,
tuned on validation. With `--set objective=retrieval` it promotes on ranking instead: significantly
more test queries whose first duplicate the candidate ranks higher (a sign test, same shape). Promotion writes nothing into the current model: the candidate's folder is complete
before `home/current`, a symbolic link, is switched to it by an atomic rename, so a crash leaves
the old current model in place. A refused candidate stays in home/rounds/ for inspection. Each
round appends a line to home/history.jsonl. Interrupted, a round resumes its training from the
candidate's checkpoint when run again.
"""
from __future__ import annotations

import argparse
import csv
import dataclasses
import gzip
import hashlib
import os
import time
from pathlib import Path

import numpy as np

import checkpoint
import errors
import data
import evaluate
import jsonl
import options
import run_folder
import train
from errors import InputError
from model import Embedder


def mcnemar_exact(candidate_right: np.ndarray, current_right: np.ndarray) -> dict:
    """Does the candidate get more pairs right than the current model, beyond chance? Only the pairs
    on which they disagree count: b (only the candidate right) and c (only the current right).
    Under "no difference" b ~ Binomial(b + c, 1/2); the one-sided p-value is P(X >= b)."""
    b = int(np.sum(candidate_right & ~current_right))
    c = int(np.sum(~candidate_right & current_right))
    return {"test": "McNemar exact, one-sided", "candidate_only_right": b, "current_only_right": c,
            "p_value": evaluate.sign_test(b, c)}


def sign_test_on_queries(candidate_ranks: np.ndarray, current_ranks: np.ndarray) -> dict:
    """Does the candidate rank the first duplicate of more queries higher than the current model,
    beyond chance? The sign test over the queries whose reciprocal rank differs: McNemar's shape for
    a ranking. A sign test rather than Wilcoxon's signed-rank test: reciprocal ranks take few values
    (1, 1/2, 1/3, ...), so most differences tie in size, and a gain from rank 2 to 1 is not "worth"
    ten from rank 20 to 19 in any sense the ranks of the differences would capture; the sign test
    needs no such weighting, and it is exact."""
    better = int(np.sum(candidate_ranks > current_ranks))
    worse = int(np.sum(candidate_ranks < current_ranks))
    return {"test": "sign test on per-query reciprocal ranks, one-sided", "candidate_better_queries": better,
            "current_better_queries": worse, "p_value": evaluate.sign_test(better, worse),
            "current_mrr": float(current_ranks.mean()), "candidate_mrr": float(candidate_ranks.mean())}


def pair_files(sources: list[str]) -> list[Path]:
    """The pair files in the given files and folders, in name order (files are read as train.py does)."""
    files = []
    for source in map(Path, sources):
        if source.is_dir():
            files += sorted(p for p in source.iterdir() if p.name.endswith(data.LOCAL_SUFFIXES) and p.is_file())
        elif source.is_file():
            files.append(source)
        else:
            raise InputError(f"--pairs: {source} is neither a file nor a folder")
    if not files:
        raise InputError(f"--pairs: no pair files (.csv, .tsv, .jsonl, .parquet, optionally .gz) in {sources}")
    return files


def fingerprint(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def write_pairs(pairs: list[data.Pair], path: Path) -> Path:
    """The pairs a candidate is trained on, kept in its folder: what it saw is on record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with gzip.open(path, "wt", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, delimiter="\t", lineterminator="\n")
        writer.writerow(["question1", "question2", "is_duplicate"])
        writer.writerows(pairs)
    return path


def correct(model: Embedder, pairs: list[data.Pair], threshold: float) -> np.ndarray:
    labels = np.array([y for *_, y in pairs]) == 1
    return model.is_duplicate([a for a, _, _ in pairs], [b for _, b, _ in pairs], threshold) == labels


def switch_current(home: Path, target: Path) -> None:
    """Point home/current at target: a new link is made beside it, then renamed over it (atomic)."""
    link = home / "current.new"
    link.unlink(missing_ok=True)
    link.symlink_to(target.relative_to(home), target_is_directory=True)
    os.replace(link, home / "current")


def run_round(home: Path, base: str, sources: list[str], val_path: str, test_path: str, mode: str = "scratch",
              alpha: float = 0.05, overrides: dict | None = None) -> dict:
    """One round: train a candidate, compare it with the current model, promote it or not, log it."""
    home.mkdir(parents=True, exist_ok=True)
    history = jsonl.read(home / "history.jsonl")
    number = len(history) + 1
    current = home / "current"
    before = os.readlink(current) if current.is_symlink() else "base"
    files = {os.path.relpath(p): fingerprint(p) for p in pair_files(sources)}  # no absolute path in the history
    seen = {digest for row in history for digest in row["files"].values()}
    new = [f for f, digest in files.items() if digest not in seen]
    chosen = list(files) if mode == "scratch" or before == "base" else new
    if not chosen:
        raise InputError("no new pair files since the last round; drop some into --pairs")
    loaded = {f: data.load_pairs(f) for f in files}
    val, test = data.load_pairs(val_path), data.load_pairs(test_path)
    pairs = data.drop_overlap([p for f in chosen for p in loaded[f]], val, test)
    folder = home / "rounds" / f"round-{number:03d}"
    config = options.Config(**(overrides or {}) | {
        "model": str(current.resolve()) if mode == "continue" and before != "base" else base,
        "data": str(write_pairs(pairs, folder / "pairs.tsv.gz")), "val": val_path, "test": test_path,
        "out": str(folder), "resume": checkpoint.exists(folder)})
    if run_folder.finished_metrics(folder) is None:  # a round stopped after its training needs no second one
        train.train(config)

    candidate = Embedder.load(folder)
    if before != "base":
        incumbent = Embedder.load(current)
        incumbent_threshold = incumbent.decision["threshold"]
    else:  # nothing promoted yet: the base model, as training found it, is the one to beat
        _, _, incumbent = train.prepare(dataclasses.replace(config, model=base, resume=False))
        incumbent_threshold = evaluate.evaluate(incumbent, val)["val"]["threshold"]
    candidate_right = correct(candidate, test, candidate.decision["threshold"])
    current_right = correct(incumbent, test, incumbent_threshold)
    if config.objective == "retrieval":
        ranks = [np.array(evaluate.retrieval_metrics(m, test, per_query=True)["reciprocal_ranks"])
                 for m in (candidate, incumbent)]
        verdict = sign_test_on_queries(*ranks)
        wins, losses = verdict["candidate_better_queries"], verdict["current_better_queries"]
    else:
        verdict = mcnemar_exact(candidate_right, current_right)
        wins, losses = verdict["candidate_only_right"], verdict["current_only_right"]
    verdict |= {"objective": config.objective, "alpha": alpha}
    promoted = verdict["p_value"] < alpha and wins > losses
    if promoted:
        switch_current(home, folder)
    row = {"round": number, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode, "files": files,
           "new_files": len(new), "pairs_seen": sum(map(len, loaded.values())), "trained_on": len(pairs),
           "current": before, "candidate": str(folder.relative_to(home)),
           "current_error": float(1 - current_right.mean()), "candidate_error": float(1 - candidate_right.mean()),
           **verdict, "decision": "promoted" if promoted else "refused",
           "current_after": str(folder.relative_to(home)) if promoted else before}
    jsonl.append(home / "history.jsonl", row)
    units = "queries one ranked higher" if config.objective == "retrieval" else "pairs only one got right"
    print(f"round {number}: current {row['current_error']:.2%}, candidate {row['candidate_error']:.2%} test error; "
          f"{wins} vs {losses} {units}, p = {verdict['p_value']:.2g}: {row['decision']}")
    return row


def plot(history_path: Path, figure: Path) -> None:
    """Test error against round: the model that was current, and each candidate (filled: promoted)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    rows = jsonl.read(history_path)
    rounds = [r["round"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    ax.plot(rounds, [100 * r["current_error"] for r in rows], "s--", color="C0", label="current model before the round")
    for r in rows:
        ax.plot(r["round"], 100 * r["candidate_error"], "o", color="C1" if r["decision"] == "promoted" else "C3",
                fillstyle="full" if r["decision"] == "promoted" else "none", ms=9)
        ax.annotate(f"{r['decision']}\np={r['p_value']:.1g}\n{r['trained_on']:,} pairs", (r["round"], 100 * r["candidate_error"]),
                    textcoords="offset points", xytext=(8, -4), fontsize=7)
    ax.plot([], [], "o", color="C1", label="candidate, promoted")
    ax.plot([], [], "o", color="C3", fillstyle="none", label="candidate, refused")
    ax.set_xticks(rounds)
    ax.set_xlim(min(rounds) - 0.5, max(rounds) + 0.9)  # room for the last round's note
    ax.set_xlabel("round")
    ax.set_ylabel("test error rate (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(figure, dpi=120)
    plt.close(fig)
    print(f"figure: {figure}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", help="the flywheel's folder: current, rounds/, history.jsonl")
    parser.add_argument("--base", help="the base encoder (hub name or folder) that training starts from")
    parser.add_argument("--pairs", nargs="+", help="pair files, or folders of them: all pairs collected so far")
    parser.add_argument("--val", help="fixed validation pairs (thresholds are tuned here)")
    parser.add_argument("--test", help="fixed test pairs (the promotion test is decided here)")
    parser.add_argument("--mode", choices=["scratch", "continue"], default="scratch",
                        help="scratch: base model on all pairs; continue: current model on new files only")
    parser.add_argument("--alpha", type=float, default=0.05, help="promote when McNemar's one-sided p is below this")
    parser.add_argument("--set", default="", help="training options as option=value ... (see python train.py --help)")
    parser.add_argument("--plot", metavar="HISTORY", help="only draw HISTORY (a history.jsonl) as a figure")
    errors.add_debug_flag(parser)
    args = parser.parse_args(argv)
    if args.plot:
        return plot(Path(args.plot), Path(args.plot).with_suffix(".png"))
    missing = [f"--{k}" for k in ("home", "base", "pairs", "val", "test") if not getattr(args, k)]
    if missing:
        raise InputError(f"a round needs {', '.join(missing)}")
    if not 0 < args.alpha < 1:
        raise InputError("--alpha must be between 0 and 1")
    run_round(Path(args.home), args.base, args.pairs, args.val, args.test, args.mode, args.alpha,
              options.parse_overrides(args.set))


if __name__ == "__main__":
    errors.run(main)
