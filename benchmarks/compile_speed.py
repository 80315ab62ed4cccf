"""Does torch.compile (inductor) pay on this CPU? Encoding the distinct test-split texts and a number
of training steps, eager against compiled (dynamic shapes: every batch has its own length), in one
process, with the compilation time reported apart. Not a default of the project unless it wins.

    python benchmarks/compile_speed.py --model DIR --splits ../shared/data/quora/splits
"""
import argparse
import contextlib
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import batching, data# noqa: E402
from embed_ft.losses import OnlineContrastiveLoss# noqa: E402
from embed_ft.model import Embedder, cpu_has_bf16# noqa: E402


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def train_steps(model, forward, tokenized, steps: int, bf16: bool) -> None:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-8, fused=True)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
    order = tokenized.epoch_order(0, 0, 32, by_length=True)[: 32 * steps]
    for groups, restore, labels, _ in tokenized.batches(order, 32, 2):
        with autocast:
            embeddings = torch.cat([forward(**g) for g in groups])
        first, second = embeddings[restore].float().chunk(2)
        loss = OnlineContrastiveLoss()(first, second, labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--splits", required=True)
    parser.add_argument("--steps", type=int, default=40)
    args = parser.parse_args()
    bf16 = cpu_has_bf16()
    texts = sorted({t for a, b, _ in data.load_pairs(f"{args.splits}/test.tsv.gz") for t in (a, b)})
    print(f"{'what':34} {'eager s':>8} {'compiled, 1st s':>15} {'compiled, 2nd s':>15} {'speed-up':>8}")
    model = Embedder.from_pretrained(args.model).eval()
    eager = timed(lambda: model.encode(texts, progress=False))
    compiled_model = Embedder.from_pretrained(args.model).eval()
    compiled_model.forward = torch.compile(compiled_model.forward, dynamic=True)
    first = timed(lambda: compiled_model.encode(texts, progress=False))
    second = timed(lambda: compiled_model.encode(texts, progress=False))
    print(f"{f'encode {len(texts)} texts, bf16 {bf16}':34} {eager:8.1f} {first:15.1f} {second:15.1f} {eager / second:7.2f}x")
    pairs = data.subsample(data.load_pairs(f"{args.splits}/train.tsv.gz"), 32 * args.steps, seed=0)
    tokenized = batching.TokenizedPairs(pairs, model)
    model.train()
    eager = timed(lambda: train_steps(model, model, tokenized, args.steps, bf16))
    compiled_model.train()
    forward = torch.compile(compiled_model, dynamic=True)
    first = timed(lambda: train_steps(compiled_model, forward, tokenized, args.steps, bf16))
    second = timed(lambda: train_steps(compiled_model, forward, tokenized, args.steps, bf16))
    print(f"{f'{args.steps} training steps, bf16 {bf16}':34} {eager:8.1f} {first:15.1f} {second:15.1f} {eager / second:7.2f}x")


if __name__ == "__main__":
    main()
