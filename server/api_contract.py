"""The server's contract with its clients: the limits, OpenAI-shaped errors, and the checks that
turn a request body into texts or pairs, or into the 4xx that says what is wrong with it.

    texts = text_list(body.get("input"), "input", MAX_INPUTS)      # or ApiError(400, "'input[3]' is empty", ...)

Each check names the field (`param`, as OpenAI's errors do: "input[3]", "pairs[0].label"), so a
client sees which item of a 2,048-item request to fix. serve.py calls these and turns ApiError into
{"error": {"message", "type", "param", "code"}} with its status.
"""
from __future__ import annotations

import asyncio
import base64
import hmac
import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np


MAX_INPUTS = 2048           # texts a request, as OpenAI's API
MAX_PAIRS = 1024            # pairs a /v1/duplicates request (2,048 texts)
MAX_STORE_PAIRS = 10_000    # pairs a /v1/pairs request
MAX_TEXT_CHARS = 40_000     # characters a text: far past any model's max_length, short of abuse
MAX_BODY_BYTES = 32 << 20   # 32 MiB a /v1/pairs body (10,000 pairs of long texts)
MAX_READ_BODY_BYTES = 4 << 20  # 4 MiB a body of the read routes: 2,048 texts of 2,000 characters
INLINE_BODY_BYTES = 64 << 10   # bodies up to this are parsed on the event loop; larger ones by PARSERS
PARSERS = ThreadPoolExecutor(max_workers=2, thread_name_prefix="parse")  # two large bodies parsed at a time
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An OpenAI-shaped error: {"error": {"message", "type", "param", "code"}} with an HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error", headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------ reading requests

async def read_json(request, limit: int = MAX_READ_BODY_BYTES) -> dict:
    """The request's JSON object, or the 4xx that says what is wrong with it. A body over `limit` is
    refused while it arrives; a large one is parsed off the event loop, two at a time, so that what a
    body can cost is bounded: parsed JSON takes up to some 25 times its bytes (a million two-letter
    strings are a million objects), and twenty such bodies at once would otherwise all be parsed
    together, each holding the loop while it is."""
    if request.headers.get("content-type", "").split(";")[0].strip() != "application/json":
        raise ApiError(415, "the body must be JSON, sent with Content-Type: application/json", code="unsupported_media_type")
    too_large = ApiError(413, f"the body is over {limit >> 20} MiB", code="body_too_large")
    if int(request.headers.get("content-length") or 0) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():  # a chunked body has no length to check up front
        body += chunk
        if len(body) > limit:
            raise too_large
    if len(body) <= INLINE_BODY_BYTES:
        return parse(body)
    return await asyncio.get_running_loop().run_in_executor(PARSERS, parse, bytes(body))


def parse(body: bytes) -> dict:
    """A body's JSON object, every string of it encodable, or the 400 that says why not."""
    try:
        parsed = json.loads(body)
    except ValueError as e:
        raise ApiError(400, f"the body is not valid JSON: {e}", code="invalid_json") from None
    except RecursionError:
        raise ApiError(400, "the body is nested too deeply", code="invalid_json") from None
    if not isinstance(parsed, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    where = None if encodable(parsed) else unencodable(parsed)
    if where is not None:
        raise ApiError(400, f"'{where}' is not valid Unicode (a lone surrogate such as \\ud800): send UTF-8 text",
                       where, "invalid_unicode")
    return parsed


def encodable(parsed: dict) -> bool:
    """Whether every string of the body has a UTF-8 form: one pass in C, so that only a bad body pays
    for the walk that names the field."""
    try:
        json.dumps(parsed, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def unencodable(value, where: str = "") -> str | None:
    """The first field (as OpenAI names it: "input[3]", "pairs[0].text1") holding a string that JSON
    allows but no encoder can take: a lone UTF-16 surrogate, which has no UTF-8 form."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return where or "body"
        return None
    items = value.items() if isinstance(value, dict) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        inner = f"{where}[{key}]" if isinstance(key, int) else f"{where}.{key}" if where else str(key)
        if isinstance(key, str) and unencodable(key) is not None:
            return inner.encode("utf-8", "backslashreplace").decode()
        found = unencodable(item, inner)
        if found is not None:
            return found
    return None


def one_text(text, where: str) -> str:
    """A non-empty string of at most MAX_TEXT_CHARS characters."""
    if isinstance(text, (list, int)) and not isinstance(text, bool):
        raise ApiError(400, f"'{where}' is a token array: this server takes strings only (LangChain's OpenAIEmbeddings "
                       "sends token ids at its defaults: pass check_embedding_ctx_length=False)", where, "token_arrays_unsupported")
    if not isinstance(text, str):
        raise ApiError(400, f"'{where}' must be a string, not {type(text).__name__}", where)
    if not text.strip():
        raise ApiError(400, f"'{where}' is empty", where, "empty_input")
    if len(text) > MAX_TEXT_CHARS:
        raise ApiError(400, f"'{where}' has {len(text):,} characters; at most {MAX_TEXT_CHARS:,}", where, "text_too_long")
    return text


def text_list(value, param: str, limit: int) -> list[str]:
    """A string or a list of strings (OpenAI's `input`)."""
    if isinstance(value, str):
        return [one_text(value, param)]
    if not isinstance(value, list) or not value:
        raise ApiError(400, f"'{param}' must be a non-empty string or a non-empty list of strings", param)
    if len(value) > limit:
        raise ApiError(400, f"'{param}' has {len(value):,} items; at most {limit:,} a request", param, "too_many_inputs")
    return [one_text(text, f"{param}[{i}]") for i, text in enumerate(value)]


def pair_list(body: dict, limit: int, labelled: bool) -> list[dict]:
    pairs = body.get("pairs")
    if not isinstance(pairs, list) or not pairs:
        raise ApiError(400, "'pairs' must be a non-empty list of objects", "pairs")
    if len(pairs) > limit:
        raise ApiError(400, f"'pairs' has {len(pairs):,} items; at most {limit:,} a request", "pairs", "too_many_inputs")
    checked = []
    for i, pair in enumerate(pairs):
        if not isinstance(pair, dict):
            raise ApiError(400, f"'pairs[{i}]' must be an object", f"pairs[{i}]")
        text1, text2 = (one_text(pair.get(k), f"pairs[{i}].{k}") for k in ("text1", "text2"))
        row = {"text1": text1, "text2": text2}
        if labelled:
            label = pair.get("label")
            if isinstance(label, bool) or label not in (0, 1):
                raise ApiError(400, f"'pairs[{i}].label' must be 0 or 1 (got {json.dumps(label)})", f"pairs[{i}].label")
            for key in ("id", "source"):
                if pair.get(key) is not None and not isinstance(pair[key], (str, int)):
                    raise ApiError(400, f"'pairs[{i}].{key}' must be a string", f"pairs[{i}].{key}")
            row |= {"label": int(label), "id": pair.get("id"), "source": pair.get("source")}
        checked.append(row)
    return checked


def correction_list(body: dict, limit: int) -> list[dict]:
    """POST /v1/pairs/corrections: each {text1, text2} or {id}, "label" 0, 1 or null (withdraw), "by", "why"."""
    items = body.get("corrections")
    if not isinstance(items, list) or not items or len(items) > limit:
        raise ApiError(400, f"'corrections' must be a list of 1 to {limit:,} objects", "corrections")
    checked = []
    for i, item in enumerate(items):
        where = f"corrections[{i}]"
        if not isinstance(item, dict):
            raise ApiError(400, f"'{where}' must be an object", where)
        row = ({"id": str(item["id"])} if item.get("id") is not None else
               {k: one_text(item.get(k), f"{where}.{k}") for k in ("text1", "text2")})
        label = item.get("label")
        if isinstance(label, bool) or label not in (0, 1, None):
            raise ApiError(400, f"'{where}.label' must be 0, 1 or null to withdraw the pair", f"{where}.label")
        for key in ("by", "why"):
            if not isinstance(item.get(key), str) or not item[key].strip():
                raise ApiError(400, f"'{where}.{key}' must say {'who corrects' if key == 'by' else 'why'}", f"{where}.{key}")
        checked.append(row | {"label": label, "by": item["by"], "why": item["why"]})
    return checked


def input_type(value, prompts: dict[str, str]) -> str:
    """Our extension to OpenAI's embeddings request: which of the model's prompts the texts take.
    "query" and "document" take the model's prompts for those roles (where it names them), a
    prompt's own name takes that prompt; absent, the model's default prompt."""
    allowed = ["query", "document"] + [name for name in prompts if name not in ("query", "document")]
    if value is None:
        return "default"
    if value not in allowed:
        raise ApiError(400, f"'input_type' must be one of {', '.join(map(json.dumps, allowed))} (got {json.dumps(value)})",
                       "input_type")
    return value


def check_key(request, key: str | None, what: str) -> None:
    """A Bearer token, compared in constant time. `key` None: this kind of route is open."""
    if key is None:
        return
    given = request.headers.get("authorization", "")
    token = given[7:] if given.lower().startswith("bearer ") else ""
    if not token or not hmac.compare_digest(token.encode(), key.encode()):
        raise ApiError(401, f"{what} need a valid API key: Authorization: Bearer <key>", code="invalid_api_key",
                       kind="authentication_error", headers={"WWW-Authenticate": "Bearer"})


def embeddings_payload(vectors: np.ndarray, dimensions: int | None, encoding: str) -> list[dict]:
    """OpenAI's data list: the first `dimensions` values re-normalised, as floats or base64 float32."""
    if dimensions:
        vectors = vectors[:, :dimensions]
        vectors = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    vectors = vectors.astype("<f4")
    return [{"object": "embedding", "index": i,
             "embedding": base64.b64encode(v.tobytes()).decode() if encoding == "base64" else v.tolist()}
            for i, v in enumerate(vectors)]
