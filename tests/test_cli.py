"""Bad input gets one line: `error: ...` on stderr, exit code 2, no traceback, and no file of an
earlier run changed. Each case here is a row of docs/reliability.md's table of bad inputs."""
import gzip
import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest
from conftest import ROOT, TEST_DEVICE, fault_at_step, run_cli, synthetic_pairs, write_tsv

from embed_ft import errors, evaluate, train


@pytest.fixture
def files(tmp_path, pair_files):
    """Good files, and one bad file of each kind."""
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text1": "a", "text2": "b", "label": 1}\n{"text1": "c", "text2": "d", label: 0}\n')
    latin1 = tmp_path / "latin1.tsv.gz"
    with gzip.open(latin1, "wb") as f:
        f.write("question1\tquestion2\tis_duplicate\nna\xefve\tb\t1\n".encode("latin-1"))  # ï: byte 33 + 2
    short_row = tmp_path / "short_row.tsv"
    short_row.write_text("question1\tquestion2\tis_duplicate\na\tb\t1\nc d\t0\n")
    one_class = write_tsv(tmp_path / "one_class.tsv", [(a, b, 1) for a, b, _ in synthetic_pairs(20, 5)])
    no_tokenizer = tmp_path / "no_tokenizer"
    no_tokenizer.mkdir()
    (no_tokenizer / "config.json").write_text("{}")
    (no_tokenizer / "model.safetensors").write_bytes(b"")
    return dict(pair_files, bad_json=bad_json, latin1=latin1, short_row=short_row, one_class=one_class,
                no_tokenizer=no_tokenizer, out=tmp_path / "out", **damaged_files(tmp_path, pair_files["train"]),
                **clashing_folders(tmp_path))


def damaged_files(tmp_path, good):
    """Files cut short, and files whose contents are not what their names say."""
    cut_gz = tmp_path / "cut.tsv.gz"
    whole = gzip.compress(good.read_bytes() * 20)
    cut_gz.write_bytes(whole[: len(whole) // 2])
    csv_named_parquet = tmp_path / "pairs.parquet"
    csv_named_parquet.write_text(good.read_text().replace("\t", ","))
    plain_named_gz = tmp_path / "plain.tsv.gz"
    plain_named_gz.write_bytes(good.read_bytes())
    return dict(cut_gz=cut_gz, csv_named_parquet=csv_named_parquet, plain_named_gz=plain_named_gz)


def clashing_folders(tmp_path):
    """--out paths that an earlier run, or a run still going, left as they are."""
    a_file = tmp_path / "a_file"
    a_file.write_text("not a folder\n")
    finished, interrupted, locked, damaged = (tmp_path / name for name in ("finished", "interrupted", "locked", "damaged"))
    for folder in (finished, interrupted, locked, damaged):
        folder.mkdir()
    (finished / "metrics.json").write_text(json.dumps({"fine_tuned": {"test": {"error_rate": 0.125}}}))
    (finished / "modules.json").write_text("[]")
    (interrupted / "checkpoint.pt").write_bytes(b"a checkpoint")
    (locked / ".lock").write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid()}))  # alive: us
    (damaged / "checkpoint.pt").write_bytes(b"PK\x03\x04 cut short")
    return dict(a_file=a_file, a_folder=tmp_path, finished=finished, interrupted=interrupted, locked=locked,
                damaged=damaged)


def train_args(files, tiny_model_dir, **changes) -> list[str]:
    args = {"--model": str(tiny_model_dir), "--data": str(files["train"]), "--val": str(files["val"]),
            "--test": str(files["test"]), "--device": TEST_DEVICE, "--out": str(files["out"])} | changes
    return [x for k, v in args.items() for x in (k, v)]


TRAIN_CASES = [  # (case, changed options, the message)
    ("a JSONL line that is not JSON", {"--data": "bad_json"}, r"bad.jsonl line 2: not valid JSON \(Expecting property name enclosed in double quotes, column 30\)"),
    ("a file that is not UTF-8", {"--data": "latin1"}, r"latin1.tsv.gz is not UTF-8 text: byte 0xef at line 2 \(byte 35 of the uncompressed file\); re-save it as UTF-8"),
    ("a CSV/TSV row with the wrong number of fields", {"--data": "short_row"}, r"short_row.tsv line 3: 2 field\(s\) where the header has 3; a stray tab or quote\?"),
    ("a file that does not exist", {"--data": "missing.tsv"}, "--data missing.tsv: file not found"),
    ("unknown column names", {"--columns": "a,b,c"}, r"train.tsv: missing columns \['a', 'b', 'c'\]; found \['question1', 'question2', 'is_duplicate'\]"),
    ("validation pairs of one class", {"--val": "one_class"}, "validation pairs: all 20 pairs are duplicates; a tuned threshold means nothing on a single class: give pairs of both kinds"),
    ("--val without --test", {"--test": ""}, r"give both --val and --test, or neither \(to split them off --data\)"),
    ("--dataset-size above the pairs there are", {"--dataset-size": "1000"}, "--dataset-size 1000 is more than the 192 training pairs available"),
    ("--batch-size 0", {"--batch-size": "0"}, "--batch-size must be at least 1"),
    ("a negative --dense-out-features", {"--dense-out-features": "-5"}, r"--dense-out-features must be at least 0 \(got -5\)"),
    ("a negative --lr", {"--lr": "-0.001"}, r"--lr must be more than 0 \(got -0.001\)"),
    ("a negative --dataset-size", {"--dataset-size": "-5"}, r"--dataset-size must be at least 0 \(got -5\)"),
    ("a negative --eval-size", {"--eval-size": "-1"}, r"--eval-size must be at least 0 \(got -1\)"),
    ("--warmup-ratio above 1", {"--warmup-ratio": "1.5"}, r"--warmup-ratio must be between 0 and 1 \(got 1.5\)"),
    ("a compressed file cut short", {"--data": "cut_gz"}, r"cut.tsv.gz is cut short \(the compressed data ends early: a download or copy that stopped\?\); fetch or copy it again"),
    ("a .parquet file holding CSV", {"--data": "csv_named_parquet"}, r"pairs.parquet is not a Parquet file \(it does not start with PAR1; text, CSV or TSV\?\): name it after its real format"),
    ("a .gz file that is not compressed", {"--data": "plain_named_gz"}, r"plain.tsv.gz is not gzip-compressed: drop the .gz from its name"),
    ("a --data that is a folder", {"--data": "a_folder"}, r"--data .* is a folder; it takes a file"),
    ("an --out that is a file", {"--out": "a_file"}, r"--out .*a_file is a file; it takes a folder to write into"),
    ("an --out holding another run's finished model", {"--out": "finished"}, r"finished already holds a finished model \(test error 12.50%\): add --overwrite to replace it, or train from it into another folder \(--model .*finished --out NEW\)"),
    ("an --out holding an interrupted run", {"--out": "interrupted"}, r"interrupted holds an interrupted run's checkpoint: add --resume to continue it, or --overwrite to start again"),
    ("an --out another run is writing to", {"--out": "locked"}, r"locked is in use by another run \(process \d+ on .*\); wait for it to end, or give another --out"),
    ("--resume from a damaged checkpoint", {"--out": "damaged", "--resume": None}, r"damaged: checkpoint.pt is damaged \(.*\), and there is no earlier one to fall back to: start again with --overwrite instead of --resume"),
    ("--max-length 0", {"--max-length": "0"}, "--max-length must be at least 1"),
    ("--epochs 0", {"--epochs": "0"}, "--epochs must be at least 1"),
    ("--device cuda without a GPU", {"--device": "cuda"}, r"--device cuda: no CUDA GPU is visible here; use --device cpu \(or auto\)"),
    ("a model folder without a tokenizer", {"--model": "no_tokenizer"}, r"no_tokenizer has no tokenizer \(tokenizer.json, vocab.txt, .*\); copy it from the base model's folder"),
    ("--resume without a checkpoint", {"--resume": None}, "--resume: no checkpoint at .*checkpoint.pt; run once without --resume"),
]


@pytest.mark.parametrize("case, changes, message", TRAIN_CASES, ids=[c[0] for c in TRAIN_CASES])
def test_train_bad_input_is_one_line(files, tiny_model_dir, capsys, case, changes, message):
    if case == "--device cuda without a GPU" and train.torch.cuda.is_available():
        pytest.skip("a GPU is here")
    changes = {k: str(files.get(v, v)) if v is not None else v for k, v in changes.items()}
    args = train_args(files, tiny_model_dir, **{k: v for k, v in changes.items() if v is not None})
    args += [k for k, v in changes.items() if v is None]  # switches
    before = snapshot(files["a_folder"])
    code, err = run_cli(train.main, args, capsys)
    last = err.strip().splitlines()[-1]  # after any progress bar
    assert code == 2 and "Traceback" not in err and err.count("error:") == 1, err
    assert last.startswith("error: ") and re.search(message, last), err
    after = snapshot(files["a_folder"])
    assert {path: after.get(path) for path in before} == before  # nothing there before was changed


def snapshot(folder) -> dict:
    return {str(p): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_damaged_model_weights_are_named_with_what_to_do(files, tiny_model_dir, tmp_path, capsys):
    cut = tmp_path / "cut_model"
    shutil.copytree(tiny_model_dir, cut)
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    for main, args in [(train.main, train_args(files, cut)),
                       (evaluate.main, ["--model", str(cut), "--val", str(files["val"]), "--test", str(files["test"])])]:
        code, err = run_cli(main, args, capsys)
        assert code == 2 and "Traceback" not in err, err
        assert re.fullmatch(r"error: .*cut_model/model.safetensors is damaged \(.*\): fetch or copy it again "
                            r"\(a download that stopped\?\)\n", err.splitlines(keepends=True)[-1]), err


@pytest.mark.parametrize("name", ["cut_gz", "csv_named_parquet", "a_folder"])
def test_every_entry_point_names_a_damaged_pairs_file(files, tiny_model_dir, capsys, name):
    from embed_ft import dedup
    bad = str(files[name])
    for main, args in [(evaluate.main, ["--model", str(tiny_model_dir), "--val", bad, "--test", str(files["test"])]),
                       (dedup.main, [bad, "--model", str(tiny_model_dir), "--out", str(files["test"].parent / "d")])]:
        code, err = run_cli(main, args, capsys)
        assert code == 2 and "Traceback" not in err and err.startswith("error: ") and str(bad) in err, err


def test_debug_shows_the_traceback(files, tiny_model_dir, capsys):
    with pytest.raises(errors.InputError, match="--batch-size must be at least 1"):
        errors.run(train.main, train_args(files, tiny_model_dir, **{"--batch-size": "0"}) + ["--debug"])


def test_evaluate_bad_input_is_one_line(files, tiny_model_dir, capsys):
    base = ["--model", str(tiny_model_dir), "--val", str(files["val"]), "--test", str(files["test"])]
    code, err = run_cli(evaluate.main, base + ["--batch-size", "0"], capsys)
    assert code == 2 and err == "error: --batch-size must be at least 1 (got 0)\n"
    code, err = run_cli(evaluate.main, base[:4] + ["--test", str(files["one_class"])], capsys)
    assert code == 2 and "all 20 pairs are duplicates" in err


def test_an_unknown_hub_model_offline_is_one_line_from_the_real_command(files, tmp_path):
    """The whole program, as a user runs it: no network here, so the hub cannot answer."""
    result = subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", "no-such-org/no-such-model",
                             "--data", str(files["train"]), "--val", str(files["val"]), "--test", str(files["test"]),
                             "--out", str(tmp_path / "out")], capture_output=True, text=True,
                            env=os.environ | {"HF_HUB_OFFLINE": "1"}, cwd=tmp_path, timeout=300)
    last = result.stderr.strip().splitlines()[-1]
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert last.startswith("error: could not load model 'no-such-org/no-such-model': not a local folder, and the "
                           "Hugging Face hub has no such model or cannot be reached (offline?)"), last


def test_a_nan_loss_exits_with_one_line_and_code_1(files, tiny_model_dir, capsys, monkeypatch):
    fault_at_step(monkeypatch, 1, lambda loss: loss * float("nan"))
    code, err = run_cli(train.main, train_args(files, tiny_model_dir), capsys)
    last = err.strip().splitlines()[-1]  # after the progress bars
    assert code == 1 and last.startswith("error: the loss is nan at step 1 (epoch 1)") and "Traceback" not in err, err
