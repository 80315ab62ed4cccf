import gzip
import json

import numpy as np
import pytest
import torch
from conftest import signal_at_step, synthetic_pairs, tiny_config, write_tsv

import card
import data
import dedup
import losses
import silver
import train
from errors import InputError
from model import Embedder, load_model
from options import Config, check


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("EMBED_FT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def files(tmp_path):
    """Gold, validation and test pairs, and unlabelled texts that include some of val's and test's."""
    val, test = synthetic_pairs(48, 2), synthetic_pairs(48, 3)
    texts = [t for a, b, _ in synthetic_pairs(80, 7) for t in (a, b)]
    texts += [val[0][0].upper(), "  " + test[5][1] + " "]  # held-out texts, spelt otherwise
    unlabelled = tmp_path / "texts.txt.gz"
    with gzip.open(unlabelled, "wt") as f:
        f.write("\n".join(texts) + "\n")
    return {"train": write_tsv(tmp_path / "train.tsv", synthetic_pairs(64, 1)), "val": write_tsv(tmp_path / "val.tsv", val),
            "test": write_tsv(tmp_path / "test.tsv", test), "unlabelled": unlabelled}


def taught_config(tiny_model_dir, files, out, **overrides) -> Config:
    settings = dict(unlabelled=str(files["unlabelled"]), teacher=str(tiny_model_dir), zero_shot=False)
    return tiny_config(tiny_model_dir, files, out, **settings | overrides)


def test_nearest_neighbours_are_the_most_similar_other_rows_in_order():
    vectors = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    expected = [[1, 4], [4, 0], [4, 1], [2, 4], [1, 2]]  # by hand from the cosines
    assert dedup.nearest_neighbours(vectors, 2, chunk=2).tolist() == expected
    assert dedup.nearest_neighbours(vectors, 9).shape == (5, 4)  # never more than the other rows


def test_candidate_pairs_are_distinct_ordered_and_hold_each_nearest_neighbour():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = silver.candidate_pairs(vectors, neighbours=2, random_partners=1, seed=0)
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    found = {tuple(p) for p in pairs.tolist()}
    for i, neighbours in enumerate(dedup.nearest_neighbours(vectors, 2)):
        assert all(tuple(sorted((i, int(j)))) in found for j in neighbours)
    assert 30 * 2 / 2 <= len(pairs) <= 30 * 3


def test_labels_are_the_teachers_decisions_or_its_cosines_inside_zero_one():
    cosines = np.array([0.95, 0.80, 0.30, -0.20, 1.0])
    assert silver.label(cosines, 0.8, "decision").tolist() == [1, 0, 0, 0, 1]
    scores = silver.label(cosines, 0.8, "score")
    assert scores[:3] == pytest.approx([0.95, 0.80, 0.30]) and 0 < scores[3] < 0.001 and 0.999 < scores[4] < 1


def test_unlabelled_texts_never_include_a_validation_or_test_text(files):
    val, test = (data.load_pairs(str(files[k])) for k in ("val", "test"))
    texts = silver.unlabelled_texts(str(files["unlabelled"]), val, test)
    held_out = {data.normalise(t) for a, b, _ in val + test for t in (a, b)}
    assert texts and not held_out & {data.normalise(t) for t in texts}
    assert len({data.normalise(t) for t in texts}) == len(texts)
    with pytest.raises(InputError, match="left after dropping"):
        silver.unlabelled_texts(str(files["val"]), val, test)  # a pairs file of val's own texts


def test_silver_pairs_are_cached_by_teacher_and_data(tiny_model_dir, files, cache, tmp_path, monkeypatch):
    val, test = (data.load_pairs(str(files[k])) for k in ("val", "test"))
    first, report = silver.silver_pairs(str(tiny_model_dir), str(files["unlabelled"]), val, test, device="cpu")
    held_out = {data.normalise(t) for a, b, _ in val + test for t in (a, b)}
    assert not held_out & {data.normalise(t) for a, b, _ in first for t in (a, b)}
    assert {y for *_, y in first} <= {0.0, 1.0} and report["texts"] == 160 and report["pairs"] == len(first)
    monkeypatch.setattr(silver, "mine", lambda *a, **k: pytest.fail("mined again"))
    again, _ = silver.silver_pairs(str(tiny_model_dir), str(files["unlabelled"]), val, test, device="cpu")
    assert again == first  # from the cache
    sampled, report = silver.silver_pairs(str(tiny_model_dir), str(files["unlabelled"]), val, test, size=20, seed=1)
    assert len(sampled) == 20 and set(sampled) <= set(first) and report["pairs"] == 20
    texts = silver.unlabelled_texts(str(files["unlabelled"]), val, test)
    settings = {"labels": "decision", "neighbours": 3, "random_partners": 1, "seed": 0}
    key = silver.cache_path(str(tiny_model_dir), texts, settings)
    assert key.exists()
    assert silver.cache_path(str(tiny_model_dir), texts[1:], settings) != key            # other texts
    assert silver.cache_path(str(tiny_model_dir), texts, settings | {"labels": "score"}) != key
    assert silver.cache_path("sentence-transformers/all-mpnet-base-v2", texts, settings) != key
    other_teacher = tmp_path / "other"
    load_model(str(tiny_model_dir)).save(other_teacher)
    assert silver.cache_path(str(other_teacher), texts, settings) != key                 # another folder's files
    with pytest.raises(InputError, match="more than the"):
        silver.silver_pairs(str(tiny_model_dir), str(files["unlabelled"]), val, test, size=10 ** 6)


def test_the_teacher_scores_loss_is_the_gold_loss_plus_cosent_on_the_silver_pairs():
    torch.manual_seed(0)
    a, b = (torch.nn.functional.normalize(torch.randn(6, 4), dim=-1) for _ in range(2))
    labels = torch.tensor([1.0, 0.0, 0.9, 0.2, 0.5, 1.0])
    gold, silver_rows = torch.tensor([0, 1, 5]), torch.tensor([2, 3, 4])
    ocl, cosent = losses.OnlineContrastiveLoss(0.5), losses.CoSENTLoss(20.0)
    expected = ocl(a[gold], b[gold], labels[gold]) + cosent(a[silver_rows], b[silver_rows], labels[silver_rows])
    cos = (a[silver_rows] * b[silver_rows]).sum(-1) * 20  # CoSENT by hand: teacher order 2 > 4 > 3
    by_hand = torch.log(1 + torch.exp(cos[2] - cos[0]) + torch.exp(cos[1] - cos[0]) + torch.exp(cos[1] - cos[2]))
    assert cosent(a[silver_rows], b[silver_rows], labels[silver_rows]) == pytest.approx(by_hand.item(), rel=1e-5)
    assert losses.WithTeacherScores(ocl)(a, b, labels) == pytest.approx(expected.item(), rel=1e-6)


def test_a_taught_run_trains_on_gold_and_silver_and_its_card_names_the_teacher(tiny_model_dir, files, cache, tmp_path):
    teacher = tmp_path / "teacher"
    train.train(tiny_config(tiny_model_dir, files, teacher, epochs=2, zero_shot=False))
    metrics = train.train(taught_config(tiny_model_dir, files, tmp_path / "student", teacher=str(teacher), epochs=1))
    taught = metrics["silver"]
    assert taught["gold_pairs"] == 64 and taught["teacher"] == str(teacher)
    recorded = Embedder.load(teacher).decision
    assert taught["teacher_threshold"] == recorded["threshold"]  # its own, stored
    assert taught["teacher_test_error"] == recorded["test"]["error_rate"]
    assert metrics["training"]["pairs"] == 64 + taught["pairs"]
    written = (tmp_path / "student" / "README.md").read_text()
    assert "on 64 distinct labelled pairs" in written and f"distilled from `{teacher}`" in written
    assert card.distilled(taught) in written


def test_a_taught_run_resumes_exactly_after_sigterm(tiny_model_dir, files, cache, tmp_path, monkeypatch):
    settings = dict(silver_labels="score", silver_size=64, epochs=2)
    train.train(taught_config(tiny_model_dir, files, tmp_path / "whole", **settings))
    expected = Embedder.load(tmp_path / "whole").state_dict()
    out = tmp_path / "stopped"
    with monkeypatch.context() as m:
        signal_at_step(m, 5)
        with pytest.raises(KeyboardInterrupt):
            train.train(taught_config(tiny_model_dir, files, out, **settings))
    metrics = train.train(taught_config(tiny_model_dir, files, out, resume=True, **settings))
    assert metrics["resumed_at_steps"] == [5] and metrics["training"]["steps"] == 2 * 8
    resumed = Embedder.load(out).state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in expected.items())
    assert json.loads((out / "metrics.json").read_text())["silver"]["labels"] == "score"


def test_a_teacher_needs_texts_and_texts_need_a_teacher():
    with pytest.raises(InputError, match="give both --unlabelled"):
        check(Config(teacher="t"))
    with pytest.raises(InputError, match="no silver pair could be mined"):
        check(Config(teacher="t", unlabelled="u", silver_neighbours=0, silver_random=0))
