"""The experiment: how much labelled data does fine-tuning need to beat a proprietary embedding model?

A grid of (model x training-set size x output width) runs, one GPU container each on Modal, all
through the same `train.train` as `python train.py`. Each result is appended to a JSONL file as it
arrives, so an interrupted sweep loses nothing and a rerun only runs what is missing or failed.
The figure (error rate against dataset size, one panel per model) is drawn from the JSONL alone.

    modal run sweep.py                                    # the full grid on Modal (needs an account)
    modal run sweep.py --models BAAI/bge-base-en-v1.5 --sizes 100,400,1600 --dims 256
    python sweep.py --local --models DIR --sizes 100 200 400 --dims 256 384 \\
        --data train.tsv.gz --val val.tsv.gz --test test.tsv.gz     # the same objective, here, in turn
    python sweep.py --plot results/sweep.jsonl            # summary table and figure only
"""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import sys
import textwrap
import time
import traceback
from pathlib import Path

import modal

MODELS = ["BAAI/bge-base-en-v1.5", "sentence-transformers/all-mpnet-base-v2", "jinaai/jina-embeddings-v2-small-en"]
SIZES = [100 * 2**i for i in range(11)] + [0]      # 100, 200, ..., 102,400, and 0 = the full training split
DIMS = [256, 512]
# Every other hyperparameter, fixed across the grid and recorded with each result.
FIXED = {"epochs": 1, "batch_size": 32, "lr": 5e-5, "loss": "ocl", "max_length": 256, "seed": 0,
         "val_size": 5000, "test_size": 10000, "save": False}
NEEDS_REMOTE_CODE = {"jinaai/jina-embeddings-v2-small-en"}


def grid(models: list[str], sizes: list[int], dims: list[int], **fixed) -> list[dict]:
    """Every combination, as keyword arguments for train.Config."""
    return [{"model": m, "dataset_size": n, "dense_out_features": d,
             "trust_remote_code": m in NEEDS_REMOTE_CODE, **FIXED, **fixed}
            for m, n, d in itertools.product(models, sizes, dims)]


def config_key(config: dict) -> str:
    """A stable name for a configuration (the output folder does not change what is computed)."""
    relevant = {k: v for k, v in sorted(config.items()) if k != "out"}
    return hashlib.sha1(json.dumps(relevant, sort_keys=True).encode()).hexdigest()[:12]


def run_config(config: dict, out_root: str) -> dict:
    """The objective: one training run. Failures come back as a result, so the other runs go on."""
    import train
    started = time.time()
    try:
        metrics = train.train(train.Config(**config, out=f"{out_root}/{config_key(config)}"))
        return {"key": config_key(config), "config": config, "zero_shot": metrics["zero_shot"],
                "fine_tuned": metrics["fine_tuned"], "training": metrics["training"],
                "device": metrics["config"]["resolved_device"], "seconds": time.time() - started}
    except Exception as e:
        traceback.print_exc()
        return {"key": config_key(config), "config": config, "error": f"{type(e).__name__}: {e}"}


# -------------------------------------------------------------------------------------------- Modal
# The image pins what the containers run; the project's modules travel with it. The volume keeps the
# Hugging Face downloads between containers (each model is fetched once) and each run's metrics.json.

app = modal.App("embed-ft-sweep")
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install("torch==2.13.0", "transformers==5.24.0", "datasets==5.2.0", "numpy==2.4.6",
                    "safetensors==0.8.0", "tqdm==4.70.1", "openai==3.57.0", "einops==0.8.2")
    .env({"HF_HOME": "/cache/huggingface", "TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("data", "model", "losses", "train", "evaluate")  # sweep.py itself is added by Modal
)
volume = modal.Volume.from_name("embed-ft-sweep", create_if_missing=True)


@app.function(gpu="H100", image=image, volumes={"/cache": volume}, timeout=2 * 60 * 60)
def objective(config: dict, out_root: str = "/cache/runs") -> dict:
    result = run_config(config, out_root)  # writes OUT/metrics.json under out_root
    if not modal.is_local():  # in the container: persist this run's folder on the volume
        volume.commit()
    return result


@app.local_entrypoint()
def modal_main(models: str = ",".join(MODELS), sizes: str = ",".join(map(str, SIZES)),
               dims: str = ",".join(map(str, DIMS)), results: str = "results/sweep.jsonl",
               openai_model: str = "text-embedding-3-small", eval_size: int = 0):
    """Shrink the grid with comma-separated --models, --sizes (0 = full split) and --dims."""
    configs = grid(models.split(","), [int(s) for s in sizes.split(",")], [int(d) for d in dims.split(",")],
                   eval_size=eval_size)
    todo = pending(configs, Path(results))
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} already done, running {len(todo)} on Modal")
    for result in objective.map(todo, order_outputs=False, return_exceptions=True):
        record(result, Path(results))
    if openai_model and os.environ.get("OPENAI_API_KEY"):
        run_baseline(configs[0], openai_model, sorted({c["dense_out_features"] for c in configs}), Path(results))
    finish(Path(results))


# ---------------------------------------------------------------------------------- results on disk

def read_results(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def pending(configs: list[dict], path: Path) -> list[dict]:
    """The configurations without a successful result yet (failed ones are tried again)."""
    done = {r["key"] for r in read_results(path) if "fine_tuned" in r}
    return [c for c in configs if config_key(c) not in done]


def append(path: Path, row: dict) -> None:
    """Append one line and make sure it is on disk before going on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()
        os.fsync(f.fileno())


def record(result, path: Path) -> None:
    if isinstance(result, BaseException):  # the container itself failed (timeout, out of memory, ...)
        result = {"error": f"{type(result).__name__}: {result}"}
    append(path, result)
    if "error" in result:
        print(f"FAILED {result.get('config', {}).get('model', '?')}: {result['error']}")
    else:
        c = result["config"]
        print(f"done {c['model']} n={c['dataset_size']} d={c['dense_out_features']}: test error "
              f"{result['zero_shot']['test']['error_rate']:.2%} -> {result['fine_tuned']['test']['error_rate']:.2%}")


def run_baseline(config: dict, openai_model: str, dims: list[int], path: Path,
                 base_url: str | None = None) -> None:
    """The proprietary model on the same validation and test pairs, once per output width."""
    import evaluate
    import train
    done = {(r["baseline"], r["dimensions"]) for r in read_results(path) if "baseline" in r}
    _, val, test = train.load_splits(train.Config(**config))
    for d in dims:
        if (openai_model, d) not in done:
            encoder = evaluate.OpenAIEmbedder(openai_model, d, base_url)
            append(path, {"baseline": openai_model, "dimensions": d, **evaluate.evaluate(encoder, val, test)})


# ---------------------------------------------------------------------------------- table and figure

def summary(results: list[dict]) -> str:
    lines = [f"{'model':40} {'dim':>4} {'pairs':>7} {'zero-shot':>9} {'fine-tuned':>10} {'pairs/s':>8}"]
    runs = sorted((r for r in results if "fine_tuned" in r),
                  key=lambda r: (r["config"]["model"], r["config"]["dense_out_features"], r["training"]["pairs"]))
    for r in runs:
        c = r["config"]
        lines.append(f"{c['model'][-40:]:40} {c['dense_out_features']:4d} {r['training']['pairs']:7d} "
                     f"{r['zero_shot']['test']['error_rate']:9.2%} {r['fine_tuned']['test']['error_rate']:10.2%} "
                     f"{r['training']['pairs_per_s']:8.1f}")
    for r in results:
        if "baseline" in r:
            lines.append(f"{r['baseline'][-40:]:40} {r['dimensions']:4d} {'-':>7} {r['test']['error_rate']:9.2%}")
    failed = [r for r in results if "error" in r]
    if failed:
        lines.append(f"{len(failed)} failed attempt(s) recorded; rerun to retry them")
    return "\n".join(lines)


def plot(results: list[dict], figure: Path, title: str = "") -> None:
    """Test error against training pairs, a panel per model, a line per output width; the zero-shot
    model (dotted) and the proprietary baseline (dashed), where measured, as horizontal lines."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    runs = [r for r in results if "fine_tuned" in r]
    models = sorted({r["config"]["model"] for r in runs})
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 4.2), squeeze=False)
    for ax, name in zip(axes[0], models):
        for i, dim in enumerate(sorted({r["config"]["dense_out_features"] for r in runs if r["config"]["model"] == name})):
            mine = sorted((r for r in runs if r["config"]["model"] == name and r["config"]["dense_out_features"] == dim),
                          key=lambda r: r["training"]["pairs"])
            color = f"C{i}"
            ax.plot([r["training"]["pairs"] for r in mine], [100 * r["fine_tuned"]["test"]["error_rate"] for r in mine],
                    "o-", color=color, label=f"fine-tuned, {dim}-d")
            ax.axhline(100 * mine[0]["zero_shot"]["test"]["error_rate"], color=color, ls=":", label=f"zero-shot, {dim}-d")
        for j, base in enumerate(r for r in results if "baseline" in r):
            ax.axhline(100 * base["test"]["error_rate"], color=f"C{j + 5}", ls="--",
                       label=f"{base['baseline']}, {base['dimensions']}-d")
        ax.set_xscale("log")
        sizes = sorted({r["training"]["pairs"] for r in runs if r["config"]["model"] == name})
        ax.set_xticks(sizes, [f"{n:,}" for n in sizes], rotation=45, fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("training pairs")
        ax.set_ylabel("test error rate (%)")
        ax.set_title(Path(name).name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(textwrap.fill(title, 45 * max(1, len(models))), fontsize=10)
    fig.tight_layout()
    figure.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(figure, dpi=120)
    plt.close(fig)


def finish(path: Path, figure: Path | None = None, title: str = "") -> None:
    results = read_results(path)
    print(summary(results))
    figure = figure or path.with_suffix(".png")
    plot(results, figure, title)
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
    parser.add_argument("--data", default="sentence-transformers/quora-duplicates")
    parser.add_argument("--val", default="", help="validation file (else split off --data)")
    parser.add_argument("--test", default="", help="test file (else split off --data)")
    parser.add_argument("--eval-size", type=int, default=0, help="evaluate on this many val/test pairs; 0 = all")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--results", default="results/sweep.jsonl")
    parser.add_argument("--runs", default="runs", help="each run's metrics.json goes in RUNS/KEY/")
    parser.add_argument("--figure", help="default: the results path with .png")
    parser.add_argument("--title", default="", help="figure title (say which device ran it)")
    parser.add_argument("--openai-model", default="", help="also evaluate this OpenAI baseline")
    parser.add_argument("--base-url", help="an OpenAI-compatible server for the baseline")
    args = parser.parse_args(argv)
    figure = Path(args.figure) if args.figure else None
    if args.plot:
        return finish(Path(args.plot), figure, args.title)

    import data
    results = Path(args.results)
    configs = grid(args.models, args.sizes, args.dims, data=args.data, val=args.val, test=args.test,
                   eval_size=args.eval_size, device=args.device)
    todo = pending(configs, results)
    print(f"{len(configs)} configurations, {len(configs) - len(todo)} already done, running {len(todo)}")
    for config in todo:
        record(run_config(config, args.runs), results)
    if args.openai_model:
        try:
            run_baseline(configs[0], args.openai_model, args.dims, results, args.base_url)
        except data.DataError as e:
            sys.exit(f"error: {e}")
    finish(results, figure, args.title)


if __name__ == "__main__":
    main()
