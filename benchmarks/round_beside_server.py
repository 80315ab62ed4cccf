"""A scheduled round beside a server under load, on the same cores: the round's pairs/s and the
server's latency, each against itself alone.

    python benchmarks/round_beside_server.py --base DIR --repeats 2   # results/round_beside_server.jsonl, a table

A home from the base model holds --pairs real Quora training pairs (a round trains on about half of
them, holding out the rest, every default). Three phases, in turn:
- server alone: `serve.py --home` under a steady load (--rate requests a second of one text each,
  the client in a process of its own) for --seconds; p50, p99;
- round alone: the round the scheduler runs (`flywheel.py --home`, at nice 10 as serve.py starts it);
  the training loop's pairs/s;
- both: the same round from a copy of the same home while the server takes the same load.
The round picks its threads for the free cores (cpu_threads.py), as the server picks its own.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
from embed_ft import data  # noqa: E402
from serve_speed import wait_until_up  # noqa: E402

SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"


def make_home(folder: Path, base: str, pairs: int) -> Path:
    """A home from the base model holding the first `pairs` Quora training pairs (its first round
    trains on about half of them, every default)."""
    from embed_ft.state import home_state
    home = folder / "template"
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, str(ROOT / "flywheel.py"), "--home", str(home), "--base", base, "--init",
                    "--set", "device=cpu"], check=True, env=env, stdout=subprocess.DEVNULL)
    path = data.write_pairs(data.load_pairs(str(SPLITS / "train.tsv.gz"))[:pairs], folder / "pairs.tsv.gz")
    home_state.database(home).add(*home_state.stored_rows(path))
    return home


def run_round(home: Path) -> float:
    """The scheduler's round (nice 10, threads its own); its training pairs/s."""
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    subprocess.run([sys.executable, str(ROOT / "flywheel.py"), "--home", str(home)], check=True, env=env,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10))
    return json.loads((home / "rounds" / "round-001" / "metrics.json").read_text())["training"]["pairs_per_s"]


async def steady_load(url: str, rate: float, stop: asyncio.Event) -> list[float]:
    """One-text embeddings requests at a steady pace until `stop`; each one's seconds."""
    import httpx
    latencies: list[float] = []

    async def one(client, text: str) -> None:
        started = time.perf_counter()
        reply = await client.post(url + "/v1/embeddings", json={"input": [text], "model": "current"})
        reply.raise_for_status()
        latencies.append(time.perf_counter() - started)

    async with httpx.AsyncClient(timeout=60) as client:
        tasks, k = [], 0
        while not stop.is_set():
            tasks.append(asyncio.create_task(one(client, f"how do I learn python, take {k}?")))
            k += 1
            await asyncio.sleep(1 / rate)
        await asyncio.gather(*tasks)
    return latencies


def load_while(url: str, rate: float, during) -> dict:
    """Latencies of a steady load while `during()` runs (a function, or a number of seconds)."""
    async def main() -> tuple[list[float], object]:
        stop = asyncio.Event()
        load = asyncio.create_task(steady_load(url, rate, stop))
        result = await asyncio.to_thread(during) if callable(during) else await asyncio.sleep(during)
        stop.set()
        return await load, result
    latencies, result = asyncio.run(main())
    ms = sorted(1000 * x for x in latencies)
    return {"requests": len(ms), "p50_ms": statistics.median(ms), "p99_ms": ms[int(0.99 * (len(ms) - 1))], "result": result}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True)
    parser.add_argument("--pairs", type=int, default=2000)
    parser.add_argument("--rate", type=float, default=20.0)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp())
    template = make_home(work, args.base, args.pairs)
    rows = []
    for repeat in range(args.repeats):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        home = work / f"serving-{repeat}"
        shutil.copytree(template, home)
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(home), "--port", str(port),
                                   "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            wait_until_up(url + "/health", server)
            load_while(url, args.rate, 10)  # warm-up
            alone = load_while(url, args.rate, args.seconds)
            server.send_signal(15)
            server.wait(timeout=60)
            round_alone = run_round(shutil.copytree(template, work / f"alone-{repeat}"))
            server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(home), "--port", str(port),
                                       "--device", "cpu"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            wait_until_up(url + "/health", server)
            load_while(url, args.rate, 10)
            both = load_while(url, args.rate, lambda: run_round(home))
        finally:
            server.kill()
        row = {"repeat": repeat, "rate": args.rate, "pairs": args.pairs, "server_alone": alone, "round_alone_pairs_per_s": round_alone,
               "both": both, "cpu": next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))}
        rows.append(row)
        print(json.dumps(row), flush=True)
    with open(ROOT / "results" / "round_beside_server.jsonl", "a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    med = lambda f: statistics.median(f(r) for r in rows)
    print(f"\n{args.pairs} pairs a round, {args.rate:g} one-text requests a second, {rows[0]['cpu']}, medians of {args.repeats}")
    print("| | round pairs/s | server p50 ms | server p99 ms |\n| --- | ---: | ---: | ---: |")
    print(f"| alone | {med(lambda r: r['round_alone_pairs_per_s']):.1f} | {med(lambda r: r['server_alone']['p50_ms']):.0f} | "
          f"{med(lambda r: r['server_alone']['p99_ms']):.0f} |")
    print(f"| together | {med(lambda r: r['both']['result']):.1f} | {med(lambda r: r['both']['p50_ms']):.0f} | "
          f"{med(lambda r: r['both']['p99_ms']):.0f} |")


if __name__ == "__main__":
    main()
