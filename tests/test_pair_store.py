import json
import multiprocessing

from embed_ft.state.pair_store import PairStore, settle


def pair(a, b, label, **extra):
    return {"text1": a, "text2": b, "label": label} | extra


def test_a_pair_is_stored_once_and_a_contradiction_is_kept_apart(tmp_path):
    store = PairStore(tmp_path / "pairs")
    first = store.add([pair("How do I learn Python?", "Best way to learn Python?", 1, id="q1"), pair("a b", "c d", 0)])
    assert first == {"accepted": 2, "duplicates": 0, "conflicts": 0, "dropped_self_pairs": 0, "stored": 2}
    again = store.add([pair("best way to  learn python?", "How do I learn Python?", 1),   # same pair, other order
                       pair("how do i learn python?", "Best way to learn Python?", 1, id="q1"),  # same id, same pair
                       pair("x", "y", 1, id="q1"),                                         # same id, another pair
                       pair("c d", "a b", 1),                                              # contradicts
                       pair("e f", "g h", 1, id="e"), pair("g h", "e f", 1, id="e"),       # repeated within the batch
                       pair("i j", "k l", 0, id="i"), pair("m n", "o p", 0, id="i"),       # one id, two pairs, one batch
                       pair("Same text", "same  TEXT", 1)])                                # a text with itself
    assert again == {"accepted": 2, "duplicates": 3, "conflicts": 3, "dropped_self_pairs": 1, "stored": 4}
    files = sorted((tmp_path / "pairs").glob("batch-*.jsonl"))
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    assert len(files) == 2 and len(rows) == 4 and rows[0]["id"] == "q1"
    conflict = [json.loads(line) for f in (tmp_path / "pairs" / "conflicts").glob("*.jsonl") for line in f.read_text().splitlines()]
    assert [(c["text1"], c["id"]) for c in conflict] == [("x", "q1"), ("c d", None), ("m n", "i")]
    reopened = PairStore(tmp_path / "pairs")  # a restarted server knows what is stored
    assert reopened.count() == 4 and reopened.conflicting == 3
    assert reopened.add([pair("a b", "c d", 0)])["duplicates"] == 1


def test_settle_keeps_the_first_label_and_counts_what_it_drops():
    kept, repeats, conflicts = settle([("a", "b", 1), ("B", "a", 1), ("a", "b", 0), ("c", "d", 0)])
    assert kept == [("a", "b", 1), ("c", "d", 0)] and (repeats, conflicts) == (1, 1)


def write_many(folder, worker):
    store = PairStore(folder)
    for i in range(25):
        store.add([pair(f"w{worker} q{i}", f"shared {i}", i % 2), pair(f"common {i}", f"other {i}", 1)])


def test_several_processes_writing_at_once_lose_nothing_and_store_each_pair_once(tmp_path):
    folder = tmp_path / "pairs"
    PairStore(folder)
    processes = [multiprocessing.get_context("spawn").Process(target=write_many, args=(folder, w)) for w in range(3)]
    for p in processes:
        p.start()
    for p in processes:
        p.join(timeout=60)
        assert p.exitcode == 0
    rows = [json.loads(line) for f in folder.glob("batch-*.jsonl") for line in f.read_text().splitlines()]
    keys = [(r["text1"], r["text2"]) for r in rows]
    assert len(keys) == len(set(keys)) == 3 * 25 + 25  # each worker's own pairs, and the common ones once
    assert not list(folder.glob(".*.tmp"))
