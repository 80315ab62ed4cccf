"""A run's output folder (--out): one writer at a time, and nothing of another run overwritten.

A run holds OUT/.lock, which names its machine and process, from start to end, and refreshes it
while it trains. A second run into the same folder refuses at start. A lock is stale, and taken
over with a note, when its process is gone (a crash on this machine), when it has not been
refreshed for STALE_AFTER seconds (a machine that went away), or when it names the same attempt tag
(EMBED_FT_RUN_OWNER) as this run: a sweep's retry of an input whose container was preempted. A folder holding another run's
finished model, or an interrupted run's checkpoint, is only written again when asked:
--overwrite to replace it, --resume to continue the interrupted run.
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from embed_ft import checkpoint
from embed_ft.errors import InputError

LOCK = ".lock"
OWNER = "EMBED_FT_RUN_OWNER"  # set by the sweep's container to its Modal input: a retry is the same owner
REFRESH_EVERY = 60.0   # seconds
STALE_AFTER = 600.0    # seconds without a refresh after which another machine's lock is stale


class Claim:
    """The lock a run holds on its folder; `refresh()` is cheap to call often."""

    def __init__(self, path: Path | None):
        self.path, self.refreshed = path, time.time()

    def refresh(self) -> None:
        if self.path and time.time() - self.refreshed > REFRESH_EVERY:
            os.utime(self.path)
            self.refreshed = time.time()


@contextlib.contextmanager
def claim(out: Path, resume: bool, overwrite: bool, owner: bool = True) -> Iterator[Claim]:
    """Check that a run may write to `out`, then hold its lock until the run ends. Under torchrun
    only rank 0 (`owner`) writes, so only it takes the lock."""
    check_writable(out, resume, overwrite)
    if not owner:
        yield Claim(None)
        return
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK
    take(lock)
    try:
        if overwrite and not resume:
            checkpoint.remove(out)  # an old checkpoint must not be resumed into the new run later
        yield Claim(lock)
    finally:
        lock.unlink(missing_ok=True)
        if created and not any(out.iterdir()):  # a run refused before it wrote anything leaves nothing
            out.rmdir()


def check_writable(out: Path, resume: bool, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise InputError(f"--out {out} is a file, not a folder: give the path of a folder (new or a run's)")
    if resume and not checkpoint.exists(out):
        raise InputError(f"--resume: no checkpoint at {out / checkpoint.FILE}; run once without --resume")
    if resume or overwrite or not out.is_dir():
        return
    finished = finished_metrics(out)
    if finished is not None:
        error = finished.get("fine_tuned", {}).get("test", {}).get("error_rate")
        said = f" (test error {error:.2%})" if isinstance(error, float) else ""
        raise InputError(f"{out} already holds a finished model{said}: add --overwrite to replace it, or train from "
                         f"it into another folder (--model {out} --out NEW)")
    if checkpoint.exists(out):
        raise InputError(f"{out} holds an interrupted run's checkpoint: add --resume to continue it, or "
                         f"--overwrite to start again")


def read_metrics(out: Path) -> dict:
    """OUT/metrics.json, or {} where there is none (or only a torn one)."""
    try:
        return json.loads((out / "metrics.json").read_text())
    except (OSError, ValueError):
        return {}


def finished_metrics(out: Path) -> dict | None:
    """A finished run's metrics.json in `out` (a saved model counts too, metrics or not)."""
    metrics = read_metrics(out)
    return metrics if "fine_tuned" in metrics or (out / "modules.json").is_file() else None


def take(lock: Path) -> None:
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "owner": os.environ.get(OWNER)}
    for _ in range(2):
        try:
            with open(lock, "x") as f:
                json.dump(me, f)
            return
        except FileExistsError:
            holder = read_holder(lock)
            if holder_is_alive(holder, lock):
                raise InputError(f"{lock.parent} is in use by another run (process {holder.get('pid')} on "
                                 f"{holder.get('host')}); wait for it to end, or give another --out") from None
            print(f"note: {lock} was left by a run that is gone (process {holder.get('pid')} on "
                  f"{holder.get('host')}): taking it over", file=sys.stderr)
            lock.unlink(missing_ok=True)
    raise InputError(f"{lock.parent}: another run took the lock at the same moment; give another --out")


def read_holder(lock: Path) -> dict:
    try:
        holder = json.loads(lock.read_text())
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):  # cut short by a crash while it was written
        return {}


def holder_is_alive(holder: dict, lock: Path) -> bool:
    """On this machine: whether its process still runs. Elsewhere: whether it refreshed the lock lately.
    A lock that does not read is being written this instant, or was cut short by a crash long ago."""
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return False
    if not holder:
        return age < 5.0
    if holder.get("owner") and holder["owner"] == os.environ.get(OWNER):
        return False  # an earlier attempt of this same input, which Modal retries only once it is gone
    if holder.get("host") == socket.gethostname() and isinstance(holder.get("pid"), int):
        try:
            os.kill(holder["pid"], 0)
        except ProcessLookupError:
            return False
        except PermissionError:  # another user's process: alive
            return True
        return True
    return age < STALE_AFTER
