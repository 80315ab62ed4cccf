"""Every pooling as published: by hand, then against sentence-transformers itself (the reference),
packed and padded, before and after fine-tuning, and through serve.py."""
import numpy as np
import pytest
import torch
from conftest import TEST_DEVICE, LoopbackServer, st_modules, tiny_config

from embed_ft import serve, train
from embed_ft.model import Embedder, load_model
from embed_ft.pooling import pool_packed, pool_padded

TEXTS = ["how do i cook t1a", "t1b t1c", "what is the best way of t2a t2b t2c how do i", "", "t1b t1c"]
PROMPTS = {"query": "why ", "document": "what is ", "duplicates": "the best "}  # words of the tiny vocabulary

# Two texts padded on the right (3 and 2 tokens), one value a token: each mode by hand.
HIDDEN = torch.tensor([[[1.0], [2.0], [6.0]], [[4.0], [8.0], [100.0]]])
MASK = torch.tensor([[1, 1, 1], [1, 1, 0]])
BY_HAND = {"cls": [[1.0], [4.0]], "mean": [[3.0], [6.0]], "max": [[6.0], [8.0]], "lasttoken": [[6.0], [8.0]],
           "mean_sqrt_len_tokens": [[9 / 3 ** 0.5], [12 / 2 ** 0.5]],
           "weightedmean": [[(1 + 4 + 18) / 6], [(4 + 16) / 3]]}
# The same, leaving out the first token of each (a prompt of one token): weights keep their positions.
SKIPPED = {"cls": [[2.0], [8.0]], "mean": [[4.0], [8.0]], "max": [[6.0], [8.0]], "lasttoken": [[6.0], [8.0]],
           "mean_sqrt_len_tokens": [[8 / 2 ** 0.5], [8.0]], "weightedmean": [[(4 + 18) / 5], [8.0]]}


@pytest.mark.parametrize("mode", list(BY_HAND))
def test_each_mode_by_hand_padded_packed_and_with_the_prompt_left_out(mode):
    close(pool_padded(HIDDEN, MASK, mode), BY_HAND[mode])
    close(pool_padded(HIDDEN, MASK, mode, skip=1), SKIPPED[mode])
    left = pool_padded(torch.tensor([[[100.0], [4.0], [8.0]]]), torch.tensor([[0, 1, 1]]), mode)  # padded on the left
    close(left, [BY_HAND[mode][1]])
    # packed: both texts in one row, positions restarting at each text
    row_hidden = torch.tensor([[[1.0], [2.0], [6.0], [4.0], [8.0]]])
    texts, positions = torch.tensor([[0, 0, 0, 1, 1]]), torch.tensor([[0, 1, 2, 0, 1]])
    close(pool_packed(row_hidden, texts, positions, 2, mode), BY_HAND[mode])
    close(pool_packed(row_hidden, texts, positions, 2, mode, skip=1), SKIPPED[mode])


def close(pooled: torch.Tensor, expected: list) -> None:
    np.testing.assert_allclose(pooled.numpy(), np.array(expected), rtol=1e-6)


def published_folder(tiny_model_dir, folder, mode: str, prompts: bool, include_prompt: bool, normalize: bool,
                     dense: bool = False):
    """A model as sentence-transformers itself builds and saves one: the tiny BERT, a pooling, maybe
    a published Dense (with Tanh), maybe Normalize, maybe prompts with a default."""
    from sentence_transformers import SentenceTransformer
    models = st_modules()
    torch.manual_seed(3)
    modules = [models.Transformer(str(tiny_model_dir), max_seq_length=32), models.Pooling(32, mode, include_prompt=include_prompt)]
    modules += [models.Dense(32, 24, activation_function=torch.nn.Tanh())] if dense else []
    modules += [models.Normalize()] if normalize else []
    SentenceTransformer(modules=modules, prompts=PROMPTS if prompts else {}, device="cpu",
                        default_prompt_name="duplicates" if prompts else None).save(str(folder))
    return folder


VARIANTS = [  # (prompts, include_prompt, normalize, published Dense)
    (False, True, True, False), (True, True, False, False), (True, False, True, False), (False, True, False, True)]


@pytest.mark.parametrize("mode", ["cls", "mean", "max", "lasttoken"])
@pytest.mark.parametrize("prompts, include_prompt, normalize, dense", VARIANTS)
def test_a_published_model_gives_sentence_transformers_vectors_packed_and_padded(tiny_model_dir, tmp_path, mode, prompts,
                                                                                 include_prompt, normalize, dense):
    from sentence_transformers import SentenceTransformer
    folder = published_folder(tiny_model_dir, tmp_path / "m", mode, prompts, include_prompt, normalize, dense)
    theirs = SentenceTransformer(str(folder), device="cpu")
    ours = load_model(str(folder))
    assert ours.packs()  # the tiny BERT packs, so the first encode below is packed
    expected = {"default": theirs.encode(TEXTS), "query": theirs.encode_query(TEXTS),
                "document": theirs.encode_document(TEXTS)}
    for packing in (True, False):
        ours.packing = packing
        for role, vectors in expected.items():
            np.testing.assert_allclose(ours.encode(TEXTS, bf16=False, role=role), vectors, atol=1e-5)
    if prompts:  # the prompts do reach the vectors
        assert not np.allclose(expected["query"], expected["default"], atol=1e-3)


@pytest.mark.parametrize("mode, prompts, include_prompt, normalize", [
    ("cls", True, True, True), ("mean", True, False, False), ("max", False, True, True), ("lasttoken", True, False, True)])
def test_after_fine_tuning_sentence_transformers_and_the_server_give_our_vectors(tiny_model_dir, pair_files, tmp_path,
                                                                                 mode, prompts, include_prompt, normalize):
    from sentence_transformers import SentenceTransformer
    import openai
    start = published_folder(tiny_model_dir, tmp_path / "published", mode, prompts, include_prompt, normalize)
    out = tmp_path / "out"
    metrics = train.train(tiny_config(start, pair_files, out, epochs=1, eval_size=32))
    assert metrics["model"]["pooling"] == mode and metrics["model"]["include_prompt"] == include_prompt
    card = (out / "README.md").read_text()
    assert f"{mode} pooling as published" in card and "a linear projection of ours to 16 dimensions" in card
    assert ("`duplicates`: `'the best '`" in card) == prompts and ("embeddings not normalised" in card) != normalize
    ours = Embedder.load(out)
    published = load_model(str(start)).layout
    assert (ours.layout.pooling, ours.layout.prompts, ours.layout.normalize) == (mode, published.prompts, normalize)
    assert not prompts or published.prompts == PROMPTS
    vectors = ours.encode(TEXTS, bf16=False)
    theirs = SentenceTransformer(str(out), device="cpu")
    np.testing.assert_allclose(theirs.encode(TEXTS), vectors, atol=1e-5)
    np.testing.assert_allclose(theirs.encode_query(TEXTS), ours.encode(TEXTS, bf16=False, role="query"), atol=1e-5)
    with LoopbackServer(serve.make_app(None, str(out), device=TEST_DEVICE, precision="fp32")) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused")
        served = client.embeddings.create(model="any", input=TEXTS[:3])  # the API refuses an empty text, as OpenAI's does
        np.testing.assert_allclose([d.embedding for d in served.data], vectors[:3], atol=1e-5)
        queries = client.embeddings.create(model="any", input=TEXTS[:3], extra_body={"input_type": "query"})
        np.testing.assert_allclose([d.embedding for d in queries.data], theirs.encode_query(TEXTS[:3]), atol=1e-5)
