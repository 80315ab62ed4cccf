"""When a candidate replaces the current model: a rule that stays valid over the whole life of a home.

Each round asks "is the candidate better?" on the traffic's test pairs (an exact test over the
groups of pairs that share texts, `paired.py`). Asked at a fixed alpha every round, false promotions pile up: at 0.05, twenty rounds
with no real gain promote at least once with probability 1 - 0.95^20 = 64%, and each promotion
changes every vector, so each false one costs a client a needless re-index of its whole store.

Alpha-spending. A home gets one budget, `alpha`, for its whole life, and each test spends a part of
it fixed in advance by the traffic alone, never by any model's results. Half of it follows the
rounds: the j-th test may spend

    alpha / 2 / (j (j + 1))         (1/j - 1/(j + 1) telescopes: any number of tests spend under alpha / 2)

and half follows the evidence: a test spends alpha / 2 x (its new test groups / the test set's cap
in groups), so that the rounds whose test set grew the most, which are the ones able to see a gain,
get the most (at most alpha / 2 in all, since the test set stops growing at its cap). Evidence is
counted in groups of pairs that share texts, as the cap is (`state/heldout.py`): a round whose new test
pairs all join a few popular questions has added little that can resolve an error. A home without a test set of
its own (a curated one only) spends all of alpha by rounds. So the chance that the home ever
promotes a candidate that is no better stays under alpha, however many rounds it runs. The bound is
a union bound, so it holds whatever the dependence between the tests, and ours are dependent: each
round's test pairs include the last round's, and its candidate is trained on much the same pairs.
That is why not LORD (Javanmard and Montanari 2018) or alpha-investing (Foster and Stine 2008):
they earn budget back with each discovery, which buys power, but their guarantees assume
independent p-values (or positive dependence of a kind nobody can check here). Spending by rounds
alone was measured first, on the real stream: from its third test on, its level was too small for
the gains a few hundred test pairs can show, and the home stayed on its second model while a model
trained on everything kept improving (docs/flywheel.md has both streams; `benchmarks/gate_simulation.py`
the level over 10,000 null rounds and the power of both).

A curated test set, where a home has one, is a guard, not a second chance: the candidate must not
be significantly worse there (one-sided, at `GUARD_ALPHA` each round: a false refusal costs a round,
not a re-index, so the guard needs no spending).
"""
from __future__ import annotations

import numpy as np

import paired

GUARD_ALPHA = 0.05


def level(test_number: int, alpha: float, new_test_groups: int = 0, test_cap: int = 0) -> float:
    """What the `test_number`-th test of a home (1, 2, ...) may spend of the life's budget alpha: by
    rounds, and (for a home that grows its test set up to `test_cap` groups) by its new test groups."""
    by_rounds = alpha / (test_number * (test_number + 1))
    if not test_cap:
        return by_rounds
    return by_rounds / 2 + alpha / 2 * min(max(new_test_groups, 0), test_cap) / test_cap


def decide(candidate_right: np.ndarray, current_right: np.ndarray, at: float,
           curated: tuple[np.ndarray, np.ndarray] | None = None, groups: np.ndarray | None = None,
           curated_groups: np.ndarray | None = None) -> dict:
    """Promote when the candidate wins on the traffic's test pairs at this test's level `at` and,
    with a curated set, is not significantly worse on it. With `groups` (paired.groups_of: pairs
    that share texts) the test is the sign-flip test over groups, exact however the pairs of a group
    depend on each other, so the life-long promise holds on clustered traffic too; without, McNemar's.
    Returns the verdicts and the decision."""
    traffic = paired.compare_pairs(candidate_right, current_right, alpha=at, groups=groups)
    result = {"alpha_round": at, "traffic": traffic}
    promoted = traffic["p_value"] < at and traffic["only_a_right"] > traffic["only_b_right"]
    if curated is not None:
        guard = paired.compare_pairs(*curated, alpha=GUARD_ALPHA, groups=curated_groups)
        result["curated"] = guard
        if promoted and guard["verdict"] == "worse":
            promoted, result["refused_by"] = False, "curated"
    result["decision"] = "promoted" if promoted else "refused"
    return result


def decide_queries(candidate_ranks: np.ndarray, current_ranks: np.ndarray, at: float) -> dict:
    """The same rule for retrieval: the sign test over test queries, at this test's level `at`."""
    traffic = paired.compare_queries(candidate_ranks, current_ranks, alpha=at)
    promoted = traffic["p_value"] < at and traffic["a_better_queries"] > traffic["b_better_queries"]
    return {"alpha_round": at, "traffic": traffic, "decision": "promoted" if promoted else "refused"}
