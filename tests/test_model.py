import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from embed_ft.errors import InputError
from embed_ft.model import Embedder, load_model, pick_device
from embed_ft.pooling import mean_pool

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
    from conftest import st_modules
    from sentence_transformers import SentenceTransformer
    models = st_modules()
    transformer = models.Transformer(str(tiny_model_dir), max_seq_length=32)
    torch.manual_seed(2)
    dense = models.Dense(32, 8, bias=False, activation_function=torch.nn.Identity())
    theirs = SentenceTransformer(modules=[transformer, models.Pooling(32, "mean"), dense, models.Normalize()], device="cpu")
    theirs.save(str(tmp_path))  # sentence-transformers' own save, its own module names
    ours = Embedder.load(tmp_path)
    assert ours.dim == 8 and ours.decision == {}
    np.testing.assert_allclose(ours.encode(TEXTS, bf16=False), theirs.encode(TEXTS), atol=1e-5)


@pytest.mark.parametrize("change, message", [
    (lambda d: patch_json(d / "1_Pooling" / "config.json", pooling_mode_cls_token=True),
     r"pooling \['cls', 'mean'\] is not supported"),
    (lambda d: patch_json(d / "1_Pooling" / "config.json", pooling_mode_mean_tokens=None, pooling_mode="attention"),
     r"pooling \['attention'\] is not supported"),
    (lambda d: patch_json(d / "2_Dense" / "config.json", activation_function="my_package.Swish"),
     "Dense activation my_package.Swish is not supported"),
    (lambda d: patch_json(d / "2_Dense" / "config.json", activation_function="torch.nn.modules.activation.Tanh"),
     "our projection is a bias-free Dense with activation torch.nn.modules.linear.Identity"),
    (lambda d: (d / "modules.json").write_text(json.dumps(json.loads((d / "modules.json").read_text())
                                                          + [{"path": "4", "type": "sentence_transformers.models.LayerNorm"}])),
     "module sentence_transformers.models.LayerNorm is not supported"),
    (lambda d: patch_json(d / "config_sentence_transformers.json", default_prompt_name="missing"),
     "default_prompt_name 'missing' is not one of its prompts"),
])
def test_load_refuses_what_it_cannot_compute_as_published(embedder, tmp_path, change, message):
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


REMOTE_CONFIG = '''from transformers import BertConfig


class TinyRemoteConfig(BertConfig):
    model_type = "tiny-remote"
'''
REMOTE_MODEL = '''from transformers import BertModel

from .configuration_tiny import TinyRemoteConfig


class TinyRemoteModel(BertModel):
    """A BERT that numbers its positions itself, as ALiBi models (jina-embeddings-v2) do."""
    config_class = TinyRemoteConfig

    def forward(self, input_ids=None, attention_mask=None, position_ids=None, **kwargs):
        return super().forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
'''


@pytest.fixture
def remote_code_dir(tiny_model_dir, tmp_path):
    """The tiny BERT as a model that runs its own code: auto_map in config.json, two .py files."""
    folder = tmp_path / "remote"
    shutil.copytree(tiny_model_dir, folder)
    (folder / "configuration_tiny.py").write_text(REMOTE_CONFIG)
    (folder / "modeling_tiny.py").write_text(REMOTE_MODEL)
    patch_json(folder / "config.json", model_type="tiny-remote", architectures=["TinyRemoteModel"],
               auto_map={"AutoConfig": "configuration_tiny.TinyRemoteConfig", "AutoModel": "modeling_tiny.TinyRemoteModel"})
    return folder


def test_a_model_that_runs_its_own_code_trains_saves_loads_in_sentence_transformers_and_is_served(
        remote_code_dir, pair_files, tmp_path, capsys):
    import openai
    from conftest import TEST_DEVICE, LoopbackServer, run_cli, tiny_config
    from sentence_transformers import SentenceTransformer

    from embed_ft import serve, train
    code, err = run_cli(train.main, ["--model", str(remote_code_dir), "--data", str(pair_files["train"]),
                                     "--out", str(tmp_path / "refused")], capsys)
    assert code == 2 and "runs its own model code (auto_map in its config.json): pass --trust-remote-code" in err
    out = tmp_path / "out"
    train.train(tiny_config(remote_code_dir, pair_files, out, epochs=1, eval_size=32, trust_remote_code=True))
    assert json.loads((out / "embedder.json").read_text())["trust_remote_code"] is True
    assert (out / "modeling_tiny.py").is_file()  # the code travels with the folder
    ours = Embedder.load(out)
    assert type(ours.encoder).__name__ == "TinyRemoteModel" and not ours.packs()  # positions of its own: it pads
    vectors = ours.encode(TEXTS, bf16=False)
    theirs = SentenceTransformer(str(out), device="cpu", trust_remote_code=True)
    np.testing.assert_allclose(theirs.encode(TEXTS), vectors, atol=1e-5)
    with LoopbackServer(serve.make_app(None, str(out), device=TEST_DEVICE, precision="fp32")) as server:
        served = openai.OpenAI(base_url=server.url + "/v1", api_key="unused").embeddings.create(model="any", input=TEXTS[:3])
        np.testing.assert_allclose([d.embedding for d in served.data], vectors[:3], atol=1e-5)


def test_a_role_takes_the_models_prompt_the_one_chosen_or_none():
    from embed_ft.st_layout import Layout
    e5 = Layout(prompts={"query": "query: ", "passage": "passage: "})  # an e5-style folder
    assert e5.prompt_chosen("query", None) == "query: " and e5.prompt_chosen("document", None) == "passage: "
    assert e5.prompt_chosen("document", "none") == "" and e5.prompt_chosen("document", "query") == "query: "
    with pytest.raises(InputError, match="names no prompt 'doc'; it names 'query', 'passage'"):
        e5.prompt_chosen("document", "doc")
