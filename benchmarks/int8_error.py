"""Does an int8 (or bf16) way of embedding move the shared test error? The issue's rule: an int8
backend counts as a rival only where the shared Quora test error moves by less than 0.2 points.

    python benchmarks/int8_error.py --model DIR \
        --peer torch=/root/peer/bin/python \
        --peer onnx-int8=/root/peer-onnx/bin/python:/tmp/rate/onnx-int8 \
        --peer openvino=/root/peer-openvino/bin/python:/tmp/rate/openvino \
        --peer openvino-int8=/root/peer-openvino/bin/python:/tmp/rate/openvino-int8

Every distinct text of the shared validation and test splits is embedded once by each way: our
`Embedder` in fp32, in bf16, with torch's dynamic int8 and with ours (int8.py) (this process), and sentence-transformers' backends, each in its own
environment through benchmarks/st_encode.py --save (exported models as the rate table's). Each way's
threshold is tuned on validation; its error on the test split is printed beside the move from
sentence-transformers' torch in fp32 (the model as published), with the pairs each way decides
differently from it. One JSON line a way goes to --results.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from embed_ft import data, evaluate, jsonl# noqa: E402
from embed_ft.int8 import quantised# noqa: E402
from embed_ft.model import load_model# noqa: E402

SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"


def texts_of(*splits: list[data.Pair]) -> list[str]:
    """Each text of the pairs once, in order of first appearance."""
    return list(dict.fromkeys(t for pairs in splits for a, b, _ in pairs for t in (a, b)))


def ours(model_dir: str, texts: list[str], bf16: bool, int8: str = "") -> np.ndarray:
    """Our Embedder as the corpus job runs it (the default prompt), in bf16 or fp32, unit length; with
    `int8` "ours", as `corpus.py embed --dtype int8` runs it (int8.py: weights per channel, activations
    per token); with "torch dynamic", its Linear layers quantised by torch's dynamic int8 (weights per
    channel, activations per batch: torch.ao.quantization, deprecated in torch 2.13)."""
    model = load_model(model_dir).eval()
    if int8 == "ours":
        model = quantised(model)
    elif int8:
        from torch import nn
        from torch.ao.quantization import per_channel_dynamic_qconfig, quantize_dynamic
        model = quantize_dynamic(model, {nn.Linear: per_channel_dynamic_qconfig})
    return evaluate.unit_rows(model.encode(texts, bf16=bf16))


def peer(python: str, export_to: str | None, backend: str, model_dir: str, texts_file: Path, out: Path) -> np.ndarray:
    """sentence-transformers' backend in its own environment; its vectors from a .npy file."""
    command = [python, str(ROOT / "benchmarks" / "st_encode.py"), "--model", model_dir, "--texts", str(texts_file),
               "--backend", backend, "--save", str(out)] + (["--export-to", export_to] if export_to else [])
    subprocess.run(command, check=True)
    return np.load(out)


def scores(vectors: np.ndarray, index: dict[str, int], pairs: list[data.Pair]) -> np.ndarray:
    """The cosine of each pair (the vectors are unit length)."""
    a = vectors[[index[p[0]] for p in pairs]]
    b = vectors[[index[p[1]] for p in pairs]]
    return np.einsum("ij,ij->i", a, b)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="the model folder, as published")
    parser.add_argument("--peer", action="append", default=[], help="BACKEND=PYTHON[:EXPORTED_FOLDER] (repeat)")
    parser.add_argument("--results", default="results/int8_error.jsonl")
    args = parser.parse_args()
    val, test = (data.load_pairs(str(SPLITS / f"{name}.tsv.gz")) for name in ("val", "test"))
    texts = texts_of(val, test)
    index = {t: i for i, t in enumerate(texts)}
    work = Path(tempfile.mkdtemp(prefix="int8_error-"))
    texts_file = work / "texts.txt"
    texts_file.write_text("".join(t + "\n" for t in texts), encoding="utf-8")
    assert all("\n" not in t and t.strip() for t in texts), "st_encode.py reads one text a line"
    ways = {"ours fp32": lambda: ours(args.model, texts, False), "ours bf16": lambda: ours(args.model, texts, True),
            "ours int8 (torch dynamic)": lambda: ours(args.model, texts, False, int8="torch dynamic"),
            "ours int8 (int8.py)": lambda: ours(args.model, texts, False, int8="ours")}
    for spec in args.peer:
        backend, _, rest = spec.partition("=")
        python, _, exported = rest.partition(":")
        ways[f"st {backend}"] = lambda b=backend, p=python, e=exported: peer(p, e or None, b, args.model, texts_file,
                                                                             work / f"{b}.npy")
    right, test_scores, vectors_of, thresholds, rows = {}, {}, {}, {}, []
    for name, embed in ways.items():
        vectors_of[name] = embed()
        test_scores[name] = scores(vectors_of[name], index, test)
        result = evaluate.evaluate_scores(scores(vectors_of[name], index, val), evaluate.labels_of(val), test_scores[name],
                                          evaluate.labels_of(test))
        thresholds[name] = threshold = result["val"]["threshold"]
        right[name] = (test_scores[name] > threshold) == evaluate.labels_of(test).astype(bool)
        rows.append({"way": name, "texts": len(texts), "test_pairs": len(test), "threshold": round(threshold, 4),
                     "test_error": round(1 - float(right[name].mean()), 5)})
        print(json.dumps(rows[-1]), flush=True)
    reference = "st torch" if "st torch" in right else "ours fp32"
    base = rows[list(ways).index(reference)]
    labels = evaluate.labels_of(test).astype(bool)
    print(f"\n{len(texts):,} texts; {len(test):,} test pairs; each way's threshold tuned on {len(val):,} validation pairs; "
          f"move against {reference}; then at {reference}'s threshold, which leaves only the vectors' change\n")
    print("| way | test error | move, points | test pairs decided otherwise | cosine to the reference's vectors, mean / min "
          "| move at the reference's threshold, points |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for row in rows:
        name = row["way"]
        cosines = np.einsum("ij,ij->i", vectors_of[name], vectors_of[reference])
        at_reference = 1 - float(((test_scores[name] > thresholds[reference]) == labels).mean())
        row |= {"against": reference, "move_points": round(100 * (row["test_error"] - base["test_error"]), 2),
                "decided_otherwise": int((right[name] != right[reference]).sum()),
                "cosine_mean": round(float(cosines.mean()), 6), "cosine_min": round(float(cosines.min()), 6),
                "move_points_at_reference_threshold": round(100 * (at_reference - base["test_error"]), 2)}
        jsonl.append(Path(args.results), row)
        print(f"| {name} | {100 * row['test_error']:.2f}% | {row['move_points']:+.2f} | {row['decided_otherwise']} | "
              f"{row['cosine_mean']:.5f} / {row['cosine_min']:.4f} | {row['move_points_at_reference_threshold']:+.2f} |")


if __name__ == "__main__":
    main()
