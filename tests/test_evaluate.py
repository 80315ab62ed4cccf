import hashlib
import json
from itertools import product

import numpy as np
import pytest
from conftest import run_cli, synthetic_pairs, write_tsv

from embed_ft import evaluate, openai_embeddings

SCORES = np.array([0.9, 0.8, 0.8, 0.6, 0.4, 0.3])
LABELS = np.array([1, 1, 0, 1, 0, 0])


def test_best_threshold_by_hand():
    # Cuts between distinct scores: >0.9 acc 3/6, >0.85 4/6, >0.7 (0.8 tie taken whole) 4/6,
    # >0.5 5/6, >0.35 4/6, >0.3 3/6: the best is between 0.6 and 0.4.
    assert evaluate.best_threshold(SCORES, LABELS) == pytest.approx(0.5)
    # All duplicates below every non-duplicate: predicting none is best; all above: predicting all.
    assert evaluate.best_threshold(np.array([0.1, 0.2, 0.9]), np.array([0, 0, 0])) > 0.9
    assert evaluate.best_threshold(np.array([0.1, 0.2, 0.9]), np.array([1, 1, 1])) < 0.1


@pytest.mark.parametrize("min_recall, min_precision", [(0.9, 0.0), (0.0, 0.9), (0.6, 0.6), (0.3, 0.0)])
def test_a_constrained_threshold_meets_its_constraint_on_validation(min_recall, min_precision):
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    scores = labels * 0.3 + rng.normal(0, 0.25, 400)  # overlapping classes: the constraints bind
    threshold = evaluate.best_threshold(scores, labels, min_recall, min_precision)
    m = evaluate.classification_metrics(scores, labels, threshold)
    assert m["recall"] >= min_recall and m["precision"] >= min_precision
    # ... and no other threshold that meets it is more accurate.
    for t in np.r_[scores, scores.max() + 1]:
        other = evaluate.classification_metrics(scores, labels, t)
        if other["recall"] >= min_recall and other["precision"] >= min_precision:
            assert other["accuracy"] <= m["accuracy"] + 1e-12
    unconstrained = evaluate.classification_metrics(scores, labels, evaluate.best_threshold(scores, labels))
    assert unconstrained["accuracy"] >= m["accuracy"]


def test_an_impossible_constraint_is_an_input_error():
    with pytest.raises(evaluate.InputError, match="no threshold reaches recall >= 0.9 and precision >= 0.99"):
        evaluate.best_threshold(SCORES, LABELS, 0.9, 0.99)


def test_classification_metrics_by_hand():
    m = evaluate.classification_metrics(SCORES, LABELS, threshold=0.7)
    # predicted duplicates: 0.9 (1), 0.8 (1), 0.8 (0) -> tp 2, fp 1, fn 1 (0.6), tn 2
    assert m["accuracy"] == pytest.approx(4 / 6) and m["error_rate"] == pytest.approx(2 / 6)
    assert m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["n_pairs"] == 6 and m["threshold"] == 0.7


def test_average_precision_by_hand_with_a_tie():
    # Thresholds: 0.9 -> P 1, R 1/3; 0.8 (tie) -> P 2/3, R 2/3; 0.6 -> P 3/4, R 1.
    expected = 1 / 3 * 1 + 1 / 3 * 2 / 3 + 1 / 3 * 3 / 4
    assert evaluate.average_precision(SCORES, LABELS) == pytest.approx(expected)


def test_roc_auc_equals_the_pairwise_definition():
    rng = np.random.default_rng(0)
    scores, labels = rng.integers(0, 5, 40) / 4, rng.integers(0, 2, 40)  # many ties
    wins = [1.0 if p > n else 0.5 if p == n else 0.0
            for p, n in product(scores[labels == 1], scores[labels == 0])]
    assert evaluate.roc_auc(scores, labels) == pytest.approx(np.mean(wins))
    # Positives 0.9, 0.8, 0.6 against negatives 0.8, 0.4, 0.3: wins 3 + 2.5 (tie) + 2 of 9.
    assert evaluate.roc_auc(SCORES, LABELS) == pytest.approx(7.5 / 9)
    assert evaluate.roc_auc(SCORES, np.ones(6, int)) is None


class FixedEncoder:
    """Embeds known words as fixed vectors, to check scoring without a model."""
    vectors = {"x": [1.0, 0.0], "y": [0.0, 1.0], "z": [0.6, 0.8]}

    def encode(self, texts, batch_size=0):
        return np.array([self.vectors[t] for t in texts], dtype=np.float32)


def test_cosine_scores_and_evaluate():
    pairs = [("x", "x", 1), ("x", "z", 1), ("x", "y", 0), ("y", "z", 0)]
    np.testing.assert_allclose(evaluate.cosine_scores(FixedEncoder(), pairs), [1.0, 0.6, 0.0, 0.8], atol=1e-6)
    result = evaluate.evaluate(FixedEncoder(), pairs, pairs)
    assert result["val"]["error_rate"] == pytest.approx(0.25)  # 0.8 non-duplicate outranks 0.6 duplicate
    assert result["test"] == result["val"]


def test_single_class_sets_are_refused():
    with pytest.raises(evaluate.InputError, match="val: all 2 pairs are duplicates; a tuned threshold means nothing"):
        evaluate.check_both_classes([("a", "b", 1), ("c", "d", 1)], "val")
    evaluate.check_both_classes([("a", "b", 1), ("c", "d", 0)], "val")


def brute_force_retrieval(vectors: np.ndarray, relevant: dict[int, list[int]], ks=(1, 5, 10)) -> dict:
    """The definition, one query at a time with a full sort."""
    recall, reciprocal = {k: [] for k in ks}, []
    for q, wanted in relevant.items():
        scores = vectors @ vectors[q]
        ranking = [i for i in np.argsort(-scores, kind="stable") if i != q]
        for k in ks:
            recall[k].append(len(set(ranking[:k]) & set(wanted)) / len(wanted))
        reciprocal.append(1 / (1 + min(ranking.index(w) for w in wanted)))
    return {**{f"recall@{k}": np.mean(recall[k]) for k in ks}, "mrr": np.mean(reciprocal)}


class RandomEncoder:
    def __init__(self, texts):
        vectors = np.random.default_rng(0).normal(size=(len(texts), 8))
        self.vectors = dict(zip(texts, vectors / np.linalg.norm(vectors, axis=1, keepdims=True)))

    def encode(self, texts, batch_size=0):
        return np.array([self.vectors[t] for t in texts])


def test_retrieval_metrics_equal_a_brute_force_computation():
    pairs = synthetic_pairs(300, seed=4) + [("the T1A  how", "what", 0), ("the t1a how", "t1b", 1)]  # one text, twice spelled
    corpus = list(dict.fromkeys(evaluate.data.normalise(t) for a, b, _ in pairs for t in (a, b)))
    spelled = {}
    for a, b, _ in pairs:
        for t in (a, b):
            spelled.setdefault(evaluate.data.normalise(t), t)
    encoder = RandomEncoder(list(spelled.values()))
    index = {t: i for i, t in enumerate(corpus)}
    relevant = {}
    for cluster in evaluate.data.duplicate_clusters(pairs):
        members = [index[evaluate.data.normalise(t)] for t in cluster]
        relevant.update({m: [x for x in members if x != m] for m in members})
    expected = brute_force_retrieval(encoder.encode([spelled[t] for t in corpus]), relevant)
    result = evaluate.retrieval_metrics(encoder, pairs, chunk=7)  # many chunks, one partial
    assert result["queries"] == len(relevant) and result["corpus"] == len(corpus)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value), key


def test_retrieval_by_hand():
    # x~y; z is unrelated. From x: y (cos 0.8) below z (cos 0.9): rank 2. From y: x first.
    vectors = {"x": [1.0, 0.0], "y": [0.8, 0.6], "z": [0.9, -0.43588989]}

    class Fixed:
        def encode(self, texts, batch_size=0):
            return np.array([vectors[t] for t in texts])

    result = evaluate.retrieval_metrics(Fixed(), [("x", "y", 1), ("y", "z", 0)], ks=(1, 2), per_query=True)
    assert result["recall@1"] == 0.5 and result["recall@2"] == 1.0 and result["mrr"] == pytest.approx(0.75)
    assert result["reciprocal_ranks"] == [0.5, 1.0]  # queries in corpus order: x, then y


def test_both_views_embed_each_text_once_and_agree_with_each_view_alone():
    class Counting(FixedEncoder):
        seen = []

        def encode(self, texts, batch_size=0):
            self.seen += list(texts)
            return super().encode(texts, batch_size)

    pairs = [("x", "y", 0), ("x", "z", 1), ("y", "z", 0)]
    counting = Counting()
    result = evaluate.both_views(counting, pairs, pairs)
    assert sorted(counting.seen) == ["x", "y", "z"]  # val and test are the same pairs here: one pass
    assert {k: result[k] for k in ("val", "test")} == evaluate.evaluate(FixedEncoder(), pairs, pairs)
    assert result["retrieval"]["test"] == evaluate.retrieval_metrics(FixedEncoder(), pairs)


def test_truncated_encoder_keeps_a_prefix_at_unit_length():
    truncated = evaluate.Truncated(FixedEncoder(), 1).encode(["x", "z"])
    np.testing.assert_allclose(truncated, [[1.0], [1.0]])


def test_command_line_on_a_saved_model(tiny_model_dir, tmp_path, capsys):
    from embed_ft.model import Embedder
    Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=8).save(tmp_path / "m")
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(40, 1))
    test = write_tsv(tmp_path / "test.tsv", synthetic_pairs(40, 2))
    evaluate.main(["--model", str(tmp_path / "m"), "--val", str(val), "--test", str(test), "--json", str(tmp_path / "r.json")])
    table = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert set(result) == {"val", "test"} and result["test"]["n_pairs"] == 40
    assert f"{result['test']['error_rate']:7.2%}" in table
    code, err = run_cli(evaluate.main, ["--model", str(tmp_path / "m"), "--val", str(tmp_path / "no.tsv"),
                                        "--test", str(test)], capsys)
    assert code == 2 and err.startswith("error: --val ") and "no.tsv: file not found" in err


# ------------------------------------------------------------------------------ the OpenAI baseline

from fake_openai import FakeOpenAI  # noqa: E402

KEY = "sk-test-secret-key-0123456789"


@pytest.fixture
def openai_env(monkeypatch, tmp_path):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    monkeypatch.delenv("OPENAI_BASE_URL", raising=False)
    return tmp_path / "cache.sqlite"


def test_openai_embedder_batches_retries_and_caches(openai_env):
    texts = ["how do i cook rice", "", "how do i cook rice", "what is rice"] + [f"text {i}" for i in range(7)]
    with FakeOpenAI(failures=[429, 500]) as server:
        embedder = openai_embeddings.OpenAIEmbedder("text-embedding-3-small", 32, server.base_url, openai_env)
        vectors = embedder.encode(texts, batch_size=4)
        assert [r["body"]["dimensions"] for r in server.requests] == [32] * 5  # 2 failed + 3 batches of <= 4
        assert [len(r["body"]["input"]) for r in server.requests[2:]] == [4, 4, 2]  # 10 distinct texts
        assert all(r["headers"]["authorization"] == f"Bearer {KEY}" for r in server.requests)
        assert vectors.shape == (11, 32)
        np.testing.assert_array_equal(vectors[0], vectors[2])
        assert vectors[0] @ vectors[3] > vectors[0] @ vectors[4]  # shared words, higher cosine
        n = len(server.requests)
        again = openai_embeddings.OpenAIEmbedder("text-embedding-3-small", 32, server.base_url, openai_env).encode(texts)
        assert len(server.requests) == n                      # all from the cache
        np.testing.assert_array_equal(again, vectors)
        openai_embeddings.OpenAIEmbedder("text-embedding-3-small", 16, server.base_url, openai_env).encode(texts[:1])
        assert len(server.requests) == n + 1                  # another width is another cache key
    assert KEY.encode() not in openai_env.read_bytes() and b"rice" not in openai_env.read_bytes()


def test_openai_command_line_twice_sends_nothing_the_second_time(openai_env, tmp_path, capsys):
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(30, 1))
    test = write_tsv(tmp_path / "test.tsv", synthetic_pairs(30, 2))
    with FakeOpenAI() as server:
        args = ["--model", "openai:text-embedding-3-small", "--dimensions", "256", "--base-url", server.base_url,
                "--val", str(val), "--test", str(test), "--cache", str(openai_env), "--json", str(tmp_path / "r.json")]
        evaluate.main(args)
        first, n = (tmp_path / "r.json").read_text(), len(server.requests)
        assert n > 0
        evaluate.main(args)
        assert len(server.requests) == n and (tmp_path / "r.json").read_text() == first
    assert KEY not in capsys.readouterr().out + first


def test_the_cache_never_answers_for_another_server(openai_env, tmp_path):
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(30, 1))
    test = write_tsv(tmp_path / "test.tsv", synthetic_pairs(30, 2))
    results = []
    with FakeOpenAI() as a, FakeOpenAI(salt="another model behind the same name") as b:
        for server in (a, b, a):
            evaluate.main(["--model", "openai:text-embedding-3-small", "--base-url", server.base_url, "--val", str(val),
                           "--test", str(test), "--cache", str(openai_env), "--json", str(tmp_path / "r.json")])
            results.append(json.loads((tmp_path / "r.json").read_text()))
        assert len(b.requests) > 0          # B was asked, though the cache held A's vectors of every text
        assert results[0] != results[1] and results[2] == results[0]  # and each server's numbers are its own
        assert len(a.requests) == len(b.requests)  # A's second run came from the cache
    official = openai_embeddings.OpenAIEmbedder("text-embedding-3-small", 32, None, openai_env)
    assert official.key("x") == hashlib.sha256(json.dumps(["text-embedding-3-small", 32, "x"]).encode()).hexdigest()


def test_openai_without_a_key_is_a_one_line_error(monkeypatch, tmp_path, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    pairs = write_tsv(tmp_path / "v.tsv", [("a", "b", 1), ("c", "d", 0)])
    code, err = run_cli(evaluate.main, ["--model", "openai:text-embedding-3-small", "--val", str(pairs),
                                        "--test", str(pairs)], capsys)
    assert code == 2 and err.startswith("error: set OPENAI_API_KEY")


def test_three_models_on_the_same_pairs_each_tested_against_the_first(tiny_model_dir, openai_env, tmp_path, capsys):
    from embed_ft.model import Embedder
    from embed_ft.train import train
    from conftest import tiny_config
    files = {name: write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(n, seed))
             for name, n, seed in [("train", 192, 1), ("val", 96, 2), ("test", 300, 3)]}
    train(tiny_config(tiny_model_dir, files, tmp_path / "tuned", epochs=4))
    Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=16).save(tmp_path / "untrained")
    capsys.readouterr()
    with FakeOpenAI() as server:
        evaluate.main(["--model", str(tmp_path / "tuned"), "--model", str(tmp_path / "untrained"),
                       "--model", "openai:text-embedding-3-small", "--base-url", server.base_url, "--cache", str(openai_env),
                       "--val", str(files["val"]), "--test", str(files["test"]), "--json", str(tmp_path / "r.json")])
    out = capsys.readouterr().out
    result = json.loads((tmp_path / "r.json").read_text())
    assert list(result["models"]) == [str(tmp_path / "tuned"), str(tmp_path / "untrained"), "openai:text-embedding-3-small"]
    assert [t["model"] for t in result["paired"]] == [str(tmp_path / "untrained"), "openai:text-embedding-3-small"]
    against_untrained = result["paired"][0]
    assert against_untrained["against"] == str(tmp_path / "tuned") and against_untrained["verdict"] == "worse"
    assert against_untrained["error_b"] == pytest.approx(result["models"][str(tmp_path / "tuned")]["test"]["error_rate"])
    assert out.count("paired: ") == 2 and str(tmp_path / "untrained") in out  # the whole name, never cut
    assert "95% interval" in out.splitlines()[0]
