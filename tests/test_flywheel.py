import os
import numpy as np
import pytest
from conftest import TEST_DEVICE, run_cli, synthetic_pairs, write_tsv

import flywheel
import jsonl
from model import Embedder


@pytest.fixture
def flywheel_setup(tiny_model_dir, tmp_path):
    drops = tmp_path / "drops"
    drops.mkdir()
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(96, 2))
    test = write_tsv(tmp_path / "test.tsv", synthetic_pairs(400, 3))
    settings = f"epochs=4 batch_size=16 lr=1e-3 dense_out_features=16 device={TEST_DEVICE}"
    args = ["--home", str(tmp_path / "fw"), "--base", str(tiny_model_dir), "--pairs", str(drops),
            "--val", str(val), "--test", str(test), "--set", settings]
    return drops, tmp_path / "fw", args


def test_rounds_promote_a_winner_refuse_noise_and_log(flywheel_setup, tmp_path, capsys):
    drops, home, args = flywheel_setup
    write_tsv(drops / "01.tsv", synthetic_pairs(192, 1))
    flywheel.main(args)
    first = jsonl.read(home / "history.jsonl")[0]
    assert first["decision"] == "promoted" and first["current"] == "base" and first["trained_on"] == 192
    assert first["candidate_error"] < first["current_error"] and first["p_value"] < 0.05
    assert flywheel.current_version(home)["path"] == "rounds/round-001"
    assert Embedder.load(home / "rounds/round-001").dim == 16
    # Round 2: labels shuffled, trained from the current model on the new file only: refused.
    noise = synthetic_pairs(192, 9)
    labels = np.random.default_rng(0).permutation([y for *_, y in noise])
    write_tsv(drops / "02.tsv", [(a, b, int(y)) for (a, b, _), y in zip(noise, labels)])
    flywheel.main(args + ["--mode", "continue"])
    second = jsonl.read(home / "history.jsonl")[1]
    assert second["decision"] == "refused" and 180 < second["trained_on"] <= 192 and second["new_files"] == 1
    assert flywheel.current_version(home)["path"] == "rounds/round-001"  # unchanged
    assert (home / "rounds" / "round-002" / "model.safetensors").is_file()  # kept for inspection
    flywheel.main(["--plot", str(home / "history.jsonl")])
    assert (home / "history.png").stat().st_size > 10_000
    code, err = run_cli(flywheel.main, args + ["--mode", "continue"], capsys)
    assert code == 2 and "no new pair files since the last round" in err


def test_a_retrieval_round_promotes_on_ranking_and_refuses_noise(flywheel_setup):
    drops, home, args = flywheel_setup
    args = args[:-1] + [args[-1] + " objective=retrieval epochs=6"]
    write_tsv(drops / "01.tsv", synthetic_pairs(192, 1))
    flywheel.main(args)
    first = jsonl.read(home / "history.jsonl")[0]
    assert first["objective"] == "retrieval" and first["test"].startswith("sign test on per-query reciprocal ranks")
    assert first["decision"] == "promoted" and first["mrr_a"] > first["mrr_b"] and first["p_value"] < 0.05
    assert first["a_better_queries"] > first["b_better_queries"]
    # Round 2: texts paired at random. Shuffled labels alone are not noise for ranking: half of the
    # pairs labelled duplicates still are, and on a GPU six more epochs of them won a round.
    noise = synthetic_pairs(192, 9)
    rng = np.random.default_rng(0)
    seconds, labels = rng.permutation([b for _, b, _ in noise]), rng.permutation([y for *_, y in noise])
    write_tsv(drops / "02.tsv", [(a, b, int(y)) for (a, _, _), b, y in zip(noise, seconds, labels)])
    flywheel.main(args + ["--mode", "continue"])
    second = jsonl.read(home / "history.jsonl")[1]
    assert second["decision"] == "refused" and flywheel.current_version(home)["path"] == "rounds/round-001"


def test_a_crash_during_the_switch_leaves_the_old_current_intact(flywheel_setup, monkeypatch):
    drops, home, args = flywheel_setup
    write_tsv(drops / "01.tsv", synthetic_pairs(192, 1))
    flywheel.main(args)
    before = Embedder.load(home / flywheel.current_version(home)["path"]).encode(["t1a t1b"])
    write_tsv(drops / "02.tsv", synthetic_pairs(192, 5))
    real_replace = os.replace

    def crash(src, dst):
        if str(dst).endswith("current.json"):
            raise OSError("power cut (pretend)")
        return real_replace(src, dst)

    monkeypatch.setattr(jsonl.os, "replace", crash)
    sure_winner = {"only_a_right": 9, "only_b_right": 0, "p_value": 0.001, "verdict": "better", "n": 400,
                   "error_a": 0.1, "error_b": 0.2, "interval_a": (0, 1), "interval_b": (0, 1)}
    monkeypatch.setattr(flywheel.paired, "compare_pairs", lambda a, b, alpha=0.05: sure_winner)
    with pytest.raises(OSError, match="power cut"):
        flywheel.main(args)
    assert flywheel.current_version(home)["path"] == "rounds/round-001"
    np.testing.assert_array_equal(Embedder.load(home / flywheel.current_version(home)["path"]).encode(["t1a t1b"]), before)
    assert len(jsonl.read(home / "history.jsonl")) == 1  # the round is not logged as done: rerun it


def test_the_settings_are_kept_so_a_round_needs_only_the_home(flywheel_setup, capsys):
    drops, home, args = flywheel_setup
    code, err = run_cli(flywheel.main, ["--home", str(home)], capsys)
    assert code == 2 and "give --base, --val, --test once" in err
    flywheel.main(args + ["--init"])
    assert not (home / "history.jsonl").exists()
    write_tsv(drops / "01.tsv", synthetic_pairs(96, 1) + synthetic_pairs(96, 1)[:40])  # 40 repeats
    assert flywheel.new_pair_count(home, drops) == 136
    flywheel.main(["--home", str(home), "--pairs", str(drops)])
    row = jsonl.read(home / "history.jsonl")[0]
    assert row["repeats_dropped"] == 40 and row["trained_on"] == 96
    assert flywheel.new_pair_count(home, drops) == 0
