"""The flywheel on many processes (the short version of benchmarks/flywheel_scale.py): one home on a
real PostgreSQL, three serve.py processes, retries, reused ids and contradictions across them, a
kill -9 and a promotion in the middle."""
import sys

from conftest import ROOT, TEST_DEVICE, synthetic_pairs, write_tsv

from embed_ft import flywheel

sys.path.insert(0, str(ROOT / "benchmarks"))
from flywheel_scale import scenario  # noqa: E402


def test_three_processes_keep_every_promise_across_a_kill_and_a_promotion(tiny_model_dir, tmp_path, postgres, capsys):
    home = tmp_path / "fw"
    val, test = write_tsv(tmp_path / "val.tsv", synthetic_pairs(96, 2)), write_tsv(tmp_path / "test.tsv", synthetic_pairs(300, 3))
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--val", str(val), "--test", str(test), "--set",
                   f"epochs=4 batch_size=16 lr=1e-3 device={TEST_DEVICE}", "--init", "--database", postgres.database("scale")])
    report = scenario(home, synthetic_pairs(600, 1), synthetic_pairs(200, 4)[:120], device=TEST_DEVICE, pause=0.05)
    assert report["lost"] == report["doubled"] == report["unexpected"] == 0, report
    assert report["stored"] == report["acknowledged"] > 600
    assert report["conflicts_listed"] == report["conflicts_expected"] > 0
    assert report["reused_id_conflicts"] == report["label_conflicts"] == report["conflicts_expected"] // 2
    assert report["retries"] >= 6 and report["retries_all_duplicates"]
    assert report["new_version"] == "round-001", report["round_output"]
    poll = report["poll_every_s"]
    assert all(s is not None and s < 2 * poll + 3 for s in report["seconds_to_serve"]), report  # + a tiny model's load
    assert report["embeddings_failed"] == 0 and report["versions_answered"] == ["base", "round-001"]
    capsys.readouterr()
    flywheel.main(["--home", str(home), "--conflicts"])
    assert capsys.readouterr().out.count("\n") == report["conflicts_listed"] + 1
