"""The apparatus of benchmarks/distill.py: silver pairs mined and labelled by a teacher."""
import gzip
import sys

import numpy as np
import pytest
from conftest import ROOT, synthetic_pairs, tiny_config, write_tsv

from embed_ft import data, evaluate, train
from embed_ft.errors import InputError
from embed_ft.model import load_model

sys.path.insert(0, str(ROOT / "benchmarks"))
import silver  # noqa: E402


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


def test_nearest_neighbours_are_the_most_similar_other_rows_in_order():
    vectors = np.array([[1, 0], [0.8, 0.6], [0, 1], [-1, 0], [0.6, 0.8]], dtype=np.float32)
    expected = [[1, 4], [4, 0], [4, 1], [2, 4], [1, 2]]  # by hand from the cosines
    assert silver.nearest_neighbours(vectors, 2, chunk=2).tolist() == expected
    assert silver.nearest_neighbours(vectors, 9).shape == (5, 4)  # never more than the other rows


def test_candidate_pairs_are_distinct_ordered_and_hold_each_nearest_neighbour():
    rng = np.random.default_rng(0)
    vectors = rng.normal(size=(30, 8)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    pairs = silver.candidate_pairs(vectors, neighbours=2, random_partners=1, seed=0)
    assert (pairs[:, 0] < pairs[:, 1]).all() and len(np.unique(pairs, axis=0)) == len(pairs)
    found = {tuple(p) for p in pairs.tolist()}
    for i, neighbours in enumerate(silver.nearest_neighbours(vectors, 2)):
        assert all(tuple(sorted((i, int(j)))) in found for j in neighbours)
    assert 30 * 2 / 2 <= len(pairs) <= 30 * 3


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
    assert {y for *_, y in first} <= {0, 1} and report["texts"] == 160 and report["pairs"] == len(first)
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
    assert silver.cache_path(str(tiny_model_dir), texts, settings | {"neighbours": 2}) != key
    assert silver.cache_path("sentence-transformers/all-mpnet-base-v2", texts, settings) != key
    other_teacher = tmp_path / "other"
    load_model(str(tiny_model_dir)).save(other_teacher)
    assert silver.cache_path(str(other_teacher), texts, settings) != key                 # another folder's files
    with pytest.raises(InputError, match="more than the"):
        silver.silver_pairs(str(tiny_model_dir), str(files["unlabelled"]), val, test, size=10 ** 6)


def test_the_labels_are_the_teachers_decisions_at_its_own_threshold(tiny_model_dir, files, cache, tmp_path):
    val, test = (data.load_pairs(str(files[k])) for k in ("val", "test"))
    teacher = tmp_path / "teacher"
    train.train(tiny_config(tiny_model_dir, files, teacher, epochs=2, zero_shot=False))
    pairs, report = silver.silver_pairs(str(teacher), str(files["unlabelled"]), val, test, device="cpu")
    model = load_model(str(teacher))
    assert report["teacher_threshold"] == model.decision["threshold"]  # its own, stored
    assert report["teacher_test_error"] == model.decision["test"]["error_rate"]
    a, b, y = zip(*pairs)
    cosines = np.einsum("ij,ij->i", model.encode(list(a)), model.encode(list(b)))
    assert np.array_equal(np.array(y), (cosines > report["teacher_threshold"]).astype(int))
    # Without a stored threshold, the teacher's is tuned on the validation pairs.
    tuned = silver.teacher_threshold(load_model(str(tiny_model_dir)), val, 128)
    published = load_model(str(tiny_model_dir))
    scores = evaluate.cosine_scores(published, val)
    assert tuned == pytest.approx(float(evaluate.best_threshold(scores, evaluate.labels_of(val))))
