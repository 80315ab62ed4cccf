"""Semantic de-duplication of a corpus: groups of texts that mean the same thing, each with the one to keep.

    python dedup.py corpus --out dups                          # a corpus folder (corpus.py embed)
    python dedup.py questions.txt --model out --out dups       # a file, embedded first by the same job (into dups/corpus)
    python dedup.py test.tsv.gz --model out --out dups         # a pairs file's distinct texts, checked against its labels

Two texts are near-duplicates when the cosine of their embeddings is above the threshold: the one
train.py tuned on validation and saved with the model, or --threshold, or the one with the best
accuracy on labelled pairs of your own (--tune-on PAIRS). A published model has no threshold of its
own, and a guessed one decides everything.

Groups do not chain. Each text's neighbours above the threshold come from the corpus's index (its
nearest NEIGHBOURS, more where all of those are above it), never from all n^2 pairs. Then, as
sentence-transformers' `community_detection` and SemDeDup (Abbas et al. 2023) do, the text with the
most neighbours is kept first and takes its neighbours not yet in a group, then the next, and so on:
every member of a group is within the threshold of its kept text. Connected components would join A
to Z through A~B~C~...~Z, and at a million texts they do.

DIR/groups.jsonl   one group a line, largest first: {"kept": {id, text}, "members": [{id, text, score}]}
DIR/remove.txt     the ids to remove (every member; the kept text stays), one a line
DIR/summary.json   the threshold, the counts, the times, and with a pairs file the check against its labels

Given a pairs file (or --labels PAIRS), its labelled pairs measure the groups: of the labelled pairs
that fall in one group, the share that are duplicates (precision), and of the labelled duplicates, the
share in one group (recall), beside the same for the exact pairwise decision (cosine above the
threshold) on the same pairs.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embed_ft import corpus, corpus_folder, corpus_input, corpus_search, data, errors, evaluate, paths, vector_index
from embed_ft.errors import InputError

NEIGHBOURS = 32          # nearest texts asked of the index for each text, at first
MOST_NEIGHBOURS = 1024   # a text whose every neighbour asked is a near-duplicate is asked again, up to this many


# ------------------------------------------------------------------------------------------ neighbours

def near_duplicates(index, vectors: np.ndarray, threshold: float, batch: int = 4096,
                    progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every (text, neighbour, cosine) with the cosine above the threshold, a text never its own neighbour."""
    left, right, score = [], [], []
    for start in tqdm(range(0, len(vectors), batch), desc="neighbours", unit="batch", disable=not progress):
        rows = np.arange(start, min(start + batch, len(vectors)))
        k = NEIGHBOURS
        while len(rows):
            scores, found = vector_index.search(index, vectors[rows], min(k + 1, len(vectors)))
            full = (scores[:, -1] > threshold) & (k < MOST_NEIGHBOURS) & (found.shape[1] < len(vectors))
            done = ~full
            keep = (scores[done] > threshold) & (found[done] != rows[done, None]) & (found[done] >= 0)
            left.append(np.broadcast_to(rows[done, None], keep.shape)[keep])
            right.append(found[done][keep])
            score.append(scores[done][keep])
            rows, k = rows[full], k * 4
    concat = lambda parts, dtype: np.concatenate(parts).astype(dtype) if parts else np.zeros(0, dtype)
    return concat(left, np.int64), concat(right, np.int64), concat(score, np.float32)


def groups(n: int, left: np.ndarray, right: np.ndarray, score: np.ndarray) -> list[tuple[int, list[tuple[int, float]]]]:
    """(kept, [(member, cosine to kept)]) for each group, largest first: texts with the most
    neighbours are kept first, each taking its neighbours that no group holds yet."""
    order = np.argsort(left, kind="stable")
    left, right, score = left[order], right[order], score[order]
    starts = np.searchsorted(left, np.arange(n + 1))
    counts = np.diff(starts)
    taken = np.zeros(n, bool)
    found = []
    for i in np.argsort(-counts, kind="stable"):
        if counts[i] == 0:
            break
        if taken[i]:
            continue
        neighbours, cosines = right[starts[i]:starts[i + 1]], score[starts[i]:starts[i + 1]]
        free = ~taken[neighbours]
        if free.any():
            taken[i] = True
            taken[neighbours[free]] = True
            found.append((int(i), sorted(zip(neighbours[free].tolist(), cosines[free].tolist()), key=lambda m: -m[1])))
    return sorted(found, key=lambda g: -len(g[1]))


# ------------------------------------------------------------------------------------------ checks

def check_against_labels(group_of: np.ndarray, row_of: dict[str, int], vectors: np.ndarray, threshold: float,
                         pairs: list[data.Pair]) -> dict:
    """Precision and recall of "in one group" on the labelled pairs, beside the exact pairwise decision."""
    known = [(row_of[a], row_of[b], y) for a, b, y in pairs if a in row_of and b in row_of and a != b]
    if not known:
        return {"labelled_pairs": 0}
    a, b, y = (np.array(column) for column in zip(*known))
    grouped = (group_of[a] >= 0) & (group_of[a] == group_of[b])
    pairwise = np.einsum("ij,ij->i", vectors[a], vectors[b]) > threshold
    def rates(decided):
        return {"found": int(decided.sum()), "precision": float(y[decided].mean()) if decided.any() else None,
                "recall": float(decided[y == 1].mean()) if (y == 1).any() else None}
    return {"labelled_pairs": len(known), "labelled_duplicates": int(y.sum()),
            "groups": rates(grouped), "pairwise": rates(pairwise)}


def threshold_for(given: float | None, model, tune_on: str | None) -> float:
    """--threshold, else the best accuracy on --tune-on's labelled pairs, else the model's own."""
    if given is not None:
        return given
    if tune_on:
        from embed_ft import evaluate
        pairs = data.load_pairs(tune_on)
        evaluate.check_both_classes(pairs, "--tune-on")
        return evaluate.best_threshold(evaluate.cosine_scores(model, pairs), evaluate.labels_of(pairs))
    if model.decision.get("threshold") is None:
        raise InputError("the model has no threshold of its own (a published model, not one saved by train.py): pass "
                         "--threshold T, or --tune-on PAIRS (labelled pairs of yours: the best accuracy on them)")
    return float(model.decision["threshold"])


# ------------------------------------------------------------------------------------------ command line

def corpus_from(source: Path, out: Path, args) -> tuple[Path, list[data.Pair]]:
    """The corpus folder to de-duplicate, embedding a file first; and a pairs file's labelled pairs."""
    if (source / corpus_folder.MANIFEST).is_file():
        return source, []
    if source.is_dir():
        raise InputError(f"{source} is a folder but not a corpus folder (no {corpus_folder.MANIFEST}): give a corpus "
                         f"folder (corpus.py embed), a corpus file or a pairs file")
    if args.model is None:
        raise InputError(f"{source} is a file, not a corpus folder: give --model to embed it")
    pairs = []
    try:
        corpus_input.pick(corpus_input.header(source), args.id_column, args.text_column, source)
    except InputError:  # no text column: a pairs file's distinct texts, its labels kept
        pairs = data.load_pairs(str(source), data.parse_columns(args.columns))
        texts = list(dict.fromkeys(t for a, b, _ in pairs for t in (a, b)))
        source = out / "texts.txt"
        source.write_text("".join(t.replace("\n", " ") + "\n" for t in texts))
    from embed_ft.model import load_model, pick_device
    model = load_model(args.model).to(pick_device(args.device)).eval()
    # every text takes the model's default prompt: the one its threshold was tuned with
    corpus.embed_corpus(source, out / "corpus", model, args.model, id_column=args.id_column, text_column=args.text_column,
                        batch_size=args.batch_size, document_prompt=model.layout.default_prompt_name or "none")
    return out / "corpus", pairs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", metavar="PAIRS", help="a corpus folder, a corpus file (.txt, or a table with a text "
                        "column), or a pairs file (its distinct texts, checked against its labels)")
    parser.add_argument("--out", required=True, metavar="OUTDIR", help="groups.jsonl, remove.txt and summary.json go here")
    parser.add_argument("--model", metavar="MODEL", help="the model to embed a file with (a corpus folder names its own)")
    parser.add_argument("--threshold", type=float, help="cosine above which two texts are duplicates "
                        "(default: the model's stored threshold)")
    parser.add_argument("--tune-on", metavar="DATA", help="labelled pairs to choose the threshold on (best accuracy)")
    parser.add_argument("--labels", metavar="DATA", action="append", default=[],
                        help="labelled pairs to check the groups against (repeat for several files)")
    parser.add_argument("--columns", help="TEXT1,TEXT2,LABEL column names of a pairs file, if not recognised")
    parser.add_argument("--id-column")
    parser.add_argument("--text-column")
    parser.add_argument("--overwrite", action="store_true", help="replace the groups of an earlier run in --out")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="auto")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    out = Path(args.out)
    if (out / "groups.jsonl").exists() and not args.overwrite:
        raise InputError(f"{out} already holds groups.jsonl: pass --overwrite to replace it, or another --out")
    out.mkdir(parents=True, exist_ok=True)
    folder, pairs = corpus_from(Path(args.source), out, args)
    manifest = corpus_folder.read_manifest(folder)
    from embed_ft.model import load_model, pick_device
    model = load_model(manifest["model"]).to(pick_device(args.device)).eval()
    threshold = threshold_for(args.threshold, model, args.tune_on)
    if manifest["prompt"] != model.layout.prompt_for("default") and args.threshold is None:
        print(f"note: {folder} was embedded with the prompt {manifest['prompt']!r}, and the threshold was tuned with "
              f"{model.layout.prompt_for('default')!r}: pass --threshold, or embed it with --document-prompt "
              f"{model.layout.default_prompt_name or 'none'}", file=sys.stderr)
    checks = {args.source: pairs} if pairs else {}
    checks |= {path: data.load_pairs(path, data.parse_columns(args.columns)) for path in args.labels}

    started = time.perf_counter()
    vectors = evaluate.unit_rows(corpus_folder.all_vectors(folder))
    if not (folder / corpus_folder.INDEX).is_file():
        corpus_search.index_corpus(folder)
    index = vector_index.load(folder / corpus_folder.INDEX)
    left, right, score = near_duplicates(index, vectors, threshold, progress=True)
    found = groups(len(vectors), left, right, score)
    seconds = time.perf_counter() - started
    write_groups(out, folder, found)

    group_of = np.full(len(vectors), -1)
    for number, (kept, members) in enumerate(found):
        group_of[[kept] + [m for m, _ in members]] = number
    summary = {"corpus": str(folder), "model": manifest["model"], "version": manifest.get("version"),
               "threshold": threshold, "texts": len(vectors), "near_duplicate_pairs": len(left), "groups": len(found),
               "texts_in_groups": int((group_of >= 0).sum()), "to_remove": sum(len(m) for _, m in found),
               "largest_group": 1 + len(found[0][1]) if found else 0, "seconds": round(seconds, 1),
               "index": manifest.get("index", {}).get("kind")}
    if checks:
        row_of = {t: i for i, t in enumerate(corpus_folder.read_column(folder, "text"))}
        summary["labels"] = {path: check_against_labels(group_of, row_of, vectors, threshold, labelled)
                             for path, labelled in checks.items()}
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(describe(summary, out))


def write_groups(out: Path, folder: Path, found: list) -> None:
    """groups.jsonl and remove.txt, each written whole (a temporary name, then renamed)."""
    rows = corpus_folder.rows_of(folder, np.array([r for kept, members in found for r in [kept] + [m for m, _ in members]]))
    lines, remove, at = [], [], 0
    for kept, members in found:
        mine, at = rows[at:at + 1 + len(members)], at + 1 + len(members)
        lines.append(json.dumps({"size": 1 + len(members), "kept": mine[0],
                                 "members": [{**row, "score": round(s, 4)} for row, (_, s) in zip(mine[1:], members)]},
                                ensure_ascii=False))
        remove += [row["id"] for row in mine[1:]]
    corpus_folder.write_whole(out / "groups.jsonl", lambda t: t.write_text("".join(line + "\n" for line in lines)))
    corpus_folder.write_whole(out / "remove.txt", lambda t: t.write_text("".join(i + "\n" for i in remove)))


def describe(summary: dict, out: Path) -> str:
    text = (f"{summary['texts']:,} texts, threshold {summary['threshold']:.4f}: {summary['groups']:,} groups holding "
            f"{summary['texts_in_groups']:,} texts (largest {summary['largest_group']}), {summary['to_remove']:,} ids to "
            f"remove, in {summary['seconds']:.1f} s; written to {out.resolve()}")
    show = lambda r: (f"precision {r['precision']:.2%}" if r["precision"] is not None else "precision -") + \
        (f", recall {r['recall']:.2%}" if r["recall"] is not None else "")
    for path, labels in summary.get("labels", {}).items():
        if labels.get("labelled_pairs"):
            text += (f"\nagainst {labels['labelled_pairs']:,} labelled pairs of {path} ({labels['labelled_duplicates']:,} "
                     f"duplicates): groups {show(labels['groups'])}; exact pairwise decisions {show(labels['pairwise'])}")
    return text


if __name__ == "__main__":
    errors.run(main)
