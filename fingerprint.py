"""What makes a vector, in one hash: a stored vector is only comparable with another made by the same
weights, tokenizer, pooling, layers, normalisation and prompt.

    fingerprint.of(embedder)   # '3f1c…' (SHA-256 hex), the same for the same model wherever it is loaded from

It hashes the tensors as loaded (names, shapes, dtypes, bytes), the tokenizer's vocabulary and the
pipeline (model.Embedder.describe: pooling, layers, normalisation, prompts; lower-casing), not the
folder's files: a model card, a threshold or an audit written into a folder later changes no vector,
so it changes no fingerprint; a hub name and the folder it downloads to give the same one, and so do
a model before and after `save`. The token limit is the caller's to compare (a corpus's manifest
keeps it beside the fingerprint): a server may load a folder with a lower one.
"""
from __future__ import annotations

import hashlib
import json

import torch


def of(embedder) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(embedder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    vocabulary = sorted(embedder.tokenizer.get_vocab().items())
    digest.update(json.dumps(vocabulary, ensure_ascii=False).encode())
    pipeline = {k: v for k, v in embedder.describe().items() if k != "published_layout"} | \
        {"do_lower_case": embedder.layout.do_lower_case}
    digest.update(json.dumps(pipeline, sort_keys=True, default=str).encode())
    return digest.hexdigest()
