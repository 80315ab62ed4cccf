"""Hard negatives for the in-batch loss (--hard-negatives K).

In-batch InfoNCE asks each text to pick its duplicate out of the batch, but a random batch holds
few texts that resemble it, so most of its negatives are easy. Mining gives each pair the K texts of
the training pool nearest its first text under the starting model, that are not its duplicates:
the near-misses a search actually confuses it with (Karpukhin et al. 2020, "DPR"; Xiong et al.
2021, "ANCE"). They are mined once per run, one encode of the pool and a chunked top-k, and cached
by model and data, so a resumed or repeated run reads them back.

A near text may be a duplicate nobody labelled. Two guards: texts joined to the anchor by duplicate
labels (its whole cluster, A~B and B~C) are never its negatives, and neither is any text more
similar to it than SIMILARITY_CEILING.
"""
from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

import data
from errors import InputError

SIMILARITY_CEILING = 0.95  # cosine under the starting model: nearer than this, likely an unlabelled duplicate
ANCHORS_PER_CHUNK = 256    # rows of the similarity matrix held at once: 256 x pool floats
CACHE = Path("~/.cache/embed-ft/hard-negatives")


def cluster_ids(texts: list[str], pairs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """One id per text, shared by the texts that duplicate labels join (a text alone is its own cluster)."""
    root = data.union_find((data.normalise(texts[a]), data.normalise(texts[b]))
                           for (a, b), y in zip(pairs, labels) if y == 1)
    ids: dict[str, int] = {}
    return np.array([ids.setdefault(root(data.normalise(t)), len(ids)) for t in texts], dtype=np.int64)


def mine(model, texts: list[str], pairs: np.ndarray, labels: np.ndarray, k: int,
         batch_size: int = 128) -> np.ndarray:
    """(n pairs, k) indices into `texts`: for each pair, the k texts most similar to its first text
    under `model`, leaving out its duplicate cluster and anything above SIMILARITY_CEILING."""
    device = model.device
    vectors = torch.from_numpy(model.encode(texts, batch_size)).to(device)
    clusters = torch.from_numpy(cluster_ids(texts, pairs, labels)).to(device)
    anchors = torch.from_numpy(pairs[:, 0]).to(device)
    chosen = []
    for part in tqdm(anchors.split(ANCHORS_PER_CHUNK), desc="mine negatives", unit="chunk"):
        similarity = vectors[part] @ vectors.T
        allowed = (clusters[None, :] != clusters[part][:, None]) & (similarity <= SIMILARITY_CEILING)
        values, indices = similarity.masked_fill(~allowed, -torch.inf).topk(k, dim=1)
        if torch.isinf(values).any():
            raise InputError(f"--hard-negatives {k}: some pair has fewer than {k} texts in the training pool "
                             "outside its duplicates; use fewer hard negatives or more pairs")
        chosen.append(indices.cpu())
    return torch.cat(chosen).numpy()


def cache_key(model, texts: list[str], pairs: np.ndarray, labels: np.ndarray, k: int) -> str:
    """A hash of everything the negatives depend on: the model's weights, the pool and pairs, k and
    the ceiling. Hashing the weights (a second or so) rather than the model's name keeps a folder that
    was trained further, or overwritten, from reading stale negatives."""
    h = hashlib.sha256(f"{k} {SIMILARITY_CEILING} {model.max_length}".encode())
    for tensor in model.state_dict().values():
        h.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    h.update("\n".join(texts).encode())
    h.update(pairs.tobytes() + labels.tobytes())
    return h.hexdigest()[:32]


def mine_cached(model, texts: list[str], pairs: np.ndarray, labels: np.ndarray, k: int,
                batch_size: int = 128) -> tuple[np.ndarray, dict]:
    """The negatives, from the cache if this model and data were mined before; and what it cost."""
    started = time.perf_counter()
    path = CACHE.expanduser() / f"{cache_key(model, texts, pairs, labels, k)}.npy"
    cached = path.is_file()
    if cached:
        negatives = np.load(path)
    else:
        negatives = mine(model, texts, pairs, labels, k, batch_size)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_suffix(f".{time.time_ns()}.tmp.npy")  # renamed whole: a reader never sees half
        np.save(partial, negatives)
        partial.replace(path)
    return negatives, {"k": k, "similarity_ceiling": SIMILARITY_CEILING, "cached": cached,
                       "seconds": time.perf_counter() - started, "pool_texts": len(texts)}
