"""When a candidate replaces the current model: a rule that stays valid over the whole life of a home,
and keeps its power as the home ages.

Each round asks "is the candidate better?" on the traffic's test pairs. Asked at a fixed alpha every
round, false promotions pile up: at 0.05, twenty rounds with no real gain promote at least once with
probability 1 - 0.95^20 = 64%, and each promotion changes every vector, so each false one costs a
client a needless re-index of its whole store. So a home gets one budget, `alpha`, for its whole
life, and the promise is: the chance that it ever promotes a candidate that is no better stays under
alpha, however many rounds it runs. Four things make that promise cheap (docs/flywheel.md has the
simulation that chose them, beside the rule before):

1. The budget is allotted, not spent, by the traffic alone. By its j-th round a home has been allotted

       alpha x (ROUNDS_SHARE x j / (j + 1)  +  (1 - ROUNDS_SHARE) x clip((test groups - from) / (cap - from), 0, 1))

   a tenth that follows the rounds (1/(i (i + 1)) each, which sum to j / (j + 1) < 1) and nine
   tenths that follow the evidence: the test set's groups of pairs that share texts, from
   EVIDENCE_FROM of its cap up to the cap (`state/heldout.py`). Evidence gets most of it because
   only a grown test set can see a gain, and none of it goes to a test set too small to see one
   (under 600 groups of the default 5,000, a 60/40 gain is promoted 2 to 3 times in a hundred).
2. A test that is not run spends nothing. The candidate is tested only when the validation split
   (whose texts are never test texts) already favours it; otherwise the round refuses it and its
   allotment waits for the next test. A test spends everything allotted and not yet spent.
3. A promotion spends nothing: its level passes on to the next test (the online fallback of Tian and
   Ramdas 2021, a graphical Bonferroni procedure), so a home that keeps finding real gains keeps
   its power. Only a refused test spends its level.
4. The test set never stops growing: past its cap it keeps a small share of the new pairs
   (`heldout.AFTER_CAPS`), so an old home's test resolves smaller gains than a young one's, which
   pays for the smaller allotment of its late rounds. A home's 100th round can promote what its
   16th could.

Why the promise holds whatever the dependence between rounds (and ours are dependent: each round's
test pairs include the last round's, and its candidate is trained on much the same pairs): until the
first false promotion nothing is passed on, and the levels depend only on the traffic and on the
validation split, never on the test pairs; given those, each test is exact, so the chance of a false
promotion is at most the sum of the levels spent, which never exceeds what has been allotted, which
never exceeds alpha (a union bound). That is why not LORD (Javanmard and Montanari 2018) or
alpha-investing (Foster and Stine 2008): they earn budget back with each discovery, but their
guarantees assume independent p-values, or a positive dependence nobody can check here.

The test is the sign test over groups of each model's costs (`paired.compare_losses`): every pair's
cost is the log-loss of the model's calibrated probability of its label (`calibration.py`, fitted on
validation), and each group of test pairs that share texts (`paired.groups_of`) votes for the model
whose summed cost over its pairs is lower. Under "no better" each vote is at best a fair coin, so the
test is exact whatever a group's pairs share. It uses how sure each decision was, on every pair,
where a count of the pairs one model got right uses only the few the two decide differently; and one
vote a group means a popular question whose hundreds of pairs a candidate handles differently cannot
decide a verdict by itself, which a sum over groups lets it do. A candidate is promoted only if it
also decides fewer test pairs wrong than the current model: the votes can favour a model that is
surer where it is right, never one that makes more errors.

A curated test set, where a home has one, is a guard, not a second chance: the candidate must not
be significantly worse there (one-sided, at `GUARD_ALPHA` each round: a false refusal costs a round,
not a re-index, so the guard needs no budget).
"""
from __future__ import annotations

import numpy as np

from embed_ft import paired

GUARD_ALPHA = 0.05
ROUNDS_SHARE = 0.1  # of alpha, the part allotted by rounds; the rest follows the test set's groups
EVIDENCE_FROM = 0.12  # of the test cap: the groups a test set holds before the evidence share starts


def allotted(rounds: int, alpha: float, test_groups: int = 0, test_cap: int = 0,
             evidence_from: float = EVIDENCE_FROM) -> float:
    """The part of the life's budget alpha allotted to a home by its `rounds`-th round (1, 2, ...),
    whose test set holds `test_groups` groups of a cap of `test_cap` (0: no test set of its own, so
    everything by rounds). Never above alpha, however long the life."""
    by_rounds = alpha * rounds / (rounds + 1)
    if not test_cap:
        return by_rounds
    start = evidence_from * test_cap
    evidence = min(max((test_groups - start) / (test_cap - start), 0.0), 1.0)
    return ROUNDS_SHARE * by_rounds + (1 - ROUNDS_SHARE) * alpha * evidence


def spent(history: list[dict]) -> float:
    """What a home's tests have spent: the level of each test that refused (a promotion passes its
    level on, a round whose candidate was never tested spends nothing)."""
    return sum(row.get("alpha_round", 0.0) for row in history if row.get("decision") == "refused")


def level(history: list[dict], alpha: float, test_groups: int = 0, test_cap: int = 0) -> float:
    """This round's level: allotted so far (this round counted) less what the tests have spent."""
    rounds = 1 + sum(row.get("decision") in ("promoted", "refused") for row in history)
    return max(0.0, allotted(rounds, alpha, test_groups, test_cap) - spent(history))


def favoured(candidate_loss: np.ndarray, current_loss: np.ndarray, groups: np.ndarray | None = None) -> dict:
    """Does the validation split favour the candidate: more of its groups vote for it (a lower summed cost)?"""
    votes = paired.compare_losses(candidate_loss, current_loss, groups)
    return {"for": votes["groups_for_a"], "against": votes["groups_for_b"],
            "favoured": votes["groups_for_a"] > votes["groups_for_b"]}


def decide(candidate_right: np.ndarray, current_right: np.ndarray, candidate_loss: np.ndarray,
           current_loss: np.ndarray, at: float, curated: tuple[np.ndarray, np.ndarray] | None = None,
           groups: np.ndarray | None = None, curated_groups: np.ndarray | None = None) -> dict:
    """Promote when the candidate wins the sign test over the test pairs' `groups` on the pairs' costs
    at this test's level `at`, decides fewer test pairs wrong, and, with a curated set, is not
    significantly worse on it. Returns the verdicts (`evidence` decides; `traffic` is the errors') and
    the decision."""
    evidence = paired.compare_losses(candidate_loss, current_loss, groups, alpha=at)
    traffic = paired.compare_pairs(candidate_right, current_right, alpha=at, groups=groups)
    result = {"alpha_round": at, "evidence": evidence, "traffic": traffic}
    promoted = evidence["p_value"] < at and traffic["only_a_right"] > traffic["only_b_right"]
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
