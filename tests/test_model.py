import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from errors import InputError
from model import Embedder, load_model, mean_pool, pick_device

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
    embedder.save(tmp_path, decision={"threshold": 0.25, "val": {"error_rate": 0.1}})
    assert not list(tmp_path.rglob("*.bin")) + list(tmp_path.rglob("*.pt")) + list(tmp_path.rglob("*.pkl"))
    loaded = Embedder.load(tmp_path)
    assert loaded.dim == 16 and loaded.max_length == embedder.max_length
    assert loaded.decision == {"threshold": 0.25, "val": {"error_rate": 0.1}}
    np.testing.assert_array_equal(loaded.encode(TEXTS), before)


def test_saved_folder_is_the_classic_sentence_transformers_layout(embedder, tmp_path):
    embedder.save(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    assert [(m["path"], m["type"]) for m in modules] == [
        ("", "sentence_transformers.models.Transformer"), ("1_Pooling", "sentence_transformers.models.Pooling"),
        ("2_Dense", "sentence_transformers.models.Dense"), ("3_Normalize", "sentence_transformers.models.Normalize")]
    assert json.loads((tmp_path / "sentence_bert_config.json").read_text())["max_seq_length"] == embedder.max_length
    assert json.loads((tmp_path / "1_Pooling" / "config.json").read_text())["pooling_mode_mean_tokens"] is True
    assert json.loads((tmp_path / "2_Dense" / "config.json").read_text()) == {
        "in_features": 32, "out_features": 16, "bias": False, "activation_function": "torch.nn.modules.linear.Identity"}
    assert list(load_file(tmp_path / "2_Dense" / "model.safetensors")) == ["linear.weight"]
    assert not (tmp_path / "projection.safetensors").exists()  # one copy of the projection


@pytest.mark.parametrize("width", [16, None])
def test_sentence_transformers_loads_our_folder_and_gives_our_embeddings(tiny_model_dir, tmp_path, width):
    from sentence_transformers import SentenceTransformer
    torch.manual_seed(1)
    ours = Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=width)
    ours.save(tmp_path)
    theirs = SentenceTransformer(str(tmp_path), device="cpu")
    np.testing.assert_allclose(theirs.encode(TEXTS), ours.encode(TEXTS, bf16=False), atol=1e-5)


def test_plain_transformers_reproduces_our_embeddings(embedder, tmp_path):
    """What the README and the model card show for users of transformers alone."""
    from transformers import AutoModel, AutoTokenizer
    embedder.save(tmp_path)
    tokenizer, encoder = AutoTokenizer.from_pretrained(tmp_path), AutoModel.from_pretrained(tmp_path)
    batch = tokenizer(TEXTS, padding=True, truncation=True, max_length=embedder.max_length, return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).float()
    vectors = (hidden * mask).sum(1) / mask.sum(1) @ load_file(tmp_path / "2_Dense/model.safetensors")["linear.weight"].T
    vectors = torch.nn.functional.normalize(vectors, dim=-1)
    np.testing.assert_allclose(vectors.numpy(), embedder.encode(TEXTS, bf16=False), atol=1e-5)


def test_load_reads_a_folder_saved_by_sentence_transformers_itself(tiny_model_dir, tmp_path):
    from sentence_transformers import SentenceTransformer, models
    transformer = models.Transformer(str(tiny_model_dir), max_seq_length=32)
    torch.manual_seed(2)
    dense = models.Dense(32, 8, bias=False, activation_function=torch.nn.Identity())
    theirs = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), dense, models.Normalize()], device="cpu")
    theirs.save(str(tmp_path))  # sentence-transformers' own save, its own module names
    ours = Embedder.load(tmp_path)
    assert ours.dim == 8 and ours.decision == {}
    np.testing.assert_allclose(ours.encode(TEXTS, bf16=False), theirs.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda d: patch_json(d / "1_Pooling" / "config.json", pooling_mode_mean_tokens=False, pooling_mode_cls_token=True),
     r"pooling \['cls'\] is not supported \(only mean\)"),
    (lambda d: patch_json(d / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Tanh"),
     "Dense activation torch.nn.modules.activation.Tanh is not supported"),
    (lambda d: patch_json(d / "2_Dense" / "config.json", activation_function=None),
     r"Dense activation missing \(sentence-transformers then applies Tanh\) is not supported"),
    (lambda d: (d / "modules.json").write_text(json.dumps(json.loads((d / "modules.json").read_text())
                                                          + [{"path": "4", "type": "sentence_transformers.models.LayerNorm"}])),
     "module sentence_transformers.models.LayerNorm is not supported"),
])
def test_load_refuses_what_is_not_our_architecture(embedder, tmp_path, change, message):
    embedder.save(tmp_path)
    change(tmp_path)
    with pytest.raises(InputError, match=message):
        Embedder.load(tmp_path)


def patch_json(path, **changes):
    config = json.loads(path.read_text()) | changes
    path.write_text(json.dumps({k: v for k, v in config.items() if v is not None}))


def test_load_model_continues_from_a_folder_and_checks_its_width(embedder, tiny_model_dir, tmp_path):
    embedder.save(tmp_path)
    again = load_model(str(tmp_path), dense_out_features=16)
    assert torch.equal(again.projection.weight, embedder.projection.weight)  # not a fresh projection
    assert load_model(str(tmp_path)).dim == 16                                # None: the folder's width
    with pytest.raises(InputError, match="already projects to 16 dimensions: pass --dense-out-features 16"):
        load_model(str(tmp_path), dense_out_features=8)
    Embedder.from_pretrained(str(tiny_model_dir)).save(tmp_path / "plain")  # no projection: one may be added
    assert load_model(str(tmp_path / "plain"), dense_out_features=8).dim == 8


@pytest.mark.parametrize("missing, message", [("config.json", "has no config.json"),
                                              ("vocab.txt tokenizer.json", "has no tokenizer"),
                                              ("model.safetensors", "has no weights")])
def test_a_model_folder_with_missing_files_is_named(tiny_model_dir, tmp_path, missing, message):
    folder = tmp_path / "m"
    shutil.copytree(tiny_model_dir, folder)
    for name in missing.split():
        (folder / name).unlink()
    with pytest.raises(InputError, match=f"{folder} {message}"):
        Embedder.from_pretrained(str(folder))


def test_similarity_and_is_duplicate_use_the_stored_threshold(embedder):
    a, b = TEXTS[:3], TEXTS[1:4]
    cosines = embedder.similarity(a, b)
    np.testing.assert_allclose(cosines, (embedder.encode(a) * embedder.encode(b)).sum(1), atol=2e-2)
    with pytest.raises(ValueError, match="no stored threshold"):
        embedder.is_duplicate(a, b)
    embedder.decision = {"threshold": float(np.median(cosines))}
    np.testing.assert_array_equal(embedder.is_duplicate(a, b), cosines > np.median(cosines))


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


def test_load_reads_no_pickles(embedder, tmp_path):
    embedder.save(tmp_path)
    weights = load_file(tmp_path / "model.safetensors")
    (tmp_path / "model.safetensors").unlink()
    torch.save(weights, tmp_path / "pytorch_model.bin")  # what an old or foreign folder may hold
    with pytest.raises(InputError, match=f"could not load the model in {tmp_path}: .*model.safetensors"):
        Embedder.load(tmp_path)


def test_on_a_gpu_attention_leaves_cudnn_whose_plans_cost_the_host_per_shape(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    enabled = torch.backends.cuda.cudnn_sdp_enabled()
    try:
        assert pick_device("cpu") == torch.device("cpu") and torch.backends.cuda.cudnn_sdp_enabled() == enabled
        torch.backends.cuda.enable_cudnn_sdp(True)
        assert pick_device("auto") == torch.device("cuda", 0) and not torch.backends.cuda.cudnn_sdp_enabled()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(enabled)


def test_packed_batches_give_the_padded_vectors_and_an_architecture_that_cannot_pack_is_padded(embedder, monkeypatch):
    ids = embedder.tokenizer(TEXTS[:3] + ["t2a", "how do i cook t1a t1b t1c"], truncation=True)["input_ids"]
    embedder.eval()
    assert embedder.packs()
    with torch.inference_mode():
        padded = embedder.embed_padded(ids).numpy()
    np.testing.assert_allclose(embedder.encode_ids(ids, batch_size=5, bf16=False), padded, atol=1e-6)
    unpackable = Embedder(embedder.encoder, embedder.tokenizer, None, embedder.max_length)
    unpackable.projection = embedder.projection

    def no_position_ids(*args, **kwargs):
        raise TypeError("forward() got an unexpected keyword argument 'position_ids'")
    monkeypatch.setattr(unpackable, "embed_packed", no_position_ids)
    assert not unpackable.packs()
    np.testing.assert_allclose(unpackable.encode_ids(ids, batch_size=2, bf16=False), padded, atol=1e-6)
