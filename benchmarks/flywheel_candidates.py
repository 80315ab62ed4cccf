"""What a home's own held-out pairs can see: every candidate of a finished stream against the model it
was judged against, on that round's validation and test pairs and on pairs the home never saw.

    python benchmarks/flywheel_candidates.py --home runs/flywheel_stream/NAME/home-quora --base DIR
    python benchmarks/flywheel_candidates.py --table

The gate can promote only what the round's test pairs show. When a candidate is better on the unseen
split (thousands of pairs, the truth as near as this project can measure it) while the round's own
test pairs show no fewer errors, no test of errors on them promotes it: the limit is the data.
For each round: the errors of both models, the pairs only one decided right (and the sign test over
groups on them, `paired.compare_pairs`), the gate's votes on each pair's cost (`flywheel.decision_costs`,
`paired.compare_losses`), and from the unseen split the test pairs a home would need to see the
unseen gain four times in five at a level of 0.01 (the normal approximation of that sign test).
And one cost tried after seeing a stream, never adopted (it would need choosing on other traffic):
how far each decision lies on the wrong side of a margin of half a logit, `how_wrong`, tested by
random sign flips over groups on its sums and by the groups' votes.
Rows go to --out (results/flywheel_candidates.jsonl) as they are made.
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import data, evaluate, flywheel, jsonl, paired  # noqa: E402
from embed_ft.model import Embedder, load_model  # noqa: E402
from embed_ft.state import home_state  # noqa: E402

UNSEEN = ROOT.parent / "shared" / "data" / "quora" / "splits" / "test.tsv.gz"
Z_LEVEL, Z_POWER = 2.326, 0.842  # one-sided 0.01; power 0.8
MARGIN = 0.5  # logits: how_wrong's hinge
FLIPS = 20_000


def round_test_pairs(home: Path, through: int) -> list[data.Pair]:
    """The test pairs a round judged on: those that had arrived by its last pair read, both texts in test."""
    ledger = home_state.ledger(home)
    in_test = lambda text: ledger.split_of.get(data.normalise(text)) == "test"
    return [(r["text1"], r["text2"], r["label"]) for r in home_state.database(home).pairs()
            if r["seq"] <= through and in_test(r["text1"]) and in_test(r["text2"])]


def test_pairs_needed(candidate_right: np.ndarray, current_right: np.ndarray) -> int | None:
    """Pairs at which the discordant sign test reaches one-sided 0.01 with power 0.8, for the gain and
    the share of discordant pairs measured here (None where the candidate is not ahead)."""
    gain = float(np.mean(candidate_right & ~current_right) - np.mean(~candidate_right & current_right))
    discordant = float(np.mean(candidate_right != current_right))
    return math.ceil((Z_LEVEL + Z_POWER) ** 2 * discordant / gain ** 2) if gain > 0 else None


def how_wrong(log_loss: np.ndarray) -> np.ndarray:
    """The hinge max(0, MARGIN - z) of each pair's calibrated margin z (its log-odds on its label),
    from its log-loss log(1 + exp(-z)): 0 for a decision right by more than the margin."""
    with np.errstate(divide="ignore"):
        return np.maximum(0.0, MARGIN + np.log(np.expm1(log_loss)))


def sign_flip_p(a_cost: np.ndarray, b_cost: np.ndarray, groups: np.ndarray, seed: int = 0) -> float:
    """One-sided p that A's summed cost is lower, by FLIPS random signs over the groups' differences
    (Monte Carlo, exact in level with the observed sum counted among the draws)."""
    d = np.bincount(groups, weights=b_cost - a_cost)
    rng, beyond = np.random.default_rng(seed), 0
    for start in range(0, FLIPS, 1000):
        beyond += int(np.sum(rng.choice([-1.0, 1.0], size=(min(1000, FLIPS - start), len(d))) @ d >= d.sum()))
    return (1 + beyond) / (1 + FLIPS)


def judged(models: dict, names: tuple[str, str], thresholds: dict, pairs: list[data.Pair]) -> dict:
    """Both models on the same pairs: errors, the pairs only one got right and its test over groups."""
    right = {name: evaluate.correct(models[name], pairs, thresholds[name]) for name in names}
    verdict = paired.compare_pairs(right[names[0]], right[names[1]], groups=paired.groups_of(pairs))
    return {"n": len(pairs), "errors": [verdict["error_a"], verdict["error_b"]],
            "only_right": [verdict["only_a_right"], verdict["only_b_right"]], "p": verdict["p_value"],
            "needed": test_pairs_needed(right[names[0]], right[names[1]])}


def cost_verdicts(candidate_loss: np.ndarray, current_loss: np.ndarray, groups: np.ndarray) -> dict:
    """On one split: the gate's votes on each pair's log-loss, and how_wrong's votes and sign flips."""
    votes_of = lambda v: [v["groups_for_a"], v["groups_for_b"], v["p_value"]]
    wrong = (how_wrong(candidate_loss), how_wrong(current_loss), groups)
    return {"votes": votes_of(paired.compare_losses(candidate_loss, current_loss, groups)),
            "how_wrong": {"sign_flip_p": sign_flip_p(*wrong), "votes": votes_of(paired.compare_losses(*wrong))}}


def candidate_rows(home: Path, base: str, unseen: list[data.Pair], results: Path) -> None:
    results.unlink(missing_ok=True)
    for line in jsonl.read(home / "history.jsonl"):
        if "candidate" not in line:
            continue
        n, current = line["round"], line["current"]
        val = data.load_pairs(str(home / "work" / f"round-{n:03d}" / "val.tsv.gz"))
        test = round_test_pairs(home, line["pairs_through"])
        assert len(test) == line["test_pairs"], f"round {n}: {len(test)} test pairs rebuilt, {line['test_pairs']} judged"
        candidate = Embedder.load(home / line["candidate"])
        incumbent = load_model(base, None) if current == "base" else Embedder.load(home / current)
        models = {"candidate": evaluate.Remembered(candidate), "current": evaluate.Remembered(incumbent)}
        thresholds = {"candidate": candidate.decision["threshold"],
                      "current": home_state.base_threshold(home) if current == "base" else incumbent.decision["threshold"]}
        costs = {name: flywheel.decision_costs(models[name], thresholds[name], val, test) for name in models}
        by_cost = {part: cost_verdicts(costs["candidate"][i], costs["current"][i], paired.groups_of(pairs))
                   for i, (part, pairs) in enumerate((("validation", val), ("test", test)))}
        names = ("candidate", "current")
        row = {"round": n, "current": current, "decision": line["decision"],
               **{part: judged(models, names, thresholds, pairs) for part, pairs in
                  (("validation", val), ("test", test), ("unseen", unseen))},
               "votes": {part: v["votes"] for part, v in by_cost.items()},
               "how_wrong": {part: v["how_wrong"] for part, v in by_cost.items()}}
        print(row_line(row), flush=True)
        jsonl.append(results, row)


def row_line(r: dict) -> str:
    part = lambda k: (f"{100 * r[k]['errors'][0]:.2f}% / {100 * r[k]['errors'][1]:.2f}% | "
                      f"{r[k]['only_right'][0]} vs {r[k]['only_right'][1]} (p {r[k]['p']:.2g})")
    needed = r["unseen"]["needed"]
    wrong = lambda k: (f"{r['how_wrong'][k]['votes'][0]} vs {r['how_wrong'][k]['votes'][1]}, "
                       f"p {r['how_wrong'][k]['sign_flip_p']:.2g}")
    return (f"| {r['round']} | {r['current'].rsplit('/', 1)[-1]} | {r['decision']} | {part('validation')} | "
            f"{r['votes']['validation'][0]} vs {r['votes']['validation'][1]} | {r['test']['n']:,} | {part('test')} | "
            f"{r['votes']['test'][0]} vs {r['votes']['test'][1]} (p {r['votes']['test'][2]:.2g}) | {part('unseen')} | "
            f"{'-' if needed is None else f'{needed:,}'} | {wrong('validation')} | {wrong('test')} |")


HEADER = ("| round | judged against | decision | validation errors, candidate / current | only one right | votes on "
          "validation | test pairs | test errors | only one right | votes on test | unseen errors | only one right | "
          "test pairs to see the unseen gain | how wrong on validation: votes, sign-flip p | ... on test |\n"
          "| ---: | --- | --- " + "| ---: " * 12 + "|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", type=Path, help="a home whose rounds kept their folders (a flywheel_stream run's)")
    parser.add_argument("--base", help="the home's base model (for rounds judged against it)")
    parser.add_argument("--unseen", default=str(UNSEEN), help="pairs the home never saw")
    parser.add_argument("--out", type=Path, default=ROOT / "results" / "flywheel_candidates.jsonl")
    parser.add_argument("--table", action="store_true", help="reprint the table from --out")
    args = parser.parse_args()
    if args.table:
        print(HEADER)
        for row in jsonl.read(args.out):
            print(row_line(row))
        return
    if args.home is None or args.base is None:
        parser.error("--home and --base are needed (or --table)")
    print(HEADER)
    candidate_rows(args.home, args.base, data.load_pairs(args.unseen), args.out)


if __name__ == "__main__":
    main()
