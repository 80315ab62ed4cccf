"""vector_index.py: exact neighbours by hand, a graph's and the lists' recall, and an index that grows."""
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
    graph = vector_index.build(vectors, "hnsw")
    rows = np.sort(np.random.default_rng(0).choice(3000, 200, replace=False))
    truth = np.argsort(-(vectors[rows] @ vectors.T), axis=1)[:, :10]
    _, found = vector_index.search(graph, vectors[rows], 10)
    by_hand = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth.tolist(), found.tolist())])
    assert vector_index.recall_at_10(graph, sample=200) == pytest.approx(by_hand)
    assert vector_index.recall_at_10(vector_index.build(vectors, "exact")) == 1.0


def test_an_exact_index_that_grows_past_its_limit_becomes_a_graph_holding_every_vector(monkeypatch):
    monkeypatch.setattr(vector_index, "EXACT_UP_TO", 100)
    vectors = unit(150)
    index = vector_index.extend(vector_index.build(vectors[:80]), vectors[80:90])
    assert vector_index.kind(index) == "exact" and index.ntotal == 90
    index = vector_index.extend(index, vectors[90:])
    assert vector_index.kind(index).startswith("hnsw") and index.ntotal == 150
    _, rows = vector_index.search(index, vectors, 1)
    assert (rows[:, 0] == np.arange(150)).mean() > 0.95  # each vector finds itself, in the corpus's order


def test_lists_of_8_bit_vectors_above_the_graphs_limit_and_their_recall_counted_by_hand(monkeypatch):
    monkeypatch.setattr(vector_index, "EXACT_UP_TO", 1000)
    monkeypatch.setattr(vector_index, "GRAPH_UP_TO", 2000)
    assert [vector_index.kind_for(n) for n in (1000, 2000, 2001)] == ["exact", "hnsw", "ivf"]
    vectors = unit(3000)
    lists = vector_index.build(vectors)
    assert vector_index.kind(lists).startswith("ivf-sq8 (54 cells") and lists.ntotal == 3000  # sqrt(3000) cells
    stored = lists.reconstruct_n(0, 3000)                       # one byte a dimension: near, not equal
    assert 0 < np.abs(stored - vectors).max() < 0.02
    rows = np.sort(np.random.default_rng(0).choice(3000, 200, replace=False))
    truth = np.argsort(-(stored[rows] @ stored.T), axis=1)[:, :10]
    _, found = vector_index.search(lists, stored[rows], 10)
    by_hand = np.mean([len(set(t) & set(f)) / 10 for t, f in zip(truth.tolist(), found.tolist())])
    assert vector_index.recall_at_10(lists, sample=200) == pytest.approx(by_hand) and by_hand < 1.0
