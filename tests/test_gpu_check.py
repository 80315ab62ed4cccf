"""The GPU check dry-runs here, on the CPU with tiny sizes, so that its first run on a GPU works."""
import gzip
import json
import shutil
import subprocess
import sys

from conftest import ROOT, synthetic_pairs, write_tsv


def test_gpu_check_dry_runs_on_cpu(tiny_model_dir, tmp_path):
    pack = tmp_path / "pack"  # the layout ../shared/pack-for-device writes
    shutil.copytree(tiny_model_dir, pack / "sentence-transformers-all-MiniLM-L6-v2-bf16")
    (pack / "quora").mkdir()
    for name, n, seed in [("train", 192, 1), ("val", 96, 2), ("test", 96, 3)]:
        tsv = write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(n, seed))
        with gzip.open(pack / "quora" / f"{name}.tsv.gz", "wb") as f:
            f.write(tsv.read_bytes())
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--pack", str(pack), "--dry-run",
                             "--out", str(tmp_path / "check.json")], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "check.json").read_text())
    assert report["tests"]["passed"] and report["dry_run"] and report["skipped"] == []
    assert report["host"]["us_per_op"] > 0 and report["host"]["measured_peak_tflop_per_s"] > 0
    assert [r["variant"] for r in report["profile"]] == ["before", "no sync, 1 group"]
    assert all(r["host_ms_per_step"] > 0 and r["host_syncs_per_step"] == 0 for r in report["profile"])  # no GPU here
    assert all(0 < r["ops_cpu_ms_per_step"] and len(r["top_host_ops"]) == 15 for r in report["profile"])
    assert [(r["variant"], r["batch"]) for r in report["steps"]] == [
        (v, 4) for v in ("before", "no sync, 1 group, cuDNN attention", "no sync, 2 groups", "no sync, 1 group")]
    assert all(r["pairs_per_s"] > 0 and r["tflop_per_s"] > 0 for r in report["steps"])
    assert 0 <= report["finetune"][0]["test_error"] <= 1
    assert "bge-base shapes" in result.stdout and "all-MiniLM-L6-v2" in result.stdout
