"""The GPU check: one time-boxed script that answers, in one 10-minute lend of one H100 or H200 with
no network, whether the GPU road works and where a training step's time goes. It reads only what
`../shared/pack-for-device` writes (all-MiniLM-L6-v2 in bf16 and gzipped Quora pairs), so the
checkout and its inputs fit in 64 MiB.

    PYTHON=.venv/bin/python ../shared/pack-for-device pack 100000      # beside the checkout, once
    python benchmarks/gpu_check.py --pack pack --out results/gpu/gpu_check.json --minutes 9   # on the GPU
    python benchmarks/gpu_check.py --pack PACK --dry-run                # on a CPU, tiny sizes (CI runs this)

The stages, in order, each written to --out as soon as it ends (a check cut short keeps what ran),
and each skipped, and said so, when the time left is too short:
1. tests: the whole suite with EMBED_FT_TEST_DEVICE=cuda, each failure by name (8 processes with
   pytest-xdist; the whole log is written beside --out).
2. host: the time of 10,000 tiny in-place ops (this host's cost per launched op) and a measured bf16
   matrix-product peak.
3. profile: torch.profiler over a few steps of bge-base-en-v1.5's shapes (a random 12-layer, 768-wide
   BERT: no download) on real Quora lengths, the step before the GPU work and today's: kernels
   launched and host syncs per step, host and GPU time per step, the slowest host ops, and the
   file:line of each sync.
4. steps: pairs/s and share of the measured peak at batch 32 and 256, for each step variant (VARIANTS:
   length groups, the loss read every step or not, cuDNN attention or not) and today's under CUDA
   graphs (torch.compile mode="reduce-overhead", dynamic=False, texts padded to a few static
   lengths; its compile time is recorded).
5. finetune: train.py's default recipe on all-MiniLM-L6-v2 and all of the pack's pairs, within the
   time left: pairs/s and test error.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import batching, data  # noqa: E402
import flops  # noqa: E402
from embed_ft import train# noqa: E402
from embed_ft.losses import OnlineContrastiveLoss# noqa: E402
from embed_ft.model import Embedder# noqa: E402
from embed_ft.options import Config# noqa: E402

DATASHEET_BF16 = {"H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12}  # dense TFLOP/s, SXM parts
BUCKETS = [16, 32, 64, 128, 256]  # static lengths for CUDA graphs
STAGES = ["tests", "host", "profile", "steps", "finetune"]


def run_tests(device: str, quick: bool, timeout: float, log: Path) -> dict:
    """The whole suite with EMBED_FT_TEST_DEVICE=cuda (the real-data test skips: no ../shared there),
    spread over 8 processes (pytest-xdist), so that it leaves the lend time to measure; a dry run's one
    file in one process. The whole output goes to `log`."""
    files = ["tests/test_losses.py"] if quick else ["tests"]
    workers = ["-n", "0" if quick else "8"]
    started = time.perf_counter()
    try:
        result = subprocess.run([sys.executable, "-m", "pytest", "-rfE", "-p", "no:cacheprovider", *workers, *files],
                                cwd=ROOT, env=os.environ | {"EMBED_FT_TEST_DEVICE": device}, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        output = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else str(e.stdout or "")
        log.write_text(output)
        return {"passed": False, "summary": f"cut at {timeout:.0f} s", "seconds": timeout, "output_tail": output[-3000:]}
    log.write_text(result.stdout + result.stderr)
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


# A step variant: (length groups, read the loss every step, cuDNN attention, CUDA graphs). "before" is
# train.py's step before the GPU work; "no sync, 1 group" is what train.py does on a GPU now.
VARIANTS = {"before": (4, True, True, False), "no sync, 1 group, cuDNN attention": (1, False, True, False),
            "no sync, 2 groups": (2, False, False, False), "no sync, 1 group": (1, False, False, False),
            "no sync, 1 group, CUDA graphs": (1, False, False, True)}


def step_runner(model: Embedder, tokenized: batching.TokenizedPairs, batch: int, device: torch.device, variant: str):
    """A function that takes one training step of `variant` (bf16 autocast on CUDA, OCL, fused AdamW,
    gradient clipping as train.py does) and returns the FLOPs it computed, padding included."""
    groups_per_step, read_loss, cudnn_attention, graphs = VARIANTS[variant]
    torch.backends.cuda.enable_cudnn_sdp(cudnn_attention)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-8, fused=device.type == "cuda")
    loss_fn = OnlineContrastiveLoss()
    forward = torch.compile(model, mode="reduce-overhead", dynamic=False) if graphs else model
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    order = tokenized.epoch_order(0, 0, batch, by_length=True)  # train.py's batches: pairs of similar length
    batches = tokenized.batches(np.resize(order, batch * 10_000), batch, groups_per_step)
    shape = flops.model_shape(model.encoder.config)

    def step() -> float:
        groups, restore, labels, _ = next(batches)
        groups = bucket(groups) if graphs else groups
        with autocast:
            embeddings = torch.cat([forward(**{k: v.to(device, non_blocking=True) for k, v in g.items()}) for g in groups])
        first, second = embeddings[restore.to(device, non_blocking=True)].float().chunk(2)
        loss = loss_fn(first, second, labels.to(device, non_blocking=True))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        optimizer.step()
        if read_loss:
            loss.item()  # train.py before: the progress bar read the loss, and the host waited for the GPU
        lengths = [g["input_ids"].shape[1] for g in groups for _ in range(g["input_ids"].shape[0])]
        return 3 * flops.forward_flops(lengths, *shape, model.dim)

    return step


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def throughput(model: Embedder, tokenized: batching.TokenizedPairs, batch: int, steps: int, warmup: int,
               device: torch.device, variant: str) -> dict:
    """Wall time per step over `steps` steps after `warmup` (the first of which compiles, for CUDA
    graphs), pairs/s, TFLOP/s and peak memory."""
    step = step_runner(model, tokenized, batch, device, variant)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    started = time.perf_counter()
    for _ in range(warmup):
        step()
    synchronize(device)
    warm_seconds = time.perf_counter() - started
    started = time.perf_counter()
    total_flops = sum(step() for _ in range(steps))
    synchronize(device)
    seconds = (time.perf_counter() - started) / steps
    return {"variant": variant, "batch": batch, "step_ms": 1000 * seconds, "pairs_per_s": batch / seconds,
            "tflop_per_s": total_flops / steps / seconds / 1e12, "warmup_seconds": warm_seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None}


def profile(model: Embedder, tokenized: batching.TokenizedPairs, batch: int, steps: int, device: torch.device,
            variant: str) -> dict:
    """torch.profiler over `steps` steps (after 3 unprofiled ones): kernels launched and host syncs
    per step, the host's time to issue a step, and the GPU's busy time per step."""
    from torch.profiler import ProfilerActivity
    step = step_runner(model, tokenized, batch, device, variant)
    for _ in range(3):
        step()
    synchronize(device)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    issue = []
    with torch.profiler.profile(activities=activities) as prof:
        started = time.perf_counter()
        for _ in range(steps):
            began = time.perf_counter()
            step()
            issue.append(time.perf_counter() - began)
        synchronize(device)
        wall = time.perf_counter() - started
    events = prof.key_averages()
    count = lambda names: sum(e.count for e in events if e.key in names)
    gpu_us = sum(e.self_device_time_total for e in events if getattr(e, "device_type", None) is not None
                 and str(e.device_type).endswith("CUDA"))
    return {"variant": variant, "batch": batch, "steps": steps,
            "kernels_per_step": count({"cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx"}) / steps,
            "graph_launches_per_step": count({"cudaGraphLaunch"}) / steps,
            "host_syncs_per_step": count({"cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize"}) / steps,
            "host_ms_per_step": 1000 * statistics.median(issue), "wall_ms_per_step": 1000 * wall / steps,
            "gpu_ms_per_step": gpu_us / 1000 / steps,
            "ops_cpu_ms_per_step": sum(e.self_cpu_time_total for e in events) / 1000 / steps,  # the rest is Python
            "top_host_ops": [{"op": e.key, "ms_per_step": e.self_cpu_time_total / 1000 / steps, "calls_per_step": e.count / steps}
                             for e in sorted(events, key=lambda e: -e.self_cpu_time_total)[:15]],
            "sync_sites": sync_sites(step, device)}


def sync_sites(step, device: torch.device) -> dict:
    """Where one step makes the host wait for the GPU: file:line of each synchronizing call, counted."""
    if device.type != "cuda":
        return {}
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    sites = [f"{Path(w.filename).name}:{w.lineno}" for w in caught if "synchroniz" in str(w.message)]
    return {site: sites.count(site) for site in sorted(set(sites))}


def tiny_ops(device: torch.device, n: int = 10_000) -> dict:
    """The host's cost of one launched op: n in-place adds on a one-element tensor."""
    x = torch.zeros(1, device=device)
    for _ in range(100):
        x.add_(1)
    synchronize(device)
    started = time.perf_counter()
    for _ in range(n):
        x.add_(1)
    synchronize(device)
    return {"ops": n, "us_per_op": 1e6 * (time.perf_counter() - started) / n}


def bge_shaped(tokenizer, tiny: bool, device: torch.device) -> Embedder:
    """bge-base-en-v1.5's architecture with random weights (its vocabulary is MiniLM's: bert-base-uncased)."""
    from transformers import BertConfig, BertModel
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64) if tiny else \
        dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072)
    config = BertConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=512, attn_implementation="sdpa", **sizes)
    torch.manual_seed(0)
    return Embedder(BertModel(config), tokenizer, 256, max_length=256).to(device)


def finetune(pack: Path, pairs: int, device: str, epochs: int, minutes: float, **overrides) -> dict:
    """train.py's own path: all-MiniLM-L6-v2 (bf16 weights, trained in fp32) on `pairs` Quora pairs,
    the default recipe, training for at most `minutes`."""
    with tempfile.TemporaryDirectory() as out:
        m = train.train(Config(model=str(pack / "sentence-transformers-all-MiniLM-L6-v2-bf16"),
                               data=str(pack / "quora" / "train.tsv.gz"), val=str(pack / "quora" / "val.tsv.gz"),
                               test=str(pack / "quora" / "test.tsv.gz"), dataset_size=pairs, epochs=epochs,
                               device=device, out=out, save=False, max_minutes=minutes, **overrides))
    return {"pairs": pairs, "epochs": epochs, "epochs_done": m["training"]["pairs"] / pairs, **overrides,
            "pairs_per_s": m["training"]["pairs_per_s"], "train_seconds": m["training"]["seconds"],
            "stopped_by": m["training"]["stopped_by"], "zero_shot_test_error": m["zero_shot"]["test"]["error_rate"],
            "test_error": m["fine_tuned"]["test"]["error_rate"], "best_epoch": m["training"]["best_epoch"]}


class Deadline:
    """The check's time box: each stage asks for the minutes it needs, and is skipped when they are not left."""

    def __init__(self, minutes: float):
        self.end = time.perf_counter() + 60 * minutes

    def left(self) -> float:
        return (self.end - time.perf_counter()) / 60

    def allows(self, minutes: float) -> bool:
        return self.left() >= minutes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pack", required=True, help="the folder ../shared/pack-for-device wrote")
    parser.add_argument("--out", default="gpu_check.json")
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model and sizes: checks the script runs")
    parser.add_argument("--minutes", type=float, default=9.0, help="the whole check's time box")
    parser.add_argument("--pairs", type=int, default=0, help="pairs for the all-MiniLM-L6-v2 fine-tune (0: all the pack has)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of that fine-tune (the recipe's; the time box may cut it)")
    parser.add_argument("--stages", default=",".join(STAGES), help="which stages to run, comma-separated (a rerun of a few)")
    args = parser.parse_args()
    stages = args.stages.split(",")
    pack, dry, deadline = Path(args.pack), args.dry_run, Deadline(args.minutes)
    device = torch.device("cpu" if dry else "cuda")
    name = "CPU (dry run)" if dry else torch.cuda.get_device_name(device)
    report = {"device": name, "torch": torch.__version__, "dry_run": dry, "minutes": args.minutes, "skipped": []}
    out = Path(args.out)
    save = lambda: out.write_text(json.dumps(report, indent=2) + "\n")  # after each stage: a timeout keeps what ran

    if "tests" in stages:  # at most 3 minutes, and a minute left for each later stage
        report["tests"] = run_tests(device.type, quick=dry, timeout=60 * min(3.0, deadline.left() - len(stages) + 1),
                                    log=out.with_suffix(".tests.log"))
        print(f"tests on {device.type}: {report['tests']['summary']}", flush=True)
        save()

    minilm = Embedder.from_pretrained(str(pack / "sentence-transformers-all-MiniLM-L6-v2-bf16"))  # its tokenizer, 256 tokens
    tokenizer = minilm.tokenizer
    pool = data.load_pairs(str(pack / "quora" / "train.tsv.gz"))  # length distribution of real Quora pairs
    tokenized = batching.TokenizedPairs(data.subsample(pool, min(64 if dry else 20000, len(pool)), seed=1), minilm)
    model = bge_shaped(tokenizer, dry, device)
    peak = flops.measured_peak(device, torch.bfloat16 if not dry else torch.float32, n=256 if dry else 8192)
    sheet = next((v for k, v in DATASHEET_BF16.items() if k in name), None)
    report["host"] = tiny_ops(device) | {"measured_peak_tflop_per_s": peak / 1e12,
                                         "datasheet_peak_tflop_per_s": sheet / 1e12 if sheet else None}
    print(report["host"], flush=True)
    save()

    def stage(key: str, minutes: float, what: str, run) -> None:
        """Run one measurement into report[key] if `minutes` are left; a failure is recorded, not fatal."""
        if key not in stages:
            return
        if not deadline.allows(minutes):
            report["skipped"].append(f"{key}: {what} ({deadline.left():.1f} min left, {minutes} needed)")
        else:
            try:
                report.setdefault(key, []).append(run())
            except Exception as e:
                report.setdefault(key, []).append({"what": what, "error": f"{type(e).__name__}: {e}"[:300]})
            print(report[key][-1], flush=True)
        save()

    small, large = (4, 8) if dry else (32, 256)
    for variant in ["before", "no sync, 1 group"]:
        stage("profile", 0.5, variant, lambda: profile(model, tokenized, small, 2 if dry else 5, device, variant))
    steps, warmup = (2, 1) if dry else (20, 5)
    for batch in (small,) if dry else (small, large):
        for variant in ["before", "no sync, 1 group, cuDNN attention", "no sync, 2 groups", "no sync, 1 group"]:
            stage("steps", 0.5, f"{variant} at {batch}",
                  lambda: throughput(model, tokenized, batch, steps, warmup, device, variant))
    fine_tune_minutes = 0.2 if dry else 3.0
    for batch in [] if dry else (small, large):  # CUDA graphs: the compile is the slowest, least certain part
        stage("steps", 1.5 + fine_tune_minutes, f"CUDA graphs at {batch}",
              lambda: throughput(model, tokenized, batch, steps, warmup, device, "no sync, 1 group, CUDA graphs"))
    pairs = 32 if dry else args.pairs or len(pool)
    stage("finetune", fine_tune_minutes, "all-MiniLM-L6-v2, the default recipe",
          lambda: finetune(pack, pairs, device.type, 1 if dry else args.epochs, max(0.1, deadline.left() - 1.5)))
    print(table(report))


def table(report: dict) -> str:
    host = report["host"]
    tests = report.get("tests", {"summary": "not run"})
    lines = [f"device: {report['device']}, torch {report['torch']}; tests: {tests['summary']}",
             f"host: {host['us_per_op']:.1f} us a tiny op; peak {host['measured_peak_tflop_per_s']:.0f} TFLOP/s "
             f"measured (datasheet {host['datasheet_peak_tflop_per_s'] or '-'})"]
    for r in report.get("profile", []):
        lines.append(f"profile {r.get('variant', r.get('what'))}: " + (r["error"] if "error" in r else
                     f"{r['kernels_per_step']:.0f} kernels, {r['host_syncs_per_step']:.1f} syncs, host {r['host_ms_per_step']:.1f} ms, "
                     f"GPU {r['gpu_ms_per_step']:.1f} ms, wall {r['wall_ms_per_step']:.1f} ms a step; "
                     f"{r['ops_cpu_ms_per_step']:.1f} ms of it in ops; syncs at {r['sync_sites'] or '-'}"))
    lines.append(f"{'bge-base shapes, bf16':32} {'batch':>5} {'ms/step':>8} {'pairs/s':>8} {'TFLOP/s':>8} {'of peak':>8} {'GiB':>5}")
    for r in report.get("steps", []):
        if "error" in r:
            lines.append(f"{r['what']:32} failed: {r['error']}")
            continue
        memory = f"{r['peak_memory_gib']:.1f}" if r["peak_memory_gib"] is not None else "-"
        lines.append(f"{r['variant']:32} {r['batch']:5d} {r['step_ms']:8.1f} {r['pairs_per_s']:8.0f} {r['tflop_per_s']:8.2f} "
                     f"{r['tflop_per_s'] / host['measured_peak_tflop_per_s']:8.1%} {memory:>5}")
    for f in report.get("finetune", []):
        lines.append(f"fine-tune failed: {f['error']}" if "error" in f else
                     f"all-MiniLM-L6-v2, {f['pairs']:,} pairs, {f['epochs_done']:.2f} of {f['epochs']} epochs "
                     f"({f['stopped_by']}): {f['pairs_per_s']:.0f} pairs/s; test error {f['zero_shot_test_error']:.2%} -> {f['test_error']:.2%}")
    lines += [f"skipped: {s}" for s in report["skipped"]]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
