import json

import numpy as np
import pytest
import torch
from conftest import SHARED, TEST_DEVICE, needs_shared, tiny_config

from embed_ft import data, train
from embed_ft.errors import InputError
from embed_ft.model import Embedder
from embed_ft.options import Config

METRIC_KEYS = {"error_rate", "accuracy", "precision", "recall", "f1", "average_precision", "roc_auc",
               "threshold", "n_pairs", "constraint"}


def config_for(tiny_model_dir, pair_files, out, **overrides) -> train.Config:
    return tiny_config(tiny_model_dir, pair_files, out, **{"epochs": 6} | overrides)


def test_training_beats_zero_shot_and_writes_everything(tiny_model_dir, pair_files, tmp_path):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path / "out"))
    for stage in ("zero_shot", "fine_tuned"):
        for split in ("val", "test"):
            assert set(metrics[stage][split]) == METRIC_KEYS
    assert metrics["fine_tuned"]["test"]["error_rate"] < metrics["zero_shot"]["test"]["error_rate"] - 0.05
    assert metrics["training"]["pairs"] == 6 * 192 and metrics["training"]["stopped_by"] == "completed"
    assert len(metrics["training"]["val_errors"]) == 6 and metrics["environment"]["torch"] == torch.__version__
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["fine_tuned"] == metrics["fine_tuned"] and on_disk["config"]["loss"] == "ocl"
    assert not (tmp_path / "out" / "checkpoint.pt").exists()  # removed once the run is complete
    reloaded = Embedder.load(tmp_path / "out")
    assert reloaded.dim == 16 and reloaded.decision["threshold"] == metrics["fine_tuned"]["val"]["threshold"]
    assert reloaded.decision["test"] == metrics["fine_tuned"]["test"]
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: sentence-transformers\npipeline_tag: sentence-similarity\n")
    assert f"{metrics['fine_tuned']['test']['error_rate']:.2%}" in card and "hf upload" in card


def test_is_duplicate_agrees_with_the_evaluation_at_the_stored_threshold(tiny_model_dir, pair_files, tmp_path):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=2))
    model = Embedder.load(tmp_path).to(TEST_DEVICE)  # where the evaluation ran: a GPU's bf16 is not a CPU's fp32
    test = data.load_pairs(str(pair_files["test"]))
    predicted = model.is_duplicate([a for a, _, _ in test], [b for _, b, _ in test])
    labels = np.array([y for _, _, y in test])
    assert np.mean(predicted != labels) == pytest.approx(metrics["fine_tuned"]["test"]["error_rate"], abs=1e-12)
    assert labels[predicted].mean() == pytest.approx(metrics["fine_tuned"]["test"]["precision"], abs=1e-12)


def test_a_continued_run_starts_where_the_saved_one_ended(tiny_model_dir, pair_files, tmp_path):
    first = train.train(config_for(tiny_model_dir, pair_files, tmp_path / "first", epochs=2))
    second = train.train(config_for(tiny_model_dir, pair_files, tmp_path / "second", model=str(tmp_path / "first"),
                                    epochs=1))
    assert second["zero_shot"] == first["fine_tuned"]  # the projection came along, not a fresh one
    with pytest.raises(InputError, match="already projects to 16 dimensions"):
        train.train(config_for(tiny_model_dir, pair_files, tmp_path / "third", model=str(tmp_path / "first"),
                               dense_out_features=8))


def test_best_epoch_selection_restores_the_best_weights_and_patience_stops(tiny_model_dir, pair_files, tmp_path,
                                                                           monkeypatch):
    scripted = iter([0.30, 0.10, 0.20, 0.25, 0.05])  # validation errors after epochs 1, 2, 3, 4, (5)
    real_scores, real_end = train.evaluate.evaluate_scores, train.end_of_epoch
    weights_after = []

    def scripted_scores(val_scores, val_labels, test_scores=None, *args, **kwargs):
        result = real_scores(val_scores, val_labels, test_scores, *args, **kwargs)
        if test_scores is None:  # a per-epoch validation
            result["val"]["error_rate"] = next(scripted)
        return result

    def recording_end(run, *args):
        weights_after.append({k: v.detach().cpu().clone() for k, v in run.model.state_dict().items()})
        return real_end(run, *args)

    monkeypatch.setattr(train.evaluate, "evaluate_scores", scripted_scores)
    monkeypatch.setattr(train, "end_of_epoch", recording_end)
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=6, patience=2))
    assert metrics["training"]["val_errors"] == [0.30, 0.10, 0.20, 0.25]
    assert metrics["training"]["best_epoch"] == 2 and metrics["training"]["stopped_by"] == "patience"
    saved = Embedder.load(tmp_path).state_dict()
    assert all(torch.equal(saved[k], v) for k, v in weights_after[1].items())
    assert not all(torch.equal(saved[k], v) for k, v in weights_after[3].items())


def test_a_time_budget_ends_training_then_evaluates_and_saves(tiny_model_dir, pair_files, tmp_path):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, max_minutes=1e-9))
    assert metrics["training"]["steps"] == 1 and metrics["training"]["stopped_by"] == "time_budget"
    assert "test" in metrics["fine_tuned"] and Embedder.load(tmp_path).dim == 16


@pytest.mark.parametrize("stop_at_step", [3, 15])  # 12 steps an epoch: inside the first epoch, inside the second
def test_a_budget_that_ends_inside_an_epoch_judges_it_like_any_epoch_and_says_which_weights_were_kept(
        tiny_model_dir, pair_files, tmp_path, monkeypatch, capsys, stop_at_step):
    requested = train.stop_requested

    def budget_spent_at(run, stop, device):  # the clock, made exact: the budget runs out at this step
        if run.progress.step == stop_at_step:
            run.stopped_by = "time_budget"
        return requested(run, stop, device)
    monkeypatch.setattr(train, "stop_requested", budget_spent_at)
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=2, max_minutes=60))
    training = metrics["training"]
    assert training["steps"] == stop_at_step and training["stopped_by"] == "time_budget"
    judged = training["val_errors"]
    assert len(judged) == stop_at_step // 12 + 1  # every whole epoch, and the partial one
    best = int(np.argmin(judged)) + 1
    assert training["best_epoch"] == best and metrics["fine_tuned"]["val"]["error_rate"] == pytest.approx(judged[best - 1])
    partial = " (partial: 3 of 12 steps)" if best == len(judged) else ""
    assert training["kept"] == f"epoch {best}{partial}, the best of {len(judged)} judged on validation (error {judged[best - 1]:.2%})"
    printed = capsys.readouterr().out
    assert f"epoch {len(judged)} (partial: 3 of 12 steps): val error" in printed and f"kept: {training['kept']}" in printed
    assert f"kept: {training['kept']}" in (tmp_path / "README.md").read_text()


def test_the_card_names_what_the_folder_holds_and_no_projection_it_lacks(tiny_model_dir, pair_files, tmp_path):
    train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=1, dense_out_features=0))
    card = (tmp_path / "README.md").read_text()
    assert "mean pooling (the base has no sentence-transformers modules), no projection of ours, unit-length" in card
    assert "projection to" not in card and "2_Dense" not in card and not (tmp_path / "2_Dense").exists()


def test_satisficing_threshold_is_recorded(tiny_model_dir, pair_files, tmp_path):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=1, min_recall=0.95))
    assert metrics["fine_tuned"]["val"]["recall"] >= 0.95
    assert metrics["fine_tuned"]["val"]["constraint"] == metrics["fine_tuned"]["test"]["constraint"] == {"min_recall": 0.95}


def test_the_retrieval_objective_chooses_epochs_by_validation_mrr_and_reports_both_views(tiny_model_dir, pair_files,
                                                                                         tmp_path):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, objective="retrieval", epochs=3))
    history = metrics["training"]["val_mrr"]
    assert len(history) == 3 and metrics["training"]["best_epoch"] == 1 + int(np.argmax(history))
    for stage in ("zero_shot", "fine_tuned"):
        assert set(metrics[stage]) == {"val", "test", "retrieval"} and set(metrics[stage]["retrieval"]) == {"val", "test"}
    assert metrics["fine_tuned"]["retrieval"]["val"]["mrr"] == pytest.approx(max(history))  # the kept epoch's
    assert metrics["fine_tuned"]["retrieval"]["test"]["mrr"] > metrics["zero_shot"]["retrieval"]["test"]["mrr"]
    assert "objective `retrieval` (epochs chosen by validation MRR)" in (tmp_path / "README.md").read_text()
    assert Embedder.load(tmp_path).decision["threshold"] == metrics["fine_tuned"]["val"]["threshold"]  # still carried
    with pytest.raises(InputError, match="--objective retrieval trains with in-batch InfoNCE"):
        train.train(config_for(tiny_model_dir, pair_files, tmp_path / "other", objective="retrieval", loss="cosent"))
    with pytest.raises(InputError, match="already trains with in-batch InfoNCE alone; drop --in-batch-weight 0.5"):
        train.train(config_for(tiny_model_dir, pair_files, tmp_path / "other", objective="retrieval", in_batch_weight=0.5))


@pytest.mark.parametrize("loss", ["cosent", "contrastive", "cosine"])
def test_every_loss_learns(tiny_model_dir, pair_files, tmp_path, loss):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, loss=loss))
    assert metrics["fine_tuned"]["val"]["roc_auc"] > metrics["zero_shot"]["val"]["roc_auc"] + 0.05


def test_same_seed_same_result_on_cpu(tiny_model_dir, pair_files, tmp_path):
    runs = [train.train(config_for(tiny_model_dir, pair_files, tmp_path / str(i), epochs=1, seed=s, device="cpu"))
            for i, s in enumerate([7, 7, 8])]
    assert runs[0]["fine_tuned"] == runs[1]["fine_tuned"]
    weights = [Embedder.load(tmp_path / str(i)).projection.weight for i in range(3)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_merge_saves_the_starting_and_the_fine_tuned_weights_averaged(tiny_model_dir, pair_files, tmp_path):
    config = lambda name, **o: config_for(tiny_model_dir, pair_files, tmp_path / name, epochs=1, device="cpu", **o)  # noqa: E731
    start = train.prepare(config("start"))[2].state_dict()  # the model as training finds it (projection drawn)
    train.train(config("full"))
    metrics = train.train(config("quarter", merge=0.25))
    full, quarter = (Embedder.load(tmp_path / name).state_dict() for name in ("full", "quarter"))
    assert not torch.equal(full["projection.weight"], start["projection.weight"])  # training moved it
    for k, v in start.items():
        assert torch.allclose(quarter[k], 0.75 * v + 0.25 * full[k], atol=1e-6) if v.is_floating_point() else torch.equal(quarter[k], v), k
    assert metrics["config"]["merge"] == 0.25 and "0.25 x the fine-tuned ones + 0.75 x" in (tmp_path / "quarter" / "README.md").read_text()
    with pytest.raises(InputError, match="--merge must be"):
        train.train(config("bad", merge=1.5))


def test_length_groups_give_the_same_embeddings_as_one_padded_batch(tiny_model_dir):
    model = Embedder.from_pretrained(str(tiny_model_dir), 16).eval()  # eval: no dropout to differ
    words = "how do i cook t1a t2b t3c what is the best way of".split()
    pairs = [(" ".join(words[: 1 + i % 12]), " ".join(words[i % 5:]), i % 2) for i in range(8)]  # many lengths
    tokenized = train.batching.TokenizedPairs(pairs, model)
    (one,), restore_one, *_ = next(tokenized.batches(np.arange(8), 8, length_groups=1))
    groups, restore, *_ = next(tokenized.batches(np.arange(8), 8, length_groups=4))
    with torch.no_grad():
        grouped = torch.cat([model(**g) for g in groups])[restore]
        assert torch.allclose(model(**one)[restore_one], grouped, atol=1e-5)
    assert sum(g["input_ids"].numel() for g in groups) < one["input_ids"].numel()


def test_freeze_encoder_trains_only_the_projection(tiny_model_dir, pair_files, tmp_path):
    train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=1, freeze_encoder=True))
    before, after = Embedder.from_pretrained(str(tiny_model_dir), 16), Embedder.load(tmp_path)
    for (name, p), q in zip(before.encoder.named_parameters(), after.encoder.parameters()):
        assert torch.equal(p, q), name
    assert not torch.equal(before.projection.weight, after.projection.weight)


def test_split_off_data_file_when_no_val_and_test(tiny_model_dir, pair_files, tmp_path):
    config = config_for(tiny_model_dir, pair_files, tmp_path, val="", test="", val_size=0.25, test_size=40,
                        dataset_size=50, epochs=1)
    train_pairs, val, test = train.load_splits(config)
    assert len(train_pairs) == 50 and 0 < len(val) <= 48 and 0 < len(test) <= 40


@needs_shared
def test_real_minilm_on_quora_beats_zero_shot(minilm_dir, tmp_path):
    """The real thing, small enough for the suite: 800 Quora pairs, one epoch on a CPU, the shared
    leakage-free splits (400 validation and test pairs each, the same subset every time)."""
    splits = SHARED / "data" / "quora" / "splits"
    config = train.Config(model=str(minilm_dir), data=str(splits / "train.tsv.gz"), val=str(splits / "val.tsv.gz"),
                          test=str(splits / "test.tsv.gz"), dataset_size=800, epochs=1, eval_size=400, max_length=64,
                          select_best=False, device="cpu", out=str(tmp_path))  # one epoch: the last is the best
    metrics = train.train(config)
    zero_shot, fine_tuned = metrics["zero_shot"]["test"], metrics["fine_tuned"]["test"]
    assert zero_shot["n_pairs"] == fine_tuned["n_pairs"] == 400
    assert fine_tuned["roc_auc"] > zero_shot["roc_auc"] + 0.005, (zero_shot, fine_tuned)
    assert fine_tuned["error_rate"] < zero_shot["error_rate"], (zero_shot, fine_tuned)
    # The saved model is the trained one: its stored threshold classifies the test pairs as the
    # evaluation did ...
    test = train.data.subsample(train.data.load_pairs(config.test), config.eval_size, seed=0)  # as load_splits does
    model = Embedder.load(tmp_path)
    predicted = model.is_duplicate([a for a, _, _ in test], [b for _, b, _ in test])
    assert np.mean(predicted != np.array([y for *_, y in test])) == pytest.approx(fine_tuned["error_rate"], abs=1e-12)
    # ... and sentence-transformers, loading the folder as it is, gives the same embeddings.
    from sentence_transformers import SentenceTransformer
    texts = [t for a, b, _ in test[:50] for t in (a, b)]
    np.testing.assert_allclose(SentenceTransformer(str(tmp_path), device="cpu").encode(texts),
                               model.encode(texts, bf16=False), atol=1e-5)


@pytest.mark.parametrize("asked, device, groups", [(0, "cuda", 1), (0, "cpu", 2), (3, "cuda", 3), (3, "cpu", 3)])
def test_length_groups_default_to_one_call_on_a_gpu_and_two_on_a_cpu(asked, device, groups):
    assert train.length_groups_for(Config(length_groups=asked), torch.device(device)) == groups


def test_the_run_ends_with_a_paired_verdict_against_the_published_model(tiny_model_dir, tmp_path):
    from conftest import synthetic_pairs, write_tsv
    files = {name: write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(n, seed))
             for name, n, seed in [("train", 192, 1), ("val", 96, 2), ("test", 400, 3), ("few", 30, 4)]}
    metrics = train.train(config_for(tiny_model_dir, files, tmp_path / "easy", epochs=4))
    pairs = metrics["verdict"]["pairs"]
    assert pairs["verdict"] == "better" and pairs["n"] == 400 and pairs["only_a_right"] > pairs["only_b_right"]
    assert pairs["error_a"] == pytest.approx(metrics["fine_tuned"]["test"]["error_rate"])
    assert pairs["error_b"] == pytest.approx(metrics["zero_shot"]["test"]["error_rate"])
    assert "**better**" in (tmp_path / "easy" / "README.md").read_text()
    # 30 test pairs and a model that barely moves: too few to tell, and it says how many would be needed
    few = config_for(tiny_model_dir, files | {"test": files["few"]}, tmp_path / "few", epochs=1, lr=1e-5)
    verdict = train.train(few)["verdict"]["pairs"]
    assert verdict["verdict"] == f"no detectable difference on 30 test pairs in {verdict['groups']} groups" and verdict["n"] == 30
    assert Embedder.load(tmp_path / "few").dim == 16  # saved either way
