import ast
import os
import signal

import modal
import pytest
from conftest import ROOT, run_cli

import results
import sweep
import train
from options import Config


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
        Config(**c)  # every key is a training option
    assert sweep.config_key(configs[0] | {"out": "elsewhere"}) == sweep.config_key(configs[0])
    assert len(sweep.zero_shot_configs(configs)) == 3 * 2  # once per (model, width), not per size


def test_each_run_has_a_training_budget_below_the_container_timeout():
    assert sweep.FIXED["max_minutes"] * 60 <= sweep.CONTAINER_HOURS * 3600 - 15 * 60  # time left to evaluate


def test_modal_app_declares_functions_gpu_image_and_volume():
    assert isinstance(sweep.app, modal.App) and isinstance(sweep.objective, modal.Function)
    spec = sweep.objective._spec_
    assert spec.gpus == "H100" and spec.image is not None and list(spec.volumes) == ["/cache"]
    assert sweep.fetch._spec_.gpus is None  # downloading needs no GPU
    assert isinstance(sweep.image, modal.Image) and isinstance(sweep.volume, modal.Volume)


@pytest.fixture
def sweep_args(tiny_model_dir, pair_files, tmp_path):
    return ["--models", str(tiny_model_dir), "--sizes", "32", "96", "--dims", "8", "16",
            "--data", str(pair_files["train"]), "--val", str(pair_files["val"]), "--test", str(pair_files["test"]),
            "--device", "cpu", "--results", str(tmp_path / "r.jsonl"), "--runs", str(tmp_path / "runs")]


def one_config(tiny_model_dir, pair_files, **changes) -> dict:
    return sweep.grid([str(tiny_model_dir)], [32], [8], data=str(pair_files["train"]), val=str(pair_files["val"]),
                      test=str(pair_files["test"]), device="cpu", **changes)[0]


def test_the_modal_image_carries_every_module_a_run_imports():
    project = {path.stem for path in ROOT.glob("*.py")}

    def imports(name: str) -> set[str]:
        tree = ast.parse((ROOT / f"{name}.py").read_text())
        found = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        found |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        return found & project

    needed, todo = set(), ["train", "evaluate", "results"]
    while todo:
        name = todo.pop()
        if name not in needed:
            needed.add(name)
            todo += imports(name)
    source = (ROOT / "sweep.py").read_text()
    call = source[source.index(".add_local_python_source("):].split(")", 1)[0]
    assert needed <= set(ast.literal_eval("(" + call.split("(", 1)[1] + ",)")), needed


def test_objective_runs_locally_and_records_where_it_ran(tiny_model_dir, pair_files, tmp_path):
    config = one_config(tiny_model_dir, pair_files)
    with pytest.warns(UserWarning, match="executing locally"):  # Modal: no volume outside a container
        result = sweep.objective.local(config, str(tmp_path))
    assert result["training"]["pairs"] == 32 * sweep.FIXED["epochs"] and result["config"] == config
    assert result["resumed_at_steps"] == []
    assert result["environment"]["torch"] and "gpu" in result["environment"]
    assert (tmp_path / result["key"] / "metrics.json").is_file()


def test_a_preempted_run_resumes_from_its_checkpoint(tiny_model_dir, pair_files, tmp_path, monkeypatch):
    """Preemption, simulated: Modal sends the container a signal, then runs the same input again."""
    config = one_config(tiny_model_dir, pair_files, epochs=3, dataset_size=64)
    calls = []

    class Preempted(train.losses.OnlineContrastiveLoss):
        def forward(self, a, b, labels):
            calls.append(1)
            if len(calls) == 4:
                os.kill(os.getpid(), signal.SIGTERM)
            return super().forward(a, b, labels)

    with monkeypatch.context() as m:
        m.setitem(train.losses.BY_NAME, "ocl", lambda c: Preempted(c.margin))
        with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):  # the container goes down
            sweep.objective.local(config, str(tmp_path))
    assert (tmp_path / sweep.config_key(config) / "checkpoint.pt").is_file()
    with pytest.warns(UserWarning):
        result = sweep.objective.local(config, str(tmp_path))  # Modal's retry, on the same input
    assert result["resumed_at_steps"] == [4] and result["training"]["steps"] == 3 * 2  # 3 epochs of 64 pairs, batch 32


def test_a_container_failure_is_recorded_with_its_configuration(tiny_model_dir, pair_files, tmp_path, capsys):
    configs = [one_config(tiny_model_dir, pair_files), one_config(tiny_model_dir, pair_files, seed=1)]
    outcomes = [{"kind": "run", "key": sweep.config_key(configs[0]), "config": configs[0], "error": "ValueError: x"},
                TimeoutError("Function timed out after 7200 seconds")]
    sweep.record_all(configs, outcomes, tmp_path / "r.jsonl")
    rows = results.read(tmp_path / "r.jsonl")
    assert rows[1] == {"kind": "run", "key": sweep.config_key(configs[1]), "config": configs[1],
                       "error": "TimeoutError: Function timed out after 7200 seconds"}
    assert f"(key {sweep.config_key(configs[1])}): TimeoutError" in capsys.readouterr().out
    assert sweep.pending(configs, tmp_path / "r.jsonl") == configs  # both are tried again


def test_local_sweep_writes_results_and_figure_and_skips_what_is_done(sweep_args, tmp_path, monkeypatch, capsys):
    sweep.main(["--local"] + sweep_args)
    rows = results.read(tmp_path / "r.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["config"]["dataset_size"], r["config"]["dense_out_features"]) for r in runs) == [
        (32, 8), (32, 16), (96, 8), (96, 16)]
    assert sorted(r["dimensions"] for r in rows if r["kind"] == "zero_shot") == [8, 16]  # once per width
    assert all(r["fine_tuned"]["test"]["n_pairs"] == 96 for r in runs)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 4
    monkeypatch.setattr(train, "train", lambda config, on_checkpoint=None: pytest.fail("a finished configuration ran again"))
    sweep.main(["--local"] + sweep_args)
    assert "4 configurations, 4 already done, running 0" in capsys.readouterr().out
    assert len(results.read(tmp_path / "r.jsonl")) == 6


def test_the_zero_shot_row_is_what_training_starts_from(tiny_model_dir, pair_files, tmp_path):
    config = one_config(tiny_model_dir, pair_files)
    row = sweep.evaluate_once(config)
    metrics = train.train(Config(**config | {"zero_shot": True}, out=str(tmp_path)))
    assert row["val"] == metrics["zero_shot"]["val"] and row["test"] == metrics["zero_shot"]["test"]


def test_interrupted_sweep_resumes_and_failures_are_retried(sweep_args, tmp_path, monkeypatch, capsys):
    real_train, calls = train.train, []

    def flaky(config, on_checkpoint=None):
        calls.append(config.dataset_size)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory (pretend)")
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_train(config, on_checkpoint)

    monkeypatch.setattr(train, "train", flaky)
    with pytest.raises(KeyboardInterrupt):
        sweep.main(["--local"] + sweep_args)
    runs = [r for r in results.read(tmp_path / "r.jsonl") if r["kind"] == "run"]
    assert ["fine_tuned" in r for r in runs] == [True, False] and "out of memory" in runs[1]["error"]
    monkeypatch.setattr(train, "train", real_train)
    sweep.main(["--local"] + sweep_args)
    assert "4 configurations, 1 already done, running 3" in capsys.readouterr().out
    assert sum("fine_tuned" in r for r in results.read(tmp_path / "r.jsonl")) == 4


def test_baselines_and_plot_from_the_jsonl_alone(sweep_args, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from fake_openai import FakeOpenAI
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("HOME", str(tmp_path))  # the embedding cache goes under ~/.cache
    with FakeOpenAI() as server:
        sweep.main(["--local", "--baseline", "openai:text-embedding-3-small", "--baseline", str(tiny_model_dir),
                    "--base-url", server.base_url, "--sizes", "32", "--dims", "8"] + sweep_args[:2] + sweep_args[8:])
        assert {r["body"]["dimensions"] for r in server.embedding_requests} == {8}
    rows = results.read(tmp_path / "r.jsonl")
    assert [(r["kind"], r.get("model"), r.get("dimensions")) for r in rows if r["kind"] != "run"] == [
        ("zero_shot", str(tiny_model_dir), 8), ("baseline", "openai:text-embedding-3-small", 8),
        ("baseline", str(tiny_model_dir), 32)]  # a published encoder at its own width
    capsys.readouterr()
    sweep.main(["--plot", str(tmp_path / "r.jsonl"), "--figure", str(tmp_path / "again.png")])
    table = capsys.readouterr().out
    assert "text-embedding-3-small" in table and f"{rows[-1]['test']['error_rate']:10.2%}" in table
    assert (tmp_path / "again.png").stat().st_size > 10_000


def test_bad_sweep_input_is_one_line(sweep_args, capsys):
    code, err = run_cli(sweep.main, ["--local"] + sweep_args[:2] + ["--sizes", "-5"] + sweep_args[4:], capsys)
    assert code == 2 and err == "error: --sizes and --dims must be 0 or more\n"
