"""Fine-tune an embedding model on labelled pairs, and say whether it got better.

    python train.py                                   # bge-base-en-v1.5 + 256-d projection on Quora
    python train.py --model DIR --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz \\
        --dataset-size 4000 --device cpu --out out
    python train.py ... --out out --resume            # continue an interrupted run where it stopped
    torchrun --nproc_per_node 8 train.py ...          # data-parallel on 8 GPUs

Evaluates the model before training (zero-shot) and after, keeps the weights of the epoch that did
best on validation, and writes the model (a sentence-transformers folder with its tuned threshold and
a model card) and OUT/metrics.json. Every option is a field of `options.Config`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import platform
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

import batching
import card
import checkpoint
import errors
import data
import distributed
import evaluate
import losses
import options
import run_folder
from errors import InputError
from jsonl import write_json
from losses import InBatchContrastiveLoss, MatryoshkaLoss, WeightedSum
from model import cpu_has_bf16, load_model, pick_device
from options import Config

LOSS_EVERY = 50  # on a GPU, steps between reads of the loss (each read waits for the GPU)


# ---------------------------------------------------------------------------------------- set-up

def load_splits(config: Config) -> tuple[list[data.Pair], list[data.Pair], list[data.Pair]]:
    """Train, validation and test pairs: from the given files, or split off --data without leakage."""
    columns = tuple(config.columns.split(",")) if config.columns else None
    pairs = data.load_pairs(config.data, columns, config.hub_config)
    if bool(config.val) != bool(config.test):
        raise InputError("give both --val and --test, or neither (to split them off --data)")
    if config.val:
        val, test = data.load_pairs(config.val, columns), data.load_pairs(config.test, columns)
        train = data.drop_overlap(pairs, val, test)
    else:
        train, val, test = data.split_pairs(pairs, config.val_size, config.test_size, config.seed)
    if config.dataset_size:
        train = data.subsample(train, config.dataset_size, config.seed)
    if config.implied_pairs != "none":
        train = data.add_implied_pairs(train, negatives=config.implied_pairs == "all")
    if config.eval_size:  # a fixed subset (seed 0) so that every run of a sweep sees the same pairs
        val, test = (data.subsample(p, min(config.eval_size, len(p)), seed=0) for p in (val, test))
    evaluate.check_both_classes(val, "validation pairs")
    evaluate.check_both_classes(test, "test pairs")
    return train, val, test


def pick_precision(name: str, device: torch.device) -> str:
    """bf16 where the device computes it natively (CUDA since Ampere, CPUs with AVX512-BF16/AMX),
    fp16 with loss scaling on older GPUs, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def training_autocast(precision: str, device: torch.device) -> contextlib.AbstractContextManager:
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return contextlib.nullcontext()


def length_groups_for(config: Config, device: torch.device) -> int:
    """--length-groups 0 picks by device. A GPU gets one encoder call a step: one large call keeps it
    busier than two small ones (2x the pairs/s at batch 32 on an H200). A CPU gets two groups, which
    pad less (docs/speed.md)."""
    return config.length_groups or (1 if device.type == "cuda" else 2)


def build_loss(config: Config, dim: int) -> torch.nn.Module:
    """The objective's loss: --loss for classification, in-batch InfoNCE for retrieval (it ranks each
    text's duplicate above every other text of the batch, what a search needs)."""
    loss = losses.BY_NAME["contrastive" if config.objective == "retrieval" else config.loss](config)
    if config.in_batch_weight:
        loss = WeightedSum([(1.0, loss), (config.in_batch_weight, InBatchContrastiveLoss(config.scale))])
    if config.matryoshka_dims:
        loss = MatryoshkaLoss(loss, sorted({int(d) for d in config.matryoshka_dims.split(",")} | {dim}))
    return loss


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


def log(message: str, rank: int) -> None:
    if rank == 0:
        tqdm.write(message)


# ---------------------------------------------------------------------------------- the run's state

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
    if config.resume:
        run.restore(resume_from(Path(config.out) / checkpoint.FILE, config))
    return run


# -------------------------------------------------------------------------------------- training

def prepare(config: Config):
    """The data and the model as training finds them (the projection drawn from the seed): what the
    zero-shot evaluation sees. Returns (device, (train, val, test), model)."""
    options.check(config)
    random.seed(config.seed)
    torch.manual_seed(config.seed)
    device = pick_device(config.device)
    splits = load_splits(config)
    model = load_model(config.model, config.dense_out_features, config.max_length, config.trust_remote_code).to(device)
    return device, splits, model


def train(config: Config, on_checkpoint=None) -> dict:
    """The whole job: data, zero-shot evaluation, fine-tuning, evaluation, saving. Returns metrics.
    `on_checkpoint()` runs after each checkpoint is written (Modal commits its volume there)."""
    rank, world_size = distributed.setup(config.device)
    options.check(config)
    pick_device(config.device)  # before the folder is claimed: a bad --device changes nothing
    with run_folder.claim(Path(config.out), config.resume, config.overwrite, owner=rank == 0) as folder:
        return fine_tune(config, rank, world_size, folder, on_checkpoint)


def fine_tune(config: Config, rank: int, world_size: int, folder: run_folder.Claim, on_checkpoint=None) -> dict:
    device, (train_pairs, val, test), model = prepare(config)
    precision = pick_precision(config.precision, device)
    log(f"pairs: {len(train_pairs)} train, {len(val)} val, {len(test)} test | {device} x{world_size} | {precision}", rank)
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    batches = batching.TokenizedPairs(train_pairs, model.tokenizer, model.max_length)
    steps_per_epoch = math.ceil(len(batches) / config.batch_size)
    total = config.epochs * steps_per_epoch
    run = start_run(config, model, device, precision, total, world_size)
    run.train_pairs = len(train_pairs)
    begin(run, val, test, rank)
    loss_fn, autocast = build_loss(config, model.dim), training_autocast(precision, device)
    losses_seen = LossWatch(device, steps_per_epoch, out=run.out)
    saver = Checkpointer(run, losses_seen, folder, on_checkpoint, rank)
    p = run.progress
    model.train()
    started = time.perf_counter() - p.seconds
    with tqdm(total=total, initial=p.step, desc="train", unit="step", disable=rank != 0) as bar, \
            checkpoint.StopRequests() as stop:
        while p.epoch < config.epochs and run.stopped_by is None:
            order = batches.epoch_order(config.seed, p.epoch, config.batch_size, config.bucket_by_length)
            done = p.step - p.epoch * steps_per_epoch  # steps of this epoch already taken
            for batch in batches.batches(order[done * config.batch_size:], config.batch_size,
                                         length_groups_for(config, device), rank, world_size):
                loss, pairs = train_step(run, batch, loss_fn, autocast, device)
                p.step, p.pairs, p.seconds = p.step + 1, p.pairs + pairs, time.perf_counter() - started
                losses_seen.add(loss, p.step)
                if losses_seen.due(p.step):
                    bar.set_postfix(loss=f"{losses_seen.check():.4f}", pairs_per_s=f"{p.pairs / p.seconds:.1f}")
                bar.update()
                if stop_requested(run, stop, device):
                    break
                if saver.due(p.step):
                    saver.save()
            else:  # the epoch is complete
                p.epoch += 1
                losses_seen.check()
                if config.select_best:
                    end_of_epoch(run, val, rank)
                p.seconds = time.perf_counter() - started
                saver.save()
    losses_seen.check()
    if run.stopped_by in ("SIGINT", "SIGTERM"):
        interrupted(run, saver, rank, total)
    return finish(run, val, test) if rank == 0 else {}


def begin(run: Run, val: list[data.Pair], test: list[data.Pair], rank: int) -> None:
    """Say where a resumed run goes on, or evaluate the untrained model (zero-shot); write metrics.json."""
    config = run.config
    if config.resume:
        log(f"resumed at step {run.progress.step} (epoch {run.progress.epoch + 1})", rank)
    elif config.zero_shot and rank == 0:
        zero_shot = evaluate.both_views(run.model, val, test, config.eval_batch_size, config.min_recall,
                                        config.min_precision)
        run.metrics["zero_shot"] = zero_shot
        log(f"zero-shot error: val {zero_shot['val']['error_rate']:.2%}, test {zero_shot['test']['error_rate']:.2%}", rank)
    if rank == 0:
        write_json(run.out / "metrics.json", run.metrics)


def stop_requested(run: Run, stop: checkpoint.StopRequests, device: torch.device) -> bool:
    """A signal or the time budget ends training at this step, on every process at once."""
    over_budget = run.config.max_minutes and run.progress.seconds > 60 * run.config.max_minutes
    if distributed.any_process(bool(stop.requested or over_budget), device):
        run.stopped_by = stop.requested or ("time_budget" if over_budget else "SIGTERM")
    return run.stopped_by is not None


def interrupted(run: Run, saver: "Checkpointer", rank: int, total: int) -> None:
    """SIGINT or SIGTERM: checkpoint, say how to go on, and leave with KeyboardInterrupt (exit code 130)."""
    saver.save()
    step = run.progress.step
    if rank == 0:
        write_json(run.out / "metrics.json", run.metrics | {"stopped_by": run.stopped_by, "interrupted_at_step": step})
    log(f"{run.stopped_by} at step {step}/{total}: checkpoint in {run.out}; continue with the same command and --resume",
        rank)
    raise KeyboardInterrupt


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


def train_step(run: Run, batch: batching.Batch, loss_fn, autocast, device: torch.device) -> tuple[torch.Tensor, int]:
    """One optimiser step on a batch; the loss stays on the device. Returns (loss, pairs in the step)."""
    with autocast:
        embeddings = torch.cat([run.model(**{k: to_device(v, device) for k, v in g.items()}) for g in batch.groups])
    first, second = embeddings[to_device(batch.restore, device)].float().chunk(2)
    first, second, labels = (distributed.gather(x, batch.shares) for x in (first, second, to_device(batch.labels, device)))
    loss = loss_fn(first, second, labels)  # losses run in fp32, outside autocast
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    params = [p for p in run.model.parameters() if p.requires_grad]
    distributed.average_gradients(params)
    run.scaler.unscale_(run.optimizer)
    torch.nn.utils.clip_grad_norm_(params, run.config.max_grad_norm, foreach=True)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    run.scheduler.step()
    return loss.detach(), sum(batch.shares)


def to_device(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A copy to a GPU from pinned memory, so that the host queues it and goes on: a copy from
    ordinary memory makes the host wait until the GPU has reached it."""
    return tensor.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else tensor


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


def end_of_epoch(run: Run, val: list[data.Pair], rank: int) -> None:
    """The objective's validation metric after an epoch (error rate, or MRR for retrieval); the best
    epoch's weights (on the CPU) are kept, and `patience` epochs without improvement stop the run."""
    config, p = run.config, run.progress
    value, vectors = validation(run, val) if rank == 0 else (None, None)
    value = distributed.from_rank0(value)
    p.val_history.append(value)
    earlier = p.val_history[:-1]
    better = value > max(earlier, default=-math.inf) if config.objective == "retrieval" else value < min(earlier, default=math.inf)
    if better:
        p.best_epoch, p.bad_epochs = p.epoch, 0
        if rank == 0:
            run.best_weights = {k: v.detach().to("cpu", copy=True) for k, v in run.model.state_dict().items()}
            run.best_val_vectors = vectors
    else:
        p.bad_epochs += 1
    name = "MRR" if config.objective == "retrieval" else "error"
    log(f"epoch {p.epoch}: val {name} {value:.2%} (best: epoch {p.best_epoch})", rank)
    run.model.train()
    if config.patience and p.bad_epochs >= config.patience:
        run.stopped_by = "patience"


def validation(run: Run, val: list[data.Pair]) -> tuple[float, dict]:
    """The objective's validation metric (the error rate at the tuned threshold, or the MRR), and the
    embeddings it was computed from, so that the final evaluation need not embed them again."""
    config, remembered = run.config, evaluate.Remembered(run.model)
    if config.objective == "retrieval":
        return evaluate.retrieval_metrics(remembered, val, batch_size=config.eval_batch_size)["mrr"], remembered.vectors
    scores = evaluate.cosine_scores(remembered, val, config.eval_batch_size)
    return evaluate.evaluate_scores(scores, evaluate.labels_of(val), min_recall=config.min_recall,
                                    min_precision=config.min_precision)["val"]["error_rate"], remembered.vectors


def finish(run: Run, val: list[data.Pair], test: list[data.Pair]) -> dict:
    """Restore the best epoch, evaluate, save the model with its threshold and card, and metrics.json."""
    config, p, metrics, model = run.config, run.progress, run.metrics, run.model
    if run.best_weights is not None:  # else no epoch was evaluated (--no-select-best, or stopped within the first)
        model.load_state_dict(run.best_weights)
    history = "val_mrr" if config.objective == "retrieval" else "val_errors"
    metrics["training"] = {"train_pairs": run.train_pairs, "steps": p.step, "pairs": p.pairs,
                           "seconds": p.seconds, "pairs_per_s": p.pairs / max(p.seconds, 1e-9), "epochs": p.epoch,
                           history: p.val_history, "best_epoch": p.best_epoch,
                           "stopped_by": run.stopped_by or "completed"}
    remembered = evaluate.Remembered(model, run.best_val_vectors)  # none after a resume: val is embedded again
    metrics["fine_tuned"] = evaluate.both_views(remembered, val, test, config.eval_batch_size, config.min_recall,
                                                config.min_precision)
    tuned = metrics["fine_tuned"]
    print(f"fine-tuned error: val {tuned['val']['error_rate']:.2%}, test {tuned['test']['error_rate']:.2%}; "
          f"test MRR {tuned['retrieval']['test']['mrr']:.4f} ({metrics['training']['pairs_per_s']:.1f} pairs/s, "
          f"stopped: {metrics['training']['stopped_by']})")
    if config.save:
        model.save(run.out, {"threshold": metrics["fine_tuned"]["val"]["threshold"], **metrics["fine_tuned"]})
        card.write(run.out, metrics)
    write_json(run.out / "metrics.json", metrics)
    checkpoint.remove(run.out)  # its work is done
    return metrics


def resume_from(path: Path, config: Config) -> dict:
    """The checkpoint, if it was written by a run with the same settings."""
    state = checkpoint.load(path)
    saved = json.loads(state["metrics"])["config"]
    changed = [k for k, v in dataclasses.asdict(config).items() if k not in options.RESUMABLE_CHANGES and saved.get(k) != v]
    if changed:
        raise InputError(f"--resume: {', '.join('--' + k.replace('_', '-') for k in changed)} differ(s) from the "
                         f"checkpointed run; resume with the same settings")
    return state


# ---------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    train(options.parse_args(argv, description=__doc__.split("\n\n")[0]))


if __name__ == "__main__":
    errors.run(main)
