"""Your corpus, embedded once, indexed and searched: what the fine-tuned model exists for.

    python corpus.py embed questions.txt --model out --out corpus           # one text a line
    python corpus.py embed docs.parquet --model BAAI/bge-small-en-v1.5 --out corpus   # id and text columns
    python corpus.py embed docs.jsonl --home fw --out corpus                # the home's served version: corpus/round-003
    python corpus.py search corpus "how do I learn python" -k 5
    python corpus.py search corpus --queries questions.txt --out hits.jsonl
    python corpus.py index corpus                                           # build the index again

The output folder (corpus_folder.py) holds the vectors in Parquet shards that DuckDB, LanceDB and the
vector databases' loaders read as they are, a manifest naming what made them, and an index
(corpus_search.py builds it and searches it). The job keeps four promises:

- Streaming: texts are read, embedded and written a shard at a time (--shard-size texts), sorted by
  length within the shard so that little padding is computed; memory is bounded by a shard, never by
  the corpus (the ids are kept only as 64-bit hashes, 16 bytes a text).
- Resumable: killed at any moment, the same command goes on where it stopped. Shards are written
  whole or not at all and a text is embedded only if no whole shard holds its id, so no text is ever
  embedded into the folder twice, and the shards come out as an uninterrupted run's.
- Incremental: run again over a grown corpus, it embeds only the new texts, and drops the rows whose
  id is gone or whose text changed (their shards are rewritten whole).
- One model a folder: the manifest names the model by its fingerprint (fingerprint.py), its pooling,
  prompt, width, dtype and normalisation; a run with anything else stops with one line. A home's
  corpus goes into a folder of its version's name, so the next promotion's re-embedding lands beside
  the old one, which stays until you remove it.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from embed_ft import corpus_folder, corpus_input, corpus_search, errors, fingerprint, paths
from embed_ft.errors import InputError
from embed_ft.int8 import quantised

SHARD_SIZE = 10_000
IDENTITY = ("fingerprint", "version", "pooling", "prompt", "width", "dtype", "normalize", "max_length")


# ------------------------------------------------------------------------------------------ the model

def open_model(model: str | None, home: Path | None, device: str = "auto") -> tuple[object, str, str | None]:
    """The model to embed with, its name as the user gave it, and the home's version (None without --home)."""
    if home is not None:
        from embed_ft.state import home_state
        from embed_ft.server.versions import load_pointer
        pointer = home_state.current_version(home)
        version = load_pointer(home, pointer, device)
        name = str(home / pointer["path"]) if pointer["path"] else json.loads((home / "flywheel.json").read_text())["base"]
        return version.model, name, version.id
    from embed_ft.model import load_model, pick_device
    return load_model(model).to(pick_device(device)).eval(), model, None


def identity(model, name: str, version: str | None, prompt: str, bf16: bool, int8: bool = False) -> dict:
    """Everything that made a vector: two folders' vectors compare only where all of it is equal."""
    return {"model": name, "fingerprint": fingerprint.of(model), "version": version, "pooling": model.layout.pooling,
            "prompt": prompt, "width": model.dim, "dtype": "int8" if int8 else "bf16" if bf16 else "fp32",
            "normalize": model.layout.normalize, "max_length": model.max_length}


def check_same_model(manifest: dict, made_by: dict, folder: Path) -> None:
    """Another model, prompt or dtype never mixes into a folder."""
    differs = [k for k in IDENTITY if manifest.get(k) != made_by.get(k)]
    if differs:
        k = differs[0]
        raise InputError(f"{folder} holds vectors of {manifest.get('model')} with {k} {manifest.get(k)!r}; this run's "
                         f"{k} is {made_by.get(k)!r}: embed into a new --out folder (or remove {folder})")


# ------------------------------------------------------------------------------------------ the job

def embed_corpus(source: Path, out: Path, model, name: str, version: str | None = None, home: Path | None = None,
                 shard_size: int = SHARD_SIZE, batch_size: int = 128, bf16: bool | None = None,
                 document_prompt: str | None = None, id_column: str | None = None, text_column: str | None = None,
                 build_index: bool = True, progress: bool | None = None, int8: bool = False) -> dict:
    """Embed every text of `source` not yet in `out` (a folder of the model's, see the module's
    docstring), drop what the source no longer holds, then build the index. Returns the manifest.
    `int8`: the encoder's Linear layers in 8-bit integers on a CPU (int8.py), the rest in float32."""
    from embed_ft.model import cpu_has_bf16
    if int8:
        bf16 = False
    elif bf16 is None:
        bf16 = model.device.type == "cuda" or cpu_has_bf16()
    prompt = model.layout.prompt_chosen("document", document_prompt)
    columns = {"id_column": id_column, "text_column": text_column}
    folder = out / version if version else out
    started = time.perf_counter()
    todo, number, dropped = plan(source, folder, identity(model, name, version, prompt, bf16, int8), columns)
    if int8:  # after the fingerprint, which names the weights as they were loaded
        model = quantised(model)
    cut, seconds = 0, 0.0
    show = progress if progress is not None else len(todo) > 0
    with tqdm(total=len(todo), unit="text", desc="embed", disable=not show, smoothing=0.1) as bar:
        for ids, texts in rows_of_shards(source, columns, todo, shard_size):
            tick = time.perf_counter()
            cut += embed_shard(model, ids, texts, corpus_folder.shard_path(folder, number), prompt, batch_size, bf16)
            seconds += time.perf_counter() - tick
            number += 1
            bar.update(len(texts))
    manifest = finish(folder, source, {"embedded": len(todo), "dropped": dropped, "cut_at_limit": cut,
                                       "texts_per_second": round(len(todo) / seconds, 1) if seconds else None,
                                       "seconds": round(time.perf_counter() - started, 1)})
    if build_index:
        manifest = corpus_search.index_corpus(folder)
    if home is not None:  # the home's servers keep this version while the corpus names it
        from embed_ft.state import home_state
        home_state.name_corpus(home, out, version)
    return manifest


def plan(source: Path, folder: Path, made_by: dict, columns: dict) -> tuple[np.ndarray, int, int]:
    """What is left to do: the source's rows (their line numbers) to embed, the first new shard's
    number, and how many stored rows were dropped. Nothing is written before the source is read
    whole and found sound."""
    # 1. The source's ids and texts as hashes; an id given two texts stops here.
    lines, id_hashes, text_hashes = scan(source, columns)
    manifest = corpus_folder.read_manifest(folder)
    if manifest is not None:
        check_same_model(manifest, made_by, folder)
    elif folder.is_dir() and any(p.suffix != ".tmp" for p in folder.iterdir()):  # a model's folder, a typo'd path
        raise InputError(f"{folder} holds files and no corpus manifest: give --out a new or empty folder")
    folder.mkdir(parents=True, exist_ok=True)
    corpus_folder.remove_leftovers(folder)
    corpus_folder.write_manifest(folder, (manifest or {"created": now()}) | made_by)
    # 2. What the folder already holds: rows whose id is gone from the source, or whose text changed, go.
    kept_ids, dropped = drop_stale(folder, id_hashes, text_hashes)
    # 3. What is left to embed: each id's first row, unless a shard holds it.
    first = first_occurrences(id_hashes)
    todo = lines[first & ~np.isin(id_hashes, kept_ids)]
    print(f"{source}: {int(first.sum()):,} texts; {len(kept_ids):,} already in {folder}, {len(todo):,} to embed"
          + (f", {dropped:,} dropped (gone from the source or changed)" if dropped else ""), file=sys.stderr)
    number = max([int(corpus_folder.SHARD.fullmatch(p.name).group(1)) for p in corpus_folder.shards(folder)] + [-1]) + 1
    return todo, number, dropped


def embed_shard(model, ids: list[str], texts: list[str], path: Path, prompt: str, batch_size: int, bf16: bool) -> int:
    """One shard's texts embedded and written whole; how many reached the model's token limit.
    `encode_ids` sorts the shard's texts by length, longest first, and packs each batch."""
    input_ids, skip = model.tokenize(texts, prompt=prompt)
    corpus_folder.write_shard(path, ids, texts, model.encode_ids(input_ids, batch_size, False, bf16, skip))
    return sum(len(ids) >= model.max_length for ids in input_ids)


def finish(folder: Path, source: Path, run: dict) -> dict:
    """The manifest's counts and this run's figures (its rate, its peak memory), once every shard is whole."""
    manifest = corpus_folder.read_manifest(folder)
    if run["cut_at_limit"]:
        print(f"note: {run['cut_at_limit']:,} text(s) reached the model's limit of {manifest['max_length']} tokens and "
              f"were cut there (as sentence-transformers cuts them)", file=sys.stderr)
    counts = [corpus_folder.count_rows(p) for p in corpus_folder.shards(folder)]
    run["peak_memory_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    manifest |= {"texts": sum(counts), "shards": len(counts), "updated": now(), "source": str(source), "last_run": run}
    corpus_folder.write_manifest(folder, manifest)
    return manifest


def scan(source: Path, columns: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every row's line number, id hash and text hash, in the source's order, read as a stream; an id
    with two texts is an error."""
    lines, id_hashes, text_hashes, ids, texts = [], [], [], [], []
    for row in corpus_input.rows(source, **columns):
        lines.append(row.line)
        ids.append(row.id)
        texts.append(row.text)
        if len(ids) == 65_536:
            id_hashes.append(corpus_input.hash64(ids))
            text_hashes.append(corpus_input.hash64(texts))
            ids, texts = [], []
    id_hashes.append(corpus_input.hash64(ids))
    text_hashes.append(corpus_input.hash64(texts))
    id_hashes, text_hashes = np.concatenate(id_hashes), np.concatenate(text_hashes)
    if not len(id_hashes):
        raise InputError(f"{source} holds no text")
    corpus_input.check_ids(source, id_hashes, text_hashes, **columns)
    return np.array(lines, np.int64), id_hashes, text_hashes


def first_occurrences(id_hashes: np.ndarray) -> np.ndarray:
    """True at each id's first row (the same text twice, or the same id and text twice, is one row)."""
    _, first = np.unique(id_hashes, return_index=True)
    mask = np.zeros(len(id_hashes), bool)
    mask[first] = True
    return mask


def drop_stale(folder: Path, id_hashes: np.ndarray, text_hashes: np.ndarray) -> tuple[np.ndarray, int]:
    """Rewrite each shard without the rows the source no longer holds as they are; the id hashes kept."""
    order = np.argsort(id_hashes, kind="stable")  # the source's ids sorted, each beside its text (one text an id)
    source_ids, source_texts = id_hashes[order], text_hashes[order]
    kept, dropped = [], 0
    for path in corpus_folder.shards(folder):
        table = corpus_folder.read_columns(path, ["id", "text"])
        ids, texts = corpus_input.hash64(table["id"]), corpus_input.hash64(table["text"])
        at = np.minimum(np.searchsorted(source_ids, ids), len(source_ids) - 1)
        keep = (source_ids[at] == ids) & (source_texts[at] == texts)
        if not keep.all():
            vectors = corpus_folder.read_vectors(path)[keep]
            if keep.any():
                corpus_folder.write_shard(path, [table["id"][i] for i in np.nonzero(keep)[0]],
                                          [table["text"][i] for i in np.nonzero(keep)[0]], vectors)
            else:
                path.unlink()
            dropped += int((~keep).sum())
        kept.append(ids[keep])
    return (np.concatenate(kept) if kept else np.zeros(0, np.uint64)), dropped


def rows_of_shards(source: Path, columns: dict, lines: np.ndarray, shard_size: int):
    """The rows at `lines` (sorted), read from the source again, `shard_size` at a time: (ids, texts)."""
    ids, texts = [], []
    wanted = iter(lines.tolist())
    next_line = next(wanted, None)
    for row in corpus_input.rows(source, **columns, start_line=int(lines[0]) if len(lines) else 1):
        if next_line is None:
            break
        if row.line == next_line:
            ids.append(row.id)
            texts.append(row.text)
            next_line = next(wanted, None)
            if len(ids) == shard_size:
                yield ids, texts
                ids, texts = [], []
    if ids:
        yield ids, texts


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


# ------------------------------------------------------------------------------------------ command line

def main(argv: list[str] | None = None) -> None:
    """`corpus.py embed|index|search ...`: each command parses its own options."""
    argv = sys.argv[1:] if argv is None else argv
    commands = {"embed": embed_main, "index": corpus_search.index_main, "search": corpus_search.search_main}
    if not argv or argv[0] not in commands:
        raise InputError(f"use: python corpus.py {{{','.join(commands)}}} ... (--help after the command for its options)")
    commands[argv[0]](argv[1:])


def embed_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="corpus.py embed", description="Embed a corpus file into a folder of "
                                     "Parquet shards, and index it.")
    parser.add_argument("texts", metavar="FILE", help=".txt (one text a line), or .csv/.tsv/.jsonl/.parquet with a text column")
    parser.add_argument("--out", required=True, metavar="OUTDIR", help="the corpus folder (a home's: one folder a version inside)")
    who = parser.add_mutually_exclusive_group(required=True)
    who.add_argument("--model", metavar="MODEL", help="a model folder or a hub name")
    who.add_argument("--home", metavar="DIR", help="a flywheel home: its served version")
    parser.add_argument("--id-column")
    parser.add_argument("--text-column")
    parser.add_argument("--document-prompt", help="a prompt name of the model's, or none (default: the model's "
                        "prompt for documents: one named document, passage or corpus)")
    parser.add_argument("--shard-size", type=int, default=SHARD_SIZE, help="texts a shard: what memory holds at once")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--dtype", choices=["auto", "bf16", "fp32", "int8"], default="auto",
                        help="auto: bf16 on a GPU and on CPUs with bf16 units, else fp32; int8: faster on a CPU "
                             "with AVX512-VNNI or AMX (measured there only), its vectors a little moved (int8.py)")
    parser.add_argument("--no-index", action="store_true", help="only the shards; build the index later (corpus.py index)")
    parser.add_argument("--device", default="auto")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    if args.shard_size < 1 or args.batch_size < 1:
        raise InputError("--shard-size and --batch-size must be at least 1")
    model, name, version = open_model(args.model, Path(args.home) if args.home else None, args.device)
    manifest = embed_corpus(Path(args.texts), Path(args.out), model, name, version, Path(args.home) if args.home else None,
                            args.shard_size, args.batch_size,
                            None if args.dtype == "auto" else args.dtype == "bf16", args.document_prompt,
                            args.id_column, args.text_column, not args.no_index, int8=args.dtype == "int8")
    run = manifest["last_run"]
    print(f"{manifest['texts']:,} texts in {Path(args.out) / (version or '')}: {run['embedded']:,} embedded at "
          f"{run['texts_per_second'] or 0:,} texts/s, peak memory {run['peak_memory_mib']:,} MiB")


if __name__ == "__main__":
    errors.run(main)
