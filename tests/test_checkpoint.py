import json
import signal

import pytest
import torch
from conftest import fault_at_step, signal_at_step, synthetic_pairs, tiny_config, write_tsv

from embed_ft import checkpoint, train
from embed_ft.errors import InputError
from embed_ft.model import Embedder


@pytest.fixture
def small_files(tmp_path):
    """64 training pairs: 4 steps an epoch at batch 16, so every step of a run can be interrupted."""
    return {name: write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(n, seed))
            for name, n, seed in [("train", 64, 1), ("val", 48, 2), ("test", 48, 3)]}


def small_config(tiny_model_dir, files, out, **overrides) -> train.Config:
    return tiny_config(tiny_model_dir, files, out, **{"zero_shot": False} | overrides)


@pytest.mark.parametrize("bucket, steps", [(True, range(1, 12)), (False, [3, 4, 5])])
def test_interrupted_at_any_step_and_resumed_ends_with_identical_weights(tiny_model_dir, small_files, tmp_path,
                                                                         monkeypatch, bucket, steps):
    """3 epochs x 4 steps: stopped at every step but the last (epoch boundaries included) with
    length-bucketed batches, the default; around an epoch boundary with random batches."""
    train.train(small_config(tiny_model_dir, small_files, tmp_path / "whole", bucket_by_length=bucket))
    expected = Embedder.load(tmp_path / "whole").state_dict()
    for step in steps:
        out = tmp_path / f"stopped-at-{step}"
        with monkeypatch.context() as m:
            signal_at_step(m, step)
            with pytest.raises(KeyboardInterrupt):
                train.train(small_config(tiny_model_dir, small_files, out, bucket_by_length=bucket))
        state = torch.load(out / checkpoint.FILE, weights_only=True)
        assert state["run"]["step"] == step  # the step under way was finished, then saved
        assert json.loads((out / "metrics.json").read_text())["stopped_by"] == "SIGTERM"
        metrics = train.train(small_config(tiny_model_dir, small_files, out, resume=True, bucket_by_length=bucket))
        assert metrics["resumed_at_steps"] == [step] and metrics["training"]["steps"] == 12
        resumed = Embedder.load(out).state_dict()
        assert all(torch.equal(resumed[k], v) for k, v in expected.items()), f"stopped at step {step}"


def test_ctrl_c_twice_stops_at_once(tiny_model_dir, small_files, tmp_path, monkeypatch):
    signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        train.train(small_config(tiny_model_dir, small_files, tmp_path, checkpoint_every=1))
    assert torch.load(tmp_path / checkpoint.FILE, weights_only=True)["run"]["step"] == 1  # the last full step


def test_periodic_checkpoints_and_resume_needs_the_same_settings(tiny_model_dir, small_files, tmp_path, monkeypatch):
    signal_at_step(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train.train(small_config(tiny_model_dir, small_files, tmp_path))
    with pytest.raises(InputError, match="--resume: --lr differ"):
        train.train(small_config(tiny_model_dir, small_files, tmp_path, resume=True, lr=1e-2))
    with pytest.raises(InputError, match="--resume: no checkpoint at"):
        train.train(small_config(tiny_model_dir, small_files, tmp_path / "elsewhere", resume=True))


def test_a_nan_loss_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_model_dir, small_files, tmp_path, monkeypatch):
    fault_at_step(monkeypatch, 5, lambda loss: loss * float("nan"))
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 5 \(epoch 2\)"):
        train.train(small_config(tiny_model_dir, small_files, tmp_path, checkpoint_every=2))
    state = torch.load(tmp_path / checkpoint.FILE, weights_only=True)
    assert state["run"]["step"] == 4 and all(torch.isfinite(v).all() for v in state["model"].values())


def test_checkpoint_is_written_atomically_and_restores_the_random_generators(tmp_path, monkeypatch):
    path = tmp_path / checkpoint.FILE
    torch.manual_seed(3)
    checkpoint.save(path, weights=torch.ones(2), step=7)
    expected = torch.rand(3)

    def crash(*args, **kwargs):
        raise OSError("disk full (pretend)")

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(OSError):
        checkpoint.save(path, weights=torch.zeros(2), step=8)
    state = checkpoint.load(path)  # the first one, intact
    assert state["step"] == 7 and torch.equal(state["weights"], torch.ones(2))
    assert torch.equal(torch.rand(3), expected)


def test_a_checkpoint_cut_short_falls_back_to_the_one_before(tiny_model_dir, small_files, tmp_path, monkeypatch, capsys):
    """A run killed while its checkpoint was written: the latest file is truncated, --resume takes
    the previous one, and the run still ends exactly as an uninterrupted one."""
    train.train(small_config(tiny_model_dir, small_files, tmp_path / "whole"))
    with monkeypatch.context() as m:
        signal_at_step(m, 3)
        with pytest.raises(KeyboardInterrupt):
            train.train(small_config(tiny_model_dir, small_files, tmp_path / "cut", checkpoint_every=1))
    latest = tmp_path / "cut" / checkpoint.FILE
    assert torch.load(tmp_path / "cut" / checkpoint.PREVIOUS, weights_only=True)["run"]["step"] == 2
    latest.write_bytes(latest.read_bytes()[: latest.stat().st_size // 3])
    capsys.readouterr()
    metrics = train.train(small_config(tiny_model_dir, small_files, tmp_path / "cut", checkpoint_every=1, resume=True))
    assert "checkpoint.pt is damaged" in capsys.readouterr().err
    assert metrics["resumed_at_steps"] == [2] and metrics["training"]["steps"] == 12
    expected, resumed = Embedder.load(tmp_path / "whole").state_dict(), Embedder.load(tmp_path / "cut").state_dict()
    assert all(torch.equal(resumed[k], v) for k, v in expected.items())
    assert not checkpoint.exists(tmp_path / "cut")  # a finished run leaves no checkpoint behind
