"""Training objectives for labelled pairs. Each takes the unit-length embeddings of a batch's first
and second texts, `a` and `b` (B, d), and the 0/1 labels (B,), and returns a scalar loss.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class InBatchContrastiveLoss(nn.Module):
    """InfoNCE over scaled cosine similarities, symmetric (a -> b and b -> a).

    For each duplicate pair (a_i, b_i), a_i must pick out b_i among every other text in the batch:
    the partners of the other pairs and both texts of the non-duplicate pairs, which are useful hard
    negatives. Non-duplicate pairs only serve as negatives. This is sentence-transformers'
    MultipleNegativesRankingLoss (van den Oord et al. 2018, "CPC"; Henderson et al. 2017) extended
    with the labelled negatives. A text occurring twice in one batch is (rarely) its own negative.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n = len(a)
        texts = torch.cat([a, b])                                       # (2B, d): every text is a row
        logits = self.scale * texts @ texts.T                           # (2B, 2B)
        rows = torch.arange(2 * n, device=a.device)
        logits[rows, rows] = float("-inf")                              # a text is not its own candidate
        per_text = F.cross_entropy(logits, (rows + n) % (2 * n), reduction="none")  # a_i -> b_i, b_i -> a_i
        # Only the texts of duplicate pairs are anchors. Masking rather than selecting them keeps the
        # host from waiting for the GPU; a batch without duplicates gives 0, and a graph for backward().
        anchors = torch.cat([labels, labels]).float()
        return (per_text * anchors).sum() / anchors.sum().clamp(min=1)


class CosineSimilarityLoss(nn.Module):
    """Mean squared error between the cosine of each pair and its label (1 or 0).

    sentence-transformers' CosineSimilarityLoss (Reimers & Gurevych 2019, "Sentence-BERT").
    """

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return F.mse_loss((a * b).sum(-1), labels.float())


class CoSENTLoss(nn.Module):
    """Rank every duplicate pair above every non-duplicate pair of the batch, by cosine.

    log(1 + sum over (duplicate p, non-duplicate n) of exp(scale * (cos_n - cos_p))): a smooth
    version of "one threshold separates the classes", which is exactly what threshold-tuned
    classification needs. Su 2022, "CoSENT"; sentence-transformers' CoSENTLoss.
    """

    def __init__(self, scale: float = 20.0):
        super().__init__()
        self.scale = scale

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        cosine = self.scale * (a * b).sum(-1)
        wrong_way = (cosine[None, :] - cosine[:, None])[labels[:, None] > labels[None, :]]  # cos_n - cos_p
        return torch.logsumexp(torch.cat([cosine.new_zeros(1), wrong_way]), 0)


class OnlineContrastiveLoss(nn.Module):
    """Contrastive loss (Hadsell, Chopra & LeCun 2006) on the batch's hard pairs only.

    With cosine distance d = 1 - cos: duplicates farther apart than the closest non-duplicate pull
    together (d^2), and non-duplicates closer than the farthest duplicate push apart until they are
    `margin` away (relu(margin - d)^2). Easy pairs add nothing. Summed over the batch, as in
    sentence-transformers' OnlineContrastiveLoss, so results compare at the same learning rate.
    Computed with masks rather than by selecting pairs: a selection has a data-dependent size, which
    makes the host wait for the GPU (8 waits a step, forward and backward, on an H200).
    """

    def __init__(self, margin: float = 0.5):
        super().__init__()
        self.margin = margin

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        distance = 1 - (a * b).sum(-1)
        pos, neg = labels == 1, labels == 0
        one_class = ~(pos.any() & neg.any())  # no contrast to mine: every pair counts
        closest_neg = torch.where(neg, distance, torch.inf).min()
        farthest_pos = torch.where(pos, distance, -torch.inf).max()
        hard_pos = pos & ((distance > closest_neg) | one_class)
        hard_neg = neg & ((distance < farthest_pos) | one_class)
        return (hard_pos * distance.pow(2)).sum() + (hard_neg * F.relu(self.margin - distance).pow(2)).sum()



class WeightedSum(nn.Module):
    """w1 * loss1 + w2 * loss2 + ...: say, OCL for the threshold and in-batch InfoNCE for ranking,
    as sentence-transformers' Quora example combines them."""

    def __init__(self, weighted: list[tuple[float, nn.Module]]):
        super().__init__()
        self.weights = [w for w, _ in weighted]
        self.losses = nn.ModuleList([loss for _, loss in weighted])

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(w * loss(a, b, labels) for w, loss in zip(self.weights, self.losses))


class MatryoshkaLoss(nn.Module):
    """The loss at each prefix width, summed: the first d coordinates, re-normalised, must work on
    their own for every d in `dims`, so one model serves every width (Kusupati et al. 2022,
    "Matryoshka Representation Learning"; sentence-transformers' MatryoshkaLoss)."""

    def __init__(self, loss: nn.Module, dims: list[int]):
        super().__init__()
        self.loss, self.dims = loss, dims

    def forward(self, a: torch.Tensor, b: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return sum(self.loss(F.normalize(a[:, :d], dim=-1), F.normalize(b[:, :d], dim=-1), labels) for d in self.dims)


BY_NAME = {  # --loss name -> the loss, built from the run's options
    "ocl": lambda c: OnlineContrastiveLoss(c.margin),
    "cosent": lambda c: CoSENTLoss(c.scale),
    "contrastive": lambda c: InBatchContrastiveLoss(c.scale),
    "cosine": lambda c: CosineSimilarityLoss(),
}
