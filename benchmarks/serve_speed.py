"""Our server against Infinity on the same model folder and the same CPU, on a bounded loopback load.

    python benchmarks/serve_speed.py --model DIR --infinity /path/to/venv/bin/infinity_emb

Both servers are started, then each load goes to each server in turn, and the in-process
`Embedder.encode` rate on the same texts (the ceiling) is measured after them, --repeats times
over, so that the machine's own ups and downs fall on all alike; medians are printed. Loads (Quora questions, each text sent once per load):
    (a) 1-text requests, 32 in flight        (b) 32-text requests, 4 in flight
Prints texts/s and p50/p99 latency per server and load, and appends the rows to --results.
Needs aiohttp beside the project (`pip install aiohttp`), and Infinity in a venv of its own.
The client runs on the same machine as the server: both servers pay for it alike.
"""
from __future__ import annotations

import argparse
import asyncio
import csv
import gzip
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import jsonl  # noqa: E402
from model import cpu_has_bf16, load_model  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
QUORA = ROOT.parent / "shared" / "data" / "quora" / "splits" / "test.tsv.gz"
LOADS = {"a": (1, 32), "b": (32, 4)}  # texts a request, requests in flight


def quora_texts(n: int) -> list[str]:
    with gzip.open(QUORA, "rt", encoding="utf-8") as f:
        rows = csv.reader(f, delimiter="\t")
        next(rows)
        texts = list(dict.fromkeys(t for row in rows for t in row[:2]))
    return texts[:n]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_up(url: str, process: subprocess.Popen, seconds: float = 300) -> None:
    import httpx
    deadline = time.time() + seconds
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer in {seconds} s")


async def run_load(base_url: str, model: str, texts: list[str], per_request: int, in_flight: int) -> dict:
    """Every text once, in requests of `per_request`, at most `in_flight` at a time. The client is
    aiohttp: it costs about a millisecond of CPU a request, where httpx's async client cost 7 ms
    here, which on 2 shared cores would measure the client more than the servers."""
    import aiohttp
    requests = [texts[i:i + per_request] for i in range(0, len(texts), per_request)]
    latencies, gate = [], asyncio.Semaphore(in_flight)
    async with aiohttp.ClientSession(base_url.rstrip("/") + "/", connector=aiohttp.TCPConnector(limit=in_flight),
                                     timeout=aiohttp.ClientTimeout(total=120)) as client:
        async def one(batch):
            async with gate:
                started = time.perf_counter()
                async with client.post("embeddings", json={"model": model, "input": batch, "encoding_format": "base64"}) as r:
                    r.raise_for_status()
                    await r.read()
                latencies.append(time.perf_counter() - started)
        await asyncio.gather(*(one(b) for b in requests[:max(8, in_flight)]))  # warm-up, not counted
        latencies.clear()
        started = time.perf_counter()
        await asyncio.gather(*(one(b) for b in requests))
        seconds = time.perf_counter() - started
    return {"texts_per_s": len(texts) / seconds, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)), "requests": len(requests), "seconds": seconds}


def start(command: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_until_up(f"http://127.0.0.1:{port}/health", process)
    return process


def encode_rate(model, texts: list[str]) -> dict:
    model.encode(texts[:256], progress=False)  # warm-up
    started = time.perf_counter()
    model.encode(texts, progress=False)
    return {"texts_per_s": len(texts) / (time.perf_counter() - started)}


def median_row(runs: list[dict]) -> dict:
    """The run with the median texts/s (its latencies with it), and the spread of the rates."""
    ordered = sorted(runs, key=lambda r: r["texts_per_s"])
    return ordered[len(ordered) // 2] | {"texts_per_s_all": [round(r["texts_per_s"], 1) for r in runs]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an encoder or sentence-transformers folder")
    parser.add_argument("--infinity", help="the infinity_emb command of its own venv (left out if not given)")
    parser.add_argument("--infinity-dtype", default="bfloat16" if cpu_has_bf16() else "float32",
                        help="Infinity's --dtype (its best on this CPU by default)")
    parser.add_argument("--texts-a", type=int, default=1000, help="texts for load (a)")
    parser.add_argument("--texts-b", type=int, default=3200, help="texts for load (b)")
    parser.add_argument("--repeats", type=int, default=3, help="measure every load this many times, in turn")
    parser.add_argument("--results", default="results/serve_speed.jsonl")
    args = parser.parse_args()
    pool = quora_texts(args.texts_a + args.texts_b + 256)
    texts = {"a": pool[:args.texts_a], "b": pool[args.texts_a:args.texts_a + args.texts_b]}
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    print(f"CPU: {cpu}, {os.cpu_count()} cores, bf16 units: {cpu_has_bf16()}", flush=True)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        load_model(args.model, None).save(folder)  # one sentence-transformers folder for both servers
        ports = {"embed-ft": free_port(), f"infinity-{args.infinity_dtype}": free_port()}
        commands = {"embed-ft": [sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--device", "cpu"],
                    f"infinity-{args.infinity_dtype}": [args.infinity, "v2", "--model-id", str(folder), "--url-prefix",
                                                       "/v1", "--device", "cpu", "--engine", "torch", "--dtype",
                                                       args.infinity_dtype] if args.infinity else None}
        names = {"embed-ft": "model", f"infinity-{args.infinity_dtype}": str(folder)}
        servers = {name: start(command + ["--port", str(ports[name])], ports[name])
                   for name, command in commands.items() if command}
        model = load_model(str(folder), None)
        runs: dict[tuple[str, str], list[dict]] = {}
        try:  # both servers up (an idle one sleeps), measured in turn, `repeats` times: machine noise hits all
            for repeat in range(args.repeats):
                for load, (per_request, in_flight) in LOADS.items():
                    for name in servers:
                        result = asyncio.run(run_load(f"http://127.0.0.1:{ports[name]}/v1", names[name], texts[load],
                                                      per_request, in_flight))
                        runs.setdefault((name, load), []).append(result)
                    runs.setdefault(("in-process encode", load), []).append(encode_rate(model, texts[load]))
                print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
        finally:
            for process in servers.values():
                process.terminate()
                process.wait(timeout=30)
    rows = [{"server": name, "load": load, "texts_a_request": LOADS[load][0], "in_flight": LOADS[load][1],
             **median_row(results)} for (name, load), results in runs.items()]
    print(f"\n{'server':20} {'load':>4} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7}  (median of {args.repeats})")
    for row in sorted(rows, key=lambda r: (r["load"], r["server"])):
        latency = f"{row['p50_ms']:7.0f} {row['p99_ms']:7.0f}" if "p50_ms" in row else f"{'':7} {'':7}"
        print(f"{row['server']:20} {row['load']:>4} {row['texts_per_s']:8.0f} {latency}  {row['texts_per_s_all']}")
    for row in rows:
        jsonl.append(Path(args.results), row | {"cpu": cpu, "cores": os.cpu_count(), "bf16": cpu_has_bf16(),
                                                "model": Path(args.model).name})


if __name__ == "__main__":
    main()
