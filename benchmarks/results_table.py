"""README's "Results at a glance", from one command: models on the same shared Quora test pairs,
each at its own threshold tuned on validation, with 95% intervals and paired verdicts (counted by groups)
against the first model (zero-shot) and against a reference (all-mpnet-base-v2 as published).

    python benchmarks/results_table.py --model MINILM --model runs/loop/rounds/round-001 \\
        --model runs/minilm-4000 --model MPNET --reference MPNET
    python benchmarks/results_table.py --print          # the table again, from results/results_table.json

README's table is in fp32 (`--precision fp32`): on a CPU with bf16 units `auto` embeds in bf16, and
the rounding moves a few decisions (all-MiniLM-L6-v2 as published: 18.39% in fp32, 18.53% in bf16).

Prints a Markdown table and writes the numbers behind it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, evaluate, jsonl, paired  # noqa: E402

SPLITS = Path(__file__).resolve().parents[2] / "shared" / "data" / "quora" / "splits"


class AtPrecision:
    """An encoder held to one precision: bf16 False for fp32, None for what the hardware suggests."""

    def __init__(self, encoder, bf16: bool | None):
        self.encoder, self.bf16 = encoder, bf16

    def encode(self, texts: list[str], batch_size: int = 128):
        return self.encoder.encode(texts, batch_size, bf16=self.bf16)


def label(name: str) -> str:
    folder = Path(name)
    metrics = jsonl.read_json(folder / "metrics.json") if folder.is_dir() else None
    if metrics and "training" in metrics:
        base = Path(metrics["config"]["model"]).name.removeprefix("sentence-transformers-")
        return f"{base}, fine-tuned on {metrics['training']['train_pairs']:,} pairs"
    return f"{folder.name.removeprefix('sentence-transformers-')}, as published"


def cell(v: dict | None) -> str:
    """The verdict's word, its discordant counts and p; the pairs and groups are said once, above the table."""
    return f"{v['verdict'].split(' on ')[0]} ({v['only_a_right']} vs {v['only_b_right']}, p = {paired.p_of_verdict(v):.2g})" if v else "-"


def print_table(result: dict, reference: bool) -> None:
    print(f"\nShared Quora splits: {result['val_pairs']:,} validation pairs (thresholds), {result['test_pairs']:,} test pairs.\n")
    print("| model | test error | 95% interval | vs zero-shot |" + (" vs all-mpnet-base-v2 |" if reference else ""))
    print("| --- | ---: | ---: | --- |" + (" --- |" if reference else ""))
    for row in result["rows"]:
        low, high = row.get("interval") or paired.wilson_interval(round(row["test"]["error_rate"] * result["test_pairs"]),
                                                                  result["test_pairs"])
        cells = [cell(row["vs_zero_shot"])] + ([cell(row["vs_reference"])] if reference else [])
        print(f"| {row['label']} | {row['test']['error_rate']:.2%} | [{low:.1%}, {high:.1%}] | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", help="the first is the zero-shot reference")
    parser.add_argument("--reference", help="a second reference for the paired verdict (one of --model)")
    parser.add_argument("--results", default="results/results_table.json")
    parser.add_argument("--precision", choices=["auto", "fp32"], default="auto", help="fp32 for README's table")
    parser.add_argument("--print", action="store_true", help="only print the table of an earlier --results")
    args = parser.parse_args()
    if args.print:
        result = jsonl.read_json(Path(args.results))
        return print_table(result, any(r["vs_reference"] for r in result["rows"]))
    val, test = data.load_pairs(str(SPLITS / "val.tsv.gz")), data.load_pairs(str(SPLITS / "test.tsv.gz"))
    rights, rows = {}, []
    for name in args.model:
        encoder = evaluate.Remembered(AtPrecision(evaluate.open_encoder(name, device="cpu"),
                                                  False if args.precision == "fp32" else None))
        result = evaluate.evaluate(encoder, val, test)
        rights[name] = evaluate.correct(encoder, test, result["val"]["threshold"])
        rows.append({"model": name, "label": label(name), "test": result["test"], "val_error": result["val"]["error_rate"]})
        print(f"{label(name)}: test {result['test']['error_rate']:.2%}", flush=True)
    first, groups = args.model[0], paired.groups_of(test)  # pairs that share texts count by groups
    for row in rows:
        name = row["model"]
        row["interval"] = paired.error_interval(~rights[name], groups)
        row["vs_zero_shot"] = paired.compare_pairs(rights[name], rights[first], groups=groups) if name != first else None
        row["vs_reference"] = (paired.compare_pairs(rights[name], rights[args.reference], groups=groups)
                               if args.reference and name != args.reference else None)
    result = {"val_pairs": len(val), "test_pairs": len(test), "precision": args.precision, "rows": [r | {"model": Path(r["model"]).name} for r in rows]}
    jsonl.write_json(Path(args.results), result)
    print_table(result, bool(args.reference))


if __name__ == "__main__":
    main()
