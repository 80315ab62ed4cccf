"""corpus.py on a tiny model and small corpora: the shards and manifest, resume after kill -9, a grown
corpus, another model, and bad input (one line each, nothing half-written)."""
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, corpus_texts, run_cli, write_table

from embed_ft import corpus, corpus_folder
from embed_ft.model import load_model


@pytest.fixture
def tiny(tiny_model_dir):
    return load_model(str(tiny_model_dir)).eval()


def shard_rows(folder):
    """Every (id, text, vector) in the folder, in shard order."""
    out = []
    for path in corpus_folder.shards(folder):
        table = pq.read_table(path).to_pydict()
        out += list(zip(table["id"], table["text"], map(tuple, table["vector"])))
    return out


def test_shards_hold_each_text_once_with_the_vector_the_model_gives(tiny, tmp_path):
    lines = corpus_texts(250) + corpus_texts(5)           # the first five texts twice: one row each
    (tmp_path / "c.txt").write_text("\n".join(lines) + "\n\n")
    manifest = corpus.embed_corpus(tmp_path / "c.txt", tmp_path / "out", tiny, "tiny", shard_size=100, bf16=False)
    rows = shard_rows(tmp_path / "out")
    assert [t for _, t, _ in rows] == corpus_texts(250) and len({i for i, _, _ in rows}) == 250
    assert [p.name for p in corpus_folder.shards(tmp_path / "out")] == ["shard-00000.parquet", "shard-00001.parquet",
                                                                       "shard-00002.parquet"]
    expected = tiny.encode(corpus_texts(250), role="document", bf16=False)
    np.testing.assert_allclose(np.array([v for *_, v in rows]), expected, atol=1e-5)
    schema = pq.read_schema(corpus_folder.shards(tmp_path / "out")[0])
    assert str(schema.field("vector").type) == f"fixed_size_list<element: float>[{tiny.dim}]"
    assert manifest["texts"] == 250 and manifest["width"] == tiny.dim and manifest["dtype"] == "fp32"
    assert manifest["index"]["kind"] == "exact" and manifest["index"]["recall_at_10"] == 1.0


def test_a_grown_corpus_embeds_only_what_is_new_and_drops_what_is_gone(tiny, tmp_path):
    first = [(f"q{i}", t) for i, t in enumerate(corpus_texts(200))]
    corpus.embed_corpus(write_table(tmp_path / "c.tsv", first), tmp_path / "out", tiny, "tiny", shard_size=64, bf16=False)
    grown = first[10:] + [("q11", "a changed text t0a t0b")] + [(f"new{i}", t) for i, t in enumerate(corpus_texts(10, seed=9))]
    grown = [r for r in grown if r[0] != "q11"] + [("q11", "a changed text t0a t0b")]
    manifest = corpus.embed_corpus(write_table(tmp_path / "c.tsv", grown), tmp_path / "out", tiny, "tiny", shard_size=64,
                                   bf16=False)
    # 10 gone, q11 changed: 11 dropped; the changed text and 10 new ones embedded
    assert manifest["last_run"]["dropped"] == 11 and manifest["last_run"]["embedded"] == 11
    stored = {i: t for i, t, _ in shard_rows(tmp_path / "out")}
    assert stored == dict(grown) and manifest["texts"] == len(grown)
    again = corpus.embed_corpus(tmp_path / "c.tsv", tmp_path / "out", tiny, "tiny", shard_size=64, bf16=False)
    assert again["last_run"]["embedded"] == 0 and again["last_run"]["dropped"] == 0


def test_another_model_never_mixes_into_a_folder(tiny, tiny_model_dir, tmp_path, capsys):
    write_table(tmp_path / "c.tsv", [(f"q{i}", t) for i, t in enumerate(corpus_texts(20))])
    corpus.embed_corpus(tmp_path / "c.tsv", tmp_path / "out", tiny, "tiny", bf16=False)
    before = {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()}
    code, err = run_cli(corpus.main, ["embed", str(tmp_path / "c.tsv"), "--model", str(tiny_model_dir), "--out",
                                      str(tmp_path / "out"), "--dtype", "bf16"], capsys)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 2 and len(errors) == 1 and "dtype 'fp32'; this run's dtype is 'bf16'" in errors[0]
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == before



def test_a_folder_that_is_not_a_corpus_is_never_written_into(tiny_model_dir, tmp_path, capsys):
    write_table(tmp_path / "c.tsv", [(f"q{i}", t) for i, t in enumerate(corpus_texts(20))])
    model_folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model_folder)
    before = {p.name: p.read_bytes() for p in model_folder.iterdir() if p.is_file()}
    code, err = run_cli(corpus.main, ["embed", str(tmp_path / "c.tsv"), "--model", str(tiny_model_dir), "--out",
                                      str(model_folder)], capsys)
    assert code == 2 and "holds files and no corpus manifest" in err
    assert {p.name: p.read_bytes() for p in model_folder.iterdir() if p.is_file()} == before

def embed_process(tiny_model_dir, source, out, limit_bytes=None, shard_size=50):
    """`corpus.py embed` as a user runs it, in its own process (one thread, fp32)."""
    def limit():  # a disk that fills: no file of this process may grow past limit_bytes
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))
    return subprocess.Popen([sys.executable, str(ROOT / "corpus.py"), "embed", str(source), "--model", str(tiny_model_dir),
                             "--out", str(out), "--shard-size", str(shard_size), "--dtype", "fp32", "--batch-size", "16"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit if limit_bytes else None, env=os.environ | {"OMP_NUM_THREADS": "1"})


def test_kill_9_then_the_same_command_finishes_as_an_uninterrupted_run(tiny_model_dir, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(corpus_texts(1500)) + "\n")
    killed = embed_process(tiny_model_dir, tmp_path / "c.txt", tmp_path / "resumed")
    deadline = time.time() + 60
    while len(corpus_folder.shards(tmp_path / "resumed")) < 2 and killed.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    done_before = len(corpus_folder.shards(tmp_path / "resumed"))
    assert 2 <= done_before < 30, "the kill came after the run had finished: nothing was resumed"
    for process in (embed_process(tiny_model_dir, tmp_path / "c.txt", tmp_path / "resumed"),
                    embed_process(tiny_model_dir, tmp_path / "c.txt", tmp_path / "whole")):
        assert process.wait(timeout=120) == 0, process.stderr.read()
    resumed, whole = shard_rows(tmp_path / "resumed"), shard_rows(tmp_path / "whole")
    assert [r[:2] for r in resumed] == [r[:2] for r in whole] and len({r[0] for r in resumed}) == 1500
    np.testing.assert_allclose(np.array([r[2] for r in resumed]), np.array([r[2] for r in whole]), atol=1e-6)
    assert not list((tmp_path / "resumed").glob("*.tmp"))


def test_a_disk_that_fills_mid_shard_leaves_whole_shards_and_one_line(tiny_model_dir, tmp_path):
    (tmp_path / "c.txt").write_text("\n".join(corpus_texts(400)) + "\n")
    process = embed_process(tiny_model_dir, tmp_path / "c.txt", tmp_path / "out", limit_bytes=20_000, shard_size=200)
    assert process.wait(timeout=120) == 2
    err = process.stderr.read().strip().splitlines()[-1]
    assert err.startswith("error: could not write shard-00000.parquet") and "run the same command again" in err
    assert not list((tmp_path / "out").glob("*.tmp")) and not corpus_folder.shards(tmp_path / "out")


@pytest.mark.parametrize("name, content, message", [
    ("empty.txt", b"\n\n", "holds no text"),
    ("two.tsv", b"id\ttext\n1\tt0a the\n2\tt1a of\n1\tt2a how\n", "id '1' has two different texts (row 1"),
    ("nocolumn.csv", b"id,body2\n1,t0a\n", "has no text column"),
    ("latin1.txt", "t0a caf\u00e9\n".encode("latin-1"), "is not UTF-8 text: byte 0xe9 at line 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(tiny_model_dir, tmp_path, capsys, name, content, message):
    (tmp_path / name).write_bytes(content)
    code, err = run_cli(corpus.main, ["embed", str(tmp_path / name), "--model", str(tiny_model_dir),
                                      "--out", str(tmp_path / "out")], capsys)
    lines = [line for line in err.strip().splitlines() if line.startswith("error:")]
    assert code == 2 and len(lines) == 1 and message in lines[0], err
    assert not (tmp_path / "out").exists()


def test_a_text_longer_than_the_model_takes_is_cut_and_counted(tiny, tmp_path, capsys):
    (tmp_path / "c.txt").write_text(" ".join(["t0a"] * 500) + "\nt1a the\n")
    manifest = corpus.embed_corpus(tmp_path / "c.txt", tmp_path / "out", tiny, "tiny", bf16=False)
    assert manifest["last_run"]["cut_at_limit"] == 1 and manifest["texts"] == 2
    assert f"reached the model's limit of {tiny.max_length} tokens" in capsys.readouterr().err


def test_a_home_corpus_follows_its_versions_and_the_server_keeps_the_one_it_names(tiny_model_dir, tmp_path, capsys):
    import torch

    from embed_ft import flywheel, jsonl
    from embed_ft.state import home_state
    from embed_ft.server.versions import served_pointers
    home, out = tmp_path / "fw", tmp_path / "corpus"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--init"])
    (tmp_path / "c.txt").write_text("\n".join(corpus_texts(60)) + "\n")
    embed = ["embed", str(tmp_path / "c.txt"), "--home", str(home), "--out", str(out), "--dtype", "fp32", "--device", "cpu"]
    corpus.main(embed)
    assert corpus_folder.read_manifest(out / "base")["version"] == "base"
    assert home_state.corpora(home) == {str(out.resolve()): "base"}
    for number in (1, 2):  # two promotions while the corpus still names the base model
        model = load_model(str(tiny_model_dir))
        with torch.no_grad():
            model.encoder.embeddings.word_embeddings.weight.add_(0.1 * number)
        model.save(home / "rounds" / f"round-00{number}")
        jsonl.append(home / "history.jsonl", {"round": number, "decision": "promoted",
                                              "candidate": f"rounds/round-00{number}", "time": f"2026-12-0{number}T00:00:00"})
        home_state.switch_current(home, home / "rounds" / f"round-00{number}")
    assert [p["version"] for p in served_pointers(home)] == ["base", "round-001", "round-002"]
    corpus.main(embed)  # re-embedded with the version served now, beside the old folder
    assert corpus_folder.read_manifest(out / "round-002")["version"] == "round-002" and (out / "base").is_dir()
    assert [p["version"] for p in served_pointers(home)] == ["round-001", "round-002"]
    capsys.readouterr()
    corpus.main(["search", str(out), corpus_texts(60)[7], "--home", str(home), "-k", "1", "--device", "cpu"])
    captured = capsys.readouterr()
    assert "(version round-002)" in captured.err and corpus_texts(60)[7] in captured.out
