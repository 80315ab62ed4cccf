"""Every entry point, every path option, every wrong kind of path: one `error:` line, exit code 2,
and nothing that an earlier run left behind changes. The options are found by walking each entry
point's argparse parser, so a new path option is covered the day it is added."""
import argparse
import hashlib

import pytest
from conftest import run_cli, st_modules, synthetic_pairs, write_tsv

from embed_ft import corpus, corpus_search, dedup, evaluate, flywheel, paths, serve, sweep, train

ENTRY_POINTS = {"train": train.main, "evaluate": evaluate.main, "dedup": dedup.main, "flywheel": flywheel.main,
                "sweep": sweep.main, "serve": serve.main, "corpus embed": corpus.embed_main,
                "corpus index": corpus_search.index_main, "corpus search": corpus_search.search_main}
# Options whose names say "a path" must declare a path kind (a metavar of paths.KINDS): the guard
# against a path option added with a plain metavar, which the walk would not see.
PATH_NAMES = {"model", "models", "base", "baseline", "data", "val", "test", "out", "home", "pairs", "cache", "json",
              "results", "runs", "figure", "plot", "file"}


def parser_of(main) -> argparse.ArgumentParser:
    """The parser an entry point builds, caught as it parses (no entry point runs)."""
    caught = []

    def catch(self, *args, **kwargs):
        caught.append(self)
        raise SystemExit(0)

    original = argparse.ArgumentParser.parse_args
    argparse.ArgumentParser.parse_args = catch
    try:
        with pytest.raises(SystemExit):
            main(["--help"])
    finally:
        argparse.ArgumentParser.parse_args = original
    return caught[0]


@pytest.fixture
def world(tmp_path, tiny_model_dir):
    """Valid paths for every kind, an earlier run's files, and the wrong kinds to try."""
    files = {name: write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(40, seed)) for name, seed in [("val", 1), ("test", 2)]}
    home = tmp_path / "fw"
    flywheel.main(["--home", str(home), "--base", str(tiny_model_dir), "--val", str(files["val"]), "--test",
                   str(files["test"]), "--init"])
    (tmp_path / "earlier-out").mkdir()
    (tmp_path / "earlier-out" / "metrics.json").write_text("{}")
    a_file = tmp_path / "a-file.txt"
    a_file.write_text("not a folder\n")
    valid = {"FILE": str(files["val"]), "DIR": str(home), "PAIRS": str(files["val"]), "OUT": str(tmp_path / "new.json"),
             "OUTDIR": str(tmp_path / "new-folder"), "DATA": str(files["val"]), "MODEL": str(tiny_model_dir)}
    wrong = {"FILE": [tmp_path / "missing.tsv", tmp_path / "earlier-out", a_file / "x.tsv"],
             "DIR": [tmp_path / "missing-folder", a_file, a_file / "x"],
             "PAIRS": [tmp_path / "missing.tsv", a_file / "x.tsv"],
             "OUT": [tmp_path / "earlier-out", a_file / "x.json"],
             "OUTDIR": [a_file, a_file / "x"],
             "DATA": [tmp_path / "earlier-out", tmp_path / "missing.tsv", a_file / "x.tsv"],
             "MODEL": [a_file, tmp_path / "missing-model", a_file / "x"]}
    return tmp_path, valid, wrong


def snapshot(folder) -> dict:
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.rglob("*")) if p.is_file()}


def base_argv(name: str, parser: argparse.ArgumentParser, valid: dict, option: str) -> list[str]:
    """Every required option (and the positional) with a valid value of its kind; of a required
    group of alternatives, the option under test if it is one, else the first with a path kind."""
    argv = []
    for action in parser._actions:
        if action.required or (not action.option_strings and action.dest != "help"):
            value = valid.get(action.metavar, "x")
            argv += [value] if not action.option_strings else [action.option_strings[0], value]
    for group in parser._mutually_exclusive_groups:
        if not group.required or option in [a.option_strings[0] for a in group._group_actions]:
            continue
        flags = [a for a in group._group_actions if a.nargs == 0]  # sweep's --local: runs, unlike --plot
        chosen = flags[0] if flags else next(a for a in group._group_actions if a.metavar in valid)
        argv += chosen.option_strings[:1] + ([] if flags else [valid[chosen.metavar]])
    return argv


def cases():
    for name, main in ENTRY_POINTS.items():
        for action in parser_of(main)._actions:
            if action.metavar in paths.KINDS:
                yield name, action.option_strings[0] if action.option_strings else action.dest, action.metavar


CASES = list(cases())


def test_every_option_that_names_a_path_declares_its_kind():
    for name, main in ENTRY_POINTS.items():
        for action in parser_of(main)._actions:
            if action.dest in PATH_NAMES:
                assert action.metavar in paths.KINDS, f"{name} {action.option_strings}: no path kind (metavar)"
    assert len(CASES) >= 30  # the walk finds them (train alone has five)


@pytest.mark.parametrize("entry, option, kind", CASES, ids=[f"{e} {o}" for e, o, _ in CASES])
def test_a_wrong_kind_of_path_is_one_error_line_and_changes_nothing(world, entry, option, kind, capsys):
    tmp_path, valid, wrong = world
    main = ENTRY_POINTS[entry]
    parser = parser_of(main)
    argv = base_argv(entry, parser, valid, option)
    before = snapshot(tmp_path)
    for bad in wrong[kind]:
        if option.startswith("--"):
            given = argv + [option, str(bad)]
        else:  # the positional
            given = [str(bad) if a == valid[kind] and i == argv.index(valid[kind]) else a for i, a in enumerate(argv)]
        code, err = run_cli(main, given, capsys)
        assert code == 2, (given, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and str(bad) in lines[0], (given, err)
        assert snapshot(tmp_path) == before


def test_each_filtering_step_that_empties_says_what_removed_everything(tiny_model_dir, tmp_path, capsys):
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(40, 1))
    test = write_tsv(tmp_path / "test.tsv", synthetic_pairs(40, 2))
    overlapping = write_tsv(tmp_path / "train.tsv", synthetic_pairs(40, 1))  # the validation pairs again
    code, err = run_cli(train.main, ["--model", str(tiny_model_dir), "--data", str(overlapping), "--val", str(val),
                                     "--test", str(test), "--out", str(tmp_path / "out"), "--device", "cpu"], capsys)
    assert code == 2 and "all 40 training pairs share a text with the validation or test pairs" in err
    assert not (tmp_path / "out").exists()  # nothing written
    home = tmp_path / "fw"
    drops = write_tsv(tmp_path / "drops.tsv", synthetic_pairs(40, 2))
    code, err = run_cli(flywheel.main, ["--home", str(home), "--base", str(tiny_model_dir), "--val", str(val),
                                        "--test", str(test), "--set", "device=cpu", "--pairs", str(drops)], capsys)
    assert code == 2 and "all 40 training pairs share a text" in err and "the round has nothing to train on" in err
    assert not (home / "history.jsonl").exists()
    code, err = run_cli(train.main, ["--model", str(tiny_model_dir), "--data", str(val), "--dataset-size", "500",
                                     "--out", str(tmp_path / "out2"), "--device", "cpu"], capsys)
    assert code == 2 and "--dataset-size 500 is more than" in err


@pytest.mark.parametrize("argv, expected", [
    (["--device", "gpu"], "--device gpu: use auto, cpu, cuda or cuda:N"),
    (["--columns", "a,b"], "--columns a,b: give three column names"),
    (["--precision", "int4"], "invalid choice"),
])
def test_a_value_a_library_would_parse_is_checked_by_us_first(tiny_model_dir, tmp_path, capsys, argv, expected):
    val = write_tsv(tmp_path / "val.tsv", synthetic_pairs(40, 1))
    code, err = run_cli(train.main, ["--model", str(tiny_model_dir), "--data", str(val), "--out", str(tmp_path / "o")]
                        + argv, capsys)
    assert code == 2 and expected in err and "Traceback" not in err


@pytest.mark.parametrize("setting, expected", [("epochs=three", "epochs takes an integer"),
                                               ("lr=-1", "--lr must be more than 0"),
                                               ("select_best=maybe", "select_best is true or false"),
                                               ("colour=red", "unknown option 'colour'"),
                                               ("model=./gone", "--set model ./gone: model folder not found"),
                                               ("val=./gone.tsv", "--set val ./gone.tsv: file not found")])
def test_a_flywheel_set_is_checked_before_the_round(tiny_model_dir, tmp_path, capsys, setting, expected):
    code, err = run_cli(flywheel.main, ["--home", str(tmp_path / "fw"), "--base", str(tiny_model_dir), "--val",
                                        str(write_tsv(tmp_path / "v.tsv", synthetic_pairs(40, 1))), "--test",
                                        str(write_tsv(tmp_path / "t.tsv", synthetic_pairs(40, 2))), "--set", setting], capsys)
    assert code == 2 and expected in err
    assert not (tmp_path / "fw" / "flywheel.json").exists()


def published(tiny_model_dir, folder, pooling: str, prompts: dict) -> str:
    """A model folder as sentence-transformers itself saves one (a bge-style CLS model, an e5-style
    model with prompts and a default)."""
    from sentence_transformers import SentenceTransformer
    models = st_modules()
    modules = [models.Transformer(str(tiny_model_dir), max_seq_length=32), models.Pooling(32, pooling), models.Normalize()]
    SentenceTransformer(modules=modules, prompts=prompts, default_prompt_name=next(iter(prompts), None),
                        device="cpu").save(str(folder))
    return str(folder)


def accepts(entry: str, option: str, model: str, tmp_path, files: dict) -> list[str] | None:
    """A short real invocation of the entry point with `model` as the option's value; None for
    serve, whose main runs until stopped (its app is built and asked instead)."""
    quick = ["--val", files["val"], "--test", files["test"], "--device", "cpu"]
    out = str(tmp_path / f"{entry}-{option.strip('-')}")
    return {("train", "--model"): ["--model", model, "--data", files["train"], "--epochs", "1", "--out", out] + quick,
            ("evaluate", "--model"): ["--model", model] + quick,
            ("dedup", "--model"): [files["val"], "--model", model, "--threshold", "0.9", "--device", "cpu", "--out", out],
            ("flywheel", "--base"): ["--home", out, "--base", model, "--val", files["val"], "--test", files["test"], "--init"],
            ("sweep", "--models"): ["--local", "--models", model, "--sizes", "40", "--dims", "8", "--data", files["train"],
                                    "--results", out + ".jsonl", "--runs", out, "--set", "epochs=1"] + quick,
            ("sweep", "--baseline"): ["--local", "--models", files["model"], "--sizes", "40", "--dims", "8", "--data",
                                      files["train"], "--results", out + ".jsonl", "--runs", out, "--set", "epochs=1",
                                      "--baseline", model] + quick,
            ("corpus embed", "--model"): [files["texts"], "--model", model, "--out", out, "--device", "cpu"],
            ("serve", "--model"): None}[entry, option]


@pytest.mark.parametrize("pooling, prompts", [("cls", {}), ("mean", {"duplicates": "the ", "query": "why "})])
def test_a_folder_sentence_transformers_saved_is_accepted_wherever_a_model_is_named(tiny_model_dir, tmp_path, capsys,
                                                                                     pooling, prompts):
    import httpx
    import numpy as np
    from conftest import LoopbackServer

    from embed_ft.model import load_model
    model = published(tiny_model_dir, tmp_path / "published", pooling, prompts)
    files = {name: str(write_tsv(tmp_path / f"{name}.tsv", synthetic_pairs(40, seed))) for name, seed in [("train", 3), ("val", 1), ("test", 2)]}
    files["model"] = str(tiny_model_dir)
    (tmp_path / "texts.txt").write_text("t1a t1b\nt2a the\n")
    files["texts"] = str(tmp_path / "texts.txt")
    walked = [(entry, option) for entry, option, kind in CASES if kind == "MODEL"]
    assert len(walked) >= 7
    for entry, option in walked:
        argv = accepts(entry, option, model, tmp_path, files)
        if argv is None:
            with LoopbackServer(serve.make_app(None, model, device="cpu", precision="fp32")) as server:
                served = httpx.post(server.url + "/v1/embeddings", json={"input": ["t1a t1b"]}).json()
            np.testing.assert_allclose(served["data"][0]["embedding"], load_model(model).encode(["t1a t1b"], bf16=False)[0],
                                       atol=1e-5)
            continue
        ENTRY_POINTS[entry](argv)  # an error here is the test's failure, traceback and all
    import json
    ran = json.loads((tmp_path / "train-model" / "metrics.json").read_text())["model"]
    assert (ran["pooling"], ran["default_prompt_name"]) == (pooling, next(iter(prompts), None))
