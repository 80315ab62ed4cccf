"""Zero-shot error of a pretrained encoder with and without a fresh projection, in fp32 and bf16.

Answers two questions before any training: does adding the dense-out projection wreck the
pretrained geometry (it should not, thanks to its orthogonal initialisation; a default-initialised
nn.Linear is shown for contrast), and does bf16 inference change the numbers?

    python benchmarks/zero_shot.py --model DIR --val val.tsv.gz --test test.tsv.gz --dims 0 256
"""
import argparse
import functools
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, evaluate# noqa: E402
from embed_ft.model import Embedder, cpu_has_bf16# noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--val", required=True)
    parser.add_argument("--test", required=True)
    parser.add_argument("--dims", type=int, nargs="+", default=[0, 256])
    args = parser.parse_args()
    val, test = data.load_pairs(args.val), data.load_pairs(args.test)
    bf16_available = cpu_has_bf16()
    print(f"{'projection':24} {'precision':9} {'val error':>9} {'test error':>10} {'test AUC':>8} {'seconds':>8}")
    for dim in args.dims:
        for init in (["orthogonal", "default"] if dim else ["none"]):
            torch.manual_seed(0)
            embedder = Embedder.from_pretrained(args.model, dim or None)
            if init == "default":
                embedder.projection.reset_parameters()  # nn.Linear's own (Kaiming-uniform) init
            for precision in ["fp32", "bf16"] if bf16_available else ["fp32"]:
                encoder = SimpleNamespace(encode=functools.partial(embedder.encode, bf16=precision == "bf16"))
                start = time.perf_counter()
                result = evaluate.evaluate(encoder, val, test)
                seconds = time.perf_counter() - start
                label = f"{init} {dim}" if dim else "none"
                print(f"{label:24} {precision:9} {result['val']['error_rate']:9.2%} "
                      f"{result['test']['error_rate']:10.2%} {result['test']['roc_auc']:8.4f} {seconds:8.1f}", flush=True)


if __name__ == "__main__":
    main()
