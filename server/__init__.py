"""The server's helpers (serve.py is the server): the request contract, dynamic batching and its
threads, the versions held and their hot swap, the scheduled rounds, Prometheus, draining on SIGTERM."""
