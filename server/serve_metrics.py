"""What the server counts, in Prometheus' text format (`GET /metrics`), through prometheus_client.

    embed_ft_requests_total{route, code}         requests answered, by route and HTTP status
    embed_ft_request_seconds{route}              latency histogram
    embed_ft_batch_texts                         texts a forward pass (the batcher at work)
    embed_ft_batch_tokens                        tokens a forward pass (packed: no padding)
    embed_ft_queue_texts                         texts waiting for a forward pass, now
    embed_ft_texts_truncated_total               texts cut to the model's max_length
    embed_ft_pairs_total{outcome}                /v1/pairs: accepted, duplicate, conflict, self_pair, touching_held_out
    embed_ft_pairs_held_out_total{split}         ... of those touching a held-out text, by the text's split
    embed_ft_round_failures_total                scheduled rounds (or their ticks) that failed
    embed_ft_model_version{version, role}        1 for each version served: current or previous
    embed_ft_version_requests_total{version}     embeddings and duplicates requests, by the version that answered

A registry of its own per app, so that two servers in one process (the tests) count apart.
"""
from __future__ import annotations

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, disable_created_metrics,
                               generate_latest)

disable_created_metrics()  # the *_created series double the page and say nothing a scrape needs

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)


class Metrics:
    content_type = CONTENT_TYPE_LATEST

    def __init__(self, queued, versions):
        self.registry = registry = CollectorRegistry()
        self.versions = versions
        self.requests = Counter("embed_ft_requests", "Requests answered", ["route", "code"], registry=registry)
        self.latency = Histogram("embed_ft_request_seconds", "Request latency", ["route"], buckets=LATENCY_BUCKETS,
                                 registry=registry)
        self.batch_texts = Histogram("embed_ft_batch_texts", "Texts a forward pass", buckets=BATCH_BUCKETS, registry=registry)
        self.batch_tokens = Histogram("embed_ft_batch_tokens", "Tokens a forward pass (packed end to end)",
                                      buckets=tuple(64 * b for b in BATCH_BUCKETS), registry=registry)
        self.queue = Gauge("embed_ft_queue_texts", "Texts waiting for a forward pass", registry=registry)
        self.queue.set_function(queued)
        self.truncated = Counter("embed_ft_texts_truncated", "Texts cut to max_length", registry=registry)
        self.pair_outcomes = Counter("embed_ft_pairs", "Pairs posted to /v1/pairs, by outcome", ["outcome"],
                                     registry=registry)
        self.held_out = Counter("embed_ft_pairs_held_out", "Pairs posted that touch a held-out text, by its split",
                                ["split"], registry=registry)
        self.round_failures = Counter("embed_ft_round_failures", "Scheduled rounds or ticks that failed", registry=registry)
        self.by_version = Counter("embed_ft_version_requests", "Requests answered, by model version", ["version"],
                                  registry=registry)
        self.version = Gauge("embed_ft_model_version", "Versions served", ["version", "role"], registry=registry)

    def request(self, route: str, code: int, seconds: float) -> None:
        self.requests.labels(route, str(code)).inc()
        self.latency.labels(route).observe(seconds)

    def batch(self, texts: int, tokens: int) -> None:
        self.batch_texts.observe(texts)
        self.batch_tokens.observe(tokens)

    def pairs(self, outcome: dict, held_out_splits: dict[str, int]) -> None:
        for name, key in (("accepted", "accepted"), ("duplicate", "duplicates"), ("conflict", "conflicts"),
                          ("self_pair", "dropped_self_pairs")):
            self.pair_outcomes.labels(name).inc(outcome[key])
        self.pair_outcomes.labels("touching_held_out").inc(sum(held_out_splits.values()))
        for split, count in held_out_splits.items():
            self.held_out.labels(split).inc(count)

    def render(self) -> bytes:
        self.version.clear()  # the versions served change with a swap
        for version in self.versions.held:
            self.version.labels(version.id, "current" if version is self.versions.current else "previous").set(1)
        return generate_latest(self.registry)
