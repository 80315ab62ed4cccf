"""Silver pairs for benchmarks/distill.py: a larger model, the teacher, labels pairs that it mines
from unlabelled texts (the labelling half of Augmented SBERT: Thakur et al. 2021, "Augmented SBERT:
Data Augmentation Method for Improving Bi-Encoders for Pairwise Sentence Scoring Tasks").

Measured on the shared Quora splits (docs/distillation.md), these pairs did not help all-MiniLM-L6-v2:
added to 400 or 4,000 labelled pairs they made it worse, alone they made no detectable difference,
and the teacher's cosines as soft targets and its embeddings as targets did worse still. So the
product has no teacher option; this is the apparatus of that measurement, kept so that it can be
repeated and tested.

1. The teacher embeds every unlabelled text once (.txt, one a line, optionally .gz; or a pairs
   file, labels ignored). Texts that occur in the validation or test pairs are left out first, so
   no evaluated text becomes silver.
2. Each text's nearest neighbours under the teacher (a chunked top-k) and a random partner are the
   candidate pairs: the neighbours are the hard cases, the partners the easy negatives.
3. The teacher labels each pair with its decision at its own threshold: the one stored in its
   folder (train.py tuned it on validation), else tuned here on the validation pairs.

The mined pairs are cached under $EMBED_FT_CACHE (default ~/.cache/embed-ft), keyed by the teacher,
the texts and the settings, so another --size or seed mines nothing again.
"""
from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, corpus_input, evaluate# noqa: E402
from embed_ft.errors import InputError# noqa: E402


def unlabelled_texts(path: str, *held_out: list[data.Pair]) -> list[str]:
    """The distinct texts of a .txt file (one a line, optionally .gz) or of a pairs file (labels
    ignored), less every text that occurs in the held-out pairs (compared normalised)."""
    path = Path(path)
    texts = ([row.text for row in corpus_input.rows(path)] if path.name.removesuffix(".gz").endswith(".txt")
             else [t for a, b, _ in data.load_pairs(str(path)) for t in (a, b)])
    seen = {data.normalise(t) for pairs in held_out for a, b, _ in pairs for t in (a, b)}
    first: dict[str, str] = {}  # one spelling of each normalised text, the first, in file order
    for text in texts:
        if data.normalise(text) not in seen:
            first.setdefault(data.normalise(text), text)
    kept = list(first.values())
    if len(kept) < 2:
        raise InputError(f"--unlabelled {path}: {len(kept)} text(s) left after dropping the {len(texts) - len(kept)} "
                         "that occur in the validation or test pairs; give at least two others")
    if len(kept) < len(texts):
        print(f"unlabelled texts: dropped {len(texts) - len(kept)} that occur in validation or test (or repeat)")
    return kept


def nearest_neighbours(vectors: np.ndarray, k: int, chunk: int = 1024) -> np.ndarray:
    """(n, k): each row's k most similar other rows, most similar first; rows are unit length.
    Computed a chunk of rows at a time, as dedup.near_duplicate_pairs is."""
    k = min(k, len(vectors) - 1)
    found = []
    for start in range(0, len(vectors), chunk):
        scores = vectors[start:start + chunk] @ vectors.T
        scores[np.arange(len(scores)), np.arange(start, start + len(scores))] = -np.inf  # not itself
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k] if k > 0 else np.zeros((len(scores), 0), int)
        found.append(np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1))
    return np.concatenate(found) if found else np.zeros((0, k), int)


def candidate_pairs(vectors: np.ndarray, neighbours: int, random_partners: int, seed: int) -> np.ndarray:
    """(m, 2) index pairs i < j, each once: every text with its nearest neighbours and with random
    partners."""
    n = len(vectors)
    near = nearest_neighbours(vectors, neighbours)
    rng = np.random.default_rng(seed)
    partners = rng.integers(0, n - 1, size=(n, random_partners))
    partners += partners >= np.arange(n)[:, None]  # never the text itself
    rows = np.repeat(np.arange(n), near.shape[1] + random_partners)
    pairs = np.stack([rows, np.concatenate([near, partners], axis=1).ravel()], axis=1)
    return np.unique(np.sort(pairs, axis=1), axis=0)


def teacher_threshold(teacher, val: list[data.Pair], batch_size: int) -> float:
    """The threshold stored with the teacher (train.py tuned it on validation), else tuned here on
    the validation pairs."""
    stored = getattr(teacher, "decision", {}).get("threshold")
    if stored is not None:
        return float(stored)
    scores = evaluate.cosine_scores(teacher, val, batch_size)
    return float(evaluate.best_threshold(scores, evaluate.labels_of(val)))


def fingerprint(teacher: str) -> str:
    """What identifies a teacher: a local folder by its files' names, sizes and times, else the
    name (a hub model, or openai:MODEL)."""
    folder = Path(teacher)
    if not folder.is_dir():
        return teacher
    files = sorted(p for p in folder.rglob("*") if p.is_file())
    return json.dumps([(str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns) for p in files])


def cache_path(teacher: str, texts: list[str], settings: dict) -> Path:
    key = hashlib.sha256(json.dumps([fingerprint(teacher), settings]).encode())
    for text in texts:
        key.update(text.encode() + b"\n")
    root = Path(os.environ.get("EMBED_FT_CACHE", Path.home() / ".cache" / "embed-ft"))
    return root / "silver" / f"{key.hexdigest()[:24]}.jsonl"


def mine(teacher_name: str, texts: list[str], val: list[data.Pair], settings: dict, batch_size: int,
         device: str) -> tuple[list[data.Pair], dict]:
    """Embed the texts with the teacher, pick the candidate pairs, label them by its decisions."""
    teacher = evaluate.open_encoder(teacher_name, device=device)
    started = time.perf_counter()
    vectors = teacher.encode(texts, batch_size=batch_size)  # a progress bar on long work
    encoded = time.perf_counter()
    pairs = candidate_pairs(vectors, settings["neighbours"], settings["random_partners"], settings["seed"])
    cosines = np.einsum("ij,ij->i", vectors[pairs[:, 0]], vectors[pairs[:, 1]])
    threshold = teacher_threshold(teacher, val, batch_size)
    silver = [(texts[i], texts[j], int(c > threshold)) for (i, j), c in zip(pairs.tolist(), cosines.tolist())]
    recorded = getattr(teacher, "decision", {})  # a train.py folder keeps its own evaluation
    return silver, {"teacher_threshold": threshold, "encode_seconds": encoded - started,
                    "teacher_texts_per_s": len(texts) / max(encoded - started, 1e-9),
                    "teacher_val_error": recorded.get("val", {}).get("error_rate"),
                    "teacher_test_error": recorded.get("test", {}).get("error_rate")}


def silver_pairs(teacher: str, unlabelled: str, val: list[data.Pair], test: list[data.Pair], *, neighbours: int = 3,
                 random_partners: int = 1, size: int = 0, seed: int = 0, batch_size: int = 128,
                 device: str = "auto") -> tuple[list[data.Pair], dict]:
    """The silver pairs, from the cache or mined, and what to report about them. `size` keeps a
    random sample of that many (0: all); the sample, not the mining, follows the seed."""
    texts = unlabelled_texts(unlabelled, val, test)
    settings = {"labels": "decision", "neighbours": neighbours, "random_partners": random_partners, "seed": 0}
    path = cache_path(teacher, texts, settings)
    if path.with_suffix(".json").exists():  # written last: the entry is complete
        report = json.loads(path.with_suffix(".json").read_text())
        with open(path) as f:
            silver = [(a, b, int(y)) for a, b, y in map(json.loads, f)]
        print(f"silver pairs: {len(silver):,} from the cache ({path})")
    else:
        silver, report = mine(teacher, texts, val, settings, batch_size, device)
        write_cache(path, silver, report)
        print(f"silver pairs: {len(silver):,} mined from {len(texts):,} texts in {report['encode_seconds']:.0f} s "
              f"({report['teacher_texts_per_s']:.0f} texts/s), cached in {path}")
    if size:
        if size > len(silver):
            raise InputError(f"size {size} is more than the {len(silver)} silver pairs mined")
        silver = data.subsample(silver, size, seed)
    report = report | {"teacher": teacher, "texts": len(texts), "pairs": len(silver),
                       "duplicate_share": float(np.mean([y for *_, y in silver]))}
    return silver, report


def write_cache(path: Path, silver: list[data.Pair], report: dict) -> None:
    """The pairs, then their report; each written whole (a temporary file renamed), the report last,
    so a cache entry with a report is complete."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for target, text in [(path, "".join(json.dumps(p) + "\n" for p in silver)), (path.with_suffix(".json"), json.dumps(report))]:
        temporary = target.with_suffix(target.suffix + ".tmp")
        temporary.write_text(text)
        temporary.replace(target)
