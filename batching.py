"""Pairs tokenised once, and the batches a training step takes: each epoch's order is drawn from the
seed and the epoch alone (so a resumed run redraws it), pairs of similar length can share a batch, and
each batch's texts are padded in a few length groups rather than to the batch's longest text."""
from __future__ import annotations

from typing import Iterator, NamedTuple

import numpy as np
import torch

from embed_ft import data


class Batch(NamedTuple):
    """One step's share of pairs on this process: its texts in length groups, the permutation that puts
    their embeddings back in order, the labels, and every process's number of pairs (see `batches`)."""
    groups: list[dict]
    restore: torch.Tensor
    labels: torch.Tensor
    shares: list[int]


class TokenizedPairs:
    """Pairs tokenised once: each distinct text is tokenised a single time, pairs point at them."""

    def __init__(self, pairs: list[data.Pair], model, roles: tuple[str, str] = ("default", "default")):
        """`model.tokenize(texts, role)` gives each text's ids after its role's prompt (model.Embedder):
        the first texts of the pairs take the first role's, the second texts the second's. A text is
        tokenised once for each role it takes."""
        keyed = list(dict.fromkeys(k for a, b, _ in pairs for k in ((roles[0], a), (roles[1], b))))
        self.input_ids: list[list[int]] = [[]] * len(keyed)
        self.skips = [0] * len(keyed)  # each text's prompt tokens that pooling leaves out
        for role in dict.fromkeys(roles):
            rows = [i for i, (r, _) in enumerate(keyed) if r == role]
            ids, skip = model.tokenize([keyed[i][1] for i in rows], role)
            for i, row in zip(rows, ids):
                self.input_ids[i], self.skips[i] = row, skip
        index = {k: i for i, k in enumerate(keyed)}
        self.pairs = np.array([(index[roles[0], a], index[roles[1], b]) for a, b, _ in pairs], dtype=np.int64).reshape(-1, 2)
        self.labels = np.array([y for _, _, y in pairs], dtype=np.int64)
        self.tokenizer = model.tokenizer

    def __len__(self) -> int:
        return len(self.labels)

    def epoch_order(self, seed: int, epoch: int, batch_size: int, by_length: bool = False) -> np.ndarray:
        """The pairs' order in an epoch, drawn from (seed, epoch) alone, so a resumed run redraws it.
        `by_length`: shuffled, then sorted by length within chunks of 50 batches and the batches
        shuffled again, so that a batch holds pairs of similar length and pads little (measured in
        docs/quality.md)."""
        rng = np.random.default_rng([seed, epoch])
        order = rng.permutation(len(self))
        if not by_length:
            return order
        longest = np.array([max(len(self.input_ids[a]), len(self.input_ids[b])) for a, b in self.pairs])
        chunk = 50 * batch_size
        order = np.concatenate([part[np.argsort(longest[part], kind="stable")]
                                for part in np.split(order, range(chunk, len(order), chunk))])
        batches = np.split(order, range(batch_size, len(order), batch_size))
        whole = len(batches) - (len(batches[-1]) < batch_size)  # a short last batch stays last
        return np.concatenate([batches[i] for i in rng.permutation(whole)] + batches[whole:])

    def group(self, text_ids: np.ndarray) -> dict:
        """Texts padded to their longest, as the model's forward takes them (with the prompt tokens
        each leaves out of pooling, where there are any)."""
        features = dict(self.tokenizer.pad({"input_ids": [self.input_ids[i] for i in text_ids]}, return_tensors="pt"))
        skips = [self.skips[i] for i in text_ids]
        return features | ({"skip": torch.tensor(skips)} if any(skips) else {})

    def batches(self, order: np.ndarray, batch_size: int, length_groups: int = 1, rank: int = 0,
                world_size: int = 1) -> Iterator[Batch]:
        """Batches of B pairs, in `order`: every pair of `order` is in exactly one batch.

        The batch's 2B texts (all first texts, then all second texts) are sorted by length and cut
        into `length_groups` groups, each padded only to its own longest text, so that a few long
        texts do not make the whole batch pad to their length.
        `torch.cat(embeddings of the groups)[restore]` puts the embeddings back in batch order.
        Data-parallel: process r takes the r-th of `world_size` contiguous parts of each batch. Parts
        differ by at most one pair, and a shorter part is topped up with copies of a pair so that all
        are the same size; `shares` says how many of each part are real, and `distributed.gather`
        drops the copies again. So a short last batch is taken, whatever the number of processes.
        """
        for start in range(0, len(order), batch_size):
            parts = np.array_split(order[start:start + batch_size], world_size)
            mine = parts[rank] if len(parts[rank]) else parts[0]  # fewer pairs than processes: a copy
            chosen = np.resize(mine, len(parts[0]))  # a short part repeats its own pairs
            text_ids = np.concatenate([self.pairs[chosen, 0], self.pairs[chosen, 1]])
            by_length = np.argsort([len(self.input_ids[i]) for i in text_ids], kind="stable")
            groups = [self.group(text_ids[group]) for group in np.array_split(by_length, min(length_groups, len(by_length)))]
            yield Batch(groups, torch.from_numpy(np.argsort(by_length)),
                        torch.from_numpy(self.labels[chosen]), [len(p) for p in parts])
