import json

import modal
import pytest
from conftest import synthetic_pairs, write_tsv

import sweep
import train


def test_grid_is_the_product_with_everything_else_fixed():
    assert sweep.SIZES == [100, 200, 400, 800, 1600, 3200, 6400, 12800, 25600, 51200, 102400, 0]
    configs = sweep.grid(sweep.MODELS, sweep.SIZES, sweep.DIMS)
    assert len(configs) == 3 * 12 * 2
    assert len({sweep.config_key(c) for c in configs}) == len(configs)
    assert {(c["model"], c["dataset_size"], c["dense_out_features"]) for c in configs} == {
        (m, n, d) for m in sweep.MODELS for n in sweep.SIZES for d in sweep.DIMS}
    for c in configs:
        assert {k: c[k] for k in sweep.FIXED} == sweep.FIXED
        assert c["trust_remote_code"] == c["model"].startswith("jinaai/")
        train.Config(**c)  # every key is a training option
    assert sweep.config_key(configs[0] | {"out": "elsewhere"}) == sweep.config_key(configs[0])


def test_modal_app_declares_function_gpu_image_and_volume():
    assert isinstance(sweep.app, modal.App) and isinstance(sweep.objective, modal.Function)
    spec = sweep.objective._spec_
    assert spec.gpus == "H100" and spec.image is not None and list(spec.volumes) == ["/cache"]
    assert isinstance(sweep.image, modal.Image) and isinstance(sweep.volume, modal.Volume)


@pytest.fixture
def sweep_args(tiny_model_dir, pair_files, tmp_path):
    return ["--models", str(tiny_model_dir), "--sizes", "32", "96", "--dims", "8", "16",
            "--data", str(pair_files["train"]), "--val", str(pair_files["val"]), "--test", str(pair_files["test"]),
            "--device", "cpu", "--results", str(tmp_path / "r.jsonl"), "--runs", str(tmp_path / "runs")]


def test_objective_runs_locally(tiny_model_dir, pair_files, tmp_path):
    config = sweep.grid([str(tiny_model_dir)], [32], [8], data=str(pair_files["train"]), val=str(pair_files["val"]),
                        test=str(pair_files["test"]), device="cpu")[0]
    with pytest.warns(UserWarning, match="executing locally"):  # Modal: no volume outside a container
        result = sweep.objective.local(config, str(tmp_path))
    assert result["training"]["pairs"] == 32 and result["config"] == config
    assert (tmp_path / result["key"] / "metrics.json").is_file()


def test_local_sweep_writes_results_and_figure_and_skips_what_is_done(sweep_args, tmp_path, monkeypatch, capsys):
    sweep.main(["--local"] + sweep_args)
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sorted((r["config"]["dataset_size"], r["config"]["dense_out_features"]) for r in rows) == [
        (32, 8), (32, 16), (96, 8), (96, 16)]
    assert all(r["fine_tuned"]["test"]["n_pairs"] == 96 for r in rows)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 4
    monkeypatch.setattr(train, "train", lambda config: pytest.fail("a finished configuration ran again"))
    sweep.main(["--local"] + sweep_args)
    assert "4 configurations, 4 already done, running 0" in capsys.readouterr().out
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 4


def test_interrupted_sweep_resumes_and_failures_are_retried(sweep_args, tmp_path, monkeypatch, capsys):
    real_train, calls = train.train, []

    def flaky(config):
        calls.append(config.dataset_size)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (pretend)")
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(config)

    monkeypatch.setattr(train, "train", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(["--local"] + sweep_args)
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert ["fine_tuned" in r for r in rows] == [True, False] and "out of memory" in rows[1]["error"]
    monkeypatch.setattr(train, "train", real_train)
    sweep.main(["--local"] + sweep_args)
    assert "4 configurations, 1 already done, running 3" in capsys.readouterr().out
    done = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert sum("fine_tuned" in r for r in done) == 4


def test_baseline_and_plot_from_the_jsonl_alone(sweep_args, tmp_path, monkeypatch, capsys):
    from fake_openai import FakeOpenAI
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("HOME", str(tmp_path))  # the embedding cache goes under ~/.cache
    with FakeOpenAI() as server:
        sweep.main(["--local", "--openai-model", "text-embedding-3-small", "--base-url", server.base_url,
                    "--sizes", "32", "--dims", "8"] + sweep_args[:2] + sweep_args[8:])
        assert {r["body"]["dimensions"] for r in server.embedding_requests} == {8}
    rows = [json.loads(line) for line in (tmp_path / "r.jsonl").read_text().splitlines()]
    assert [r.get("baseline") for r in rows] == [None, "text-embedding-3-small"]
    capsys.readouterr()
    sweep.main(["--plot", str(tmp_path / "r.jsonl"), "--figure", str(tmp_path / "again.png")])
    table = capsys.readouterr().out
    assert "text-embedding-3-small" in table and f"{rows[1]['test']['error_rate']:9.2%}" in table
    assert (tmp_path / "again.png").stat().st_size > 10_000
