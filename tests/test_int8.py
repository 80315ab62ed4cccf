"""int8.py: the quantised product against one computed by hand, a quantised copy that leaves the model
as it was, and a corpus embedded and searched in int8."""
import numpy as np
import torch
from conftest import corpus_texts
from torch import nn

from embed_ft import corpus, corpus_folder, corpus_search, evaluate, int8
from embed_ft.model import load_model


def test_the_product_is_the_one_computed_by_hand_in_integers():
    torch.manual_seed(0)
    linear = nn.Linear(5, 3)
    x = torch.randn(2, 4, 5)
    w, b = linear.weight.detach().numpy().astype(np.float64), linear.bias.detach().numpy()
    w_scale = np.abs(w).max(1) / 127
    w_int = np.round(w / w_scale[:, None])
    rows = x.reshape(-1, 5).numpy().astype(np.float64)
    x_scale = np.abs(rows).max(1, keepdims=True) / 127
    x_int = np.round(rows / x_scale)
    expected = (x_int @ w_int.T) * x_scale * w_scale + b   # integers multiplied, then both scales
    got = int8.Int8Linear(linear)(x)
    assert got.shape == (2, 4, 3)
    np.testing.assert_allclose(got.reshape(-1, 3).numpy(), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(got.detach().numpy() - linear(x).detach().numpy()).max() < 0.05  # and near the float product


def test_a_quantised_copy_leaves_the_model_as_it_was_and_moves_its_vectors_little(tiny_model_dir):
    model = load_model(str(tiny_model_dir)).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    fast = int8.quantised(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(isinstance(m, nn.Linear) for m in fast.encoder.modules())
    assert sum(isinstance(m, int8.Int8Linear) for m in fast.encoder.modules()) == \
        sum(isinstance(m, nn.Linear) for m in model.encoder.modules())
    texts = corpus_texts(40)
    exact, moved = (evaluate.unit_rows(m.encode(texts, bf16=False)) for m in (model, fast))
    cosines = (exact * moved).sum(1)
    assert cosines.min() > 0.98 and not np.allclose(exact, moved, atol=1e-6)


def test_an_int8_corpus_says_so_and_is_searched_in_int8(tiny_model_dir, tmp_path, monkeypatch):
    model = load_model(str(tiny_model_dir)).eval()
    (tmp_path / "c.txt").write_text("\n".join(corpus_texts(60)) + "\n")
    manifest = corpus.embed_corpus(tmp_path / "c.txt", tmp_path / "out", model, "tiny", int8=True)
    assert manifest["dtype"] == "int8" and manifest["texts"] == 60
    stored = evaluate.unit_rows(np.concatenate([corpus_folder.read_vectors(p) for p in corpus_folder.shards(tmp_path / "out")]))
    queries = corpus_texts(8, seed=5)
    searched_with = []
    monkeypatch.setattr(corpus_search, "quantised", lambda m: searched_with.append(int8.quantised(m)) or searched_with[-1])
    hits = corpus_search.search_corpus(tmp_path / "out", queries, model, k=1)
    assert len(searched_with) == 1   # the queries went through an int8 copy, as the corpus did
    best = (evaluate.unit_rows(searched_with[0].encode(queries, role="query", bf16=False)) @ stored.T).max(1)
    np.testing.assert_allclose([h[0]["score"] for h in hits], best, atol=1e-4)
