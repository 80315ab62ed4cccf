"""SIGTERM, as a platform sends it before it stops a machine: finish what was admitted, admit nothing new.

    app = Drain(app)                                   # counts requests in flight; 503 once draining
    DrainingServer(config, app, rounds).run(sockets=[listener])

On the first SIGTERM (or Ctrl-C) the server goes on listening but answers every new request with a
503 and Retry-After, in the OpenAI error shape, so that a load balancer or a client's retry sends it
elsewhere; the requests already admitted run to completion; the round scheduler stops between
rounds (a round already running is a process of its own: it finishes its write, or resumes when run
again); then uvicorn stops. A second signal, or `grace_s` without the in-flight count reaching zero,
stops at once.
"""
from __future__ import annotations

import json
import threading
import time

import uvicorn


class Drain:
    """Plain ASGI: the number of HTTP requests in flight, and a 503 for new ones once `draining`."""

    def __init__(self, app):
        self.app, self.in_flight, self.draining = app, 0, False

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        if self.draining:
            return await refuse(send)
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1


async def refuse(send) -> None:
    body = json.dumps({"error": {"message": "the server is shutting down: retry on another replica", "type": "server_error",
                                 "param": None, "code": "shutting_down"}}).encode()
    await send({"type": "http.response.start", "status": 503,
                "headers": [(b"content-type", b"application/json"), (b"retry-after", b"1"), (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain, rounds=None, grace_s: float = 30.0):
        super().__init__(config)
        self.drain, self.rounds, self.grace_s = drain, rounds, grace_s

    def handle_exit(self, sig, frame) -> None:
        if self.drain.draining:  # a second signal: now
            return super().handle_exit(sig, frame)
        self.drain.draining = True
        print("shutting down: draining the requests in flight, refusing new ones (503)", flush=True)
        threading.Thread(target=self.finish, daemon=True).start()

    def finish(self) -> None:
        if self.rounds is not None:
            self.rounds.stop()
        deadline = time.monotonic() + self.grace_s
        while self.drain.in_flight and time.monotonic() < deadline:
            time.sleep(0.05)
        self.should_exit = True
