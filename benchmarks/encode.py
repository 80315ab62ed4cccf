"""Encoding throughput: Embedder.encode (distinct texts, longest first, bf16 where the CPU has it)
against a naive loop (texts in the given order, fp32), on real texts. Medians of --repeats runs,
measured side by side in one process.

    python benchmarks/encode.py --model DIR --texts test.tsv.gz --n 4000
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data# noqa: E402
from embed_ft.model import Embedder, cpu_has_bf16# noqa: E402


def naive_encode(embedder: Embedder, texts: list[str], batch_size: int) -> np.ndarray:
    """What a first attempt looks like: batches in input order, every text, full precision."""
    out = []
    with torch.inference_mode():
        for start in range(0, len(texts), batch_size):
            features = embedder.tokenizer(texts[start:start + batch_size], padding=True, truncation=True,
                                          max_length=embedder.max_length, return_tensors="pt")
            out.append(embedder(**features).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="a pairs file; its first texts are encoded")
    parser.add_argument("--n", type=int, default=4000, help="texts to encode (with their repeats)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    texts = [t for a, b, _ in data.load_pairs(args.texts) for t in (a, b)][: args.n]
    embedder = Embedder.from_pretrained(args.model).eval()
    has_bf16 = cpu_has_bf16()
    variants = {"naive loop, fp32": lambda: naive_encode(embedder, texts, args.batch_size)}
    for precision in (["fp32", "bf16"] if has_bf16 else ["fp32"]):
        variants[f"Embedder.encode, {precision}"] = (
            lambda bf16=precision == "bf16": embedder.encode(texts, args.batch_size, progress=False, bf16=bf16))
    reference = variants["naive loop, fp32"]()
    print(f"{len(texts)} texts ({len(set(texts))} distinct), batch {args.batch_size}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'variant':24} {'seconds':>8} {'texts/s':>8} {'speed-up':>8} {'max |diff|':>10}")
    base = None
    for name, fn in variants.items():
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            vectors = fn()
            times.append(time.perf_counter() - start)
        median = statistics.median(times)
        base = base or median
        print(f"{name:24} {median:8.2f} {len(texts) / median:8.0f} {base / median:7.2f}x "
              f"{np.abs(vectors - reference).max():10.4f}")


if __name__ == "__main__":
    main()
