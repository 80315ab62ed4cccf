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

    python benchmarks/gate_simulation.py --clustered   # results/gate_simulation_clustered.json

Real traffic is not independent pairs: a home's test set is made of groups of pairs that share texts.
With --clustered each home's test set grows by whole groups whose sizes are drawn from the real group
sizes of the shared Quora training split (paired.groups_of): 300 new groups a round up to the cap of
5,000 groups (state/heldout.py counts its caps, and gate.level its evidence, in groups), and in each round a group's pairs disagree with probability 6% each and all its disagreements
go the same way, to either model with probability 1/2 (they share the group's difficulty: the case
the independent test cannot see). The flywheel's rule (spent by rounds and evidence) is applied with
McNemar's test, which treats the pairs as independent, and with the sign-flip test over groups
(paired.compare_pairs with groups), over 10,000 null rounds; then the power of both when each group's
disagreements go to the candidate with probability 0.6.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import data  # noqa: E402
import gate  # noqa: E402
import paired  # noqa: E402
from state.heldout import CAPS, FRACTIONS  # noqa: E402

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


def real_group_sizes() -> np.ndarray:
    """The sizes of the groups of pairs that share texts in the shared Quora training split."""
    pairs = data.load_pairs(str(ROOT.parent / "shared" / "data" / "quora" / "splits" / "train.tsv.gz"))
    return np.bincount(paired.groups_of(pairs))


def home_groups(pool: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A home's test groups up to the cap, in the order they arrive, their sizes drawn from the pool."""
    return rng.choice(pool, CAPS["test"])


def clustered_round(sizes: np.ndarray, rng: np.random.Generator, win_share: float = 0.5) -> tuple[float, float, bool]:
    """One round's p-values, independent (McNemar) and by groups (sign flip), and whether the candidate leads."""
    discordant = rng.binomial(sizes, DISAGREE)
    towards_candidate = rng.random(len(sizes)) < win_share
    d = np.where(towards_candidate, discordant, -discordant)
    wins, losses = int(d[d > 0].sum()), int(-d[d < 0].sum())
    if wins <= losses:  # the candidate does not lead: neither test can promote (every level is under 1/2)
        return 1.0, 1.0, False
    return paired.sign_test(wins, losses), paired.sign_flip_test(d), True


def clustered_lives(pool: np.ndarray, homes: int, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    levels = rule_levels(ROUNDS)["spent by rounds and evidence"]
    sizes_by_round = test_sizes(ROUNDS)
    ever = {"McNemar (pairs as independent)": np.zeros(ROUNDS), "sign flip over groups": np.zeros(ROUNDS)}
    for _ in range(homes):
        groups = home_groups(pool, rng)
        promoted = {name: False for name in ever}
        for r in range(ROUNDS):
            sizes = groups[:int(sizes_by_round[r])]  # the round's test groups: the cap's count from its 17th round
            p_pairs, p_groups, leads = clustered_round(sizes, rng)
            promoted["McNemar (pairs as independent)"] |= leads and p_pairs < levels[r]
            promoted["sign flip over groups"] |= leads and p_groups < levels[r]
            for name in ever:
                ever[name][r] += promoted[name]
    return {name: {"share_ever_promoted": {str(t): float(ever[name][t - 1] / homes) for t in CHECKPOINTS},
                   "worst_share_over_all_rounds": float((ever[name] / homes).max())} for name in ever}


def clustered_power(pool: np.ndarray, trials: int = 2000, win_share: float = 0.6, seed: int = 1) -> dict:
    rng = np.random.default_rng(seed)
    levels, sizes_by_round, out = rule_levels(100)["spent by rounds and evidence"], test_sizes(100), {}
    for j in (1, 2, 3, 5, 8, 16, 20, 100):
        hits = np.zeros(2)
        for _ in range(trials):
            p_pairs, p_groups, leads = clustered_round(home_groups(pool, rng)[:int(sizes_by_round[j - 1])], rng, win_share)
            hits += [leads and p_pairs < levels[j - 1], leads and p_groups < levels[j - 1]]
        out[str(j)] = {"test_groups": int(sizes_by_round[j - 1]), "McNemar (pairs as independent)": hits[0] / trials,
                       "sign flip over groups": hits[1] / trials}
    return out


def clustered_main(homes: int) -> None:
    pool = real_group_sizes()
    result = {"homes": homes, "rounds": ROUNDS, "alpha": ALPHA, "disagree": DISAGREE,
              "group_sizes": {"groups": int(len(pool)), "mean": float(pool.mean()), "largest": int(pool.max())},
              "null": clustered_lives(pool, homes), "power": clustered_power(pool)}
    path = ROOT / "results" / "gate_simulation_clustered.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{homes:,} homes x {ROUNDS:,} rounds, test sets of real groups, candidate never better: share ever promoted")
    print("| test | " + " | ".join(f"round {t:,}" for t in CHECKPOINTS) + " | worst over all rounds |")
    print("| --- |" + " ---: |" * (len(CHECKPOINTS) + 1))
    for name, r in result["null"].items():
        print(f"| {name} | " + " | ".join(f"{r['share_ever_promoted'][str(t)]:.4f}" for t in CHECKPOINTS)
              + f" | {r['worst_share_over_all_rounds']:.4f} |")
    print("\npower: the j-th round, each group's disagreements going to the candidate with probability 0.6")
    print("| round | test groups | McNemar (pairs as independent) | sign flip over groups |\n| ---: | ---: | ---: | ---: |")
    for j, row in result["power"].items():
        print(f"| {j} | {row['test_groups']:,} | {row['McNemar (pairs as independent)']:.2f} | {row['sign flip over groups']:.2f} |")
    print(f"written to {path}")


def main() -> None:
    if "--clustered" in sys.argv:
        homes = int(sys.argv[sys.argv.index("--homes") + 1]) if "--homes" in sys.argv else 1000
        return clustered_main(homes)
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
