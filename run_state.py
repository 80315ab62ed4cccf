"""What a training run carries from step to step, and what keeps it safe: the optimiser with its
warm-up-then-decay schedule, the progress every checkpoint saves, when checkpoints are written and
what a --resume accepts, and a watch on the loss that stops a run at its first non-finite step
without making the host wait for the GPU. train.py drives it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from embed_ft import checkpoint, options, run_folder
from embed_ft.errors import InputError
from embed_ft.model import cpu_has_bf16
from embed_ft.options import Config

LOSS_EVERY = 50  # on a GPU, steps between reads of the loss (each read waits for the GPU)


# ---------------------------------------------------------------------------- a new or resumed run

@dataclass
class Progress:
    """Where a run stands. Saved in every checkpoint, so that a resumed run goes on from here."""
    step: int = 0
    epoch: int = 0
    seconds: float = 0.0
    pairs: int = 0
    val_history: list[float] = field(default_factory=list)  # the objective's validation metric, by epoch
    best_epoch: int = 0
    bad_epochs: int = 0


@dataclass
class Run:
    """Everything a training run carries from step to step: the model and its optimiser, the
    progress, the best epoch's weights so far (on the CPU), and the metrics."""
    config: Config
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    metrics: dict
    progress: Progress = field(default_factory=Progress)
    best_weights: dict | None = None
    best_val_vectors: dict | None = None  # the best epoch's validation embeddings (not checkpointed)
    best_partial: str = ""  # how far into its epoch the best weights were, when stopped inside one
    start_weights: dict | None = None  # the starting model's, on the CPU, for --merge (not checkpointed)
    zero_shot_vectors: dict | None = None  # the published model's val and test embeddings (not checkpointed)
    stopped_by: str | None = None
    train_pairs: int = 0

    @property
    def out(self) -> Path:
        return Path(self.config.out)

    def save_checkpoint(self) -> None:
        checkpoint.save(self.out / checkpoint.FILE, model=self.model.state_dict(), optimizer=self.optimizer.state_dict(),
                        scheduler=self.scheduler.state_dict(), scaler=self.scaler.state_dict(),
                        run=dataclasses.asdict(self.progress), best_weights=self.best_weights,
                        metrics=json.dumps(self.metrics))

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint written by `save_checkpoint`."""
        for part in ("model", "optimizer", "scheduler", "scaler"):
            getattr(self, part).load_state_dict(state[part])
        fields = {f.name for f in dataclasses.fields(Progress)}
        if set(state["run"]) != fields:
            raise InputError(f"{self.out / checkpoint.FILE} was written by another version of train.py: start again "
                             f"with --overwrite instead of --resume")
        self.progress, self.best_weights = Progress(**state["run"]), state["best_weights"]
        self.metrics = json.loads(state["metrics"])
        self.metrics.setdefault("resumed_at_steps", []).append(self.progress.step)


def start_run(config: Config, model, device: torch.device, precision: str, total: int, world_size: int) -> Run:
    """The optimiser (fused AdamW), the schedule (linear warm-up, then linear decay) and the loss
    scaler of a new run, or of an interrupted one where --resume continues it."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("--freeze-encoder with --dense-out-features 0 leaves nothing to train")
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    warmup = max(1, int(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    metrics = {"config": dataclasses.asdict(config) | {"resolved_precision": precision, "resolved_device": str(device)},
               "environment": environment(device, world_size)}
    run = Run(config, model, optimizer, scheduler, scaler, metrics)
    if config.merge < 1:  # before a resume restores the trained weights: a resumed run starts where this one did
        run.start_weights = cpu_copy(model)
    if config.resume:
        run.restore(resume_from(Path(config.out) / checkpoint.FILE, config))
    return run


def cpu_copy(model: torch.nn.Module) -> dict:
    """The model's weights, copied to the CPU: kept aside while training goes on changing them."""
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def resume_from(path: Path, config: Config) -> dict:
    """The checkpoint, if it was written by a run with the same settings."""
    state = checkpoint.load(path)
    saved = json.loads(state["metrics"])["config"]
    changed = [k for k, v in dataclasses.asdict(config).items() if k not in options.RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise InputError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ(s) from the "
                         f"checkpointed run; resume with the same settings")
    return state


def lr_multiplier(step: int, warmup: int, total: int) -> float:
    """0 -> 1 linearly over the warm-up steps, then linearly down to 0 (a cosine decay measured no
    better on validation: see docs/quality.md)."""
    if step < warmup:
        return (step + 1) / warmup
    return 1 - min(1.0, (step - warmup) / max(1, total - warmup))


def environment(device: torch.device, processes: int) -> dict:
    """What ran this: recorded with every result, so numbers from different machines are not mixed up."""
    import transformers
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    gpu = device.type == "cuda"
    return {"gpu": torch.cuda.get_device_name(device) if gpu else None, "cuda": torch.version.cuda if gpu else None,
            "driver": nvidia_driver() if gpu else None, "cpu": cpu, "cpu_bf16": cpu_has_bf16(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "processes": processes}


def nvidia_driver() -> str | None:
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=30).stdout.strip().splitlines()[0]
    except (OSError, subprocess.SubprocessError, IndexError):
        return None


# ------------------------------------------------------------------------ keeping the run safe

class Checkpointer:
    """When and how a run's checkpoint is written: every `--checkpoint-every` steps (else about every
    5 minutes), at the end of each epoch and on a stop; by rank 0 only, and never of weights that a
    non-finite loss has touched. `on_checkpoint()` follows each one (Modal commits its volume)."""

    def __init__(self, run: Run, losses_seen: "LossWatch", folder: run_folder.Claim, on_checkpoint, rank: int):
        self.run, self.losses_seen, self.folder, self.on_checkpoint, self.rank = run, losses_seen, folder, on_checkpoint, rank
        self.last = time.perf_counter()

    def due(self, step: int) -> bool:
        every = self.run.config.checkpoint_every
        return step % every == 0 if every else time.perf_counter() - self.last > 300

    def save(self) -> None:
        if self.rank == 0:
            self.losses_seen.check()
            self.run.save_checkpoint()
            self.folder.refresh()
            if self.on_checkpoint:
                self.on_checkpoint()
        self.last = time.perf_counter()


class LossWatch:
    """The loss, watched without making the host wait for the GPU: the first non-finite loss is
    noted on the device, and `check()` (every few steps, and before each checkpoint) reads it and
    stops the run there, naming the step."""

    def __init__(self, device: torch.device, steps_per_epoch: int, out: Path):
        self.first_bad = torch.full((), -1, dtype=torch.long, device=device)   # the step, -1: none yet
        self.bad_value = torch.zeros((), device=device)
        self.last = torch.zeros((), device=device)
        # Read every step on a CPU (free there), every LOSS_EVERY steps on a GPU, where a read makes
        # the host wait for the step to finish before it can queue the next.
        self.every = 1 if device.type == "cpu" else LOSS_EVERY
        self.steps_per_epoch, self.out = steps_per_epoch, out

    def add(self, loss: torch.Tensor, step: int) -> None:
        new = ~torch.isfinite(loss) & (self.first_bad < 0)
        self.first_bad = torch.where(new, step, self.first_bad)
        self.bad_value = torch.where(new, loss, self.bad_value)
        self.last = loss

    def due(self, step: int) -> bool:
        return step % self.every == 0

    def check(self) -> float:
        """The last loss; FloatingPointError if any loss so far was not finite."""
        step = int(self.first_bad)
        if step >= 0:
            raise FloatingPointError(
                f"the loss is {float(self.bad_value)} at step {step} (epoch {(step - 1) // self.steps_per_epoch + 1}); "
                f"nothing was saved from this step on, the last checkpoint (if any) is kept in {self.out}: "
                f"lower --lr or try --precision fp32")
        return float(self.last)
