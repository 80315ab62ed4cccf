"""corpus_modal.py's steps run here as its containers run them: plan, the shards in any order (one
already whole, as after a retry), finish; the folder equals the local job's, shard for shard."""
import ast
import random

import numpy as np
import pyarrow.parquet as pq
from conftest import FILLER, ROOT, TOPICS, local_modules_imported

from embed_ft import corpus, corpus_folder, corpus_modal
from embed_ft.model import load_model


def test_the_steps_write_the_folder_the_local_job_writes(tiny_model_dir, tmp_path):
    rng = random.Random(1)
    lines = [" ".join(rng.sample(TOPICS[rng.randrange(len(TOPICS))], 2) + rng.sample(FILLER, 3) + [str(i)]) for i in range(230)]
    (tmp_path / "c.txt").write_text("\n".join(lines + lines[:4]) + "\n")
    source, model = str(tmp_path / "c.txt"), str(tiny_model_dir)
    planned = corpus_modal.plan(source, str(tmp_path / "remote"), model, shard_size=50, bf16=False)
    assert [number for number, _ in planned["shards"]] == [0, 1, 2, 3, 4] and planned["dropped"] == 0
    shards = planned["shards"]
    corpus_modal.embed_part(source, str(tmp_path / "remote"), model, *shards[2], device="cpu", bf16=False)
    for number, rows in random.Random(0).sample(shards, len(shards)):  # any order; shard 2 is already whole
        corpus_modal.embed_part(source, str(tmp_path / "remote"), model, number, rows, device="cpu", bf16=False)
    corpus_modal.finish(source, str(tmp_path / "remote"), {"embedded": 230, "dropped": 0, "cut_at_limit": 0})
    corpus.embed_corpus(tmp_path / "c.txt", tmp_path / "local", load_model(model).eval(), model, shard_size=50, bf16=False)
    remote, local = corpus_folder.shards(tmp_path / "remote"), corpus_folder.shards(tmp_path / "local")
    assert [p.name for p in remote] == [p.name for p in local]
    for a, b in zip(remote, local):
        a, b = pq.read_table(a).to_pydict(), pq.read_table(b).to_pydict()
        assert a["id"] == b["id"] and a["text"] == b["text"]
        np.testing.assert_allclose(np.array(a["vector"]), np.array(b["vector"]), atol=1e-5)
    manifest = corpus_folder.read_manifest(tmp_path / "remote")
    assert manifest["texts"] == 230 and manifest["index"]["kind"] == "exact"
    assert corpus_modal.plan(source, str(tmp_path / "remote"), model, shard_size=50, bf16=False)["shards"] == []  # a rerun: nothing left


def test_the_image_carries_every_module_the_steps_import():
    needed = local_modules_imported("corpus_modal") - {"corpus_modal"}
    source = (ROOT / "corpus_modal.py").read_text()
    call = source[source.index(".add_local_python_source("):].split(")", 1)[0]
    listed = set(ast.literal_eval("(" + call.split("(", 1)[1] + ",)"))
    assert "embed_ft" in listed and needed <= listed, needed - listed
