"""The peer's fastest way to embed a corpus on a CPU: sentence-transformers' encode with a backend of
its choice, on a file of one text a line, run in the peer's own environment (never the project's):

    PEER/bin/python benchmarks/st_encode.py --model DIR --texts texts.txt --backend openvino --export-to DIRV
    PEER/bin/python benchmarks/st_encode.py --model DIR --texts texts.txt --backend openvino-int8 --export-to DIR8

`corpus.py embed` on the same file is the other side (docs/corpus.md). Needs
`pip install "sentence-transformers[onnx,openvino]"` there. The int8 models are exported once
(--export-to, then reused), as are the ONNX and OpenVINO models: ONNX's dynamic quantisation needs no
data; OpenVINO's static one is calibrated on the first 300 texts of the file. Prints one JSON line: texts, seconds, texts/s.
"""
import argparse
import json
import time
from pathlib import Path

from sentence_transformers import SentenceTransformer


def load(model: str, backend: str, export_to: str | None) -> SentenceTransformer:
    """The model on its backend. ONNX and OpenVINO models are exported once into --export-to and read
    from there after, so that a timed run does not export (sentence-transformers asks for that too)."""
    if backend == "torch":
        return SentenceTransformer(model, device="cpu", backend=backend)
    base, _, int8 = backend.partition("-")
    folder = Path(export_to)
    if not folder.is_dir():
        exported = SentenceTransformer(model, device="cpu", backend=base)
        exported.save_pretrained(str(folder))
        if int8 and base == "onnx":
            from sentence_transformers import export_dynamic_quantized_onnx_model
            export_dynamic_quantized_onnx_model(exported, "avx512_vnni", str(folder))
        elif int8:
            from optimum.intel import OVQuantizationConfig
            from sentence_transformers import export_static_quantized_openvino_model
            export_static_quantized_openvino_model(exported, OVQuantizationConfig(num_samples=300), str(folder),
                                                   dataset_name=str(folder.with_suffix(".calibration")), dataset_config_name="default",
                                                   dataset_split="train", column_name="text")
    if not int8:
        return SentenceTransformer(str(folder), device="cpu", backend=base)
    file = next(iter(sorted(folder.rglob("*qint8*.onnx" if base == "onnx" else "*qint8*.xml"))))
    return SentenceTransformer(str(folder), device="cpu", backend=base, model_kwargs={"file_name": str(file.relative_to(folder))})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--texts", required=True, help="one text a line")
    parser.add_argument("--backend", default="torch", choices=["torch", "onnx", "openvino", "onnx-int8", "openvino-int8"])
    parser.add_argument("--export-to", help="where an ONNX or OpenVINO model is exported to (once), and read from")
    parser.add_argument("--batch-size", type=int, default=32, help="sentence-transformers' default")
    parser.add_argument("--save", help="a .npy file for the vectors, in the file's order (benchmarks/int8_error.py reads it)")
    args = parser.parse_args()
    texts = [line.rstrip("\n") for line in open(args.texts, encoding="utf-8") if line.strip()]
    if args.backend == "openvino-int8" and not Path(args.export_to).is_dir():  # the calibration texts, as a dataset folder
        calibration = Path(args.export_to).with_suffix(".calibration")
        calibration.mkdir(parents=True, exist_ok=True)
        (calibration / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts[:300]))
    model = load(args.model, args.backend, args.export_to)
    started = time.perf_counter()
    vectors = model.encode(texts, batch_size=args.batch_size, convert_to_numpy=True, normalize_embeddings=True)
    seconds = time.perf_counter() - started
    if args.save:
        import numpy as np
        np.save(args.save, vectors)
    print(json.dumps({"backend": args.backend, "texts": len(texts), "width": int(vectors.shape[1]),
                      "seconds": round(seconds, 2), "texts_per_second": round(len(texts) / seconds, 1)}))


if __name__ == "__main__":
    main()
