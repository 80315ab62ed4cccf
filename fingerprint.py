"""What makes a vector, in one hash: a stored vector is only comparable with another made by the same
weights, tokenizer, pooling, layers, normalisation and prompt.

    fingerprint(embedder)   # '3f1c…' (SHA-256 hex), the same for the same model wherever it is loaded from

It hashes the tensors as loaded (names, shapes, dtypes, bytes), the tokenizer's vocabulary and the
pipeline's description (model.Embedder.describe), not the folder's files: a model card, a threshold
or an audit written into a folder later changes no vector, so it changes no fingerprint; a hub name
and the folder it downloads to give the same one.
"""
from __future__ import annotations

import hashlib
import json

import torch


def fingerprint(embedder) -> str:
    digest = hashlib.sha256()
    for name, tensor in sorted(embedder.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    vocabulary = sorted(embedder.tokenizer.get_vocab().items())
    digest.update(json.dumps(vocabulary, ensure_ascii=False).encode())
    digest.update(json.dumps({**embedder.describe(), "max_length": embedder.max_length}, sort_keys=True, default=str).encode())
    return digest.hexdigest()
