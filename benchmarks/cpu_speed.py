"""CPU speed against sentence-transformers (the peer, ../shared/tools/peer_st.py in its own venv), side
by side in one run, and against the hardware's limit.

    python benchmarks/cpu_speed.py --model DIR --splits ../shared/data/quora/splits \\
        --peer-python PEER_VENV/bin/python --peer ../shared/tools/peer_st.py

Each measurement is a separate process, ours and the peer's in turn (A B A B ...), --repeats times;
medians and the median of the pair-by-pair ratios are printed:
- training: 1,024 pairs, batch 32, OCL, one epoch, in fp32 (what a CPU without bf16 runs) and, where
  the CPU has bf16, in bf16 (our default there; the peer trains in fp32 on every CPU). pairs/s is the
  training loop's own (model loading and evaluation left out, in both programs);
- encoding: the distinct texts of the test split, batch 128, after a warm-up pass over the
  validation texts (as the peer does), our fp32 and bf16 against the peer's fp32; with the zero-shot
  test error of each, so a speed-up is not bought with quality;
- peak memory (maximum resident set) of each training process.
FLOPs are counted from the model's shapes and the actual (padded) token counts (flops.py) and given as
a share of the peak measured with a large matrix product in the same precision.
"""
import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import batching, data  # noqa: E402
import flops  # noqa: E402
from embed_ft.model import Embedder, cpu_has_bf16# noqa: E402
from embed_ft.options import Config# noqa: E402
from embed_ft.train import length_groups_for# noqa: E402

ENCODE = '''
import json, sys, time
sys.path.insert(0, {root!r})
from embed_ft import data, evaluate
from embed_ft.model import Embedder
val, test = data.load_pairs({val!r}), data.load_pairs({test!r})
model = Embedder.from_pretrained({model!r})
texts = lambda pairs: sorted({{t for a, b, _ in pairs for t in (a, b)}})
model.encode(texts(val), 128, progress=False, bf16={bf16})  # warm-up, as the peer encodes val first
started = time.perf_counter()
model.encode(texts(test), 128, progress=False, bf16={bf16})
per_s = len(texts(test)) / (time.perf_counter() - started)
result = {{"encode_per_s": per_s}}
if {quality}:
    model.encode = lambda t, batch_size=128, e=model.encode: e(t, batch_size, progress=False, bf16={bf16})
    result["test_error"] = evaluate.evaluate(model, val, test)["test"]["error_rate"]
print(json.dumps(result))
'''


def run(command: list[str], env: dict | None = None) -> tuple[str, float]:
    """A process's stdout and its peak resident memory in GB (from the kernel, via wait4)."""
    with tempfile.TemporaryFile() as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.DEVNULL, env=os.environ | (env or {}))
        _, status, usage = os.wait4(process.pid, 0)
        if status != 0:
            raise RuntimeError(f"failed ({status}): {' '.join(command)}")
        out.seek(0)
        return out.read().decode(), usage.ru_maxrss / 1e6  # ru_maxrss is in KB on Linux


def last_json(text: str) -> dict:
    return json.loads([line for line in text.splitlines() if line.startswith("{")][-1])


def small_splits(splits: Path, folder: Path, n: int = 500) -> tuple[Path, Path]:
    """The first n validation and test pairs, so evaluation does not dominate the training runs."""
    paths = []
    for name in ("val", "test"):
        pairs = data.load_pairs(str(splits / f"{name}.tsv.gz"))[:n]
        path = folder / f"{name}{n}.tsv"
        path.write_text("question1\tquestion2\tis_duplicate\n" + "".join(f"{a}\t{b}\t{y}\n" for a, b, y in pairs))
        paths.append(path)
    return tuple(paths)


def training_flops_per_pair(model_dir: str, train_file: str, pairs: int, batch: int = 32) -> float:
    """FLOPs a training step computes per pair (padding included), over the batches train.py's defaults
    make of the pairs the runs train on (seed 0, epoch 0: the same order, buckets and length groups)."""
    model = Embedder.from_pretrained(model_dir, 256)
    tokenized = batching.TokenizedPairs(data.subsample(data.load_pairs(train_file), pairs, seed=0), model)
    order = tokenized.epoch_order(Config.seed, 0, batch, Config.bucket_by_length)
    total = 0.0
    for features, _, labels, _ in tokenized.batches(order, batch, length_groups_for(Config(), torch.device("cpu"))):
        lengths = [f["input_ids"].shape[1] for f in features for _ in range(f["input_ids"].shape[0])]
        total += 3 * flops.forward_flops(lengths, *flops.model_shape(model.encoder.config), 256)
    return total / pairs


def encode_flops_per_text(model_dir: str, test_file: str, batch: int = 128) -> float:
    model = Embedder.from_pretrained(model_dir)
    texts = sorted({t for a, b, _ in data.load_pairs(test_file) for t in (a, b)})
    lengths = sorted((len(ids) for ids in model.tokenizer(texts, truncation=True, max_length=256)["input_ids"]), reverse=True)
    padded = [max(lengths[i:i + batch]) for i in range(0, len(lengths), batch) for _ in lengths[i:i + batch]]
    return flops.forward_flops(padded, *flops.model_shape(model.encoder.config)) / len(texts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--splits", required=True, help="folder with train/val/test.tsv.gz")
    parser.add_argument("--peer-python", required=True, help="python of a venv with sentence-transformers")
    parser.add_argument("--peer", required=True, help="peer_st.py")
    parser.add_argument("--pairs", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    splits, bf16 = Path(args.splits), cpu_has_bf16()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    peaks = {"fp32": flops.measured_peak(torch.device("cpu"), torch.float32, 2048)}
    if bf16:
        peaks["bf16"] = flops.measured_peak(torch.device("cpu"), torch.bfloat16, 2048)
    precisions = ["fp32", "bf16"] if bf16 else ["fp32"]
    rows: dict[str, list] = {}
    with tempfile.TemporaryDirectory() as tmp:
        val, test = small_splits(splits, Path(tmp))
        train_file = str(splits / "train.tsv.gz")
        for _ in range(args.repeats):
            for precision in precisions:
                out, rss = run([sys.executable, str(ROOT / "train.py"), "--model", args.model, "--data", train_file,
                                "--val", str(val), "--test", str(test), "--dataset-size", str(args.pairs), "--epochs", "1",
                                "--precision", precision, "--device", "cpu", "--no-save", "--no-zero-shot",
                                "--no-select-best", "--out", f"{tmp}/ours", "--overwrite"])
                metrics = json.loads(Path(f"{tmp}/ours/metrics.json").read_text())
                rows.setdefault(f"train ours {precision}", []).append((metrics["training"]["pairs_per_s"], rss))
            out, rss = run([args.peer_python, args.peer, "--model", args.model, "--train", train_file, "--val", str(val),
                            "--test", str(test), "--n", str(args.pairs), "--loss", "ocl", "--lr", "5e-5"])
            rows.setdefault("train peer fp32", []).append((last_json(out)["train_pairs_per_s"], rss))
        full_val, full_test = str(splits / "val.tsv.gz"), str(splits / "test.tsv.gz")
        for repeat in range(args.repeats):
            for precision in precisions:
                code = ENCODE.format(root=str(ROOT), val=full_val, test=full_test, model=args.model,
                                     bf16=precision == "bf16", quality=repeat == 0)
                result = last_json(run([sys.executable, "-c", code])[0])
                rows.setdefault(f"encode ours {precision}", []).append((result["encode_per_s"], result.get("test_error")))
            result = last_json(run([args.peer_python, args.peer, "--model", args.model, "--val", full_val,
                                    "--test", full_test, "--n", "0"])[0])
            rows.setdefault("encode peer fp32", []).append((result["encode_sentences_per_s"], result["test_error"]))
    per_pair = training_flops_per_pair(args.model, train_file, args.pairs)
    per_text = encode_flops_per_text(args.model, full_test)
    print(f"CPU: {cpu}, {os.cpu_count()} cores, bf16 {'yes' if bf16 else 'no'}; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; medians of {args.repeats}, runs alternating ours and the peer's")
    print("peak (2048^3 matrix product): " + ", ".join(f"{k} {v / 1e9:.0f} GFLOP/s" for k, v in peaks.items()))
    print(f"FLOPs counted: training {per_pair / 1e9:.2f} GFLOP a pair (fwd+bwd, padded), encoding "
          f"{per_text / 1e9:.3f} GFLOP a text")
    print(f"{'what':20} {'per s':>8} {'vs peer':>8} {'% of peak':>9} {'peak RSS GB':>11} {'zero-shot test error':>20}")
    for what, values in rows.items():
        kind, _, precision = what.split()
        speed = statistics.median(v[0] for v in values)
        peer = [v[0] for v in rows[f"{kind} peer fp32"]]
        ratio = statistics.median(a[0] / b for a, b in zip(values, peer))
        share = speed * (per_pair if kind == "train" else per_text) / peaks[precision]
        extra = (f"{statistics.median(v[1] for v in values):11.2f}" if kind == "train" else f"{'':11}")
        error = next((v[1] for v in values if kind == "encode" and v[1] is not None), None)
        print(f"{what:20} {speed:8.1f} {ratio:7.2f}x {share:9.0%} {extra} {f'{error:.2%}' if error is not None else '':>20}")


if __name__ == "__main__":
    main()
