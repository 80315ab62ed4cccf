"""Dynamic batching: requests that arrive together share one forward pass, on one worker thread.

    batcher = Batcher(token_budget=4096)
    vectors = await batcher.embed(version, input_ids)      # from any request handler (asyncio)

Why one worker: a CPU (or a GPU) runs one forward pass well at a time, and a pass over 32 texts
costs far less than 32 passes over one. Requests only queue their token ids and await a future; the
worker thread takes what is waiting, runs it, and hands each request its rows. The event loop never
waits on the model.

How a batch is made: from the oldest waiting request's model version only (a response is never
computed by two versions), the waiting requests of that version take turns, `chunk` texts each,
until the batch holds `token_budget` tokens. So a request of 2,048 texts is cut into batches, and a
1-text request that arrives meanwhile rides in the next one instead of waiting for all of them.
A batch's texts, of every length, are one forward pass, packed end to end (packing.py), so that
mixing requests costs no padding. Before taking a batch the worker lingers while requests keep
arriving (a client's burst reaches the queue a little apart), and on a CPU each pass takes the
threads that cpu_threads.py leaves it.

When more than `max_queued` texts are waiting, `embed` refuses at once (`QueueFull`): the server
answers 429 with Retry-After, rather than letting latency grow without bound.
"""
from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from embed_ft.cpu_threads import ThreadChooser


class QueueFull(Exception):
    """More texts are waiting than the batcher admits."""


@dataclass
class Job:
    version: object                  # versions.Version: .model.encode_ids, .model.dim
    input_ids: list[list[int]]
    skip: int                        # prompt tokens that pooling leaves out, each text (Embedder.tokenize)
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    order: list[int] = field(default_factory=list)  # longest first
    taken: int = 0                                  # texts of `order` handed to a batch so far
    done: int = 0                                   # texts embedded
    vectors: np.ndarray | None = None

    @property
    def waiting(self) -> int:
        return len(self.order) - self.taken


class Batcher:
    def __init__(self, token_budget: int = 4096, max_queued: int = 16384, chunk: int = 32, bf16: bool | None = None,
                 on_batch: Callable[[int, int], None] | None = None, threads: ThreadChooser | None = None,
                 gap: float = 0.002, cap: float = 0.010):
        self.token_budget, self.max_queued, self.chunk, self.bf16 = token_budget, max_queued, chunk, bf16
        self.gap, self.cap = gap, cap  # seconds: see linger()
        self.threads = threads  # on a CPU: how many threads each pass takes (cpu_threads.py)
        self.on_batch = on_batch  # (texts, tokens) after each forward pass: the metrics
        self.jobs: list[Job] = []
        self.condition = threading.Condition()
        self.closed = False
        self.worker = threading.Thread(target=self.work, daemon=True, name="batcher")
        self.worker.start()

    @property
    def queued(self) -> int:
        """Texts waiting for a forward pass."""
        with self.condition:
            return sum(job.waiting for job in self.jobs)

    async def embed(self, version, input_ids: list[list[int]], skip: int = 0) -> np.ndarray:
        """The embeddings (n, dim) of these token ids, by this version's model."""
        loop = asyncio.get_running_loop()
        job = Job(version, input_ids, skip, loop.create_future(), loop,
                  order=sorted(range(len(input_ids)), key=lambda i: -len(input_ids[i])),
                  vectors=np.empty((len(input_ids), version.model.dim), np.float32))
        if not input_ids:
            return job.vectors
        if self.threads:
            self.threads.watch(threading.get_ident())  # this is the event loop's thread
        with self.condition:
            if self.closed:
                raise RuntimeError("the batcher is closed")
            if sum(j.waiting for j in self.jobs) + len(input_ids) > self.max_queued:
                raise QueueFull(f"{self.max_queued} texts are already waiting")
            self.jobs.append(job)
            self.condition.notify()
        return await job.future

    def close(self) -> None:
        with self.condition:
            self.closed = True
            self.condition.notify()
        self.worker.join(timeout=10)

    # ------------------------------------------------------------------------------ the worker

    def work(self) -> None:
        while True:
            with self.condition:
                while not self.closed and not any(job.waiting for job in self.jobs):
                    self.condition.wait()
                if self.closed:
                    return
                self.linger()
                batch = self.take()
            self.run(batch)

    def linger(self) -> None:
        """Requests a client sends together reach the queue a little apart (the event loop parses and
        tokenises them in turn): while they keep coming, `gap` apart at most, wait for them, up to `cap`."""
        cap = time.monotonic() + self.cap
        while (left := cap - time.monotonic()) > 0 and self.condition.wait(min(self.gap, left)):
            pass

    def take(self) -> list[tuple[Job, list[int]]]:
        """Texts for one forward pass: one version, requests taking turns, within the token budget."""
        version = next(job for job in self.jobs if job.waiting).version
        jobs = [job for job in self.jobs if job.version is version and job.waiting]
        picked: dict[int, list[int]] = {}
        tokens = 0
        while any(job.waiting for job in jobs):
            for number, job in enumerate(jobs):
                for i in job.order[job.taken:job.taken + self.chunk]:
                    length = len(job.input_ids[i])
                    if tokens and tokens + length > self.token_budget:
                        return [(jobs[n], rows) for n, rows in picked.items()]
                    picked.setdefault(number, []).append(i)
                    tokens += length
                    job.taken += 1
        return [(jobs[n], rows) for n, rows in picked.items()]

    def run(self, batch: list[tuple[Job, list[int]]]) -> None:
        """One forward pass; each request whose last texts were in it gets its answer."""
        ids = [job.input_ids[i] for job, rows in batch for i in rows]
        skips = [job.skip for job, rows in batch for _ in rows]
        try:
            vectors = self.forward(batch[0][0].version.model, ids, skips)
        except Exception as error:  # one bad batch fails its requests, not the server
            with self.condition:
                for job, _ in batch:
                    if job in self.jobs:
                        self.jobs.remove(job)
                    job.loop.call_soon_threadsafe(settle, job.future, None, error)
            return
        if self.on_batch:
            self.on_batch(len(ids), sum(map(len, ids)))
        start = 0
        for job, rows in batch:
            job.vectors[rows] = vectors[start:start + len(rows)]
            start += len(rows)
            job.done += len(rows)
            if job.done == len(job.order):
                with self.condition:
                    self.jobs.remove(job)
                job.loop.call_soon_threadsafe(settle, job.future, job.vectors, None)

    def forward(self, model, ids: list[list[int]], skips: list[int]) -> np.ndarray:
        """One forward pass; on a CPU, on the threads that the rest of the machine's load leaves it."""
        with self.threads.using(self.threads.pick()) if self.threads else contextlib.nullcontext():
            return model.encode_ids(ids, batch_size=len(ids), progress=False, bf16=self.bf16, skip=skips)


def settle(future: asyncio.Future, result, error: Exception | None) -> None:
    """Resolve a request's future on its own event loop (unless the client has gone)."""
    if not future.done():
        future.set_exception(error) if error else future.set_result(result)
