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
"""
from __future__ import annotations

import base64
import math

import numpy as np

ALPHA = 0.05
Z95 = 1.959963984540054


def sign_test(better: int, worse: int) -> float:
    """One-sided exact sign test: P(X >= better) for X ~ Binomial(better + worse, 1/2). On pairs, the
    discordant ones, it is McNemar's exact test; on queries, those whose reciprocal rank differs."""
    n = better + worse
    return sum(math.comb(n, k) for k in range(better, n + 1)) / 2 ** n


def wilson_interval(errors: int, n: int, z: float = Z95) -> tuple[float, float]:
    """The 95% Wilson score interval of an error rate errors / n."""
    if n == 0:
        return 0.0, 1.0
    p = errors / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def verdict(wins: int, losses: int, n: int, unit: str, alpha: float = ALPHA) -> str:
    """"better" when A wins significantly (one-sided p < alpha), "worse" when B does, else no difference."""
    if sign_test(wins, losses) < alpha:
        return "better"
    if sign_test(losses, wins) < alpha:
        return "worse"
    return f"no detectable difference on {n:,} test {unit}"


def pairs_needed(wins: int, losses: int, n: int, alpha: float = ALPHA) -> int | None:
    """About how many test pairs would make a difference of this size significant: the smallest
    multiple of the observed counts whose sign test falls below alpha (None if A is not ahead)."""
    if wins <= losses:
        return None
    for factor in (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 100):
        if sign_test(wins * factor, losses * factor) < alpha:
            return n * factor
    return None


def compare_pairs(a_right: np.ndarray, b_right: np.ndarray, alpha: float = ALPHA) -> dict:
    """McNemar's exact test of A against B on the same pairs (True where a model decided right)."""
    a_right, b_right = np.asarray(a_right, bool), np.asarray(b_right, bool)
    n = len(a_right)
    b = int(np.sum(a_right & ~b_right))
    c = int(np.sum(~a_right & b_right))
    errors_a, errors_b = int(n - a_right.sum()), int(n - b_right.sum())
    return {"test": "McNemar exact, one-sided", "n": n,
            "error_a": errors_a / max(n, 1), "interval_a": wilson_interval(errors_a, n),
            "error_b": errors_b / max(n, 1), "interval_b": wilson_interval(errors_b, n),
            "only_a_right": b, "only_b_right": c, "p_value": sign_test(b, c),
            "verdict": verdict(b, c, n, "pairs", alpha), "pairs_needed": pairs_needed(b, c, n, alpha)}


def compare_queries(a_ranks: np.ndarray, b_ranks: np.ndarray, alpha: float = ALPHA) -> dict:
    """The sign test over queries: A's reciprocal rank of each query's first duplicate against B's.
    A sign test rather than Wilcoxon's signed-rank test: reciprocal ranks take few values (1, 1/2,
    1/3, ...), so most differences tie in size, and a gain from rank 2 to 1 is not "worth" ten from
    rank 20 to 19 in any sense the ranks of the differences would capture; the sign test needs no
    such weighting, and it is exact."""
    a_ranks, b_ranks = np.asarray(a_ranks, float), np.asarray(b_ranks, float)
    better, worse = int(np.sum(a_ranks > b_ranks)), int(np.sum(a_ranks < b_ranks))
    return {"test": "sign test on per-query reciprocal ranks, one-sided", "n": len(a_ranks),
            "mrr_a": float(a_ranks.mean()), "mrr_b": float(b_ranks.mean()),
            "a_better_queries": better, "b_better_queries": worse, "p_value": sign_test(better, worse),
            "verdict": verdict(better, worse, len(a_ranks), "queries", alpha)}


def p_of_verdict(result: dict) -> float:
    """The one-sided p-value in the direction the verdict names ("worse": B better than A)."""
    if result["verdict"] == "worse":
        wins, losses = ("only_a_right", "only_b_right") if "only_a_right" in result else ("a_better_queries", "b_better_queries")
        return sign_test(result[losses], result[wins])
    return result["p_value"]


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
        line = (f"{a} {result['error_a']:.2%} [{la:.1%}, {ha:.1%}] vs {b} {result['error_b']:.2%} [{lb:.1%}, {hb:.1%}] "
                f"test error; {result['only_a_right']} vs {result['only_b_right']} pairs only one got right, "
                f"p = {p_of_verdict(result):.2g}: {result['verdict']}")
        if result["verdict"].startswith("no detectable") and result.get("pairs_needed"):
            line += f" (a difference this size needs about {result['pairs_needed']:,} test pairs)"
        return line
    return (f"{a} MRR {result['mrr_a']:.4f} vs {b} {result['mrr_b']:.4f}; {result['a_better_queries']} vs "
            f"{result['b_better_queries']} queries one ranked higher, p = {p_of_verdict(result):.2g}: {result['verdict']}")
