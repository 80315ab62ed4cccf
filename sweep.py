"""The experiment: how much labelled data does fine-tuning need to beat a proprietary embedding model?

A grid of (model x training-set size x output width) runs, one GPU container each on Modal, all
through the same `train.train` as `python train.py`. Each result is appended to a JSONL file the
moment its run finishes, whatever order they finish in, so an interrupted sweep loses nothing and a
rerun only runs what is missing or failed. A run that finished on the volume but was never recorded
(the local client died) is picked up from its metrics.json, not trained again; a preempted container
resumes its run from the checkpoint it keeps on the volume. The zero-shot model of each (model,
width) is evaluated once, not once per size, and any other model can be evaluated once as a baseline
(`--baseline`). The figure is drawn from the JSONL alone. docs/sweep.md has the first-run guide and
the cost estimate.

    modal run --detach sweep.py                           # the full grid on Modal (needs an account)
    modal run sweep.py --models BAAI/bge-base-en-v1.5 --sizes 100,400,1600 --dims 256 --max-containers 8
    python sweep.py --local --models DIR --sizes 100 200 400 --dims 256 384 \\
        --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz --baseline MPNET_DIR   # here, in turn
    python sweep.py --plot results/sweep.jsonl            # summary table and figure only
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import time
import traceback
from pathlib import Path

import modal

from embed_ft import errors, data, jsonl, options, paths
from embed_ft.options import Config
from embed_ft.sources import model_kind

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
# Data-parallel runs (--gpus-per-run G) keep the recipe's batch on each GPU, so the global batch is
# G x 32: split over G GPUs, a batch of 32 would leave each 4 pairs a step at nearly the cost of 32.
# A bigger batch is a different recipe, recorded in the config (and so in the key). Only runs of at
# least this many pairs get G GPUs: a smaller one is over in minutes on one, and at a batch of 256
# it would take too few steps.
MULTI_GPU_MIN_PAIRS = 51_200


def grid(models: list[str], sizes: list[int], dims: list[int], **fixed) -> list[dict]:
    """Every combination, once (a size or width given twice is one point), as keyword arguments for
    options.Config."""
    configs = [{"model": m, "dataset_size": n, "dense_out_features": d,
                "trust_remote_code": m in NEEDS_REMOTE_CODE, **FIXED, **fixed}
               for m, n, d in itertools.product(models, sizes, dims)]
    return list({config_key(c): c for c in configs}.values())


def processes_for(config: dict, gpus_per_run: int) -> int:
    """How many GPUs a run gets: G for the full split and runs of MULTI_GPU_MIN_PAIRS or more, else 1."""
    big = config["dataset_size"] == 0 or config["dataset_size"] >= MULTI_GPU_MIN_PAIRS
    return gpus_per_run if big else 1


def scaled_for(config: dict, processes: int) -> dict:
    """The configuration as it runs on `processes` GPUs: the recipe's batch on each (see above)."""
    return config | {"batch_size": config["batch_size"] * processes} if processes > 1 else config


def zero_shot_configs(configs: list[dict]) -> list[dict]:
    """One per (model, width): the untrained model is the same whatever the dataset size."""
    return list({(c["model"], c["dense_out_features"]): c | {"dataset_size": 0} for c in configs}.values())


def config_key(config: dict, processes: int = 1) -> str:
    """A stable name for a run (the output folder does not change what is computed; the number of
    processes does, slightly, through the order of floating-point sums)."""
    relevant = {k: v for k, v in sorted(config.items()) if k != "out"} | ({"processes": processes} if processes > 1 else {})
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


# ------------------------------------------------------------------------------------- objectives

def run_config(config: dict, out_root: str, on_checkpoint=None, processes: int = 1) -> dict:
    """The objective: one training run in OUT_ROOT/KEY. A run that already finished there is read
    back, not trained again; one that was interrupted resumes from its checkpoint. A failure comes
    back as a result, so the other runs go on."""
    from embed_ft import checkpoint, distributed, run_folder, train
    key = config_key(config, processes)
    out = Path(out_root) / key
    row = {"kind": "run", "key": key, "config": config, "processes": processes}
    started = time.time()
    try:
        finished = run_folder.read_metrics(out)
        if "fine_tuned" in finished:  # the run ended here before; its result was never recorded
            return row | result_of(finished) | {"recovered": True, "seconds": 0.0}
        run = Config(**config, out=str(out), resume=checkpoint.exists(out))
        metrics = (distributed.launch(run, processes, on_checkpoint) if processes > 1
                   else train.train(run, on_checkpoint))
        return row | result_of(metrics) | {"seconds": time.time() - started}
    except Exception as e:
        traceback.print_exc()
        return row | {"error": f"{type(e).__name__}: {e}"}


def result_of(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("fine_tuned", "training", "environment")} | {
        "resumed_at_steps": metrics.get("resumed_at_steps", []), "test_correct": metrics.get("test_correct")}


def evaluate_once(config: dict, baseline: str | None = None, base_url: str | None = None) -> dict:
    """The model of a configuration as published (what train.py calls zero-shot: no new projection;
    `dimensions` keeps the configuration's width, the key the runs are matched by), or a `baseline` encoder as published (a folder, a hub name or openai:MODEL, at the
    configuration's width), on the configuration's validation and test pairs. A failure comes back
    as a row with its configuration, so the sweep goes on."""
    kind = "baseline" if baseline else "zero_shot"
    try:
        return {"kind": kind, **evaluation(config, baseline, base_url)}
    except Exception as e:
        traceback.print_exc()
        return {"kind": kind, "model": baseline or config["model"], "config": config, "error": f"{type(e).__name__}: {e}"}


def evaluation(config: dict, baseline: str | None, base_url: str | None) -> dict:
    from embed_ft import evaluate, train
    from embed_ft.model import load_model
    config = Config(**config | {"dataset_size": 0})
    if baseline is None:
        _, (_, val, test), model = train.prepare(config)
        published = load_model(config.model, None, config.max_length, config.trust_remote_code).to(model.device)
        return {"model": config.model, "dimensions": config.dense_out_features, "as_published": True,
                **outcomes(published, val, test, config.eval_batch_size)}
    _, val, test = train.load_splits(config)
    openai = model_kind(baseline) == "openai"
    encoder = evaluate.open_encoder(baseline, config.dense_out_features if openai else None, base_url, device=config.device)
    return {"model": baseline, "dimensions": config.dense_out_features if openai else encoder.dim,
            **outcomes(encoder, val, test, evaluate.batch_size_for(baseline, None))}


def outcomes(encoder, val, test, batch_size: int) -> dict:
    """The metrics, each test pair's outcome (packed) so the table can pair runs with this row, and
    the test pairs' groups (pairs that share texts), by which the table counts."""
    from embed_ft import evaluate, paired
    remembered = evaluate.Remembered(encoder)
    result = evaluate.evaluate(remembered, val, test, batch_size)
    return result | {"test_correct": paired.pack(evaluate.correct(remembered, test, result["val"]["threshold"], batch_size)),
                     "test_groups": paired.groups_of(test).tolist()}


# -------------------------------------------------------------------------------------------- Modal
# The image pins what the containers run; the project's modules travel with it. The volume keeps the
# Hugging Face downloads (fetched once, before the fan-out) and each run's folder: its checkpoint,
# so that a preempted run resumes, and its metrics.json, so that a finished run is never trained
# twice. docs/sweep.md says which CUDA driver the pinned torch needs.

app = modal.App("embed-ft-sweep")
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install("torch==2.13.0", "transformers==5.24.0", "datasets==5.2.0", "numpy==2.4.6",
                    "safetensors==0.8.0", "tqdm==4.70.1", "openai==3.57.0", "einops==0.8.2")
    .env({"HF_HOME": "/cache/huggingface", "TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("embed_ft",  # the name the modules below are imported by: embed_ft/__init__.py
                             "errors", "sources", "run_folder", "jsonl", "data", "batching", "model", "losses", "options",
                             "checkpoint", "distributed", "card", "run_state", "train", "evaluate", "openai_embeddings",
                             "paired", "paths", "packing", "pooling", "st_layout", "cpu_threads")  # Modal adds sweep.py
)
# The GPU containers never reach the hub: `fetch` put everything they load in the volume first.
offline_image = image.env({"HF_HUB_OFFLINE": "1"})
volume = modal.Volume.from_name("embed-ft-sweep", create_if_missing=True)
# A Hugging Face token, if you have one, goes to `fetch` alone (anonymous downloads are rate-limited).
HUB_SECRETS = [modal.Secret.from_dict({"HF_TOKEN": os.environ["HF_TOKEN"]})] if os.environ.get("HF_TOKEN") else []
GPU = "H100"
CPUS_PER_GPU = 4.0  # tokenising, batching and the training loop's host work; Modal's default is 0.125 cores


@app.function(image=image, volumes={"/cache": volume}, secrets=HUB_SECRETS, timeout=30 * 60)
def fetch(models: list[str], dataset: str) -> None:
    """Download each model (as a run loads it: jina's remote code lives in another repository) and
    the dataset into the volume once, so that the containers of the fan-out read them offline."""
    from embed_ft import model
    for name in models:
        model.load_model(name, 0, trust_remote_code=name in NEEDS_REMOTE_CODE)
    data.load_pairs(dataset)
    volume.commit()


@app.function(gpu=GPU, cpu=CPUS_PER_GPU, image=offline_image, volumes={"/cache": volume},
              timeout=CONTAINER_HOURS * 60 * 60, retries=modal.Retries(max_retries=3, initial_delay=30.0))
def objective(config: dict, out_root: str = "/cache/runs", processes: int = 1) -> dict:
    in_container = not modal.is_local()
    if in_container:  # a retry after a preemption is the same input: its predecessor's lock is stale
        os.environ["EMBED_FT_RUN_OWNER"] = modal.current_input_id() or ""
    try:
        return run_config(config, out_root, volume.commit if in_container else None, processes)
    finally:  # also when preempted: the checkpoint (or metrics.json) reaches the volume
        if in_container:
            volume.commit()


@app.function(gpu=GPU, cpu=CPUS_PER_GPU, image=offline_image, volumes={"/cache": volume}, timeout=60 * 60)
def evaluate_remote(config: dict, baseline: str | None = None) -> dict:
    return evaluate_once(config, baseline)


@app.local_entrypoint()
def modal_main(models: str = ",".join(MODELS), sizes: str = ",".join(map(str, SIZES)),
               dims: str = ",".join(map(str, DIMS)), results_path: str = "results/sweep.jsonl",
               baselines: str = "", eval_size: int = 0, max_containers: int = 0, gpus_per_run: int = 1, set: str = ""):
    """Shrink the grid with comma-separated --models, --sizes (0 = full split) and --dims.
    --set "option=value ...": training options for every run (python train.py --help lists them).
    --baselines: comma-separated models to evaluate once (openai:... runs here, with OPENAI_API_KEY).
    --gpus-per-run G: runs of 51,200 pairs or more (and the full split) train on G GPUs, batch G x 32."""
    configs = grid(models.split(","), [int(s) for s in sizes.split(",")], [int(d) for d in dims.split(",")],
                   **options.parse_overrides(set) | dict(eval_size=eval_size, device="cuda"))  # no GPU: fail loudly
    path = Path(results_path)
    runs = [(scaled_for(c, processes_for(c, gpus_per_run)), processes_for(c, gpus_per_run)) for c in configs]
    todo = pending(runs, path)
    print(f"{len(runs)} configurations, {len(runs) - len(todo)} already done, running {len(todo)} on Modal")
    fetch.remote([m for m in models.split(",") if model_kind(m) == "hub"], data.HUB_DEFAULT)
    evaluations = missing_zero_shots(configs, path)
    record_all(evaluations, evaluate_remote.map(evaluations, order_outputs=True, return_exceptions=True), path)
    limit = {"max_containers": max_containers} if max_containers else {}
    runners = {n: objective.with_options(gpu=f"{GPU}:{n}", cpu=CPUS_PER_GPU * n, **limit)
               for n in {processes for _, processes in todo}}
    # spawn, not map: each result is recorded the moment its run ends, not behind the longest run
    calls = [(config, processes, runners[processes].spawn(config, processes=processes)) for config, processes in todo]
    collect(calls, path)
    for name in filter(None, baselines.split(",")):
        record_baseline(configs, name, path, remote=model_kind(name) != "openai")
    finish(path)


# ---------------------------------------------------------------------------------- results on disk

def pending(runs: list[tuple[dict, int]], path: Path) -> list[tuple[dict, int]]:
    """The (configuration, processes) without a successful result yet (failed ones are tried again)."""
    done = {r["key"] for r in jsonl.read(path) if "fine_tuned" in r}
    return [(c, n) for c, n in runs if config_key(c, n) not in done]


def missing_zero_shots(configs: list[dict], path: Path) -> list[dict]:
    done = {(r["model"], r["dimensions"]) for r in jsonl.read(path) if r.get("kind") == "zero_shot" and "test" in r}
    return [c for c in zero_shot_configs(configs) if (c["model"], c["dense_out_features"]) not in done]


def record_all(configs: list[dict], outcomes, path: Path) -> None:
    """Each evaluation's outcome (a row, or the exception of a container that failed), in input
    order, with its configuration."""
    for config, outcome in zip(configs, outcomes):
        record(outcome, path, config, kind="zero_shot")


def collect(calls: list[tuple[dict, int, object]], path: Path, poll_seconds: float = 30.0, sleep=time.sleep) -> None:
    """Record each run (configuration, processes, a Modal FunctionCall) the moment it ends, in
    whatever order they end: a short run is on disk while the long ones still train."""
    waiting = list(calls)
    while waiting:
        still_running = []
        for config, processes, call in waiting:
            try:
                outcome = call.get(timeout=0)
            except TimeoutError:  # not finished yet (a container's own timeout is modal's FunctionTimeoutError)
                still_running.append((config, processes, call))
                continue
            except Exception as e:  # the container itself failed: out of memory, timed out, ...
                outcome = e
            record(outcome, path, config, processes=processes)
        waiting = still_running
        if waiting:
            sleep(poll_seconds)


def record(result, path: Path, config: dict | None = None, kind: str = "run", processes: int = 1) -> None:
    """Append a result; the exception of a container that failed becomes an error row of `kind`."""
    if isinstance(result, BaseException):
        result = {"kind": kind, "key": config_key(config, processes) if kind == "run" else None,
                  "config": config, "processes": processes, "error": f"{type(result).__name__}: {result}"}
    jsonl.append(path, result)
    print(describe(result))


def describe(row: dict) -> str:
    """One line for the console."""
    c = row.get("config") or {}
    where = f"{c.get('model')} n={c.get('dataset_size')} d={c.get('dense_out_features')}"
    if "error" in row:
        return f"FAILED {row['kind']} {where} (key {row.get('key')}): {row['error']}"
    if row["kind"] == "run":
        how = "recovered from its folder" if row.get("recovered") else f"{row['training']['pairs_per_s']:.0f} pairs/s"
        return f"done {where}: test error {row['fine_tuned']['test']['error_rate']:.2%} ({how})"
    return f"{row['kind']} {row['model']} {row['dimensions']}-d: test error {row['test']['error_rate']:.2%}"


def record_baseline(configs: list[dict], name: str, path: Path, remote: bool = False, base_url: str | None = None) -> None:
    """A baseline model, once per width for openai:... (its width is a request option), else once."""
    done = {(r["model"], r["dimensions"]) for r in jsonl.read(path) if r.get("kind") == "baseline" and "test" in r}
    widths = sorted({c["dense_out_features"] for c in configs}) if model_kind(name) == "openai" else [None]
    for width in widths:
        if not any(model == name and (width is None or dim == width) for model, dim in done):
            config = configs[0] | ({"dense_out_features": width} if width else {})
            outcome = evaluate_remote.remote(config, name) if remote else evaluate_once(config, name, base_url)
            record(outcome, path, config, kind="baseline")


def finish(path: Path, figure: Path | None = None, title: str = "") -> None:
    from embed_ft import figures
    rows = jsonl.read(path)
    print(figures.sweep_table(rows))
    figure = figure or path.with_suffix(".png")
    figures.sweep_plot(rows, figure, title)
    print(f"figure: {figure}")


# ------------------------------------------------------------------------------- local command line

def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Run the sweep here, in turn (--local), or redraw it (--plot).")
    mode = parser.add_mutually_exclusive_group(required=True)
    mode.add_argument("--local", action="store_true", help="run the grid in this process")
    mode.add_argument("--plot", metavar="FILE", help="only print the table and draw the figure")
    parser.add_argument("--models", nargs="+", default=MODELS, metavar="MODEL", help="hub names or local folders")
    parser.add_argument("--sizes", type=int, nargs="+", default=SIZES, help="training pairs; 0 = all")
    parser.add_argument("--dims", type=int, nargs="+", default=DIMS, help="projection widths")
    parser.add_argument("--data", default=data.HUB_DEFAULT, metavar="DATA")
    parser.add_argument("--val", default="", metavar="FILE", help="validation file (else split off --data)")
    parser.add_argument("--test", default="", metavar="FILE", help="test file (else split off --data)")
    parser.add_argument("--eval-size", type=int, default=0, help="evaluate on this many val/test pairs; 0 = all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", default="results/sweep.jsonl", metavar="OUT")
    parser.add_argument("--runs", default="runs", metavar="OUTDIR", help="each run's folder (checkpoint, metrics.json) goes in RUNS/KEY/")
    parser.add_argument("--figure", metavar="OUT", help="default: the results path with .png")
    parser.add_argument("--title", default="", help="figure title (say which device ran it)")
    parser.add_argument("--baseline", action="append", default=[], metavar="MODEL", help="also evaluate this model once, as published: "
                        "a folder, a hub name or openai:MODEL (repeat the flag for more)")
    parser.add_argument("--base-url", help="an OpenAI-compatible server for openai: baselines")
    parser.add_argument("--set", default="", help="training options for every run, as option=value ... (say "
                        "\"epochs=1 margin=0.3\": see python train.py --help)")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    figure = Path(args.figure) if args.figure else None
    if args.plot:
        return finish(Path(args.plot), figure, args.title)
    if min(args.sizes) < 0 or min(args.dims) < 0:
        raise errors.InputError("--sizes and --dims must be 0 or more")
    if bool(args.val) != bool(args.test):  # what every run shares is checked before any run starts
        raise errors.InputError("give both --val and --test, or neither (to split them off --data)")
    path = Path(args.results)
    configs = grid(args.models, args.sizes, args.dims, **options.parse_overrides(args.set) | dict(
        data=args.data, val=args.val, test=args.test, eval_size=args.eval_size, device=args.device))
    for config in missing_zero_shots(configs, path):
        record(evaluate_once(config), path)
    todo = pending([(c, 1) for c in configs], path)
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} already done, running {len(todo)}")
    for config, _ in todo:
        record(run_config(config, args.runs), path)
    for name in args.baseline:
        record_baseline(configs, name, path, base_url=args.base_url)
    finish(path, figure, args.title)


if __name__ == "__main__":
    errors.run(main)
