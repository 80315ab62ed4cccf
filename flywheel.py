"""The data flywheel: as labelled pairs keep arriving, retrain, and promote a model only if it wins.

    python flywheel.py --home fw --base DIR --val val.tsv.gz --test test.tsv.gz    # once: the settings
    python flywheel.py --home fw                         # a round over fw/pairs/ (or --pairs FILES ...)
    python flywheel.py --plot fw/history.jsonl

One call is one round. The pairs collected so far are the files in --pairs (by default home/pairs/,
where `serve.py`'s `POST /v1/pairs` stores them; any folder that files are dropped into, or files),
each pair counted once (`pair_store.settle`). The round trains a candidate, from the base model on
all the pairs (`--mode scratch`, the default: measured better, see docs/flywheel.md) or from the
current model on the files no earlier round has seen (`--mode continue`), evaluates it and the
current model on the same fixed validation and test pairs, and promotes it only if it classifies
significantly more test pairs correctly: McNemar's exact test, one-sided, at --alpha
(`paired.compare_pairs`). Each model's threshold is its own, tuned on validation. Before any
promotion the model to beat is the base model as published. With `--set objective=retrieval` it
promotes on ranking instead: significantly more test queries whose first duplicate the candidate
ranks higher (a sign test, same shape).

Promotion writes nothing into the current model: the candidate's folder is complete before
`home/current.json`, a small pointer file, is replaced by an atomic rename, so a crash leaves the old
current model in place, and a server watching the pointer (`serve.py`) sees the old model or the
new one, never half of one. A pointer file rather than a symbolic link, because the home may live on
a Modal Volume, where links are not documented to survive. A refused candidate stays in
home/rounds/ for inspection. Each round appends a line to home/history.jsonl. Interrupted, a round
resumes its training from the candidate's checkpoint when run again. The settings given once
(--base, --val, --test, --mode, --alpha, --set) are kept in home/flywheel.json, so that a scheduled
round needs only --home.
"""
from __future__ import annotations

import argparse
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
import paired
import paths
import run_folder
import train
from errors import InputError
from model import Embedder, load_model
from pair_store import settle

SETTINGS = ("base", "val", "test", "mode", "alpha", "set")
DEFAULTS = {"mode": "scratch", "alpha": 0.05, "set": ""}


# ------------------------------------------------------------------------------------ the home

def settings(home: Path, given: dict) -> dict:
    """The round's settings: those given now, else those kept in home/flywheel.json, else defaults.
    What is given is kept for the next round."""
    kept = jsonl.read_json(home / "flywheel.json") or {}
    merged = DEFAULTS | kept | {k: v for k, v in given.items() if v is not None}
    missing = [f"--{k}" for k in ("base", "val", "test") if not merged.get(k)]
    if missing:
        raise InputError(f"{home} has no flywheel settings yet: give {', '.join(missing)} once "
                         "(they are kept in flywheel.json)")
    if merged != kept:
        jsonl.write_json(home / "flywheel.json", merged)
    return merged


def current_version(home: Path) -> dict:
    """What home/current.json points at: {"version", "path", "promoted_at"}; "base" before any promotion."""
    return jsonl.read_json(home / "current.json") or {"version": "base", "path": None, "promoted_at": None}


def switch_current(home: Path, target: Path) -> None:
    """Point home/current.json at target: the new pointer is written beside it, then renamed over it."""
    jsonl.write_json(home / "current.json", {"version": target.name, "path": str(target.relative_to(home)),
                                             "promoted_at": time.strftime("%Y-%m-%dT%H:%M:%S%z")})


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


def new_pair_count(home: Path, folder: Path) -> int:
    """Pairs in the files of `folder` that no round has read yet (by content, whatever their names):
    what a scheduler weighs before it starts a round."""
    seen = {digest for row in jsonl.read(home / "history.jsonl") for digest in row["files"].values()}
    files = pair_files([str(folder)]) if folder.is_dir() and any(folder.iterdir()) else []
    return sum(len(data.load_pairs(str(p))) for p in files if fingerprint(p) not in seen)


def correct(model: Embedder, pairs: list[data.Pair], threshold: float) -> np.ndarray:
    labels = np.array([y for *_, y in pairs]) == 1
    return model.is_duplicate([a for a, _, _ in pairs], [b for _, b, _ in pairs], threshold) == labels


# ------------------------------------------------------------------------------------ a round

def run_round(home: Path, base: str, sources: list[str], val_path: str, test_path: str, mode: str = "scratch",
              alpha: float = 0.05, overrides: dict | None = None) -> dict:
    """One round: train a candidate, compare it with the current model, promote it or not, log it."""
    home.mkdir(parents=True, exist_ok=True)
    history = jsonl.read(home / "history.jsonl")
    number = len(history) + 1
    pointer = current_version(home)
    before = pointer["path"] or "base"
    files = {os.path.relpath(p): fingerprint(p) for p in pair_files(sources)}  # no absolute path in the history
    seen = {digest for row in history for digest in row["files"].values()}
    new = [f for f, digest in files.items() if digest not in seen]
    chosen = list(files) if mode == "scratch" or before == "base" else new
    if not chosen:
        raise InputError("no new pair files since the last round; drop some into --pairs")
    loaded = {f: data.load_pairs(f) for f in files}
    val, test = data.load_pairs(val_path), data.load_pairs(test_path)
    pairs, repeats, conflicts = settle([p for f in chosen for p in loaded[f]])
    kept = data.drop_overlap(pairs, val, test, remedy=f"the round has nothing to train on; send pairs about "
                             f"other texts than the fixed --val and --test ({val_path}, {test_path})")
    folder = home / "rounds" / f"round-{number:03d}"
    config = options.Config(**(overrides or {}) | {
        "model": str(home / before) if mode == "continue" and before != "base" else base,
        "data": str(data.write_pairs(kept, folder / "pairs.tsv.gz")), "val": val_path, "test": test_path,
        "out": str(folder), "resume": checkpoint.exists(folder)})
    if run_folder.finished_metrics(folder) is None:  # a round stopped after its training needs no second one
        train.train(config)

    candidate = Embedder.load(folder)
    if before != "base":
        incumbent = Embedder.load(home / before)
        incumbent_threshold = incumbent.decision["threshold"]
    else:  # nothing promoted yet: the base model as published (what a server of the home serves) is the one to beat
        incumbent = load_model(base, None, config.max_length, config.trust_remote_code).to(candidate.device)
        incumbent_threshold = evaluate.evaluate(incumbent, val)["val"]["threshold"]
    candidate_right = correct(candidate, test, candidate.decision["threshold"])
    current_right = correct(incumbent, test, incumbent_threshold)
    if config.objective == "retrieval":
        ranks = [np.array(evaluate.retrieval_metrics(m, test, per_query=True)["reciprocal_ranks"])
                 for m in (candidate, incumbent)]
        verdict = paired.compare_queries(*ranks, alpha=alpha)
        wins, losses = verdict["a_better_queries"], verdict["b_better_queries"]
    else:
        verdict = paired.compare_pairs(candidate_right, current_right, alpha=alpha)
        wins, losses = verdict["only_a_right"], verdict["only_b_right"]
    verdict |= {"objective": config.objective, "alpha": alpha}
    promoted = verdict["p_value"] < alpha and wins > losses
    if promoted:
        switch_current(home, folder)
    row = {"round": number, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "mode": mode, "files": files,
           "new_files": len(new), "pairs_seen": sum(map(len, loaded.values())), "repeats_dropped": repeats,
           "conflicts_dropped": conflicts, "overlap_dropped": len(pairs) - len(kept), "trained_on": len(kept),
           "current": before, "candidate": str(folder.relative_to(home)),
           "current_error": float(1 - current_right.mean()), "candidate_error": float(1 - candidate_right.mean()),
           **verdict, "decision": "promoted" if promoted else "refused",
           "current_after": str(folder.relative_to(home)) if promoted else before}
    jsonl.append(home / "history.jsonl", row)
    print(f"round {number}: " + paired.describe(verdict, "candidate", "current") + f" -> {row['decision']}")
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
    parser.add_argument("--home", metavar="OUTDIR", help="the flywheel's folder: flywheel.json, current.json, pairs/, rounds/, history.jsonl")
    parser.add_argument("--base", metavar="MODEL", help="the base encoder (hub name or folder) that training starts from")
    parser.add_argument("--pairs", nargs="+", metavar="PAIRS", help="pair files, or folders of them (default: HOME/pairs)")
    parser.add_argument("--val", metavar="FILE", help="fixed validation pairs (thresholds are tuned here)")
    parser.add_argument("--test", metavar="FILE", help="fixed test pairs (the promotion test is decided here)")
    parser.add_argument("--mode", choices=["scratch", "continue"],
                        help="scratch (default): base model on all pairs; continue: current model on new files only")
    parser.add_argument("--alpha", type=float, help="promote when the one-sided p is below this (default 0.05)")
    parser.add_argument("--set", help="training options as option=value ... (see python train.py --help)")
    parser.add_argument("--init", action="store_true", help="only keep the settings in HOME/flywheel.json")
    parser.add_argument("--plot", metavar="FILE", help="only draw this history.jsonl as a figure")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    if args.plot:
        return plot(Path(args.plot), Path(args.plot).with_suffix(".png"))
    if not args.home:
        raise InputError("a round needs --home")
    if args.alpha is not None and not 0 < args.alpha < 1:
        raise InputError("--alpha must be between 0 and 1")
    home = Path(args.home)
    if args.set:
        options.parse_overrides(args.set)  # a bad --set is named before it is kept
    chosen = settings(home, {k: getattr(args, k) for k in SETTINGS})
    overrides = options.parse_overrides(chosen["set"])
    if args.init:
        return print(f"{home}/flywheel.json: {chosen}")
    run_round(home, chosen["base"], args.pairs or [str(home / "pairs")], chosen["val"], chosen["test"],
              chosen["mode"], chosen["alpha"], overrides)


if __name__ == "__main__":
    errors.run(main)
