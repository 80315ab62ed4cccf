"""The corpus job past one machine: the shards of `corpus.py embed` mapped over GPU containers on Modal.

    modal volume put embed-ft-corpus docs.parquet /sources/docs.parquet     # the corpus, once (Parquet is best)
    modal run corpus_modal.py --source /data/sources/docs.parquet --model BAAI/bge-small-en-v1.5 --out /data/corpora/docs
    modal volume get embed-ft-corpus /corpora/docs ./docs                    # shards, manifest and index

Three steps, each the local job's own functions (corpus.py), so that the folder it writes is the one
`corpus.py embed` would write, shard for shard:

1. `plan` (one CPU container): reads the source as the local job does, checks it, drops what is gone
   from the folder, and returns each shard still to embed: its number and its rows' line numbers.
   A rerun plans only what no whole shard holds, so the shards a killed run finished are skipped.
2. `embed_part` (a GPU container a shard, mapped as sweep.py maps its grid, at most
   --max-containers at once): reads its rows (a Parquet source's earlier row groups are skipped),
   embeds them and writes the shard whole to the Volume, then commits. A retried input whose shard
   is already whole does nothing.
3. `finish` (one CPU container): the manifest's counts, then the index over every shard.

The driver holds nothing but the plan: every vector goes to the Volume as it is made. Modal's own
Wikipedia example keeps every result in the driver's memory and cannot resume; docs/corpus.md
prices 10^7 texts here beside it.
"""
from __future__ import annotations

import functools
from pathlib import Path

import modal

from embed_ft import corpus, corpus_folder, corpus_search

app = modal.App("embed-ft-corpus")
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install("torch==2.13.0", "transformers==5.24.0", "numpy==2.4.6", "safetensors==0.8.0", "tqdm==4.70.1",
                    "pyarrow==26.0.1", "faiss-cpu==1.15.1", "datasets==5.2.0", "openai==3.57.0")
    .env({"HF_HOME": "/data/huggingface", "TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("embed_ft",  # the name the modules below are imported by: embed_ft/__init__.py
                             "corpus", "corpus_folder", "corpus_input", "corpus_search", "vector_index", "int8", "fingerprint",
                             "errors", "paths", "data", "model", "jsonl", "packing", "pooling", "st_layout", "sources",
                             # what corpus.py imports for a home's versions: never called in a container
                             "server", "state", "history", "evaluate", "paired", "openai_embeddings", "cpu_threads")
)
volume = modal.Volume.from_name("embed-ft-corpus", create_if_missing=True)
GPU = "L4"             # a small model's shard is bound by tokenising and host work as much as by the GPU
BATCH_SIZE = 256
SHARD_SIZE = 100_000   # texts a container embeds: a minute or two on an L4 for a small model


# ------------------------------------------------------------------------------------- the steps

def plan(source: str, out: str, model_name: str, shard_size: int = SHARD_SIZE, document_prompt: str | None = None,
         columns: dict | None = None, device: str = "cpu", bf16: bool = True) -> dict:
    """{"shards": [(number, its rows' line numbers)] still to embed, "dropped": stored rows dropped}. The
    vectors will be made on GPUs in bf16, so the manifest says bf16 whatever this container computes on."""
    model = loaded(model_name, device)
    prompt = model.layout.prompt_chosen("document", document_prompt)
    made_by = corpus.identity(model, model_name, None, prompt, bf16)
    todo, number, dropped = corpus.plan(Path(source), Path(out), made_by, columns or {})
    return {"shards": [(number + k, todo[start:start + shard_size].tolist())
                       for k, start in enumerate(range(0, len(todo), shard_size))], "dropped": dropped}


def embed_part(source: str, out: str, model_name: str, number: int, lines: list[int], document_prompt: str | None = None,
               columns: dict | None = None, device: str = "cuda", bf16: bool = True, batch_size: int = BATCH_SIZE) -> int:
    """One shard, written whole; how many of its texts reached the token limit (0 if it was already whole)."""
    import numpy as np
    path = corpus_folder.shard_path(Path(out), number)
    if path.is_file():
        return 0
    model = loaded(model_name, device)
    ids, texts = next(corpus.rows_of_shards(Path(source), columns or {}, np.array(lines), len(lines)))
    return corpus.embed_shard(model, ids, texts, path, model.layout.prompt_chosen("document", document_prompt),
                              batch_size, bf16)


def finish(source: str, out: str, run: dict) -> dict:
    """The manifest's counts and the index over every shard."""
    corpus.finish(Path(out), Path(source), run)
    return corpus_search.index_corpus(Path(out))


@functools.cache
def loaded(model_name: str, device: str):
    """The model, once a container."""
    from embed_ft.model import load_model, pick_device
    return load_model(model_name).to(pick_device(device)).eval()


# ------------------------------------------------------------------------------------- on Modal

@app.function(image=image, volumes={"/data": volume}, cpu=4.0, memory=8192, timeout=60 * 60)
def plan_remote(source: str, out: str, model_name: str, shard_size: int, document_prompt: str | None) -> dict:
    volume.reload()
    planned = plan(source, out, model_name, shard_size, document_prompt)
    volume.commit()  # the manifest, the dropped rows, and the model's download for the GPU containers
    return planned


@app.function(image=image.env({"HF_HUB_OFFLINE": "1"}), gpu=GPU, cpu=4.0, volumes={"/data": volume}, timeout=30 * 60,
              retries=modal.Retries(max_retries=3, initial_delay=10.0))
def embed_remote(source: str, out: str, model_name: str, number: int, lines: list[int],
                 document_prompt: str | None) -> int:
    try:
        return embed_part(source, out, model_name, number, lines, document_prompt)
    finally:
        volume.commit()


@app.function(image=image, volumes={"/data": volume}, cpu=8.0, memory=32768, timeout=2 * 60 * 60)
def finish_remote(source: str, out: str, run: dict) -> dict:
    volume.reload()
    manifest = finish(source, out, run)
    volume.commit()
    return manifest


@app.local_entrypoint()
def main(source: str, model: str, out: str, shard_size: int = SHARD_SIZE, max_containers: int = 100,
         document_prompt: str = ""):
    """--source and --out are paths on the Volume (mounted at /data); --model a hub name or a folder there."""
    import time
    started = time.time()
    prompt = document_prompt or None
    planned = plan_remote.remote(source, out, model, shard_size, prompt)
    shards = planned["shards"]
    print(f"{sum(len(lines) for _, lines in shards):,} texts to embed in {len(shards)} shards")
    runner = embed_remote.with_options(max_containers=max_containers)
    failed, cut = [], 0
    arguments = [(source, out, model, number, lines, prompt) for number, lines in shards]
    for (number, _), result in zip(shards, runner.starmap(arguments, order_outputs=True, return_exceptions=True)):
        if isinstance(result, Exception):
            failed.append(number)
            print(f"shard {number}: {result}")
        else:
            cut += result
    if failed:
        raise SystemExit(f"{len(failed)} shard(s) failed ({failed[:10]}...): run the same command again to embed them")
    embedded = sum(len(lines) for _, lines in shards)
    seconds = time.time() - started
    manifest = finish_remote.remote(source, out, {"embedded": embedded, "dropped": planned["dropped"], "cut_at_limit": cut,
                                                  "texts_per_second": round(embedded / seconds, 1), "seconds": round(seconds, 1)})
    print(f"{manifest['texts']:,} texts in {out}; index {manifest['index']['kind']}, recall@10 {manifest['index']['recall_at_10']}")
