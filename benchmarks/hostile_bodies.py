"""Hostile bodies at the read routes of a server held to 1 GiB of memory: what it answers, whether it
keeps serving others, and its peak memory.

    python benchmarks/hostile_bodies.py --model DIR      # results/hostile_bodies.json, prints a table

`serve.py --model DIR` runs in a memory cgroup limited to --limit-mib (cgroup v1 or v2, where this
machine lets one be made; the peak is the cgroup's own count, page cache included). For each kind of
body, --concurrent of them at once to /v1/embeddings, while a well-behaved client sends one-text
requests every 50 ms: each hostile answer's status, the good client's statuses and p99, and the
server still alive. The kinds: 32 MiB of empty objects, a million short strings, JSON nested 100,000
deep, and 2,049 texts (one past the item limit).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
from serve_speed import wait_until_up  # noqa: E402

KINDS = {
    "32 MiB of empty objects": b'{"input": [' + b"{}," * (11 << 20) + b"{}]}",
    "a million short strings": b'{"input": [' + b'"ab",' * 800_000 + b'"ab"]}',
    "JSON nested 100,000 deep": b'{"input": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    "2,049 texts": json.dumps({"input": ["how do I learn python?"] * 2049}).encode(),
}


class Cgroup:
    """A memory cgroup for one process: v2 (memory.max, memory.peak) or v1 (limit_in_bytes, max_usage)."""

    def __init__(self, limit: int):
        v2, v1 = Path("/sys/fs/cgroup"), Path("/sys/fs/cgroup/memory")
        self.path, self.v2 = None, False
        for root, files, is_v2 in ((v2, ("memory.max",), True), (v1, ("memory.limit_in_bytes",), False)):
            if not (root / ("cgroup.controllers" if is_v2 else "memory.limit_in_bytes")).exists():
                continue  # not that kind of hierarchy here
            folder = root / f"embed-ft-hostile-{os.getpid()}"
            try:
                folder.mkdir()
                (folder / files[0]).write_text(str(limit))
                self.path, self.v2 = folder, is_v2
                return
            except OSError:
                if folder.exists():
                    folder.rmdir()

    def command(self, argv: list[str]) -> list[str]:
        """argv run inside the cgroup (the shell joins it, then becomes the program)."""
        if self.path is None:
            return argv
        return ["sh", "-c", f'echo $$ > {self.path}/cgroup.procs && exec "$@"', "sh", *argv]

    def peak(self) -> int | None:
        if self.path is None:
            return None
        name = "memory.peak" if self.v2 else "memory.max_usage_in_bytes"
        return int((self.path / name).read_text()) if (self.path / name).exists() else None

    def remove(self) -> None:
        if self.path is not None:
            self.path.rmdir()


async def hostile_round(url: str, body: bytes, concurrent: int) -> dict:
    import httpx
    good: list[tuple[int, float]] = []
    stop = asyncio.Event()

    async def good_client(client) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            try:
                status = (await client.post(url + "/v1/embeddings", json={"input": "how do I learn python?"})).status_code
            except httpx.HTTPError:
                status = 0
            good.append((status, time.perf_counter() - started))
            await asyncio.sleep(0.05)

    async def hostile(client) -> int:
        try:
            return (await client.post(url + "/v1/embeddings", content=body,
                                      headers={"content-type": "application/json"})).status_code
        except httpx.HTTPError as e:
            return type(e).__name__

    async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=concurrent + 4)) as client:
        steady = asyncio.create_task(good_client(client))
        await asyncio.sleep(0.5)
        started = time.perf_counter()
        statuses = await asyncio.gather(*(hostile(client) for _ in range(concurrent)))
        seconds = time.perf_counter() - started
        await asyncio.sleep(0.5)
        stop.set()
        await steady
    latencies = sorted(1000 * s for _, s in good)
    return {"hostile_statuses": {str(s): statuses.count(s) for s in set(statuses)}, "seconds": seconds,
            "good_requests": len(good), "good_ok": sum(1 for s, _ in good if s == 200),
            "good_p50_ms": statistics.median(latencies), "good_p99_ms": latencies[int(0.99 * (len(latencies) - 1))]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--concurrent", type=int, default=20)
    parser.add_argument("--limit-mib", type=int, default=1024)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url, cgroup = f"http://127.0.0.1:{port}", Cgroup(args.limit_mib << 20)
    server = subprocess.Popen(cgroup.command([sys.executable, str(ROOT / "serve.py"), "--model", args.model, "--port",
                                              str(port), "--device", "cpu"]), stdout=subprocess.DEVNULL)
    rows = {}
    try:
        wait_until_up(url + "/health", server)
        for kind, body in KINDS.items():
            rows[kind] = asyncio.run(hostile_round(url, body, args.concurrent)) | {"body_mib": len(body) / 2 ** 20}
            rows[kind]["server_alive"] = server.poll() is None
            print(kind, json.dumps(rows[kind]), flush=True)
        peak = cgroup.peak()
    finally:
        server.kill()
        server.wait()
        cgroup.remove()
    limit = f"a {args.limit_mib} MiB memory cgroup" if cgroup.path else "no cgroup could be made: no limit"
    result = {"limit": limit, "peak_mib": peak / 2 ** 20 if peak else None, "concurrent": args.concurrent, "kinds": rows}
    (ROOT / "results" / "hostile_bodies.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"\n{args.concurrent} at once, the server in {limit}; peak {result['peak_mib'] or float('nan'):.0f} MiB")
    print("| body | MiB | answers | the good client: ok / sent, p50, p99 ms | server alive |\n| --- | ---: | --- | --- | --- |")
    for kind, r in rows.items():
        print(f"| {kind} | {r['body_mib']:.1f} | {r['hostile_statuses']} | {r['good_ok']} / {r['good_requests']}, "
              f"{r['good_p50_ms']:.0f}, {r['good_p99_ms']:.0f} | {r['server_alive']} |")


if __name__ == "__main__":
    main()
