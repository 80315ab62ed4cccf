"""Training throughput: pairs/s of the real training step with texts padded as one group against
`--length-groups` groups sorted by length, in fp32 and bf16 (where the CPU has it). Same batches,
same model, side by side in one process; medians over --steps steps after --warmup steps.

    python benchmarks/train_speed.py --model DIR --data train.tsv.gz --steps 20
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
import data  # noqa: E402
from losses import OnlineContrastiveLoss  # noqa: E402
from model import Embedder, cpu_has_bf16  # noqa: E402


def step_times(model, tokenized, groups: int, precision: str, steps: int, warmup: int, batch_size: int) -> list[float]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-8)  # tiny steps: the model barely moves
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if precision == "bf16" else contextlib.nullcontext()
    loss_fn, times = OnlineContrastiveLoss(), []
    batches = tokenized.batches(batch_size, np.random.default_rng(0), groups)
    for _ in range(warmup + steps):
        features, restore, labels = next(batches)
        start = time.perf_counter()
        with autocast:
            embeddings = torch.cat([model(**f) for f in features])
        first, second = embeddings[restore].float().chunk(2)
        loss = loss_fn(first, second, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter() - start)
    return times[warmup:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--length-groups", type=int, default=4)
    args = parser.parse_args()
    pairs = data.subsample(data.load_pairs(args.data), (args.steps + args.warmup) * args.batch_size, seed=0)
    model = Embedder.from_pretrained(args.model, 256).train()
    tokenized = data.TokenizedPairs(pairs, model.tokenizer, model.max_length)
    print(f"batch {args.batch_size} pairs, {args.steps} steps after {args.warmup} warm-up, "
          f"{torch.get_num_threads()} threads; medians")
    print(f"{'precision':9} {'groups':>6} {'s/step':>7} {'pairs/s':>8} {'speed-up':>8}")
    base = None
    for precision in ["fp32", "bf16"] if cpu_has_bf16() else ["fp32"]:
        for groups in (1, args.length_groups):
            median = statistics.median(step_times(model, tokenized, groups, precision, args.steps, args.warmup,
                                                  args.batch_size))
            base = base or median
            print(f"{precision:9} {groups:6d} {median:7.3f} {args.batch_size / median:8.1f} {base / median:7.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
