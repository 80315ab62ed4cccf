"""The flywheel turning by itself, for real: serve a base model, post labelled pairs, let the
scheduled round train, test and promote, and check the server's new answers against the history.

    python benchmarks/serve_loop.py --base DIR --home runs/loop --pairs 1000

1. `flywheel.py --init` the home (the shared Quora validation and test splits), then
   `serve.py --home HOME --round-every 30s --min-new-pairs N` in a process of its own;
2. POST the first N pairs of the shared training split to /v1/pairs, 100 a request;
3. wait for /v1/models to name a new current version (the round runs in its own process);
4. the test error through /v1/duplicates, from the running server, against the history's.
Prints a timeline and writes it to --results.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, flywheel, jsonl  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"
KEY = "loop-write-key"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model folder (all-MiniLM-L6-v2)")
    parser.add_argument("--home", default="runs/loop")
    parser.add_argument("--pairs", type=int, default=1000)
    parser.add_argument("--port", type=int, default=8321)
    parser.add_argument("--set", default="device=cpu eval_size=2000", help="the round's training options")
    parser.add_argument("--results", default="results/serve_loop.json")
    args = parser.parse_args()
    home, url, started = Path(args.home), f"http://127.0.0.1:{args.port}", time.time()
    timeline = []

    def note(what: str, **extra) -> None:
        timeline.append({"t_s": round(time.time() - started, 1), "event": what, **extra})
        print(f"{timeline[-1]['t_s']:7.1f} s  {what} {extra or ''}", flush=True)

    flywheel.main(["--home", str(home), "--base", args.base, "--val", str(SPLITS / "val.tsv.gz"),
                   "--test", str(SPLITS / "test.tsv.gz"), "--set", args.set, "--init"])
    server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(home), "--port", str(args.port),
                               "--round-every", "30s", "--min-new-pairs", str(args.pairs)],
                              env=os.environ | {"EMBED_FT_WRITE_KEY": KEY})
    try:
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(1)
        note("serving", version=httpx.get(url + "/v1/models").json()["current"])
        pairs = data.load_pairs(str(SPLITS / "train.tsv.gz"))[:args.pairs]
        for start in range(0, len(pairs), 100):
            batch = [{"text1": a, "text2": b, "label": y, "source": "quora-train"} for a, b, y in pairs[start:start + 100]]
            httpx.post(url + "/v1/pairs", json={"pairs": batch}, headers={"authorization": f"Bearer {KEY}"},
                       timeout=60).raise_for_status()
        note("posted", pairs=len(pairs))
        while (current := httpx.get(url + "/v1/models").json()["current"]) == "base":
            rounds = jsonl.read(home / "history.jsonl")
            if rounds and rounds[-1]["decision"] == "refused":
                note("round refused", **{k: rounds[-1][k] for k in ("current_error", "candidate_error", "p_value")})
                break
            time.sleep(5)
        note("swapped without a restart", version=current)
        row = jsonl.read(home / "history.jsonl")[-1]
        test = data.load_pairs(str(SPLITS / "test.tsv.gz"))
        decided = []
        for start in range(0, len(test), 1000):
            chunk = [{"text1": a, "text2": b} for a, b, _ in test[start:start + 1000]]
            body = httpx.post(url + "/v1/duplicates", json={"pairs": chunk}, timeout=300).json()
            decided += [d["is_duplicate"] for d in body["data"]]
        error = float(np.mean(np.array(decided) != (np.array([y for *_, y in test]) == 1)))
        note("test error through /v1/duplicates", served=error, history=row["candidate_error"],
             base=row["current_error"], p_value=row["p_value"], trained_on=row["trained_on"], model=body["model"])
    finally:
        server.terminate()
        server.wait(timeout=60)
    jsonl.write_json(Path(args.results), {"base": Path(args.base).name, "pairs": args.pairs, "set": args.set,
                                          "timeline": timeline})


if __name__ == "__main__":
    main()
