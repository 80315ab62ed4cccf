"""Data-parallel training on CPU with the gloo backend: 2 processes must compute what one does."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from conftest import ROOT, synthetic_pairs, write_tsv

from embed_ft import batching, distributed
from embed_ft.losses import InBatchContrastiveLoss, OnlineContrastiveLoss, WeightedSum
from embed_ft.model import Embedder

GLOBAL_BATCH = 16


def loss_and_gradients(model_dir: str, rank: int, world_size: int) -> tuple[float, dict[str, torch.Tensor]]:
    """One training step's loss and (averaged) gradients on this process's share of a global batch."""
    torch.manual_seed(0)
    model = Embedder.from_pretrained(model_dir, dense_out_features=16).eval()  # eval: no dropout draws to differ
    tokenized = batching.TokenizedPairs(synthetic_pairs(GLOBAL_BATCH, seed=4), model)
    groups, restore, labels, shares = next(tokenized.batches(np.arange(GLOBAL_BATCH), GLOBAL_BATCH, 2, rank, world_size))
    first, second = torch.cat([model(**g) for g in groups])[restore].chunk(2)
    first, second, labels = (distributed.gather(x, shares) for x in (first, second, labels))
    loss = WeightedSum([(1.0, OnlineContrastiveLoss()), (0.5, InBatchContrastiveLoss())])(first, second, labels)
    loss.backward()
    params = [p for p in model.parameters() if p.requires_grad]
    distributed.average_gradients(params)
    return loss.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def worker(rank: int, world_size: int, port: int, model_dir: str, out: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    assert distributed.setup() == (rank, world_size)
    loss, grads = loss_and_gradients(model_dir, rank, world_size)
    torch.save({"loss": loss, "grads": grads}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_compute_the_loss_and_gradients_of_one(tiny_model_dir, tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tiny_model_dir), str(tmp_path)), nprocs=2, join=True)
    loss, grads = loss_and_gradients(str(tiny_model_dir), 0, 1)  # one process, the whole global batch
    for rank in range(2):
        result = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert abs(result["loss"] - loss) < 1e-5 * max(1.0, abs(loss))
        assert set(result["grads"]) == set(grads)
        for name, g in grads.items():
            torch.testing.assert_close(result["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device, expected", [("cpu", {"backend": "gloo"}), ("auto", {"backend": "nccl", "gpu": 1}),
                                              ("cuda", {"backend": "nccl", "gpu": 1})])
def test_a_cpu_run_under_torchrun_uses_gloo_on_a_machine_with_gpus(monkeypatch, device, expected):
    """NCCL cannot gather CPU tensors: `--device cpu` on a GPU machine failed at the first all_gather."""
    chosen = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "set_device", lambda index: chosen.update(gpu=index))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda name: chosen.update(backend=name))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    assert distributed.setup(device) == (1, 2)
    assert chosen == expected


def test_torchrun_takes_every_pair_that_one_process_takes(tiny_model_dir, pair_files, tmp_path):
    """97 pairs, batch 16: the last batch of each epoch has a single pair, fewer than the processes."""
    train_file = write_tsv(tmp_path / "train97.tsv", synthetic_pairs(97, seed=1))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
               "--standalone",  # a port torchrun takes itself: one picked here first could be taken by another test
               str(ROOT / "train.py"), "--model", str(tiny_model_dir), "--data", str(train_file),
               "--val", str(pair_files["val"]), "--test", str(pair_files["test"]), "--dense-out-features", "16",
               "--epochs", "3", "--batch-size", "16", "--lr", "1e-3", "--device", "cpu", "--out", str(tmp_path / "out")]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600,
                            env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    metrics = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert metrics["environment"]["processes"] == 2
    assert (metrics["training"]["steps"], metrics["training"]["pairs"]) == (3 * 7, 3 * 97)  # as one process takes
    assert Embedder.load(tmp_path / "out").dim == 16


@pytest.mark.parametrize("n_pairs, world_size", [(1, 2), (5, 2), (7, 4), (16, 3)])
def test_every_pair_of_a_batch_is_taken_once_over_the_processes(tiny_model_dir, n_pairs, world_size):
    model = Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=0)
    tokenized = batching.TokenizedPairs(synthetic_pairs(n_pairs, seed=4), model)
    tokenized.labels = np.arange(n_pairs)  # labels that name their pair
    taken = []
    for rank in range(world_size):
        batch = next(tokenized.batches(np.arange(n_pairs), 16, 1, rank, world_size))
        assert len(batch.labels) == max(batch.shares)  # every process the same size, for all_gather
        taken += list(batch.labels[: batch.shares[rank]])
    assert sum(batch.shares) == n_pairs and len(taken) == n_pairs
    assert sorted(taken) == list(range(n_pairs))
