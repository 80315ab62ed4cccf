"""Our server against Infinity on the same model folder and the same CPU, on a bounded loopback load.

    python benchmarks/serve_speed.py --model DIR --infinity /path/to/venv/bin/infinity_emb [--client httpx]
    python benchmarks/serve_speed.py --model DIR --before ../checkout-of-an-earlier-commit   # a change's cost

Both servers are started, then each load goes to each server in turn, and the in-process
`Embedder.encode` rate on the same texts (the ceiling) is measured after them, --repeats times over
for each client, so that the machine's own ups and downs fall on all alike; medians are printed.
Loads (real Quora questions, no text sent twice in a run, warm-up texts apart from measured ones):
    (a) 1-text requests, 32 in flight        (b) 32-text requests, 4 in flight
The client is aiohttp, httpx's AsyncClient, or both in turn (--client): they cost the shared cores
differently (httpx several times more CPU a request), and the server must be fast behind either.
`--precision fp32` runs all three in fp32, which is what a CPU without bf16 units gets.
Load (a) also goes to a server that answers every request with the same canned bytes: what the
client alone can send on these cores, the ceiling of any server's rate. Prints texts/s and p50/p99
latency per server and load, with the CPU and its precision beside each
figure, and appends the rows to --results. Needs aiohttp and httpx beside the project, and Infinity
in a venv of its own. The client runs on the same machine as the servers: both pay for it alike. `--before DIR` also starts
another checkout's serve.py (an earlier commit, `git worktree add`) on the same folder, measured in
the same turns: whether a change moved the rate. The servers take turns in a reversed order every
other repeat, so that none always goes first.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, jsonl# noqa: E402
from embed_ft.model import cpu_has_bf16, load_model# noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"
LOADS = {"a": (1, 32), "b": (32, 4)}  # texts a request, requests in flight
WARM_UP = 256                         # texts sent before each measured load, never measured


def quora_questions() -> Iterator[str]:
    """Every distinct question of the test, validation and training splits, in that order."""
    seen = set()
    for split in ("test", "val", "train"):
        for text1, text2, _ in data.load_pairs(str(SPLITS / f"{split}.tsv.gz")):
            for text in (text1, text2):
                if text not in seen:
                    seen.add(text)
                    yield text


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


def bodies(model: str, texts: list[str], per_request: int) -> list[bytes]:
    """Request bodies, serialised beforehand so that both clients send the same bytes."""
    return [json.dumps({"model": model, "input": texts[i:i + per_request], "encoding_format": "base64"}).encode()
            for i in range(0, len(texts), per_request)]


async def timed_posts(client: str, url: str, warm_up: list[bytes], measured: list[bytes], in_flight: int) -> dict:
    """Post `warm_up`, then `measured`, at most `in_flight` at a time on one pool of connections;
    texts/s and latency percentiles of the measured posts."""
    headers = {"Content-Type": "application/json"}
    if client == "aiohttp":
        import aiohttp
        session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=in_flight),
                                        timeout=aiohttp.ClientTimeout(total=120))

        async def post(body: bytes) -> None:
            async with session.post(url, data=body, headers=headers) as r:
                r.raise_for_status()
                await r.read()
    else:
        import httpx
        session = httpx.AsyncClient(limits=httpx.Limits(max_connections=in_flight), timeout=120)

        async def post(body: bytes) -> None:
            (await session.post(url, content=body, headers=headers)).raise_for_status()
    gate = asyncio.Semaphore(in_flight)

    async def one(body: bytes) -> float:
        async with gate:
            started = time.perf_counter()
            await post(body)
            return time.perf_counter() - started
    async with session:
        await asyncio.gather(*map(one, warm_up))
        started = time.perf_counter()
        latencies = await asyncio.gather(*map(one, measured))
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "requests": len(measured), "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99))}


def serve_canned(port: int) -> None:
    """A server that costs next to nothing: the same answer to every request, a 1-text embeddings
    response of the model's size. Load (a) against it is what the client alone can send."""
    answer = json.dumps({"object": "list", "model": "canned", "usage": {"prompt_tokens": 9, "total_tokens": 9},
                         "data": [{"object": "embedding", "index": 0, "embedding": "A" * 2048}]}).encode()
    response = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s" % (len(answer), answer)

    async def handle(reader, writer):
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length")), 0)
                await reader.readexactly(length)
                writer.write(response)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    async def run():
        await (await asyncio.start_server(handle, "127.0.0.1", port)).serve_forever()
    asyncio.run(run())


def start(command: list[str], port: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until_up(f"http://127.0.0.1:{port}/health", process)
    except BaseException:  # never left running behind a benchmark that stopped
        process.kill()
        raise
    return process


def encode_rate(model, warm_up: list[str], texts: list[str], bf16: bool | None) -> dict:
    model.encode(warm_up, progress=False, bf16=bf16)
    started = time.perf_counter()
    model.encode(texts, progress=False, bf16=bf16)
    return {"seconds": time.perf_counter() - started}


def median_row(runs: list[dict]) -> dict:
    """The run with the median texts/s (its latencies with it), and the spread of the rates."""
    ordered = sorted(runs, key=lambda r: r["texts_per_s"])
    return ordered[len(ordered) // 2] | {"texts_per_s_all": [round(r["texts_per_s"], 1) for r in runs]}


def cpu_name() -> str:
    return next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
                platform.processor())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="an encoder or sentence-transformers folder")
    parser.add_argument("--infinity", help="the infinity_emb command of its own venv (left out if not given)")
    parser.add_argument("--before", metavar="DIR", help="another checkout whose serve.py is measured beside this one")
    parser.add_argument("--client", default="both", choices=["aiohttp", "httpx", "both"])
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32"],
                        help="auto: bf16 where the CPU has bf16 units, for all three; fp32: fp32 for all three")
    parser.add_argument("--texts-a", type=int, default=1600, help="texts for load (a)")
    parser.add_argument("--texts-b", type=int, default=3200, help="texts for load (b)")
    parser.add_argument("--repeats", type=int, default=3, help="measure every load this many times, in turn")
    parser.add_argument("--results", default="results/serve_speed.jsonl")
    args = parser.parse_args()
    clients = ["aiohttp", "httpx"] if args.client == "both" else [args.client]
    bf16 = cpu_has_bf16() and args.precision == "auto"
    precision, dtype = ("bf16", "bfloat16") if bf16 else ("fp32", "float32")
    cpu = f"{cpu_name()}, {os.cpu_count()} cores, bf16 units: {'yes' if cpu_has_bf16() else 'no'}"
    print(f"CPU: {cpu}; all three run in {precision}", flush=True)
    pool = quora_questions()
    take = lambda n: [next(pool) for _ in range(n)]  # noqa: E731  (fresh texts, never sent before)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        load_model(args.model, None).save(folder)  # one sentence-transformers folder for both servers
        ports = {"embed-ft": free_port(), "infinity": free_port(), "embed-ft before": free_port()}
        commands = {"embed-ft": [sys.executable, str(ROOT / "serve.py"), "--model", str(folder), "--device", "cpu",
                                 "--precision", precision],
                    "infinity": [args.infinity, "v2", "--model-id", str(folder), "--url-prefix", "/v1", "--device",
                                 "cpu", "--engine", "torch", "--dtype", dtype] if args.infinity else None,
                    "embed-ft before": [sys.executable, str(Path(args.before) / "serve.py"), "--model", str(folder),
                                        "--device", "cpu", "--precision", precision] if args.before else None}
        names = {"embed-ft": "model", "infinity": str(folder), "embed-ft before": "model"}
        ports["client alone"] = free_port()  # load (a) against a canned answer: the client's own ceiling
        commands["client alone"], names["client alone"] = [sys.executable, __file__, "--canned"], "canned"
        servers: dict[str, subprocess.Popen] = {}
        runs: dict[tuple[str, str, str], list[dict]] = {}
        try:  # both servers up (an idle one sleeps), measured in turn, `repeats` times: machine noise hits all
            for name, command in commands.items():
                if command:
                    servers[name] = start(command + ["--port", str(ports[name])], ports[name])
            model = load_model(str(folder), None)
            for repeat in range(args.repeats):
                for client in clients:
                    for load, (per_request, in_flight) in LOADS.items():
                        warm_up, texts = take(WARM_UP), take(args.texts_a if load == "a" else args.texts_b)
                        order = list(servers) if repeat % 2 == 0 else list(servers)[::-1]
                        for name in (n for n in order if load == "a" or n != "client alone"):
                            result = asyncio.run(timed_posts(client, f"http://127.0.0.1:{ports[name]}/v1/embeddings",
                                                             bodies(names[name], warm_up, per_request),
                                                             bodies(names[name], texts, per_request), in_flight))
                            runs.setdefault((name, client, load), []).append(result | {"texts": len(texts)})
                        runs.setdefault(("in-process encode", client, load), []).append(
                            encode_rate(model, warm_up, texts, bf16) | {"texts": len(texts)})
                print(f"repeat {repeat + 1}/{args.repeats} done", flush=True)
        finally:
            for process in servers.values():
                process.terminate()
                process.wait(timeout=30)
    for results in runs.values():
        for r in results:
            r["texts_per_s"] = r["texts"] / r["seconds"]
    rows = [{"server": name, "client": client, "load": load, "texts_a_request": LOADS[load][0],
             "in_flight": LOADS[load][1], **median_row(results)} for (name, client, load), results in runs.items()]
    print_table(rows, cpu, precision, args.repeats)
    for row in rows:
        jsonl.append(Path(args.results), row | {"cpu": cpu_name(), "cores": os.cpu_count(), "bf16_units": cpu_has_bf16(),
                                                "precision": precision, "model": Path(args.model).name})


def print_table(rows: list[dict], cpu: str, precision: str, repeats: int) -> None:
    """One line a server, client and load, with the targets' ratios: (a) against Infinity on the same
    client, (b) against the in-process rate."""
    by = {(r["server"], r["client"], r["load"]): r for r in rows}
    print(f"\n{cpu}; {precision}; medians of {repeats}")
    print(f"{'server':18} {'client':8} {'load':>4} {'texts/s':>8} {'p50 ms':>7} {'p99 ms':>7} {'ratio':>28}  all runs")
    for row in sorted(rows, key=lambda r: (r["load"], r["client"], r["server"])):
        latency = f"{row['p50_ms']:7.0f} {row['p99_ms']:7.0f}" if "p50_ms" in row else f"{'':7} {'':7}"
        ratio = ""
        if row["server"] == "embed-ft" and row["load"] == "a" and ("infinity", row["client"], "a") in by:
            ratio = f"{row['texts_per_s'] / by['infinity', row['client'], 'a']['texts_per_s']:.2f}x Infinity"
        if row["server"] == "embed-ft" and row["load"] == "b":
            ratio = f"{row['texts_per_s'] / by['in-process encode', row['client'], 'b']['texts_per_s']:.0%} in-process"
        if row["server"] == "embed-ft" and ("embed-ft before", row["client"], row["load"]) in by:
            pairs = zip(row["texts_per_s_all"], by["embed-ft before", row["client"], row["load"]]["texts_per_s_all"])
            before = float(np.median([now / then for now, then in pairs]))  # each repeat's ratio: the same moment
            ratio = f"{before:.2f}x before" + (f", {ratio}" if ratio else "")
        print(f"{row['server']:18} {row['client']:8} {row['load']:>4} {row['texts_per_s']:8.0f} {latency} {ratio:>28}  "
              f"{row['texts_per_s_all']}")


if __name__ == "__main__":
    if sys.argv[1:2] == ["--canned"]:  # the canned server, in a process of its own
        serve_canned(int(sys.argv[3]))
    else:
        main()
