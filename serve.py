"""Serve the model, collect labelled pairs, and let the flywheel turn: one app, here or on Modal.

    python serve.py --model out                                   # a model folder
    python serve.py --home fw --round-every 1h --min-new-pairs 500  # a flywheel home, rounds on a schedule
    modal deploy serve.py                                         # the same app on Modal, with a Cron round

Routes (docs/serving.md has the contract in full):
    POST /v1/embeddings   the OpenAI embeddings contract: the official `openai` client works unchanged;
                          our extension `input_type` ("query", "document" or a prompt's name) picks the prompt
    POST /v1/duplicates   {"pairs": [{"text1", "text2"}]}: each pair's cosine and decision at the stored threshold
    POST /v1/pairs        {"pairs": [{"text1", "text2", "label", "id"?, "source"?}]}: into the flywheel's store
    GET  /v1/models       the versions served: width, threshold, training pairs, when promoted
    GET  /health, /metrics  liveness; Prometheus text

What Infinity and text-embeddings-inference do not: pairs are collected (durably, once each,
contradictions kept apart), a promoted model is swapped in without a restart, and the previous
version stays served for clients still re-indexing. Writes need EMBED_FT_WRITE_KEY as a Bearer token;
reads need EMBED_FT_READ_KEY when it is set.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse
from starlette.exceptions import HTTPException

from embed_ft import errors, flywheel
import modal
from embed_ft import paths
from embed_ft.errors import InputError
from embed_ft.evaluate import unit_rows
from embed_ft.server.api_contract import (MAX_BODY_BYTES, MAX_INPUTS, MAX_PAIRS, MAX_STORE_PAIRS, RETRY_AFTER_S, ApiError, check_key,
                                 correction_list, embeddings_payload, input_type, pair_list, read_json, text_list)
from embed_ft.state import home_state
from embed_ft.server.batcher import Batcher, QueueFull
from embed_ft.cpu_threads import ThreadChooser
from embed_ft.server.scheduler import RoundScheduler, parse_period
from embed_ft.server.serve_metrics import Metrics
from embed_ft.state.home_db import StoreUnavailable

INLINE_TEXTS = 64           # requests this small are tokenised and encoded on the event loop itself
WATCH_EVERY_S = 2.0         # how often a home's server polls the versions it should serve


# ---------------------------------------------------------------------------------------- the app

def tokenize(model, texts: list[str], role: str = "default") -> tuple[list[list[int]], int, int]:
    """Token ids as `Embedder.encode` makes them (after the role's prompt, truncated to max_length),
    the prompt tokens pooling leaves out, and how many texts were cut."""
    ids, skip = model.tokenize(texts, role)
    full = [i for i, row in enumerate(ids) if len(row) >= model.max_length]  # only these can have been cut
    longer = model.tokenize([texts[i] for i in full], role, truncate=False)[0] if full else []
    return ids, skip, sum(len(row) > model.max_length for row in longer)


class CountRequests:
    """Each request's route, status and latency into the metrics. Plain ASGI: FastAPI's
    @app.middleware("http") costs a task and a stream a request, which shows at 1-text requests."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), [500]

        async def sending(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)
        try:
            await self.app(scope, receive, sending)
        finally:
            route = scope.get("route")
            self.metrics.request(route.path if route else "unknown", status[0], time.perf_counter() - started)


async def off_loop(size: int, function, *args):
    """Run `function` in a worker thread when the work is large; a few texts cost less inline than
    the hand-over to a thread (the event loop waits on no model either way)."""
    if size <= INLINE_TEXTS:
        return function(*args)
    return await asyncio.to_thread(function, *args)


def build_app(versions, store=None, batcher=None, read_key: str | None = None, write_key: str | None = None,
              ledger=None):
    """The FastAPI app over `versions` (versions.Versions). `store` (home_db.HomeDB, or a file home's
    pair_store.PairStore) enables /v1/pairs; `ledger` (heldout.Ledger) knows the split of each text a
    round has seen (a stored pair that touches a held-out text will go where that text's split says:
    it is counted by split). /v1/models adds each version's latest audit (`versions.audits`)."""
    metrics = Metrics(lambda: batcher.queued, versions)
    batcher = batcher or Batcher(on_batch=metrics.batch)
    batcher.on_batch = metrics.batch
    app = FastAPI(title="embed-ft", docs_url=None, redoc_url=None)
    app.state.versions, app.state.batcher, app.state.metrics = versions, batcher, metrics

    def version_named(name) -> object:
        if name is not None and not isinstance(name, str):
            raise ApiError(400, "'model' must be a string", "model")
        try:
            return versions.resolve(name)
        except KeyError:
            if name in versions.expected:  # the home serves it; this process is still loading it
                raise ApiError(503, f"model version '{name}' is being loaded here: retry after {RETRY_AFTER_S} s",
                               "model", "model_loading", "server_error", {"Retry-After": str(RETRY_AFTER_S)}) from None
            held = ", ".join(v.id for v in versions.held)
            raise ApiError(404, f"model version '{name}' is not served here (served: {held})", "model",
                           "model_not_found") from None

    async def embed(version, texts: list[str], role: str = "default") -> tuple[np.ndarray, int, int]:
        ids, skip, truncated = await off_loop(len(texts), tokenize, version.model, texts, role)
        try:
            vectors = await batcher.embed(version, ids, skip)
        except QueueFull as e:
            raise ApiError(429, f"the server is busy ({e}): retry after {RETRY_AFTER_S} s", code="queue_full",
                           kind="rate_limit_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        metrics.truncated.inc(truncated)
        metrics.by_version.labels(version.id).inc()
        return vectors, sum(map(len, ids)), truncated

    app.add_middleware(CountRequests, metrics=metrics)

    @app.exception_handler(ApiError)
    async def api_error(request, error: ApiError):
        return JSONResponse(error.body(), error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):  # an unknown route, a wrong method
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), error.status_code)

    @app.exception_handler(Exception)
    async def unexpected(request, error: Exception):  # logged here, never sent as a traceback
        print(f"error: {request.url.path}: {errors.first_line(error)}", file=sys.stderr, flush=True)
        return JSONResponse(ApiError(500, "internal error", kind="server_error").body(), 500)

    @app.post("/v1/embeddings")
    async def embeddings(request: Request):
        check_key(request, read_key, "embeddings")
        body = await read_json(request)
        texts = text_list(body.get("input"), "input", MAX_INPUTS)
        version = version_named(body.get("model"))
        encoding = body.get("encoding_format") or "float"
        if encoding not in ("float", "base64"):
            raise ApiError(400, f"'encoding_format' must be float or base64 (got {json.dumps(encoding)})", "encoding_format")
        dimensions = body.get("dimensions")
        if dimensions is not None and (isinstance(dimensions, bool) or not isinstance(dimensions, int)
                                       or not 1 <= dimensions <= version.model.dim):
            raise ApiError(400, f"'dimensions' must be an integer from 1 to {version.model.dim} "
                           f"(trained with Matryoshka: {version.matryoshka_dims or 'none'})", "dimensions")
        role = input_type(body.get("input_type"), version.model.layout.prompts)
        vectors, tokens, truncated = await embed(version, texts, role)
        data_ = await off_loop(len(texts), embeddings_payload, vectors, dimensions, encoding)
        return JSONResponse({"object": "list", "data": data_, "model": version.id,
                             "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "truncated": truncated})

    @app.post("/v1/duplicates")
    async def duplicates(request: Request):
        check_key(request, read_key, "duplicates")
        body = await read_json(request)
        pairs = pair_list(body, MAX_PAIRS, labelled=False)
        version = version_named(body.get("model"))
        if version.threshold is None:
            why = ("this home's base model has no threshold yet: the first round tunes one on the validation pairs "
                   "the traffic brings (POST /v1/pairs), or give the home a curated --val" if version.id == "base" and store
                   else f"model version '{version.id}' has no stored threshold (it was not saved by train.py)")
            raise ApiError(400, why, "model", "no_threshold")
        vectors, tokens, truncated = await embed(version, [t for p in pairs for t in (p["text1"], p["text2"])])
        vectors = unit_rows(vectors)  # a model published without Normalize
        cosines = (vectors[0::2] * vectors[1::2]).sum(1)
        return {"object": "list", "model": version.id, "threshold": version.threshold,
                "data": [{"index": i, "cosine": float(c), "is_duplicate": bool(c > version.threshold)}
                         for i, c in enumerate(cosines)],
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}, "truncated": truncated}

    def check_writes(request: Request) -> None:
        if store is None:
            raise ApiError(404, "this server collects no pairs: serve a flywheel home (--home)", code="no_store")
        if not write_key:
            raise ApiError(401, "this server has no write key: set EMBED_FT_WRITE_KEY to accept pairs",
                           code="no_write_key", kind="authentication_error")
        check_key(request, write_key, "writes")

    @app.post("/v1/pairs/corrections")
    async def corrections(request: Request):  # a person's: a label corrected, or a pair withdrawn, with who and why
        check_writes(request)
        rows = correction_list(await read_json(request, MAX_BODY_BYTES), MAX_STORE_PAIRS)
        if not hasattr(store, "correct"):
            raise ApiError(404, "this home keeps its pairs in files: python flywheel.py --home HOME --migrate first",
                           code="no_store")
        try:
            corrected = await asyncio.to_thread(store.correct, rows)
        except InputError as e:
            raise ApiError(404, str(e), "corrections", "pair_not_found") from None
        except (StoreUnavailable, OSError) as e:
            print(f"error: /v1/pairs/corrections: {errors.first_line(e)}", file=sys.stderr, flush=True)
            raise ApiError(503, f"the pair store is unavailable; retry after {RETRY_AFTER_S} s", code="store_unavailable",
                           kind="server_error", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        return {"object": "pairs.corrections", "corrected": corrected}

    @app.post("/v1/pairs")
    async def pairs(request: Request):
        check_writes(request)
        rows = pair_list(await read_json(request, MAX_BODY_BYTES), MAX_STORE_PAIRS, labelled=True)
        try:
            outcome = await asyncio.to_thread(store.add, rows)  # acknowledged once committed
        except (StoreUnavailable, OSError) as e:  # a full disk, a database down: said once, never a traceback
            print(f"error: /v1/pairs: the store cannot take the batch: {errors.first_line(e)}", file=sys.stderr, flush=True)
            raise ApiError(503, f"the pair store is unavailable; retry after {RETRY_AFTER_S} s (a batch is stored whole "
                           "or not at all: the retry is safe)", code="store_unavailable", kind="server_error",
                           headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        try:  # the batch is committed: a read that fails now must not tell the client it was not
            touching = await asyncio.to_thread(held_out_splits, rows)
        except (StoreUnavailable, OSError) as e:
            print(f"error: /v1/pairs: stored, but the splits could not be read: {errors.first_line(e)}", file=sys.stderr,
                  flush=True)
            touching = None
        metrics.pairs(outcome, touching or {})
        return {"object": "pairs.batch", **outcome, "touching_held_out": sum(touching.values()) if touching is not None else None}

    def held_out_splits(rows: list[dict]) -> dict[str, int]:
        """How many of the pairs touch a text that a round has held out, by that text's split."""
        if ledger is None:
            return {}
        ledger.refresh()  # what the last round assigned
        counts: dict[str, int] = {}
        for r in rows:
            split = next((s for s in map(ledger.split, (r["text1"], r["text2"])) if s not in (None, "train")), None)
            if split:
                counts[split] = counts.get(split, 0) + 1
        return counts

    @app.get("/v1/models")
    async def models(request: Request):
        check_key(request, read_key, "models")
        return {"object": "list", "current": versions.current.id,
                "data": [v.describe() | {"audit": versions.audits.get(v.id)} for v in reversed(versions.held)]}

    @app.get("/v1/models/{version_id}")
    async def model(request: Request, version_id: str):  # the openai client's models.retrieve
        check_key(request, read_key, "models")
        version = next((v for v in versions.held if v.id == version_id), None)
        if version is None:
            held = ", ".join(v.id for v in versions.held)
            raise ApiError(404, f"model version '{version_id}' is not served here (served: {held})", "model", "model_not_found")
        return version.describe() | {"audit": versions.audits.get(version.id)}

    @app.get("/health")
    async def health():
        rounds = getattr(app.state, "rounds", None)
        agreement = {} if versions.wanted is None else {"home_version": versions.wanted,
                                                        "agrees": versions.current.id == versions.wanted}
        return {"status": "ok", "version": versions.current.id} | agreement | ({"rounds": rounds.status} if rounds else {})

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type=metrics.content_type)

    return app


def make_app(home: Path | None, model: str | None, device: str = "auto", precision: str = "auto",
             watch_every: float = WATCH_EVERY_S, before_load=None, batch_tokens: int = 4096):
    """Everything a server needs, for a flywheel home or a plain model folder."""
    from embed_ft.model import cpu_has_bf16, pick_device
    from embed_ft.server.versions import HomeWatcher, Versions

    bf16 = {"auto": None, "fp32": False, "bf16": True}[precision]
    target = pick_device(device)
    if bf16 and target.type == "cpu" and not cpu_has_bf16():
        raise InputError("--precision bf16: this CPU has no bf16 units (AVX512-BF16 or AMX); use fp32 or auto")
    if home is not None:
        versions, store, ledger = Versions.from_home(home, device), home_state.pair_store(home), home_state.ledger(home)
        watcher = HomeWatcher(versions, home, watch_every, device, before_load)
        watcher.start()
    else:
        versions, store, ledger = Versions.from_folder(model, device), None, None
    keys = {k: os.environ.get(f"EMBED_FT_{k.upper()}_KEY") or None for k in ("read", "write")}
    threads = ThreadChooser() if target.type == "cpu" else None
    return build_app(versions, store, Batcher(token_budget=batch_tokens, bf16=bf16, threads=threads), keys["read"],
                     keys["write"], ledger)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--home", metavar="DIR", help="a flywheel home (python flywheel.py --home DIR ... --init): serve its "
                        "versions, collect pairs into its database, swap in promoted models")
    source.add_argument("--model", metavar="MODEL", help="a model folder (a train.py --out) to serve as it is")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"],
                        help="auto: bf16 where Embedder.encode would pick it (a GPU, a CPU with bf16 units)")
    parser.add_argument("--batch-tokens", type=int, default=4096, help="tokens a batch (one packed forward pass) at most")
    parser.add_argument("--round-every", help="with --home: look for new pairs this often (90s, 10m, 1h) ...")
    parser.add_argument("--min-new-pairs", type=int, default=1, help="... and run a round once this many have arrived")
    errors.add_debug_flag(parser)
    args = paths.parse(parser, argv)
    if args.round_every and not args.home:
        raise InputError("--round-every needs --home (rounds belong to a flywheel home)")
    if not 0 < args.port < 65536:
        raise InputError(f"--port must be from 1 to 65535 (got {args.port})")
    if args.batch_tokens < 1 or args.min_new_pairs < 1:
        raise InputError("--batch-tokens and --min-new-pairs must be at least 1")
    home = Path(args.home) if args.home else None
    if home is not None and not (home / "flywheel.json").is_file():
        raise InputError(f"{home} is not a flywheel home (no flywheel.json): run python flywheel.py --home {home} "
                         "--base MODEL --init first")
    period = parse_period(args.round_every) if args.round_every else None
    listener = bind(args.host, args.port)  # before the model loads: a port in use is said at once
    app = make_app(home, args.model, args.device, args.precision, batch_tokens=args.batch_tokens)
    if period:
        app.state.rounds = RoundScheduler(home, period, args.min_new_pairs, app.state.metrics)
        app.state.rounds.start()
    import uvicorn
    from embed_ft.server.shutdown import Drain, DrainingServer
    drain = Drain(app)
    server = DrainingServer(uvicorn.Config(drain, log_level="warning"), drain, getattr(app.state, "rounds", None))
    print(ready_line(app, f"http://{args.host}:{args.port}", period), flush=True)
    server.run(sockets=[listener])


def bind(host: str, port: int):
    """The listening socket, bound now (uvicorn serves on it later)."""
    import socket
    listener = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind((host, port))
    except OSError as e:
        listener.close()
        raise InputError(f"cannot listen on {host}:{port}: {e.strerror} (another server there? pick --port)") from None
    listener.listen(2048)
    return listener


def ready_line(app, url: str, period: float | None) -> str:
    """What a person starting the server needs to see once: where, what, and how it is guarded."""
    current = app.state.versions.current
    keys = ", ".join(f"{k} key {'set' if os.environ.get(f'EMBED_FT_{k.upper()}_KEY') else 'not set'}" for k in ("write", "read"))
    rounds = f"rounds every {period:g} s" if period else "no scheduled rounds"
    threshold = f"{current.threshold:.4f}" if current.threshold is not None else "none yet"
    return f"serving {current.id} ({current.model.dim}-d, threshold {threshold}) at {url}/v1; {keys}; {rounds}"


# -------------------------------------------------------------------------------------------- Modal
# The web class scales out to as many containers as traffic needs; a Cron function runs the round on
# a GPU. What they share lives in two places, each for what it does well:
# - the home's PostgreSQL database (flywheel.json's `database`; its password is PGPASSWORD in the
#   Secret embed-ft-database): pairs, conflicts, each text's split, the versions served. A stored
#   batch, a retry, a conflict and a promotion are transactions there, so they hold across containers.
# - the Volume: flywheel.json, history.jsonl and the model folders, written by the round alone and
#   committed before the pointer row changes. A web container writes nothing to it, and reloads it
#   only to read a folder the row names that it has not loaded (the weights are read into memory,
#   so no Volume file is open then). HF_HOME is each container's own disk: no two write one cache.
# Keys come from the Secret embed-ft-keys (EMBED_FT_WRITE_KEY, EMBED_FT_READ_KEY).

app = modal.App("embed-ft-serve")
image = (
    modal.Image.debian_slim(python_version="3.11")
    .uv_pip_install("torch==2.13.0", "transformers==5.24.0", "datasets==5.2.0", "numpy==2.4.6",
                    "safetensors==0.8.0", "tqdm==4.70.1", "openai==3.57.0", "matplotlib==3.10.7",
                    "fastapi==0.165.0", "uvicorn==0.54.0", "uvloop==0.23.0", "httptools==0.9.0",
                    "prometheus_client==0.26.0", "psycopg[binary,pool]==3.3.9")
    .env({"HF_HOME": "/root/.cache/huggingface", "TOKENIZERS_PARALLELISM": "false"})
    .add_local_python_source("embed_ft",  # the name the modules below are imported by: embed_ft/__init__.py
                             "errors", "sources", "run_folder", "jsonl", "data", "batching", "model", "packing", "losses",
                             "options", "checkpoint", "distributed", "card", "run_state", "train", "evaluate",
                             "openai_embeddings", "paired", "paths", "flywheel", "gate", "history", "pooling", "st_layout",
                             "cpu_threads", "calibration", "home_admin", "fingerprint",
                             "server", "state")  # Modal adds serve.py
)
volume = modal.Volume.from_name("embed-ft-flywheel", create_if_missing=True)
HOME = Path("/flywheel/home")
SECRETS = [modal.Secret.from_name("embed-ft-keys", required_keys=["EMBED_FT_WRITE_KEY"]),
           modal.Secret.from_name("embed-ft-database", required_keys=["PGPASSWORD"])]
ROUND_GPU = "H100"
MIN_NEW_PAIRS = 500


def on_postgresql() -> None:
    """Containers share a home only through PostgreSQL: a SQLite file or pair files on a Volume would
    keep each container's writes to itself until a commit, and lose or double them across containers."""
    db = home_state.database(HOME)
    if db is None or db.dialect != "postgresql":
        raise InputError(f"{HOME} must keep its state in PostgreSQL to be served by many containers: make it with "
                         "flywheel.py --init --database postgresql://USER@HOST:PORT/DB (or --migrate --database ...)")


@app.cls(image=image, volumes={"/flywheel": volume}, secrets=SECRETS, cpu=2.0, scaledown_window=15 * 60)
@modal.concurrent(max_inputs=64)
class Server:
    @modal.enter()
    def load(self):
        on_postgresql()
        self.api = make_app(HOME, None, watch_every=5.0, before_load=volume.reload)

    @modal.asgi_app()
    def web(self):
        return self.api


@app.function(image=image, gpu=ROUND_GPU, volumes={"/flywheel": volume}, secrets=SECRETS, timeout=3 * 60 * 60,
              schedule=modal.Cron("0 * * * *"), max_containers=1)
def scheduled_round(min_new_pairs: int = MIN_NEW_PAIRS) -> dict | None:
    """Every hour: a round over the home, once enough new pairs have arrived. One container at a time
    (a round that outlasts the hour makes the next one wait), and the database's round lock besides
    (a round started by hand meanwhile exits at once). The model folder is committed to the Volume
    before the pointer row names it."""
    on_postgresql()
    if not modal.is_local():
        volume.reload()
    new = home_state.new_pair_count(HOME)
    if new < min_new_pairs:
        print(f"{new} new pairs, fewer than {min_new_pairs}: no round")
        return None
    return flywheel.run_round(HOME, flywheel.settings(HOME, {}), commit=None if modal.is_local() else volume.commit)


if __name__ == "__main__":
    errors.run(main)
