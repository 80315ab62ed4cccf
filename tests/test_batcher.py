import asyncio
import time

import numpy as np

from embed_ft.server.batcher import Batcher, QueueFull


class FakeModel:
    """Records each forward pass; a text's vector is its first token id, so rows can be checked."""
    dim = 2

    def __init__(self, seconds: float = 0.0):
        self.passes, self.seconds = [], seconds

    def encode_ids(self, ids, batch_size, progress, bf16, skip=0):
        self.passes.append(len(ids))
        time.sleep(self.seconds)
        return np.array([[row[0], len(row)] for row in ids], np.float32)


class FakeVersion:
    def __init__(self, name, seconds=0.0):
        self.id, self.model = name, FakeModel(seconds)


def test_requests_that_arrive_together_share_a_forward_pass_and_get_their_own_rows():
    version = FakeVersion("v1", seconds=0.05)
    batcher = Batcher(token_budget=10_000)

    async def main():
        requests = [batcher.embed(version, [[i, 0, 0], [100 + i]]) for i in range(8)]
        return await asyncio.gather(*requests)

    results = asyncio.run(main())
    for i, vectors in enumerate(results):
        np.testing.assert_array_equal(vectors, [[i, 3], [100 + i, 1]])
    assert len(version.model.passes) <= 2 and sum(version.model.passes) == 16  # not 8 passes
    batcher.close()


def test_a_small_request_does_not_wait_behind_a_large_one():
    version = FakeVersion("v1", seconds=0.01)
    batcher = Batcher(token_budget=64 * 8, chunk=32)  # 64 texts of 8 tokens a pass: 2048 texts are 32 passes
    finished = {}

    async def main():
        async def timed(name, ids, delay=0.0):
            await asyncio.sleep(delay)
            await batcher.embed(version, ids)
            finished[name] = time.perf_counter()
        await asyncio.gather(timed("large", [[1] * 8] * 2048), timed("small", [[2] * 8], delay=0.03))

    asyncio.run(main())
    assert finished["small"] < finished["large"]
    assert max(version.model.passes) <= 64
    batcher.close()


def test_a_batch_holds_one_version_and_a_full_queue_refuses():
    old, new = FakeVersion("old", seconds=0.02), FakeVersion("new", seconds=0.02)
    batcher = Batcher(token_budget=10_000, max_queued=100)

    async def main():
        both = asyncio.gather(batcher.embed(old, [[1]] * 10), batcher.embed(new, [[2]] * 10))
        await asyncio.sleep(0)
        try:
            await batcher.embed(old, [[3]] * 95)
        except QueueFull:
            refused = True
        else:
            refused = False
        await both
        return refused

    assert asyncio.run(main())
    assert old.model.passes == [10] and new.model.passes == [10]  # never mixed
    batcher.close()



def test_requests_arriving_a_millisecond_apart_wait_for_each_other():
    version = FakeVersion("v1")
    batcher = Batcher(token_budget=10_000)  # lingers while arrivals are at most 2 ms apart

    async def main():
        async def later(i):
            await asyncio.sleep(0.001 * i)
            return await batcher.embed(version, [[i]])
        return await asyncio.gather(*(later(i) for i in range(4)))

    assert [v[0, 0] for v in asyncio.run(main())] == [0, 1, 2, 3]
    assert version.model.passes == [4]  # one pass, not one for the first and another for the rest
    batcher.close()
