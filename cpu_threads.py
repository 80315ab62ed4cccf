"""How many threads a pass takes on a CPU: every core, or one fewer while others need one.

    threads = ThreadChooser()
    threads.watch(threading.get_ident())     # the server: from the event loop's thread, so that its work counts as others'
    with threads.using(threads.pick()):      # before each forward pass, on the batcher's thread
        ...
    threads.follow()                         # training: before each step, torch's threads set to pick()'s

Why: torch runs a pass on every core by default, but a server's cores are shared: the event loop
parses requests and writes responses, and on a small machine the clients themselves may run on
the same cores. When another thread takes a core in the middle of a pass, the pass's other threads
wait for it at every barrier, and the pass slows by far more than that core's share; worse, the
starved client sends less, so batches shrink. So while other work keeps a share of a core busy,
passes leave it one core; while the cores are the model's alone, passes take them all. Measured
both ways on 2 cores (docs/serving.md): neither fixed count is best under every client and load.
Training and the flywheel's rounds follow the same rule step by step (`train.py --threads`): beside
a server, or any job that keeps a core busy, a step on every core waits for that core at each
barrier and runs at a third of its speed on 2 cores (docs/speed.md).

"Others" is what the machine's cores (those this process may run on) spent busy, from
/proc/stat, less what this process's passes spent, over the last `window` seconds. Where
/proc/stat does not exist, passes take every core, torch's default.
"""
from __future__ import annotations

import contextlib
import os
import time

import torch

BUSY = 0.3  # others' share of a core from which a pass leaves them one (measured, docs/serving.md)


def available_cores() -> list[int]:
    """The cores this process may run on (a container's CPU set, not the host's)."""
    return sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))


def busy_seconds(cores: list[int]) -> float | None:
    """CPU seconds these cores have spent busy (not idle, not waiting on I/O) since boot; None off Linux."""
    wanted, busy = {f"cpu{c}" for c in cores}, 0
    try:
        with open("/proc/stat") as f:
            for line in f:
                if not line.startswith("cpu"):
                    break  # the per-core lines come first
                name, *ticks = line.split()
                if name in wanted:
                    ticks = list(map(int, ticks[:8]))
                    busy += sum(ticks) - ticks[3] - ticks[4]
    except OSError:
        return None
    return busy / os.sysconf("SC_CLK_TCK")


class ThreadChooser:
    def __init__(self, cores: list[int] | None = None, busy: float = BUSY, window: float = 0.5, counter=None,
                 pauses: bool = True):
        """`counter()`: the busy CPU seconds of the cores so far (default: /proc/stat, `busy_seconds`).
        `pauses`: the passes pause between bursts (a server's), so a pass after a long gap forgets
        what others did while it idled; training never pauses, and a step may take seconds."""
        self.cores, self.busy, self.window, self.pauses = cores or available_cores(), busy, window, pauses
        self.counter = counter or (lambda: busy_seconds(self.cores))
        self.loop_clock: int | None = None
        self.others = 0.0        # cores' worth used by everything but the passes, over the last window
        self.since: tuple[float, float | None, float] | None = None  # (wall, machine busy, our passes) then

    def watch(self, thread_id: int) -> None:
        """A thread of this process whose work is not the passes' (the event loop); the first call counts."""
        if self.loop_clock is None and hasattr(time, "pthread_getcpuclockid"):
            self.loop_clock = time.pthread_getcpuclockid(thread_id)

    def pick(self) -> int:
        """Threads for the next pass: every core, less one while others keep `busy` of a core busy."""
        if len(self.cores) > 1:
            self.measure()
        return len(self.cores) - 1 if self.others >= self.busy else len(self.cores)

    def measure(self) -> None:
        now = time.perf_counter()
        if self.since is not None and now - self.since[0] < self.window:
            return
        loop = time.clock_gettime(self.loop_clock) if self.loop_clock is not None else 0.0
        sample = now, self.counter(), time.process_time() - loop
        if self.pauses and self.since is not None and now - self.since[0] > 4 * self.window:  # the first pass after a pause:
            self.since, self.others = sample, 0.0  # what others did while we idled says nothing of now
            return
        if self.since is not None and sample[1] is not None:
            self.others = max(0.0, (sample[1] - self.since[1]) - (sample[2] - self.since[2])) / (now - self.since[0])
        self.since = sample

    def follow(self) -> int:
        """For work that runs one pass after another on its own thread (a training step): torch's
        threads set to pick()'s number whenever it changes. Returns the number."""
        wanted = self.pick()
        if wanted != torch.get_num_threads():
            torch.set_num_threads(wanted)
        return wanted

    @contextlib.contextmanager
    def using(self, threads: int):
        """torch's intra-op threads set to `threads` for the calling thread, then put back."""
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            yield
        finally:
            torch.set_num_threads(before)
