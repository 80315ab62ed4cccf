"""A model's probability for each decision: the slope fitted on validation, the log-loss by hand."""
import math

import numpy as np
import pytest

from embed_ft import calibration


def test_the_slope_maximises_the_likelihood_and_the_costs_are_log_losses():
    scores, labels = np.array([0.9, 0.8, 0.6, 0.4, 0.3, 0.75]), np.array([1, 1, 0, 0, 0, 0])
    slope = calibration.fit_slope(scores, 0.5, labels)
    likelihood = lambda s: -calibration.log_losses(scores, 0.5, labels, s).sum()
    assert likelihood(slope) >= max(likelihood(slope * 0.9), likelihood(slope * 1.1))  # a maximum
    costs = calibration.log_losses(np.array([0.7, 0.7, 0.5]), 0.5, np.array([1, 0, 1]), 10.0)
    assert costs == pytest.approx([math.log(1 + math.exp(-2)), math.log(1 + math.exp(2)), math.log(2)])


def test_a_model_at_chance_is_sure_of_nothing_and_a_perfect_one_is_capped():
    assert calibration.fit_slope(np.array([0.6, 0.4]), 0.5, np.array([0, 1])) == 0.0
    assert calibration.fit_slope(np.array([0.6, 0.4]), 0.5, np.array([1, 0])) == calibration.MAX_SLOPE
