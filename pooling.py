"""Token vectors to one vector a text, the way the model was published to pool them.

    pooled = pool_padded(hidden, attention_mask, "cls")                 # (B, L, H) -> (B, H)
    pooled = pool_packed(hidden, rows, count, "cls", first_position)    # packed rows -> (count, H)

The six modes of sentence-transformers' Pooling module, computed as it computes them, so that a
published model gives here the vectors it gives there (BAAI/bge-* and Snowflake's arctic-embed pool
the CLS token; all-MiniLM-L6-v2 and e5 the mean; decoder-based models the last token):

    cls                    the first token (the first after the prompt, when the prompt is excluded)
    mean                   the average of the tokens
    max                    the largest value of each coordinate over the tokens
    mean_sqrt_len_tokens   the sum of the tokens over the square root of their number
    weightedmean           tokens weighted by their position (1, 2, 3, ...), later ones more
    lasttoken              the last token

`skip` is the number of prompt tokens (with the leading special token) to leave out of pooling, per
text: 0 unless the model was published with `include_prompt: false` (INSTRUCTOR-style models). The
positions that weight `weightedmean` stay the text's own, prompt included, as there.
"""
from __future__ import annotations

import torch

MODES = ("cls", "mean", "max", "mean_sqrt_len_tokens", "weightedmean", "lasttoken")


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Average of the token vectors, padding excluded."""
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1)


def pool_padded(hidden: torch.Tensor, attention_mask: torch.Tensor, mode: str = "mean",
                skip: torch.Tensor | int = 0) -> torch.Tensor:
    """(B, L, H) token vectors of a padded batch (padding on either side) to (B, H)."""
    pad = attention_mask.to(torch.int32).argmax(1)  # tokens of left padding (0 when padded on the right)
    mask = attention_mask
    if torch.is_tensor(skip) or skip:
        start = pad + torch.as_tensor(skip, device=mask.device)  # the first token pooled
        mask = mask * (torch.arange(mask.shape[1], device=mask.device)[None] >= start[:, None])
    if mode == "mean":
        return mean_pool(hidden, mask)
    if mode == "mean_sqrt_len_tokens":
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9).sqrt()
    if mode == "max":
        return hidden.masked_fill(mask.unsqueeze(-1) == 0, float("-inf")).max(1).values
    if mode == "cls":
        first = mask.to(torch.int32).argmax(1)
        return hidden[torch.arange(len(hidden), device=hidden.device), first]
    if mode == "lasttoken":
        found, from_end = mask.flip(1).max(1)
        last = torch.where(found == 0, mask.shape[1] - 1, mask.shape[1] - 1 - from_end)
        return (hidden * mask.unsqueeze(-1).to(hidden.dtype))[torch.arange(len(hidden), device=hidden.device), last]
    if mode == "weightedmean":
        weights = (torch.arange(1, mask.shape[1] + 1, device=mask.device)[None] - pad[:, None])
        weights = (weights * mask).unsqueeze(-1).to(hidden.dtype)
        return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)
    raise ValueError(f"pooling mode {mode!r} is not one of {MODES}")


def pool_packed(hidden: torch.Tensor, texts: torch.Tensor, positions: torch.Tensor, count: int, mode: str = "mean",
                skip: torch.Tensor | int = 0) -> torch.Tensor:
    """(count, H) float32 from packed rows (packing.py): `texts` says which text a token belongs to
    (-1 for pad), `positions` its place in that text (0 for the first token)."""
    flat, owner = hidden.reshape(-1, hidden.shape[-1]).float(), texts.reshape(-1).to(hidden.device)
    place = positions.reshape(-1).to(hidden.device)
    real = owner >= 0
    lengths = torch.bincount(owner[real], minlength=count)
    skip = torch.as_tensor(skip, device=hidden.device).expand(count)
    kept = real & (place >= skip[owner.clamp(min=0)])
    if mode in ("cls", "lasttoken"):
        # cls: the first token kept (the text's first where the prompt is all of it); lasttoken: the
        # last one, zero where nothing is kept, as a masked gather gives in the padded batch
        wanted = torch.where(skip < lengths, skip, 0) if mode == "cls" else lengths - 1
        at = real & (place == wanted[owner.clamp(min=0)])
        vectors = torch.zeros(count, flat.shape[1], device=hidden.device).index_copy_(0, owner[at], flat[at])
        return vectors if mode == "cls" else vectors * (skip < lengths)[:, None]
    if mode == "max":
        index = owner[kept][:, None].expand(-1, flat.shape[1])
        return torch.full((count, flat.shape[1]), float("-inf"), device=hidden.device).scatter_reduce(
            0, index, flat[kept], reduce="amax")
    weights = (place[kept] + 1).float()[:, None] if mode == "weightedmean" else None
    values = flat[kept] * weights if weights is not None else flat[kept]
    sums = torch.zeros(count, flat.shape[1], device=hidden.device).index_add_(0, owner[kept], values)
    if mode == "mean":
        return sums / torch.bincount(owner[kept], minlength=count).clamp(min=1)[:, None]
    if mode == "mean_sqrt_len_tokens":
        return sums / torch.bincount(owner[kept], minlength=count).clamp(min=1e-9).sqrt()[:, None]
    if mode == "weightedmean":
        total = torch.zeros(count, 1, device=hidden.device).index_add_(0, owner[kept], weights)
        return sums / total.clamp(min=1e-9)
    raise ValueError(f"pooling mode {mode!r} is not one of {MODES}")
