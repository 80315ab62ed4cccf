"""Is model A better than model B on the same test set? A paired test, and a verdict in words.

Two models scored on the same pairs differ only where one is right and the other wrong; the pairs
both get right, or both wrong, say nothing about which is better. McNemar's exact test counts those
discordant pairs, b (only A right) and c (only B right): under "no difference" each is A's with
probability 1/2, so b ~ Binomial(b + c, 1/2), and the one-sided p-value is P(X >= b). On retrieval
the same test runs over queries: those whose first duplicate A ranks higher, against those B ranks
higher (a sign test).

    result = compare_pairs(a_right, b_right)     # boolean arrays, one entry per test pair
    result["verdict"]                            # "better", "worse" or "no detectable difference on 400 test pairs"

Each error rate comes with a 95% Wilson interval, which, unlike the normal one, stays inside [0, 1]
and keeps its coverage for small n and rates near 0 (Wilson 1927; Brown, Cai & DasGupta 2001).

Pairs that share texts are not independent: a popular question is paired with many others, and its
pairs share its difficulty. `groups_of` joins pairs that share a text, directly or through others,
into groups (connected components). Given the groups:
- an error's interval is Wilson's at the effective sample size n / deff, where the design effect
  deff (Kish 1965) is the jackknife variance of the error over groups (Quenouille; each group left
  out in turn) over the binomial one, never below 1. The jackknife rather than the linearised
  cluster-robust variance because a few large groups sway a small held-out set: on draws of whole
  groups from the shared test split it covered more (docs/evaluation.md);
- a paired comparison is a sign-flip test over groups: under "no difference" the two models are
  exchangeable within each group, so each group's discordant difference d_g (pairs only A got right
  minus pairs only B got right) is as likely to have either sign, whatever the groups share. The
  one-sided p is P(sum of s_g d_g >= sum of d_g) over independent fair signs s_g, computed exactly
  (the distribution of the signed sum, group size by group size). A permutation test, exact under
  the null for any dependence within groups, and chosen over the clustered McNemar statistic of
  Durkalski et al. (2003), which is a large-sample approximation that small held-out sets do not meet.
When every group has at most one discordant pair the test is McNemar's exact test, and when every
group is one pair the interval is Wilson's: the results then equal those without groups.
"""
from __future__ import annotations

import base64
import math

import numpy as np

from embed_ft import data

ALPHA = 0.05
Z95 = 1.959963984540054


def sign_test(better: int, worse: int) -> float:
    """One-sided exact sign test: P(X >= better) for X ~ Binomial(better + worse, 1/2). On pairs, the
    discordant ones, it is McNemar's exact test; on queries, those whose reciprocal rank differs."""
    n = better + worse
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2 ** n


def groups_of(pairs: list[data.Pair]) -> np.ndarray:
    """Each pair's group (0, 1, ...): pairs that share a text, normalised as data.normalise does,
    directly or through other pairs, are one group."""
    root = data.union_find((data.normalise(a), data.normalise(b)) for a, b, *_ in pairs)
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(root(data.normalise(a)), len(ids)) for a, *_ in pairs], dtype=np.int64)


def design_effect(errors: np.ndarray, groups: np.ndarray | None) -> float:
    """The variance of the error rate, counted by groups (the jackknife over groups: each group
    left out in turn), over its variance as if pairs were independent; at least 1, and 1 without
    groups or when every group is one pair."""
    errors = np.asarray(errors, float)
    n, p = len(errors), float(np.mean(errors)) if len(errors) else 0.0
    if groups is None or n == 0 or p in (0.0, 1.0):
        return 1.0
    wrong, size = np.bincount(groups, weights=errors), np.bincount(groups).astype(float)
    wrong, size = wrong[size > 0], size[size > 0]
    if size.max() == 1:
        return 1.0
    left_out = (wrong.sum() - wrong) / (n - size)  # the error without each group
    variance = (len(size) - 1) / len(size) * float(np.sum((left_out - left_out.mean()) ** 2))
    return max(1.0, variance / (p * (1 - p) / n))


def error_interval(errors: np.ndarray, groups: np.ndarray | None = None, z: float = Z95) -> tuple[float, float]:
    """The 95% interval of an error rate (True where a pair was decided wrong): Wilson's at the
    effective number of pairs, n / design effect."""
    deff, wrong = design_effect(errors, groups), int(np.sum(errors))
    if deff == 1.0:
        return wilson_interval(wrong, len(errors), z)
    return wilson_interval(wrong / deff, len(errors) / deff, z)


def wilson_interval(errors: float, n: float, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an error rate errors / n."""
    if n == 0:
        return 0.0, 1.0
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def sign_flip_test(differences: np.ndarray) -> float:
    """One-sided exact sign-flip test: P(sum of s_g d_g >= sum of d_g) for independent fair signs
    s_g, over the groups' integer differences d_g. With every |d_g| at most 1 it is the sign test."""
    d = np.asarray(differences, dtype=np.int64)
    if np.all(np.abs(d) <= 1):
        return sign_test(int(np.sum(d == 1)), int(np.sum(d == -1)))
    sizes = np.abs(d[d != 0])
    total, observed = int(sizes.sum()), int(d.sum())
    spread = np.zeros(2 * total + 1)  # spread[i]: P(signed sum = i - total)
    spread[total] = 1.0
    for size, count in zip(*np.unique(sizes, return_counts=True)):
        size, count = int(size), int(count)
        # `count` groups of this size: a signed sum of size x (2k - count), k ~ Binomial(count, 1/2)
        step = np.zeros(2 * size * count + 1)
        step[::2 * size] = [math.comb(count, k) / 2 ** count for k in range(count + 1)]
        spread = np.convolve(spread, step)[size * count: size * count + 2 * total + 1]
    return float(min(1.0, spread[observed + total:].sum()))


def verdict(p_better: float, p_worse: float, n: int, unit: str, alpha: float = ALPHA, groups: int | None = None) -> str:
    """"better" when A wins significantly (one-sided p < alpha), "worse" when B does, else no difference."""
    if p_better < alpha:
        return "better"
    if p_worse < alpha:
        return "worse"
    return f"no detectable difference on {n:,} test {unit}" + (f" in {groups:,} groups" if groups is not None else "")


def pairs_needed(differences: np.ndarray, n: int, alpha: float = ALPHA) -> int | None:
    """About how many test pairs would make a difference of this size significant: the smallest
    multiple of the test set (its groups repeated) whose test falls below alpha (None if A is not
    ahead). Exact where no group has two discordant pairs (McNemar's counts, multiplied); with larger
    groups by the normal approximation of the signed sum, whose z grows as the root of the multiple."""
    d = np.asarray(differences, dtype=np.int64)
    if d.sum() <= 0:
        return None
    wins, losses, z = int(np.sum(d == 1)), int(np.sum(d == -1)), float(d.sum() / np.sqrt(np.sum(d ** 2)))
    for factor in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100):
        p = sign_test(wins * factor, losses * factor) if np.all(np.abs(d) <= 1) else \
            0.5 * math.erfc(z * math.sqrt(factor) / math.sqrt(2))
        if p < alpha:
            return n * factor
    return None


def group_differences(a_right: np.ndarray, b_right: np.ndarray, groups: np.ndarray | None = None) -> np.ndarray:
    """Each group's pairs only A got right less those only B got right (each pair its own group
    without `groups`)."""
    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    if not len(a_right):
        return np.zeros(0, np.int64)
    ids = groups if groups is not None else np.arange(len(a_right))
    return np.bincount(ids, weights=(a_right & ~b_right).astype(int) - (~a_right & b_right).astype(int),
                       minlength=1).astype(np.int64)


def compare_pairs(a_right: np.ndarray, b_right: np.ndarray, alpha: float = ALPHA, groups: np.ndarray | None = None) -> dict:
    """A against B on the same pairs (True where a model decided right): McNemar's exact test, or
    with `groups` (groups_of) the sign-flip test over groups and intervals counted by groups."""
    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    n = len(a_right)
    b = int(np.sum(a_right & ~b_right))
    c = int(np.sum(~a_right & b_right))
    differences = group_differences(a_right, b_right, groups)
    p_better, p_worse = sign_flip_test(differences), sign_flip_test(-differences)
    count = len(np.unique(groups)) if groups is not None else None
    return {"test": "McNemar exact, one-sided" if groups is None else "sign-flip over groups, exact, one-sided",
            "n": n, "groups": count if count is not None else n,
            "error_a": float(np.mean(~a_right)) if n else 0.0, "interval_a": error_interval(~a_right, groups),
            "error_b": float(np.mean(~b_right)) if n else 0.0, "interval_b": error_interval(~b_right, groups),
            "only_a_right": b, "only_b_right": c, "p_value": p_better, "p_worse": p_worse,
            "verdict": verdict(p_better, p_worse, n, "pairs", alpha, count),
            "pairs_needed": pairs_needed(differences, n, alpha)}


def compare_losses(a_loss: np.ndarray, b_loss: np.ndarray, groups: np.ndarray | None = None, alpha: float = ALPHA) -> dict:
    """A against B by each pair's cost (a log-loss, `calibration.py`): the sign test over groups, each
    group one vote for the model whose summed cost over its pairs is lower. Exact: under "no
    difference" each group's vote is a fair coin, whatever its pairs share. It uses what the count of
    pairs one model got right throws away (how sure each decision was, on every pair, not only the
    few the two decide differently), and no group outweighs another: a popular question whose
    hundreds of pairs one model handles better is one vote, not hundreds. Where costs are 0 for a
    right decision and 1 for a wrong one, it is the sign test over the groups' discordant pairs."""
    ids = groups if groups is not None else np.arange(len(a_loss))
    d = np.bincount(ids, weights=np.asarray(b_loss, float) - np.asarray(a_loss, float), minlength=1) if len(a_loss) else np.zeros(0)
    for_a, for_b = int(np.sum(d > 1e-12)), int(np.sum(d < -1e-12))
    p_better, p_worse = sign_test(for_a, for_b), sign_test(for_b, for_a)
    return {"test": "sign test over groups of the summed log-loss, one-sided", "groups": len(d),
            "groups_for_a": for_a, "groups_for_b": for_b, "loss_a": float(np.mean(a_loss)) if len(a_loss) else 0.0,
            "loss_b": float(np.mean(b_loss)) if len(b_loss) else 0.0, "p_value": p_better, "p_worse": p_worse,
            "verdict": verdict(p_better, p_worse, len(d), "groups", alpha)}


def compare_queries(a_ranks: np.ndarray, b_ranks: np.ndarray, alpha: float = ALPHA) -> dict:
    """The sign test over queries: A's reciprocal rank of each query's first duplicate against B's.
    A sign test rather than Wilcoxon's signed-rank test: reciprocal ranks take few values (1, 1/2,
    1/3, ...), so most differences tie in size, and a gain from rank 2 to 1 is not "worth" ten from
    rank 20 to 19 in any sense the ranks of the differences would capture; the sign test needs no
    such weighting, and it is exact."""
    a_ranks, b_ranks = np.asarray(a_ranks, float), np.asarray(b_ranks, float)
    better, worse = int(np.sum(a_ranks > b_ranks)), int(np.sum(a_ranks < b_ranks))
    p_better, p_worse = sign_test(better, worse), sign_test(worse, better)
    return {"test": "sign test on per-query reciprocal ranks, one-sided", "n": len(a_ranks),
            "mrr_a": float(a_ranks.mean()), "mrr_b": float(b_ranks.mean()),
            "a_better_queries": better, "b_better_queries": worse, "p_value": p_better, "p_worse": p_worse,
            "verdict": verdict(p_better, p_worse, len(a_ranks), "queries", alpha)}


def p_of_verdict(result: dict) -> float:
    """The one-sided p-value in the direction the verdict names ("worse": B better than A)."""
    if result["verdict"] != "worse":
        return result["p_value"]
    if "p_worse" in result:
        return result["p_worse"]
    # a result recorded before p_worse was (McNemar's, without groups)
    wins, losses = ("only_a_right", "only_b_right") if "only_a_right" in result else ("a_better_queries", "b_better_queries")
    return sign_test(result[losses], result[wins])


def pack(right: np.ndarray) -> dict:
    """Per-pair outcomes (True: decided right) as a small JSON value, so that results on disk (a
    sweep's rows) can be paired later: 10,000 pairs take 1,668 characters."""
    return {"n": len(right), "bits": base64.b64encode(np.packbits(np.asarray(right, bool))).decode()}


def unpack(packed: dict) -> np.ndarray:
    return np.unpackbits(np.frombuffer(base64.b64decode(packed["bits"]), np.uint8))[:packed["n"]].astype(bool)


def describe(result: dict, a: str, b: str) -> str:
    """One line: the two numbers with their intervals, the discordant counts, the verdict and the p
    of its own direction (a "worse" quotes the p that B is better)."""
    if "only_a_right" in result:
        (la, ha), (lb, hb) = result["interval_a"], result["interval_b"]
        grouped = f" in {result['groups']:,} groups" if result.get("groups", result["n"]) != result["n"] else ""
        line = (f"{a} {result['error_a']:.2%} [{la:.1%}, {ha:.1%}] vs {b} {result['error_b']:.2%} [{lb:.1%}, {hb:.1%}] "
                f"test error on {result['n']:,} pairs{grouped}; {result['only_a_right']} vs {result['only_b_right']} "
                "pairs only one got right, "
                f"p = {p_of_verdict(result):.2g}: {result['verdict']}")
        if result["verdict"].startswith("no detectable") and result.get("pairs_needed"):
            line += f" (a difference this size needs about {result['pairs_needed']:,} test pairs)"
        return line
    return (f"{a} MRR {result['mrr_a']:.4f} vs {b} {result['mrr_b']:.4f}; {result['a_better_queries']} vs "
            f"{result['b_better_queries']} queries one ranked higher, p = {p_of_verdict(result):.2g}: {result['verdict']}")
