import numpy as np
import pytest
from transformers import AutoTokenizer

from embed_ft.model import Embedder

from embed_ft import batching


@pytest.mark.parametrize("groups", [1, 3])
def test_batches_cover_every_pair_once_with_dynamic_padding(tiny_model_dir, groups):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    pairs = [("the t1a", "t1b of the a how", 1), ("t2a", "t3a", 0), ("what t4a", "t4b", 1), ("i t5a", "t1a", 0),
             ("t1a", "t9b", 0)]
    tokenized = batching.TokenizedPairs(pairs, Embedder.from_pretrained(str(tiny_model_dir), max_length=5))
    assert len(tokenized.input_ids) == 9  # distinct texts are tokenised once
    seen = []
    for features, restore, labels, _ in tokenized.batches(np.random.default_rng(0).permutation(5), 2, groups):
        texts = []
        for group in features:
            ids, mask = group["input_ids"], group["attention_mask"]
            assert ids.shape == mask.shape and mask.sum(1).max() == ids.shape[1] <= 5  # padded to its longest
            texts += tokenizer.batch_decode(ids, skip_special_tokens=True)
        assert len(features) == min(groups, 2 * len(labels))
        texts = [texts[i] for i in restore]
        half = len(labels)
        seen += [(a, b, int(y)) for a, b, y in zip(texts[:half], texts[half:], labels)]
    assert sorted(seen) == sorted((a, b if b != "t1b of the a how" else "t1b of the", y) for a, b, y in pairs)


def test_epoch_order_is_a_seeded_permutation_and_by_length_pads_less(tiny_model_dir):
    rng = np.random.default_rng(0)
    words = ["the", "a", "of", "how", "what", "t1a", "t2b", "t3c"]
    pairs = [(" ".join(rng.choice(words, rng.integers(1, 20))), " ".join(rng.choice(words, rng.integers(1, 20))), i % 2)
             for i in range(250)]
    tokenized = batching.TokenizedPairs(pairs, Embedder.from_pretrained(str(tiny_model_dir), max_length=64))
    for by_length in (False, True):
        order = tokenized.epoch_order(seed=3, epoch=1, batch_size=8, by_length=by_length)
        assert sorted(order) == list(range(250))
        assert np.array_equal(order, tokenized.epoch_order(3, 1, 8, by_length))       # redrawn identically
        assert not np.array_equal(order, tokenized.epoch_order(3, 2, 8, by_length))   # another epoch
    longest = np.array([max(len(tokenized.input_ids[a]), len(tokenized.input_ids[b])) for a, b in tokenized.pairs])

    def padding(order):  # padded / real tokens of the longer texts, batch by batch
        return sum(longest[order[i:i + 8]].max() * len(order[i:i + 8]) for i in range(0, 250, 8)) / longest.sum()

    by_length = tokenized.epoch_order(3, 1, 8, by_length=True)
    assert padding(by_length) < 0.8 * padding(tokenized.epoch_order(3, 1, 8))
    assert sorted(by_length[-2:]) == sorted(by_length[248:])  # the short last batch (250 = 31 x 8 + 2) stays last
