"""How sure a model is of each decision, in a unit two models share: the log-loss of its calibrated
probability that a pair is a duplicate.

A model decides "duplicate" where a pair's cosine is above its threshold. Its cosines say how sure it
is in no unit another model shares (a fine-tuned model spreads them differently), so each model gets
a probability,

    P(duplicate) = sigmoid(slope x (cosine - threshold))

with the slope fitted by maximum likelihood on validation pairs (Platt 1999, the offset held at the
threshold, so that the probability crosses 1/2 exactly where the decision changes). A pair's cost is
the log-loss of that probability on its label: near 0 for a confident right decision, large for a
confident wrong one, log 2 on the threshold. The slope is fitted on validation pairs only, never on
the pairs whose costs it gives.

    slope = fit_slope(cosine_scores(model, val), threshold, labels_of(val))
    costs = log_losses(cosine_scores(model, test), threshold, labels_of(test), slope)
"""
from __future__ import annotations

import numpy as np

MAX_SLOPE = 1e4  # validation pairs a model separates perfectly: a very sure model, not an infinite one


def fit_slope(scores: np.ndarray, threshold: float, labels: np.ndarray) -> float:
    """The slope >= 0 that maximises the likelihood of the labels: the log-likelihood is concave in
    it, so the root of its derivative is found by bisection (0 for a model no better than chance)."""
    x, y = np.asarray(scores, float) - threshold, np.asarray(labels, float)
    slope_of_likelihood = lambda s: float(np.sum((y - 0.5 - 0.5 * np.tanh(s * x / 2)) * x))  # decreasing in s
    if slope_of_likelihood(0.0) <= 0:
        return 0.0
    if slope_of_likelihood(MAX_SLOPE) >= 0:
        return MAX_SLOPE
    low, high = 0.0, MAX_SLOPE
    for _ in range(80):
        middle = (low + high) / 2
        low, high = (middle, high) if slope_of_likelihood(middle) > 0 else (low, middle)
    return (low + high) / 2


def log_losses(scores: np.ndarray, threshold: float, labels: np.ndarray, slope: float) -> np.ndarray:
    """Each pair's log-loss (nats) of P(duplicate) = sigmoid(slope (score - threshold)) on its label."""
    z = slope * (np.asarray(scores, float) - threshold)
    return np.where(np.asarray(labels) == 1, np.logaddexp(0, -z), np.logaddexp(0, z))
