"""Int8 inference on a CPU: an encoder's Linear layers multiplied in 8-bit integers.

    fast = int8.quantised(model)        # a copy; `model` stays as it was
    vectors = fast.encode_ids(input_ids, bf16=False)

Why: on a CPU the embedding job is bound by the Linear layers' arithmetic, and bf16 already runs
them near the chip's peak (docs/speed.md). Integer dot products (AVX512-VNNI, AMX) do about twice as
many multiply-adds a cycle as bf16 ones, so the only way left to go faster is 8-bit arithmetic.

How: each weight matrix is rounded to int8 once, with one scale per output channel (its largest
absolute value maps to 127); each token's activations are rounded at run time with a scale of their
own (per token, so one long or loud token does not flatten the others); `torch._int_mm` multiplies
them into int32, and the two scales bring the result back to float. Nothing needs calibration data.
Everything else (embeddings, attention, LayerNorm, GELU, pooling, the head) stays in float32.

What it costs: the vectors move a little (a mean cosine of 0.998 to the float32 ones for
all-MiniLM-L6-v2), and the shared Quora test error by less than the 0.2 points the project allows an
int8 way (docs/corpus.md measures both, beside OpenVINO's int8). A corpus's manifest says `int8`, so
int8 vectors never mix with float ones, and `corpus.py search` embeds its queries the same way.
"""
from __future__ import annotations

import copy
import ctypes

import torch
from torch import nn

from embed_ft.errors import InputError


class Int8Linear(nn.Module):
    """y = x W^T + b with W in int8 (one scale per output channel) and x rounded to int8 per token."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        weight = linear.weight.detach().float()
        scale = weight.abs().amax(1).clamp(min=1e-12) / 127
        self.register_buffer("weight_int8", (weight / scale[:, None]).round().to(torch.int8).t().contiguous())
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().float())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).float()
        scale = rows.abs().amax(1, keepdim=True).clamp_(min=1e-12) / 127
        product = torch._int_mm((rows / scale).round_().to(torch.int8), self.weight_int8).float().mul_(scale)
        out = product.mul_(self.weight_scale) if self.bias is None else torch.addcmul(self.bias, product, self.weight_scale)
        return out.reshape(*x.shape[:-1], -1)


def quantised(model: nn.Module) -> nn.Module:
    """A copy of an Embedder whose encoder's Linear layers are Int8Linear; the head stays float. Whether
    texts may be packed is decided first, in float (the check compares two layouts' vectors, which int8
    rounding would tell apart)."""
    if model.device.type != "cpu":
        raise InputError(f"int8 runs on a CPU and this model is on {model.device}: use bf16 there")
    keep_freed_memory()
    model.packs()
    fast = copy.deepcopy(model).eval()
    for module in list(fast.encoder.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, name, Int8Linear(child))
    return fast


def keep_freed_memory() -> None:
    """Ask glibc's malloc to keep freed memory for the next batch rather than hand it back to the system.
    Each int8 layer allocates its int32 and float products afresh; with glibc's defaults a batch's
    worth went back to the system and was faulted in again, page by page, at the next batch: on
    10,000 questions 5 s of system time, and 600 texts/s where 820 with this (docs/corpus.md). The
    process keeps up to 1 GiB of freed memory for reuse. Elsewhere than glibc nothing is done."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:  # macOS, musl
        return
    M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
    libc.mallopt(M_TRIM_THRESHOLD, 1 << 30)   # hand the heap's free top back only past 1 GiB,
    libc.mallopt(M_TOP_PAD, 256 << 20)        # grow it 256 MiB at a time,
    libc.mallopt(M_MMAP_THRESHOLD, 32 << 20)  # and serve blocks up to 32 MiB (glibc's most) from it
