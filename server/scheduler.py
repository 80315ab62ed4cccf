"""Rounds on a schedule, beside a server: every period, a flywheel round in a process of its own
once enough new pairs have arrived.

    RoundScheduler(Path("fw"), every=parse_period("1h"), min_new_pairs=500).start()
"""
from __future__ import annotations

import os
import subprocess
import sys
import threading
from pathlib import Path

from embed_ft import errors, jsonl
from embed_ft.state import home_state
from embed_ft.errors import InputError

FLYWHEEL = Path(__file__).resolve().parents[1] / "flywheel.py"  # a round is the entry point, run as a process


class RoundScheduler(threading.Thread):
    """Every `every` seconds, a flywheel round in a process of its own (at low priority, so that
    training does not stall serving) once `min_new_pairs` pairs have arrived that no round has read.
    The round promotes through home/current.json; the server's watcher swaps the model in. A tick
    that fails (a torn file dropped into the store, a full disk) is one log line, counted in
    /metrics and shown by /health; the next tick goes on."""

    def __init__(self, home: Path, every: float, min_new_pairs: int, metrics=None):
        super().__init__(daemon=True, name="rounds")
        self.home, self.every, self.min_new_pairs, self.metrics = home, every, min_new_pairs, metrics
        self.stopped = threading.Event()
        self.status = {"every_s": every, "min_new_pairs": min_new_pairs, "ticks": 0, "rounds": 0, "failures": 0,
                       "last_decision": None, "last_error": None}

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            self.status["ticks"] += 1
            try:
                self.tick()
            except Exception as e:  # never the end of the scheduler: say it, count it, try again next tick
                self.failed(f"round: the tick failed: {errors.first_line(e)}")

    def tick(self) -> None:
        new = home_state.new_pair_count(self.home)
        if new < self.min_new_pairs:
            return
        print(f"round: {new} new pairs, starting (log: {self.home / 'rounds.log'})", flush=True)
        with open(self.home / "rounds.log", "ab") as log:
            done = subprocess.run([sys.executable, str(FLYWHEEL), "--home", str(self.home)],
                                  stdout=log, stderr=subprocess.STDOUT, preexec_fn=lambda: os.nice(10))
        if done.returncode != 0:
            return self.failed(f"round: exit code {done.returncode}; the last lines of {self.home / 'rounds.log'} say why")
        last = (jsonl.read(self.home / "history.jsonl") or [{}])[-1]
        self.status["rounds"] += 1
        self.status["last_decision"] = {k: last.get(k) for k in ("round", "decision", "current_after", "p_value", "reason")}
        print(f"round {last.get('round')}: {last.get('decision')} (current: {last.get('current_after')}; "
              f"{last.get('reason') or last.get('verdict', '')})", flush=True)

    def failed(self, message: str) -> None:
        print(message, file=sys.stderr, flush=True)
        self.status["failures"] += 1
        self.status["last_error"] = message
        if self.metrics:
            self.metrics.round_failures.inc()

    def stop(self) -> None:
        self.stopped.set()


def parse_period(text: str) -> float:
    """'90', '90s', '10m', '1h', '1d' to seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    number, unit = (text[:-1], text[-1]) if text and text[-1] in units else (text, "s")
    try:
        seconds = float(number) * units[unit]
    except ValueError:
        raise InputError(f"--round-every {text}: give a period such as 90s, 10m, 1h or 1d") from None
    if seconds <= 0:
        raise InputError(f"--round-every {text}: the period must be more than 0")
    return seconds
