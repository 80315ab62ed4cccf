import torch
import pytest

from embed_ft import run_state


def test_lr_schedule_warms_up_then_decays_linearly():
    assert [run_state.lr_multiplier(s, 2, 6) for s in range(6)] == [0.5, 1.0, 1.0, 0.75, 0.5, 0.25]


def test_the_loss_watch_names_the_first_non_finite_step_and_its_epoch(tmp_path):
    watch = run_state.LossWatch(torch.device("cpu"), steps_per_epoch=4, out=tmp_path)
    for step, loss in enumerate([0.5, 0.25, float("nan"), float("inf"), 0.1], start=1):
        watch.add(torch.tensor(loss), step)
    with pytest.raises(FloatingPointError, match=r"the loss is nan at step 3 \(epoch 1\)"):
        watch.check()
    fine = run_state.LossWatch(torch.device("cpu"), steps_per_epoch=4, out=tmp_path)
    fine.add(torch.tensor(0.5), 1)
    fine.add(torch.tensor(0.25), 2)
    assert fine.check() == 0.25 and fine.due(2) and fine.every == 1
