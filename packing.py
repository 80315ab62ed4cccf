"""Texts packed end to end into rows for one forward pass, so that a pass computes no padding.

    rows = pack(input_ids, pad_id=0)
    hidden = encoder(input_ids=rows.ids, position_ids=rows.positions, attention_mask=rows.mask()).last_hidden_state
    pooled = mean_by_text(hidden, rows.texts, len(input_ids))

Why: a batch padded to its longest text computes every pad token through every layer. Quora
questions average 16 tokens and a batch of 128 random ones is padded to about 50, so two thirds of
the work is padding; sorting a whole corpus by length avoids most of it, but a server's batch is
whatever requests arrived together. Packed, the texts lie end to end in rows (first fit, longest
first) as wide as the longest text and at least `min_width` tokens; positions restart at each
text, and a block-diagonal mask lets each token see its own text alone. Only a row's tail is pad.
The vectors equal the padded ones up to float rounding where the architecture takes a 4-D mask
and position ids (BERT's family does); `Embedder.encode_ids` checks that once a model and pads
where it does not hold. The same idea as text-embeddings-inference's unpadded batches, with a
mask in place of variable-length attention kernels.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

MIN_WIDTH = 64  # tokens a row at least: wide enough to hold several short texts (docs/serving.md)
STEP = 16       # row widths come in steps of this many tokens (from the longest text up): fewer shapes,
                # so fewer kernels for oneDNN to build and cache (each shape its own, kept in memory)


@dataclass
class Packed:
    ids: torch.Tensor        # (rows, width) token ids, pad at each row's tail
    positions: torch.Tensor  # (rows, width) each text's own positions, from the model's first one
    texts: torch.Tensor      # (rows, width) which text a token belongs to; -1 for pad

    def mask(self) -> torch.Tensor:
        """(rows, 1, width, width): True where a token may attend, i.e. within its own text (pad sees pad)."""
        return (self.texts[:, :, None] == self.texts[:, None, :])[:, None]


def pack(input_ids: list[list[int]], pad_id: int, first_position: int = 0, min_width: int = MIN_WIDTH,
         step: int = STEP) -> Packed:
    """First-fit-decreasing packing of the texts into rows (each text whole, in one row)."""
    order = sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i]))
    width = max(min_width, -(-len(input_ids[order[0]]) // step) * step)
    rows: list[list[int]] = []
    room: list[int] = []
    for i in order:
        length = len(input_ids[i])
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            rows.append([])
            room.append(width)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= length
    width -= min(room) // step * step  # no columns that every row leaves empty, in steps
    ids = np.full((len(rows), width), pad_id, np.int64)
    positions = np.zeros((len(rows), width), np.int64)
    texts = np.full((len(rows), width), -1, np.int64)
    for r, members in enumerate(rows):
        start = 0
        for i in members:
            end = start + len(input_ids[i])
            ids[r, start:end] = input_ids[i]
            positions[r, start:end] = np.arange(first_position, first_position + end - start)
            texts[r, start:end] = i
            start = end
    return Packed(torch.from_numpy(ids), torch.from_numpy(positions), torch.from_numpy(texts))


def mean_by_text(hidden: torch.Tensor, texts: torch.Tensor, count: int) -> torch.Tensor:
    """(count, hidden) float32: each text's mean token vector, from packed rows."""
    flat, owner = hidden.reshape(-1, hidden.shape[-1]).float(), texts.reshape(-1).to(hidden.device)
    real = owner >= 0
    sums = torch.zeros(count, flat.shape[1], device=hidden.device).index_add_(0, owner[real], flat[real])
    lengths = torch.bincount(owner[real], minlength=count).clamp(min=1)
    return sums / lengths[:, None]
