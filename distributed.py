"""Data-parallel training on several GPUs (or CPU processes): `torchrun --nproc_per_node N train.py ...`.

Every process holds the whole model and takes the r-th of N equal parts of each global batch. The
embeddings are gathered from all processes *with their gradients*, so the losses, which compare
pairs within a batch (OCL mines the hardest pairs, InfoNCE ranks against the others), see the
whole global batch exactly as one process would. After the backward pass the gradients are
averaged across processes, which is what DistributedDataParallel does (here in one flat
all-reduce, since a step runs several forward passes, one per length group). Only rank 0
evaluates, logs and saves. Started without torchrun, every function here but `launch` is a
no-op; `launch` starts torchrun from another program (the sweep's container) and stays with it.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist

from embed_ft import checkpoint
from embed_ft.options import Config, to_flags


def setup(device: str = "auto") -> tuple[int, int]:
    """(rank, world size): (0, 1) unless started by torchrun. On GPUs, one per process and NCCL; on
    CPUs gloo, also for `--device cpu` on a machine with GPUs (NCCL cannot gather CPU tensors)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1
    on_gpus = torch.cuda.is_available() and device != "cpu"
    if on_gpus:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpus else "gloo")
    return dist.get_rank(), world_size


def teardown() -> None:
    """Leave the process group before the interpreter exits: gloo's threads, left running at exit,
    abort the process now and then ("terminate called without an active exception")."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def gather(x: torch.Tensor, shares: list[int]) -> torch.Tensor:
    """Every process's `x`, concatenated in rank order, each part cut to its `shares[rank]` real rows
    (`batching.Batch.shares`: the copies that topped a short part up are dropped); gradients flow
    back to each process's part."""
    if not active():
        return x
    if x.requires_grad:
        from torch.distributed.nn.functional import all_gather
        parts = all_gather(x)
    else:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x)
    return torch.cat([part[:n] for part, n in zip(parts, shares)])


def average_gradients(params: list[torch.nn.Parameter]) -> None:
    """Replace each gradient by its mean over the processes.

    Every process computed the same global loss, and the gather's backward sums each process's
    share of the gradient, so the sum over processes is world_size times the one-process gradient:
    the mean is exactly it."""
    if not active():
        return
    grads = [p.grad for p in params if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    for g, part in zip(grads, flat.split([g.numel() for g in grads])):
        g.copy_(part.view_as(g))


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process if it is true on any (so that all stop at the same step)."""
    if not active():
        return flag
    tensor = torch.tensor([float(flag)], device=device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def from_rank0(obj):
    """Rank 0's value of `obj` on every process (say, its validation result)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def launch(config: Config, processes: int, on_checkpoint=None, poll_seconds: float = 60.0) -> dict:
    """`train.py` under torchrun, data-parallel over `processes` GPUs, from a parent process (the
    sweep's container); its metrics.json.

    A SIGINT or SIGTERM that reaches this process (a preempted container) is passed on to torchrun,
    which passes it to every rank: they stop at the same step, rank 0 writes its checkpoint, and this
    ends with KeyboardInterrupt, as a one-process run does. While it runs, each new checkpoint is
    handed to `on_checkpoint` (Modal commits the volume), checked every `poll_seconds`."""
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes),
               str(Path(__file__).with_name("train.py"))] + to_flags(config)
    saved = Path(config.out) / checkpoint.FILE
    process = subprocess.Popen(command)
    received = []

    def forward(signum, frame) -> None:
        received.append(signum)
        process.send_signal(signum)

    main_thread = threading.current_thread() is threading.main_thread()
    previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)} if main_thread else {}
    try:
        last_seen = None
        while process.poll() is None:
            try:
                process.wait(timeout=poll_seconds)
            except subprocess.TimeoutExpired:
                pass
            stamp = saved.stat().st_mtime_ns if saved.exists() else None
            if on_checkpoint and stamp != last_seen:
                on_checkpoint()
                last_seen = stamp
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received or process.returncode == 130:
        raise KeyboardInterrupt
    if process.returncode != 0:
        raise RuntimeError(f"torchrun exited with code {process.returncode} (its output is above)")
    return json.loads((Path(config.out) / "metrics.json").read_text())
