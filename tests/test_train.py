import json

import numpy as np
import pytest
import torch
from conftest import needs_shared, write_tsv, SHARED

import train
from model import Embedder

METRIC_KEYS = {"error_rate", "accuracy", "precision", "recall", "f1", "average_precision", "roc_auc",
               "threshold", "n_pairs"}


def config_for(tiny_model_dir, pair_files, out, **overrides) -> train.Config:
    settings = dict(model=str(tiny_model_dir), data=str(pair_files["train"]), val=str(pair_files["val"]),
                    test=str(pair_files["test"]), dense_out_features=16, epochs=6, batch_size=16, lr=1e-3,
                    device="cpu", out=str(out))
    return train.Config(**settings | overrides)


def test_training_beats_zero_shot_and_writes_everything(tiny_model_dir, pair_files, tmp_path):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path / "out"))
    for stage in ("zero_shot", "fine_tuned"):
        for split in ("val", "test"):
            assert set(metrics[stage][split]) == METRIC_KEYS
    assert metrics["fine_tuned"]["test"]["error_rate"] < metrics["zero_shot"]["test"]["error_rate"] - 0.1
    assert metrics["training"]["pairs"] == 6 * 192
    on_disk = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert on_disk["fine_tuned"] == metrics["fine_tuned"] and on_disk["config"]["loss"] == "ocl"
    reloaded = Embedder.load(tmp_path / "out")
    assert reloaded.dim == 16


def test_eval_every_epoch_reports_validation_error(tiny_model_dir, pair_files, tmp_path, capsys):
    train.train(config_for(tiny_model_dir, pair_files, tmp_path, epochs=3, eval_every_epoch=True, save=False))
    out = capsys.readouterr().out
    assert "epoch 1: val error" in out and "epoch 2: val error" in out and "epoch 3:" not in out
    assert not (tmp_path / "model.safetensors").exists()  # --no-save


@pytest.mark.parametrize("loss", ["cosent", "contrastive", "cosine"])
def test_every_loss_learns(tiny_model_dir, pair_files, tmp_path, loss):
    metrics = train.train(config_for(tiny_model_dir, pair_files, tmp_path, loss=loss))
    assert metrics["fine_tuned"]["val"]["roc_auc"] > metrics["zero_shot"]["val"]["roc_auc"] + 0.05


def test_same_seed_same_result_on_cpu(tiny_model_dir, pair_files, tmp_path):
    runs = [train.train(config_for(tiny_model_dir, pair_files, tmp_path / str(i), epochs=1, seed=s))
            for i, s in enumerate([7, 7, 8])]
    assert runs[0]["fine_tuned"] == runs[1]["fine_tuned"]
    weights = [Embedder.load(tmp_path / str(i)).projection.weight for i in range(3)]
    assert torch.equal(weights[0], weights[1]) and not torch.equal(weights[0], weights[2])


def test_length_groups_give_the_same_embeddings_as_one_padded_batch(tiny_model_dir):
    model = Embedder.from_pretrained(str(tiny_model_dir), 16).eval()  # eval: no dropout to differ
    words = "how do i cook t1a t2b t3c what is the best way of".split()
    pairs = [(" ".join(words[: 1 + i % 12]), " ".join(words[i % 5:]), i % 2) for i in range(8)]  # many lengths
    tokenized = train.data.TokenizedPairs(pairs, model.tokenizer, 64)
    (one,), restore_one, _ = next(tokenized.batches(8, np.random.default_rng(0), length_groups=1))
    groups, restore, _ = next(tokenized.batches(8, np.random.default_rng(0), length_groups=4))
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


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--help"])
    text = capsys.readouterr().out
    for field in train.dataclasses.fields(train.Config):
        assert "--" + field.name.replace("_", "-") in text
    assert train.parse_args(["--freeze-encoder", "--lr", "1e-4"]) == train.Config(freeze_encoder=True, lr=1e-4)


@pytest.mark.parametrize("args, message", [
    (["--data", "missing.tsv"], "error: file not found: missing.tsv"),
    (["--columns", "a,b,c"], r"error: .*train.tsv: missing columns \['a', 'b', 'c'\]; found \['question1', 'question2', 'is_duplicate'\]"),
    (["--dataset-size", "1000"], "error: --dataset-size 1000 is more than the 192 training pairs available"),
    (["--val", ""], "error: give both --val and --test"),
])
def test_bad_input_exits_with_one_line(tiny_model_dir, pair_files, tmp_path, args, message):
    base = ["--model", str(tiny_model_dir), "--data", str(pair_files["train"]), "--val", str(pair_files["val"]),
            "--test", str(pair_files["test"]), "--device", "cpu", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match=message):
        train.main(base + args)


def test_labels_that_are_not_binary_exit_with_one_line(tiny_model_dir, pair_files, tmp_path):
    bad = write_tsv(tmp_path / "bad.tsv", [("a", "b", 1), ("c", "d", 3)])
    with pytest.raises(SystemExit, match=r"labels must be 0 or 1; column 'is_duplicate' also holds \['3'\]"):
        train.main(["--model", str(tiny_model_dir), "--data", str(bad), "--out", str(tmp_path)])


@needs_shared
def test_real_minilm_on_quora_beats_zero_shot(minilm_dir, tmp_path):
    """The real thing, small: 2,000 Quora pairs, one epoch on CPU, the shared leakage-free splits."""
    splits = SHARED / "data" / "quora" / "splits"
    config = train.Config(model=str(minilm_dir), data=str(splits / "train.tsv.gz"), val=str(splits / "val.tsv.gz"),
                          test=str(splits / "test.tsv.gz"), dataset_size=2000, device="cpu", out=str(tmp_path))
    metrics = train.train(config)
    zero_shot, fine_tuned = metrics["zero_shot"]["test"], metrics["fine_tuned"]["test"]
    assert zero_shot["n_pairs"] == 10003
    assert fine_tuned["error_rate"] < zero_shot["error_rate"] - 0.005, (zero_shot, fine_tuned)
    # The saved model is the trained one: evaluated again from disk, it gives the same numbers.
    val, test = train.load_splits(config)[1:]
    assert train.evaluate.evaluate(Embedder.load(tmp_path), val, test) == metrics["fine_tuned"]


def test_interrupt_keeps_the_model_and_the_zero_shot_metrics(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    calls = []

    class InterruptedLoss(train.OnlineContrastiveLoss):
        def forward(self, a, b, labels):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return super().forward(a, b, labels)

    monkeypatch.setitem(train.LOSSES, "ocl", lambda config: InterruptedLoss())
    with pytest.raises(KeyboardInterrupt):
        train.train(config_for(tiny_model_dir, pair_files, tmp_path))
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    assert metrics["interrupted_at_step"] == 2 and "fine_tuned" not in metrics and "val" in metrics["zero_shot"]
    assert Embedder.load(tmp_path).dim == 16
