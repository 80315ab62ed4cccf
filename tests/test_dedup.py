import json

import numpy as np
from conftest import run_cli, write_tsv

import dedup
from model import Embedder


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_near_duplicate_pairs_and_groups_by_hand():
    # 0~1 (cos .99), 1~2 (.98), 0-2 only .94: grouped through 1. 3~4. 5 alone.
    vectors = unit([[1, 0, 0], [1, 0.15, 0], [1, 0.35, 0], [0, 1, 0], [0, 1, 0.1], [0, 0, 1]])
    left, right = dedup.near_duplicate_pairs(vectors, threshold=0.95, chunk=2)  # chunks split the pairs
    assert sorted(zip(left.tolist(), right.tolist())) == [(0, 1), (1, 2), (3, 4)]
    assert dedup.group(6, left, right) == [[0, 1, 2], [3, 4]]
    brute = [(i, j) for i in range(6) for j in range(i + 1, 6) if vectors[i] @ vectors[j] > 0.95]
    assert brute == [(0, 1), (1, 2), (3, 4)]


def test_check_against_labels():
    texts = ["a", "b", "c", "d"]
    pairs = [("a", "b", 1), ("c", "d", 0), ("b", "c", 1)]
    check = dedup.check_against_labels(texts, np.array([0, 2, 0]), np.array([1, 3, 3]), pairs)
    # found (a,b) labelled 1, (c,d) labelled 0, (a,d) unlabelled: precision 1/2; recall 1 of 2 duplicates.
    assert check == {"found_pairs_labelled": 2, "precision": 0.5, "labelled_duplicates": 2, "recall": 0.5}


def test_command_line_on_synthetic_texts(tiny_model_dir, tmp_path, capsys):
    model = Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=16)
    texts = ["how do i t1a", "how do i t1a", "what is t2b", "what is the t2b", "best way of t3c", "t1a t1b t1c", "i can"]
    distinct = list(dict.fromkeys(texts))
    vectors = model.encode(distinct)  # as dedup.py will embed them
    cosines = sorted(vectors[i] @ vectors[j] for i in range(6) for j in range(i + 1, 6))
    threshold = float((cosines[-4] + cosines[-5]) / 2)  # the 4 most similar pairs are near-duplicates
    model.save(tmp_path / "m", decision={"threshold": threshold})
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n\n")
    dedup.main([str(tmp_path / "texts.txt"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "g.jsonl"),
                "--device", "cpu"])
    found = [json.loads(line)["texts"] for line in (tmp_path / "g.jsonl").read_text().splitlines()]
    # The groups by brute force: components of the 4 pairs above the threshold.
    groups = [{t} for t in distinct]
    for i in range(6):
        for j in range(i + 1, 6):
            if vectors[i] @ vectors[j] > threshold:
                a, b = next(g for g in groups if distinct[i] in g), next(g for g in groups if distinct[j] in g)
                if a is not b:
                    groups.remove(b)
                    a |= b
    assert sorted(map(sorted, found)) == sorted(sorted(g) for g in groups if len(g) > 1)
    out = capsys.readouterr().out
    assert "6 distinct texts" in out and "4 near-duplicate pairs" in out and "time: encode" in out
    assert f"written to {(tmp_path / 'g.jsonl').resolve()}" in out


def test_without_out_it_writes_groups_jsonl_here_and_says_so(tiny_model_dir, tmp_path, capsys, monkeypatch):
    Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=16).save(tmp_path / "m", decision={"threshold": 0.5})
    (tmp_path / "texts.txt").write_text("how do i t1a\nhow do i t1a t1b\n")
    monkeypatch.chdir(tmp_path)
    dedup.main(["texts.txt", "--model", "m", "--device", "cpu"])
    assert f"written to {tmp_path.resolve() / 'groups.jsonl'}" in capsys.readouterr().out
    assert (tmp_path / "groups.jsonl").exists()


def test_a_model_without_a_threshold_is_one_line(tiny_model_dir, tmp_path, capsys):
    Embedder.from_pretrained(str(tiny_model_dir)).save(tmp_path / "m")
    pairs = write_tsv(tmp_path / "p.tsv", [("a", "b", 1), ("c", "d", 0)])
    code, err = run_cli(dedup.main, [str(pairs), "--model", str(tmp_path / "m")], capsys)
    assert code == 2 and "stores no threshold" in err and err.count("error:") == 1
