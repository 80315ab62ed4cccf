import math

import numpy as np
import pytest

from embed_ft import paired


def test_sign_test_by_hand():
    # 4 better, 1 worse: P(X >= 4 | Bin(5, 1/2)) = (5 + 1) / 32; no difference at all is no evidence.
    assert paired.sign_test(4, 1) == pytest.approx(6 / 32)
    assert paired.sign_test(0, 0) == 1.0 and paired.sign_test(0, 3) == 1.0
    # 60 against 30: the normal approximation gives z = 30 / sqrt(90) = 3.16, p ~ 0.0008.
    assert paired.sign_test(60, 30) == pytest.approx(sum(math.comb(90, k) for k in range(60, 91)) / 2**90)
    assert 0.0005 < paired.sign_test(60, 30) < 0.002


def test_wilson_interval_by_hand():
    # 10 errors in 100: p = 0.1, z = 1.96: centre (0.1 + 1.9208/100) / 1.038415 = 0.11480,
    # half-width 1.96 * sqrt(0.0009 + 0.0000960) / 1.038415 = 0.05958 -> [0.0552, 0.1744]
    low, high = paired.wilson_interval(10, 100)
    assert low == pytest.approx(0.0552, abs=2e-4) and high == pytest.approx(0.1744, abs=2e-4)
    assert paired.wilson_interval(0, 30)[0] == 0.0 and paired.wilson_interval(0, 30)[1] == pytest.approx(0.1135, abs=2e-4)


def test_mcnemar_on_a_small_table():
    a = np.array([1, 1, 1, 1, 0, 1, 1, 0], bool)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], bool)
    # only A right at 1, 2, 3, 6 (b = 4); only B right at 4 (c = 1); p = 6 / 32
    result = paired.compare_pairs(a, b)
    assert (result["only_a_right"], result["only_b_right"], result["n"]) == (4, 1, 8)
    assert result["p_value"] == pytest.approx(6 / 32)
    assert result["error_a"] == pytest.approx(2 / 8) and result["error_b"] == pytest.approx(5 / 8)
    assert result["interval_a"] == pytest.approx(paired.wilson_interval(2, 8))
    assert result["verdict"] == "no detectable difference on 8 test pairs"
    # twice the pairs, 8 vs 2: p = 56 / 1024 = 0.055; three times, 12 vs 3: p = 0.018, the first below 0.05
    assert result["pairs_needed"] == 24
    assert paired.compare_pairs(b, a)["pairs_needed"] is None


def test_verdicts_both_ways():
    a = np.r_[np.ones(60), np.zeros(30)].astype(bool)
    assert paired.compare_pairs(a, ~a)["verdict"] == "better"
    assert paired.compare_pairs(~a, a)["verdict"] == "worse"
    ranks = paired.compare_queries([1, 1, 0.5, 1], [0.5, 1, 0.5, 0.25])
    assert (ranks["a_better_queries"], ranks["b_better_queries"]) == (2, 0) and ranks["p_value"] == pytest.approx(0.25)
    assert "no detectable difference on 4 test queries" in paired.describe(ranks, "new", "old")


def test_a_worse_verdict_quotes_the_p_of_its_own_direction():
    """6 pairs only B got right, 0 only A: "worse" at p = 1/64, the chance of B winning all six under
    no difference, never the p = 1 of A being better."""
    a, b = np.r_[np.zeros(6), np.ones(4)].astype(bool), np.ones(10, bool)
    result = paired.compare_pairs(a, b)
    assert result["verdict"] == "worse" and result["p_value"] == 1.0 and paired.p_of_verdict(result) == 1 / 64
    assert paired.describe(result, "new", "old").endswith("0 vs 6 pairs only one got right, p = 0.016: worse")
    ranks = paired.compare_queries([0.5] * 6, [1.0] * 6)
    assert paired.describe(ranks, "new", "old").endswith("0 vs 6 queries one ranked higher, p = 0.016: worse")


# ---------------------------------------------------------------------------- pairs that share texts

def test_groups_join_pairs_that_share_a_text_directly_or_through_others():
    pairs = [("How do I?", "b", 1), ("c", "d", 0), ("b", "e", 0), ("how  do i?", "f", 1), ("g", "h", 1)]
    assert paired.groups_of(pairs).tolist() == [0, 1, 0, 0, 2]  # "How do I?" = "how  do i?" once normalised


def test_the_design_effect_and_interval_by_hand():
    # 8 pairs in two groups of 4: all of group 0 wrong, none of group 1; p = 1/2. Leaving out group 0
    # gives 0, group 1 gives 1: the jackknife variance is (2 - 1) / 2 x (0.25 + 0.25) = 1/4, as
    # independent pairs (1/2)(1/2)/8 = 1/32: deff 8, the 8 pairs are worth 1.
    errors, groups = np.r_[np.ones(4), np.zeros(4)].astype(bool), np.r_[np.zeros(4), np.ones(4)].astype(int)
    assert paired.design_effect(errors, groups) == pytest.approx(8.0)
    assert paired.error_interval(errors, groups) == pytest.approx(paired.wilson_interval(0.5, 1))
    mixed = np.array([0, 1, 0, 1, 0, 1, 0, 1], bool)  # each group half wrong: no group varies from the mean
    assert paired.design_effect(mixed, groups) == 1.0
    assert paired.error_interval(mixed, groups) == paired.wilson_interval(4, 8)


def test_the_sign_flip_test_by_hand_and_mcnemar_when_groups_differ_by_one_at_most():
    # differences 3, 1, -1: the 8 sign patterns sum to (3+1+1, 3+1-1, 3-1+1, 3-1-1, -3+1+1, -3+1-1,
    # -3-1+1, -3-1-1) = (5, 3, 3, 1, -1, -3, -3, -5); observed 3: P(>= 3) = 3/8; observed -3: 7/8
    assert paired.sign_flip_test([3, 1, -1]) == pytest.approx(3 / 8)
    assert paired.sign_flip_test([-3, -1, 1]) == pytest.approx(7 / 8)
    assert paired.sign_flip_test([4, 0, 0]) == pytest.approx(1 / 2)  # one group: a coin, whatever its size
    for d in ([1, 1, 1, -1, 0], [1] * 9 + [-1] * 2):
        assert paired.sign_flip_test(d) == paired.sign_test(d.count(1), d.count(-1))


def test_with_every_pair_its_own_group_a_comparison_equals_mcnemars():
    rng = np.random.default_rng(0)
    a, b = rng.random(300) < 0.8, rng.random(300) < 0.75
    plain, grouped = paired.compare_pairs(a, b), paired.compare_pairs(a, b, groups=np.arange(300))
    for key in ("only_a_right", "only_b_right", "p_value", "interval_a", "interval_b", "pairs_needed"):
        assert grouped[key] == plain[key]
    assert grouped["verdict"].removesuffix(" in 300 groups") == plain["verdict"]


def test_a_group_that_moves_together_counts_as_one_and_the_line_says_so():
    # 12 discordant pairs all for A, in two groups of 6: McNemar says p = 1/4096; the groups say 1/4.
    a = np.ones(20, bool)
    b = np.r_[np.zeros(12), np.ones(8)].astype(bool)
    groups = np.r_[np.zeros(6), np.ones(6), np.arange(2, 10)].astype(int)
    assert paired.compare_pairs(a, b)["p_value"] == 1 / 4096
    result = paired.compare_pairs(a, b, groups=groups)
    assert result["p_value"] == pytest.approx(1 / 4) and result["verdict"] == "no detectable difference on 20 test pairs in 10 groups"
    assert "test error on 20 pairs in 10 groups; 12 vs 0 pairs only one got right, p = 0.25" in paired.describe(result, "a", "b")
