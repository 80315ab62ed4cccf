"""FLOPs of a transformer encoder's forward pass, counted from its shapes, and the peak FLOP/s of the
device, measured with a large matrix product. Used by the speed benchmarks to report a share of
peak (model FLOPs utilisation).

A forward pass over one sequence of L tokens, per layer: the Q, K, V and output projections
(4 x L x h x h multiply-adds), the feed-forward network (2 x L x h x f) and attention's two matrix
products (QK^T and AV: 2 x L x L x h); 2 FLOPs a multiply-add. Embedding look-ups, layer norms,
softmax and the pooling are left out (under 1%). Backward costs twice the forward, so a training
step is 3x. all-MiniLM-L6-v2 (h 384, f 1536, 6 layers): 21.2 MFLOP a token at L = 16.
"""
from __future__ import annotations

import time

import torch


def forward_flops(lengths: list[int], hidden: int, intermediate: int, layers: int, projection: int = 0) -> float:
    """FLOPs of one forward pass over sequences of the given (padded) lengths."""
    per_layer = sum(2 * (4 * L * hidden * hidden + 2 * L * hidden * intermediate + 2 * L * L * hidden) for L in lengths)
    return layers * per_layer + 2 * len(lengths) * hidden * projection


def model_shape(config) -> tuple[int, int, int]:
    """(hidden, intermediate, layers) of a Hugging Face config."""
    return config.hidden_size, config.intermediate_size, config.num_hidden_layers


def measured_peak(device: torch.device, dtype: torch.dtype, n: int = 4096, repeats: int = 10) -> float:
    """FLOP/s of an n x n x n matrix product in `dtype` (median of `repeats`), the device's practical peak."""
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return 2 * n**3 / sorted(times)[len(times) // 2]
