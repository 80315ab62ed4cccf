"""The proprietary baseline: embeddings from the OpenAI API, or any server that speaks it, cached
on disk so that a rerun sends no request.
"""
from __future__ import annotations

import hashlib
import json
import os
import sqlite3
from pathlib import Path

import numpy as np

from embed_ft.errors import InputError

BATCH_SIZE = 512  # texts per request
OFFICIAL_ENDPOINT = "https://api.openai.com/v1"


class OpenAIEmbedder:
    """Embeddings from the OpenAI API, or any server that speaks it (`base_url`).

    Requests go in batches; the client retries rate limits (429) and server errors (5xx) with
    exponential backoff, honouring Retry-After. Every vector lands in an SQLite cache keyed by a hash
    of (endpoint, model, dimensions, text) as soon as its batch returns, so a rerun sends no request
    and an interrupted run loses nothing; another server's vectors are never taken for these. The API key is read by the client from OPENAI_API_KEY and is
    never written anywhere.
    """

    def __init__(self, model: str = "text-embedding-3-small", dimensions: int | None = None,
                 base_url: str | None = None, cache_path: str | Path = "~/.cache/embed-ft/openai.sqlite",
                 max_retries: int = 8):
        from openai import OpenAI
        if not os.environ.get("OPENAI_API_KEY"):
            raise InputError("set OPENAI_API_KEY (any value will do for a local server that ignores it)")
        self.client = OpenAI(base_url=base_url, max_retries=max_retries)  # base_url None: OPENAI_BASE_URL or api.openai.com
        self.model, self.dimensions = model, dimensions
        # The endpoint is part of each key: two servers may name different models alike. The official
        # API's keys leave it out, as they always have, so that an existing cache stays valid.
        endpoint = str(self.client.base_url).rstrip("/")
        self.endpoint = [] if endpoint == OFFICIAL_ENDPOINT else [endpoint]
        cache_path = Path(cache_path).expanduser()
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        self.cache = sqlite3.connect(cache_path)
        self.cache.execute("CREATE TABLE IF NOT EXISTS embedding (key TEXT PRIMARY KEY, vector BLOB)")

    def key(self, text: str) -> str:
        return hashlib.sha256(json.dumps(self.endpoint + [self.model, self.dimensions, text]).encode()).hexdigest()

    def encode(self, texts: list[str], batch_size: int = BATCH_SIZE) -> np.ndarray:
        from tqdm.auto import tqdm
        keys = [self.key(t) for t in texts]
        found = self.cached(set(keys))
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys) if k not in found))
        for start in tqdm(range(0, len(missing), batch_size), desc="openai", unit="request",
                          disable=len(missing) <= batch_size):
            batch = missing[start:start + batch_size]
            # The API rejects empty strings; a single space embeds as "nothing" just as well.
            extra = {"dimensions": self.dimensions} if self.dimensions else {}
            response = self.client.embeddings.create(model=self.model, input=[t or " " for t in batch], **extra)
            vectors = [np.asarray(item.embedding, dtype=np.float32) for item in sorted(response.data, key=lambda d: d.index)]
            rows = [(self.key(t), v.tobytes()) for t, v in zip(batch, vectors)]
            with self.cache:  # committed per batch: an interruption loses at most one request
                self.cache.executemany("INSERT OR REPLACE INTO embedding VALUES (?, ?)", rows)
            found.update({k: np.frombuffer(v, dtype=np.float32) for k, v in rows})
        matrix = np.stack([found[k] for k in keys])
        return matrix / np.maximum(np.linalg.norm(matrix, axis=1, keepdims=True), 1e-12)

    def cached(self, keys: set[str]) -> dict[str, np.ndarray]:
        found, keys = {}, list(keys)
        for start in range(0, len(keys), 900):  # SQLite caps the number of query parameters
            chunk = keys[start:start + 900]
            query = f"SELECT key, vector FROM embedding WHERE key IN ({','.join('?' * len(chunk))})"
            found.update({k: np.frombuffer(v, dtype=np.float32) for k, v in self.cache.execute(query, chunk)})
        return found
