"""Runs that never lose work: a checkpoint holds everything a training run needs to continue exactly
where it stopped, and SIGINT / SIGTERM (Ctrl-C, a preempted container) end a run at a step boundary.

The checkpoint is one file, `OUT/checkpoint.pt`: the model, optimiser, scheduler and GradScaler
states, the progress (step, epoch, time spent, validation history, best weights so far) and the
random number generators. Data order needs no state: each epoch's order is drawn from (seed, epoch).
It is written to a temporary file and renamed, so a crash mid-write leaves the previous one intact;
the one before it is kept too (`checkpoint.prev.pt`), so that a latest file damaged some other way
(a full disk, a copy cut short) falls back to it. Both are read with `torch.load(weights_only=True)`,
which unpickles tensors and plain containers only.
"""
from __future__ import annotations

import os
import random
import signal
import sys
import threading
from pathlib import Path

import torch

from embed_ft.errors import InputError, first_line

FILE = "checkpoint.pt"
PREVIOUS = "checkpoint.prev.pt"


def save(path: Path, **state) -> None:
    """Write `state` (tensors, numbers, strings and containers of them) atomically, keeping the
    checkpoint it replaces as PREVIOUS."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state | {"rng": rng_state()}, tmp)
    if path.exists():
        os.replace(path, path.with_name(PREVIOUS))
    os.replace(tmp, path)


def load(path: Path) -> dict:
    """The checkpoint written by `save`, its random number generators restored. If it is damaged,
    the one before it, with a note on stderr; if both are, an InputError that says what to do."""
    damaged = []
    for candidate in (path, path.with_name(PREVIOUS)):
        if not candidate.exists():
            continue
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=True)
        except Exception as e:  # cut short, overwritten, not a checkpoint: torch says it many ways
            damaged.append(f"{candidate.name} is damaged ({first_line(e)})")
            continue
        if candidate != path:
            print(f"note: {damaged[0] if damaged else path.name + ' is missing'}: resuming from {candidate.name}, "
                  f"the checkpoint before it", file=sys.stderr)
        restore_rng(state["rng"])
        return state
    raise InputError(f"{path.parent}: {'; '.join(damaged) or 'no checkpoint'}, and there is no earlier one to fall "
                     f"back to: start again with --overwrite instead of --resume")


def exists(out: Path) -> bool:
    return (out / FILE).is_file() or (out / PREVIOUS).is_file()


def remove(out: Path) -> None:
    for name in (FILE, PREVIOUS):
        (out / name).unlink(missing_ok=True)



def rng_state() -> dict:
    """Python's, torch's CPU and every CUDA generator (dropout draws from them)."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class StopRequests:
    """While active, SIGINT and SIGTERM only ask the training loop to stop at the end of the current
    step (`requested` becomes the signal's name), so the weights are never caught half-updated. A
    second Ctrl-C stops at once. Outside the main thread signals cannot be caught: nothing changes."""

    def __init__(self):
        self.requested: str | None = None
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.requested == "SIGINT" and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = signal.Signals(signum).name
        print(f"\n{self.requested}: stopping after this step and writing a checkpoint "
              f"(Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self) -> "StopRequests":
        if threading.current_thread() is threading.main_thread():
            self._previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
