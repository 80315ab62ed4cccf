"""The GPU check: one script that shows, in under 8 minutes on one H100 or H200 with no network, that
the GPU path works and how fast it is. It reads only what `../shared/pack-for-device` writes (all-
MiniLM-L6-v2 in bf16 and gzipped Quora pairs, 49 MB), so the checkout and its inputs fit in 64 MiB.

    PYTHON=.venv/bin/python ../shared/pack-for-device pack 20000      # here, once
    python benchmarks/gpu_check.py --pack pack --out results/gpu_check.json   # on the GPU machine
    python benchmarks/gpu_check.py --pack PACK --dry-run              # on a CPU, tiny sizes (CI runs this)

It runs the training tests on CUDA; measures training pairs/s, peak memory and model FLOPs utilisation
(FLOPs counted from the shapes, see flops.py, against the datasheet peak and a measured bf16 matrix
product) for bge-base-en-v1.5's shapes (a randomly initialised 12-layer, 768-wide BERT: no download)
on real Quora lengths in bf16, at batch 32 and 256, eager and with torch.compile(mode="reduce-overhead")
(CUDA graphs, texts padded to a few static lengths); fine-tunes all-MiniLM-L6-v2 on the pack's 20,000 pairs
for one epoch with train.py and reports its throughput and test error. One table is printed and JSON written
to --out after each stage, so a check cut short keeps what it measured.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import batching  # noqa: E402
import data  # noqa: E402
import flops  # noqa: E402
import train  # noqa: E402
from losses import OnlineContrastiveLoss  # noqa: E402
from model import Embedder  # noqa: E402
from options import Config  # noqa: E402

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense TFLOP/s, SXM parts
BUCKETS = [16, 32, 64, 128, 256]  # static lengths for CUDA graphs


def run_tests(device: str, quick: bool) -> dict:
    """The training tests with EMBED_FT_TEST_DEVICE=cuda (the real-data test skips: no ../shared there)."""
    files = ["tests/test_losses.py"] if quick else ["tests/test_train.py", "tests/test_model.py", "tests/test_losses.py"]
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pytest", "-rfE", "-p", "no:cacheprovider", *files], cwd=ROOT,
                            env=os.environ | {"EMBED_FT_TEST_DEVICE": device}, capture_output=True, text=True)
    lines = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "ERROR")) or " passed" in line
             or " failed" in line]  # the short summary: each failure by name, then the count
    return {"passed": result.returncode == 0, "summary": "; ".join(lines) or f"pytest exited {result.returncode}",
            "seconds": time.perf_counter() - started, "output_tail": result.stdout[-3000:]}


def bucket(groups: list[dict]) -> list[dict]:
    """Pad each group to the next static length, so that a compiled step sees few shapes."""
    padded = []
    for g in groups:
        length = next((b for b in BUCKETS if b >= g["input_ids"].shape[1]), g["input_ids"].shape[1])
        extra = length - g["input_ids"].shape[1]
        padded.append({k: torch.nn.functional.pad(v, (0, extra)) for k, v in g.items()})
    return padded


def throughput(model: Embedder, tokenized: batching.TokenizedPairs, batch: int, steps: int, warmup: int,
               device: torch.device, compiled: bool) -> dict:
    """Median step time of the training step (bf16 autocast on CUDA, 4 length groups, OCL, fused
    AdamW), its pairs/s, the FLOPs it computed (padding included) and the peak memory."""
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-8, fused=True)
    loss_fn = OnlineContrastiveLoss()
    forward = torch.compile(model, mode="reduce-overhead", dynamic=False) if compiled else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    order = np.random.default_rng(0).permutation(len(tokenized))
    batches = tokenized.batches(np.resize(order, batch * (steps + warmup)), batch, 4)
    times, step_flops = [], []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    for i in range(steps + warmup):
        groups, restore, labels, _ = next(batches)
        groups = bucket(groups) if compiled else groups
        lengths = [g["input_ids"].shape[1] for g in groups for _ in range(g["input_ids"].shape[0])]
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        with autocast:
            embeddings = torch.cat([forward(**{k: v.to(device, non_blocking=True) for k, v in g.items()}) for g in groups])
        first, second = embeddings[restore.to(device)].float().chunk(2)
        loss = loss_fn(first, second, labels.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss.item()  # the host waits for the step, as train.py's progress bar does
        if i >= warmup:
            times.append(time.perf_counter() - started)
            step_flops.append(3 * flops.forward_flops(lengths, *flops.model_shape(model.encoder.config), model.dim))
    median = statistics.median(times)
    return {"batch": batch, "compiled": compiled, "step_ms": 1000 * median, "pairs_per_s": batch / median,
            "tflop_per_s": statistics.median(step_flops) / median / 1e12,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def bge_shaped(tokenizer, tiny: bool, device: torch.device) -> Embedder:
    """bge-base-en-v1.5's architecture with random weights (its vocabulary is MiniLM's: bert-base-uncased)."""
    from transformers import BertConfig, BertModel
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, attn_implementation="sdpa", **sizes)
    torch.manual_seed(0)
    return Embedder(BertModel(config), tokenizer, 256, max_length=256).to(device)


def finetune(pack: Path, pairs: int, device: str, epochs: int) -> dict:
    """train.py's own path: all-MiniLM-L6-v2 (bf16 weights, trained in fp32) on `pairs` Quora pairs."""
    with tempfile.TemporaryDirectory() as out:
        m = train.train(Config(model=str(pack / "sentence-transformers-all-MiniLM-L6-v2-bf16"),
                               data=str(pack / "quora" / "train.tsv.gz"), val=str(pack / "quora" / "val.tsv.gz"),
                               test=str(pack / "quora" / "test.tsv.gz"), dataset_size=pairs, epochs=epochs,
                               device=device, out=out, save=False))
    return {"pairs": pairs, "epochs": epochs, "pairs_per_s": m["training"]["pairs_per_s"],
            "train_seconds": m["training"]["seconds"], "zero_shot_test_error": m["zero_shot"]["test"]["error_rate"],
            "test_error": m["fine_tuned"]["test"]["error_rate"], "best_epoch": m["training"]["best_epoch"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", required=True, help="the folder ../shared/pack-for-device wrote")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model and sizes: checks the script runs")
    parser.add_argument("--pairs", type=int, default=0, help="pairs for the all-MiniLM-L6-v2 fine-tune (0: all the pack has)")
    parser.add_argument("--epochs", type=int, default=1, help="epochs of that fine-tune (one keeps the check under 8 minutes)")
    args = parser.parse_args()
    pack, dry = Path(args.pack), args.dry_run
    device = torch.device("cpu" if dry else "cuda")
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(device)
    report = {"device": name, "torch": torch.__version__, "dry_run": dry}
    report["tests"] = run_tests(device.type, quick=dry)
    print(f"tests on {device.type}: {report['tests']['summary']}", flush=True)

    tokenizer = Embedder.from_pretrained(str(pack / "sentence-transformers-all-MiniLM-L6-v2-bf16")).tokenizer
    pool = data.load_pairs(str(pack / "quora" / "train.tsv.gz"))  # length distribution of real Quora pairs
    texts = data.subsample(pool, min(64 if dry else 20000, len(pool)), seed=1)
    tokenized = batching.TokenizedPairs(texts, tokenizer, 256)
    model = bge_shaped(tokenizer, dry, device)
    peak = flops.measured_peak(device, torch.bfloat16 if not dry else torch.float32, n=256 if dry else 8192)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    report.update(measured_peak_tflop_per_s=peak / 1e12, datasheet_peak_tflop_per_s=sheet / 1e12 if sheet else None)
    out = Path(args.out)
    save = lambda: out.write_text(json.dumps(report, indent=2) + "\n")  # after each stage: a timeout keeps what ran
    report["bge_base_shapes"] = runs = []

    def measure(batch: int, compiled: bool) -> None:
        try:
            runs.append(throughput(model, tokenized, batch, 2 if dry else 20, 1 if dry else 5, device, compiled))
        except Exception as e:  # a failed variant is reported, the check goes on
            runs.append({"batch": batch, "compiled": compiled, "error": f"{type(e).__name__}: {e}"[:300]})
        print(runs[-1], flush=True)
        save()

    for batch in [4, 8] if dry else [32, 256]:
        measure(batch, compiled=False)
    report["finetune_minilm"] = finetune(pack, 32 if dry else args.pairs or len(pool), device.type, 1 if dry else args.epochs)
    save()
    for batch in [] if dry else [32, 256]:  # CUDA graphs last: their compile is the slowest, least certain part
        measure(batch, compiled=True)
    print(table(report))


def table(report: dict) -> str:
    lines = [f"device: {report['device']}, torch {report['torch']}; tests: {report['tests']['summary']}",
             f"bf16 peak: measured {report['measured_peak_tflop_per_s']:.0f} TFLOP/s (matrix product), datasheet "
             f"{report['datasheet_peak_tflop_per_s'] or '-'} TFLOP/s",
             f"{'bge-base shapes':16} {'batch':>5} {'graphs':>6} {'ms/step':>8} {'pairs/s':>8} {'TFLOP/s':>8} "
             f"{'MFU (measured)':>14} {'peak GiB':>8}"]
    for r in report["bge_base_shapes"]:
        if "error" in r:
            lines.append(f"{'':16} {r['batch']:5d} {str(r['compiled']):>6} failed: {r['error']}")
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{'':16} {r['batch']:5d} {str(r['compiled']):>6} {r['step_ms']:8.1f} {r['pairs_per_s']:8.0f} "
                     f"{r['tflop_per_s']:8.1f} {r['tflop_per_s'] / report['measured_peak_tflop_per_s']:14.1%} {memory:>8}")
    f = report["finetune_minilm"]
    lines.append(f"all-MiniLM-L6-v2, {f['pairs']:,} pairs x {f['epochs']} epochs: {f['pairs_per_s']:.0f} pairs/s, "
                 f"{f['train_seconds']:.0f} s; test error {f['zero_shot_test_error']:.2%} -> {f['test_error']:.2%}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
