"""Training step speed: the step train.py runs (autocast, length groups, OCL, clipping, fused AdamW)
under each precision (bf16 where the CPU has it), number of length groups and frozen or trained token
embeddings. Same batches, same model, side by side in one process; medians over --steps steps after
--warmup steps, with the FLOPs each step computed (padding included) as a share of the measured peak.

    python benchmarks/train_speed.py --model DIR --data train.tsv.gz --steps 15 --groups 1 4 8
"""
import argparse
import contextlib
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import batching, data  # noqa: E402
import flops  # noqa: E402
from embed_ft.losses import OnlineContrastiveLoss# noqa: E402
from embed_ft.model import Embedder, cpu_has_bf16# noqa: E402


def step_times(model_dir: str, tokenized, groups: int, precision: str, freeze: bool, steps: int, warmup: int,
               batch_size: int) -> tuple[float, float]:
    """Median seconds a step and the median FLOPs a step computed."""
    torch.manual_seed(0)
    model = Embedder.from_pretrained(model_dir, 256).train()
    if freeze:
        model.encoder.get_input_embeddings().requires_grad_(False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-8, fused=True)  # tiny steps: the model barely moves
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    loss_fn, times, work = OnlineContrastiveLoss(), [], []
    order = np.resize(np.random.default_rng(0).permutation(len(tokenized)), batch_size * (warmup + steps))
    for i, (features, restore, labels, _) in enumerate(tokenized.batches(order, batch_size, groups)):
        start = time.perf_counter()
        with autocast:
            embeddings = torch.cat([model(**f) for f in features])
        first, second = embeddings[restore].float().chunk(2)
        loss = loss_fn(first, second, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        loss.item()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            lengths = [f["input_ids"].shape[1] for f in features for _ in range(f["input_ids"].shape[0])]
            work.append(3 * flops.forward_flops(lengths, *flops.model_shape(model.encoder.config), 256))
    return statistics.median(times), statistics.median(work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--groups", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--freeze", choices=["no", "yes", "both"], default="both", help="freeze the token embeddings")
    args = parser.parse_args()
    pairs = data.subsample(data.load_pairs(args.data), (args.steps + args.warmup) * args.batch_size, seed=0)
    tokenized = batching.TokenizedPairs(pairs, Embedder.from_pretrained(args.model))
    precisions = ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]
    peaks = {p: flops.measured_peak(torch.device("cpu"), {"fp32": torch.float32, "bf16": torch.bfloat16}[p], 2048)
             for p in precisions}
    freezes = {"no": [False], "yes": [True], "both": [False, True]}[args.freeze]
    print(f"batch {args.batch_size} pairs, {args.steps} steps after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads; medians; peak: "
          + ", ".join(f"{p} {v / 1e9:.0f} GFLOP/s" for p, v in peaks.items()))
    print(f"{'precision':9} {'groups':>6} {'frozen emb':>10} {'s/step':>7} {'pairs/s':>8} {'speed-up':>8} {'% of peak':>9}")
    base = None
    for precision in precisions:
        for groups in args.groups:
            for freeze in freezes:
                seconds, work = step_times(args.model, tokenized, groups, precision, freeze, args.steps, args.warmup,
                                           args.batch_size)
                base = base or seconds
                print(f"{precision:9} {groups:6d} {str(freeze):>10} {seconds:7.3f} {args.batch_size / seconds:8.1f} "
                      f"{base / seconds:7.2f}x {work / seconds / peaks[precision]:9.0%}", flush=True)


if __name__ == "__main__":
    main()
