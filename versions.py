"""The model versions a server holds, and how a new one takes over without a restart.

A flywheel home names its current model in `current.json` (flywheel.py replaces it atomically when
a round promotes). A server holds two versions: the current one, and the one before it, so that a
client whose vector index was built with the old vectors can still embed its queries with them
while it re-indexes (`"model": "round-002"`). Any other model name is served by the current version.

    versions = Versions.from_home(Path("fw"))
    HomeWatcher(versions, Path("fw")).start()     # polls current.json; loads a promoted model beside the old one

The new model is loaded in the watcher's thread, beside the one in use, and only then made current:
a single assignment, which the server reads once per request. No request waits for the load, and
each request keeps the version it was admitted with until its response is complete.
"""
from __future__ import annotations

import gc
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import data
import evaluate
import flywheel
import jsonl
from errors import InputError
from model import Embedder, load_model, pick_device

VERSION_NAME = re.compile(r"base|round-\d+")  # names that mean a version, not "whatever is current"


@dataclass
class Version:
    id: str
    model: Embedder
    promoted_at: str | None = None
    train_pairs: int | None = None
    matryoshka_dims: list[int] = field(default_factory=list)

    @property
    def threshold(self) -> float | None:
        return self.model.decision.get("threshold")

    def describe(self) -> dict:
        """The OpenAI model object, with what a client needs to trust the vectors."""
        return {"id": self.id, "object": "model", "owned_by": "embed-ft", "width": self.model.dim,
                "threshold": self.threshold, "training_pairs": self.train_pairs, "promoted_at": self.promoted_at,
                "matryoshka_dims": self.matryoshka_dims, "max_length": self.model.max_length,
                "pooling": self.model.layout.pooling, "prompts": self.model.layout.prompts,  # input_type's values
                "default_prompt_name": self.model.layout.default_prompt_name}


def load_version(version_id: str, folder: str, device: str = "auto", promoted_at: str | None = None) -> Version:
    """A saved folder (with its threshold, training pairs and Matryoshka widths from metrics.json), or a
    base encoder as published (no projection)."""
    model = load_model(folder, None).to(pick_device(device)).eval()  # served, never trained: no mode switch a pass
    metrics_file = Path(folder) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    dims = metrics.get("config", {}).get("matryoshka_dims") or ""
    return Version(version_id, model, promoted_at, metrics.get("training", {}).get("train_pairs"),
                   sorted({int(d) for d in dims.split(",") if d} | ({model.dim} if dims else set())))


def base_version(home: Path, device: str) -> Version:
    """The home's base model as published, at the threshold the last round tuned on validation
    (HOME/base.json), so that a restart is quick; a home no round has judged yet has none, unless it
    has a curated --val to tune one on (kept for the next start)."""
    settings = jsonl.read_json(home / "flywheel.json") or {}
    if not settings.get("base"):
        raise InputError(f"{home} has no flywheel.json: run python flywheel.py --home {home} --base MODEL --init first")
    version = load_version("base", settings["base"], device)
    threshold = flywheel.base_threshold(home)
    if threshold is None and version.threshold is None and settings.get("val"):
        val = data.load_pairs(settings["val"])
        threshold = evaluate.evaluate(version.model, val)["val"]["threshold"]
        jsonl.write_json(home / "base.json", {"threshold": threshold, "validation_pairs": len(val), "round": None})
    if threshold is not None:
        version.model.decision = {"threshold": threshold}
    return version


def freeze_long_lived() -> None:
    """Take what is alive now (above all the models' hundreds of thousands of objects) out of the
    garbage collector's sight, after one collection that frees what a promotion let go. Left in
    sight, each full collection walked them all: a pause of about 100 ms for every request in flight."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Versions:
    """The versions served, newest last; the last is current. At most `keep` are held."""

    def __init__(self, versions: list[Version], keep: int = 2):
        self.keep = keep
        self.held = versions[-keep:]
        freeze_long_lived()

    @property
    def current(self) -> Version:
        return self.held[-1]

    def resolve(self, name: str | None) -> Version:
        """The version a request names; any name that is not a version id means the current one."""
        for version in self.held:
            if version.id == name:
                return version
        if name and VERSION_NAME.fullmatch(name):
            raise KeyError(name)
        return self.current

    def promote(self, version: Version) -> None:
        """Make a loaded version current; the oldest beyond `keep` is let go (requests that hold it
        finish with it)."""
        self.held = (self.held + [version])[-self.keep:]
        freeze_long_lived()

    @classmethod
    def from_folder(cls, folder: str, device: str = "auto") -> "Versions":
        return cls([load_version(Path(folder).resolve().name, folder, device)], keep=1)

    @classmethod
    def from_home(cls, home: Path, device: str = "auto", keep: int = 2) -> "Versions":
        """The current version and the one promoted before it (the base model before two promotions)."""
        promoted = [row for row in jsonl.read(home / "history.jsonl") if row["decision"] == "promoted"]
        pointer = flywheel.current_version(home)
        chain = [("base", None, None)] + [(Path(r["candidate"]).name, r["candidate"], r["time"]) for r in promoted]
        chain = [c for c in chain if c[0] != pointer["version"]] + [(pointer["version"], pointer["path"], pointer["promoted_at"])]
        versions = [base_version(home, device) if path is None else load_version(vid, str(home / path), device, when)
                    for vid, path, when in chain[-keep:]]
        return cls(versions, keep)


class HomeWatcher(threading.Thread):
    """Polls home/current.json every `every` seconds and promotes what it names, once loaded.
    `before_poll` runs first (on Modal: the Volume's reload(), so that this container sees the
    pointer another container wrote); `on_swap(version)` after a promotion."""

    def __init__(self, versions: Versions, home: Path, every: float = 2.0, device: str = "auto",
                 before_poll: Callable[[], None] | None = None, on_swap: Callable[[Version], None] | None = None):
        super().__init__(daemon=True, name="home-watcher")
        self.versions, self.home, self.every, self.device = versions, home, every, device
        self.before_poll, self.on_swap = before_poll, on_swap
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.poll()
            except Exception as e:  # a half-copied folder, a volume hiccup: keep serving, try again
                print(f"warning: could not load the promoted model yet: {e}", flush=True)

    def poll(self) -> None:
        if self.before_poll:
            self.before_poll()
        pointer = flywheel.current_version(self.home)
        if pointer["version"] == self.versions.current.id:
            return
        started = time.perf_counter()
        version = load_version(pointer["version"], str(self.home / pointer["path"]), self.device, pointer["promoted_at"])
        self.versions.promote(version)
        print(f"now serving {version.id} (loaded in {time.perf_counter() - started:.1f} s beside the previous one)",
              flush=True)
        if self.on_swap:
            self.on_swap(version)

    def stop(self) -> None:
        self.stopped.set()
