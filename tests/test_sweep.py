import ast
import json
import os
import signal
import subprocess
import sys
import time

import modal
import pytest
from conftest import local_modules_imported, ROOT, TEST_DEVICE, run_cli, signal_at_step

from embed_ft import figures, jsonl, paired, sweep, train
from embed_ft.options import Config


def test_grid_is_the_product_with_everything_else_fixed():
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
    assert sweep.grid(sweep.MODELS[:1], [100, 100, 200], [256, 256]) == sweep.grid(sweep.MODELS[:1], [100, 200], [256])


def test_multi_gpu_runs_keep_the_batch_per_gpu_and_have_keys_of_their_own():
    small, full = sweep.grid(sweep.MODELS[:1], [100, 0], [256])
    assert sweep.processes_for(small, 8) == 1 and sweep.processes_for(full, 8) == 8
    assert sweep.scaled_for(full, 8)["batch_size"] == 8 * sweep.FIXED["batch_size"] and sweep.scaled_for(small, 1) == small
    assert sweep.config_key(full, 8) != sweep.config_key(full) == sweep.config_key(full, 1)


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
            "--device", TEST_DEVICE, "--results", str(tmp_path / "r.jsonl"), "--runs", str(tmp_path / "runs")]


def one_config(tiny_model_dir, pair_files, **changes) -> dict:
    return sweep.grid([str(tiny_model_dir)], [32], [8], data=str(pair_files["train"]), val=str(pair_files["val"]),
                      test=str(pair_files["test"]), **{"device": TEST_DEVICE} | changes)[0]


def test_the_modal_image_carries_every_module_a_run_imports():
    project = {path.stem for path in ROOT.glob("*.py")}
    needed = local_modules_imported("train", "evaluate", "jsonl", "openai_embeddings")
    source = (ROOT / "sweep.py").read_text()
    call = source[source.index(".add_local_python_source("):].split(")", 1)[0]
    listed = set(ast.literal_eval("(" + call.split("(", 1)[1] + ",)"))
    assert "embed_ft" in listed and needed <= listed <= project | {"embed_ft"}, (needed - listed, listed - project)


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
    with monkeypatch.context() as m:
        signal_at_step(m, 4)
        with pytest.warns(UserWarning), pytest.raises(KeyboardInterrupt):  # the container goes down
            sweep.objective.local(config, str(tmp_path))
    assert (tmp_path / sweep.config_key(config) / "checkpoint.pt").is_file()
    with pytest.warns(UserWarning):
        result = sweep.objective.local(config, str(tmp_path))  # Modal's retry, on the same input
    assert result["resumed_at_steps"] == [4] and result["training"]["steps"] == 3 * 2  # 3 epochs of 64 pairs, batch 32


class FakeCall:
    """A Modal FunctionCall that finishes after `polls` polls, with `outcome` (raised if an exception)."""

    def __init__(self, outcome, polls: int):
        self.outcome, self.polls = outcome, polls

    def get(self, timeout=None):
        self.polls -= 1
        if self.polls > 0:
            raise TimeoutError
        if isinstance(self.outcome, BaseException):
            raise self.outcome
        return self.outcome


def test_each_result_is_recorded_as_its_run_ends_and_failures_keep_their_configuration(tiny_model_dir, pair_files,
                                                                                        tmp_path, capsys):
    path = tmp_path / "r.jsonl"
    configs = [one_config(tiny_model_dir, pair_files, seed=s) for s in range(3)]
    long_run = {"kind": "run", "key": sweep.config_key(configs[0]), "config": configs[0], "error": "ValueError: x"}
    short_run = {"kind": "run", "key": sweep.config_key(configs[1], 2), "config": configs[1], "error": "KeyError: y"}
    calls = [(configs[0], 1, FakeCall(long_run, polls=3)), (configs[1], 2, FakeCall(short_run, polls=1)),
             (configs[2], 1, FakeCall(modal.exception.FunctionTimeoutError("timed out after 7200 s"), polls=2))]
    seen_while_waiting = []
    sweep.collect(calls, path, sleep=lambda seconds: seen_while_waiting.append(len(jsonl.read(path))))
    assert seen_while_waiting == [1, 2]  # the short run was on disk while the long one still ran
    rows = jsonl.read(path)
    assert rows[:2] == [short_run, {"kind": "run", "key": sweep.config_key(configs[2]), "config": configs[2],
                                    "processes": 1, "error": "FunctionTimeoutError: timed out after 7200 s"}]
    assert rows[2] == long_run
    assert f"(key {sweep.config_key(configs[2])}): FunctionTimeoutError" in capsys.readouterr().out
    runs = [(c, n) for c, n, _ in calls]
    assert sweep.pending(runs, path) == runs  # all three are tried again


def test_a_failed_evaluation_is_recorded_with_its_configuration(tiny_model_dir, pair_files, tmp_path):
    config = one_config(tiny_model_dir, pair_files)
    sweep.record_all([config], [MemoryError("out of memory")], tmp_path / "r.jsonl")
    broken = one_config(tiny_model_dir, pair_files, model=str(tmp_path / "no-such-model"))
    sweep.record(sweep.evaluate_once(broken), tmp_path / "r.jsonl")
    rows = jsonl.read(tmp_path / "r.jsonl")
    assert rows[0]["config"] == config and rows[0]["kind"] == "zero_shot" and "MemoryError" in rows[0]["error"]
    assert rows[1]["config"]["model"] == broken["model"] and "model folder not found" in rows[1]["error"]
    assert sweep.missing_zero_shots([config], tmp_path / "r.jsonl") == sweep.zero_shot_configs([config])


def test_a_finished_run_is_read_back_from_its_folder_not_trained_again(tiny_model_dir, pair_files, tmp_path,
                                                                      monkeypatch):
    """The local client died after the container finished: the rerun finds metrics.json on the volume."""
    config = one_config(tiny_model_dir, pair_files)
    with pytest.warns(UserWarning):
        first = sweep.objective.local(config, str(tmp_path))
    monkeypatch.setattr(train, "train", lambda *a, **k: pytest.fail("a finished run was trained again"))
    with pytest.warns(UserWarning):
        again = sweep.objective.local(config, str(tmp_path))
    assert again["recovered"] and again["fine_tuned"] == first["fine_tuned"] and again["key"] == first["key"]


def test_a_signal_reaches_every_rank_of_a_multi_process_run_and_leaves_a_checkpoint(tiny_model_dir, pair_files,
                                                                                   tmp_path):
    """torchrun inside the objective: SIGTERM to the container's process (a preemption) is passed on;
    rank 0 checkpoints, and the objective's retry resumes from it."""
    config = one_config(tiny_model_dir, pair_files, dataset_size=0, epochs=1000, batch_size=16, select_best=False,
                        device="cpu")  # two processes: one GPU would not do
    out = tmp_path / sweep.config_key(config, 2)
    script = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); import sweep\n"
              f"sweep.run_config({config!r}, {str(tmp_path)!r}, processes=2)")
    process = subprocess.Popen([sys.executable, "-c", script], env=os.environ | {"OMP_NUM_THREADS": "1"},
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (out / "metrics.json").exists() and time.time() < deadline and process.poll() is None:
        time.sleep(0.2)
    time.sleep(1)  # into the training loop
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode != 0, err[-2000:]
    stopped = json.loads((out / "metrics.json").read_text())
    assert stopped["stopped_by"] == "SIGTERM" and stopped["interrupted_at_step"] > 0, err[-2000:]
    assert (out / "checkpoint.pt").is_file()
    step = stopped["interrupted_at_step"]  # a retry resumes there (given a tiny budget, it stops a step on)
    resumed = train.train(sweep.Config(**config | {"max_minutes": 1e-9}, out=str(out), resume=True))
    assert resumed["resumed_at_steps"] == [step] and resumed["training"]["steps"] == step + 1


def test_local_sweep_writes_results_and_figure_and_skips_what_is_done(sweep_args, tmp_path, monkeypatch, capsys):
    sweep.main(["--local"] + sweep_args)
    rows = jsonl.read(tmp_path / "r.jsonl")
    runs = [r for r in rows if r["kind"] == "run"]
    assert sorted((r["config"]["dataset_size"], r["config"]["dense_out_features"]) for r in runs) == [
        (32, 8), (32, 16), (96, 8), (96, 16)]
    assert sorted(r["dimensions"] for r in rows if r["kind"] == "zero_shot") == [8, 16]  # once per width
    assert all(r["fine_tuned"]["test"]["n_pairs"] == 96 for r in runs)
    assert (tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
    assert len(list((tmp_path / "runs").glob("*/metrics.json"))) == 4
    # Each result row carries its verdict against the zero-shot model, paired on the same test pairs
    zero = {r["dimensions"]: r for r in rows if r["kind"] == "zero_shot"}
    for run in runs:
        mine, theirs = (paired.unpack(r["test_correct"]) for r in (run, zero[run["config"]["dense_out_features"]]))
        assert len(mine) == 96 and 1 - mine.mean() == pytest.approx(run["fine_tuned"]["test"]["error_rate"])
        assert figures.verdicts(run, rows) == {"zero-shot": paired.compare_pairs(mine, theirs)["verdict"]}
    table = figures.sweep_table(rows)
    assert "paired test (by groups of pairs that share texts)" in table and table.count("zero-shot") >= 4 and sweep_args[1] in table
    monkeypatch.setattr(train, "train", lambda config, on_checkpoint=None: pytest.fail("a finished configuration ran again"))
    sweep.main(["--local"] + sweep_args)
    assert "4 configurations, 4 already done, running 0" in capsys.readouterr().out
    assert len(jsonl.read(tmp_path / "r.jsonl")) == 6


def test_the_zero_shot_row_is_what_training_reports_as_zero_shot(tiny_model_dir, pair_files, tmp_path):
    config = one_config(tiny_model_dir, pair_files)
    row = sweep.evaluate_once(config)
    metrics = train.train(Config(**config | {"zero_shot": True}, out=str(tmp_path)))
    assert row["val"] == metrics["zero_shot"]["val"] and row["test"] == metrics["zero_shot"]["test"]


def test_interrupted_sweep_resumes_and_failures_are_retried(sweep_args, tmp_path, monkeypatch, capsys):
    """Killed mid-sweep, even mid-write (a torn last line); the rerun, given a point twice, runs it once."""
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
    runs = [r for r in jsonl.read(tmp_path / "r.jsonl") if r["kind"] == "run"]
    assert ["fine_tuned" in r for r in runs] == [True, False] and "out of memory" in runs[1]["error"]
    with (tmp_path / "r.jsonl").open("a") as f:
        f.write('{"kind": "run", "key": "0123')  # the crash came mid-write
    monkeypatch.setattr(train, "train", real_train)
    sweep.main(["--local"] + sweep_args + ["--sizes", "32", "96", "32"])
    captured = capsys.readouterr()
    assert "4 configurations, 1 already done, running 3" in captured.out
    assert "r.jsonl:5 is not a complete JSON line (cut short by a crash?): skipped" in captured.err
    rows = jsonl.read(tmp_path / "r.jsonl")
    assert sum("fine_tuned" in r for r in rows) == 4 and len({r["key"] for r in rows if "fine_tuned" in r}) == 4


def test_baselines_and_plot_from_the_jsonl_alone(sweep_args, tiny_model_dir, tmp_path, monkeypatch, capsys):
    from fake_openai import FakeOpenAI
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test")
    monkeypatch.setenv("HOME", str(tmp_path))  # the embedding cache goes under ~/.cache
    with FakeOpenAI() as server:
        sweep.main(["--local", "--baseline", "openai:text-embedding-3-small", "--baseline", str(tiny_model_dir),
                    "--base-url", server.base_url, "--sizes", "32", "--dims", "8"] + sweep_args[:2] + sweep_args[8:])
        assert {r["body"]["dimensions"] for r in server.embedding_requests} == {8}
    rows = jsonl.read(tmp_path / "r.jsonl")
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


def test_set_reaches_every_run_and_a_bad_one_is_refused_first(sweep_args, tmp_path, monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sweep, "run_config", lambda config, out_root: seen.append(config) or {"kind": "run", "error": "x"})
    monkeypatch.setattr(sweep, "evaluate_once", lambda config: {"kind": "zero_shot", "error": "x"})
    monkeypatch.setattr(sweep, "finish", lambda *a: None)
    sweep.main(["--local"] + sweep_args + ["--set", "epochs=1 margin=0.3"])
    assert len(seen) == 4 and all(c["epochs"] == 1 and c["margin"] == 0.3 for c in seen)
    code, err = run_cli(sweep.main, ["--local"] + sweep_args + ["--set", "colour=red"], capsys)
    assert code == 2 and "unknown option 'colour'" in err
