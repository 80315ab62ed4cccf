import gzip
import json

import numpy as np
import pytest
from conftest import synthetic_pairs, write_tsv

from embed_ft import data
from embed_ft.errors import InputError


# ---------------------------------------------------------------------------------------- loading

def test_reads_every_local_format_with_known_columns(tmp_path):
    pairs = [("How do I cook rice?", "What is the way to cook rice?", 1), ("Why, oh why?", "Where\tnow?", 0)]
    tsv = tmp_path / "p.tsv.gz"
    with gzip.open(tsv, "wt") as f:  # Quora's own layout, with extra columns
        f.write("id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate\n")
        for i, (a, b, y) in enumerate(pairs):
            f.write(f'{i}\t{2*i}\t{2*i+1}\t"{a}"\t"{b}"\t{y}\n')
    csv_path = tmp_path / "p.csv"
    csv_path.write_text("sentence1,sentence2,label\n" + "".join(f'"{a}","{b}",{y}\n' for a, b, y in pairs))
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text("".join(json.dumps({"text1": a, "text2": b, "label": y}) + "\n" for a, b, y in pairs))
    import pyarrow as pa
    import pyarrow.parquet as pq
    parquet = tmp_path / "p.parquet"
    pq.write_table(pa.table({"sentence1": [p[0] for p in pairs], "sentence2": [p[1] for p in pairs],
                             "label": [p[2] for p in pairs]}), parquet)
    for path in (tsv, csv_path, jsonl, parquet):
        assert data.load_pairs(str(path)) == pairs, path


def test_what_users_actually_have_crlf_bom_labels_and_stray_carriage_returns(tmp_path, capsys):
    """Windows line ends, a UTF-8 byte order mark, labels written True/False or 1.0/0.0, and (as a
    well-known public paraphrase corpus has) bare carriage returns inside fields."""
    path = tmp_path / "windows.tsv"
    path.write_bytes("\ufeffquestion1\tquestion2\tis_duplicate\r\n".encode()
                     + b"how do i cook\trice how\tTrue\r\n"
                     + b"first half\rsecond half\twhy\t0.0\r\n"
                     + b"a\tb\r c\t1.0\n"
                     + b"x\ty\tFalse\r\n")
    assert data.load_pairs(str(path)) == [("how do i cook", "rice how", 1), ("first half second half", "why", 0),
                                          ("a", "b  c", 1), ("x", "y", 0)]
    assert "windows.tsv: 2 carriage return(s) inside fields, read as spaces" in capsys.readouterr().err
    short = tmp_path / "short.tsv"  # a real error after a stray carriage return is named at its real line
    short.write_bytes(b"question1\tquestion2\tis_duplicate\na\rb\tc\t1\nd\t0\n")
    with pytest.raises(InputError, match=r"short.tsv line 3: 2 field\(s\) where the header has 3"):
        data.load_pairs(str(short))


def test_explicit_columns_and_label_spellings(tmp_path):
    path = tmp_path / "p.jsonl"
    rows = [{"q": "a", "d": "b", "dup": "1"}, {"q": "c", "d": "g", "dup": 0.0}, {"q": "e", "d": "f", "dup": True}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert data.load_pairs(str(path), ("q", "d", "dup")) == [("a", "b", 1), ("c", "g", 0), ("e", "f", 1)]


def test_empty_texts_and_self_pairs_are_dropped_and_counted(tmp_path, capsys):
    path = write_tsv(tmp_path / "p.tsv", [("a", "b", 1), ("", "c", 0), ("  ", "d", 1), ("Same  text", "same text", 1),
                                          ("e", "f", 0)])
    assert data.load_pairs(str(path)) == [("a", "b", 1), ("e", "f", 0)]
    assert "dropped 2 pair(s) with an empty text and 1 pair(s) of a text with itself; 2 left" in capsys.readouterr().out
    with pytest.raises(InputError, match="no usable pairs"):
        data.load_pairs(str(write_tsv(tmp_path / "q.tsv", [("x", "x", 1)])))


def test_bad_input_gives_one_line_errors(tmp_path):
    with pytest.raises(InputError, match="file not found: .*nope.tsv"):
        data.load_pairs(str(tmp_path / "nope.tsv"))
    odd = write_tsv(tmp_path / "odd.tsv", [("a", "b", 1)], header=("left", "right", "y"))
    with pytest.raises(InputError, match=r"no known pair columns; found \['left', 'right', 'y'\]"):
        data.load_pairs(str(odd))
    with pytest.raises(InputError, match=r"missing columns \['z'\]; found \['left', 'right', 'y'\]"):
        data.load_pairs(str(odd), ("left", "right", "z"))
    bad = write_tsv(tmp_path / "bad.tsv", [("a", "b", 1), ("c", "d", 2), ("e", "f", "yes")])
    with pytest.raises(InputError, match=r"labels must be 0 or 1; column 'is_duplicate' also holds \['2', 'yes'\]"):
        data.load_pairs(str(bad))


def test_malformed_files_are_named_with_their_line(tmp_path):
    jsonl = tmp_path / "p.jsonl"
    jsonl.write_text('{"text1": "a", "text2": "b", "label": 1}\n\n{"text1": "c", "text2": "d" "label": 0}\n')
    with pytest.raises(InputError, match=r"p.jsonl line 3: not valid JSON \(Expecting ',' delimiter, column 29\)"):
        data.load_pairs(str(jsonl))
    tsv = tmp_path / "p.tsv"
    tsv.write_text("question1\tquestion2\tis_duplicate\na\tb\t1\nc\td\n")
    with pytest.raises(InputError, match=r"p.tsv line 3: 2 field\(s\) where the header has 3; a stray tab or quote\?"):
        data.load_pairs(str(tsv))
    latin1 = tmp_path / "p.csv.gz"
    with gzip.open(latin1, "wb") as f:
        f.write("sentence1,sentence2,label\nok,fine,1\ncaf\xe9,bar,0\n".encode("latin-1"))  # é: byte 26 + 10 + 3
    with pytest.raises(InputError, match=r"p.csv.gz is not UTF-8 text: byte 0xe9 at line 3 \(byte 39 of the "
                                         r"uncompressed file\); re-save it as UTF-8"):
        data.load_pairs(str(latin1))


def test_parse_label():
    assert [data.parse_label(v) for v in [0, 1, "0", " 1 ", 1.0, "0.0", True, "false"]] == [0, 1, 0, 1, 1, 0, 1, 0]
    assert [data.parse_label(v) for v in [2, -1, 0.5, "", None, "dup"]] == [None] * 6


# --------------------------------------------------------------------------------------- splitting

def test_components_join_pairs_that_share_a_normalised_text():
    pairs = [("A  b", "c", 1), ("x", "y", 0), ("C", "d", 0), ("y", "z", 1), ("lonely", "alone", 0)]
    groups = sorted(sorted(g) for g in data.connected_components(pairs))
    assert groups == [[0, 2], [1, 3], [4]]


def recurring_pairs(n: int, n_texts: int, seed: int) -> list[tuple[str, str, int]]:
    """Pairs drawn from a small pool of texts, so texts recur and components chain, as in Quora."""
    rng = np.random.default_rng(seed)
    pool = [f"Question {i}?" for i in range(n_texts)]
    return [(pool[a], pool[b].upper(), int(rng.integers(2))) for a, b in rng.integers(n_texts, size=(n, 2))]


def test_split_has_no_text_in_two_splits_and_respects_sizes():
    pairs = recurring_pairs(600, 900, seed=5)
    train, val, test = data.split_pairs(pairs, 0.1, 60, seed=1)
    assert sorted(train + val + test) == sorted(pairs)
    assert 50 <= len(val) <= 60 and 50 <= len(test) <= 60
    texts = [{data.normalise(t) for a, b, _ in part for t in (a, b)} for part in (train, val, test)]
    assert not (texts[0] & texts[1]) and not (texts[0] & texts[2]) and not (texts[1] & texts[2])
    assert data.split_pairs(pairs, 0.1, 60, seed=1) == (train, val, test)
    assert data.split_pairs(pairs, 0.1, 60, seed=2) != (train, val, test)
    # The same sizes drawn at random would leak: this data is a fair test of the split.
    shuffled = data.subsample(pairs, len(pairs), seed=1)
    random_texts = [{data.normalise(t) for a, b, _ in part for t in (a, b)} for part in (shuffled[120:], shuffled[:60])]
    assert random_texts[0] & random_texts[1]


def test_split_refuses_to_leave_no_training_data():
    with pytest.raises(InputError, match="leave no training pairs"):
        data.split_pairs(synthetic_pairs(10, 0), 5, 5)


def test_subsample_is_seeded_and_nested():
    pairs = [(f"a{i}", f"b{i}", i % 2) for i in range(500)]  # every pair distinct
    small, large = data.subsample(pairs, 100, seed=3), data.subsample(pairs, 200, seed=3)
    assert large[:100] == small and len(set(large)) == 200 and set(large) <= set(pairs)  # no pair drawn twice
    assert data.subsample(pairs, 100, seed=4) != small
    with pytest.raises(InputError, match="--dataset-size 501 is more than the 500 training pairs"):
        data.subsample(pairs, 501)


# ------------------------------------------------------------------------------- implied pairs

def test_duplicate_clusters_are_transitive_and_by_normalised_text():
    pairs = [("A", "b", 1), ("B ", "c", 1), ("d", "e", 1), ("c", "x", 0)]
    clusters = sorted(sorted(c) for c in data.duplicate_clusters(pairs))
    assert clusters == [["A", "b", "c"], ["d", "e"]]


def test_implied_pairs_by_hand():
    pairs = [("a", "b", 1), ("b", "c", 1), ("c", "d", 0), ("d", "e", 1), ("a", "c", 0)]
    # a, b, c form one cluster; (a, c) is labelled 0 and stays so. d, e form another.
    positives = data.add_implied_pairs(pairs)
    assert positives[:5] == pairs and positives[5:] == []  # the only implied duplicate, (a, c), is labelled
    everything = data.add_implied_pairs(pairs, negatives=True)
    new = {(x, y, z) for x, y, z in everything[5:]}
    # (c, d) is a non-duplicate between {a, b, c} and {d, e}: all 6 member pairs but the labelled one.
    assert new == {("a", "d", 0), ("a", "e", 0), ("b", "d", 0), ("b", "e", 0), ("c", "e", 0)}


def test_implied_pairs_never_cross_splits():
    pairs = recurring_pairs(3000, 400, seed=7)
    train, val, test = data.split_pairs(pairs, 0.2, 0.2, seed=0)
    augmented = data.add_implied_pairs(train, negatives=True)
    assert len(augmented) > len(train)
    held_out = {data.normalise(t) for part in (val, test) for a, b, _ in part for t in (a, b)}
    assert not {data.normalise(t) for a, b, _ in augmented for t in (a, b)} & held_out


def test_drop_overlap_removes_training_pairs_that_share_a_held_out_text(capsys):
    train = [("How?", "Why?", 1), ("what", "when", 0), ("WHO", "whom", 1)]
    assert data.drop_overlap(train, [("how?", "x", 1)], [("y", "who", 0)]) == [("what", "when", 0)]
    assert "dropped 2 training pair(s)" in capsys.readouterr().out
