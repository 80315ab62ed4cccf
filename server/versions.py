"""The model versions a server holds, and how a new one takes over without a restart.

A flywheel home names the versions served, the current one and the one before it, in its database
(`home_state.served`; a round changes that row when it promotes). A server holds both, and any
older version that a corpus folder still names (`home_state.corpora`, written by corpus.py embed
--home), so that a client whose vector index was built with older vectors can still embed its
queries with them while it re-indexes (`"model": "round-002"`), however many promotions come
first. Any other model name is served by the current version.

    versions = Versions.from_home(Path("fw"))
    HomeWatcher(versions, Path("fw")).start()     # polls the row; loads a promoted model beside the old one

Every process of a home polls the same row, so all of them serve what the database says within a
poll period and a load. The new model is loaded in the watcher's thread, beside the one in use, and
only then made current: a single assignment, which the server reads once per request. No request
waits for the load, and each request keeps the version it was admitted with until its response is
complete. A request pinned to a version the database serves but this process has not loaded yet is
told to retry (`Versions.expected`), never given another model's vectors.

The watcher's thread is the only one that reads the home's files (flywheel.json, history.jsonl for
each version's latest audit, the model folders): on a Modal Volume, a reload fails while any of its
files is open, and the reload runs in that same thread, so requests never hold one open.
"""
from __future__ import annotations

import gc
import itertools
import json
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from embed_ft import data, evaluate, history, fingerprint, jsonl
from embed_ft.state import home_state
from embed_ft.errors import InputError
from embed_ft.model import Embedder, load_model, pick_device

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
    model = in_memory(load_model(folder, None).to(pick_device(device)).eval())  # served, never trained
    metrics_file = Path(folder) / "metrics.json"
    metrics = json.loads(metrics_file.read_text()) if metrics_file.is_file() else {}
    dims = metrics.get("config", {}).get("matryoshka_dims") or ""
    return Version(version_id, model, promoted_at, metrics.get("training", {}).get("train_pairs"),
                   sorted({int(d) for d in dims.split(",") if d} | ({model.dim} if dims else set())))


def in_memory(model: Embedder) -> Embedder:
    """The weights copied out of the file they were read from: transformers maps a safetensors file and
    leaves CPU tensors on the mapping, which keeps the file open for as long as the model is served
    (on a Modal Volume, an open file makes every reload fail with "volume busy"). The copy runs on one
    thread: a parallel copy would start a team of OpenMP threads for this (the loading) thread beside
    the batcher's, and every pass the server makes was measured 10% slower for it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.no_grad():
            for tensor in itertools.chain(model.parameters(), model.buffers()):
                if tensor.device.type == "cpu":
                    tensor.data = tensor.data.clone()
    finally:
        torch.set_num_threads(threads)
    gc.collect()  # the mapping goes with its last tensor
    return model


def base_version(home: Path, device: str) -> Version:
    """The home's base model as published, at the threshold the last round tuned on validation
    (kept in the home), so that a restart is quick; a home no round has judged yet has none, unless it
    has a curated --val to tune one on (in this process only: only rounds write the home's state)."""
    settings = jsonl.read_json(home / "flywheel.json") or {}
    if not settings.get("base"):
        raise InputError(f"{home} has no flywheel.json: run python flywheel.py --home {home} --base MODEL --init first")
    version = load_version("base", settings["base"], device)
    threshold = home_state.base_threshold(home)
    if threshold is None and version.threshold is None and settings.get("val"):
        val = data.load_pairs(settings["val"])
        threshold = evaluate.evaluate(version.model, val)["val"]["threshold"]
    if threshold is not None:
        version.model.decision = {"threshold": threshold}
    return version


class NotThatModel(Exception):
    """A version's folder holds another model than the one the home promoted under its id."""


def load_pointer(home: Path, pointer: dict, device: str) -> Version:
    """The version a pointer of `home_state.served` names. Its folder must hold the model the round
    promoted (the pointer's fingerprint): two models under one id would put two models' vectors in
    one client index with no error, so another model is refused, never served."""
    if pointer["path"] is None:
        return base_version(home, device)
    version = load_version(pointer["version"], str(home / pointer["path"]), device, pointer["promoted_at"])
    found = fingerprint.of(version.model) if pointer.get("fingerprint") else None
    if found != pointer.get("fingerprint"):
        raise NotThatModel(f"{home / pointer['path']} holds another model than the one promoted as {pointer['version']} "
                           f"(fingerprint {found[:12]}, promoted {pointer['fingerprint'][:12]}): not served")
    return version


def freeze_long_lived() -> None:
    """Take what is alive now (above all the models' hundreds of thousands of objects) out of the
    garbage collector's sight, after one collection that frees what a promotion let go. Left in
    sight, each full collection walked them all: a pause of about 100 ms for every request in flight."""
    gc.unfreeze()
    gc.collect()
    gc.freeze()


class Versions:
    """The versions served, newest last; the last is current. At most `keep` are held. `expected`:
    the ids the home's database serves (a process may be loading one); `wanted`: its current one;
    `audits`: each version's latest audit in the home's history."""

    def __init__(self, versions: list[Version], keep: int = 2):
        self.keep = keep
        self.held = versions[-keep:]
        self.expected, self.wanted = {v.id for v in self.held}, None
        self.audits: dict[str, dict] = {}
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

    def serve(self, versions: list[Version]) -> None:
        """Make these the versions held, the last current (one assignment); those let go finish the
        requests that hold them."""
        self.held = versions[-self.keep:]
        freeze_long_lived()

    @classmethod
    def from_folder(cls, folder: str, device: str = "auto") -> "Versions":
        return cls([load_version(Path(folder).resolve().name, folder, device)], keep=1)

    @classmethod
    def from_home(cls, home: Path, device: str = "auto") -> "Versions":
        """The versions the home serves: the current one, the one before it (the base model before two
        promotions), and any older one a corpus folder still names."""
        pointers = served_pointers(home)
        versions = cls([load_pointer(home, p, device) for p in pointers], keep=len(pointers))
        versions.wanted, versions.audits = pointers[-1]["version"], history.latest_audits(home)
        return versions


def served_pointers(home: Path) -> list[dict]:
    """The pointers of the versions the home serves, oldest first: those a corpus folder still names
    (home_state.corpora), the previous one and the current one."""
    served = home_state.served(home)
    newest = [p for p in (served["previous"], served["current"]) if p]
    named = sorted(set(home_state.corpora(home).values()) - {p["version"] for p in newest})
    older = [home_state.pointer_of(home, version) for version in named]
    return sorted([p for p in older if p], key=lambda p: p["promoted_at"] or "") + newest


class HomeWatcher(threading.Thread):
    """Polls the home's served versions and base threshold every `every` seconds and serves what they
    say, loading a version first where it is new here. `before_load` runs before a load (on Modal: the
    Volume's reload(), so that this container sees the folder the round committed); `on_swap(version)`
    after a new current version."""

    def __init__(self, versions: Versions, home: Path, every: float = 2.0, device: str = "auto",
                 before_load: Callable[[], None] | None = None, on_swap: Callable[[Version], None] | None = None):
        super().__init__(daemon=True, name="home-watcher")
        self.versions, self.home, self.every, self.device = versions, home, every, device
        self.before_load, self.on_swap = before_load, on_swap
        self.stopped = threading.Event()
        self.history_seen = None  # the first poll reads it again: a round may have written since the load

    def run(self) -> None:
        while not self.stopped.wait(self.every):
            try:
                self.poll()
            except NotThatModel as e:  # loud, every poll, until a person looks: never served
                print(f"error: {e}", flush=True)
            except Exception as e:  # a database or volume hiccup, a half-copied folder: keep serving, try again
                print(f"warning: could not follow the home's versions yet: {e}", flush=True)

    def poll(self) -> None:
        pointers = served_pointers(self.home)
        self.versions.expected = {p["version"] for p in pointers}
        self.versions.wanted = pointers[-1]["version"]
        self.refresh_base_threshold()
        self.refresh_audits()
        if [v.id for v in self.versions.held] == [p["version"] for p in pointers]:
            return
        self.versions.keep = len(pointers)
        if self.before_load:
            self.before_load()
        started, held = time.perf_counter(), {v.id: v for v in self.versions.held}
        self.versions.serve([held.get(p["version"]) or load_pointer(self.home, p, self.device) for p in pointers])
        print(f"now serving {self.versions.current.id} (loaded in {time.perf_counter() - started:.1f} s beside "
              f"{', '.join(v.id for v in self.versions.held[:-1]) or 'nothing'})", flush=True)
        if self.on_swap:
            self.on_swap(self.versions.current)

    def refresh_base_threshold(self) -> None:
        """The base model's threshold, once a round has tuned it: no restart needed to use it."""
        base = next((v for v in self.versions.held if v.id == "base"), None)
        threshold = home_state.base_threshold(self.home) if base is not None else None
        if threshold is not None and base.threshold != threshold:
            base.model.decision = {"threshold": threshold}

    def refresh_audits(self) -> None:
        """Read the history again only when it changed (a round wrote a line)."""
        stamp = history_stamp(self.home)
        if stamp != self.history_seen:
            self.versions.audits, self.history_seen = history.latest_audits(self.home), stamp

    def stop(self) -> None:
        self.stopped.set()


def history_stamp(home: Path) -> tuple[int, int] | None:
    """The history file's size and modification time (a stat opens no file), None while it is missing."""
    try:
        stat = (home / "history.jsonl").stat()
    except FileNotFoundError:
        return None
    return stat.st_size, stat.st_mtime_ns
