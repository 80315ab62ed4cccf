"""A small server that speaks the OpenAI embeddings API on 127.0.0.1, for tests and offline demos.

Embeddings are hashed bags of words (texts sharing words get similar vectors), of the requested
`dimensions` (default 64), salted per server if asked (two servers, two models). The first responses can be made to fail with given HTTP statuses, to
exercise the client's retries. Run it by hand with: python tests/fake_openai.py --port 8765
"""
import argparse
import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np


def bag_of_words(text: str, dimensions: int, salt: str = "") -> list[float]:
    vector = np.zeros(dimensions)
    for word in text.lower().split():
        vector[int(hashlib.md5((salt + word).encode()).hexdigest(), 16) % dimensions] += 1.0
    norm = np.linalg.norm(vector)
    return (vector / norm if norm else vector).tolist()


class FakeOpenAI:
    def __init__(self, failures: list[int] | None = None, port: int = 0, verbose: bool = False, salt: str = ""):
        self.salt = salt                       # another salt, other vectors: another server's model
        self.failures = list(failures or [])   # statuses to answer with, in order, before succeeding
        self.requests: list[dict] = []         # every request received: path, headers, body
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append({"path": self.path, "body": body,
                                        "headers": {k.lower(): v for k, v in self.headers.items()}})
                if server.failures:
                    return self.reply(server.failures.pop(0), {"error": {"message": "try again", "type": "server"}})
                if self.path != "/v1/embeddings":
                    return self.reply(404, {"error": {"message": "not found"}})
                dims = body.get("dimensions") or 64
                inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
                if any(not t for t in inputs):
                    return self.reply(400, {"error": {"message": "'$.input' is invalid: empty string"}})
                data = [{"object": "embedding", "index": i, "embedding": bag_of_words(t, dims, server.salt)} for i, t in enumerate(inputs)]
                self.reply(200, {"object": "list", "data": data[::-1], "model": body["model"],  # any order
                                 "usage": {"prompt_tokens": 0, "total_tokens": 0}})

            def reply(self, status: int, payload: dict):
                raw = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(raw)))
                self.send_header("retry-after-ms", "10")  # keeps the client's backoff short in tests
                self.end_headers()
                self.wfile.write(raw)

            def log_message(self, format, *args):
                if verbose:  # one line per request, numbered, so a rerun that sends none is visible
                    print(f"request {len(server.requests)}: {format % args}", flush=True)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def __enter__(self):
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()

    @property
    def embedding_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"] == "/v1/embeddings"]


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8765)
    fake = FakeOpenAI(port=parser.parse_args().port, verbose=True)
    print(f"serving the OpenAI embeddings API on {fake.base_url} (Ctrl-C to stop)", flush=True)
    try:
        fake.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
