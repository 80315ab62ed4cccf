"""An advisory lock on a file, for one writer at a time on one machine.

    with FileLock(home / "round.lock"):                  # waits its turn
    with FileLock(home / "round.lock", wait=False):      # or BusyError at once, naming the holder

The kernel holds the lock (flock), not the file: a process killed with the lock (kill -9, a power
cut) releases it as it dies, so a lock left by a killed round needs no cleaning up; the file that
stays behind only says who held it last. flock does not reach across machines: on a Modal Volume
the Cron round is kept from overlapping itself by `max_containers=1` instead (serve.py).
"""
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from embed_ft.errors import InputError


class BusyError(InputError):
    """Another process holds the lock."""


class FileLock:
    def __init__(self, path: Path, wait: bool = True):
        self.path, self.wait = Path(path), wait

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.file = open(self.path, "a+")
        try:
            fcntl.flock(self.file, fcntl.LOCK_EX | (0 if self.wait else fcntl.LOCK_NB))
        except BlockingIOError:
            self.file.seek(0)
            holder = self.file.read().strip() or "another process"
            self.file.close()
            raise BusyError(f"{self.path} is held by {holder}: one at a time; try again when it is done") from None
        self.file.seek(0)
        self.file.truncate()
        self.file.write(f"pid {os.getpid()} since {time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n")
        self.file.flush()
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.file, fcntl.LOCK_UN)
        self.file.close()
