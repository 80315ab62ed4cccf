"""A home on traffic it has never seen, drawn as real traffic comes: whole groups of pairs that share texts.

    python benchmarks/flywheel_traffic.py --base DIR          # results/flywheel_traffic-NAME.jsonl, prints a table

The shared Quora test split (whose questions are in no other split, so no base model of ours trained
on them) is cut into its groups of pairs that share texts (paired.groups_of), shuffled once; whole
groups are taken in that order until `--pairs` pairs (5,000 by default): the traffic. Its groups
are popular questions with many pairs as well as single pairs, as a home's traffic is (a design
effect of about 4.5 where the streams' training split has about 1). The other groups are the unseen
pairs no round ever sees.

A home from the base model alone (every default) takes the traffic through a real `serve.py` on
loopback (POST /v1/pairs), a round after each of `--rounds-at` (3,000 and 5,000 pairs). After each
round: the decision, its p and level; the served model against the base model as the home serves
it, on the unseen pairs, by groups (the sign-flip test, paired.compare_pairs).
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from embed_ft import data, evaluate, flywheel, jsonl, paired  # noqa: E402
from flywheel_stream import SHARED, Server, served_model  # noqa: E402
from embed_ft.state import home_state# noqa: E402
from embed_ft.model import load_model# noqa: E402


def traffic_and_unseen(pairs: list[data.Pair], size: int, seed: int = 0) -> tuple[list[data.Pair], list[data.Pair]]:
    """Whole groups, in a seeded order, until `size` pairs: the traffic; the other groups: unseen."""
    groups = paired.groups_of(pairs)
    order = list(range(groups.max() + 1))
    random.Random(seed).shuffle(order)
    members: dict[int, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(int(g), []).append(i)
    traffic, unseen = [], []
    for g in order:
        (traffic if len(traffic) < size else unseen).extend(pairs[i] for i in members[g])
    return traffic, unseen


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model folder (all-MiniLM-L6-v2 from ../shared/fetch-models)")
    parser.add_argument("--name", default="main")
    parser.add_argument("--pairs", type=int, default=5000)
    parser.add_argument("--rounds-at", default="3000,5000", help="a round once this many pairs have arrived")
    parser.add_argument("--set", default="device=cpu", help="the rounds' training options")
    parser.add_argument("--work", default="runs/flywheel_traffic")
    args = parser.parse_args()
    traffic, unseen = traffic_and_unseen(data.load_pairs(str(SHARED / "quora/splits/test.tsv.gz")), args.pairs)
    unseen_groups = paired.groups_of(unseen)
    print(f"traffic: {len(traffic):,} pairs in {len(np.unique(paired.groups_of(traffic))):,} groups; unseen: "
          f"{len(unseen):,} pairs in {len(np.unique(unseen_groups)):,} groups", flush=True)
    home, results = Path(args.work) / args.name / "home", ROOT / "results" / f"flywheel_traffic-{args.name}.jsonl"
    if not (home / "flywheel.json").is_file():
        flywheel.main(["--home", str(home), "--base", args.base, "--set", args.set, "--init"])
    base_scores = evaluate.cosine_scores(load_model(args.base, None), unseen)
    server, sent = Server(home), 0
    try:
        for number, until in enumerate(map(int, args.rounds_at.split(",")), 1):
            server.post(traffic[sent:until], "quora-test-groups")
            sent = until
            row = flywheel.run_round(home, flywheel.settings(home, {}))
            model, threshold = served_model(home, args.base)
            served_right = evaluate.correct(model, unseen, threshold)
            base_right = (base_scores > home_state.base_threshold(home)) == (evaluate.labels_of(unseen) == 1)
            versus = paired.compare_pairs(served_right, base_right, groups=unseen_groups)
            out = {"round": number, "pairs_arrived": until, "decision": row["decision"], "p_value": row.get("p_value"),
                   "level": row.get("alpha_round"), "screen": row.get("screen"), "trained_on": row.get("trained_on"),
                   "test_pairs": row.get("test_pairs"), "test_groups": row.get("test_groups"),
                   "candidate_error": row.get("candidate_error"), "current_error": row.get("current_error"),
                   "served": row["current_after"], "unseen": {"pairs": len(unseen), "groups": versus["groups"],
                                                              "served_error": versus["error_a"], "base_error": versus["error_b"],
                                                              "p_better": versus["p_value"], "verdict": versus["verdict"]}}
            jsonl.append(results, out)
            print(paired.describe(versus, f"served ({row['current_after']})", "base"), flush=True)
    finally:
        server.close()
    print("| round | pairs arrived | trained on | test pairs (groups) | candidate / current test error | decision (p, level) "
          "| served | unseen: served / base error | unseen verdict |\n| ---: | ---: | ---: | ---: | ---: | --- | --- | ---: | --- |")
    for r in jsonl.read(results):
        tested = f"p={r['p_value']:.2g}, level {r['level']:.2g}" if r["p_value"] is not None else "not tested"
        print(f"| {r['round']} | {r['pairs_arrived']:,} | {r['trained_on']:,} | {r['test_pairs']:,} ({r['test_groups']:,}) | "
              f"{r['candidate_error']:.2%} / {r['current_error']:.2%} | {r['decision']} ({tested}) | {r['served']} | "
              f"{r['unseen']['served_error']:.2%} / {r['unseen']['base_error']:.2%} | {r['unseen']['verdict']} "
              f"(p = {r['unseen']['p_better']:.2g}) |")


if __name__ == "__main__":
    main()
