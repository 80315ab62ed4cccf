import numpy as np
import pytest
import torch

from model import Embedder, mean_pool

TEXTS = ["how do i cook t1a", "t1b t1c", "what is the best way of t2a t2b t2c how do i", "", "t1b t1c"]


@pytest.fixture
def embedder(tiny_model_dir):
    torch.manual_seed(0)
    return Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=16)


def test_mean_pool_ignores_padding():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]], [[5.0, 6.0], [7.0, 8.0], [9.0, 10.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert torch.equal(mean_pool(hidden, mask), torch.tensor([[2.0, 3.0], [7.0, 8.0]]))


def test_encode_gives_unit_rows_in_input_order(embedder):
    vectors = embedder.encode(TEXTS, batch_size=2)
    assert vectors.shape == (5, 16) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(vectors[1], vectors[4])            # a repeated text, embedded once
    assert not np.allclose(vectors[0], vectors[1])
    one_by_one = np.concatenate([embedder.encode([t]) for t in TEXTS])  # no padding at all
    np.testing.assert_allclose(vectors, one_by_one, atol=2e-2)      # bf16 autocast where the CPU has it


def test_encode_matches_the_training_forward_pass(embedder):
    features = embedder.tokenizer(TEXTS[:3], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = embedder(**features).numpy()
    np.testing.assert_allclose(embedder.encode(TEXTS[:3]), expected, atol=2e-2)


def test_square_projection_starts_as_a_rotation(tiny_model_dir):
    plain = Embedder.from_pretrained(str(tiny_model_dir))
    rotated = Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=32)  # the encoder's width
    assert plain.dim == rotated.dim == 32
    p, r = plain.encode(TEXTS), rotated.encode(TEXTS)
    assert not np.allclose(p, r, atol=1e-2)                        # different vectors ...
    np.testing.assert_allclose(p @ p.T, r @ r.T, atol=2e-2)       # ... with the same cosines


def test_save_and_load_roundtrip_without_pickles(embedder, tmp_path):
    with torch.no_grad():
        embedder.projection.weight.mul_(2.0)  # something a fresh projection would not have
    before = embedder.encode(TEXTS)
    embedder.save(tmp_path)
    assert not list(tmp_path.glob("*.bin")) + list(tmp_path.glob("*.pt")) + list(tmp_path.glob("*.pkl"))
    loaded = Embedder.load(tmp_path)
    assert loaded.dim == 16 and loaded.max_length == embedder.max_length
    np.testing.assert_array_equal(loaded.encode(TEXTS), before)


def test_no_projection_roundtrip(tiny_model_dir, tmp_path):
    embedder = Embedder.from_pretrained(str(tiny_model_dir), max_length=8)
    embedder.save(tmp_path)
    loaded = Embedder.load(tmp_path)
    assert loaded.projection is None and loaded.max_length == 8
    np.testing.assert_array_equal(loaded.encode(TEXTS), embedder.encode(TEXTS))


def test_encode_precision_can_be_forced(embedder):
    fp32, bf16 = embedder.encode(TEXTS, bf16=False), embedder.encode(TEXTS, bf16=True)
    assert not np.array_equal(fp32, bf16)
    np.testing.assert_allclose(fp32, bf16, atol=2e-2)
