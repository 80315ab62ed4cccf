"""The promotion rule: alpha spent over a home's life, and the curated guard."""
import sys

import numpy as np
import pytest
from conftest import ROOT

from embed_ft import gate

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_allotment_never_passes_alpha_over_any_life():
    assert [gate.allotted(j, 0.05) for j in (1, 2, 3)] == pytest.approx([0.025, 0.05 * 2 / 3, 0.05 * 3 / 4])
    assert gate.allotted(100_000, 0.05) == pytest.approx(0.05 * 100_000 / 100_001)
    # A home that grows its test set: a tenth by rounds, nine tenths by its groups from 600 of a 5,000 cap on.
    assert gate.allotted(1, 0.05, 300, 5000) == pytest.approx(0.005 / 2)
    assert gate.allotted(8, 0.05, 2400, 5000) == pytest.approx(0.005 * 8 / 9 + 0.045 * (2400 - 600) / 4400)
    assert gate.allotted(20, 0.05, 5000, 5000) == pytest.approx(0.005 * 20 / 21 + 0.045)
    assert gate.allotted(10**9, 0.05, 10**6, 5000) < 0.05  # past its cap the test set earns no more


def test_a_refused_test_spends_its_level_a_promotion_and_an_untested_round_do_not():
    history = [{"decision": "refused", "alpha_round": 0.004},
               {"decision": "promoted", "alpha_round": 0.003},
               {"decision": "refused", "refused_by": "validation", "alpha_round": 0.0},
               {"decision": "waiting"}]                    # no candidate: not a round of the life
    assert gate.spent(history) == pytest.approx(0.004)
    assert gate.level(history, 0.05, 1000, 5000) == pytest.approx(0.005 * 4 / 5 + 0.045 * 400 / 4400 - 0.004)
    assert gate.level([{"decision": "refused", "alpha_round": 1.0}], 0.05) == 0.0  # never below nothing


def test_validation_favours_the_model_more_of_its_groups_vote_for():
    candidate, current = np.array([0.1, 0.2, 0.3, 2.0, 0.5, 0.5]), np.array([0.9, 0.8, 0.7, 0.1, 0.5, 0.5])
    assert gate.favoured(candidate, current) == {"for": 3, "against": 1, "favoured": True}  # ties do not vote
    # pairs 0-3 share one group: its summed cost is 2.6 against 2.5, one vote against the candidate
    assert gate.favoured(candidate, current, np.array([0, 0, 0, 0, 1, 2])) == {"for": 0, "against": 1, "favoured": False}


def outcomes(only_candidate: int, only_current: int, both: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair correctness with the given discordant counts (and `both` pairs both get right)."""
    candidate = np.array([True] * only_candidate + [False] * only_current + [True] * both)
    return candidate, np.array([False] * only_candidate + [True] * only_current + [True] * both)


def decided(candidate_right, current_right, at, costs=None, **kwargs) -> dict:
    """gate.decide with each pair's cost 0 where its model is right, 1 where wrong (unless given)."""
    costs = costs or ((~candidate_right).astype(float), (~current_right).astype(float))
    return gate.decide(candidate_right, current_right, *costs, at, **kwargs)


def test_a_win_that_passes_an_early_round_fails_once_the_budget_is_spent():
    # 30 vs 12 discordant: p = 0.0040 (by hand: P(X >= 30), X ~ Bin(42, 1/2)).
    assert decided(*outcomes(30, 12), 0.0074)["evidence"]["p_value"] == pytest.approx(0.00401, abs=1e-4)
    assert decided(*outcomes(30, 12), 0.0074)["decision"] == "promoted"
    spent = [{"decision": "refused", "alpha_round": 0.0074}] * 19
    assert decided(*outcomes(30, 12), gate.level(spent, 0.05, 300, 5000))["decision"] == "refused"
    assert decided(*outcomes(12, 30), 0.025)["decision"] == "refused"


def test_a_curated_set_can_refuse_a_winner_but_never_promote_a_loser():
    worse_there = outcomes(2, 20)
    refused = decided(*outcomes(30, 12), 0.025, curated=worse_there)
    assert refused["decision"] == "refused" and refused["refused_by"] == "curated" and refused["curated"]["verdict"] == "worse"
    assert decided(*outcomes(12, 30), 0.025, curated=outcomes(40, 0))["decision"] == "refused"
    assert decided(*outcomes(30, 12), 0.025, curated=outcomes(11, 10))["decision"] == "promoted"


def test_null_homes_stay_under_alpha_while_a_fixed_level_does_not():
    import gate_simulation
    rng = np.random.default_rng(0)
    pool = np.array([1] * 80 + [2] * 14 + [5] * 5 + [60])  # group sizes with a long tail, as real traffic's
    promoted = gate_simulation.lives_now(rng, pool, 400, 300)
    assert promoted.any(axis=1).mean() <= 0.05
    late = gate_simulation.lives_now(rng, pool, 400, 101, better=(100, 101))  # a gain in an old home's rounds
    assert late[:, 99:].any(axis=1).mean() > 0.5
    assert gate_simulation.held_out_groups(20, "test")[[0, 16, 17, 19]].tolist() == [300, 5000, 5100, 5300]


def test_wins_that_all_share_two_groups_are_two_wins_not_twelve():
    """12 pairs only the candidate got right, in two groups of 6 that share their texts: as
    independent pairs p = 1/4096 promotes at 0.01; by groups it is two coins, p = 1/4: refused."""
    candidate, current = np.ones(20, bool), np.r_[np.zeros(12), np.ones(8)].astype(bool)
    groups = np.r_[np.zeros(6), np.ones(6), np.arange(2, 10)].astype(int)
    assert decided(candidate, current, 0.01)["decision"] == "promoted"
    by_groups = decided(candidate, current, 0.01, groups=groups)
    assert by_groups["decision"] == "refused" and by_groups["evidence"]["p_value"] == pytest.approx(1 / 4)
    assert by_groups["traffic"]["groups"] == by_groups["evidence"]["groups"] == 10


def test_one_large_group_is_one_vote_and_cannot_decide_by_itself():
    """12 groups of one pair only the candidate got right, and one group of 30 pairs where it got 10
    more wrong than the current model (its pairs share a popular question). Summed, that group's -10
    decides the sign-flip test (p = 0.37); voting, it is one vote against 12, p = 14/8192."""
    candidate = np.r_[np.ones(12), np.zeros(10), np.ones(20)].astype(bool)
    current = np.r_[np.zeros(12), np.ones(10), np.ones(20)].astype(bool)
    groups = np.r_[np.arange(12), np.full(30, 12)]
    by_votes = decided(candidate, current, 0.01, groups=groups)
    assert by_votes["traffic"]["p_value"] > 0.3 and by_votes["evidence"]["p_value"] == pytest.approx(14 / 8192)
    assert by_votes["evidence"]["groups_for_a"] == 12 and by_votes["decision"] == "promoted"  # 12 vs 10 pairs: fewer errors


def test_surer_decisions_are_evidence_but_more_errors_never_promote():
    # Both models decide the same 40 pairs right; the candidate is surer of each (cost 0.1 against 0.3):
    # 40 groups of one pair vote for it, p = 2^-40, yet it makes no fewer errors: refused.
    right = np.ones(40, bool)
    same = gate.decide(right, right, np.full(40, 0.1), np.full(40, 0.3), 0.01)
    assert same["evidence"]["p_value"] == pytest.approx(2.0 ** -40) and same["decision"] == "refused"
    # With one pair fewer wrong, the same evidence promotes.
    current = right.copy()
    current[0] = False
    costs = np.full(40, 0.1), np.r_[2.0, np.full(39, 0.3)]
    assert gate.decide(right, current, *costs, 0.01)["decision"] == "promoted"
    # A candidate surer where it is right but wrong on more pairs is refused, whatever its votes.
    assert gate.decide(current, right, *costs, 0.01)["decision"] == "refused"


def test_the_test_pairs_a_gain_needs_follow_its_size_and_the_discordant_share():
    import flywheel_candidates
    # 1,000 pairs: 60 only the candidate decides right, 40 only the current model: a gain of 0.02 on
    # a discordant share of 0.1, so (2.326 + 0.842)^2 x 0.1 / 0.02^2 = 2,509.06 pairs, rounded up.
    candidate = np.r_[np.ones(60, bool), np.zeros(40, bool), np.ones(900, bool)]
    current = np.r_[np.zeros(60, bool), np.ones(40, bool), np.ones(900, bool)]
    assert flywheel_candidates.test_pairs_needed(candidate, current) == 2510
    assert flywheel_candidates.test_pairs_needed(current, candidate) is None  # behind: no test pairs will do


def test_how_wrong_counts_only_what_lies_within_half_a_logit_of_the_wrong_side():
    import flywheel_candidates
    margins = np.array([3.0, 0.2, -1.0])  # log-odds on each pair's label: sure and right, barely right, wrong
    assert flywheel_candidates.how_wrong(np.logaddexp(0, -margins)) == pytest.approx([0.0, 0.3, 1.5])
    # four groups all favouring A: 1 of the 16 sign patterns reaches the sum, about 1/16 of the draws
    assert flywheel_candidates.sign_flip_p(np.zeros(4), np.ones(4), np.arange(4)) == pytest.approx(1 / 16, abs=0.005)
