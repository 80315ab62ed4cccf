import math

import pytest
import torch
import torch.nn.functional as F

from embed_ft.losses import (BY_NAME, CoSENTLoss, CosineSimilarityLoss, InBatchContrastiveLoss, MatryoshkaLoss, OnlineContrastiveLoss,
                    WeightedSum)


def unit(*rows):
    return F.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


A = unit([1, 0], [0, 1], [1, 1])
B = unit([1, 0], [1, 0], [-1, -1])   # cosines with A: 1, 0, -1


def test_cosine_similarity_loss_by_hand():
    labels = torch.tensor([1, 1, 0])
    expected = ((1 - 1) ** 2 + (0 - 1) ** 2 + (-1 - 0) ** 2) / 3
    assert CosineSimilarityLoss()(A, B, labels).item() == pytest.approx(expected)


def test_online_contrastive_loss_keeps_only_hard_pairs():
    a = unit([1, 0], [1, 0], [1, 0], [1, 0])
    b = unit([1, 0], [0, 1], [1, 1], [-1, 0])  # distances 0, 1, 1-1/sqrt2 = 0.293, 2
    labels = torch.tensor([1, 1, 0, 0])
    # hard positives: d > min negative distance (0.293) -> only the 1.0 one; hard negatives: d < max
    # positive distance (1.0) -> only the 0.293 one, pushed to the 0.5 margin.
    expected = 1.0 ** 2 + (0.5 - (1 - 1 / math.sqrt(2))) ** 2
    assert OnlineContrastiveLoss(margin=0.5)(a, b, labels).item() == pytest.approx(expected, rel=1e-5)


def test_online_contrastive_loss_with_one_class_uses_every_pair():
    labels = torch.tensor([1, 1, 1])
    distances = 1 - (A * B).sum(-1)
    assert OnlineContrastiveLoss()(A, B, labels).item() == pytest.approx(distances.pow(2).sum().item())


def test_online_contrastive_loss_with_only_non_duplicates_pushes_every_close_pair():
    labels = torch.tensor([0, 0, 0])  # distances 0, 1, 2: only the first is inside the 0.5 margin
    assert OnlineContrastiveLoss(margin=0.5)(A, B, labels).item() == pytest.approx(0.5 ** 2)


def test_online_contrastive_loss_masks_give_the_gradients_of_selecting_pairs():
    """The masked form (no host sync on a GPU) against sentence-transformers' form, which selects."""
    torch.manual_seed(0)
    a, b = torch.randn(16, 8, requires_grad=True), torch.randn(16, 8)
    labels = torch.randint(0, 2, (16,))
    unit_a, unit_b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    distance = 1 - (unit_a * unit_b).sum(-1)
    pos, neg = distance[labels == 1], distance[labels == 0]
    selected = pos[pos > neg.min()].pow(2).sum() + F.relu(0.5 - neg[neg < pos.max()]).pow(2).sum()
    expected = torch.autograd.grad(selected, a)[0]
    masked = OnlineContrastiveLoss(margin=0.5)(F.normalize(a, dim=-1), unit_b.detach(), labels)
    assert masked.item() == pytest.approx(selected.item(), rel=1e-6)
    assert torch.allclose(torch.autograd.grad(masked, a)[0], expected, atol=1e-7)


def test_in_batch_contrastive_loss_matches_an_explicit_softmax():
    torch.manual_seed(0)
    a, b = F.normalize(torch.randn(4, 8), dim=-1), F.normalize(torch.randn(4, 8), dim=-1)
    labels = torch.tensor([1, 0, 1, 1])
    texts, scale, terms = torch.cat([a, b]), 20.0, []
    for i in range(4):
        if labels[i]:
            for anchor, target in ((i, i + 4), (i + 4, i)):  # a_i -> b_i, b_i -> a_i
                others = [j for j in range(8) if j != anchor]
                logits = torch.stack([scale * texts[anchor] @ texts[j] for j in others])
                terms.append(-torch.log_softmax(logits, 0)[others.index(target)])
    expected = torch.stack(terms).mean()
    assert InBatchContrastiveLoss(scale)(a, b, labels).item() == pytest.approx(expected.item(), rel=1e-5)


def test_in_batch_contrastive_loss_without_duplicates_is_zero_but_differentiable():
    a = A.clone().requires_grad_()
    loss = InBatchContrastiveLoss()(a, B, torch.tensor([0, 0, 0]))
    loss.backward()
    assert loss.item() == 0.0 and a.grad is not None


def test_cosent_loss_by_hand():
    cosines = (A * B).sum(-1)                  # 1, 0, -1
    labels = torch.tensor([1, 0, 1])           # duplicates at cos 1 and -1, a non-duplicate at 0
    # wrong-way terms (non-duplicate minus duplicate): 0 - 1 and 0 - (-1)
    expected = math.log(1 + math.exp(20 * (0 - 1)) + math.exp(20 * (0 + 1)))
    assert CoSENTLoss(20.0)(A, B, labels).item() == pytest.approx(expected, rel=1e-5)
    assert cosines.tolist() == pytest.approx([1, 0, -1], abs=1e-6)
    assert CoSENTLoss()(A, B, torch.tensor([1, 1, 1])).item() == 0.0  # nothing to rank


def random_batch(n=12, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = (F.normalize(torch.randn(n, d, generator=g), dim=-1) for _ in range(2))
    return a, b, torch.arange(n) % 2


def test_matryoshka_at_the_full_width_alone_is_the_plain_loss():
    a, b, labels = random_batch()
    for loss in (OnlineContrastiveLoss(), InBatchContrastiveLoss(), CoSENTLoss()):
        assert MatryoshkaLoss(loss, [8])(a, b, labels).item() == pytest.approx(loss(a, b, labels).item(), rel=1e-6)


def test_matryoshka_sums_the_loss_of_each_renormalised_prefix():
    a, b, labels = random_batch()
    loss = OnlineContrastiveLoss()
    prefix = lambda x, d: F.normalize(x[:, :d], dim=-1)  # noqa: E731
    expected = loss(prefix(a, 2), prefix(b, 2), labels) + loss(prefix(a, 4), prefix(b, 4), labels) + loss(a, b, labels)
    assert MatryoshkaLoss(loss, [2, 4, 8])(a, b, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_weighted_sum():
    a, b, labels = random_batch()
    ocl, nce = OnlineContrastiveLoss(), InBatchContrastiveLoss()
    expected = ocl(a, b, labels) + 0.25 * nce(a, b, labels)
    assert WeightedSum([(1.0, ocl), (0.25, nce)])(a, b, labels).item() == pytest.approx(expected.item(), rel=1e-6)


def test_every_named_loss_is_built_from_the_options():
    from embed_ft.options import Config
    assert BY_NAME["ocl"](Config(margin=0.3)).margin == 0.3 and BY_NAME["cosent"](Config(scale=7.0)).scale == 7.0
