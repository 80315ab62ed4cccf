"""Threshold-tuned duplicate classification: is this embedding model any good on these pairs?

Each pair is scored by the cosine of its two embeddings. The threshold that maximises accuracy on
the validation pairs (optionally under a floor on recall or precision) is then applied, unchanged,
to the test pairs, so the test numbers are honest. `--retrieval` asks the other question: does each
text find its duplicates among all the texts of the split?

    python evaluate.py --model out --val val.tsv.gz --test test.tsv.gz
    python evaluate.py --model openai:text-embedding-3-small --dimensions 256 --val ... --test ...
    python evaluate.py --model out --val val.tsv.gz --test test.tsv.gz --retrieval
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Protocol

import numpy as np

from embed_ft import errors, data, paired, paths
from embed_ft.errors import InputError
from embed_ft.sources import OPENAI, model_kind


class Encoder(Protocol):
    def encode(self, texts: list[str], batch_size: int = ...) -> np.ndarray: ...


class Truncated:
    """The first `dim` coordinates of another encoder's embeddings, re-normalised: how a Matryoshka
    model serves a smaller width."""

    def __init__(self, encoder: Encoder, dim: int):
        self.encoder, self.dim = encoder, dim

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        vectors = self.encoder.encode(texts, batch_size=batch_size)[:, : self.dim]
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)


class Role:
    """A model's texts in one role, "query" or "document": each takes the prompt the model names for
    that role (model.Embedder.encode)."""

    def __init__(self, model, role: str):
        self.model, self.role = model, role

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        return self.model.encode(texts, batch_size, role=self.role)


def in_role(encoder: Encoder, role: str) -> Encoder:
    """The encoder for texts in a retrieval role: the same one unless the model names a prompt for
    that role apart from its default (e5's "query: ", bge's query instruction)."""
    model = encoder.encoder if isinstance(encoder, Remembered) else encoder
    layout = getattr(model, "layout", None)  # an open model's published layout; none for openai:
    if layout is None or layout.prompt_for(role) == layout.prompt_for():
        return encoder
    return Remembered(Role(model, role))


def unit_rows(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length, so that dot products are cosines: a model published without a
    Normalize module gives rows of any length. Rows already unit length are returned as they are."""
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors if np.allclose(norms, 1.0, atol=1e-4) else vectors / np.maximum(norms, 1e-12)


# ------------------------------------------------------------------------------------------ metrics

def cosine_scores(encoder: Encoder, pairs: list[data.Pair], batch_size: int = 128) -> np.ndarray:
    """The cosine similarity of each pair."""
    # Every text, pair by pair (a1, b1, a2, b2, ...); the encoders embed each distinct text once.
    vectors = unit_rows(encoder.encode([t for a, b, _ in pairs for t in (a, b)], batch_size=batch_size))
    return (vectors[0::2] * vectors[1::2]).sum(1)


def _cuts(scores: np.ndarray, labels: np.ndarray):
    """Scores sorted high to low, and the true/false positives when predicting 'duplicate' for the
    top k+1 scores, at each k where the score changes (ties are never split)."""
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], labels[order]
    k = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tp = np.cumsum(y)[k]
    return s, k, tp, (k + 1) - tp


def best_threshold(scores: np.ndarray, labels: np.ndarray, min_recall: float = 0.0,
                   min_precision: float = 0.0) -> float:
    """The threshold (predict duplicate when score > threshold) with the highest accuracy among those
    whose recall and precision reach the given floors (a satisficing metric); the midpoint between
    two neighbouring scores, so it does not sit on a validation score."""
    s, k, tp, fp = _cuts(scores, labels)
    accuracy = np.r_[(labels == 0).sum(), tp + (labels == 0).sum() - fp] / len(labels)
    recall = np.r_[0.0, tp / max(1, labels.sum())]
    precision = np.r_[1.0, tp / (tp + fp)]        # predicting none makes no false claim
    allowed = (recall >= min_recall) & (precision >= min_precision)
    if not allowed.any():
        raise InputError(f"no threshold reaches recall >= {min_recall} and precision >= {min_precision} on validation")
    best = int(np.argmax(np.where(allowed, accuracy, -1.0))) - 1   # -1: predict no duplicates at all
    if best < 0:
        return float(s[0]) + 1e-6
    i = k[best]
    return float((s[i] + s[i + 1]) / 2) if i + 1 < len(s) else float(s[i]) - 1e-6


def average_precision(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Area under the precision-recall curve as a step sum: sum over thresholds of dRecall * precision."""
    if labels.sum() == 0:
        return None
    _, _, tp, fp = _cuts(scores, labels)
    recall = tp / labels.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * tp / (tp + fp)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float | None:
    """Probability that a random duplicate outscores a random non-duplicate (ties count half)."""
    n_pos, n_neg = int(labels.sum()), int((labels == 0).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    _, group, counts = np.unique(scores, return_inverse=True, return_counts=True)
    ranks = (np.cumsum(counts) - (counts - 1) / 2)[group]  # 1-based; tied scores share their average rank
    rank_sum = ranks[labels == 1].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def classification_metrics(scores: np.ndarray, labels: np.ndarray, threshold: float) -> dict:
    predicted = scores > threshold
    tp = int(np.sum(predicted & (labels == 1)))
    fp = int(np.sum(predicted & (labels == 0)))
    fn = int(np.sum(~predicted & (labels == 1)))
    accuracy = float(np.mean(predicted == (labels == 1)))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"error_rate": 1 - accuracy, "accuracy": accuracy, "precision": precision, "recall": recall,
            "f1": f1, "average_precision": average_precision(scores, labels),
            "roc_auc": roc_auc(scores, labels), "threshold": threshold, "n_pairs": len(labels)}


def correct(encoder: Encoder, pairs: list[data.Pair], threshold: float, batch_size: int = 128) -> np.ndarray:
    """True where the decision at `threshold` matches a pair's label: what a paired test compares."""
    return (cosine_scores(encoder, pairs, batch_size) > threshold) == (labels_of(pairs) == 1)


def labels_of(pairs: list[data.Pair]) -> np.ndarray:
    return np.array([y for _, _, y in pairs])


def check_both_classes(pairs: list[data.Pair], name: str) -> None:
    """A tuned threshold (and an error rate on one class) means nothing without both kinds of pair."""
    positives = sum(y for _, _, y in pairs)
    if positives in (0, len(pairs)):
        kind = "duplicates" if positives else "non-duplicates"
        raise InputError(f"{name}: all {len(pairs)} pairs are {kind}; a tuned threshold means nothing on a single "
                         "class: give pairs of both kinds")


def evaluate(encoder: Encoder, val: list[data.Pair], test: list[data.Pair] | None = None,
             batch_size: int = 128, min_recall: float = 0.0, min_precision: float = 0.0) -> dict:
    """{"val": metrics, "test": metrics}, the threshold tuned on val (so val numbers are optimistic)."""
    test_scores = cosine_scores(encoder, test, batch_size) if test is not None else None
    return evaluate_scores(cosine_scores(encoder, val, batch_size), labels_of(val), test_scores,
                           labels_of(test) if test is not None else None, min_recall, min_precision)


def evaluate_scores(val_scores: np.ndarray, val_labels: np.ndarray, test_scores: np.ndarray | None = None,
                    test_labels: np.ndarray | None = None, min_recall: float = 0.0, min_precision: float = 0.0) -> dict:
    """`evaluate` from scores already computed; the constraint on the threshold is recorded."""
    threshold = best_threshold(val_scores, val_labels, min_recall, min_precision)
    constraint = {k: v for k, v in [("min_recall", min_recall), ("min_precision", min_precision)] if v} or None
    result = {"val": classification_metrics(val_scores, val_labels, threshold) | {"constraint": constraint}}
    if test_scores is not None:
        result["test"] = classification_metrics(test_scores, test_labels, threshold) | {"constraint": constraint}
    return result


# ------------------------------------------------------------------------------------ retrieval view

def retrieval_metrics(encoder: Encoder, pairs: list[data.Pair], ks: tuple[int, ...] = (1, 5, 10),
                      batch_size: int = 128, chunk: int = 1024, per_query: bool = False) -> dict:
    """Each text that has a duplicate searches every other distinct text of the split.

    Relevant: the other members of its duplicate cluster (duplicates are transitive). recall@k is the
    share of them in the top k, MRR the mean of 1 / the rank of the first one, both averaged over
    queries and computed exactly, chunk by chunk of queries, so memory stays chunk x corpus. Queries
    and the corpus each take the model's prompt for their role, where it names them (`in_role`).
    `per_query` adds each query's reciprocal rank, in a fixed query order (for paired tests).
    """
    corpus = list(dict.fromkeys(data.normalise(t) for a, b, _ in pairs for t in (a, b)))
    spelling = {}
    for a, b, _ in pairs:
        for t in (a, b):
            spelling.setdefault(data.normalise(t), t)
    index = {t: i for i, t in enumerate(corpus)}
    relevant = {}
    for cluster in data.duplicate_clusters(pairs):
        members = [index[data.normalise(t)] for t in cluster]
        for m in members:
            relevant[m] = [x for x in members if x != m]
    vectors = unit_rows(in_role(encoder, "document").encode([spelling[t] for t in corpus], batch_size=batch_size))
    queries = np.array(sorted(relevant), dtype=np.int64)
    asking = in_role(encoder, "query")
    query_vectors = vectors if asking is encoder else unit_rows(asking.encode([spelling[corpus[q]] for q in queries],
                                                                              batch_size=batch_size))
    recall, reciprocal = {k: 0.0 for k in ks}, []
    for start in range(0, len(queries), chunk):
        rows = queries[start:start + chunk]
        scores = (vectors[rows] if asking is encoder else query_vectors[start:start + chunk]) @ vectors.T
        scores[np.arange(len(rows)), rows] = -np.inf               # a text does not retrieve itself
        deepest = min(max(ks), len(corpus) - 1)                       # a tiny corpus has fewer than k others
        top = np.argpartition(-scores, deepest - 1, axis=1)[:, :deepest]   # the k best, unordered ...
        top = np.take_along_axis(top, np.argsort(-np.take_along_axis(scores, top, 1), axis=1), 1)  # ... ordered
        for r, q in enumerate(rows):
            wanted = relevant[q]
            for k in ks:
                recall[k] += np.isin(top[r, :k], wanted).sum() / len(wanted)
            best = scores[r, wanted].max()                          # rank of the first relevant text
            reciprocal.append(1.0 / (1 + np.sum(scores[r] > best)))
    n = max(1, len(queries))
    result = {**{f"recall@{k}": recall[k] / n for k in ks}, "mrr": sum(reciprocal) / n,
              "queries": len(queries), "corpus": len(corpus)}
    return result | ({"reciprocal_ranks": [float(x) for x in reciprocal]} if per_query else {})


class Remembered:
    """An encoder that embeds each text once, however many evaluations ask: both views of a split
    (pairs and retrieval) then cost one pass over its texts. `vectors` seeds it with texts already
    embedded by the same model."""

    def __init__(self, encoder: Encoder, vectors: dict | None = None):
        self.encoder, self.vectors = encoder, dict(vectors or {})

    def encode(self, texts: list[str], batch_size: int = 128) -> np.ndarray:
        new = [t for t in dict.fromkeys(texts) if t not in self.vectors]
        if new:
            self.vectors.update(zip(new, self.encoder.encode(new, batch_size=batch_size)))
        return np.stack([self.vectors[t] for t in texts])


def both_views(encoder: Encoder, val: list[data.Pair], test: list[data.Pair], batch_size: int = 128,
               min_recall: float = 0.0, min_precision: float = 0.0) -> dict:
    """`evaluate` (pairs, at the threshold tuned on val), plus "retrieval": the retrieval view of
    val and test. Each text is embedded once."""
    remembered = encoder if isinstance(encoder, Remembered) else Remembered(encoder)
    result = evaluate(remembered, val, test, batch_size, min_recall, min_precision)
    return result | {"retrieval": {split: retrieval_metrics(remembered, pairs, batch_size=batch_size)
                                   for split, pairs in [("val", val), ("test", test)]}}


# ------------------------------------------------------------------------- what --model names

def open_encoder(model: str, dimensions: int | None = None, base_url: str | None = None,
                 cache_path: str | None = None, device: str = "auto", prompt_name: str = "", prompt: str = "") -> Encoder:
    """Any encoder a command evaluates: `openai:MODEL` for the API baseline, else `model.load_model`
    (a sentence-transformers folder, a run's output, whole; or a pretrained model as published),
    with the prompt chosen. `dimensions` truncates (Matryoshka) either."""
    if model_kind(model) == "openai":
        from embed_ft.openai_embeddings import OpenAIEmbedder
        extra = {"cache_path": cache_path} if cache_path else {}
        return OpenAIEmbedder(model.removeprefix(OPENAI), dimensions, base_url, **extra)
    from embed_ft.model import load_model, pick_device
    encoder = load_model(model).to(pick_device(device))
    encoder.choose_prompt(prompt_name, prompt)
    return Truncated(encoder, dimensions) if dimensions else encoder


def batch_size_for(model: str, batch_size: int | None) -> int:
    """Texts per forward pass, or per request for openai: models, unless given."""
    from embed_ft.openai_embeddings import BATCH_SIZE
    return batch_size or (BATCH_SIZE if model_kind(model) == "openai" else 128)


# ------------------------------------------------------------------------------------ command line

def format_table(results: dict[str, dict]) -> str:
    """One row per (model, split): the numbers a reader compares first. Names are never cut."""
    width = max([5] + [len(name) for name in results])
    lines = [f"{'model':{width}} {'split':5} {'error':>7} {'95% interval':>15} {'F1':>6} {'AP':>6} {'AUC':>6} "
             f"{'thresh':>7} {'pairs':>6} {'groups':>6}"]
    for name, result in results.items():
        for split, m in result.items():
            ap, auc = (f"{m[k]:.3f}" if m[k] is not None else "-" for k in ("average_precision", "roc_auc"))
            low, high = m.get("interval") or paired.wilson_interval(round(m["error_rate"] * m["n_pairs"]), m["n_pairs"])
            lines.append(f"{name:{width}} {split:5} {m['error_rate']:7.2%} {f'[{low:.1%}, {high:.1%}]':>15} "
                         f"{m['f1']:6.3f} {ap:>6} {auc:>6} {m['threshold']:7.3f} {m['n_pairs']:6d} {m.get('groups', '-'):>6}")
    return "\n".join(lines)


def format_retrieval(results: dict[str, dict]) -> str:
    width = max([5] + [len(name) for name in results])
    first = next(iter(next(iter(results.values())).values()))
    keys = [k for k in first if k.startswith("recall@")] + ["mrr"]
    lines = [f"{'model':{width}} {'split':5} " + " ".join(f"{k:>9}" for k in keys) + f" {'queries':>8} {'corpus':>7}"]
    for name, result in results.items():
        for split, m in result.items():
            lines.append(f"{name:{width}} {split:5} " + " ".join(f"{m[k]:9.4f}" for k in keys)
                         + f" {m['queries']:8d} {m['corpus']:7d}")
    return "\n".join(lines)


def compare_models(models: list[str], val: list[data.Pair], test: list[data.Pair], args) -> tuple[dict, list[dict]]:
    """Each model on the same pairs, at its own threshold (or on the same queries, --retrieval);
    then a paired test of each against the first. Pairs that share texts are counted by groups
    (paired.groups_of) in the intervals and the tests."""
    results, views = {}, {}
    groups = {"val": paired.groups_of(val), "test": paired.groups_of(test)}
    for name in models:
        encoder = Remembered(open_encoder(name, args.dimensions, args.base_url, args.cache, args.device,
                                          args.prompt_name, args.prompt))
        batch_size = batch_size_for(name, args.batch_size)
        if args.retrieval:
            results[name] = {split: retrieval_metrics(encoder, pairs, batch_size=batch_size, per_query=split == "test")
                             for split, pairs in [("val", val), ("test", test)]}
            views[name] = results[name]["test"].pop("reciprocal_ranks")
        else:
            results[name] = evaluate(encoder, val, test, batch_size, args.min_recall, args.min_precision)
            for split, pairs in [("val", val), ("test", test)]:
                right = correct(encoder, pairs, results[name]["val"]["threshold"], batch_size)
                results[name][split] |= {"groups": len(np.unique(groups[split])),
                                         "interval": paired.error_interval(~right, groups[split])}
            views[name] = right
    first = models[0]
    compare = paired.compare_queries if args.retrieval else lambda a, b: paired.compare_pairs(a, b, groups=groups["test"])
    tests = [{"model": name, "against": first, **compare(views[name], views[first])} for name in models[1:]]
    return results, tests


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, action="append", metavar="MODEL", help="a folder written by train.py (or any "
                        "sentence-transformers folder), a hub name or local model folder (as published), or "
                        "openai:MODEL; repeat it to compare models on the same pairs, each against the first")
    parser.add_argument("--val", required=True, metavar="FILE", help="validation pairs (the threshold is tuned here)")
    parser.add_argument("--test", required=True, metavar="FILE", help="test pairs")
    parser.add_argument("--columns", help="TEXT1,TEXT2,LABEL column names if not recognised")
    parser.add_argument("--eval-size", type=int, default=0, help="evaluate on this many val and test pairs (seed 0, "
                        "as train.py); 0 = all")
    parser.add_argument("--dimensions", type=int, help="use the first N dimensions (openai: v3 shortening; ours: "
                        "a Matryoshka-trained model)")
    parser.add_argument("--min-recall", type=float, default=0.0, help="tune the threshold under this recall floor")
    parser.add_argument("--min-precision", type=float, default=0.0, help="... and/or this precision floor")
    parser.add_argument("--retrieval", action="store_true", help="report recall@1/5/10 and MRR instead")
    parser.add_argument("--prompt-name", default="", help="open models: one of the model's prompts for every text "
                        "(default: its default_prompt_name; --retrieval: its query and document prompts)")
    parser.add_argument("--prompt", default="", help="open models: a prompt of your own before every text")
    parser.add_argument("--base-url", help="openai: any OpenAI-compatible server (else OPENAI_BASE_URL)")
    parser.add_argument("--cache", metavar="OUT", help="openai: the embedding cache file")
    parser.add_argument("--batch-size", type=int, help="texts per forward pass, 128 (openai: per request, 512)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--json", metavar="OUT", help="also write the metrics (and the paired tests) to this file")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    if args.batch_size is not None and args.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1 (got {args.batch_size})")
    if args.eval_size < 0:
        raise InputError(f"--eval-size must be at least 0 (got {args.eval_size})")
    columns = data.parse_columns(args.columns)
    val, test = data.load_pairs(args.val, columns), data.load_pairs(args.test, columns)
    if args.eval_size:
        val, test = (data.subsample(p, min(args.eval_size, len(p)), seed=0) for p in (val, test))
    if not args.retrieval:
        check_both_classes(val, args.val)
        check_both_classes(test, args.test)
    results, tests = compare_models(args.model, val, test, args)
    print(format_retrieval(results) if args.retrieval else format_table(results))
    for t in tests:
        print("paired: " + paired.describe(t, t["model"], t["against"]))
    if args.json:
        one = results[args.model[0]] if len(args.model) == 1 else {"models": results, "paired": tests}
        Path(args.json).write_text(json.dumps(one, indent=2) + "\n")


if __name__ == "__main__":
    errors.run(main)
