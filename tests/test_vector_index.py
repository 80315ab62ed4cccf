"""vector_index.py: exact neighbours by hand, a graph's recall, and an index that grows."""
import numpy as np
import pytest

from embed_ft import vector_index


def unit(n: int, width: int = 16, seed: int = 0) -> np.ndarray:
    vectors = np.random.default_rng(seed).standard_normal((n, width)).astype(np.float32)
    return vectors / np.linalg.norm(vectors, axis=1, keepdims=True)


def test_exact_neighbours_merged_chunk_by_chunk_are_a_full_sort():
    vectors, queries = unit(1000), unit(30, seed=1)
    full = np.argsort(-(queries @ vectors.T), axis=1, kind="stable")
    assert (vector_index.exact_neighbours(vectors, queries, 10, chunk=64) == full[:, :10]).all()
    fewer_than_k = np.argsort(-(queries @ vectors[:4].T), axis=1, kind="stable")
    assert (vector_index.exact_neighbours(vectors[:4], queries, 10) == fewer_than_k).all()


def test_a_graphs_recall_is_counted_against_exact_search_on_its_own_vectors():
    vectors = unit(3000)
    graph = vector_index.build(vectors, exact=False)
    rows = np.sort(np.random.default_rng(0).choice(3000, 200, replace=False))
    truth = np.argsort(-(vectors[rows] @ vectors.T), axis=1)[:, :10]
    _, found = vector_index.search(graph, vectors[rows], 10)
    by_hand = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth.tolist(), found.tolist())])
    assert vector_index.recall_at_10(graph, sample=200) == pytest.approx(by_hand)
    assert vector_index.recall_at_10(vector_index.build(vectors, exact=True)) == 1.0


def test_an_exact_index_that_grows_past_its_limit_becomes_a_graph_holding_every_vector(monkeypatch):
    monkeypatch.setattr(vector_index, "EXACT_UP_TO", 100)
    vectors = unit(150)
    index = vector_index.extend(vector_index.build(vectors[:80]), vectors[80:90])
    assert vector_index.kind(index) == "exact" and index.ntotal == 90
    index = vector_index.extend(index, vectors[90:])
    assert vector_index.kind(index).startswith("hnsw") and index.ntotal == 150
    _, rows = vector_index.search(index, vectors, 1)
    assert (rows[:, 0] == np.arange(150)).mean() > 0.95  # each vector finds itself, in the corpus's order
