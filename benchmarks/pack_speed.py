"""Packed against padded forward passes, on batches as a server meets them: texts in arrival order.

    python benchmarks/pack_speed.py --model DIR [--batch 128] [--repeats 3]

Real Quora test questions, tokenised once; then, per precision (fp32, and bf16 where the CPU has
bf16 units), the same texts in batches of --batch in file order (so each batch mixes every length):
padded to each batch's longest text, and packed end to end (packing.py); and, for reference, the
whole set sorted by length first and padded, as encoding a corpus in one call can. Medians of
--repeats, side by side in one process; the vectors are compared too.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data# noqa: E402
from embed_ft.model import autocast_for, cpu_has_bf16, load_model# noqa: E402
from serve_speed import cpu_name  # noqa: E402

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "quora" / "splits"


@torch.inference_mode()
def in_batches(embed, ids: list[list[int]], batch: int, bf16: bool, device) -> np.ndarray:
    with autocast_for(device, bf16):
        return np.concatenate([embed(ids[i:i + batch]).float().cpu().numpy() for i in range(0, len(ids), batch)])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--n", type=int, default=3200, help="texts")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = load_model(args.model, None).eval()
    texts = list(dict.fromkeys(t for a, b, _ in data.load_pairs(str(SPLITS / "test.tsv.gz")) for t in (a, b)))[:args.n]
    ids = model.tokenizer(texts, truncation=True, max_length=model.max_length)["input_ids"]
    by_length = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    variants = {
        f"padded, batches of {args.batch} in arrival order": lambda bf16: in_batches(model.embed_padded, ids, args.batch, bf16, model.device),
        f"packed, batches of {args.batch} in arrival order": lambda bf16: in_batches(model.embed_packed, ids, args.batch, bf16, model.device),
        "padded, whole set sorted by length": lambda bf16: in_batches(
            model.embed_padded, [ids[i] for i in by_length], args.batch, bf16, model.device)[np.argsort(by_length)],
    }
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores, bf16 units: {'yes' if cpu_has_bf16() else 'no'}; "
          f"{len(ids)} questions, {np.mean([len(i) for i in ids]):.1f} tokens on average; medians of {args.repeats}")
    print(f"{'precision':9} {'variant':44} {'texts/s':>8} {'vs padded':>9} {'max |diff|':>10}")
    for precision in ["fp32"] + (["bf16"] if cpu_has_bf16() else []):
        bf16, rates, reference = precision == "bf16", {}, None
        for name, run in variants.items():
            run(bf16)  # warm-up
            seconds = []
            for _ in range(args.repeats):
                started = time.perf_counter()
                vectors = run(bf16)
                seconds.append(time.perf_counter() - started)
            rates[name] = len(ids) / statistics.median(seconds)
            reference = vectors if reference is None else reference
            first = next(iter(rates.values()))
            print(f"{precision:9} {name:44} {rates[name]:8.0f} {rates[name] / first:8.2f}x "
                  f"{np.abs(vectors - reference).max():10.1e}", flush=True)


if __name__ == "__main__":
    main()
