"""The promotion rule: alpha spent over a home's life, and the curated guard."""
import sys

import numpy as np
import pytest
from conftest import ROOT

import gate

sys.path.insert(0, str(ROOT / "benchmarks"))


def test_the_levels_spend_at_most_alpha_over_any_life():
    assert [gate.level(j, 0.05) for j in (1, 2, 3)] == pytest.approx([0.025, 0.05 / 6, 0.05 / 12])
    assert sum(gate.level(j, 0.05) for j in range(1, 100_001)) == pytest.approx(0.05 * 100_000 / 100_001)
    # A home that grows its test set: half by rounds, half by new test pairs (300 of a 5,000 cap: 0.0015).
    assert gate.level(1, 0.05, 300, 5000) == pytest.approx(0.0125 + 0.0015)
    assert gate.level(8, 0.05, 300, 5000) == pytest.approx(0.025 / 72 + 0.0015)
    growth = [300] * 16 + [200] + [0] * 10_000  # the test set reaches its cap of 5,000, then stops growing
    assert sum(gate.level(j, 0.05, n, 5000) for j, n in enumerate(growth, 1)) < 0.05


def outcomes(only_candidate: int, only_current: int, both: int = 100) -> tuple[np.ndarray, np.ndarray]:
    """Per-pair correctness with the given discordant counts (and `both` pairs both get right)."""
    candidate = np.array([True] * only_candidate + [False] * only_current + [True] * both)
    return candidate, np.array([False] * only_candidate + [True] * only_current + [True] * both)


def test_a_win_that_passes_round_one_fails_round_twenty():
    # 30 vs 12 discordant: p = 0.0040 (by hand: P(X >= 30), X ~ Bin(42, 1/2)).
    assert gate.decide(*outcomes(30, 12), gate.level(1, 0.05))["traffic"]["p_value"] == pytest.approx(0.00401, abs=1e-4)
    assert gate.decide(*outcomes(30, 12), gate.level(1, 0.05))["decision"] == "promoted"
    assert gate.decide(*outcomes(30, 12), gate.level(20, 0.05))["decision"] == "refused"  # level 0.05 / 420 = 0.00012
    assert gate.decide(*outcomes(12, 30), gate.level(1, 0.05))["decision"] == "refused"


def test_a_curated_set_can_refuse_a_winner_but_never_promote_a_loser():
    worse_there = outcomes(2, 20)
    refused = gate.decide(*outcomes(30, 12), 0.025, curated=worse_there)
    assert refused["decision"] == "refused" and refused["refused_by"] == "curated" and refused["curated"]["verdict"] == "worse"
    assert gate.decide(*outcomes(12, 30), 0.025, curated=outcomes(40, 0))["decision"] == "refused"
    assert gate.decide(*outcomes(30, 12), 0.025, curated=outcomes(11, 10))["decision"] == "promoted"


def test_null_homes_stay_under_alpha_while_a_fixed_level_does_not():
    import gate_simulation
    rng = np.random.default_rng(0)
    tail = gate_simulation.tail_table(600)
    discordant = rng.binomial(gate_simulation.test_sizes(200), 0.06, size=(1000, 200))
    wins = rng.binomial(discordant, 0.5)
    p = tail[discordant, wins]
    ahead = 2 * wins > discordant
    sizes = gate_simulation.test_sizes(200)
    new = np.diff(sizes, prepend=0)
    spending = (p < np.array([gate.level(j, 0.05, n, 5000) for j, n in enumerate(new, 1)])) & ahead
    fixed = (p < 0.05) & ahead
    assert spending.any(axis=1).mean() <= 0.05 and fixed.any(axis=1).mean() > 0.5
    assert tail[42, 30] == pytest.approx(0.00401, abs=1e-4)  # the same tail as by hand above


def test_wins_that_all_share_two_groups_are_two_wins_not_twelve():
    """12 pairs only the candidate got right, in two groups of 6 that share their texts: as
    independent pairs p = 1/4096 promotes at 0.01; by groups it is two coins, p = 1/4: refused."""
    candidate, current = np.ones(20, bool), np.r_[np.zeros(12), np.ones(8)].astype(bool)
    groups = np.r_[np.zeros(6), np.ones(6), np.arange(2, 10)].astype(int)
    assert gate.decide(candidate, current, 0.01)["decision"] == "promoted"
    decided = gate.decide(candidate, current, 0.01, groups=groups)
    assert decided["decision"] == "refused" and decided["traffic"]["p_value"] == pytest.approx(1 / 4)
    assert decided["traffic"]["groups"] == 10
