import math

import numpy as np
import pytest
import torch
from torch import nn

import hard_negatives
from errors import InputError

# Texts on the unit circle at these angles (degrees): cosines by hand. a and a2 are labelled
# duplicates; b is within the 0.95 ceiling's reach of a (cos 14 deg = 0.970).
ANGLES = {"a": 0.0, "a2": 10.0, "b": 14.0, "c": math.degrees(math.acos(0.9)), "d": 60.0}
TEXTS = list(ANGLES)
PAIRS = np.array([[0, 1], [3, 4]])  # (a, a2) duplicates, (c, d) not
LABELS = np.array([1, 0])


class FixedEncoder(nn.Module):
    """encode() gives each text its vector on the circle, turned by `turn` degrees for the second pair's text."""

    def __init__(self, turn: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.tensor([turn]))
        self.max_length = 8
        self.device = torch.device("cpu")

    def encode(self, texts, batch_size=128):
        angles = np.radians([ANGLES[t] + (self.weight.item() if t == "d" else 0.0) for t in texts])
        return np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)


def test_clusters_join_texts_through_duplicate_labels_only():
    texts = ["A", "b", "C", "D", "E"]
    pairs = np.array([[0, 1], [1, 2], [2, 3], [3, 4]])
    ids = hard_negatives.cluster_ids(texts, pairs, np.array([1, 1, 0, 0]))
    assert ids[0] == ids[1] == ids[2] and len({ids[2], ids[3], ids[4]}) == 3


def test_mining_skips_the_cluster_and_texts_above_the_ceiling():
    # Anchor a: a2 is its duplicate, b is above the ceiling, so c (0.90) then d (0.50).
    # Anchor c: a2 (cos 15.8 deg = 0.962) and b (0.979) are above the ceiling: a (0.90) then d (cos 34.2 deg = 0.83).
    assert hard_negatives.mine(FixedEncoder(), TEXTS, PAIRS, LABELS, k=2).tolist() == [[3, 4], [0, 4]]


def test_too_few_texts_outside_the_cluster_is_named():
    with pytest.raises(InputError, match="--hard-negatives 4: some pair has fewer than 4 texts"):
        hard_negatives.mine(FixedEncoder(), TEXTS, PAIRS, LABELS, k=4)


def test_negatives_are_cached_by_model_and_data(tmp_path, monkeypatch):
    monkeypatch.setattr(hard_negatives, "CACHE", tmp_path)
    first, cost = hard_negatives.mine_cached(FixedEncoder(), TEXTS, PAIRS, LABELS, 1)
    again, cost_again = hard_negatives.mine_cached(FixedEncoder(), TEXTS, PAIRS, LABELS, 1)
    assert not cost["cached"] and cost_again["cached"] and first.tolist() == again.tolist() == [[3], [0]]
    _, other_model = hard_negatives.mine_cached(FixedEncoder(turn=1.0), TEXTS, PAIRS, LABELS, 1)
    _, other_data = hard_negatives.mine_cached(FixedEncoder(), TEXTS, PAIRS, np.array([1, 1]), 1)
    assert not other_model["cached"] and not other_data["cached"] and len(list(tmp_path.glob("*.npy"))) == 3
