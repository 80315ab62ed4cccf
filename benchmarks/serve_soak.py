"""Hours of load, shortened: a flywheel home's server under a steady mixed load, with two promotions.

    python benchmarks/serve_soak.py --base DIR --minutes 30

A home is made for the base model (`flywheel.py --init`, with a small curated validation and test
set, so that /v1/duplicates has a threshold from the start), and `serve.py --home` runs in a process of its own.
A loopback client (aiohttp) then sends --rate requests a second, at a fixed pace whatever the
answers, cycling through this mix of ten:
    7 x 1-text embeddings    1 x 64-text embeddings    1 x /v1/duplicates (8 pairs)
    1 x /v1/pairs (10 pairs: 7 new, 3 sent before, which the store must count as duplicates)
Texts are Quora training questions, in file order. At a third and at two thirds of the run a new
version is promoted as a round promotes (a complete model folder, then the pointer renamed over
the old one), and the server swaps it in while serving. Reported: every error (a status other than
200, a timeout, a refused connection; the goal is none), p50/p99 latency per --window-minutes, the
versions the answers name, and the server's resident memory: after the first minute, before each
promotion, at the end (the goal: within 10%; from the first promotion on, two versions are held). The result is printed as a table and appended to --results.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from embed_ft import data, flywheel, jsonl# noqa: E402
from embed_ft.state import home_state# noqa: E402
from embed_ft.model import load_model# noqa: E402
from serve_speed import cpu_name, free_port, wait_until_up  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"
MIX = ["embed-1"] * 7 + ["embed-64", "duplicates", "pairs"]
KEY = "soak-write-key"
IN_FLIGHT = 256  # the client's bound: past it, the pace waits (counted as late ticks)


def make_home(folder: Path, base: str, curated: list[tuple[str, str, int]], device: str) -> Path:
    """A home whose curated validation and test sets are the two halves of `curated`."""
    half = len(curated) // 2
    val, test = data.write_pairs(curated[:half], folder / "val.tsv.gz"), data.write_pairs(curated[half:], folder / "test.tsv.gz")
    home = folder / "home"
    flywheel.main(["--home", str(home), "--base", base, "--val", str(val), "--test", str(test), "--set", f"device={device}",
                   "--init"])
    return home


def promote(home: Path, model: Path, number: int) -> str:
    """What a round that promotes does to the home: a complete folder first, then the pointer."""
    folder = home / "rounds" / f"round-{number:03d}"
    shutil.copytree(model, folder)
    home_state.switch_current(home, folder)
    return folder.name


def rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


class Load:
    """The mix, sent at a fixed pace; one record (start, kind, status, seconds, version) a request."""

    def __init__(self, url: str, texts: list[str], pairs: list[tuple[str, str, int]]):
        self.url, self.texts, self.pairs = url, texts, pairs
        self.next_text = self.next_pair = 0
        self.records: list[tuple[float, str, int, float, str | None]] = []
        self.late = 0

    def take_texts(self, n: int) -> list[str]:
        start, self.next_text = self.next_text, self.next_text + n
        return [self.texts[i % len(self.texts)] for i in range(start, start + n)]

    def body(self, kind: str) -> tuple[str, dict]:
        if kind == "embed-1":
            return "/v1/embeddings", {"input": self.take_texts(1), "model": "current", "encoding_format": "base64"}
        if kind == "embed-64":
            return "/v1/embeddings", {"input": self.take_texts(64), "model": "current", "encoding_format": "base64"}
        if kind == "duplicates":
            texts = self.take_texts(16)
            return "/v1/duplicates", {"pairs": [{"text1": a, "text2": b} for a, b in zip(texts[0::2], texts[1::2])]}
        start, self.next_pair = self.next_pair, self.next_pair + 7
        chosen = [self.pairs[i % len(self.pairs)] for i in range(start, start + 7)]
        chosen += [self.pairs[i % len(self.pairs)] for i in range(max(0, start - 30), max(0, start - 30) + 3)]
        return "/v1/pairs", {"pairs": [{"text1": a, "text2": b, "label": y, "source": "soak"} for a, b, y in chosen]}

    async def run(self, seconds: float, rate: float, at: dict[float, callable]) -> None:
        """Send for `seconds` at `rate` a second; `at` maps a second of the run to a call made then."""
        import aiohttp
        timeout = aiohttp.ClientTimeout(total=30)
        async with aiohttp.ClientSession(self.url, timeout=timeout, connector=aiohttp.TCPConnector(limit=64),
                                         headers={"Authorization": f"Bearer {KEY}"}) as session:
            started, tasks, gate = time.perf_counter(), set(), asyncio.Semaphore(IN_FLIGHT)
            pending = sorted(at.items())
            for tick in range(int(seconds * rate)):
                while pending and time.perf_counter() - started >= pending[0][0]:
                    tasks.add(asyncio.create_task(asyncio.to_thread(pending.pop(0)[1])))
                delay = started + tick / rate - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                if gate.locked():
                    self.late += 1
                await gate.acquire()
                task = asyncio.create_task(self.one(session, MIX[tick % len(MIX)], started, gate))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            await asyncio.gather(*tasks)

    async def one(self, session, kind: str, started: float, gate: asyncio.Semaphore) -> None:
        path, body = self.body(kind)
        sent = time.perf_counter()
        status, version = -1, None
        try:
            async with session.post(path, json=body) as response:
                status = response.status
                answer = await response.json()
                version = answer.get("model")
        except Exception:  # a timeout, a refused or reset connection: an error, status -1
            pass
        finally:
            gate.release()
        self.records.append((sent - started, kind, status, time.perf_counter() - sent, version))


def summarise(records: list, rss: list[tuple[float, float]], window_s: float) -> dict:
    windows = []
    for start in np.arange(0, max(r[0] for r in records) + 1e-9, window_s):
        inside = [r for r in records if start <= r[0] < start + window_s]
        if inside:
            seconds = np.array([r[3] for r in inside])
            windows.append({"from_min": round(start / 60, 2), "requests": len(inside),
                            "errors": sum(r[2] != 200 for r in inside),
                            "p50_ms": round(1000 * float(np.percentile(seconds, 50)), 1),
                            "p99_ms": round(1000 * float(np.percentile(seconds, 99)), 1)})
    versions: list[str] = []
    for r in sorted(records):
        if r[4] and r[4] not in versions:
            versions.append(r[4])
    start_mb = next(mb for t, mb in rss if t >= min(60.0, rss[-1][0] / 4))  # after the first minute's warm-up
    return {"requests": len(records), "errors": sum(r[2] != 200 for r in records),
            "errors_by_status": {str(s): sum(r[2] == s for r in records) for s in sorted({r[2] for r in records}) if s != 200},
            "windows": windows, "versions_seen": versions,
            "rss_start_mb": round(start_mb, 1), "rss_end_mb": round(rss[-1][1], 1),
            "rss_max_mb": round(max(mb for _, mb in rss), 1), "rss_change": round(rss[-1][1] / start_mb - 1, 4),
            "rss_mb": [(round(t), round(mb)) for t, mb in rss]}


def soak(base: str, minutes: float, rate: float, window_minutes: float, texts: list[str],
         pairs: list[tuple[str, str, int]], curated: list[tuple[str, str, int]], device: str = "cpu") -> dict:
    """The whole run, in a temporary folder; the summary."""
    seconds = 60 * minutes
    with tempfile.TemporaryDirectory() as tmp:
        home = make_home(Path(tmp), base, curated, device)
        model = Path(tmp) / "promoted"
        load_model(base, None).save(model, {"threshold": 0.8})  # what a round would have trained
        port = free_port()
        server = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(home), "--port", str(port),
                                   "--device", device], env=os.environ | {"EMBED_FT_WRITE_KEY": KEY},
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            wait_until_up(f"http://127.0.0.1:{port}/health", server)
            load, rss, promoted = Load(f"http://127.0.0.1:{port}", texts, pairs), [], []
            began = time.perf_counter()

            async def sample_memory():
                while True:
                    rss.append((time.perf_counter() - began, rss_mb(server.pid)))
                    await asyncio.sleep(min(10.0, seconds / 40))

            async def run():
                sampler = asyncio.create_task(sample_memory())
                await load.run(seconds, rate, {seconds / 3: lambda: promoted.append(promote(home, model, 1)),
                                               2 * seconds / 3: lambda: promoted.append(promote(home, model, 2))})
                sampler.cancel()
                rss.append((time.perf_counter() - began, rss_mb(server.pid)))
            asyncio.run(run())
        finally:
            server.terminate()
            _, log = server.communicate(timeout=60)
    summary = summarise(load.records, rss, 60 * window_minutes)
    before = [[mb for t, mb in rss if t < when][-1] for when in (seconds / 3, 2 * seconds / 3)]  # sampled from t = 0
    return summary | {"rss_before_promotions_mb": [round(mb, 1) for mb in before], "promoted": promoted, "late_ticks": load.late, "server_tracebacks": log.count("Traceback"),
                      "minutes": minutes, "rate": rate}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the base model folder (all-MiniLM-L6-v2)")
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--rate", type=float, default=20, help="requests a second, sent at a fixed pace")
    parser.add_argument("--window-minutes", type=float, default=15)
    parser.add_argument("--results", default="results/serve_soak.jsonl")
    args = parser.parse_args()
    train = data.load_pairs(str(SPLITS / "train.tsv.gz"))
    texts = list(dict.fromkeys(t for a, b, _ in train for t in (a, b)))
    cpu = f"{cpu_name()}, {os.cpu_count()} cores"
    print(f"CPU: {cpu}; {args.minutes:g} minutes at {args.rate:g} requests/s", flush=True)
    result = soak(args.base, args.minutes, args.rate, args.window_minutes, texts, train,
                  data.load_pairs(str(SPLITS / "val.tsv.gz"))[:1000])
    print(f"\n{'from min':>8} {'requests':>9} {'errors':>7} {'p50 ms':>7} {'p99 ms':>7}")
    for w in result["windows"]:
        print(f"{w['from_min']:8g} {w['requests']:9d} {w['errors']:7d} {w['p50_ms']:7.1f} {w['p99_ms']:7.1f}")
    print(f"errors: {result['errors']} {result['errors_by_status'] or ''}; versions answered: "
          f"{' -> '.join(result['versions_seen'])}; server tracebacks: {result['server_tracebacks']}")
    first, second = result["rss_before_promotions_mb"]
    print(f"resident memory: {result['rss_start_mb']:.0f} MB after the first minute, {first:.0f} MB before the first "
          f"promotion, {second:.0f} MB before the second (two versions held from the first on), "
          f"{result['rss_end_mb']:.0f} MB at the end ({result['rss_change']:+.1%} on the first minute, "
          f"{result['rss_end_mb'] / second - 1:+.1%} on the second promotion), {result['rss_max_mb']:.0f} MB at most")
    jsonl.append(Path(args.results), result | {"cpu": cpu, "model": Path(args.base).name})


if __name__ == "__main__":
    main()
