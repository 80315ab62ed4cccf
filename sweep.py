"""The experiment: how much labelled data does fine-tuning need to beat a proprietary embedding model?

A grid of (model x training-set size x output width) runs, one GPU container each on Modal, all
through the same `train.train` as `python train.py`. Each result is appended to a JSONL file as it
arrives, so an interrupted sweep loses nothing and a rerun only runs what is missing or failed; a
preempted container resumes its run from the checkpoint it keeps on the volume. The zero-shot model
of each (model, width) is evaluated once, not once per size, and any other model can be evaluated
once as a baseline (`--baseline`). The figure is drawn from the JSONL alone.

    modal run sweep.py                                    # the full grid on Modal (needs an account)
    modal run sweep.py --models BAAI/bge-base-en-v1.5 --sizes 100,400,1600 --dims 256 --max-containers 8
    python sweep.py --local --models DIR --sizes 100 200 400 --dims 256 384 \\
        --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz --baseline MPNET_DIR   # here, in turn
    python sweep.py --plot results/sweep.jsonl            # summary table and figure only
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import subprocess
import time
import traceback
from pathlib import Path

import modal

import cli
import data
import results
from options import Config

MODELS = ["BAAI/bge-base-en-v1.5", "sentence-transformers/all-mpnet-base-v2", "jinaai/jina-embeddings-v2-small-en"]
SIZES = [100 * 2**i for i in range(11)] + [0]      # 100, 200, ..., 102,400, and 0 = the full training split
DIMS = [256, 512]
CONTAINER_HOURS = 2
# Every other hyperparameter, fixed across the grid and recorded with each result: train.py's recipe.
# Each run gets a training budget well below the container's timeout, so a slow configuration ends
# with a result (stopped_by: time_budget) rather than a killed container. Zero-shot is evaluated once
# per (model, width), not per run.
RECIPE = Config()
FIXED = {"epochs": RECIPE.epochs, "batch_size": RECIPE.batch_size, "lr": RECIPE.lr, "loss": RECIPE.loss,
         "length_groups": RECIPE.length_groups, "bucket_by_length": RECIPE.bucket_by_length,
         "max_length": RECIPE.max_length, "seed": RECIPE.seed, "val_size": 5000, "test_size": 10000, "save": False,
         "zero_shot": False, "max_minutes": 100}
NEEDS_REMOTE_CODE = {"jinaai/jina-embeddings-v2-small-en"}


def grid(models: list[str], sizes: list[int], dims: list[int], **fixed) -> list[dict]:
    """Every combination, as keyword arguments for options.Config."""
    return [{"model": m, "dataset_size": n, "dense_out_features": d,
             "trust_remote_code": m in NEEDS_REMOTE_CODE, **FIXED, **fixed}
            for m, n, d in itertools.product(models, sizes, dims)]


def zero_shot_configs(configs: list[dict]) -> list[dict]:
    """One per (model, width): the untrained model is the same whatever the dataset size."""
    return list({(c["model"], c["dense_out_features"]): c | {"dataset_size": 0} for c in configs}.values())


def config_key(config: dict) -> str:
    """A stable name for a configuration (the output folder does not change what is computed)."""
    relevant = {k: v for k, v in sorted(config.items()) if k != "out"}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- objectives

def run_config(config: dict, out_root: str, on_checkpoint=None, processes: int = 1) -> dict:
    """The objective: one training run in OUT_ROOT/KEY. Started again after a preemption, it resumes
    from the checkpoint there. A failure comes back as a result, so the other runs go on."""
    import checkpoint
    import train
    key, out = config_key(config), Path(out_root) / config_key(config)
    row = {"kind": "run", "key": key, "config": config}
    started = time.time()
    try:
        resume = (out / checkpoint.FILE).is_file()
        if processes > 1:
            metrics = torchrun(Config(**config, out=str(out), resume=resume), processes)
        else:
            metrics = train.train(Config(**config, out=str(out), resume=resume), on_checkpoint)
        return row | {k: metrics[k] for k in ("fine_tuned", "training", "environment")} | {
            "resumed_at_steps": metrics.get("resumed_at_steps", []), "seconds": time.time() - started}
    except Exception as e:
        traceback.print_exc()
        return row | {"error": f"{type(e).__name__}: {e}"}


def torchrun(config, processes: int) -> dict:
    """train.py under torchrun, data-parallel over `processes` GPUs; its metrics.json."""
    flags = []
    for f in dataclasses.fields(Config):
        value = getattr(config, f.name)
        flags += ([f"--{'' if value else 'no-'}{f.name.replace('_', '-')}"] if isinstance(value, bool)
                  else [f"--{f.name.replace('_', '-')}", str(value)])
    subprocess.run(["torchrun", "--nproc_per_node", str(processes), str(Path(__file__).with_name("train.py"))] + flags,
                   check=True)
    return json.loads((Path(config.out) / "metrics.json").read_text())


def evaluate_once(config: dict, baseline: str | None = None, base_url: str | None = None) -> dict:
    """The untrained model of a configuration (its projection drawn from the seed, as training starts
    from it), or a `baseline` encoder as published (a folder, a hub name or openai:MODEL, at the
    configuration's width), on the configuration's validation and test pairs."""
    import evaluate
    import train
    config = Config(**config | {"dataset_size": 0})
    if baseline is None:
        _, (_, val, test), model = train.prepare(config)
        return {"kind": "zero_shot", "model": config.model, "dimensions": config.dense_out_features,
                **evaluate.evaluate(model, val, test, config.eval_batch_size)}
    _, val, test = train.load_splits(config)
    openai = baseline.startswith("openai:")
    encoder = evaluate.load_encoder(baseline, config.dense_out_features if openai else None, base_url, device=config.device)
    return {"kind": "baseline", "model": baseline, "dimensions": config.dense_out_features if openai else encoder.dim,
            **evaluate.evaluate(encoder, val, test, 512 if openai else config.eval_batch_size)}


# -------------------------------------------------------------------------------------------- Modal
# The image pins what the containers run; the project's modules travel with it. The volume keeps the
# Hugging Face downloads (fetched once, before the fan-out) and each run's folder: its checkpoint,
# so that a preempted run resumes, and its metrics.json.
# torch 2.13.0 from PyPI is built for CUDA 13.0 and needs an NVIDIA driver of the R580 series or later.

app = modal.App("embed-ft-sweep")
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install("torch==2.13.0", "transformers==5.24.0", "datasets==5.2.0", "numpy==2.4.6",
                    "safetensors==0.8.0", "tqdm==4.70.1", "openai==3.57.0", "einops==0.8.2")
    .env({"HF_HOME": "/cache/huggingface", "TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("cli", "data", "batching", "model", "losses", "options", "checkpoint", "distributed",
                             "card", "train", "evaluate", "results")  # sweep.py itself is added by Modal
)
volume = modal.Volume.from_name("embed-ft-sweep", create_if_missing=True)
GPU = "H100"


@app.function(image=image, volumes={"/cache": volume}, timeout=30 * 60)
def fetch(models: list[str], dataset: str) -> None:
    """Download each model and the dataset into the volume once, so that the containers of the
    fan-out read them instead of all downloading the same files at once."""
    from datasets import load_dataset
    from huggingface_hub import snapshot_download
    for name in models:
        snapshot_download(name)
    load_dataset(dataset, "pair-class")
    volume.commit()


@app.function(gpu=GPU, image=image, volumes={"/cache": volume}, timeout=CONTAINER_HOURS * 60 * 60,
              retries=modal.Retries(max_retries=3, initial_delay=30.0))
def objective(config: dict, out_root: str = "/cache/runs", processes: int = 1) -> dict:
    in_container = not modal.is_local()
    result = run_config(config, out_root, volume.commit if in_container else None, processes)
    if in_container:  # persist this run's folder (metrics.json) on the volume
        volume.commit()
    return result


@app.function(gpu=GPU, image=image, volumes={"/cache": volume}, timeout=60 * 60)
def evaluate_remote(config: dict, baseline: str | None = None) -> dict:
    return evaluate_once(config, baseline)


@app.local_entrypoint()
def modal_main(models: str = ",".join(MODELS), sizes: str = ",".join(map(str, SIZES)),
               dims: str = ",".join(map(str, DIMS)), results_path: str = "results/sweep.jsonl",
               baselines: str = "", eval_size: int = 0, max_containers: int = 0, gpus_per_run: int = 1):
    """Shrink the grid with comma-separated --models, --sizes (0 = full split) and --dims.
    --baselines: comma-separated models to evaluate once (openai:... runs here, with OPENAI_API_KEY)."""
    configs = grid(models.split(","), [int(s) for s in sizes.split(",")], [int(d) for d in dims.split(",")],
                   eval_size=eval_size, device="cuda")  # in a container without a GPU, fail loudly
    path = Path(results_path)
    todo = pending(configs, path)
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} already done, running {len(todo)} on Modal")
    fetch.remote([m for m in models.split(",") if not Path(m).exists()], data.HUB_DEFAULT)
    for result in evaluate_remote.map(missing_zero_shots(configs, path), return_exceptions=True):
        record(result, path)
    options = {"gpu": f"{GPU}:{gpus_per_run}"} | ({"max_containers": max_containers} if max_containers else {})
    runner = objective.with_options(**options)
    # Results in input order, so that a container-level failure (a timeout, an out-of-memory kill)
    # is recorded with the configuration it belongs to; each still lands on disk as it comes.
    record_all(todo, runner.map(todo, kwargs={"processes": gpus_per_run}, order_outputs=True, return_exceptions=True), path)
    for name in filter(None, baselines.split(",")):
        record_baseline(configs, name, path, remote=not name.startswith("openai:"))
    finish(path)


# ---------------------------------------------------------------------------------- results on disk

def pending(configs: list[dict], path: Path) -> list[dict]:
    """The configurations without a successful result yet (failed ones are tried again)."""
    done = {r["key"] for r in results.read(path) if "fine_tuned" in r}
    return [c for c in configs if config_key(c) not in done]


def missing_zero_shots(configs: list[dict], path: Path) -> list[dict]:
    done = {(r["model"], r["dimensions"]) for r in results.read(path) if r.get("kind") == "zero_shot"}
    return [c for c in zero_shot_configs(configs) if (c["model"], c["dense_out_features"]) not in done]


def record_all(configs: list[dict], outcomes, path: Path) -> None:
    """Each outcome (a result, or the exception of a container that failed) with its configuration."""
    for config, outcome in zip(configs, outcomes):
        record(outcome, path, config)


def record(result, path: Path, config: dict | None = None) -> None:
    if isinstance(result, BaseException):  # the container itself failed (timeout, out of memory, ...)
        result = {"kind": "run" if config else "evaluation", "key": config_key(config) if config else None,
                  "config": config, "error": f"{type(result).__name__}: {result}"}
    results.append(path, result)
    if "error" in result:
        c = result.get("config") or {}
        print(f"FAILED {c.get('model')} n={c.get('dataset_size')} d={c.get('dense_out_features')} "
              f"(key {result.get('key')}): {result['error']}")
    elif result["kind"] == "run":
        c = result["config"]
        print(f"done {c['model']} n={c['dataset_size']} d={c['dense_out_features']}: test error "
              f"{result['fine_tuned']['test']['error_rate']:.2%}")
    else:
        print(f"{result['kind']} {result['model']} {result['dimensions']}-d: test error {result['test']['error_rate']:.2%}")


def record_baseline(configs: list[dict], name: str, path: Path, remote: bool = False, base_url: str | None = None) -> None:
    """A baseline model, once per width for openai:... (its width is a request option), else once."""
    done = {(r["model"], r["dimensions"]) for r in results.read(path) if r.get("kind") == "baseline"}
    widths = sorted({c["dense_out_features"] for c in configs}) if name.startswith("openai:") else [None]
    for width in widths:
        if not any(model == name and (width is None or dim == width) for model, dim in done):
            config = configs[0] | ({"dense_out_features": width} if width else {})
            record(evaluate_remote.remote(config, name) if remote else evaluate_once(config, name, base_url), path)


def finish(path: Path, figure: Path | None = None, title: str = "") -> None:
    import figures
    rows = results.read(path)
    print(figures.sweep_table(rows))
    figure = figure or path.with_suffix(".png")
    figures.sweep_plot(rows, figure, title)
    print(f"figure: {figure}")


# ------------------------------------------------------------------------------- local command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the sweep here, in turn (--local), or redraw it (--plot).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run the grid in this process")
    mode.add_argument("--plot", metavar="JSONL", help="only print the table and draw the figure")
    parser.add_argument("--models", nargs="+", default=MODELS, help="hub names or local folders")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="training pairs; 0 = all")
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS, help="projection widths")
    parser.add_argument("--data", default=data.HUB_DEFAULT)
    parser.add_argument("--val", default="", help="validation file (else split off --data)")
    parser.add_argument("--test", default="", help="test file (else split off --data)")
    parser.add_argument("--eval-size", type=int, default=0, help="evaluate on this many val/test pairs; 0 = all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", default="results/sweep.jsonl")
    parser.add_argument("--runs", default="runs", help="each run's folder (checkpoint, metrics.json) goes in RUNS/KEY/")
    parser.add_argument("--figure", help="default: the results path with .png")
    parser.add_argument("--title", default="", help="figure title (say which device ran it)")
    parser.add_argument("--baseline", action="append", default=[], help="also evaluate this model once, as published: "
                        "a folder, a hub name or openai:MODEL (repeat the flag for more)")
    parser.add_argument("--base-url", help="an OpenAI-compatible server for openai: baselines")
    cli.add_debug_flag(parser)
    args = parser.parse_args(argv)
    figure = Path(args.figure) if args.figure else None
    if args.plot:
        return finish(Path(args.plot), figure, args.title)
    if min(args.sizes) < 0 or min(args.dims) < 0:
        raise cli.InputError("--sizes and --dims must be 0 or more")
    path = Path(args.results)
    configs = grid(args.models, args.sizes, args.dims, data=args.data, val=args.val, test=args.test,
                   eval_size=args.eval_size, device=args.device)
    for config in missing_zero_shots(configs, path):
        record(evaluate_once(config), path)
    todo = pending(configs, path)
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} already done, running {len(todo)}")
    for config in todo:
        record(run_config(config, args.runs), path)
    for name in args.baseline:
        record_baseline(configs, name, path, base_url=args.base_url)
    finish(path, figure, args.title)


if __name__ == "__main__":
    cli.run(main)
