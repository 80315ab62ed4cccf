"""Every option of a training run: the fields of `Config`, with their defaults and help, each one a
flag of `python train.py` (`--dense-out-features 0`, `--no-select-best`, ...); the range of every
number; and the checks that name an option that cannot work before anything is loaded.
"""
from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field

from embed_ft import errors, data, paths
from embed_ft.errors import InputError

LOSSES = ("ocl", "cosent", "contrastive", "cosine")  # losses.BY_NAME builds them


@dataclass
class Config:
    # model
    model: str = field(default="BAAI/bge-base-en-v1.5", metadata={"path": "MODEL", "help": "hub name, local folder, or an earlier run's --out to continue from"})
    dense_out_features: int = field(default=256, metadata={"help": "projection width; 0 keeps the encoder's"})
    max_length: int = field(default=256, metadata={"help": "tokens per text, longer ones are truncated"})
    trust_remote_code: bool = field(default=False, metadata={"help": "run the model repo's code (jina needs it)"})
    prompt_name: str = field(default="", metadata={"help": "one of the model's published prompts for both texts of a "
                             "pair (default: the model's default_prompt_name); retrieval also uses its query/document prompts"})
    prompt: str = field(default="", metadata={"help": "a prompt of your own before every text (saved as the model's default)"})
    freeze_encoder: bool = field(default=False, metadata={"help": "train only the projection"})
    # data
    data: str = field(default=data.HUB_DEFAULT, metadata={"path": "DATA", "help": "hub dataset or local CSV/TSV/JSONL/Parquet"})
    hub_config: str = field(default="pair-class", metadata={"help": "hub dataset config"})
    columns: str = field(default="", metadata={"help": "TEXT1,TEXT2,LABEL if the names are not recognised"})
    val: str = field(default="", metadata={"path": "FILE", "help": "validation pairs file; else split off --data"})
    test: str = field(default="", metadata={"path": "FILE", "help": "test pairs file; else split off --data"})
    val_size: float = field(default=0.1, metadata={"help": "split off --data: fraction (<1) or pairs"})
    test_size: float = field(default=0.1, metadata={"help": "split off --data: fraction (<1) or pairs"})
    dataset_size: int = field(default=0, metadata={"help": "training pairs to sample (nested); 0 = all"})
    implied_pairs: str = field(default="none", metadata={"help": "none | duplicates | all: add the pairs the training labels imply"})
    eval_size: int = field(default=0, metadata={"help": "evaluate on this many val and test pairs; 0 = all"})
    # optimisation
    objective: str = field(default="classification", metadata={"help": "classification: the duplicate decision (OCL, "
                           "epochs chosen by val error) | retrieval: ranking a corpus (in-batch InfoNCE, by val MRR)"})
    loss: str = field(default="ocl", metadata={"help": "see losses.py (retrieval trains with contrastive)"})
    margin: float = field(default=0.5, metadata={"help": "ocl: cosine-distance margin for non-duplicates"})
    scale: float = field(default=20.0, metadata={"help": "cosent, contrastive: inverse temperature"})
    in_batch_weight: float = field(default=0.0, metadata={"help": "add the in-batch InfoNCE loss with this weight"})
    merge: float = field(default=1.0, metadata={"help": "share of the fine-tuned weights in the saved model, the rest "
                         "the starting model's: 0.25 keeps its retrieval (docs/retrieval.md); 1 = fine-tuned alone"})
    matryoshka_dims: str = field(default="", metadata={"help": "e.g. 64,128,256: also train these prefix widths"})
    epochs: int = field(default=3, metadata={"help": "passes over the training pairs (chosen on validation, see README)"})
    batch_size: int = field(default=32, metadata={"help": "pairs per step (over all processes)"})
    length_groups: int = field(default=0, metadata={"help": "forward passes per step, texts grouped by length to pad "
                                                    "less (0: 1 on a GPU, 2 on a CPU)"})
    bucket_by_length: bool = field(default=True, metadata={"help": "batches of pairs of similar length (less padding)"})
    lr: float = field(default=5e-5, metadata={"help": "peak learning rate (chosen on validation, see README)"})
    weight_decay: float = field(default=0.01, metadata={"help": "AdamW's decoupled weight decay"})
    warmup_ratio: float = field(default=0.1, metadata={"help": "share of steps with linear warm-up"})
    max_grad_norm: float = field(default=1.0, metadata={"help": "clip the gradient to this norm"})
    precision: str = field(default="auto", metadata={"help": "auto | bf16 | fp16 | fp32"})
    # choosing and stopping
    select_best: bool = field(default=True, metadata={"help": "evaluate on validation after each epoch, keep the best epoch"})
    patience: int = field(default=0, metadata={"help": "stop after this many epochs without a better validation error; 0 = never"})
    max_minutes: float = field(default=0.0, metadata={"help": "stop training after this many minutes, then evaluate and save; 0 = no limit"})
    min_recall: float = field(default=0.0, metadata={"help": "tune the threshold for accuracy with at least this recall"})
    min_precision: float = field(default=0.0, metadata={"help": "... and/or at least this precision"})
    # running
    device: str = field(default="auto", metadata={"help": "auto | cpu | cuda | cuda:N"})
    threads: int = field(default=0, metadata={"help": "CPU threads a step takes; 0: every core, one fewer while other "
                         "work keeps one busy (OMP_NUM_THREADS, where set, decides instead)"})
    seed: int = field(default=0, metadata={"help": "picks the --dataset-size sample, the data order and the initialisation"})
    zero_shot: bool = field(default=True, metadata={"help": "evaluate the model before training too"})
    eval_batch_size: int = field(default=128, metadata={"help": "texts per forward pass when evaluating"})
    out: str = field(default="out", metadata={"path": "OUTDIR", "help": "where the model, metrics.json and checkpoints go"})
    save: bool = field(default=True, metadata={"help": "write the fine-tuned model to --out (sweeps skip it)"})
    checkpoint_every: int = field(default=0, metadata={"help": "steps between checkpoints; 0 = about every 5 minutes"})
    resume: bool = field(default=False, metadata={"help": "continue from OUT/checkpoint.pt"})
    overwrite: bool = field(default=False, metadata={"help": "replace what an earlier run left in --out"})


# Options that may change between an interrupted run and its --resume.
RESUMABLE_CHANGES = {"resume", "overwrite", "max_minutes", "checkpoint_every", "device", "eval_batch_size", "threads"}

# The range of every numeric option: ">= a", "> a" or "a..b" (both ends included).
RANGES = {"dense_out_features": ">= 0", "max_length": ">= 1", "val_size": "> 0", "test_size": "> 0",
          "dataset_size": ">= 0", "eval_size": ">= 0", "margin": ">= 0", "scale": "> 0", "in_batch_weight": ">= 0", "merge": "0..1",
          "epochs": ">= 1", "batch_size": ">= 1", "length_groups": ">= 0", "lr": "> 0", "weight_decay": ">= 0",
          "warmup_ratio": "0..1", "max_grad_norm": "> 0", "patience": ">= 0", "max_minutes": ">= 0",
          "min_recall": "0..1", "min_precision": "0..1", "seed": ">= 0", "eval_batch_size": ">= 1",
          "checkpoint_every": ">= 0", "threads": ">= 0"}
CHOICES = {"implied_pairs": ("none", "duplicates", "all"), "loss": LOSSES, "precision": ("auto", "bf16", "fp16", "fp32"),
           "objective": ("classification", "retrieval")}


def out_of_range(value: float, rule: str) -> str | None:
    """What `value` must be under `rule`, if it is not."""
    if ".." in rule:
        low, high = (float(x) for x in rule.split(".."))
        return None if low <= value <= high else f"between {rule.replace('..', ' and ')}"
    sign, bound = rule.split()
    if sign == ">=":
        return None if value >= float(bound) else f"at least {bound}"
    return None if value > float(bound) else f"more than {bound}"


def check(config: Config) -> None:
    """Options that cannot work, named before anything is loaded."""
    for name, rule in RANGES.items():
        value = getattr(config, name)
        wanted = out_of_range(value, rule)
        if wanted:
            raise InputError(f"--{name.replace('_', '-')} must be {wanted} (got {value})")
    for name, allowed in CHOICES.items():
        if getattr(config, name) not in allowed:
            raise InputError(f"--{name.replace('_', '-')} must be one of {', '.join(allowed)} (got {getattr(config, name)})")
    if bool(config.val) != bool(config.test):
        raise InputError("give both --val and --test, or neither (to split them off --data)")
    if config.objective == "retrieval" and config.loss not in ("ocl", "contrastive"):
        raise InputError(f"--objective retrieval trains with in-batch InfoNCE (--loss contrastive); drop --loss {config.loss}")
    if config.objective == "retrieval" and config.in_batch_weight:
        raise InputError(f"--objective retrieval already trains with in-batch InfoNCE alone; drop --in-batch-weight "
                         f"{config.in_batch_weight}")


def parse_args(argv: list[str] | None = None, description: str = "") -> Config:
    """Every field of Config becomes a --flag with the same default; booleans are switches."""
    parser = argparse.ArgumentParser(description=description,
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    for f in dataclasses.fields(Config):
        flag, help_ = "--" + f.name.replace("_", "-"), f.metadata.get("help", " ")
        if f.type == "bool":
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=help_)
        else:
            kind = {"int": int, "float": float, "str": str}[f.type]
            choices = CHOICES.get(f.name)
            parser.add_argument(flag, type=kind, default=f.default, choices=choices, help=help_,
                                metavar=f.metadata.get("path"))
    errors.add_debug_flag(parser)
    args = vars(paths.parse(parser, argv))
    args.pop("debug")
    return Config(**args)


def to_flags(config: Config) -> list[str]:
    """The command-line flags that `parse_args` reads back as `config` (for torchrun)."""
    flags = []
    for f in dataclasses.fields(Config):
        value, flag = getattr(config, f.name), f.name.replace("_", "-")
        flags += [f"--{'' if value else 'no-'}{flag}"] if isinstance(value, bool) else [f"--{flag}", str(value)]
    return flags


def parse_overrides(text: str) -> dict:
    """"epochs=4 lr=1e-4" -> {"epochs": 4, "lr": 0.0001}, each value typed as its Config field."""
    kinds = {f.name: f.type for f in dataclasses.fields(Config)}
    overrides = {}
    for item in text.split():
        name, _, value = item.partition("=")
        name = name.removeprefix("--").replace("-", "_")  # eval-size, --eval-size and eval_size alike
        if name not in kinds:
            raise InputError(f"unknown option '{name}' (see python train.py --help)")
        if kinds[name] == "bool" and value.lower() not in ("1", "true", "yes", "0", "false", "no"):
            raise InputError(f"--set {item}: {name} is true or false")
        try:
            overrides[name] = value.lower() in ("1", "true", "yes") if kinds[name] == "bool" else \
                {"int": int, "float": float, "str": str}[kinds[name]](value)
        except ValueError:
            raise InputError(f"--set {item}: {name} takes {'an integer' if kinds[name] == 'int' else 'a number'}") from None
    kinds_of_paths = {f.name: f.metadata["path"] for f in dataclasses.fields(Config) if "path" in f.metadata}
    for name, value in overrides.items():
        if name in kinds_of_paths and value:
            paths.check(f"--set {name}", value, kinds_of_paths[name])  # a missing --set model=DIR, say
    check(Config(**overrides))  # a range or a choice that cannot work, named before a round starts
    return overrides
