import torch

from embed_ft.packing import pack
from embed_ft.pooling import pool_packed


def test_texts_are_packed_whole_longest_first_into_rows_as_wide_as_needed():
    ids = [[1, 2], [3, 4, 5, 6, 7], [8], [9, 10, 11]]
    rows = pack(ids, pad_id=0, first_position=2, min_width=5, step=1)
    # longest first, first fit into rows of 5: [text 1], [text 3 + text 0], [text 2]; no column all pad
    assert rows.ids.tolist() == [[3, 4, 5, 6, 7], [9, 10, 11, 1, 2], [8, 0, 0, 0, 0]]
    assert rows.texts.tolist() == [[1, 1, 1, 1, 1], [3, 3, 3, 0, 0], [2, -1, -1, -1, -1]]
    assert rows.positions.tolist() == [[2, 3, 4, 5, 6], [2, 3, 4, 2, 3], [2, 0, 0, 0, 0]]  # restart at each text
    mask = rows.mask()
    assert mask.shape == (3, 1, 5, 5)
    assert mask[1, 0, 0].tolist() == [True, True, True, False, False]   # a token sees its own text only
    assert mask[1, 0, 4].tolist() == [False, False, False, True, True]
    assert mask[2, 0, 3].tolist() == [False, True, True, True, True]    # pad sees pad, never a text


def test_rows_are_as_wide_as_the_longest_text_in_steps():
    assert pack([[5] * 9, [6] * 2], pad_id=0, min_width=4, step=1).ids.shape == (2, 9)
    assert pack([[5] * 9, [6] * 2], pad_id=0, min_width=4, step=4).ids.shape == (1, 12)  # 9 rounds up to 12: both fit
    assert pack([[5] * 3, [6] * 2], pad_id=0, min_width=64, step=16).ids.shape == (1, 16)  # empty columns go, 16 at a time


def test_each_text_gets_the_mean_of_its_own_tokens():
    texts = torch.tensor([[1, 1, 0, 0], [2, 2, 2, -1]])
    hidden = torch.tensor([[[1.0], [3.0], [10.0], [20.0]], [[4.0], [5.0], [6.0], [1000.0]]])
    positions = torch.tensor([[0, 1, 0, 1], [0, 1, 2, 0]])
    assert pool_packed(hidden, texts, positions, 3).tolist() == [[15.0], [2.0], [5.0]]
