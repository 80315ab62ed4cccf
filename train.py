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
from pathlib import Path

import torch
from tqdm.auto import tqdm

import batching
import card
import checkpoint
import cli
import data
import distributed
import evaluate
from cli import InputError
import losses
import options
from losses import InBatchContrastiveLoss, MatryoshkaLoss, WeightedSum
from model import cpu_has_bf16, load_model
from options import Config


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


def pick_device(name: str) -> torch.device:
    if name == "auto" and torch.cuda.is_available() or name == "cuda":  # one GPU per process under torchrun
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu" if name == "auto" else name)


def pick_precision(name: str, device: torch.device) -> str:
    """bf16 where the device computes it natively (CUDA since Ampere, CPUs with AVX512-BF16/AMX),
    fp16 with loss scaling on older GPUs, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def build_loss(config: Config, dim: int) -> torch.nn.Module:
    loss = losses.BY_NAME[config.loss](config)
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
    return {"gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None, "cpu": cpu,
            "cpu_bf16": cpu_has_bf16(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "processes": processes}


def write_json(path: Path, obj: dict) -> None:
    """Write through a temporary file, so an interruption never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def log(message: str, rank: int) -> None:
    if rank == 0:
        tqdm.write(message)


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
    rank, world_size = distributed.setup()
    device, (train_pairs, val, test), model = prepare(config)
    precision = pick_precision(config.precision, device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"pairs: {len(train_pairs)} train, {len(val)} val, {len(test)} test | {device} x{world_size} | {precision}", rank)
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise InputError("--freeze-encoder with --dense-out-features 0 leaves nothing to train")
    batches = batching.TokenizedPairs(train_pairs, model.tokenizer, model.max_length)
    steps_per_epoch = math.ceil(len(batches) / config.batch_size)
    total = config.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay, fused=True)
    warmup = max(1, int(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_multiplier(s, warmup, total))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision in ("bf16", "fp16") else contextlib.nullcontext())
    loss_fn = build_loss(config, model.dim)
    val_labels = evaluate.labels_of(val)

    run = {"step": 0, "epoch": 0, "seconds": 0.0, "pairs": 0, "val_errors": [], "best_epoch": 0, "bad_epochs": 0}
    best_weights, best_val_scores = None, None
    if config.resume:
        state = resume_from(out / checkpoint.FILE, config)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        run, best_weights, metrics = state["run"], state["best_weights"], json.loads(state["metrics"])
        metrics.setdefault("resumed_at_steps", []).append(run["step"])
        best_val_scores = state["best_val_scores"].numpy() if state["best_val_scores"] is not None else None
        log(f"resumed at step {run['step']}/{total} (epoch {run['epoch'] + 1})", rank)
    else:
        metrics = {"config": dataclasses.asdict(config) | {"resolved_precision": precision, "resolved_device": str(device)},
                   "environment": environment(device, world_size)}
        if config.zero_shot and rank == 0:
            metrics["zero_shot"] = evaluate.evaluate(model, val, test, config.eval_batch_size, config.min_recall, config.min_precision)
            log(f"zero-shot error: val {metrics['zero_shot']['val']['error_rate']:.2%}, "
                f"test {metrics['zero_shot']['test']['error_rate']:.2%}", rank)
    if rank == 0:
        write_json(out / "metrics.json", metrics)

    def save_checkpoint() -> None:
        if rank == 0:
            checkpoint.save(out / checkpoint.FILE, model=model.state_dict(), optimizer=optimizer.state_dict(),
                            scheduler=scheduler.state_dict(), scaler=scaler.state_dict(), run=run,
                            best_weights=best_weights, metrics=json.dumps(metrics),
                            best_val_scores=torch.from_numpy(best_val_scores) if best_val_scores is not None else None)
            if on_checkpoint:
                on_checkpoint()

    model.train()
    stopped_by, last_checkpoint = None, time.perf_counter()
    started = time.perf_counter() - run["seconds"]
    with tqdm(total=total, initial=run["step"], desc="train", unit="step", disable=rank != 0) as bar, \
            checkpoint.StopRequests() as stop:
        while run["epoch"] < config.epochs and stopped_by is None:
            order = batches.epoch_order(config.seed, run["epoch"], config.batch_size, config.bucket_by_length)
            done = run["step"] - run["epoch"] * steps_per_epoch  # steps of this epoch already taken
            for groups, restore, labels in batches.batches(order[done * config.batch_size:], config.batch_size,
                                                           config.length_groups, rank, world_size):
                with autocast:
                    embeddings = torch.cat([model(**{k: v.to(device) for k, v in g.items()}) for g in groups])
                first, second = embeddings[restore.to(device)].float().chunk(2)
                first, second, labels = (distributed.gather(x) for x in (first, second, labels.to(device)))
                loss = loss_fn(first, second, labels)  # losses run in fp32, outside autocast
                value = loss.item()
                if not math.isfinite(value):
                    raise FloatingPointError(
                        f"the loss is {value} at step {run['step'] + 1} (epoch {run['epoch'] + 1}); nothing was saved "
                        f"from this step on, the last checkpoint (if any) is kept in {out}: lower --lr or try --precision fp32")
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                distributed.average_gradients(params)
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                run["step"], run["pairs"] = run["step"] + 1, run["pairs"] + len(labels)
                run["seconds"] = time.perf_counter() - started
                bar.set_postfix(loss=f"{value:.4f}", pairs_per_s=f"{run['pairs'] / run['seconds']:.1f}")
                bar.update()
                over_budget = config.max_minutes and run["seconds"] > 60 * config.max_minutes
                if distributed.any_process(bool(stop.requested or over_budget), device):
                    stopped_by = stop.requested or ("time_budget" if over_budget else "SIGTERM")
                    break
                if (config.checkpoint_every and run["step"] % config.checkpoint_every == 0
                        or not config.checkpoint_every and time.perf_counter() - last_checkpoint > 300):
                    save_checkpoint()
                    last_checkpoint = time.perf_counter()
            else:  # the epoch is complete
                run["epoch"] += 1
                if config.select_best:
                    best_weights, best_val_scores, stopped_by = end_of_epoch(model, val, val_labels, config, run, rank,
                                                                             best_weights, best_val_scores)
                run["seconds"] = time.perf_counter() - started
                save_checkpoint()
                last_checkpoint = time.perf_counter()
    if stopped_by in ("SIGINT", "SIGTERM"):
        save_checkpoint()
        if rank == 0:
            write_json(out / "metrics.json", metrics | {"stopped_by": stopped_by, "interrupted_at_step": run["step"]})
        log(f"{stopped_by} at step {run['step']}/{total}: checkpoint in {out}; continue with the same command and --resume", rank)
        raise KeyboardInterrupt
    if rank != 0:
        return {}
    return finish(model, config, metrics, run, stopped_by or "completed", best_weights, best_val_scores, val, test)


def end_of_epoch(model, val, val_labels, config: Config, run: dict, rank: int, best_weights, best_val_scores):
    """Validation error after an epoch; the best epoch's weights (on the CPU) and scores are kept,
    and `patience` epochs without improvement stop the run."""
    val_scores, error = None, None
    if rank == 0:
        val_scores = evaluate.cosine_scores(model, val, config.eval_batch_size)
        error = evaluate.evaluate_scores(val_scores, val_labels, min_recall=config.min_recall,
                                         min_precision=config.min_precision)["val"]["error_rate"]
    error = distributed.from_rank0(error)
    run["val_errors"].append(error)
    if error < min(run["val_errors"][:-1], default=math.inf):
        run["best_epoch"], run["bad_epochs"] = run["epoch"], 0
        if rank == 0:
            best_weights = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
            best_val_scores = val_scores
    else:
        run["bad_epochs"] += 1
    log(f"epoch {run['epoch']}: val error {error:.2%} (best: epoch {run['best_epoch']})", rank)
    model.train()
    stop = "patience" if config.patience and run["bad_epochs"] >= config.patience else None
    return best_weights, best_val_scores, stop


def finish(model, config: Config, metrics: dict, run: dict, stopped_by: str, best_weights, best_val_scores,
           val, test) -> dict:
    """Restore the best epoch, evaluate, save the model with its threshold and card, and metrics.json."""
    out = Path(config.out)
    if best_weights is not None:  # the validation scores of those weights are known already
        model.load_state_dict(best_weights)
    else:  # no epoch was evaluated (--no-select-best, or stopped within the first epoch)
        best_val_scores = evaluate.cosine_scores(model, val, config.eval_batch_size)
    metrics["training"] = {"steps": run["step"], "pairs": run["pairs"], "seconds": run["seconds"],
                           "pairs_per_s": run["pairs"] / max(run["seconds"], 1e-9), "epochs": run["epoch"],
                           "val_errors": run["val_errors"], "best_epoch": run["best_epoch"], "stopped_by": stopped_by}
    metrics["fine_tuned"] = evaluate.evaluate_scores(best_val_scores, evaluate.labels_of(val),
                                                     evaluate.cosine_scores(model, test, config.eval_batch_size),
                                                     evaluate.labels_of(test), config.min_recall, config.min_precision)
    print(f"fine-tuned error: val {metrics['fine_tuned']['val']['error_rate']:.2%}, "
          f"test {metrics['fine_tuned']['test']['error_rate']:.2%} ({metrics['training']['pairs_per_s']:.1f} pairs/s, "
          f"stopped: {stopped_by})")
    if config.save:
        decision = {"threshold": metrics["fine_tuned"]["val"]["threshold"], **metrics["fine_tuned"]}
        model.save(out, decision)
        card.write(out, metrics)
    write_json(out / "metrics.json", metrics)
    (out / checkpoint.FILE).unlink(missing_ok=True)  # its work is done
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
    cli.run(main)
