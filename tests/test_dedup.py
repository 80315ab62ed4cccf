"""dedup.py: neighbours from the index, groups that do not chain, the files it writes, the checks."""
import json

import numpy as np
from conftest import run_cli, synthetic_pairs, write_tsv

from embed_ft import dedup, vector_index
from embed_ft.model import Embedder


def unit(rows):
    rows = np.asarray(rows, dtype=np.float32)
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def angles(degrees):
    return unit([[np.cos(np.radians(d)), np.sin(np.radians(d)), 0] for d in degrees])


def test_a_chain_is_not_one_group_every_member_is_near_its_kept_text():
    # 0~1~2~3~4 along a circle, 10 degrees apart: neighbours within 15 degrees (cos > 0.9659), so only next ones.
    vectors = np.vstack([angles([0, 10, 20, 30, 40]), unit([[0, 0, 1]])])
    threshold = float(np.cos(np.radians(15)))
    left, right, score = dedup.near_duplicates(vector_index.build(vectors), vectors, threshold)
    assert sorted(zip(left.tolist(), right.tolist())) == [(0, 1), (1, 0), (1, 2), (2, 1), (2, 3), (3, 2), (3, 4), (4, 3)]
    found = dedup.groups(len(vectors), left, right, score)
    # 1, 2 and 3 have two neighbours each: 1 is kept first with 0 and 2; then 3 with 4. Components would give one group.
    assert [(kept, sorted(m for m, _ in members)) for kept, members in found] == [(1, [0, 2]), (3, [4])]
    for kept, members in found:
        assert all(vectors[kept] @ vectors[m] > threshold and abs(vectors[kept] @ vectors[m] - s) < 1e-5 for m, s in members)


def test_a_text_with_more_near_duplicates_than_asked_is_asked_again(monkeypatch):
    monkeypatch.setattr(dedup, "NEIGHBOURS", 1)
    vectors = np.vstack([angles([0, 1, 2, 3, 4]), unit([[0, 0, 1]])])  # five near-duplicates of each other
    left, right, _ = dedup.near_duplicates(vector_index.build(vectors), vectors, 0.99, batch=2)
    assert len(left) == 5 * 4 and set(right[left == 0].tolist()) == {1, 2, 3, 4}


def test_check_against_labels_by_hand():
    vectors = angles([0, 5, 50, 52, 90])
    group_of = np.array([0, 0, -1, -1, -1])   # 0 and 1 grouped; 2~3 by cosine but left out of groups here
    rows = {"a": 0, "b": 1, "c": 2, "d": 3, "e": 4}
    pairs = [("a", "b", 1), ("c", "d", 1), ("a", "e", 0), ("b", "c", 0), ("x", "a", 1)]  # x is not in the corpus
    check = dedup.check_against_labels(group_of, rows, vectors, float(np.cos(np.radians(10))), pairs)
    assert check["labelled_pairs"] == 4 and check["labelled_duplicates"] == 2
    assert check["groups"] == {"found": 1, "precision": 1.0, "recall": 0.5}
    assert check["pairwise"] == {"found": 2, "precision": 1.0, "recall": 1.0}


def saved_model(tiny_model_dir, folder, threshold=None):
    model = Embedder.from_pretrained(str(tiny_model_dir), dense_out_features=16)
    model.save(folder, decision={"threshold": threshold} if threshold is not None else {})
    return model


def test_command_line_writes_groups_the_ids_to_remove_and_a_summary(tiny_model_dir, tmp_path, capsys):
    model = saved_model(tiny_model_dir, tmp_path / "m")
    texts = list(dict.fromkeys(t for a, b, _ in synthetic_pairs(60, 3) for t in (a, b)))
    vectors = model.encode(texts, role="document")
    cosines = np.sort((vectors @ vectors.T)[np.triu_indices(len(texts), 1)])
    threshold = float(cosines[-30])  # about 30 pairs above it
    (tmp_path / "texts.txt").write_text("\n".join(texts) + "\n")
    dedup.main([str(tmp_path / "texts.txt"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "d"),
                "--threshold", str(threshold), "--device", "cpu"])
    groups = [json.loads(line) for line in (tmp_path / "d" / "groups.jsonl").read_text().splitlines()]
    remove = (tmp_path / "d" / "remove.txt").read_text().split()
    assert groups and [g["size"] for g in groups] == sorted((g["size"] for g in groups), reverse=True)
    assert sorted(remove) == sorted(m["id"] for g in groups for m in g["members"])
    position = {t: i for i, t in enumerate(texts)}
    for g in groups:
        for m in g["members"]:
            cosine = vectors[position[g["kept"]["text"]]] @ vectors[position[m["text"]]]
            assert cosine > threshold and abs(cosine - m["score"]) < 1e-3
    summary = json.loads((tmp_path / "d" / "summary.json").read_text())
    assert summary["groups"] == len(groups) and summary["to_remove"] == len(remove)
    assert "groups holding" in capsys.readouterr().out


def test_earlier_groups_are_never_overwritten_silently(tiny_model_dir, tmp_path, capsys):
    saved_model(tiny_model_dir, tmp_path / "m", threshold=0.9)
    (tmp_path / "texts.txt").write_text("how do i t1a\nhow do i t1a t1b\n")
    argv = [str(tmp_path / "texts.txt"), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "d")]
    dedup.main(argv)
    code, err = run_cli(dedup.main, argv, capsys)
    assert code == 2 and "already holds groups.jsonl: pass --overwrite" in err
    dedup.main(argv + ["--overwrite"])


def test_a_published_model_is_told_how_to_get_a_threshold_and_tune_on_gives_one(tiny_model_dir, tmp_path, capsys):
    saved_model(tiny_model_dir, tmp_path / "m")
    pairs = write_tsv(tmp_path / "p.tsv", synthetic_pairs(40, 5))
    code, err = run_cli(dedup.main, [str(pairs), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "d")], capsys)
    assert code == 2 and err.count("error:") == 1 and "--tune-on PAIRS" in err
    dedup.main([str(pairs), "--model", str(tmp_path / "m"), "--out", str(tmp_path / "d"), "--tune-on", str(pairs)])
    labels = json.loads((tmp_path / "d" / "summary.json").read_text())["labels"][str(pairs)]
    assert labels["labelled_pairs"] == 40 and set(labels) == {"labelled_pairs", "labelled_duplicates", "groups", "pairwise"}
    assert "exact pairwise decisions" in capsys.readouterr().out
