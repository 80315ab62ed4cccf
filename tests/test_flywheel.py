import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from conftest import ROOT, TEST_DEVICE, run_cli, synthetic_pairs, write_tsv

from embed_ft import card, data, evaluate, flywheel, history, paired, jsonl
from embed_ft.state import heldout, home_db, home_state
from embed_ft.model import Embedder

SETTINGS = f"epochs=4 batch_size=16 lr=1e-3 device={TEST_DEVICE}"


@pytest.fixture
def flywheel_setup(tiny_model_dir, tmp_path):
    """A home from the tiny base model alone (no curated sets), and a folder pairs are dropped into."""
    drops = tmp_path / "drops"
    drops.mkdir()
    args = ["--home", str(tmp_path / "fw"), "--base", str(tiny_model_dir), "--pairs", str(drops), "--set", SETTINGS]
    return drops, tmp_path / "fw", args


def training_texts(home) -> set[str]:
    return {data.normalise(t) for f in (home / "work").glob("round-*/pairs.tsv.gz") for a, b, _ in data.load_pairs(str(f))
            for t in (a, b)}


def test_a_home_from_a_base_alone_grows_its_held_out_promotes_and_audits(flywheel_setup, capsys):
    drops, home, args = flywheel_setup
    flywheel.main(args + ["--init"])
    assert jsonl.read_json(home / "flywheel.json")["width"] == 32  # the base's own width, decided once
    write_tsv(drops / "01.tsv", synthetic_pairs(600, 1))
    flywheel.main(args)
    first = jsonl.read(home / "history.jsonl")[0]
    for split in heldout.HELD_OUT:
        assert (home / "heldout" / f"{split}.tsv.gz").is_file()
    held = {data.normalise(t) for split in heldout.HELD_OUT for a, b, _ in data.load_pairs(str(home / "heldout" / f"{split}.tsv.gz"))
            for t in (a, b)}
    assert held and not held & training_texts(home)
    assert first["splits"]["test"] == len(data.load_pairs(str(home / "heldout" / "test.tsv.gz"))) >= flywheel.MIN_TEST
    assert first["decision"] == "promoted" and first["screen"]["favoured"]
    assert first["new_test_groups"] == first["test_groups"] <= first["test_pairs"]  # the evidence is counted in groups
    # allotted by round 1: a tenth of alpha by rounds (1/2 of it), nine tenths by the test set's groups from 600 of its cap on
    evidence = lambda groups: 0.045 * max(0, groups - 600) / 4400
    assert first["alpha_round"] == first["alpha_allotted"] == pytest.approx(0.005 / 2 + evidence(first["test_groups"]))
    assert first["evidence"]["groups_for_a"] > first["evidence"]["groups_for_b"] and first["p_value"] == first["evidence"]["p_value"]
    assert Embedder.load(home / "rounds/round-001").dim == 32
    assert not list((home / "rounds").glob("*/*.tsv.gz"))  # the model folder holds the model, never the traffic
    audit = first["audit"]
    assert audit["version"] == "round-001" and audit["n"] == first["splits"]["audit"]
    assert audit["interval"][0] <= audit["error"] <= audit["interval"][1] and first["audit_agrees"]
    assert 0 < audit["groups"] <= audit["n"] and audit["design_effect"] >= 1 and 0 < first["test_groups"] <= first["test_pairs"]
    assert first["traffic"]["groups"] == first["test_groups"]  # the decision counted by groups too
    assert "## Audit by the flywheel" in (home / "rounds/round-001/README.md").read_text()
    splits_after_one = dict(home_state.ledger(home).split_of)
    out = capsys.readouterr().out
    assert "-> PROMOTED" in out and "audit: round-001" in out
    # Round 2: more pairs, a few of them joining two texts that now lie in different splits.
    by_split = {s: data.load_pairs(str(home / "heldout" / f"{s}.tsv.gz")) for s in ("test", "audit")}
    bridges = [(by_split["test"][i][0], by_split["audit"][i][1], 1) for i in range(5)]
    write_tsv(drops / "02.tsv", synthetic_pairs(600, 4) + bridges)
    flywheel.main(args)
    second = jsonl.read(home / "history.jsonl")[1]
    ledger = home_state.ledger(home)
    assert all(ledger.split_of[t] == s for t, s in splits_after_one.items())  # no text changed split
    assert second["splits"]["unusable"] >= 5 and second["unusable_new"] >= 5
    assert second["round_of_life"] == 2 and second["new_test_groups"] == second["test_groups"] - first["test_groups"]
    # round 1's promotion spent nothing: round 2 may spend all that is allotted by then
    assert second["alpha_spent_before"] == 0 and second["alpha_round"] == pytest.approx(0.005 * 2 / 3 + evidence(second["test_groups"]))
    held = {t for t, s in ledger.split_of.items() if s != "train"}
    assert not held & training_texts(home)
    flywheel.main(["--plot", str(home / "history.jsonl")])
    assert (home / "history.png").stat().st_size > 10_000


def test_the_same_pairs_give_the_same_splits_in_any_home(tmp_path):
    pairs = synthetic_pairs(400, 1)
    one, two = heldout.Ledger(tmp_path / "a.jsonl"), heldout.Ledger(tmp_path / "b.jsonl")
    all_at_once = one.assign(pairs)
    two.assign(pairs[:150])
    in_two_rounds = heldout.Ledger(tmp_path / "b.jsonl").assign(pairs)  # a new process reads the ledger back
    assert all_at_once == in_two_rounds and one.split_of == two.split_of | heldout.Ledger(tmp_path / "b.jsonl").split_of
    shares = {s: len(all_at_once[s]) / len(pairs) for s in heldout.HELD_OUT}
    assert 0.2 < shares["test"] < 0.4 and 0.04 < shares["validation"] < 0.17 and 0.04 < shares["audit"] < 0.17


def test_a_new_text_takes_its_partners_split_and_caps_send_the_rest_to_training(tmp_path):
    ledger = heldout.Ledger(tmp_path / "splits.jsonl")
    everything_to_test = {"validation": 0.0, "test": 0.99, "audit": 0.0}
    first = ledger.assign([("a x", "b x", 1)], fractions=everything_to_test)
    assert first["test"] == [("a x", "b x", 1)]
    later = ledger.assign([("a x", "b x", 1), ("A  X", "c x", 0), ("d x", "e x", 1), ("f x", "g x", 1)],  # all so far
                          fractions=everything_to_test, caps={"validation": 0, "test": 2, "audit": 0})
    # the cap counts groups: "a x"-"c x" joins the group of "a x"-"b x", so "d x"-"e x" is the test set's second group
    assert later["test"] == [("a x", "b x", 1), ("A  X", "c x", 0), ("d x", "e x", 1)] and later["train"] == [("f x", "g x", 1)]
    assert ledger.split("C X") == "test"
    curated = ledger.assign([("h x", "kept apart", 1)], curated={"kept apart"})
    assert curated["curated"] == [("h x", "kept apart", 1)] and ledger.split("h x") == "curated"
    bridge = ledger.assign([("a x", "f x", 1)])  # a test text and a training one
    assert bridge["unusable"] == [("a x", "f x", 1)]


def test_past_its_cap_the_test_set_keeps_growing_by_its_share_after_caps(tmp_path):
    pairs = [(f"question {i}", f"another {i}", i % 2) for i in range(2000)]  # 2,000 groups of one pair
    caps = {"validation": 10, "test": 50, "audit": 10}
    stopped = heldout.Ledger(tmp_path / "a.jsonl").assign(pairs, caps=caps, after_caps={"validation": 0, "test": 0, "audit": 0})
    grows = heldout.Ledger(tmp_path / "b.jsonl").assign(pairs, caps=caps)  # the default: 10% past the cap
    assert len(stopped["test"]) == 50 and len(grows["validation"]) == 10 and len(grows["audit"]) == 10
    assert 50 + 0.07 * 1800 < len(grows["test"]) < 50 + 0.13 * 1850
    assert set(stopped["test"]) < set(grows["test"])  # the same hash draws: what was test stays test


def test_groups_are_counted_by_split_as_pairs_join_texts():
    groups = heldout.Groups()
    for a, b, split in [("a", "b", "test"), ("c", "d", "test"), ("b", "c", "test"), ("e", "f", "train"), ("a", "d", "test")]:
        groups.join(a, b, split)
    assert groups.count["test"] == 1 and groups.count["train"] == 1  # a-b, c-d, then b-c makes them one


def test_a_torn_ledger_line_is_decided_again_the_same_way(tmp_path):
    pairs = synthetic_pairs(200, 1)
    whole = heldout.Ledger(tmp_path / "whole.jsonl").assign(pairs)
    lines = (tmp_path / "whole.jsonl").read_text().splitlines(keepends=True)
    (tmp_path / "torn.jsonl").write_text("".join(lines[:40]) + lines[40][:10])  # a crash mid-append
    assert heldout.Ledger(tmp_path / "torn.jsonl").assign(pairs) == whole


def test_too_few_held_out_pairs_wait_and_the_settings_are_kept(flywheel_setup, capsys):
    drops, home, args = flywheel_setup
    code, err = run_cli(flywheel.main, ["--home", str(home)], capsys)
    assert code == 2 and "give --base MODEL once" in err
    flywheel.main(args + ["--init"])
    assert home_state.new_pair_count(home) == 0  # an empty store is no error
    home_state.database(home).add([{"text1": a, "text2": b, "label": y} for a, b, y in synthetic_pairs(30, 7)])
    assert home_state.new_pair_count(home) == 30
    write_tsv(drops / "01.tsv", synthetic_pairs(60, 1) + synthetic_pairs(60, 1)[:20])  # 20 repeats
    flywheel.main(["--home", str(home), "--pairs", str(drops)])
    row = jsonl.read(home / "history.jsonl")[0]
    assert row["decision"] == "waiting" and row["repeats_dropped"] == 20 and "a round needs 50" in row["reason"]
    assert row["new_pairs"] == row["pairs_seen"] == 90 and home_state.new_pair_count(home) == 0
    code, err = run_cli(flywheel.main, ["--home", str(home), "--pairs", str(drops)], capsys)
    assert code == 2 and "no new pairs since the last round (90 stored)" in err


def test_a_home_keeps_one_width(tiny_model_dir, tmp_path, capsys):
    code, err = run_cli(flywheel.main, ["--home", str(tmp_path / "fw"), "--base", str(tiny_model_dir), "--set",
                                        "dense_out_features=16", "--init"], capsys)
    assert code == 2 and "serves 32-d vectors for its whole life" in err
    code, err = run_cli(flywheel.main, ["--home", str(tmp_path / "fw"), "--base", str(tiny_model_dir), "--fractions",
                                        "0.5,0.5,0.1", "--init"], capsys)
    assert code == 2 and "leave some pairs to train on" in err


def test_noise_is_refused_and_a_curated_set_is_reported_apart(tiny_model_dir, tmp_path):
    drops = tmp_path / "drops"
    drops.mkdir()
    val, test = write_tsv(tmp_path / "val.tsv", synthetic_pairs(96, 2)), write_tsv(tmp_path / "test.tsv", synthetic_pairs(300, 3))
    args = ["--home", str(tmp_path / "fw"), "--base", str(tiny_model_dir), "--pairs", str(drops), "--val", str(val),
            "--test", str(test), "--set", SETTINGS, "--alpha", "0.1"]  # round 1's 180 test pairs need its level
    write_tsv(drops / "01.tsv", synthetic_pairs(600, 1))
    flywheel.main(args)
    first = jsonl.read(tmp_path / "fw" / "history.jsonl")[0]
    assert first["decision"] == "promoted" and first["curated"]["verdict"] == "better" and first["curated"]["n"] == 300
    assert first["splits"]["curated"] == 0 or first["splits"]["curated"] > 0  # counted, whatever the overlap
    noise = synthetic_pairs(600, 9)
    labels = np.random.default_rng(0).permutation([y for *_, y in noise])
    write_tsv(drops / "02.tsv", [(a, b, int(y)) for (a, b, _), y in zip(noise, labels)])
    flywheel.main(args + ["--mode", "continue"])
    second = jsonl.read(tmp_path / "fw" / "history.jsonl")[1]
    assert second["decision"] == "refused" and home_state.current_version(tmp_path / "fw")["path"] == "rounds/round-001"
    assert (tmp_path / "fw" / "rounds" / "round-002" / "model.safetensors").is_file()  # kept for inspection


def test_a_crash_during_the_switch_leaves_the_old_current_intact(flywheel_setup, monkeypatch):
    drops, home, args = flywheel_setup
    write_tsv(drops / "01.tsv", synthetic_pairs(600, 1))
    flywheel.main(args)
    before = Embedder.load(home / home_state.current_version(home)["path"]).encode(["t1a t1b"])
    write_tsv(drops / "02.tsv", synthetic_pairs(300, 5))
    real_write_state = home_db.HomeDB.write_state

    def crash(db, cursor, name, value):
        if name == "served":
            raise OSError("power cut (pretend)")
        return real_write_state(db, cursor, name, value)

    monkeypatch.setattr(home_db.HomeDB, "write_state", crash)
    monkeypatch.setattr(flywheel.gate, "level", lambda *args: 1.0)  # any candidate that is ahead wins
    with pytest.raises(OSError, match="power cut"):
        flywheel.main(args)
    assert home_state.current_version(home)["path"] == "rounds/round-001"
    np.testing.assert_array_equal(Embedder.load(home / home_state.current_version(home)["path"]).encode(["t1a t1b"]), before)
    assert len(jsonl.read(home / "history.jsonl")) == 1  # the round is not logged as done: rerun it


def test_a_crash_after_the_switch_before_the_history_line_is_repaired_by_the_next_round(flywheel_setup, monkeypatch):
    drops, home, args = flywheel_setup
    write_tsv(drops / "01.tsv", synthetic_pairs(600, 1))
    real_append = jsonl.append

    def crash(path, row):
        if path.name == "history.jsonl" and row.get("decision") == "promoted" and "repaired" not in row:
            raise OSError("power cut (pretend)")
        return real_append(path, row)

    monkeypatch.setattr(jsonl, "append", crash)
    with pytest.raises(OSError, match="power cut"):
        flywheel.main(args)
    monkeypatch.setattr(jsonl, "append", real_append)
    assert home_state.current_version(home)["version"] == "round-001" and not jsonl.read(home / "history.jsonl")
    write_tsv(drops / "02.tsv", synthetic_pairs(300, 5))
    flywheel.main(args)
    rows = jsonl.read(home / "history.jsonl")
    assert [(r["round"], r["decision"]) for r in rows][0] == (1, "promoted") and "repaired" in rows[0]
    assert rows[1]["round"] == 2 and rows[1]["current"] == "rounds/round-001"  # judged against round 1, not itself
    assert rows[1]["round_of_life"] == 2  # round 1's test is counted


HOLD_THE_LOCK = """
import sys, time
sys.path.insert(0, {root!r})
from embed_ft.state.file_lock import FileLock
with FileLock({path!r}):
    print("held", flush=True)
    time.sleep(60)
"""


def test_one_round_at_a_time_and_a_killed_rounds_lock_is_recovered(flywheel_setup, capsys):
    drops, home, args = flywheel_setup
    flywheel.main(args + ["--init"])
    write_tsv(drops / "01.tsv", synthetic_pairs(60, 1))
    holder = subprocess.Popen([sys.executable, "-c", HOLD_THE_LOCK.format(root=str(ROOT), path=str(home / "round.lock"))],
                              stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    code, err = run_cli(flywheel.main, args, capsys)
    assert code == 2 and err.count("\n") == 1 and f"held by pid {holder.pid}" in err and "one at a time" in err
    holder.send_signal(signal.SIGKILL)  # a round killed while it held the lock
    holder.wait()
    started = time.time()
    flywheel.main(args + ["--wait"])
    assert time.time() - started < 30 and jsonl.read(home / "history.jsonl")[0]["decision"] == "waiting"


def test_the_audit_names_its_disagreement_with_what_the_decisions_saw(tmp_path):
    promoted = {"decision": "promoted", "candidate": "rounds/round-001", "candidate_error": 0.10, "test_pairs": 2000,
                "current_after": "rounds/round-001", "current_error": 0.2}

    class NothingIsADuplicate:  # cosine 0 for every pair: half the audit wrong, far from the 10% the decision saw
        def encode(self, texts, batch_size=128):
            return np.array([[1.0, 0.0] if t in ("a", "c") else [0.0, 1.0] for t in texts])

    pairs = [("a", "b", 1), ("c", "d", 0)] * 200
    right = evaluate.correct(NothingIsADuplicate(), pairs, threshold=0.5)
    result = history.audit(tmp_path, [], promoted, right)
    assert result["audit"]["error"] == 0.5 and not result["audit_agrees"] and "optimistic" in result["note"]
    # the same 400 audit pairs as 2 texts' worth of groups: "a"-"b" 200 times is one group, "c"-"d" another;
    # they tell two stories (all right, all wrong), so the interval by groups covers almost anything
    grouped = history.audit(tmp_path, [], promoted, right, paired.groups_of(pairs))
    assert grouped["audit"]["groups"] == 2 and grouped["audit"]["interval"][1] - grouped["audit"]["interval"][0] > 0.5
    assert grouped["audit_agrees"] and "note" not in grouped
    card.add_audit(tmp_path, promoted | result | {"round": 1, "time": "now", "width": 2, "audit": result["audit"],
                                                   "seen": result["seen"]})
    assert "Note: the decisions saw 10.00%" in (tmp_path / "README.md").read_text()


def test_a_retrieval_round_promotes_on_ranking(flywheel_setup):
    drops, home, args = flywheel_setup
    args = args[:-1] + [args[-1] + " objective=retrieval epochs=6"]
    write_tsv(drops / "01.tsv", synthetic_pairs(600, 1))
    flywheel.main(args)
    first = jsonl.read(home / "history.jsonl")[0]
    assert first["objective"] == "retrieval" and first["traffic"]["test"].startswith("sign test on per-query reciprocal ranks")
    assert first["decision"] == "promoted" and first["traffic"]["mrr_a"] > first["traffic"]["mrr_b"]
    assert first["p_value"] < first["alpha_round"]


KILL_AT = """
import os, signal, sys
sys.path.insert(0, {root!r})
from embed_ft import flywheel, jsonl
from embed_ft.state import home_state
step = {step!r}
die = lambda: os.kill(os.getpid(), signal.SIGKILL)
if step == "after its decision is kept":
    write_json = jsonl.write_json
    jsonl.write_json = lambda path, obj: (write_json(path, obj), path.name == "decision.json" and die())
elif step == "after the switch":
    switch = home_state.switch_current
    home_state.switch_current = lambda *a, **k: (switch(*a, **k), die())
else:  # after the history line, before the round returns
    append = jsonl.append
    jsonl.append = lambda path, row: (append(path, row), path.name == "history.jsonl" and die())
flywheel.gate.level = lambda *args: 1.0  # any candidate that is ahead wins: the round reaches its last steps
flywheel.main({args!r})
"""


@pytest.mark.parametrize("step", ["after its decision is kept", "after the switch", "after the history line"])
def test_kill_9_at_each_of_a_promotions_last_steps_then_history_pointer_and_ledger_agree(flywheel_setup, step):
    drops, home, args = flywheel_setup
    write_tsv(drops / "01.tsv", synthetic_pairs(600, 1))
    killed = subprocess.run([sys.executable, "-c", KILL_AT.format(root=str(ROOT), step=step, args=args)],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    write_tsv(drops / "02.tsv", synthetic_pairs(300, 5))
    flywheel.main(args)  # the next round, as a scheduler would start it
    rows = jsonl.read(home / "history.jsonl")
    promoted = [r["candidate"] for r in rows if r.get("decision") == "promoted"]
    assert [r["round"] for r in rows] == list(range(1, len(rows) + 1))          # each round's line once, in order
    assert home_state.current_version(home)["path"] == (promoted[-1] if promoted else None)  # the pointer is the history's
    judged = [r for r in rows if r.get("decision") in ("promoted", "refused")]
    assert [r["round_of_life"] for r in judged] == list(range(1, len(judged) + 1))  # every test counted once
    if step != "after its decision is kept":   # the switch was made: round 1 promoted, round 2 judged against it
        assert rows[0]["decision"] == "promoted" and rows[1]["current"] == "rounds/round-001"
    splits = home_state.ledger(home).split_of
    test_texts = {data.normalise(t) for a, b, _ in data.load_pairs(str(home / "heldout" / "test.tsv.gz")) for t in (a, b)}
    assert all(splits[t] == "test" for t in test_texts)                          # the ledger still holds every test text there
