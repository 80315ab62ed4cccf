"""Does the promotion rule keep its promise? Homes whose candidates are never better, over 10,000 rounds.

    python benchmarks/gate_simulation.py              # writes results/gate_simulation.json, prints tables

Each simulated home runs 10,000 rounds in which the candidate and the current model are equally good:
on a test set that grows as a home's does (300 new test pairs a round, up to the 5,000 of the cap),
each test pair is one the two models disagree on with probability 6% (about what the real stream's
rounds show, docs/flywheel.md), and each such pair goes to either model with probability 1/2. The
round promotes when McNemar's exact one-sided test falls below the rule's level. Three rules:
- per round: alpha = 0.05 every round (the flywheel before this change);
- spent by rounds: the j-th test at alpha / (j (j + 1)), alpha = 0.05 for the life (tried first);
- spent by rounds and evidence (`gate.level`, the flywheel's): half of that, plus alpha / 2 x the
  round's new test pairs / the cap.
The promise: the share of homes that have ever promoted stays at or under 0.05 at every round.
Then the power: one round in which the candidate is truly better (it wins 60% of the pairs the two
disagree on), at the j-th round of such a home (300 j test pairs, up to the cap).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import gate  # noqa: E402
from heldout import CAPS, FRACTIONS  # noqa: E402

HOMES, ROUNDS, ALPHA, DISAGREE = 2000, 10_000, 0.05, 0.06
CHECKPOINTS = (1, 2, 5, 10, 20, 100, 1000, 10_000)


def tail_table(most: int) -> np.ndarray:
    """tail[n, b] = P(X >= b) for X ~ Binomial(n, 1/2): McNemar's one-sided p for b of n discordant."""
    from scipy.stats import binom
    n, b = np.meshgrid(np.arange(most + 1), np.arange(most + 2), indexing="ij")
    return np.where(b <= n, binom.sf(b - 1, n, 0.5), 0.0)


def test_sizes(rounds: int, per_round: int = 1000) -> np.ndarray:
    """A home's test pairs at each round: FRACTIONS["test"] of the new pairs, up to the cap."""
    return np.minimum(np.arange(1, rounds + 1) * int(per_round * FRACTIONS["test"]), CAPS["test"])


def rule_levels(rounds: int) -> dict[str, np.ndarray]:
    new = np.diff(test_sizes(rounds), prepend=0)
    return {"per round": np.full(rounds, ALPHA),
            "spent by rounds": np.array([gate.level(j, ALPHA) for j in range(1, rounds + 1)]),
            "spent by rounds and evidence": np.array([gate.level(j, ALPHA, n, CAPS["test"]) for j, n in enumerate(new, 1)])}


def null_lives(seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    sizes = test_sizes(ROUNDS)
    tail = tail_table(int(CAPS["test"] * DISAGREE * 2))
    levels = rule_levels(ROUNDS)
    ever = {rule: np.zeros(ROUNDS) for rule in levels}
    promotions = {rule: 0 for rule in levels}
    for start in range(0, HOMES, 100):  # 100 homes at a time: 10^6 rounds in memory
        homes = min(100, HOMES - start)
        discordant = rng.binomial(sizes, DISAGREE, size=(homes, ROUNDS))
        wins = rng.binomial(discordant, 0.5)
        p = tail[discordant, wins]
        for rule, level in levels.items():
            promoted = (p < level) & (2 * wins > discordant)
            promotions[rule] += int(promoted.sum())
            ever[rule] += np.maximum.accumulate(promoted, axis=1).sum(0)
    return {rule: {"share_ever_promoted": {str(t): float(ever[rule][t - 1] / HOMES) for t in CHECKPOINTS},
                   "worst_share_over_all_rounds": float((ever[rule] / HOMES).max()),
                   "promotions_per_round": promotions[rule] / (HOMES * ROUNDS)} for rule in levels}


def power(seed: int = 1, trials: int = 20_000, win_share: float = 0.6) -> dict:
    """P(promote) in the j-th round of a home, where the candidate wins `win_share` of the discordant pairs."""
    rng = np.random.default_rng(seed)
    tail = tail_table(int(CAPS["test"] * DISAGREE * 2))
    sizes, levels, out = test_sizes(100), rule_levels(100), {}
    for j in (1, 2, 3, 5, 8, 16, 20, 100):
        discordant = rng.binomial(sizes[j - 1], DISAGREE, trials)
        wins = rng.binomial(discordant, win_share)
        p = tail[discordant, wins]
        out[str(j)] = {"test_pairs": int(sizes[j - 1])} | {
            rule: float(((p < level[j - 1]) & (2 * wins > discordant)).mean()) for rule, level in levels.items()}
    return out


def main() -> None:
    result = {"homes": HOMES, "rounds": ROUNDS, "alpha": ALPHA, "disagree": DISAGREE, "null": null_lives(), "power": power()}
    path = ROOT / "results" / "gate_simulation.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{HOMES:,} homes x {ROUNDS:,} rounds, candidate never better: share of homes that have promoted at least once")
    print("| rule | " + " | ".join(f"round {t:,}" for t in CHECKPOINTS) + " | worst over all rounds | promotions a round |")
    print("| --- |" + " ---: |" * (len(CHECKPOINTS) + 2))
    for rule, r in result["null"].items():
        print(f"| {rule} | " + " | ".join(f"{r['share_ever_promoted'][str(t)]:.4f}" for t in CHECKPOINTS)
              + f" | {r['worst_share_over_all_rounds']:.4f} | {r['promotions_per_round']:.2e} |")
    print("\npower: the j-th round, where the candidate wins 60% of the pairs the two disagree on")
    rules = list(result["null"])
    print("| round | test pairs | " + " | ".join(rules) + " |")
    print("| ---: | ---: |" + " ---: |" * len(rules))
    for j, row in result["power"].items():
        print(f"| {j} | {row['test_pairs']:,} | " + " | ".join(f"{row[rule]:.2f}" for rule in rules) + " |")
    print(f"written to {path}")


if __name__ == "__main__":
    main()
