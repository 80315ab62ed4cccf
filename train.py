"""Fine-tune an embedding model on labelled pairs, and say whether it got better.

    python train.py                                   # bge-base-en-v1.5 + 256-d projection on Quora
    python train.py --model DIR --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz \\
        --dataset-size 4000 --device cpu --out out
    python train.py ... --out out --resume            # continue an interrupted run where it stopped
    torchrun --nproc_per_node 8 train.py ...          # data-parallel on 8 GPUs

Evaluates the model as published (zero-shot) and, after training, the fine-tuned one on the same
pairs, each at its own threshold tuned on validation; keeps the weights of the epoch that did best on
validation; ends with a paired verdict of fine-tuned against published on the test pairs (McNemar on
the pairs, a sign test over retrieval queries: `paired.py`), saying so when there are too few test
pairs to tell; and writes the model (a sentence-transformers folder with its tuned threshold and a
model card) and OUT/metrics.json. Every option is a field of `options.Config`.
"""
from __future__ import annotations

import contextlib
import math
import os
import random
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from embed_ft import (batching, card, checkpoint, errors, data, distributed, evaluate, losses, options, paired,
                      run_folder)
from embed_ft.cpu_threads import ThreadChooser
from embed_ft.jsonl import write_json
from embed_ft.losses import InBatchContrastiveLoss, MatryoshkaLoss, WeightedSum
from embed_ft.model import cpu_has_bf16, load_model, mix_weights, pick_device
from embed_ft.options import Config
from embed_ft.run_state import Checkpointer, LossWatch, Run, cpu_copy, start_run


# ---------------------------------------------------------------------------------------- set-up

def load_splits(config: Config) -> tuple[list[data.Pair], list[data.Pair], list[data.Pair]]:
    """Train, validation and test pairs: from the given files, or split off --data without leakage."""
    columns = data.parse_columns(config.columns)
    pairs = data.load_pairs(config.data, columns, config.hub_config)
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
    model = load_published(config, config.dense_out_features).to(device)
    return device, splits, model


def load_published(config: Config, dense_out_features: int | None):
    """--model as published (its pooling, layers and prompts), with the prompt the run chose; None:
    no new projection (the zero-shot model)."""
    model = load_model(config.model, dense_out_features, config.max_length, config.trust_remote_code)
    model.choose_prompt(config.prompt_name, config.prompt)
    return model


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
    # Retrieval trains the first text of a pair as a query, the second as a document, each with its
    # prompt where the model names one; a duplicate decision gives both texts the same prompt.
    roles = ("query", "document") if config.objective == "retrieval" else ("default", "default")
    batches = batching.TokenizedPairs(train_pairs, model, roles)
    log(f"model: {config.model} as published ({model.layout.describe()}); prompt: "
        f"{model.layout.prompt_for() or 'none'!r}" + ("" if model.layout.published else
                                                       " (no sentence-transformers modules: mean pooling)"), rank)
    steps_per_epoch = math.ceil(len(batches) / config.batch_size)
    total = config.epochs * steps_per_epoch
    run = start_run(config, model, device, precision, total, world_size)
    run.train_pairs = len(train_pairs)
    begin(run, val, test, rank)
    loss_fn, autocast = build_loss(config, model.dim), training_autocast(precision, device)
    losses_seen = LossWatch(device, steps_per_epoch, out=run.out)
    saver = Checkpointer(run, losses_seen, folder, on_checkpoint, rank)
    p, threads = run.progress, thread_chooser(config, device)
    model.train()
    started = time.perf_counter() - p.seconds
    with tqdm(total=total, initial=p.step, desc="train", unit="step", disable=rank != 0) as bar, \
            checkpoint.StopRequests() as stop:
        while p.epoch < config.epochs and run.stopped_by is None:
            order = batches.epoch_order(config.seed, p.epoch, config.batch_size, config.bucket_by_length)
            done = p.step - p.epoch * steps_per_epoch  # steps of this epoch already taken
            for batch in batches.batches(order[done * config.batch_size:], config.batch_size,
                                         length_groups_for(config, device), rank, world_size):
                if threads:
                    threads.follow()
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
    if p.step > p.epoch * steps_per_epoch and config.select_best:
        # Stopped inside an epoch (--max-minutes): its weights are judged on validation like a
        # whole epoch's, so that which weights are kept never depends on where the budget ran out.
        end_of_epoch(run, val, rank, partial=f"{p.step - p.epoch * steps_per_epoch} of {steps_per_epoch} steps")
    return finish(run, val, test) if rank == 0 else {}


def thread_chooser(config: Config, device: torch.device) -> ThreadChooser | None:
    """On a CPU, the threads of each step: `--threads N`, or OMP_NUM_THREADS where it is set, or every
    core less one while other work keeps one busy, checked as steps go (cpu_threads.py: beside a busy
    core, a step on every core waits for it at each barrier)."""
    if device.type != "cpu":
        return None
    if config.threads:
        torch.set_num_threads(config.threads)
    return None if config.threads or os.environ.get("OMP_NUM_THREADS") else ThreadChooser(pauses=False)


def begin(run: Run, val: list[data.Pair], test: list[data.Pair], rank: int) -> None:
    """Say where a resumed run goes on, or evaluate the model as published (zero-shot: no new
    projection, whatever this run adds); write metrics.json."""
    config = run.config
    if config.resume:
        log(f"resumed at step {run.progress.step} (epoch {run.progress.epoch + 1})", rank)
    elif config.zero_shot and rank == 0:
        published = evaluate.Remembered(load_published(config, None).to(run.model.device))
        zero_shot = evaluate.both_views(published, val, test, config.eval_batch_size, config.min_recall,
                                        config.min_precision)
        run.metrics["zero_shot"], run.zero_shot_vectors = zero_shot, published.vectors
        log(f"zero-shot (as published): error val {zero_shot['val']['error_rate']:.2%}, test "
            f"{zero_shot['test']['error_rate']:.2%}; test MRR {zero_shot['retrieval']['test']['mrr']:.4f}", rank)
    if rank == 0:
        write_json(run.out / "metrics.json", run.metrics)


def stop_requested(run: Run, stop: checkpoint.StopRequests, device: torch.device) -> bool:
    """A signal or the time budget ends training at this step, on every process at once."""
    over_budget = run.config.max_minutes and run.progress.seconds > 60 * run.config.max_minutes
    if distributed.any_process(bool(stop.requested or over_budget), device):
        run.stopped_by = stop.requested or ("time_budget" if over_budget else "SIGTERM")
    return run.stopped_by is not None


def interrupted(run: Run, saver: Checkpointer, rank: int, total: int) -> None:
    """SIGINT or SIGTERM: checkpoint, say how to go on, and leave with KeyboardInterrupt (exit code 130)."""
    saver.save()
    step = run.progress.step
    if rank == 0:
        write_json(run.out / "metrics.json", run.metrics | {"stopped_by": run.stopped_by, "interrupted_at_step": step})
    log(f"{run.stopped_by} at step {step}/{total}: checkpoint in {run.out}; continue with the same command and --resume",
        rank)
    raise KeyboardInterrupt


def train_step(run: Run, batch: batching.Batch, loss_fn, autocast, device: torch.device) -> tuple[torch.Tensor, int]:
    """One optimiser step on a batch; the loss stays on the device. Returns (loss, pairs in the step)."""
    with autocast:
        embeddings = torch.cat([run.model(**{k: to_device(v, device) for k, v in g.items()}) for g in batch.groups])
    first, second = embeddings[to_device(batch.restore, device)].float().chunk(2)
    first, second, labels = (distributed.gather(x, batch.shares) for x in (first, second, to_device(batch.labels, device)))
    if not run.model.layout.normalize:  # published without Normalize: the losses compare unit vectors
        first, second = F.normalize(first, dim=-1), F.normalize(second, dim=-1)
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


def end_of_epoch(run: Run, val: list[data.Pair], rank: int, partial: str = "") -> None:
    """The objective's validation metric after an epoch (error rate, or MRR for retrieval); the best
    epoch's weights (on the CPU) are kept, and `patience` epochs without improvement stop the run.
    `partial`: how far into the next epoch the run stopped (that epoch is judged as it stands)."""
    config, p = run.config, run.progress
    epoch = p.epoch + 1 if partial else p.epoch
    value, vectors = validation(run, val) if rank == 0 else (None, None)
    value = distributed.from_rank0(value)
    p.val_history.append(value)
    earlier = p.val_history[:-1]
    better = value > max(earlier, default=-math.inf) if config.objective == "retrieval" else value < min(earlier, default=math.inf)
    if better:
        p.best_epoch, p.bad_epochs = epoch, 0
        run.best_partial = partial
        if rank == 0:
            run.best_weights = cpu_copy(run.model)
            run.best_val_vectors = vectors
    else:
        p.bad_epochs += 1
    name = "MRR" if config.objective == "retrieval" else "error"
    log(f"epoch {epoch}{f' (partial: {partial})' if partial else ''}: val {name} {value:.2%} (best: epoch {p.best_epoch})", rank)
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
    if run.start_weights is not None:  # --merge: the chosen epoch's weights, averaged with the starting model's
        tuned = {k: v.to("cpu") for k, v in model.state_dict().items()}
        model.load_state_dict(mix_weights(run.start_weights, tuned, config.merge))
    history = "val_mrr" if config.objective == "retrieval" else "val_errors"
    metrics["training"] = {"train_pairs": run.train_pairs, "steps": p.step, "pairs": p.pairs,
                           "seconds": p.seconds, "pairs_per_s": p.pairs / max(p.seconds, 1e-9), "epochs": p.epoch,
                           history: p.val_history, "best_epoch": p.best_epoch,
                           "stopped_by": run.stopped_by or "completed", "kept": kept_weights(run)}
    metrics["model"] = model.describe()
    print(f"kept: {metrics['training']['kept']}")
    remembered = evaluate.Remembered(model, run.best_val_vectors)  # none after a resume: val is embedded again
    metrics["fine_tuned"] = evaluate.both_views(remembered, val, test, config.eval_batch_size, config.min_recall,
                                                config.min_precision)
    tuned = metrics["fine_tuned"]
    print(f"fine-tuned: error val {tuned['val']['error_rate']:.2%}, test {tuned['test']['error_rate']:.2%}; "
          f"test MRR {tuned['retrieval']['test']['mrr']:.4f} ({metrics['training']['pairs_per_s']:.1f} pairs/s, "
          f"stopped: {metrics['training']['stopped_by']})")
    tuned_right = evaluate.correct(remembered, test, tuned["val"]["threshold"], config.eval_batch_size)
    metrics["test_correct"] = paired.pack(tuned_right)  # a sweep pairs its runs with it
    if "zero_shot" in metrics:
        metrics["verdict"] = verdict(run, remembered, tuned_right, test)
    if config.save:
        model.save(run.out, {"threshold": metrics["fine_tuned"]["val"]["threshold"], **metrics["fine_tuned"]})
        card.write(run.out, metrics)
    write_json(run.out / "metrics.json", metrics)
    checkpoint.remove(run.out)  # its work is done
    return metrics


def kept_weights(run: Run) -> str:
    """Which weights the saved model has, and why, in words (the run's output and the card)."""
    p, config = run.progress, run.config
    if not config.select_best:
        return f"the last step's (step {p.step}; --no-select-best)"
    if not p.best_epoch:
        return "the starting model's: no epoch was judged on validation"
    partial = f" (partial: {run.best_partial})" if run.best_partial else ""
    metric = "MRR" if config.objective == "retrieval" else "error"
    return (f"epoch {p.best_epoch}{partial}, the best of {len(p.val_history)} judged on validation "
            f"({metric} {p.val_history[p.best_epoch - 1]:.2%})")


def verdict(run: Run, tuned: evaluate.Remembered, tuned_right, test: list[data.Pair]) -> dict:
    """Fine-tuned against the model as published, paired on the same test pairs (counted by groups
    of pairs that share texts) and queries, each model at its own validation threshold. The published model's embeddings were kept from the
    zero-shot evaluation (after a resume it embeds them again)."""
    config, zero_shot = run.config, run.metrics["zero_shot"]
    published = evaluate.Remembered(load_published(config, None).to(run.model.device), run.zero_shot_vectors)
    published_right = evaluate.correct(published, test, zero_shot["val"]["threshold"], config.eval_batch_size)
    ranks = [evaluate.retrieval_metrics(m, test, batch_size=config.eval_batch_size, per_query=True)["reciprocal_ranks"]
             for m in (tuned, published)]
    result = {"pairs": paired.compare_pairs(tuned_right, published_right, groups=paired.groups_of(test)),
              "retrieval": paired.compare_queries(*ranks)}
    for view in result.values():
        print("verdict: " + paired.describe(view, "fine-tuned", "published"))
    return result


# ---------------------------------------------------------------------------------- command line

def main(argv: list[str] | None = None) -> None:
    try:
        train(options.parse_args(argv, description=__doc__.split("\n\n")[0]))
    finally:
        distributed.teardown()


if __name__ == "__main__":
    errors.run(main)
