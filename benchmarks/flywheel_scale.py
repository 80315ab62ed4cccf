"""The flywheel on many processes: one home on PostgreSQL, three `serve.py` processes, and what a
client spread over them does to its promises; then `/v1/pairs` throughput on each store.

    python benchmarks/flywheel_scale.py --base DIR [--results results/flywheel_scale.jsonl]

The scenario (its short version runs in the suite, tests/test_flywheel_scale.py, on a tiny model):
a bounded loopback client posts batches of pairs round-robin over the three processes; it re-sends
every fifth batch to another process once it is acknowledged (a retry after a timeout), reuses an
earlier pair's id for another pair and posts an earlier pair with the other label, each to another
process than the one that stored the original. One process is killed with `kill -9` in the middle and
started again; a post that finds it dead goes to the next process (the client's retry). Then a round
runs (`flywheel.py --home`, a process of its own) while the client keeps posting and four threads
keep asking every live process for embeddings. Checked against the client's own record: every pair
acknowledged stored exactly once, every reuse and contradiction a conflict, every retry's answer
"duplicates"; the seconds from the pointer row's change to each process serving the new version;
and the embeddings requests that failed across the swap.

Throughput: batches of 100 new real Quora pairs, 4 in flight, for --seconds each: one process on
SQLite, three on PostgreSQL, and one on the file store of a home made before the database, each into a
fresh home, so every store takes the same pairs. The three in turn, --repeats times, the order reversed
every other repeat; pairs a second and p50/p99 latency as medians over the repeats, and each store's
rate against the file store's as the median of the repeats' ratios; the CPU beside them.
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
from embed_ft import data, jsonl# noqa: E402
from embed_ft.state import home_state# noqa: E402
from embed_ft.state.home_db import HomeDB# noqa: E402
from embed_ft.state.pair_store import pair_key# noqa: E402
from embed_ft.serve import WATCH_EVERY_S# noqa: E402
from serve_speed import cpu_name, free_port, wait_until_up  # noqa: E402

KEY = "scale-key"
SPLITS = ROOT.parent / "shared" / "data" / "quora" / "splits"


class Server:
    """One `serve.py --home` process on a port of its own."""

    def __init__(self, home: Path, device: str = "cpu"):
        self.home, self.device, self.port = home, device, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = None

    def start(self) -> "Server":
        self.process = subprocess.Popen([sys.executable, str(ROOT / "serve.py"), "--home", str(self.home), "--port",
                                         str(self.port), "--device", self.device], stdout=subprocess.DEVNULL,
                                        env=os.environ | {"EMBED_FT_WRITE_KEY": KEY})
        return self

    def wait(self, seconds: float = 120) -> "Server":
        wait_until_up(self.url + "/health", self.process, seconds)
        return self

    def health(self) -> dict | None:
        try:
            return httpx.get(self.url + "/health", timeout=2).json()
        except httpx.TransportError:
            return None

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait()

    def stop(self) -> None:
        if self.process and self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=60)


# ------------------------------------------------------------------------------------ the client

def plan_batches(pairs: list[data.Pair], size: int, first_id: int = 0) -> list[dict]:
    """Batches of `size` new pairs; from the second on, each also reuses the previous batch's first id
    for another pair and posts the previous batch's second pair with the other label."""
    batches = []
    for b, start in enumerate(range(0, len(pairs), size)):
        fresh = [{"text1": a, "text2": t, "label": y, "id": f"p{first_id + start + i}"}
                 for i, (a, t, y) in enumerate(pairs[start:start + size])]
        clashes = []
        if batches:
            earlier = batches[-1]["fresh"]
            clashes = [{"text1": f"reused id {first_id + b}", "text2": f"another pair {first_id + b}", "label": 1,
                        "id": earlier[0]["id"]},
                       dict(earlier[1], label=1 - earlier[1]["label"], id=None)]
        batches.append({"fresh": fresh, "clashes": clashes})
    return batches


class Client:
    """Posts each batch until one process acknowledges it, round-robin, and keeps its own record."""

    def __init__(self, servers: list[Server]):
        self.servers, self.turn = servers, 0
        self.acknowledged: list[dict] = []   # every fresh pair of an acknowledged batch
        self.answers: list[dict] = []        # each batch's first answer
        self.clashes = 0                     # reused ids and contradictions posted (each a conflict)
        self.retries: list[tuple[dict, dict]] = []  # (batch, the retry's answer)
        self.failed_posts = 0                # posts that found their process dead (re-sent elsewhere)
        self.http = httpx.Client(headers={"authorization": f"Bearer {KEY}"}, timeout=60)

    def post(self, batch: dict, avoid: int | None = None) -> tuple[dict, int]:
        """The answer of the first process that takes the batch, and which one it was."""
        for _ in range(10 * len(self.servers)):
            self.turn = (self.turn + 1) % len(self.servers)
            if self.turn == avoid:
                continue
            try:
                response = self.http.post(self.servers[self.turn].url + "/v1/pairs",
                                          json={"pairs": batch["fresh"] + batch["clashes"]})
            except httpx.TransportError:  # the process is dead (or dying): another one takes it
                self.failed_posts += 1
                time.sleep(0.05)
                continue
            assert response.status_code == 200, response.text
            return response.json(), self.turn
        raise RuntimeError("no process took the batch")

    def send(self, batches: list[dict], between=None) -> None:
        for b, batch in enumerate(batches):
            answer, where = self.post(batch)
            self.acknowledged += batch["fresh"]
            self.answers.append(answer)
            self.clashes += len(batch["clashes"])
            if b % 5 == 4:  # a retry after a timeout, on another process
                self.retries.append((batch, self.post(batch, avoid=where)[0]))
            if between:
                between(b)


def embed_load(servers: list[Server], stop: threading.Event, outcomes: list, pause: float = 0.0) -> None:
    """Embeddings requests to every live process, `pause` seconds apart, until `stop`: (status or error, version)."""
    with httpx.Client(timeout=60) as http:
        for i in range(100_000):
            if stop.wait(pause):
                return
            server = servers[i % len(servers)]
            try:
                body = http.post(server.url + "/v1/embeddings", json={"input": ["how do i learn python", "t1a t2b"]})
                outcomes.append((body.status_code, body.json().get("model")))
            except httpx.TransportError as e:
                outcomes.append((f"{type(e).__name__}", None))


# ---------------------------------------------------------------------------------- the scenario

def scenario(home: Path, first: list[data.Pair], second: list[data.Pair], size: int = 20, device: str = "cpu",
             pause: float = 0.0) -> dict:
    """The three processes, the client, the kill, the round; the report of what held. `pause`: seconds
    between one embeddings client's requests (0: as fast as they are answered)."""
    servers = [Server(home, device).start() for _ in range(3)]
    try:
        for s in servers:
            s.wait()
        client = Client(servers)
        before = plan_batches(first, size)
        kill_at = len(before) // 2

        def kill_and_restart(b: int) -> None:
            if b == kill_at:
                servers[1].kill()
                servers[1].start()  # on the same port; the client's posts go elsewhere until it is up
        client.send(before, between=kill_and_restart)
        servers[1].wait()
        stop, outcomes = threading.Event(), []
        loads = [threading.Thread(target=embed_load, args=(servers, stop, outcomes, pause)) for _ in range(4)]
        for t in loads:
            t.start()
        old = home_state.current_version(home)["version"]
        round_process = subprocess.Popen([sys.executable, str(ROOT / "flywheel.py"), "--home", str(home)],
                                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        swap = watch_swap(home, servers, old, round_process)
        client.send(plan_batches(second, size, first_id=len(first)))
        swap_report = swap.result()
        stop.set()
        for t in loads:
            t.join(timeout=60)
        return check(home, client, outcomes, swap_report)
    finally:
        for s in servers:
            s.stop()


def watch_swap(home: Path, servers: list[Server], old: str, round_process):
    """In a thread: when the pointer row leaves `old`, and when each process serves the new version."""
    def watch() -> dict:
        db = HomeDB(jsonl.read_json(home / "flywheel.json")["database"], home)  # a connection of its own
        changed, served, deadline = None, {}, time.time() + 900
        while time.time() < deadline and len(served) < len(servers):
            pointer = (db.state("served") or {}).get("current", {}).get("version", "base")
            if changed is None and pointer != old:
                changed = (time.time(), pointer)
            if changed is None and round_process.poll() is not None:
                break  # the round ended without a promotion
            for i, s in enumerate(servers):
                health = s.health() if changed else None
                if health and health["version"] == changed[1] and i not in served:
                    served[i] = time.time() - changed[0]
            time.sleep(0.05)
        round_process.wait(timeout=900)
        db.close()
        return {"new_version": changed and changed[1], "seconds_to_serve": [served.get(i) for i in range(len(servers))],
                "round_output": round_process.stdout.read()[-2000:]}
    pool = ThreadPoolExecutor(1)
    return pool.submit(watch)


def check(home: Path, client: Client, outcomes: list, swap: dict) -> dict:
    """What held, counted against the client's own record."""
    db = home_state.database(home)
    stored = db.pairs()
    keys = [pair_key(p["text1"], p["text2"]) for p in stored]
    expected = {pair_key(p["text1"], p["text2"]) for p in client.acknowledged}
    conflicts = db.conflicts()
    return {
        "acknowledged": len(expected), "stored": len(stored),
        "lost": len(expected - set(keys)), "doubled": len(keys) - len(set(keys)), "unexpected": len(set(keys) - expected),
        "conflicts_expected": client.clashes, "conflicts_listed": len(conflicts),
        "reused_id_conflicts": sum(c["reason"] == "id" for c in conflicts),
        "label_conflicts": sum(c["reason"] == "label" for c in conflicts),
        "retries": len(client.retries),
        "retries_all_duplicates": all(a["accepted"] == 0 and a["duplicates"] == len(b["fresh"])
                                      and a["conflicts"] == len(b["clashes"]) for b, a in client.retries),
        "posts_that_found_a_dead_process": client.failed_posts,
        "embeddings_requests": len(outcomes), "embeddings_failed": sum(o[0] != 200 for o in outcomes),
        "versions_answered": sorted({o[1] for o in outcomes if o[1]}),
        **swap, "poll_every_s": WATCH_EVERY_S}


# ---------------------------------------------------------------------------------- throughput

def throughput(urls: list[str], pairs: list[data.Pair], seconds: float, batch: int = 100, in_flight: int = 4) -> dict:
    """Pairs a second and latency percentiles for batches of new pairs, round-robin over `urls`."""
    batches = [pairs[i:i + batch] for i in range(0, len(pairs) - batch + 1, batch)]
    latencies, lock, next_batch = [], threading.Lock(), iter(range(len(batches)))
    deadline = time.time() + seconds

    def worker() -> None:
        with httpx.Client(headers={"authorization": f"Bearer {KEY}"}, timeout=60) as http:
            while time.time() < deadline:
                with lock:
                    b = next(next_batch, None)
                if b is None:
                    return
                started = time.perf_counter()
                body = {"pairs": [{"text1": a, "text2": t, "label": y} for a, t, y in batches[b]]}
                response = http.post(urls[b % len(urls)] + "/v1/pairs", json=body)
                assert response.status_code == 200, response.text
                latencies.append(time.perf_counter() - started)
    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(in_flight)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - started
    return {"pairs_per_s": len(latencies) * batch / elapsed, "p50_ms": 1000 * float(np.percentile(latencies, 50)),
            "p99_ms": 1000 * float(np.percentile(latencies, 99)), "batches": len(latencies)}


def make_home(folder: Path, base: str, database: str | None) -> Path:
    """A home of `base`: on `database`, or on the file store (None: a home made before the database)."""
    from embed_ft import flywheel
    argv = ["--home", str(folder), "--base", base, "--init"] + (["--database", database] if database else [])
    flywheel.main(argv)
    if database is None:
        settings = jsonl.read_json(folder / "flywheel.json")
        jsonl.write_json(folder / "flywheel.json", {k: v for k, v in settings.items() if k != "database"})
    return folder


def compare_stores(work: Path, base: str, pg, pairs: list[data.Pair], seconds: float, repeats: int) -> list[dict]:
    """Each store in turn into a fresh home, `repeats` times, the order reversed every other repeat."""
    setups = [("SQLite", 1), ("PostgreSQL", 3), ("file store", 1)]
    rows = []
    for repeat in range(repeats):
        for name, processes in setups if repeat % 2 == 0 else setups[::-1]:
            database = (pg.database(f"throughput{repeat}") if name == "PostgreSQL"
                        else "sqlite:///pairs.db" if name == "SQLite" else None)  # None: the file store
            home = make_home(work / f"{name.replace(' ', '_')}-{repeat}", base, database)
            servers = [Server(home).start() for _ in range(processes)]
            try:
                for s in servers:
                    s.wait()
                result = throughput([s.url for s in servers], pairs, seconds)
            finally:
                for s in servers:
                    s.stop()
            rows.append({"store": name, "processes": processes, "repeat": repeat, **result, "cpu": cpu_name()})
            print(f"repeat {repeat}: {name:12} {processes} process(es): {result['pairs_per_s']:8.0f} pairs/s, "
                  f"p50 {result['p50_ms']:6.1f} ms, p99 {result['p99_ms']:6.1f} ms ({result['batches']} batches)", flush=True)
    return rows


def print_table(rows: list[dict]) -> None:
    """Medians over the repeats; the rate against the file store's, repeat by repeat."""
    files = {r["repeat"]: r["pairs_per_s"] for r in rows if r["store"] == "file store"}
    print("| store | processes | pairs a second | vs the file store | p50 | p99 |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for name in dict.fromkeys(r["store"] for r in rows):
        mine = [r for r in rows if r["store"] == name]
        ratio = np.median([r["pairs_per_s"] / files[r["repeat"]] for r in mine])
        print(f"| {name} | {mine[0]['processes']} | {np.median([r['pairs_per_s'] for r in mine]):,.0f} | {ratio:.2f}x | "
              f"{np.median([r['p50_ms'] for r in mine]):.0f} ms | {np.median([r['p99_ms'] for r in mine]):.0f} ms |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the model the homes serve (a folder)")
    parser.add_argument("--seconds", type=float, default=30.0, help="each throughput load, at most this long")
    parser.add_argument("--repeats", type=int, default=3, help="each store this many times, in turn with the others")
    parser.add_argument("--work", default="/tmp/flywheel_scale", help="where the homes go (removed first)")
    parser.add_argument("--results", default=str(ROOT / "results" / "flywheel_scale.jsonl"))
    args = parser.parse_args()
    import shutil
    import throwaway_postgres
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    pairs = data.load_pairs(str(SPLITS / "train.tsv.gz"))
    with throwaway_postgres.ThrowawayPostgres() as pg:
        rows = compare_stores(work, args.base, pg, pairs[:100_000], args.seconds, args.repeats)
        print_table(rows)
        home = make_home(work / "scenario", args.base, pg.database("scenario"))
        report = scenario(home, pairs[-1600:-400], pairs[-400:])
        print({k: v for k, v in report.items() if k != "round_output"})
        rows.append({"scenario": report, "cpu": cpu_name()})
    for row in rows:
        jsonl.append(Path(args.results), row)


if __name__ == "__main__":
    main()
