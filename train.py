"""Fine-tune an embedding model on labelled pairs, and say whether it got better.

    python train.py                                   # bge-base-en-v1.5 + 256-d projection on Quora
    python train.py --model DIR --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz \\
        --dataset-size 4000 --device cpu --out out

Evaluates the model before training (zero-shot, with its fresh projection) and after, and writes
the fine-tuned model and OUT/metrics.json. Every option is a field of `Config` below.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import data
import evaluate
from losses import CoSENTLoss, CosineSimilarityLoss, InBatchContrastiveLoss, OnlineContrastiveLoss
from model import Embedder, cpu_has_bf16


@dataclass
class Config:
    # model
    model: str = field(default="BAAI/bge-base-en-v1.5", metadata={"help": "hub name or local folder"})
    dense_out_features: int = field(default=256, metadata={"help": "projection width; 0 keeps the encoder's"})
    max_length: int = field(default=256, metadata={"help": "tokens per text, longer ones are truncated"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the model repo's code (jina needs it)"})
    freeze_encoder: bool = field(default=False, metadata={"help": "train only the projection"})
    # data
    data: str = field(default=data.HUB_DEFAULT, metadata={"help": "hub dataset or local CSV/TSV/JSONL/Parquet"})
    hub_config: str = field(default="pair-class", metadata={"help": "hub dataset config"})
    columns: str = field(default="", metadata={"help": "TEXT1,TEXT2,LABEL if the names are not recognised"})
    val: str = field(default="", metadata={"help": "validation pairs file; else split off --data"})
    test: str = field(default="", metadata={"help": "test pairs file; else split off --data"})
    val_size: float = field(default=0.1, metadata={"help": "split off --data: fraction (<1) or pairs"})
    test_size: float = field(default=0.1, metadata={"help": "split off --data: fraction (<1) or pairs"})
    dataset_size: int = field(default=0, metadata={"help": "training pairs to sample (nested); 0 = all"})
    eval_size: int = field(default=0, metadata={"help": "evaluate on this many val and test pairs; 0 = all"})
    # optimisation
    loss: str = field(default="ocl", metadata={"help": "ocl | cosent | contrastive | cosine (see losses.py)"})
    margin: float = field(default=0.5, metadata={"help": "ocl: cosine-distance margin for non-duplicates"})
    scale: float = field(default=20.0, metadata={"help": "cosent, contrastive: inverse temperature"})
    epochs: int = 1
    batch_size: int = field(default=32, metadata={"help": "pairs per step"})
    length_groups: int = field(default=4, metadata={"help": "forward passes per step, texts grouped by length to pad less"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (chosen on validation, see README)"})
    weight_decay: float = 0.01
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warm-up"})
    max_grad_norm: float = 1.0
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    # running
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    seed: int = 0
    eval_every_epoch: bool = field(default=False, metadata={"help": "also report val error after each epoch"})
    eval_batch_size: int = 128
    out: str = field(default="out", metadata={"help": "where the model and metrics.json go"})
    save: bool = field(default=True, metadata={"help": "write the fine-tuned model to --out (sweeps skip it)"})


LOSSES = {  # --loss name -> the loss, built from the config
    "ocl": lambda c: OnlineContrastiveLoss(c.margin),
    "cosent": lambda c: CoSENTLoss(c.scale),
    "contrastive": lambda c: InBatchContrastiveLoss(c.scale),
    "cosine": lambda c: CosineSimilarityLoss(),
}


# ---------------------------------------------------------------------------------------- set-up

def load_splits(config: Config) -> tuple[list[data.Pair], list[data.Pair], list[data.Pair]]:
    """Train, validation and test pairs: from the given files, or split off --data without leakage."""
    columns = tuple(config.columns.split(",")) if config.columns else None
    pairs = data.load_pairs(config.data, columns, config.hub_config)
    if bool(config.val) != bool(config.test):
        raise data.DataError("give both --val and --test, or neither (to split them off --data)")
    if config.val:
        train, val, test = pairs, data.load_pairs(config.val, columns), data.load_pairs(config.test, columns)
    else:
        train, val, test = data.split_pairs(pairs, config.val_size, config.test_size, config.seed)
    if config.dataset_size:
        train = data.subsample(train, config.dataset_size, config.seed)
    if config.eval_size:  # a fixed subset (seed 0) so that every run of a sweep sees the same pairs
        val, test = (data.subsample(p, min(config.eval_size, len(p)), seed=0) for p in (val, test))
    return train, val, test


def pick_device(name: str) -> torch.device:
    return torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)


def pick_precision(name: str, device: torch.device) -> str:
    """bf16 where the device computes it natively (CUDA since Ampere, CPUs with AVX512-BF16/AMX),
    fp16 with loss scaling on older GPUs, fp32 elsewhere."""
    if name != "auto":
        return name
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def linear_warmup_decay(step: int, warmup: int, total: int) -> float:
    """Learning-rate multiplier: 0 -> 1 over the warm-up steps, then 1 -> 0 linearly."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(1, total - warmup))


def write_json(path: Path, obj: dict) -> None:
    """Write through a temporary file, so an interruption never leaves half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


# -------------------------------------------------------------------------------------- training

def train(config: Config) -> dict:
    """The whole job: data, zero-shot evaluation, fine-tuning, evaluation, saving. Returns metrics."""
    seed_everything(config.seed)
    device = pick_device(config.device)
    precision = pick_precision(config.precision, device)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    train_pairs, val, test = load_splits(config)
    print(f"pairs: {len(train_pairs)} train, {len(val)} val, {len(test)} test | device {device} | {precision}")

    model = Embedder.from_pretrained(config.model, config.dense_out_features or None, config.max_length,
                                     config.trust_remote_code).to(device)
    if config.freeze_encoder:
        model.encoder.requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise data.DataError("--freeze-encoder with --dense-out-features 0 leaves nothing to train")

    metrics = {"config": dataclasses.asdict(config) | {"resolved_precision": precision, "resolved_device": str(device)}}
    metrics["zero_shot"] = evaluate.evaluate(model, val, test, config.eval_batch_size)
    print(f"zero-shot error: val {metrics['zero_shot']['val']['error_rate']:.2%}, "
          f"test {metrics['zero_shot']['test']['error_rate']:.2%}")
    write_json(out / "metrics.json", metrics)

    batches = data.TokenizedPairs(train_pairs, model.tokenizer, model.max_length)
    loss_fn = LOSSES[config.loss](config)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    total = config.epochs * math.ceil(len(batches) / config.batch_size)
    warmup = max(1, int(config.warmup_ratio * total))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: linear_warmup_decay(s, warmup, total))
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
                if precision in ("bf16", "fp16") else contextlib.nullcontext())
    rng = np.random.default_rng(config.seed)

    model.train()
    bar = tqdm(total=total, desc="train", unit="step")
    started, seen, step = time.perf_counter(), 0, 0
    try:
        for epoch in range(config.epochs):
            for groups, restore, labels in batches.batches(config.batch_size, rng, config.length_groups):
                with autocast:
                    embeddings = torch.cat([model(**{k: v.to(device) for k, v in g.items()}) for g in groups])
                first, second = embeddings[restore.to(device)].float().chunk(2)
                labels = labels.to(device)
                loss = loss_fn(first, second, labels)  # losses run in fp32, outside autocast
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm)
                scaler.step(optimizer)
                scaler.update()
                scheduler.step()
                step, seen = step + 1, seen + len(labels)
                bar.set_postfix(loss=f"{loss.item():.4f}", pairs_per_s=f"{seen / (time.perf_counter() - started):.1f}")
                bar.update()
            if config.eval_every_epoch and epoch + 1 < config.epochs:
                val_error = evaluate.evaluate(model, val, batch_size=config.eval_batch_size)["val"]["error_rate"]
                tqdm.write(f"epoch {epoch + 1}: val error {val_error:.2%}")
    except KeyboardInterrupt:  # keep what was learned so far, then stop
        bar.close()
        if config.save:
            model.save(out)
        write_json(out / "metrics.json", metrics | {"interrupted_at_step": step, "total_steps": total})
        print(f"\ninterrupted at step {step}/{total}: model (if --save) and metrics in {out}; no fine-tuned evaluation")
        raise
    bar.close()
    seconds = time.perf_counter() - started
    metrics["training"] = {"steps": step, "pairs": seen, "seconds": seconds, "pairs_per_s": seen / seconds}

    metrics["fine_tuned"] = evaluate.evaluate(model, val, test, config.eval_batch_size)
    print(f"fine-tuned error: val {metrics['fine_tuned']['val']['error_rate']:.2%}, "
          f"test {metrics['fine_tuned']['test']['error_rate']:.2%} ({seen / seconds:.1f} pairs/s)")
    if config.save:
        model.save(out)
    write_json(out / "metrics.json", metrics)
    return metrics


# ---------------------------------------------------------------------------------- command line

def parse_args(argv: list[str] | None = None) -> Config:
    """Every field of Config becomes a --flag with the same default; booleans are switches."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", " ")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = list(LOSSES) if f.name == "loss" else None
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_)
    return Config(**vars(parser.parse_args(argv)))


def main(argv: list[str] | None = None) -> None:
    config = parse_args(argv)
    try:
        train(config)
    except data.DataError as e:
        sys.exit(f"error: {e}")
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
