"""Does the promotion rule keep its promise, and its power as a home ages? Homes of real group sizes.

    python benchmarks/gate_simulation.py --homes 300      # results/gate_simulation_clustered.json, prints tables
    python benchmarks/gate_simulation.py --levers         # power with each lever moved alone: results/gate_levers.jsonl

Each simulated home grows its held-out sets as a home does (`state/heldout.py`'s defaults, a home
whose traffic is 1,000 pairs a round): 300 new test groups a round up to the cap of 5,000 groups, then
100 a round (the test set's share past its cap), and 100 validation groups a round up to 1,000. Each
group's size is drawn from the groups of pairs that share texts in the shared Quora training split
(paired.groups_of: 176,499 groups, mean 2.06 pairs, largest 17,614). In each round a group's pairs
disagree (one model right, the other wrong) with probability 6% each, about what the real stream's
rounds show, and all of a group's disagreements go the same way (they share the group's difficulty):
to the candidate with probability 1/2 when it is no better, 0.6 when it is better. Rounds are drawn
independently, which is the hardest case for a life-long promise (the union bound is then nearly
tight); real rounds reuse their test pairs and are positively dependent.

Two rules, each over `--homes` homes of 10,000 rounds in which the candidate is never better (the
promise: the share of homes that have ever promoted stays at or under alpha = 0.05 at every round),
then the power: P(promote) at the j-th round of a home whose earlier rounds were null, and P(promoted
at round j or j + 1) when the gain lasts two rounds.
- before: each round tested at its own allotment, alpha/2 / (j (j + 1)) + alpha/2 x new test
  groups / cap, with the sign-flip test on the sum of the groups' differences, and a test set that
  stops at its cap (exact, per round; its 10,000 null rounds cost 2 ms each, so `--before-rounds`
  simulates the first 1,000 and bounds the rest by their levels' sum, a union bound);
- now (`gate.py`): a tenth of alpha allotted by rounds, nine tenths by test groups up to the cap;
  the test run only when the validation split favours the candidate (more of its groups vote for
  it); a test spends what is allotted and unspent, a promotion spends nothing; the sign test over
  groups, one vote a group; a test set that keeps growing past its cap. The simulated models are
  only right or wrong, so a group votes by its discordant pairs: the gate's votes by summed log-loss
  with the least information a model can give (real models are surer of some decisions than of
  others, and every group votes: docs/flywheel.md measures that on real traffic). The number of groups that vote
  (those with a disagreement) is drawn from its normal approximation (a sum of thousands of
  independent Bernoulli draws, one a group); given that number the test is exact, so the share of
  null homes that promote does not depend on the approximation.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from scipy.stats import binom

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import data, gate, jsonl, paired# noqa: E402
from embed_ft.state.heldout import AFTER_CAPS, CAPS, FRACTIONS# noqa: E402

ROUNDS, ALPHA, DISAGREE, WIN = 10_000, 0.05, 0.06, 0.6
PER_ROUND = 1000  # pairs a round; the sim counts a new held-out pair as a new group, as the caps count groups
CHECKPOINTS = (1, 2, 5, 10, 20, 100, 1000, 10_000)
POWER_ROUNDS = (1, 3, 8, 16, 100, 1000)


def real_group_sizes() -> np.ndarray:
    """The sizes of the groups of pairs that share texts in the shared Quora training split."""
    pairs = data.load_pairs(str(ROOT.parent / "shared" / "data" / "quora" / "splits" / "train.tsv.gz"))
    return np.bincount(paired.groups_of(pairs))


def held_out_groups(rounds: int, split: str, knee: bool = True) -> np.ndarray:
    """A home's groups in a held-out split at each round: its fraction of the new pairs up to its cap,
    then (with `knee`) its share past the cap."""
    j = np.arange(1, rounds + 1)
    per, cap = int(PER_ROUND * FRACTIONS[split]), CAPS[split]
    filled = -(-cap // per)  # the round that fills the cap
    after = int(PER_ROUND * AFTER_CAPS[split]) if knee else 0
    return np.minimum(j * per, cap) + np.maximum(0, j - filled) * after


# ------------------------------------------------------------------------------------- the rule now

def voting_groups(rng: np.random.Generator, pool: np.ndarray, homes: int, sizes: np.ndarray) -> np.ndarray:
    """Each home's number of groups with at least one disagreement at each round (homes x rounds):
    the home's groups drawn once from the pool, their disagreements drawn anew each round."""
    chance = 1 - (1 - DISAGREE) ** pool.astype(float)
    out = np.empty((homes, len(sizes)), np.int64)
    for h in range(homes):
        p = chance[rng.integers(0, len(pool), sizes[-1])]
        mean, var = np.cumsum(p)[sizes - 1], np.cumsum(p * (1 - p))[sizes - 1]
        out[h] = np.maximum(0, np.rint(rng.normal(mean, np.sqrt(var))))
    return out


def lives_now(rng: np.random.Generator, pool: np.ndarray, homes: int, rounds: int, better: tuple[int, ...] = (),
              screen: float | None = None, allot_cap: int | None = None,
              evidence_from: float = gate.EVIDENCE_FROM) -> np.ndarray:
    """Which rounds of each home promote under gate.py's rule (homes x rounds); the candidate is better
    at the rounds in `better` (1-based), no better at the others. The levers (`--levers`), each moved
    alone: `screen`, test only where validation's sign test gives p under it (not merely more votes
    for); `allot_cap`, the evidence allotted whole by that many test groups (not the test set's cap);
    `evidence_from`, the share of that cap before the evidence share starts."""
    tests, vals = held_out_groups(rounds, "test"), held_out_groups(rounds, "validation")
    n_test, n_val = voting_groups(rng, pool, homes, tests), voting_groups(rng, pool, homes, vals)
    share = np.full(rounds, 0.5)
    share[[r - 1 for r in better]] = WIN
    for_test, for_val = rng.binomial(n_test, share), rng.binomial(n_val, share)
    p = np.where(n_test > 0, binom.sf(for_test - 1, n_test, 0.5), 1.0)  # the sign test over the votes
    p_val = np.where(n_val > 0, binom.sf(for_val - 1, n_val, 0.5), 1.0)
    allotted = np.array([gate.allotted(j, ALPHA, n, allot_cap or CAPS["test"], evidence_from) for j, n in enumerate(tests, 1)])
    spent, promoted = np.zeros(homes), np.zeros((homes, rounds), bool)
    for r in range(rounds):
        tested = (2 * for_val[:, r] > n_val[:, r]) if screen is None else p_val[:, r] < screen  # validation favours it
        level = np.maximum(0.0, allotted[r] - spent)
        promoted[:, r] = tested & (p[:, r] < level) & (2 * for_test[:, r] > n_test[:, r])
        spent += np.where(tested & ~promoted[:, r], level, 0.0)      # a promotion passes its level on
    return promoted


# ------------------------------------------------------------------------------------ the rule before

def round_before(groups: np.ndarray, rng: np.random.Generator, win_share: float) -> tuple[float, bool]:
    """One round's sign-flip p over the groups' summed differences, and whether the candidate leads."""
    discordant = rng.binomial(groups, DISAGREE)
    d = np.where(rng.random(len(groups)) < win_share, discordant, -discordant)
    if d.sum() <= 0:  # the candidate does not lead: no level under 1/2 promotes it
        return 1.0, False
    return paired.sign_flip_test(d), True


def levels_before(rounds: int) -> np.ndarray:
    """The rule before: each round at alpha/2 / (j (j + 1)) + alpha/2 x its new test groups / the cap."""
    new = np.diff(held_out_groups(rounds, "test", knee=False), prepend=0)
    j = np.arange(1, rounds + 1)
    return ALPHA / 2 / (j * (j + 1)) + ALPHA / 2 * new / CAPS["test"]


def lives_before(rng: np.random.Generator, pool: np.ndarray, homes: int, rounds: int, better: tuple[int, ...] = ()) -> np.ndarray:
    """As lives_now, for the rule before. Its rounds do not depend on each other's outcomes, so the
    rounds before the first of `better` are not drawn (they stay False)."""
    sizes, levels = held_out_groups(rounds, "test", knee=False), levels_before(rounds)
    promoted = np.zeros((homes, rounds), bool)
    for h in range(homes):
        groups = rng.choice(pool, sizes[-1])
        for r in range(min(better, default=1) - 1, rounds):
            p, leads = round_before(groups[:sizes[r]], rng, WIN if r + 1 in better else 0.5)
            promoted[h, r] = leads and p < levels[r]
    return promoted


# ----------------------------------------------------------------------------------------- the runs

def share_ever(promoted: np.ndarray) -> np.ndarray:
    return np.maximum.accumulate(promoted, axis=1).mean(0)


def power(lives, rng: np.random.Generator, pool: np.ndarray, trials: int, **lever) -> dict:
    """P(promote at round j) and P(promoted at j or j + 1), the candidate better from round j on."""
    out = {}
    for j in POWER_ROUNDS:
        promoted = lives(rng, pool, trials, j + 1, better=(j, j + 1), **lever)
        out[str(j)] = {"round": float(promoted[:, j - 1].mean()), "within_two": float(promoted[:, j - 1:].any(1).mean())}
    return out


LEVERS = {  # the rule now with one lever moved; what each costs the promise is nothing (levels stay within alpha)
    "now (evidence allotted from 600 test groups on)": {},
    "evidence allotted from the first test group (as before)": {"evidence_from": 0.0},
    "screen: validation p < 0.3": {"screen": 0.3},
    "screen: validation p < 0.2": {"screen": 0.2},
    "evidence allotted whole by 4,000 test groups": {"allot_cap": 4000},
    "evidence allotted whole by 3,000 test groups": {"allot_cap": 3000},
}


def levers(pool: np.ndarray, trials: int) -> None:
    """Power at each checkpoint round with each lever moved alone, the same seed for each."""
    print(f"power for a {WIN:.0%}/{1 - WIN:.0%} gain at the j-th round (promoted that round / by the next), {trials:,} homes")
    print("| rule | " + " | ".join(f"round {j:,}" for j in POWER_ROUNDS) + " |\n| --- |" + " ---: |" * len(POWER_ROUNDS))
    for name, lever in LEVERS.items():
        figures = power(lives_now, np.random.default_rng(0), pool, trials, **lever)
        jsonl.append(ROOT / "results" / "gate_levers.jsonl", {"rule": name, "trials": trials, "power": figures})
        print(f"| {name} | " + " | ".join(f"{f['round']:.2f} / {f['within_two']:.2f}" for f in figures.values()) + " |",
              flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--homes", type=int, default=300)
    parser.add_argument("--trials", type=int, default=2000, help="homes a power figure is measured over")
    parser.add_argument("--before-rounds", type=int, default=1000, help="null rounds simulated for the rule before")
    parser.add_argument("--before-trials", type=int, default=1000)
    parser.add_argument("--levers", action="store_true", help="only the power, with each lever moved alone")
    args = parser.parse_args()
    if args.levers:
        return levers(real_group_sizes(), args.trials)
    pool, rng, started = real_group_sizes(), np.random.default_rng(0), time.time()
    now = share_ever(np.concatenate([lives_now(rng, pool, min(100, args.homes - h), ROUNDS)
                                     for h in range(0, args.homes, 100)]))
    result = {"homes": args.homes, "rounds": ROUNDS, "alpha": ALPHA, "disagree": DISAGREE, "win_share": WIN,
              "group_sizes": {"groups": int(len(pool)), "mean": float(pool.mean()), "largest": int(pool.max())},
              "null": {"now": {str(t): float(now[t - 1]) for t in CHECKPOINTS}},
              "power": {"now": power(lives_now, rng, pool, args.trials)}}
    print(f"now: {time.time() - started:.0f} s", flush=True)
    before = share_ever(lives_before(rng, pool, args.homes, args.before_rounds))
    rest = float(levels_before(ROUNDS)[args.before_rounds:].sum())  # what the rounds not simulated may add at most
    result["null"]["before"] = {str(t): float(before[t - 1]) if t <= args.before_rounds else f"<= {before[-1] + rest:.5f}"
                                for t in CHECKPOINTS}
    result["power"]["before"] = power(lives_before, rng, pool, args.before_trials)
    result["seconds"] = time.time() - started
    path = ROOT / "results" / "gate_simulation_clustered.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"{args.homes:,} homes x {ROUNDS:,} rounds of real group sizes, candidate never better: share ever promoted")
    print("| rule | " + " | ".join(f"round {t:,}" for t in CHECKPOINTS) + " |\n| --- |" + " ---: |" * len(CHECKPOINTS))
    for rule, shares in result["null"].items():
        print(f"| {rule} | " + " | ".join(v if isinstance(v, str) else f"{v:.3f}" for v in shares.values()) + " |")
    print(f"\npower for a {WIN:.0%}/{1 - WIN:.0%} gain at the j-th round (promoted that round / by the next)")
    print("| round | test groups | before | now |\n| ---: | ---: | ---: | ---: |")
    tests = held_out_groups(max(POWER_ROUNDS), "test")
    for j in map(str, POWER_ROUNDS):
        b, n = result["power"]["before"][j], result["power"]["now"][j]
        print(f"| {j} | {tests[int(j) - 1]:,} | {b['round']:.2f} / {b['within_two']:.2f} | {n['round']:.2f} / {n['within_two']:.2f} |")
    print(f"written to {path} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
