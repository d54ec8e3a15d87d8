"""The kernels' thread pool (pool.c) under back-to-back jobs from two calling threads.

With more pool threads than cores, workers lose their core between reading the job counter and claiming a
chunk. Before the pool closed a finished job's counter ahead of publishing the next job, such a worker could
claim a chunk with the new job's fields half-read and end the caller's wait early: wrong outputs here, and
segfaults in a server under load. This test saw mismatches in 5 of 9 runs of the old pool, none since.
"""

import threading

import pytest
import torch

from corral import kernels
from corral.kernels.linear import Q8Linear

pytestmark = pytest.mark.skipif(not kernels.available(), reason="no C compiler for the kernels")


def hammer(seed: int, calls: int, bad: list) -> None:
    g = torch.Generator().manual_seed(seed)
    # (3 x 512) @ (512 x ~1k) is above the pool's per-thread minimum, so every call is a parallel job
    linear = Q8Linear.from_float(torch.randn(1024 + 64 * seed, 512, generator=g), "q8_0")
    x = torch.randn(3, 512, generator=g)
    want = linear(x).clone()
    for i in range(calls):
        if not torch.equal(linear(x), want):
            bad.append((seed, i))
            return


def test_back_to_back_jobs_from_two_threads_give_the_same_bits_with_more_threads_than_cores():
    threads = torch.get_num_threads()
    torch.set_num_threads(8)
    try:
        for _ in range(3):
            bad: list = []
            workers = [threading.Thread(target=hammer, args=(s, 8000, bad)) for s in range(2)]
            for w in workers:
                w.start()
            for w in workers:
                w.join()
            assert not bad, f"a parallel matmul gave other bits than the same call before it: {bad}"
    finally:
        torch.set_num_threads(threads)
