"""The flywheel on its own traffic, for real: a home made from a base model alone, real pairs arriving
through /v1/pairs round after round, the held-out grown from them, and an audit no decision sees.

    python benchmarks/flywheel_stream.py --base DIR                    # 8 Quora rounds, then the shift
    python benchmarks/flywheel_stream.py --base DIR --per-round 3000 --rounds 2 --no-references \\
        --shift-after 0 --name two-batches                              # the two-batch check
    python benchmarks/flywheel_stream.py --base DIR --mode continue --no-references --shift-after 0 --name continue
    python benchmarks/flywheel_stream.py --table                        # reprint, redraw

The stream: Quora training pairs (the shared split, shuffled once), `--per-round` a round, posted to
a real `serve.py --home` on loopback (source "quora"), then one round by hand (`flywheel.run_round`).
After each round:
- checks: the held-out files exist; no held-out text is in any round's training pairs; every text
  keeps the split it had in the round before;
- the current model on pairs the home never saw (the shared Quora test split), beside its audit;
- with references: a model trained once on everything that had arrived by that round (less the pairs
  that touch the audit or validation texts), on the same audit pairs.
The domain shift: a second home, a copy of the first after `--shift-after` rounds, is then sent MRPC
training pairs (source "mrpc") for the remaining rounds. Each round's history names both domains.
Every row goes to results/flywheel_stream-NAME.jsonl as it is made; a rerun skips what is done.
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import data, evaluate, flywheel, jsonl, options, paired, train# noqa: E402
from embed_ft.state import heldout, home_state# noqa: E402
from embed_ft.model import Embedder, load_model# noqa: E402

SHARED = ROOT.parent / "shared" / "data"
KEY = "stream-write-key"


def stream(name: str) -> list[data.Pair]:
    """A source's training pairs in one seeded order: the stream's arrival order."""
    path = SHARED / ("quora/splits/train.tsv.gz" if name == "quora" else "mrpc/train.tsv")
    pairs = data.load_pairs(str(path))
    random.Random(0).shuffle(pairs)
    return pairs


class Server:
    """`serve.py --home` in a process of its own on a free loopback port."""

    def __init__(self, home: Path):
        import socket
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.url = f"http://127.0.0.1:{s.getsockname()[1]}"
        self.process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(home), "--port",
                                         self.url.rsplit(":", 1)[1], "--device", "cpu"],
                                        env=os.environ | {"EMBED_FT_WRITE_KEY": KEY})
        deadline = time.time() + 300
        while True:
            assert time.time() < deadline and self.process.poll() is None, "the server did not start"
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    return
            except httpx.HTTPError:
                time.sleep(0.5)

    def post(self, pairs: list[data.Pair], source: str) -> dict:
        totals: dict = {}
        for start in range(0, len(pairs), 100):
            body = {"pairs": [{"text1": a, "text2": b, "label": y, "source": source} for a, b, y in pairs[start:start + 100]]}
            reply = httpx.post(self.url + "/v1/pairs", json=body, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)
            reply.raise_for_status()
            for k in ("accepted", "duplicates", "conflicts", "touching_held_out"):
                totals[k] = totals.get(k, 0) + reply.json()[k]
        return totals

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(timeout=30)


def checks(home: Path, before: dict[str, str]) -> dict:
    """What must hold after every round: held-out files, no held-out text in any training pairs,
    no text that changed split."""
    ledger = home_state.ledger(home)
    held = {t for t, s in ledger.split_of.items() if s != "train"}
    trained = {data.normalise(t) for f in (home / "work").glob("round-*/pairs.tsv.gz")
               for a, b, _ in data.load_pairs(str(f)) for t in (a, b)}
    return {"held_out_files": all((home / "heldout" / f"{s}.tsv.gz").is_file() for s in heldout.HELD_OUT),
            "held_out_texts_in_training": len(held & trained),
            "texts_that_changed_split": sum(1 for t, s in before.items() if ledger.split_of.get(t) != s),
            "texts": len(ledger.split_of)}


def served_model(home: Path, base: str) -> tuple[Embedder, float | None]:
    """The home's current model and the threshold it is served at."""
    pointer = home_state.current_version(home)
    if pointer["path"] is None:
        return load_model(base, None), home_state.base_threshold(home)
    model = Embedder.load(home / pointer["path"])
    return model, model.decision["threshold"]


def error_of(model, pairs: list[data.Pair], threshold: float) -> tuple[dict, object]:
    right = evaluate.correct(model, pairs, threshold)
    wrong = int((~right).sum())
    return {"error": wrong / len(pairs), "interval": paired.wilson_interval(wrong, len(pairs)), "n": len(pairs)}, right


def reference(home: Path, work: Path, round_number: int, settings: str, unseen: list[data.Pair]) -> dict:
    """A model trained once on everything that had arrived (less what touches the audit or validation
    texts), judged on the home's audit pairs and on the unseen pairs, at its threshold tuned on the
    home's validation."""
    out = work / f"reference-{round_number:02d}"
    metrics = out / "metrics.json"
    if not metrics.is_file():
        ledger = home_state.ledger(home)
        banned = {t for t, s in ledger.split_of.items() if s in ("audit", "validation")}
        arrived = [(r["text1"], r["text2"], r["label"]) for r in home_state.database(home).pairs()]  # each once
        usable = [p for p in arrived if data.normalise(p[0]) not in banned and data.normalise(p[1]) not in banned]
        config = options.Config(**options.parse_overrides(settings) | {
            "model": flywheel.settings(home, {})["base"], "dense_out_features": 0,
            "data": str(data.write_pairs(usable, work / f"reference-{round_number:02d}-pairs.tsv.gz")),
            "val": str(home / "heldout" / "validation.tsv.gz"), "test": str(home / "heldout" / "audit.tsv.gz"),
            "zero_shot": False, "out": str(out), "overwrite": True})
        started = time.perf_counter()
        train.train(config)
        jsonl.write_json(out / "seconds.json", {"seconds": time.perf_counter() - started, "trained_on": len(usable)})
    model = Embedder.load(out)
    audit, _ = error_of(model, data.load_pairs(str(home / "heldout" / "audit.tsv.gz")), model.decision["threshold"])
    unseen_error, _ = error_of(model, unseen, model.decision["threshold"])
    return {"audit": audit, "unseen_quora": unseen_error, **jsonl.read_json(out / "seconds.json")}


BASE_SCORES: dict = {}


def base_right(base: str, home: Path, unseen: list[data.Pair]):
    """The base model on the unseen pairs at the home's base threshold (its cosines computed once)."""
    if "scores" not in BASE_SCORES:
        BASE_SCORES["scores"] = evaluate.cosine_scores(load_model(base, None), unseen)
    return (BASE_SCORES["scores"] > home_state.base_threshold(home)) == (evaluate.labels_of(unseen) == 1)


def run_home(home: Path, work: Path, plan: list[tuple[str, list[data.Pair]]], first_round: int, args, results: Path,
             unseen: list[data.Pair], label: str, after_round=None) -> None:
    done = {(r["stream"], r["round"]) for r in jsonl.read(results)}
    rounds = len(jsonl.read(home / "history.jsonl"))
    if any(stream == label and number > rounds for stream, number in done):
        raise SystemExit(f"{results} has rows of '{label}' rounds that {home} never ran (its work folder was removed?): "
                         "move the file aside or pick another --name")
    server = None
    try:
        for number, (source, pairs) in enumerate(plan, first_round):
            if (label, number) in done:
                after_round and after_round(number)
                continue
            if len(jsonl.read(home / "history.jsonl")) < number:
                server = server or Server(home)
                posted = server.post(pairs, source)
                before = dict(home_state.ledger(home).split_of)
                row = flywheel.run_round(home, flywheel.settings(home, {}))
            else:  # the round ran before an interruption; its checks start from its own state
                row, posted, before = jsonl.read(home / "history.jsonl")[number - 1], None, {}
            model, threshold = served_model(home, args.base)
            unseen_error, unseen_right = error_of(model, unseen, threshold)
            out = {"stream": label, "round": number, "source": source, "posted": posted, "checks": checks(home, before),
                   "history": {k: row.get(k) for k in ("decision", "current_after", "trained_on", "splits", "unusable_new",
                                                      "test_pairs", "current_error", "candidate_error", "p_value",
                                                      "alpha_round", "screen", "audit", "seen", "audit_agrees", "note",
                                                      "by_source", "seconds", "train_seconds")},
                   "unseen_quora": unseen_error}
            if home_state.base_threshold(home) is not None:
                out["unseen_quora_vs_base"] = paired.compare_pairs(unseen_right, base_right(args.base, home, unseen))
            if args.references and source == "quora":
                out["reference"] = reference(home, work, number, args.set, unseen)
            jsonl.append(results, out)
            print(table_line(out), flush=True)
            if after_round:
                after_round(number)
    finally:
        if server:
            server.close()


def table_line(r: dict) -> str:
    h, a = r["history"], r["history"].get("audit") or {}
    ref = r.get("reference", {}).get("audit")
    return (f"| {r['stream']} | {r['round']} | {r['source']} | {h['trained_on'] or 0:,} | {h['splits']['test']:,} | "
            f"{h['splits']['audit']:,} | {h['unusable_new']:,} | {decision(h)} | "
            + (f"{a['error']:.2%} [{a['interval'][0]:.1%}, {a['interval'][1]:.1%}]" if a else "-") + " | "
            + (f"{ref['error']:.2%} [{ref['interval'][0]:.1%}, {ref['interval'][1]:.1%}]" if ref else "-") + " | "
            f"{r['unseen_quora']['error']:.2%} | "
            + (f"{r['reference']['unseen_quora']['error']:.2%}" if "unseen_quora" in r.get("reference", {}) else "-")
            + f" | {by_source(h)} | {h['seconds'] or 0:.0f} |")


def decision(h: dict) -> str:
    """The round's decision, its p and level; a candidate that validation did not favour was not tested."""
    if h.get("p_value") is None and h.get("decision") == "refused":
        return "refused (not tested: validation favours the current model)"
    return f"{h['decision']} (p={h.get('p_value') or float('nan'):.2g}, level {h.get('alpha_round') or float('nan'):.2g})"


def by_source(h: dict) -> str:
    """The current model's audit error on each source's audit pairs, as the history names them."""
    parts = [f"{source} {100 * e['audit_current_after_error']:.1f}% ({e['audit_pairs']})"
             for source, e in sorted((h.get("by_source") or {}).items()) if "audit_current_after_error" in e]
    return ", ".join(parts) or "-"


HEADER = ("| stream | round | arriving | trained on | test pairs | audit pairs | unusable (new) | decision | "
          "audit error, current model | audit error, trained once on all | unseen Quora test error | unseen, trained once on all | "
          "audit by source | seconds |\n"
          "| --- | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: | ---: | --- | ---: |")


def figure(rows: list[dict], path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for label, colour in (("quora", "C0"), ("shift", "C3")):
        mine = [r for r in rows if r["stream"] == label and r["history"].get("audit")]
        if not mine:
            continue
        rounds = [r["round"] for r in mine]
        errors_ = [100 * r["history"]["audit"]["error"] for r in mine]
        spans = [[100 * (r["history"]["audit"]["error"] - r["history"]["audit"]["interval"][0]) for r in mine],
                 [100 * (r["history"]["audit"]["interval"][1] - r["history"]["audit"]["error"]) for r in mine]]
        axes[0].errorbar(rounds, errors_, yerr=spans, fmt="s-", color=colour, capsize=3, label=f"{label}: current model, audit")
        for r in mine:
            axes[0].annotate(r["history"]["decision"], (r["round"], 100 * r["history"]["audit"]["error"]),
                             textcoords="offset points", xytext=(4, 6), fontsize=7, color=colour)
        refs = [r for r in mine if "reference" in r]
        if refs:
            axes[0].errorbar([r["round"] + 0.15 for r in refs], [100 * r["reference"]["audit"]["error"] for r in refs],
                             yerr=[[100 * (r["reference"]["audit"]["error"] - r["reference"]["audit"]["interval"][0]) for r in refs],
                                   [100 * (r["reference"]["audit"]["interval"][1] - r["reference"]["audit"]["error"]) for r in refs]],
                             fmt="o--", color="C2", capsize=3, label="trained once on all arrived, same audit")
        if label == "shift":
            for source, marker in (("quora", "^"), ("mrpc", "v")):
                points = [(r["round"], 100 * r["history"]["by_source"][source]["audit_current_after_error"]) for r in mine
                          if source in (r["history"].get("by_source") or {}) and
                          "audit_current_after_error" in r["history"]["by_source"][source]]
                if points:
                    axes[1].plot(*zip(*points), marker + "-", label=f"shift stream: {source} audit pairs")
    for label, colour in (("quora", "C0"), ("shift", "C3")):
        mine = [r for r in rows if r["stream"] == label]
        if mine:
            axes[1].plot([r["round"] for r in mine], [100 * r["unseen_quora"]["error"] for r in mine], "s:", color=colour,
                         label=f"{label} stream: unseen Quora test split")
    for ax, title in zip(axes, ("audit error by round (95% intervals)", "by domain")):
        ax.set_xlabel("round")
        ax.set_ylabel("error rate (%)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"figure: {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", help="the base model folder (all-MiniLM-L6-v2 from ../shared/fetch-models)")
    parser.add_argument("--name", default="main")
    parser.add_argument("--per-round", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--shift-after", type=int, default=4, help="the shift home turns to MRPC after this many rounds (0: none)")
    parser.add_argument("--references", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--mode", default="scratch", choices=["scratch", "continue"], help="the home's round mode")
    parser.add_argument("--references-from", help="an earlier run's work folder whose reference models to reuse (the same "
                        "pairs give the same splits, so the same references)")
    parser.add_argument("--set", default="device=cpu", help="every round's (and reference's) training options")
    parser.add_argument("--work", default="runs/flywheel_stream")
    parser.add_argument("--table", action="store_true", help="only reprint the table and redraw the figure")
    args = parser.parse_args()
    results = ROOT / "results" / f"flywheel_stream-{args.name}.jsonl"
    if not args.table:
        work = Path(args.work) / args.name
        home = work / "home-quora"
        if not (home / "flywheel.json").is_file():
            flywheel.main(["--home", str(home), "--base", args.base, "--set", args.set, "--mode", args.mode, "--init"])
        for earlier in sorted(Path(args.references_from).glob("reference-*")) if args.references_from else []:
            if not (work / earlier.name).exists():
                (shutil.copytree if earlier.is_dir() else shutil.copy)(earlier, work / earlier.name)
        quora, unseen = stream("quora"), data.load_pairs(str(SHARED / "quora/splits/test.tsv.gz"))
        plan = [("quora", quora[i * args.per_round:(i + 1) * args.per_round]) for i in range(args.rounds)]
        snapshot, shifted = work / "home-quora-at-shift", work / "home-shift"

        def keep_snapshot(number: int) -> None:  # the shift home starts as the Quora home after --shift-after rounds
            if number == args.shift_after and not snapshot.exists():
                shutil.copytree(home, snapshot, ignore=shutil.ignore_patterns("round.lock"))

        run_home(home, work, plan, 1, args, results, unseen, "quora", keep_snapshot)
        if args.shift_after:
            if not shifted.exists():
                shutil.copytree(snapshot, shifted)
            mrpc = stream("mrpc")
            later = [("mrpc", mrpc[i * args.per_round:(i + 1) * args.per_round]) for i in range(args.rounds - args.shift_after)]
            run_home(shifted, work, later, args.shift_after + 1, argparse.Namespace(**vars(args) | {"references": False}),
                     results, unseen, "shift")
    rows = jsonl.read(results)
    print(HEADER)
    for r in rows:
        print(table_line(r))
    figure(rows, results.with_suffix(".png"))


if __name__ == "__main__":
    main()
